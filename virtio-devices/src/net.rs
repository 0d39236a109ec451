//! virtio-net over a TAP device: one receive/transmit queue pair, the 12-byte
//! `virtio_net_hdr_v1` passed through unchanged (the TAP speaks the same header), no offloads.
//! Frames go straight between guest buffers and the TAP with readv/writev.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use log::{debug, warn};
use net_util::{MacAddr, Tap, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::worker::{process_chains, queue_bit, QueueHandler, WorkerHandle};
use crate::{
    guest_iovec, read_config_bytes, ActivateContext, ActivateError, Counters, VirtioDevice,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};

use virtio_bindings::virtio_net as vn;

const F_MTU: u64 = 1 << vn::VIRTIO_NET_F_MTU;
const F_MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
const F_STATUS: u64 = 1 << vn::VIRTIO_NET_F_STATUS;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Largest frame with its header the device accepts from the guest.
const MAX_FRAME: usize = VNET_HDR_LEN + 65535;
/// Frames moved per wake-up of one direction before the other gets a turn.
const BATCH: usize = 64;

const RX_BYTES: usize = 0;
const RX_FRAMES: usize = 1;
const TX_BYTES: usize = 2;
const TX_FRAMES: usize = 3;
const COUNTER_NAMES: &[&str] = &["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"];

struct NetHandler {
    counters: Arc<Counters>,
    tap: Tap,
    /// No receive buffer: stop watching the TAP until the driver adds some.
    paused: bool,
    iovecs: Vec<libc::iovec>,
    tx_dropped: u64,
}

// SAFETY: the iovecs point into guest memory and only live during one call on the worker.
unsafe impl Send for NetHandler {}

impl NetHandler {
    fn transmit(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<u64, String> {
        let (tap, iovecs, dropped) = (&self.tap, &mut self.iovecs, &mut self.tx_dropped);
        let counters = &self.counters;
        process_chains(TX_QUEUE, q, mem, |chain| {
            iovecs.clear();
            let mut total = 0usize;
            for d in chain {
                if d.is_write_only() {
                    debug!("virtio-net: writable descriptor on the transmit queue; dropped");
                    *dropped += 1;
                    return Some(0);
                }
                total += d.len() as usize;
                match guest_iovec(mem, d.addr(), d.len()) {
                    Some(v) if total <= MAX_FRAME => iovecs.push(v),
                    _ => {
                        debug!("virtio-net: bad transmit buffer; dropped");
                        *dropped += 1;
                        return Some(0);
                    }
                }
            }
            if total <= VNET_HDR_LEN {
                *dropped += 1;
                return Some(0);
            }
            // SAFETY: each iovec lies inside one mapped region of guest memory (`guest_iovec`),
            // which stays mapped while the worker holds `mem`.
            match unsafe { tap.writev(iovecs) } {
                Ok(_) => {
                    counters.add(TX_BYTES, (total - VNET_HDR_LEN) as u64);
                    counters.add(TX_FRAMES, 1);
                }
                Err(e) => {
                    // A full TAP queue drops the frame, as a busy wire would.
                    debug!("virtio-net: TAP write: {e}");
                    *dropped += 1;
                }
            }
            Some(0)
        })
    }

    /// Moves frames from the TAP into receive buffers. Returns the used mask.
    fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<u64, String> {
        let mut used = 0;
        for _ in 0..BATCH {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("avail ring: {e}")),
            };
            let Some(chain) = chain else {
                self.paused = true;
                break;
            };
            let head = chain.head_index();
            self.iovecs.clear();
            let mut first = None;
            let mut ok = true;
            for d in chain {
                match guest_iovec(mem, d.addr(), d.len()) {
                    Some(v) if d.is_write_only() => {
                        first.get_or_insert((d.addr(), d.len() as usize));
                        self.iovecs.push(v);
                    }
                    _ => ok = false,
                }
            }
            let room: usize = self.iovecs.iter().map(|v| v.iov_len).sum();
            if !ok || room < VNET_HDR_LEN {
                debug!("virtio-net: unusable receive buffer");
                q.add_used(mem, head, 0)
                    .map_err(|e| format!("used ring: {e}"))?;
                used = queue_bit(RX_QUEUE);
                continue;
            }
            // SAFETY: as in `transmit`: the iovecs lie inside mapped guest memory.
            match unsafe { self.tap.readv(&self.iovecs) } {
                Ok(n) => {
                    self.counters
                        .add(RX_BYTES, n.saturating_sub(VNET_HDR_LEN) as u64);
                    self.counters.add(RX_FRAMES, 1);
                    // Without MRG_RXBUF every frame uses one buffer: num_buffers = 1 (when
                    // the header lies in the first buffer, as every driver puts it).
                    if let Some((a, len)) = first.filter(|&(_, len)| len >= VNET_HDR_LEN) {
                        debug_assert!(len >= VNET_HDR_LEN);
                        if let Some(a) = a.checked_add(10) {
                            let _ = mem.write_obj(1u16, a);
                        }
                    }
                    q.add_used(mem, head, n as u32)
                        .map_err(|e| format!("used ring: {e}"))?;
                    used = queue_bit(RX_QUEUE);
                }
                Err(e) => {
                    q.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        warn!("virtio-net: TAP read: {e}");
                    }
                    break;
                }
            }
        }
        Ok(used)
    }
}

impl QueueHandler for NetHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<Queue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        match index {
            RX_QUEUE => {
                self.paused = false;
                match queues.get_mut(RX_QUEUE) {
                    Some(Some(q)) => self.receive(q, mem),
                    _ => Ok(0),
                }
            }
            TX_QUEUE => match queues.get_mut(TX_QUEUE) {
                Some(Some(q)) => self.transmit(q, mem),
                _ => Ok(0),
            },
            _ => Ok(0),
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn extra_wanted(&self) -> bool {
        !self.paused
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<Queue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        match queues.get_mut(RX_QUEUE) {
            Some(Some(q)) => self.receive(q, mem),
            _ => {
                self.paused = true;
                Ok(0)
            }
        }
    }
}

pub struct Net {
    counters: Arc<Counters>,
    mac: MacAddr,
    mtu: u16,
    queue_size: u16,
    handler: Option<NetHandler>,
    worker: Option<WorkerHandle<NetHandler>>,
}

impl Net {
    /// A device with guest MAC `mac` on `tap` (already configured on the host side).
    pub fn new(tap: Tap, mac: MacAddr, mtu: u16, queue_size: u16) -> Self {
        let counters = Counters::new(COUNTER_NAMES);
        Net {
            counters: counters.clone(),
            mac,
            mtu,
            queue_size,
            handler: Some(NetHandler {
                counters,
                tap,
                paused: false,
                iovecs: Vec::new(),
                tx_dropped: 0,
            }),
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; 2]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_MAC | F_STATUS | F_MTU
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac, status (LINK_UP), max_virtqueue_pairs, mtu
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac.bytes());
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let h = self
            .handler
            .take()
            .ok_or_else(|| ActivateError::Other("virtio-net: TAP lost".into()))?;
        self.worker = Some(WorkerHandle::spawn("virtio-net", h, ctx)?);
        Ok(())
    }
    fn counters(&self) -> Option<Arc<Counters>> {
        Some(self.counters.clone())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.handler = w.stop();
            if let Some(h) = &mut self.handler {
                if h.tx_dropped > 0 {
                    debug!("virtio-net: {} transmit frames dropped", h.tx_dropped);
                }
                h.paused = false;
            }
        }
    }
}
