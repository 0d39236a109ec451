// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! VHDX images (fixed and dynamic): read, write, log replay on open.
//!
//! New payload blocks are appended at the end of the file (1 MiB aligned)
//! and filled before their BAT entry is changed. BAT updates are kept in
//! memory and written on flush, after the data is durable. Each BAT entry
//! is 8 bytes inside one sector, so a crash leaves either the old or the
//! new entry; at worst an appended block is leaked.

pub mod header;
pub mod log;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};

use header::{
    parse_metadata, parse_regions, Metadata, Regions, VhdxHeader, HEADER1_OFFSET, HEADER2_OFFSET,
    HEADER_SIZE, MIB, REGION1_OFFSET, REGION2_OFFSET, REGION_SIZE,
};

use crate::error::{invalid, unsupported};
use crate::storage::{FileStorage, Storage};
use crate::{
    for_each_read, for_each_write, DiskFile, Error, HostMapping, ImageType, OpenOptions, Result,
};

const FORMAT: &str = "vhdx";
use log::SECTOR;

/// BAT payload state: block not present.
pub const PAYLOAD_NOT_PRESENT: u64 = 0;
/// BAT payload state: undefined content.
pub const PAYLOAD_UNDEFINED: u64 = 1;
/// BAT payload state: reads as zeroes.
pub const PAYLOAD_ZERO: u64 = 2;
/// BAT payload state: unmapped (discarded).
pub const PAYLOAD_UNMAPPED: u64 = 3;
/// BAT payload state: fully present at the entry's offset.
pub const PAYLOAD_FULLY_PRESENT: u64 = 6;
/// BAT payload state: partially present (differencing disks).
pub const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
/// Largest BAT we load into memory.
pub const MAX_BAT_BYTES: u64 = 256 << 20;

/// An open VHDX image.
pub struct VhdxDisk {
    st: Box<dyn Storage>,
    header: VhdxHeader,
    header_slot: usize,
    regions: Regions,
    meta: Metadata,
    chunk_ratio: u64,
    bat: Vec<u64>,
    bat_dirty: BTreeSet<usize>,
    readonly: bool,
    headers_updated: bool,
    file_end: u64,
    // Sequence number of the next log entry of this session.
    log_sequence: u64,
}

fn new_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut g).is_ok() {
            g[7] = (g[7] & 0x0f) | 0x40; // version 4 (Data3 little-endian)
            g[8] = (g[8] & 0x3f) | 0x80;
            return g;
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    g.copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    g
}

impl VhdxDisk {
    /// Open from an opened (and locked) file.
    pub(crate) fn open(file: File, opts: &OpenOptions) -> Result<Self> {
        Self::open_storage(Box::new(FileStorage::new(file, opts.direct)), opts)
    }

    /// Open through any [`Storage`].
    pub fn open_storage(mut st: Box<dyn Storage>, opts: &OpenOptions) -> Result<Self> {
        let mut ident = [0u8; 8];
        st.read_exact_at(&mut ident, 0)?;
        if &ident != b"vhdxfile" {
            return Err(invalid(FORMAT, "bad file identifier"));
        }
        let mut buf = vec![0u8; HEADER_SIZE];
        let h1 = st
            .read_exact_at(&mut buf, HEADER1_OFFSET)
            .ok()
            .and_then(|_| VhdxHeader::parse(&buf));
        let h2 = st
            .read_exact_at(&mut buf, HEADER2_OFFSET)
            .ok()
            .and_then(|_| VhdxHeader::parse(&buf));
        let (mut header_slot, mut header) = VhdxHeader::current(h1, h2)?;

        if header.log_guid != [0u8; 16] {
            if opts.readonly {
                return Err(invalid(
                    FORMAT,
                    "the log must be replayed, which needs the image opened read-write",
                ));
            }
            let n = log::replay(
                st.as_mut(),
                header.log_offset,
                header.log_length,
                &header.log_guid,
            )?;
            ::log::info!("vhdx: replayed {n} log entries");
            header.log_guid = [0u8; 16];
            // Write the cleared header to both slots, older first.
            for _ in 0..2 {
                header.sequence += 1;
                header_slot ^= 1;
                let off = if header_slot == 0 {
                    HEADER1_OFFSET
                } else {
                    HEADER2_OFFSET
                };
                st.write_all_at(&header.serialize(), off)?;
                st.sync()?;
            }
        }

        let mut rbuf = vec![0u8; REGION_SIZE];
        st.read_exact_at(&mut rbuf, REGION1_OFFSET)?;
        let regions = match parse_regions(&rbuf) {
            Ok(r) => r,
            Err(e) => {
                st.read_exact_at(&mut rbuf, REGION2_OFFSET)?;
                parse_regions(&rbuf).map_err(|_| e)?
            }
        };
        let meta_len = (regions.metadata_length as u64)
            .min(16 * MIB)
            .min(st.len()?.saturating_sub(regions.metadata_offset));
        let mut mbuf = vec![0u8; meta_len as usize];
        st.read_exact_at(&mut mbuf, regions.metadata_offset)?;
        let meta = parse_metadata(&mbuf)?;
        if meta.has_parent {
            return Err(unsupported(FORMAT, "differencing disks"));
        }
        let chunk_ratio = ((1u64 << 23) * meta.logical_sector_size as u64) / meta.block_size as u64;
        let data_blocks = meta.disk_size.div_ceil(meta.block_size as u64);
        let total = data_blocks + (data_blocks - 1) / chunk_ratio;
        let bat_bytes = total * 8;
        if bat_bytes > regions.bat_length as u64 {
            return Err(invalid(FORMAT, "BAT region too small for the disk"));
        }
        if bat_bytes > MAX_BAT_BYTES {
            return Err(unsupported(FORMAT, "BAT larger than 256 MiB"));
        }
        if regions.bat_offset.saturating_add(bat_bytes) > st.len()? {
            return Err(invalid(FORMAT, "BAT lies beyond the end of the file"));
        }
        let mut bb = vec![0u8; bat_bytes as usize];
        st.read_exact_at(&mut bb, regions.bat_offset)?;
        let bat: Vec<u64> = bb
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let file_end = st.len()?.div_ceil(MIB) * MIB;
        Ok(VhdxDisk {
            st,
            header,
            header_slot,
            regions,
            meta,
            chunk_ratio,
            bat,
            bat_dirty: BTreeSet::new(),
            readonly: opts.readonly,
            headers_updated: false,
            file_end,
            log_sequence: 1,
        })
    }

    /// Offset and length of the BAT region in the file.
    pub fn bat_region(&self) -> (u64, u64) {
        (self.regions.bat_offset, self.regions.bat_length as u64)
    }

    /// Disk parameters.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    fn bs(&self) -> u64 {
        self.meta.block_size as u64
    }

    fn bat_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    /// (state, file offset) of the payload block holding guest offset `g`.
    fn block_state(&self, g: u64) -> Result<(u64, u64)> {
        let idx = self.bat_index(g / self.bs());
        let e = *self
            .bat
            .get(idx)
            .ok_or_else(|| invalid(FORMAT, "BAT index out of range"))?;
        let off = e & !(MIB - 1);
        Ok((e & 7, off))
    }

    fn check_block_offset(&self, off: u64) -> Result<()> {
        let bs = self.bs();
        let r = &self.regions;
        // Offsets come from the image: any value, the sums may overflow.
        let Some(end) = off.checked_add(bs) else {
            return Err(invalid(
                FORMAT,
                format!("payload block at {off:#x} lies beyond any file"),
            ));
        };
        let overlaps = |a: u64, len: u64| off < a.saturating_add(len) && a < end;
        if off < MIB
            || overlaps(r.bat_offset, r.bat_length as u64)
            || overlaps(r.metadata_offset, r.metadata_length as u64)
            || overlaps(self.header.log_offset, self.header.log_length as u64)
        {
            return Err(invalid(
                FORMAT,
                format!("payload block at {off:#x} overlaps metadata"),
            ));
        }
        Ok(())
    }

    /// Write the in-memory header to both slots, older first, syncing each.
    fn write_headers(&mut self) -> Result<()> {
        for _ in 0..2 {
            self.header.sequence += 1;
            self.header_slot ^= 1;
            let off = if self.header_slot == 0 {
                HEADER1_OFFSET
            } else {
                HEADER2_OFFSET
            };
            self.st.write_all_at(&self.header.serialize(), off)?;
            self.st.sync()?;
        }
        Ok(())
    }

    /// Whether the header's log region can hold entries: aligned, bounded,
    /// inside the file and clear of the headers, BAT and metadata.
    fn log_usable(&self) -> bool {
        let (off, len) = (self.header.log_offset, self.header.log_length as u64);
        let r = &self.regions;
        let overlaps = |a: u64, l: u64| off < a.saturating_add(l) && a < off + len;
        len >= 2 * SECTOR as u64
            && len <= log::MAX_LOG_LENGTH as u64
            && len.is_multiple_of(MIB)
            && off.is_multiple_of(MIB)
            && off >= MIB
            && self.st.len().is_ok_and(|l| off.saturating_add(len) <= l)
            && !overlaps(r.bat_offset, r.bat_length as u64)
            && !overlaps(r.metadata_offset, r.metadata_length as u64)
    }

    fn write_bat_in_place(&mut self, dirty: &BTreeSet<usize>) -> Result<()> {
        for &idx in dirty {
            let off = self.regions.bat_offset + idx as u64 * 8;
            self.st.write_all_at(&self.bat[idx].to_le_bytes(), off)?;
        }
        Ok(self.st.sync()?)
    }

    /// Update the BAT sectors holding `dirty` entries through the log: the
    /// new sectors go into a log entry (made durable, with the log GUID in
    /// the headers), then into place, then are synced. A crash in between is
    /// repaired by replaying the log at the next read-write open (ours or
    /// QEMU's), so a BAT sector is never left half written.
    fn write_bat_logged(&mut self, dirty: &BTreeSet<usize>) -> Result<()> {
        let sector = SECTOR as u64;
        let bat_off = self.regions.bat_offset;
        let sectors: Vec<u64> = dirty
            .iter()
            .map(|&i| (bat_off + i as u64 * 8) / sector * sector)
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        let file_len = self.st.len()?;
        if sectors.iter().any(|&s| s + sector > file_len) {
            return self.write_bat_in_place(dirty);
        }
        if self.header.log_guid == [0u8; 16] {
            // A fresh GUID: entries of earlier sessions no longer count.
            self.header.log_guid = new_guid();
            self.write_headers()?;
            self.log_sequence = 1;
        }
        // One descriptor sector holds 126 descriptors; stay inside the log.
        let per_entry = 126.min((self.header.log_length as usize / SECTOR).saturating_sub(1));
        for chunk in sectors.chunks(per_entry.max(1)) {
            let mut descs = Vec::with_capacity(chunk.len());
            for &s in chunk {
                let mut data = Box::new([0u8; SECTOR]);
                self.st.read_exact_at(&mut data[..], s)?;
                let first = ((s.max(bat_off) - bat_off) / 8) as usize;
                let last = (((s + sector - bat_off) / 8) as usize).min(self.bat.len());
                for i in first..last {
                    let o = (bat_off + i as u64 * 8 - s) as usize;
                    data[o..o + 8].copy_from_slice(&self.bat[i].to_le_bytes());
                }
                descs.push(log::Descriptor::Data {
                    file_offset: s,
                    data,
                });
            }
            let entry = log::build_entry(
                &self.header.log_guid,
                self.log_sequence,
                0,
                self.st.len()?,
                &descs,
            );
            self.st.write_all_at(&entry, self.header.log_offset)?;
            self.st.sync()?;
            self.log_sequence += 1;
            for d in &descs {
                if let log::Descriptor::Data { file_offset, data } = d {
                    self.st.write_all_at(&data[..], *file_offset)?;
                }
            }
            self.st.sync()?;
        }
        Ok(())
    }

    fn update_headers(&mut self) -> Result<()> {
        if self.headers_updated {
            return Ok(());
        }
        self.header.file_write_guid = new_guid();
        self.header.data_write_guid = new_guid();
        self.write_headers()?;
        self.headers_updated = true;
        Ok(())
    }

    fn read_chunk(&mut self, g: u64, buf: &mut [u8]) -> Result<()> {
        let (state, off) = self.block_state(g)?;
        match state {
            PAYLOAD_FULLY_PRESENT => {
                self.check_block_offset(off)?;
                Ok(self.st.read_exact_at(buf, off + g % self.bs())?)
            }
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                buf.fill(0);
                Ok(())
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(unsupported(FORMAT, "partially present block")),
            s => Err(invalid(FORMAT, format!("BAT state {s}"))),
        }
    }

    fn write_chunk(&mut self, g: u64, data: &[u8]) -> Result<()> {
        self.update_headers()?;
        let bs = self.bs();
        let (state, off) = self.block_state(g)?;
        match state {
            PAYLOAD_FULLY_PRESENT => {
                self.check_block_offset(off)?;
                Ok(self.st.write_all_at(data, off + g % bs)?)
            }
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                // Append a zero-filled block, write the data, then point the BAT at it.
                let new = self.file_end.max(self.st.len()?.div_ceil(MIB) * MIB);
                self.st.set_len(new + bs)?;
                self.file_end = new + bs;
                self.st.write_all_at(data, new + g % bs)?;
                let idx = self.bat_index(g / bs);
                self.bat[idx] = new | PAYLOAD_FULLY_PRESENT;
                self.bat_dirty.insert(idx);
                Ok(())
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(unsupported(FORMAT, "partially present block")),
            s => Err(invalid(FORMAT, format!("BAT state {s}"))),
        }
    }

    fn zero_range(&mut self, offset: u64, len: u64, discard: bool) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        crate::check_range(offset, len, self.size())?;
        let bs = self.bs();
        let mut g = offset;
        let end = offset + len;
        while g < end {
            let n = (bs - g % bs).min(end - g);
            let (state, off) = self.block_state(g)?;
            if state != PAYLOAD_FULLY_PRESENT {
                // Every other (non-differencing) state already reads zero.
            } else if n == bs && !self.meta.leave_blocks_allocated {
                // Never punch a hole into the headers, log, BAT or metadata
                // a hostile BAT entry points at.
                self.check_block_offset(off)?;
                self.update_headers()?;
                let idx = self.bat_index(g / bs);
                self.bat[idx] = PAYLOAD_ZERO;
                self.bat_dirty.insert(idx);
                if let Err(e) = self.st.punch_hole(off, bs) {
                    ::log::debug!("vhdx: punch hole failed: {e}");
                }
            } else if !discard {
                let zeros = vec![0u8; n.min(MIB) as usize];
                let mut done = 0;
                while done < n {
                    let k = (n - done).min(MIB);
                    self.write_chunk(g + done, &zeros[..k as usize])?;
                    done += k;
                }
            }
            g += n;
        }
        Ok(())
    }
}

impl DiskFile for VhdxDisk {
    fn size(&self) -> u64 {
        self.meta.disk_size
    }

    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let size = self.size();
        let bs = self.bs();
        for_each_read(offset, size, bufs, |mut off, buf| {
            let mut done = 0;
            while done < buf.len() {
                let n = ((bs - off % bs) as usize).min(buf.len() - done);
                self.read_chunk(off, &mut buf[done..done + n])?;
                done += n;
                off += n as u64;
            }
            Ok(())
        })
    }

    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        let size = self.size();
        let bs = self.bs();
        for_each_write(offset, size, bufs, |mut off, buf| {
            let mut done = 0;
            while done < buf.len() {
                let n = ((bs - off % bs) as usize).min(buf.len() - done);
                self.write_chunk(off, &buf[done..done + n])?;
                done += n;
                off += n as u64;
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.st.sync()?;
        if !self.bat_dirty.is_empty() {
            let dirty = std::mem::take(&mut self.bat_dirty);
            let res = if self.log_usable() {
                self.write_bat_logged(&dirty)
            } else {
                ::log::warn!("vhdx: log region unusable; updating the BAT in place");
                self.write_bat_in_place(&dirty)
            };
            if res.is_err() {
                // Not known to be on disk: try again at the next flush.
                self.bat_dirty.extend(dirty);
            }
            res?;
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn image_type(&self) -> ImageType {
        ImageType::Vhdx
    }

    fn map_host(&mut self, offset: u64, len: u64, write: bool) -> Result<Option<HostMapping>> {
        crate::check_range(offset, len, self.size())?;
        if write && !self.headers_updated {
            // The first write must update the headers; take the sync path.
            return Ok(None);
        }
        let bs = self.bs();
        if offset % bs + len > bs {
            return Ok(None);
        }
        let (state, off) = self.block_state(offset)?;
        if state != PAYLOAD_FULLY_PRESENT || self.check_block_offset(off).is_err() {
            return Ok(None);
        }
        let Some(fd) = self.st.raw_fd() else {
            return Ok(None);
        };
        Ok(Some(HostMapping {
            fd,
            offset: off + offset % bs,
            direct: self.st.is_direct(),
        }))
    }
}

impl Drop for VhdxDisk {
    fn drop(&mut self) {
        if self.readonly {
            return;
        }
        if !self.bat_dirty.is_empty() {
            if let Err(e) = self.flush() {
                ::log::error!("vhdx: flushing BAT on close failed: {e}");
                return;
            }
        }
        if self.header.log_guid != [0u8; 16] {
            // Everything logged is in place: a clean close leaves an empty
            // log, so read-only opens (which cannot replay) work.
            self.header.log_guid = [0u8; 16];
            if let Err(e) = self.write_headers() {
                ::log::error!("vhdx: clearing the log GUID on close failed: {e}");
            }
        }
    }
}
