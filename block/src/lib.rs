// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Disk image back-ends for the VMM: raw, qcow2 (v2/v3), vhdx and fixed vhd.
//!
//! Every back-end implements [`DiskFile`]. [`open_disk`] detects the format
//! (or takes an explicit [`ImageType`]), takes an advisory lock and returns a
//! boxed disk. [`AsyncDisk`] wraps any disk with an io_uring batched path,
//! falling back to synchronous completion where a request cannot be sent to
//! the host file directly.

#![deny(missing_docs)]

pub mod async_io;
pub mod detect;
mod error;
pub mod fuzz;
pub mod lock;
pub mod qcow2;
pub mod raw;
mod shared;
pub mod storage;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::fs::{File, OpenOptions as StdOpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

pub use async_io::AsyncDisk;
pub use error::{Error, Result};
pub use lock::{DiskLock, LockGranularity};
pub use shared::SharedDisk;

/// Image formats understood by [`open_disk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageType {
    /// A plain file or block device.
    Raw,
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
    /// Virtual PC fixed image.
    Vhd,
    /// Hyper-V VHDX, fixed or dynamic.
    Vhdx,
    /// A flat VMDK: a text descriptor naming raw extent files.
    Vmdk,
}

impl std::str::FromStr for ImageType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(ImageType::Raw),
            "qcow2" => Ok(ImageType::Qcow2),
            "vhd" | "vpc" => Ok(ImageType::Vhd),
            "vhdx" => Ok(ImageType::Vhdx),
            "vmdk" => Ok(ImageType::Vmdk),
            _ => Err(Error::InvalidArgument(format!(
                "unknown image type {s:?} (expected raw, qcow2, vhd, vhdx or vmdk)"
            ))),
        }
    }
}

impl std::fmt::Display for ImageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageType::Raw => "raw",
            ImageType::Qcow2 => "qcow2",
            ImageType::Vhd => "vhd",
            ImageType::Vhdx => "vhdx",
            ImageType::Vmdk => "vmdk",
        })
    }
}

/// Options for [`open_disk`].
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open read-only; writes fail with [`Error::ReadOnly`].
    pub readonly: bool,
    /// Use O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Force a format instead of probing the header.
    pub image_type: Option<ImageType>,
    /// Allow qcow2 backing files (off by default).
    pub backing_files: bool,
    /// Deallocate host space on discard / write-zeroes where possible.
    pub sparse: bool,
    /// What the image's lock covers (backing files are locked the same way).
    pub lock_granularity: LockGranularity,
}

/// Where a guest range lives in a host file, for direct asynchronous I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostMapping {
    /// Host file descriptor.
    pub fd: RawFd,
    /// Offset in the host file.
    pub offset: u64,
    /// Whether the fd was opened with O_DIRECT (buffers must be aligned).
    pub direct: bool,
}

/// A virtual disk back-end.
///
/// Offsets and lengths are in bytes of the virtual disk. A request must lie
/// inside `[0, size())`.
pub trait DiskFile: Send {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Read `bufs.len()` consecutive buffers starting at `offset`.
    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;
    /// Write consecutive buffers starting at `offset`.
    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;
    /// Make every acknowledged write durable.
    fn flush(&mut self) -> Result<()>;
    /// Hint that a range is unused; its content becomes unspecified
    /// (zeroes or backing-file data).
    fn discard(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Make a range read as zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Changes the virtual size to `size` bytes (`vm.resize-disk`): a grown disk reads zeroes
    /// past the old end, a shrunk one loses what lay past the new. Raw images grow and
    /// shrink, qcow2 ones grow; the other formats refuse.
    fn resize(&mut self, _size: u64) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "a {} image cannot be resized (raw and qcow2 images can)",
            self.image_type()
        )))
    }
    /// Whether the disk was opened read-only.
    fn readonly(&self) -> bool;
    /// The image format.
    fn image_type(&self) -> ImageType;
    /// If `[offset, offset+len)` maps to one contiguous, already allocated
    /// host range that can be read (or overwritten in place when `write`)
    /// without metadata changes, return it. Used by [`AsyncDisk`].
    fn map_host(&mut self, _offset: u64, _len: u64, _write: bool) -> Result<Option<HostMapping>> {
        Ok(None)
    }
    /// For a write of `[offset, offset+len)` that [`DiskFile::map_host`]
    /// cannot place: reserve fresh, contiguous host space the data can be
    /// written to directly, changing no metadata yet. Once that write has
    /// succeeded, [`DiskFile::commit_alloc`] (same `offset`, `len`, and the
    /// returned host offset) makes the range point to it; if it failed,
    /// [`DiskFile::abort_alloc`] drops the reservation. Used by
    /// [`AsyncDisk`] so allocating writes go through io_uring too.
    fn alloc_host(&mut self, _offset: u64, _len: u64) -> Result<Option<HostMapping>> {
        Ok(None)
    }
    /// Make a range reserved by [`DiskFile::alloc_host`], whose data is now
    /// written at `host`, part of the disk.
    fn commit_alloc(&mut self, offset: u64, len: u64, host: u64) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "no pending allocation of {len} bytes at {offset:#x} (host {host:#x})"
        )))
    }
    /// Give up a reservation made by [`DiskFile::alloc_host`].
    fn abort_alloc(&mut self, _offset: u64, _len: u64, _host: u64) {}
    /// For a write that [`DiskFile::alloc_host`] cannot place because it
    /// covers clusters only in part: reserve fresh host space for the whole
    /// clusters it touches (as `alloc_host` does for them) and say where their
    /// current content is. The caller reads that content into a buffer of
    /// its own, puts the write's data in, writes the buffer to the
    /// reservation, then commits the whole span with
    /// [`DiskFile::commit_alloc`] (or aborts it). `None`: the synchronous
    /// path writes it.
    fn alloc_cow(&mut self, _offset: u64, _len: u64) -> Result<Option<CowPlan>> {
        Ok(None)
    }
    /// Whether a reservation not committed or aborted yet shares a cluster
    /// with `[offset, offset+len)`. A write there must wait for it: committing
    /// a whole cluster would undo a write to another part of it.
    fn alloc_pending(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// For a read of `[offset, offset+len)` that [`DiskFile::map_host`]
    /// cannot place because its data is stored compressed (in this image or
    /// down its backing chain): which host bytes hold it, so the caller can
    /// read them itself and have them inflated with [`DiskFile::inflate`].
    /// `None`: the synchronous path reads it.
    fn map_compressed(&mut self, _offset: u64, _len: u64) -> Result<Option<CompressedRead>> {
        Ok(None)
    }
    /// Inflates `raw`, the bytes the caller read at `plan.read` (possibly
    /// fewer than `plan.read_len` at the end of the file), and returns the
    /// `plan.len` bytes the read asked for.
    fn inflate(&mut self, plan: &CompressedRead, _raw: &[u8]) -> Result<&[u8]> {
        Err(Error::InvalidArgument(format!(
            "no compressed data for a read of {} bytes",
            plan.len
        )))
    }
}

/// Where the compressed data of a read is, from [`DiskFile::map_compressed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedRead {
    /// The host range to read (aligned for O_DIRECT if the file is direct).
    pub read: HostMapping,
    /// Its length.
    pub read_len: u64,
    /// Which layer of the backing chain has it (0: the image itself).
    pub layer: u32,
    /// The compressed cluster's host offset and compressed length.
    pub host: u64,
    /// Length of the compressed data (at `host`).
    pub comp_len: u64,
    /// Offset of the read in its cluster, and its length.
    pub in_off: u64,
    /// Length of the read.
    pub len: u64,
}

/// A copy-on-write allocation made by [`DiskFile::alloc_cow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowPlan {
    /// Start of the virtual range the reservation covers (whole clusters).
    pub start: u64,
    /// Length of that range.
    pub len: u64,
    /// Where the new data of the whole range goes.
    pub target: HostMapping,
    /// Where the range's current content is: `None` for zeroes.
    pub source: Option<HostMapping>,
}

/// Convenience helpers on top of [`DiskFile`].
pub trait DiskFileExt: DiskFile {
    /// Read into one buffer.
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(offset, &mut [IoSliceMut::new(buf)])
    }
    /// Write one buffer.
    fn write_all_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_at(offset, &[IoSlice::new(buf)])
    }
}

impl<T: DiskFile + ?Sized> DiskFileExt for T {}

/// Check that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Run `f(offset, buf)` over each slice of an iovec-like list.
pub(crate) fn for_each_read(
    offset: u64,
    size: u64,
    bufs: &mut [IoSliceMut<'_>],
    mut f: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    check_range(offset, total, size)?;
    let mut off = offset;
    for b in bufs.iter_mut() {
        f(off, b)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// Run `f(offset, buf)` over each slice of an iovec-like list.
pub(crate) fn for_each_write(
    offset: u64,
    size: u64,
    bufs: &[IoSlice<'_>],
    mut f: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    check_range(offset, total, size)?;
    let mut off = offset;
    for b in bufs.iter() {
        f(off, b)?;
        off += b.len() as u64;
    }
    Ok(())
}

/// Maximum length of a backing-file chain.
pub const MAX_BACKING_DEPTH: usize = 32;

/// Open a disk image, detecting its format unless `opts.image_type` is set.
pub fn open_disk(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Box<dyn DiskFile>> {
    let mut chain = Vec::new();
    open_disk_inner(path.as_ref(), opts, &mut chain)
}

/// [`open_disk`], with a handle on the image's own lock (its backing files' shared locks do
/// not keep another reader out), for a live migration to hand over.
pub fn open_disk_locked(
    path: impl AsRef<Path>,
    opts: &OpenOptions,
) -> Result<(Box<dyn DiskFile>, lock::DiskLock)> {
    let mut chain = Vec::new();
    let mut handle = None;
    let disk = open_disk_at(path.as_ref(), opts, &mut chain, Some(&mut handle))?;
    let handle = handle.ok_or_else(|| Error::Io(std::io::Error::other("no lock handle")))?;
    Ok((disk, handle))
}

/// Open the host file of an image with the access mode of `opts` and lock it.
pub(crate) fn open_file(path: &Path, opts: &OpenOptions) -> Result<File> {
    let mut o = StdOpenOptions::new();
    o.read(true).write(!opts.readonly);
    if opts.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o.open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    lock::lock_file(&file, path, !opts.readonly, opts.lock_granularity)?;
    Ok(file)
}

pub(crate) fn open_disk_inner(
    path: &Path,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskFile>> {
    open_disk_at(path, opts, chain, None)
}

/// `lock`: where to put a handle on the image's lock.
fn open_disk_at(
    path: &Path,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
    lock: Option<&mut Option<lock::DiskLock>>,
) -> Result<Box<dyn DiskFile>> {
    let canon = std::fs::canonicalize(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if chain.contains(&canon) {
        return Err(Error::BackingChain(format!(
            "{path:?} appears twice in the backing chain (loop)"
        )));
    }
    if chain.len() >= MAX_BACKING_DEPTH {
        return Err(Error::BackingChain(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH}"
        )));
    }
    chain.push(canon);
    let file = open_file(path, opts)?;
    if let Some(slot) = lock {
        *slot = Some(lock::DiskLock::of(
            &file,
            path,
            !opts.readonly,
            opts.lock_granularity,
        )?);
    }
    let image_type = match opts.image_type {
        Some(t) => t,
        // A VMDK names other files: opened as one only when asked (`image_type=vmdk`), never
        // probed, or a guest that writes a descriptor into its raw disk would have the VMM
        // open the files beside it at the next start (the original probes it and refuses
        // guest writes to sector 0 of a probed raw image instead).
        None => match detect::detect_image_type(&file)? {
            ImageType::Vmdk => {
                return Err(Error::Unsupported {
                    format: "vmdk",
                    reason: format!(
                        "{path:?} looks like a VMDK: give image_type=vmdk to open it as one \
                         (a VMDK is never probed)"
                    ),
                })
            }
            t => t,
        },
    };
    log::debug!("opening {path:?} as {image_type}");
    let disk: Box<dyn DiskFile> = match image_type {
        ImageType::Raw => Box::new(raw::RawDisk::new(file, opts)?),
        ImageType::Qcow2 => Box::new(qcow2::Qcow2Disk::open(file, path, opts, chain)?),
        ImageType::Vhd => Box::new(vhd::open_fixed(file, opts)?),
        ImageType::Vhdx => Box::new(vhdx::VhdxDisk::open(file, opts)?),
        ImageType::Vmdk => Box::new(vmdk::VmdkDisk::open(file, path, opts)?),
    };
    Ok(disk)
}
