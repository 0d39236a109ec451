// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Entry points shared by the cargo-fuzz targets (block/fuzz) and the
//! mutation tests: open an image held in memory and exercise it. They must
//! never panic, whatever the input.

use std::io::{IoSlice, IoSliceMut};

use crate::storage::MemStorage;
use crate::{DiskFile, OpenOptions};

/// In-memory images may grow by at most this much while being exercised.
const GROWTH: u64 = 16 << 20;

fn exercise(disk: &mut dyn DiskFile, seed: &[u8]) {
    let size = disk.size();
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
        let off = x % size;
        let len = (1 + (x >> 40) % 8192).min(size - off) as usize;
        let _ = match i % 6 {
            0..=2 => disk.read_at(off, &mut [IoSliceMut::new(&mut buf[..len])]),
            3 => disk.write_at(off, &[IoSlice::new(&buf[..len])]),
            4 => disk.write_zeroes(off, len as u64),
            _ => disk.discard(off, len as u64),
        };
        let _ = disk.map_host(off, len as u64, i % 2 == 0);
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

/// Open `data` as vhdx (read-write, replaying a dirty log) and exercise it.
pub fn fuzz_vhdx(data: &[u8]) {
    let _ = crate::vhdx::header::VhdxHeader::parse(data);
    let _ = crate::vhdx::header::parse_regions(data);
    let _ = crate::vhdx::header::parse_metadata(data);
    let st = MemStorage::new(data.to_vec(), data.len() as u64 + GROWTH);
    if let Ok(mut d) = crate::vhdx::VhdxDisk::open_storage(Box::new(st), &OpenOptions::default()) {
        exercise(&mut d, data);
    }
}

/// Parse a VHD footer and detect the format of `data`.
pub fn fuzz_vhd(data: &[u8]) {
    if data.len() >= 512 {
        let mut f = [0u8; 512];
        f.copy_from_slice(&data[data.len() - 512..]);
        let _ = crate::vhd::Footer::parse(&f);
        let _ = crate::detect::detect_from_bytes(data, Some(&f));
    } else {
        let _ = crate::detect::detect_from_bytes(data, None);
    }
}
