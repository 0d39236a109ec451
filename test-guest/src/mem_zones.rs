//! `test=memzones`: the guest's side of `--memory-zone`. It prints the RAM of its memory map
//! (`MEMZONES ram <addr>+<size>`, hex), then for each range of `memtest=<addr>+<size>,...`
//! (hex) checks the map has RAM for all of it (`memzones-map-<i>`), writes every 8-byte word
//! with `pattern(address)` and reads it back (`memzones-<i>`), prints `MEMZONES written`
//! and, for ever, every 100 ms, checks three words of every page again and prints
//! `MEMZONES check <n> ok` (or `bad` with a FAIL line): the host reads a file-backed zone's
//! file, and a restored or migrated guest goes on checking its memory. Before the ranges it
//! prints the NUMA nodes the SRAT and SLIT describe (`numa.rs`).

use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};

use crate::bootinfo::BootInfo;
use crate::{fail, paging, parse_hex, pass, println, smp};

const PAGE: u64 = 4096;

/// The word the guest writes at guest physical address `a` (the host computes it too).
pub fn pattern(a: u64) -> u64 {
    a ^ 0x6d65_6d7a_6f6e_6573
}

/// `memtest=`'s ranges.
fn ranges(boot: &BootInfo) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for r in boot.arg("memtest")?.split(',') {
        let (a, s) = r.split_once('+')?;
        out.push((parse_hex(a)?, parse_hex(s)?));
    }
    Some(out)
}

/// Three words of every page of `[start, start + size)` hold their pattern; the first bad
/// word otherwise.
fn check(start: u64, size: u64) -> Result<(), (u64, u64)> {
    for p in (start..start + size).step_by(PAGE as usize) {
        for w in [p, p + PAGE / 2, p + PAGE - 8] {
            // SAFETY: RAM of the memory map, mapped by `map_ram`; only this scenario uses it.
            let v = unsafe { read_volatile(w as *const u64) };
            if v != pattern(w) {
                return Err((w, v));
            }
        }
    }
    Ok(())
}

pub fn scenario_memzones(boot: &BootInfo) {
    for r in boot.memmap.iter().filter(|r| r.kind == 1) {
        println!("MEMZONES ram {:#x}+{:#x}", r.addr, r.size);
    }
    crate::numa::report(boot.rsdp);
    let Some(ranges) = ranges(boot) else {
        fail(
            "memzones-args",
            format_args!("memtest=<hex addr>+<hex size>,... is missing or bad"),
        );
        return;
    };
    for (i, &(start, size)) in ranges.iter().enumerate() {
        let name = alloc::format!("memzones-map-{i}");
        if boot.ram_between(start, start + size) != size {
            fail(
                &name,
                format_args!("{start:#x}+{size:#x} is not all RAM in the memory map"),
            );
            return;
        }
        if let Err(e) = paging::map_ram(start, size) {
            fail(&name, format_args!("{start:#x}+{size:#x}: {e:?}"));
            return;
        }
        pass(&name);
        for w in (start..start + size).step_by(8) {
            // SAFETY: as in `check`.
            unsafe { write_volatile(w as *mut u64, pattern(w)) };
        }
        let name = alloc::format!("memzones-{i}");
        let bad = (start..start + size).step_by(8).find(|&w| {
            // SAFETY: as in `check`.
            unsafe { read_volatile(w as *const u64) != pattern(w) }
        });
        match bad {
            None => pass(&name),
            Some(w) => {
                fail(&name, format_args!("{w:#x} does not read back"));
                return;
            }
        }
    }
    println!("MEMZONES written");
    let mut round = 0u64;
    loop {
        smp::delay_us(100_000);
        round += 1;
        let mut ok = true;
        for &(start, size) in &ranges {
            if let Err((w, v)) = check(start, size) {
                fail(
                    "memzones-check",
                    format_args!("round {round}: {w:#x} holds {v:#x}, not {:#x}", pattern(w)),
                );
                ok = false;
                break;
            }
        }
        println!("MEMZONES check {round} {}", if ok { "ok" } else { "bad" });
    }
}
