//! The guest's NUMA description (`--numa`): the ACPI SRAT and SLIT, read raw from the XSDT and
//! printed for the host to check: `NUMA cpu node=<n> apic=<id>`, `NUMA gi node=<n>
//! pci=<segment>:<bus>:<device>.<function>` (a generic initiator), `NUMA mem node=<n>
//! <base>+<length> hotplug=<0|1>` (hex), `NUMA slit <row>: <d>,<d>,...`; `NUMA none` without
//! an SRAT.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;

use crate::println;

/// Reads a little-endian value at a physical address (identity-mapped ACPI tables).
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: the VMM's ACPI tables lie in identity-mapped, readable low memory; the
    // addresses come from the RSDP and XSDT it wrote, and lengths from their headers.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// The tables the XSDT lists, as (signature, address, length).
fn tables(rsdp: u64) -> Vec<([u8; 4], u64, u32)> {
    let mut out = Vec::new();
    if rsdp == 0 || rd::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return out;
    }
    let xsdt: u64 = rd(rsdp + 24);
    let len: u32 = rd(xsdt + 4);
    let mut at = xsdt + 36;
    while at + 8 <= xsdt + u64::from(len) {
        let t: u64 = rd(at);
        out.push((rd(t), t, rd(t + 4)));
        at += 8;
    }
    out
}

pub fn report(rsdp: u64) {
    let tables = tables(rsdp);
    let Some(&(_, srat, len)) = tables.iter().find(|t| &t.0 == b"SRAT") else {
        println!("NUMA none");
        return;
    };
    let end = srat + u64::from(len);
    let mut at = srat + 48;
    while at + 2 <= end {
        let kind: u8 = rd(at);
        let size: u8 = rd(at + 1);
        if size == 0 {
            break;
        }
        match kind {
            0 => println!(
                "NUMA cpu node={} apic={}",
                rd::<u8>(at + 2),
                rd::<u8>(at + 3)
            ),
            1 => println!(
                "NUMA mem node={} {:#x}+{:#x} hotplug={}",
                rd::<u32>(at + 2),
                rd::<u64>(at + 8),
                rd::<u64>(at + 16),
                (rd::<u32>(at + 28) >> 1) & 1
            ),
            2 => println!(
                "NUMA cpu node={} apic={}",
                rd::<u32>(at + 4),
                rd::<u32>(at + 8)
            ),
            // A generic initiator with a PCI handle: segment, bus, device/function.
            5 if rd::<u8>(at + 3) == 1 => {
                let devfn = rd::<u8>(at + 11);
                println!(
                    "NUMA gi node={} pci={:04x}:{:02x}:{:02x}.{}",
                    rd::<u32>(at + 4),
                    rd::<u16>(at + 8),
                    rd::<u8>(at + 10),
                    devfn >> 3,
                    devfn & 7
                )
            }
            k => println!("NUMA srat-entry type={k}"),
        }
        at += u64::from(size);
    }
    if let Some(&(_, slit, _)) = tables.iter().find(|t| &t.0 == b"SLIT") {
        let n: u64 = rd(slit + 36);
        for i in 0..n.min(64) {
            let mut row = String::new();
            for j in 0..n.min(64) {
                let d: u8 = rd(slit + 44 + i * n + j);
                let _ = write!(row, "{}{d}", if j == 0 { "" } else { "," });
            }
            println!("NUMA slit {i}: {row}");
        }
    }
}
