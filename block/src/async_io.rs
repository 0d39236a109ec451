// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Batched asynchronous I/O for any [`DiskFile`].
//!
//! Requests whose range maps directly onto host data ([`DiskFile::map_host`]:
//! allocated clusters, or a backing file's for a read) go to an io_uring when
//! the kernel has one (probed at runtime), and so do allocating writes: of
//! whole clusters ([`DiskFile::alloc_host`]) and, copying on write, of parts
//! of clusters ([`DiskFile::alloc_cow`]: the current content is read into a
//! buffer through the ring, the write merged in, the whole written back).
//! Reads of compressed clusters read the compressed bytes through the ring
//! and inflate them on completion ([`DiskFile::map_compressed`]). Everything
//! else is done synchronously and completed at once. Either way the completion is reported through
//! [`AsyncDisk::next_completed`] and the [`AsyncDisk::notifier`] eventfd is
//! signalled.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::{AsRawFd, RawFd};

use io_uring::{opcode, register::Probe, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::storage::AlignedBuf;
use crate::{DiskFile, Error, Result};

mod staged;

use staged::{Cow, Inflate};

/// Largest ring accepted.
pub const MAX_DEPTH: u32 = 4096;

/// A run of requests that continue each other in the host file is not split
/// by eager submission until it is this long (a typical device request limit).
const MERGE_BYTES: u64 = 1 << 20;

#[derive(Default)]
struct Slot {
    user_data: u64,
    busy: bool,
    // Multi-buffer requests: the iovec array the kernel reads, kept until
    // completion; its capacity is reused.
    iovecs: Vec<libc::iovec>,
    // Allocating write: (guest offset, length, host offset) to commit (or
    // abort) when the data write completes.
    commit: Option<(u64, u64, u64)>,
    // Copy-on-write in progress.
    cow: Option<Box<Cow>>,
    // Compressed data being read, to inflate on completion.
    inflate: Option<Box<Inflate>>,
}

/// An asynchronous, batched front for a [`DiskFile`].
pub struct AsyncDisk {
    disk: Box<dyn DiskFile>,
    ring: Option<IoUring>,
    eventfd: EventFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    unsubmitted: usize,
    // Eager submission: after the caller's submit() or a reap, the next
    // requests go to the kernel in growing batches (1, 1, 2, 4, ...) so the
    // device starts on the first one while later ones are still prepared.
    // A request that continues the previous one in the host file does not
    // send its batch: a sequential run waits for the first request outside
    // it (or MERGE_BYTES, or submit()) and enters the kernel in one piece,
    // which merges it into one device request instead of one per batch.
    eager: bool,
    round: usize,
    // The last request queued, sent or not: (host fd, its end in the host
    // file, write); and the length of the unsent run it ends.
    last: Option<(RawFd, u64, bool)>,
    run_bytes: u64,
    // The host file registered with the ring (index 0), if any.
    registered_fd: Option<RawFd>,
    register_tried: bool,
    // Requests sent to the ring / completed synchronously.
    counts: (u64, u64),
    done: VecDeque<(u64, i32)>,
    // The eventfd is registered with the ring on the first notifier() call,
    // so callers that poll (benchmarks) skip a signal per completion.
    eventfd_registered: std::cell::Cell<bool>,
    // Memory registered with the ring (e.g. guest RAM): (start, len).
    fixed: Vec<(usize, usize)>,
    // Buffers of finished copy-on-writes and compressed reads, for the next.
    spare: Vec<AlignedBuf>,
}

/// Whether this kernel offers io_uring with the opcodes we need.
pub fn io_uring_supported() -> bool {
    probe_ring(2).is_some()
}

fn probe_ring(depth: u32) -> Option<IoUring> {
    // Cooperative task running avoids an IPI per completion (Linux 5.19+).
    let ring = IoUring::builder()
        .setup_coop_taskrun()
        .build(depth)
        .or_else(|_| IoUring::new(depth))
        .ok()?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).ok()?;
    let ops = [
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Read::CODE,
        opcode::Write::CODE,
    ];
    if ops.iter().all(|&op| probe.is_supported(op)) {
        Some(ring)
    } else {
        None
    }
}

// SAFETY: the raw iovec pointers in `slots` point into caller buffers that the
// caller promised to keep valid until completion, regardless of thread.
unsafe impl Send for AsyncDisk {}

impl AsyncDisk {
    /// Wrap `disk` with a queue of `depth` requests; `use_io_uring` false
    /// forces the synchronous fallback.
    pub fn new(disk: Box<dyn DiskFile>, depth: u32, use_io_uring: bool) -> Result<Self> {
        if depth == 0 || depth > MAX_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "queue depth {depth} not in 1..={MAX_DEPTH}"
            )));
        }
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        let ring = if use_io_uring {
            match probe_ring(depth) {
                Some(r) => Some(r),
                None => {
                    log::info!("io_uring unavailable; using synchronous disk I/O");
                    None
                }
            }
        } else {
            None
        };
        Ok(AsyncDisk {
            disk,
            ring,
            eventfd,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..depth as usize).rev().collect(),
            unsubmitted: 0,
            eager: true,
            round: 0,
            last: None,
            run_bytes: 0,
            registered_fd: None,
            register_tried: false,
            counts: (0, 0),
            done: VecDeque::new(),
            eventfd_registered: std::cell::Cell::new(false),
            fixed: Vec::new(),
            spare: Vec::new(),
        })
    }

    /// Whether requests may go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Eager submission (on by default): after [`AsyncDisk::submit`] or a
    /// reap, queued requests go to the kernel in growing batches (1, 1, 2, 4,
    /// ...) instead of all at the next `submit`, so the device starts on the
    /// first request while later ones are still being prepared. A request
    /// that continues the previous one in the host file (same file and
    /// direction) holds its batch back until a request outside the run comes,
    /// the run reaches 1 MiB or `submit` is called, so a sequential run
    /// reaches the block layer in one piece and merges into one device
    /// request. Off: one `io_uring_enter` per `submit` call.
    pub fn set_eager_submit(&mut self, eager: bool) {
        self.eager = eager;
    }

    /// Read and write requests so far: (sent to io_uring, done synchronously).
    pub fn request_counts(&self) -> (u64, u64) {
        self.counts
    }

    /// The wrapped disk, for synchronous operations.
    pub fn disk(&mut self) -> &mut dyn DiskFile {
        self.disk.as_mut()
    }

    /// Register memory regions (for example guest RAM) with the kernel so
    /// single-buffer requests inside them skip per-request page pinning.
    /// Returns false if there is no ring or the kernel refused.
    ///
    /// # Safety
    /// The regions must stay mapped for the life of this `AsyncDisk`.
    pub unsafe fn register_memory(&mut self, regions: &[libc::iovec]) -> bool {
        let Some(ring) = self.ring.as_ref() else {
            return false;
        };
        if regions.is_empty() || regions.len() > u16::MAX as usize || !self.fixed.is_empty() {
            return false;
        }
        // SAFETY: the caller keeps the regions mapped while the ring lives.
        match unsafe { ring.submitter().register_buffers(regions) } {
            Ok(()) => {
                self.fixed = regions
                    .iter()
                    .map(|r| (r.iov_base as usize, r.iov_len))
                    .collect();
                true
            }
            Err(e) => {
                log::info!("io_uring buffer registration failed: {e}");
                false
            }
        }
    }

    fn fixed_index(&self, base: usize, len: usize) -> Option<u16> {
        self.fixed
            .iter()
            .position(|&(s, l)| base >= s && base + len <= s + l)
            .map(|i| i as u16)
    }

    /// Signalled whenever completions may be available.
    pub fn notifier(&self) -> &EventFd {
        if !self.eventfd_registered.get() {
            if let Some(ring) = self.ring.as_ref() {
                if let Err(e) = ring.submitter().register_eventfd(self.eventfd.as_raw_fd()) {
                    log::error!("cannot register eventfd with io_uring: {e}");
                }
            }
            self.eventfd_registered.set(true);
            // Completions that arrived before registration must be noticed.
            let _ = self.eventfd.write(1);
        }
        &self.eventfd
    }

    fn complete_sync(&mut self, user_data: u64, res: Result<()>, len: usize) {
        let r = match res {
            Ok(()) => len as i32,
            Err(e) => {
                log::debug!("disk request failed: {e}");
                -e.errno()
            }
        };
        self.done.push_back((user_data, r));
        // Nobody waits on the eventfd before notifier() is first called (which
        // signals it once itself).
        if self.eventfd_registered.get() {
            let _ = self.eventfd.write(1);
        }
    }

    fn aligned(iovecs: &[libc::iovec], offset: u64) -> bool {
        offset.is_multiple_of(512)
            && iovecs
                .iter()
                .all(|v| (v.iov_base as usize).is_multiple_of(512) && v.iov_len % 512 == 0)
    }

    /// Queue a read of `iovecs` at `offset`; completion carries `user_data`
    /// and the byte count or a negative errno.
    ///
    /// # Safety
    /// The memory described by `iovecs` must stay valid, and not be accessed
    /// by anything else, until the completion for `user_data` is returned.
    pub unsafe fn read_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<()> {
        self.queue(offset, iovecs, user_data, false)
    }

    /// Queue a write; see [`AsyncDisk::read_vectored`].
    ///
    /// # Safety
    /// Same contract as [`AsyncDisk::read_vectored`].
    pub unsafe fn write_vectored(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<()> {
        self.queue(offset, iovecs, user_data, true)
    }

    unsafe fn queue(
        &mut self,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
        write: bool,
    ) -> Result<()> {
        let len: usize = iovecs.iter().map(|v| v.iov_len).sum();
        if write && self.disk.readonly() {
            self.complete_sync(user_data, Err(Error::ReadOnly), 0);
            return Ok(());
        }
        let ring_ok = self.ring.is_some() && len > 0 && len <= i32::MAX as usize;
        let mut mapping = None;
        for attempt in 0..2 {
            if !ring_ok {
                break;
            }
            mapping = match self.disk.map_host(offset, len as u64, write) {
                Ok(m) => m.filter(|m| !m.direct || Self::aligned(iovecs, m.offset)),
                Err(e) => {
                    self.complete_sync(user_data, Err(e), 0);
                    return Ok(());
                }
            };
            // A write that does not go in place waits for the reservations
            // that share a cluster with it (committing one later would undo
            // it), then looks again: the clusters may be in place now.
            if attempt > 0
                || mapping.is_some()
                || !write
                || !self.disk.alloc_pending(offset, len as u64)
            {
                break;
            }
            while self.disk.alloc_pending(offset, len as u64) && self.in_flight() > 0 {
                self.reap(1)?;
            }
        }
        // Allocating writes of whole clusters: data to fresh host space
        // through the ring, metadata updated when it completes.
        let mut commit = None;
        let mapping = match mapping {
            None if write && ring_ok => match self.disk.alloc_host(offset, len as u64) {
                Ok(Some(m)) if !m.direct || Self::aligned(iovecs, m.offset) => {
                    commit = Some((offset, len as u64, m.offset));
                    Some(m)
                }
                Ok(Some(m)) => {
                    self.disk.abort_alloc(offset, len as u64, m.offset);
                    None
                }
                Ok(None) => None,
                Err(e) => {
                    self.complete_sync(user_data, Err(e), 0);
                    return Ok(());
                }
            },
            m => m,
        };
        if mapping.is_none() && write && ring_ok {
            match self.disk.alloc_cow(offset, len as u64) {
                // SAFETY: the caller's contract for the iovecs carries over.
                Ok(Some(plan)) => {
                    return unsafe { self.queue_cow(plan, offset, iovecs, user_data) }
                }
                Ok(None) => {}
                Err(e) => {
                    self.complete_sync(user_data, Err(e), 0);
                    return Ok(());
                }
            }
        }
        if mapping.is_none() && !write && ring_ok {
            match self.disk.map_compressed(offset, len as u64) {
                // SAFETY: the caller's contract for the iovecs carries over.
                Ok(Some(plan)) => return unsafe { self.queue_inflate(plan, iovecs, user_data) },
                Ok(None) => {}
                Err(e) => {
                    self.complete_sync(user_data, Err(e), 0);
                    return Ok(());
                }
            }
        }
        let Some(m) = mapping else {
            let res = if write {
                let slices: Vec<IoSlice> = iovecs
                    .iter()
                    // SAFETY: the caller guarantees the iovecs describe valid memory.
                    .map(|v| {
                        IoSlice::new(std::slice::from_raw_parts(
                            v.iov_base as *const u8,
                            v.iov_len,
                        ))
                    })
                    .collect();
                self.disk.write_at(offset, &slices)
            } else {
                let mut slices: Vec<IoSliceMut> = iovecs
                    .iter()
                    // SAFETY: the caller guarantees exclusive access to valid memory.
                    .map(|v| {
                        IoSliceMut::new(std::slice::from_raw_parts_mut(
                            v.iov_base as *mut u8,
                            v.iov_len,
                        ))
                    })
                    .collect();
                self.disk.read_at(offset, &mut slices)
            };
            self.counts.1 += 1;
            self.complete_sync(user_data, res, len);
            return Ok(());
        };
        let idx = match self.ring_slot() {
            Ok(idx) => idx,
            Err(e) => {
                if let Some((off, len, host)) = commit {
                    self.disk.abort_alloc(off, len, host);
                }
                return Err(e);
            }
        };
        let fixed_file = self.fixed_file(m.fd);
        let fixed_buf = if iovecs.len() == 1 {
            self.fixed_index(iovecs[0].iov_base as usize, iovecs[0].iov_len)
        } else {
            None
        };
        let slot = &mut self.slots[idx];
        slot.user_data = user_data;
        slot.busy = true;
        slot.commit = commit;
        if iovecs.len() > 1 {
            // The kernel reads the iovec array at submission or later: keep a
            // copy in the slot (its capacity is reused, no allocation once warm).
            slot.iovecs.clear();
            slot.iovecs.extend_from_slice(iovecs);
        }
        let (iov_ptr, iov_cnt) = (slot.iovecs.as_ptr(), slot.iovecs.len() as u32);
        // One macro body for both kinds of file reference (plain or registered).
        macro_rules! sqe {
            ($fd:expr) => {
                if iovecs.len() == 1 {
                    let (base, len) = (iovecs[0].iov_base as *mut u8, iovecs[0].iov_len as u32);
                    match (fixed_buf, write) {
                        (Some(bi), true) => opcode::WriteFixed::new($fd, base, len, bi)
                            .offset(m.offset)
                            .build(),
                        (Some(bi), false) => opcode::ReadFixed::new($fd, base, len, bi)
                            .offset(m.offset)
                            .build(),
                        (None, true) => opcode::Write::new($fd, base, len).offset(m.offset).build(),
                        (None, false) => opcode::Read::new($fd, base, len).offset(m.offset).build(),
                    }
                } else if write {
                    opcode::Writev::new($fd, iov_ptr, iov_cnt)
                        .offset(m.offset)
                        .build()
                } else {
                    opcode::Readv::new($fd, iov_ptr, iov_cnt)
                        .offset(m.offset)
                        .build()
                }
            };
        }
        let entry = match fixed_file {
            Some(i) => sqe!(types::Fixed(i)),
            None => sqe!(types::Fd(m.fd)),
        }
        .user_data(idx as u64);
        // SAFETY: the iovec array (if any) is owned by slots[idx] until
        // completion and the buffers are valid per the caller's contract.
        unsafe { self.push_entry(&entry)? };
        let continues = self.last == Some((m.fd, m.offset, write));
        self.run_bytes = if continues && self.unsubmitted > 1 {
            self.run_bytes + len as u64
        } else {
            len as u64
        };
        self.last = Some((m.fd, m.offset + len as u64, write));
        if self.eager
            && self.unsubmitted >= self.round.max(1)
            && !(continues && self.run_bytes < MERGE_BYTES)
        {
            // The request is queued either way: a failed early submission
            // must not be reported as a failed request (its buffers are in
            // the ring); it goes with the next submit() or reap().
            let ring = self.ring.as_mut().expect("pushed to the ring above");
            match ring.submit() {
                Ok(_) => {
                    self.round += self.unsubmitted;
                    self.unsubmitted = 0;
                }
                Err(e) => log::debug!("io_uring: early submission failed: {e}"),
            }
        }
        Ok(())
    }

    /// A free slot for a request that goes to the ring (waiting for a
    /// completion if none is free), counted as such.
    fn ring_slot(&mut self) -> Result<usize> {
        if self.free.is_empty() {
            self.reap(1)?;
        }
        self.counts.0 += 1;
        Ok(self.free.pop().expect("reap frees a slot"))
    }

    /// Puts `entry` in the submission queue (submitting what is there first
    /// if it is full).
    ///
    /// # Safety
    /// The memory `entry` names must stay valid until its completion.
    unsafe fn push_entry(&mut self, entry: &io_uring::squeue::Entry) -> Result<()> {
        let ring = self
            .ring
            .as_mut()
            .expect("a request for the ring implies one");
        // SAFETY: by this function's contract.
        if unsafe { ring.submission().push(entry) }.is_err() {
            ring.submit()?;
            self.unsubmitted = 0;
            // SAFETY: as above.
            unsafe { ring.submission().push(entry) }
                .map_err(|_| Error::Io(io::Error::other("io_uring submission queue full")))?;
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Index of `fd` in the ring's registered file table, registering it on
    /// first use (saves a file reference count round trip per request).
    fn fixed_file(&mut self, fd: RawFd) -> Option<u32> {
        if self.registered_fd == Some(fd) {
            return Some(0);
        }
        if self.registered_fd.is_some() || self.register_tried {
            return None;
        }
        self.register_tried = true;
        let ring = self.ring.as_ref()?;
        match ring.submitter().register_files(&[fd]) {
            Ok(()) => {
                self.registered_fd = Some(fd);
                Some(0)
            }
            Err(e) => {
                log::debug!("io_uring file registration failed: {e}");
                None
            }
        }
    }

    /// Make every write completed so far durable; completes synchronously.
    pub fn flush(&mut self, user_data: u64) -> Result<()> {
        let res = self.disk.flush();
        self.complete_sync(user_data, res, 0);
        Ok(())
    }

    /// Hand queued requests to the kernel.
    pub fn submit(&mut self) -> Result<()> {
        if let Some(ring) = self.ring.as_mut() {
            // Entries may remain queued after a partial submission.
            if self.unsubmitted > 0 || !ring.submission().is_empty() {
                ring.submit()?;
                self.unsubmitted = 0;
            }
            self.round = 0;
        }
        Ok(())
    }

    /// Submit, then block until at least `want` kernel requests complete
    /// (or none are in flight).
    pub fn reap(&mut self, want: usize) -> Result<()> {
        let in_flight = self.slots.len() - self.free.len();
        if let Some(ring) = self.ring.as_mut() {
            let want = want.min(in_flight);
            ring.submit_and_wait(want)?;
            self.unsubmitted = 0;
            self.round = 0;
        }
        self.drain_cq();
        Ok(())
    }

    fn drain_cq(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut next_steps = Vec::new();
        let mut ended = Vec::new();
        let mut inflated = Vec::new();
        for cqe in ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(slot) = self.slots.get_mut(idx).filter(|s| s.busy) {
                if slot.inflate.is_some() {
                    inflated.push((idx, cqe.result()));
                    continue;
                }
                if let Some(cow) = slot.cow.as_mut() {
                    if cow.reading && cqe.result() as u64 == cow.plan.len {
                        cow.reading = false;
                        // SAFETY: the request's iovecs stay valid until it
                        // completes (the caller's contract).
                        unsafe { cow.merge(&slot.iovecs) };
                        next_steps.push(idx);
                    } else {
                        ended.push((idx, cqe.result()));
                    }
                    continue;
                }
                slot.busy = false;
                let mut res = cqe.result();
                if let Some((off, len, host)) = slot.commit.take() {
                    if res >= 0 && res as u64 == len {
                        if let Err(e) = self.disk.commit_alloc(off, len, host) {
                            log::debug!("committing an allocating write failed: {e}");
                            res = -e.errno();
                        }
                    } else {
                        self.disk.abort_alloc(off, len, host);
                        if res >= 0 {
                            // A short write into fresh space is not retried.
                            res = -libc::EIO;
                        }
                    }
                }
                self.done.push_back((slot.user_data, res));
                self.free.push(idx);
            }
        }
        for (idx, res) in ended {
            self.end_cow(idx, res);
        }
        for (idx, res) in inflated {
            self.end_inflate(idx, res);
        }
        if next_steps.is_empty() {
            return;
        }
        for idx in next_steps {
            if let Err(e) = self.push_cow_step(idx) {
                self.end_cow(idx, -e.errno());
            }
        }
        // The caller may wait on the eventfd alone: the writes go out now.
        if let Some(ring) = self.ring.as_mut() {
            match ring.submit() {
                Ok(_) => self.unsubmitted = 0,
                Err(e) => log::warn!("io_uring: submitting copy-on-write data failed: {e}"),
            }
        }
    }

    /// Number of requests the kernel has not completed yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Next completion: `(user_data, bytes or -errno)`.
    pub fn next_completed(&mut self) -> Option<(u64, i32)> {
        if self.done.is_empty() {
            self.drain_cq();
        }
        self.done.pop_front()
    }
}

impl Drop for AsyncDisk {
    fn drop(&mut self) {
        // Never free iovec arrays the kernel may still read.
        while self.in_flight() > 0 {
            if self.reap(1).is_err() {
                break;
            }
        }
        // A registered file would otherwise stay open (and keep its OFD
        // lock) until the kernel tears the ring down asynchronously, so an
        // immediate reopen of the image could fail with `Locked`.
        if let (Some(ring), Some(_)) = (self.ring.as_ref(), self.registered_fd) {
            if let Err(e) = ring.submitter().unregister_files() {
                log::warn!("io_uring: unregistering the image file failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
