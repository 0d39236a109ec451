//! The boot information handed over by the VMM: PVH `hvm_start_info` or the Linux
//! zero page (`boot_params`), normalised into one structure.

use alloc::string::String;
use alloc::vec::Vec;

pub const PROTOCOL_PVH: u32 = 0;
#[allow(dead_code)]
pub const PROTOCOL_LINUX: u32 = 1;

const PVH_MAGIC: u32 = 0x336e_c578;

#[derive(Clone, Copy, Debug)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    /// 1 = RAM, 2 = reserved, 3 = ACPI, ...
    pub kind: u32,
}

pub struct BootInfo {
    pub protocol: u32,
    pub cmdline: String,
    pub memmap: Vec<MemRegion>,
    /// (address, size) of the initramfs, if any.
    pub initrd: Option<(u64, u64)>,
    pub rsdp: u64,
}

impl BootInfo {
    pub fn protocol_name(&self) -> &'static str {
        if self.protocol == PROTOCOL_PVH {
            "pvh"
        } else {
            "linux"
        }
    }

    /// Total RAM (type 1) in the memory map.
    pub fn total_ram(&self) -> u64 {
        self.memmap
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.size)
            .sum()
    }

    /// RAM bytes of the map inside `[lo, hi)`.
    pub fn ram_between(&self, lo: u64, hi: u64) -> u64 {
        self.memmap
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| {
                let s = r.addr.max(lo);
                let e = (r.addr + r.size).min(hi);
                e.saturating_sub(s)
            })
            .sum()
    }

    /// End of the highest RAM region in the map.
    pub fn ram_end(&self) -> u64 {
        self.memmap
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.addr.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// Value of `key=value` on the command line.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.cmdline.split_ascii_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    pub fn has_token(&self, token: &str) -> bool {
        self.cmdline.split_ascii_whitespace().any(|w| w == token)
    }
}

/// Reads a little-endian value at a physical address (identity mapped).
///
/// # Safety
/// `addr` must be mapped, readable guest memory.
unsafe fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: guaranteed by the caller; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Reads a NUL-terminated string of at most `max` bytes.
///
/// # Safety
/// `[addr, addr + max)` must be mapped, readable guest memory (or NUL-terminated before).
unsafe fn read_cstr(addr: u64, max: usize) -> String {
    let mut s = String::new();
    if addr == 0 {
        return s;
    }
    for i in 0..max as u64 {
        // SAFETY: within the range guaranteed by the caller.
        let b: u8 = unsafe { rd(addr + i) };
        if b == 0 {
            break;
        }
        s.push(if b.is_ascii() { b as char } else { '?' });
    }
    s
}

pub enum BootInfoError {
    BadPvhMagic(u32),
    BadZeroPage,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            BootInfoError::BadPvhMagic(m) => write!(f, "hvm_start_info magic {m:#x}"),
            BootInfoError::BadZeroPage => write!(f, "boot_params has no e820 entries"),
        }
    }
}

/// Parses the boot information at `info` for `protocol` (as recorded by the monitor).
///
/// # Safety
/// `info` must be the address the VMM handed over for that protocol.
pub unsafe fn parse(protocol: u32, info: u64) -> Result<BootInfo, BootInfoError> {
    // SAFETY: all addresses read below are the VMM-provided structures (identity mapped,
    // below 4 GiB by the platform contract).
    unsafe {
        if protocol == PROTOCOL_PVH {
            let magic: u32 = rd(info);
            if magic != PVH_MAGIC {
                return Err(BootInfoError::BadPvhMagic(magic));
            }
            let nr_modules: u32 = rd(info + 12);
            let modlist: u64 = rd(info + 16);
            let cmdline: u64 = rd(info + 24);
            let rsdp: u64 = rd(info + 32);
            let memmap_paddr: u64 = rd(info + 40);
            let memmap_entries: u32 = rd(info + 48);
            let memmap = (0..u64::from(memmap_entries.min(128)))
                .map(|i| {
                    let e = memmap_paddr + i * 24;
                    MemRegion {
                        addr: rd(e),
                        size: rd(e + 8),
                        kind: rd(e + 16),
                    }
                })
                .collect();
            let initrd = (nr_modules > 0 && modlist != 0).then(|| (rd(modlist), rd(modlist + 8)));
            Ok(BootInfo {
                protocol,
                cmdline: read_cstr(cmdline, 4096),
                memmap,
                initrd,
                rsdp,
            })
        } else {
            let n: u8 = rd(info + 0x1e8);
            if n == 0 {
                return Err(BootInfoError::BadZeroPage);
            }
            let memmap = (0..u64::from(n.min(128)))
                .map(|i| {
                    let e = info + 0x2d0 + i * 20;
                    MemRegion {
                        addr: rd(e),
                        size: rd(e + 8),
                        kind: rd(e + 16),
                    }
                })
                .collect();
            let cmd_lo: u32 = rd(info + 0x228);
            let cmd_hi: u32 = rd(info + 0x0c8);
            let cmdline = u64::from(cmd_lo) | (u64::from(cmd_hi) << 32);
            let rd_lo: u32 = rd(info + 0x218);
            let rd_hi: u32 = rd(info + 0x0c0);
            let rs_lo: u32 = rd(info + 0x21c);
            let rs_hi: u32 = rd(info + 0x0c4);
            let rd_addr = u64::from(rd_lo) | (u64::from(rd_hi) << 32);
            let rd_size = u64::from(rs_lo) | (u64::from(rs_hi) << 32);
            let initrd = (rd_addr != 0 && rd_size != 0).then_some((rd_addr, rd_size));
            let rsdp: u64 = rd(info + 0x70);
            Ok(BootInfo {
                protocol,
                cmdline: read_cstr(cmdline, 4096),
                memmap,
                initrd,
                rsdp,
            })
        }
    }
}

/// 32-bit FNV-1a (offset basis 0x811c9dc5, prime 0x01000193) of a memory range.
///
/// # Safety
/// `[addr, addr + len)` must be mapped, readable guest memory.
pub unsafe fn fnv1a(addr: u64, len: u64) -> u32 {
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
