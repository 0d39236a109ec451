//! Giving the host memory behind guest RAM back to the system, for the devices through which a
//! guest gives memory up (virtio-balloon, virtio-mem). The mapping stays: the range reads as
//! zero until written again, when it faults in fresh pages.
//!
//! `MADV_DONTNEED` frees the anonymous pages of a private mapping. A shared mapping
//! (`shared=on`, hugepages: a memfd or file) needs `MADV_REMOVE`, which punches a hole in the
//! file so its pages are freed too (`MADV_DONTNEED` would only unmap them from this process);
//! where the file cannot punch holes, `MADV_DONTNEED` at least unmaps them. Nothing outside
//! guest RAM is ever touched.

use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use log::debug;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The unit of release: whole 4 KiB pages.
const PAGE: u64 = 4096;

/// Gives the host memory behind guest RAM `[addr, addr + len)` back, whole 4 KiB pages only
/// (a partial page at either end stays). Parts outside guest RAM are skipped. Returns the bytes
/// released.
pub(crate) fn release_guest_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> u64 {
    let end = addr.saturating_add(len) & !(PAGE - 1);
    let Some(mut at) = addr.checked_next_multiple_of(PAGE) else {
        return 0;
    };
    let mut released = 0;
    while at < end {
        let Some(r) = mem.find_region(GuestAddress(at)) else {
            // Skip to the next region above (there are a few), if any starts before `end`.
            let next = mem
                .iter()
                .map(|r| r.start_addr().0)
                .filter(|&s| s > at)
                .min();
            debug!("guest RAM release: {at:#x} is outside guest RAM; skipped");
            match next {
                Some(s) if s < end => at = s.next_multiple_of(PAGE),
                _ => break,
            }
            continue;
        };
        let off = at - r.start_addr().0;
        let n = (end - at).min(r.len() - off);
        if release_in_region(r, off, n) {
            released += n;
        }
        at += n;
    }
    released
}

/// Drops `len` bytes at offset `off` of `region` (page-aligned, inside the region).
fn release_in_region(region: &GuestRegionMmap, off: u64, len: u64) -> bool {
    let (Ok(off), Ok(len)) = (usize::try_from(off), usize::try_from(len)) else {
        return false;
    };
    let shared = region.flags() & libc::MAP_SHARED != 0;
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let ptr = region.as_ptr().wrapping_add(off).cast::<libc::c_void>();
    // SAFETY: `[off, off + len)` lies inside the region (the caller's bounds), so the range is
    // part of the region's mapping, which `region` keeps mapped. It is guest RAM the guest gave
    // up: its contents may change under any reader (as the guest's own writes may), and the
    // mapping itself stays, reading as zero until written again.
    let mut rc = unsafe { libc::madvise(ptr, len, advice) };
    if rc != 0 && shared {
        // A file that cannot punch holes: at least unmap the pages from this process.
        debug!(
            "guest RAM release: MADV_REMOVE at offset {off:#x}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above.
        rc = unsafe { libc::madvise(ptr, len, libc::MADV_DONTNEED) };
    }
    if rc != 0 {
        debug!(
            "guest RAM release: cannot release {len:#x} bytes at region offset {off:#x}: {}",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}
