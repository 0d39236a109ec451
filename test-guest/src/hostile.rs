//! `test=hostile`: drives a virtio-blk queue by hand with malformed descriptor chains. The VMM
//! must fail each request (or mark the device NEEDS_RESET), keep running, and keep serving the
//! other devices.

use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::pci::bus::BarInfo;
use virtio_drivers::transport::DeviceType;

use crate::virtio::{dma_pages, find, root, transport, GuestHal};
use crate::{check, fail, pass, smp};

const QSIZE: u16 = 8;
const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;

fn w8(a: u64, v: u8) {
    // SAFETY: identity-mapped MMIO/RAM address of our own device or DMA page.
    unsafe { write_volatile(a as *mut u8, v) }
}
fn w16(a: u64, v: u16) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u16, v) }
}
fn w32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
fn w64(a: u64, v: u64) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u64, v) }
}
fn r8(a: u64) -> u8 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u8) }
}
fn r16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u16) }
}

/// A data descriptor: address, length, flags.
type Buf = (u64, u32, u16);

pub(crate) struct RawQueue {
    bar: u64,
    desc: u64,
    avail: u64,
    used: u64,
    pub(crate) buf: u64,
    next_avail: u16,
    last_used: u16,
}

impl RawQueue {
    pub(crate) fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i);
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }

    /// Publishes `head`, notifies, waits for a used entry. Returns whether one came.
    pub(crate) fn submit(&mut self, head: u16) -> bool {
        w16(
            self.avail + 4 + 2 * u64::from(self.next_avail % QSIZE),
            head,
        );
        self.next_avail = self.next_avail.wrapping_add(1);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        w16(self.avail + 2, self.next_avail);
        w16(self.bar + 0x3000, 0);
        for _ in 0..2000 {
            if r16(self.used + 2) != self.last_used {
                self.last_used = self.last_used.wrapping_add(1);
                return true;
            }
            smp::delay_us(500);
        }
        false
    }

    fn status(&self) -> u8 {
        r8(self.bar + 0x14)
    }
}

/// Resets the device at `bar` and sets up its queue 0 by hand (features: VERSION_1 only, so
/// no EVENT_IDX: every used buffer interrupts).
pub(crate) fn setup(bar: u64) -> Option<RawQueue> {
    w8(bar + 0x14, 0);
    w8(bar + 0x14, 1 | 2);
    w32(bar + 0x08, 1);
    w32(bar + 0x0c, 1); // VIRTIO_F_VERSION_1
    w32(bar + 0x08, 0);
    w32(bar + 0x0c, 0);
    w8(bar + 0x14, 1 | 2 | 8);
    if r8(bar + 0x14) & 8 == 0 {
        fail("hostile-setup", format_args!("FEATURES_OK refused"));
        return None;
    }
    let ring = dma_pages(2);
    let q = RawQueue {
        bar,
        desc: ring,
        avail: ring + 0x100,
        used: ring + 0x1000,
        buf: dma_pages(1),
        next_avail: 0,
        last_used: 0,
    };
    w16(bar + 0x16, 0);
    w16(bar + 0x18, QSIZE);
    w64(bar + 0x20, q.desc);
    w64(bar + 0x28, q.avail);
    w64(bar + 0x30, q.used);
    w16(bar + 0x1c, 1);
    w8(bar + 0x14, 1 | 2 | 8 | 4);
    Some(q)
}

pub fn scenario_hostile() {
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("hostile-blk", format_args!("no virtio-blk function"));
        return;
    };
    let bar = match root().bar_info(df, 0) {
        Ok(Some(BarInfo::Memory { address, .. })) => address,
        other => {
            fail("hostile-bar", format_args!("{other:?}"));
            return;
        }
    };
    let Some(mut q) = setup(bar) else { return };
    let (hdr, data, status) = (q.buf, q.buf + 0x200, q.buf + 0xfff);
    let header = |sector: u64| {
        w32(hdr, 0); // IN
        w32(hdr + 4, 0);
        w64(hdr + 8, sector);
        w8(status, 0xee);
    };
    // (name, data descriptor (addr, len, flags) or None, header flags, sector)
    let cases: [(&str, Option<Buf>, u16, u64); 6] = [
        (
            "hostile-addr-outside-ram",
            Some((0x7fff_ffff_0000, 512, F_WRITE)),
            0,
            0,
        ),
        ("hostile-readonly-data-for-in", Some((data, 512, 0)), 0, 0),
        ("hostile-writable-header", None, F_WRITE, 0),
        (
            "hostile-oversized",
            Some((data, 0x8000_0000, F_WRITE)),
            0,
            0,
        ),
        (
            "hostile-sector-beyond-end",
            Some((data, 512, F_WRITE)),
            0,
            u64::MAX / 512,
        ),
        (
            "hostile-addr-wraps",
            Some((u64::MAX - 100, 512, F_WRITE)),
            0,
            0,
        ),
    ];
    for (name, d, hflags, sector) in cases {
        header(sector);
        match d {
            Some((a, l, f)) => {
                q.set_desc(0, hdr, 16, hflags | F_NEXT, 1);
                q.set_desc(1, a, l, f | F_NEXT, 2);
                q.set_desc(2, status, 1, F_WRITE, 0);
            }
            None => {
                q.set_desc(0, hdr, 16, hflags | F_NEXT, 2);
                q.set_desc(2, status, 1, F_WRITE, 0);
            }
        }
        let answered = q.submit(0);
        let s = r8(status);
        check!(
            name,
            answered && s == 1,
            "answered={answered} status={s:#x}"
        );
    }
    // A chain longer than 4 GiB in total is cut before the status descriptor: the request is
    // dropped (completed without data), never served.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, u32::MAX, F_WRITE | F_NEXT, 2);
    q.set_desc(2, status, 1, F_WRITE, 0);
    let answered = q.submit(0);
    check!(
        "hostile-chain-over-4g",
        answered && r8(status) != 0,
        "answered={answered} status={:#x}",
        r8(status)
    );
    // Zero-length status descriptor: nothing to write the status into, still completed.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, status, 0, F_WRITE, 0);
    check!("hostile-zero-length-status", q.submit(0), "no used entry");
    // A descriptor loop: the chain is cut at the queue size.
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, 16, F_NEXT, 0);
    check!("hostile-descriptor-loop", q.submit(0), "no used entry");
    // MSI-X: function masked, entry 0 programmed, queue 0 routed to it. This driver did not
    // negotiate EVENT_IDX, so the next completion must raise vector 0: pending while masked.
    let msix = crate::virtio::msix_mask_and_route(df);
    // A well-formed read still works on the same queue.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, 512, F_WRITE | F_NEXT, 2);
    q.set_desc(2, status, 1, F_WRITE, 0);
    let ok = q.submit(0) && r8(status) == 0;
    check!("hostile-valid-after-bad", ok, "status {:#x}", r8(status));
    if let Some((bar, cap, pba)) = msix {
        let bits = crate::virtio::wait_pending_bit(bar, pba);
        check!("msix-pending-bit", bits & 1 == 1, "PBA {bits:#x}");
        crate::virtio::msix_disable(df, cap);
    }
    // An available index far beyond the queue size breaks the queue: NEEDS_RESET.
    q.next_avail = q.next_avail.wrapping_add(100);
    w16(q.avail + 2, q.next_avail);
    w16(q.bar + 0x3000, 0);
    let mut st = 0;
    for _ in 0..2000 {
        st = q.status();
        if st & 0x40 != 0 {
            break;
        }
        smp::delay_us(500);
    }
    check!("hostile-needs-reset", st & 0x40 != 0, "status {st:#x}");
    // Another device still works.
    crate::virtio::scenario_rng();
    // The broken disk recovers after a reset (virtio-drivers resets it first).
    if let Some(t) = transport(df) {
        match VirtIOBlk::<GuestHal, _>::new(t) {
            Ok(mut blk) => {
                let mut b = [0u8; 512];
                check!(
                    "hostile-recovered",
                    blk.read_blocks(0, &mut b).is_ok(),
                    "read failed"
                );
            }
            Err(e) => fail("hostile-recovered", format_args!("{e}")),
        }
    }
    pass("hostile-vmm-alive");
}
