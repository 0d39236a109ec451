//! Virtio 1.x devices and their PCI transport. Each activated device runs one worker thread
//! with an epoll loop over its queue eventfds (signalled by KVM ioeventfds on the notify
//! addresses), so vCPUs never process queues themselves. The guest is not trusted: a malformed
//! request fails, a broken queue marks the device NEEDS_RESET, and the VMM goes on.

mod balloon;
mod block;
mod config_signal;
mod console;
mod device_worker;
mod discard;
#[doc(hidden)]
pub mod fuzz;
mod iommu;
mod mem;
mod net;
mod net_ctrl;
mod net_state;
mod pmem;
pub mod rate_limiter;
mod rng;
mod rtc;
mod transport;
mod vhost_user;
mod vhost_user_backend_req;
mod vhost_user_blk;
mod vhost_user_deadline;
mod vhost_user_fs;
mod vhost_user_generic;
mod vhost_user_log;
mod vhost_user_net;
mod vhost_user_reconnect;
mod vhost_user_socket;
mod vring;
mod vsock;
mod watchdog;
mod worker;
mod worker_group;
pub mod worker_seccomp;

#[cfg(test)]
mod balloon_tests;
#[cfg(test)]
mod blk_tests;
#[cfg(test)]
mod console_rng_tests;
#[cfg(test)]
mod mem_tests;
#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod pause_tests;
#[cfg(test)]
mod rate_limit_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod transport_state_tests;
#[cfg(test)]
mod transport_tests;

pub use balloon::{
    balloon_queues, Balloon, BalloonControl, BalloonError, BalloonOptions, BalloonQueue,
    BalloonState, BALLOON_PAGE_SIZE, F_BALLOON_DEFLATE_ON_OOM, F_BALLOON_REPORTING,
    F_BALLOON_STATS_VQ,
};
pub use block::{Block, BlockConfig, BlockState};
pub use console::{Console, ConsoleSize, ConsoleState, F_CONSOLE_SIZE};
pub use iommu::{
    Dma, Domain, Fault as IommuFault, Iommu, IommuMapping, IommuState, Mapping as IommuMap,
    Spaces as IommuSpaces, MSI_WINDOW, TYPE_IOMMU,
};
pub use mem::{
    VirtioMem, VirtioMemControl, VirtioMemError, VirtioMemOptions, VirtioMemState, F_MEM_ACPI_PXM,
    F_MEM_UNPLUGGED_INACCESSIBLE, TYPE_MEM, VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
};
pub use net::{Net, NetConfig, NetOffloads, NetState, MAX_QUEUE_PAIRS as NET_MAX_QUEUE_PAIRS};
pub use pmem::{Pmem, PmemRange, PmemState, TYPE_PMEM};
pub use rng::{Rng, RngState};
pub use rtc::{Rtc, RtcState, TYPE_RTC};
pub use transport::{
    VirtioPciDevice, VirtioPciState, VirtqueueState, VIRTIO_PCI_BAR_KIND, VIRTIO_PCI_BAR_SIZE,
    VIRTIO_PCI_STATE_VERSION,
};
pub use vhost_user::{VhostUserError, VhostUserState};
pub use vhost_user_blk::{VhostUserBlock, VhostUserBlockError};
pub use vhost_user_fs::{VhostUserFs, VhostUserFsError, FS_TAG_LEN, TYPE_FS};
pub use vhost_user_generic::VhostUserGeneric;
pub use vhost_user_net::{VhostUserNet, VhostUserNetConfig, VhostUserNetError};
pub use vhost_user_reconnect::GIVE_UP as VHOST_USER_GIVE_UP;
pub use vhost_user_socket::VhostSocketError;
pub use vsock::{Vsock, VsockState, TYPE_VSOCK};
pub use watchdog::{Watchdog, WatchdogState, TYPE_WATCHDOG, WATCHDOG_INTERVAL, WATCHDOG_TIMEOUT};
pub use worker::{QueueHandler, WorkerHandle};

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::{virtio_config as cfg, virtio_ids as ids, virtio_ring as ring};

/// Virtio device types (virtio 1.2, section 5).
pub const TYPE_NET: u16 = ids::VIRTIO_ID_NET as u16;
pub const TYPE_BLOCK: u16 = ids::VIRTIO_ID_BLOCK as u16;
pub const TYPE_CONSOLE: u16 = ids::VIRTIO_ID_CONSOLE as u16;
pub const TYPE_RNG: u16 = ids::VIRTIO_ID_RNG as u16;
pub const TYPE_BALLOON: u16 = ids::VIRTIO_ID_BALLOON as u16;

/// Feature bits common to all devices.
pub const F_VERSION_1: u64 = 1 << cfg::VIRTIO_F_VERSION_1;
pub const F_RING_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const F_RING_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
/// The device reaches memory through the platform's IOMMU (virtio 1.2, 6).
pub const F_ACCESS_PLATFORM: u64 = 1 << cfg::VIRTIO_F_ACCESS_PLATFORM;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;

/// How a device raises interrupts; the transport decides what that means (MSI-X vectors and
/// the ISR status byte for PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `index`.
    fn signal_queue(&self, index: usize);
    /// The device configuration (or status) changed.
    fn signal_config(&self);
}

/// Shared device status: the worker sets NEEDS_RESET, the transport reads it.
#[derive(Default)]
pub struct DeviceStatus(AtomicU8);

impl DeviceStatus {
    pub fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
    pub fn set(&self, v: u8) {
        self.0.store(v, Ordering::Release)
    }
    pub fn needs_reset(&self) -> bool {
        self.get() & STATUS_NEEDS_RESET != 0
    }
    pub fn mark_needs_reset(&self) {
        self.0.fetch_or(STATUS_NEEDS_RESET, Ordering::AcqRel);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// One entry per queue the device has; `None` for a queue the driver did not enable.
    pub queues: Vec<Option<(Queue, EventFd)>>,
    pub acked_features: u64,
    pub status: Arc<DeviceStatus>,
    /// The device is behind a virtual IOMMU and its driver accepted ACCESS_PLATFORM: every
    /// descriptor's address is an I/O virtual address (the queues' rings are already
    /// translated).
    pub dma: Option<Dma>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled no usable queue")]
    NoQueues,
    #[error("cannot start the device thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A virtio device, independent of the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (including `F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The configuration generation: changes whenever the device changes its configuration
    /// (the transport shows its low byte as `config_generation`).
    fn config_generation(&self) -> u32 {
        0
    }
    /// Starts processing: typically spawns the worker thread.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker (if any) and returns to the pre-activation state.
    fn reset(&mut self);
    /// Where the device stands in each queue, for a snapshot taken while it is paused:
    /// `(next_avail, next_used)` per queue, `None` for a queue it does not run. `None` (the
    /// default): it cannot say, and the transport saves the used ring's index from guest
    /// memory as both positions, which is exact only when no request is in flight (taken from
    /// the available ring and not yet returned as used).
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        None
    }
    /// Quiesces the device for a snapshot: its worker thread(s) stop, requests in flight are
    /// completed (waited for), published and signalled; once it returns the device neither
    /// accesses guest memory nor raises interrupts until `resume`, and `queue_positions` says
    /// where it stands. Nothing to do for a device that is not started; idempotent. `Err`: a
    /// worker thread had died (its queue positions are unknown).
    fn pause(&mut self) -> Result<(), String>;
    /// Restarts the paused worker(s) with the same queues at the same positions (what the
    /// driver published meanwhile is served). Nothing to do when not paused.
    fn resume(&mut self) -> Result<(), String>;
    /// The device's own state (beyond the transport's), for a snapshot taken while paused.
    fn device_state(&self) -> VirtioDeviceState;
    /// Restores the device's own state into a device built from the same configuration, before
    /// the transport's restore starts it. All or nothing: on an error nothing changed.
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError>;
    /// Live migration: from now on the device logs the pages of guest RAM (up to `last_addr`)
    /// written where neither KVM's dirty log nor the VMM's bitmaps see them (a vhost-user
    /// backend's writes), for `take_dirty_log`. `Err` (naming the device): it cannot, and the
    /// migration is refused. The default: nothing to log.
    fn start_dirty_log(&mut self, _last_addr: u64) -> Result<(), String> {
        Ok(())
    }
    /// Ends what `start_dirty_log` started.
    fn stop_dirty_log(&mut self) {}
    /// The pages logged since the last call (bit i of word w: the page at guest address
    /// (64 w + i) × 4 KiB), cleared as read; `None`: nothing logged.
    fn take_dirty_log(&mut self) -> Option<Vec<u64>> {
        None
    }
    /// `vm.resize-disk`: gives the device `size` bytes of capacity (a disk). `Err` says why
    /// it cannot (the default: it is not a disk this VMM resizes).
    fn resize(&mut self, _size: u64) -> Result<(), String> {
        Err("this device cannot be resized".into())
    }
    /// The device's statistics, if it keeps any.
    fn counters(&self) -> Option<Arc<Counters>> {
        None
    }
}

/// The `version` every device state of this crate is written with, and the only one restored.
pub const VIRTIO_DEVICE_STATE_VERSION: u32 = 1;

/// A virtio device's own state, by device type (the transport's is [`VirtioPciState`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VirtioDeviceState {
    Block(BlockState),
    Net(NetState),
    Console(ConsoleState),
    Rng(RngState),
    Balloon(BalloonState),
    Mem(VirtioMemState),
    Watchdog(WatchdogState),
    Vsock(VsockState),
    Pmem(PmemState),
    VhostUser(VhostUserState),
    Rtc(RtcState),
    Iommu(IommuState),
}

impl VirtioDeviceState {
    fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Block(_) => "virtio-blk",
            VirtioDeviceState::Net(_) => "virtio-net",
            VirtioDeviceState::Console(_) => "virtio-console",
            VirtioDeviceState::Rng(_) => "virtio-rng",
            VirtioDeviceState::Balloon(_) => "virtio-balloon",
            VirtioDeviceState::Mem(_) => "virtio-mem",
            VirtioDeviceState::Vsock(_) => "virtio-vsock",
            VirtioDeviceState::Watchdog(_) => "virtio-watchdog",
            VirtioDeviceState::Pmem(_) => "virtio-pmem",
            VirtioDeviceState::Rtc(_) => "virtio-rtc",
            VirtioDeviceState::Iommu(_) => "virtio-iommu",
            VirtioDeviceState::VhostUser(s) => match s.device.as_str() {
                "vhost-user-net" => "vhost-user-net",
                "vhost-user-blk" => "vhost-user-blk",
                _ => "vhost-user",
            },
        }
    }

    /// The refusal of a state of another device type, for `what`.
    pub(crate) fn wrong(&self, what: &str) -> pci::StateError {
        pci::StateError::invalid(what, format!("a {} state", self.kind()))
    }
}

/// Named statistics of one device, for the API's `vm.counters` (the original's names).
pub struct Counters {
    names: &'static [&'static str],
    values: Vec<std::sync::atomic::AtomicU64>,
}

impl Counters {
    pub fn new(names: &'static [&'static str]) -> Arc<Self> {
        Arc::new(Counters {
            names,
            values: names.iter().map(|_| Default::default()).collect(),
        })
    }

    /// Adds `v` to counter `i` (an index into the names).
    pub fn add(&self, i: usize, v: u64) {
        if let Some(c) = self.values.get(i) {
            c.fetch_add(v, Ordering::Relaxed);
        }
    }
}

impl devices::DeviceCounters for Counters {
    fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        self.names
            .iter()
            .zip(&self.values)
            .map(|(n, v)| (n.to_string(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Copies `src` (a device's configuration bytes) at `offset` into `data`, zero past the end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < src.len() {
        let n = data.len().min(src.len() - start);
        data[..n].copy_from_slice(&src[start..start + n]);
    }
}

/// `[addr, addr + len)` as an iovec when it lies inside one region of `mem`. A zero length
/// gives an empty iovec.
pub(crate) fn guest_iovec(
    mem: &GuestMemoryMmap,
    addr: vm_memory::GuestAddress,
    len: u32,
) -> Option<libc::iovec> {
    use vm_memory::GuestMemoryBackend;
    if len == 0 {
        return Some(libc::iovec {
            iov_base: std::ptr::NonNull::<u8>::dangling().as_ptr().cast(),
            iov_len: 0,
        });
    }
    let slice = mem.get_slice(addr, len as usize).ok()?;
    Some(libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: len as usize,
    })
}

/// Guest memory as a device walks a batch of requests: remembers the region of the last
/// buffer, so a buffer in the same region (nearly always) is found with a bounds check instead
/// of a region search. Every access stays checked against its region: a buffer that does not
/// lie inside one region is refused, as `GuestMemory::get_slice` refuses it.
///
/// The host addresses it gives bypass vm-memory, so its dirty-page bitmaps too: a device that
/// writes guest memory through them (or has the kernel write it: a read into iovecs) reports
/// what it wrote with `written`/`written_iovecs` once the data is in place, so a live
/// migration sends those pages again (KVM's dirty log sees only the guest's own writes).
pub struct GuestView<'a> {
    mem: &'a GuestMemoryMmap,
    /// The last region used.
    last: Option<Last<'a>>,
}

/// A region as `GuestView` remembers it.
#[derive(Clone, Copy)]
struct Last<'a> {
    /// Guest address of the region's start.
    start: u64,
    /// Host address of the region's start.
    base: std::ptr::NonNull<u8>,
    /// Bytes of the region.
    size: usize,
    bitmap: &'a guest_memory::AtomicBitmap,
}

impl<'a> Last<'a> {
    fn of(r: &'a guest_memory::GuestRegionMmap) -> Option<Self> {
        use vm_memory::GuestMemoryRegion;
        Some(Last {
            start: r.start_addr().0,
            base: std::ptr::NonNull::new(r.as_ptr())?,
            size: usize::try_from(r.len()).ok()?,
            bitmap: guest_memory::bitmap(r),
        })
    }

    /// The offset in the region of host address `p`, if it lies inside.
    fn offset_of(&self, p: *const u8) -> Option<usize> {
        let off = (p as usize).checked_sub(self.base.as_ptr() as usize)?;
        (off < self.size).then_some(off)
    }
}

impl<'a> GuestView<'a> {
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        GuestView { mem, last: None }
    }

    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }

    /// The host address of `[addr, addr + len)` when it lies inside one region. It stays
    /// valid while `mem` (borrowed for 'a) keeps the region mapped; guest memory is shared
    /// with the guest, so it must only be accessed with volatile operations or handed to the
    /// kernel (iovecs). What is written through it is reported with `written`.
    pub fn ptr(
        &mut self,
        addr: vm_memory::GuestAddress,
        len: usize,
    ) -> Option<std::ptr::NonNull<u8>> {
        use vm_memory::GuestMemoryBackend;
        let within = |l: &Last| {
            let off = usize::try_from(addr.0.checked_sub(l.start)?).ok()?;
            if off > l.size || len > l.size - off {
                return None;
            }
            // SAFETY: off <= size: the result points inside (or one past) the region's
            // mapping, which starts at `base` and is `size` bytes long.
            Some(unsafe { l.base.add(off) })
        };
        if let Some(p) = self.last.as_ref().and_then(within) {
            return Some(p);
        }
        let l = Last::of(self.mem.find_region(addr)?)?;
        self.last = Some(l);
        within(&l)
    }

    /// Marks `len` bytes from host address `p` (from `ptr` or `iovec`) written, in the dirty
    /// bitmap of the region they lie in; call it after the write (`mark_dirty` is an atomic
    /// read-modify-write, ordered after it: a dirty-page scan that clears the bit first sees
    /// the data, or finds the bit set again). An address outside guest memory (an empty
    /// iovec's) marks nothing.
    pub fn written(&mut self, p: *const u8, len: usize) {
        use guest_memory::Bitmap;
        use vm_memory::GuestMemoryBackend;
        if len == 0 {
            return;
        }
        if let Some(l) = self.last {
            if let Some(off) = l.offset_of(p) {
                l.bitmap.mark_dirty(off, len);
                return;
            }
        }
        for r in self.mem.iter() {
            if let Some(l) = Last::of(r) {
                if let Some(off) = l.offset_of(p) {
                    l.bitmap.mark_dirty(off, len);
                    self.last = Some(l);
                    return;
                }
            }
        }
    }

    /// Marks the first `n` bytes of `iovecs` (from `iovec`, in order) written: what a read of
    /// `n` bytes into them wrote.
    pub fn written_iovecs(&mut self, iovecs: &[libc::iovec], mut n: usize) {
        for v in iovecs {
            if n == 0 {
                break;
            }
            let k = n.min(v.iov_len);
            self.written(v.iov_base.cast::<u8>(), k);
            n -= k;
        }
    }

    /// `[addr, addr + len)` as an iovec when it lies inside one region (`guest_iovec`).
    pub fn iovec(&mut self, addr: vm_memory::GuestAddress, len: u32) -> Option<libc::iovec> {
        if len == 0 {
            return guest_iovec(self.mem, addr, 0);
        }
        let p = self.ptr(addr, len as usize)?;
        Some(libc::iovec {
            iov_base: p.as_ptr().cast(),
            iov_len: len as usize,
        })
    }
}
