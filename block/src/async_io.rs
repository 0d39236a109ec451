// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Batched asynchronous I/O for any [`DiskFile`].
//!
//! Requests whose range maps directly onto allocated host data
//! ([`DiskFile::map_host`]) go to an io_uring when the kernel has one
//! (probed at runtime). Everything else (allocation, compressed clusters,
//! backing files, ...) is done synchronously and completed at once. Either
//! way the completion is reported through [`AsyncDisk::next_completed`] and
//! the [`AsyncDisk::notifier`] eventfd is signalled.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, register::Probe, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{DiskFile, Error, Result};

/// Largest ring accepted.
pub const MAX_DEPTH: u32 = 4096;

struct Slot {
    user_data: u64,
    // Kept alive until the kernel completes the request.
    _iovecs: Box<[libc::iovec]>,
}

/// An asynchronous, batched front for a [`DiskFile`].
pub struct AsyncDisk {
    disk: Box<dyn DiskFile>,
    ring: Option<IoUring>,
    eventfd: EventFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    unsubmitted: usize,
    done: VecDeque<(u64, i32)>,
    // The eventfd is registered with the ring on the first notifier() call,
    // so callers that poll (benchmarks) skip a signal per completion.
    eventfd_registered: std::cell::Cell<bool>,
    // Memory registered with the ring (e.g. guest RAM): (start, len).
    fixed: Vec<(usize, usize)>,
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
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            unsubmitted: 0,
            done: VecDeque::new(),
            eventfd_registered: std::cell::Cell::new(false),
            fixed: Vec::new(),
        })
    }

    /// Whether requests may go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
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
        let _ = self.eventfd.write(1);
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
        let mapping = if self.ring.is_some() && len > 0 && len <= i32::MAX as usize {
            match self.disk.map_host(offset, len as u64, write) {
                Ok(m) => m.filter(|m| !m.direct || Self::aligned(iovecs, m.offset)),
                Err(e) => {
                    self.complete_sync(user_data, Err(e), 0);
                    return Ok(());
                }
            }
        } else {
            None
        };
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
            self.complete_sync(user_data, res, len);
            return Ok(());
        };
        if self.free.is_empty() {
            self.reap(1)?;
        }
        let idx = self.free.pop().expect("reap frees a slot");
        let iov: Box<[libc::iovec]> = iovecs.into();
        let entry = if iov.len() == 1 {
            let (base, len) = (iov[0].iov_base as *mut u8, iov[0].iov_len as u32);
            let fixed = self.fixed_index(base as usize, len as usize);
            if let Some(bi) = fixed {
                if write {
                    opcode::WriteFixed::new(types::Fd(m.fd), base, len, bi)
                        .offset(m.offset)
                        .build()
                } else {
                    opcode::ReadFixed::new(types::Fd(m.fd), base, len, bi)
                        .offset(m.offset)
                        .build()
                }
            } else if write {
                opcode::Write::new(types::Fd(m.fd), base, len)
                    .offset(m.offset)
                    .build()
            } else {
                opcode::Read::new(types::Fd(m.fd), base, len)
                    .offset(m.offset)
                    .build()
            }
        } else if write {
            opcode::Writev::new(types::Fd(m.fd), iov.as_ptr(), iov.len() as u32)
                .offset(m.offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(m.fd), iov.as_ptr(), iov.len() as u32)
                .offset(m.offset)
                .build()
        }
        .user_data(idx as u64);
        self.slots[idx] = Some(Slot {
            user_data,
            _iovecs: iov,
        });
        let ring = self.ring.as_mut().expect("mapping implies a ring");
        // SAFETY: the iovec array is owned by slots[idx] until completion and
        // the buffers are valid per the caller's contract.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            ring.submit()?;
            self.unsubmitted = 0;
            // SAFETY: as above.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| Error::Io(io::Error::other("io_uring submission queue full")))?;
        }
        self.unsubmitted += 1;
        Ok(())
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
            if self.unsubmitted > 0 {
                ring.submit()?;
                self.unsubmitted = 0;
            }
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
        }
        self.drain_cq();
        Ok(())
    }

    fn drain_cq(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for cqe in ring.completion() {
            let idx = cqe.user_data() as usize;
            if let Some(slot) = self.slots.get_mut(idx).and_then(Option::take) {
                self.done.push_back((slot.user_data, cqe.result()));
                self.free.push(idx);
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
    }
}
