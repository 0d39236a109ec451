//! `vm.restore`, the reading half: a snapshot directory (see `snapshot`) checked and read back,
//! and guest RAM brought back from its `memory-ranges` file in one of the three restore modes:
//! copied into fresh RAM, mapped copy-on-write, or loaded on demand (`uffd`).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use vm_config::MemoryRestoreMode;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend};

use crate::config::{MemoryConfig, VmConfig};
use crate::memory;
use crate::restore_copy::{self, Extent};
use crate::snapshot::{
    self, Cause, MemoryRange, SnapshotError, VmSnapshot, SNAPSHOT_CONFIG_FILE,
    SNAPSHOT_MEMORY_FILE, SNAPSHOT_STATE_FILE, VM_SNAPSHOT_VERSION,
};
use crate::uffd::OnDemand;

/// A snapshot directory, read and checked: its configuration, its state, and its memory file
/// (which holds exactly the bytes of the ranges the state lists).
pub struct Source {
    pub dir: PathBuf,
    pub config: VmConfig,
    pub state: VmSnapshot,
    pub memory: File,
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, SnapshotError> {
    let mut file = File::open(path)
        .map_err(Cause::io(format!(
            "Error opening {what} snapshot file {path:?}"
        )))
        .map_err(SnapshotError::receive)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .map_err(Cause::io(format!(
            "Error reading {what} snapshot file {path:?}"
        )))
        .map_err(SnapshotError::receive)?;
    Ok(bytes)
}

/// The cause for a serde error, as the original words it (its message, then serde's).
fn deserialising(what: &str, e: serde_json::Error) -> Cause {
    Cause::io(format!("Error deserialising {what} snapshot"))(std::io::Error::other(e.to_string()))
}

/// Reads the snapshot at `url` (`file:///dir`). Refuses, with the original's error chain where
/// it has one: a missing directory or file, a file that is not JSON of the right shape, a
/// state of another version, and a memory file whose size is not what the state lists.
pub fn open(url: &str) -> Result<Source, SnapshotError> {
    let dir = snapshot::url_to_path(url).map_err(SnapshotError::Restore)?;
    let bytes = read_file(&dir.join(SNAPSHOT_CONFIG_FILE), "VM config")?;
    let config: VmConfig = serde_json::from_slice(&bytes)
        .map_err(|e| SnapshotError::receive(deserialising("VM config", e)))?;
    let bytes = read_file(&dir.join(SNAPSHOT_STATE_FILE), "VM state")?;
    // The version first: a state of another version may not even have this one's shape.
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| SnapshotError::receive(deserialising("VM state", e)))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(VM_SNAPSHOT_VERSION) => {}
        found => {
            return Err(SnapshotError::restore(Cause::new(format!(
                "the snapshot's state is of version {}; this build restores version \
                 {VM_SNAPSHOT_VERSION}",
                found.map_or("(none)".to_string(), |v| v.to_string())
            ))))
        }
    }
    let mut state: VmSnapshot = serde_json::from_value(value)
        .map_err(|e| SnapshotError::receive(deserialising("VM state", e)))?;
    state.rename_old_ids();
    let mem_path = dir.join(SNAPSHOT_MEMORY_FILE);
    let memory = File::open(&mem_path)
        .map_err(Cause::io(format!(
            "Error opening memory snapshot file {mem_path:?}"
        )))
        .map_err(SnapshotError::receive)?;
    let len = memory
        .metadata()
        .map_err(Cause::io(format!(
            "Error reading memory snapshot file {mem_path:?}"
        )))
        .map_err(SnapshotError::receive)?
        .len();
    let listed: u64 = state.memory_ranges.iter().map(|r| r.length).sum();
    if len != listed {
        return Err(SnapshotError::restore(Cause::new(format!(
            "{mem_path:?} holds {len} bytes, the state lists {listed} bytes of RAM"
        ))));
    }
    Ok(Source {
        dir,
        config,
        state,
        memory,
    })
}

/// Checks that the state's RAM ranges are the ones the configuration lays out (the state and
/// the configuration belong together), and gives each range's offset in the memory file.
pub fn file_offsets(
    state: &VmSnapshot,
    cfg: &MemoryConfig,
) -> Result<Vec<(MemoryRange, u64)>, Cause> {
    let expected: Vec<MemoryRange> = memory::regions(cfg)
        .into_iter()
        .map(|(start, length)| MemoryRange {
            gpa: start.0,
            length,
        })
        .collect();
    if state.memory_ranges != expected {
        return Err(Cause::new(format!(
            "the state's RAM ranges {:?} are not those of the configuration's {} bytes of \
             memory {:?}",
            state.memory_ranges,
            cfg.ram_size(),
            expected
        )));
    }
    let mut offset = 0u64;
    Ok(expected
        .into_iter()
        .map(|r| {
            let at = offset;
            offset += r.length;
            (r, at)
        })
        .collect())
}

/// Guest RAM restored from `src`, and the on-demand loader that serves it where the mode has
/// one (it must live as long as the memory).
pub fn load_memory(
    src: &Source,
    cfg: &MemoryConfig,
    mode: MemoryRestoreMode,
    prefault: bool,
) -> Result<(GuestMemoryMmap, Option<OnDemand>), Cause> {
    let ranges = file_offsets(&src.state, cfg)?;
    match mode {
        MemoryRestoreMode::Copy => copy(src, cfg, prefault, &ranges).map(|m| (m, None)),
        MemoryRestoreMode::CopyOnWrite => {
            copy_on_write(src, cfg, prefault, &ranges).map(|m| (m, None))
        }
        MemoryRestoreMode::OnDemand => {
            if cfg.any_hugepages() {
                return Err(Cause::new(
                    "memory_restore_mode=ondemand cannot serve hugepages=on memory (the pages \
                     are loaded 4 KiB at a time); use copy",
                ));
            }
            if let Some(z) = cfg.zones.iter().flatten().find(|z| z.file.is_some()) {
                return Err(Cause::new(format!(
                    "memory_restore_mode=ondemand cannot serve memory zone {} (file=): \
                     userfaultfd serves anonymous and memfd memory only; use copy",
                    z.id
                )));
            }
            let mem = memory::create_guest_memory(cfg).map_err(|e| Cause::new(e.to_string()))?;
            let loader = OnDemand::start(&mem, &src.memory, &ranges)?;
            Ok((mem, Some(loader)))
        }
    }
}

/// Fresh guest RAM (as the configuration asks for it: anonymous, memfd, huge pages) with the
/// file's data read into it, by several threads (`restore_copy`). `prefault`: the RAM is
/// populated as it is mapped, so the read does not fault page by page.
fn copy(
    src: &Source,
    cfg: &MemoryConfig,
    prefault: bool,
    ranges: &[(MemoryRange, u64)],
) -> Result<GuestMemoryMmap, Cause> {
    let mut cfg = cfg.clone();
    cfg.prefault |= prefault;
    for z in cfg.zones.iter_mut().flatten() {
        z.prefault |= prefault;
    }
    let mem = memory::create_guest_memory(&cfg).map_err(|e| Cause::new(e.to_string()))?;
    let mut extents = Vec::new();
    for (r, offset) in ranges {
        // Fresh RAM is zeros: only the file's data is read, its holes (pages the guest never
        // used) are left alone, so they take no host memory.
        let data = data_extents(&src.memory, *offset, r.length).map_err(Cause::io(format!(
            "Error reading memory snapshot region at {:#x}",
            r.gpa
        )))?;
        extents.extend(data.into_iter().map(|(at, len)| Extent {
            gpa: r.gpa + (at - offset),
            offset: at,
            len,
        }));
    }
    let threads = restore_copy::read_extents(&mem, &src.memory, &extents)?;
    log::debug!(
        "copy restore: {} extents read by {threads} threads",
        extents.len()
    );
    Ok(mem)
}

/// The parts of `file` between `start` and `start + len` that hold data, as (offset, length):
/// the whole range where the file system cannot say (no SEEK_DATA).
pub fn data_extents(file: &File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let end = start + len;
    let seek = |from: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(from).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an open descriptor; it only moves the file position.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error() {
            // No data at or after `from`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(start, len)]),
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
}

/// Guest RAM as private mappings of the memory file: nothing is read up front, pages come from
/// the page cache on first touch and are copied only when written, so every VM restored this
/// way from one snapshot shares the pages it has not written.
fn copy_on_write(
    src: &Source,
    cfg: &MemoryConfig,
    prefault: bool,
    ranges: &[(MemoryRange, u64)],
) -> Result<GuestMemoryMmap, Cause> {
    if cfg.any_shared() {
        return Err(Cause::new(
            "memory_restore_mode=copyonwrite cannot serve shared=on memory: guest writes must \
             reach a file other processes map, and a private mapping keeps them; use copy or \
             ondemand",
        ));
    }
    if cfg.any_hugepages() {
        return Err(Cause::new(
            "memory_restore_mode=copyonwrite cannot serve hugepages=on memory: the snapshot's \
             memory file is not on hugetlbfs; use copy",
        ));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for (r, offset) in ranges {
        let file = src
            .memory
            .try_clone()
            .map_err(Cause::io("cannot duplicate the memory snapshot file"))?;
        let mut flags = libc::MAP_PRIVATE;
        if !cfg.reserve {
            flags |= libc::MAP_NORESERVE;
        }
        if prefault || cfg.prefault {
            flags |= libc::MAP_POPULATE;
        }
        let region = guest_memory::region_builder(r.length as usize)
            .with_file_offset(FileOffset::new(file, *offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| Cause::new(format!("cannot map the memory snapshot file: {e}")))?;
        memory::advise_restored(region.as_ptr(), r.length, cfg);
        regions.push(
            GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or_else(|| Cause::new(format!("region at {:#x} overflows", r.gpa)))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Cause::new(e.to_string()))?;
    crate::memory_zones::bind_all(&mem, cfg).map_err(|e| Cause::new(e.to_string()))?;
    Ok(mem)
}

/// Guest RAM as shared mappings of the memory files a local migration's source sent, one per
/// region in layout order (the source's own RAM: the same pages).
pub fn map_memory_files(cfg: &MemoryConfig, files: Vec<File>) -> Result<GuestMemoryMmap, Cause> {
    let layout = crate::memory_zones::layout(cfg);
    if files.len() != layout.len() {
        return Err(Cause::new(format!(
            "{} memory files for {} RAM regions",
            files.len(),
            layout.len()
        )));
    }
    let mut regions = Vec::with_capacity(layout.len());
    for (spec, file) in layout.into_iter().zip(files) {
        let (start, size) = (spec.start, spec.size);
        // A zone's own file holds the region at the offset the layout gives; a memfd at 0.
        let offset = spec.file.as_ref().map_or(0, |f| f.1);
        let len = file
            .metadata()
            .map_err(Cause::io("cannot read a memory file's size"))?
            .len();
        if len < offset + size {
            return Err(Cause::new(format!(
                "the memory file for {:#x} holds {len} bytes, the region {size} from {offset}",
                start.0
            )));
        }
        let mut flags = libc::MAP_SHARED;
        if !spec.backing.reserve {
            flags |= libc::MAP_NORESERVE;
        }
        let region = guest_memory::region_builder(size as usize)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(spec.backing.hugepages)
            .build()
            .map_err(|e| Cause::new(format!("cannot map a memory file: {e}")))?;
        memory::advise_restored(region.as_ptr(), size, cfg);
        regions.push(
            GuestRegionMmap::new(region, start)
                .ok_or_else(|| Cause::new(format!("region at {:#x} overflows", start.0)))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| Cause::new(e.to_string()))?;
    crate::memory_zones::bind_all(&mem, cfg).map_err(|e| Cause::new(e.to_string()))?;
    Ok(mem)
}

/// Whether a region's pages are the file's own (a shared mapping), so the file can stand for
/// them (a snapshot can `sendfile` from it).
pub fn region_is_file(region: &GuestRegionMmap) -> bool {
    region.file_offset().is_some() && region.flags() & libc::MAP_SHARED != 0
}

#[allow(unused_imports)]
use GuestMemoryBackend as _;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// A file with data at 8 KiB and from 1 MiB + 4 KiB to 1 MiB + 12 KiB, holes elsewhere,
    /// 4 MiB long.
    fn sparse_file() -> File {
        let f = crate::restore_copy::tests::temp_file(4 << 20);
        f.write_all_at(&[1u8; 4096], 8192).unwrap();
        f.write_all_at(&[2u8; 8192], (1 << 20) + 4096).unwrap();
        f
    }

    #[test]
    fn data_extents_skip_the_holes() {
        let f = sparse_file();
        let all = data_extents(&f, 0, 4 << 20).unwrap();
        // A file system may round extents to its blocks; the data is inside them and the big
        // holes are not.
        let covered: u64 = all.iter().map(|&(_, len)| len).sum();
        assert!(covered < 1 << 20, "{all:x?}");
        for want in [8192u64, (1 << 20) + 4096, (1 << 20) + 8192] {
            assert!(
                all.iter().any(|&(at, len)| at <= want && want < at + len),
                "{want:#x} not in {all:x?}"
            );
        }
        // A window: only what lies inside it.
        let part = data_extents(&f, 1 << 20, 1 << 20).unwrap();
        assert!(part
            .iter()
            .all(|&(at, len)| at >= 1 << 20 && at + len <= 2 << 20));
        assert!(!part.is_empty());
        assert!(data_extents(&f, 2 << 20, 2 << 20).unwrap().is_empty());
    }
}
