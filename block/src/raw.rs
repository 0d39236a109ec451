// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Raw images: a plain file or block device.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Seek, SeekFrom};
use std::os::unix::io::AsRawFd;

use crate::storage::{self, FileStorage, Storage};
use crate::{for_each_read, for_each_write, DiskFile, HostMapping, ImageType, OpenOptions, Result};

/// A raw disk image: the guest's bytes at the same offsets in the file. A fixed VHD is one
/// too (its footer lies past `size`).
pub struct RawDisk {
    storage: FileStorage,
    size: u64,
    image_type: ImageType,
    readonly: bool,
    sparse: bool,
}

impl RawDisk {
    /// Wrap an opened (and locked) file.
    pub fn new(mut file: File, opts: &OpenOptions) -> Result<Self> {
        // Seek works for block devices too, where metadata().len() is 0.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Self::with_size(
            FileStorage::new(file, opts.direct),
            size,
            ImageType::Raw,
            opts.readonly,
            opts.sparse,
        ))
    }

    /// The first `size` bytes of `storage` as a disk reported as `image_type`.
    pub(crate) fn with_size(
        storage: FileStorage,
        size: u64,
        image_type: ImageType,
        readonly: bool,
        sparse: bool,
    ) -> Self {
        RawDisk {
            storage,
            size,
            image_type,
            readonly,
            sparse,
        }
    }

    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> Result<()> {
        let chunk = 1 << 20;
        let zeros = storage::AlignedBuf::new(chunk.min(len as usize));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.as_slice().len() as u64) as usize;
            self.storage
                .write_all_at(&zeros.as_slice()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl DiskFile for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let st = &mut self.storage;
        for_each_read(offset, self.size, bufs, |off, buf| {
            Ok(st.read_exact_at(buf, off)?)
        })
    }

    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.readonly {
            return Err(crate::Error::ReadOnly);
        }
        let st = &mut self.storage;
        for_each_write(offset, self.size, bufs, |off, buf| {
            Ok(st.write_all_at(buf, off)?)
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        Ok(self.storage.sync()?)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.readonly {
            return Err(crate::Error::ReadOnly);
        }
        crate::check_range(offset, len, self.size)?;
        if !self.sparse {
            return Ok(());
        }
        if let Err(e) = self.storage.punch_hole(offset, len) {
            // Discard is a hint: an fs without hole punching just keeps the data.
            log::debug!("raw discard: punch hole failed: {e}");
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.readonly {
            return Err(crate::Error::ReadOnly);
        }
        crate::check_range(offset, len, self.size)?;
        let file = self.storage.file();
        let res = if self.sparse {
            storage::punch_hole(file, offset, len)
        } else {
            storage::zero_range(file, offset, len)
        };
        match res {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }

    fn resize(&mut self, size: u64) -> Result<()> {
        use std::os::unix::fs::FileTypeExt;
        if self.image_type != ImageType::Raw {
            // A fixed VHD's footer lies at the old end.
            return Err(crate::Error::InvalidArgument(format!(
                "a {} image cannot be resized (raw and qcow2 images can)",
                self.image_type
            )));
        }
        if self.readonly {
            return Err(crate::Error::InvalidArgument(
                "the image is read-only".into(),
            ));
        }
        if self
            .storage
            .file()
            .metadata()?
            .file_type()
            .is_block_device()
        {
            return Err(crate::Error::InvalidArgument(
                "a block device is resized outside the VMM (LVM, losetup), not by it".into(),
            ));
        }
        self.storage.set_len(size)?;
        self.size = size;
        Ok(())
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn image_type(&self) -> ImageType {
        self.image_type
    }

    fn map_host(&mut self, offset: u64, len: u64, _write: bool) -> Result<Option<HostMapping>> {
        crate::check_range(offset, len, self.size)?;
        Ok(Some(HostMapping {
            fd: self.storage.file().as_raw_fd(),
            offset,
            direct: self.storage.is_direct(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use crate::{open_disk, DiskFileExt, ImageType, OpenOptions};

    fn raw(content: &[u8], readonly: bool) -> (tempfile::NamedTempFile, Box<dyn crate::DiskFile>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let opts = OpenOptions {
            readonly,
            image_type: Some(ImageType::Raw),
            ..Default::default()
        };
        let d = open_disk(f.path(), &opts).unwrap();
        (f, d)
    }

    /// Grown: the old bytes stay, the new ones read zero, the file has the new length;
    /// shrunk: what lay past the new end is gone. Read-only images are refused.
    #[test]
    fn a_raw_image_grows_and_shrinks() {
        let (f, mut d) = raw(&[0xa5; 4096], false);
        d.resize(16384).unwrap();
        assert_eq!(d.size(), 16384);
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 16384);
        let mut buf = vec![1u8; 16384];
        d.read_exact_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xa5));
        assert!(buf[4096..].iter().all(|&b| b == 0));
        d.write_all_at(12288, &[7u8; 512]).unwrap();
        d.resize(2048).unwrap();
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 2048);
        assert!(d.read_exact_at(2048, &mut [0u8; 512]).is_err());
        let (_g, mut ro) = raw(&[0; 4096], true);
        let e = ro.resize(8192).unwrap_err().to_string();
        assert!(e.contains("read-only"), "{e}");
    }
}
