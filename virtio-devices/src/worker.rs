//! The device thread: an epoll loop over the queue eventfds, one extra fd a device may want
//! (console input, an I/O completion fd) and a kill eventfd. Idle, it sleeps in epoll_wait.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_memory::GuestMemoryMmap;
use log::{error, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::vring::VirtQueue;
use crate::{ActivateContext, ActivateError, DeviceStatus, VirtioInterrupt};

const KILL_TOKEN: u64 = u64::MAX;
const EXTRA_TOKEN: u64 = u64::MAX - 1;
/// `TIMER_TOKEN - i` is the handler's timer fd `i`.
const TIMER_TOKEN: u64 = u64::MAX - 2;
/// Most timer fds a handler may have.
const MAX_TIMERS: usize = 8;
/// Most chains `process_chains_notify` pops per read of the avail index.
const POP_BATCH: usize = 16;

/// Fuzzing only (`crate::fuzz::inline_workers`): workers get no thread; `spawn` and `resume`
/// serve every queue once on the calling thread, so a fuzz input is served deterministically
/// and completely before the harness looks at the rings.
static INLINE: AtomicBool = AtomicBool::new(false);

pub(crate) fn set_inline(on: bool) {
    INLINE.store(on, Ordering::Relaxed);
}

/// What a device does with its queues, run on the worker thread.
pub trait QueueHandler: Send + 'static {
    /// The worker's seccomp filter: the calls this handler makes (see `crate::worker_seccomp`).
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &crate::worker_seccomp::GENERIC
    }
    /// The host CPUs the worker thread is pinned to (each thread the worker starts, at
    /// activation and at each resume); `None`: where the VMM runs.
    fn cpus(&self) -> Option<seccomp::CpuSet> {
        None
    }
    /// Serve the available buffers of queue `index`. Returns a bit mask of the queues that got
    /// used buffers. An `Err` means the queue is broken: the device is marked NEEDS_RESET.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String>;
    /// The device's interrupt, given once before the worker starts (for handlers that signal
    /// part of a long batch early: `process_chains_notify`).
    fn attach_interrupt(&mut self, _interrupt: Arc<dyn VirtioInterrupt>) {}
    /// One more fd to wait on (readable).
    fn extra_fd(&self) -> Option<RawFd> {
        None
    }
    /// Whether the extra fd should be watched now (e.g. not while there is no buffer to put
    /// its data in: epoll is level-triggered and would spin).
    fn extra_wanted(&self) -> bool {
        true
    }
    /// The extra fd is readable. Returns a bit mask of the queues that got used buffers.
    fn process_extra(
        &mut self,
        _queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        Ok(0)
    }
    /// Timer fds to wait on (rate limiters'), registered when the thread starts; a disarmed
    /// timer never wakes it.
    fn timer_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Timer fd `index` (of `timer_fds`) expired. Returns a bit mask of the queues that got used
    /// buffers.
    fn process_timer(
        &mut self,
        _index: usize,
        _queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        Ok(0)
    }
    /// The worker is being paused (its thread has stopped): complete every request still in
    /// flight (wait for it), so that nothing touches guest memory once the pause returns and
    /// the queues' positions say exactly what was done. Returns a bit mask of the queues that
    /// got used buffers (they are published and signalled before the pause returns).
    fn quiesce(
        &mut self,
        _queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        Ok(0)
    }
}

/// A worker; `stop` gives the handler back. It runs from `spawn` on; `pause` stops its thread
/// and keeps the queues (at their positions), the handler and the rest, `resume` starts a new
/// thread with them.
pub struct WorkerHandle<H> {
    kill: EventFd,
    name: String,
    thread: Option<JoinHandle<Worker<H>>>,
    /// The worker while paused (or after its thread ended).
    parked: Option<Worker<H>>,
}

impl<H: QueueHandler> WorkerHandle<H> {
    /// Spawns the worker thread `name` for `handler` with the activated queues of `ctx`.
    pub fn spawn(name: &str, handler: H, ctx: ActivateContext) -> Result<Self, ActivateError> {
        if ctx.queues.iter().all(Option::is_none) {
            return Err(ActivateError::NoQueues);
        }
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Thread)?;
        let kill2 = kill.try_clone().map_err(ActivateError::Thread)?;
        let mut queues = Vec::new();
        let mut evts = Vec::new();
        for q in ctx.queues {
            match q {
                Some((q, e)) => {
                    queues.push(Some(VirtQueue::new(q, &ctx.mem).with_dma(ctx.dma.clone())));
                    evts.push(Some(e));
                }
                None => {
                    queues.push(None);
                    evts.push(None);
                }
            }
        }
        let mut handler = handler;
        handler.attach_interrupt(ctx.interrupt.clone());
        let w = Worker {
            handler,
            queues,
            evts,
            kill: kill2,
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            status: ctx.status,
        };
        if INLINE.load(Ordering::Relaxed) {
            let mut w = w;
            w.serve_inline();
            return Ok(WorkerHandle {
                kill,
                name: name.to_string(),
                thread: None,
                parked: Some(w),
            });
        }
        let thread = start_thread(name, w).map_err(ActivateError::Thread)?;
        Ok(WorkerHandle {
            kill,
            name: name.to_string(),
            thread: Some(thread),
            parked: None,
        })
    }

    /// Stops the thread and returns the handler (None if the thread panicked).
    pub fn stop(mut self) -> Option<H> {
        self.join();
        self.parked.take().map(|w| w.handler)
    }

    /// Ends the thread (if running) and keeps the worker in `parked`. Requests in flight are
    /// not completed here (see `pause`).
    fn join(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        let _ = self.kill.write(1);
        match t.join() {
            Ok(w) => self.parked = Some(w),
            Err(_) => error!("{}: the worker thread panicked", self.name),
        }
        // The kill count is consumed, so a resumed thread does not see it.
        let _ = self.kill.read();
    }

    /// Pauses the worker: its thread ends, every request in flight is completed (the handler
    /// waits for it), published and signalled. When it returns, the device touches neither
    /// guest memory nor interrupts until `resume`. Idempotent. `Err` when the thread had
    /// panicked (the worker is gone: positions unknown).
    pub fn pause(&mut self) -> Result<(), String> {
        if self.thread.is_some() {
            self.join();
            if let Some(w) = self.parked.as_mut() {
                w.quiesce();
            }
        }
        match self.parked {
            Some(_) => Ok(()),
            None => Err(format!("{}: the worker thread died", self.name)),
        }
    }

    /// Whether the worker is paused (its thread not running).
    pub fn is_paused(&self) -> bool {
        self.thread.is_none()
    }

    /// Starts the paused worker again with the same queues at the same positions. Each queue
    /// is looked at once, so what the driver published meanwhile is served (its notifications
    /// are kept by the queue eventfds as well). Nothing to do when running.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.thread.is_some() {
            return Ok(());
        }
        if INLINE.load(Ordering::Relaxed) {
            if let Some(w) = self.parked.as_mut() {
                w.serve_inline();
            }
            return Ok(());
        }
        let Some(w) = self.parked.take() else {
            return Err(format!("{}: the worker thread died", self.name));
        };
        for e in w.evts.iter().flatten() {
            let _ = e.write(1);
        }
        // `start_thread` consumes the worker; on failure it is lost (as a failed activation).
        let t = start_thread(&self.name, w).map_err(|e| format!("{}: {e}", self.name))?;
        self.thread = Some(t);
        Ok(())
    }

    /// Each queue's `(next_avail, next_used)` while paused (`None` for a queue this worker does
    /// not run); `None` while running.
    pub fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        if self.thread.is_some() {
            return None;
        }
        let w = self.parked.as_ref()?;
        Some(
            w.queues
                .iter()
                .map(|q| {
                    q.as_ref()
                        .map(|q| (q.queue().next_avail(), q.queue().next_used()))
                })
                .collect(),
        )
    }

    /// The handler, while paused.
    pub fn handler(&self) -> Option<&H> {
        self.parked.as_ref().map(|w| &w.handler)
    }

    /// See `handler`: what the device changes in its handler while the worker is paused.
    pub fn handler_mut(&mut self) -> Option<&mut H> {
        self.parked.as_mut().map(|w| &mut w.handler)
    }
}

fn start_thread<H: QueueHandler>(
    name: &str,
    mut w: Worker<H>,
) -> std::io::Result<JoinHandle<Worker<H>>> {
    let mut filter = w.handler.seccomp().filter();
    let cpus = w.handler.cpus();
    if cpus.is_some() {
        // Only a pinned worker may set its CPUs (once, first thing), as a pinned vCPU.
        filter = filter.allow(&[::seccomp::Sysno::sched_setaffinity]);
    }
    let thread = name.to_string();
    seccomp::spawn(name.to_string(), filter, move || {
        if let Some(set) = cpus {
            if let Err(e) = set.pin_caller() {
                // The CPUs were checked when the device was built; the host took them away
                // since. The device cannot run where it was told to: broken until a reset.
                error!("{thread}: cannot run on its host CPUs {set:?}: {e}");
                w.broken("its thread cannot be pinned");
                return w;
            }
        }
        if let Err(e) = w.run() {
            error!("virtio worker failed: {e}");
        }
        w
    })
    .map_err(std::io::Error::other)
}

struct Worker<H> {
    handler: H,
    queues: Vec<Option<VirtQueue>>,
    evts: Vec<Option<EventFd>>,
    kill: EventFd,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    status: Arc<DeviceStatus>,
}

impl<H: QueueHandler> Worker<H> {
    /// Completes what the handler has in flight (its thread has ended): published and
    /// signalled here, on the pausing thread.
    fn quiesce(&mut self) {
        let r = self.handler.quiesce(&mut self.queues, &self.mem);
        self.publish_all();
        match r {
            Ok(used) => self.notify_mask(used),
            Err(e) => self.broken(&e),
        }
    }

    /// The inline (fuzzing) worker: what the thread would do for one kick of every queue and,
    /// while it has input, the extra fd (a few rounds at most), then what a pause does.
    fn serve_inline(&mut self) {
        for i in 0..self.queues.len() {
            if self.queues[i].is_some() {
                self.serve_queue(i);
            }
        }
        for _ in 0..4 {
            let fd = match self.handler.extra_fd() {
                Some(fd) if self.handler.extra_wanted() && !self.status.needs_reset() => fd,
                _ => break,
            };
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a zero timeout never blocks.
            if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
                break;
            }
            let r = self.handler.process_extra(&mut self.queues, &self.mem);
            self.publish_all();
            match r {
                Ok(used) => self.notify_mask(used),
                Err(e) => self.broken(&e),
            }
        }
        self.quiesce();
    }

    fn notify(&mut self, index: usize) {
        let Some(Some(q)) = self.queues.get_mut(index) else {
            return;
        };
        // With EVENT_IDX: whether used_event was passed; without it, always.
        if q.needs_notification() {
            self.interrupt.signal_queue(index);
        }
    }

    /// Makes every used buffer the handler added visible to the driver (whether or not it
    /// reported the queue in its mask).
    fn publish_all(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            q.publish();
        }
    }

    fn notify_mask(&mut self, mask: u64) {
        for i in 0..self.queues.len().min(64) {
            if mask & (1 << i) != 0 {
                self.notify(i);
            }
        }
    }

    fn serve_queue(&mut self, i: usize) {
        if self.status.needs_reset() {
            return;
        }
        let r = self.handler.process_queue(i, &mut self.queues, &self.mem);
        self.publish_all();
        match r {
            Ok(used) => self.notify_mask(used),
            Err(e) => self.broken(&e),
        }
    }

    fn broken(&mut self, what: &str) {
        if !self.status.needs_reset() {
            warn!("virtio device broken ({what}); it needs a reset");
            self.status.mark_needs_reset();
            self.interrupt.signal_config();
        }
    }

    fn run(&mut self) -> std::io::Result<()> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        add(self.kill.as_raw_fd(), KILL_TOKEN)?;
        for (i, e) in self.evts.iter().enumerate() {
            if let Some(e) = e {
                add(e.as_raw_fd(), i as u64)?;
            }
        }
        for (i, fd) in self
            .handler
            .timer_fds()
            .into_iter()
            .take(MAX_TIMERS)
            .enumerate()
        {
            add(fd, TIMER_TOKEN - i as u64)?;
        }
        // The extra fd as registered now, and whether registering it failed for good.
        let mut extra: Option<RawFd> = None;
        let mut extra_failed = false;
        let mut events = vec![EpollEvent::default(); self.evts.len() + 2];
        loop {
            let want = if self.status.needs_reset() || extra_failed || !self.handler.extra_wanted()
            {
                None
            } else {
                self.handler.extra_fd()
            };
            if want != extra {
                if let Some(fd) = extra.take() {
                    let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                if let Some(fd) = want {
                    match add(fd, EXTRA_TOKEN) {
                        Ok(()) => extra = Some(fd),
                        Err(e) => {
                            warn!("virtio worker: cannot watch fd {fd}: {e}");
                            extra_failed = true;
                        }
                    }
                }
            }
            // Idle, the worker sleeps here: no polling.
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    KILL_TOKEN => return Ok(()),
                    EXTRA_TOKEN => {
                        // A broken device stops listening (next loop), never spins on it.
                        if self.status.needs_reset() {
                            continue;
                        }
                        let r = self.handler.process_extra(&mut self.queues, &self.mem);
                        self.publish_all();
                        match r {
                            Ok(used) => self.notify_mask(used),
                            Err(e) => self.broken(&e),
                        }
                    }
                    t if t <= TIMER_TOKEN && t > TIMER_TOKEN - MAX_TIMERS as u64 => {
                        let r = self.handler.process_timer(
                            (TIMER_TOKEN - t) as usize,
                            &mut self.queues,
                            &self.mem,
                        );
                        self.publish_all();
                        match r {
                            Ok(used) => self.notify_mask(used),
                            Err(e) => self.broken(&e),
                        }
                    }
                    i => {
                        let i = i as usize;
                        if let Some(Some(e)) = self.evts.get(i) {
                            let _ = e.read();
                        }
                        self.serve_queue(i);
                    }
                }
            }
        }
    }
}

/// What became of a chain a limited handler was given (`process_chains_limited`).
pub enum Served {
    /// In the used ring now, with this many bytes written.
    Used(u32),
    /// It completes later (handed to the disk).
    Later,
    /// Not served: no budget now (rate limited). It and the rest of the batch go back to the
    /// avail ring, and serving stops with notifications still off; the handler serves the
    /// queue again when its timer fires.
    NotNow,
}

/// Pops every available chain of `q` and lets `f` serve it (its head and descriptors, as
/// `VirtQueue::chain` reads them): `Some(len)` puts it in the used ring now with `len` bytes
/// written, `None` means it completes later. Returns the bit for queue `index` if anything was
/// used. `Err` when the rings themselves are broken (avail index out of range, used ring
/// outside memory): the caller marks the device NEEDS_RESET.
pub fn process_chains<F>(index: usize, q: &mut VirtQueue, f: F) -> Result<u64, String>
where
    F: FnMut(u16, &[Descriptor]) -> Option<u32>,
{
    process_chains_notify(index, q, None, f)
}

/// `process_chains`, and with `early = Some((interrupt, n))` the used buffers are also
/// signalled part-way through a long batch (when the driver wants an interrupt then:
/// `VirtQueue::needs_notification`): every three quarters of what was available when the batch
/// started, and at least `n` completions apart. The driver can then refill the ring while the
/// device is still busy with the last quarter, instead of both taking turns. The caller
/// signals the rest.
pub fn process_chains_notify<F>(
    index: usize,
    q: &mut VirtQueue,
    early: Option<(&dyn VirtioInterrupt, u32)>,
    mut f: F,
) -> Result<u64, String>
where
    F: FnMut(u16, &[Descriptor]) -> Option<u32>,
{
    process_chains_limited(index, q, early, |h, d| match f(h, d) {
        Some(len) => Served::Used(len),
        None => Served::Later,
    })
}

/// `process_chains_notify` for a handler that may decline a chain (`Served::NotNow`).
pub fn process_chains_limited<F>(
    index: usize,
    q: &mut VirtQueue,
    early: Option<(&dyn VirtioInterrupt, u32)>,
    mut f: F,
) -> Result<u64, String>
where
    F: FnMut(u16, &[Descriptor]) -> Served,
{
    // The queue's scratch vectors, so a batch allocates nothing.
    let mut heads = std::mem::take(&mut q.heads);
    let mut descs = std::mem::take(&mut q.descs);
    let r = serve_chains(index, q, early, &mut heads, &mut descs, &mut f);
    q.heads = heads;
    q.descs = descs;
    r
}

fn serve_chains<F>(
    index: usize,
    q: &mut VirtQueue,
    early: Option<(&dyn VirtioInterrupt, u32)>,
    heads: &mut Vec<u16>,
    descs: &mut Vec<Descriptor>,
    f: &mut F,
) -> Result<u64, String>
where
    F: FnMut(u16, &[Descriptor]) -> Served,
{
    let mut used = false;
    let mut since_signal = 0u32;
    let every = match early {
        Some((_, n)) => {
            let avail = q.avail_idx(std::sync::atomic::Ordering::Acquire)?;
            let pending = u32::from(avail.0.wrapping_sub(q.queue().next_avail()));
            (pending * 3 / 4).max(n)
        }
        None => u32::MAX,
    };
    // While the queue is being drained the driver need not notify (VRING_USED_F_NO_NOTIFY);
    // notifications are re-enabled before sleeping, and the ring checked once more.
    q.disable_notification()?;
    'batches: loop {
        // Up to POP_BATCH chains per look at the avail index; they are served, and used, in
        // order, and the used index is published once for them.
        heads.clear();
        q.pop(heads, POP_BATCH)?;
        if heads.is_empty() {
            if q.enable_notification()? {
                q.disable_notification()?;
                continue;
            }
            break;
        }
        for (k, &head) in heads.iter().enumerate() {
            q.chain(head, descs);
            let len = match f(head, descs) {
                Served::Used(len) => len,
                Served::Later => continue,
                Served::NotNow => {
                    q.unpop_n((heads.len() - k) as u16);
                    q.publish();
                    break 'batches;
                }
            };
            q.add_used(head, len)?;
            used = true;
            if let Some((irq, _)) = early {
                since_signal += 1;
                if since_signal >= every {
                    since_signal = 0;
                    if q.needs_notification() {
                        irq.signal_queue(index);
                    }
                }
            }
        }
        q.publish();
    }
    Ok(if used { queue_bit(index) } else { 0 })
}

/// The bit of queue `index` in a used-queues mask.
pub fn queue_bit(index: usize) -> u64 {
    1u64.checked_shl(index as u32).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;

    pub(crate) struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn signal_queue(&self, _index: usize) {}
        fn signal_config(&self) {}
    }

    /// An activation with one ready queue in 1 MiB of guest memory (nothing interrupted), and
    /// the eventfd that notifies it.
    pub(crate) fn one_queue() -> (ActivateContext, EventFd) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivateContext {
            mem,
            interrupt: Arc::new(NoIrq),
            queues: vec![Some((q, kick.try_clone().unwrap()))],
            acked_features: 0,
            status: Arc::new(DeviceStatus::default()),
            dma: None,
        };
        (ctx, kick)
    }

    /// Counts how often it was asked to serve its queue.
    struct Count(Arc<std::sync::atomic::AtomicU32>);
    impl QueueHandler for Count {
        fn process_queue(
            &mut self,
            index: usize,
            queues: &mut [Option<VirtQueue>],
            _mem: &GuestMemoryMmap,
        ) -> Result<u64, String> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match queues.get_mut(index) {
                Some(Some(q)) => process_chains(index, q, |_, _| Some(0)),
                _ => Ok(0),
            }
        }
    }

    /// Nanoseconds the thread named `name` of this process has run (schedstat).
    fn thread_runtime(name: &str) -> Option<u64> {
        for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
                return s.split_whitespace().next()?.parse().ok();
            }
        }
        None
    }

    /// A worker that has just served its queue sleeps in epoll_wait: no polling, no CPU.
    #[test]
    fn idle_worker_sleeps() {
        let (ctx, kick) = one_queue();
        let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let w = WorkerHandle::spawn("vq-idle-test", Count(served.clone()), ctx).unwrap();
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while served.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue was not served"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before = thread_runtime("vq-idle-test")
            .expect("no /proc/self/task/*/schedstat: cannot measure the worker's CPU time");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let after = thread_runtime("vq-idle-test").unwrap();
        w.stop();
        assert!(
            after - before < 3_000_000,
            "idle worker ran {} us in 300 ms",
            (after - before) / 1000
        );
    }
}
