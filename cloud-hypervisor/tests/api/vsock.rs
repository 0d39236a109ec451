//! virtio-vsock end to end with the test guest's `test=vsock` driver (virtio-drivers'
//! connection manager) and the original's hybrid vsock: the guest connects out to a host
//! listener at `<socket>_4321`; a host program connects to `<socket>`, says `CONNECT 1234`,
//! gets `OK <port>` and has 1 MiB echoed back byte-exact (credit and ordering under load); a
//! CONNECT to a port the guest does not listen on is closed; the VMM goes on. After a snapshot
//! and a restore in a new VMM the guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET and new
//! connections work.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use crate::common;
use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Host connects to guest port `port`: the stream after its `OK <n>` line (None: closed).
fn connect(sock: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let line = read_line(&mut s);
    if line.is_empty() {
        return None;
    }
    let n: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("answer {line:?}"));
    assert!(n >= 1 << 30, "host-side port {n}");
    Some(s)
}

/// Sends `data` and reads as many bytes back at the same time; returns what came back.
fn echo(s: &UnixStream, data: &[u8]) -> Vec<u8> {
    let mut w = s.try_clone().unwrap();
    let send = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&send).unwrap());
    let mut back = vec![0u8; data.len()];
    (&*s).read_exact(&mut back).unwrap();
    writer.join().unwrap();
    back
}

#[test]
fn vsock_both_directions_through_the_unix_socket() {
    let dir = common::scratch("vsock-socks");
    let sock = dir.join("v.sock");
    // The guest connects out first: the listener must exist before it boots.
    let host_listener = UnixListener::bind(dir.join("v.sock_4321")).unwrap();
    let answer = std::thread::spawn(move || {
        let (mut s, _) = host_listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let line = read_line(&mut s);
        s.write_all(b"hello from host\n").unwrap();
        line
    });
    let out = common::scratch("vsock-serial");
    let serial = out.join("serial.out");
    let kernel = common::guest().elf_pvh.display().to_string();
    let vsock = format!("cid=3,socket={}", sock.display());
    let serial_arg = format!("file={}", serial.display());
    let vmm = Vmm::start(
        "vsock",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=vsock vsock_secs=300",
            "--cpus",
            "boot=1",
            "--memory",
            "size=256M",
            "--vsock",
            &vsock,
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    wait_line(&serial, "VSOCK listening port=1234", 1, WAIT);
    assert_eq!(answer.join().unwrap(), "hello from guest");
    wait_line(&serial, "VSOCK connected port=4321 ok", 1, WAIT);
    wait_line(&serial, "VSOCK cid=3", 1, WAIT);

    // 1 MiB through the guest's echo, byte-exact.
    let s = connect(&sock, 1234).expect("the guest refused port 1234");
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let t = std::time::Instant::now();
    let back = echo(&s, &data);
    let secs = t.elapsed().as_secs_f64();
    assert!(back == data, "the echo differs");
    eprintln!("vsock: 1 MiB echoed in {secs:.3} s");
    drop(s);
    wait_line(&serial, "VSOCK echo bytes=1048576", 1, WAIT);

    // No listener at guest port 999: the host stream is closed, no OK.
    assert!(connect(&sock, 999).is_none());
    // Garbage instead of CONNECT: closed too.
    let mut g = UnixStream::connect(&sock).unwrap();
    g.set_read_timeout(Some(WAIT)).unwrap();
    g.write_all(b"GET / HTTP/1.0\n").unwrap();
    assert_eq!(read_line(&mut g), "");

    // A second connection still works, and the VMM answers.
    let s = connect(&sock, 1234).expect("the guest refused port 1234 again");
    assert_eq!(echo(&s, b"again"), b"again");
    drop(s);
    wait_line(&serial, "VSOCK echo bytes=5", 1, WAIT);
    assert_eq!(vmm.state(), "Running");
    assert_no_fail(&serial);
    // vm.info shows the device as the original's configuration.
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["vsock"]["cid"], 3);
    assert_eq!(
        info["config"]["vsock"]["socket"],
        sock.display().to_string()
    );
    // A reboot rebuilds the device on the same socket (the old one gave it up).
    let (status, body) = vmm.put("vm.reboot");
    assert_eq!(status, 204, "{body}");
    wait_line(&serial, "VSOCK listening port=1234", 2, WAIT);
    let s = connect(&sock, 1234).expect("the guest refused port 1234 after the reboot");
    assert_eq!(echo(&s, b"rebooted"), b"rebooted");
}

/// A VM with an open vsock connection is snapshotted and restored in a new VMM: the guest's
/// event queue gets the transport reset (virtio 1.2, 5.10.6.6) and it reads its CID again, the
/// old host stream has ended with the old VMM, and a new connection is echoed.
#[test]
fn vsock_transport_reset_after_restore() {
    require_curl();
    let dir = common::scratch("vsock-restore-socks");
    let sock = dir.join("v.sock");
    let out = common::scratch("vsock-restore-serial");
    let serial = out.join("serial.out");
    let kernel = common::guest().elf_pvh.display().to_string();
    let vsock = format!("cid=3,socket={}", sock.display());
    let serial_arg = format!("file={}", serial.display());
    let a = Vmm::start(
        "vsock-restore-a",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=vsock vsock_secs=300 vsock_evq=1",
            "--cpus",
            "boot=1",
            "--memory",
            "size=256M",
            "--vsock",
            &vsock,
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    wait_line(&serial, "VSOCK event buffer posted", 1, WAIT);
    wait_line(&serial, "VSOCK listening port=1234", 1, WAIT);
    let mut old = connect(&sock, 1234).expect("the guest refused port 1234");
    assert_eq!(echo(&old, b"before"), b"before");

    assert_eq!(a.put("vm.pause").0, 204);
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = serde_json::json!({ "destination_url": url }).to_string();
    let (status, text) = a.curl("PUT", "vm.snapshot", Some(&body));
    assert_eq!(status, 204, "{text}");
    let mut a = a;
    assert_eq!(a.put("vmm.shutdown").0, 200);
    assert_eq!(a.wait().code(), Some(0));
    // The connection lived in the old VMM's socket: it ended with it.
    let mut b = [0u8; 8];
    assert_eq!(old.read(&mut b).unwrap_or(0), 0);
    assert!(
        !serial_text(&serial).contains("VSOCK transport-reset"),
        "a reset event before the restore"
    );

    let arg = format!("source_url={url},resume=on");
    let b = Vmm::start("vsock-restore-b", &["--restore", &arg]);
    wait_line(&serial, "VSOCK transport-reset cid=3", 1, WAIT);
    let s = connect(&sock, 1234).expect("the guest refused port 1234 after the restore");
    assert_eq!(echo(&s, b"after the restore"), b"after the restore");
    drop(s);
    wait_line(&serial, "VSOCK echo bytes=17", 1, WAIT);
    assert_eq!(b.state(), "Running");
    assert_no_fail(&serial);
    // Exactly one event.
    std::thread::sleep(Duration::from_millis(200));
    let text = serial_text(&serial);
    assert_eq!(text.matches("VSOCK transport-reset").count(), 1, "{text}");
}
