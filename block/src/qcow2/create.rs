// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Creating new, empty qcow2 images.

use std::fs::OpenOptions as StdOpenOptions;
use std::path::Path;

use super::header::{
    CompressionType, Header, EXT_BACKING_FORMAT, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::storage::{FileStorage, Storage};
use crate::{Error, ImageType, Result};

/// Parameters of a new image.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// log2 of the cluster size (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1, default).
    pub version: u32,
    /// Backing file name, stored as given.
    pub backing_file: Option<String>,
    /// Backing file format, stored in a header extension.
    pub backing_format: Option<ImageType>,
}

impl CreateOptions {
    /// Version 3, 64 KiB clusters, no backing file.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_bits: 16,
            version: 3,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Create a new qcow2 image at `path` (fails if it exists).
pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&opts.cluster_bits) {
        return Err(Error::InvalidArgument(format!(
            "cluster_bits {} not in {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
            opts.cluster_bits
        )));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(Error::InvalidArgument(format!(
            "qcow2 version {}",
            opts.version
        )));
    }
    if opts.size > MAX_VIRTUAL_SIZE {
        return Err(Error::InvalidArgument("size too large".into()));
    }
    let cs = 1u64 << opts.cluster_bits;
    let l2_entries = cs / 8;
    let l1_size = opts.size.div_ceil(cs * l2_entries).max(1);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::InvalidArgument(
            "size too large for the cluster size".into(),
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let epb = cs * 8 / 16;
    // Layout: header, refcount table (t), refcount blocks (b), L1 table.
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = 1 + t + b + l1_clusters;
        let nb = total.div_ceil(epb);
        let nt = nb.div_ceil(cs / 8);
        if nb == b && nt == t {
            break;
        }
        b = nb;
        t = nt;
    }
    let total = 1 + t + b + l1_clusters;
    let rt_off = cs;
    let blocks_off = cs * (1 + t);
    let l1_off = cs * (1 + t + b);

    let header_len = if opts.version == 3 {
        V3_HEADER_LEN
    } else {
        V2_HEADER_LEN
    };
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: opts.cluster_bits,
        size: opts.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: t as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: header_len,
        compression_type: CompressionType::Zlib,
        backing_file: None,
        backing_format: None,
    };
    let mut ext = Vec::new();
    if let Some(fmt) = opts.backing_format {
        let name = match fmt {
            ImageType::Vhd => "vpc".to_string(),
            other => other.to_string(),
        };
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(name.len() as u32).to_be_bytes());
        ext.extend_from_slice(name.as_bytes());
        ext.resize(ext.len().div_ceil(8) * 8, 0);
    }
    ext.extend_from_slice(&[0u8; 8]); // end of extensions
    let name_off = header_len as u64 + ext.len() as u64;
    if let Some(name) = &opts.backing_file {
        if name.is_empty() || name.len() > 1023 || name_off + name.len() as u64 > cs {
            return Err(Error::InvalidArgument("backing file name too long".into()));
        }
        h.backing_file_offset = name_off;
        h.backing_file_size = name.len() as u32;
    }
    let mut cluster0 = h.serialize();
    cluster0.extend_from_slice(&ext);
    if let Some(name) = &opts.backing_file {
        cluster0.extend_from_slice(name.as_bytes());
    }

    let file = StdOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let mut st = FileStorage::new(file, false);
    st.set_len(total * cs)?;
    st.write_all_at(&cluster0, 0)?;
    let mut rt = vec![0u8; (t * cs) as usize];
    for i in 0..b {
        let off = blocks_off + i * cs;
        rt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    st.write_all_at(&rt, rt_off)?;
    let mut blocks = vec![0u8; (b * cs) as usize];
    for c in 0..total {
        blocks[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }
    st.write_all_at(&blocks, blocks_off)?;
    st.sync()?;
    Ok(())
}
