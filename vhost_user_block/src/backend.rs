//! The vhost-user side: the device `vhost-user-backend`'s daemon serves (features, config
//! space, one worker thread per queue). Each queue's requests are served one after another in
//! ring order, so each queue completes them in the order the driver made them available: the
//! frontend's reconnect relies on it (a restarted backend starts again at the used index, see
//! docs/pci.md).

use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::{self, Disk, MAX_DESCRIPTORS, MAX_DISCARD_SECTORS, SECTOR_SIZE};

/// Guest RAM with the frontend's dirty log behind it (set by SET_LOG_BASE during a live
/// migration; no log otherwise).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;
pub type Memory = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = VringRwLock<Memory>;

/// How long a worker keeps looking for the next request after one (`poll_queue=on`), as the
/// original: about a fast SSD's latency.
const POLL: Duration = Duration::from_micros(50);

pub struct BlockBackend {
    disk: Mutex<Disk>,
    config: [u8; 60],
    num_queues: u16,
    queue_size: u16,
    readonly: bool,
    poll_queue: bool,
    event_idx: AtomicBool,
    mem: Memory,
}

impl BlockBackend {
    /// Serves `disk` through `num_queues` queues of up to `queue_size` entries; `mem` is the
    /// daemon's view of guest memory (it follows SET_MEM_TABLE).
    pub fn new(
        disk: Disk,
        num_queues: u16,
        queue_size: u16,
        poll_queue: bool,
        mem: Memory,
    ) -> Self {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
        let seg_max = u32::from(queue_size.saturating_sub(2).max(1));
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        BlockBackend {
            readonly: disk.readonly(),
            disk: Mutex::new(disk),
            config: c,
            num_queues,
            queue_size,
            poll_queue,
            event_idx: AtomicBool::new(false),
            mem,
        }
    }

    /// Serves every request available on `vring` once; returns whether there were any.
    fn serve_available(&self, vring: &Vring) -> bool {
        let mem = self.mem.memory();
        let mem = mem.deref();
        let mut state = vring.get_mut();
        let chains: Vec<(u16, Vec<Descriptor>)> = match state.get_queue_mut().iter(mem) {
            Ok(iter) => iter
                .map(|c| (c.head_index(), c.take(MAX_DESCRIPTORS + 1).collect()))
                .collect(),
            Err(e) => {
                // A driver that moved its avail index too far: nothing is served until it
                // resets the device.
                debug!("vhost-user-blk: avail ring: {e}");
                return false;
            }
        };
        if chains.is_empty() {
            return false;
        }
        for (head, descs) in chains {
            let len = {
                let mut disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
                request::serve(mem, &mut disk, &descs)
            };
            if let Err(e) = state.get_queue_mut().add_used(mem, head, len) {
                warn!("vhost-user-blk: used ring: {e}");
                return false;
            }
        }
        let signal = if self.event_idx.load(Ordering::Relaxed) {
            state
                .get_queue_mut()
                .needs_notification(mem)
                .unwrap_or(true)
        } else {
            true
        };
        if signal {
            if let Err(e) = state.signal_used_queue() {
                warn!("vhost-user-blk: cannot signal the frontend: {e}");
            }
        }
        true
    }

    /// Serves the queue until it is empty (with EVENT_IDX: until it stays empty once
    /// notifications are enabled again).
    fn drain(&self, vring: &Vring) -> bool {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut any = false;
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            let served = self.serve_available(vring);
            any |= served;
            if !event_idx {
                return any;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => return any,
                Err(e) => {
                    debug!("vhost-user-blk: {e}");
                    return any;
                }
            }
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(vb::VIRTIO_BLK_F_SEG_MAX)
            | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
            | bit(vb::VIRTIO_BLK_F_FLUSH)
            | bit(vb::VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.readonly {
            f |= bit(vb::VIRTIO_BLK_F_RO);
        } else {
            f |= bit(vb::VIRTIO_BLK_F_DISCARD) | bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: every write to guest RAM is marked in the frontend's log once it sets one
        // (vm-memory's accessors mark it; `request.rs` marks what the disk reads into).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // As the VMM's own devices: bytes past the config space read as zero (the frontend
        // may forward a guest's reads anywhere in the device's window).
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(self.config.len());
        let have = &self.config[start..];
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the config space is writable (no VIRTIO_BLK_F_CONFIG_WCE): a write is
        // ignored, as a device ignores a driver's write to a read-only field. An error here
        // would end the connection (vhost-user-backend takes any failed request as fatal), so
        // a guest's stray write would take the disk away.
        debug!(
            "vhost-user-blk: SET_CONFIG {offset}+{}: read-only config space, ignored",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, _mem: Memory) -> io::Result<()> {
        // `self.mem` is the daemon's own atomic view: it already holds the new table.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                error!("vhost-user-blk: exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        // One queue per thread: event 0 is its kick.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!("unknown event {device_event}")));
        };
        self.drain(vring);
        if self.poll_queue {
            let mut last = Instant::now();
            while last.elapsed() < POLL {
                if self.drain(vring) {
                    last = Instant::now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        Ok(())
    }
}

/// GET_ID's answer, as the original's: the image's device, rdev and inode numbers in decimal
/// (the first 20 bytes).
pub fn serial(path: &std::path::Path) -> Vec<u8> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => format!("{}{}{}", m.dev(), m.rdev(), m.ino()).into_bytes(),
        Err(_) => Vec::new(),
    }
}

/// Shared by the daemon and the caller.
pub type SharedBackend = Arc<BlockBackend>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend over a 1 MiB raw image, two queues.
    fn backend() -> (BlockBackend, tempfile::NamedTempFile) {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let opts = block::OpenOptions {
            image_type: Some(block::ImageType::Raw),
            ..Default::default()
        };
        let disk = Disk::new(block::open_disk(file.path(), &opts).unwrap(), b"id");
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
        (BlockBackend::new(disk, 2, 256, false, mem), file)
    }

    /// A guest's config accesses reach the backend as they are (a generic vhost-user
    /// frontend forwards them): reads past the space give zeroes, writes are ignored, and
    /// neither is an error (which would end the connection).
    #[test]
    fn stray_config_accesses_neither_fail_nor_change_anything() {
        let (b, _f) = backend();
        let capacity = b.get_config(0, 8);
        assert_eq!(capacity, 2048u64.to_le_bytes());
        assert_eq!(b.get_config(34, 2), 2u16.to_le_bytes());
        assert_eq!(b.get_config(56, 8), [0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(3000, 4), [0; 4]);
        b.set_config(0, &[0xff; 8]).unwrap();
        b.set_config(4000, &[1]).unwrap();
        assert_eq!(b.get_config(0, 8), capacity);
    }
}
