//! Bad requests: each gets the right status, or the connection is dropped, and the VMM keeps
//! serving.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::common;
use crate::helpers::*;

const GET: &[&str] = &["vmm.ping", "vm.info", "vm.counters"];
const PUT_NO_BODY: &[&str] = &[
    "vmm.shutdown",
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.nmi",
    "vm.delete",
];
const NOT_YET: &[&str] = &["vm.add-device", "vm.add-user-device", "vm.add-vdpa"];

/// Sends raw bytes, returns what comes back until the server closes or 2 s pass.
fn raw(sock: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

fn assert_alive(vmm: &Vmm) {
    assert_eq!(vmm.ok_json("vmm.ping")["pid"], vmm.pid());
}

#[test]
fn every_endpoint_refuses_bad_requests() {
    require_curl();
    let vmm = Vmm::start("api-bad", &[]);
    // A method the endpoint does not take: 400 ["Bad Request", ...], as the original answers.
    for ep in GET {
        assert_eq!(vmm.curl("PUT", ep, None).0, 400, "PUT {ep}");
        assert_eq!(vmm.curl("POST", ep, Some("{}")).0, 400, "POST {ep}");
    }
    for ep in PUT_NO_BODY.iter().chain(["vm.create"].iter()) {
        let (status, body) = vmm.curl("GET", ep, None);
        assert_eq!(status, 400, "GET {ep}");
        assert_eq!(error_lines(&body)[0], "Bad Request", "GET {ep}");
        assert_eq!(vmm.curl("DELETE", ep, None).0, 400, "DELETE {ep}");
    }
    // Without a VM, as the original answers: boot and reboot 404, the actions that need a
    // running VM 500 "VM is not running", delete 204 (nothing to do).
    for ep in PUT_NO_BODY {
        let (expect, last) = match *ep {
            "vm.delete" => (204, ""),
            "vmm.shutdown" => continue,
            "vm.boot" => (404, "VM config is missing"),
            "vm.reboot" => (404, "VM is not created"),
            _ => (500, "VM is not running"),
        };
        let (status, body) = vmm.put(ep);
        assert_eq!(status, expect, "PUT {ep}");
        if expect != 204 {
            let lines = error_lines(&body);
            assert_eq!(lines[0], "Error from API", "PUT {ep}");
            assert_eq!(lines.last().unwrap(), last, "PUT {ep}");
        }
    }
    assert_eq!(vmm.curl("GET", "vm.info", None).0, 404);
    assert_eq!(vmm.curl("GET", "vm.counters", None).0, 500);
    for ep in NOT_YET {
        let (status, body) = vmm.curl("PUT", ep, Some("{}"));
        assert_eq!(status, 501, "{ep}");
        assert!(body.contains("not supported yet"), "{ep}: {body}");
    }
    // Hotplug: a body that is not the schema is 400, a good one without a VM 404.
    for (ep, body, want) in [
        ("vm.add-disk", "[]", 400),
        // As the original's: `path` is not required (a vhost-user disk has none).
        ("vm.add-disk", "{}", 404),
        ("vm.add-disk", r#"{"path": "/x"}"#, 404),
        ("vm.add-net", "[]", 400),
        ("vm.add-net", "{}", 404),
        ("vm.add-vsock", "{}", 400),
        (
            "vm.add-vsock",
            r#"{"cid": 3, "socket": "/tmp/x.sock"}"#,
            404,
        ),
        ("vm.add-pmem", "{}", 400),
        ("vm.add-pmem", r#"{"file": "/x"}"#, 404),
        ("vm.remove-device", "{}", 400),
        ("vm.remove-device", r#"{"id": "x"}"#, 404),
        ("vm.resize", r#"{"desired_vcpus": -1}"#, 400),
        ("vm.resize", "{}", 404),
        ("vm.resize-zone", "{}", 400),
        ("vm.resize-zone", r#"{"id": "z", "desired_ram": 1}"#, 404),
    ] {
        let (status, answer) = vmm.curl("PUT", ep, Some(body));
        assert_eq!(status, want, "{ep} {body}: {answer}");
    }
    for ep in ["vm.nothing", "vmm.nothing", ""] {
        let (status, body) = vmm.curl("GET", ep, None);
        assert_eq!(status, 404, "{ep}");
        assert_eq!(error_lines(&body)[0], "Not Found", "{ep}");
    }

    // vm.create bodies.
    let kernel = common::guest().elf_pvh.display().to_string();
    for (body, why) in [
        ("", "VmConfig"),
        ("{", "EOF"),
        ("[]", "invalid"),
        ("null", "invalid"),
        ("{}", "payload"),
        (r#"{"payload": 7}"#, "invalid type"),
        (
            r#"{"payload": {}, "cpus": {"boot_vcpus": "two", "max_vcpus": 2}}"#,
            "invalid type",
        ),
        (
            r#"{"payload": {}, "memory": {"size": -1}}"#,
            "invalid value",
        ),
        (r#"{"payload": {}}"#, "kernel"),
        (r#"{"payload": {"kernel": "/nonexistent"}}"#, "/nonexistent"),
        (r#"{"payload": {"firmware": "/fw"}}"#, "firmware"),
    ] {
        let (status, text) = vmm.curl("PUT", "vm.create", Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
    // vm.restore bodies: one that does not read, and one this VMM cannot restore (answered
    // before the VMM is asked), are 400.
    for (body, why) in [
        ("", "RestoreConfig"),
        ("{", "EOF"),
        ("{}", "source_url"),
        (r#"{"source_url": "file:///s", "bogus": 1}"#, "bogus"),
        (
            r#"{"source_url": "file:///s", "prefault": true, "memory_restore_mode": "OnDemand"}"#,
            "'prefault' cannot be combined",
        ),
        (
            r#"{"source_url": "file:///s", "vfio_fds": [{"id": "v0"}]}"#,
            "VFIO",
        ),
        (
            r#"{"source_url": "file:///s", "zone_updates": [{"id": "", "host_numa_node": 0}]}"#,
            "empty ID",
        ),
    ] {
        let (status, text) = vmm.curl("PUT", "vm.restore", Some(body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(why), "{body}: {text}");
    }
    for (extra, field) in [
        (
            r#""disks": [{"path": "/nonexistent/d.img"}]"#,
            "/nonexistent/d.img",
        ),
        (
            r#""disks": [{"path": "/dev/null", "queue_size": 0}]"#,
            "queue_size",
        ),
        (r#""net": [{"tap": "tap0", "num_queues": 3}]"#, "num_queues"),
        (r#""rng": {"src": "/nonexistent/rng"}"#, "/nonexistent/rng"),
        (r#""vsock": {"cid": 2, "socket": "/v"}"#, "vsock"),
        (r#""tpm": {"socket": "/t", "x": 1}"#, "tpm.x"),
        (
            r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": true}"#,
            "kvm_hyperv",
        ),
        (r#""cpus": {"boot_vcpus": 4, "max_vcpus": 2}"#, "boot"),
        (
            r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 1, "host_cpus": [0]}]}"#,
            "affinity: vCPU 1 is not below max (1)",
        ),
        // Keys of the original's objects that this VMM does not model yet, named.
        (
            r#""cpus": {"boot_vcpus": 1, "max_vcpus": 1, "bogus": [{"vcpu": 0}]}"#,
            "cpus.bogus",
        ),
        (
            r#""memory": {"size": 268435456, "hotplug_size": 100000000}"#,
            "128 MiB",
        ),
        (r#""memory": {"size": 1000}"#, "4 KiB"),
    ] {
        let body = format!(r#"{{"payload": {{"kernel": "{kernel}"}}, {extra}}}"#);
        let (status, text) = vmm.curl("PUT", "vm.create", Some(&body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(field), "{field}: {text}");
    }
    // The original's clients send the default entropy device: accepted.
    let body = format!(
        r#"{{"payload": {{"kernel": "{kernel}"}}, "rng": {{"src": "/dev/urandom"}}, "disks": null}}"#
    );
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&body)).0, 204);
    assert_eq!(vmm.put("vm.delete").0, 204);
    assert_alive(&vmm);
}

#[test]
fn hostile_clients_do_not_hurt_the_vmm() {
    let vmm = Vmm::start("api-hostile", &[]);
    // Malformed HTTP.
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ] {
        let resp = raw(&vmm.sock, junk);
        assert!(
            resp.is_empty()
                || status_line(&resp).contains(" 400 ")
                || status_line(&resp).contains(" 505 "),
            "{junk:?}: {resp}"
        );
        assert_alive(&vmm);
    }
    // A body over the limit (4 MiB, as the original's): 400, and the connection ends.
    let big = vec![b' '; 5 << 20];
    let mut req = format!(
        "PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    assert!(status_line(&raw(&vmm.sock, &req)).contains(" 400 "));
    let mut chunked =
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 << 10).as_bytes());
        chunked.extend_from_slice(&vec![b' '; 64 << 10]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert!(status_line(&raw(&vmm.sock, &chunked)).contains(" 400 "));
    assert_alive(&vmm);

    // Clients that vanish mid-request, or stall.
    for partial in [
        &b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"pay"[..],
        b"GET /api/v1/vmm.pi",
    ] {
        let mut s = UnixStream::connect(&vmm.sock).unwrap();
        s.write_all(partial).unwrap();
        drop(s);
    }
    let stalled: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = UnixStream::connect(&vmm.sock).unwrap();
            s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    assert_alive(&vmm);

    // Many concurrent clients, each with a few keep-alive requests.
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let sock = vmm.sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                for _ in 0..5 {
                    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).unwrap();
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a concurrent client failed");
    }
    drop(stalled);
    assert_alive(&vmm);
}
