// Copyright 2026 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Flat VMDK images, as the original takes them (`image_type=vmdk`): a text descriptor
//! (`# Disk DescriptorFile`) whose extent lines name the files holding the disk's bytes as
//! they are (`monolithicFlat`: one file; `twoGbMaxExtentFlat`: one per 2 GiB; `vmfs`), plus
//! `ZERO` extents that read as zeroes. Sparse and differencing VMDKs (grain tables, a parent)
//! are refused by name.
//!
//! Extent files are taken relative to the descriptor's folder and must stay in it (no
//! absolute path, no `..`): a descriptor cannot make the VMM open any other file. Each is
//! opened and locked as the descriptor is.

use std::io::{IoSlice, IoSliceMut};
use std::path::{Component, Path};

use crate::storage::{self, FileStorage, Storage};
use crate::{DiskFile, Error, HostMapping, ImageType, OpenOptions, Result};

const FORMAT: &str = "vmdk";
/// What a descriptor starts with.
pub const DESCRIPTOR_MAGIC: &[u8] = b"# Disk DescriptorFile";
/// A sparse extent's header magic ("KDMV").
pub const SPARSE_MAGIC: &[u8] = b"KDMV";
const SECTOR: u64 = 512;
/// Largest descriptor read (they are a few hundred bytes).
pub const MAX_DESCRIPTOR: u64 = 64 << 10;
/// Most extents taken.
const MAX_EXTENTS: usize = 1024;

/// How an extent may be accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`: writes fail.
    ReadOnly,
    /// `NOACCESS`: reads and writes fail.
    NoAccess,
}

/// One extent line: `<access> <sectors> <type> ["<file>" [<offset in sectors>]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// How it may be accessed.
    pub access: Access,
    /// Its length in 512-byte sectors.
    pub sectors: u64,
    /// Its file (relative to the descriptor's folder); `None`: a ZERO extent.
    pub file: Option<String>,
    /// Where the extent starts in its file, in sectors.
    pub offset_sectors: u64,
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::Invalid {
        format: FORMAT,
        reason: reason.into(),
    }
}

fn unsupported(reason: impl Into<String>) -> Error {
    Error::Unsupported {
        format: FORMAT,
        reason: reason.into(),
    }
}

/// Reads a descriptor's extents (in disk order), refusing what is not a flat VMDK. The text
/// ends at its first NUL (qemu-img pads descriptors with zeroes).
pub fn parse_descriptor(text: &[u8]) -> Result<Vec<ExtentLine>> {
    if !text.starts_with(DESCRIPTOR_MAGIC) {
        return Err(invalid("no '# Disk DescriptorFile' header"));
    }
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    let text = std::str::from_utf8(text).map_err(|_| invalid("the descriptor is not UTF-8"))?;
    let mut extents = Vec::new();
    let mut total = 0u64;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let (key, value) = (key.trim(), value.trim().trim_matches('"'));
            match key {
                "createType" => match value {
                    "monolithicFlat" | "twoGbMaxExtentFlat" | "vmfs" | "vmfsRaw" => {}
                    t => {
                        return Err(unsupported(format!(
                            "createType \"{t}\" (only flat images)"
                        )))
                    }
                },
                "parentCID" if !value.eq_ignore_ascii_case("ffffffff") => {
                    return Err(unsupported("a differencing image (it has a parent)"))
                }
                _ => {}
            }
            continue;
        }
        extents.push(extent_line(line)?);
        if extents.len() > MAX_EXTENTS {
            return Err(invalid(format!("more than {MAX_EXTENTS} extents")));
        }
        let last = &extents[extents.len() - 1];
        total = total
            .checked_add(last.sectors)
            .filter(|t| t.checked_mul(SECTOR).is_some())
            .ok_or_else(|| invalid("the extents add up past 2^64 bytes"))?;
    }
    if extents.is_empty() {
        return Err(invalid("no extent"));
    }
    Ok(extents)
}

fn extent_line(line: &str) -> Result<ExtentLine> {
    let bad = || invalid(format!("extent line {line:?}"));
    // The file name is quoted and may hold spaces.
    let (head, file, tail) = match (line.find('"'), line.rfind('"')) {
        (Some(a), Some(b)) if b > a => (&line[..a], Some(&line[a + 1..b]), &line[b + 1..]),
        (None, None) => (line, None, ""),
        _ => return Err(bad()),
    };
    let words: Vec<&str> = head.split_whitespace().collect();
    let [access, sectors, kind] = words[..] else {
        return Err(bad());
    };
    let access = match access {
        "RW" => Access::ReadWrite,
        "RDONLY" => Access::ReadOnly,
        "NOACCESS" => Access::NoAccess,
        _ => return Err(bad()),
    };
    let sectors: u64 = sectors.parse().map_err(|_| bad())?;
    let offset_sectors = match tail.split_whitespace().collect::<Vec<_>>()[..] {
        [] => 0,
        [o] => o.parse().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    match (kind, file) {
        ("FLAT" | "VMFS" | "VMFSRAW", Some(f)) if !f.is_empty() => Ok(ExtentLine {
            access,
            sectors,
            file: Some(f.to_string()),
            offset_sectors,
        }),
        ("ZERO", None) => Ok(ExtentLine {
            access,
            sectors,
            file: None,
            offset_sectors: 0,
        }),
        ("SPARSE" | "VMFSSPARSE" | "SESPARSE", _) => {
            Err(unsupported(format!("{kind} extents (only flat images)")))
        }
        _ => Err(bad()),
    }
}

/// `name` as a path inside `dir`: relative, no `..`, no root.
fn inside(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let p = Path::new(name);
    let mut parts = p.components().peekable();
    if parts.peek().is_some() && parts.all(|c| matches!(c, Component::Normal(_))) {
        Ok(dir.join(p))
    } else {
        Err(invalid(format!(
            "extent file {name:?} is not a file name in the descriptor's folder"
        )))
    }
}

struct Extent {
    access: Access,
    /// Where it starts in the disk, and its bytes.
    start: u64,
    len: u64,
    /// Its file and the byte offset of the extent in it; `None` for ZERO.
    file: Option<(FileStorage, u64)>,
}

/// A flat VMDK.
pub struct VmdkDisk {
    extents: Vec<Extent>,
    size: u64,
    readonly: bool,
}

impl VmdkDisk {
    /// Opens the extents the descriptor at `path` (open as `descriptor`) names.
    pub fn open(descriptor: std::fs::File, path: &Path, opts: &OpenOptions) -> Result<Self> {
        use std::io::Read;
        let mut text = Vec::new();
        (&descriptor)
            .take(MAX_DESCRIPTOR + 1)
            .read_to_end(&mut text)?;
        if text.len() as u64 > MAX_DESCRIPTOR {
            return Err(invalid(format!(
                "a descriptor larger than {MAX_DESCRIPTOR} bytes"
            )));
        }
        if text.starts_with(SPARSE_MAGIC) {
            return Err(unsupported(
                "a sparse (monolithicSparse or streamOptimized) image (only flat images)",
            ));
        }
        let lines = parse_descriptor(&text)?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        // Each file once (extents may come back to a file at a later offset): writable when an
        // RW extent uses it, its extents sharing one open file description (and one lock).
        let mut files = std::collections::BTreeMap::new();
        for l in lines.iter().filter(|l| l.access != Access::NoAccess) {
            let Some(name) = l.file.as_deref() else {
                continue;
            };
            if files.contains_key(name) {
                continue;
            }
            let writable = lines
                .iter()
                .any(|o| o.file.as_deref() == Some(name) && o.access == Access::ReadWrite);
            let extent_opts = OpenOptions {
                readonly: opts.readonly || !writable,
                ..opts.clone()
            };
            files.insert(name, crate::open_file(&inside(dir, name)?, &extent_opts)?);
        }
        let mut extents = Vec::with_capacity(lines.len());
        let mut start = 0u64;
        for l in &lines {
            let len = l.sectors * SECTOR;
            let file = match &l.file {
                None => None,
                Some(_) if l.access == Access::NoAccess => None,
                Some(name) => {
                    let f = files
                        .get(name.as_str())
                        .ok_or_else(|| invalid(format!("extent {name:?} not opened")))?
                        .try_clone()?;
                    let base = l
                        .offset_sectors
                        .checked_mul(SECTOR)
                        .ok_or_else(|| invalid(format!("extent {name:?}: offset past 2^64")))?;
                    let have = f.metadata()?.len();
                    if base.checked_add(len).is_none_or(|end| end > have) {
                        return Err(invalid(format!(
                            "extent {name:?} ({have} bytes) is shorter than its {len} bytes at \
                             {base}"
                        )));
                    }
                    Some((FileStorage::new(f, opts.direct), base))
                }
            };
            extents.push(Extent {
                access: l.access,
                start,
                len,
                file,
            });
            start += len;
        }
        Ok(VmdkDisk {
            extents,
            size: start,
            readonly: opts.readonly,
        })
    }

    /// The extent holding byte `offset` of the disk.
    fn extent(&mut self, offset: u64) -> Result<&mut Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get_mut(i).ok_or(Error::OutOfRange {
            offset,
            len: 0,
            size: self.size,
        })
    }

    /// Runs `f` over the pieces of `[offset, offset + len)`, one per extent: (extent, offset
    /// in the extent, offset in the request, length).
    fn pieces(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Extent, u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        crate::check_range(offset, len, self.size)?;
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let e = self.extent(at)?;
            let within = at - e.start;
            let n = (e.len - within).min(len - done);
            f(e, within, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }
}

fn no_access() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "a NOACCESS extent of the VMDK",
    ))
}

impl DiskFile for VmdkDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            let len = b.len() as u64;
            self.pieces(off, len, |e, within, at, n| {
                let buf = &mut b[at..at + n];
                match (&mut e.file, e.access) {
                    (_, Access::NoAccess) => Err(no_access()),
                    (None, _) => {
                        buf.fill(0);
                        Ok(())
                    }
                    (Some((st, base)), _) => Ok(st.read_exact_at(buf, *base + within)?),
                }
            })?;
            off += len;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        let mut off = offset;
        for b in bufs {
            let len = b.len() as u64;
            self.pieces(off, len, |e, within, at, n| match (&mut e.file, e.access) {
                (Some((st, base)), Access::ReadWrite) => {
                    Ok(st.write_all_at(&b[at..at + n], *base + within)?)
                }
                (_, Access::NoAccess) => Err(no_access()),
                _ => Err(Error::ReadOnly),
            })?;
            off += len;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        for e in &mut self.extents {
            if let (Some((st, _)), Access::ReadWrite) = (&mut e.file, e.access) {
                st.sync()?;
            }
        }
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        // A hint: the data stays (a flat extent has nothing to give back but holes, and a
        // hole in a shared flat file is the next reader's surprise).
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        crate::check_range(offset, len, self.size)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.readonly {
            return Err(Error::ReadOnly);
        }
        self.pieces(offset, len, |e, within, _, n| {
            match (&mut e.file, e.access) {
                (Some((st, base)), Access::ReadWrite) => {
                    let (file, at) = (st.file(), *base + within);
                    if storage::zero_range(file, at, n as u64).is_ok() {
                        return Ok(());
                    }
                    let zeros = storage::AlignedBuf::new(n.min(1 << 20));
                    let mut done = 0usize;
                    while done < n {
                        let k = (n - done).min(zeros.as_slice().len());
                        st.write_all_at(&zeros.as_slice()[..k], at + done as u64)?;
                        done += k;
                    }
                    Ok(())
                }
                (None, Access::ReadWrite | Access::ReadOnly) => Ok(()),
                (_, Access::NoAccess) => Err(no_access()),
                _ => Err(Error::ReadOnly),
            }
        })
    }

    fn readonly(&self) -> bool {
        self.readonly
    }

    fn image_type(&self) -> ImageType {
        ImageType::Vmdk
    }

    fn map_host(&mut self, offset: u64, len: u64, write: bool) -> Result<Option<HostMapping>> {
        crate::check_range(offset, len, self.size)?;
        let readonly = self.readonly;
        let e = self.extent(offset)?;
        let within = offset - e.start;
        if within + len > e.len || (write && (readonly || e.access != Access::ReadWrite)) {
            return Ok(None);
        }
        Ok(match (&e.file, e.access) {
            (Some((st, base)), Access::ReadWrite | Access::ReadOnly) => {
                st.raw_fd().map(|fd| HostMapping {
                    fd,
                    offset: base + within,
                    direct: st.is_direct(),
                })
            }
            _ => None,
        })
    }
}

#[cfg(test)]
#[path = "vmdk_tests.rs"]
mod tests;
