//! Rate-limited devices driven through real split rings with their worker threads running:
//! a driver that keeps the queue full, and the throughput it gets against the configured one.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limiter::{BucketConfig, LimiterConfig, RateLimiter};
use crate::tests::{static_arp, Irq, NEXT, WRITE};
use crate::{ActivateContext, Block, BlockConfig, DeviceStatus, VirtioDevice};

const QSIZE: u16 = 64;
/// Where queue `i`'s rings and buffers start.
fn base(i: usize) -> u64 {
    0x10_0000 * (i as u64 + 1)
}
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x4000;
const DISK_SIZE: u64 = 4 << 20;

/// A descriptor: offset in the queue's buffer area, length, flags.
type Desc = (u64, u32, u16);

/// A driver of one queue that keeps its chains in flight: each completed chain is posted again.
struct QDriver {
    mem: GuestMemoryMmap,
    base: u64,
    kick: EventFd,
    next_avail: u16,
    last_used: u16,
}

/// Activates `dev` (`nqueues` queues) with `chains` on the queues given, all posted and kicked.
fn start(
    dev: &mut dyn VirtioDevice,
    nqueues: usize,
    chains: Vec<(usize, Vec<Vec<Desc>>)>,
) -> Vec<QDriver> {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000 * (nqueues + 1))]).unwrap();
    let mut queues: Vec<Option<(Queue, EventFd)>> = (0..nqueues).map(|_| None).collect();
    let mut drivers = Vec::new();
    for (i, cs) in chains {
        let b = base(i);
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(b as u32), Some(0));
        q.set_avail_ring_address(Some((b + AVAIL) as u32), Some(0));
        q.set_used_ring_address(Some((b + USED) as u32), Some(0));
        q.set_ready(true);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues[i] = Some((q, kick.try_clone().unwrap()));
        let mut d = QDriver {
            mem: mem.clone(),
            base: b,
            kick,
            next_avail: 0,
            last_used: 0,
        };
        let mut idx = 0u16;
        for c in cs {
            let head = idx;
            for (k, &(off, len, flags)) in c.iter().enumerate() {
                let last = k + 1 == c.len();
                let a = b + 16 * u64::from(idx);
                mem.write_obj(b + BUFS + off, GuestAddress(a)).unwrap();
                mem.write_obj(len, GuestAddress(a + 8)).unwrap();
                let f = if last { flags } else { flags | NEXT };
                mem.write_obj(f, GuestAddress(a + 12)).unwrap();
                mem.write_obj(idx + 1, GuestAddress(a + 14)).unwrap();
                idx += 1;
            }
            d.post(head);
        }
        drivers.push(d);
    }
    dev.activate(ActivateContext {
        mem,
        interrupt: Arc::new(Irq::default()),
        queues,
        acked_features: crate::F_VERSION_1,
        status: Arc::new(DeviceStatus::default()),
        dma: None,
    })
    .unwrap();
    for d in &drivers {
        d.kick.write(1).unwrap();
    }
    drivers
}

impl QDriver {
    fn post(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(self.base + AVAIL + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(self.base + AVAIL + 2))
            .unwrap();
    }

    /// Posts the completed chains again; returns how many completed and their used lengths'
    /// sum.
    fn turn(&mut self) -> (u64, u64) {
        let used: u16 = self
            .mem
            .read_obj(GuestAddress(self.base + USED + 2))
            .unwrap();
        let (mut n, mut bytes) = (0, 0);
        while self.last_used != used {
            let e = self.base + USED + 4 + 8 * u64::from(self.last_used % QSIZE);
            let head: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            self.post(head as u16);
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
            bytes += u64::from(len);
        }
        if n > 0 {
            self.kick.write(1).unwrap();
        }
        (n, bytes)
    }
}

/// Turns the drivers for `warm`, then counts completions and used bytes per second over
/// `window`, for each driver.
fn rates(ds: &mut [QDriver], warm: Duration, window: Duration) -> Vec<(f64, f64)> {
    let t0 = Instant::now();
    while t0.elapsed() < warm {
        for d in ds.iter_mut() {
            d.turn();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let t1 = Instant::now();
    let mut sums = vec![(0u64, 0u64); ds.len()];
    while t1.elapsed() < window {
        for (d, s) in ds.iter_mut().zip(sums.iter_mut()) {
            let (n, b) = d.turn();
            s.0 += n;
            s.1 += b;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let t = t1.elapsed().as_secs_f64();
    sums.iter()
        .map(|&(n, b)| (n as f64 / t, b as f64 / t))
        .collect()
}

/// `n` reads of `len` bytes: header, data, status.
fn reads(n: u64, len: u32) -> Vec<Vec<Desc>> {
    (0..n)
        .map(|c| {
            vec![
                (c * 16, 16, 0),
                (0x1000 + c * u64::from(len), len, WRITE),
                (0x800 + c, 1, WRITE),
            ]
        })
        .collect()
}

fn disk(limiter: Option<RateLimiter>) -> (tempfile::NamedTempFile, Block) {
    disk_queues(limiter, 1, Vec::new())
}

/// A disk of `num_queues` queues, with `queue_affinity` (a thread per queue when not empty).
fn disk_queues(
    limiter: Option<RateLimiter>,
    num_queues: u16,
    queue_affinity: Vec<(u16, Vec<usize>)>,
) -> (tempfile::NamedTempFile, Block) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file()
        .write_all(&vec![7u8; DISK_SIZE as usize])
        .unwrap();
    let d = block::open_disk(f.path(), &Default::default()).unwrap();
    let mut blk = Block::new(
        d,
        BlockConfig {
            num_queues,
            queue_size: QSIZE,
            serial: "rl".into(),
            io_uring: false,
            queue_affinity,
        },
    )
    .unwrap();
    blk.set_rate_limiter(limiter).unwrap();
    (f, blk)
}

fn bucket(size: u64, refill_time_ms: u64) -> Option<BucketConfig> {
    Some(BucketConfig {
        size,
        one_time_burst: 0,
        refill_time_ms,
    })
}

fn within(achieved: f64, configured: f64, what: &str) {
    let err = (achieved - configured) / configured;
    eprintln!(
        "{what}: achieved {achieved:.1}, configured {configured:.1} ({:+.2} %)",
        err * 100.0
    );
    assert!(err.abs() < 0.05, "{what}: {achieved:.1} vs {configured:.1}");
}

/// Requests of a disk in flight: its queue of 64 holds 21 three-descriptor chains.
const CHAINS: u64 = 21;

/// 1 MiB per 100 ms: a disk read with 64 KiB requests (zeroed headers: IN at sector 0), the
/// queue always full, moves 10 MiB/s once the first bucketful is spent.
#[test]
fn blk_bandwidth_limit_holds() {
    let len = 64 << 10;
    let c = LimiterConfig {
        bandwidth: bucket(1 << 20, 100),
        ops: None,
    };
    let (_f, mut blk) = disk(RateLimiter::new(&c).unwrap());
    let mut d = start(&mut blk, 1, vec![(0, reads(CHAINS, len))]);
    let r = rates(
        &mut d,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    blk.reset();
    within(
        r[0].0 * f64::from(len),
        10.0 * (1 << 20) as f64,
        "virtio-blk bytes/s",
    );
}

/// 100 ops per 100 ms: 1000 requests a second.
#[test]
fn blk_ops_limit_holds() {
    let c = LimiterConfig {
        bandwidth: None,
        ops: bucket(100, 100),
    };
    let (_f, mut blk) = disk(RateLimiter::new(&c).unwrap());
    let mut d = start(&mut blk, 1, vec![(0, reads(CHAINS, 4096))]);
    let r = rates(
        &mut d,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    blk.reset();
    within(r[0].0, 1000.0, "virtio-blk ops/s");
}

/// With a thread per queue (`queue_affinity`), both queues' threads serve their own queue and
/// draw on the one limiter: together they get its 1000 requests a second, each about half.
#[test]
fn blk_queue_threads_share_the_disks_limit() {
    let c = LimiterConfig {
        bandwidth: None,
        ops: bucket(100, 100),
    };
    let cpu = seccomp::CpuSet::allowed().unwrap().cpus()[0];
    let (_f, mut blk) = disk_queues(RateLimiter::new(&c).unwrap(), 2, vec![(1, vec![cpu])]);
    let mut d = start(
        &mut blk,
        2,
        vec![(0, reads(CHAINS, 4096)), (1, reads(CHAINS, 4096))],
    );
    let r = rates(
        &mut d,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    blk.reset();
    within(
        r[0].0 + r[1].0,
        1000.0,
        "virtio-blk ops/s, two queue threads",
    );
    assert!(r[0].0 > 200.0 && r[1].0 > 200.0, "each queue served: {r:?}");
}

/// Without a limiter the same driver goes far faster than the limits above (the test measures
/// the limiter, not a slow harness).
#[test]
fn blk_unlimited_is_faster() {
    let (_f, mut blk) = disk(None);
    let mut d = start(&mut blk, 1, vec![(0, reads(CHAINS, 4096))]);
    let r = rates(
        &mut d,
        Duration::from_millis(50),
        Duration::from_millis(300),
    );
    blk.reset();
    assert!(r[0].0 > 5000.0, "{r:?}");
}

/// The one-time burst passes at once, then the rate holds.
#[test]
fn blk_one_time_burst_goes_first() {
    let c = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 10,
            one_time_burst: 400,
            refill_time_ms: 100,
        }),
    };
    let (_f, mut blk) = disk(RateLimiter::new(&c).unwrap());
    let mut d = start(&mut blk, 1, vec![(0, reads(CHAINS, 4096))]);
    let t = Instant::now();
    let mut n = 0;
    while n < 400 {
        n += d[0].turn().0;
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{n} in {:?}",
            t.elapsed()
        );
    }
    let r = rates(
        &mut d,
        Duration::from_millis(100),
        Duration::from_millis(1000),
    );
    blk.reset();
    within(r[0].0, 100.0, "virtio-blk ops/s after the burst");
}

/// virtio-net limits receive and transmit separately with the same configuration: 100 KiB
/// per 100 ms each, counted with the 12-byte header. The guest transmits 1024-byte chains as
/// fast as it can while the host floods it with 1024-byte frames (970 bytes of UDP payload):
/// each direction gets 1 024 000 bytes/s (1000 frames).
#[test]
fn net_rx_and_tx_limits_hold_separately() {
    let c = LimiterConfig {
        bandwidth: bucket(100 << 10, 100),
        ops: None,
    };
    let r = std::thread::spawn(move || net_rates_in_private_netns(c, 30))
        .join()
        .unwrap();
    let want = 1_024_000.0;
    within(r.0, want, "virtio-net receive bytes/s");
    within(r.1, want, "virtio-net transmit bytes/s");
}

/// Receive and transmit bytes/s (1024-byte frames, header included) of a net device limited
/// by `c` while the host sends `per_10ms` frames every 10 ms and the guest transmits all it can.
fn net_rates_in_private_netns(c: LimiterConfig, per_10ms: usize) -> (f64, f64) {
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let tap = net_util::Tap::open("vrl0", 1)
        .expect("creating a TAP (the tests run as root with /dev/net/tun)")
        .remove(0);
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vrl0/disable_ipv6", "1");
    tap.set_ip(
        "10.7.0.1".parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
    )
    .unwrap();
    tap.enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        vec![tap],
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    net.set_rate_limiter(Some(c));
    static_arp("vrl0", [10, 7, 0, 2], mac.bytes());
    let rx: Vec<Vec<Desc>> = (0..QSIZE as u64)
        .map(|c| vec![(c * 2048, 2048, WRITE)])
        .collect();
    let tx: Vec<Vec<Desc>> = (0..QSIZE as u64).map(|_| vec![(0, 1024, 0)]).collect();
    let mut d = start(&mut net, 3, vec![(0, rx), (1, tx)]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let host = std::net::UdpSocket::bind("10.7.0.1:7000").unwrap();
        std::thread::spawn(move || {
            // More frames than the limit lets through: the TAP always has one waiting.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..per_10ms {
                    let _ = host.send_to(&[0x5a; 970], "10.7.0.2:7000");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let r = rates(
        &mut d,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    net.reset();
    (r[0].1, r[1].0 * 1024.0)
}

/// Two disks of one rate limit group share its budget: 1000 requests a second together, each
/// woken by its own timer when the budget comes back.
#[test]
fn blk_group_shares_one_limit() {
    let c = LimiterConfig {
        bandwidth: None,
        ops: bucket(100, 100),
    };
    let shared = Arc::new(std::sync::Mutex::new(
        crate::rate_limiter::Buckets::new(&c).unwrap(),
    ));
    let (_f1, mut a) = disk(Some(RateLimiter::shared(shared.clone()).unwrap()));
    let (_f2, mut b) = disk(Some(RateLimiter::shared(shared).unwrap()));
    let mut da = start(&mut a, 1, vec![(0, reads(CHAINS, 4096))]);
    let db = start(&mut b, 1, vec![(0, reads(CHAINS, 4096))]);
    da.extend(db);
    let r = rates(
        &mut da,
        Duration::from_millis(300),
        Duration::from_millis(1500),
    );
    a.reset();
    b.reset();
    within(r[0].0 + r[1].0, 1000.0, "virtio-blk group ops/s");
    // Neither starves the other.
    assert!(r[0].0 > 250.0 && r[1].0 > 250.0, "{r:?}");
}

/// Disk requests/s and bytes/s with `chains` reads of `len` bytes in flight under `c`.
fn blk_rates(c: Option<LimiterConfig>, len: u32) -> (f64, f64) {
    let (_f, mut blk) = disk(c.map(|c| RateLimiter::new(&c).unwrap().unwrap()));
    let mut d = start(&mut blk, 1, vec![(0, reads(CHAINS, len))]);
    let r = rates(
        &mut d,
        Duration::from_millis(300),
        Duration::from_millis(2000),
    );
    blk.reset();
    (r[0].0, r[0].0 * f64::from(len))
}

/// Achieved against configured rates for a disk and a NIC (`scripts/bench-rate-limit` runs
/// it in release mode). Each limit is `size` per 100 ms.
#[test]
#[ignore]
fn bench_rate_limit_figures() {
    let bw = |bytes_per_s: u64| LimiterConfig {
        bandwidth: bucket(bytes_per_s / 10, 100),
        ops: None,
    };
    let report = |what: &str, achieved: f64, configured: f64| {
        println!(
            "{what:<38} configured {configured:>12.0}  achieved {achieved:>12.0}  ({:+.2} %)",
            (achieved - configured) / configured * 100.0
        );
    };
    let (_, unlimited) = blk_rates(None, 64 << 10);
    println!(
        "{:<38} {unlimited:>35.0}",
        "virtio-blk 64 KiB reads, no limit, B/s"
    );
    for mbs in [10u64, 50] {
        let (_, b) = blk_rates(Some(bw(mbs * 1_000_000)), 64 << 10);
        report(
            &format!("virtio-blk {mbs} MB/s (64 KiB reads), B/s"),
            b,
            (mbs * 1_000_000) as f64,
        );
    }
    let ops = LimiterConfig {
        bandwidth: None,
        ops: bucket(100, 100),
    };
    let (o, _) = blk_rates(Some(ops), 4096);
    report("virtio-blk 1000 ops/s (4 KiB reads)", o, 1000.0);
    for (mbs, per_10ms) in [(1u64, 30), (10, 200)] {
        let c = bw(mbs * 1_000_000);
        let (rx, tx) = std::thread::spawn(move || net_rates_in_private_netns(c, per_10ms))
            .join()
            .unwrap();
        report(
            &format!("virtio-net {mbs} MB/s receive, B/s"),
            rx,
            (mbs * 1_000_000) as f64,
        );
        report(
            &format!("virtio-net {mbs} MB/s transmit, B/s"),
            tx,
            (mbs * 1_000_000) as f64,
        );
    }
    let (rx, tx) = std::thread::spawn(move || net_rates_in_private_netns(ops, 30))
        .join()
        .unwrap();
    report("virtio-net 1000 frames/s receive", rx / 1024.0, 1000.0);
    report("virtio-net 1000 frames/s transmit", tx / 1024.0, 1000.0);
}
