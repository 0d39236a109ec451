//! The TAP interface deleted under a running VM: the NIC stops (its worker neither spins nor
//! panics), the VMM and the other devices go on (the disk still works, the API answers). The
//! VMM, its TAP and the host end live in a network namespace of their own (a thread of its
//! own, `unshare(CLONE_NEWNET)`), as in `virtio.rs`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest, ping, scratch, wait_with_timeout};

const HOST_IP: &str = "192.168.101.1";
const GUEST_IP: &str = "192.168.101.2";
const TAP: &str = "chtapfault0";
const GUEST_MAC: &str = "52:54:00:12:34:57";
const HOST_MAC: &str = "52:54:00:65:43:22";

/// The `NETFAULT round=<n> ...` lines of the serial log.
fn rounds(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("NETFAULT round="))
        .map(str::to_string)
        .collect()
}

/// Waits until the guest has printed `n` rounds.
fn wait_rounds(serial: &Path, n: usize, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while rounds(serial).len() < n {
        if let Ok(Some(s)) = child.try_wait() {
            let text = std::fs::read_to_string(serial).unwrap_or_default();
            panic!("the VMM exited ({s}):\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} rounds:\n{}",
            std::fs::read_to_string(serial).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Nanoseconds on a CPU of the threads of `pid` whose name `pick` accepts (schedstat), and
/// how many there are.
fn threads_runtime(pid: u32, pick: impl Fn(&str) -> bool) -> (u64, usize) {
    let (mut ns, mut n) = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !pick(comm.trim()) {
            continue;
        }
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        n += 1;
    }
    (ns, n)
}

#[test]
fn tap_deleted_under_a_running_vm() {
    let r = std::thread::spawn(|| {
        // SAFETY: unshare only moves the calling thread into a new network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) (these tests run as root): {}",
            std::io::Error::last_os_error()
        );
        tap_deleted_in_private_netns();
    })
    .join();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

fn tap_deleted_in_private_netns() {
    let dir = scratch("tap-deleted");
    let serial = dir.join("serial.log");
    let sock = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let cmdline = format!(
        "test=netfault net_ip={GUEST_IP} net_host_ip={HOST_IP} net_host_mac={HOST_MAC} net_mac={GUEST_MAC}"
    );
    let net = format!(
        "tap={TAP},ip={HOST_IP},mask=255.255.255.0,mac={GUEST_MAC},host_mac={HOST_MAC},id=net0"
    );
    // The log goes to a file that nothing has to drain: a flood of it would otherwise block
    // the VMM on a full pipe instead of showing as CPU time.
    let log = dir.join("vmm.log");
    let mut child = Command::new(common::VMM)
        .args([
            "--kernel",
            &k,
            "--cmdline",
            &cmdline,
            "--memory",
            "size=128M",
            "--serial",
            &format!("file={}", serial.display()),
            "--console",
            "off",
            "--api-socket",
            &format!("path={}", sock.display()),
            "--net",
            &net,
            "--disk",
            &format!("path={},image_type=raw", disk.display()),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting cloud-hypervisor");
    wait_rounds(&serial, 3, &mut child);
    // The NIC works: the guest's datagrams reach the host end.
    let udp = std::net::UdpSocket::bind(format!("{HOST_IP}:5001")).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp.recv_from(&mut buf).expect("no datagram from the guest");
    assert_eq!(&buf[..n], b"netfault");
    assert_eq!(from.to_string(), format!("{GUEST_IP}:5000"));

    let out = Command::new("ip")
        .args(["link", "del", TAP])
        .output()
        .expect("ip (Debian package iproute2)");
    assert!(
        out.status.success(),
        "ip link del {TAP}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deleted_at = rounds(&serial).len();
    // Settle, then measure: a worker spinning on the dead descriptor would use most of a CPU.
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let net = |c: &str| c.starts_with("virtio-net");
    // Every thread but the vCPU's (the guest spins between its rounds).
    let not_vcpu = |c: &str| !c.starts_with("vcpu");
    let (before, workers) = threads_runtime(pid, net);
    let (others_before, _) = threads_runtime(pid, not_vcpu);
    assert!(
        workers > 0,
        "no virtio-net worker thread in /proc/{pid}/task"
    );
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let spent_ms = (threads_runtime(pid, net).0 - before) / 1_000_000;
    let others_ms = (threads_runtime(pid, not_vcpu).0 - others_before) / 1_000_000;
    let wall_ms = t0.elapsed().as_millis();
    eprintln!(
        "in {wall_ms} ms after the TAP went: virtio-net workers {spent_ms} ms on a CPU, \
         all threads but the vCPU's {others_ms} ms"
    );
    assert!(
        spent_ms < 50,
        "the virtio-net worker ran {spent_ms} ms in {wall_ms} ms after its TAP was deleted"
    );
    // The disk's worker serves a write and a read every 50 ms; the rest sleep.
    assert!(
        others_ms < 200,
        "the VMM's threads other than the vCPU's ran {others_ms} ms in {wall_ms} ms"
    );

    // The guest goes on: transmits complete (the frames are dropped), the disk works.
    wait_rounds(&serial, deleted_at + 20, &mut child);
    let after_delete = rounds(&serial);
    for l in &after_delete[deleted_at..] {
        assert!(l.ends_with("disk=ok"), "{l}");
    }
    assert!(ping(&sock).contains("200"), "vmm.ping did not answer 200");

    // SIGTERM stops the VMM cleanly.
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let run = wait_with_timeout(child, Duration::from_secs(20));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(run.code(), Some(0), "{:?}\n{stderr}\n{text}", run.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!text.contains("FAIL"), "{text}");
    // Said once, not once per wake-up.
    let warnings = stderr.matches("TAP read failed").count();
    assert!(warnings <= 1, "{warnings} warnings:\n{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
