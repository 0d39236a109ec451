//! The pages of guest RAM written since the last look: the guest's writes from KVM's dirty log
//! (each RAM region is memory slot `index`, registered with dirty logging while a migration
//! runs), the VMM's and its devices' from each region's vm-memory bitmap.

use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::MemSlot;
use crate::snapshot::MemoryRange;
use guest_memory::GuestMemoryMmap;

const PAGE: u64 = 4096;

/// The pages the VMM wrote in `region` since the last call (bit i: page i), cleared as read.
fn take_written(region: &guest_memory::GuestRegionMmap) -> Vec<u64> {
    guest_memory::take_dirty_pages(region)
}

/// Registers every slot again with dirty logging `on` (off: as at boot).
pub fn set_logging(
    vm: &Arc<dyn hypervisor::Vm>,
    slots: &[MemSlot],
    mem: &GuestMemoryMmap,
    on: bool,
) -> Result<(), String> {
    crate::memory::register_memory(vm, slots, on).map_err(|e| e.to_string())?;
    if on {
        // Only what is written from now on counts.
        for region in mem.iter() {
            take_written(region);
        }
    }
    Ok(())
}

/// The dirty pages since the last call (both logs are cleared as they are read), as ranges of
/// whole pages, in address order.
pub fn take(
    vm: &Arc<dyn hypervisor::Vm>,
    slots: &[MemSlot],
    mem: &GuestMemoryMmap,
    devices: &[Vec<u64>],
) -> Result<Vec<MemoryRange>, String> {
    let mut ranges = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().0;
        let mut bits = take_written(region);
        // The devices' logs (vhost-user backends' writes), from guest address 0.
        for log in devices {
            or_from(&mut bits, log, start / PAGE, region.len().div_ceil(PAGE));
        }
        // The guest's writes, from the slots inside this region (one for a region of RAM; the
        // plugged DIMMs of an ACPI hotplug region, at their offsets).
        for s in slots
            .iter()
            .filter(|s| s.gpa >= start && s.gpa + s.len <= start + region.len())
        {
            let logged = vm
                .get_dirty_log(s.slot, s.len)
                .map_err(|e| format!("memory slot {}: {e}", s.slot))?;
            or_at(&mut bits, &logged, (s.gpa - start) / PAGE);
        }
        push_ranges(&mut ranges, start, region.len(), &bits);
    }
    Ok(ranges)
}

/// Sets in `dst` (bit i: page i of a region) every bit of `src` (bit i: page i of guest
/// physical memory) for the region's `pages` pages from page `first`.
fn or_from(dst: &mut Vec<u64>, src: &[u64], first: u64, pages: u64) {
    let end = first + pages;
    let mut page = first;
    while page < end {
        let Some(&w) = src.get((page / 64) as usize) else {
            break;
        };
        if w == 0 {
            // A clear word: on to the next one.
            page = (page / 64 + 1) * 64;
            continue;
        }
        if w & (1 << (page % 64)) != 0 {
            let i = page - first;
            let k = (i / 64) as usize;
            if dst.len() <= k {
                dst.resize(k + 1, 0);
            }
            dst[k] |= 1 << (i % 64);
        }
        page += 1;
    }
}

/// Sets in `dst` every bit set in `src`, `offset` bits further on (`dst` grows if needed).
fn or_at(dst: &mut Vec<u64>, src: &[u64], offset: u64) {
    for (w, &word) in src.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let bit = (w as u64) * 64 + u64::from(word.trailing_zeros()) + offset;
            word &= word - 1;
            let i = (bit / 64) as usize;
            if dst.len() <= i {
                dst.resize(i + 1, 0);
            }
            dst[i] |= 1 << (bit % 64);
        }
    }
}

/// Appends the runs of set bits of `bits` (bit i: page i of the region at `start`) as ranges.
fn push_ranges(out: &mut Vec<MemoryRange>, start: u64, len: u64, bits: &[u64]) {
    let pages = len.div_ceil(PAGE);
    let mut run: Option<u64> = None;
    for page in 0..=pages {
        let set = page < pages
            && bits
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0);
        match (set, run) {
            (true, None) => run = Some(page),
            (false, Some(first)) => {
                out.push(MemoryRange {
                    gpa: start + first * PAGE,
                    length: (page - first) * PAGE,
                });
                run = None;
            }
            _ => {}
        }
    }
}

/// What the first pass sends: every RAM range, but of anonymous private RAM made fresh
/// (`fresh`: not RAM still loaded on demand, whose absent pages are in the snapshot) only the
/// pages that hold anything (present or swapped out): the destination's fresh RAM is zeros
/// already, so an idle guest's untouched RAM costs nothing.
pub fn initial(mem: &GuestMemoryMmap, fresh: bool) -> Vec<MemoryRange> {
    let mut ranges = Vec::new();
    for region in mem.iter() {
        let populated = (fresh && region.file_offset().is_none())
            .then(|| crate::memory::populated_pages(region))
            .flatten();
        match populated {
            Some(bits) => push_ranges(&mut ranges, region.start_addr().0, region.len(), &bits),
            None => ranges.push(MemoryRange {
                gpa: region.start_addr().0,
                length: region.len(),
            }),
        }
    }
    ranges
}

/// Total bytes of `ranges`.
pub fn bytes(ranges: &[MemoryRange]) -> u64 {
    ranges.iter().map(|r| r.length).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_bits_land_at_their_offset_in_the_region() {
        let mut dst = vec![0b1u64];
        or_at(&mut dst, &[0b101, 1 << 63], 3);
        // Bits 0 and 2 of the slot are bits 3 and 5 of the region; bit 127 becomes 130.
        assert_eq!(dst, vec![0b101001, 0, 1 << 2]);
        let mut empty = Vec::new();
        or_at(&mut empty, &[0, 0], 64);
        assert!(empty.is_empty());
    }

    #[test]
    fn a_device_log_lands_in_the_regions_it_covers() {
        // Pages 1, 64 and 130 of guest memory; a region of 100 pages from page 40.
        let log = [0b10u64, 1, 1 << 2];
        let mut bits = Vec::new();
        or_from(&mut bits, &log, 40, 100);
        // Page 64 is the region's page 24; 1 is before it, 130 is its page 90.
        assert_eq!(bits, vec![1 << 24, 1 << 26]);
        // A region past the log's end gets nothing.
        let mut none = Vec::new();
        or_from(&mut none, &log, 1000, 10);
        assert!(none.is_empty());
    }

    #[test]
    fn runs_of_pages_become_ranges() {
        let mut out = Vec::new();
        // Pages 0, 2-3, 63-65 of a 70-page region at 1 MiB.
        let bits = [0b1101 | (1 << 63), 0b11];
        push_ranges(&mut out, 1 << 20, 70 * PAGE, &bits);
        assert_eq!(
            out,
            [
                MemoryRange {
                    gpa: 1 << 20,
                    length: PAGE
                },
                MemoryRange {
                    gpa: (1 << 20) + 2 * PAGE,
                    length: 2 * PAGE
                },
                MemoryRange {
                    gpa: (1 << 20) + 63 * PAGE,
                    length: 3 * PAGE
                },
            ]
        );
        // Bits past the region's end are not pages.
        let mut out = Vec::new();
        push_ranges(&mut out, 0, 2 * PAGE, &[u64::MAX]);
        assert_eq!(bytes(&out), 2 * PAGE);
    }
}
