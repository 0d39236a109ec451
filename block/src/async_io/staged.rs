//! The requests [`AsyncDisk`] does in steps through the ring: copy-on-write of part of some
//! clusters ([`Cow`]: read the span's current content, merge the write in, write the whole
//! to fresh space, commit) and reads of compressed clusters ([`Inflate`]: read the compressed
//! bytes, inflate on completion, copy the read's part out); the spare buffers they reuse.

use io_uring::{opcode, types};

use super::{AsyncDisk, Slot};
use crate::storage::AlignedBuf;
use crate::{CompressedRead, CowPlan, Result};

/// A read of compressed data: the host bytes come into `raw`, and on
/// completion the disk inflates them and the read's part is copied out.
pub(super) struct Inflate {
    plan: CompressedRead,
    raw: AlignedBuf,
}

/// A write of part of some clusters into fresh space: the span's current
/// content is read into `span`, the write's data (the slot's iovecs) copied
/// in at `at`, and the whole written to the reservation, then committed.
pub(super) struct Cow {
    pub(super) plan: CowPlan,
    span: AlignedBuf,
    at: usize,
    /// The write's own length, which its completion reports.
    len: usize,
    /// Still reading the current content.
    pub(super) reading: bool,
}

impl Cow {
    /// Copies the write's data into the span.
    ///
    /// # Safety
    /// The iovecs must describe valid memory (the caller's contract for the
    /// request, until it completes).
    pub(super) unsafe fn merge(&mut self, iovecs: &[libc::iovec]) {
        let span = self.span.as_mut_slice();
        let mut at = self.at;
        for v in iovecs {
            // SAFETY: valid memory by this function's contract.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            span[at..at + v.iov_len].copy_from_slice(src);
            at += v.iov_len;
        }
    }
}

impl AsyncDisk {
    /// Starts the copy-on-write `plan` for a write of `iovecs` at `offset`.
    ///
    /// # Safety
    /// Same contract as [`AsyncDisk::write_vectored`].
    pub(super) unsafe fn queue_cow(
        &mut self,
        plan: CowPlan,
        offset: u64,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<()> {
        let idx = match self.ring_slot() {
            Ok(idx) => idx,
            Err(e) => {
                self.disk
                    .abort_alloc(plan.start, plan.len, plan.target.offset);
                return Err(e);
            }
        };
        let mut span = self.take_buf(plan.len as usize);
        if plan.source.is_none() {
            span.as_mut_slice()[..plan.len as usize].fill(0);
        }
        let mut cow = Box::new(Cow {
            plan,
            span,
            at: (offset - plan.start) as usize,
            len: iovecs.iter().map(|v| v.iov_len).sum(),
            reading: plan.source.is_some(),
        });
        if !cow.reading {
            // Zeroes around it (filled above): the data goes in now.
            // SAFETY: the caller's contract.
            unsafe { cow.merge(iovecs) };
        }
        // The iovecs are kept until the read completes, to copy the data in then.
        self.claim_staged(idx, user_data, iovecs).cow = Some(cow);
        if let Err(e) = self.push_cow_step(idx) {
            self.end_cow(idx, -e.errno());
        }
        Ok(())
    }

    /// Marks `slots[idx]` busy for a request done in steps (copy-on-write,
    /// compressed read), keeping a copy of its iovecs.
    fn claim_staged(&mut self, idx: usize, user_data: u64, iovecs: &[libc::iovec]) -> &mut Slot {
        let slot = &mut self.slots[idx];
        slot.user_data = user_data;
        slot.busy = true;
        slot.commit = None;
        slot.iovecs.clear();
        slot.iovecs.extend_from_slice(iovecs);
        slot
    }

    /// A buffer of at least `len` bytes (not zeroed when reused).
    fn take_buf(&mut self, len: usize) -> AlignedBuf {
        match self.spare.iter().position(|b| b.as_slice().len() >= len) {
            Some(i) => self.spare.swap_remove(i),
            None => AlignedBuf::new(len),
        }
    }

    /// Keeps `buf` for a later copy-on-write or compressed read (as many as
    /// there are slots).
    fn give_buf(&mut self, buf: AlignedBuf) {
        if self.spare.len() < self.slots.len() {
            self.spare.push(buf);
        }
    }

    /// Starts reading the compressed data of `plan` for a read into `iovecs`.
    ///
    /// # Safety
    /// Same contract as [`AsyncDisk::read_vectored`].
    pub(super) unsafe fn queue_inflate(
        &mut self,
        plan: CompressedRead,
        iovecs: &[libc::iovec],
        user_data: u64,
    ) -> Result<()> {
        let idx = self.ring_slot()?;
        let mut raw = self.take_buf(plan.read_len as usize);
        let (buf, len) = (raw.as_mut_slice().as_mut_ptr(), plan.read_len as u32);
        // The iovecs are kept until the data is inflated, to copy it out then.
        self.claim_staged(idx, user_data, iovecs).inflate = Some(Box::new(Inflate { plan, raw }));
        let m = plan.read;
        let entry = match self.fixed_file(m.fd) {
            Some(i) => opcode::Read::new(types::Fixed(i), buf, len),
            None => opcode::Read::new(types::Fd(m.fd), buf, len),
        }
        .offset(m.offset)
        .build()
        .user_data(idx as u64);
        // SAFETY: the buffer lives in the slot's Inflate until the slot
        // completes.
        if let Err(e) = unsafe { self.push_entry(&entry) } {
            self.end_inflate(idx, -e.errno());
        }
        Ok(())
    }

    /// Ends the compressed read in `slots[idx]`, whose data read completed
    /// with `res`: inflates it and copies the read's part out.
    pub(super) fn end_inflate(&mut self, idx: usize, res: i32) {
        let slot = &mut self.slots[idx];
        let inf = slot.inflate.take().expect("a compressed-read slot");
        let out = if res < 0 {
            res
        } else {
            let raw = &inf.raw.as_slice()[..(res as usize).min(inf.plan.read_len as usize)];
            match self.disk.inflate(&inf.plan, raw) {
                Ok(data) => {
                    let mut at = 0;
                    for v in &slot.iovecs {
                        let n = v.iov_len.min(data.len() - at);
                        // SAFETY: the request's iovecs describe valid memory
                        // until it completes (the caller's contract); `n` bytes
                        // fit in this one.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                data[at..].as_ptr(),
                                v.iov_base as *mut u8,
                                n,
                            )
                        };
                        at += n;
                    }
                    at as i32
                }
                Err(e) => {
                    log::debug!("inflating a compressed read failed: {e}");
                    -e.errno()
                }
            }
        };
        slot.busy = false;
        self.done.push_back((slot.user_data, out));
        self.free.push(idx);
        self.give_buf(inf.raw);
    }

    /// Queues the next step of the copy-on-write in `slots[idx]`: the read of
    /// the span's current content, or the write of the merged span.
    pub(super) fn push_cow_step(&mut self, idx: usize) -> Result<()> {
        let cow = self.slots[idx].cow.as_mut().expect("a copy-on-write slot");
        let (m, write) = match (cow.reading, cow.plan.source) {
            (true, Some(source)) => (source, false),
            _ => (cow.plan.target, true),
        };
        let (buf, len) = (cow.span.as_mut_slice().as_mut_ptr(), cow.plan.len as u32);
        let fixed = self.fixed_file(m.fd);
        macro_rules! sqe {
            ($fd:expr) => {
                if write {
                    opcode::Write::new($fd, buf, len).offset(m.offset).build()
                } else {
                    opcode::Read::new($fd, buf, len).offset(m.offset).build()
                }
            };
        }
        let entry = match fixed {
            Some(i) => sqe!(types::Fixed(i)),
            None => sqe!(types::Fd(m.fd)),
        }
        .user_data(idx as u64);
        // SAFETY: the span buffer lives in the slot's Cow until the slot
        // completes.
        unsafe { self.push_entry(&entry) }
    }

    /// Ends the copy-on-write in `slots[idx]` after its last step completed
    /// with `res`: commits it if the whole span was written, else drops the
    /// reservation; the request completes with its length or an error.
    pub(super) fn end_cow(&mut self, idx: usize, res: i32) {
        let slot = &mut self.slots[idx];
        let cow = slot.cow.take().expect("a copy-on-write slot");
        let (start, len, host) = (cow.plan.start, cow.plan.len, cow.plan.target.offset);
        let out = if res >= 0 && res as u64 == len && !cow.reading {
            match self.disk.commit_alloc(start, len, host) {
                Ok(()) => cow.len as i32,
                Err(e) => {
                    log::debug!("committing a copy-on-write failed: {e}");
                    -e.errno()
                }
            }
        } else {
            self.disk.abort_alloc(start, len, host);
            if res < 0 {
                res
            } else {
                -libc::EIO
            }
        };
        slot.busy = false;
        self.done.push_back((slot.user_data, out));
        self.free.push(idx);
        self.give_buf(cow.span);
    }
}
