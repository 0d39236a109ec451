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
    let mut flags = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
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
        advise(region.as_ptr(), size, cfg);
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} overflows", start.0)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

fn advise(addr: *mut u8, size: u64, cfg: &MemoryConfig) {
    // A process the VMM forks (the pty resize watcher) must not share guest memory: with a
    // private mapping every page would turn copy-on-write.
    let mut advice = vec![(libc::MADV_DONTFORK, "MADV_DONTFORK")];
    if cfg.mergeable {
        advice.push((libc::MADV_MERGEABLE, "MADV_MERGEABLE"));
    }
    if cfg.thp && !cfg.hugepages && !cfg.shared {
        advice.push((libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"));
    }
    for (a, name) in advice {
        // SAFETY: `addr..addr+size` is a mapping we just created and own; madvise only
        // changes how the kernel backs it.
        let ret = unsafe { libc::madvise(addr.cast(), size as usize, a) };
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
}
