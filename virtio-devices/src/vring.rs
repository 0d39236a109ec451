//! A split virtqueue (virtio 1.2, 2.7) as a device's worker serves it.
//!
//! virtio-queue's `Queue` keeps what the driver configured and the device's positions
//! (`next_avail`, `next_used`). The rings themselves are translated to host memory once, when
//! the worker starts, and read and written with volatile loads and stores (atomics for the
//! indexes): one bounds check per access instead of a guest memory region lookup and a copy.
//! A ring that does not lie inside one guest memory region is accessed through `GuestMemory`
//! (checked per access) or through virtio-queue, as before.
//!
//! Used buffers are written to the ring at once but the used index is published in batches
//! (`VirtQueue::publish`, with Release ordering), and the driver's interrupt suppression is
//! evaluated here (`VirtQueue::needs_notification`): virtio-queue keeps the count it needs
//! for EVENT_IDX private, so the decision is taken exactly as virtio-queue takes it, from the
//! used index at the previous decision.
//!
//! Writes to the used ring through its host address bypass vm-memory, so they mark the pages
//! they touch in the region's dirty bitmap themselves (a used element as it is written, the
//! used index as it is published), as vm-memory's writes do, for live migration.

use std::num::Wrapping;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use guest_memory::{Bitmap, GuestMemoryMmap, GuestMmapRegion};
use log::debug;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::Dma;

/// Bytes of a descriptor.
const DESC_SIZE: u64 = 16;
/// Bytes of a used ring element (id, len).
const USED_ELEM_SIZE: u64 = 8;
/// The largest indirect table virtio-queue follows (its index is a u16).
const MAX_INDIRECT: u32 = u16::MAX as u32;

/// Where a descriptor table lies: in host memory (one region, 8-aligned), or only known by its
/// guest address (each descriptor read through `GuestMemory`).
#[derive(Clone, Copy)]
enum Table {
    Host(NonNull<u8>),
    Guest(GuestAddress),
}

/// One queue of a running device. See the module documentation.
pub struct VirtQueue {
    q: Queue,
    /// Keeps the guest memory regions the pointers below point into mapped.
    mem: GuestMemoryMmap,
    size: u16,
    /// `size - 1` when the size is a power of two (always, with virtio-queue), else 0.
    mask: u16,
    /// Host address of the descriptor table (`16 * size` bytes, 8-aligned).
    desc: Option<NonNull<u8>>,
    /// Host address of the available ring (flags, idx, ring, used_event; 2-aligned).
    avail: Option<NonNull<u8>>,
    /// Host address of the used ring (flags, idx, ring, avail_event; 4-aligned).
    used: Option<NonNull<u8>>,
    /// With `used`: the mapping the used ring lies in (its dirty bitmap) and the ring's offset
    /// in it.
    used_map: Option<(Arc<GuestMmapRegion>, usize)>,
    /// `next_used` when `needs_notification` last ran (Linux's "old" used index).
    signalled: Wrapping<u16>,
    /// The used index the driver can see (`next_used` once published).
    published: u16,
    /// The driver's avail index when it was last read: the entries before it are available
    /// and are popped without reading the index again (QEMU's shadow avail index), which
    /// saves a load from a cache line the driver keeps writing.
    avail_seen: u16,
    /// Scratch space for `process_chains`: heads popped, descriptors of one chain.
    pub(crate) heads: Vec<u16>,
    pub(crate) descs: Vec<Descriptor>,
    /// Behind a virtual IOMMU: descriptors hold I/O virtual addresses, translated as the
    /// chain is read (`chain`).
    dma: Option<Dma>,
}

/// Where a descriptor the IOMMU does not map for its access points once translated: far
/// above any guest memory, so the device fails the request as it fails any buffer outside
/// guest memory.
pub(crate) const UNMAPPED: u64 = 0xffff_0000_0000_0000;

// SAFETY: the raw pointers point into guest memory mappings that `mem` keeps alive wherever
// the queue goes; guest memory is shared with the guest's vCPUs anyway and only accessed with
// volatile or atomic operations. The queue is used by one thread at a time (`&mut self`).
unsafe impl Send for VirtQueue {}

/// `chain`'s translation of the descriptors in `out` through `dma` (see there).
#[inline(never)]
fn translate_chain(dma: &Dma, out: &mut Vec<Descriptor>) {
    let raw = std::mem::replace(out, Vec::with_capacity(out.len()));
    for d in raw {
        let (flags, next) = (d.flags(), d.next());
        let r = dma.translate(d.addr().0, u64::from(d.len()), d.is_write_only(), |a, n| {
            // Pieces of one descriptor: each below 4 GiB.
            out.push(Descriptor::new(a, n as u32, flags, next))
        });
        if let Err(e) = r {
            debug!("descriptor: {e}");
            out.push(Descriptor::new(UNMAPPED, d.len(), flags, next));
        }
    }
}

/// The host address of `[addr, addr + len)` when it lies inside one region of `mem` and is
/// `align`-aligned.
fn host_range(mem: &GuestMemoryMmap, addr: u64, len: u64, align: usize) -> Option<NonNull<u8>> {
    let len = usize::try_from(len).ok()?;
    let s = mem.get_slice(GuestAddress(addr), len).ok()?;
    let p = s.ptr_guard_mut().as_ptr();
    if p.align_offset(align) != 0 {
        return None;
    }
    NonNull::new(p)
}

impl VirtQueue {
    /// Wraps `q` (already checked with `Queue::is_valid`) for the worker that owns `mem`.
    pub fn new(q: Queue, mem: &GuestMemoryMmap) -> Self {
        let size = q.size();
        let n = u64::from(size);
        let desc = host_range(mem, q.desc_table(), DESC_SIZE * n, 8);
        let avail = host_range(mem, q.avail_ring(), 6 + 2 * n, 2);
        let used = host_range(mem, q.used_ring(), 6 + USED_ELEM_SIZE * n, 4);
        let used_map = used.and_then(|_| {
            let r = mem.find_region(GuestAddress(q.used_ring()))?;
            let off = usize::try_from(q.used_ring() - r.start_addr().0).ok()?;
            Some((r.get_mmap(), off))
        });
        let next_used = q.next_used();
        let avail_seen = q.next_avail();
        VirtQueue {
            q,
            mem: mem.clone(),
            size,
            mask: if size.is_power_of_two() { size - 1 } else { 0 },
            desc,
            avail,
            used: used.filter(|_| used_map.is_some()),
            used_map,
            signalled: Wrapping(next_used),
            published: next_used,
            avail_seen,
            heads: Vec::new(),
            descs: Vec::new(),
            dma: None,
        }
    }

    /// Descriptors hold I/O virtual addresses of `dma` (the rings of `q` were translated
    /// already, by the transport).
    pub fn with_dma(mut self, dma: Option<Dma>) -> Self {
        self.dma = dma;
        self
    }

    /// The queue as the driver configured it.
    pub fn queue(&self) -> &Queue {
        &self.q
    }

    /// Whether each ring is accessed through host pointers (descriptors, avail, used).
    #[cfg(test)]
    pub(crate) fn fast(&self) -> (bool, bool, bool) {
        (
            self.desc.is_some(),
            self.avail.is_some(),
            self.used.is_some(),
        )
    }

    /// Loads the 16-bit little-endian field at byte `off` of the ring at `base`.
    ///
    /// # Safety
    /// `base + off` must be a 2-aligned address inside a ring `VirtQueue::new` translated.
    unsafe fn load16(base: NonNull<u8>, off: usize, order: Ordering) -> u16 {
        // SAFETY: per the caller, aligned and inside a mapping `self.mem` keeps alive. An
        // atomic: the driver writes the field concurrently.
        let a = unsafe { AtomicU16::from_ptr(base.as_ptr().add(off).cast::<u16>()) };
        u16::from_le(a.load(order))
    }

    /// Stores `v` little-endian into the 16-bit field at byte `off` of the ring at `base`.
    ///
    /// # Safety
    /// As `load16`.
    unsafe fn store16(base: NonNull<u8>, off: usize, v: u16, order: Ordering) {
        // SAFETY: as in `load16`.
        let a = unsafe { AtomicU16::from_ptr(base.as_ptr().add(off).cast::<u16>()) };
        a.store(v.to_le(), order);
    }

    /// The driver's avail index.
    pub fn avail_idx(&self, order: Ordering) -> Result<Wrapping<u16>, String> {
        match self.avail {
            // SAFETY: offset 2 of the 2-aligned avail ring `new` translated.
            Some(a) => Ok(Wrapping(unsafe { Self::load16(a, 2, order) })),
            None => self
                .q
                .avail_idx(&self.mem, order)
                .map_err(|e| format!("avail ring: {e}")),
        }
    }

    /// Whether the driver has made buffers available that were not popped yet.
    pub fn has_avail(&self) -> bool {
        self.avail_idx(Ordering::Acquire)
            .is_ok_and(|a| a.0 != self.q.next_avail())
    }

    /// The ring slot of free-running index `i`. The size is a power of two (virtio-queue
    /// accepts no other), so a mask; a division otherwise.
    #[inline]
    fn slot(&self, i: u16) -> usize {
        usize::from(if self.mask != 0 {
            i & self.mask
        } else {
            i % self.size
        })
    }

    /// Reads the driver's avail index again; returns how many entries are available past
    /// `next`. `Err` when the index is more than the queue size ahead (virtio-queue's
    /// `InvalidAvailRingIndex`): the ring is broken.
    fn refresh_avail(&mut self, next: u16) -> Result<u16, String> {
        let idx = self.avail_idx(Ordering::Acquire)?;
        let pending = idx.0.wrapping_sub(next);
        if pending > self.size {
            return Err(format!(
                "avail ring: index {} is more than {} ahead of {next}",
                idx.0, self.size
            ));
        }
        self.avail_seen = idx.0;
        Ok(pending)
    }

    /// The head in slot `slot` of the avail ring at `a`.
    ///
    /// # Safety
    /// `a` must be the translated avail ring of this queue and `slot` below its size.
    unsafe fn avail_entry(a: NonNull<u8>, slot: usize) -> u16 {
        // SAFETY: slot < size (per the caller), so the entry lies inside the translated avail
        // ring (4 bytes of header, then `size` 2-byte entries); 2-aligned. The driver wrote the
        // entry before the index it published (read with Acquire in `refresh_avail`).
        u16::from_le(unsafe { std::ptr::read_volatile(a.as_ptr().add(4 + 2 * slot).cast::<u16>()) })
    }

    /// Pops the heads of up to `max` available chains into `out`, in ring order. The avail
    /// index is read (once) only when fewer than `max` entries are known to be available from
    /// the last read. `Err` when the driver's avail index is more than the queue size ahead
    /// (virtio-queue's `InvalidAvailRingIndex`) or the queue is not usable: the ring is broken.
    /// A driver that moves its index out of range while entries it published before are
    /// still unpopped gets those first, then the error.
    pub fn pop(&mut self, out: &mut Vec<u16>, max: usize) -> Result<(), String> {
        let Some(a) = self.avail else {
            // Not in one region: virtio-queue reads each entry through guest memory.
            let it = self
                .q
                .iter(&self.mem)
                .map_err(|e| format!("avail ring: {e}"))?;
            out.extend(it.take(max).map(|c| c.head_index()));
            return Ok(());
        };
        // As virtio-queue's iterator: a queue with its avail ring at 0 is not ready.
        if self.q.avail_ring() == 0 {
            return Err("avail ring: queue not ready".into());
        }
        let next = self.q.next_avail();
        let mut pending = self.avail_seen.wrapping_sub(next);
        // (More than the queue size cannot come from the last read; read again then too.)
        if usize::from(pending) < max || pending > self.size {
            pending = self.refresh_avail(next)?;
        }
        let take = usize::from(pending).min(max);
        for i in 0..take {
            // SAFETY: `a` is this queue's translated avail ring; `slot` is below its size.
            out.push(unsafe { Self::avail_entry(a, self.slot(next.wrapping_add(i as u16))) });
        }
        self.q.set_next_avail(next.wrapping_add(take as u16));
        Ok(())
    }

    /// Pops the head of the next available chain, if any (`pop` for one).
    pub fn pop_one(&mut self) -> Result<Option<u16>, String> {
        let Some(a) = self.avail.filter(|_| self.q.avail_ring() != 0) else {
            let mut one = std::mem::take(&mut self.heads);
            one.clear();
            let r = self.pop(&mut one, 1);
            let head = one.first().copied();
            self.heads = one;
            return r.map(|_| head);
        };
        let next = self.q.next_avail();
        let known = self.avail_seen.wrapping_sub(next);
        if (known == 0 || known > self.size) && self.refresh_avail(next)? == 0 {
            return Ok(None);
        }
        // SAFETY: `a` is this queue's translated avail ring; `slot` is below its size.
        let head = unsafe { Self::avail_entry(a, self.slot(next)) };
        self.q.set_next_avail(next.wrapping_add(1));
        Ok(Some(head))
    }

    /// Gives the last popped chain back: it is popped again next time.
    pub fn unpop(&mut self) {
        self.q.go_to_previous_position();
    }

    /// Gives the last `n` popped chains back (a device that may not serve them now).
    pub fn unpop_n(&mut self, n: u16) {
        let next = self.q.next_avail();
        self.q.set_next_avail(next.wrapping_sub(n));
    }

    /// Descriptor `index` of `table`, or None when it cannot be read.
    fn load(&self, table: Table, index: u16) -> Option<Descriptor> {
        match table {
            Table::Host(base) => {
                // SAFETY: `base` is the 8-aligned host address of a table of at least
                // `index + 1` descriptors inside one region (the caller checked index < its
                // size), kept mapped by `self.mem`. Volatile: the guest may write the table at
                // any time (then it gets what it wrote, checked as any descriptor).
                let (a, b) = unsafe {
                    let p = base.as_ptr().add(16 * usize::from(index)).cast::<u64>();
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
            Table::Guest(addr) => {
                let at = addr.0.checked_add(DESC_SIZE * u64::from(index))?;
                self.mem.read_obj::<Descriptor>(GuestAddress(at)).ok()
            }
        }
    }

    /// Reads the descriptors of the chain at `head` into `out` (cleared first), exactly as
    /// virtio-queue's `DescriptorChain` iterator yields them: at most the table's size of
    /// descriptors (a loop ends there), none past an index out of range or an unreadable
    /// descriptor, none that would take the total length past 4 GiB; an indirect descriptor
    /// switches to its table (length a multiple of 16, at most 65535 entries, no indirect
    /// descriptor inside it), with a fresh limit of that table's size.
    ///
    /// Behind a virtual IOMMU, each descriptor is translated (split where its guest-physical
    /// pieces are not contiguous); one not mapped for its access (device writes need a
    /// writable mapping) points at `UNMAPPED`.
    #[inline]
    pub fn chain(&self, head: u16, out: &mut Vec<Descriptor>) {
        self.chain_raw(head, out);
        if let Some(dma) = &self.dma {
            translate_chain(dma, out);
        }
    }

    #[inline]
    fn chain_raw(&self, head: u16, out: &mut Vec<Descriptor>) {
        out.clear();
        // The common one-descriptor chain (a receive buffer, say): no walk.
        if let Some(p) = self.desc.filter(|_| head < self.size) {
            if let Some(d) = self.load(Table::Host(p), head) {
                if !d.has_next() && !d.refers_to_indirect_table() {
                    out.push(d);
                    return;
                }
            }
        }
        self.walk(head, out);
    }

    /// `chain` for chains of several descriptors or indirect ones.
    #[inline(never)]
    fn walk(&self, head: u16, out: &mut Vec<Descriptor>) {
        let mut table = match self.desc {
            Some(p) => Table::Host(p),
            None => Table::Guest(GuestAddress(self.q.desc_table())),
        };
        let (mut size, mut ttl, mut index) = (self.size, self.size, head);
        let (mut bytes, mut indirect) = (0u32, false);
        loop {
            if ttl == 0 || index >= size {
                return;
            }
            let Some(d) = self.load(table, index) else {
                return;
            };
            if d.refers_to_indirect_table() {
                if indirect || d.len() % DESC_SIZE as u32 != 0 {
                    return;
                }
                let n = d.len() / DESC_SIZE as u32;
                if n > MAX_INDIRECT {
                    return;
                }
                indirect = true;
                size = n as u16;
                ttl = size;
                index = 0;
                let addr = match &self.dma {
                    None => d.addr().0,
                    Some(dma) => match dma.contiguous(d.addr().0, u64::from(d.len()), false) {
                        Ok(a) => a,
                        Err(e) => {
                            debug!("indirect table: {e}");
                            return;
                        }
                    },
                };
                table = match host_range(&self.mem, addr, u64::from(d.len()), 8) {
                    Some(p) => Table::Host(p),
                    None => Table::Guest(GuestAddress(addr)),
                };
                continue;
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
    }

    /// Puts chain `head` in the used ring with `len` bytes written. The driver sees it once
    /// the used index is published (`publish`, `needs_notification`). `Err` for a head out of
    /// range or a used ring outside memory: the ring is broken.
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), String> {
        let Some(u) = self.used.filter(|_| head < self.size) else {
            return self.add_used_slow(head, len);
        };
        let next = self.q.next_used();
        let slot = self.slot(next);
        // SAFETY: slot < size: the element (two u32) lies inside the translated, 4-aligned
        // used ring (4 bytes of header, then `size` 8-byte elements).
        unsafe {
            let p = u.as_ptr().add(4 + 8 * slot).cast::<u32>();
            std::ptr::write_volatile(p, u32::from(head).to_le());
            std::ptr::write_volatile(p.add(1), len.to_le());
        }
        self.mark_used(4 + 8 * slot, 8);
        self.q.set_next_used(next.wrapping_add(1));
        Ok(())
    }

    /// `add_used` for a used ring not in one region (virtio-queue writes the element and the
    /// index) or a head out of range (an error).
    #[cold]
    #[inline(never)]
    fn add_used_slow(&mut self, head: u16, len: u32) -> Result<(), String> {
        if self.used.is_some() {
            return Err(format!("used ring: head {head} out of range"));
        }
        self.q
            .add_used(&self.mem, head, len)
            .map_err(|e| format!("used ring: {e}"))?;
        self.published = self.q.next_used();
        Ok(())
    }

    /// Makes every used buffer added so far visible to the driver: stores the used index,
    /// ordered after the elements (Release), as virtio-queue's `add_used` does.
    pub fn publish(&mut self) {
        let next = self.q.next_used();
        if next == self.published {
            return;
        }
        if let Some(u) = self.used {
            // SAFETY: offset 2 of the 4-aligned used ring `new` translated.
            unsafe { Self::store16(u, 2, next, Ordering::Release) };
            self.mark_used(2, 2);
        }
        self.published = next;
    }

    /// Marks `len` bytes at byte `off` of the used ring (just written through `used`) dirty in
    /// its region's bitmap, after the write (see `guest_memory`).
    #[inline]
    fn mark_used(&self, off: usize, len: usize) {
        if let Some((map, at)) = &self.used_map {
            map.bitmap().mark_dirty(at + off, len);
        }
    }

    /// Publishes the used buffers, then tells whether the driver wants an interrupt for those
    /// added since the previous call, as virtio-queue's `needs_notification` does: with
    /// EVENT_IDX, when `used_event` lies in [previous used index, used index); without it,
    /// always (virtio-queue does not look at VRING_AVAIL_F_NO_INTERRUPT). A `used_event` that
    /// cannot be read asks for the interrupt.
    pub fn needs_notification(&mut self) -> bool {
        self.publish();
        // The used index must be visible before the driver's used_event is read.
        fence(Ordering::SeqCst);
        let new = Wrapping(self.q.next_used());
        let old = std::mem::replace(&mut self.signalled, new);
        if !self.q.event_idx_enabled() {
            return true;
        }
        let off = 4 + 2 * usize::from(self.size);
        let used_event = match self.avail {
            // SAFETY: used_event is the 2-aligned u16 right after the `size` entries of the
            // translated avail ring.
            Some(a) => unsafe { Self::load16(a, off, Ordering::Relaxed) },
            None => {
                let at = self.q.avail_ring().checked_add(off as u64);
                match at.and_then(|at| {
                    self.mem
                        .load::<u16>(GuestAddress(at), Ordering::Relaxed)
                        .ok()
                }) {
                    Some(v) => u16::from_le(v),
                    None => return true,
                }
            }
        };
        new - Wrapping(used_event) - Wrapping(1) < new - old
    }

    /// Asks the driver to notify again for new buffers (virtio-queue's `enable_notification`:
    /// VRING_USED_F_NO_NOTIFY cleared, or avail_event set); returns whether buffers arrived
    /// meanwhile (then they must be served: no notification comes for them).
    pub fn enable_notification(&mut self) -> Result<bool, String> {
        self.q
            .enable_notification(&self.mem)
            .map_err(|e| format!("avail ring: {e}"))
    }

    /// Tells the driver not to notify while the queue is being drained.
    pub fn disable_notification(&mut self) -> Result<(), String> {
        self.q
            .disable_notification(&self.mem)
            .map_err(|e| format!("used ring: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    /// Index, address, length, flags, next.
    type RawDesc = (u16, u64, u32, u16, u16);

    fn write_desc(mem: &GuestMemoryMmap, table: u64, d: RawDesc) {
        let (i, addr, len, flags, next) = d;
        let at = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    fn queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
        let mut q = Queue::new(size).unwrap();
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// The used ring written through its host address marks its pages as vm-memory's writes
    /// do: an element's page when it is added, the index's when it is published; popping and
    /// walking chains mark nothing. A ring that is not in one region goes through virtio-queue
    /// (vm-memory), which marks too.
    #[test]
    fn used_ring_writes_mark_their_pages() {
        use crate::tests::dirty_pages;
        // 16 entries; the ring starts 8 bytes before page 4: flags and idx in page 3, element 0
        // across pages 3 and 4, elements 1-15 in page 4.
        let used = 0x4000 - 8;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut vq = VirtQueue::new(queue(16, DESC, AVAIL, used), &mem);
        assert_eq!(vq.fast(), (true, true, true));
        for i in 0..4u16 {
            write_desc(&mem, DESC, (i, 0x8000, 16, 0, 0));
            mem.write_obj(i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
        dirty_pages(&mem);
        let mut heads = Vec::new();
        vq.pop(&mut heads, 4).unwrap();
        let mut descs = Vec::new();
        for &h in &heads {
            vq.chain(h, &mut descs);
        }
        assert_eq!(heads, [0, 1, 2, 3]);
        assert_eq!(dirty_pages(&mem), [] as [u64; 0], "reads mark nothing");
        vq.add_used(heads[0], 16).unwrap();
        assert_eq!(dirty_pages(&mem), [3, 4], "element 0");
        vq.add_used(heads[1], 16).unwrap();
        assert_eq!(dirty_pages(&mem), [4], "element 1");
        vq.publish();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 2);
        assert_eq!(dirty_pages(&mem), [3], "the used index");
        vq.publish();
        assert_eq!(dirty_pages(&mem), [] as [u64; 0], "nothing new to publish");

        // The same ring across two regions (element 0 across the boundary at 0x4000):
        // virtio-queue writes it.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0xc000),
        ])
        .unwrap();
        let mut vq = VirtQueue::new(queue(16, DESC, AVAIL, used), &mem);
        assert_eq!(vq.fast(), (true, true, false));
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        dirty_pages(&mem);
        let mut heads = Vec::new();
        vq.pop(&mut heads, 1).unwrap();
        vq.add_used(heads[0], 16).unwrap();
        vq.publish();
        // Page 3 (the index and element 0's first half, in the first region) and page 4 (its
        // second half, in the second region).
        assert_eq!(dirty_pages(&mem), [3, 4]);
    }

    fn key(d: &Descriptor) -> (u64, u32, u16, u16) {
        (d.addr().0, d.len(), d.flags(), d.next())
    }

    /// `VirtQueue::chain` yields exactly what virtio-queue's iterator yields, for chains a
    /// hostile driver may write (loops, indexes out of range, lengths past 4 GiB, indirect
    /// tables good and bad), with the tables in one region (host pointers) and straddling two
    /// regions (read through guest memory).
    /// The avail index is read again only once the entries known from the last read are
    /// popped; an index moved out of range meanwhile is an error then, not before.
    #[test]
    fn avail_index_read_when_needed() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut vq = VirtQueue::new(queue(16, DESC, AVAIL, USED), &mem);
        for (i, head) in [3u16, 1, 4, 1].iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut got = Vec::new();
        vq.pop(&mut got, 2).unwrap();
        assert_eq!(got, [3, 1]);
        // Out of range: more than the queue size ahead.
        mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(vq.pop_one().unwrap(), Some(4));
        got.clear();
        vq.pop(&mut got, 1).unwrap();
        assert_eq!(got, [1]);
        assert!(vq.pop_one().is_err());
        assert!(vq.pop(&mut got, 1).is_err());
        // Back in range, with two more entries.
        for (i, head) in [5u16, 9].iter().enumerate() {
            mem.write_obj(*head, GuestAddress(AVAIL + 4 + 2 * (4 + i as u64)))
                .unwrap();
        }
        mem.write_obj(6u16, GuestAddress(AVAIL + 2)).unwrap();
        got.clear();
        vq.pop(&mut got, 8).unwrap();
        assert_eq!(got, [5, 9]);
        assert_eq!(vq.pop_one().unwrap(), None);
    }

    #[test]
    fn chain_walk_matches_virtio_queue() {
        // Indirect tables: at 0x6000 (three descriptors, a loop in the last), at 0x6ff0
        // (straddles the region boundary at 0x7000 in the two-region layout).
        let indirect: Vec<(u64, Vec<RawDesc>)> = vec![
            (
                0x6000,
                vec![
                    (0, 0x8000, 16, NEXT, 1),
                    (1, 0x9000, 8, NEXT | WRITE, 2),
                    (2, 0xa000, 1, WRITE, 0),
                ],
            ),
            (
                0x6100,
                vec![(0, 0x8000, 16, NEXT, 1), (1, 0x9000, 8, NEXT, 0)],
            ),
            (0x6200, vec![(0, 0x8000, 16, NEXT, 7)]),
            (0x6300, vec![(0, 0x8000, 16, INDIRECT, 0)]),
            (
                0x6ff0,
                vec![(0, 0x8000, 16, NEXT, 1), (1, 0x9000, 4, WRITE, 0)],
            ),
        ];
        let chains: Vec<Vec<RawDesc>> = vec![
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
            // Indirect tables: plain, looping, index out of range, nested.
            vec![(0, 0x6000, 48, INDIRECT, 0)],
            vec![(0, 0x6100, 32, INDIRECT, 0)],
            vec![(0, 0x6200, 16, INDIRECT, 0)],
            vec![(0, 0x6300, 16, INDIRECT, 0)],
            // Bad lengths: not a multiple of 16, zero, too long for a u16 index.
            vec![(0, 0x6000, 17, INDIRECT, 0)],
            vec![(0, 0x6000, 0, INDIRECT, 0)],
            vec![(0, 0x6000, 16 * 65536, INDIRECT, 0)],
            // Indirect with NEXT set too, and after a direct descriptor.
            vec![(0, 0x6000, 48, INDIRECT | NEXT, 1), (1, 0x9000, 8, 0, 0)],
            vec![(0, 0x8000, 16, NEXT, 1), (1, 0x6000, 48, INDIRECT, 0)],
            // Indirect table across the region boundary; outside memory.
            vec![(0, 0x6ff0, 32, INDIRECT, 0)],
            vec![(0, 0xff_fff0, 32, INDIRECT, 0)],
            // Direct descriptor table entries past a loop of length 1.
            vec![(0, 0x8000, 16, NEXT, 0)],
        ];
        let layouts: [&[(GuestAddress, usize)]; 2] = [
            &[(GuestAddress(0), 0x10_0000)],
            // The descriptor table (0x1000 + 16 * 8) runs over 0x1040, and the indirect table
            // at 0x6ff0 over 0x7000.
            &[
                (GuestAddress(0), 0x1040),
                (GuestAddress(0x1040), 0x5fc0),
                (GuestAddress(0x7000), 0xf_9000),
            ],
        ];
        for (l, ranges) in layouts.iter().enumerate() {
            let mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
            for (base, descs) in &indirect {
                for &d in descs {
                    write_desc(&mem, *base, d);
                }
            }
            let mut q = queue(8, DESC, AVAIL, USED);
            assert!(q.is_valid(&mem));
            let vq = VirtQueue::new(queue(8, DESC, AVAIL, USED), &mem);
            assert_eq!(vq.fast().0, l == 0);
            let mut out = Vec::new();
            for (n, c) in chains.iter().enumerate() {
                for &d in c {
                    write_desc(&mem, DESC, d);
                }
                mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * (n as u64 % 8)))
                    .unwrap();
                mem.write_obj((n + 1) as u16, GuestAddress(AVAIL + 2))
                    .unwrap();
                let chain = q.iter(&mem).unwrap().next().unwrap();
                let expect: Vec<_> = chain.map(|d| key(&d)).collect();
                vq.chain(0, &mut out);
                assert_eq!(
                    out.iter().map(key).collect::<Vec<_>>(),
                    expect,
                    "layout {l}, chain {n}"
                );
            }
        }
    }

    /// A small deterministic generator for the tests below.
    struct Rand(u64);
    impl Rand {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Popping, using and the notification decisions match virtio-queue's step for step, on
    /// rings in one region (host pointers) and across regions (the fallbacks), with and
    /// without EVENT_IDX, for a driver that moves avail_idx and used_event at random (also to
    /// hostile values); the used rings end up byte for byte the same.
    #[test]
    fn rings_match_virtio_queue() {
        let layouts: [&[(GuestAddress, usize)]; 2] = [
            &[(GuestAddress(0), 0x10_0000)],
            // Avail ring (0x2000..0x2026) and used ring (0x3000..0x3086) cut in two.
            &[
                (GuestAddress(0), 0x2010),
                (GuestAddress(0x2010), 0x1030),
                (GuestAddress(0x3040), 0xf_cfc0),
            ],
        ];
        for (l, ranges) in layouts.iter().enumerate() {
            for event_idx in [false, true] {
                for seed in 1..20u64 {
                    let ours = GuestMemoryMmap::from_ranges(ranges).unwrap();
                    let theirs = GuestMemoryMmap::from_ranges(ranges).unwrap();
                    let mut q = queue(16, DESC, AVAIL, USED);
                    q.set_event_idx(event_idx);
                    let mut vq = VirtQueue::new(
                        {
                            let mut q = queue(16, DESC, AVAIL, USED);
                            q.set_event_idx(event_idx);
                            q
                        },
                        &ours,
                    );
                    assert_eq!(vq.fast(), (true, l == 0, l == 0));
                    let mut r = Rand(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let mut avail = 0u16;
                    for step in 0..400 {
                        let what = r.below(10);
                        let both = |f: &dyn Fn(&GuestMemoryMmap)| {
                            f(&ours);
                            f(&theirs);
                        };
                        match what {
                            0..=2 => {
                                // The driver adds buffers; now and then it moves its index
                                // too far (hostile), and later back into range.
                                let next = q.next_avail();
                                let n = if avail.wrapping_sub(next) > 16 {
                                    avail = next;
                                    r.below(8) as u16
                                } else if r.below(20) == 0 {
                                    r.next() as u16
                                } else {
                                    (r.below(8) as u16).min(16 - avail.wrapping_sub(next))
                                };
                                for i in 0..n.min(16) {
                                    let slot = u64::from(avail.wrapping_add(i) % 16);
                                    let head = r.below(18) as u16;
                                    both(&|m| {
                                        m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                                            .unwrap()
                                    });
                                }
                                avail = avail.wrapping_add(n);
                                both(&|m| m.write_obj(avail, GuestAddress(AVAIL + 2)).unwrap());
                            }
                            3 => {
                                let ev = if r.below(4) != 0 {
                                    q.next_used()
                                        .wrapping_add(r.below(8) as u16)
                                        .wrapping_sub(2)
                                } else {
                                    r.next() as u16
                                };
                                both(&|m| {
                                    m.write_obj(ev, GuestAddress(AVAIL + 4 + 2 * 16)).unwrap()
                                });
                            }
                            4..=6 => {
                                let max = 1 + r.below(6) as usize;
                                let mut got = Vec::new();
                                let next = q.next_avail();
                                let seen = usize::from(vq.avail_seen.wrapping_sub(next));
                                let a = vq.pop(&mut got, max);
                                let b = if l == 0 && seen >= max {
                                    // Ours pops entries it knows of without reading the
                                    // index again (whatever the driver did to it since): the
                                    // next `max` as the ring holds them now.
                                    let heads: Vec<u16> = (0..max as u16)
                                        .map(|i| {
                                            let slot = u64::from(next.wrapping_add(i) % 16);
                                            theirs
                                                .read_obj(GuestAddress(AVAIL + 4 + 2 * slot))
                                                .unwrap()
                                        })
                                        .collect();
                                    q.set_next_avail(next.wrapping_add(max as u16));
                                    Ok(heads)
                                } else {
                                    q.iter(&theirs).map(|it| {
                                        it.take(max).map(|c| c.head_index()).collect::<Vec<_>>()
                                    })
                                };
                                assert_eq!(a.is_ok(), b.is_ok(), "seed {seed} step {step}");
                                if let Ok(b) = b {
                                    assert_eq!(got, b, "seed {seed} step {step}");
                                    for h in got {
                                        let len = r.next() as u32;
                                        let a = vq.add_used(h, len);
                                        let b = q.add_used(&theirs, h, len);
                                        assert_eq!(a.is_ok(), b.is_ok());
                                    }
                                }
                            }
                            7 => {
                                assert_eq!(
                                    vq.needs_notification(),
                                    q.needs_notification(&theirs).unwrap(),
                                    "seed {seed} step {step}"
                                );
                            }
                            8 => {
                                assert_eq!(
                                    vq.enable_notification().unwrap(),
                                    q.enable_notification(&theirs).unwrap()
                                );
                            }
                            _ => {
                                vq.disable_notification().unwrap();
                                q.disable_notification(&theirs).unwrap();
                            }
                        }
                        assert_eq!(vq.queue().next_avail(), q.next_avail());
                        assert_eq!(vq.queue().next_used(), q.next_used());
                        assert_eq!(vq.has_avail(), {
                            q.avail_idx(&theirs, Ordering::Acquire).unwrap().0 != q.next_avail()
                        });
                    }
                    vq.publish();
                    let mut a = vec![0u8; 6 + 8 * 16];
                    let mut b = a.clone();
                    ours.read_slice(&mut a, GuestAddress(USED)).unwrap();
                    theirs.read_slice(&mut b, GuestAddress(USED)).unwrap();
                    assert_eq!(a, b, "layout {l} seed {seed}");
                }
            }
        }
    }
}
