//! virtio-vsock (virtio 1.2, 5.10; device type 19) with the original's hybrid vsock: the host
//! side of every connection is a Unix stream (see `muxer.rs`). Queues: receive (0), transmit
//! (1), event (2: one event, the transport reset after a restore or a migration). Configuration: le64 `guest_cid`.
//!
//! One worker thread serves the transmit queue (packets from the guest), the receive queue
//! (buffers for packets to the guest), the event queue (`event.rs`: the transport reset after a
//! restore) and the muxer's epoll fd (the host side). Nothing waits:
//! a packet for the guest that finds no receive buffer waits in its connection (bounded: a few
//! flags, and host data read ahead up to a limit), so the transmit queue is always drained.
//!
//! Connections live in the host's sockets and cannot be saved: a snapshot holds the
//! configuration and the queue positions. A restored device sends the driver
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.6) as soon as it has an event buffer,
//! and answers packets of the guest's old connections with RSTs (the original's vsock
//! connections do not survive a restore either; it sends no event).

mod connection;
mod event;
mod muxer;
mod packet;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use guest_memory::GuestMemoryMmap;
use log::debug;

use crate::device_worker::{worker_pausing, DeviceWorker};
use crate::vring::VirtQueue;
use crate::worker::{process_chains, queue_bit, QueueHandler};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    F_RING_INDIRECT_DESC, F_VERSION_1, VIRTIO_DEVICE_STATE_VERSION,
};

use muxer::Muxer;
use packet::BadPacket;

/// Device type 19.
pub const TYPE_VSOCK: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK as u16;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

struct VsockHandler {
    muxer: Muxer,
    payload: Vec<u8>,
    /// A transport reset event waits for an event buffer (set by a restore).
    reset_event: bool,
}

impl VsockHandler {
    fn send_reset_event(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(event::EVENT).filter(|_| self.reset_event) else {
            return Ok(0);
        };
        let d = event::deliver_reset(q, mem)?;
        self.reset_event &= !d.delivered;
        Ok(if d.used { queue_bit(event::EVENT) } else { 0 })
    }

    fn fill_rx(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        match queues.get_mut(RX) {
            Some(Some(q)) if self.muxer.has_rx() => Ok(if self.muxer.fill_rx(q, mem)? {
                queue_bit(RX)
            } else {
                0
            }),
            _ => Ok(0),
        }
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-vsock",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // The host side: Unix sockets to `socket` and `socket_PORT`.
                socket, connect, accept4, recvfrom, sendto, recvmsg, sendmsg, shutdown, getsockopt,
                setsockopt, fcntl,
            ]
        },
        // FIONBIO: `set_nonblocking` on each accepted host connection (std's sockets use the
        // ioctl, not fcntl). Guest-initiated connections are created non-blocking.
        ioctls: &[libc::FIONBIO],
    };

impl QueueHandler for VsockHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        // Whatever the queue, a pending event is tried: the worker serves every queue once when
        // a restored device is resumed.
        let mut used = self.send_reset_event(queues, mem)?;
        if index == TX {
            if let Some(Some(q)) = queues.get_mut(TX) {
                let (muxer, payload) = (&mut self.muxer, &mut self.payload);
                used |= process_chains(TX, q, |_, chain| {
                    match packet::read_tx(mem, chain, payload) {
                        Ok(h) => muxer.guest_packet(&h, payload),
                        Err(BadPacket::BadLen(h)) => {
                            debug!("vsock: packet of bad length {} from the guest", h.len);
                            muxer.bad_packet(&h);
                        }
                        Err(BadPacket::Short) => debug!("vsock: short packet from the guest"),
                    }
                    Some(0)
                })?;
            }
        }
        // The receive queue (new buffers) and the transmit
        // queue (answers) may have made packets for the guest deliverable.
        Ok(used | self.fill_rx(queues, mem)?)
    }

    fn extra_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.muxer.fd())
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        self.muxer.host_events();
        self.fill_rx(queues, mem)
    }
}

/// virtio-vsock's own state: its CID (connections are not saved; see the module comment).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    pub version: u32,
    pub cid: u64,
}

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    worker: DeviceWorker<VsockHandler>,
    /// Restored (`set_device_state`): the next start sends the transport reset event. (The
    /// transport may reset the device between the two, so the flag is not the handler's yet.)
    restored: bool,
}

impl Vsock {
    /// A device for guest `cid` listening at `path` (bound now, so a bad path fails at once).
    pub fn new(cid: u64, path: &Path) -> std::io::Result<Self> {
        let muxer = Muxer::new(cid, path)?;
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            worker: DeviceWorker::new(
                "virtio-vsock",
                VsockHandler {
                    muxer,
                    payload: Vec::new(),
                    reset_event: false,
                },
            ),
            restored: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        TYPE_VSOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if let Some(h) = self.worker.idle_mut() {
            h.reset_event = std::mem::take(&mut self.restored);
        }
        self.worker.activate(ctx)
    }
    fn reset(&mut self) {
        // The driver forgot its connections: so do we (their host streams are closed). A
        // pending event is for the driver that was reset: dropped too.
        if let Some(h) = self.worker.reset() {
            h.muxer.clear();
            h.reset_event = false;
        }
    }
    worker_pausing!(worker);
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(VsockState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            cid: self.cid,
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-vsock";
        let VirtioDeviceState::Vsock(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        if s.cid != self.cid {
            return Err(pci::StateError::invalid(
                WHAT,
                format!("cid {} (this device has cid {})", s.cid, self.cid),
            ));
        }
        // The guest's connections did not come with it: it is told once the device runs again.
        self.restored = true;
        Ok(())
    }
}
