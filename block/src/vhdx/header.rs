// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! VHDX headers, region table and metadata parsing.

use crate::error::{invalid, unsupported};
use crate::Result;

const FORMAT: &str = "vhdx";

/// Offsets of the two headers and region tables.
pub const HEADER1_OFFSET: u64 = 64 << 10;
/// See [`HEADER1_OFFSET`].
pub const HEADER2_OFFSET: u64 = 128 << 10;
/// Region table copies.
pub const REGION1_OFFSET: u64 = 192 << 10;
/// See [`REGION1_OFFSET`].
pub const REGION2_OFFSET: u64 = 256 << 10;
/// Size of a header structure.
pub const HEADER_SIZE: usize = 4096;
/// Size of a region table.
pub const REGION_SIZE: usize = 64 << 10;
/// 1 MiB, the allocation granularity of VHDX.
pub const MIB: u64 = 1 << 20;

/// A GUID in on-disk (mixed-endian) byte order.
pub type Guid = [u8; 16];

/// Parse "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" into on-disk byte order.
pub const fn guid(s: &str) -> Guid {
    const fn hex(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("bad hex digit"),
        }
    }
    let s = s.as_bytes();
    let mut raw = [0u8; 16];
    let mut i = 0;
    let mut j = 0;
    while i < s.len() {
        if s[i] == b'-' {
            i += 1;
            continue;
        }
        raw[j] = (hex(s[i]) << 4) | hex(s[i + 1]);
        j += 1;
        i += 2;
    }
    // Data1 (4 bytes), Data2 and Data3 (2 bytes each) are little-endian.
    [
        raw[3], raw[2], raw[1], raw[0], raw[5], raw[4], raw[7], raw[6], raw[8], raw[9], raw[10],
        raw[11], raw[12], raw[13], raw[14], raw[15],
    ]
}

/// BAT region.
pub const GUID_BAT: Guid = guid("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Metadata region.
pub const GUID_METADATA: Guid = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E");
/// File parameters item.
pub const GUID_FILE_PARAMS: Guid = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Virtual disk size item.
pub const GUID_DISK_SIZE: Guid = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Page 83 data item.
pub const GUID_PAGE83: Guid = guid("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Logical sector size item.
pub const GUID_LOGICAL_SECTOR: Guid = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Physical sector size item.
pub const GUID_PHYSICAL_SECTOR: Guid = guid("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Parent locator item.
pub const GUID_PARENT_LOCATOR: Guid = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

static CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

fn crc32c_step(c: u32, data: &[u8]) -> u32 {
    data.iter().fold(c, |c, &b| {
        CRC32C_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// CRC-32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_step(!0, data)
}

/// CRC-32C of `data` with the 4-byte checksum field at `at` taken as zero.
pub fn checksum_with_hole(data: &[u8], at: usize) -> u32 {
    let at = at.min(data.len());
    let end = (at + 4).min(data.len());
    let c = crc32c_step(!0, &data[..at]);
    let c = crc32c_step(c, &[0u8; 4][..end - at]);
    !crc32c_step(c, &data[end..])
}

pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
pub(crate) fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
pub(crate) fn guid_at(b: &[u8], o: usize) -> Guid {
    b[o..o + 16].try_into().unwrap()
}

/// One of the two VHDX headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhdxHeader {
    /// Sequence number; the valid header with the larger one is current.
    pub sequence: u64,
    /// Changes on the first write after open.
    pub file_write_guid: Guid,
    /// Changes on the first user-visible write.
    pub data_write_guid: Guid,
    /// Non-zero when the log must be replayed.
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// Format version (1).
    pub version: u16,
    /// Log length in bytes.
    pub log_length: u32,
    /// Log offset in the file.
    pub log_offset: u64,
}

impl VhdxHeader {
    /// Parse a 4 KiB header; `None` if signature or checksum is wrong.
    pub fn parse(b: &[u8]) -> Option<VhdxHeader> {
        if b.len() < HEADER_SIZE || &b[0..4] != b"head" {
            return None;
        }
        if le32(b, 4) != checksum_with_hole(&b[..HEADER_SIZE], 4) {
            return None;
        }
        Some(VhdxHeader {
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    /// Serialize to 4 KiB with a valid checksum.
    pub fn serialize(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let c = crc32c(&b);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Pick the current header of two candidates.
    pub fn current(h1: Option<VhdxHeader>, h2: Option<VhdxHeader>) -> Result<(usize, VhdxHeader)> {
        let (slot, h) = match (h1, h2) {
            (Some(a), Some(b)) => {
                if b.sequence > a.sequence {
                    (1, b)
                } else {
                    (0, a)
                }
            }
            (Some(a), None) => (0, a),
            (None, Some(b)) => (1, b),
            (None, None) => return Err(invalid(FORMAT, "no valid header")),
        };
        if h.version != 1 {
            return Err(unsupported(FORMAT, format!("version {}", h.version)));
        }
        if h.log_version != 0 {
            return Err(unsupported(
                FORMAT,
                format!("log version {}", h.log_version),
            ));
        }
        Ok((slot, h))
    }
}

/// Location of the BAT and metadata regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// BAT offset.
    pub bat_offset: u64,
    /// BAT length.
    pub bat_length: u32,
    /// Metadata region offset.
    pub metadata_offset: u64,
    /// Metadata region length.
    pub metadata_length: u32,
}

/// Parse a 64 KiB region table.
pub fn parse_regions(b: &[u8]) -> Result<Regions> {
    if b.len() < REGION_SIZE || &b[0..4] != b"regi" {
        return Err(invalid(FORMAT, "bad region table signature"));
    }
    if le32(b, 4) != checksum_with_hole(&b[..REGION_SIZE], 4) {
        return Err(invalid(FORMAT, "region table checksum mismatch"));
    }
    let count = le32(b, 8) as usize;
    if count > 2047 {
        return Err(invalid(FORMAT, "too many region table entries"));
    }
    let mut bat = None;
    let mut meta = None;
    for i in 0..count {
        let o = 16 + i * 32;
        let id = guid_at(b, o);
        let off = le64(b, o + 16);
        let len = le32(b, o + 24);
        let required = le32(b, o + 28) & 1 != 0;
        if !off.is_multiple_of(MIB) || off < MIB || !(len as u64).is_multiple_of(MIB) || len == 0 {
            return Err(invalid(FORMAT, "region not 1 MiB aligned"));
        }
        if id == GUID_BAT {
            bat = Some((off, len));
        } else if id == GUID_METADATA {
            meta = Some((off, len));
        } else if required {
            return Err(unsupported(FORMAT, "unknown required region"));
        }
    }
    let (bat_offset, bat_length) = bat.ok_or_else(|| invalid(FORMAT, "no BAT region"))?;
    let (metadata_offset, metadata_length) =
        meta.ok_or_else(|| invalid(FORMAT, "no metadata region"))?;
    Ok(Regions {
        bat_offset,
        bat_length,
        metadata_offset,
        metadata_length,
    })
}

/// Disk parameters from the metadata region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size.
    pub block_size: u32,
    /// Blocks stay allocated (fixed disk).
    pub leave_blocks_allocated: bool,
    /// Differencing disk.
    pub has_parent: bool,
    /// Virtual size.
    pub disk_size: u64,
    /// Logical sector size (512 or 4096).
    pub logical_sector_size: u32,
}

/// Largest virtual size accepted (64 TiB, the format's limit).
pub const MAX_DISK_SIZE: u64 = 64 << 40;

/// Parse the metadata region.
pub fn parse_metadata(b: &[u8]) -> Result<Metadata> {
    if b.len() < 64 << 10 || &b[0..8] != b"metadata" {
        return Err(invalid(FORMAT, "bad metadata table signature"));
    }
    let count = le16(b, 10) as usize;
    if count > 2047 {
        return Err(invalid(FORMAT, "too many metadata entries"));
    }
    let mut params = None;
    let mut size = None;
    let mut lss = None;
    for i in 0..count {
        let o = 32 + i * 32;
        let id = guid_at(b, o);
        let off = le32(b, o + 16) as usize;
        let len = le32(b, o + 20) as usize;
        let required = le32(b, o + 24) & 4 != 0;
        let item = off
            .checked_add(len)
            .filter(|&e| e <= b.len() && off >= 64 << 10 || len == 0)
            .map(|_| &b[off.min(b.len())..(off + len).min(b.len())]);
        let need = |n: usize| -> Result<&[u8]> {
            match item {
                Some(s) if s.len() >= n => Ok(s),
                _ => Err(invalid(FORMAT, "metadata item out of bounds")),
            }
        };
        if id == GUID_FILE_PARAMS {
            let s = need(8)?;
            params = Some((le32(s, 0), le32(s, 4)));
        } else if id == GUID_DISK_SIZE {
            size = Some(le64(need(8)?, 0));
        } else if id == GUID_LOGICAL_SECTOR {
            lss = Some(le32(need(4)?, 0));
        } else if id == GUID_PHYSICAL_SECTOR || id == GUID_PAGE83 || id == GUID_PARENT_LOCATOR {
        } else if required {
            return Err(unsupported(FORMAT, "unknown required metadata item"));
        }
    }
    let (block_size, flags) = params.ok_or_else(|| invalid(FORMAT, "no file parameters"))?;
    let disk_size = size.ok_or_else(|| invalid(FORMAT, "no virtual disk size"))?;
    let logical_sector_size = lss.ok_or_else(|| invalid(FORMAT, "no logical sector size"))?;
    if !block_size.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&block_size) {
        return Err(invalid(FORMAT, format!("block size {block_size} invalid")));
    }
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(invalid(
            FORMAT,
            format!("logical sector size {logical_sector_size}"),
        ));
    }
    if disk_size == 0 || disk_size > MAX_DISK_SIZE || disk_size % logical_sector_size as u64 != 0 {
        return Err(invalid(
            FORMAT,
            format!("virtual disk size {disk_size} invalid"),
        ));
    }
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent: flags & 2 != 0,
        disk_size,
        logical_sector_size,
    })
}
