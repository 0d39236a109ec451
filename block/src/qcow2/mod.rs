// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! qcow2 (versions 2 and 3): read, write, backing chains, compressed and
//! zero clusters, discard, creation.
//!
//! Crash safety: new data is written before the refcount that accounts for
//! it, refcounts are written through, and L2/L1 updates are kept in memory
//! until [`DiskFile::flush`] (or cache eviction), which first makes data and
//! refcounts durable, then writes L2 tables, syncs, writes L1 entries and
//! syncs again. Clusters are only freed (refcount decremented) after the
//! table update that dropped them is durable. A crash therefore leaks
//! clusters at worst.

pub mod cache;
pub mod create;
mod flush;
pub mod header;
pub mod refcount;
mod resize;
pub mod table;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use cache::Cache;
use header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use refcount::Refcounts;
use table::{decode_l2, table_from_bytes, table_to_bytes, L2Entry, COPIED, OFFSET_MASK, ZERO};

pub use create::{create, CreateOptions};

use crate::error::invalid;
use crate::storage::{FileStorage, Storage};
use crate::{
    for_each_read, for_each_write, CompressedRead, CowPlan, DiskFile, Error, HostMapping,
    ImageType, OpenOptions, Result,
};

const FORMAT: &str = "qcow2";

/// Inflates `input` into `out` (resized to a cluster of `cs` bytes) as far as
/// `need` bytes, in whole 4 KiB pages; returns how far that is.
fn inflate_into(
    kind: header::CompressionType,
    input: &[u8],
    out: &mut Vec<u8>,
    need: usize,
    cs: usize,
) -> Result<usize> {
    let want = need.next_multiple_of(4096).min(cs);
    out.resize(cs, 0);
    table::decompress(kind, input, &mut out[..want])?;
    Ok(want)
}

/// The last compressed cluster read, decompressed as far as reads needed.
#[derive(Default)]
struct Decompressed {
    /// Its host offset; `None` when nothing valid is held.
    host: Option<u64>,
    /// The decompressed cluster, valid up to `valid` bytes.
    out: Vec<u8>,
    valid: usize,
    /// The compressed data (a buffer reused from one cluster to the next).
    input: Vec<u8>,
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    st: Box<dyn Storage>,
    header: Header,
    cluster_bits: u32,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2_cache: Cache<Vec<u64>>,
    l2_set: BTreeSet<u64>,
    rc: Refcounts,
    backing: Option<Box<dyn DiskFile>>,
    readonly: bool,
    free_queue: Vec<u64>,
    decompressed: Decompressed,
    // Host ranges handed out by alloc_host and not yet committed or
    // aborted: host offset -> (guest offset, length).
    pending_allocs: HashMap<u64, (u64, u64)>,
    // File length at open, and how far it has been preallocated since.
    file_len_at_open: u64,
    prealloc_end: u64,
    prealloc_failed: bool,
    // Search for free clusters in the file as it was at open: next cluster
    // to look at, and the end (cluster indices).
    scan_cursor: u64,
    scan_end: u64,
}

/// Resolve a backing file name like QEMU: relative names are relative to
/// the directory of the image naming them.
pub fn resolve_backing_path(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

impl Qcow2Disk {
    /// Open from an opened (and locked) file; `chain` tracks the backing chain.
    pub(crate) fn open(
        file: File,
        path: &Path,
        opts: &OpenOptions,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let st = Box::new(FileStorage::new(file, opts.direct));
        Self::open_storage(st, opts, |h| {
            let Some(name) = &h.backing_file else {
                return Ok(None);
            };
            if !opts.backing_files {
                return Err(Error::BackingDisabled {
                    path: path.to_path_buf(),
                    backing: name.clone(),
                });
            }
            let bpath = resolve_backing_path(path, name);
            let image_type = match h.backing_format.as_deref() {
                None | Some("") => None,
                Some(f) => Some(f.parse::<ImageType>()?),
            };
            let bopts = OpenOptions {
                lock_granularity: Default::default(),
                readonly: true,
                direct: opts.direct,
                image_type,
                backing_files: true,
                sparse: false,
            };
            Ok(Some(crate::open_disk_inner(&bpath, &bopts, chain)?))
        })
    }

    /// Open an image through any [`Storage`] (used by tests to interpose).
    pub fn open_storage(
        mut st: Box<dyn Storage>,
        opts: &OpenOptions,
        open_backing: impl FnOnce(&Header) -> Result<Option<Box<dyn DiskFile>>>,
    ) -> Result<Self> {
        let file_len = st.len()?;
        let mut head = vec![0u8; file_len.min(4096) as usize];
        st.read_exact_at(&mut head, 0)?;
        let cluster_bits = Header::peek_cluster_bits(&head)?;
        let cs = 1u64 << cluster_bits;
        let mut first = vec![0u8; file_len.min(cs) as usize];
        st.read_exact_at(&mut first, 0)?;
        let mut header = Header::parse(&first)?;
        let readonly = opts.readonly;
        if !readonly {
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(invalid(
                    FORMAT,
                    "image is marked corrupt; run 'qemu-img check -r all'",
                ));
            }
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(invalid(
                    FORMAT,
                    "image is dirty (lazy refcounts); run 'qemu-img check -r all'",
                ));
            }
        }
        let tables_fit = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        if !tables_fit(header.l1_table_offset, header.l1_size as u64 * 8)
            || !tables_fit(
                header.refcount_table_offset,
                header.refcount_table_clusters as u64 * cs,
            )
        {
            return Err(invalid(
                FORMAT,
                "L1 or refcount table lies beyond the end of the file",
            ));
        }
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        st.read_exact_at(&mut l1_bytes, header.l1_table_offset)?;
        let l1 = table_from_bytes(&l1_bytes);
        let mut l2_set = BTreeSet::new();
        for &e in &l1 {
            let off = e & OFFSET_MASK;
            if !off.is_multiple_of(cs) {
                return Err(invalid(FORMAT, format!("L1 entry {e:#x} unaligned")));
            }
            if off != 0 {
                l2_set.insert(off);
            }
        }
        let rc = Refcounts::load(
            st.as_mut(),
            cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            file_len,
        )?;
        let backing = open_backing(&header)?;
        if !readonly && header.version >= 3 && header.autoclear_features != 0 {
            // Unknown auto-clear features must be cleared by a writer.
            st.write_all_at(&0u64.to_be_bytes(), 88)?;
            st.sync()?;
            header.autoclear_features = 0;
        }
        let l2_cap = ((32u64 << 20) >> cluster_bits).max(4) as usize;
        Ok(Qcow2Disk {
            st,
            header,
            cluster_bits,
            l1,
            l1_dirty: BTreeSet::new(),
            l2_cache: Cache::new(l2_cap),
            l2_set,
            rc,
            backing,
            readonly,
            free_queue: Vec::new(),
            decompressed: Decompressed::default(),
            pending_allocs: HashMap::new(),
            file_len_at_open: file_len,
            prealloc_end: file_len,
            prealloc_failed: false,
            scan_cursor: 0,
            scan_end: file_len >> cluster_bits,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    fn indices(&self, g: u64) -> (usize, usize) {
        let l1i = g >> (self.cluster_bits + self.l2_bits());
        let l2i = (g >> self.cluster_bits) & ((1 << self.l2_bits()) - 1);
        (l1i as usize, l2i as usize)
    }

    /// Whether host cluster at `host` holds metadata.
    fn is_metadata(&self, host: u64) -> bool {
        let cs = self.cs();
        let c = host & !(cs - 1);
        let l1_start = self.header.l1_table_offset & !(cs - 1);
        let l1_end = self.header.l1_table_offset + self.l1.len() as u64 * 8;
        c == 0 || (c >= l1_start && c < l1_end) || self.rc.overlaps(c) || self.l2_set.contains(&c)
    }

    /// Whether host cluster `off` is the header, L1, a refcount structure
    /// or an L2 table the L1 points to (`l1_targets`).
    fn in_use_metadata(&self, off: u64, l1_targets: &HashSet<u64>) -> bool {
        let cs = self.cs();
        let l1_start = self.header.l1_table_offset & !(cs - 1);
        let l1_end = self.header.l1_table_offset + self.l1.len() as u64 * 8;
        off == 0
            || (off >= l1_start && off < l1_end)
            || self.rc.overlaps(off)
            || l1_targets.contains(&off)
    }

    fn evict_l2_if_full(&mut self) -> Result<()> {
        if let Some((victim, dirty)) = self.l2_cache.victim() {
            if dirty {
                // Data and refcounts must be durable before the L2 update.
                self.rc.write_dirty(self.st.as_mut())?;
                self.st.sync()?;
                let t = self.l2_cache.take_dirty(victim).expect("victim cached");
                let bytes = table_to_bytes(t);
                if let Err(e) = self.st.write_all_at(&bytes, victim) {
                    // Not on disk: it stays cached and dirty (see `flush_metadata`).
                    self.l2_cache.get_mut(victim, true);
                    return Err(e.into());
                }
            }
            self.l2_cache.remove(victim);
        }
        Ok(())
    }

    fn load_l2(&mut self, l2_off: u64) -> Result<()> {
        if self.l2_cache.contains(l2_off) {
            return Ok(());
        }
        if !l2_off.is_multiple_of(self.cs()) {
            return Err(invalid(FORMAT, "L2 table offset unaligned"));
        }
        let mut buf = vec![0u8; self.cs() as usize];
        self.st.read_exact_at(&mut buf, l2_off)?;
        self.evict_l2_if_full()?;
        self.l2_cache.insert(l2_off, table_from_bytes(&buf), false);
        Ok(())
    }

    fn lookup_raw(&mut self, g: u64) -> Result<u64> {
        let (l1i, l2i) = self.indices(g);
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| invalid(FORMAT, "L1 index out of range"))?;
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(0);
        }
        self.load_l2(l2_off)?;
        Ok(self.l2_cache.get(l2_off).expect("loaded")[l2i])
    }

    fn lookup(&mut self, g: u64) -> Result<L2Entry> {
        let raw = self.lookup_raw(g)?;
        decode_l2(raw, self.cluster_bits, self.header.version)
    }

    fn read_backing(&mut self, g: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(g).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(g, &mut [IoSliceMut::new(&mut buf[..avail])])?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// The first `need` bytes of the compressed cluster at `host` (`len`
    /// bytes of compressed data at most), decompressed. Only as much as a read
    /// needs is inflated (whole 4 KiB pages): a read early in a cluster costs
    /// less, and a later one of the same cluster inflates the rest.
    fn read_compressed(&mut self, host: u64, len: u64, need: usize) -> Result<&[u8]> {
        let cs = self.cs() as usize;
        let d = &mut self.decompressed;
        if d.host != Some(host) || d.valid < need {
            d.host = None;
            let file_len = self.st.len()?;
            if host >= file_len {
                return Err(invalid(FORMAT, "compressed cluster beyond end of file"));
            }
            let len = len.min(file_len - host);
            d.input.resize(len as usize, 0);
            self.st.read_exact_at(&mut d.input, host)?;
            d.valid = inflate_into(self.header.compression_type, &d.input, &mut d.out, need, cs)?;
            d.host = Some(host);
        }
        Ok(&self.decompressed.out[..need])
    }

    /// Read within one guest cluster.
    fn read_chunk(&mut self, g: u64, buf: &mut [u8]) -> Result<()> {
        let in_off = (g & (self.cs() - 1)) as usize;
        match self.lookup(g)? {
            L2Entry::Unallocated => self.read_backing(g, buf),
            L2Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => Ok(self.st.read_exact_at(buf, host + in_off as u64)?),
            L2Entry::Compressed { host, len } => {
                let data = self.read_compressed(host, len, in_off + buf.len())?;
                buf.copy_from_slice(&data[in_off..]);
                Ok(())
            }
        }
    }

    /// Current content of the guest cluster containing `g` into `buf`.
    fn cluster_content(&mut self, g: u64, entry: L2Entry, buf: &mut [u8]) -> Result<()> {
        let base = g & !(self.cs() - 1);
        match entry {
            L2Entry::Unallocated => self.read_backing(base, buf),
            L2Entry::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            L2Entry::Normal { host, .. } => Ok(self.st.read_exact_at(buf, host)?),
            L2Entry::Compressed { host, len } => {
                let data = self.read_compressed(host, len, buf.len())?;
                buf.copy_from_slice(data);
                Ok(())
            }
        }
    }

    /// Queue the host clusters an entry referenced for release at flush.
    fn queue_free(&mut self, entry: L2Entry) {
        match entry {
            L2Entry::Normal { host, .. } | L2Entry::Zero { host: Some(host) } => {
                self.free_queue.push(host >> self.cluster_bits)
            }
            L2Entry::Compressed { host, len } => {
                let r = table::compressed_clusters(host, len, self.cluster_bits);
                self.free_queue.extend(r);
            }
            _ => {}
        }
    }

    /// Set the L2 entry of guest offset `g`, allocating or copying the L2 table.
    fn set_l2_entry(&mut self, g: u64, value: u64) -> Result<()> {
        let (l1i, l2i) = self.indices(g);
        let l1e = self.l1[l1i];
        let old_off = l1e & OFFSET_MASK;
        let l2_off = if old_off != 0 && l1e & COPIED != 0 {
            self.load_l2(old_off)?;
            old_off
        } else {
            let table = if old_off != 0 {
                self.load_l2(old_off)?;
                self.l2_cache.get(old_off).expect("loaded").clone()
            } else {
                vec![0u64; 1 << self.l2_bits()]
            };
            let new = self.alloc_cluster()?;
            self.st.write_all_at(&table_to_bytes(&table), new)?;
            self.rc.set(self.st.as_mut(), new >> self.cluster_bits, 1)?;
            self.evict_l2_if_full()?;
            self.l2_cache.insert(new, table, false);
            self.l2_set.insert(new);
            self.l1[l1i] = new | COPIED;
            self.l1_dirty.insert(l1i);
            if old_off != 0 {
                self.free_queue.push(old_off >> self.cluster_bits);
            }
            new
        };
        let t = self.l2_cache.get_mut(l2_off, true).expect("loaded");
        t[l2i] = value;
        Ok(())
    }

    /// Write within one guest cluster.
    fn write_chunk(&mut self, g: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs();
        let in_off = g & (cs - 1);
        let entry = self.lookup(g)?;
        if let L2Entry::Normal { host, copied: true } = entry {
            if self.is_metadata(host) || host >= self.rc.next_free {
                return Err(invalid(
                    FORMAT,
                    format!("data cluster {host:#x} overlaps metadata or lies beyond the image"),
                ));
            }
            self.st.write_all_at(data, host + in_off)?;
            return Ok(());
        }
        let new = self.alloc_cluster()?;
        if data.len() as u64 == cs {
            self.st.write_all_at(data, new)?;
        } else {
            let mut buf = vec![0u8; cs as usize];
            self.cluster_content(g, entry, &mut buf)?;
            buf[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
            self.st.write_all_at(&buf, new)?;
        }
        self.rc.set(self.st.as_mut(), new >> self.cluster_bits, 1)?;
        self.set_l2_entry(g, new | COPIED)?;
        self.queue_free(entry);
        Ok(())
    }

    /// Zero (or discard) `[off, off+len)`.
    fn zero_range(&mut self, off: u64, len: u64, discard: bool) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        crate::check_range(off, len, self.size())?;
        let cs = self.cs();
        let mut g = off;
        let end = off + len;
        while g < end {
            let n = (cs - (g & (cs - 1))).min(end - g);
            if n < cs {
                if !discard {
                    let zeros = vec![0u8; n as usize];
                    self.write_chunk(g, &zeros)?;
                }
            } else {
                let entry = self.lookup(g)?;
                let has_backing = self.backing.is_some();
                let already_zero = matches!(entry, L2Entry::Zero { host: None })
                    || (entry == L2Entry::Unallocated && !has_backing);
                if !already_zero {
                    if self.header.version >= 3 {
                        self.set_l2_entry(g, ZERO)?;
                        self.queue_free(entry);
                    } else if !has_backing {
                        self.set_l2_entry(g, 0)?;
                        self.queue_free(entry);
                    } else if !discard {
                        let zeros = vec![0u8; cs as usize];
                        self.write_chunk(g, &zeros)?;
                    }
                }
            }
            g += n;
        }
        Ok(())
    }
}

impl DiskFile for Qcow2Disk {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let size = self.size();
        let cs = self.cs();
        for_each_read(offset, size, bufs, |mut off, buf| {
            let mut done = 0;
            while done < buf.len() {
                let n = ((cs - (off & (cs - 1))) as usize).min(buf.len() - done);
                self.read_chunk(off, &mut buf[done..done + n])?;
                done += n;
                off += n as u64;
            }
            Ok(())
        })
    }

    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        let size = self.size();
        let cs = self.cs();
        for_each_write(offset, size, bufs, |mut off, buf| {
            let mut done = 0;
            while done < buf.len() {
                let n = ((cs - (off & (cs - 1))) as usize).min(buf.len() - done);
                self.write_chunk(off, &buf[done..done + n])?;
                done += n;
                off += n as u64;
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.flush_metadata()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    /// Grows the virtual size as far as the L1 table already reaches (the new clusters read
    /// zero): the metadata made durable, then the header's size field written and synced.
    /// Shrinking, an image with a backing file, and growing past the L1 table are refused.
    fn resize(&mut self, size: u64) -> Result<()> {
        self.grow_to(size)
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn image_type(&self) -> ImageType {
        ImageType::Qcow2
    }

    fn map_host(&mut self, offset: u64, len: u64, write: bool) -> Result<Option<HostMapping>> {
        crate::check_range(offset, len, self.size())?;
        let cs = self.cs();
        let in_off = offset & (cs - 1);
        let Some(fd) = self.st.raw_fd() else {
            return Ok(None);
        };
        // Every cluster of the range allocated, usable for this access, and
        // host-contiguous with the previous one; or, for a read, every
        // cluster unallocated here, so that the backing file has the data.
        let mut first = None;
        let mut unallocated = false;
        let mut g = offset - in_off;
        while g < offset + len {
            let host = match self.lookup(g)? {
                L2Entry::Normal { host, copied }
                    if (copied || !write)
                        && host < self.rc.next_free
                        && !(write && self.is_metadata(host))
                        && !unallocated =>
                {
                    host
                }
                L2Entry::Unallocated if !write && first.is_none() => {
                    unallocated = true;
                    g += cs;
                    continue;
                }
                _ => return Ok(None),
            };
            match first {
                None => first = Some(host),
                Some(h) if host == h + (g - (offset - in_off)) => {}
                Some(_) => return Ok(None),
            }
            g += cs;
        }
        if unallocated {
            // Where the backing file has the range, the ring reads it there (a
            // chain resolves layer by layer). No backing file, or a range past
            // its end: zeroes, which the synchronous path fills.
            return match self.backing.as_mut() {
                Some(b) if offset + len <= b.size() => b.map_host(offset, len, false),
                _ => Ok(None),
            };
        }
        let host = first.expect("len > 0 covers a cluster");
        Ok(Some(HostMapping {
            fd,
            offset: host + in_off,
            direct: self.st.is_direct(),
        }))
    }

    fn alloc_host(&mut self, offset: u64, len: u64) -> Result<Option<HostMapping>> {
        self.alloc_host_inner(offset, len)
    }

    fn alloc_cow(&mut self, offset: u64, len: u64) -> Result<Option<CowPlan>> {
        self.alloc_cow_inner(offset, len)
    }

    fn map_compressed(&mut self, offset: u64, len: u64) -> Result<Option<CompressedRead>> {
        crate::check_range(offset, len, self.size())?;
        let cs = self.cs();
        let in_off = offset & (cs - 1);
        if len == 0 || in_off + len > cs {
            return Ok(None);
        }
        let (host, comp_len) = match self.lookup(offset)? {
            L2Entry::Unallocated => {
                return match self.backing.as_mut() {
                    Some(b) if offset + len <= b.size() => {
                        Ok(b.map_compressed(offset, len)?.map(|p| CompressedRead {
                            layer: p.layer + 1,
                            ..p
                        }))
                    }
                    _ => Ok(None),
                };
            }
            L2Entry::Compressed { host, len } => (host, len),
            _ => return Ok(None),
        };
        // Inflated far enough already: the synchronous path copies it out.
        let d = &self.decompressed;
        if d.host == Some(host) && d.valid as u64 >= in_off + len {
            return Ok(None);
        }
        let Some(fd) = self.st.raw_fd() else {
            return Ok(None);
        };
        let file_len = self.st.len()?;
        if host >= file_len {
            // The synchronous path reports it.
            return Ok(None);
        }
        let comp_len = comp_len.min(file_len - host);
        let direct = self.st.is_direct();
        let a = crate::storage::DIRECT_ALIGN as u64;
        let (start, end) = if direct {
            (host / a * a, (host + comp_len).next_multiple_of(a))
        } else {
            (host, host + comp_len)
        };
        Ok(Some(CompressedRead {
            read: HostMapping {
                fd,
                offset: start,
                direct,
            },
            read_len: end - start,
            layer: 0,
            host,
            comp_len,
            in_off,
            len,
        }))
    }

    fn inflate(&mut self, plan: &CompressedRead, raw: &[u8]) -> Result<&[u8]> {
        if plan.layer > 0 {
            let Some(b) = self.backing.as_mut() else {
                return Err(invalid(
                    FORMAT,
                    "compressed read for a missing backing file",
                ));
            };
            let p = CompressedRead {
                layer: plan.layer - 1,
                ..*plan
            };
            return b.inflate(&p, raw);
        }
        let skip = plan.host.checked_sub(plan.read.offset);
        let input = skip
            .and_then(|s| raw.get(s as usize..(s + plan.comp_len) as usize))
            .ok_or_else(|| invalid(FORMAT, "compressed cluster read short"))?;
        let (in_off, need) = (plan.in_off as usize, (plan.in_off + plan.len) as usize);
        let cs = self.cs() as usize;
        if need > cs {
            return Err(invalid(FORMAT, "compressed read past its cluster"));
        }
        let d = &mut self.decompressed;
        d.host = None;
        d.valid = inflate_into(self.header.compression_type, input, &mut d.out, need, cs)?;
        d.host = Some(plan.host);
        Ok(&d.out[in_off..need])
    }

    fn alloc_pending(&self, offset: u64, len: u64) -> bool {
        let cs = self.cs();
        let (start, end) = (offset & !(cs - 1), offset.saturating_add(len));
        self.pending_allocs
            .values()
            .any(|&(o, l)| o < end && start < o + l)
    }

    fn commit_alloc(&mut self, offset: u64, len: u64, host: u64) -> Result<()> {
        self.commit_alloc_inner(offset, len, host)
    }

    fn abort_alloc(&mut self, offset: u64, len: u64, host: u64) {
        // The reserved clusters were never referenced nor counted: they can
        // be handed out again.
        if self.pending_allocs.get(&host) == Some(&(offset, len)) {
            self.pending_allocs.remove(&host);
            let cs = self.cs();
            for i in 0..len / cs {
                self.rc.release((host >> self.cluster_bits) + i);
            }
        }
    }
}

/// Clusters examined per allocation when searching for free ones.
const SCAN_BUDGET: u64 = 1 << 16;

/// How far ahead of the allocation point the file is preallocated.
const PREALLOC_CHUNK: u64 = 16 << 20;

/// Largest range [`DiskFile::alloc_host`] reserves in one piece.
const MAX_ALLOC_BYTES: u64 = 4 << 20;

impl Qcow2Disk {
    /// Reserve host clusters for a write covering whole, not in-place
    /// writable guest clusters (see [`DiskFile::alloc_host`]).
    fn alloc_host_inner(&mut self, offset: u64, len: u64) -> Result<Option<HostMapping>> {
        crate::check_range(offset, len, self.size())?;
        let cs = self.cs();
        if self.readonly
            || len == 0
            || len > MAX_ALLOC_BYTES
            || !offset.is_multiple_of(cs)
            || !len.is_multiple_of(cs)
        {
            return Ok(None);
        }
        let Some(fd) = self.st.raw_fd() else {
            return Ok(None);
        };
        let mut g = offset;
        while g < offset + len {
            // In-place writable clusters stay where they are (map_host).
            if let L2Entry::Normal { copied: true, .. } = self.lookup(g)? {
                return Ok(None);
            }
            g += cs;
        }
        self.reserve(offset, len, fd).map(Some)
    }

    /// Fresh host space for the whole clusters `[offset, offset+len)`, pending
    /// until committed or aborted.
    fn reserve(&mut self, offset: u64, len: u64, fd: RawFd) -> Result<HostMapping> {
        let cs = self.cs();
        let host = if len == cs {
            self.alloc_cluster()?
        } else {
            self.rc.reserve(len / cs)?
        };
        self.ensure_preallocated(host + len);
        self.pending_allocs.insert(host, (offset, len));
        Ok(HostMapping {
            fd,
            offset: host,
            direct: self.st.is_direct(),
        })
    }

    /// `alloc_cow`: for clusters this image has not written (their content is
    /// the backing file's, or zeroes) or that read as zeroes. Clusters with
    /// data of their own here (in place, shared or compressed) go the
    /// synchronous way.
    fn alloc_cow_inner(&mut self, offset: u64, len: u64) -> Result<Option<CowPlan>> {
        crate::check_range(offset, len, self.size())?;
        let cs = self.cs();
        let start = offset & !(cs - 1);
        let Some(end) = (offset + len).checked_next_multiple_of(cs) else {
            return Ok(None);
        };
        if self.readonly
            || len == 0
            || (start == offset && end == offset + len)
            || end > self.size()
            || end - start > MAX_ALLOC_BYTES
            || self.alloc_pending(start, end - start)
        {
            return Ok(None);
        }
        let (mut unallocated, mut zero) = (false, false);
        let mut g = start;
        while g < end {
            match self.lookup(g)? {
                L2Entry::Unallocated => unallocated = true,
                L2Entry::Zero { .. } => zero = true,
                _ => return Ok(None),
            }
            g += cs;
        }
        let source = match self.backing.as_mut() {
            Some(b) if unallocated => {
                // The backing file's content, all of it readable in one piece.
                if zero || end > b.size() {
                    return Ok(None);
                }
                match b.map_host(start, end - start, false)? {
                    Some(m) => Some(m),
                    None => return Ok(None),
                }
            }
            _ => None,
        };
        let Some(fd) = self.st.raw_fd() else {
            return Ok(None);
        };
        let target = self.reserve(start, end - start, fd)?;
        Ok(Some(CowPlan {
            start,
            len: end - start,
            target,
            source,
        }))
    }

    /// One cluster for new data or an L2 table: a freed one if any, else a
    /// free one found in the part of the file that existed at open, else
    /// appended.
    fn alloc_cluster(&mut self) -> Result<u64> {
        if self.rc.free_count() == 0 && self.scan_cursor < self.scan_end {
            self.scan_free()?;
        }
        self.rc.reserve(1)
    }

    /// Look at up to [`SCAN_BUDGET`] more clusters of the file as it was at
    /// open for a refcount of zero. A zero on disk means no durable table
    /// references the cluster (refcounts are written before the tables that
    /// use them, decremented only after); in memory it is also zero for
    /// reservations not committed yet, which are skipped. The cursor only
    /// moves forward, so a cluster handed out is never found again.
    fn scan_free(&mut self) -> Result<()> {
        let mut budget = SCAN_BUDGET;
        let mut found = 0;
        while self.scan_cursor < self.scan_end && budget > 0 && found < 64 {
            let c = self.scan_cursor;
            self.scan_cursor += 1;
            budget -= 1;
            if self.rc.get(self.st.as_mut(), c)? != 0 {
                continue;
            }
            let off = c << self.cluster_bits;
            let pending = self
                .pending_allocs
                .iter()
                .any(|(&h, &(_, len))| off >= h && off < h + len);
            if pending || self.is_metadata(off) {
                continue;
            }
            self.rc.release(c);
            found += 1;
        }
        Ok(())
    }

    /// Make sure the file is allocated up to `end`, growing it in chunks
    /// ahead of need: writes into it through io_uring then stay inline
    /// instead of being serialised in a kernel worker. Best effort. The
    /// unused tail is cut off again on close (a crash leaves at most one
    /// chunk of unreferenced, unaccounted space at the end).
    fn ensure_preallocated(&mut self, end: u64) {
        if end <= self.prealloc_end || self.prealloc_failed {
            return;
        }
        // Below prealloc_end is the original file or space allocated
        // before; fallocate leaves data already there untouched.
        let from = self.prealloc_end;
        let target = end + PREALLOC_CHUNK;
        match self.st.preallocate(from, target - from) {
            Ok(true) => self.prealloc_end = target,
            Ok(false) => self.prealloc_failed = true,
            Err(e) => {
                log::debug!("qcow2: preallocation failed: {e}");
                self.prealloc_failed = true;
            }
        }
    }

    fn commit_alloc_inner(&mut self, offset: u64, len: u64, host: u64) -> Result<()> {
        if self.pending_allocs.get(&host) != Some(&(offset, len)) {
            return Err(Error::InvalidArgument(format!(
                "qcow2: no pending allocation of {len} bytes at {offset:#x} (host {host:#x})"
            )));
        }
        self.pending_allocs.remove(&host);
        let cs = self.cs();
        let mut i = 0;
        while i < len {
            let (g, h) = (offset + i, host + i);
            // The entry as it is now: an overlapping write may have changed
            // it since alloc_host; the last one to complete wins.
            let old = self.lookup(g)?;
            // Data first (done), then its refcount, then the table entry:
            // flush makes the refcount durable before the L2 table.
            self.rc.set(self.st.as_mut(), h >> self.cluster_bits, 1)?;
            self.set_l2_entry(g, h | COPIED)?;
            self.queue_free(old);
            i += cs;
        }
        Ok(())
    }
}

impl Drop for Qcow2Disk {
    fn drop(&mut self) {
        if !self.readonly {
            if let Err(e) = self.flush_metadata() {
                log::error!("qcow2: flushing metadata on close failed: {e}");
                return;
            }
            // Cut off the preallocated tail nothing was allocated in.
            let used = self.rc.next_free.max(self.file_len_at_open);
            if self.prealloc_end > used {
                if let Err(e) = self.st.set_len(used).and_then(|_| self.st.sync()) {
                    log::warn!("qcow2: trimming preallocated space failed: {e}");
                }
            }
        }
    }
}
