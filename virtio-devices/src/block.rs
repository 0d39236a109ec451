//! virtio-blk over a `block::DiskFile`: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES, one
//! worker thread serving every queue. Each request is checked in full (descriptor directions,
//! lengths, sector range, addresses) before any I/O; a bad one completes with IOERR or UNSUPP.

use std::io::{IoSlice, IoSliceMut};

use block::DiskFile;
use log::{debug, warn};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::worker::{process_chains, QueueHandler, WorkerHandle};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, F_RING_INDIRECT_DESC,
    F_VERSION_1, TYPE_BLOCK,
};

pub const SECTOR_SIZE: u64 = 512;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
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
}

struct BlockHandler {
    disk: Box<dyn DiskFile>,
    readonly: bool,
    id: [u8; ID_BYTES],
    /// Reused for every request, so serving one allocates nothing.
    descs: Vec<Descriptor>,
    slices: Vec<(*mut u8, usize)>,
}

// SAFETY: the raw pointers in `slices` only live during one request on the worker thread; they
// are cleared before the handler could move.
unsafe impl Send for BlockHandler {}

/// Why a request failed, as the status byte says it.
enum Fail {
    IoErr(String),
    Unsupp,
}

impl BlockHandler {
    /// Serves one chain; returns the bytes written into the driver's buffers.
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> u32 {
        // The status byte: the last byte of the last descriptor, which must be writable.
        let Some(last) = chain.last().filter(|d| d.is_write_only() && d.len() > 0) else {
            debug!("virtio-blk: request without a writable status byte");
            return 0;
        };
        let status_addr = last.addr().checked_add(u64::from(last.len()) - 1);
        let (status, written) = match self.execute(mem, chain) {
            Ok(n) => (S_OK, n),
            Err(Fail::Unsupp) => (S_UNSUPP, 0),
            Err(Fail::IoErr(why)) => {
                debug!("virtio-blk: request failed: {why}");
                (S_IOERR, 0)
            }
        };
        match status_addr {
            Some(a) if mem.write_obj(status, a).is_ok() => written.saturating_add(1),
            _ => {
                debug!("virtio-blk: status byte outside guest memory");
                0
            }
        }
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Result<u32, Fail> {
        let io = |s: &str| Fail::IoErr(s.to_string());
        let hdr = chain.first().ok_or_else(|| io("empty chain"))?;
        if hdr.is_write_only() || hdr.len() < 16 || chain.len() < 2 {
            return Err(io("bad request header descriptor"));
        }
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, hdr.addr())
            .map_err(|_| io("header outside guest memory"))?;
        let req_type = u32::from_le_bytes(h[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
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
        let size = self.disk.size();
        let range = |len: u64| -> Result<u64, Fail> {
            let off = sector
                .checked_mul(SECTOR_SIZE)
                .filter(|o| o.checked_add(len).is_some_and(|end| end <= size))
                .ok_or_else(|| io("sector range beyond the disk"))?;
            Ok(off)
        };
        match req_type {
            T_IN | T_OUT => {
                if data_len % SECTOR_SIZE != 0 {
                    return Err(io("length not a multiple of 512"));
                }
                if req_type == T_OUT && self.readonly {
                    return Err(io("write to a read-only disk"));
                }
                let offset = range(data_len)?;
                let mut slices = std::mem::take(&mut self.slices);
                slices.clear();
                for d in data {
                    match guest_slice(mem, d.addr(), d.len()) {
                        Ok(s) => slices.push(s),
                        Err(e) => {
                            self.slices = slices;
                            return Err(e);
                        }
                    }
                }
                let r = if req_type == T_IN && slices.len() == 1 {
                    let (p, l) = slices[0];
                    // SAFETY: see `guest_slice`: the range lies inside one mapped region of
                    // `mem`, which outlives this request.
                    let buf = unsafe { std::slice::from_raw_parts_mut(p, l) };
                    self.disk.read_at(offset, &mut [IoSliceMut::new(buf)])
                } else if slices.len() == 1 {
                    let (p, l) = slices[0];
                    // SAFETY: as above.
                    let buf = unsafe { std::slice::from_raw_parts(p, l) };
                    self.disk.write_at(offset, &[IoSlice::new(buf)])
                } else if req_type == T_IN {
                    let mut bufs: Vec<IoSliceMut> = slices
                        .iter()
                        .copied()
                        // SAFETY: see `guest_slice`: the range lies inside one mapped region of
                        // `mem`, which outlives this request.
                        .map(|(p, l)| {
                            IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, l) })
                        })
                        .collect();
                    self.disk.read_at(offset, &mut bufs)
                } else {
                    let bufs: Vec<IoSlice> = slices
                        .iter()
                        .copied()
                        // SAFETY: as above.
                        .map(|(p, l)| IoSlice::new(unsafe { std::slice::from_raw_parts(p, l) }))
                        .collect();
                    self.disk.write_at(offset, &bufs)
                };
                slices.clear();
                self.slices = slices;
                r.map_err(|e| Fail::IoErr(e.to_string()))?;
                Ok(if req_type == T_IN { data_len as u32 } else { 0 })
            }
            T_FLUSH => {
                self.disk.flush().map_err(|e| Fail::IoErr(e.to_string()))?;
                Ok(0)
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
                Ok(n)
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.readonly {
                    return Err(io("discard/write-zeroes on a read-only disk"));
                }
                // Segments of 16 bytes: sector u64, num_sectors u32, flags u32.
                if data_len == 0 || data_len % 16 != 0 || data.len() != 1 || data_len > 16 {
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
                let r = if req_type == T_DISCARD {
                    self.disk.discard(off, len)
                } else {
                    self.disk.write_zeroes(off, len)
                };
                r.map_err(|e| Fail::IoErr(e.to_string()))?;
                Ok(0)
            }
            _ => Err(Fail::Unsupp),
        }
    }
}

/// The host address of `[addr, addr + len)` when it lies inside one region of `mem`.
fn guest_slice(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u32,
) -> Result<(*mut u8, usize), Fail> {
    let len = len as usize;
    if len == 0 {
        return Ok((std::ptr::NonNull::<u8>::dangling().as_ptr(), 0));
    }
    let slice = mem.get_slice(addr, len).map_err(|_| {
        Fail::IoErr(format!(
            "buffer {:#x}+{len:#x} outside guest memory",
            addr.0
        ))
    })?;
    Ok((slice.ptr_guard_mut().as_ptr(), len))
}

impl QueueHandler for BlockHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<Queue>],
        mem: &GuestMemoryMmap,
    ) -> Result<bool, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(false);
        };
        let mut descs = std::mem::take(&mut self.descs);
        let r = process_chains(q, mem, |chain| {
            // The iterator stops at the queue size (no loops) and on a bad descriptor.
            descs.clear();
            descs.extend(chain);
            self.serve(mem, &descs)
        });
        self.descs = descs;
        r
    }
}

pub struct Block {
    cfg: BlockConfig,
    capacity: u64,
    readonly: bool,
    handler: Option<BlockHandler>,
    worker: Option<WorkerHandle<BlockHandler>>,
}

impl Block {
    pub fn new(disk: Box<dyn DiskFile>, cfg: BlockConfig) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = cfg.serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&cfg.serial.as_bytes()[..n]);
        let readonly = disk.readonly();
        Block {
            capacity: disk.size() / SECTOR_SIZE,
            readonly,
            cfg,
            handler: Some(BlockHandler {
                disk,
                readonly,
                id,
                descs: Vec::new(),
                slices: Vec::new(),
            }),
            worker: None,
        }
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
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let h = self
            .handler
            .take()
            .ok_or_else(|| ActivateError::Other("virtio-blk: disk lost".into()))?;
        self.worker = Some(WorkerHandle::spawn("virtio-blk", h, ctx)?);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.handler = w.stop();
            if self.handler.is_none() {
                warn!("virtio-blk: the worker died; the disk is gone until the VMM restarts");
            }
        }
    }
}
