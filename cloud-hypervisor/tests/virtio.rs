//! PCI and virtio devices, driven from inside the test guest by the `virtio-drivers` crate (an
//! independent driver stack) and by hand with malformed requests.

mod common;

use std::path::{Path, PathBuf};

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::net::{
    self, answer_guest, expect_from_guest, in_private_netns, GUEST_MAC, HOST_IP, HOST_MAC,
};
use common::{
    boot, connect_when_listening, guest, openpty, read_until, run, scratch, wait_with_timeout, Run,
    VMM,
};

const SECTORS: u64 = 16;

/// Sector `s` of disk `k` as the host writes it / as the guest rewrites it
/// (the same formulas as test-guest/src/virtio.rs).
fn host_pattern(k: usize, s: u64) -> u8 {
    (s as u8).wrapping_mul(3).wrapping_add(k as u8 + 1)
}
fn guest_pattern(k: usize, s: u64) -> u8 {
    (s as u8).wrapping_mul(5).wrapping_add(k as u8 + 0x80)
}
/// What the guest writes to sector `SECTORS` of disk `k` through its last queue, when it has
/// more than one.
fn mq_pattern(k: usize) -> u8 {
    0x40 + k as u8
}

fn make_disk(path: &Path, k: usize, size: u64) {
    let mut img = vec![0u8; size as usize];
    for s in 0..SECTORS {
        img[s as usize * 512..][..512].fill(host_pattern(k, s));
    }
    std::fs::write(path, img).unwrap();
}

/// Checks disk `k`'s image: the first `SECTORS` sectors as the host wrote them, or as the guest
/// rewrote them (`written`); then, if `mq`, sector `SECTORS` written through the last queue;
/// zeroes after that.
fn check_disk(path: &Path, k: usize, size: u64, written: bool, mq: bool) {
    let img = std::fs::read(path).unwrap();
    assert_eq!(img.len() as u64, size, "{}: size changed", path.display());
    for s in 0..SECTORS {
        let want = if written {
            guest_pattern(k, s)
        } else {
            host_pattern(k, s)
        };
        let sector = &img[s as usize * 512..][..512];
        assert!(
            sector.iter().all(|&b| b == want),
            "{} sector {s}: expected {want:#x}, found {:x?}",
            path.display(),
            &sector[..8]
        );
    }
    let mut rest = &img[(SECTORS * 512) as usize..];
    if mq {
        let (sector, after) = rest.split_at(512);
        assert!(
            sector.iter().all(|&b| b == mq_pattern(k)),
            "{} sector {SECTORS} (last queue): found {:x?}",
            path.display(),
            &sector[..8]
        );
        rest = after;
    }
    assert!(rest.iter().all(|&b| b == 0));
}

/// A 1 MiB image `file` with disk 0's pattern in a fresh scratch directory `dir`, and its
/// `--disk` argument: `path=<image>`, then `,<opts>` unless `opts` is empty.
fn one_disk(dir: &str, file: &str, opts: &str) -> (PathBuf, String) {
    let img = scratch(dir).join(file);
    make_disk(&img, 0, 1 << 20);
    let arg = if opts.is_empty() {
        format!("path={}", img.display())
    } else {
        format!("path={},{opts}", img.display())
    };
    (img, arg)
}

/// Boots the PVH test guest with 256 MiB of memory and `extra` arguments.
fn boot_pvh(cmdline: &str, extra: &[&str]) -> Run {
    boot(
        &guest().elf_pvh,
        cmdline,
        &[&["--memory", "size=256M"], extra].concat(),
    )
}

/// Arguments that boot the PVH test guest with 256 MiB of memory and the given serial port and
/// virtio-console modes.
fn console_args<'a>(cmdline: &'a str, serial: &'a str, console: &'a str) -> [&'a str; 10] {
    [
        "--kernel",
        guest().elf_pvh.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--memory",
        "size=256M",
        "--serial",
        serial,
        "--console",
        console,
    ]
}

#[test]
fn pci_enumeration_ports_and_ecam() {
    let (_, d) = one_disk("pci", "d.img", "id=disk0,pci_device_id=7");
    // (memory, max_phys_bits, where the first BAR goes): the 64-bit window starts at the
    // first GiB boundary above RAM (4 GiB at least); with 32 physical address bits there is
    // none and 64-bit BARs go to the 32-bit window.
    for (mem, bits, bar) in [
        ("256M", 46, Some(0x1_0000_0000u64)),
        ("5G", 46, Some(0x1_8000_0000)),
        ("256M", 32, None),
    ] {
        let cpus = format!("boot=1,max_phys_bits={bits}");
        let r = boot(
            &guest().elf_pvh,
            "test=pci expect_virtio=2",
            &[
                "--memory",
                &format!("size={mem}"),
                "--cpus",
                &cpus,
                "--disk",
                &d,
            ],
        );
        r.assert_guest_passed();
        for c in [
            "pci-host-bridge",
            "pci-ports-match-ecam",
            "pci-virtio-count",
            "pci-windows",
            "pci-bars",
            "pci-bar-sizing",
            "pci-bar-move",
            "pci-capabilities",
        ] {
            r.assert_passed(c);
        }
        assert!(
            r.stdout.contains("INFO pci 00:07.0 id=10421af4"),
            "{}",
            r.stdout
        );
        // The disk has an explicit slot, so it is placed first; present at boot, it has a
        // 32-bit BAR (as the original's), at the 32-bit window's start. The rng's 64-bit BAR
        // goes to the 64-bit window's start where there is one.
        if let Some(first) = bar {
            assert!(
                r.stdout
                    .contains(&format!(": BAR0 {first:#x} size 0x10000")),
                "{mem} {bits}: {}",
                r.stdout
            );
        }
        assert!(
            r.stdout
                .contains("INFO 00:07.0: BAR0 0xc0000000 size 0x10000"),
            "{mem} {bits}: {}",
            r.stdout
        );
        if bar.is_some() {
            r.assert_passed("pci-bar-move-64");
        } else {
            assert!(!r.stdout.contains("pci-bar-move-64"), "{}", r.stdout);
        }
    }
}

#[test]
fn rng_gives_entropy() {
    let r = boot(
        &guest().elf_linux,
        "test=rng",
        &["--memory", "size=256M", "--rng", "src=/dev/urandom,id=rng0"],
    );
    r.assert_guest_passed();
    for c in ["rng-read", "msix-enable", "msix-queue-vector"] {
        r.assert_passed(c);
    }
}

/// `--rtc` (bare, and with keys): the test guest drives the virtio-rtc device by hand and
/// checks each answer (test-guest/src/virtio_rtc.rs), its clock against the CMOS one.
#[test]
fn rtc_answers_with_the_host_clock() {
    for rtc in [&["--rtc"][..], &["--rtc", "id=clock0,pci_device_id=9"]] {
        let r = boot_pvh("test=virtio-rtc", rtc);
        r.assert_guest_passed();
        for c in [
            "virtio-rtc-present",
            "virtio-rtc-cfg",
            "virtio-rtc-clock-cap",
            "virtio-rtc-cross-cap",
            "virtio-rtc-read",
            "virtio-rtc-enodev",
            "virtio-rtc-eopnotsupp",
            "virtio-rtc-einval",
        ] {
            r.assert_passed(c);
        }
    }
    let r = boot_pvh("test=virtio-rtc", &[]);
    assert!(r.stdout.contains("FAIL virtio-rtc-present"), "{}", r.stdout);
}

#[test]
fn blk_two_disks_one_and_two_queues() {
    let dir = scratch("blk2");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    make_disk(&a, 0, 1 << 20);
    make_disk(&b, 1, 2 << 20);
    let da = format!("path={},serial=serial0,num_queues=1", a.display());
    let db = format!(
        "path={},serial=serial1,num_queues=2,queue_size=64,id=second",
        b.display()
    );
    let cmdline = format!("test=blk blk_disks=2 blk_sectors={SECTORS}");
    // As the original: no more queues on a disk than boot vCPUs.
    let r = boot_pvh(&cmdline, &["--cpus", "boot=2", "--disk", &da, &db]);
    r.assert_guest_passed();
    for k in 0..2 {
        for c in [
            "read",
            "write",
            "flush",
            "read-back",
            "get-id",
            "read-beyond-end",
        ] {
            r.assert_passed(&format!("blk{k}-{c}"));
        }
    }
    // The second disk's last queue, by hand: reads what queue 0 wrote, writes and flushes.
    for c in ["mq-read", "mq-write", "mq-flush"] {
        r.assert_passed(&format!("blk1-{c}"));
    }
    assert!(
        !r.stdout.contains("blk0-mq-"),
        "one-queue disk: {}",
        r.stdout
    );
    check_disk(&a, 0, 1 << 20, true, false);
    check_disk(&b, 1, 2 << 20, true, true);
}

/// `queue_affinity`: each queue has a thread of its own, pinned to its CPUs; the blk scenario's
/// checks pass on both queues (the second driven by hand), and what it wrote is in the image.
#[test]
fn blk_two_queues_each_with_its_own_thread() {
    let cpus = seccomp::CpuSet::allowed().unwrap().cpus();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let opts = format!("serial=serial0,num_queues=2,queue_affinity=[0@[{first}],1@[{last}]]");
    let (img, d) = one_disk("blk-queue-threads", "d.img", &opts);
    let cmdline = format!("test=blk blk_disks=1 blk_sectors={SECTORS}");
    let r = boot_pvh(&cmdline, &["--cpus", "boot=2", "--disk", &d]);
    r.assert_guest_passed();
    for c in [
        "read",
        "write",
        "flush",
        "read-back",
        "mq-read",
        "mq-write",
        "mq-flush",
    ] {
        r.assert_passed(&format!("blk0-{c}"));
    }
    check_disk(&img, 0, 1 << 20, true, true);
}

/// Runs `qemu-img` (Debian's qemu-utils) with `args`; it must succeed.
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 overlay over a raw image holding the host's pattern (`backing_files=on`), as a VM
/// booted from a cloud image has: the guest reads the pattern through the chain and writes
/// its own sectors (a copy-on-write of part of a cluster; with `direct=on` through io_uring).
/// The overlay passes `qemu-img check` and, converted to raw, holds the guest's sectors and the
/// backing file's zeroes elsewhere; the backing file is untouched.
#[test]
fn blk_qcow2_overlay_over_raw_backing() {
    for direct in ["off", "on"] {
        let dir = scratch(&format!("blk-overlay-{direct}"));
        let (base, overlay, flat) = (
            dir.join("base.raw"),
            dir.join("overlay.qcow2"),
            dir.join("flat.raw"),
        );
        make_disk(&base, 0, 1 << 20);
        let path = |p: &Path| p.to_str().unwrap().to_string();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &path(&base),
            "-F",
            "raw",
            &path(&overlay),
        ]);
        let disk = format!(
            "path={},backing_files=on,direct={direct},serial=serial0",
            overlay.display()
        );
        let r = boot_pvh(
            &format!("test=blk blk_disks=1 blk_sectors={SECTORS}"),
            &["--disk", &disk],
        );
        r.assert_guest_passed();
        for c in ["read", "write", "flush", "read-back", "get-id"] {
            r.assert_passed(&format!("blk0-{c}"));
        }
        qemu_img(&["check", "-q", "-f", "qcow2", &path(&overlay)]);
        qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &path(&overlay),
            &path(&flat),
        ]);
        check_disk(&flat, 0, 1 << 20, true, false);
        check_disk(&base, 0, 1 << 20, false, false);
    }
}

#[test]
fn blk_readonly_rejects_writes() {
    let (a, da) = one_disk("blkro", "ro.img", "readonly=on,serial=serial0");
    let cmdline = format!("test=blk blk_disks=1 blk_ro=1 blk_sectors={SECTORS}");
    let r = boot_pvh(&cmdline, &["--disk", &da]);
    r.assert_guest_passed();
    r.assert_passed("blk0-write-rejected");
    check_disk(&a, 0, 1 << 20, false, false);
}

/// A flat VMDK (`image_type=vmdk`, as the original's): qemu-img's monolithicFlat descriptor
/// and extent; the guest's blk checks through it, its writes in the extent file. Without
/// `image_type=vmdk` it is refused (a VMDK is never probed: it names other files).
#[test]
fn blk_flat_vmdk() {
    let dir = scratch("blkvmdk");
    let desc = dir.join("d.vmdk");
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
        ])
        .arg(&desc)
        .arg("1M")
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flat = dir.join("d-flat.vmdk");
    make_disk(&flat, 0, 1 << 20);
    let plain = format!("path={}", desc.display());
    let r = boot_pvh("test=blk", &["--disk", &plain]);
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("give image_type=vmdk"), "{}", r.stderr);
    let d = format!("path={},image_type=vmdk,serial=serial0", desc.display());
    let cmdline = format!("test=blk blk_disks=1 blk_sectors={SECTORS}");
    let r = boot_pvh(&cmdline, &["--disk", &d]);
    r.assert_guest_passed();
    for c in ["read", "write", "flush", "read-back"] {
        r.assert_passed(&format!("blk0-{c}"));
    }
    check_disk(&flat, 0, 1 << 20, true, false);
}

#[test]
fn blk_image_locked_by_another_vmm() {
    let (_, da) = one_disk("blklock", "l.img", "");
    // Both VMMs are started the same way, on the same image.
    let args = [
        "--kernel",
        guest().elf_pvh.to_str().unwrap(),
        "--cmdline",
        "test=wait",
        "--serial",
        "null",
        "--console",
        "off",
        "--disk",
        &da,
    ];
    let first = common::spawn(&args);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let second = run(&args);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let _ = common::wait_with_timeout(first, std::time::Duration::from_secs(20));
    assert_eq!(second.code(), Some(1), "{}", second.stderr);
    let line = second.stderr.trim();
    assert!(
        line.starts_with("cloud-hypervisor: --disk ") && line.contains("lock"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
}

#[test]
fn console_output_reaches_the_file() {
    let dir = scratch("console");
    let out = dir.join("console.txt");
    let c = format!("file={}", out.display());
    let r = run(&console_args("test=console", "tty", &c));
    r.assert_guest_passed();
    r.assert_passed("console-write");
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text, "hello from virtio-console\n");
}

#[test]
fn hostile_requests_do_not_take_the_vmm_down() {
    let (a, da) = one_disk("hostile", "h.img", "");
    let r = boot_pvh("test=hostile", &["--disk", &da]);
    r.assert_guest_passed();
    for c in [
        "hostile-addr-outside-ram",
        "hostile-readonly-data-for-in",
        "hostile-writable-header",
        "hostile-oversized",
        "hostile-sector-beyond-end",
        "hostile-addr-wraps",
        "hostile-chain-over-4g",
        "hostile-zero-length-status",
        "hostile-descriptor-loop",
        "hostile-valid-after-bad",
        "msix-pending-bit",
        "hostile-needs-reset",
        "rng-read",
        "hostile-recovered",
        "hostile-vmm-alive",
    ] {
        r.assert_passed(c);
    }
    check_disk(&a, 0, 1 << 20, false, false);
}

#[test]
fn console_input_and_output_through_a_pty() {
    let mut child = common::spawn(&console_args("test=console-echo", "tty", "pty,id=con0"));
    let mut pty = common::open_announced_pty(&mut child, "console");
    // Raw mode: no echo of the guest's output back into its input.
    // SAFETY: termios is plain data filled by tcgetattr on an open tty fd.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(pty.as_raw_fd(), &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(pty.as_raw_fd(), libc::TCSANOW, &t), 0);
    }
    pty.write_all(b"ping over virtio\n").unwrap();
    let pfd = pty.as_raw_fd();
    let text = read_until(
        &mut pty,
        pfd,
        "ECHO ping over virtio",
        Duration::from_secs(20),
    );
    assert!(text.contains("ECHO ping over virtio\n"), "{text}");
    child.stderr = None;
    let r = wait_with_timeout(child, Duration::from_secs(20));
    r.assert_guest_passed();
    r.assert_passed("console-echo");
}

#[test]
fn console_input_and_output_through_a_socket() {
    let dir = scratch("console-socket");
    let sock = dir.join("console.sock");
    let arg = format!("socket={},id=con0", sock.display());
    let child = common::spawn(&console_args("test=console-echo", "tty", &arg));
    let mut stream = connect_when_listening(&sock, "console");
    stream.write_all(b"ping over the socket\n").unwrap();
    let fd = stream.as_raw_fd();
    let text = read_until(
        &mut stream,
        fd,
        "ECHO ping over the socket",
        Duration::from_secs(20),
    );
    assert!(text.contains("ECHO ping over the socket\n"), "{text}");
    let r = wait_with_timeout(child, Duration::from_secs(20));
    r.assert_guest_passed();
    r.assert_passed("console-echo");
    assert!(!sock.exists(), "the socket file is left behind");
}

#[test]
fn net_udp_both_ways_through_a_tap() {
    // The VMM, its TAP and the host end of the traffic live in a network namespace of their
    // own: a thread moves into a fresh one and the VMM it starts inherits it, so nothing
    // here can reach (or collide with) the machine's real networks.
    in_private_netns(net_udp_in_private_netns);
}

const TAP: &str = "chtap0";

/// The VMM booting `test=<scenario>` with one virtio-net device (four queue pairs) over a new
/// TAP, and the UDP socket on the host end (`HOST_IP`:5001), bound once the VMM has given the
/// TAP its address. The calling thread must be in a private network namespace (see
/// `common::net::in_private_netns`, which also keeps IPv6 off the TAP: the byte counts are exact).
fn start_net_vmm(scenario: &str) -> (std::process::Child, std::net::UdpSocket) {
    let net = format!(
        "tap={TAP},ip={HOST_IP},mask=255.255.255.0,mac={GUEST_MAC},host_mac={HOST_MAC},id=net0,num_queues=4"
    );
    let cmdline = net::cmdline(scenario);
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let mut child = common::spawn(&[
        "-v",
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--memory",
        "size=256M",
        // As the original: no more queue pairs than boot vCPUs.
        "--cpus",
        "boot=2",
        "--serial",
        "tty",
        "--console",
        "off",
        "--net",
        &net,
    ]);
    // Bind once the VMM has created the TAP (binding alone proves nothing: this kernel lets a
    // UDP socket bind an address no interface has).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !net::has_interface(TAP) {
        if let Ok(Some(_)) = child.try_wait() {
            let r = wait_with_timeout(child, Duration::from_secs(5));
            panic!("the VMM exited: {:?}\n{}\n{}", r.status, r.stdout, r.stderr);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no TAP {TAP} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, net::host_socket())
}

/// What `virtio-drivers` cannot do, driven by the guest by hand on virtio-net's second queue
/// pair (`test=net-mq`): MQ and the control queue negotiated, VQ_PAIRS_SET 2 acknowledged; a
/// datagram sent on transmit queue 1 with its checksum left to the device (it reaches this
/// socket only if the TAP got the offload request: the kernel drops a bad checksum); a
/// 1000-byte answer received on receive queue 1 (the only one with buffers; the TAP steers a
/// flow's answers to the queue it came from), merged over 256-byte buffers, its checksum good
/// as the virtio header describes it.
#[test]
fn net_second_queue_pair_merged_buffers_and_checksums() {
    in_private_netns(|| {
        let (mut child, sock) = start_net_vmm("net-mq");
        net::net_mq_exchange(&sock, &mut child, TAP);
        let r = wait_with_timeout(child, Duration::from_secs(30));
        r.assert_guest_passed();
        for c in [
            "net-mq-ctrl",
            "net-mq-tx",
            "net-mq-rx",
            "net-mq-rx-merged",
            "net-mq-rx-csum",
        ] {
            r.assert_passed(c);
        }
    });
}

fn net_udp_in_private_netns() {
    // Four queue pairs; the test guest's driver (virtio-drivers) uses one without MQ, so the
    // device must keep the other TAP queues detached or frames would get lost there.
    let (mut child, sock) = start_net_vmm("net");
    expect_from_guest(&sock, b"hello from guest");
    answer_guest(&sock, &mut child, b"hello from host");
    let r = wait_with_timeout(child, Duration::from_secs(30));
    r.assert_guest_passed();
    for c in ["net-mac", "net-tx", "net-arp-reply", "net-rx"] {
        r.assert_passed(c);
    }
    // Byte counts both ways: what the guest sent and received against the device's counters
    // (logged at exit, as vm.counters reports them).
    let field = |line: &str, key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
    };
    let guest_line = r
        .stdout
        .lines()
        .find(|l| l.contains("NET-COUNTS"))
        .unwrap_or_else(|| panic!("no NET-COUNTS line:\n{}", r.stdout));
    let dev_line = r
        .stderr
        .lines()
        .find(|l| l.contains("counters net0:"))
        .unwrap_or_else(|| panic!("no device counters logged:\n{}", r.stderr));
    // Everything the guest sent was completed before it went on, so the counts match.
    for k in ["tx_frames", "tx_bytes"] {
        assert_eq!(
            field(guest_line, k),
            field(dev_line, k),
            "{k}: {guest_line} / {dev_line}"
        );
    }
    assert!(
        field(guest_line, "tx_bytes") >= 58 + 42,
        "hello and ARP reply: {guest_line}"
    );
    // The guest stops reading once the host's datagram is in; the device may have delivered
    // more behind it (the host sends it up to five times), never less.
    for k in ["rx_frames", "rx_bytes"] {
        assert!(
            field(dev_line, k) >= field(guest_line, k),
            "{k}: {guest_line} / {dev_line}"
        );
    }
    assert!(
        field(guest_line, "rx_bytes") >= 42 + 57,
        "ARP request and hello: {guest_line}"
    );
}

#[test]
fn reboot_with_devices_releases_and_reopens_them() {
    let (_, da) = one_disk("reboot", "r.img", "serial=serial0");
    // The rebuilt VM must get the image lock again: the old devices are gone first.
    let r = boot_pvh("test=reboot", &["--disk", &da]);
    r.assert_guest_passed();
    r.assert_passed("reboot-survived-nvram");
    assert!(r.stdout.contains("REBOOT 1"), "{}", r.stdout);
}

/// MSI-X end to end: the guest points the rng's queue vector at an MSI-X entry whose message
/// is a vector of its own IDT, and the completion interrupts its CPU on that vector; a masked
/// entry holds the message (PBA) until it is unmasked.
#[test]
fn msix_message_reaches_the_guest_cpu() {
    let r = boot_pvh("test=msix", &[]);
    r.assert_guest_passed();
    for c in [
        "msix-queue-vector",
        "msix-enable",
        "msix-delivered",
        "msix-vector-only",
        "msix-masked-pending",
        "msix-unmask-delivers",
    ] {
        r.assert_passed(c);
    }
}

fn set_window_size(tty: &std::fs::File, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize; the fd is an open pty.
    assert_eq!(
        unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
}

/// `--console tty` on a terminal: the guest's virtio-console reports the terminal's size, and a
/// resize (SIGWINCH) reaches it as a new size with a configuration interrupt.
#[test]
fn console_size_follows_the_terminal() {
    let dir = scratch("console-size");
    let serial = dir.join("serial.txt");
    let (mut master, slave) = openpty();
    set_window_size(&master, 100, 40);
    let s = format!("file={}", serial.display());
    let child = Command::new(VMM)
        .args(console_args(
            "test=console-size console_size=100x40 console_resize=132x50",
            &s,
            "tty",
        ))
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_ready(&serial);
    set_window_size(&master, 132, 50);
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGWINCH) }, 0);
    let r = wait_with_timeout(child, Duration::from_secs(30));
    // Drain whatever reached the terminal (nothing is expected).
    let mut flags = 0;
    // SAFETY: fcntl on our own open fd.
    unsafe {
        flags |= libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let mut sink = [0u8; 4096];
    let _ = std::io::Read::read(&mut master, &mut sink);
    assert_console_sizes(r, &serial, "100x40", "132x50");
}

/// Waits (30 s at most) until the guest's serial output, written to the file `serial`, shows
/// `READY`.
fn wait_for_ready(serial: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains("READY") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline && !text.contains("SUMMARY"),
            "no READY:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `console-size` scenario's checks, on the finished run `r` whose serial output is in the
/// file `serial`: the size at boot, then the size after the resize.
fn assert_console_sizes(r: Run, serial: &Path, first: &str, resized: &str) {
    let r = Run {
        status: r.status,
        stdout: std::fs::read_to_string(serial).unwrap(),
        stderr: r.stderr,
    };
    r.assert_guest_passed();
    for c in [
        &format!("console-size {first}"),
        "console-config-vector",
        "msix-enable",
        &format!("console-resize {resized}"),
        "console-config-generation",
        "console-config-interrupt",
    ] {
        r.assert_passed(c);
    }
}

/// The pids of `pid`'s child processes (whichever of its threads started them).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let list = std::fs::read_to_string(task.unwrap().path().join("children")).unwrap();
        out.extend(list.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
    }
    out
}

/// `--console pty`: a resize of the pseudo-terminal the VMM created, made by whoever holds its
/// other side (no signal to the VMM), reaches the guest. The VMM follows it through one watcher
/// process, which holds no fd of the VMM's but the pty and its pipe, and ends with the VMM.
#[test]
fn console_pty_size_follows_resizes() {
    let dir = scratch("console-pty-size");
    let serial = dir.join("serial.txt");
    let s = format!("file={}", serial.display());
    let mut child = Command::new(VMM)
        .args(console_args(
            "test=console-size console_size=80x25 console_resize=132x50",
            &s,
            "pty",
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pty = common::open_announced_pty(&mut child, "console");
    wait_for_ready(&serial);
    let watchers = children_of(child.id());
    assert_eq!(
        watchers.len(),
        1,
        "child processes of the VMM: {watchers:?}"
    );
    let watcher = format!("/proc/{}", watchers[0]);
    let fds = std::fs::read_dir(format!("{watcher}/fd")).unwrap().count();
    assert_eq!(
        fds, 2,
        "the watcher holds {fds} fds, not only the pty and its pipe"
    );
    set_window_size(&pty, 132, 50);
    let r = wait_with_timeout(child, Duration::from_secs(30));
    assert_console_sizes(r, &serial, "80x25", "132x50");
    // Killed and reaped by the VMM on its way out.
    assert!(
        !Path::new(&watcher).exists(),
        "the watcher outlived the VMM"
    );
}

/// `--disk vhost_user=on,socket=`: the guest's virtio-blk driver reads and writes an image
/// that an independent backend (qemu-storage-daemon) serves, through one queue and through
/// the last of two, and the image ends as the built-in virtio-blk leaves it.
#[test]
fn blk_vhost_user_against_qemu_storage_daemon() {
    for queues in [1u16, 2] {
        let dir = scratch(&format!("vhost-user-blk{queues}"));
        let (img, sock) = (dir.join("disk.img"), dir.join("vub.sock"));
        make_disk(&img, 0, 1 << 20);
        let _qsd = common::qsd::StorageDaemon::start(&img, &sock, queues);
        // qemu-storage-daemon answers GET_ID with its own name.
        let r = common::boot_vhost_user_blk(&sock, queues, SECTORS, "vhost_user_blk");
        r.assert_guest_passed();
        for c in ["read", "write", "flush", "read-back", "read-beyond-end"] {
            r.assert_passed(&format!("blk0-{c}"));
        }
        if queues > 1 {
            for c in ["mq-read", "mq-write", "mq-flush"] {
                r.assert_passed(&format!("blk0-{c}"));
            }
        }
        check_disk(&img, 0, 1 << 20, true, queues > 1);
    }
}

/// `--disk vhost_user=on` in front of qemu-storage-daemon, which grows its disk (QMP
/// `block_resize`) under the running guest: the VMM gave it a request channel (BACKEND_REQ), so
/// its config-change notice makes the device read the config space again and raise the
/// configuration interrupt with a new generation; the guest (`test=blk-resize`) sees the new
/// capacity and writes the new last sector into the image. (Without the channel the daemon
/// exits on the resize and the disk is gone, which is what the original's vhost-user disk gets.)
#[test]
fn blk_vhost_user_resized_by_qemu_storage_daemon() {
    common::qsd::grow_under_the_guest(&scratch("vhost-user-blk-resize"), |sock| {
        [
            "--disk".into(),
            format!("vhost_user=on,socket={}", sock.display()),
        ]
    });
}

/// Without shared guest RAM the backend could not map it: refused before anything starts.
#[test]
fn blk_vhost_user_needs_shared_memory() {
    let r = boot_pvh(
        "test=blk",
        &["--disk", "vhost_user=on,socket=/nonexistent.sock"],
    );
    assert!(
        r.stderr
            .contains("--disk vhost_user=on needs --memory shared=on"),
        "{}",
        r.stderr
    );
}
