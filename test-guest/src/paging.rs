//! Page tables above 4 GiB, built at CPL3 (natively fast; the monitor's CPL0 code is
//! emulated). The monitor's static tables identity-map the first 4 GiB; `map_uncached` adds
//! identity mappings with 2 MiB pages (uncached, user-accessible) for the 64-bit PCI window,
//! and `map_ram` write-back ones for RAM above 4 GiB (the virtio-mem region), with tables from
//! a pool in `.bss`. The tables are ordinary user-writable memory.
//!
//! Entries only ever go from not present to present, which needs no TLB flush (no TLB or
//! paging-structure cache entry is made from a not-present entry); a present entry is never
//! changed, so a range that is already mapped keeps its mapping.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Page-table pages for `map_uncached` and `map_ram`: one page directory per GiB mapped (the
/// 64-bit window is at most 64 GiB), plus page-directory-pointer tables when it crosses 512 GiB
/// boundaries, plus 8 for RAM (a virtio-mem region of up to 8 GiB beside the largest window).
const POOL_PAGES: usize = 76;
/// Present, writable, user.
const P_RW_US: u64 = 0x7;
/// 2 MiB page.
const PS: u64 = 0x80;
/// Uncached: page-level write-through and cache disable.
const PWT_PCD: u64 = 0x18;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const MIB2: u64 = 1 << 21;
/// Identity mappings must stay in the lower canonical half of 4-level paging.
const LIMIT: u64 = 1 << 47;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut POOL: [Table; POOL_PAGES] = [const { Table([0; 512]) }; POOL_PAGES];
static POOL_USED: AtomicUsize = AtomicUsize::new(0);

extern "C" {
    /// The monitor's PML4 (monitor.S), loaded in CR3 on every CPU.
    static mut pml4: [u64; 512];
}

#[derive(Debug)]
pub enum MapError {
    /// The range reaches beyond the lower canonical half.
    OutOfRange,
    /// The pool of table pages ran out.
    OutOfTables,
}

/// A fresh zeroed table from the pool (physical = virtual).
fn new_table() -> Result<*mut u64, MapError> {
    let i = POOL_USED.fetch_add(1, Ordering::Relaxed);
    if i >= POOL_PAGES {
        return Err(MapError::OutOfTables);
    }
    // SAFETY: each index is handed out once; the pool is in .bss, zeroed by the start-up stub.
    Ok(unsafe { addr_of_mut!(POOL[i].0) }.cast())
}

/// The table entry `index` of `table` points to, creating it if not present. `None` for a
/// present large page.
///
/// # Safety
/// `table` must be a live page-table page.
unsafe fn next_level(table: *mut u64, index: usize) -> Result<Option<*mut u64>, MapError> {
    // SAFETY: `index` < 512, inside the table page.
    let e = unsafe { read_volatile(table.add(index)) };
    if e & 1 != 0 {
        return Ok((e & PS == 0).then_some((e & ADDR_MASK) as *mut u64));
    }
    let t = new_table()?;
    // SAFETY: as above; the new table is zeroed (nothing present) before it is linked.
    unsafe { write_volatile(table.add(index), t as u64 | P_RW_US) };
    Ok(Some(t))
}

/// Identity-maps `[start, start + size)`, rounded out to 2 MiB pages, uncached. Returns how
/// many 2 MiB pages were added (pages already mapped are left alone).
pub fn map_uncached(start: u64, size: u64) -> Result<u64, MapError> {
    map(start, size, PWT_PCD)
}

/// Identity-maps `[start, start + size)` of RAM, rounded out to 2 MiB pages, write-back. Only
/// page-table entries are written: the memory itself is not touched. Returns as `map_uncached`.
pub fn map_ram(start: u64, size: u64) -> Result<u64, MapError> {
    map(start, size, 0)
}

fn map(start: u64, size: u64, cache: u64) -> Result<u64, MapError> {
    let end = start
        .checked_add(size)
        .and_then(|e| e.checked_next_multiple_of(MIB2))
        .filter(|&e| e <= LIMIT)
        .ok_or(MapError::OutOfRange)?;
    let mut added = 0;
    let mut addr = start & !(MIB2 - 1);
    while addr < end {
        let l4 = ((addr >> 39) & 511) as usize;
        let l3 = ((addr >> 30) & 511) as usize;
        let l2 = ((addr >> 21) & 511) as usize;
        // SAFETY: `pml4` is the live top-level table; every table reached from it is a
        // page-table page (the monitor's or one from the pool).
        let pd = unsafe {
            let pml4_ptr: *mut u64 = addr_of_mut!(pml4).cast();
            match next_level(pml4_ptr, l4)? {
                Some(pdpt) => next_level(pdpt, l3)?,
                None => None,
            }
        };
        if let Some(pd) = pd {
            // SAFETY: `l2` < 512, inside the page directory.
            unsafe {
                if read_volatile(pd.add(l2)) & 1 == 0 {
                    write_volatile(pd.add(l2), addr | P_RW_US | PS | cache);
                    added += 1;
                }
            }
        }
        addr += MIB2;
    }
    Ok(added)
}
