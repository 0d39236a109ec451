//! The virtio device targets: a device activated on fuzzer-written guest RAM (descriptor
//! tables, avail rings and buffers, all from the input) and served once, as a kick of every
//! queue would be, then paused, resumed (served again), saved and reset.
//!
//! Input: an 8-byte header, then the first bytes of guest RAM (see `mem`).
//! - `h[0]` flags: `ALL_FEATURES` (the device's own features accepted, else VERSION_1 only),
//!   `EVENT_IDX`, `INDIRECT`, `AGAIN` (a pause and a resume: a second service), `SHORT` (queues
//!   of 4 entries instead of 16).
//! - `h[1]`: bit mask of the queues left not ready (queue `i` of the first 8).
//! - `h[2]`: configuration write offset (its low 6 bits), `h[3] % 5`: its length, `h[4..8]`:
//!   the bytes written (before activation, as a driver may).
//!
//! Queue `i` has its descriptor table at `i * 0x400`, its avail ring at `+ 0x100` and its used
//! ring at `+ 0x200`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_devices::{ActivateContext, DeviceStatus, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::mem;

pub const HEADER: usize = 8;
pub const MAX_QUEUES: usize = 8;
pub const QSIZE: u16 = 16;
pub const ALL_FEATURES: u8 = 1;
pub const EVENT_IDX: u8 = 2;
pub const INDIRECT: u8 = 4;
pub const AGAIN: u8 = 8;
pub const SHORT: u8 = 16;

/// `FUZZ_DEBUG=1`: say what each input did (replaying an input, checking a seed).
pub fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

/// Where queue `q`'s rings are: (descriptor table, avail ring, used ring).
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x400 * q as u64;
    (base, base + 0x100, base + 0x200)
}

#[derive(Default)]
struct Irq(AtomicUsize);

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _index: usize) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves `data` (see the module's doc) with `dev`.
pub fn run(dev: &mut dyn VirtioDevice, data: &[u8]) {
    if data.len() < HEADER {
        return;
    }
    virtio_devices::fuzz::inline_workers(true);
    let (h, image) = data.split_at(HEADER);
    let flags = h[0];
    let mem = mem::guest_memory(image);

    let cfg_len = usize::from(h[3] % 5);
    dev.write_config(u64::from(h[2] & 0x3f), &h[4..4 + cfg_len]);
    let mut cfg = [0u8; 8];
    dev.read_config(u64::from(h[2] & 0x3f), &mut cfg[..cfg_len]);

    let offered = dev.features() | virtio_devices::F_VERSION_1 | virtio_devices::F_RING_EVENT_IDX;
    let mut wanted = virtio_devices::F_VERSION_1;
    if flags & ALL_FEATURES != 0 {
        wanted |= dev.features()
            & !(virtio_devices::F_RING_EVENT_IDX | virtio_devices::F_RING_INDIRECT_DESC);
    }
    if flags & EVENT_IDX != 0 {
        wanted |= virtio_devices::F_RING_EVENT_IDX;
    }
    if flags & INDIRECT != 0 {
        wanted |= virtio_devices::F_RING_INDIRECT_DESC;
    }
    let acked = offered & wanted;

    let mut queues = Vec::new();
    for (i, &max) in dev.queue_max_sizes().iter().enumerate() {
        if i >= MAX_QUEUES || h[1] & (1 << i) != 0 {
            queues.push(None);
            continue;
        }
        let size = if flags & SHORT != 0 { 4 } else { QSIZE }.min(max);
        let Ok(mut q) = Queue::new(size) else {
            queues.push(None);
            continue;
        };
        let (d, a, u) = rings(i);
        q.set_desc_table_address(Some(d as u32), Some(0));
        q.set_avail_ring_address(Some(a as u32), Some(0));
        q.set_used_ring_address(Some(u as u32), Some(0));
        q.set_event_idx(acked & virtio_devices::F_RING_EVENT_IDX != 0);
        q.set_ready(true);
        let Ok(kick) = EventFd::new(libc::EFD_NONBLOCK) else {
            return;
        };
        queues.push(Some((q, kick)));
    }
    let status = Arc::new(DeviceStatus::default());
    let ctx = ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Irq::default()),
        queues,
        acked_features: acked,
        status,
        dma: None,
    };
    if dev.activate(ctx).is_err() {
        return;
    }
    if debug() {
        for i in 0..dev.queue_max_sizes().len().min(MAX_QUEUES) {
            let used: u16 = mem.read_obj(GuestAddress(rings(i).2 + 2)).unwrap_or(0);
            eprintln!("ch-fuzz: queue {i}: {used} used");
        }
    }
    if flags & AGAIN != 0 {
        let _ = dev.pause();
        let _ = dev.resume();
    }
    let _ = dev.pause();
    let _ = dev.queue_positions();
    let state = dev.device_state();
    let json = serde_json::to_vec(&state).expect("a device state serialises");
    let back: virtio_devices::VirtioDeviceState =
        serde_json::from_slice(&json).expect("a device state reads back");
    dev.reset();
    let _ = dev.set_device_state(&back);
}

/// Builds seeds: guest RAM holding rings and requests the way a driver writes them.
pub struct Driver {
    header: [u8; HEADER],
    image: Vec<u8>,
    next_desc: [u16; MAX_QUEUES],
    next_buf: u64,
}

/// A buffer of a request: device-readable bytes, or a device-writable length.
pub enum Buf<'a> {
    R(&'a [u8]),
    W(u32),
}

impl Driver {
    pub fn new(flags: u8) -> Self {
        Driver {
            header: [flags, 0, 0, 0, 0, 0, 0, 0],
            image: vec![0; 0x2000],
            next_desc: [0; MAX_QUEUES],
            next_buf: 0x2000,
        }
    }

    fn put(&mut self, at: u64, bytes: &[u8]) {
        let at = at as usize;
        if self.image.len() < at + bytes.len() {
            self.image.resize(at + bytes.len(), 0);
        }
        self.image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// Publishes one chain of `bufs` on queue `q`.
    pub fn chain(&mut self, q: usize, bufs: &[Buf]) -> &mut Self {
        let (d, a, _) = rings(q);
        let head = self.next_desc[q];
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc[q];
            self.next_desc[q] += 1;
            let (len, mut flags) = match b {
                Buf::R(bytes) => (bytes.len() as u32, 0u16),
                Buf::W(n) => (*n, 2),
            };
            let addr = self.next_buf;
            if let Buf::R(bytes) = b {
                self.put(addr, bytes);
            }
            self.next_buf = (self.next_buf + u64::from(len) + 15) & !15;
            if i + 1 < bufs.len() {
                flags |= 1;
            }
            let mut desc = addr.to_le_bytes().to_vec();
            desc.extend_from_slice(&len.to_le_bytes());
            desc.extend_from_slice(&flags.to_le_bytes());
            desc.extend_from_slice(&(idx + 1).to_le_bytes());
            self.put(d + 16 * u64::from(idx), &desc);
        }
        let avail_idx =
            u16::from_le_bytes([self.image[a as usize + 2], self.image[a as usize + 3]]);
        self.put(
            a + 4 + 2 * u64::from(avail_idx % QSIZE),
            &head.to_le_bytes(),
        );
        self.put(a + 2, &(avail_idx + 1).to_le_bytes());
        self
    }

    /// A configuration write with the input.
    pub fn config(&mut self, offset: u8, bytes: &[u8]) -> &mut Self {
        self.header[2] = offset;
        self.header[3] = bytes.len() as u8;
        self.header[4..4 + bytes.len()].copy_from_slice(bytes);
        self
    }

    pub fn input(&self) -> Vec<u8> {
        let mut v = self.header.to_vec();
        let end = self
            .image
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p + 1);
        v.extend_from_slice(&self.image[..end]);
        v
    }
}
