// Copyright 2026 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Growing a qcow2 image (`vm.resize-disk`): the new virtual size goes into the header; where
//! the L1 table cannot map it, a larger table is written first and the header switched to it
//! in one write, as QEMU grows it. Shrinking is refused.

use super::header::{MAX_L1_BYTES, MAX_VIRTUAL_SIZE, SIZE_OFFSET};
use super::table::table_to_bytes;
use super::Qcow2Disk;
use crate::Result;

/// Where the header keeps the L1 table's size (u32), followed by its offset (u64).
const L1_SIZE_OFFSET: u64 = 36;

impl Qcow2Disk {
    /// Sets the virtual size to `size` bytes (only ever larger), growing the L1 table first
    /// where it cannot map the new size.
    pub(super) fn grow_to(&mut self, size: u64) -> Result<()> {
        let refuse = |why: String| Err(crate::Error::InvalidArgument(why));
        if self.readonly {
            return refuse("the image is read-only".into());
        }
        if self.backing.is_some() {
            return refuse("a qcow2 image with a backing file cannot be resized".into());
        }
        if size < self.header.size {
            return refuse(format!(
                "a qcow2 image only grows ({} bytes now)",
                self.header.size
            ));
        }
        if size > MAX_VIRTUAL_SIZE {
            return refuse(format!(
                "a qcow2 image holds at most {MAX_VIRTUAL_SIZE} bytes"
            ));
        }
        if size == self.header.size {
            return Ok(());
        }
        let per_entry = self.cs() * (self.cs() / 8);
        let need = size.div_ceil(per_entry);
        if need > self.l1.len() as u64 {
            if need * 8 > MAX_L1_BYTES {
                return refuse(format!(
                    "{size} bytes need an L1 table of {need} entries, more than the \
                     {MAX_L1_BYTES} bytes qcow2 allows"
                ));
            }
            self.grow_l1(need)?;
        }
        self.flush_metadata()?;
        self.st.write_all_at(&size.to_be_bytes(), SIZE_OFFSET)?;
        self.st.sync()?;
        self.header.size = size;
        Ok(())
    }

    /// Moves the L1 table to `entries` entries in new clusters at the end of the image. Crash
    /// safe: the new table and its refcounts are durable before the header points to it, and
    /// the old table's clusters are released only after that (by the flush).
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        // Every L1 entry and refcount the old table depends on is on disk, so the copy is whole.
        self.flush_metadata()?;
        let cs = self.cs();
        let clusters = (entries * 8).div_ceil(cs);
        let at = self.rc.reserve(clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut bytes = table_to_bytes(&l1);
        bytes.resize((clusters * cs) as usize, 0);
        self.st.write_all_at(&bytes, at)?;
        for c in 0..clusters {
            self.rc.set(self.st.as_mut(), at / cs + c, 1)?;
        }
        self.rc.write_dirty(self.st.as_mut())?;
        self.st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&at.to_be_bytes());
        self.st.write_all_at(&hdr, L1_SIZE_OFFSET)?;
        self.st.sync()?;
        let old = self.header.l1_table_offset / cs;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.l1 = l1;
        self.header.l1_size = entries as u32;
        self.header.l1_table_offset = at;
        self.free_queue.extend(old..old + old_clusters);
        log::debug!("qcow2: L1 table grown to {entries} entries at {at:#x}");
        self.flush_metadata()
    }
}
