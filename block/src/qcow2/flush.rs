// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! The metadata flush: data and refcounts durable, then L2 tables, then L1 entries, then the
//! release of clusters the durable tables no longer reference (see the crate docs' crash
//! safety). What fails to be written stays dirty for the next flush.

use std::collections::HashSet;

use super::table::{table_to_bytes, OFFSET_MASK};
use super::{invalid, Qcow2Disk, FORMAT};
use crate::Result;

impl Qcow2Disk {
    pub(super) fn flush_metadata(&mut self) -> Result<()> {
        // 1. data and refcounts durable.
        self.rc.write_dirty(self.st.as_mut())?;
        let dirty = self.l2_cache.dirty_keys();
        if dirty.is_empty() && self.l1_dirty.is_empty() && self.free_queue.is_empty() {
            return Ok(self.st.sync()?);
        }
        self.st.sync()?;
        // 2. L2 tables.
        for off in dirty {
            if self.rc.overlaps(off) || off == 0 {
                return Err(invalid(FORMAT, "L2 table overlaps other metadata"));
            }
            let bytes = table_to_bytes(self.l2_cache.take_dirty(off).expect("dirty key"));
            if let Err(e) = self.st.write_all_at(&bytes, off) {
                // Not on disk (ENOSPC, EIO): still dirty, so the next flush writes it. Marked
                // clean, it would be skipped, and that flush would succeed with the image's
                // table missing writes acknowledged before it.
                self.l2_cache.get_mut(off, true);
                return Err(e.into());
            }
        }
        // 3. L1 entries, once the L2 tables they point to are durable.
        if !self.l1_dirty.is_empty() {
            self.st.sync()?;
            let dirty: Vec<usize> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
            let mut i = 0;
            while i < dirty.len() {
                let mut j = i;
                while j + 1 < dirty.len() && dirty[j + 1] == dirty[j] + 1 {
                    j += 1;
                }
                let bytes = table_to_bytes(&self.l1[dirty[i]..=dirty[j]]);
                let at = self.header.l1_table_offset + dirty[i] as u64 * 8;
                if let Err(e) = self.st.write_all_at(&bytes, at) {
                    // As for the L2 tables: what is not known to be on disk stays dirty.
                    self.l1_dirty.extend(dirty[i..].iter().copied());
                    return Err(e.into());
                }
                i = j + 1;
            }
        }
        self.st.sync()?;
        // 4. Release clusters no longer referenced by durable tables, except
        // metadata a (hostile) entry pointed at: the header, L1, refcount
        // structures and the L2 tables the L1 uses. Those keep their
        // refcount and are neither punched nor reused.
        let l1_targets: HashSet<u64> = self.l1.iter().map(|e| e & OFFSET_MASK).collect();
        let queue = std::mem::take(&mut self.free_queue);
        let mut freed = Vec::new();
        for c in queue {
            if self.in_use_metadata(c << self.cluster_bits, &l1_targets) {
                log::warn!("qcow2: not freeing cluster {c}: it holds metadata");
                continue;
            }
            let r = self.rc.get(self.st.as_mut(), c)?;
            if r == 0 {
                log::warn!("qcow2: freeing cluster {c} with refcount 0");
                continue;
            }
            self.rc.set(self.st.as_mut(), c, r - 1)?;
            if r == 1 {
                freed.push(c);
                self.decompressed.host = None;
                if let Err(e) = self.st.punch_hole(c << self.cluster_bits, self.cs()) {
                    log::debug!("qcow2: punch hole failed: {e}");
                }
            }
        }
        self.rc.write_dirty(self.st.as_mut())?;
        if freed.is_empty() {
            return Ok(());
        }
        self.st.sync()?;
        // 5. The releases are durable: the clusters may be reused.
        for c in freed {
            let off = c << self.cluster_bits;
            // An old copy of an L2 table is no longer metadata.
            if self.l2_set.remove(&off) {
                self.l2_cache.remove(off);
            }
            self.rc.release(c);
        }
        Ok(())
    }
}
