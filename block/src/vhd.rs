// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Fixed VHD (Virtual PC) images: raw data followed by a 512-byte footer.

use std::fs::File;

use crate::error::{invalid, unsupported};
use crate::raw::RawDisk;
use crate::storage::{FileStorage, Storage};
use crate::{ImageType, OpenOptions, Result};

const FORMAT: &str = "vhd";
/// Disk type value of a fixed VHD.
pub const DISK_TYPE_FIXED: u32 = 2;
/// Disk type value of a dynamic VHD.
pub const DISK_TYPE_DYNAMIC: u32 = 3;
/// Disk type value of a differencing VHD.
pub const DISK_TYPE_DIFFERENCING: u32 = 4;

/// The fields of a VHD footer we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    /// Current (virtual) size in bytes.
    pub current_size: u64,
    /// Disk type (2 fixed, 3 dynamic, 4 differencing).
    pub disk_type: u32,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// VHD checksum: one's complement of the byte sum, checksum field excluded.
pub fn checksum(footer: &[u8; 512]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, &b)| s.wrapping_add(b as u32));
    !sum
}

impl Footer {
    /// Parse and validate a footer (cookie and checksum).
    pub fn parse(b: &[u8; 512]) -> Result<Footer> {
        if &b[..8] != b"conectix" {
            return Err(invalid(FORMAT, "missing 'conectix' footer cookie"));
        }
        if be32(b, 64) != checksum(b) {
            return Err(invalid(FORMAT, "footer checksum mismatch"));
        }
        Ok(Footer {
            current_size: be64(b, 48),
            disk_type: be32(b, 60),
        })
    }
}

/// Size of the fixed VHD in `storage`: its footer (at the end, or the
/// copy at offset 0) must be valid, of a fixed disk, and its size must fit
/// in front of the footer.
pub fn fixed_size(storage: &mut dyn Storage) -> Result<u64> {
    let len = storage.len()?;
    if len < 512 {
        return Err(invalid(FORMAT, "file too small for a footer"));
    }
    let mut b = [0u8; 512];
    storage.read_exact_at(&mut b, len - 512)?;
    let footer = match Footer::parse(&b) {
        Ok(f) => f,
        Err(e) => {
            // A dynamic disk keeps a footer copy at offset 0 too.
            storage.read_exact_at(&mut b, 0)?;
            match Footer::parse(&b) {
                Ok(f) => f,
                Err(_) => return Err(e),
            }
        }
    };
    if footer.disk_type != DISK_TYPE_FIXED {
        return Err(unsupported(
            FORMAT,
            format!(
                "disk type {} (only fixed VHD is supported)",
                footer.disk_type
            ),
        ));
    }
    if footer.current_size > len - 512 {
        return Err(invalid(
            FORMAT,
            format!(
                "footer size {} exceeds data area of {} bytes",
                footer.current_size,
                len - 512
            ),
        ));
    }
    Ok(footer.current_size)
}

/// Opens a fixed VHD from an opened (and locked) file: its data is a raw image in front of
/// the footer.
pub fn open_fixed(file: File, opts: &OpenOptions) -> Result<RawDisk> {
    let mut storage = FileStorage::new(file, opts.direct);
    let size = fixed_size(&mut storage)?;
    // Fixed VHD data is raw; discard is only a hint and never punches holes into it.
    Ok(RawDisk::with_size(
        storage,
        size,
        ImageType::Vhd,
        opts.readonly,
        false,
    ))
}
