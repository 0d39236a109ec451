//! Live migration between two VMMs (`vm.send-migration`, `vm.receive-migration`, and their
//! ch-remote commands) over `unix:` and `tcp:`, with a busy guest that rewrites 32 MiB every
//! 20 ms and checks every word of it each round; a destination that goes away mid-way; local
//! migration handing the memory files over; refusals. The progress (ours:
//! `vm.migration-progress`, and `ch-remote send-migration` following it) along the way.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

/// A busy guest's configuration with its serial port on the VMM's stdout (each VMM has its
/// own), `busy_mem=32`, 256 MiB.
fn config(shared: bool, disk: Option<&Path>) -> Value {
    let kernel = common::guest().elf_pvh.display().to_string();
    let mut c = json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256u64 << 20, "shared": shared},
        "payload": {"kernel": kernel, "cmdline": "test=busy busy_mem=32"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    if let Some(d) = disk {
        std::fs::write(d, vec![0u8; 1 << 20]).unwrap();
        c["disks"] = json!([{"path": d}]);
    }
    c
}

/// The complete BUSY lines of `text`: (round, mem, gen).
pub(crate) fn rounds(text: &str) -> Vec<(u64, String, String)> {
    busy_lines(text)
        .into_iter()
        .map(|b| (b.n, b.mem, b.gen))
        .collect()
}

/// Reads what the VMM has written on its stdout so far (non-blocking).
pub(crate) fn drain(vmm: &mut Vmm, into: &mut String) {
    let Some(out) = vmm.child.as_mut().and_then(|c| c.stdout.as_mut()) else {
        return;
    };
    // SAFETY: sets O_NONBLOCK on a pipe we own.
    unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = [0u8; 65536];
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        into.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Drains `vmm`'s stdout until round `n` shows; returns the rounds.
pub(crate) fn until_round(vmm: &mut Vmm, text: &mut String, n: u64) -> Vec<(u64, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        drain(vmm, text);
        assert!(!text.contains("FAIL"), "{text}");
        let r = rounds(text);
        if r.last().is_some_and(|l| l.0 >= n) {
            return r;
        }
        assert!(Instant::now() < deadline, "no BUSY {n}:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots the busy guest (with a disk in the VMM's directory where `disk`) and lets it run a
/// few rounds.
pub(crate) fn boot(name: &str, shared: bool, disk: bool, extra: &[&str]) -> (Vmm, String) {
    let mut vmm = Vmm::start(name, extra);
    let disk = disk.then(|| vmm.dir.join("disk.img"));
    let config = config(shared, disk.as_deref());
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    let mut out = String::new();
    until_round(&mut vmm, &mut out, 5);
    (vmm, out)
}

/// `ch-remote receive-migration <url>` on `vmm`, in the background (it answers when the VM
/// has arrived).
pub(crate) fn receive(vmm: &Vmm, url: &str) -> Child {
    Command::new(ch_remote_bin())
        .arg("--api-socket")
        .arg(&vmm.sock)
        .args(["receive-migration", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

pub(crate) fn wait_child(mut c: Child) -> (Option<i32>, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            let _ = c.stderr.take().unwrap().read_to_string(&mut err);
            return (st.code(), err);
        }
        assert!(Instant::now() < deadline, "ch-remote did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How `migrate_and_check` starts the migration.
enum Drive {
    /// `ch-remote send-migration <config>`, which follows the progress; the options after
    /// the URL. `true`: through a link that holds an answer (`held_link`), so that the
    /// migration lasts, with its progress also asked with curl mid-way.
    ChRemote(&'static str, bool),
    /// `ch-remote send-migration --no-wait`, which returns at once (as the original's).
    NoWait,
}

/// `ch-remote send-migration` on `vmm`, in the background.
pub(crate) fn send(vmm: &Vmm, config: &str, no_wait: bool) -> Child {
    let mut c = Command::new(ch_remote_bin());
    c.arg("--api-socket")
        .arg(&vmm.sock)
        .args(["send-migration", config]);
    if no_wait {
        c.arg("--no-wait");
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `vm.migration-progress`, with curl: its status and its body as JSON (Null if none).
pub(crate) fn progress(vmm: &Vmm) -> (u16, Value) {
    let (status, text) = vmm.curl("GET", "vm.migration-progress", None);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asks for the progress until it is no longer "running"; returns it.
pub(crate) fn progress_end(vmm: &Vmm) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, p) = progress(vmm);
        assert_eq!(status, 200, "{p}");
        if p["state"] != "running" {
            return p;
        }
        assert!(Instant::now() < deadline, "still running: {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks the shape of a progress answer for a migration of a 256 MiB guest to `url`.
fn check_progress(p: &Value, url: &str) {
    let o = p
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {p}"));
    assert_eq!(p["destination_url"], url, "{p}");
    assert_eq!(p["memory_bytes"], 256u64 << 20, "{p}");
    for k in [
        "pass",
        "bytes",
        "total_bytes",
        "dirty_bytes",
        "memory_bytes",
        "elapsed_ms",
    ] {
        assert!(p[k].is_u64(), "{k}: {p}");
    }
    let state = p["state"].as_str().unwrap_or_default();
    assert!(["running", "completed", "failed"].contains(&state), "{p}");
    assert_eq!(o.contains_key("downtime_us"), state == "completed", "{p}");
    assert_eq!(o.contains_key("error"), state == "failed", "{p}");
    assert!(p["total_bytes"].as_u64() >= p["bytes"].as_u64(), "{p}");
}

/// How long `held_link` holds the answer to the second memory pass.
const HOLD: Duration = Duration::from_secs(1);

/// A relay of one TCP connection from `listener` to `to` that holds the destination's fourth
/// answer (Start, Config and the first memory pass are answered before it: it answers the
/// second pass, or the last one, made while the VM is paused) for `HOLD`: the source then
/// waits with a pass made, long enough to be seen.
fn held_link(listener: std::net::TcpListener, to: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (src, _) = listener.accept().unwrap();
        let dst = std::net::TcpStream::connect(&to).unwrap();
        relay_answers(src, dst, |n| {
            if n == 4 {
                std::thread::sleep(HOLD);
            }
        });
    })
}

/// Relays one migration connection: requests from `src` to `dst` as they come, answers (a
/// 16-byte header: status, padding, payload length; then the payload) back one at a time,
/// `each(n)` called before the n-th (from 1) goes back.
pub(crate) fn relay_answers(
    mut src: std::net::TcpStream,
    mut dst: std::net::TcpStream,
    mut each: impl FnMut(usize),
) {
    use std::net::Shutdown;
    let (mut from_src, mut to_dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    let forth = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_src, &mut to_dst);
        let _ = to_dst.shutdown(Shutdown::Write);
    });
    for n in 1.. {
        let mut head = [0u8; 16];
        if dst.read_exact(&mut head).is_err() {
            break;
        }
        let len = u64::from_le_bytes(head[8..].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        if dst.read_exact(&mut payload).is_err() {
            break;
        }
        each(n);
        if src
            .write_all(&head)
            .and_then(|()| src.write_all(&payload))
            .is_err()
        {
            break;
        }
    }
    let _ = src.shutdown(Shutdown::Write);
    let _ = forth.join();
}

/// Waits until something listens on `url`.
pub(crate) fn wait_listening(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = match url.split_once(':') {
            Some(("unix", p)) => Path::new(p).exists(),
            Some(("tcp", a)) => {
                // A probe connection would be taken as the source: look at the listeners.
                let port = a.rsplit_once(':').unwrap().1;
                let hex = format!(":{:04X} ", port.parse::<u16>().unwrap());
                std::fs::read_to_string("/proc/net/tcp")
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
            }
            _ => false,
        };
        if up {
            // A Unix socket's file appears at bind(), a moment before listen().
            std::thread::sleep(Duration::from_millis(50));
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {url}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Migrates a busy guest from one VMM to another over `url` and checks that it goes on there:
/// the next round, every word of its 32 MiB pattern right, the same generation ID; the source
/// VMM ends, the destination reports Running and the events of both sides. `drive`: how, and
/// what ch-remote says of it.
/// Migrates a busy guest from a new VMM to another over `url` and checks it runs on there.
/// `rx_opts`: the receiver's options after its URL (`,memory_mode=postcopy` makes it a
/// postcopy migration; the sender's go in `drive`).
fn migrate_and_check(
    name: &str,
    url: &str,
    shared: bool,
    local: bool,
    disk: bool,
    drive: Drive,
    rx_opts: &str,
) {
    let postcopy = rx_opts.contains("postcopy");
    let dir = common::scratch(&format!("{name}-events"));
    let src_events = dir.join("src.json");
    let dst_events = dir.join("dst.json");
    let src_monitor = format!("path={}", src_events.display());
    let dst_monitor = format!("path={}", dst_events.display());
    // Postcopy: both VMMs log what they fetched and served.
    let dst_log = dir.join("dst.log");
    let dst_log_arg = dst_log.display().to_string();
    let (mut src_args, mut dst_args) = (
        vec!["--event-monitor", &src_monitor],
        vec!["--event-monitor", &dst_monitor],
    );
    if postcopy {
        src_args.push("-v");
        dst_args.extend(["-v", "--log-file", &dst_log_arg]);
    }
    let (mut a, mut a_out) = boot(&format!("{name}-src"), shared, disk, &src_args);
    let mut b = Vmm::start(&format!("{name}-dst"), &dst_args);
    let mut url = url.replace("DIR", &b.dir.display().to_string());
    let rx = receive(&b, &format!("receiver_url={url}{rx_opts}"));
    wait_listening(&url);
    assert_eq!(progress(&a).0, 404, "no migration yet");
    match drive {
        Drive::NoWait => {
            let local = if local { ",local=on" } else { "" };
            let tx = send(&a, &format!("destination_url={url}{local}"), true);
            let (code, err) = wait_child(tx);
            assert_eq!(
                (code, err.as_str()),
                (Some(0), ""),
                "returns at once, silent"
            );
        }
        Drive::ChRemote(opts, long) => {
            // The link: the source sends to it, it relays to the destination.
            let link = long.then(|| {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let to = url.strip_prefix("tcp:").expect("a tcp: URL").to_string();
                url = format!("tcp:{}", l.local_addr().unwrap());
                held_link(l, to)
            });
            let tx = send(&a, &format!("destination_url={url}{opts}"), false);
            if long {
                // Mid-way: running, a pass made (the link holds the next answer).
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let (status, p) = progress(&a);
                    assert_eq!(status, 200, "{p}");
                    check_progress(&p, &url);
                    assert_eq!(p["state"], "running", "{p}");
                    if p["pass"].as_u64() >= Some(1) {
                        // The first pass sent the 32 MiB the guest writes, and more.
                        assert!(p["total_bytes"].as_u64() >= Some(32 << 20), "{p}");
                        // The second pass may have reported some bytes already.
                        assert!(p["total_bytes"].as_u64() >= p["bytes"].as_u64(), "{p}");
                        break;
                    }
                    assert!(Instant::now() < deadline, "no pass: {p}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let (code, err) = wait_child(tx);
            assert_eq!(code, Some(0), "send-migration: {err}");
            let lines: Vec<&str> = err.lines().collect();
            assert!(
                lines[0].starts_with(&format!("migrating to {url} (256 MiB")),
                "{err}"
            );
            let last = lines.last().unwrap();
            assert!(
                last.starts_with(&format!("migration to {url} completed in ")),
                "{err}"
            );
            assert!(
                last.contains(" passes, ") && last.contains(" downtime "),
                "{err}"
            );
            let passes = lines.iter().filter(|l| l.starts_with("pass ")).count();
            if long {
                assert!(passes >= 1, "the held pass is seen: {err}");
            }
            if let Some(link) = link {
                link.join().unwrap();
            }
            assert!(
                lines
                    .iter()
                    .filter(|l| l.starts_with("pass "))
                    .all(|l| l.contains(" MiB sent (") && l.contains(" MiB dirty, ")),
                "{err}"
            );
        }
    }
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(0), "receive-migration: {err}");
    let run = a.wait();
    assert_eq!(run.code(), Some(0), "the source VMM ends: {}", run.stderr);
    a_out.push_str(&run.stdout);
    assert!(!a.sock.exists(), "the source's socket goes with it");
    if postcopy {
        // Every page went once, on demand or in the background, and the source served
        // until the destination had them all.
        assert!(
            run.stderr.contains(" complete: 256 MiB served in "),
            "{}",
            run.stderr
        );
    }
    let before = rounds(&a_out);
    let last = before.last().expect("rounds at the source").clone();
    assert_eq!(b.state(), "Running");
    let mut b_out = String::new();
    let after = until_round(&mut b, &mut b_out, last.0 + 10);
    assert!(
        !b_out.contains("READY"),
        "the guest started again:\n{b_out}"
    );
    let first = after.first().unwrap();
    assert!(
        first.0 == last.0 + 1 || first.0 == last.0 + 2,
        "round {} after {}:\n{b_out}",
        first.0,
        last.0
    );
    assert!(after.iter().all(|r| r.1 == "ok"), "{b_out}");
    // Complete lines only: the output may end in the middle of one.
    let disk_ok = if disk { "ok" } else { "none" };
    assert!(
        busy_lines(&b_out).iter().skip(1).all(|b| b.disk == disk_ok),
        "{b_out}"
    );
    assert!(
        after.iter().all(|r| r.2 == last.2),
        "a migrated VM keeps its generation ID:\n{b_out}"
    );
    assert!(!b_out.contains("VMGENID-CHANGED"), "{b_out}");
    assert_eq!(b.put("vmm.shutdown").0, 200);
    if postcopy {
        let log = std::fs::read_to_string(&dst_log).unwrap();
        assert!(log.contains("postcopy: all 256 MiB fetched in "), "{log}");
    }
    let src = events(&src_events);
    let at = |ev: &[String], e: &str| ev.iter().position(|x| x == e).unwrap_or(usize::MAX);
    assert!(
        at(&src, "vm:migration-started") < at(&src, "vm:migration-finished"),
        "{src:?}"
    );
    assert!(at(&src, "vm:migration-finished") < src.len(), "{src:?}");
    if !local && !postcopy {
        assert!(src.iter().any(|e| e == "vm:migration-progress"), "{src:?}");
    }
    if postcopy {
        // The original's event once the destination has every page, before the end.
        assert!(
            at(&src, "vm:postcopy-migration-completed") < at(&src, "vm:migration-finished"),
            "{src:?}"
        );
    }
    let dst = events(&dst_events);
    assert!(
        at(&dst, "vm:migration-receive-started") < at(&dst, "vm:migration-receive-finished"),
        "{dst:?}"
    );
    assert!(
        at(&dst, "vm:migration-receive-finished") < dst.len(),
        "{dst:?}"
    );
}

#[test]
fn live_migration_over_unix_while_the_guest_writes() {
    migrate_and_check(
        "migrate-unix",
        "unix:DIR/migration.sock",
        false,
        false,
        true,
        Drive::ChRemote("", false),
        "",
    );
}

#[test]
fn live_migration_over_tcp_while_the_guest_writes() {
    // A port of this process's own, unlikely to be taken.
    let port = 20000 + (std::process::id() % 20000);
    // Made to last a second more: the link holds an answer.
    migrate_and_check(
        "migrate-tcp",
        &format!("tcp:127.0.0.1:{port}"),
        false,
        false,
        false,
        Drive::ChRemote(",downtime_ms=50", true),
        "",
    );
}

#[test]
fn local_migration_hands_the_memory_files_over() {
    migrate_and_check(
        "migrate-local",
        "unix:DIR/migration.sock",
        true,
        true,
        true,
        Drive::NoWait,
        "",
    );
}

/// `connections=4`: the memory goes over four more TCP connections (the original's
/// ConnectionRole protocol), none over the first.
#[test]
fn live_migration_over_four_tcp_connections() {
    let port = 20000 + ((std::process::id() + 7) % 20000);
    migrate_and_check(
        "migrate-conns",
        &format!("tcp:127.0.0.1:{port}"),
        false,
        false,
        true,
        Drive::ChRemote(",connections=4", false),
        "",
    );
}

/// `memory_mode=postcopy` on both sides, over a Unix socket: the guest goes at once and its
/// pages follow (every word it checks each round is right), with its disk.
#[test]
fn postcopy_migration_over_unix() {
    migrate_and_check(
        "migrate-postcopy",
        "unix:DIR/migration.sock",
        false,
        false,
        true,
        Drive::ChRemote(",memory_mode=postcopy", false),
        ",memory_mode=postcopy",
    );
}

/// Postcopy over TCP, with shared (memfd) RAM at both ends.
#[test]
fn postcopy_migration_over_tcp_with_shared_memory() {
    let port = 20000 + ((std::process::id() + 13) % 20000);
    migrate_and_check(
        "migrate-postcopy-tcp",
        &format!("tcp:127.0.0.1:{port}"),
        true,
        false,
        false,
        Drive::ChRemote(",memory_mode=postcopy", false),
        ",memory_mode=postcopy",
    );
}

/// A destination that takes the start of the migration and then goes away: the source fails
/// the migration, keeps running its guest (memory and all), says so in its events, and can
/// migrate again.
#[test]
fn a_destination_that_dies_mid_way_leaves_the_source_running() {
    let dir = common::scratch("migrate-dies");
    let events_file = dir.join("events.json");
    let (mut a, mut out) = boot(
        "migrate-dies-src",
        false,
        true,
        &[
            "--event-monitor",
            &format!("path={}", events_file.display()),
        ],
    );
    let sock = dir.join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        // Start, then Config: answered; then a little of the first Memory pass, and gone.
        let mut s = common::fake_destination_start(&listener);
        let mut some = vec![0u8; 1 << 20];
        s.read_exact(&mut some).unwrap();
    });
    let url = format!("unix:{}", sock.display());
    let body = json!({ "destination_url": url }).to_string();
    // Driven by ch-remote, which follows it to its failure: exit 1, the reason on stderr.
    let tx = send(&a, &url, false);
    fake.join().unwrap();
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("ch-remote: vm.send-migration: the migration failed after "),
        "{err}"
    );
    assert!(last.contains("sending memory"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events(&events_file)
        .iter()
        .any(|e| e == "vm:migration-failed")
    {
        assert!(Instant::now() < deadline, "{:?}", events(&events_file));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.state(), "Running");
    // The endpoint says so, the same each time, while the VM runs on.
    let (status, p) = progress(&a);
    assert_eq!(status, 200);
    check_progress(&p, &url);
    assert_eq!(p["state"], "failed", "{p}");
    assert!(last.ends_with(p["error"].as_str().unwrap()), "{p} / {err}");
    assert_eq!(progress(&a).1, p, "a failed migration's progress stays");
    let n = rounds(&out).last().unwrap().0;
    let r = until_round(&mut a, &mut out, n + 10);
    assert!(r.iter().all(|x| x.1 == "ok"), "{out}");
    // A second attempt is not refused as "ongoing".
    let (status, _) = a.curl("PUT", "vm.send-migration", Some(&body));
    assert_eq!(status, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    while events(&events_file)
        .iter()
        .filter(|e| *e == "vm:migration-failed")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.state(), "Running");
    let p = progress_end(&a);
    assert_eq!(p["state"], "failed", "{p}");
    assert_eq!(a.put("vmm.shutdown").0, 200);
}

/// A pass that takes long (a destination that reads the memory slowly) moves the endpoint's
/// `total_bytes` on while it runs: `pass` still 0, the total growing. Then the destination
/// goes, the migration fails and the VM runs on.
#[test]
fn a_long_pass_reports_as_it_goes() {
    require_curl();
    let dir = common::scratch("migrate-slow");
    let (a, _) = boot("migrate-slow-src", false, false, &[]);
    let sock = dir.join("slow.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_fake = stop.clone();
    let fake = std::thread::spawn(move || {
        // Start and Config answered; then the first pass read at about 25 MiB/s.
        let mut s = common::fake_destination_start(&listener);
        let mut buf = vec![0u8; 256 << 10];
        while !stop_fake.load(std::sync::atomic::Ordering::SeqCst) {
            if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let url = format!("unix:{}", sock.display());
    let body = json!({ "destination_url": url }).to_string();
    assert_eq!(a.curl("PUT", "vm.send-migration", Some(&body)).0, 204);
    let mut totals = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while totals.len() < 2 {
        let (status, p) = progress(&a);
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["state"], "running", "{p}");
        assert_eq!(p["pass"], 0, "the first pass is still going: {p}");
        let total = p["total_bytes"].as_u64().unwrap();
        if total > 0 && totals.last().is_none_or(|&t| total > t) {
            totals.push(total);
        }
        assert!(
            Instant::now() < deadline,
            "no progress within a pass: {totals:?} {p}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    fake.join().unwrap();
    let p = progress_end(&a);
    assert_eq!(p["state"], "failed", "{p}");
    assert_eq!(a.state(), "Running");
    assert_eq!(a.put("vmm.shutdown").0, 200);
}

/// Requests a VMM cannot serve, each refused with a clear chain and nothing changed.
/// `preserve_source=on`, as the original's: after the migration the source VMM keeps the VM,
/// paused; the copy at the destination runs on; resumed, the kept one runs on too, from where
/// it stopped (two guests from one, each checking every word of its 32 MiB each round).
#[test]
fn preserve_source_keeps_a_paused_copy() {
    require_curl();
    let (mut a, mut a_out) = boot("migrate-preserve-src", false, false, &[]);
    let mut b = Vmm::start("migrate-preserve-dst", &[]);
    let url = format!("unix:{}/mig.sock", b.dir.display());
    let rx = receive(&b, &url);
    wait_listening(&url);
    let tx = send(
        &a,
        &format!("destination_url={url},preserve_source=on"),
        false,
    );
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(0), "send-migration: {err}");
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(0), "receive-migration: {err}");
    // The source: still here, paused, its migration completed.
    assert_eq!(a.state(), "Paused");
    assert_eq!(progress_end(&a)["state"], "completed");
    drain(&mut a, &mut a_out);
    let last = rounds(&a_out).last().expect("rounds at the source").0;
    // The copy runs at the destination.
    let mut b_out = String::new();
    let after = until_round(&mut b, &mut b_out, last + 5);
    assert!(after.iter().all(|r| r.1 == "ok"), "{b_out}");
    // Nothing moved at the source meanwhile; resumed, it goes on.
    drain(&mut a, &mut a_out);
    assert_eq!(rounds(&a_out).last().unwrap().0, last, "{a_out}");
    assert_eq!(a.put("vm.resume").0, 204);
    let again = until_round(&mut a, &mut a_out, last + 5);
    let resumed: Vec<_> = again.iter().filter(|r| r.0 > last).collect();
    assert!(resumed.iter().all(|r| r.1 == "ok"), "{a_out}");
    assert_eq!(resumed[0].0, last + 1, "{a_out}");
    assert_eq!(a.put("vmm.shutdown").0, 200);
    assert_eq!(b.put("vmm.shutdown").0, 200);
}

/// A VM paused at the source arrives paused (CompletePaused, as the original's), and resumed
/// it goes on from its next round.
#[test]
fn a_paused_vm_arrives_paused() {
    require_curl();
    let (mut a, mut a_out) = boot("migrate-paused-src", false, false, &[]);
    assert_eq!(a.put("vm.pause").0, 204);
    drain(&mut a, &mut a_out);
    let mut b = Vmm::start("migrate-paused-dst", &[]);
    let url = format!("unix:{}/mig.sock", b.dir.display());
    let last = migrate_ok(
        &mut a,
        &mut a_out,
        &b,
        &url,
        &format!("destination_url={url}"),
    );
    assert_eq!(b.state(), "Paused");
    let mut b_out = String::new();
    std::thread::sleep(Duration::from_millis(300));
    drain(&mut b, &mut b_out);
    assert!(rounds(&b_out).is_empty(), "a paused VM ran:\n{b_out}");
    assert_eq!(b.put("vm.resume").0, 204);
    let after = until_round(&mut b, &mut b_out, last + 3);
    assert!(after.iter().all(|r| r.1 == "ok"), "{b_out}");
    assert!(after[0].0 == last + 1 || after[0].0 == last + 2, "{b_out}");
    assert_eq!(b.put("vmm.shutdown").0, 200);
}

/// Postcopy on one side only: the reception fails with the reason, the source's VM runs on
/// (its guest still checking its memory), and it can migrate again.
#[test]
fn a_postcopy_on_one_side_only_fails_cleanly() {
    require_curl();
    let (mut a, mut a_out) = boot("migrate-modes-src", false, false, &[]);
    for (rx_opts, tx_opts, why) in [
        (
            ",memory_mode=postcopy",
            "",
            "a Memory request in a postcopy migration (receive with memory_mode=precopy)",
        ),
        (
            "",
            ",memory_mode=postcopy",
            "the source migrates in postcopy: receive with memory_mode=postcopy",
        ),
    ] {
        let b = Vmm::start("migrate-modes-dst", &[]);
        let url = format!("unix:{}/mig.sock", b.dir.display());
        let rx = receive(&b, &format!("receiver_url={url}{rx_opts}"));
        wait_listening(&url);
        let tx = send(&a, &format!("destination_url={url}{tx_opts}"), false);
        let (code, err) = wait_child(tx);
        assert_eq!(code, Some(1), "send-migration: {err}");
        let (code, err) = wait_child(rx);
        assert_eq!(code, Some(1), "receive-migration: {err}");
        assert!(err.contains(why), "{why}: {err}");
        failed_and_runs_on(&mut a, &mut a_out, &b);
    }
    assert_eq!(a.put("vmm.shutdown").0, 200);
}

/// Migrates `a` (its output so far in `a_out`) to `b`, which receives with `rx_config` (its URL
/// first), the sender's options being `tx_config`: both commands succeed and the source VMM ends.
/// Returns the last round the guest ran at the source.
pub(crate) fn migrate_ok(
    a: &mut Vmm,
    a_out: &mut String,
    b: &Vmm,
    rx_config: &str,
    tx_config: &str,
) -> u64 {
    let rx = receive(b, rx_config);
    let url = rx_config.split(',').next().unwrap();
    wait_listening(url.strip_prefix("receiver_url=").unwrap_or(url));
    let tx = send(a, tx_config, false);
    let (code, err) = wait_child(tx);
    assert_eq!(code, Some(0), "send-migration: {err}");
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(0), "receive-migration: {err}");
    let run = a.wait();
    assert_eq!(run.code(), Some(0), "the source VMM ends: {}", run.stderr);
    a_out.push_str(&run.stdout);
    rounds(a_out).last().expect("rounds at the source").0
}

/// After a failed migration from `a` (its output so far in `a_out`) to `b`: the failure said,
/// the VM running on at the source, its guest checking its memory round after round, and
/// nothing kept at the destination.
pub(crate) fn failed_and_runs_on(a: &mut Vmm, a_out: &mut String, b: &Vmm) {
    assert_eq!(progress_end(a)["state"], "failed");
    assert_eq!(a.state(), "Running");
    assert_eq!(b.curl("GET", "vm.info", None).0, 404, "nothing kept");
    drain(a, a_out);
    let last = rounds(a_out).last().unwrap().0;
    let after = until_round(a, a_out, last + 3);
    assert!(after.iter().all(|r| r.1 == "ok"), "{a_out}");
}

#[test]
fn migration_refusals() {
    require_curl();
    let (a, _) = boot("migrate-refusals", false, false, &[]);
    // No migration yet: the endpoint's own 404.
    let (status, text) = a.curl("GET", "vm.migration-progress", None);
    assert_eq!(status, 404, "{text}");
    assert_eq!(
        error_lines(&text),
        [
            "Error from API",
            "The migration progress is not available",
            "No migration has been started"
        ]
    );
    for (body, why) in [
        (
            json!({"destination_url": "unix:/nonexistent/dir/sock", "local": true}),
            "Local migration requires shared memory or hugepages enabled",
        ),
        (
            json!({"destination_url": "/tmp/x"}),
            "unix:<path> or tcp:<host>:<port>",
        ),
        (
            json!({"destination_url": "unix:/tmp/x", "memory_mode": "Postcopy", "local": true}),
            "memory_mode=postcopy cannot be combined with local=on",
        ),
        (
            json!({"destination_url": "unix:/tmp/x", "connections": 2}),
            "more than one connection needs a tcp: URL",
        ),
    ] {
        let (status, text) = a.curl("PUT", "vm.send-migration", Some(&body.to_string()));
        assert_eq!(status, 500, "{body}: {text}");
        let lines = error_lines(&text);
        assert_eq!(
            lines[1], "Error dispatching the migration worker",
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l.contains(why)), "{body}: {lines:?}");
        assert_eq!(a.state(), "Running");
    }
    // A destination that is not there: the send starts, fails, the VM runs on.
    let body = json!({"destination_url": "unix:/nonexistent/dir/sock"}).to_string();
    assert_eq!(progress(&a).0, 404, "refused requests start no migration");
    assert_eq!(a.curl("PUT", "vm.send-migration", Some(&body)).0, 204);
    let p = progress_end(&a);
    check_progress(&p, "unix:/nonexistent/dir/sock");
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        p["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot connect to unix:/nonexistent/dir/sock"),
        "{p}"
    );
    assert_eq!(
        (p["pass"].as_u64(), p["total_bytes"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(a.state(), "Running");
    // Receiving while a VM is created.
    let body = json!({"receiver_url": "unix:/tmp/never.sock"}).to_string();
    assert_eq!(a.curl("PUT", "vm.receive-migration", Some(&body)).0, 500);
    assert!(!Path::new("/tmp/never.sock").exists());
    assert_eq!(a.put("vmm.shutdown").0, 200);
    let b = Vmm::start("migrate-refusals-b", &[]);
    let body = json!({"destination_url": "unix:/tmp/x"}).to_string();
    let (status, text) = b.curl("PUT", "vm.send-migration", Some(&body));
    assert_eq!(status, 500);
    assert!(text.contains("VM is not running"), "{text}");
    let body = json!({"receiver_url": "tcp:nohost"}).to_string();
    let (status, text) = b.curl("PUT", "vm.receive-migration", Some(&body));
    assert_eq!(status, 500);
    assert!(text.contains("unix:<path> or tcp:"), "{text}");

    // A VMM waiting for a source still ends on SIGTERM, and the wait is answered.
    let mut b = b;
    let url = format!("unix:{}/wait.sock", b.dir.display());
    let rx = receive(&b, &url);
    wait_listening(&url);
    // SAFETY: signals our own child.
    unsafe { libc::kill(b.pid(), libc::SIGTERM) };
    let run = b.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let (code, err) = wait_child(rx);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        !Path::new(&url["unix:".len()..]).exists(),
        "the socket file is removed"
    );
}
