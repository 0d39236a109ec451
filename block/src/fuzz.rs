// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Entry points shared by the fuzz targets (`fuzz/`: qcow2, vhdx, vhd) and the
//! mutation tests: open an image held in memory and exercise it. They must
//! never panic, whatever the input.

use std::io::{IoSlice, IoSliceMut};

use crate::storage::MemStorage;
use crate::vhdx::header::{
    checksum_with_hole, le32, le64, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE, REGION1_OFFSET,
    REGION2_OFFSET, REGION_SIZE,
};
use crate::{DiskFile, OpenOptions};

/// In-memory images may grow by at most this much while being exercised.
const GROWTH: u64 = 16 << 20;

fn exercise(disk: &mut dyn DiskFile, seed: &[u8]) {
    let mut size = disk.size();
    if size == 0 {
        return;
    }
    let mut buf = vec![0u8; 8192];
    let mut x = seed
        .iter()
        .fold(0x1234_5678u64, |a, &b| a.rotate_left(5) ^ b as u64)
        | 1;
    for i in 0..24 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if i == 12 {
            // `vm.resize-disk` halfway: grown by up to 64 MiB (a qcow2 image's L1 table may
            // move), then the rest runs on the new size.
            let _ = disk.resize((size + x % (64 << 20)) & !511);
            size = disk.size();
            if size == 0 {
                return;
            }
        }
        let off = x % size;
        let len = (1 + (x >> 40) % 8192).min(size - off) as usize;
        let _ = match i % 6 {
            0..=2 => disk.read_at(off, &mut [IoSliceMut::new(&mut buf[..len])]),
            3 => disk.write_at(off, &[IoSlice::new(&buf[..len])]),
            4 => disk.write_zeroes(off, len as u64),
            _ => disk.discard(off, len as u64),
        };
        let _ = disk.map_host(off, len as u64, i % 2 == 0);
        let _ = disk.alloc_pending(off, len as u64);
        let _ = disk.map_compressed(off, len as u64);
        if let Ok(Some(p)) = disk.alloc_cow(off, len as u64) {
            disk.abort_alloc(p.start, p.len, p.target.offset);
        }
    }
    let _ = disk.flush();
}

/// Open `data` as qcow2 (read-write, in memory) and exercise it.
pub fn fuzz_qcow2(data: &[u8]) {
    let _ = crate::qcow2::header::Header::parse(data);
    let st = MemStorage::new(data.to_vec(), data.len() as u64 + GROWTH);
    let opts = OpenOptions::default();
    if let Ok(mut d) = crate::qcow2::Qcow2Disk::open_storage(Box::new(st), &opts, |_| Ok(None)) {
        exercise(&mut d, data);
    }
}

/// Largest image a [`fuzz_vhdx`] input describes.
pub const VHDX_FUZZ_MAX_IMAGE: u64 = 16 << 20;

/// [`fuzz_vhdx`] input flag: recompute the checksums of both headers.
pub const VHDX_FIX_HEADERS: u8 = 1;
/// [`fuzz_vhdx`] input flag: recompute the checksums of both region tables.
pub const VHDX_FIX_REGIONS: u8 = 2;
/// [`fuzz_vhdx`] input flag: recompute the checksums of log entries.
pub const VHDX_FIX_LOG: u8 = 4;

/// Unit of the runs [`vhdx_fuzz_input`] keeps.
const SPARSE_BLOCK: usize = 512;
/// Log entries whose checksum [`vhdx_image`] fixes, at most.
const MAX_FIXED_LOG_ENTRIES: usize = 8;

/// Encode a vhdx image as a [`fuzz_vhdx`] input: a flags byte
/// (`VHDX_FIX_*`), then records `offset: u32 LE, length: u16 LE, bytes`
/// for the non-zero parts, and a last empty record giving the file length.
/// A VHDX image is at least a few MiB, mostly zeroes; this keeps seeds and
/// fuzz inputs small.
pub fn vhdx_fuzz_input(image: &[u8], flags: u8) -> Vec<u8> {
    let mut out = vec![flags];
    let record = |out: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        out.extend_from_slice(&(off as u32).to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let mut run: Option<usize> = None;
    let mut off = 0;
    while off < image.len() {
        let end = (off + SPARSE_BLOCK).min(image.len());
        let nonzero = image[off..end].iter().any(|&b| b != 0);
        match run {
            Some(start) if !nonzero || end - start > u16::MAX as usize => {
                record(&mut out, start, &image[start..off]);
                run = nonzero.then_some(off);
            }
            None if nonzero => run = Some(off),
            _ => {}
        }
        off = end;
    }
    if let Some(start) = run {
        record(&mut out, start, &image[start..]);
    }
    record(&mut out, image.len(), &[]);
    out
}

/// Decode a [`fuzz_vhdx`] input (see [`vhdx_fuzz_input`]) into an image of
/// at most [`VHDX_FUZZ_MAX_IMAGE`] bytes; records reaching beyond it are
/// dropped, a truncated last record keeps what is there. Then recompute the
/// checksums the flags ask for, so mutations reach past them.
pub fn vhdx_image(input: &[u8]) -> Vec<u8> {
    vhdx_image_with_room(input, 0)
}

/// The records of a [`fuzz_vhdx`] input: (file offset, bytes).
fn records(input: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut rest = input;
    std::iter::from_fn(move || {
        if rest.len() < 6 {
            return None;
        }
        let off = le32(rest, 0) as usize;
        let len = u16::from_le_bytes([rest[4], rest[5]]) as usize;
        let bytes = &rest[6..(6 + len).min(rest.len())];
        rest = &rest[6 + bytes.len()..];
        Some((off, bytes))
    })
    .filter(|(off, bytes)| (off + bytes.len()) as u64 <= VHDX_FUZZ_MAX_IMAGE)
}

/// [`vhdx_image`], with capacity for the file to grow by `room` bytes
/// without being moved: zeroed memory that is only touched when used (the
/// fuzz target is much faster without copying and faulting in the whole
/// image at each write that extends it).
fn vhdx_image_with_room(input: &[u8], room: usize) -> Vec<u8> {
    let Some((&flags, body)) = input.split_first() else {
        return Vec::new();
    };
    let len = records(body)
        .map(|(off, bytes)| off + bytes.len())
        .max()
        .unwrap_or(0);
    let mut image = vec![0u8; len + room];
    image.truncate(len);
    for (off, bytes) in records(body) {
        image[off..off + bytes.len()].copy_from_slice(bytes);
    }
    let fix = |image: &mut Vec<u8>, at: u64, len: usize, sig: &[u8]| {
        let at = at as usize;
        if image.len() >= at + len && &image[at..at + sig.len()] == sig {
            let c = checksum_with_hole(&image[at..at + len], 4);
            image[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
        }
    };
    if flags & VHDX_FIX_HEADERS != 0 {
        fix(&mut image, HEADER1_OFFSET, HEADER_SIZE, b"head");
        fix(&mut image, HEADER2_OFFSET, HEADER_SIZE, b"head");
    }
    if flags & VHDX_FIX_REGIONS != 0 {
        fix(&mut image, REGION1_OFFSET, REGION_SIZE, b"regi");
        fix(&mut image, REGION2_OFFSET, REGION_SIZE, b"regi");
    }
    if flags & VHDX_FIX_LOG != 0 {
        // Entries of the log each header names, unwrapped, a few at most.
        let mut fixed = 0;
        for h in [HEADER1_OFFSET, HEADER2_OFFSET] {
            let h = h as usize;
            if image.len() < h + HEADER_SIZE || &image[h..h + 4] != b"head" {
                continue;
            }
            let log_len = le32(&image, h + 68) as usize;
            let Ok(log_off) = usize::try_from(le64(&image, h + 72)) else {
                continue;
            };
            let log_end = log_off.saturating_add(log_len).min(image.len());
            let mut e = log_off;
            while e < log_end.saturating_sub(64) && fixed < MAX_FIXED_LOG_ENTRIES {
                if &image[e..e + 4] == b"loge" {
                    let len = le32(&image, e + 8) as usize;
                    if len >= 64 && e + len <= log_end {
                        fix(&mut image, e as u64, len, b"loge");
                        fixed += 1;
                    }
                }
                e += 4096;
            }
        }
    }
    image
}

/// Open the image `data` describes (see [`vhdx_fuzz_input`]) as vhdx
/// (read-write, replaying a dirty log) and exercise it.
pub fn fuzz_vhdx(data: &[u8]) {
    let image = vhdx_image_with_room(data, GROWTH as usize);
    let max = image.len() as u64 + GROWTH;
    let st = MemStorage::new(image, max);
    if let Ok(mut d) = crate::vhdx::VhdxDisk::open_storage(Box::new(st), &OpenOptions::default()) {
        exercise(&mut d, data);
    }
}

/// Detect the format of `data` and validate it as a fixed VHD (footer
/// copies, checksum, disk type, size), as opening it does.
pub fn fuzz_vhd(data: &[u8]) {
    let footer = (data.len() >= 512).then(|| {
        let mut f = [0u8; 512];
        f.copy_from_slice(&data[data.len() - 512..]);
        f
    });
    let _ = crate::detect::detect_from_bytes(data, footer.as_ref());
    let mut st = MemStorage::new(data.to_vec(), data.len() as u64);
    let _ = crate::vhd::fixed_size(&mut st);
}
