// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! L1/L2 entry encoding and compressed cluster decoding.

use std::io::Read;

use super::header::CompressionType;
use crate::error::invalid;
use crate::Result;

const FORMAT: &str = "qcow2";

/// Entry flag: refcount of the target is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 flag: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 flag (v3): cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Host offset bits of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: read the backing file or zeroes.
    Unallocated,
    /// Reads as zeroes; may keep a preallocated host cluster.
    Zero {
        /// Preallocated host cluster, if any.
        host: Option<u64>,
    },
    /// Data at a host cluster.
    Normal {
        /// Host cluster offset.
        host: u64,
        /// Refcount is exactly one (may be written in place).
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Bytes to read from `host`.
        len: u64,
    },
}

/// Decode a raw L2 entry for an image with `cluster_bits`.
pub fn decode_l2(raw: u64, cluster_bits: u32, version: u32) -> Result<L2Entry> {
    if raw & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let host = raw & ((1u64 << x) - 1);
        let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        return Ok(L2Entry::Compressed { host, len });
    }
    let host = raw & OFFSET_MASK;
    if host & ((1 << cluster_bits) - 1) != 0 {
        return Err(invalid(
            FORMAT,
            format!("L2 entry {raw:#x} points to an unaligned cluster"),
        ));
    }
    if raw & ZERO != 0 {
        if version < 3 {
            return Err(invalid(FORMAT, "zero flag in a version 2 image"));
        }
        return Ok(L2Entry::Zero {
            host: (host != 0).then_some(host),
        });
    }
    if host == 0 {
        return Ok(L2Entry::Unallocated);
    }
    Ok(L2Entry::Normal {
        host,
        copied: raw & COPIED != 0,
    })
}

/// Host clusters touched by a compressed stream at `[host, host+len)`.
pub fn compressed_clusters(
    host: u64,
    len: u64,
    cluster_bits: u32,
) -> std::ops::RangeInclusive<u64> {
    let first = host >> cluster_bits;
    let last = (host + len.max(1) - 1) >> cluster_bits;
    first..=last
}

/// Decompress one cluster into `out` (exactly `out.len()` bytes produced).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| invalid(FORMAT, format!("bad deflate data: {e}")))?;
            // Trailing sector padding is allowed; short output is not.
            if d.total_out() as usize != out.len() {
                return Err(invalid(
                    FORMAT,
                    format!(
                        "compressed cluster decompressed to {} bytes, expected {} ({status:?})",
                        d.total_out(),
                        out.len()
                    ),
                ));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| invalid(FORMAT, format!("bad zstd data: {e}")))?;
            let mut done = 0;
            while done < out.len() {
                match dec.read(&mut out[done..]) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) => return Err(invalid(FORMAT, format!("bad zstd data: {e}"))),
                }
            }
            if done != out.len() {
                return Err(invalid(
                    FORMAT,
                    format!(
                        "zstd cluster decompressed to {done} bytes, expected {}",
                        out.len()
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// Convert a big-endian table cluster to entries.
pub fn table_from_bytes(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

/// Convert entries to big-endian bytes.
pub fn table_to_bytes(t: &[u64]) -> Vec<u8> {
    t.iter().flat_map(|e| e.to_be_bytes()).collect()
}
