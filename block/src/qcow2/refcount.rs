// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Refcount table and blocks, and the append-only cluster allocator.
//!
//! Refcount updates stay in the block cache (dirty) until
//! [`Refcounts::write_dirty`], which the image calls before the `fdatasync`
//! that precedes any table write pointing at the clusters concerned (and
//! which runs before a new refcount block or table becomes reachable), or
//! when a dirty block is evicted. Writing a raised refcount early only ever
//! leaks a cluster; decrements are only made once the table updates that
//! dropped the references are durable. New clusters are always taken from
//! the end of the file, or reuse a cluster freed earlier in the session
//! once its release (refcount zero, after the tables that dropped it) is
//! durable: a crash can leak clusters but never make two references share
//! one.

use std::collections::BTreeSet;

use super::cache::Cache;
use super::header::MAX_REFTABLE_BYTES;
use super::table::{table_from_bytes, table_to_bytes};
use crate::error::invalid;
use crate::storage::Storage;
use crate::{Error, Result};

const FORMAT: &str = "qcow2";

/// Refcount state of an open image.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount table entries (host offsets of refcount blocks).
    pub table: Vec<u64>,
    /// Host offset of the refcount table.
    pub table_offset: u64,
    /// Clusters of the refcount table.
    pub table_clusters: u32,
    blocks: Cache<Vec<u8>>,
    /// Next free host offset (end of the allocated area).
    pub next_free: u64,
    /// Host offsets of refcount blocks, for overlap checks.
    pub block_set: BTreeSet<u64>,
    /// Clusters (indices) freed during this session, durably unreferenced
    /// with a durable refcount of zero: reused before the file grows.
    free_clusters: BTreeSet<u64>,
}

impl Refcounts {
    /// Load the refcount table.
    pub fn load(
        st: &mut dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters as u64 * cs;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(FORMAT, "refcount table too large"));
        }
        let mut buf = vec![0u8; bytes as usize];
        st.read_exact_at(&mut buf, table_offset)?;
        let table = table_from_bytes(&buf);
        let mut block_set = BTreeSet::new();
        for &e in &table {
            let off = e & !(cs - 1);
            if e & (cs - 1) != 0 {
                return Err(invalid(
                    FORMAT,
                    format!("refcount table entry {e:#x} unaligned"),
                ));
            }
            if off != 0 {
                block_set.insert(off);
            }
        }
        let cache_cap = ((8u64 << 20) >> cluster_bits).max(4) as usize;
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            blocks: Cache::new(cache_cap),
            next_free: file_len.div_ceil(cs) * cs,
            block_set,
            free_clusters: BTreeSet::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per block.
    pub fn entries_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    /// Largest representable refcount.
    pub fn max_refcount(&self) -> u64 {
        let bits = 1u32 << self.order;
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    fn get_entry(order: u32, block: &[u8], i: u64) -> u64 {
        let bits = 1u64 << order;
        if bits < 8 {
            let byte = block[(i * bits / 8) as usize];
            let shift = (i * bits) % 8;
            ((byte >> shift) as u64) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let o = i as usize * n;
            block[o..o + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | b as u64)
        }
    }

    /// Set entry `i` in `block`; returns the byte range changed.
    fn set_entry(&self, block: &mut [u8], i: u64, v: u64) -> (usize, usize) {
        Self::set_entry_in(self.order, block, i, v)
    }

    fn set_entry_in(order: u32, block: &mut [u8], i: u64, v: u64) -> (usize, usize) {
        let bits = 1u64 << order;
        if bits < 8 {
            let o = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[o] = (block[o] & !mask) | (((v as u8) << shift) & mask);
            (o, 1)
        } else {
            let n = (bits / 8) as usize;
            let o = i as usize * n;
            let be = v.to_be_bytes();
            block[o..o + n].copy_from_slice(&be[8 - n..]);
            (o, n)
        }
    }

    fn load_block(&mut self, st: &mut dyn Storage, off: u64) -> Result<()> {
        if self.blocks.contains(off) {
            return Ok(());
        }
        let mut buf = vec![0u8; self.cs() as usize];
        st.read_exact_at(&mut buf, off)?;
        self.make_room(st)?;
        self.blocks.insert(off, buf, false);
        Ok(())
    }

    /// Evict the least recently used block if the cache is full, writing it
    /// first when dirty (an early refcount write can only leak clusters).
    fn make_room(&mut self, st: &mut dyn Storage) -> Result<()> {
        if let Some((k, dirty)) = self.blocks.victim() {
            if dirty {
                let b = self.blocks.take_dirty(k).expect("victim cached");
                st.write_all_at(b, k)?;
            }
            self.blocks.remove(k);
        }
        Ok(())
    }

    /// Whether some refcount update has not been written yet.
    pub fn has_dirty(&self) -> bool {
        self.blocks.has_dirty()
    }

    /// Write every modified refcount block (no sync).
    pub fn write_dirty(&mut self, st: &mut dyn Storage) -> Result<()> {
        for off in self.blocks.dirty_keys() {
            let b = self.blocks.take_dirty(off).expect("dirty key");
            if let Err(e) = st.write_all_at(b, off) {
                // Still not on disk: keep it dirty for the next attempt.
                self.blocks.get_mut(off, true);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Refcount of host cluster `cluster` (index, not offset).
    pub fn get(&mut self, st: &mut dyn Storage, cluster: u64) -> Result<u64> {
        let epb = self.entries_per_block();
        let idx = cluster / epb;
        let Some(&block_off) = self.table.get(idx as usize) else {
            return Ok(0);
        };
        if block_off == 0 {
            return Ok(0);
        }
        self.load_block(st, block_off)?;
        let order = self.order;
        let block = self.blocks.get(block_off).expect("just loaded");
        Ok(Self::get_entry(order, block, cluster % epb))
    }

    /// Reserve `n` clusters: a single one is taken from the clusters freed
    /// during this session when there are any, otherwise (and for larger
    /// runs) they come from the end of the file. Their refcounts must be set
    /// with [`Refcounts::set`] once their content is written.
    pub fn reserve(&mut self, n: u64) -> Result<u64> {
        if n == 1 {
            if let Some(c) = self.free_clusters.pop_first() {
                return Ok(c << self.cluster_bits);
            }
        }
        let off = self.next_free;
        let end = n
            .checked_mul(self.cs())
            .and_then(|b| off.checked_add(b))
            .filter(|&e| e <= super::table::OFFSET_MASK)
            .ok_or_else(|| Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)))?;
        self.next_free = end;
        Ok(off)
    }

    /// Offer host cluster `cluster` (index) for reuse. The caller must have
    /// made durable both its refcount of zero and the table updates that
    /// dropped every reference to it.
    pub fn release(&mut self, cluster: u64) {
        if (cluster << self.cluster_bits) < self.next_free {
            self.free_clusters.insert(cluster);
        }
    }

    /// Clusters available for reuse.
    pub fn free_count(&self) -> usize {
        self.free_clusters.len()
    }

    /// Set the refcount of host cluster `cluster` to `value`,
    /// creating refcount blocks and growing the table as needed.
    pub fn set(&mut self, st: &mut dyn Storage, cluster: u64, value: u64) -> Result<()> {
        self.set_depth(st, cluster, value, 0)
    }

    fn set_depth(
        &mut self,
        st: &mut dyn Storage,
        cluster: u64,
        value: u64,
        depth: u32,
    ) -> Result<()> {
        if depth > 8 {
            return Err(invalid(
                FORMAT,
                "refcount block allocation does not converge",
            ));
        }
        if value > self.max_refcount() {
            return Err(invalid(FORMAT, "refcount overflow"));
        }
        let epb = self.entries_per_block();
        let idx = cluster / epb;
        if idx as usize >= self.table.len() {
            self.grow_table(st, idx)?;
        }
        if self.table[idx as usize] == 0 {
            let cs = self.cs();
            let b = self.reserve(1)?;
            let bidx = b / cs;
            let mut block = vec![0u8; cs as usize];
            let self_covered = bidx / epb == idx;
            if self_covered {
                self.set_entry(&mut block, bidx % epb, 1);
            }
            st.write_all_at(&block, b)?;
            if !self_covered {
                self.set_depth(st, bidx, 1, depth + 1)?;
            }
            // The block (and its own refcount) must be durable before the
            // table points to it.
            self.write_dirty(st)?;
            st.sync()?;
            st.write_all_at(&b.to_be_bytes(), self.table_offset + idx * 8)?;
            self.table[idx as usize] = b;
            self.block_set.insert(b);
            self.make_room(st)?;
            self.blocks.insert(b, block, false);
        }
        let block_off = self.table[idx as usize];
        self.load_block(st, block_off)?;
        let order = self.order;
        let block = self.blocks.get_mut(block_off, true).expect("just loaded");
        Self::set_entry_in(order, block, cluster % epb, value);
        Ok(())
    }

    /// Grow the refcount table so that index `need` exists.
    fn grow_table(&mut self, st: &mut dyn Storage, need: u64) -> Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let epb = self.entries_per_block();
        let old_len = self.table.len() as u64;
        let start = self.next_free / cs;
        let mut t = (need + 1).max(old_len * 2).div_ceil(per_cluster);
        let mut b = 0u64;
        let mut missing = Vec::new();
        for _ in 0..16 {
            let last = start + t + b - 1;
            missing = (start / epb..=last / epb)
                .filter(|&i| i >= old_len || self.table[i as usize] == 0)
                .collect::<Vec<_>>();
            let t_need = (need + 1).max(last / epb + 1).div_ceil(per_cluster);
            if missing.len() as u64 == b && t_need <= t {
                break;
            }
            b = missing.len() as u64;
            t = t.max(t_need);
        }
        let last = start + t + b - 1;
        if t * cs > MAX_REFTABLE_BYTES || missing.len() as u64 != b {
            return Err(invalid(
                FORMAT,
                "refcount table would exceed its maximum size",
            ));
        }
        let table_off = self.reserve(t + b)?;
        let mut new_table = self.table.clone();
        new_table.resize((t * per_cluster) as usize, 0);
        let mut new_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (k, &i) in missing.iter().enumerate() {
            let off = table_off + (t + k as u64) * cs;
            new_table[i as usize] = off;
            new_blocks.push((i, vec![0u8; cs as usize]));
        }
        // Refcounts of the new table and blocks, set before the header switch.
        for c in start..=last {
            let i = c / epb;
            if let Some(pos) = missing.iter().position(|&m| m == i) {
                let mut blk = std::mem::take(&mut new_blocks[pos].1);
                self.set_entry(&mut blk, c % epb, 1);
                new_blocks[pos].1 = blk;
            } else {
                self.set_depth(st, c, 1, 8)?;
            }
        }
        for (k, (_, blk)) in new_blocks.iter().enumerate() {
            st.write_all_at(blk, table_off + (t + k as u64) * cs)?;
        }
        st.write_all_at(&table_to_bytes(&new_table), table_off)?;
        // Refcounts of the new clusters kept in existing blocks too.
        self.write_dirty(st)?;
        st.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(t as u32).to_be_bytes());
        st.write_all_at(&hdr, 48)?;
        st.sync()?;
        let old_off = self.table_offset;
        let old_clusters = self.table_clusters as u64;
        self.table = new_table;
        self.table_offset = table_off;
        self.table_clusters = t as u32;
        for (k, (i, blk)) in new_blocks.into_iter().enumerate() {
            let off = table_off + (t + k as u64) * cs;
            debug_assert_eq!(self.table[i as usize], off);
            self.block_set.insert(off);
            self.make_room(st)?;
            self.blocks.insert(off, blk, false);
        }
        for c in 0..old_clusters {
            self.set(st, old_off / cs + c, 0)?;
        }
        log::debug!("qcow2: refcount table grown to {t} clusters at {table_off:#x}");
        Ok(())
    }

    /// Whether host offset `off` is inside the refcount table or a block.
    pub fn overlaps(&self, off: u64) -> bool {
        let cs = self.cs();
        let c = off & !(cs - 1);
        (c >= self.table_offset && c < self.table_offset + self.table_clusters as u64 * cs)
            || self.block_set.contains(&c)
    }
}
