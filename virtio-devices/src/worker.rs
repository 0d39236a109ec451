//! The device thread: an epoll loop over the queue eventfds, one extra fd a device may want
//! (console input, an I/O completion fd) and a kill eventfd. Idle, it sleeps in epoll_wait.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivateContext, ActivateError, DeviceStatus, VirtioInterrupt};

const KILL_TOKEN: u64 = u64::MAX;
const EXTRA_TOKEN: u64 = u64::MAX - 1;
/// Most chains `process_chains_notify` pops per read of the avail index.
const POP_BATCH: usize = 16;
/// How long a drained queue is polled before the worker sleeps (`QueueHandler::poll_queues`).
pub const POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// What a device does with its queues, run on the worker thread.
pub trait QueueHandler: Send + 'static {
    /// Serve the available buffers of queue `index`. Returns a bit mask of the queues that got
    /// used buffers. An `Err` means the queue is broken: the device is marked NEEDS_RESET.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<Queue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String>;
    /// The device's interrupt, given once before the worker starts (for handlers that signal
    /// part of a long batch early: `process_chains_notify`).
    fn attach_interrupt(&mut self, _interrupt: Arc<dyn VirtioInterrupt>) {}
    /// Queues (bit mask) the worker polls for new buffers, for up to `POLL` after it has
    /// drained them, before it sleeps: waking from epoll costs more than the polling when the
    /// driver is about to add buffers. Queues served only together with an fd (net receive)
    /// are not polled.
    fn poll_queues(&self) -> u64 {
        0
    }
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
        _queues: &mut [Option<Queue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        Ok(0)
    }
}

/// A running worker; `stop` gives the handler back.
pub struct WorkerHandle<H> {
    kill: EventFd,
    thread: Option<JoinHandle<H>>,
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
                    queues.push(Some(q));
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
        let mut w = Worker {
            handler,
            queues,
            evts,
            kill: kill2,
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            status: ctx.status,
            poll_armed: 0,
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = w.run() {
                    error!("virtio worker failed: {e}");
                }
                w.handler
            })
            .map_err(ActivateError::Thread)?;
        Ok(WorkerHandle {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the handler (None if the thread panicked).
    pub fn stop(mut self) -> Option<H> {
        let _ = self.kill.write(1);
        self.thread.take()?.join().ok()
    }
}

struct Worker<H> {
    handler: H,
    queues: Vec<Option<Queue>>,
    evts: Vec<Option<EventFd>>,
    kill: EventFd,
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    status: Arc<DeviceStatus>,
    /// Queues that just had used buffers: `poll` looks at them before the worker sleeps.
    poll_armed: u64,
}

impl<H: QueueHandler> Worker<H> {
    fn notify(&mut self, index: usize) {
        let Some(Some(q)) = self.queues.get_mut(index) else {
            return;
        };
        // Without EVENT_IDX this checks VRING_AVAIL_F_NO_INTERRUPT.
        if q.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_queue(index);
        }
    }

    fn notify_mask(&mut self, mask: u64) {
        for i in 0..self.queues.len().min(64) {
            if mask & (1 << i) != 0 {
                self.notify(i);
            }
        }
    }

    /// Spins up to `POLL` until one of the handler's polled queues has available buffers;
    /// returns that queue.
    fn poll(&mut self) -> Option<usize> {
        // Only right after a polled queue had work: an idle queue (or one direction of a
        // device busy in the other) costs no polling.
        let mask = std::mem::take(&mut self.poll_armed) & self.handler.poll_queues();
        if mask == 0 || self.status.needs_reset() {
            return None;
        }
        let start = std::time::Instant::now();
        loop {
            for (i, q) in self.queues.iter().enumerate() {
                let Some(q) = q.as_ref().filter(|_| mask & queue_bit(i) != 0) else {
                    continue;
                };
                if q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|a| a.0 != q.next_avail())
                {
                    return Some(i);
                }
            }
            if start.elapsed() >= POLL {
                return None;
            }
            std::hint::spin_loop();
        }
    }

    fn serve_queue(&mut self, i: usize) {
        if self.status.needs_reset() {
            return;
        }
        match self.handler.process_queue(i, &mut self.queues, &self.mem) {
            Ok(used) => {
                self.poll_armed |= used;
                self.notify_mask(used);
            }
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
            // A queue with new buffers found by polling is served after a look at the other
            // fds (without sleeping), so a busy queue starves neither them nor the kill fd.
            let polled = self.poll();
            let n = match epoll.wait(if polled.is_some() { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(i) = polled {
                // Its notification, if any, is in `events`: served there.
                if !events[..n].iter().any(|e| e.data() == i as u64) {
                    self.serve_queue(i);
                }
            }
            for ev in &events[..n] {
                match ev.data() {
                    KILL_TOKEN => return Ok(()),
                    EXTRA_TOKEN => {
                        // A broken device stops listening (next loop), never spins on it.
                        if self.status.needs_reset() {
                            continue;
                        }
                        match self.handler.process_extra(&mut self.queues, &self.mem) {
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

/// The descriptor table of a queue, translated to host memory once per batch, so walking a
/// chain reads each descriptor with one volatile load instead of a guest memory region lookup
/// and copy per descriptor.
pub struct DescTable<'a> {
    /// Host address of the table, None when it does not lie inside one region (then chains
    /// are walked by virtio-queue's iterator, which looks every descriptor up).
    table: Option<*const u8>,
    size: u16,
    _mem: std::marker::PhantomData<&'a GuestMemoryMmap>,
}

impl<'a> DescTable<'a> {
    pub fn new(q: &Queue, mem: &'a GuestMemoryMmap) -> Self {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let size = q.size();
        let table = mem
            .get_slice(GuestAddress(q.desc_table()), 16 * usize::from(size))
            .ok()
            .map(|s| s.ptr_guard().as_ptr())
            // Read as two u64 (aligned: the table is 16-aligned in the guest, and regions are
            // mapped at page boundaries); anything else is left to the iterator.
            .filter(|p| p.align_offset(8) == 0);
        DescTable {
            table,
            size,
            _mem: std::marker::PhantomData,
        }
    }

    /// Descriptor `index` of the table at `base`, or None if out of range.
    fn load(&self, base: *const u8, index: u16) -> Option<Descriptor> {
        if index >= self.size {
            return None;
        }
        // SAFETY: `base` is the 8-aligned host address of `size` descriptors (16 bytes each)
        // inside one guest memory region (`get_slice` checked it), which stays mapped while
        // `mem` is borrowed ('a); index < size. Volatile reads: the guest may write the table
        // at any time (then it gets what it wrote, checked as any descriptor).
        let (a, b) = unsafe {
            let p = base.add(16 * usize::from(index)).cast::<u64>();
            (
                std::ptr::read_volatile(p),
                std::ptr::read_volatile(p.add(1)),
            )
        };
        let (a, b) = (u64::from_le(a), u64::from_le(b));
        Some(Descriptor::new(
            a,
            b as u32,
            (b >> 32) as u16,
            (b >> 48) as u16,
        ))
    }

    /// Reads the descriptors of `chain` into `out` (cleared first), exactly as virtio-queue's
    /// iterator yields them: at most the queue size of them (a loop ends there), none past an
    /// index out of range, none that would take the total length past 4 GiB. A chain with an
    /// indirect descriptor is left to virtio-queue's iterator, which checks the indirect table.
    pub fn collect(&self, chain: DescriptorChain<&GuestMemoryMmap>, out: &mut Vec<Descriptor>) {
        out.clear();
        if let Some(base) = self.table {
            let (mut index, mut ttl, mut bytes) = (chain.head_index(), self.size, 0u32);
            loop {
                if ttl == 0 {
                    return;
                }
                let Some(d) = self.load(base, index) else {
                    return;
                };
                if d.refers_to_indirect_table() {
                    break;
                }
                let Some(b) = bytes.checked_add(d.len()) else {
                    return;
                };
                bytes = b;
                out.push(d);
                if !d.has_next() {
                    return;
                }
                index = d.next();
                ttl -= 1;
            }
            out.clear();
        }
        out.extend(chain);
    }
}

/// Pops every available chain of `q` and lets `f` serve it: `Some(len)` publishes it as used
/// now with `len` bytes written, `None` means it completes later. Returns the bit for queue
/// `index` if anything was used. `Err` when the rings themselves are broken (avail index out
/// of range, used ring outside memory): the caller marks the device NEEDS_RESET.
pub fn process_chains<F>(
    index: usize,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    mut f: F,
) -> Result<u64, String>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
{
    process_chains_notify(index, q, mem, None, |chain, _| f(chain))
}

/// `process_chains`, with the queue's descriptor table translated once for the batch
/// (`DescTable::collect` reads a chain through it), and with `early = Some((interrupt, n))` the used buffers are also
/// signalled part-way through a long batch (when the driver wants an interrupt then: EVENT_IDX
/// or NO_INTERRUPT): every three quarters of what was available when the batch started, and at
/// least `n` completions apart. The driver can then refill the ring while the device is still
/// busy with the last quarter, instead of both taking turns. The caller signals the rest.
pub fn process_chains_notify<F>(
    index: usize,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    early: Option<(&dyn VirtioInterrupt, u32)>,
    mut f: F,
) -> Result<u64, String>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>, &DescTable) -> Option<u32>,
{
    let table = DescTable::new(q, mem);
    let mut batch = Vec::with_capacity(POP_BATCH);
    let mut used = false;
    let mut since_signal = 0u32;
    let every = match early {
        Some((_, n)) => {
            let avail = q
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(|e| format!("avail ring: {e}"))?;
            let pending = u32::from(avail.0.wrapping_sub(q.next_avail()));
            (pending * 3 / 4).max(n)
        }
        None => u32::MAX,
    };
    // While the queue is being drained the driver need not notify (VRING_USED_F_NO_NOTIFY);
    // notifications are re-enabled before sleeping, and the ring checked once more.
    q.disable_notification(mem)
        .map_err(|e| format!("used ring: {e}"))?;
    loop {
        // Up to POP_BATCH chains per look at the avail index (one read of it, not one per
        // chain); they are served, and used, in order.
        match q.iter(mem) {
            Ok(it) => batch.extend(it.take(POP_BATCH)),
            Err(e) => return Err(format!("avail ring: {e}")),
        }
        if batch.is_empty() {
            match q.enable_notification(mem) {
                Ok(true) => {
                    q.disable_notification(mem)
                        .map_err(|e| format!("used ring: {e}"))?;
                    continue;
                }
                Ok(false) => break,
                Err(e) => return Err(format!("avail ring: {e}")),
            }
        }
        for chain in batch.drain(..) {
            let head = chain.head_index();
            if let Some(len) = f(chain, &table) {
                q.add_used(mem, head, len)
                    .map_err(|e| format!("used ring: {e}"))?;
                used = true;
                if let Some((irq, _)) = early {
                    since_signal += 1;
                    if since_signal >= every {
                        since_signal = 0;
                        if q.needs_notification(mem).unwrap_or(true) {
                            irq.signal_queue(index);
                        }
                    }
                }
            }
        }
    }
    Ok(if used { queue_bit(index) } else { 0 })
}

/// The bit of queue `index` in a used-queues mask.
pub fn queue_bit(index: usize) -> u64 {
    1u64.checked_shl(index as u32).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    /// Index, address, length, flags, next.
    type RawDesc = (u16, u64, u32, u16, u16);
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn desc(mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(DESC + 16 * u64::from(i));
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
    }

    /// `DescTable::collect` yields exactly what virtio-queue's iterator yields, for chains a
    /// hostile driver may write: loops, indexes out of range, lengths past 4 GiB, indirect
    /// descriptors (left to the iterator).
    #[test]
    fn desc_table_walk_matches_the_iterator() {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut q = Queue::new(8).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let chains: Vec<Vec<RawDesc>> = vec![
            // Plain three-descriptor chain.
            vec![
                (0, 0x8000, 16, NEXT, 1),
                (1, 0x9000, 512, NEXT | WRITE, 2),
                (2, 0xa000, 1, WRITE, 0),
            ],
            // A loop: cut at the queue size.
            vec![(0, 0x8000, 16, NEXT, 1), (1, 0x9000, 16, NEXT, 0)],
            // Next index out of range.
            vec![(0, 0x8000, 16, NEXT, 9)],
            // Past 4 GiB in total.
            vec![(0, 0x8000, u32::MAX, NEXT, 1), (1, 0x9000, 2, 0, 0)],
            // Indirect table (two descriptors at 0x6000), then the iterator's checks apply.
            vec![(0, 0x6000, 32, INDIRECT, 0)],
            // Indirect with a bad length.
            vec![(0, 0x6000, 17, INDIRECT, 0)],
        ];
        for d in [(0x8000u64, 16u32, 1u16, 1u16), (0x9000, 8, 2, 0)]
            .iter()
            .enumerate()
        {
            let a = GuestAddress(0x6000 + 16 * d.0 as u64);
            let (addr, len, flags, next) = *d.1;
            mem.write_obj(addr, a).unwrap();
            mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
        }
        let mut out = Vec::new();
        for (n, c) in chains.iter().enumerate() {
            for &(i, a, l, f, nx) in c {
                desc(&mem, i, a, l, f, nx);
            }
            mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * (n as u64 % 8)))
                .unwrap();
            mem.write_obj((n + 1) as u16, GuestAddress(AVAIL + 2))
                .unwrap();
            let chain = q.iter(&mem).unwrap().next().unwrap();
            let expect: Vec<Descriptor> = chain.clone().collect();
            DescTable::new(&q, &mem).collect(chain, &mut out);
            let key = |d: &Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
            assert_eq!(
                out.iter().map(key).collect::<Vec<_>>(),
                expect.iter().map(key).collect::<Vec<_>>(),
                "chain {n}"
            );
        }
    }
}
