//! `test=balloon`: a virtio-balloon driver (virtio 1.2, 5.5) on `virtio-drivers`' PCI transport
//! and its `VirtQueue` (the crate has no balloon driver). The guest fills `touch=<MiB>` of RAM
//! with a pattern (so the host backs it), then follows the host's target (`num_pages`) for ever:
//! it inflates with pages of that area (the host releases them) and deflates (it takes them back,
//! writes them again and checks they read back), and writes `actual`.
//!
//! The pages it may give away form a pool: the RAM of the memory map's region from 32 MiB (above
//! the DMA arena at 16-32 MiB, so never the image, its heap and stacks, the page tables or DMA
//! buffers) up to the region's end or 4 GiB. Pool page i is `touched_end - (i + 1) * 4 KiB` for
//! i below the touched pages (the touched area from its top down), then `touched_end + (i -
//! touched) * 4 KiB`; the balloon always holds pool pages `[0, actual)`, so inflating adds pages
//! `actual..` and deflating gives back the last ones added.

use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};

use crate::bootinfo::BootInfo;
use crate::rawq::{r16, w16, w32, Layout, VERSION_1};
use crate::virtio::{dma_pages, ecam, root, transport, GuestHal};
use crate::{fail, parse_u64, pass, println, smp, svc};

/// The vector the configuration changes (a new target) are sent on.
const CONFIG_VECTOR: u32 = svc::IRQ_VECTOR + 2;
const PAGE: u64 = 4096;
/// The pool starts here (the DMA arena ends here).
const POOL_START: u64 = 0x200_0000;
/// PFNs in one descriptor (as Linux's driver batches them).
const PFNS_PER_DESC: usize = 256;
/// Descriptors in flight at a time (the queues' size).
const QSIZE: usize = 16;
/// Pages moved per round: one notification, then the device uses all the descriptors.
const ROUND: u32 = (PFNS_PER_DESC * QSIZE) as u32;
const INFLATEQ: u16 = 0;
const DEFLATEQ: u16 = 1;
const NO_VECTOR: u16 = 0xffff;

/// The 8-byte word that belongs at guest physical `a` while the guest owns the page.
fn pattern(a: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xba11_0000
}

/// Fills the page at `a` with its pattern.
fn fill(a: u64) {
    for w in (a..a + PAGE).step_by(8) {
        // SAFETY: a pool page the guest owns (identity-mapped RAM nothing else uses).
        unsafe { write_volatile(w as *mut u64, pattern(w)) };
    }
}

/// Whether the page at `a` holds its pattern in its first and last words (and returns the first
/// bad word's address and value otherwise).
fn holds_pattern(a: u64) -> Result<(), (u64, u64)> {
    for w in [a, a + PAGE / 2, a + PAGE - 8] {
        // SAFETY: as in `fill`.
        let v = unsafe { read_volatile(w as *const u64) };
        if v != pattern(w) {
            return Err((w, v));
        }
    }
    Ok(())
}

/// The balloon function (virtio device type 5: PCI device 0x1045, or the transitional 0x1002).
fn find_balloon() -> Option<DeviceFunction> {
    root()
        .enumerate_bus(0)
        .find(|(_, info)| info.vendor_id == 0x1af4 && matches!(info.device_id, 0x1045 | 0x1002))
        .map(|(df, _)| df)
}

struct Balloon {
    t: PciTransport,
    inflate: VirtQueue<GuestHal, QSIZE>,
    deflate: VirtQueue<GuestHal, QSIZE>,
    /// DMA buffer of `ROUND` PFNs (le32).
    pfns: u64,
    /// Pool: its pages, and how many of them the touch filled.
    touched_end: u64,
    touched: u32,
    pool: u32,
    /// Pool pages in the balloon.
    actual: u32,
    /// Pool pages `[actual, filled)` hold the pattern.
    filled: u32,
    /// Bad pages found (each printed once at most per kind and round).
    bad: u64,
}

impl Balloon {
    fn page(&self, i: u32) -> u64 {
        if i < self.touched {
            self.touched_end - (u64::from(i) + 1) * PAGE
        } else {
            self.touched_end + u64::from(i - self.touched) * PAGE
        }
    }

    /// The host's target, in pages.
    fn num_pages(&self) -> u32 {
        self.t.read_config_space::<u32>(0).unwrap_or(0)
    }

    fn write_actual(&mut self) {
        let _ = self.t.write_config_space::<u32>(4, self.actual);
    }

    /// Moves `n` pages (at most `ROUND`) into the balloon (`inflate`) or out of it: the PFNs go
    /// to the device in descriptors of `PFNS_PER_DESC`, all in flight together, and the device
    /// must use them all (5 s at most). Then `actual` changes and is written.
    fn round(&mut self, inflate: bool, n: u32) -> Result<(), alloc::string::String> {
        let first = if inflate {
            self.actual
        } else {
            self.actual - n
        };
        if inflate {
            // Pages the guest still owns must hold what it wrote there.
            for i in first..(first + n).min(self.filled) {
                if let Err((w, v)) = holds_pattern(self.page(i)) {
                    self.bad += 1;
                    fail(
                        "balloon-guest-pages",
                        format_args!("before inflating: {w:#x} holds {v:#x}"),
                    );
                    break;
                }
            }
        }
        for k in 0..n {
            let pfn = (self.page(first + k) / PAGE) as u32;
            w32(self.pfns + 4 * u64::from(k), pfn);
        }
        let q = if inflate {
            &mut self.inflate
        } else {
            &mut self.deflate
        };
        let qi = if inflate { INFLATEQ } else { DEFLATEQ };
        let descs = (n as usize).div_ceil(PFNS_PER_DESC);
        let mut tokens = [0u16; QSIZE];
        for (d, token) in tokens.iter_mut().enumerate().take(descs) {
            let len = 4 * (n as usize - d * PFNS_PER_DESC).min(PFNS_PER_DESC);
            let at = self.pfns + (4 * d * PFNS_PER_DESC) as u64;
            // SAFETY: the PFN buffer is DMA memory of ours, left alone until it is popped.
            let buf = unsafe { core::slice::from_raw_parts(at as *const u8, len) };
            // SAFETY: as above: the buffer stays valid and untouched until `pop_used`.
            *token = unsafe { q.add(&[buf], &mut []) }.map_err(|e| alloc::format!("add: {e}"))?;
        }
        if q.should_notify() {
            self.t.notify(qi);
        }
        let deadline = svc::rdtsc() + 5_000_000 * smp::TSC_PER_US;
        for (d, &token) in tokens.iter().enumerate().take(descs) {
            while !q.can_pop() {
                if svc::rdtsc() > deadline {
                    return Err(alloc::format!(
                        "queue {qi}: {} of {descs} descriptors used after 5 s",
                        d
                    ));
                }
                smp::delay_us(5);
            }
            let len = 4 * (n as usize - d * PFNS_PER_DESC).min(PFNS_PER_DESC);
            let at = self.pfns + (4 * d * PFNS_PER_DESC) as u64;
            // SAFETY: the buffer added with this token above.
            let buf = unsafe { core::slice::from_raw_parts(at as *const u8, len) };
            // SAFETY: the same buffer as was added with `token`.
            unsafe { q.pop_used(token, &[buf], &mut []) }
                .map_err(|e| alloc::format!("queue {qi}: pop: {e}"))?;
        }
        if inflate {
            self.actual += n;
        } else {
            self.actual -= n;
            // The pages are the guest's again: write them and read them back.
            let mut bad = 0u32;
            let mut first_bad = None;
            for i in first..first + n {
                let a = self.page(i);
                fill(a);
                if let Err(e) = holds_pattern(a) {
                    bad += 1;
                    first_bad.get_or_insert(e);
                }
            }
            if let Some((w, v)) = first_bad {
                self.bad += 1;
                fail(
                    "balloon-deflate-reuse",
                    format_args!("{bad} pages: {w:#x} reads {v:#x} after the write"),
                );
            }
            self.filled = self.filled.max(first + n);
        }
        self.write_actual();
        Ok(())
    }

    /// All the pool pages the guest owns and filled still hold the pattern.
    fn check_owned(&mut self) {
        let mut bad = 0u32;
        let mut first_bad = None;
        for i in self.actual..self.filled {
            if let Err(e) = holds_pattern(self.page(i)) {
                bad += 1;
                first_bad.get_or_insert(e);
            }
        }
        if let Some((w, v)) = first_bad {
            self.bad += 1;
            fail(
                "balloon-guest-pages",
                format_args!("{bad} pages the guest kept changed: {w:#x} holds {v:#x}"),
            );
        }
    }
}

/// Sets up MSI-X entry 0 for configuration changes (queues: no vector) and enables MSI-X.
/// Returns whether the device took the vector.
fn config_interrupt(df: DeviceFunction, l: &Layout) -> bool {
    let Some(cap) = root()
        .capabilities(df)
        .find(|c| c.id == 0x11)
        .map(|c| c.offset)
    else {
        return false;
    };
    let mut cam = ecam();
    let table = l.bar + u64::from(cam.read_word(df, cap + 4) & !7);
    let apic = svc::lapic_enable();
    w32(table, 0xfee0_0000 | apic << 12);
    w32(table + 4, 0);
    w32(table + 8, CONFIG_VECTOR);
    w32(table + 12, 0);
    for q in [INFLATEQ, DEFLATEQ] {
        w16(l.common + 0x16, q);
        w16(l.common + 0x1a, NO_VECTOR);
    }
    w16(l.common + 0x10, 0);
    cam.write_word(df, cap, 0x8000 << 16);
    r16(l.common + 0x10) == 0
}

/// Brings the device up: VERSION_1 only, the inflate and deflate queues, the configuration
/// interrupt. (REPORTING, when offered, is not taken: the driver never reports free pages.)
fn start(df: DeviceFunction) -> Result<Started, alloc::string::String> {
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let l = Layout::find(df).ok_or("no virtio structures")?;
    let mut t = transport(df).ok_or("no PCI transport")?;
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.read_device_features();
    if offered & VERSION_1 == 0 {
        return Err(alloc::format!("VERSION_1 not offered ({offered:#x})"));
    }
    t.write_driver_features(VERSION_1);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
        return Err("FEATURES_OK refused".into());
    }
    let inflate = VirtQueue::new(&mut t, INFLATEQ, false, false)
        .map_err(|e| alloc::format!("inflate queue: {e}"))?;
    let deflate = VirtQueue::new(&mut t, DEFLATEQ, false, false)
        .map_err(|e| alloc::format!("deflate queue: {e}"))?;
    let irq = config_interrupt(df, &l);
    t.finish_init();
    println!("INFO balloon {df} offered={offered:#x} negotiated={VERSION_1:#x} config_irq={irq}");
    Ok((t, irq, inflate, deflate))
}

/// The transport, whether the configuration interrupt is set up, the inflate and deflate queues.
type Started = (
    PciTransport,
    bool,
    VirtQueue<GuestHal, QSIZE>,
    VirtQueue<GuestHal, QSIZE>,
);

/// `test=balloon`: see the module's documentation and docs/test-guest.md.
pub fn scenario_balloon(boot: &BootInfo) {
    let Some(df) = find_balloon() else {
        fail(
            "balloon-present",
            format_args!("no virtio-balloon function"),
        );
        return;
    };
    // The pool: the RAM region from POOL_START up, below 4 GiB.
    let Some(region) = boot
        .memmap
        .iter()
        .find(|r| r.kind == 1 && r.addr <= POOL_START && POOL_START < r.addr + r.size)
    else {
        fail("balloon-pool", format_args!("no RAM at {POOL_START:#x}"));
        return;
    };
    let pool_end = (region.addr + region.size).min(1 << 32) & !(PAGE - 1);
    let pool = ((pool_end - POOL_START) / PAGE) as u32;
    let touch_mib = boot.arg("touch").and_then(parse_u64).unwrap_or(0);
    let touched = (touch_mib << 20) / PAGE;
    if touched > u64::from(pool) {
        fail(
            "balloon-pool",
            format_args!("touch={touch_mib} MiB, but the pool has {pool} pages"),
        );
        return;
    }
    let touched = touched as u32;
    let (t, irq, inflate, deflate) = match start(df) {
        Ok(x) => x,
        Err(e) => {
            fail("balloon-init", format_args!("{e}"));
            return;
        }
    };
    pass("balloon-init");
    let touched_end = POOL_START + u64::from(touched) * PAGE;
    println!(
        "INFO balloon pool={POOL_START:#x}+{:#x} pages={pool} touched={touched}",
        pool_end - POOL_START
    );
    for a in (POOL_START..touched_end).step_by(PAGE as usize) {
        fill(a);
    }
    println!("BALLOON TOUCHED mib={touch_mib}");
    let mut b = Balloon {
        t,
        inflate,
        deflate,
        pfns: dma_pages(ROUND as usize * 4 / PAGE as usize),
        touched_end,
        touched,
        pool,
        actual: 0,
        filled: touched,
        bad: 0,
    };
    b.write_actual();
    println!("READY");
    let mut seen = svc::irq_count(CONFIG_VECTOR);
    let mut shown: Option<(u32, u32)> = None;
    let mut shown_irqs = seen;
    loop {
        let target = b.num_pages();
        let want = target.min(b.pool);
        if b.actual != want {
            let inflate = want > b.actual;
            let n = want.abs_diff(b.actual).min(ROUND);
            if let Err(e) = b.round(inflate, n) {
                fail("balloon-queue", format_args!("{e}"));
                return;
            }
            continue;
        }
        let changed = shown != Some((b.actual, target));
        if changed {
            b.check_owned();
            if target > b.pool {
                println!(
                    "INFO balloon target {target} is beyond the pool ({} pages)",
                    b.pool
                );
            }
        }
        // Also when only an interrupt came (on a loaded host it may come after the guest
        // found the new target by polling and reached it).
        let irqs = svc::irq_count(CONFIG_VECTOR);
        if changed || irqs != shown_irqs {
            println!(
                "INFO balloon config_irqs={irqs} filled={} bad={}",
                b.filled, b.bad
            );
            shown_irqs = irqs;
        }
        if changed {
            println!("BALLOON actual={} target={target}", b.actual);
            shown = Some((b.actual, target));
        }
        // A new target interrupts (or, without the vector, is found within 50 ms).
        seen = if irq {
            svc::wait_vector(CONFIG_VECTOR, seen + 1, 50)
        } else {
            smp::delay_us(50_000);
            seen
        };
    }
}
