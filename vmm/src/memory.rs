//! Guest RAM: private anonymous mappings, or shared mappings of a memory file (`shared=on`,
//! `hugepages=on`) that each region carries, placed around the 32-bit hole and registered
//! with the hypervisor.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use arch::layout;
use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use hypervisor::Vm;
use log::{debug, warn};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::MemoryConfig;
use crate::memory_zones;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("{option} hugepages=on: the host has {free} free huge pages of {size} bytes, the guest needs {needed} (see /proc/sys/vm/nr_hugepages)")]
    NoHugepages {
        option: String,
        size: u64,
        free: u64,
        needed: u64,
    },
    #[error("{option} file={path}: {msg}")]
    ZoneFile {
        option: String,
        path: String,
        msg: String,
    },
    /// A zone's region that could not be made (the zone named first).
    #[error("{option}: {source}")]
    InZone {
        option: String,
        #[source]
        source: Box<MemoryError>,
    },
    #[error("{option} host_numa_node={node}: {msg}")]
    Numa {
        option: String,
        node: u32,
        msg: String,
    },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot create a memory file for {size} bytes of guest memory{}: {source}", hugepages.map(|p| format!(" in huge pages of {p} bytes")).unwrap_or_default())]
    File {
        size: u64,
        hugepages: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory regions are invalid: {0}")]
    Regions(String),
    #[error("cannot register guest memory with the hypervisor: {0}")]
    Hypervisor(#[from] hypervisor::HypervisorError),
}

const DEFAULT_HUGEPAGE_SIZE: u64 = 2 << 20;

#[cfg(test)]
pub fn tests_free_hugepages(size: u64) -> u64 {
    free_hugepages(size)
}

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
    let specs = memory_zones::layout(cfg);
    // Huge pages, by page size, that the boot RAM needs, and the first region asking for them.
    let mut needed: Vec<(u64, u64, String)> = Vec::new();
    for s in specs.iter().filter(|s| s.backing.hugepages && !s.hotplug) {
        let size = s.backing.hugepage_size.unwrap_or(DEFAULT_HUGEPAGE_SIZE);
        match needed.iter_mut().find(|(p, _, _)| *p == size) {
            Some((_, n, _)) => *n += s.size.div_ceil(size),
            None => needed.push((size, s.size.div_ceil(size), s.option())),
        }
    }
    for (size, needed, option) in needed {
        let free = free_hugepages(size);
        if free < needed {
            return Err(MemoryError::NoHugepages {
                option,
                size,
                free,
                needed,
            });
        }
    }
    let mut mapped = Vec::new();
    let mut to_populate = Vec::new();
    for s in &specs {
        let file = memory_zones::open_file(s)?;
        let later = s.backing.prefault && populated_later(&s.backing, file.is_some());
        let region =
            ram_region_with(s.start, s.size, &s.backing, file).map_err(|e| match s.zone {
                Some(_) => MemoryError::InZone {
                    option: s.option(),
                    source: Box::new(e),
                },
                None => e,
            })?;
        if let Some(node) = s.numa {
            memory_zones::bind_to_node(s, region.as_ptr(), node)?;
        }
        if later {
            to_populate.push((region.as_ptr() as usize, s.size));
        }
        mapped.push(region);
    }
    populate(&to_populate);
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// The regions of a VM's guest memory: its RAM (by zone, with zones), then the regions memory
/// can be hot-plugged into (mapped like RAM, so devices reach what the guest plugs; the
/// virtio-mem device says which blocks are plugged, and unplugged ones hold no host pages).
pub fn regions(cfg: &MemoryConfig) -> Vec<(GuestAddress, u64)> {
    memory_zones::layout(cfg)
        .into_iter()
        .map(|s| (s.start, s.size))
        .collect()
}

/// Whether guest RAM is a shared mapping of a memory file (memfd) that the region carries, so
/// another process can map the same pages: `shared=on`, and `hugepages=on` (whose pages a
/// private mapping would not make any more private: hugetlb pages are never merged, swapped
/// or made transparent huge pages, and `MADV_DONTFORK` keeps them out of forks). Otherwise
/// (`shared=off`, the default) guest RAM stays a private anonymous mapping, as the original's:
/// a private mapping of a memfd would not help, since the pages the guest writes become
/// private copies that the file never sees, and it would cost memory (a page the guest reads
/// first is allocated in the file and copied again on the first write) and transparent huge
/// pages (the copies are 4 KiB pages).
fn backed_by_file(cfg: &MemoryConfig) -> bool {
    cfg.shared || cfg.hugepages
}

/// One region of guest RAM at guest address `start`, `size` bytes.
#[cfg(test)]
fn ram_region(
    start: GuestAddress,
    size: u64,
    cfg: &MemoryConfig,
) -> Result<GuestRegionMmap, MemoryError> {
    ram_region_with(start, size, cfg, None)
}

/// One region of guest RAM at guest address `start`, `size` bytes; `file`: a zone's own file
/// backs it (mapped shared with `shared=on`, else private), instead of anonymous memory or
/// a memfd.
fn ram_region_with(
    start: GuestAddress,
    size: u64,
    cfg: &MemoryConfig,
    file: Option<FileOffset>,
) -> Result<GuestRegionMmap, MemoryError> {
    // `reserve=on`: the kernel accounts (commits) the whole of guest RAM at the mapping, so it
    // fails up front rather than at a page fault under memory pressure; off (the default, as
    // the original's): no reservation. A shared memfd is accounted by the file as its pages
    // are allocated (memfd_create never commits), so there `reserve=on` commits nothing for
    // 4 KiB pages, as in the original; huge pages are reserved at the mapping.
    let mut flags = if cfg.reserve { 0 } else { libc::MAP_NORESERVE };
    // Private anonymous RAM is populated by create_guest_memory once advised and bound
    // (populate()); the rest as it is mapped.
    if cfg.prefault && !populated_later(cfg, file.is_some()) {
        flags |= libc::MAP_POPULATE;
    }
    let mut builder = guest_memory::region_builder(size as usize)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_hugetlbfs(cfg.hugepages);
    if let Some(file) = file {
        flags |= if cfg.shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        builder = builder.with_file_offset(file);
    } else if backed_by_file(cfg) {
        flags |= libc::MAP_SHARED;
        builder = builder.with_file_offset(FileOffset::new(memory_file(size, cfg)?, 0));
    } else {
        flags |= libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    }
    let region = builder
        .with_mmap_flags(flags)
        .build()
        .map_err(|source| MemoryError::Mmap { size, source })?;
    advise(region.as_ptr(), size, start.0, cfg);
    GuestRegionMmap::new(region, start)
        .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} overflows", start.0)))
}

/// A memory file (memfd, close-on-exec) of `size` bytes for one region of guest RAM; with
/// `hugepages=on` on hugetlbfs with pages of `hugepage_size`, its size rounded up to whole
/// pages (an anonymous huge page mapping rounds up the same way).
fn memory_file(size: u64, cfg: &MemoryConfig) -> Result<File, MemoryError> {
    let hugepage_size = cfg.hugepage_size.unwrap_or(DEFAULT_HUGEPAGE_SIZE);
    let mut mfd_flags = libc::MFD_CLOEXEC;
    let mut len = size;
    if cfg.hugepages {
        mfd_flags |= libc::MFD_HUGETLB | (hugepage_size.trailing_zeros() << libc::MAP_HUGE_SHIFT);
        len = size.next_multiple_of(hugepage_size);
    }
    let err = |source| MemoryError::File {
        size,
        hugepages: cfg.hugepages.then_some(hugepage_size),
        source,
    };
    // SAFETY: the name is a NUL-terminated string; the fd returned is ours alone.
    let fd = unsafe { libc::memfd_create(c"guest_ram".as_ptr(), mfd_flags) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new file descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).map_err(err)?;
    Ok(file)
}

/// The guest RAM below this address (16 MiB) is not advised for transparent huge pages. It
/// holds the boot structures (PVH/zero page, page tables, ACPI and SMBIOS tables), the legacy
/// holes, firmware and small guests; in a Linux guest, everything below the address its kernel
/// runs at (16 MiB, `CONFIG_PHYSICAL_START`): the real-mode trampoline, the decompressor's
/// copy, then ZONE_DMA, which its page allocator takes from only when the other zones run
/// out. A host huge page there buys a guest little TLB reach, while every 2 MiB range a small
/// guest touches would cost 2 MiB of host memory.
const THP_FLOOR: u64 = 16 << 20;

/// `start` is the guest address the mapping at `addr` backs.
fn advise(addr: *mut u8, size: u64, start: u64, cfg: &MemoryConfig) {
    // A process the VMM forks (the pty resize watcher) must not share guest memory: with a
    // private mapping every page would turn copy-on-write.
    let mut advice = vec![(libc::MADV_DONTFORK, "MADV_DONTFORK", 0)];
    if cfg.mergeable {
        advice.push((libc::MADV_MERGEABLE, "MADV_MERGEABLE", 0));
    }
    if thp_advised(cfg) {
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

/// Whether guest RAM of `cfg` is private anonymous memory advised for transparent huge pages
/// (above [`THP_FLOOR`]).
fn thp_advised(cfg: &MemoryConfig) -> bool {
    cfg.thp && !cfg.hugepages && !cfg.shared
}

/// Whether `prefault=on` RAM of `cfg` is populated after it is mapped, advised and bound to
/// its NUMA node ([`populate`]) rather than with MAP_POPULATE: private anonymous RAM (MAP_POPULATE
/// would fill it before the huge page advice, with 4 KiB pages). File and memfd mappings keep
/// MAP_POPULATE, which reads a file's pages rather than dirtying them.
fn populated_later(cfg: &MemoryConfig, zone_file: bool) -> bool {
    !zone_file && !backed_by_file(cfg)
}

/// Bytes of RAM a thread populates at a time.
const POPULATE_PIECE: u64 = 32 << 20;

/// Makes the `(address, size)` ranges (mappings we own, already advised) resident, as
/// `prefault=on` asks, with a thread per host CPU (`pieces`): MADV_POPULATE_WRITE (Linux 5.14),
/// which faults them in as the advice says (huge pages where advised); on an older kernel, a
/// write to every page. Like MAP_POPULATE, it is best effort: memory the host cannot give now is
/// faulted in later.
fn populate(ranges: &[(usize, u64)]) {
    let parts: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|&(addr, size)| crate::pieces::cut(addr as u64, size, POPULATE_PIECE))
        .collect();
    let count = parts.len();
    let populate_piece = move |i: usize| -> std::io::Result<()> {
        let (addr, size) = (parts[i].0 as *mut u8, parts[i].1 as usize);
        // SAFETY: `addr..addr+size` lies in guest RAM create_guest_memory has just mapped
        // (private anonymous) and owns; it outlives the run, which joins its threads before it
        // returns. Populating only allocates its (zero) pages.
        if unsafe { libc::madvise(addr.cast(), size, libc::MADV_POPULATE_WRITE) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
        for offset in (0..size).step_by(4096) {
            // SAFETY: inside the same mapping, which nothing else uses yet; the page reads as
            // zero and a zero is written back.
            unsafe { std::ptr::write_volatile(addr.add(offset), 0) };
        }
        Ok(())
    };
    if let Err(e) = crate::pieces::run(
        "prefault",
        crate::seccomp_filters::prefault,
        count,
        populate_piece,
        || std::io::Error::other("a prefault thread panicked"),
    ) {
        warn!("prefault: guest memory not populated: {e}");
    }
}

/// Advice for guest RAM mapped from a snapshot's memory file (copy-on-write restore): kept out
/// of forks, mergeable where asked; no transparent huge pages (the file's pages are 4 KiB).
pub fn advise_restored(addr: *mut u8, size: u64, cfg: &MemoryConfig) {
    let cfg = MemoryConfig {
        thp: false,
        ..cfg.clone()
    };
    advise(addr, size, 0, &cfg);
}

/// One KVM memory slot: a range of guest memory and where the VMM maps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSlot {
    pub slot: u32,
    pub gpa: u64,
    pub len: u64,
    pub host: u64,
}

/// The KVM memory slots of `mem`: region `i` is slot `i`, except the region ACPI memory
/// hotplug plugs into (`acpi_hotplug`: its start), of which only the DIMMs plugged (`dimms`,
/// `(gpa, len)` inside it) are slots, numbered after the regions. Everything else of that
/// region is mapped by the VMM but not visible to the guest.
pub fn memory_slots(
    mem: &GuestMemoryMmap,
    acpi_hotplug: Option<u64>,
    dimms: &[(u64, u64)],
) -> Vec<MemSlot> {
    let mut slots = Vec::new();
    let regions = mem.num_regions() as u32;
    for (i, region) in mem.iter().enumerate() {
        let gpa = region.start_addr().0;
        let host = region.as_ptr() as u64;
        if acpi_hotplug == Some(gpa) {
            for (d, &(dgpa, len)) in dimms.iter().enumerate() {
                slots.push(MemSlot {
                    slot: regions + d as u32,
                    gpa: dgpa,
                    len,
                    host: host + (dgpa - gpa),
                });
            }
            continue;
        }
        slots.push(MemSlot {
            slot: i as u32,
            gpa,
            len: region.len(),
            host,
        });
    }
    slots
}

/// Registers `slots` with KVM; `log_dirty`: with KVM's dirty log (a live migration
/// re-registers the slots with it, and without it after).
pub fn register_memory(
    vm: &Arc<dyn Vm>,
    slots: &[MemSlot],
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for s in slots {
        debug!("memory slot {}: guest {:#x}+{:#x}", s.slot, s.gpa, s.len);
        // SAFETY: the slot lies inside a region of guest memory, mapped for as long as the VM
        // exists: `Vm` owns the `GuestMemoryMmap` and drops it only after the hypervisor VM.
        unsafe {
            vm.set_user_memory_region(s.slot, s.gpa, s.len, s.host, log_dirty)?;
        }
    }
    Ok(())
}

/// Reads `len` bytes from `src` into guest RAM at `gpa` (one region), `chunk` bytes at most per
/// read, however the source splits them (a socket's pieces; Linux's cap of 0x7ffff000 bytes per
/// `read`, which a single read of a 2 GiB range would hit).
pub fn read_range<R: vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    src: &mut R,
    chunk: u64,
) -> Result<(), String> {
    use vm_memory::Bytes;
    let mut done = 0u64;
    while done < len {
        let n = mem
            .read_volatile_from(
                GuestAddress(gpa + done),
                src,
                (len - done).min(chunk) as usize,
            )
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("the source ended {} bytes short", len - done));
        }
        done += n as u64;
    }
    Ok(())
}

/// Writes `len` bytes of guest RAM at `gpa` (one region) to `dst`, `chunk` bytes at most per
/// write, however the destination takes them.
pub fn write_range<W: vm_memory::WriteVolatile>(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    dst: &mut W,
    chunk: u64,
) -> Result<(), String> {
    use vm_memory::Bytes;
    let mut done = 0u64;
    while done < len {
        let n = mem
            .write_volatile_to(
                GuestAddress(gpa + done),
                dst,
                (len - done).min(chunk) as usize,
            )
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "the destination took nothing, {} bytes short",
                len - done
            ));
        }
        done += n as u64;
    }
    Ok(())
}

/// How much of the guest RAM is resident in host memory (`mincore`).
/// Which of `region`'s 4 KiB pages hold anything (present in memory or swapped out), from
/// `/proc/self/pagemap`, one bit per page in 64-bit words, page 0 in bit 0 of word 0; `None`
/// where the kernel cannot say. For anonymous private RAM only: a page never present reads as
/// zeros (for a file mapping it is the file's).
pub fn populated_pages(region: &GuestRegionMmap) -> Option<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pages = region.len().div_ceil(4096) as usize;
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let first = (region.as_ptr() as u64 / 4096) * 8;
    let mut words = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; 8 * 8192];
    let mut page = 0usize;
    while page < pages {
        let n = (pages - page).min(8192);
        let bytes = &mut buf[..n * 8];
        pagemap.read_exact_at(bytes, first + page as u64 * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut v = [0u8; 8];
            v.copy_from_slice(e);
            if u64::from_ne_bytes(v) & (PRESENT | SWAPPED) != 0 {
                let p = page + i;
                words[p / 64] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Some(words)
}

pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter_map(resident_pages)
        .map(|words| words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * 4096)
        .sum()
}

/// Which of `region`'s 4 KiB pages the host backs (`mincore`), one bit per page in 64-bit
/// words, page 0 in bit 0 of word 0; `None` where the kernel cannot say.
pub fn resident_pages(region: &GuestRegionMmap) -> Option<Vec<u64>> {
    let pages = region.len().div_ceil(4096) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: the region is a live mapping of `len` bytes; `vec` has one byte per page.
    let ret = unsafe {
        libc::mincore(
            region.as_ptr().cast(),
            region.len() as usize,
            vec.as_mut_ptr(),
        )
    };
    if ret != 0 {
        return None;
    }
    let mut words = vec![0u64; pages.div_ceil(64)];
    for (i, b) in vec.iter().enumerate() {
        if b & 1 != 0 {
            words[i / 64] |= 1 << (i % 64);
        }
    }
    Some(words)
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
mod range_tests {
    use super::*;

    /// A source that gives at most 3000 bytes per read.
    struct Trickle<'a>(&'a [u8]);

    impl vm_memory::ReadVolatile for Trickle<'_> {
        fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
            &mut self,
            buf: &mut vm_memory::VolatileSlice<B>,
        ) -> Result<usize, vm_memory::VolatileMemoryError> {
            let n = buf.len().min(3000).min(self.0.len());
            buf.copy_from(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn populated_pages_are_the_written_ones() {
        let cfg: MemoryConfig = serde_json::from_str(r#"{"size": 1048576}"#).unwrap();
        let mem = create_guest_memory(&cfg).unwrap();
        use vm_memory::Bytes;
        mem.write_obj(1u8, GuestAddress(3 * 4096)).unwrap();
        mem.write_obj(1u8, GuestAddress(100 * 4096 + 17)).unwrap();
        let region = mem.iter().next().unwrap();
        let words = populated_pages(region).unwrap();
        let set: Vec<usize> = (0..256)
            .filter(|&p| words[p / 64] & (1 << (p % 64)) != 0)
            .collect();
        assert_eq!(set, [3, 100]);
    }

    #[test]
    fn ranges_move_whole_through_short_reads_and_chunks() {
        let cfg = MemoryConfig {
            size: 1 << 20,
            ..serde_json::from_str(r#"{"size": 1048576}"#).unwrap()
        };
        let mem = create_guest_memory(&cfg).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        read_range(&mem, 0x1000, data.len() as u64, &mut Trickle(&data), 4096).unwrap();
        let mut out = Vec::new();
        write_range(&mem, 0x1000, data.len() as u64, &mut out, 5000).unwrap();
        assert_eq!(out, data);
        let e = read_range(&mem, 0x1000, 70000, &mut Trickle(&data), 1 << 30).unwrap_err();
        assert!(e.contains("4464 bytes short"), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// RAM regions are slots 0.., a virtio-mem hotplug region one slot more; an ACPI one is
    /// no slot itself, only its DIMMs are, numbered after the regions and mapped at their
    /// offsets in the region.
    #[test]
    fn memory_slots_cover_ram_and_the_plugged_dimms() {
        let cfg = MemoryConfig {
            size: 256 << 20,
            hotplug_size: Some(1 << 30),
            ..MemoryConfig::default()
        };
        let mem = create_guest_memory(&cfg).unwrap();
        let regions: Vec<(u64, u64)> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr() as u64))
            .collect();
        assert_eq!(regions.len(), 2);
        let (hp, hp_host) = regions[1];
        assert_eq!(hp, 4 << 30);
        let all = memory_slots(&mem, None, &[]);
        assert_eq!(
            all.iter()
                .map(|s| (s.slot, s.gpa, s.len))
                .collect::<Vec<_>>(),
            vec![(0, 0, 256 << 20), (1, 4 << 30, 1 << 30)]
        );
        assert_eq!(
            memory_slots(&mem, Some(hp), &[]).len(),
            1,
            "nothing plugged"
        );
        let dimms = [(hp, 128 << 20), (hp + (128 << 20), 256 << 20)];
        let slots = memory_slots(&mem, Some(hp), &dimms);
        assert_eq!(
            slots[1..],
            [
                MemSlot {
                    slot: 2,
                    gpa: hp,
                    len: 128 << 20,
                    host: hp_host,
                },
                MemSlot {
                    slot: 3,
                    gpa: hp + (128 << 20),
                    len: 256 << 20,
                    host: hp_host + (128 << 20),
                },
            ]
        );
    }

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

    /// Every region of guest RAM, private or shared, has a dirty bitmap covering all of it
    /// (not `MmapRegionBuilder::new`'s empty default), and a VMM write through vm-memory marks
    /// exactly its page there (live migration reads these with KVM's dirty log).
    #[test]
    fn guest_ram_marks_the_vmm_writes() {
        use vm_memory::Bytes;
        for shared in [false, true] {
            let mem = create_guest_memory(&MemoryConfig {
                size: 5 << 30,
                shared,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(mem.num_regions(), 2);
            for region in mem.iter() {
                let pages = region.len() as usize / guest_memory::DIRTY_PAGE_SIZE;
                assert_eq!(guest_memory::bitmap(region).len(), pages);
                let words = guest_memory::take_dirty_pages(region);
                assert_eq!(words.len(), pages.div_ceil(64));
                assert!(words.iter().all(|&w| w == 0), "fresh RAM is clean");

                // Page 1, and the last page of the region.
                let last = region.len() - 8;
                mem.write_obj(7u32, region.start_addr().unchecked_add(0x1234))
                    .unwrap();
                mem.write_obj(7u64, region.start_addr().unchecked_add(last))
                    .unwrap();
                let _: u64 = mem
                    .read_obj(region.start_addr().unchecked_add(0x5000))
                    .unwrap();
                let words = guest_memory::take_dirty_pages(region);
                let mut want = vec![0u64; words.len()];
                want[0] = 1 << 1;
                *want.last_mut().unwrap() |= 1 << ((pages - 1) % 64);
                assert_eq!(words, want, "shared={shared}");
                assert!(guest_memory::take_dirty_pages(region)
                    .iter()
                    .all(|&w| w == 0));
            }
        }
    }

    /// The flags of the mapping that holds `addr`, from /proc/self/smaps: (start, end, VmFlags).
    fn vma_of(addr: usize) -> (usize, usize, String) {
        let (start, end, fields) = smaps_entry(addr);
        let flags = fields
            .iter()
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("VmFlags");
        (start, end, flags.to_string())
    }

    /// The /proc/self/smaps entry of the mapping that holds `addr`: its range and its lines.
    fn smaps_entry(addr: usize) -> (usize, usize, Vec<String>) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut current: Option<(usize, usize, Vec<String>)> = None;
        for line in smaps.lines() {
            let range = line.split(' ').next().unwrap_or("");
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    if let Some(found) = current.take().filter(|c| (c.0..c.1).contains(&addr)) {
                        return found;
                    }
                    current = Some((a, b, Vec::new()));
                    continue;
                }
            }
            if let Some(c) = current.as_mut() {
                c.2.push(line.to_string());
            }
        }
        current
            .filter(|c| (c.0..c.1).contains(&addr))
            .unwrap_or_else(|| panic!("no mapping holds {addr:#x}"))
    }

    #[test]
    fn thp_spares_the_first_16_mib() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 32 << 20,
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
        assert_eq!((start, end), (base + THP_FLOOR as usize, base + (32 << 20)));
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

    /// A field of /proc/self/smaps (kB) for the mapping that holds `addr`.
    fn smaps_kb(addr: usize, field: &str) -> u64 {
        let (_, _, fields) = smaps_entry(addr);
        let v = fields
            .iter()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} for {addr:#x}"));
        v.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    /// `prefault=on` with transparent huge pages: all of guest RAM is resident, and above the
    /// first 16 MiB in huge pages (MAP_POPULATE, which fills the mapping before the advice,
    /// gave 4 KiB pages there). Without THP, or with `shared=on`, it is resident all the same.
    /// 96 MiB: several pieces, populated by as many threads as the host has CPUs for them.
    #[test]
    fn prefault_populates_in_huge_pages() {
        let size = 96u64 << 20;
        let thp_on = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"));
        for (thp, shared) in [(true, false), (false, false), (true, true)] {
            let mem = create_guest_memory(&MemoryConfig {
                size,
                thp,
                shared,
                prefault: true,
                ..Default::default()
            })
            .unwrap();
            let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let above = base + THP_FLOOR as usize;
            // Counted page by page in this RAM's range (`mincore`): the kernel may merge the
            // mapping with a neighbouring one of the same kind (another test's), so its smaps
            // entry can hold more than this RAM.
            assert_eq!(
                resident_bytes(&mem),
                size,
                "thp={thp} shared={shared}: all resident"
            );
            let huge = smaps_kb(above, "AnonHugePages:");
            if thp && !shared && thp_on {
                // 80 MiB above the floor: at least most of it in 2 MiB pages.
                assert!(huge >= 48 << 10, "thp={thp}: {huge} kB in huge pages");
            } else if !thp {
                assert_eq!(huge, 0, "thp=off: {huge} kB in huge pages");
            }
        }
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

    /// The /proc/self/maps line of the mapping that holds `addr`.
    fn maps_line(addr: usize) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for line in maps.lines() {
            let range = line.split(' ').next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            if (a..b).contains(&addr) {
                return line.to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// `shared=on`: each region is a shared mapping of a close-on-exec memfd it carries, and a
    /// second mapping of that fd (another process's, later) sees the same pages both ways.
    #[test]
    fn shared_ram_is_a_memfd_another_mapping_sees() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(&MemoryConfig {
            size: 5 << 30,
            shared: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let base = region.as_ptr() as usize;
            let line = maps_line(base);
            assert!(line.contains("/memfd:guest_ram"), "{line}");
            assert!(line.split(' ').nth(1).unwrap().ends_with('s'), "{line}");
            let fo = region
                .file_offset()
                .expect("a shared region carries its file");
            assert_eq!(fo.start(), 0);
            let file = fo.file();
            assert_eq!(file.metadata().unwrap().len(), region.len());
            // SAFETY: F_GETFD on an fd we own.
            let fd_flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);

            // A second, independent mapping of the same file.
            let len = 1 << 20;
            // SAFETY: a new shared mapping of `len` bytes of a file at least that long.
            let other = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(other, libc::MAP_FAILED);
            let other = other.cast::<u8>();
            let at = region.start_addr().unchecked_add(0x1234);
            mem.write_obj(0xfeed_f00d_u32, at).unwrap();
            // SAFETY: offset 0x1234 + 4 lies in the `len` bytes mapped above.
            let seen = unsafe { other.add(0x1234).cast::<u32>().read_unaligned() };
            assert_eq!(seen, 0xfeed_f00d);
            // SAFETY: as above.
            unsafe {
                other
                    .add(0x2000)
                    .cast::<u64>()
                    .write_unaligned(0x0123_4567_89ab_cdef)
            };
            let back: u64 = mem
                .read_obj(region.start_addr().unchecked_add(0x2000))
                .unwrap();
            assert_eq!(back, 0x0123_4567_89ab_cdef);
            // SAFETY: unmaps only the mapping made above.
            assert_eq!(unsafe { libc::munmap(other.cast(), len) }, 0);
        }
    }

    /// `shared=off` (the default) stays a private anonymous mapping, with no file.
    #[test]
    fn private_ram_stays_anonymous() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 16 << 20,
            ..Default::default()
        })
        .unwrap();
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_none());
        let line = maps_line(region.as_ptr() as usize);
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields[1].ends_with('p'), "{line}");
        assert_eq!(fields.len(), 5, "an anonymous mapping has no path: {line}");
    }

    /// `hugepages=on` maps a hugetlb memfd (here without touching it: the host may have no
    /// huge pages), and a huge page size the host lacks is a clear error.
    #[test]
    fn hugepage_ram_is_a_hugetlb_memfd() {
        let cfg = MemoryConfig {
            size: 16 << 20,
            hugepages: true,
            ..Default::default()
        };
        // An odd size is rounded up to whole huge pages, as an anonymous huge page mapping is.
        let file = memory_file((8 << 20) + 4096, &cfg).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 10 << 20);
        let region = ram_region(GuestAddress(0), 16 << 20, &cfg).unwrap();
        assert!(region.file_offset().is_some());
        let base = region.as_ptr() as usize;
        let line = maps_line(base);
        assert!(line.contains("/memfd:guest_ram"), "{line}");
        assert!(line.split(' ').nth(1).unwrap().ends_with('s'), "{line}");
        let flags = vma_of(base).2;
        assert!(flags.contains(" ht") && flags.contains(" dc"), "{flags}");

        let err = memory_file(
            16 << 20,
            &MemoryConfig {
                hugepage_size: Some(4 << 20),
                ..cfg
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "cannot create a memory file for 16777216 bytes of guest memory in huge pages \
                 of 4194304 bytes: "
            ),
            "{err}"
        );
    }
}
