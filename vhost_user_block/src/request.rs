//! One virtio-blk request: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, served as our
//! built-in virtio-blk device serves them (virtio-devices/src/block.rs). The chain is checked in
//! full (descriptor directions, lengths, sector range, addresses) before any I/O; a bad request
//! completes with IOERR or UNSUPP, never a panic. Guest memory is the driver's (hostile): every
//! access goes through `vm_memory`'s checked accessors.

use std::io::{IoSlice, IoSliceMut};

use block::DiskFile;
use log::debug;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestMemory, Permissions};

pub const SECTOR_SIZE: u64 = 512;
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
/// Largest data transfer of one request (as the built-in device).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Largest discard / write-zeroes range, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Most descriptors one request may have (a longer chain is refused before any I/O).
pub const MAX_DESCRIPTORS: usize = 1024;

/// The image and how it is presented.
pub struct Disk {
    file: Box<dyn DiskFile>,
    size: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
}

impl Disk {
    /// Serves `file`; GET_ID answers `id` (its first 20 bytes).
    pub fn new(file: Box<dyn DiskFile>, id: &[u8]) -> Self {
        let mut buf = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        buf[..n].copy_from_slice(&id[..n]);
        Disk {
            size: file.size(),
            readonly: file.readonly(),
            file,
            id: buf,
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }
}

/// Why a request failed, as its status byte says.
#[derive(Debug)]
enum Fail {
    IoErr(String),
    Unsupp,
}

fn io(why: impl Into<String>) -> Fail {
    Fail::IoErr(why.into())
}

/// Serves the request whose descriptors are `chain` (in chain order) and returns the used
/// length: the bytes written into the driver's buffers, status byte included; 0 when there is
/// no writable status byte to report in.
pub fn serve<M: GuestMemory>(mem: &M, disk: &mut Disk, chain: &[Descriptor]) -> u32 {
    // The status byte: the last byte of the last descriptor, which must be writable.
    let Some(last) = chain.last().filter(|d| d.is_write_only() && d.len() > 0) else {
        debug!("vhost-user-blk: request without a writable status byte");
        return 0;
    };
    let Some(status_at) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return 0;
    };
    // A request whose completion could not be reported is not run.
    if !mem.check_range(status_at, 1, Permissions::Write) {
        debug!("vhost-user-blk: status byte outside guest memory");
        return 0;
    }
    let (status, written) = match execute(mem, disk, chain) {
        Ok(n) => (S_OK, n),
        Err(Fail::Unsupp) => (S_UNSUPP, 0),
        Err(Fail::IoErr(why)) => {
            debug!("vhost-user-blk: request failed: {why}");
            (S_IOERR, 0)
        }
    };
    match mem.write_obj(status, status_at) {
        Ok(()) => written.saturating_add(1),
        Err(_) => {
            debug!("vhost-user-blk: status byte outside guest memory");
            0
        }
    }
}

/// Runs the request; returns the bytes written into the driver's data buffers.
fn execute<M: GuestMemory>(mem: &M, disk: &mut Disk, chain: &[Descriptor]) -> Result<u32, Fail> {
    let hdr = chain.first().ok_or_else(|| io("empty chain"))?;
    if hdr.is_write_only() || hdr.len() < 16 || chain.len() < 2 {
        return Err(io("bad request header descriptor"));
    }
    if chain.len() > MAX_DESCRIPTORS {
        return Err(io("too many descriptors"));
    }
    let mut h = [0u8; 16];
    mem.read_slice(&mut h, hdr.addr())
        .map_err(|_| io("header outside guest memory"))?;
    let req_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
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
    match req_type {
        T_IN | T_OUT => {
            if data_len % SECTOR_SIZE != 0 {
                return Err(io("length not a multiple of 512"));
            }
            if req_type == T_OUT && disk.readonly {
                // The spec: a write to a read-only device fails with IOERR, nothing written.
                return Err(io("write to a read-only disk"));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .filter(|o| o.checked_add(data_len).is_some_and(|end| end <= disk.size))
                .ok_or_else(|| io("sector range beyond the disk"))?;
            if req_type == T_IN {
                read(mem, disk, data, offset)?;
                Ok(data_len as u32)
            } else {
                write(mem, disk, data, offset)?;
                Ok(0)
            }
        }
        T_FLUSH => {
            disk.file.flush().map_err(|e| io(e.to_string()))?;
            Ok(0)
        }
        T_GET_ID => {
            let mut left = &disk.id[..];
            let mut n = 0u32;
            for d in data {
                let k = left.len().min(d.len() as usize);
                mem.write_slice(&left[..k], d.addr())
                    .map_err(|_| io("GET_ID buffer outside guest memory"))?;
                left = &left[k..];
                n += k as u32;
            }
            Ok(n)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            // A read-only disk does not offer DISCARD or WRITE_ZEROES: the spec's answer to a
            // command whose feature was not offered is UNSUPP.
            if disk.readonly {
                return Err(Fail::Unsupp);
            }
            // One segment of 16 bytes: sector u64, num_sectors u32, flags u32.
            if data.len() != 1 || data_len != 16 {
                return Err(Fail::Unsupp);
            }
            let mut seg = [0u8; 16];
            mem.read_slice(&mut seg, data[0].addr())
                .map_err(|_| io("segment outside guest memory"))?;
            let start = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let count = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            if count > MAX_DISCARD_SECTORS || flags & !1 != 0 {
                return Err(Fail::Unsupp);
            }
            let len = u64::from(count) * SECTOR_SIZE;
            let off = start
                .checked_mul(SECTOR_SIZE)
                .filter(|o| o.checked_add(len).is_some_and(|e| e <= disk.size))
                .ok_or_else(|| io("discard range beyond the disk"))?;
            let r = if req_type == T_DISCARD {
                disk.file.discard(off, len)
            } else {
                disk.file.write_zeroes(off, len)
            };
            r.map_err(|e| io(e.to_string()))?;
            Ok(0)
        }
        _ => Err(Fail::Unsupp),
    }
}

/// The host buffers behind `data` (each descriptor may span several memory regions), checked
/// for `access`.
fn host_buffers<M: GuestMemory>(
    mem: &M,
    data: &[Descriptor],
    access: Permissions,
) -> Result<Vec<(*mut u8, usize)>, Fail> {
    let mut out = Vec::with_capacity(data.len());
    for d in data {
        let slices = mem
            .get_slices(d.addr(), d.len() as usize, access)
            .map_err(|_| {
                io(format!(
                    "buffer {:#x}+{:#x} outside guest memory",
                    d.addr().0,
                    d.len()
                ))
            })?;
        for s in slices {
            let s = s.map_err(|_| {
                io(format!(
                    "buffer {:#x}+{:#x} outside guest memory",
                    d.addr().0,
                    d.len()
                ))
            })?;
            out.push((s.ptr_guard_mut().as_ptr(), s.len()));
        }
    }
    Ok(out)
}

fn read<M: GuestMemory>(
    mem: &M,
    disk: &mut Disk,
    data: &[Descriptor],
    offset: u64,
) -> Result<(), Fail> {
    let bufs = host_buffers(mem, data, Permissions::Write)?;
    let mut iov: Vec<IoSliceMut> = bufs
        .iter()
        // SAFETY: each buffer lies inside a mapped guest memory region (checked by
        // `get_slices`), which `mem` keeps mapped for this call. The guest may write it
        // concurrently: it then gets what it wrote or what was read, its own doing.
        .map(|&(p, n)| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) }))
        .collect();
    disk.file
        .read_at(offset, &mut iov)
        .map_err(|e| io(e.to_string()))?;
    mark_written(mem, data);
    Ok(())
}

/// Marks `data`'s buffers written in guest memory's dirty bitmap (the frontend's log during a
/// live migration, VHOST_USER_PROTOCOL_F_LOG_SHMFD): they were written through host pointers,
/// which `vm_memory` does not see. Buffers outside guest memory (refused before the I/O) are
/// skipped.
fn mark_written<M: GuestMemory>(mem: &M, data: &[Descriptor]) {
    use vm_memory::bitmap::Bitmap;
    for d in data {
        let Ok(slices) = mem.get_slices(d.addr(), d.len() as usize, Permissions::Write) else {
            continue;
        };
        for s in slices.flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

fn write<M: GuestMemory>(
    mem: &M,
    disk: &mut Disk,
    data: &[Descriptor],
    offset: u64,
) -> Result<(), Fail> {
    let bufs = host_buffers(mem, data, Permissions::Read)?;
    let iov: Vec<IoSlice> = bufs
        .iter()
        // SAFETY: as in `read`; only read here.
        .map(|&(p, n)| IoSlice::new(unsafe { std::slice::from_raw_parts(p.cast_const(), n) }))
        .collect();
    disk.file
        .write_at(offset, &iov)
        .map_err(|e| io(e.to_string()))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
