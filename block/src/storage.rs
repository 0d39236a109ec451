// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Positional I/O on the file that holds an image.
//!
//! Format back-ends access their file through [`Storage`] so tests can
//! interpose on the write sequence (crash simulation) and so O_DIRECT
//! alignment is handled in one place.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};

/// Alignment used for O_DIRECT bounce buffers.
pub const DIRECT_ALIGN: usize = 4096;

/// Positional access to the host file of an image.
pub trait Storage: Send {
    /// Read exactly `buf.len()` bytes at `off`; a short read is an error.
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`.
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend the file.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Make previous writes durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    /// Deallocate a range (keeps the size); reads of it return zeroes.
    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()>;
    /// Allocate `[off, off+len)` (extending the file if needed) so later
    /// direct writes there are overwrites, not extending or allocating
    /// writes (which io_uring would have to hand to a worker thread, one at
    /// a time per file). Unsupported: `Ok(false)`, nothing changed.
    fn preallocate(&mut self, _off: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// The file descriptor, for the asynchronous path.
    fn raw_fd(&self) -> Option<RawFd>;
    /// Whether the file was opened with O_DIRECT.
    fn is_direct(&self) -> bool {
        false
    }
}

/// A [`Storage`] backed by a real file, optionally opened with O_DIRECT.
pub struct FileStorage {
    file: File,
    direct: bool,
    /// The errno of the first `fdatasync` that failed: every later sync fails with it.
    sync_failed: Option<i32>,
}

impl FileStorage {
    /// Wrap `file`; `direct` says whether it was opened with O_DIRECT.
    pub fn new(file: File, direct: bool) -> Self {
        FileStorage {
            file,
            direct,
            sync_failed: None,
        }
    }

    /// The wrapped file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Heap buffer aligned to [`DIRECT_ALIGN`].
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes (rounded up to the alignment).
    pub fn new(len: usize) -> Self {
        let len = len.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let layout = std::alloc::Layout::from_size_align(len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    /// The buffer as a slice.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len bytes owned exclusively by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(self.len, DIRECT_ALIGN).expect("valid layout");
        // SAFETY: ptr was allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

fn is_aligned(buf: &[u8], off: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && off.is_multiple_of(DIRECT_ALIGN as u64)
}

fn aligned_span(off: u64, len: usize) -> (u64, usize) {
    let a = DIRECT_ALIGN as u64;
    let start = off / a * a;
    let end = (off + len as u64).div_ceil(a) * a;
    (start, (end - start) as usize)
}

/// Read as much as possible at `off`; returns the number of bytes read (short at EOF).
fn read_full_at(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Storage for FileStorage {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.direct || is_aligned(buf, off) {
            return self.file.read_exact_at(buf, off);
        }
        let (start, len) = aligned_span(off, buf.len());
        let mut bounce = AlignedBuf::new(len);
        let n = read_full_at(&self.file, &mut bounce.as_mut_slice()[..len], start)?;
        let skip = (off - start) as usize;
        if n < skip + buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read beyond end of file",
            ));
        }
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.direct || is_aligned(buf, off) {
            return self.file.write_all_at(buf, off);
        }
        if off.is_multiple_of(DIRECT_ALIGN as u64) && buf.len().is_multiple_of(DIRECT_ALIGN) {
            // Only the memory is misaligned: copy, no read-modify-write.
            let mut bounce = AlignedBuf::new(buf.len());
            bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
            return self.file.write_all_at(&bounce.as_slice()[..buf.len()], off);
        }
        // Read-modify-write through an aligned bounce buffer.
        let (start, len) = aligned_span(off, buf.len());
        let mut bounce = AlignedBuf::new(len);
        let file_len = self.file.metadata()?.len();
        read_full_at(&self.file, &mut bounce.as_mut_slice()[..len], start)?;
        let skip = (off - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce.as_slice()[..len], start)?;
        let end = off + buf.len() as u64;
        if start + len as u64 > file_len.max(end) {
            // The aligned write extended the file past what was asked.
            self.file.set_len(file_len.max(end))?;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    /// A failed `fdatasync` stays failed. The kernel reports a writeback error to a file
    /// once and may have dropped the pages that did not reach the disk (they are marked clean),
    /// so the next `fdatasync` would succeed although writes acknowledged before it are lost:
    /// a guest told its FLUSH succeeded would believe them safe. As QEMU does, every later
    /// sync fails too, until the image is opened again.
    fn sync(&mut self) -> io::Result<()> {
        if let Some(errno) = self.sync_failed {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.file.sync_data().inspect_err(|e| {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            log::error!(
                "fdatasync failed ({e}): writes may be lost; every later flush of this image fails"
            );
            self.sync_failed = Some(errno);
        })
    }

    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()> {
        punch_hole(&self.file, off, len)
    }

    fn preallocate(&mut self, off: u64, len: u64) -> io::Result<bool> {
        match fallocate(&self.file, 0, off, len) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn is_direct(&self) -> bool {
        self.direct
    }
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE) on `file`.
pub fn punch_hole(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// fallocate(ZERO_RANGE | KEEP_SIZE) on `file`.
pub fn zero_range(file: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate only operates on the file descriptor we own; no memory is passed.
    let ret = unsafe { libc::fallocate64(file.as_raw_fd(), mode, off, len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An in-memory [`Storage`], for fuzzing and tests. Growth is capped.
pub struct MemStorage {
    /// The file content.
    pub data: Vec<u8>,
    /// Largest length the file may grow to.
    pub max_len: u64,
}

impl MemStorage {
    /// Wrap `data`; the file may grow to `max_len` bytes.
    pub fn new(data: Vec<u8>, max_len: u64) -> Self {
        MemStorage { data, max_len }
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "beyond end of file")
}

impl Storage for MemStorage {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > self.data.len() as u64 {
            return Err(eof());
        }
        buf.copy_from_slice(&self.data[off as usize..end as usize]);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64).ok_or_else(eof)?;
        if end > self.max_len {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        if end > self.data.len() as u64 {
            self.data.resize(end as usize, 0);
        }
        self.data[off as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if len > self.max_len {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.data.resize(len as usize, 0);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()> {
        let start = (off as usize).min(self.data.len());
        let end = (off.saturating_add(len) as usize).min(self.data.len());
        self.data[start..end].fill(0);
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}
