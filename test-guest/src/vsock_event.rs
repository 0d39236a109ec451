//! The vsock event queue (2), which `virtio-drivers` sets up and never uses: this module takes
//! it over by hand (the ring addresses the driver gave the device, read back from the common
//! configuration), posts one event buffer and polls for the device's events. The device sends
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0) after a restore or a migration (virtio 1.2,
//! 5.10.6.6): the driver's connections are gone and the guest CID must be read again.

use virtio_drivers::transport::pci::bus::DeviceFunction;

use crate::rawq::{r16, r32, w16, w32, w64, Layout, F_WRITE};
use crate::virtio::dma_pages;

const EVENT_QUEUE: u16 = 2;
/// The event id of a transport reset.
pub const TRANSPORT_RESET: u32 = 0;

pub struct EventQueue {
    layout: Layout,
    size: u16,
    notify: u64,
    desc: u64,
    avail: u64,
    used: u64,
    buf: u64,
    next_avail: u16,
    last_used: u16,
}

impl EventQueue {
    /// The event queue of the (started) vsock function `df`, as its driver set it up.
    pub fn adopt(df: DeviceFunction) -> Option<EventQueue> {
        let layout = Layout::find(df)?;
        let c = layout.common;
        w16(c + 0x16, EVENT_QUEUE);
        let size = r16(c + 0x18);
        let rd64 = |o: u64| u64::from(r32(c + o)) | u64::from(r32(c + o + 4)) << 32;
        let (desc, avail, used) = (rd64(0x20), rd64(0x28), rd64(0x30));
        let notify = layout.notify + u64::from(r16(c + 0x1e)) * u64::from(layout.notify_mult);
        if size == 0 || r16(c + 0x1c) != 1 {
            crate::fail("vsock-event-queue", format_args!("queue 2 not enabled"));
            return None;
        }
        Some(EventQueue {
            layout,
            size,
            notify,
            desc,
            avail,
            used,
            buf: dma_pages(1),
            // The driver never made a buffer available there.
            next_avail: r16(avail + 2),
            last_used: r16(used + 2),
        })
    }

    /// Makes the event buffer (descriptor 0, 8 writable bytes, filled with 0xff) available.
    pub fn post(&mut self) {
        w32(self.buf, u32::MAX);
        w32(self.buf + 4, u32::MAX);
        w64(self.desc, self.buf);
        w32(self.desc + 8, 8);
        w16(self.desc + 12, F_WRITE);
        w16(self.desc + 14, 0);
        w16(
            self.avail + 4 + 2 * u64::from(self.next_avail % self.size),
            0,
        );
        self.next_avail = self.next_avail.wrapping_add(1);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        w16(self.avail + 2, self.next_avail);
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        w16(self.notify, EVENT_QUEUE);
    }

    /// The next event, if the device sent one: (its id, the length the device wrote).
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        if r16(self.used + 2) == self.last_used {
            return None;
        }
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        self.last_used = self.last_used.wrapping_add(1);
        Some((r32(self.buf), r32(e + 4)))
    }

    /// The guest CID, read again from the device's configuration.
    pub fn guest_cid(&self) -> u64 {
        u64::from(r32(self.layout.device)) | u64::from(r32(self.layout.device + 4)) << 32
    }
}
