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
