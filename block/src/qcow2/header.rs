// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! qcow2 header parsing, validation and serialization.

use crate::error::{invalid, unsupported};
use crate::Result;

const FORMAT: &str = "qcow2";

/// "QFI\xfb".
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header we write (with compression type).
pub const V3_HEADER_LEN: u32 = 112;
/// Smallest and largest supported cluster_bits.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest virtual size accepted (as QEMU: 2^56 bytes... capped to 64 PiB).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Largest L1 table accepted, in bytes.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Incompatible feature: image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: image is marked corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: compression type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;

/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression algorithm of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate.
    Zlib,
    /// zstd frames.
    Zstd,
}

/// A parsed qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0 if none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Encryption method (0 = none).
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Auto-clear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (v3).
    pub header_length: u32,
    /// Compression algorithm.
    pub compression_type: CompressionType,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if any.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
/// Where the virtual size (big-endian u64) lies in the header.
pub const SIZE_OFFSET: u64 = 24;

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Read cluster_bits from a header prefix (to know how much to read).
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(invalid(FORMAT, "file too short for a header"));
        }
        if be32(buf, 0) != QCOW2_MAGIC {
            return Err(invalid(FORMAT, "bad magic"));
        }
        let bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(invalid(FORMAT, format!("cluster_bits {bits} out of range")));
        }
        Ok(bits)
    }

    /// Parse and validate the header from the image's first cluster (or
    /// its whole file when shorter).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(FORMAT, format!("version {version}")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, SIZE_OFFSET as usize),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid(FORMAT, "file too short for a v3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104
                || h.header_length as u64 > cluster_size
                || h.header_length as usize > buf.len()
            {
                return Err(invalid(
                    FORMAT,
                    format!("header length {} invalid", h.header_length),
                ));
            }
            if h.header_length > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(unsupported(FORMAT, format!("compression type {t}"))),
                };
            }
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(FORMAT, "external data file"));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(FORMAT, "extended L2 entries (subclusters)"));
        }
        if h.incompatible_features & !known != 0 {
            return Err(unsupported(
                FORMAT,
                format!(
                    "unknown incompatible features {:#x}",
                    h.incompatible_features & !known
                ),
            ));
        }
        if h.compression_type != CompressionType::Zlib
            && h.incompatible_features & INCOMPAT_COMPRESSION == 0
        {
            return Err(invalid(
                FORMAT,
                "compression type set without its incompatible feature bit",
            ));
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                FORMAT,
                format!("refcount order {} > 6", h.refcount_order),
            ));
        }
        if h.crypt_method != 0 {
            return Err(unsupported(FORMAT, "encryption"));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(invalid(
                FORMAT,
                format!("virtual size {} too large", h.size),
            ));
        }
        let l2_entries = cluster_size / 8;
        let need_l1 = h.size.div_ceil(cluster_size * l2_entries);
        if (h.l1_size as u64) < need_l1 {
            return Err(invalid(
                FORMAT,
                format!("L1 table too small ({} < {need_l1})", h.l1_size),
            ));
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid(
                FORMAT,
                format!("L1 table of {} entries too large", h.l1_size),
            ));
        }
        if !h.l1_table_offset.is_multiple_of(cluster_size)
            || (h.l1_size > 0 && h.l1_table_offset == 0)
        {
            return Err(invalid(FORMAT, "L1 table offset not cluster aligned"));
        }
        if !h.refcount_table_offset.is_multiple_of(cluster_size) || h.refcount_table_offset == 0 {
            return Err(invalid(FORMAT, "refcount table offset invalid"));
        }
        if h.refcount_table_clusters == 0
            || h.refcount_table_clusters as u64 * cluster_size > MAX_REFTABLE_BYTES
        {
            return Err(invalid(
                FORMAT,
                format!(
                    "refcount table of {} clusters invalid",
                    h.refcount_table_clusters
                ),
            ));
        }
        if h.l1_table_offset
            .checked_add(h.l1_size as u64 * 8)
            .is_none()
            || h.refcount_table_offset
                .checked_add(h.refcount_table_clusters as u64 * cluster_size)
                .is_none()
        {
            return Err(invalid(FORMAT, "table offsets overflow"));
        }
        if h.backing_file_offset != 0 {
            let off = h.backing_file_offset;
            let len = h.backing_file_size as u64;
            if len == 0 || len > 1023 || off.saturating_add(len) > buf.len() as u64 {
                return Err(invalid(FORMAT, "backing file name out of bounds"));
            }
            let name = &buf[off as usize..(off + len) as usize];
            let name = std::str::from_utf8(name)
                .map_err(|_| invalid(FORMAT, "backing file name is not UTF-8"))?;
            h.backing_file = Some(name.to_string());
        }
        h.parse_extensions(buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let mut off = self.header_length as usize;
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len()
        };
        // Each extension is at least 8 bytes, so this loop is bounded.
        while off + 8 <= end {
            let ty = be32(buf, off);
            let len = be32(buf, off + 4) as usize;
            if ty == 0 {
                break;
            }
            let data = off + 8;
            let padded = len.div_ceil(8) * 8;
            if data.checked_add(padded).is_none_or(|e| e > end) {
                return Err(invalid(FORMAT, "header extension out of bounds"));
            }
            match ty {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(&buf[data..data + len])
                        .map_err(|_| invalid(FORMAT, "backing format is not UTF-8"))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_DATA_FILE => return Err(unsupported(FORMAT, "external data file")),
                _ => {}
            }
            off = data + padded;
        }
        Ok(())
    }

    /// Serialize the fixed header fields (72 bytes for v2, header_length for v3).
    pub fn serialize(&self) -> Vec<u8> {
        let len = if self.version == 2 {
            V2_HEADER_LEN
        } else {
            self.header_length
        } as usize;
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if len > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        b
    }
}
