//! One queue pair's data path: transmit chains are written to the pair's TAP queue with one
//! `writev` each (the virtio-net header goes with them: the TAP speaks the same 12-byte
//! header), frames read from the TAP go straight into a receive chain with one `readv`. The
//! guest is hostile: a chain that is too long, too short, of the wrong direction or outside
//! its RAM is completed with length 0 and dropped, never trusted.

use std::io;

use log::{debug, warn};
use net_util::{Tap, VNET_HDR_LEN};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringState;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap,
};

pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Guard = GuestMemoryLoadGuard<GuestMemoryMmap<BitmapMmapRegion>>;

/// A frame with its header, at most (64 KiB of GSO payload plus the Ethernet header).
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Most buffers one frame may be gathered from or scattered to.
const MAX_IOVECS: usize = 64;
/// Most frames per wake-up and direction, so that one direction cannot starve the other.
const BATCH: usize = 256;
/// `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFF: u64 = 10;

/// What a pass over a ring did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains were completed: the guest may want an interrupt.
    pub used: bool,
    /// The TAP would block (transmit) or is drained (receive).
    pub tap_blocked: bool,
    /// The ring ran out of chains (receive: no buffer for the next frame).
    pub ring_empty: bool,
    /// The batch limit stopped the pass: call again.
    pub more: bool,
}

/// The buffers of one chain as iovecs into guest RAM, if every one is mapped and of the
/// wanted direction. The head index either way.
fn chain_iovecs(
    chain: virtio_queue::DescriptorChain<Guard>,
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    writable: bool,
) -> (u16, Option<(Vec<libc::iovec>, usize)>) {
    let head = chain.head_index();
    let mut iov = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() != writable || iov.len() == MAX_IOVECS {
            return (head, None);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        let Ok(slice) = mem.get_slice(d.addr(), len) else {
            return (head, None);
        };
        total += len;
        iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: len,
        });
    }
    (head, Some((iov, total)))
}

/// Writes `value` at byte `off` of the buffers `bufs` (guest addresses), wherever it falls.
fn write_u16_at(
    mem: &GuestMemoryMmap<BitmapMmapRegion>,
    bufs: &[(GuestAddress, usize)],
    off: u64,
    value: u16,
) {
    let bytes = value.to_le_bytes();
    for (i, b) in bytes.iter().enumerate() {
        let mut at = off + i as u64;
        for &(addr, len) in bufs {
            if at < len as u64 {
                if let Some(a) = addr.checked_add(at) {
                    let _ = mem.write_obj(*b, a);
                }
                break;
            }
            at -= len as u64;
        }
    }
}

/// Marks the first `n` bytes of the buffers `bufs` written in guest memory's dirty bitmap (the
/// frontend's log during a live migration, LOG_SHMFD): `readv` wrote them through host
/// pointers, which `vm_memory` does not see.
fn mark_written(mem: &GuestMemoryMmap<BitmapMmapRegion>, bufs: &[(GuestAddress, usize)], n: usize) {
    use vm_memory::bitmap::Bitmap;
    let mut left = n;
    for &(addr, len) in bufs {
        if left == 0 {
            break;
        }
        let k = left.min(len);
        if let Ok(s) = mem.get_slice(addr, k) {
            s.bitmap().mark_dirty(0, k);
        }
        left -= k;
    }
}

/// Transmit: every available chain to the TAP. A TAP that would block leaves the chain in
/// the ring (`tap_blocked`) for when it can take more.
pub fn transmit(vring: &mut VringState<Mem>, mem: &Mem, tap: &Tap) -> Pass {
    let mut pass = Pass::default();
    for _ in 0..BATCH {
        let m = mem.memory();
        let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(m.clone()) else {
            pass.ring_empty = true;
            return pass;
        };
        let (head, bufs) = chain_iovecs(chain, &m, false);
        match bufs {
            Some((iov, total)) if (VNET_HDR_LEN..=MAX_FRAME).contains(&total) => {
                // SAFETY: every iovec is a slice of guest RAM that stays mapped while `m`
                // (the memory the slices came from) is held, and the TAP only reads them.
                match unsafe { tap.writev(&iov) } {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        vring.get_queue_mut().go_to_previous_position();
                        pass.tap_blocked = true;
                        return pass;
                    }
                    Err(e) => debug!("vhost_user_net: transmit dropped a frame: {e}"),
                }
            }
            _ => debug!("vhost_user_net: unusable transmit chain {head} dropped"),
        }
        if let Err(e) = vring.add_used(head, 0) {
            warn!("vhost_user_net: transmit used ring: {e}");
            return pass;
        }
        pass.used = true;
    }
    pass.more = true;
    pass
}

/// Receive: frames from the TAP, one per available chain, until the TAP is drained
/// (`tap_blocked`) or the ring has no chain left (`ring_empty`).
pub fn receive(vring: &mut VringState<Mem>, mem: &Mem, tap: &Tap) -> Pass {
    let mut pass = Pass::default();
    for _ in 0..BATCH {
        let m = mem.memory();
        let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(m.clone()) else {
            pass.ring_empty = true;
            return pass;
        };
        let addrs: Vec<(GuestAddress, usize)> = chain
            .clone()
            .map(|d| (d.addr(), d.len() as usize))
            .collect();
        let (head, bufs) = chain_iovecs(chain, &m, true);
        let len = match bufs {
            Some((iov, total)) if total >= VNET_HDR_LEN => {
                // SAFETY: every iovec is a writable slice of guest RAM that stays mapped
                // while `m` is held; the TAP writes at most their lengths.
                match unsafe { tap.readv(&iov) } {
                    Ok(n) => {
                        // The TAP writes the first 10 bytes of the header; one buffer each.
                        write_u16_at(&m, &addrs, NUM_BUFFERS_OFF, 1);
                        mark_written(&m, &addrs, n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        vring.get_queue_mut().go_to_previous_position();
                        pass.tap_blocked = true;
                        return pass;
                    }
                    Err(e) => {
                        debug!("vhost_user_net: receive: {e}");
                        0
                    }
                }
            }
            _ => {
                debug!("vhost_user_net: unusable receive chain {head} completed empty");
                0
            }
        };
        if let Err(e) = vring.add_used(head, len as u32) {
            warn!("vhost_user_net: receive used ring: {e}");
            return pass;
        }
        pass.used = true;
    }
    pass.more = true;
    pass
}
