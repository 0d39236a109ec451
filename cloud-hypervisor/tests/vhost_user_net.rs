//! `--net vhost_user=on,socket=` against our own backend, `vhost_user_net` (the workspace's
//! vhost_user_net crate, built here on first use). The test guest's network scenario
//! (`test=net`: a UDP datagram out, an ARP answer, a datagram in) runs through the backend's
//! TAP with the VMM as the vhost-user client and as the server; the backend killed under the
//! running guest leaves the device needing a reset and the VMM answering its API; what the
//! frontend and the backend refuse. Every TAP lives in a network namespace of the test's own.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::net::{
    self, answer_guest, expect_datagram, expect_from_guest, in_private_netns, GUEST_IP, GUEST_MAC,
    HOST_IP, HOST_MAC,
};
use common::{guest, scratch, spawn, wait_until, wait_with_timeout, Fixture, Run};

const TAP: &str = "vuntap0";

/// The backend binary, built on first use (`common::build_workspace_bin`).
fn backend_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::build_workspace_bin("vhost_user_net"))
}

/// Our backend on `sock` with the TAP `TAP` at `HOST_IP`; killed when dropped.
struct Backend(Child);

impl Backend {
    /// `client`: it connects to a VMM listening on `sock`; otherwise it listens there, and
    /// this returns once the socket file is there (the TAP is up by then).
    fn start(sock: &Path, client: bool, log: &Path) -> Self {
        Self::start_with(sock, client, log, "")
    }

    /// `start` with more of the backend's options (`,key=value...`).
    fn start_with(sock: &Path, client: bool, log: &Path, more: &str) -> Self {
        let args = format!(
            "tap={TAP},ip={HOST_IP},mask=255.255.255.0,host_mac={HOST_MAC},socket={},client={}{more}",
            sock.display(),
            if client { "on" } else { "off" }
        );
        if !client {
            let _ = std::fs::remove_file(sock);
        }
        let child = Command::new(backend_bin())
            .args(["--net-backend", &args])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting vhost_user_net");
        let mut b = Backend(child);
        if !client {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                if let Ok(Some(s)) = b.0.try_wait() {
                    panic!("the backend exited ({s}): {}", read(log));
                }
                assert!(Instant::now() < deadline, "no {}", sock.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        b
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The VMM booting `test=net` (with `extra_cmdline`) over `--net <net>`, shared guest RAM.
fn start_vmm(net: &str, extra_cmdline: &str, extra: &[&str]) -> Child {
    start_vmm_test("net", net, extra_cmdline, extra)
}

/// `start_vmm` with another scenario (`test=<test>`, with the same network arguments).
fn start_vmm_test(test: &str, net: &str, extra_cmdline: &str, extra: &[&str]) -> Child {
    start_vmm_device(test, ["--net", net], extra_cmdline, extra)
}

/// `start_vmm_test` with the NIC given as `device` (`["--net", <net>]`, or another option).
fn start_vmm_device(test: &str, device: [&str; 2], extra_cmdline: &str, extra: &[&str]) -> Child {
    let cmdline = format!("{}{extra_cmdline}", net::cmdline(test));
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let mut args = vec![
        "-v",
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--memory",
        "size=256M,shared=on",
        "--cpus",
        "boot=2",
        "--console",
        "off",
        device[0],
        device[1],
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// The host end of the guest's UDP exchange, bound once the backend's TAP has its address.
fn host_socket() -> std::net::UdpSocket {
    net::host_socket_on(TAP)
}

/// Receives "hello from guest" and answers "hello from host" (five times, 200 ms apart, or
/// until the VMM exits).
fn exchange(sock: &std::net::UdpSocket, vmm: &mut Child) {
    expect_from_guest(sock, b"hello from guest");
    answer_guest(sock, vmm, b"hello from host");
}

fn assert_net_passed(r: &Run) {
    r.assert_guest_passed();
    for c in ["net-mac", "net-tx", "net-arp-reply", "net-rx"] {
        r.assert_passed(c);
    }
}

/// `--net` for our backend at `sock`, the guest's MAC, then `more` (`,key=value...`).
fn vhost_net(sock: &Path, more: &str) -> String {
    format!(
        "vhost_user=on,socket={},mac={GUEST_MAC}{more}",
        sock.display()
    )
}

/// `start_vmm` with the serial output and the API in `f`.
fn start_vmm_in(f: &Fixture, net: &str, extra_cmdline: &str) -> Child {
    let (serial, api) = (f.serial_arg(), f.api_arg());
    start_vmm(
        net,
        extra_cmdline,
        &["--serial", &serial, "--api-socket", &api],
    )
}

/// Our backend on `f.sock` (its log in `log`), the VMM booting `test=net` over it as `vnet0`
/// (`start_vmm_in`), and the host's UDP socket, once the guest's first datagram is in.
fn boot_until_first_datagram(f: &Fixture, log: &Path) -> (Backend, Child, std::net::UdpSocket) {
    let backend = Backend::start(&f.sock, false, log);
    let udp = host_socket();
    let vmm = start_vmm_in(f, &vhost_net(&f.sock, ",id=vnet0"), "");
    expect_datagram(&udp, b"hello from guest");
    (backend, vmm, udp)
}

/// The test's files in `scratch(name)`: the backend's socket `vun.sock`, the VMM's API and
/// serial output, and the backend's log `backend.log`.
fn files(name: &str) -> (Fixture, PathBuf) {
    let f = Fixture::new(name, "vun.sock");
    let log = f.dir.join("backend.log");
    (f, log)
}

/// The VMM connects to the backend's socket (`vhost_mode=client`, the default).
#[test]
fn vhost_user_net_client_mode_udp_both_ways() {
    in_private_netns(|| {
        let (f, log) = files("vun-client");
        let mut backend = Backend::start(&f.sock, false, &log);
        let udp = host_socket();
        let net = vhost_net(&f.sock, ",id=vnet0");
        let mut vmm = start_vmm(&net, "", &["--serial", "tty"]);
        exchange(&udp, &mut vmm);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert_net_passed(&r);
        assert!(
            r.stderr.contains("vhost-user-net backend") && r.stderr.contains("(client)"),
            "{}",
            r.stderr
        );
        // The VMM went: the backend's session ended, and so did it.
        let mut status = None;
        wait_until(
            Duration::from_secs(10),
            "the backend outlived its VMM",
            || {
                status = backend.0.try_wait().unwrap();
                status.is_some()
            },
        );
        let status = status.unwrap();
        assert!(status.success(), "{status}: {}", read(&log));
    });
}

/// `--generic-vhost-user device_type=net` in front of the same backend, given the guest's
/// MAC (which it puts in its config space): the VMM knows nothing of a NIC, so the guest's
/// driver reads the MAC and the queue pairs through GET_CONFIG and gets the backend's features;
/// the datagrams go both ways.
#[test]
fn generic_vhost_user_net_udp_both_ways() {
    in_private_netns(|| {
        let (f, log) = files("gvu-net");
        let _backend = Backend::start_with(&f.sock, false, &log, &format!(",mac={GUEST_MAC}"));
        let udp = host_socket();
        let generic = format!(
            "device_type=net,socket={},queue_sizes=[256,256]",
            f.sock.display()
        );
        let mut vmm = start_vmm_device(
            "net",
            ["--generic-vhost-user", &generic],
            "",
            &["--serial", "tty"],
        );
        exchange(&udp, &mut vmm);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert_net_passed(&r);
        assert!(
            r.stderr.contains("generic vhost-user device, type net"),
            "{}",
            r.stderr
        );
    });
}

/// The VMM listens on the socket (`vhost_mode=server`) and the backend connects
/// (`client=on`); the socket file goes once the backend is in.
#[test]
fn vhost_user_net_server_mode_udp_both_ways() {
    in_private_netns(|| {
        let (f, log) = files("vun-server");
        let net = format!(
            "vhost_user=on,socket={},vhost_mode=server,mac={GUEST_MAC}",
            f.sock.display()
        );
        let mut vmm = start_vmm(&net, "", &["--serial", "tty"]);
        let _backend = Backend::start(&f.sock, true, &log);
        let udp = host_socket();
        exchange(&udp, &mut vmm);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert_net_passed(&r);
        assert!(r.stderr.contains("(server)"), "{}", r.stderr);
        assert!(
            !f.sock.exists(),
            "the listening socket's file is left behind"
        );
    });
}

/// A 4-queue backend (two pairs) and `num_queues=4`: the guest is offered MQ and a control
/// queue the VMM serves; the test guest's `test=net-mq` sets up only pair 1 and the control
/// queue, sets two pairs (VQ_PAIRS_SET acknowledged), sends on transmit queue 1 with its UDP
/// checksum left to the device, and gets the host's 1000-byte answer on receive queue 1 (the
/// backend's second TAP queue: the TAP steers the flow's answer there) in one 2 KiB buffer (our
/// backend has no mergeable buffers), its checksum good.
#[test]
fn vhost_user_net_two_pairs_through_the_control_queue() {
    in_private_netns(|| {
        let (f, log) = files("vun-mq");
        let _backend = Backend::start_with(&f.sock, false, &log, ",num_queues=4");
        let udp = host_socket();
        let net = vhost_net(&f.sock, ",num_queues=4");
        let mut vmm = start_vmm_test("net-mq", &net, "", &["--serial", "tty"]);
        net::net_mq_exchange(&udp, &mut vmm, TAP);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        r.assert_guest_passed();
        for c in [
            "net-mq-ctrl",
            "net-mq-tx",
            "net-mq-rx",
            "net-mq-rx-single",
            "net-mq-rx-csum",
        ] {
            r.assert_passed(c);
        }
        assert!(
            r.stderr.contains("the driver uses 2 of 2 queue pairs"),
            "{}",
            r.stderr
        );
    });
}

/// One HTTP request on the API socket: (status, body).
fn api(sock: &Path, method: &str, path: &str) -> (u16, String) {
    api_with(sock, method, path, "")
}

/// One HTTP request with a JSON `body` on the API socket: (status, body).
fn api_with(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connecting to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    write!(
        s,
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("reading the API's answer");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= len || n == 0 {
                let status = head[9..12].parse().unwrap();
                return (status, body.to_string());
            }
        }
        assert!(n > 0, "the API closed the connection: {text}");
    }
}

/// Until `what` is in the serial output (40 s at most); the text.
fn wait_serial(f: &Fixture, what: &str) -> String {
    f.wait_serial(what, Duration::from_secs(40))
}

/// The backend killed under the running guest: the device says it needs a reset (the guest
/// sees status bit 0x40), the error is logged, the VMM answers its API and the VM runs on.
#[test]
fn vhost_user_net_backend_killed_needs_reset_vmm_answers() {
    in_private_netns(|| {
        let (f, log) = files("vun-crash");
        let mut backend = Backend::start(&f.sock, false, &log);
        let udp = host_socket();
        let mut vmm = start_vmm_in(&f, &vhost_net(&f.sock, ""), " net_crash");
        exchange(&udp, &mut vmm);
        wait_serial(&f, "NET waiting for the backend to go");
        backend.kill();
        let text = wait_serial(&f, "net-needs-reset");
        assert!(text.contains("PASS net-needs-reset\n"), "{text}");
        let (status, body) = api(&f.api, "GET", "vm.info");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""state":"Running""#), "{body}");
        assert!(body.contains(r#""vhost_user":true"#), "{body}");
        assert_eq!(api(&f.api, "GET", "vmm.ping").0, 200);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert!(r.status.success(), "{}", r.stderr);
        let text = f.serial_text();
        for c in [
            "net-mac",
            "net-tx",
            "net-arp-reply",
            "net-rx",
            "net-needs-reset",
        ] {
            assert!(text.contains(&format!("PASS {c}\n")), "{c}:\n{text}");
        }
        assert!(!text.contains("FAIL"), "{text}");
        assert!(
            r.stderr
                .contains("vhost-user-net: the backend closed its socket"),
            "{}",
            r.stderr
        );
    });
}

/// `vm.add-net` with `vhost_user` on a running guest (`test=hotplug`, which drives every
/// function it is told of): the device is on the bus with the backend's rings when the call
/// returns, the guest finds a virtio-net function with the MAC asked for, `vm.info` records
/// the socket; a TAP key with it is refused (400) and the VM runs on.
#[test]
fn vhost_user_net_hotplug() {
    in_private_netns(|| {
        let (f, log) = files("vun-hotplug");
        let _backend = Backend::start(&f.sock, false, &log);
        let vmm = f.spawn_hotplug_guest();
        wait_serial(&f, "READY");
        let bad = format!(
            r#"{{"vhost_user":true,"vhost_socket":"{}","tap":"t0"}}"#,
            f.sock.display()
        );
        let (status, body) = api_with(&f.api, "PUT", "vm.add-net", &bad);
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("'tap' does not go with vhost_user=on"),
            "{body}"
        );
        let mac = "52:54:00:12:34:57";
        let add = format!(
            r#"{{"vhost_user":true,"vhost_socket":"{}","mac":"{mac}","id":"vnet1"}}"#,
            f.sock.display()
        );
        let (status, body) = api_with(&f.api, "PUT", "vm.add-net", &add);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""id":"vnet1""#), "{body}");
        let slot = common::pci_slot(&body);
        wait_serial(
            &f,
            &format!("HOTPLUG ADDED slot={slot} type=net mac={mac}\n"),
        );
        let (status, info) = api(&f.api, "GET", "vm.info");
        assert_eq!(status, 200, "{info}");
        assert!(
            info.contains(&format!(r#""vhost_socket":"{}""#, f.sock.display())),
            "{info}"
        );
        assert!(info.contains(r#""state":"Running""#), "{info}");
        assert_eq!(api(&f.api, "PUT", "vmm.shutdown").0, 200);
        let r = wait_with_timeout(vmm, Duration::from_secs(20));
        assert!(r.status.success(), "{}", r.stderr);
    });
}

/// What the frontend refuses: one line naming `--net`, exit status 1.
#[test]
fn vhost_user_net_refusals() {
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let dir = scratch("vun-bad");
    let missing = dir.join("missing.sock");
    let missing_net = format!("vhost_user=on,socket={}", missing.display());
    for (memory, net, want) in [
        (
            "size=256M",
            "vhost_user=on,socket=/tmp/x.sock",
            "--net vhost_user=on needs --memory shared=on",
        ),
        (
            "size=256M,shared=on",
            "vhost_user=on,socket=/tmp/x.sock,tap=t0",
            "'tap' does not go with vhost_user=on",
        ),
        (
            "size=256M,shared=on",
            "vhost_user=on,socket=/tmp/x.sock,bw_size=1000,bw_refill_time=10",
            "'bw_size' does not go with vhost_user=on",
        ),
        ("size=256M,shared=on", "vhost_user=on", "needs socket="),
        ("size=256M,shared=on", &missing_net, "cannot connect to"),
    ] {
        let out = Command::new(common::VMM)
            .args(["--kernel", &k, "--memory", memory, "--net", net])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{net}: {err}");
        assert!(err.contains(want), "{net}: {err}");
        assert!(err.contains("--net"), "{net}: {err}");
    }
}

/// The backend's bad options: one line naming the option and value, exit status 1.
#[test]
fn vhost_user_net_backend_bad_options() {
    for (args, want) in [
        ("tap=t0", "socket=<path> is required"),
        ("socket=/tmp/x.sock,num_queues=3", "num_queues=3"),
        ("socket=/tmp/x.sock,ip=1.2.3", "ip=1.2.3: not an IP address"),
        ("socket=/tmp/x.sock,bogus=1", "bogus"),
    ] {
        let out = Command::new(backend_bin())
            .args(["--net-backend", args])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args}: {err}");
        assert!(
            err.starts_with(&format!("vhost_user_net: --net-backend {args}")),
            "{args}: {err}"
        );
        assert!(err.contains(want), "{args}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// Sends "hello from host" to the guest every 200 ms until the VMM exits (30 s at most): its
/// run, with the serial output in `f` as its stdout.
fn answer_until_exit(udp: &std::net::UdpSocket, vmm: Child, f: &Fixture) -> Run {
    let t = std::thread::spawn(move || wait_with_timeout(vmm, Duration::from_secs(30)));
    while !t.is_finished() {
        let _ = udp.send_to(b"hello from host", format!("{GUEST_IP}:5000"));
        std::thread::sleep(Duration::from_millis(200));
    }
    Run {
        stdout: f.serial_text(),
        ..t.join().unwrap()
    }
}

/// Pauses the VM and snapshots it into `snap`: returns the vhost-user-net transport's state.
fn net_pause_and_snapshot(api_sock: &Path, snap: &Path) -> serde_json::Value {
    assert_eq!(api(api_sock, "PUT", "vm.pause").0, 204);
    std::fs::create_dir_all(snap).unwrap();
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    let (status, text) = api_with(api_sock, "PUT", "vm.snapshot", &body);
    assert_eq!(status, 204, "{text}");
    let state: serde_json::Value = serde_json::from_str(&read(&snap.join("state.json"))).unwrap();
    let dev = state["pci"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "vnet0")
        .cloned()
        .expect("the vhost-user-net device in the snapshot");
    assert_eq!(
        dev["device"],
        serde_json::json!({"vhost_user": {"version": 1, "device": "vhost-user-net"}}),
        "{dev}"
    );
    let t = dev["transport"].clone();
    for q in 0..2 {
        let q = &t["queues"][q];
        assert_eq!(q["next_avail"], q["next_used"], "{q}");
    }
    // The guest sent at least one datagram: transmit queue 1 moved.
    assert!(t["queues"][1]["next_avail"].as_u64().unwrap() > 0, "{t}");
    t
}

/// The guest's datagram out, then the VM paused and snapshotted (the backend stops both
/// rings); the host sends its answer while the VM is paused; after the resume the rings go on
/// from the saved bases and the guest receives it (ARP first, then the datagram).
#[test]
fn vhost_user_net_paused_and_snapshotted_then_resumed() {
    in_private_netns(|| {
        let (f, log) = files("vun-pause");
        let (_backend, vmm, udp) = boot_until_first_datagram(&f, &log);
        net_pause_and_snapshot(&f.api, &f.dir.join("snap"));
        udp.send_to(b"hello from host", format!("{GUEST_IP}:5000"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!f.serial_text().contains("net-rx"), "{}", f.serial_text());
        assert_eq!(api(&f.api, "PUT", "vm.resume").0, 204);
        let r = answer_until_exit(&udp, vmm, &f);
        assert_net_passed(&r);
        assert!(
            r.stderr.contains("vhost-user-net: paused: queue 0 at"),
            "{}",
            r.stderr
        );
        assert!(r.stderr.contains("vhost-user-net: resumed"), "{}", r.stderr);
    });
}

/// The snapshot restored in a new VMM, with the first VMM and its backend gone and a fresh
/// backend (a new TAP) on the socket: the restored device hands it the rings at the saved
/// bases and the guest receives the host's datagram.
#[test]
fn vhost_user_net_snapshot_restored_with_a_fresh_backend() {
    in_private_netns(|| {
        let (f, log) = files("vun-restore");
        let snap = f.dir.join("snap");
        let (mut backend, mut vmm, udp) = boot_until_first_datagram(&f, &log);
        let t = net_pause_and_snapshot(&f.api, &snap);
        // The restored VMM opens the serial file afresh.
        let before = f.serial_text();
        let _ = vmm.kill();
        let _ = vmm.wait();
        backend.kill();
        drop(udp);
        // The old TAP goes with its backend.
        wait_until(Duration::from_secs(10), "the old TAP stays", || {
            !net::has_interface(TAP)
        });
        let _backend = Backend::start(&f.sock, false, &log);
        let udp = host_socket();
        let _ = std::fs::remove_file(&f.api);
        let restore = format!("source_url=file://{}", snap.display());
        let vmm = spawn(&["-v", "--restore", &restore, "--api-socket", &f.api_arg()]);
        wait_until(
            Duration::from_secs(30),
            "the restored VMM does not answer",
            || UnixStream::connect(&f.api).is_ok(),
        );
        assert_eq!(api(&f.api, "PUT", "vm.resume").0, 204);
        let mut r = answer_until_exit(&udp, vmm, &f);
        r.stdout.insert_str(0, &before);
        assert_net_passed(&r);
        let rx = &t["queues"][0]["next_avail"];
        let paused = format!("vhost-user-net: paused: queue 0 at {rx} (used {rx})");
        assert!(r.stderr.contains(&paused), "{paused:?}:\n{}", r.stderr);
        assert!(r.stderr.contains("vhost-user-net: resumed"), "{}", r.stderr);
    });
}

/// Live migration over TCP with a vhost-user-net device: the source's backend logs its writes
/// to guest RAM (LOG_SHMFD: the used rings of the guest's datagrams, sent every 500 ms while
/// the memory goes over) into the migration's dirty pages; the destination VMM connects to a
/// second backend on the same socket path (started once the first has its VMM, its TAP in a
/// network namespace of its own, with the same addresses), the rings go on at the bases the
/// source's pause saved, and the guest answers the second TAP's ARP and receives the datagram
/// sent there.
#[test]
fn vhost_user_net_live_migration_over_tcp() {
    migrate_vhost_user_net(false);
}

/// A local migration (shared RAM, the memory files passed over a Unix socket) with a
/// vhost-user-net device: no dirty log (nothing is copied); the destination's device connects to
/// the second backend on the same socket path and the rings go on at the saved bases, as above.
#[test]
fn vhost_user_net_local_migration() {
    migrate_vhost_user_net(true);
}

/// The two migrations above: over TCP on loopback, or `local` over a Unix socket.
fn migrate_vhost_user_net(local: bool) {
    in_private_netns(move || {
        let f = Fixture::new(
            if local {
                "vun-migrate-local"
            } else {
                "vun-migrate"
            },
            "vun.sock",
        );
        let api_b = f.dir.join("api-b.sock");
        let (_backend, src, _udp) = boot_until_first_datagram(&f, &f.dir.join("backend-a.log"));
        // The destination's backend: same socket path, its TAP in another namespace, where
        // the host answers the guest once it arrives.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sock_b, log_b, done_b) = (f.sock.clone(), f.dir.join("backend-b.log"), done.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let host_b = std::thread::spawn(move || {
            in_private_netns(move || {
                let _b = Backend::start(&sock_b, false, &log_b);
                let udp = host_socket();
                ready_tx.send(()).unwrap();
                while !done_b.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = udp.send_to(b"hello from host", format!("{GUEST_IP}:5000"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(20)).unwrap();
        // The migration goes over TCP on this namespace's loopback.
        let lo = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip (iproute2)");
        assert!(lo.success());
        let dst = spawn(&["-v", "--api-socket", &format!("path={}", api_b.display())]);
        wait_until(
            Duration::from_secs(10),
            "the destination VMM does not answer",
            || UnixStream::connect(&api_b).is_ok(),
        );
        let url = if local {
            format!("unix:{}", f.dir.join("migrate.sock").display())
        } else {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            format!("tcp:127.0.0.1:{port}")
        };
        let api_b2 = api_b.clone();
        let url2 = url.clone();
        let receiving = std::thread::spawn(move || {
            api_with(
                &api_b2,
                "PUT",
                "vm.receive-migration",
                &format!(r#"{{"receiver_url": "{url2}"}}"#),
            )
        });
        wait_until(
            Duration::from_secs(10),
            &format!("nothing listens on {url}"),
            || match url.split_once(':') {
                Some(("unix", p)) => Path::new(p).exists(),
                _ => {
                    let port: u16 = url.rsplit_once(':').unwrap().1.parse().unwrap();
                    let hex = format!(":{port:04X} ");
                    read(Path::new("/proc/thread-self/net/tcp"))
                        .lines()
                        .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
                }
            },
        );
        // A Unix socket's file appears at bind(), a moment before listen().
        std::thread::sleep(Duration::from_millis(50));
        let before = f.serial_text();
        let (status, text) = api_with(
            &f.api,
            "PUT",
            "vm.send-migration",
            &format!(r#"{{"destination_url": "{url}", "local": {local}}}"#),
        );
        assert_eq!(status, 204, "{text}");
        let (status, text) = receiving.join().unwrap();
        assert_eq!(status, 204, "receive-migration: {text}");
        let src = wait_with_timeout(src, Duration::from_secs(30));
        assert!(src.status.success(), "{}", src.stderr);
        let mut r = f.wait(dst, Duration::from_secs(30));
        r.stdout.insert_str(0, &before);
        done.store(true, std::sync::atomic::Ordering::Release);
        host_b.join().unwrap();
        assert_net_passed(&r);
        // Only a copy of guest RAM needs the backend's log.
        assert_eq!(
            src.stderr
                .contains("vhost-user-net: dirty logging on (LOG_SHMFD"),
            !local,
            "{}",
            src.stderr
        );
        assert!(
            src.stderr.contains("vhost-user-net: paused"),
            "{}",
            src.stderr
        );
        assert!(r.stderr.contains("vhost-user-net: resumed"), "{}", r.stderr);
        eprintln!(
            "{}",
            src.stderr
                .lines()
                .filter(|l| l.contains("migration") || l.contains("vhost-user"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    });
}
