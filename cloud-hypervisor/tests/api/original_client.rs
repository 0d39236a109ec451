//! The VMM as the original's own client sees it. The original's `api_client` crate (used by its
//! `ch-remote`, and embedded in other tools) is strict in ways a general HTTP client is not,
//! so this client behaves the same way, written from its observed behaviour:
//!
//! - a request goes out in pieces: the request line with `Host` and `Accept`, then
//!   `Content-Length: N` on its own, then the blank line, then the body;
//! - the answer is read in 256-byte reads and must be UTF-8;
//! - the status code is all the text between `HTTP/1.1 ` and the first CR, trimmed, as a
//!   number: a reason phrase (`200 OK`) makes it fail;
//! - the body is read only if `Content-Length: ` appears with exactly that case;
//! - 200, 204 and 100 are success; anything else is an error whose body, a JSON list of
//!   strings, is the error chain it shows to the user.
//!
//! On top of that, the answers must have the original server's exact header lines.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use crate::helpers::*;

/// What the original's client makes of an answer.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok(Option<String>),
    ServerError(u16, Option<String>),
}

fn request(s: &mut UnixStream, method: &str, cmd: &str, body: Option<&str>) -> (Outcome, String) {
    s.write_all(
        format!("{method} /api/v1/{cmd} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n").as_bytes(),
    )
    .unwrap();
    if let Some(b) = body {
        s.write_all(format!("Content-Length: {}\r\n", b.len()).as_bytes())
            .unwrap();
    }
    s.write_all(b"\r\n").unwrap();
    if let Some(b) = body {
        s.write_all(b.as_bytes()).unwrap();
    }
    read_answer(s)
}

/// Returns the outcome and the raw answer.
fn read_answer(s: &mut UnixStream) -> (Outcome, String) {
    let mut res = String::new();
    let mut body_at = None;
    let mut length: Option<usize> = None;
    loop {
        let mut chunk = [0u8; 256];
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        res.push_str(std::str::from_utf8(&chunk[..n]).expect("the answer is UTF-8"));
        if let Some(o) = res.find("\r\n\r\n") {
            body_at = Some(o + 4);
            length = res.find("Content-Length: ").map(|o| {
                let v = &res[o + 16..o + res[o..].find('\r').unwrap()];
                v.trim().parse().expect("Content-Length is a number")
            });
            if length.is_none() {
                break;
            }
        }
        if let (Some(at), Some(len)) = (body_at, length) {
            if res.len() >= at + len {
                break;
            }
        }
    }
    let body = length.and(body_at.map(|o| res[o..].to_string()));
    let o = res.find("HTTP/1.1").expect("the answer has HTTP/1.1");
    let code: u16 = res[o + 9..o + res[o..].find('\r').unwrap()]
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("the original's client cannot read this status: {e}: {res}"));
    let outcome = match code {
        100 | 200 | 204 => Outcome::Ok(body),
        _ => Outcome::ServerError(code, body),
    };
    (outcome, res)
}

/// The answer's head is the original server's, line for line.
fn assert_head(raw: &str, code: u16, length: Option<usize>) {
    let head = &raw[..raw.find("\r\n\r\n").expect("a complete head") + 2];
    let mut expected =
        format!("HTTP/1.1 {code} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n");
    if let Some(n) = length {
        expected.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {n}\r\n"
        ));
    }
    assert_eq!(head, expected);
}

fn chain(outcome: &Outcome) -> Vec<String> {
    match outcome {
        Outcome::ServerError(_, Some(b)) => error_lines(b),
        other => panic!("not an error with a body: {other:?}"),
    }
}

#[test]
fn the_originals_client_reads_every_answer() {
    let vmm = Vmm::start("api-original-client", &[]);
    let serial = vmm.dir.join("serial.out");
    // One keep-alive connection for everything, as a tool embedding the client may use.
    let mut s = UnixStream::connect(&vmm.sock).unwrap();

    let (o, raw) = request(&mut s, "GET", "vmm.ping", None);
    let Outcome::Ok(Some(body)) = o else {
        panic!("{o:?}")
    };
    assert_head(&raw, 200, Some(body.len()));
    let ping: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ping["pid"], vmm.pid());

    let (o, raw) = request(&mut s, "GET", "vm.info", None);
    assert_eq!(
        chain(&o),
        [
            "Error from API",
            "The VM info is not available",
            "VM is not created"
        ]
    );
    assert!(matches!(o, Outcome::ServerError(404, _)));
    assert_head(
        &raw,
        404,
        Some(raw.len() - raw.find("\r\n\r\n").unwrap() - 4),
    );

    let config = guest_config("tick", &serial);
    let (o, raw) = request(&mut s, "PUT", "vm.create", Some(&config));
    assert_eq!(o, Outcome::Ok(None));
    assert_head(&raw, 204, None);

    let (o, _) = request(&mut s, "PUT", "vm.pause", None);
    assert!(matches!(o, Outcome::ServerError(500, _)), "{o:?}");
    assert_eq!(
        chain(&o)[..2],
        ["Error from API", "The VM could not be paused"]
    );

    let (o, _) = request(&mut s, "PUT", "vm.boot", None);
    assert_eq!(o, Outcome::Ok(None));
    wait_for(&serial, "READY", 1);
    let (o, raw) = request(&mut s, "GET", "vm.info", None);
    let Outcome::Ok(Some(body)) = o else {
        panic!("{o:?}")
    };
    assert_head(&raw, 200, Some(body.len()));
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running");

    let (o, _) = request(&mut s, "GET", "vm.counters", None);
    assert!(matches!(o, Outcome::Ok(Some(_))), "{o:?}");
    for cmd in ["vm.pause", "vm.resume", "vm.shutdown", "vm.delete"] {
        let (o, raw) = request(&mut s, "PUT", cmd, None);
        assert_eq!(o, Outcome::Ok(None), "{cmd}");
        assert_head(&raw, 204, None);
    }
    // A method an endpoint does not take, a path the API does not have.
    let (o, _) = request(&mut s, "PUT", "vmm.ping", None);
    assert!(matches!(o, Outcome::ServerError(400, _)));
    assert_eq!(chain(&o)[0], "Bad Request");
    let (o, _) = request(&mut s, "GET", "vm.nothing", None);
    assert!(matches!(o, Outcome::ServerError(404, _)));
    assert_eq!(chain(&o)[0], "Not Found");
    // Bodies the VMM cannot take: the chain says why.
    let (o, _) = request(&mut s, "PUT", "vm.create", Some("{ not json"));
    assert!(matches!(o, Outcome::ServerError(400, _)));
    assert_eq!(chain(&o)[0], "Failed to deserialize JSON");
    let (o, _) = request(
        &mut s,
        "PUT",
        "vm.add-vdpa",
        Some(r#"{"path": "/dev/vhost-vdpa-0"}"#),
    );
    assert!(matches!(o, Outcome::ServerError(501, _)));
    assert_eq!(
        chain(&o).last().unwrap(),
        "vm.add-vdpa is not supported yet"
    );

    // vmm.shutdown: 200 with an empty body, then the socket goes.
    let (o, raw) = request(&mut s, "PUT", "vmm.shutdown", None);
    assert_eq!(o, Outcome::Ok(Some(String::new())));
    assert_head(&raw, 200, Some(0));
    let mut vmm = vmm;
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
}

/// Requests that arrive a byte at a time, and several in one write, are each answered once.
#[test]
fn requests_in_pieces_and_pipelined() {
    let vmm = Vmm::start("api-pieces", &[]);
    let mut s = UnixStream::connect(&vmm.sock).unwrap();
    for b in b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let (o, _) = read_answer(&mut s);
    assert!(matches!(o, Outcome::Ok(Some(_))), "{o:?}");
    let ping = "GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
    let info = "GET /api/v1/vm.info HTTP/1.1\r\n\r\n";
    s.write_all(format!("{ping}{info}{ping}").as_bytes())
        .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut all = String::new();
    while all.matches("HTTP/1.1 ").count() < 3 || !all.ends_with('}') {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("three answers");
        assert!(n > 0, "closed early: {all}");
        all.push_str(std::str::from_utf8(&buf[..n]).unwrap());
    }
    let codes: Vec<&str> = all.split("HTTP/1.1 ").skip(1).map(|a| &a[..3]).collect();
    assert_eq!(codes, ["200", "404", "200"]);
}

/// The VMM's CPU time so far (user + system, in clock ticks), from /proc/PID/stat.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (in parentheses, which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// After a burst of requests the control loop polls for a moment (API_POLL, 200 µs) instead
/// of sleeping, then sleeps again: once the API is quiet the VMM uses no CPU.
#[test]
fn the_vmm_idles_once_the_api_is_quiet() {
    let vmm = Vmm::start("api-idle", &[]);
    let mut s = UnixStream::connect(&vmm.sock).unwrap();
    for _ in 0..2000 {
        let (o, _) = request(&mut s, "GET", "vmm.ping", None);
        assert!(matches!(o, Outcome::Ok(Some(_))));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    let before = cpu_ticks(vmm.pid());
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let used = cpu_ticks(vmm.pid()) - before;
    // A clock tick is 10 ms: a loop still polling would show about 100 of them.
    assert!(
        used <= 2,
        "the VMM used {used} ticks of CPU in a quiet second"
    );
}

/// A client that asks `Expect: 100-continue` (curl does for large bodies) gets the interim
/// answer first, then sends its body and gets the final one.
#[test]
fn expect_100_continue() {
    let vmm = Vmm::start("api-continue", &[]);
    let mut s = UnixStream::connect(&vmm.sock).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let body = "{ not json }";
    s.write_all(
        format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let interim = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(interim.starts_with("HTTP/1.1 100 \r\n"), "{interim}");
    assert!(
        interim.ends_with("\r\n\r\n"),
        "one interim answer only: {interim}"
    );
    s.write_all(body.as_bytes()).unwrap();
    let (o, _) = read_answer(&mut s);
    assert!(matches!(o, Outcome::ServerError(400, _)), "{o:?}");
    assert_eq!(chain(&o)[0], "Failed to deserialize JSON");
}
