//! Host-side packet rate of the virtio-net device path: frames travel through real split rings
//! in guest memory (virtio-queue), the device's worker thread and a TAP, and are compared with
//! a plain read/write loop on the same TAP in the same run. Everything runs in a private
//! network namespace (the process unshares one first; it must run as root).
//!
//! `cargo bench -p virtio-devices --bench net` (NET_BENCH_SECS sets the duration of each
//! measurement, default 3; NET_BENCH_ROUNDS the number of alternating device / plain rounds it
//! is split into, default 12).
//!
//! Transmit: the "guest" keeps DEPTH frames in flight on the transmit queue; the device writes
//! them to the TAP, where the kernel drops them (they are for another host) - the plain loop
//! writes the same frames. Receive: UDP datagrams sent out through the TAP are queued on it
//! (BACKLOG at a time, before the clock starts); the device reads them into the guest's
//! receive buffers, which the "guest" recycles as they are used - the plain loop reads them.
//! Only the draining of each backlog is timed, so neither side competes with the sender.

mod common;
use common::{
    compare, need_event, own_cpu, report, run_on, thread_cpu, thread_last_cpu, GuestRam, Irq, Side,
    Wake,
};

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use net_util::{MacAddr, Tap};
use virtio_devices::{ActivateContext, DeviceStatus, Net, NetConfig, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 256;
const DEPTH: u16 = 128;
const HDR: usize = 12;
const BUF: u64 = 2048;
/// Frames queued on the TAP for each receive measurement; the TAP's queue holds four times as
/// many, so none is dropped.
const BACKLOG: u64 = 8192;

/// One queue as the "guest" sees it.
struct Ring {
    base: u64,
    data: u64,
    kick: EventFd,
    avail: u16,
    used: u16,
    /// The avail index the device was last shown.
    published: u16,
    /// Notifications sent, interrupts taken and how many of those found the guest asleep.
    kicks: u64,
    irqs: u64,
    sleeps: u64,
}

impl Ring {
    /// A fresh ring at `base` (descriptors, avail at +0x1000, used at +0x2000) with its buffers
    /// at `data`.
    fn new(base: u64, data: u64, kick: &EventFd) -> Self {
        Ring {
            base,
            data,
            kick: kick.try_clone().unwrap(),
            avail: 0,
            used: 0,
            published: 0,
            kicks: 0,
            irqs: 0,
            sleeps: 0,
        }
    }

    fn desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16) {
        let d = GuestAddress(self.base + 16 * u64::from(i));
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, d.unchecked_add(8)).unwrap();
        mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, d.unchecked_add(14)).unwrap();
    }
    fn avail_at(&self) -> u64 {
        self.base + 0x1000
    }
    fn used_at(&self) -> u64 {
        self.base + 0x2000
    }
    fn push(&mut self, ram: &GuestRam, head: u16) {
        let slot = self.avail % QSIZE;
        ram.wr(self.avail_at() + 4 + 2 * u64::from(slot), head.to_le());
        self.avail = self.avail.wrapping_add(1);
    }
    /// Before halting, as Linux's virtqueue_enable_cb with EVENT_IDX: asks for an interrupt at
    /// the next used entry (used_event), then looks once more. Returns whether entries came
    /// meanwhile (no halt then).
    fn arm(&self, ram: &GuestRam) -> bool {
        ram.wr(
            self.avail_at() + 4 + 2 * u64::from(QSIZE),
            self.used.to_le(),
        );
        std::sync::atomic::fence(Ordering::SeqCst);
        u16::from_le(ram.rd(self.used_at() + 2)) != self.used
    }
    /// Makes the new entries visible and notifies if they pass the device's avail_event (it
    /// sets that when it goes to sleep), as Linux does with EVENT_IDX.
    fn publish(&mut self, ram: &GuestRam) {
        std::sync::atomic::fence(Ordering::Release);
        ram.wr(self.avail_at() + 2, self.avail.to_le());
        std::sync::atomic::fence(Ordering::SeqCst);
        let event = u16::from_le(ram.rd(self.used_at() + 4 + 8 * u64::from(QSIZE)));
        let old = std::mem::replace(&mut self.published, self.avail);
        if need_event(event, self.avail, old) {
            self.kick.write(1).unwrap();
            self.kicks += 1;
        }
    }

    /// Nothing new in the used ring: re-arms the interrupt and halts until it comes, as a guest
    /// waits for its interrupt (at most 100 ms: an idle queue must not hang the bench).
    fn halt(&mut self, ram: &GuestRam, irq: &Irq) {
        if self.arm(ram) {
            return;
        }
        self.irqs += 1;
        if irq.wait(100) == Wake::Slept {
            self.sleeps += 1;
        }
    }

    /// Takes the next used element: its head and the bytes received without the header.
    fn take_used(&mut self, ram: &GuestRam) -> (u16, u64) {
        let e = self.used_at() + 4 + 8 * u64::from(self.used % QSIZE);
        let head = u32::from_le(ram.rd(e));
        let len = u32::from_le(ram.rd(e + 4));
        self.used = self.used.wrapping_add(1);
        (head as u16, u64::from(len).saturating_sub(HDR as u64))
    }

    /// Receive: posts DEPTH buffers (all are free: every one posted before was used) and
    /// reposts each used one while more are needed, until `target` frames have arrived; then
    /// no buffer is left on the ring. Returns the bytes received (without headers).
    fn drain(&mut self, ram: &GuestRam, irq: &Irq, target: u64) -> u64 {
        let first = u16::try_from(target).unwrap_or(DEPTH).min(DEPTH);
        for h in 0..first {
            self.push(ram, h);
        }
        self.publish(ram);
        let (mut posted, mut n, mut bytes) = (u64::from(first), 0u64, 0u64);
        let mut progress = Instant::now();
        while n < target {
            let now = u16::from_le(ram.rd(self.used_at() + 2));
            // The used elements are read after the index.
            std::sync::atomic::fence(Ordering::Acquire);
            if now == self.used {
                assert!(
                    progress.elapsed() < Duration::from_secs(2),
                    "receive stalled at {n} of {target} frames: the TAP dropped some"
                );
                self.halt(ram, irq);
                continue;
            }
            progress = Instant::now();
            let mut pushed = false;
            while self.used != now {
                let (head, len) = self.take_used(ram);
                n += 1;
                bytes += len;
                if posted < target {
                    self.push(ram, head);
                    posted += 1;
                    pushed = true;
                }
            }
            if pushed {
                self.publish(ram);
            }
        }
        bytes
    }

    /// Transmit: keeps DEPTH chains in flight for `dur`, giving each back as it is used.
    /// Returns frames and bytes (without headers) completed.
    fn run(&mut self, ram: &GuestRam, irq: &Irq, dur: Duration) -> (u64, u64) {
        for h in 0..DEPTH {
            self.push(ram, h);
        }
        self.publish(ram);
        let (mut n, mut bytes, start) = (0u64, 0u64, Instant::now());
        while start.elapsed() < dur {
            let now = u16::from_le(ram.rd(self.used_at() + 2));
            // The used elements are read after the index.
            std::sync::atomic::fence(Ordering::Acquire);
            if now == self.used {
                self.halt(ram, irq);
                continue;
            }
            while self.used != now {
                let (head, len) = self.take_used(ram);
                n += 1;
                bytes += len;
                self.push(ram, head);
            }
            self.publish(ram);
        }
        (n, bytes)
    }
}

fn queue(base: u64) -> Queue {
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
    q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
    q.set_ready(true);
    q.set_event_idx(true);
    q
}

fn checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A header and an Ethernet/IPv4/UDP frame with `payload` bytes, for another host's MAC.
fn frame(src_mac: [u8; 6], payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 7, 0, 2, 10, 7, 0, 1,
    ];
    ip[2..4].copy_from_slice(&((28 + payload) as u16).to_be_bytes());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0, 9, 0, 9]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(f.len() + payload, 0x5a);
    f
}

/// A permanent ARP entry so the host sends to the "guest" without asking.
fn static_arp(dev: &str, ip: [u8; 4], mac: [u8; 6]) {
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM | libc::ATF_PERM;
    for (d, s) in req.arp_dev.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: a socket we close again and an ioctl on a request we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        assert_eq!(libc::ioctl(fd, libc::SIOCSARP, &req), 0, "SIOCSARP");
        libc::close(fd);
    }
}

/// Queues BACKLOG `payload`-byte datagrams for the "guest" on the TAP.
fn fill(s: &UdpSocket, payload: usize) {
    let buf = vec![0x5au8; payload];
    for _ in 0..BACKLOG {
        s.send_to(&buf, "10.7.0.2:9").unwrap();
    }
}

fn main() {
    // BENCH_SECCOMP=1: the device's workers run under their seccomp filter, as in the VMM
    // (scripts/bench-seccomp compares).
    if std::env::var("BENCH_SECCOMP").is_ok_and(|v| v == "1") {
        seccomp::set_mode(seccomp::Mode::Trap);
    }
    // SAFETY: moves this (still single) thread into a new network namespace; every thread
    // started later inherits it.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET) (run as root): {}",
        std::io::Error::last_os_error()
    );
    let secs: u64 = std::env::var("NET_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rounds: u32 = std::env::var("NET_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(12);
    let mut taps = Tap::open("bnet0", 1).expect("creating a TAP");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/bnet0/disable_ipv6", "1");
    taps[0]
        .set_ip(
            "10.7.0.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
        )
        .unwrap();
    taps[0].enable().unwrap();
    let st = std::process::Command::new("ip")
        .args(["link", "set", "dev", "bnet0", "txqueuelen"])
        .arg((4 * BACKLOG).to_string())
        .status()
        .expect("running ip (iproute2)");
    assert!(st.success(), "ip link set txqueuelen: {st}");
    let mac = MacAddr::random_local();
    static_arp("bnet0", [10, 7, 0, 2], mac.bytes());
    // A second handle on the same TAP queue for the plain loops (the device is idle then).
    // SAFETY: dup of an fd we own; the result is owned by the File right away.
    let fd = unsafe { libc::dup(taps[0].as_raw_fd()) };
    assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut plain = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut net = Net::new(
        std::mem::take(&mut taps),
        NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let ram = GuestRam::new(&mem, 16 << 20);
    let (rx_base_addr, tx_base_addr) = (0x10000u64, 0x20000u64);
    let rx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let tx_kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Irq::new());
    println!(
        "virtio-net device path ({DEPTH} frames in flight) vs plain TAP read/write, {secs} s each in {rounds} alternating rounds; the guest halt-polls {} us",
        irq.halt_poll().as_micros()
    );
    for payload in [18usize, 1472] {
        let len = 14 + 28 + payload;
        let f = frame(mac.bytes(), payload);
        // Device and plain loop take turns, `rounds` times each (one activation of the
        // device per round), so a change in the load of the (shared) machine hits both alike.
        let slice = dur / rounds;
        let (mut tx_dev, mut tx_base, mut tx_ratios) = (Side::default(), Side::default(), vec![]);
        let (mut kicks, mut irqs, mut sleeps, mut guest_cpu) = (0u64, 0u64, 0u64, 0.0);
        let (mut rx_dev, mut rx_base, mut rx_ratios) = (Side::default(), Side::default(), vec![]);
        for _ in 0..rounds {
            let mut tx = Ring::new(tx_base_addr, 0x100000, &tx_kick);
            let mut rx = Ring::new(rx_base_addr, 0x400000, &rx_kick);
            // Fresh rings: the device's queues start at index 0 again.
            mem.write_slice(&[0u8; 0x3000], GuestAddress(rx_base_addr))
                .unwrap();
            mem.write_slice(&[0u8; 0x3000], GuestAddress(tx_base_addr))
                .unwrap();
            for i in 0..DEPTH {
                let a = tx.data + BUF * u64::from(i);
                mem.write_slice(&f, GuestAddress(a)).unwrap();
                tx.desc(&mem, i, a, f.len() as u32, 0);
                rx.desc(&mem, i, rx.data + BUF * u64::from(i), BUF as u32, 2);
            }
            net.activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![
                    Some((queue(rx_base_addr), rx_kick.try_clone().unwrap())),
                    Some((queue(tx_base_addr), tx_kick.try_clone().unwrap())),
                    None,
                ],
                acked_features: virtio_devices::F_VERSION_1 | virtio_devices::F_RING_EVENT_IDX,
                status: Arc::new(DeviceStatus::default()),
                dma: None,
            })
            .unwrap();

            // Transmit.
            let (start, cpu0, guest0) = (Instant::now(), thread_cpu("virtio-net0"), own_cpu());
            let (n, _) = tx.run(&ram, &irq, slice);
            guest_cpu += own_cpu() - guest0;
            (kicks, irqs, sleeps) = (kicks + tx.kicks, irqs + tx.irqs, sleeps + tx.sleeps);
            let dev = Side {
                n,
                bytes: n * len as u64,
                secs: start.elapsed().as_secs_f64(),
                cpu: thread_cpu("virtio-net0") - cpu0,
            };
            // On the CPU the device thread ran on: the two vCPUs of a VM need not be equal.
            run_on(thread_last_cpu("virtio-net0"));
            let (start, cpu0) = (Instant::now(), own_cpu());
            let mut n = 0u64;
            while start.elapsed() < slice {
                for _ in 0..DEPTH {
                    let _ = plain.write(&f);
                }
                n += u64::from(DEPTH);
            }
            let base = Side {
                n,
                bytes: n * len as u64,
                secs: start.elapsed().as_secs_f64(),
                cpu: own_cpu() - cpu0,
            };
            run_on(None);
            tx_ratios.push((dev, base));
            tx_dev.add(&dev);
            tx_base.add(&base);

            // Receive: the device and the plain loop each drain backlogs of BACKLOG frames
            // queued on the TAP beforehand (the device has no receive buffer meanwhile, so it
            // does not touch the TAP), until `slice` of draining has passed; only the draining
            // is timed. A generator running alongside would share the two CPUs with the
            // device thread and the "guest", and measure its own starvation.
            let sender = UdpSocket::bind("10.7.0.1:0").unwrap();
            let (mut dev, cpu0) = (Side::default(), thread_cpu("virtio-net0"));
            while dev.secs < slice.as_secs_f64() {
                // Queued from the CPU the device thread will read them on, as the plain loop
                // reads on the CPU that queued them: both read frames their own CPU queued.
                let here = current_cpu();
                match thread_last_cpu("virtio-net0") {
                    Some(cpu) if cpu != here => {
                        run_on(Some(cpu));
                        fill(&sender, payload);
                        run_on(Some(here));
                        run_on(None);
                    }
                    _ => fill(&sender, payload),
                }
                let start = Instant::now();
                dev.bytes += rx.drain(&ram, &irq, BACKLOG);
                dev.secs += start.elapsed().as_secs_f64();
                dev.n += BACKLOG;
            }
            dev.cpu = thread_cpu("virtio-net0") - cpu0;
            let dev_cpu = thread_last_cpu("virtio-net0");
            net.reset();
            // Queued and read on the CPU the device thread read on.
            run_on(dev_cpu);
            let mut base = Side::default();
            let mut buf = vec![0u8; BUF as usize];
            while base.secs < slice.as_secs_f64() {
                fill(&sender, payload);
                let (start, cpu0) = (Instant::now(), own_cpu());
                let mut n = 0;
                while n < BACKLOG {
                    match plain.read(&mut buf) {
                        Ok(k) => {
                            n += 1;
                            base.bytes += k.saturating_sub(HDR) as u64;
                        }
                        Err(_) => {
                            let mut pf = libc::pollfd {
                                fd: plain.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one valid pollfd.
                            let r = unsafe { libc::poll(&mut pf, 1, 2000) };
                            assert!(r > 0, "plain receive stalled at {n} of {BACKLOG} frames");
                        }
                    }
                }
                base.secs += start.elapsed().as_secs_f64();
                base.cpu += own_cpu() - cpu0;
                base.n += BACKLOG;
            }
            run_on(None);
            rx_ratios.push((dev, base));
            rx_dev.add(&dev);
            rx_base.add(&base);
        }
        let per = |k: u64| tx_dev.n as f64 / k.max(1) as f64;
        println!(
            "{:<34} {:>9.1} frames per interrupt ({:.0} % found the guest asleep), {:.1} per notification; guest side {:.2} us CPU per frame",
            "  transmit batching",
            per(irqs),
            100.0 * sleeps as f64 / irqs.max(1) as f64,
            per(kicks),
            guest_cpu / tx_dev.n.max(1) as f64 * 1e6
        );
        report(&format!("virtio-net transmit {len} B"), &tx_dev, "pkt/s");
        report(&format!("TAP write {len} B"), &tx_base, "pkt/s");
        compare(&tx_dev, &tx_base, &tx_ratios, "frame");
        report(&format!("virtio-net receive {len} B"), &rx_dev, "pkt/s");
        report(&format!("TAP read {len} B"), &rx_base, "pkt/s");
        compare(&rx_dev, &rx_base, &rx_ratios, "frame");
    }
}

/// The CPU the calling thread runs on.
fn current_cpu() -> usize {
    // SAFETY: no arguments; returns -1 on error.
    usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0)
}
