//! Host-side request rate of the virtio-blk device path: requests travel through real split
//! rings in guest memory (virtio-queue), the device's worker thread and the block crate, and
//! are compared with plain pread/pwrite on the same file in the same run.
//!
//! `cargo bench -p virtio-devices --bench blk` (set BLK_BENCH_SECS to change the duration of
//! each measurement, default 3; BLK_BENCH_ROUNDS the number of alternating device / plain
//! rounds it is split into, default 12; BLK_BENCH_CASES=0,2 picks cases; BLK_BENCH_IO_URING=1
//! uses io_uring; BLK_BENCH_RANDOM=1 sends each request, on both sides, to a random place of
//! the disk instead of where the one before it ended).

mod common;
use common::{
    compare, need_event, own_cpu, report, run_on, thread_cpu, thread_last_cpu, GuestRam, Irq, Side,
    Wake,
};

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_devices::{ActivateContext, Block, BlockConfig, DeviceStatus, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 512;
const DEPTH: u16 = 128;
const DISK: u64 = 256 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x10000;
const USED: u64 = 0x20000;
const REQS: u64 = 0x100000;
const DATA: u64 = 0x100_0000;

/// Where the next request goes: where the last one ended (a sequential stream), or
/// (`random`) anywhere on the disk, aligned to its size.
struct Offsets {
    pos: u64,
    random: bool,
}

impl Offsets {
    fn next(&mut self, size: u32) -> u64 {
        let size = u64::from(size);
        if self.random {
            // xorshift64: cheap and the same sequence on both sides.
            self.pos ^= self.pos << 13;
            self.pos ^= self.pos >> 7;
            self.pos ^= self.pos << 17;
            (self.pos % (DISK / size)) * size
        } else {
            let at = self.pos % DISK;
            self.pos = (at + size) % DISK;
            at
        }
    }
}

fn offsets() -> Offsets {
    let random = std::env::var("BLK_BENCH_RANDOM").is_ok_and(|v| v == "1");
    Offsets {
        pos: if random { 0x9e37_79b9_7f4a_7c15 } else { 0 },
        random,
    }
}

struct Bench {
    mem: GuestMemoryMmap,
    ram: GuestRam,
    kick: EventFd,
    irq: Arc<Irq>,
    avail: u16,
    used: u16,
    /// Interrupts the "guest" took, how many of them found its thread asleep, and the
    /// notifications it sent, in the last `run`.
    irqs: u64,
    sleeps: u64,
    kicks: u64,
}

impl Bench {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    /// Sets up DEPTH three-descriptor chains of `size` bytes (reads or writes).
    fn prepare(&self, write: bool, size: u32) {
        for r in 0..DEPTH {
            let hdr = REQS + u64::from(r) * 64;
            self.mem
                .write_obj(u32::from(write), GuestAddress(hdr))
                .unwrap();
            let base = r * 3;
            let data = DATA + u64::from(r) * (64 << 10);
            self.desc(base, hdr, 16, 1, base + 1);
            self.desc(base + 1, data, size, if write { 1 } else { 3 }, base + 2);
            self.desc(base + 2, hdr + 32, 1, 2, 0);
        }
    }

    fn push(&mut self, head: u16, size: u32, pos: &mut Offsets) {
        let hdr = REQS + u64::from(head / 3) * 64;
        self.ram.wr(hdr + 8, (pos.next(size) / 512).to_le());
        let slot = self.avail % QSIZE;
        self.ram.wr(AVAIL + 4 + 2 * u64::from(slot), head.to_le());
        self.avail = self.avail.wrapping_add(1);
    }

    /// Makes the entries pushed so far visible: the avail index, after them.
    fn publish_avail(&self) {
        fence(Ordering::Release);
        self.ram.wr(AVAIL + 2, self.avail.to_le());
    }

    /// Keeps DEPTH requests in flight for `dur`, resubmitting each one as it completes (as a
    /// guest with a deep queue does). Returns the number completed.
    fn run(&mut self, size: u32, dur: Duration) -> u64 {
        let mut pos = offsets();
        for r in 0..DEPTH {
            self.push(r * 3, size, &mut pos);
        }
        self.publish_avail();
        self.kick.write(1).unwrap();
        let (mut done, mut used, start) = (0u64, self.used, Instant::now());
        let mut published = self.avail;
        loop {
            let now = u16::from_le(self.ram.rd(USED + 2));
            // The used elements are read after the index.
            fence(Ordering::Acquire);
            if now == used {
                // As Linux's virtqueue_enable_cb with EVENT_IDX: ask for an interrupt at the
                // next used entry (used_event), then look once more before halting.
                self.ram.wr(AVAIL + 4 + 2 * u64::from(QSIZE), used.to_le());
                fence(Ordering::SeqCst);
                if u16::from_le(self.ram.rd(USED + 2)) != used {
                    continue;
                }
                self.irqs += 1;
                if self.irq.wait(100) == Wake::Slept {
                    self.sleeps += 1;
                }
                continue;
            }
            let finishing = start.elapsed() >= dur;
            while used != now {
                let e = USED + 4 + 8 * u64::from(used % QSIZE);
                let head = u32::from_le(self.ram.rd(e));
                used = used.wrapping_add(1);
                done += 1;
                if !finishing {
                    self.push(head as u16, size, &mut pos);
                }
            }
            if finishing {
                if used == self.avail {
                    break;
                }
                continue;
            }
            self.publish_avail();
            // As Linux with EVENT_IDX: notify only if the new entries pass the device's
            // avail_event (it sets that when it goes to sleep), after a full barrier.
            fence(Ordering::SeqCst);
            let event = u16::from_le(self.ram.rd(USED + 4 + 8 * u64::from(QSIZE)));
            if need_event(event, self.avail, published) {
                self.kick.write(1).unwrap();
                self.kicks += 1;
            }
            published = self.avail;
        }
        self.used = used;
        done
    }
}

fn main() {
    // BENCH_SECCOMP=1: the device's worker runs under its seccomp filter, as in the VMM
    // (scripts/bench-seccomp compares).
    if std::env::var("BENCH_SECCOMP").is_ok_and(|v| v == "1") {
        seccomp::set_mode(seccomp::Mode::Trap);
    }
    let secs: u64 = std::env::var("BLK_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rounds: u32 = std::env::var("BLK_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(12);
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(DISK).unwrap();
    // Populate the page cache so both paths see the same state.
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..DISK >> 20 {
        file.as_file().write_all_at(&chunk, i << 20).unwrap();
    }
    file.as_file().flush().unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let disk = block::open_disk(file.path(), &block::OpenOptions::default()).unwrap();
    let mut blk = Block::new(
        disk,
        BlockConfig {
            num_queues: 1,
            queue_size: QSIZE,
            serial: "bench".into(),
            io_uring: std::env::var_os("BLK_BENCH_IO_URING").is_some(),
            queue_affinity: Vec::new(),
        },
    )
    .unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.set_event_idx(true);
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Irq::new());
    blk.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![Some((q, kick.try_clone().unwrap()))],
        acked_features: virtio_devices::F_VERSION_1 | virtio_devices::F_RING_EVENT_IDX,
        status: Arc::new(DeviceStatus::default()),
        dma: None,
    })
    .unwrap();
    let mut b = Bench {
        ram: GuestRam::new(&mem, 64 << 20),
        mem,
        kick,
        irq,
        avail: 0,
        used: 0,
        irqs: 0,
        sleeps: 0,
        kicks: 0,
    };
    println!(
        "virtio-blk device path ({DEPTH} requests in flight) vs pread/pwrite, {} offsets, {secs} s each in {rounds} alternating rounds; the guest halt-polls {} us",
        if offsets().random { "random" } else { "sequential" },
        b.irq.halt_poll().as_micros()
    );
    let f = file.as_file();
    // The plain loop reads into and writes from the very buffers the device path uses (the
    // same guest memory, same addresses), so both touch the same memory the same way.
    let bufs: Vec<*mut u8> = (0..DEPTH)
        .map(|r| {
            let a = GuestAddress(DATA + u64::from(r) * (64 << 10));
            b.mem
                .get_slice(a, 64 << 10)
                .unwrap()
                .ptr_guard_mut()
                .as_ptr()
        })
        .collect();
    // BLK_BENCH_CASES=0,2 runs only those cases (0: read 4 KiB, 1: write 4 KiB, 2: read
    // 64 KiB, 3: write 64 KiB).
    let cases: Option<Vec<usize>> = std::env::var("BLK_BENCH_CASES")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect());
    let all = [
        (false, 4096u32),
        (true, 4096),
        (false, 65536),
        (true, 65536),
    ];
    for (i, &(write, size)) in all.iter().enumerate() {
        if cases.as_ref().is_some_and(|c| !c.contains(&i)) {
            continue;
        }
        let kind = if write { "write" } else { "read" };
        b.prepare(write, size);
        // Device and plain loop take turns, `rounds` times each, so a change in the load of
        // the (shared) machine hits both alike; totals and the per-round range are shown.
        let slice = dur / rounds;
        let mut dev_tot = Side::default();
        let mut base_tot = Side::default();
        let mut ratios = Vec::new();
        let (mut irqs, mut sleeps, mut kicks, mut guest_cpu) = (0u64, 0u64, 0u64, 0.0);
        for _ in 0..rounds {
            let (start, cpu0, guest0) = (Instant::now(), thread_cpu("virtio-blk"), own_cpu());
            (b.irqs, b.sleeps, b.kicks) = (0, 0, 0);
            let n = b.run(size, slice);
            guest_cpu += own_cpu() - guest0;
            (irqs, sleeps, kicks) = (irqs + b.irqs, sleeps + b.sleeps, kicks + b.kicks);
            let dev = Side {
                n,
                bytes: n * u64::from(size),
                secs: start.elapsed().as_secs_f64(),
                cpu: thread_cpu("virtio-blk") - cpu0,
            };
            // On the CPU the device thread ran on: the two vCPUs of a VM need not be equal.
            run_on(thread_last_cpu("virtio-blk"));
            let (mut pos, mut n, start, cpu0) = (offsets(), 0u64, Instant::now(), own_cpu());
            while start.elapsed() < slice {
                for &p in &bufs {
                    // SAFETY: `p` points at 64 KiB inside the guest memory `b.mem` keeps
                    // mapped; the device is idle while this loop runs.
                    let buf = unsafe { std::slice::from_raw_parts_mut(p, size as usize) };
                    let at = pos.next(size);
                    if write {
                        f.write_all_at(buf, at).unwrap();
                    } else {
                        f.read_exact_at(buf, at).unwrap();
                    }
                }
                n += u64::from(DEPTH);
            }
            let base = Side {
                n,
                bytes: n * u64::from(size),
                secs: start.elapsed().as_secs_f64(),
                cpu: own_cpu() - cpu0,
            };
            run_on(None);
            ratios.push((dev, base));
            dev_tot.add(&dev);
            base_tot.add(&base);
        }
        let n = dev_tot.n;
        let per = |k: u64| n as f64 / k.max(1) as f64;
        println!(
            "{:<34} {:>9.1} requests per interrupt ({:.0} % found the guest asleep), {:.1} per notification; guest side {:.2} us CPU per request",
            "  batching",
            per(irqs),
            100.0 * sleeps as f64 / irqs.max(1) as f64,
            per(kicks),
            guest_cpu / n as f64 * 1e6
        );
        let order = if offsets().random { " random" } else { "" };
        report(
            &format!("virtio-blk{order} {kind} {} KiB", size / 1024),
            &dev_tot,
            "req/s",
        );
        report(
            &format!("p{kind}{order} {} KiB", size / 1024),
            &base_tot,
            "req/s",
        );
        compare(&dev_tot, &base_tot, &ratios, "request");
    }
    blk.reset();
}
