//! The event queue (2). The device sends one event, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio
//! 1.2, 5.10.6.6), once after a restore or a migration: the connections the driver knew of are
//! gone (they lived in the old process's sockets) and it must read the guest CID again. The
//! event waits until the driver has a buffer on the event queue for it.

use guest_memory::GuestMemoryMmap;
use log::{debug, info};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use crate::vring::VirtQueue;

/// The event queue's index.
pub const EVENT: usize = 2;
/// `struct virtio_vsock_event { le32 id; }`: the transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
const EVENT_LEN: u32 = 4;

/// What `deliver_reset` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// The event is in a used buffer.
    pub delivered: bool,
    /// The queue got used buffers (the driver should be signalled).
    pub used: bool,
}

/// Puts the transport reset event in the driver's next event buffer. Not delivered when no
/// buffer is there yet: it is tried again on the driver's next notification. A buffer too small
/// for the event, or not writable guest RAM, is given back with length 0 and the next one is
/// tried (at most a ring's worth per call, so a hostile driver cannot keep the worker here).
pub fn deliver_reset(q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<Delivery, String> {
    let mut descs = Vec::new();
    let mut done = Delivery::default();
    for _ in 0..=q.queue().size() {
        let head = match q.pop_one()? {
            Some(h) => h,
            None if q.enable_notification()? => continue,
            None => return Ok(done),
        };
        q.chain(head, &mut descs);
        let written = descs
            .iter()
            .find(|d| d.is_write_only() && d.len() >= EVENT_LEN)
            .and_then(|d| {
                mem.write_slice(
                    &EVENT_TRANSPORT_RESET.to_le_bytes(),
                    GuestAddress(d.addr().0),
                )
                .ok()
            })
            .is_some();
        if written {
            q.add_used(head, EVENT_LEN)?;
            info!("virtio-vsock: transport reset event sent to the guest");
            return Ok(Delivery {
                delivered: true,
                used: true,
            });
        }
        debug!("virtio-vsock: event buffer without 4 writable bytes skipped");
        q.add_used(head, 0)?;
        done.used = true;
    }
    Ok(done)
}
