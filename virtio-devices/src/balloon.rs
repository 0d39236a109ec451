//! virtio-balloon (virtio 1.2, 5.5): the host asks the guest for pages (`num_pages` in the
//! configuration), the guest hands them over on the inflate queue and the host gives their
//! memory back to the system; pages taken back on the deflate queue fault in again (as zero)
//! when the guest touches them. With free page reporting the guest also reports ranges of its
//! free memory, released the same way.
//!
//! Releasing a page (`discard.rs`): `MADV_DONTNEED` on a private mapping (the anonymous page
//! is freed), and `MADV_REMOVE` on a shared one (`shared=on`, hugepages: a memfd), which punches
//! a hole in the file so its pages are freed too.
//! The guest is not trusted: what it names outside guest RAM is skipped, and nothing outside
//! guest RAM is ever touched.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use log::debug;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::config_signal::{ConfigInterrupt, ConfigSignal};
use crate::device_worker::DeviceWorker;
pub(crate) use crate::discard::release_guest_range;
use crate::vring::VirtQueue;
use crate::worker::{process_chains, queue_bit, QueueHandler};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    F_VERSION_1, TYPE_BALLOON, VIRTIO_DEVICE_STATE_VERSION,
};

/// VIRTIO_BALLOON_F_STATS_VQ: there is a statistics queue.
pub const F_BALLOON_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may deflate when it runs out of memory.
pub const F_BALLOON_DEFLATE_ON_OOM: u64 = 1 << 2;
/// VIRTIO_BALLOON_F_REPORTING (spec: F_PAGE_REPORTING): there is a free page reporting queue.
pub const F_BALLOON_REPORTING: u64 = 1 << 5;

/// The balloon's unit: PFNs and `num_pages` count 4 KiB pages, whatever the guest's page size.
pub const BALLOON_PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

const QUEUE_SIZE: u16 = 128;
/// PFNs read from guest memory at a time (one page of them): bounds the memory a hostile
/// descriptor length can make the device allocate.
const PFN_BATCH: usize = 1024;
/// Bytes of one statistic: le16 tag, le64 value, packed.
const STAT_SIZE: usize = 10;
/// At most this many statistics are kept from one buffer (the spec defines 16 tags).
const MAX_STATS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error(
        "balloon size {0} bytes is more than virtio-balloon can ask for (2^32 - 1 pages of 4 KiB)"
    )]
    TooLarge(u64),
    #[error("cannot create the statistics request eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// What a queue is for. The queues are numbered in this order, but a queue whose feature was
/// not negotiated does not exist and takes no index (5.5.2): without STATS_VQ the reporting
/// queue is queue 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalloonQueue {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The role of each queue index, for the features the driver accepted.
pub fn balloon_queues(acked: u64) -> Vec<BalloonQueue> {
    let mut q = vec![BalloonQueue::Inflate, BalloonQueue::Deflate];
    if acked & F_BALLOON_STATS_VQ != 0 {
        q.push(BalloonQueue::Stats);
    }
    if acked & F_BALLOON_REPORTING != 0 {
        q.push(BalloonQueue::Reporting);
    }
    q
}

/// What the device offers, from `--balloon`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (`deflate_on_oom=on`).
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING and its queue (`free_page_reporting=on`).
    pub free_page_reporting: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ and its queue (the original offers none: off for it).
    pub stats: bool,
}

impl BalloonOptions {
    pub fn features(&self) -> u64 {
        let mut f = F_VERSION_1;
        if self.stats {
            f |= F_BALLOON_STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= F_BALLOON_DEFLATE_ON_OOM;
        }
        if self.free_page_reporting {
            f |= F_BALLOON_REPORTING;
        }
        f
    }
}

/// The VMM's handle on the balloon: the target it sets (`desired_balloon`), what the guest
/// says it gave (`actual`), and the guest's statistics when the statistics queue is used. A
/// new target bumps the configuration generation and raises the configuration interrupt of
/// the running device (after a pause, on resume).
pub struct BalloonControl {
    /// `num_pages`: 4 KiB pages the host wants in the balloon.
    num_pages: AtomicU32,
    /// `actual`: pages the driver says are in the balloon.
    actual: AtomicU32,
    signal: ConfigSignal,
    /// Written by `request_stats`; the worker then hands the statistics buffer back.
    stats_request: EventFd,
    /// The latest statistics the guest sent: (tag, value).
    stats: Mutex<Vec<(u16, u64)>>,
}

fn pages_of(bytes: u64) -> Result<u32, BalloonError> {
    u32::try_from(bytes >> PAGE_SHIFT).map_err(|_| BalloonError::TooLarge(bytes))
}

impl BalloonControl {
    /// A balloon that starts asking for `size` bytes (rounded down to 4 KiB pages).
    pub fn new(size: u64) -> Result<Arc<Self>, BalloonError> {
        Ok(Arc::new(BalloonControl {
            num_pages: AtomicU32::new(pages_of(size)?),
            actual: AtomicU32::new(0),
            signal: ConfigSignal::default(),
            stats_request: EventFd::new(libc::EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
            stats: Mutex::new(Vec::new()),
        }))
    }

    /// Asks the guest for a balloon of `bytes` (rounded down to 4 KiB pages): `vm.resize`'s
    /// `desired_balloon`. If it changed, bumps the generation and interrupts the driver.
    /// Returns whether it changed.
    pub fn set_target(&self, bytes: u64) -> Result<bool, BalloonError> {
        let pages = pages_of(bytes)?;
        Ok(self
            .signal
            .change(|| self.num_pages.swap(pages, Ordering::AcqRel) != pages))
    }

    /// The balloon the host asks for, in bytes.
    pub fn target(&self) -> u64 {
        u64::from(self.num_pages.load(Ordering::Acquire)) << PAGE_SHIFT
    }

    /// The balloon the guest says it has, in bytes (`actual`).
    pub fn actual(&self) -> u64 {
        u64::from(self.actual.load(Ordering::Acquire)) << PAGE_SHIFT
    }

    pub fn generation(&self) -> u32 {
        self.signal.generation()
    }

    /// The statistics the guest last sent (tag, value), with VIRTIO_BALLOON_F_STATS_VQ.
    pub fn stats(&self) -> Vec<(u16, u64)> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks the guest for fresh statistics: the buffer it left on the statistics queue is
    /// handed back, and it answers with a new one.
    pub fn request_stats(&self) {
        let _ = self.stats_request.write(1);
    }

    /// Sets the configuration as a snapshot had it, without an interrupt.
    fn restore(&self, num_pages: u32, actual: u32, generation: u32) {
        self.signal.restore(generation, || {
            self.num_pages.store(num_pages, Ordering::Release);
            self.actual.store(actual, Ordering::Release);
        });
    }
}

/// Sorts `pfns` and turns them into runs of consecutive pages: (first PFN, pages). Duplicates
/// count once.
pub(crate) fn pfn_runs(pfns: &mut [u32]) -> Vec<(u64, u64)> {
    pfns.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pfns.iter() {
        let p = u64::from(p);
        match runs.last_mut() {
            Some((start, n)) if *start + *n == p => *n += 1,
            Some((start, n)) if *start + *n > p => {} // a duplicate
            _ => runs.push((p, 1)),
        }
    }
    runs
}

struct BalloonHandler {
    control: Arc<BalloonControl>,
    /// The role of each queue index (from the negotiated features).
    queues: Vec<BalloonQueue>,
    /// The statistics buffer the driver left with us, handed back on a request.
    stats_head: Option<u16>,
    pfns: Vec<u32>,
    buf: Vec<u8>,
}

impl BalloonHandler {
    fn index_of(&self, role: BalloonQueue) -> Option<usize> {
        self.queues.iter().position(|&q| q == role)
    }

    /// Releases the pages whose PFNs (le32) `desc` holds.
    fn inflate(&mut self, mem: &GuestMemoryMmap, desc: &Descriptor) {
        if desc.is_write_only() {
            debug!("virtio-balloon: write-only descriptor on the inflate queue");
            return;
        }
        // A PFN array not wholly in guest memory is refused whole: acting on the part that
        // is (a 4 GiB length from a valid address) would read the rest of RAM as PFNs.
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            debug!(
                "virtio-balloon: PFN array {:#x}+{:#x} outside guest memory",
                desc.addr().0,
                desc.len()
            );
            return;
        }
        let total = desc.len() as usize / 4;
        let mut done = 0;
        while done < total {
            let k = (total - done).min(PFN_BATCH);
            self.buf.resize(4 * k, 0);
            let at = desc.addr().0 + 4 * done as u64;
            if mem.read_slice(&mut self.buf, GuestAddress(at)).is_err() {
                debug!("virtio-balloon: PFN array at {at:#x} outside guest memory");
                return;
            }
            self.pfns.clear();
            self.pfns.extend(
                self.buf
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            for (pfn, n) in pfn_runs(&mut self.pfns) {
                release_guest_range(mem, pfn << PAGE_SHIFT, n << PAGE_SHIFT);
            }
            done += k;
        }
    }

    /// Keeps the statistics of a buffer the driver sent (its readable descriptors).
    fn read_stats(&self, mem: &GuestMemoryMmap, chain: &[Descriptor]) {
        let mut stats = Vec::new();
        for d in chain.iter().filter(|d| !d.is_write_only()) {
            let n = (d.len() as usize / STAT_SIZE).min(MAX_STATS - stats.len());
            let mut buf = vec![0u8; n * STAT_SIZE];
            if mem.read_slice(&mut buf, d.addr()).is_err() {
                debug!("virtio-balloon: statistics buffer outside guest memory");
                return;
            }
            stats.extend(buf.chunks_exact(STAT_SIZE).map(|s| {
                let tag = u16::from_le_bytes([s[0], s[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&s[2..]);
                (tag, u64::from_le_bytes(v))
            }));
        }
        *self.control.stats.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }

    /// Hands the statistics buffer back (used, nothing written), if we hold it.
    fn give_back_stats(&mut self, queues: &mut [Option<VirtQueue>]) -> Result<u64, String> {
        let Some(i) = self.index_of(BalloonQueue::Stats) else {
            return Ok(0);
        };
        let (Some(head), Some(Some(q))) = (self.stats_head, queues.get_mut(i)) else {
            return Ok(0);
        };
        self.stats_head = None;
        q.add_used(head, 0)?;
        Ok(queue_bit(i))
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-balloon",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Pages the guest gives back: discarded (madvise is in the base list), or punched out of
                // a shared file.
                fallocate,
            ]
        },
        ioctls: &[],
    };

impl QueueHandler for BalloonHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(&role) = self.queues.get(index) else {
            return Ok(0);
        };
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        match role {
            BalloonQueue::Inflate => process_chains(index, q, |_, chain| {
                for d in chain {
                    self.inflate(mem, d);
                }
                Some(0)
            }),
            // The pages fault back in when the guest touches them: nothing to do.
            BalloonQueue::Deflate => process_chains(index, q, |_, _| Some(0)),
            BalloonQueue::Reporting => process_chains(index, q, |_, chain| {
                for d in chain {
                    release_guest_range(mem, d.addr().0, u64::from(d.len()));
                }
                Some(0)
            }),
            BalloonQueue::Stats => {
                // The driver has one buffer out at a time; a newer one replaces the one held,
                // which goes back.
                let mut back = Vec::new();
                let r = process_chains(index, q, |head, chain| {
                    self.read_stats(mem, chain);
                    back.extend(self.stats_head.replace(head));
                    None
                });
                for &h in &back {
                    q.add_used(h, 0)?;
                }
                Ok(r? | if back.is_empty() { 0 } else { queue_bit(index) })
            }
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        self.index_of(BalloonQueue::Stats)
            .map(|_| self.control.stats_request.as_raw_fd())
    }

    fn extra_wanted(&self) -> bool {
        // A request waits (the eventfd stays readable) until the driver has a buffer with us.
        self.stats_head.is_some()
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let _ = self.control.stats_request.read();
        self.give_back_stats(queues)
    }

    fn quiesce(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        // Nothing stays in flight across a pause: the statistics buffer goes back, and the
        // driver sends a new one.
        self.give_back_stats(queues)
    }
}

/// virtio-balloon's own state: its configuration (the target, what the guest reported) and
/// the configuration generation. Pages already released stay released in the saved memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    pub version: u32,
    pub num_pages: u32,
    pub actual: u32,
    pub config_generation: u32,
}

pub struct Balloon {
    options: BalloonOptions,
    control: Arc<BalloonControl>,
    worker: DeviceWorker<BalloonHandler>,
    /// The configuration interrupt (a target change while paused is signalled on resume).
    config_irq: ConfigInterrupt,
}

impl Balloon {
    /// A balloon asking for `size` bytes at first, offering what `options` says.
    pub fn new(size: u64, options: BalloonOptions) -> Result<Self, BalloonError> {
        Ok(Balloon {
            options,
            control: BalloonControl::new(size)?,
            worker: DeviceWorker::fresh("virtio-balloon"),
            config_irq: ConfigInterrupt::default(),
        })
    }

    /// The VMM's handle: set the target, read `actual`.
    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }
}

impl Drop for Balloon {
    fn drop(&mut self) {
        self.config_irq.reset(&self.control.signal);
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u16 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; balloon_queues(self.options.features()).len()]
    }
    fn features(&self) -> u64 {
        self.options.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual (le32 each); the free page hint and poison fields are not offered.
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.control.num_pages.load(Ordering::Acquire).to_le_bytes());
        c[4..8].copy_from_slice(&self.control.actual.load(Ordering::Acquire).to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's; `num_pages` is read-only.
        let mut a = self.control.actual.load(Ordering::Acquire).to_le_bytes();
        let mut changed = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(pos) = offset.checked_add(i as u64) else {
                break;
            };
            if (4..8).contains(&pos) {
                a[pos as usize - 4] = b;
                changed = true;
            } else {
                debug!("virtio-balloon: driver write to read-only config byte {pos:#x}");
            }
        }
        if changed {
            self.control
                .actual
                .store(u32::from_le_bytes(a), Ordering::Release);
        }
    }
    fn config_generation(&self) -> u32 {
        self.control.generation()
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = BalloonHandler {
            control: self.control.clone(),
            queues: balloon_queues(ctx.acked_features),
            stats_head: None,
            pfns: Vec::new(),
            buf: Vec::new(),
        };
        // A request made before the driver had statistics is not a request for these.
        let _ = self.control.stats_request.read();
        let interrupt = ctx.interrupt.clone();
        self.worker.activate_with(handler, ctx)?;
        self.config_irq.activate(&self.control.signal, interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.config_irq.reset(&self.control.signal);
        self.worker.reset();
        // A new driver starts with an empty balloon (the pages are the guest's again); the
        // host's target stays.
        self.control.actual.store(0, Ordering::Release);
        self.control
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.worker.queue_positions()
    }
    fn pause(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.config_irq.pause(&self.control.signal);
        self.worker.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.worker.resume()?;
        self.config_irq.resume(&self.control.signal);
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(BalloonState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            num_pages: self.control.num_pages.load(Ordering::Acquire),
            actual: self.control.actual.load(Ordering::Acquire),
            config_generation: self.control.generation(),
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-balloon";
        let VirtioDeviceState::Balloon(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        self.control
            .restore(s.num_pages, s.actual, s.config_generation);
        Ok(())
    }
}
