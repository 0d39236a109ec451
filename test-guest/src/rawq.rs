//! A virtio-pci driver by hand, for what `virtio-drivers` does not do: malformed descriptor
//! chains (`hostile`), queues without EVENT_IDX for the MSI-X checks (`msix`), and queues other
//! than the first (the `blk` multiqueue checks). The structures are found through the
//! function's virtio capabilities, as any driver must find them.

use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::transport::pci::bus::{BarInfo, ConfigurationAccess, DeviceFunction};

use crate::virtio::{dma_pages, ecam, root};
use crate::{fail, smp};

/// Entries per queue.
pub(crate) const QSIZE: u16 = 8;
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const VERSION_1: u64 = 1 << 32;

pub(crate) fn w8(a: u64, v: u8) {
    // SAFETY: identity-mapped RAM (a DMA page) or MMIO of our own devices; the hostile suite
    // also aims them at what it attacks, always inside the identity map.
    unsafe { write_volatile(a as *mut u8, v) }
}
pub(crate) fn w16(a: u64, v: u16) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u16, v) }
}
pub(crate) fn w32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
pub(crate) fn w64(a: u64, v: u64) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u64, v) }
}
pub(crate) fn r8(a: u64) -> u8 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u8) }
}
pub(crate) fn r16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u16) }
}
pub(crate) fn r32(a: u64) -> u32 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u32) }
}

/// Where a virtio function's structures are, from its vendor capabilities (in BAR 0).
pub(crate) struct Layout {
    pub(crate) bar: u64,
    /// Common configuration.
    pub(crate) common: u64,
    pub(crate) notify: u64,
    pub(crate) notify_mult: u32,
    /// Device-specific configuration.
    pub(crate) device: u64,
}

impl Layout {
    pub(crate) fn find(df: DeviceFunction) -> Option<Layout> {
        Self::find_with(df, true)
    }

    /// `find` for a device that may have no device-specific configuration (virtio-rtc: the
    /// original offers no such structure for it); `device` is 0 when there is none.
    pub(crate) fn find_no_config(df: DeviceFunction) -> Option<Layout> {
        Self::find_with(df, false)
    }

    fn find_with(df: DeviceFunction, config: bool) -> Option<Layout> {
        let mut r = root();
        let bar = match r.bar_info(df, 0) {
            Ok(Some(BarInfo::Memory { address, .. })) => address,
            other => {
                fail("virtio-bar", format_args!("{df}: {other:?}"));
                return None;
            }
        };
        let cam = ecam();
        let (mut common, mut notify, mut device) = (None, None, None);
        for c in r.capabilities(df) {
            if c.id != 0x09 || cam.read_word(df, c.offset + 4) & 0xff != 0 {
                continue;
            }
            let at = bar + u64::from(cam.read_word(df, c.offset + 8));
            match (c.private_header >> 8) & 0xff {
                1 => common = Some(at),
                2 => notify = Some((at, cam.read_word(df, c.offset + 16))),
                4 => device = Some(at),
                _ => {}
            }
        }
        let device = device.or((!config).then_some(0));
        let (Some(common), Some((notify, notify_mult)), Some(device)) = (common, notify, device)
        else {
            fail("virtio-caps", format_args!("{df}: a structure is missing"));
            return None;
        };
        Some(Layout {
            bar,
            common,
            notify,
            notify_mult,
            device,
        })
    }

    pub(crate) fn status(&self) -> u8 {
        r8(self.common + 0x14)
    }

    pub(crate) fn set_status(&self, s: u8) {
        w8(self.common + 0x14, s)
    }

    /// What the device offers.
    pub(crate) fn device_features(&self) -> u64 {
        w32(self.common, 0);
        let lo = r32(self.common + 0x04);
        w32(self.common, 1);
        u64::from(r32(self.common + 0x04)) << 32 | u64::from(lo)
    }

    /// Resets the device, negotiates `features`, sets up the queues numbered in `queues`
    /// (`QSIZE` entries each, no MSI-X) and starts the device. `None`, after a `fail` line
    /// named `name`, if the device refuses.
    pub(crate) fn start(&self, name: &str, features: u64, queues: &[u16]) -> Option<Vec<RawQueue>> {
        self.set_status(0);
        self.set_status(1 | 2);
        for half in 0..2 {
            w32(self.common + 0x08, half);
            w32(self.common + 0x0c, (features >> (32 * half)) as u32);
        }
        self.set_status(1 | 2 | 8);
        if self.status() & 8 == 0 {
            fail(name, format_args!("FEATURES_OK refused for {features:#x}"));
            return None;
        }
        let mut out = Vec::new();
        for &index in queues {
            w16(self.common + 0x16, index);
            let max = r16(self.common + 0x18);
            if max < QSIZE {
                fail(name, format_args!("queue {index}: size {max}"));
                return None;
            }
            let ring = dma_pages(2);
            let q = RawQueue {
                index,
                notify: self.notify
                    + u64::from(r16(self.common + 0x1e)) * u64::from(self.notify_mult),
                desc: ring,
                avail: ring + 0x100,
                used: ring + 0x1000,
                buf: dma_pages(1),
                next_avail: 0,
                last_used: 0,
            };
            w16(self.common + 0x18, QSIZE);
            w64(self.common + 0x20, q.desc);
            w64(self.common + 0x28, q.avail);
            w64(self.common + 0x30, q.used);
            w16(self.common + 0x1c, 1);
            out.push(q);
        }
        self.set_status(1 | 2 | 8 | 4);
        Some(out)
    }

    /// `start` with VERSION_1 only (so no EVENT_IDX: every used buffer interrupts) and queue 0.
    pub(crate) fn start_queue0(&self, name: &str) -> Option<RawQueue> {
        self.start(name, VERSION_1, &[0])?.pop()
    }
}

/// One split virtqueue of `QSIZE` entries, driven by hand, with a page of DMA memory (`buf`).
pub(crate) struct RawQueue {
    index: u16,
    notify: u64,
    desc: u64,
    avail: u64,
    used: u64,
    pub(crate) buf: u64,
    pub(crate) next_avail: u16,
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

    /// Publishes the available index as it stands (`next_avail`) and notifies the device.
    pub(crate) fn kick(&self) {
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        w16(self.avail + 2, self.next_avail);
        w16(self.notify, self.index);
    }

    /// Publishes `head` and notifies the device.
    pub(crate) fn publish(&mut self, head: u16) {
        w16(
            self.avail + 4 + 2 * u64::from(self.next_avail % QSIZE),
            head,
        );
        self.next_avail = self.next_avail.wrapping_add(1);
        self.kick();
    }

    /// Waits (`ms` at most) for the next used entry: (head, length written).
    pub(crate) fn wait_used(&mut self, ms: u32) -> Option<(u32, u32)> {
        for _ in 0..2 * ms {
            if let Some(u) = self.poll_used() {
                return Some(u);
            }
            smp::delay_us(500);
        }
        None
    }

    /// The next used entry if there is one now: (head, length written).
    pub(crate) fn poll_used(&mut self) -> Option<(u32, u32)> {
        if r16(self.used + 2) == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        Some((r32(e), r32(e + 4)))
    }

    /// Publishes `head`, notifies, waits (1 s at most) for a used entry. Returns whether one
    /// came.
    pub(crate) fn submit(&mut self, head: u16) -> bool {
        self.publish(head);
        self.wait_used(1000).is_some()
    }
}
