//! The hostile guest suite (`test=hostile-suite`, docs/security.md "Hostile guest suite"): a
//! VM with every device this VMM has besides the NIC (disk, rng, virtio-console, vsock,
//! balloon, pmem, virtio-mem, watchdog, pvpanic) whose guest abuses each of them, the PCI
//! layer and the legacy ports, then storms them. The VMM must answer its API during the storm,
//! use no more CPU after the storm than before it, keep the disk image as it was, and the
//! guest must see every device work again and power off cleanly.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common;
use crate::helpers::*;

fn text_of(serial: &Path) -> String {
    serial_text(serial)
}

/// utime + stime of process `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The names of the VMM's threads, sorted.
fn threads(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// CPU ticks the VMM used over 2 s of the guest's quiet window `n`, and its thread count.
fn idle_ticks(vmm: &Vmm, serial: &Path, n: u32) -> (u64, Vec<String>) {
    wait_line(
        serial,
        &format!("HOSTILE idle{n} begin"),
        1,
        Duration::from_secs(240),
    );
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(vmm.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(vmm.pid()) - t0;
    let threads = threads(vmm.pid());
    let text = serial_text(serial);
    assert!(
        !text.contains(&format!("HOSTILE idle{n} end")),
        "the quiet window ended before the measurement did"
    );
    (used, threads)
}

#[test]
fn a_hostile_guest_does_not_take_the_vmm_down() {
    run_suite("hostile-suite", &[]);
}

/// The same with a virtio-net device over a TAP in a private network namespace, the host
/// broadcasting UDP into it all along, so the receive path meets the malformed buffers too.
#[test]
fn a_hostile_guest_with_a_nic_does_not_take_the_vmm_down() {
    std::thread::spawn(|| {
        // SAFETY: unshare only moves this thread into a new network namespace; the VMM it
        // starts and the threads it spawns inherit it.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_broadcast(true).unwrap();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if sock.send_to(&[0xa5; 200], "192.168.249.255:9").is_ok() {
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            sent
        });
        run_suite(
            "hostile-suite-net",
            &[
                "--net",
                "tap=hstap0,ip=192.168.249.1,mask=255.255.255.0,mac=52:54:00:12:34:57",
            ],
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = sender.join().unwrap();
        eprintln!("hostile suite: {sent} broadcast frames sent into the TAP");
        assert!(sent > 1000, "only {sent} frames went into the TAP");
    })
    .join()
    .unwrap();
}

/// Snapshots taken while the guest has devices broken, rings outside its memory, BARs and
/// MSI-X tables in odd states, or storms running, each restored in a new VMM: the restored
/// guest finishes the suite.
#[test]
fn a_hostile_guest_snapshotted_mid_abuse_restores_and_finishes() {
    require_curl();
    for (i, at) in [
        "INFO hostile rng ring-in-own-bar",
        "INFO hostile blk desc-loop",
        "HOSTILE activation-storm begin",
        "HOSTILE storm begin",
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("hostile-snap-{i}");
        let dir = common::scratch(&format!("{name}-files"));
        let (args, _) = suite_files(&dir);
        let serial = dir.join("serial.out");
        let all = suite_args(
            &args,
            "test=hostile-suite hostile_idle_ms=300 hostile_storm_ms=500",
        );
        let vmm = Vmm::start(&name, &all);
        let deadline = Instant::now() + Duration::from_secs(240);
        while !serial_text(&serial).contains(at) {
            assert!(
                Instant::now() < deadline,
                "no '{at}' in:\n{}",
                serial_text(&serial)
            );
            assert_no_fail(&serial);
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(vmm.put("vm.pause").0, 204);
        let snap = dir.join("snap");
        std::fs::create_dir_all(&snap).unwrap();
        let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) });
        let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body.to_string()));
        assert_eq!(status, 204, "{at}: {text}");
        drop(vmm);
        let _ = std::fs::remove_file(dir.join("v.sock"));
        let log2 = dir.join("vmm-restored.log").display().to_string();
        let mut restored = Vmm::start(&format!("{name}-restored"), &["--log-file", &log2]);
        let body = serde_json::json!({
            "source_url": format!("file://{}", snap.display()),
            "resume": true
        });
        let (status, text) = restored.curl("PUT", "vm.restore", Some(&body.to_string()));
        assert_eq!(status, 204, "{at}: {text}");
        let child = restored.child.take().unwrap();
        let run = common::wait_with_timeout(child, Duration::from_secs(240));
        let text = serial_text(&serial);
        assert_eq!(run.code(), Some(0), "{at}:\n{text}\n{}", run.stderr);
        assert!(
            !text.lines().any(|l| l.starts_with("FAIL")),
            "{at}:\n{text}"
        );
        assert!(text.contains("PASS hostile-suite-done"), "{at}:\n{text}");
        std::fs::remove_dir_all(&snap).unwrap();
    }
}

/// The files a suite run uses in `dir` (disks, pmem, console, serial, log) as the argument
/// strings `suite_args` takes, and the first disk's contents.
fn suite_files(dir: &Path) -> ([String; 7], Vec<u8>) {
    let disk = dir.join("disk.img");
    let mut img = vec![0u8; 1 << 20];
    for s in 0..16usize {
        img[s * 512..][..512].fill((s as u8).wrapping_mul(3).wrapping_add(1));
    }
    std::fs::write(&disk, &img).unwrap();
    // A second disk takes the hostile requests (the first is read at the end).
    let disk2 = dir.join("disk2.img");
    std::fs::write(&disk2, vec![0u8; 1 << 20]).unwrap();
    let pmem = dir.join("pmem.img");
    std::fs::write(&pmem, vec![0u8; 2 << 20]).unwrap();
    (
        [
            format!("path={}", disk.display()),
            format!("file={}", dir.join("console.out").display()),
            format!("cid=3,socket={}", dir.join("v.sock").display()),
            format!("file={},size=2M", pmem.display()),
            format!("file={}", dir.join("serial.out").display()),
            // The log goes to a file: Vmm::start pipes stderr and reads it only at the end,
            // and the suite's log would fill the pipe and block the vCPU that writes it.
            dir.join("vmm.log").display().to_string(),
            // Behind the virtio-iommu, which the suite then abuses as any virtio function.
            format!("path={},iommu=on", disk2.display()),
        ],
        img,
    )
}

/// The VMM's arguments for a suite run on `args` (from `suite_files`).
fn suite_args<'a>(args: &'a [String; 7], cmdline: &'a str) -> Vec<&'a str> {
    let kernel = common::guest().elf_pvh.to_str().unwrap();
    vec![
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M,hotplug_method=virtio-mem,hotplug_size=128M",
        "--disk",
        &args[0],
        &args[6],
        "--rng",
        "src=/dev/urandom",
        "--console",
        &args[1],
        "--vsock",
        &args[2],
        "--balloon",
        "size=0",
        "--pmem",
        &args[3],
        "--watchdog",
        "--pvpanic",
        "--serial",
        &args[4],
        "--log-file",
        &args[5],
    ]
}

/// Boots the suite with every device (plus `extra`), checks the VMM through it and the
/// guest's checks after it.
fn run_suite(name: &str, extra: &[&str]) {
    require_curl();
    let dir = common::scratch(&format!("{name}-files"));
    let (args, img) = suite_files(&dir);
    let (disk, console, serial, log) = (
        dir.join("disk.img"),
        dir.join("console.out"),
        dir.join("serial.out"),
        dir.join("vmm.log"),
    );
    let mut all = suite_args(
        &args,
        "test=hostile-suite hostile_idle_ms=3000 hostile_storm_ms=3000",
    );
    all.extend_from_slice(extra);
    let mut vmm = Vmm::start(name, &all);
    let (before, threads_before) = idle_ticks(&vmm, &serial, 0);
    // The API answers all through the storm.
    wait_line(&serial, "HOSTILE storm begin", 1, Duration::from_secs(240));
    let (mut calls, mut slowest, mut pauses) = (0, Duration::ZERO, 0);
    while !serial_text(&serial).contains("HOSTILE storm end") {
        let t = Instant::now();
        assert_eq!(vmm.state(), "Running");
        assert_eq!(vmm.curl("GET", "vmm.ping", None).0, 200);
        slowest = slowest.max(t.elapsed());
        calls += 1;
        // Pausing waits for every worker to stop where it is: it must not hang in the storm.
        if calls % 10 == 0 {
            let t = Instant::now();
            assert_eq!(vmm.put("vm.pause").0, 204);
            assert_eq!(vmm.state(), "Paused");
            assert_eq!(vmm.put("vm.resume").0, 204);
            slowest = slowest.max(t.elapsed());
            pauses += 1;
        }
    }
    assert!(
        calls > 0 && pauses > 0,
        "{calls} API calls, {pauses} pauses fitted in the storm"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "an API call took {slowest:?} during the storm"
    );
    let (after, threads_after) = idle_ticks(&vmm, &serial, 1);
    eprintln!(
        "hostile suite: {calls} API round trips and {pauses} pause/resume during the storm \
         (slowest {slowest:?}); VMM CPU \
         over 2 s quiet: {before} ticks before the abuse, {after} after"
    );
    // A thread left spinning would cost 200 ticks (a whole CPU) here.
    assert!(
        after <= before + 20,
        "the VMM used {after} ticks in 2 s after the storm, {before} before"
    );
    // Thousands of activations and resets later, no worker thread is left behind: the one
    // thread more is the worker of the disk the storm left broken.
    let mut new_threads = threads_after.clone();
    for t in &threads_before {
        if let Some(i) = new_threads.iter().position(|x| x == t) {
            new_threads.remove(i);
        }
    }
    assert!(
        new_threads.len() <= 1 && new_threads.iter().all(|t| t == "virtio-blk"),
        "VMM threads before the abuse: {threads_before:?}, after: {threads_after:?}"
    );
    let run = vmm.wait();
    // The activation storm: one broken activation after another, each a NEEDS_RESET the VMM
    // logs; the log gets a bounded number of lines, not one (or two) per activation.
    let storm: u64 = text_of(&serial)
        .lines()
        .find_map(|l| l.strip_prefix("HOSTILE activation-storm end "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let log_text = std::fs::read_to_string(&log).unwrap();
    let logged = log_text
        .lines()
        .filter(|l| l.contains("rings outside guest memory"))
        .count() as u64;
    eprintln!("hostile suite: {storm} broken activations, {logged} lines about them logged");
    assert!(
        storm > 200 && logged < storm / 2,
        "{storm} broken activations, {logged} log lines about them"
    );
    let text = serial_text(&serial);
    assert_eq!(run.code(), Some(0), "{text}\n{}", run.stderr);
    assert!(!text.lines().any(|l| l.starts_with("FAIL")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("SUMMARY ") && l.ends_with(" failed=0")),
        "{text}"
    );
    let devices = text
        .lines()
        .find_map(|l| l.strip_prefix("HOSTILE devices "))
        .unwrap_or_else(|| panic!("no device list:\n{text}"));
    let devices: Vec<&str> = devices.split(',').collect();
    let want: &[&str] = if extra.contains(&"--net") {
        &[
            "net", "console", "blk", "rng", "vsock", "pmem", "balloon", "mem", "watchdog",
        ]
    } else {
        &[
            "console", "blk", "rng", "vsock", "pmem", "balloon", "mem", "watchdog",
        ]
    };
    for &d in want {
        assert!(
            devices.contains(&d),
            "{d} not found by the guest: {devices:?}"
        );
    }
    let passed = |c: &str| {
        assert!(
            text.lines().any(|l| l == format!("PASS {c}")),
            "no 'PASS {c}' in:\n{text}"
        )
    };
    for d in &devices {
        for c in [
            "ring-in-own-bar",
            "ring-outside-ram",
            "ring-across-ram-end",
            "ring-size-over-max",
            "desc-outside-ram",
            "desc-huge-write",
            "desc-wraps",
            "desc-loop",
            "indirect-nested",
            "indirect-len-huge",
            "avail-idx-far-ahead",
            "restarts",
            "config-intact",
            "common-config",
            "requests",
            "live-rewrites",
        ] {
            passed(&format!("hostile-{d}-{c}"));
        }
        passed(&format!("hostile-bar-fuzz-{d}"));
        passed(&format!("hostile-msix-{d}"));
        passed(&format!("hostile-final-{d}-starts"));
    }
    for c in [
        "hostile-ap-started",
        "hostile-blk-reset-in-flight",
        "hostile-activation-storm",
        "hostile-ap-alive-lifecycle",
        "hostile-ap-alive-requests",
        "hostile-pci-00-readonly-intact",
        "hostile-pci-absent-functions",
        "hostile-mmio-unassigned",
        "hostile-bar-sizing",
        "hostile-bar-over-ram",
        "hostile-bar-over-other-bar",
        "hostile-bar-over-ecam-lapic-nowhere",
        "hostile-bar-toggle-and-empty-bars",
        "hostile-pci-done",
        "hostile-ports-uart",
        "hostile-ports-cmos",
        "hostile-ports-acpi-i8042",
        "hostile-ports-unassigned",
        "hostile-storm-msix",
        "hostile-storm-broken-device",
        "hostile-storm-done",
        "hostile-ap-alive-virtio",
        "hostile-ap-alive-pci",
        "hostile-ap-alive-ports",
        "hostile-ap-alive-storm",
        "hostile-ap-alive-end",
        "hostile-final-blk",
        "hostile-final-console",
        "hostile-final-pmem",
        "rng-read",
        "hostile-eject-in-flight",
        "hostile-suite-done",
    ] {
        passed(c);
    }
    assert_eq!(std::fs::read(&disk).unwrap(), img, "the disk image changed");
    // The console file also holds what the malformed transmit chains carried (0xff bytes).
    let out = std::fs::read(&console).unwrap();
    let want = b"hostile suite: console ok\n";
    assert!(
        out.windows(want.len()).any(|w| w == want),
        "{}",
        String::from_utf8_lossy(&out)
    );
}
