//! Live migration over `tcp:` in mutual TLS (`tls_dir`, the original's): certificates made
//! with the openssl command (package `openssl`), a CA for each side's certificate; a source
//! whose certificate another CA issued is refused at the handshake (and its VM runs on); with
//! the right ones the busy guest goes on at the destination, every word of its memory right
//! (its memory over two more connections), then on to a third VMM in postcopy (the fault
//! connection in TLS too).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;
use crate::helpers::*;
use crate::migration::{
    boot, drain, migrate_ok, progress_end, receive, rounds, send, until_round, wait_child,
    wait_listening,
};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (Debian package openssl) makes the test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` and the two `tls_dir`s it vouches for: (the sender's, the receiver's). The
/// receiver's certificate names 127.0.0.1 (the URL's host).
fn pki(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca: Vec<&str> = ["req", "-x509"]
        .into_iter()
        .chain(ec)
        .chain([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ch-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ])
        .collect();
    openssl(dir, &ca);
    let mut sides = Vec::new();
    for (side, usage) in [("client", "clientAuth"), ("server", "serverAuth")] {
        let d = dir.join(side);
        std::fs::create_dir_all(&d).unwrap();
        let (key, cert) = (format!("{side}-key.pem"), format!("{side}-cert.pem"));
        let csr: Vec<&str> = ["req"]
            .into_iter()
            .chain(ec)
            .chain(["-keyout", &key, "-out", "req.csr", "-subj", "/CN=ch-test"])
            .collect();
        openssl(&d, &csr);
        let ext = format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        );
        std::fs::write(d.join("ext.cnf"), ext).unwrap();
        let ca_cert = dir.join("ca-cert.pem").display().to_string();
        let ca_key = dir.join("ca-key.pem").display().to_string();
        openssl(
            &d,
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                "ext.cnf",
            ],
        );
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
        sides.push(d);
    }
    (sides.remove(0), sides.remove(0))
}

#[test]
fn live_migration_in_mutual_tls() {
    require_curl();
    let dir = common::scratch("migrate-tls-pki");
    let (client, server) = pki(&dir.join("good"));
    let (stranger, _) = pki(&dir.join("other"));
    let (mut a, mut a_out) = boot("migrate-tls-src", false, false, &[]);
    let mut b = Vmm::start("migrate-tls-dst", &[]);
    // A port of this process's own, unlikely to be taken (the plain tcp test uses the one
    // below it).
    let port = 20001 + (std::process::id() % 20000);
    let url = format!("tcp:127.0.0.1:{port}");
    let rx_config = format!("receiver_url={url},tls_dir={}", server.display());

    // Another CA's client: refused by the receiver at the handshake; the source runs on.
    let rx = receive(&b, &rx_config);
    wait_listening(&url);
    let tx = send(
        &a,
        &format!("destination_url={url},tls_dir={}", stranger.display()),
        false,
    );
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(1), "send-migration: {err}");
    assert!(err.contains("TLS handshake"), "{err}");
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(1), "receive-migration: {err}");
    assert!(err.contains("TLS handshake"), "{err}");
    assert_eq!(progress_end(&a)["state"], "failed");
    assert_eq!(a.state(), "Running");
    drain(&mut a, &mut a_out);
    let now = rounds(&a_out).last().unwrap().0;
    until_round(&mut a, &mut a_out, now + 2);

    // The right certificates: the VM goes over, and on, its memory over two more
    // connections, each in TLS of its own. A downtime of 500 ms: through TLS a pass moves
    // about 350 MiB/s here, less than the guest dirties, so 50 ms never comes.
    let last = migrate_ok(
        &mut a,
        &mut a_out,
        &b,
        &rx_config,
        &format!(
            "destination_url={url},tls_dir={},downtime_ms=500,connections=2",
            client.display()
        ),
    );
    let mut b_out = String::new();
    let after = until_round(&mut b, &mut b_out, last + 5);
    assert!(after.iter().all(|r| r.1 == "ok"), "{b_out}");

    // On to a third VMM in postcopy: the fault connection in TLS of its own too.
    let mut c = Vmm::start("migrate-tls-dst2", &[]);
    let last = migrate_ok(
        &mut b,
        &mut b_out,
        &c,
        &format!("{rx_config},memory_mode=postcopy"),
        &format!(
            "destination_url={url},tls_dir={},memory_mode=postcopy",
            client.display()
        ),
    );
    let mut c_out = String::new();
    let after = until_round(&mut c, &mut c_out, last + 5);
    assert!(after.iter().all(|r| r.1 == "ok"), "{c_out}");
    assert_eq!(c.put("vmm.shutdown").0, 200);
}
