//! Rate-limited devices driven through real split rings with their worker threads running:
//! a driver that keeps the queue full, and the throughput it gets against the configured one.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{S_OK, T_IN};
use crate::rate_limiter::{BucketConfig, LimiterConfig, RateLimiter};
use crate::tests::{Irq, NEXT, WRITE};
use crate::{ActivateContext, Block, BlockConfig, DeviceStatus, VirtioDevice};

const QSIZE: u16 = 64;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const STATUS: u64 = 0x18000;
const DATA: u64 = 0x10_0000;
/// Requests in flight (three descriptors each).
const CHAINS: u16 = QSIZE / 3;
const DISK_SIZE: u64 = 4 << 20;

/// A driver that keeps `CHAINS` reads of `len` bytes in flight on queue 0 of a disk.
struct Driver {
    mem: GuestMemoryMmap,
    kick: EventFd,
    next_avail: u16,
    last_used: u16,
    len: u32,
}

impl Driver {
    fn start(dev: &mut dyn VirtioDevice, len: u32) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(
            GuestAddress(0),
            DATA as usize + CHAINS as usize * len as usize,
        )])
        .unwrap();
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Irq::default()),
            queues: vec![Some((q, kick.try_clone().unwrap()))],
            acked_features: crate::F_VERSION_1,
            status: Arc::new(DeviceStatus::default()),
        })
        .unwrap();
        let mut d = Driver {
            mem,
            kick,
            next_avail: 0,
            last_used: 0,
            len,
        };
        for c in 0..CHAINS {
            let i = c * 3;
            let sector = u64::from(c) * u64::from(len) / 512 % (DISK_SIZE / 512);
            d.mem
                .write_obj(T_IN, GuestAddress(HDR + 16 * u64::from(c)))
                .unwrap();
            d.mem
                .write_obj(sector, GuestAddress(HDR + 16 * u64::from(c) + 8))
                .unwrap();
            d.desc(i, HDR + 16 * u64::from(c), 16, NEXT, i + 1);
            d.desc(
                i + 1,
                DATA + u64::from(c) * u64::from(len),
                len,
                WRITE | NEXT,
                i + 2,
            );
            d.desc(i + 2, STATUS + u64::from(c), 1, WRITE, 0);
            d.post(i);
        }
        d.kick.write(1).unwrap();
        d
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    fn post(&mut self, head: u16) {
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Takes the completed requests back and posts them again; returns how many completed.
    fn turn(&mut self) -> u64 {
        let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut n = 0;
        while self.last_used != used {
            let e = USED + 4 + 8 * u64::from(self.last_used % QSIZE);
            let head: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            assert_eq!(len, self.len + 1);
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(head) / 3))
                .unwrap();
            assert_eq!(status, S_OK);
            self.post(head as u16);
            self.last_used = self.last_used.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            self.kick.write(1).unwrap();
        }
        n
    }

    /// Requests completed per second between `warm` and `warm + window` after now.
    fn rate(&mut self, warm: Duration, window: Duration) -> f64 {
        let t0 = Instant::now();
        while t0.elapsed() < warm {
            self.turn();
            std::thread::sleep(Duration::from_micros(200));
        }
        let t1 = Instant::now();
        let mut n = 0;
        while t1.elapsed() < window {
            n += self.turn();
            std::thread::sleep(Duration::from_micros(200));
        }
        n as f64 / t1.elapsed().as_secs_f64()
    }
}

fn disk(limiter: Option<RateLimiter>) -> (tempfile::NamedTempFile, Block) {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file()
        .write_all(&vec![7u8; DISK_SIZE as usize])
        .unwrap();
    let d = block::open_disk(f.path(), &Default::default()).unwrap();
    let mut blk = Block::new(
        d,
        BlockConfig {
            num_queues: 1,
            queue_size: QSIZE,
            serial: "rl".into(),
            io_uring: false,
        },
    )
    .unwrap();
    blk.set_rate_limiter(limiter);
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

/// 1 MiB per 100 ms: a disk read with 64 KiB requests, the queue always full, moves 10 MiB/s
/// once the first bucketful is spent.
#[test]
fn blk_bandwidth_limit_holds() {
    let len = 64 << 10;
    let c = LimiterConfig {
        bandwidth: bucket(1 << 20, 100),
        ops: None,
    };
    let (_f, mut blk) = disk(RateLimiter::new(&c).unwrap());
    let mut d = Driver::start(&mut blk, len);
    let per_s = d.rate(Duration::from_millis(300), Duration::from_millis(1500));
    blk.reset();
    within(
        per_s * f64::from(len),
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
    let mut d = Driver::start(&mut blk, 4096);
    let per_s = d.rate(Duration::from_millis(300), Duration::from_millis(1500));
    blk.reset();
    within(per_s, 1000.0, "virtio-blk ops/s");
}

/// Without a limiter the same driver goes far faster than the limits above (the test measures
/// the limiter, not a slow harness).
#[test]
fn blk_unlimited_is_faster() {
    let (_f, mut blk) = disk(None);
    let mut d = Driver::start(&mut blk, 4096);
    let per_s = d.rate(Duration::from_millis(50), Duration::from_millis(300));
    blk.reset();
    assert!(per_s > 5000.0, "{per_s}");
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
    let mut d = Driver::start(&mut blk, 4096);
    let t = Instant::now();
    let mut n = 0;
    while n < 400 {
        n += d.turn();
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "{n} in {:?}",
            t.elapsed()
        );
    }
    let per_s = d.rate(Duration::from_millis(100), Duration::from_millis(1000));
    blk.reset();
    within(per_s, 100.0, "virtio-blk ops/s after the burst");
}
