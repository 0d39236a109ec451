//! `test=hostile-suite`, part 1: every virtio-pci function, whatever its type, driven by hand
//! with rings where no ring may be (MMIO, outside RAM, across the end of RAM, unaligned, bad
//! sizes) and with malformed descriptor chains on every one of its queues (addresses outside
//! RAM or in MMIO, huge lengths, wrapping addresses, loops, indexes out of range, indirect
//! tables abused every way). The VMM must fail each request, ignore it or mark the device
//! NEEDS_RESET; it must not write outside what the chain's in-RAM buffers allow (a canary
//! checks the wrap-around target), and every device must work again after a reset.

use alloc::vec::Vec;

use virtio_drivers::transport::pci::bus::{BarInfo, ConfigurationAccess, DeviceFunction};

use crate::rawq::{Layout, F_NEXT, F_WRITE, VERSION_1};
use crate::virtio::{dma_pages, ecam, root};
use crate::{check, fail, pass, println, smp};

pub(crate) const F_INDIRECT: u16 = 4;
const INDIRECT_DESC: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
/// Whether `Dev::features` takes EVENT_IDX too (the requests phase sets it, so that hostile
/// `used_event` values meet the device's interrupt suppression).
pub(crate) static WITH_EVENT_IDX: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);
const NEEDS_RESET: u8 = 0x40;
/// Entries per queue the suite uses.
const QSIZE: u16 = 8;
/// Queues per device it drives (net with several pairs has more; the rest stay off).
const MAXQ: usize = 6;
/// Far outside any RAM and any window.
pub(crate) const OUTSIDE: u64 = 0x7fff_ffff_0000;
/// Where an address that wraps past 2^64 would land: must stay as written.
const CANARY: u64 = 0x100;
const CANARY_LEN: u64 = 0x100;

// The suite reads and writes registers and rings with the hand-made driver's accessors.
pub(crate) use crate::rawq::{r16, r32, r8, w16, w32, w64, w8};

/// A virtio-pci function of any type (virtio-drivers knows only some of them).
pub(crate) struct Dev {
    pub(crate) df: DeviceFunction,
    pub(crate) name: &'static str,
    pub(crate) l: Layout,
    pub(crate) nq: u16,
    pub(crate) bar_size: u64,
    /// Served by a vhost-user backend (`hostile_vhost_user=<slot>`): another process reads
    /// its rings, and vhost-user gives it no way to set NEEDS_RESET, so a ring it cannot serve
    /// is left unserved (nothing used) instead.
    pub(crate) vhost_user: bool,
}

/// The slots (bit n: slot n) whose functions a vhost-user backend serves.
pub(crate) static VHOST_USER_SLOTS: core::sync::atomic::AtomicU32 =
    core::sync::atomic::AtomicU32::new(0);

fn type_name(t: u16) -> &'static str {
    match t {
        1 => "net",
        2 => "blk",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        19 => "vsock",
        24 => "mem",
        27 => "pmem",
        23 => "iommu",
        35 => "watchdog",
        _ => "virtio",
    }
}

/// Every modern virtio function on bus 0.
pub(crate) fn functions() -> Vec<Dev> {
    let mut r = root();
    let mut out = Vec::new();
    for (df, info) in r.enumerate_bus(0) {
        if info.vendor_id != 0x1af4 || info.device_id < 0x1040 {
            continue;
        }
        let Some(l) = Layout::find(df) else { continue };
        let bar_size = match r.bar_info(df, 0) {
            Ok(Some(BarInfo::Memory { size, .. })) => size,
            _ => 0,
        };
        let nq = r16(l.common + 0x12);
        let vhost_user = VHOST_USER_SLOTS.load(core::sync::atomic::Ordering::Relaxed)
            & (1 << (df.device & 31))
            != 0;
        out.push(Dev {
            df,
            name: type_name(info.device_id - 0x1040),
            l,
            nq,
            bar_size,
            vhost_user,
        });
    }
    out
}

/// One queue's memory: two pages of rings and a page of buffers.
#[derive(Clone, Copy)]
pub(crate) struct Mem {
    pub(crate) ring: u64,
    pub(crate) buf: u64,
}

impl Mem {
    pub(crate) fn desc(&self) -> u64 {
        self.ring
    }
    pub(crate) fn avail(&self) -> u64 {
        self.ring + 0x100
    }
    pub(crate) fn used(&self) -> u64 {
        self.ring + 0x1000
    }
    pub(crate) fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc() + 16 * u64::from(i);
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }
}

/// The suite's DMA memory, allocated once and reused for every device.
pub(crate) struct Pool {
    pub(crate) q: [Mem; MAXQ],
    /// 64 KiB for descriptors whose length runs far past it.
    pub(crate) scratch: u64,
}

impl Pool {
    pub(crate) fn new() -> Pool {
        let mut q = [Mem { ring: 0, buf: 0 }; MAXQ];
        for m in q.iter_mut() {
            m.ring = dma_pages(2);
            m.buf = dma_pages(1);
        }
        Pool {
            q,
            scratch: dma_pages(16),
        }
    }
}

/// Where queue `index`'s rings go: (size, desc, avail, used).
type Rings = (u16, u64, u64, u64);

impl Dev {
    pub(crate) fn queues(&self) -> u16 {
        self.nq.min(MAXQ as u16)
    }

    pub(crate) fn notify_addr(&self, index: u16) -> u64 {
        w16(self.l.common + 0x16, index);
        self.l.notify + u64::from(r16(self.l.common + 0x1e)) * u64::from(self.l.notify_mult)
    }

    pub(crate) fn notify(&self, index: u16) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        w16(self.notify_addr(index), index);
    }

    /// Resets the device and waits for the reset to be seen (status reads 0).
    pub(crate) fn reset(&self) {
        self.l.set_status(0);
        for _ in 0..1000 {
            if self.l.status() == 0 {
                return;
            }
            smp::delay_us(100);
        }
    }

    /// Features the suite takes: VERSION_1, and INDIRECT_DESC where offered (and EVENT_IDX
    /// while `WITH_EVENT_IDX` is set).
    pub(crate) fn features(&self) -> u64 {
        let extra = if WITH_EVENT_IDX.load(core::sync::atomic::Ordering::Relaxed) {
            EVENT_IDX
        } else {
            0
        };
        VERSION_1 | (self.l.device_features() & (INDIRECT_DESC | extra))
    }

    /// Reset, negotiate, program every queue `rings(i)` gives (None: leave it off), DRIVER_OK.
    /// Returns the status read back and how many queues read back enabled.
    pub(crate) fn start_with(&self, rings: impl Fn(u16) -> Option<Rings>) -> (u8, u16) {
        let c = self.l.common;
        self.reset();
        self.l.set_status(1 | 2);
        let f = self.features();
        for half in 0..2 {
            w32(c + 0x08, half);
            w32(c + 0x0c, (f >> (32 * half)) as u32);
        }
        self.l.set_status(1 | 2 | 8);
        let mut enabled = 0;
        for i in 0..self.queues() {
            let Some((size, d, a, u)) = rings(i) else {
                continue;
            };
            w16(c + 0x16, i);
            w16(c + 0x18, size);
            w64(c + 0x20, d);
            w64(c + 0x28, a);
            w64(c + 0x30, u);
            w16(c + 0x1c, 1);
            if r16(c + 0x1c) == 1 {
                enabled += 1;
            }
        }
        self.l.set_status(1 | 2 | 8 | 4);
        (self.l.status(), enabled)
    }

    /// Every queue on its own pool memory, rings zeroed.
    pub(crate) fn start_valid(&self, p: &Pool) -> (u8, u16) {
        for m in &p.q[..self.queues() as usize] {
            for off in (0..0x2000).step_by(8) {
                w64(m.ring + off, 0);
            }
        }
        self.start_with(|i| {
            let m = p.q[i as usize];
            Some((QSIZE, m.desc(), m.avail(), m.used()))
        })
    }
}

/// Publishes `head` in queue memory `m` as avail entry `slot` and sets avail.idx to `slot + 1`.
pub(crate) fn publish(m: &Mem, slot: u16, head: u16) {
    w16(m.avail() + 4 + 2 * u64::from(slot % QSIZE), head);
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    w16(m.avail() + 2, slot.wrapping_add(1));
}

fn fill(addr: u64, len: u64, v: u8) {
    for a in addr..addr + len {
        w8(a, v);
    }
}

/// What a malformed chain is made of: descriptors 0.. (addr, len, flags, next), head 0.
type Chain = Vec<(u64, u32, u16, u16)>;

/// The chain cases: (name, builder from the queue's memory, the device BAR, the end of RAM).
#[allow(clippy::type_complexity)]
fn chain_cases() -> Vec<(&'static str, fn(&Mem, &Ctx) -> Chain)> {
    alloc::vec![
        ("desc-outside-ram", |m, _| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (OUTSIDE, 512, F_WRITE, 0)
        ]),
        ("desc-outside-ram-read", |m, _| alloc::vec![
            (OUTSIDE, 64, F_NEXT, 1),
            (m.buf, 512, F_WRITE, 0)
        ]),
        ("desc-in-own-bar", |m, c| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (c.bar, 256, F_WRITE, 0)
        ]),
        ("desc-in-lapic", |m, _| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (0xfee0_0000, 256, F_WRITE, 0)
        ]),
        ("desc-across-ram-end", |m, c| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (c.ram_end - 256, 512, F_WRITE, 0)
        ]),
        ("desc-huge-write", |m, c| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (c.scratch, u32::MAX, F_WRITE, 0)
        ]),
        ("desc-huge-read", |m, c| alloc::vec![
            (c.scratch, u32::MAX, F_NEXT, 1),
            (m.buf, 512, F_WRITE, 0)
        ]),
        ("desc-wraps", |m, _| alloc::vec![
            (m.buf, 64, F_NEXT, 1),
            (u64::MAX - 100, 512, F_WRITE, 0)
        ]),
        ("desc-loop", |m, _| alloc::vec![
            (m.buf, 16, F_NEXT, 1),
            (m.buf + 16, 16, F_NEXT, 0)
        ]),
        ("desc-self-loop", |m, _| alloc::vec![(m.buf, 16, F_NEXT, 0)]),
        ("desc-next-out-of-range", |m, _| alloc::vec![(
            m.buf, 16, F_NEXT, 200
        )]),
        ("desc-zero-length", |m, _| alloc::vec![
            (m.buf, 0, F_NEXT, 1),
            (m.buf + 64, 0, F_WRITE, 0)
        ]),
        ("desc-read-after-write", |m, _| alloc::vec![
            (m.buf, 64, F_WRITE | F_NEXT, 1),
            (m.buf + 64, 64, 0, 0)
        ]),
        ("indirect-outside-ram", |_, _| alloc::vec![(
            OUTSIDE, 64, F_INDIRECT, 0
        )]),
        ("indirect-in-own-bar", |_, c| alloc::vec![(
            c.bar, 64, F_INDIRECT, 0
        )]),
        ("indirect-len-zero", |m, _| {
            table(m, &[(m.buf, 16, 0, 0)]);
            alloc::vec![(m.buf + 0x800, 0, F_INDIRECT, 0)]
        }),
        ("indirect-len-odd", |m, _| {
            table(m, &[(m.buf, 16, F_NEXT, 1), (m.buf + 16, 16, F_WRITE, 0)]);
            alloc::vec![(m.buf + 0x800, 17, F_INDIRECT, 0)]
        }),
        ("indirect-len-huge", |m, _| {
            table(m, &[(m.buf, 16, 0, 0)]);
            alloc::vec![(m.buf + 0x800, 0xffff_fff0, F_INDIRECT, 0)]
        }),
        ("indirect-nested", |m, _| {
            table(m, &[(m.buf + 0xc00, 32, F_INDIRECT, 0)]);
            alloc::vec![(m.buf + 0x800, 16, F_INDIRECT, 0)]
        }),
        ("indirect-with-next", |m, _| {
            table(m, &[(m.buf, 16, F_WRITE, 0)]);
            alloc::vec![
                (m.buf + 0x800, 16, F_INDIRECT | F_NEXT, 1),
                (m.buf + 64, 16, F_WRITE, 0)
            ]
        }),
        ("indirect-loop", |m, _| {
            table(m, &[(m.buf, 16, F_NEXT, 1), (m.buf + 16, 16, F_NEXT, 0)]);
            alloc::vec![(m.buf + 0x800, 32, F_INDIRECT, 0)]
        }),
        ("indirect-next-out-of-table", |m, _| {
            table(m, &[(m.buf, 16, F_NEXT, 5), (m.buf + 16, 16, F_WRITE, 0)]);
            alloc::vec![(m.buf + 0x800, 32, F_INDIRECT, 0)]
        }),
        ("indirect-entry-outside-ram", |m, _| {
            table(m, &[(m.buf, 16, F_NEXT, 1), (OUTSIDE, 4096, F_WRITE, 0)]);
            alloc::vec![(m.buf + 0x800, 32, F_INDIRECT, 0)]
        }),
    ]
}

/// Writes an indirect table at `buf + 0x800`.
fn table(m: &Mem, entries: &[(u64, u32, u16, u16)]) {
    for (i, &(a, l, f, n)) in entries.iter().enumerate() {
        let d = m.buf + 0x800 + 16 * i as u64;
        w64(d, a);
        w32(d + 8, l);
        w16(d + 12, f);
        w16(d + 14, n);
    }
}

struct Ctx {
    bar: u64,
    ram_end: u64,
    scratch: u64,
}

/// Waits `ms` for used entries on the first `n` queues, and while there are none yet (a host
/// under load, a snapshot taken meanwhile) up to `SLOW_MS` more; returns (used entries, the
/// largest length reported, whether NEEDS_RESET was set).
fn outcome(d: &Dev, p: &Pool, n: u16, ms: u32) -> (u16, u32, bool) {
    const SLOW_MS: u32 = 2000;
    let any_used = || p.q[..n as usize].iter().any(|m| r16(m.used() + 2) != 0);
    let mut used = 0;
    let mut max_len = 0;
    for t in 1..=ms + SLOW_MS {
        smp::delay_us(1000);
        if d.l.status() & NEEDS_RESET != 0 || (t >= ms && any_used()) {
            break;
        }
    }
    for m in &p.q[..n as usize] {
        let idx = r16(m.used() + 2);
        used += idx;
        for e in 0..idx.min(QSIZE) {
            max_len = max_len.max(r32(m.used() + 4 + 8 * u64::from(e) + 4));
        }
    }
    (used, max_len, d.l.status() & NEEDS_RESET != 0)
}

/// Ring placements no driver may make, on queue 0 (the others valid), then every queue kicked.
fn ring_cases(d: &Dev, p: &Pool, ram_end: u64) {
    let bar = d.l.bar;
    let max = {
        w16(d.l.common + 0x16, 0);
        r16(d.l.common + 0x18)
    };
    let r0 = p.q[0].ring;
    let cases: [(&str, Rings); 10] = [
        ("ring-in-own-bar", (QSIZE, bar, bar + 0x100, bar + 0x1000)),
        (
            "ring-outside-ram",
            (QSIZE, OUTSIDE, OUTSIDE + 0x100, OUTSIDE + 0x1000),
        ),
        (
            "ring-across-ram-end",
            (QSIZE, ram_end - 64, ram_end - 16, ram_end - 8),
        ),
        ("ring-unaligned", (QSIZE, r0 + 1, r0 + 0x101, r0 + 0x1001)),
        ("ring-overlapping", (QSIZE, r0, r0, r0)),
        (
            "ring-wraps",
            (QSIZE, u64::MAX - 0x40, u64::MAX - 0x20, u64::MAX - 8),
        ),
        (
            "ring-in-lapic",
            (QSIZE, 0xfee0_0000, 0xfee0_0100, 0xfee0_1000),
        ),
        ("ring-size-zero", (0, r0, r0 + 0x100, r0 + 0x1000)),
        ("ring-size-not-power-of-2", (7, r0, r0 + 0x100, r0 + 0x1000)),
        (
            "ring-size-over-max",
            (max.wrapping_mul(2).max(0x8000), r0, r0 + 0x100, r0 + 0x1000),
        ),
    ];
    for (case, rings) in cases {
        fill(CANARY, CANARY_LEN, 0x5a);
        let (st, enabled) = d.start_with(|i| {
            let m = p.q[i as usize];
            Some(if i == 0 {
                rings
            } else {
                (QSIZE, m.desc(), m.avail(), m.used())
            })
        });
        for i in 0..d.queues() {
            d.notify(i);
        }
        smp::delay_us(5000);
        let after = d.l.status();
        let canary = (CANARY..CANARY + CANARY_LEN).all(|a| r8(a) == 0x5a);
        // Rings overlapping each other are odd but addressable; every other placement must
        // break the device (NEEDS_RESET) at DRIVER_OK.
        let broken = after & NEEDS_RESET != 0 || case == "ring-overlapping";
        check!(
            &alloc::format!("hostile-{}-{case}", d.name),
            canary && broken,
            "memory at {CANARY:#x} intact: {canary}, status {after:#x}"
        );
        println!(
            "INFO hostile {} {case}: status {st:#x} -> {after:#x}, {enabled} queues enabled",
            d.name
        );
    }
}

/// The malformed chains, each on every queue at once.
fn chain_abuse(d: &Dev, p: &Pool, ram_end: u64) {
    let ctx = Ctx {
        bar: d.l.bar,
        ram_end,
        scratch: p.scratch,
    };
    let n = d.queues();
    for (case, build) in chain_cases() {
        fill(CANARY, CANARY_LEN, 0x5a);
        let (st, _) = d.start_valid(p);
        if st & 8 == 0 {
            fail(
                &alloc::format!("hostile-{}-{case}", d.name),
                format_args!("the device refused VERSION_1: status {st:#x}"),
            );
            return;
        }
        for m in &p.q[..n as usize] {
            // 0xff everywhere: a request type no device knows, page frame numbers beyond RAM.
            fill(m.buf, 0x1000, 0xff);
            for (i, &(a, l, f, next)) in build(m, &ctx).iter().enumerate() {
                m.set_desc(i as u16, a, l, f, next);
            }
            publish(m, 0, 0);
        }
        for i in 0..n {
            d.notify(i);
        }
        let (used, max_len, broken) = outcome(d, p, n, 20);
        let canary = (CANARY..CANARY + CANARY_LEN).all(|a| r8(a) == 0x5a);
        // What a device may write: the queue's buffer page (and, for the huge lengths,
        // the 64 KiB scratch area) at the very most.
        // The device fails the request (a used entry on a queue it serves on notification)
        // or breaks (NEEDS_RESET).
        let answered = used > 0 || broken;
        check!(
            &alloc::format!("hostile-{}-{case}", d.name),
            canary && max_len <= 0x1_0000 && answered,
            "canary intact: {canary}, largest used length {max_len:#x}, used={used} needs_reset={broken}"
        );
        println!(
            "INFO hostile {} {case}: used={used} needs_reset={broken}",
            d.name
        );
    }
    // A head index beyond the queue and an available index far ahead of the ring.
    for (case, head, bump) in [
        ("avail-head-out-of-range", 0xffff, 0),
        ("avail-idx-far-ahead", 0, 100),
    ] {
        d.start_valid(p);
        for m in &p.q[..n as usize] {
            fill(m.buf, 0x1000, 0xff);
            m.set_desc(0, m.buf, 16, F_WRITE, 0);
            publish(m, 0, head);
            if bump != 0 {
                w16(m.avail() + 2, bump);
            }
        }
        for i in 0..n {
            d.notify(i);
        }
        let (used, _, broken) = outcome(d, p, n, 50);
        // A vhost-user backend cannot say NEEDS_RESET: it must serve nothing instead.
        check!(
            &alloc::format!("hostile-{}-{case}", d.name),
            broken || (d.vhost_user && used == 0),
            "no NEEDS_RESET (used={used}, vhost-user: {})",
            d.vhost_user
        );
        println!(
            "INFO hostile {} {case}: used={used} needs_reset={broken}",
            d.name
        );
    }
}

/// Every virtio function: ring placements, malformed chains, then a clean restart.
pub(crate) fn run(devs: &[Dev], p: &Pool, ram_end: u64) {
    for d in devs {
        println!(
            "INFO hostile {} at {} bar={:#x} queues={} features={:#x}{}",
            d.name,
            d.df,
            d.l.bar,
            d.nq,
            d.l.device_features(),
            if d.vhost_user { " vhost-user" } else { "" }
        );
        ring_cases(d, p, ram_end);
        chain_abuse(d, p, ram_end);
        let (st, enabled) = d.start_valid(p);
        check!(
            &alloc::format!("hostile-{}-restarts", d.name),
            st == 0xf && enabled == d.queues(),
            "status {st:#x}, {enabled} of {} queues enabled",
            d.queues()
        );
        d.reset();
    }
    // Config space of each function still as the VMM made it.
    let cam = ecam();
    for d in devs {
        let id = cam.read_word(d.df, 0);
        check!(
            &alloc::format!("hostile-{}-config-intact", d.name),
            id & 0xffff == 0x1af4,
            "vendor/device {id:#x}"
        );
    }
}
