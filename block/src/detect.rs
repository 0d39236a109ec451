// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Image format detection from the file's header (and footer for VHD).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::{ImageType, Result};

/// Detect the format from the first bytes and, for fixed VHD, the footer.
pub fn detect_image_type(file: &File) -> Result<ImageType> {
    let mut f = file;
    let len = f.seek(SeekFrom::End(0))?;
    // O_DIRECT needs an aligned buffer; read through an aligned bounce.
    let mut head = crate::storage::AlignedBuf::new(4096);
    let head_len = len.min(4096) as usize;
    f.seek(SeekFrom::Start(0))?;
    read_prefix(f, &mut head.as_mut_slice()[..4096], head_len)?;
    let mut tail = None;
    if len >= 512 {
        // The footer may straddle two aligned blocks: read both.
        let start = (len - 512) / 4096 * 4096;
        let mut t = crate::storage::AlignedBuf::new(8192);
        f.seek(SeekFrom::Start(start))?;
        let want = (len - start) as usize;
        read_prefix(f, &mut t.as_mut_slice()[..8192], want)?;
        let skip = (len - 512 - start) as usize;
        let mut footer = [0u8; 512];
        footer.copy_from_slice(&t.as_slice()[skip..skip + 512]);
        tail = Some(footer);
    }
    Ok(detect_from_bytes(
        &head.as_slice()[..head_len],
        tail.as_ref(),
    ))
}

fn read_prefix(mut f: &File, buf: &mut [u8], want: usize) -> Result<()> {
    let mut done = 0;
    while done < want {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Detect the format from a header prefix and an optional 512-byte footer.
pub fn detect_from_bytes(head: &[u8], footer: Option<&[u8; 512]>) -> ImageType {
    if head.len() >= 4 && head[..4] == crate::qcow2::header::QCOW2_MAGIC.to_be_bytes() {
        return ImageType::Qcow2;
    }
    if head.len() >= 8 && &head[..8] == b"vhdxfile" {
        return ImageType::Vhdx;
    }
    if head.len() >= 8 && &head[..8] == b"conectix" {
        return ImageType::Vhd;
    }
    // A flat VMDK's descriptor, or a sparse VMDK (which opening refuses by name).
    if head.starts_with(crate::vmdk::DESCRIPTOR_MAGIC)
        || head.starts_with(crate::vmdk::SPARSE_MAGIC)
    {
        return ImageType::Vmdk;
    }
    if let Some(f) = footer {
        if crate::vhd::Footer::parse(f).is_ok() {
            return ImageType::Vhd;
        }
    }
    ImageType::Raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn footer_straddling_two_blocks() {
        // Lengths whose last 512 bytes cross a 4 KiB boundary.
        for len in [4096 + 8, 8192 + 300, 12288 + 511, 600, 4096 + 512] {
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&vec![0u8; len]).unwrap();
            assert_eq!(detect_image_type(&f).unwrap(), ImageType::Raw, "len {len}");
        }
    }
}
