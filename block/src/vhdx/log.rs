// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! VHDX metadata log: replay on open, and an entry writer.

use super::header::{checksum_with_hole, crc32c, guid_at, le32, le64, Guid, MIB};
use crate::error::{invalid, unsupported};
use crate::storage::Storage;
use crate::Result;

const FORMAT: &str = "vhdx";
pub(crate) const SECTOR: usize = 4096;
/// Largest log we load into memory.
pub const MAX_LOG_LENGTH: u32 = 64 << 20;

/// One parsed, validated log entry.
#[derive(Clone, Debug)]
struct Entry {
    offset: usize,
    length: usize,
    tail: usize,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// A write recorded in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Write 4 KiB of data at a file offset.
    Data {
        /// Target file offset (4 KiB aligned).
        file_offset: u64,
        /// The sector content.
        data: Box<[u8; SECTOR]>,
    },
    /// Zero a range.
    Zero {
        /// Target file offset (4 KiB aligned).
        file_offset: u64,
        /// Length (multiple of 4 KiB).
        length: u64,
    },
}

/// Read `len` bytes at circular offset `off` of the log.
fn circ(log: &[u8], off: usize, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut o = off % log.len();
    while v.len() < len {
        let n = (len - v.len()).min(log.len() - o);
        v.extend_from_slice(&log[o..o + n]);
        o = (o + n) % log.len();
    }
    v
}

/// Bytes of log entries the scan checksums, as a multiple of the log
/// length. In a log that was written in order the entries carrying the
/// current GUID do not overlap (at most one older entry reaches into a
/// newer one), so their checksums cover little more than the log once; a
/// hostile log with an entry header in every sector, each claiming the
/// whole log, would otherwise cost (log length / 4 KiB) x log length.
const CHECKSUM_BUDGET: usize = 4;

/// The valid entry at `off`, if any. Checksumming it is charged to
/// `budget` (bytes left); `Err` once that is exhausted.
fn parse_entry(log: &[u8], off: usize, guid: &Guid, budget: &mut usize) -> Result<Option<Entry>> {
    let h = circ(log, off, 64);
    if &h[0..4] != b"loge" {
        return Ok(None);
    }
    let length = le32(&h, 8) as usize;
    let tail = le32(&h, 12) as usize;
    if length == 0
        || !length.is_multiple_of(SECTOR)
        || length > log.len()
        || !tail.is_multiple_of(SECTOR)
        || tail >= log.len()
        || guid_at(&h, 32) != *guid
    {
        return Ok(None);
    }
    *budget = budget.checked_sub(length).ok_or_else(|| {
        invalid(
            FORMAT,
            "log entries overlap: more to checksum than a written log can hold",
        )
    })?;
    let whole = circ(log, off, length);
    if le32(&whole, 4) != checksum_with_hole(&whole, 4) {
        return Ok(None);
    }
    let count = le32(&whole, 24) as usize;
    let desc_area = (64 + count * 32).div_ceil(SECTOR) * SECTOR;
    if desc_area > length {
        return Ok(None);
    }
    Ok(Some(Entry {
        offset: off,
        length,
        tail,
        sequence: le64(&h, 16),
        flushed_file_offset: le64(&h, 48),
        last_file_offset: le64(&h, 56),
    }))
}

fn descriptors(log: &[u8], e: &Entry) -> Result<Vec<Descriptor>> {
    let whole = circ(log, e.offset, e.length);
    let count = le32(&whole, 24) as usize;
    let mut data_sector = (64 + count * 32).div_ceil(SECTOR) * SECTOR;
    let mut out = Vec::with_capacity(count.min(4096));
    for i in 0..count {
        let d = &whole[64 + i * 32..96 + i * 32];
        let seq = le64(d, 24);
        if seq != e.sequence {
            return Err(invalid(FORMAT, "log descriptor sequence mismatch"));
        }
        let file_offset = le64(d, 16);
        if !file_offset.is_multiple_of(SECTOR as u64) {
            return Err(invalid(FORMAT, "log descriptor offset unaligned"));
        }
        match &d[0..4] {
            b"desc" => {
                if data_sector + SECTOR > e.length {
                    return Err(invalid(FORMAT, "log data sector out of bounds"));
                }
                let s = &whole[data_sector..data_sector + SECTOR];
                if &s[0..4] != b"data"
                    || le32(s, 4) as u64 != e.sequence >> 32
                    || le32(s, 4092) as u64 != e.sequence & 0xffff_ffff
                {
                    return Err(invalid(FORMAT, "bad log data sector"));
                }
                let mut data = Box::new([0u8; SECTOR]);
                data[0..8].copy_from_slice(&d[8..16]);
                data[8..4092].copy_from_slice(&s[8..4092]);
                data[4092..].copy_from_slice(&d[4..8]);
                out.push(Descriptor::Data { file_offset, data });
                data_sector += SECTOR;
            }
            b"zero" => {
                let length = le64(d, 8);
                if !length.is_multiple_of(SECTOR as u64) {
                    return Err(invalid(FORMAT, "log zero descriptor length unaligned"));
                }
                out.push(Descriptor::Zero {
                    file_offset,
                    length,
                });
            }
            _ => return Err(invalid(FORMAT, "bad log descriptor signature")),
        }
    }
    Ok(out)
}

/// Replay the log at `[log_offset, +log_length)` whose entries carry `guid`.
/// Returns the number of entries replayed.
pub fn replay(
    st: &mut dyn Storage,
    log_offset: u64,
    log_length: u32,
    guid: &Guid,
) -> Result<usize> {
    if log_length == 0
        || !(log_length as u64).is_multiple_of(MIB)
        || !log_offset.is_multiple_of(MIB)
    {
        return Err(invalid(FORMAT, "log region misaligned"));
    }
    if log_length > MAX_LOG_LENGTH {
        return Err(unsupported(FORMAT, "log larger than 64 MiB"));
    }
    let file_len = st.len()?;
    if log_offset.saturating_add(log_length as u64) > file_len {
        return Err(invalid(FORMAT, "log lies beyond the end of the file"));
    }
    let mut log = vec![0u8; log_length as usize];
    st.read_exact_at(&mut log, log_offset)?;
    let mut entries = Vec::new();
    let mut budget = log.len() * CHECKSUM_BUDGET;
    let mut off = 0;
    while off < log.len() {
        if let Some(e) = parse_entry(&log, off, guid, &mut budget)? {
            entries.push(e);
        }
        off += SECTOR;
    }
    // The head is the valid entry with the highest sequence number; the
    // active sequence runs from its tail to it, sequence numbers increasing
    // by one and entries back to back.
    let Some(head) = entries.iter().max_by_key(|e| e.sequence).cloned() else {
        return Err(invalid(FORMAT, "log is dirty but holds no valid entry"));
    };
    let mut chain = Vec::new();
    let mut pos = head.tail;
    loop {
        // The scan found the entries in offset order.
        let e = entries
            .binary_search_by_key(&pos, |e| e.offset)
            .map(|i| entries[i].clone())
            .map_err(|_| invalid(FORMAT, "log sequence is broken"))?;
        if let Some(prev) = chain.last() {
            let prev: &Entry = prev;
            if prev.sequence.checked_add(1) != Some(e.sequence) {
                return Err(invalid(FORMAT, "log sequence numbers not consecutive"));
            }
        }
        let done = e.offset == head.offset;
        pos = (e.offset + e.length) % log.len();
        chain.push(e);
        if done {
            break;
        }
        if chain.len() > entries.len() {
            return Err(invalid(FORMAT, "log sequence loops"));
        }
    }
    if chain.last().map(|e| e.sequence) != Some(head.sequence) {
        return Err(invalid(FORMAT, "log sequence does not end at its head"));
    }
    // The log may only target the file, possibly extended to the size it
    // had when the log was written (bounded, against hostile headers).
    let limit = head
        .flushed_file_offset
        .max(head.last_file_offset)
        .min(file_len.saturating_add(1 << 30))
        .max(file_len);
    for e in &chain {
        for d in descriptors(&log, e)? {
            match d {
                Descriptor::Data { file_offset, data } => {
                    if file_offset
                        .checked_add(SECTOR as u64)
                        .is_none_or(|end| end > limit)
                    {
                        return Err(invalid(FORMAT, "log writes beyond the file"));
                    }
                    st.write_all_at(&data[..], file_offset)?;
                }
                Descriptor::Zero {
                    file_offset,
                    length,
                } => {
                    if file_offset
                        .checked_add(length)
                        .is_none_or(|end| end > limit)
                    {
                        return Err(invalid(FORMAT, "log zeroes beyond the file"));
                    }
                    let zeros = vec![0u8; (length.min(MIB)) as usize];
                    let mut done = 0;
                    while done < length {
                        let n = (length - done).min(MIB) as usize;
                        st.write_all_at(&zeros[..n], file_offset + done)?;
                        done += n as u64;
                    }
                }
            }
        }
    }
    if st.len()? < head.flushed_file_offset.min(limit) {
        st.set_len(head.flushed_file_offset.min(limit))?;
    }
    st.sync()?;
    Ok(chain.len())
}

/// Serialize one log entry (used to log metadata updates and by tests).
pub fn build_entry(
    guid: &Guid,
    sequence: u64,
    tail: u32,
    file_size: u64,
    descs: &[Descriptor],
) -> Vec<u8> {
    let data_count = descs
        .iter()
        .filter(|d| matches!(d, Descriptor::Data { .. }))
        .count();
    let desc_area = (64 + descs.len() * 32).div_ceil(SECTOR) * SECTOR;
    let length = desc_area + data_count * SECTOR;
    let mut b = vec![0u8; length];
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&(descs.len() as u32).to_le_bytes());
    b[32..48].copy_from_slice(guid);
    b[48..56].copy_from_slice(&file_size.to_le_bytes());
    b[56..64].copy_from_slice(&file_size.to_le_bytes());
    let mut sector = desc_area;
    for (i, d) in descs.iter().enumerate() {
        let o = 64 + i * 32;
        match d {
            Descriptor::Data { file_offset, data } => {
                b[o..o + 4].copy_from_slice(b"desc");
                b[o + 4..o + 8].copy_from_slice(&data[4092..]);
                b[o + 8..o + 16].copy_from_slice(&data[0..8]);
                b[o + 16..o + 24].copy_from_slice(&file_offset.to_le_bytes());
                let s = &mut b[sector..sector + SECTOR];
                s[0..4].copy_from_slice(b"data");
                s[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
                s[8..4092].copy_from_slice(&data[8..4092]);
                s[4092..].copy_from_slice(&(sequence as u32).to_le_bytes());
                sector += SECTOR;
            }
            Descriptor::Zero {
                file_offset,
                length,
            } => {
                b[o..o + 4].copy_from_slice(b"zero");
                b[o + 8..o + 16].copy_from_slice(&length.to_le_bytes());
                b[o + 16..o + 24].copy_from_slice(&file_offset.to_le_bytes());
            }
        }
        b[o + 24..o + 32].copy_from_slice(&sequence.to_le_bytes());
    }
    let c = crc32c(&b);
    b[4..8].copy_from_slice(&c.to_le_bytes());
    b
}
