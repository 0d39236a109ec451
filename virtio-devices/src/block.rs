//! virtio-blk over a `block::DiskFile`: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, one
//! worker thread serving every queue, or with `queue_affinity` one per queue (each pinned to
//! its queue's host CPUs, the image shared between them: `block::SharedDisk`). Each request is
//! checked in full (descriptor directions, lengths, sector range, addresses) before any I/O; a
//! bad one completes with IOERR or UNSUPP.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};

use block::{AsyncDisk, DiskFile};
use guest_memory::GuestMemoryMmap;
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config_signal::{ConfigInterrupt, ConfigSignal};
use crate::rate_limiter::RateLimiter;
use crate::vring::VirtQueue;
use crate::worker::{process_chains_limited, queue_bit, QueueHandler, Served};
use crate::worker_group::WorkerGroup;
use std::sync::Arc;

use crate::{
    read_config_bytes, ActivateContext, ActivateError, Counters, GuestView, VirtioDevice,
    VirtioDeviceState, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK, VIRTIO_DEVICE_STATE_VERSION,
};

use virtio_bindings::virtio_blk as vb;

pub const SECTOR_SIZE: u64 = 512;
const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
const F_MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
const F_DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
const F_WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;

pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Largest data transfer of one request.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Largest discard / write-zeroes range, in sectors.
const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// How a disk is presented.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    pub num_queues: u16,
    pub queue_size: u16,
    /// GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    /// Submit reads and writes through io_uring (where the kernel has it) instead of doing
    /// them on the device thread. Pays off with O_DIRECT; with the page cache the
    /// synchronous path is faster.
    pub io_uring: bool,
    /// `(queue, host CPUs)`: when not empty, each queue has a thread of its own, and the
    /// listed queues' threads run only on their CPUs.
    pub queue_affinity: Vec<(u16, Vec<usize>)>,
}

/// Fewest completions between the signals of a long batch (see `process_chains_notify`).
const EARLY_SIGNAL: u32 = 16;

/// Counter indexes, as named in `COUNTER_NAMES`.
const READ_BYTES: usize = 0;
const WRITE_BYTES: usize = 1;
const READ_OPS: usize = 2;
const WRITE_OPS: usize = 3;
const COUNTER_NAMES: &[&str] = &["read_bytes", "write_bytes", "read_ops", "write_ops"];

struct BlockHandler {
    counters: Arc<Counters>,
    disk: AsyncDisk,
    /// The disk's size in bytes (`vm.resize-disk` changes it while the worker is paused).
    size: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    /// Requests handed to the disk, by id (the disk's user data); `free` lists unused ids.
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Counter increments not yet published (indexes as in `COUNTER_NAMES`).
    counts: [u64; 4],
    /// Reused for every request, so serving one allocates nothing.
    iovecs: Vec<libc::iovec>,
    /// The buffers of the read in flight with each id (as `pending`; reused), marked written
    /// in guest memory's dirty bitmaps when it completes.
    read_bufs: Vec<Vec<libc::iovec>>,
    /// For signalling completions part-way through a long batch.
    interrupt: Option<Arc<dyn crate::VirtioInterrupt>>,
    /// Every request takes one op and, reads and writes, their data bytes; with no budget the
    /// queues wait for its timer.
    limiter: Option<RateLimiter>,
    /// Where the worker thread runs (`queue_affinity`).
    cpus: Option<seccomp::CpuSet>,
}

// SAFETY: the iovecs point into guest memory, which every thread may access; they are only
// used on the worker thread while it owns the handler.
unsafe impl Send for BlockHandler {}

/// A read or write in flight.
struct Pending {
    queue: usize,
    head: u16,
    status: Option<GuestAddress>,
    /// Bytes the request moves; the used length on success (reads) and the expected result.
    len: u32,
    read: bool,
}

/// Why a request failed, as the status byte says it.
enum Fail {
    IoErr(String),
    Unsupp,
}

/// What became of a request.
enum Outcome {
    /// Finished: status and bytes written into the driver's data buffers.
    Done(u8, u32),
    /// Handed to the disk; it completes through `complete`.
    Queued,
}

impl BlockHandler {
    /// Serves one chain, unless the rate limiter has no budget for it now.
    fn serve(
        &mut self,
        view: &mut GuestView,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
    ) -> Served {
        if let Some(l) = self.limiter.as_mut() {
            if !l.consume(limited_bytes(view, chain), 1) {
                return Served::NotNow;
            }
        }
        match self.serve_now(view, queue, head, chain) {
            Some(len) => Served::Used(len),
            None => Served::Later,
        }
    }

    /// Serves one chain; returns the used length, or None when it completes later.
    fn serve_now(
        &mut self,
        view: &mut GuestView,
        queue: usize,
        head: u16,
        chain: &[Descriptor],
    ) -> Option<u32> {
        // The status byte: the last byte of the last descriptor, which must be writable.
        let Some(last) = chain.last().filter(|d| d.is_write_only() && d.len() > 0) else {
            debug!("virtio-blk: request without a writable status byte");
            return Some(0);
        };
        let status_addr = last.addr().checked_add(u64::from(last.len()) - 1);
        let (status, written) = match self.execute(view, chain, queue, head, status_addr) {
            Ok(Outcome::Queued) => return None,
            Ok(Outcome::Done(s, n)) => (s, n),
            Err(Fail::Unsupp) => (S_UNSUPP, 0),
            Err(Fail::IoErr(why)) => {
                debug!("virtio-blk: request failed: {why}");
                (S_IOERR, 0)
            }
        };
        Some(write_status(view, status_addr, status, written))
    }

    fn execute(
        &mut self,
        view: &mut GuestView,
        chain: &[Descriptor],
        queue: usize,
        head: u16,
        status: Option<GuestAddress>,
    ) -> Result<Outcome, Fail> {
        let io = |s: &str| Fail::IoErr(s.to_string());
        let hdr = chain.first().ok_or_else(|| io("empty chain"))?;
        if hdr.is_write_only() || hdr.len() < 16 || chain.len() < 2 {
            return Err(io("bad request header descriptor"));
        }
        let mem = view.mem();
        let h = view
            .ptr(hdr.addr(), 16)
            .ok_or_else(|| io("header outside guest memory"))?;
        let (req_type, sector) = read_header(h);
        let data = &chain[1..chain.len() - 1];
        let data_len = data
            .iter()
            .try_fold(0u64, |acc, d| acc.checked_add(u64::from(d.len())))
            .filter(|&n| n <= MAX_REQUEST_BYTES)
            .ok_or_else(|| io("request too large"))?;
        let want_write_only = req_type == T_IN || req_type == T_GET_ID;
        if data.iter().any(|d| d.is_write_only() != want_write_only) {
            return Err(io("data descriptor with the wrong direction"));
        }
        let size = self.size;
        match req_type {
            T_IN | T_OUT => {
                if data_len % SECTOR_SIZE != 0 {
                    return Err(io("length not a multiple of 512"));
                }
                if req_type == T_OUT && self.readonly {
                    return Err(io("write to a read-only disk"));
                }
                let offset = sector
                    .checked_mul(SECTOR_SIZE)
                    .filter(|o| o.checked_add(data_len).is_some_and(|end| end <= size))
                    .ok_or_else(|| io("sector range beyond the disk"))?;
                self.iovecs.clear();
                for d in data {
                    let (base, len) = guest_slice(view, d.addr(), d.len())?;
                    self.iovecs.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: len,
                    });
                }
                let read = req_type == T_IN;
                if !self.disk.uses_io_uring() {
                    let r = self.sync_io(offset, read, data_len as u32);
                    if read {
                        // Done, or failed part-way: either way the buffers may have changed.
                        view.written_iovecs(&self.iovecs, data_len as usize);
                    }
                    return r;
                }
                let id = self.free.pop().unwrap_or_else(|| {
                    self.pending.push(None);
                    self.pending.len() - 1
                });
                self.pending[id] = Some(Pending {
                    queue,
                    head,
                    status,
                    len: data_len as u32,
                    read,
                });
                if read {
                    if self.read_bufs.len() <= id {
                        self.read_bufs.resize_with(id + 1, Vec::new);
                    }
                    let bufs = &mut self.read_bufs[id];
                    bufs.clear();
                    bufs.extend_from_slice(&self.iovecs);
                }
                // SAFETY: the iovecs lie inside guest memory regions (checked by
                // `guest_slice`), which stay mapped while this handler lives: the transport
                // holds the memory, and `Block::reset` waits for in-flight requests.
                let r = unsafe {
                    if read {
                        self.disk.read_vectored(offset, &self.iovecs, id as u64)
                    } else {
                        self.disk.write_vectored(offset, &self.iovecs, id as u64)
                    }
                };
                if let Err(e) = r {
                    self.pending[id] = None;
                    self.free.push(id);
                    return Err(Fail::IoErr(e.to_string()));
                }
                Ok(Outcome::Queued)
            }
            T_FLUSH => {
                // Covers every write completed so far, as the spec asks.
                self.disk
                    .disk()
                    .flush()
                    .map_err(|e| Fail::IoErr(e.to_string()))?;
                Ok(Outcome::Done(S_OK, 0))
            }
            T_GET_ID => {
                let mut left = &self.id[..];
                let mut n = 0u32;
                for d in data {
                    let k = left.len().min(d.len() as usize);
                    mem.write_slice(&left[..k], d.addr())
                        .map_err(|_| io("GET_ID buffer outside guest memory"))?;
                    left = &left[k..];
                    n += k as u32;
                }
                Ok(Outcome::Done(S_OK, n))
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.readonly {
                    return Err(io("discard/write-zeroes on a read-only disk"));
                }
                // One segment of 16 bytes: sector u64, num_sectors u32, flags u32.
                if data.len() != 1 || data_len != 16 {
                    return Err(Fail::Unsupp);
                }
                let mut seg = [0u8; 16];
                mem.read_slice(&mut seg, data[0].addr())
                    .map_err(|_| io("segment outside guest memory"))?;
                let start = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                if count > MAX_DISCARD_SECTORS || flags & !1 != 0 {
                    return Err(Fail::Unsupp);
                }
                let len = u64::from(count) * SECTOR_SIZE;
                let off = start
                    .checked_mul(SECTOR_SIZE)
                    .filter(|o| o.checked_add(len).is_some_and(|e| e <= size))
                    .ok_or_else(|| io("discard range beyond the disk"))?;
                let disk = self.disk.disk();
                let r = if req_type == T_DISCARD {
                    disk.discard(off, len)
                } else {
                    disk.write_zeroes(off, len)
                };
                r.map_err(|e| Fail::IoErr(e.to_string()))?;
                Ok(Outcome::Done(S_OK, 0))
            }
            _ => Err(Fail::Unsupp),
        }
    }

    /// Counts a completed read or write; `publish_counts` hands the sums to `counters`.
    fn count(&mut self, read: bool, len: u32) {
        let (bytes, ops) = if read {
            (READ_BYTES, READ_OPS)
        } else {
            (WRITE_BYTES, WRITE_OPS)
        };
        self.counts[bytes] += u64::from(len);
        self.counts[ops] += 1;
    }

    /// Publishes what `count` gathered: a few atomic adds per batch instead of two per
    /// request.
    fn publish_counts(&mut self) {
        for (i, c) in self.counts.iter_mut().enumerate() {
            if *c != 0 {
                self.counters.add(i, std::mem::take(c));
            }
        }
    }

    /// Reads or writes `self.iovecs` at `offset` on this thread.
    fn sync_io(&mut self, offset: u64, read: bool, len: u32) -> Result<Outcome, Fail> {
        let disk = self.disk.disk();
        let iov = &self.iovecs;
        // A range the image maps straight onto its file (raw images; allocated qcow2
        // clusters), not O_DIRECT: one pread/pwrite (preadv/pwritev for several buffers)
        // straight between the file and guest memory, as a plain loop would do. A short or
        // failed transfer is done again through the image below.
        if let Ok(Some(m)) = disk.map_host(offset, u64::from(len), !read) {
            if !m.direct && iov.len() <= 1024 {
                if let Ok(off) = libc::off_t::try_from(m.offset) {
                    // SAFETY: each iovec lies inside a mapped guest memory region (checked by
                    // `guest_slice`) that outlives this call; `m.fd` is the image's open file.
                    // One buffer: the system call itself, without libc's wrapper, which makes
                    // pread/pwrite a thread cancellation point (two more calls and atomics per
                    // request; this thread is never cancelled).
                    let n = unsafe {
                        match (read, iov.as_slice()) {
                            (true, [v]) => libc::syscall(
                                libc::SYS_pread64,
                                libc::c_long::from(m.fd),
                                v.iov_base,
                                v.iov_len,
                                off,
                            ) as isize,
                            (false, [v]) => libc::syscall(
                                libc::SYS_pwrite64,
                                libc::c_long::from(m.fd),
                                v.iov_base,
                                v.iov_len,
                                off,
                            ) as isize,
                            (true, _) => libc::preadv(m.fd, iov.as_ptr(), iov.len() as i32, off),
                            (false, _) => libc::pwritev(m.fd, iov.as_ptr(), iov.len() as i32, off),
                        }
                    };
                    if n >= 0 && n as u64 == u64::from(len) {
                        self.count(read, len);
                        return Ok(Outcome::Done(S_OK, if read { len } else { 0 }));
                    }
                }
            }
        }
        let disk = self.disk.disk();
        let iov = &self.iovecs;
        // SAFETY (all slices below): each iovec lies inside a mapped guest memory region
        // (checked by `guest_slice`) that outlives this call.
        let r = match (read, iov.as_slice()) {
            // The common single-buffer request allocates nothing.
            (true, [v]) => disk.read_at(
                offset,
                &mut [IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                })],
            ),
            (false, [v]) => disk.write_at(
                offset,
                &[IoSlice::new(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                })],
            ),
            (true, _) => {
                let mut bufs: Vec<IoSliceMut> = iov
                    .iter()
                    .map(|v| {
                        IoSliceMut::new(unsafe {
                            std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                        })
                    })
                    .collect();
                disk.read_at(offset, &mut bufs)
            }
            (false, _) => {
                let bufs: Vec<IoSlice> = iov
                    .iter()
                    .map(|v| {
                        IoSlice::new(unsafe {
                            std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                        })
                    })
                    .collect();
                disk.write_at(offset, &bufs)
            }
        };
        r.map_err(|e| Fail::IoErr(e.to_string()))?;
        self.count(read, len);
        Ok(Outcome::Done(S_OK, if read { len } else { 0 }))
    }

    /// Publishes every finished disk request; returns the mask of queues used.
    fn complete(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let mut used = 0;
        let mut view = GuestView::new(mem);
        while let Some((id, res)) = self.disk.next_completed() {
            let Some(p) = self.pending.get_mut(id as usize).and_then(Option::take) else {
                continue;
            };
            if p.read {
                // The data is in place (a failed read may have written part of it).
                if let Some(bufs) = self.read_bufs.get(id as usize) {
                    view.written_iovecs(bufs, p.len as usize);
                }
            }
            self.free.push(id as usize);
            let ok = res >= 0 && res as u32 == p.len;
            if ok {
                self.count(p.read, p.len);
            } else {
                debug!("virtio-blk: disk request failed: {res}");
            }
            let n = if ok && p.read { p.len } else { 0 };
            let len = write_status(&mut view, p.status, if ok { S_OK } else { S_IOERR }, n);
            if let Some(Some(q)) = queues.get_mut(p.queue) {
                q.add_used(p.head, len)?;
                used |= queue_bit(p.queue);
            }
        }
        Ok(used)
    }

    /// Waits for every request in flight and forgets them (device reset). The data of reads
    /// that complete here is not marked in guest memory's dirty bitmaps (the memory is not at
    /// hand): it lands in buffers the reset driver has given up.
    fn quiesce(&mut self) {
        while self.disk.in_flight() > 0 {
            if let Err(e) = self.disk.reap(1) {
                warn!("virtio-blk: waiting for disk requests: {e}");
                break;
            }
        }
        while self.disk.next_completed().is_some() {}
        self.pending.clear();
        self.free.clear();
    }
}

/// The bytes a request counts against the bandwidth bucket: the data of a read or write (as
/// the original), 0 for anything else or a header that cannot be read (it fails anyway).
fn limited_bytes(view: &mut GuestView, chain: &[Descriptor]) -> u64 {
    let Some(h) = chain.first().and_then(|d| view.ptr(d.addr(), 16)) else {
        return 0;
    };
    match read_header(h).0 {
        T_IN | T_OUT if chain.len() > 2 => chain[1..chain.len() - 1]
            .iter()
            .map(|d| u64::from(d.len()))
            .sum(),
        _ => 0,
    }
}

/// The request type and sector of the 16-byte request header at `h`.
fn read_header(h: std::ptr::NonNull<u8>) -> (u32, u64) {
    let p = h.as_ptr();
    // SAFETY (both arms): 16 bytes inside a guest memory region (`GuestView::ptr`) that stays
    // mapped while the view's memory is borrowed; volatile, as the guest may write them at any
    // time (it then gets what it wrote, checked as any header).
    let (a, b) = if p.align_offset(8) == 0 {
        // Drivers align the header: two loads instead of sixteen.
        unsafe {
            (
                std::ptr::read_volatile(p.cast::<u64>()),
                std::ptr::read_volatile(p.cast::<u64>().add(1)),
            )
        }
    } else {
        let h: [u8; 16] = unsafe { std::ptr::read_volatile(p.cast::<[u8; 16]>()) };
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        (word(0), word(8))
    };
    (u64::from_le(a) as u32, u64::from_le(b))
}

/// Writes the status byte; returns the used length (`written` plus the status byte), or 0 if
/// the status byte lies outside guest memory.
fn write_status(view: &mut GuestView, at: Option<GuestAddress>, status: u8, written: u32) -> u32 {
    match at.and_then(|a| view.ptr(a, 1)) {
        Some(p) => {
            // SAFETY: one byte inside a guest memory region (`GuestView::ptr`) that the view's
            // memory keeps mapped; volatile: the guest shares it.
            unsafe { std::ptr::write_volatile(p.as_ptr(), status) };
            view.written(p.as_ptr(), 1);
            written.saturating_add(1)
        }
        None => {
            debug!("virtio-blk: status byte outside guest memory");
            0
        }
    }
}

/// The host address of `[addr, addr + len)` when it lies inside one region of `mem`.
fn guest_slice(
    view: &mut GuestView,
    addr: GuestAddress,
    len: u32,
) -> Result<(*mut u8, usize), Fail> {
    let len = len as usize;
    if len == 0 {
        return Ok((std::ptr::NonNull::<u8>::dangling().as_ptr(), 0));
    }
    let p = view.ptr(addr, len).ok_or_else(|| {
        Fail::IoErr(format!(
            "buffer {:#x}+{len:#x} outside guest memory",
            addr.0
        ))
    })?;
    Ok((p.as_ptr(), len))
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-blk",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Requests: positioned and vectored file I/O, flushes, discard and write-zeroes (hole
                // punching), sparse-image size checks, io_uring submission.
                pread64,
                pwrite64,
                preadv,
                pwritev,
                preadv2,
                pwritev2,
                fsync,
                fdatasync,
                fallocate,
                lseek,
                fstat,
                newfstatat,
                statx,
                ftruncate,
                io_uring_enter,
                io_uring_register,
            ]
        },
        ioctls: &[],
    };

impl QueueHandler for BlockHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn cpus(&self) -> Option<seccomp::CpuSet> {
        self.cpus
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        let irq = self.interrupt.clone();
        let early = irq.as_deref().map(|i| (i, EARLY_SIGNAL));
        let mut view = GuestView::new(mem);
        // The walk stops at the table size (no loops) and on a bad descriptor.
        let r = process_chains_limited(index, q, early, |head, descs| {
            self.serve(&mut view, index, head, descs)
        });
        self.publish_counts();
        let used = r?;
        if let Err(e) = self.disk.submit() {
            warn!("virtio-blk: cannot submit disk requests: {e}");
        }
        let done = self.complete(queues, mem);
        self.publish_counts();
        Ok(used | done?)
    }

    fn attach_interrupt(&mut self, interrupt: Arc<dyn crate::VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
    }

    fn quiesce(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if let Err(e) = self.disk.submit() {
            warn!("virtio-blk: cannot submit disk requests: {e}");
        }
        while self.disk.in_flight() > 0 {
            if let Err(e) = self.disk.reap(1) {
                warn!("virtio-blk: waiting for disk requests: {e}");
                break;
            }
        }
        let done = self.complete(queues, mem);
        self.publish_counts();
        done
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        self.limiter.iter().map(|l| l.as_raw_fd()).collect()
    }

    fn process_timer(
        &mut self,
        _index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if let Some(l) = self.limiter.as_mut() {
            l.timer_fired();
        }
        let mut used = 0;
        for i in 0..queues.len() {
            used |= self.process_queue(i, queues, mem)?;
        }
        Ok(used)
    }

    fn extra_fd(&self) -> Option<RawFd> {
        self.disk
            .uses_io_uring()
            .then(|| self.disk.notifier().as_raw_fd())
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let _ = self.disk.notifier().read();
        let done = self.complete(queues, mem);
        self.publish_counts();
        done
    }
}

/// virtio-blk's own state: beyond the transport's (its queue positions), the configuration
/// generation (a `vm.resize-disk` changes it). A pause completes every request in flight
/// (io_uring ones are waited for), so none is left to record; the disk's contents and size
/// are the image file's, not state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub version: u32,
    /// Written only when not 0, so the states of disks never resized read as before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub config_generation: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub struct Block {
    counters: Arc<Counters>,
    cfg: BlockConfig,
    capacity: u64,
    readonly: bool,
    /// One member serving every queue, or one per queue (`queue_affinity`).
    workers: WorkerGroup<BlockHandler>,
    /// The capacity changes (`vm.resize-disk`): its generation and configuration interrupt.
    config: ConfigSignal,
    config_irq: ConfigInterrupt,
}

impl Block {
    /// Serves `disk`; reads and writes go through io_uring where the kernel has it and the
    /// image maps the range directly (raw images, allocated qcow2 clusters).
    pub fn new(disk: Box<dyn DiskFile>, cfg: BlockConfig) -> block::Result<Self> {
        let mut id = [0u8; ID_BYTES];
        let n = cfg.serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);
        let readonly = disk.readonly();
        let size = disk.size();
        let capacity = size / SECTOR_SIZE;
        let counters = Counters::new(COUNTER_NAMES);
        let io_uring = cfg.io_uring && block::async_io::io_uring_supported();
        let handler = |disk: Box<dyn DiskFile>, queues: u16, cpus: Option<seccomp::CpuSet>| {
            let depth = (u32::from(cfg.queue_size) * u32::from(queues))
                .clamp(1, block::async_io::MAX_DEPTH);
            Ok::<_, block::Error>(BlockHandler {
                counters: counters.clone(),
                size,
                disk: AsyncDisk::new(disk, depth, io_uring)?,
                readonly,
                id,
                pending: Vec::new(),
                free: Vec::new(),
                counts: [0; 4],
                iovecs: Vec::new(),
                read_bufs: Vec::new(),
                interrupt: None,
                limiter: None,
                cpus,
            })
        };
        let members = if cfg.queue_affinity.is_empty() {
            let all = (0..usize::from(cfg.num_queues)).collect();
            vec![(all, handler(disk, cfg.num_queues, None)?)]
        } else {
            let shared = block::SharedDisk::new(disk);
            (0..cfg.num_queues)
                .map(|q| {
                    let cpus = cfg
                        .queue_affinity
                        .iter()
                        .find(|(i, _)| *i == q)
                        .map(|(_, c)| seccomp::CpuSet::of(c));
                    let h = handler(Box::new(shared.clone()), 1, cpus)?;
                    Ok((vec![usize::from(q)], h))
                })
                .collect::<block::Result<Vec<_>>>()?
        };
        Ok(Block {
            capacity,
            readonly,
            cfg,
            counters,
            workers: WorkerGroup::new("virtio-blk", members),
            config: ConfigSignal::default(),
            config_irq: ConfigInterrupt::default(),
        })
    }

    /// Limits the disk's requests (before activation; a reset keeps it). With a thread per
    /// queue, each thread gets a view of the same buckets.
    pub fn set_rate_limiter(&mut self, limiter: Option<RateLimiter>) -> std::io::Result<()> {
        let buckets = limiter.as_ref().map(|l| l.buckets().clone());
        let mut first = Some(limiter);
        for h in self.workers.idle_mut() {
            h.limiter = match first.take() {
                Some(l) => l,
                None => buckets.clone().map(RateLimiter::shared).transpose()?,
            };
        }
        Ok(())
    }

    /// Whether reads and writes go through io_uring (false once activated: the worker has it).
    pub fn uses_io_uring(&self) -> bool {
        self.workers
            .first_idle()
            .is_some_and(|h| h.disk.uses_io_uring())
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        let seg_max = u32::from(self.cfg.queue_size.saturating_sub(2).max(1));
        c[12..16].copy_from_slice(&seg_max.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&self.cfg.num_queues.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.cfg.queue_size; self.cfg.num_queues as usize]
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_RING_INDIRECT_DESC | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.readonly {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        if self.cfg.num_queues > 1 {
            f |= F_MQ;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn config_generation(&self) -> u32 {
        self.config.generation()
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let interrupt = ctx.interrupt.clone();
        self.workers.activate(ctx)?;
        self.config_irq.activate(&self.config, interrupt);
        Ok(())
    }
    fn counters(&self) -> Option<Arc<Counters>> {
        Some(self.counters.clone())
    }
    fn reset(&mut self) {
        self.config_irq.reset(&self.config);
        self.workers.reset(BlockHandler::quiesce);
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.workers.queue_positions()
    }
    fn pause(&mut self) -> Result<(), String> {
        self.config_irq.pause(&self.config);
        self.workers.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        self.workers.resume()?;
        self.config_irq.resume(&self.config);
        Ok(())
    }
    /// The image is resized under the paused workers (a running one is paused for it), each
    /// handler takes the new size, and the driver gets a configuration interrupt: Linux reads
    /// the new capacity and resizes the block device. Raw images only (`DiskFile::resize`).
    fn resize(&mut self, size: u64) -> Result<(), String> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(format!(
                "desired_size={size}: must be a positive multiple of {SECTOR_SIZE} bytes"
            ));
        }
        if self.readonly {
            return Err("the disk is read-only".into());
        }
        // The members share one image: the first resizes it, each takes the size.
        let mut done: Option<Result<(), String>> = None;
        self.workers.with_handlers(|h| {
            let r =
                done.get_or_insert_with(|| h.disk.disk().resize(size).map_err(|e| e.to_string()));
            if r.is_ok() {
                h.size = size;
            }
        })?;
        done.unwrap_or(Ok(()))?;
        self.capacity = size / SECTOR_SIZE;
        self.config.change(|| true);
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            config_generation: self.config.generation(),
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-blk";
        let VirtioDeviceState::Block(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        self.config.restore(s.config_generation, || {});
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header reads the same at any alignment (two loads when 8-aligned, bytes else).
    #[test]
    fn header_at_any_alignment() {
        let mut buf = [0u8; 32];
        for off in 0..8 {
            buf.fill(0xee);
            buf[off..off + 4].copy_from_slice(&T_OUT.to_le_bytes());
            buf[off + 8..off + 16].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
            let p = std::ptr::NonNull::new(buf.as_mut_ptr().wrapping_add(off)).unwrap();
            assert_eq!(
                read_header(p),
                (T_OUT, 0x0123_4567_89ab_cdef),
                "offset {off}"
            );
        }
    }
}
