//! Guest RAM: anonymous (or shared, or huge-page) mappings placed around the 32-bit hole and
//! registered with the hypervisor.

use std::sync::Arc;

use arch::layout;
use hypervisor::Vm;
use log::{debug, warn};
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::config::MemoryConfig;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("--memory hugepages=on: the host has {free} free huge pages of {size} bytes, the guest needs {needed} (see /proc/sys/vm/nr_hugepages)")]
    NoHugepages { size: u64, free: u64, needed: u64 },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest memory regions are invalid: {0}")]
    Regions(String),
    #[error("cannot register guest memory with the hypervisor: {0}")]
    Hypervisor(#[from] hypervisor::HypervisorError),
}

const DEFAULT_HUGEPAGE_SIZE: u64 = 2 << 20;

/// Free huge pages of `size` bytes on the host, from sysfs.
fn free_hugepages(size: u64) -> u64 {
    let path = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        size >> 10
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn create_guest_memory(cfg: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let hugepage_size = cfg.hugepage_size.unwrap_or(DEFAULT_HUGEPAGE_SIZE);
    if cfg.hugepages {
        let needed = cfg.size.div_ceil(hugepage_size);
        let free = free_hugepages(hugepage_size);
        if free < needed {
            return Err(MemoryError::NoHugepages {
                size: hugepage_size,
                free,
                needed,
            });
        }
    }
    // `reserve=on`: the kernel accounts (commits) the whole of guest RAM at the mapping, so it
    // fails up front rather than at a page fault under memory pressure; off (the default, as
    // the original's): no reservation.
    let mut flags = libc::MAP_ANONYMOUS;
    if !cfg.reserve {
        flags |= libc::MAP_NORESERVE;
    }
    flags |= if cfg.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if cfg.hugepages {
        flags |=
            libc::MAP_HUGETLB | ((hugepage_size.trailing_zeros() as i32) << libc::MAP_HUGE_SHIFT);
    }
    if cfg.prefault {
        flags |= libc::MAP_POPULATE;
    }
    let mut regions = Vec::new();
    for (start, size) in layout::ram_regions(cfg.size) {
        let region = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(cfg.hugepages)
            .build()
            .map_err(|source| MemoryError::Mmap { size, source })?;
        advise(region.as_ptr(), size, start.0, cfg);
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// The guest RAM below this address is not advised for transparent huge pages. It holds the
/// boot structures (PVH/zero page, page tables, ACPI and SMBIOS tables), the legacy holes and
/// the first page tables a guest builds; guests map it with 4 KiB pages (the ISA range has its
/// own memory types), so a host huge page there buys no TLB reach, while the few pages a small
/// guest touches would each cost 2 MiB of host memory.
const THP_FLOOR: u64 = 2 << 20;

/// `start` is the guest address the mapping at `addr` backs.
fn advise(addr: *mut u8, size: u64, start: u64, cfg: &MemoryConfig) {
    // A process the VMM forks (the pty resize watcher) must not share guest memory: with a
    // private mapping every page would turn copy-on-write.
    let mut advice = vec![(libc::MADV_DONTFORK, "MADV_DONTFORK", 0)];
    if cfg.mergeable {
        advice.push((libc::MADV_MERGEABLE, "MADV_MERGEABLE", 0));
    }
    if cfg.thp && !cfg.hugepages && !cfg.shared {
        advice.push((
            libc::MADV_HUGEPAGE,
            "MADV_HUGEPAGE",
            THP_FLOOR.saturating_sub(start),
        ));
    }
    for (a, name, skip) in advice {
        if skip >= size {
            continue;
        }
        // SAFETY: `addr+skip..addr+size` lies in a mapping we just created and own (skip is a
        // multiple of the page size); madvise only changes how the kernel backs it.
        let ret =
            unsafe { libc::madvise(addr.add(skip as usize).cast(), (size - skip) as usize, a) };
        if ret != 0 {
            warn!(
                "{name} on guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Registers every region as a KVM memory slot.
pub fn register_memory(vm: &Arc<dyn Vm>, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        debug!(
            "memory slot {slot}: guest {:#x}+{:#x}",
            region.start_addr().0,
            region.len()
        );
        let host = region.as_ptr() as u64;
        // SAFETY: the region stays mapped for as long as the VM exists: `Vm` owns the
        // `GuestMemoryMmap` and drops it only after the hypervisor VM.
        unsafe {
            vm.set_user_memory_region(
                slot as u32,
                region.start_addr().0,
                region.len(),
                host,
                false,
            )?;
        }
    }
    Ok(())
}

/// How much of the guest RAM is resident in host memory (`mincore`).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let page = 4096u64;
    let mut resident = 0;
    for region in mem.iter() {
        let pages = region.len().div_ceil(page) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is a live mapping of `len` bytes; `vec` has one byte per page.
        let ret = unsafe {
            libc::mincore(
                region.as_ptr().cast(),
                region.len() as usize,
                vec.as_mut_ptr(),
            )
        };
        if ret == 0 {
            resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page;
        }
    }
    resident
}

/// Peak resident set size of this process, from /proc (bytes).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// RAM below and above 4 GiB, in bytes.
pub fn ram_split(size: u64) -> (u64, u64) {
    let low = size.min(layout::MEM_32BIT_RESERVED_START.0);
    (low, size - low)
}

/// Lowest guest address past all RAM.
#[allow(dead_code)]
pub fn ram_end(mem: &GuestMemoryMmap) -> GuestAddress {
    mem.last_addr().unchecked_add(1)
}

use vm_memory::Address as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_and_hugepage_errors() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 5 << 30,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert_eq!(ram_end(&mem), GuestAddress(6 << 30));
        assert_eq!(ram_split(5 << 30), (3 << 30, 2 << 30));
        if free_hugepages(1 << 30) == 0 {
            let err = create_guest_memory(&MemoryConfig {
                size: 1 << 30,
                hugepages: true,
                hugepage_size: Some(1 << 30),
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                err.to_string().starts_with("--memory hugepages=on"),
                "{err}"
            );
        }
    }

    /// The flags of the mapping that holds `addr`, from /proc/self/smaps: (start, end, VmFlags).
    fn vma_of(addr: usize) -> (usize, usize, String) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut current = None;
        for line in smaps.lines() {
            let range = line.split(' ').next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    current = Some((a, b));
                    continue;
                }
            }
            if let (Some((a, b)), Some(flags)) = (current, line.strip_prefix("VmFlags:")) {
                if (a..b).contains(&addr) {
                    return (a, b, flags.to_string());
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn thp_spares_the_first_two_mib() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 16 << 20,
            thp: true,
            ..Default::default()
        })
        .unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        // MADV_HUGEPAGE shows as the "hg" flag; the advised range is a mapping of its own.
        let (start, end, flags) = vma_of(base);
        assert_eq!((start, end - start), (base, THP_FLOOR as usize));
        assert!(!flags.contains(" hg"), "{flags}");
        let (start, end, flags) = vma_of(base + THP_FLOOR as usize);
        assert_eq!((start, end), (base + THP_FLOOR as usize, base + (16 << 20)));
        assert!(flags.contains(" hg"), "{flags}");
        let mem = create_guest_memory(&MemoryConfig {
            size: 16 << 20,
            thp: false,
            ..Default::default()
        })
        .unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert!(!vma_of(base + (8 << 20)).2.contains(" hg"));
    }

    /// `reserve=off` (the default) maps guest RAM MAP_NORESERVE ("nr"); `reserve=on` does not.
    #[test]
    fn reserve_commits_guest_ram() {
        for reserve in [false, true] {
            let mem = create_guest_memory(&MemoryConfig {
                size: 16 << 20,
                reserve,
                ..Default::default()
            })
            .unwrap();
            let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let flags = vma_of(base).2;
            assert_eq!(
                flags.contains(" nr"),
                !reserve,
                "reserve={reserve}: {flags}"
            );
        }
    }
}
