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

use common::{guest, scratch, spawn, wait_with_timeout, Run};

const HOST_IP: &str = "192.168.100.1";
const GUEST_IP: &str = "192.168.100.2";
const TAP: &str = "vuntap0";
const GUEST_MAC: &str = "52:54:00:12:34:56";
const HOST_MAC: &str = "52:54:00:65:43:21";

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

/// Runs `f` on a thread moved into a network namespace of its own (the processes it starts
/// inherit it), so nothing here can reach or collide with the machine's networks.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare only moves the calling thread into a new network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) failed (these tests run as root): {}",
            std::io::Error::last_os_error()
        );
        // No IPv6 chatter on the TAP.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        f()
    })
    .join()
    .unwrap();
}

/// The VMM booting `test=net` (with `extra_cmdline`) over `--net <net>`, shared guest RAM.
fn start_vmm(net: &str, extra_cmdline: &str, extra: &[&str]) -> Child {
    start_vmm_test("net", net, extra_cmdline, extra)
}

/// `start_vmm` with another scenario (`test=<test>`, with the same network arguments).
fn start_vmm_test(test: &str, net: &str, extra_cmdline: &str, extra: &[&str]) -> Child {
    let cmdline = format!(
        "test={test} net_ip={GUEST_IP} net_host_ip={HOST_IP} net_host_mac={HOST_MAC} \
         net_mac={GUEST_MAC}{extra_cmdline}"
    );
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
        "--net",
        net,
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

/// The host end of the guest's UDP exchange, bound once the backend's TAP has its address.
fn host_socket() -> std::net::UdpSocket {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap()
        .contains(&format!("{TAP}:"))
    {
        assert!(Instant::now() < deadline, "no TAP {TAP} after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = std::net::UdpSocket::bind(format!("{HOST_IP}:5001")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock
}

/// Receives "hello from guest" and answers "hello from host" (five times, 200 ms apart, or
/// until the VMM exits).
fn exchange(sock: &std::net::UdpSocket, vmm: &mut Child) {
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("no datagram from the guest");
    assert_eq!(&buf[..n], b"hello from guest");
    assert_eq!(from.to_string(), format!("{GUEST_IP}:5000"));
    for _ in 0..5 {
        sock.send_to(b"hello from host", format!("{GUEST_IP}:5000"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(Some(_)) = vmm.try_wait() {
            break;
        }
    }
}

fn assert_net_passed(r: &Run) {
    r.assert_guest_passed();
    for c in ["net-mac", "net-tx", "net-arp-reply", "net-rx"] {
        r.assert_passed(c);
    }
}

/// The VMM connects to the backend's socket (`vhost_mode=client`, the default).
#[test]
fn vhost_user_net_client_mode_udp_both_ways() {
    in_private_netns(|| {
        let dir = scratch("vun-client");
        let sock = dir.join("vun.sock");
        let log = dir.join("backend.log");
        let mut backend = Backend::start(&sock, false, &log);
        let udp = host_socket();
        let net = format!(
            "vhost_user=on,socket={},mac={GUEST_MAC},id=vnet0",
            sock.display()
        );
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
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = backend.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the backend outlived its VMM");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}: {}", read(&log));
    });
}

/// The VMM listens on the socket (`vhost_mode=server`) and the backend connects
/// (`client=on`); the socket file goes once the backend is in.
#[test]
fn vhost_user_net_server_mode_udp_both_ways() {
    in_private_netns(|| {
        let dir = scratch("vun-server");
        let sock = dir.join("vun.sock");
        let log = dir.join("backend.log");
        let net = format!(
            "vhost_user=on,socket={},vhost_mode=server,mac={GUEST_MAC}",
            sock.display()
        );
        let mut vmm = start_vmm(&net, "", &["--serial", "tty"]);
        let _backend = Backend::start(&sock, true, &log);
        let udp = host_socket();
        exchange(&udp, &mut vmm);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert_net_passed(&r);
        assert!(r.stderr.contains("(server)"), "{}", r.stderr);
        assert!(!sock.exists(), "the listening socket's file is left behind");
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
        let dir = scratch("vun-mq");
        let sock = dir.join("vun.sock");
        let log = dir.join("backend.log");
        let _backend = Backend::start_with(&sock, false, &log, ",num_queues=4");
        let udp = host_socket();
        let net = format!(
            "vhost_user=on,socket={},mac={GUEST_MAC},num_queues=4",
            sock.display()
        );
        let mut vmm = start_vmm_test("net-mq", &net, "", &["--serial", "tty"]);
        let mut buf = [0u8; 2048];
        let (n, from) = udp.recv_from(&mut buf).expect("no datagram from pair 1");
        assert_eq!(&buf[..n], b"hello from pair 1");
        assert_eq!(from.to_string(), format!("{GUEST_IP}:5000"));
        static_arp_entry(&udp);
        let mut answer = b"hello to pair 1".to_vec();
        answer.extend((15..1000).map(|i| (i % 251) as u8));
        for _ in 0..5 {
            udp.send_to(&answer, format!("{GUEST_IP}:5000")).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(Some(_)) = vmm.try_wait() {
                break;
            }
        }
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

/// Gives the host end a permanent ARP entry for the guest (SIOCSARP), so that it sends to the
/// guest without asking first (the guest's `net-mq` answers no ARP).
fn static_arp_entry(sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    // SAFETY: arpreq is plain data; zero is a valid value for every field.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let ip: std::net::Ipv4Addr = GUEST_IP.parse().unwrap();
    let pa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in the sockaddr it is copied over (both 16 bytes).
    unsafe { std::ptr::write((&mut req.arp_pa as *mut libc::sockaddr).cast(), pa) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (i, b) in GUEST_MAC.split(':').enumerate() {
        req.arp_ha.sa_data[i] = u8::from_str_radix(b, 16).unwrap() as libc::c_char;
    }
    req.arp_flags = libc::ATF_PERM | libc::ATF_COM;
    for (i, b) in TAP.bytes().enumerate() {
        req.arp_dev[i] = b as libc::c_char;
    }
    // SAFETY: SIOCSARP reads one arpreq; the socket is open.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP, &req) };
    assert_eq!(ret, 0, "SIOCSARP: {}", std::io::Error::last_os_error());
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

fn wait_serial(serial: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let text = read(serial);
        if text.contains(what) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The backend killed under the running guest: the device says it needs a reset (the guest
/// sees status bit 0x40), the error is logged, the VMM answers its API and the VM runs on.
#[test]
fn vhost_user_net_backend_killed_needs_reset_vmm_answers() {
    in_private_netns(|| {
        let dir = scratch("vun-crash");
        let sock = dir.join("vun.sock");
        let api_sock = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let log = dir.join("backend.log");
        let mut backend = Backend::start(&sock, false, &log);
        let udp = host_socket();
        let net = format!("vhost_user=on,socket={},mac={GUEST_MAC}", sock.display());
        let serial_arg = format!("file={}", serial.display());
        let api_arg = format!("path={}", api_sock.display());
        let mut vmm = start_vmm(
            &net,
            " net_crash",
            &["--serial", &serial_arg, "--api-socket", &api_arg],
        );
        exchange(&udp, &mut vmm);
        wait_serial(&serial, "NET waiting for the backend to go");
        backend.kill();
        let text = wait_serial(&serial, "net-needs-reset");
        assert!(text.contains("PASS net-needs-reset\n"), "{text}");
        let (status, body) = api(&api_sock, "GET", "vm.info");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""state":"Running""#), "{body}");
        assert!(body.contains(r#""vhost_user":true"#), "{body}");
        assert_eq!(api(&api_sock, "GET", "vmm.ping").0, 200);
        let r = wait_with_timeout(vmm, Duration::from_secs(30));
        assert!(r.status.success(), "{}", r.stderr);
        let text = read(&serial);
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
        let dir = scratch("vun-hotplug");
        let sock = dir.join("vun.sock");
        let api_sock = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let log = dir.join("backend.log");
        let _backend = Backend::start(&sock, false, &log);
        let k = guest().elf_pvh.to_str().unwrap().to_string();
        let serial_arg = format!("file={}", serial.display());
        let api_arg = format!("path={}", api_sock.display());
        let vmm = spawn(&[
            "--kernel",
            &k,
            "--cmdline",
            "test=hotplug",
            "--memory",
            "size=256M,shared=on",
            "--cpus",
            "boot=2",
            "--console",
            "off",
            "--serial",
            &serial_arg,
            "--api-socket",
            &api_arg,
        ]);
        wait_serial(&serial, "READY");
        let bad = format!(
            r#"{{"vhost_user":true,"vhost_socket":"{}","tap":"t0"}}"#,
            sock.display()
        );
        let (status, body) = api_with(&api_sock, "PUT", "vm.add-net", &bad);
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("'tap' does not go with vhost_user=on"),
            "{body}"
        );
        let mac = "52:54:00:12:34:57";
        let add = format!(
            r#"{{"vhost_user":true,"vhost_socket":"{}","mac":"{mac}","id":"vnet1"}}"#,
            sock.display()
        );
        let (status, body) = api_with(&api_sock, "PUT", "vm.add-net", &add);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""id":"vnet1""#), "{body}");
        let slot = body
            .split("0000:00:")
            .nth(1)
            .and_then(|b| u8::from_str_radix(&b[..2], 16).ok())
            .unwrap_or_else(|| panic!("no bdf in {body}"));
        wait_serial(
            &serial,
            &format!("HOTPLUG ADDED slot={slot} type=net mac={mac}\n"),
        );
        let (status, info) = api(&api_sock, "GET", "vm.info");
        assert_eq!(status, 200, "{info}");
        assert!(
            info.contains(&format!(r#""vhost_socket":"{}""#, sock.display())),
            "{info}"
        );
        assert!(info.contains(r#""state":"Running""#), "{info}");
        assert_eq!(api(&api_sock, "PUT", "vmm.shutdown").0, 200);
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

/// Sends "hello from host" to the guest every 200 ms until the VMM exits (30 s at most).
fn answer_until_exit(udp: &std::net::UdpSocket, vmm: Child) -> Run {
    let t = std::thread::spawn(move || wait_with_timeout(vmm, Duration::from_secs(30)));
    while !t.is_finished() {
        let _ = udp.send_to(b"hello from host", format!("{GUEST_IP}:5000"));
        std::thread::sleep(Duration::from_millis(200));
    }
    t.join().unwrap()
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
        let dir = scratch("vun-pause");
        let sock = dir.join("vun.sock");
        let api_sock = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let log = dir.join("backend.log");
        let _backend = Backend::start(&sock, false, &log);
        let udp = host_socket();
        let net = format!(
            "vhost_user=on,socket={},mac={GUEST_MAC},id=vnet0",
            sock.display()
        );
        let serial_arg = format!("file={}", serial.display());
        let api_arg = format!("path={}", api_sock.display());
        let vmm = start_vmm(
            &net,
            "",
            &["--serial", &serial_arg, "--api-socket", &api_arg],
        );
        let mut buf = [0u8; 2048];
        let (n, _) = udp.recv_from(&mut buf).expect("no datagram from the guest");
        assert_eq!(&buf[..n], b"hello from guest");
        net_pause_and_snapshot(&api_sock, &dir.join("snap"));
        udp.send_to(b"hello from host", format!("{GUEST_IP}:5000"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!read(&serial).contains("net-rx"), "{}", read(&serial));
        assert_eq!(api(&api_sock, "PUT", "vm.resume").0, 204);
        let r = answer_until_exit(&udp, vmm);
        let r = Run {
            stdout: read(&serial),
            ..r
        };
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
        let dir = scratch("vun-restore");
        let sock = dir.join("vun.sock");
        let api_sock = dir.join("api.sock");
        let serial = dir.join("serial.out");
        let log = dir.join("backend.log");
        let snap = dir.join("snap");
        let mut backend = Backend::start(&sock, false, &log);
        let udp = host_socket();
        let net = format!(
            "vhost_user=on,socket={},mac={GUEST_MAC},id=vnet0",
            sock.display()
        );
        let serial_arg = format!("file={}", serial.display());
        let api_arg = format!("path={}", api_sock.display());
        let mut vmm = start_vmm(
            &net,
            "",
            &["--serial", &serial_arg, "--api-socket", &api_arg],
        );
        let mut buf = [0u8; 2048];
        let (n, _) = udp.recv_from(&mut buf).expect("no datagram from the guest");
        assert_eq!(&buf[..n], b"hello from guest");
        let t = net_pause_and_snapshot(&api_sock, &snap);
        // The restored VMM opens the serial file afresh.
        let before = read(&serial);
        let _ = vmm.kill();
        let _ = vmm.wait();
        backend.kill();
        drop(udp);
        // The old TAP goes with its backend.
        let deadline = Instant::now() + Duration::from_secs(10);
        while read(Path::new("/proc/thread-self/net/dev")).contains(&format!("{TAP}:")) {
            assert!(Instant::now() < deadline, "the old TAP stays");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _backend = Backend::start(&sock, false, &log);
        let udp = host_socket();
        let _ = std::fs::remove_file(&api_sock);
        let restore = format!("source_url=file://{}", snap.display());
        let vmm = spawn(&["-v", "--restore", &restore, "--api-socket", &api_arg]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&api_sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "the restored VMM does not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(api(&api_sock, "PUT", "vm.resume").0, 204);
        let r = answer_until_exit(&udp, vmm);
        let r = Run {
            stdout: format!("{before}{}", read(&serial)),
            ..r
        };
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
        let dir = scratch(if local {
            "vun-migrate-local"
        } else {
            "vun-migrate"
        });
        let sock = dir.join("vun.sock");
        let (api_a, api_b) = (dir.join("api-a.sock"), dir.join("api-b.sock"));
        let serial = dir.join("serial.out");
        let _backend = Backend::start(&sock, false, &dir.join("backend-a.log"));
        let udp = host_socket();
        let net = format!(
            "vhost_user=on,socket={},mac={GUEST_MAC},id=vnet0",
            sock.display()
        );
        let serial_arg = format!("file={}", serial.display());
        let api_arg = format!("path={}", api_a.display());
        let src = start_vmm(
            &net,
            "",
            &["--serial", &serial_arg, "--api-socket", &api_arg],
        );
        let mut buf = [0u8; 2048];
        let (n, _) = udp.recv_from(&mut buf).expect("no datagram from the guest");
        assert_eq!(&buf[..n], b"hello from guest");
        // The destination's backend: same socket path, its TAP in another namespace, where
        // the host answers the guest once it arrives.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sock_b, log_b, done_b) = (sock.clone(), dir.join("backend-b.log"), done.clone());
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
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&api_b).is_err() {
            assert!(
                Instant::now() < deadline,
                "the destination VMM does not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = if local {
            format!("unix:{}", dir.join("migrate.sock").display())
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match url.split_once(':') {
                Some(("unix", p)) => Path::new(p).exists(),
                _ => {
                    let port: u16 = url.rsplit_once(':').unwrap().1.parse().unwrap();
                    let hex = format!(":{port:04X} ");
                    read(Path::new("/proc/thread-self/net/tcp"))
                        .lines()
                        .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
                }
            };
            if up {
                // A Unix socket's file appears at bind(), a moment before listen().
                std::thread::sleep(Duration::from_millis(50));
                break;
            }
            assert!(Instant::now() < deadline, "nothing listens on {url}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = read(&serial);
        let (status, text) = api_with(
            &api_a,
            "PUT",
            "vm.send-migration",
            &format!(r#"{{"destination_url": "{url}", "local": {local}}}"#),
        );
        assert_eq!(status, 204, "{text}");
        let (status, text) = receiving.join().unwrap();
        assert_eq!(status, 204, "receive-migration: {text}");
        let src = wait_with_timeout(src, Duration::from_secs(30));
        assert!(src.status.success(), "{}", src.stderr);
        let dst = wait_with_timeout(dst, Duration::from_secs(30));
        done.store(true, std::sync::atomic::Ordering::Release);
        host_b.join().unwrap();
        let r = Run {
            stdout: format!("{before}{}", read(&serial)),
            ..dst
        };
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
