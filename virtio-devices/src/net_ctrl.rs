//! The virtio-net control queue (VIRTIO_NET_F_CTRL_VQ, virtio 1.2 5.1.6.5): reading a command
//! chain (class, command, data; then a device-writable status byte) and answering it, for the
//! built-in virtio-net and for vhost-user-net, whose control queue the VMM serves itself (the
//! backend never sees it, as in the original). [`PairsHandler`] is vhost-user-net's worker.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use log::{debug, info};
use virtio_bindings::virtio_net as vn;
use vm_memory::Bytes;

use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};

pub(crate) const CTRL_MQ: u8 = vn::VIRTIO_NET_CTRL_MQ as u8;
pub(crate) const CTRL_MQ_VQ_PAIRS_SET: u8 = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
const CTRL_OK: u8 = vn::VIRTIO_NET_OK as u8;
const CTRL_ERR: u8 = vn::VIRTIO_NET_ERR as u8;
/// The longest command (class, command and data) read.
const CTRL_MAX: usize = 64;

/// Serves every available command of control queue `q` (number `index`): `exec(class,
/// command, data)` says whether it succeeded (VIRTIO_NET_OK) or not (VIRTIO_NET_ERR). A
/// malformed chain (readable after writable, over `CTRL_MAX` bytes, unreadable, a zero-length
/// status) is answered ERR without running it; one without a status byte is given back with
/// nothing written.
pub(crate) fn serve<F>(
    index: usize,
    q: &mut VirtQueue,
    mem: &GuestMemoryMmap,
    mut exec: F,
) -> Result<u64, String>
where
    F: FnMut(u8, u8, &[u8]) -> bool,
{
    process_chains(index, q, |_, chain| {
        let mut cmd = [0u8; CTRL_MAX];
        let mut cmd_len = 0usize;
        let mut ack = None;
        let mut bad = false;
        for d in chain {
            if d.is_write_only() {
                ack.get_or_insert(d.addr());
                if d.len() == 0 {
                    bad = true;
                }
                continue;
            }
            // Readable after writable, or too long: malformed.
            if ack.is_some() || cmd_len + d.len() as usize > CTRL_MAX {
                bad = true;
                continue;
            }
            let end = cmd_len + d.len() as usize;
            if mem.read_slice(&mut cmd[cmd_len..end], d.addr()).is_err() {
                bad = true;
            }
            cmd_len = end;
        }
        let Some(ack) = ack else {
            debug!("virtio-net: control command without a status byte");
            return Some(0);
        };
        let status = if bad || cmd_len < 2 {
            CTRL_ERR
        } else if exec(cmd[0], cmd[1], &cmd[2..cmd_len]) {
            CTRL_OK
        } else {
            CTRL_ERR
        };
        match mem.write_obj(status, ack) {
            Ok(()) => Some(1),
            Err(_) => Some(0),
        }
    })
}

/// VQ_PAIRS_SET's data: the pairs asked for, if within 1..=`pairs`.
pub(crate) fn pairs_set(data: &[u8], pairs: usize) -> Option<usize> {
    let raw = <[u8; 2]>::try_from(data).ok()?;
    let n = usize::from(u16::from_le_bytes(raw));
    (1..=pairs).contains(&n).then_some(n)
}

/// vhost-user-net's control queue: VQ_PAIRS_SET (with MQ negotiated) is checked, recorded in
/// `active` and acknowledged; the backend runs every queue the driver enabled whatever the
/// number (the driver posts buffers only on the pairs it uses). Every other command: ERR.
pub(crate) struct PairsHandler {
    pub index: usize,
    pub pairs: usize,
    pub mq: bool,
    pub active: Arc<AtomicU16>,
}

impl QueueHandler for PairsHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index).filter(|_| index == self.index) else {
            return Ok(0);
        };
        let (pairs, mq, active) = (self.pairs, self.mq, &self.active);
        serve(index, q, mem, |class, cmd, data| match (class, cmd) {
            (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) if mq => match pairs_set(data, pairs) {
                Some(n) => {
                    info!("vhost-user-net: the driver uses {n} of {pairs} queue pairs");
                    active.store(n as u16, Ordering::Release);
                    true
                }
                None => false,
            },
            _ => {
                debug!("vhost-user-net: unsupported control command {class}/{cmd}");
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::pairs_set;

    #[test]
    fn vq_pairs_set_bounds() {
        assert_eq!(pairs_set(&2u16.to_le_bytes(), 2), Some(2));
        assert_eq!(pairs_set(&1u16.to_le_bytes(), 4), Some(1));
        assert_eq!(pairs_set(&0u16.to_le_bytes(), 2), None);
        assert_eq!(pairs_set(&3u16.to_le_bytes(), 2), None);
        assert_eq!(pairs_set(&[2], 2), None);
        assert_eq!(pairs_set(&[2, 0, 0], 2), None);
    }
}
