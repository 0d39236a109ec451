//! ACPI: table discovery with the `acpi` crate, CPUs from the MADT, `\_S5_` from
//! the DSDT bytes, power off and reset through the FADT registers.

use acpi::address::{AddressSpace, GenericAddress};
use acpi::fadt::Fadt;
use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::svc;

/// Physical memory is identity mapped (and user-accessible), so mapping is free.
#[derive(Clone, Copy, Debug)]
pub struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let ptr =
            NonNull::new(physical_address as *mut T).expect("ACPI table at physical address 0");
        // SAFETY: the page tables identity-map the first 4 GiB, where the VMM puts the
        // tables, so the physical address is also a valid virtual address for `size` bytes.
        unsafe { PhysicalMapping::new(physical_address, ptr, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub apic_id: u32,
    pub enabled: bool,
}

/// What the guest learned from the ACPI tables.
#[derive(Default)]
pub struct AcpiInfo {
    pub rsdp_addr: u64,
    pub revision: u8,
    pub has_fadt: bool,
    pub hw_reduced: bool,
    pub sleep_control: Option<GenericAddress>,
    pub reset_reg: Option<GenericAddress>,
    pub reset_value: u8,
    pub reset_supported: bool,
    /// The FADT's PM timer block (`X_PM_TMR_BLK`, else `PM_TMR_BLK`; none unless
    /// `PM_TMR_LEN` is 4), and whether it counts 32 bits (`TMR_VAL_EXT`).
    pub pm_timer: Option<(GenericAddress, bool)>,
    pub dsdt: Option<(u64, u32)>,
    /// The I/O port of the Generic Event Device's (ACPI0013) event register, from the
    /// `OperationRegion` in its DSDT scope.
    pub ged_port: Option<u16>,
    pub slp_typ_s5: Option<u8>,
    /// The VM Generation ID device (`\_SB_.VGEN`): None when the DSDT and SSDTs have none,
    /// else the guest-physical address of the 16-byte ID from its `ADDR` package, or why that
    /// could not be decoded.
    pub vgen: Option<Result<u64, &'static str>>,
    /// The PCI host bridge's (PNP0A08) memory windows from its `_CRS`.
    pub pci_windows: PciWindows,
    /// The MCFG's entries, as the `acpi` crate reads them: (segment, ECAM base of bus 0,
    /// first bus, last bus).
    pub mcfg: Vec<(u16, u64, u8, u8)>,
    pub has_madt: bool,
    pub cpus: Vec<Cpu>,
    pub signatures: Vec<[u8; 4]>,
}

pub enum AcpiSysError {
    NoRsdp,
    Tables(acpi::AcpiError),
}

impl core::fmt::Display for AcpiSysError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            AcpiSysError::NoRsdp => write!(f, "no RSDP address and none found in the BIOS area"),
            AcpiSysError::Tables(e) => write!(f, "{e:?}"),
        }
    }
}

/// Reads the ACPI tables starting at the RSDP (`rsdp` = 0: search the BIOS area).
pub fn discover(rsdp: u64) -> Result<AcpiInfo, AcpiSysError> {
    // SAFETY: the address comes from the VMM's boot information (or the standard BIOS
    // search areas); the crate validates signatures and checksums before use.
    let tables = unsafe {
        if rsdp != 0 {
            AcpiTables::from_rsdp(IdentityHandler, rsdp as usize)
        } else {
            AcpiTables::search_for_rsdp_bios(IdentityHandler)
        }
    }
    .map_err(|e| {
        if rsdp == 0 {
            AcpiSysError::NoRsdp
        } else {
            AcpiSysError::Tables(e)
        }
    })?;

    let mut info = AcpiInfo {
        rsdp_addr: rsdp,
        revision: tables.revision(),
        ..Default::default()
    };
    info.signatures = tables
        .headers()
        .map(|h| {
            let mut s = [0u8; 4];
            s.copy_from_slice(h.signature.as_str().as_bytes());
            s
        })
        .collect();

    if let Ok(fadt) = tables.find_table::<Fadt>() {
        info.has_fadt = true;
        let flags = fadt.flags;
        info.hw_reduced = flags.system_is_hw_reduced_acpi();
        info.reset_supported = flags.supports_system_reset_via_fadt();
        info.sleep_control = fadt.sleep_control_register().ok().flatten();
        info.reset_reg = fadt.reset_register().ok();
        info.reset_value = fadt.reset_value;
        info.pm_timer = fadt
            .pm_timer_block()
            .ok()
            .flatten()
            .map(|block| (block, flags.pm_timer_is_32_bit()));
    }
    if let Ok(dsdt) = tables.dsdt() {
        info.dsdt = Some((dsdt.address as u64, dsdt.length));
        // SAFETY: the AML stream lies inside the validated DSDT.
        let aml =
            unsafe { core::slice::from_raw_parts(dsdt.address as *const u8, dsdt.length as usize) };
        info.slp_typ_s5 = find_s5(aml);
        info.pci_windows = find_pci_windows(aml);
        info.ged_port = find_ged_port(aml);
        info.vgen = find_vgen_addr(aml);
    }
    if info.vgen.is_none() {
        for ssdt in tables.ssdts() {
            // SAFETY: the AML stream lies inside the validated SSDT.
            let aml = unsafe {
                core::slice::from_raw_parts(ssdt.address as *const u8, ssdt.length as usize)
            };
            info.vgen = find_vgen_addr(aml);
            if info.vgen.is_some() {
                break;
            }
        }
    }
    if let Ok(mcfg) = tables.find_table::<acpi::mcfg::Mcfg>() {
        info.mcfg = mcfg
            .entries()
            .iter()
            .map(|e| {
                let (base, segment) = (e.base_address, e.pci_segment_group);
                (segment, base, e.bus_number_start, e.bus_number_end)
            })
            .collect();
    }
    if let Ok(madt) = tables.find_table::<Madt>() {
        info.has_madt = true;
        for e in madt.get().entries() {
            match e {
                MadtEntry::LocalApic(l) => {
                    let flags = l.flags;
                    info.cpus.push(Cpu {
                        apic_id: l.apic_id.into(),
                        enabled: flags & 1 != 0,
                    });
                }
                MadtEntry::LocalX2Apic(l) => {
                    let (id, flags) = (l.x2apic_id, l.flags);
                    info.cpus.push(Cpu {
                        apic_id: id,
                        enabled: flags & 1 != 0,
                    });
                }
                _ => {}
            }
        }
    }
    // A CPU may be listed both as a local APIC and as a local x2APIC: count it once.
    let mut seen: Vec<u32> = Vec::new();
    info.cpus.retain(|c| {
        let dup = seen.contains(&c.apic_id);
        seen.push(c.apic_id);
        !dup
    });
    Ok(info)
}

/// Decodes an AML integer constant (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordPrefix).
fn aml_int(b: &[u8]) -> Option<u64> {
    aml_int_len(b).map(|(v, _)| v)
}

/// An AML integer constant and the bytes it takes.
pub(crate) fn aml_int_len(b: &[u8]) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<u64> {
        let bytes = b.get(1..1 + n)?;
        Some(bytes.iter().rev().fold(0, |v, &x| v << 8 | u64::from(x)))
    };
    match *b.first()? {
        0x00 => Some((0, 1)),
        0x01 => Some((1, 1)),
        0xff => Some((u64::MAX, 1)),
        0x0a => Some((le(1)?, 2)),
        0x0b => Some((le(2)?, 3)),
        0x0c => Some((le(4)?, 5)),
        0x0e => Some((le(8)?, 9)),
        _ => None,
    }
}

/// A PkgLength: (the length it gives, counted from its own first byte; the bytes it takes).
pub(crate) fn pkg_length(b: &[u8]) -> Option<(usize, usize)> {
    let lead = *b.first()?;
    let extra = usize::from(lead >> 6);
    let mut len = usize::from(if extra == 0 { lead & 0x3f } else { lead & 0xf });
    for k in 0..extra {
        len |= usize::from(*b.get(1 + k)?) << (4 + 8 * k);
    }
    Some((len, 1 + extra))
}

/// A NameString: (its NameSegs, the bytes it takes). Root and parent prefixes are skipped.
pub(crate) fn name_string(b: &[u8]) -> Option<(Vec<[u8; 4]>, usize)> {
    let mut p = 0;
    if b.first() == Some(&b'\\') {
        p = 1;
    } else {
        while b.get(p) == Some(&b'^') {
            p += 1;
        }
    }
    let count = match *b.get(p)? {
        0x00 => return Some((Vec::new(), p + 1)),
        0x2e => {
            p += 1;
            2
        }
        0x2f => {
            p += 2;
            usize::from(*b.get(p - 1)?)
        }
        _ => 1,
    };
    let mut segs = Vec::new();
    for _ in 0..count {
        let seg: [u8; 4] = b.get(p..p + 4)?.try_into().ok()?;
        let lead_ok = seg[0].is_ascii_uppercase() || seg[0] == b'_';
        let rest_ok = seg[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
        if !lead_ok || !rest_ok {
            return None;
        }
        segs.push(seg);
        p += 4;
    }
    Some((segs, p))
}

/// The integers of a constant `Package` or `VarPackage` (PackageOp first) of integer constants.
fn package_ints(b: &[u8]) -> Option<Vec<u64>> {
    let op = *b.first()?;
    let (len, n) = pkg_length(b.get(1..)?)?;
    let body = b.get(1 + n..1 + len)?;
    let (count, mut p) = match op {
        0x12 => (usize::from(*body.first()?), 1),
        0x13 => {
            let (count, n) = aml_int_len(body)?;
            (usize::try_from(count).ok()?, n)
        }
        _ => return None,
    };
    let mut ints = Vec::new();
    while ints.len() < count && p < body.len() {
        let (v, n) = aml_int_len(&body[p..])?;
        ints.push(v);
        p += n;
    }
    Some(ints)
}

/// Finds the VM Generation ID device `\_SB_.VGEN` (a `Device` named `VGEN`, or
/// `_SB_.VGEN`) in AML bytes and decodes its `ADDR`: `Name (ADDR, Package () {low, high})`
/// or a `Method (ADDR)` that returns such a constant package. None when there is no such
/// device; an error when its `ADDR` is missing or not of those forms (this guest has no AML
/// interpreter: `acpi` 6.x and `aml` need nightly Rust).
pub fn find_vgen_addr(aml: &[u8]) -> Option<Result<u64, &'static str>> {
    const VGEN: [u8; 4] = *b"VGEN";
    const SB: [u8; 4] = *b"_SB_";
    let mut device = None;
    let mut i = 0;
    while let Some(at) = aml.get(i..)?.windows(2).position(|w| w == [0x5b, 0x82]) {
        let start = i + at;
        i = start + 2;
        let Some((len, n)) = aml.get(start + 2..).and_then(pkg_length) else {
            continue;
        };
        let end = start + 2 + len;
        let Some((segs, name_len)) = aml.get(start + 2 + n..).and_then(name_string) else {
            continue;
        };
        let named = segs.as_slice() == [VGEN] || segs.as_slice() == [SB, VGEN];
        if named && end <= aml.len() {
            device = Some(&aml[start + 2 + n + name_len..end]);
            break;
        }
    }
    let Some(body) = device else {
        return aml
            .windows(8)
            .any(|w| w == b"VMGENCTR")
            .then_some(Err("a VMGENCTR _HID but no Device named VGEN"));
    };
    Some(vgen_addr(body))
}

fn vgen_addr(body: &[u8]) -> Result<u64, &'static str> {
    let pkg = if let Some(at) = body.windows(5).position(|w| w == b"\x08ADDR") {
        package_ints(&body[at + 5..]).ok_or("Name (ADDR) is not a package of integer constants")?
    } else {
        // Method (ADDR): MethodOp PkgLength NameString MethodFlags, then its body.
        let mut found = None;
        for (m, _) in body.iter().enumerate().filter(|(_, &b)| b == 0x14) {
            let Some((len, n)) = body.get(m + 1..).and_then(pkg_length) else {
                continue;
            };
            if body.get(m + 1 + n..m + 5 + n) != Some(b"ADDR".as_slice()) {
                continue;
            }
            let code = body
                .get(m + 6 + n..m + 1 + len)
                .ok_or("Method (ADDR) runs past its device")?;
            // ReturnOp PackageOp/VarPackageOp.
            let ret = code
                .windows(2)
                .position(|w| w[0] == 0xa4 && (w[1] == 0x12 || w[1] == 0x13))
                .ok_or("Method (ADDR) does not return a constant package")?;
            found = Some(
                package_ints(&code[ret + 1..])
                    .ok_or("Method (ADDR) returns a package of other than integer constants")?,
            );
            break;
        }
        found.ok_or("the VGEN device has no ADDR object")?
    };
    match pkg.as_slice() {
        &[lo, hi, ..] if lo <= 0xffff_ffff && hi <= 0xffff_ffff => Ok(lo | hi << 32),
        _ => Err("ADDR is not a package of two 32-bit integers"),
    }
}

/// Finds `Name(_S5_, Package() { SLP_TYPa, ... })` in AML bytes; returns SLP_TYPa.
pub fn find_s5(aml: &[u8]) -> Option<u8> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    let mut p = pos + 4;
    if *aml.get(p)? != 0x12 {
        return None; // not PackageOp
    }
    p += 1;
    // PkgLength: the top two bits of the lead byte give the number of extra bytes.
    let lead = *aml.get(p)?;
    p += 1 + usize::from(lead >> 6);
    p += 1; // NumElements
    aml_int(aml.get(p..)?).map(|v| v as u8)
}

/// Finds the Generic Event Device (`_HID` "ACPI0013") in AML bytes and the first
/// `OperationRegion (name, SystemIO, offset, ...)` after it (its event register); returns the
/// port.
pub fn find_ged_port(aml: &[u8]) -> Option<u16> {
    let hid = aml.windows(8).position(|w| w == b"ACPI0013")?;
    let rest = aml.get(hid..)?;
    // OpRegionOp (5B 80), a 4-character NameSeg, RegionSpace, RegionOffset (an integer).
    let op = rest.windows(2).position(|w| w == [0x5b, 0x80])?;
    if *rest.get(op + 6)? != 0x01 {
        return None; // not SystemIO
    }
    let offset = aml_int(rest.get(op + 7..)?)?;
    u16::try_from(offset).ok()
}

/// A memory window of a resource template: `[start, start + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub size: u64,
    /// Memory attribute "prefetchable" (type-specific flags bits 1-2 = 3).
    pub prefetchable: bool,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
    pub fn contains(&self, addr: u64, size: u64) -> bool {
        addr >= self.start && addr.checked_add(size).is_some_and(|e| e <= self.end())
    }
}

/// The host bridge's memory windows below and above 4 GiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciWindows {
    pub mmio32: Option<Window>,
    pub mmio64: Option<Window>,
}

/// Finds the `_CRS` buffer of the first PNP0A08 device in AML bytes and reads its DWord and
/// QWord memory descriptors (ACPI 6.5, 6.4.3.5.2/6.4.3.5.1).
pub fn find_pci_windows(aml: &[u8]) -> PciWindows {
    let mut w = PciWindows::default();
    let Some(crs) = host_bridge_crs(aml) else {
        return w;
    };
    let mut i = 0;
    while let Some(&tag) = crs.get(i) {
        if tag & 0x80 == 0 {
            // Small item: the End Tag closes the template.
            if (tag >> 3) & 0xf == 0xf {
                break;
            }
            i += 1 + usize::from(tag & 7);
            continue;
        }
        let Some(len) = crs.get(i + 1..i + 3) else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let Some(d) = crs.get(i..i + 3 + len) else {
            break;
        };
        let u32_at = |o: usize| u64::from(u32::from_le_bytes(d[o..o + 4].try_into().unwrap()));
        let u64_at = |o: usize| u64::from_le_bytes(d[o..o + 8].try_into().unwrap());
        // Resource type 0: memory range.
        let window = match tag {
            0x87 if len >= 0x17 && d[3] == 0 => Some((u32_at(10), u32_at(14))),
            0x8a if len >= 0x2b && d[3] == 0 => Some((u64_at(14), u64_at(22))),
            _ => None,
        };
        if let Some((min, max)) = window.filter(|(min, max)| min <= max) {
            let win = Window {
                start: min,
                size: (max - min).saturating_add(1),
                prefetchable: (d[5] >> 1) & 3 == 3,
            };
            if max < 1 << 32 {
                w.mmio32.get_or_insert(win);
            } else {
                w.mmio64.get_or_insert(win);
            }
        }
        i += 3 + len;
    }
    w
}

/// The bytes of `Name(_CRS, Buffer(...) {...})` after the first `_HID` EISAID PNP0A08.
fn host_bridge_crs(aml: &[u8]) -> Option<&[u8]> {
    const PNP0A08: [u8; 5] = [0x0c, 0x41, 0xd0, 0x0a, 0x08];
    let dev = aml.windows(5).position(|w| w == PNP0A08)?;
    let rest = &aml[dev..];
    // NameOp "_CRS" BufferOp
    let at = rest.windows(6).position(|w| w == b"\x08_CRS\x11")?;
    let p = &rest[at + 6..];
    // PkgLength (counts itself): the top two bits of the lead byte give the number of extra
    // bytes, which hold the length's upper bits.
    let lead = *p.first()?;
    let extra = usize::from(lead >> 6);
    let mut pkg_len = usize::from(if extra == 0 { lead & 0x3f } else { lead & 0xf });
    for k in 0..extra {
        pkg_len |= usize::from(*p.get(1 + k)?) << (4 + 8 * k);
    }
    let body = p.get(1 + extra..pkg_len)?;
    // BufferSize, then the bytes.
    let size = aml_int(body)?;
    let int_len = match body[0] {
        0x0a => 2,
        0x0b => 3,
        0x0c => 5,
        _ => 1,
    };
    let bytes = &body[int_len..];
    bytes.get(..usize::try_from(size).ok()?.min(bytes.len()))
}

fn write_reg(reg: &GenericAddress, value: u64) -> bool {
    match reg.address_space {
        AddressSpace::SystemIo => {
            let port = reg.address as u16;
            match reg.bit_width {
                16 => svc::outw(port, value as u16),
                32 => svc::outl(port, value as u32),
                _ => svc::outb(port, value as u8),
            }
            true
        }
        AddressSpace::SystemMemory => {
            // SAFETY: a FADT register in the identity-mapped, user-accessible address space.
            unsafe {
                match reg.bit_width {
                    16 => core::ptr::write_volatile(reg.address as *mut u16, value as u16),
                    32 => core::ptr::write_volatile(reg.address as *mut u32, value as u32),
                    64 => core::ptr::write_volatile(reg.address as *mut u64, value),
                    _ => core::ptr::write_volatile(reg.address as *mut u8, value as u8),
                }
            }
            true
        }
        _ => false,
    }
}

/// Powers off through the FADT sleep control register. Returns only on failure
/// (an error string), or if the VMM ignored the write.
pub fn power_off(info: Option<&AcpiInfo>) -> &'static str {
    let Some(info) = info else {
        return "no ACPI tables";
    };
    let Some(reg) = info.sleep_control.as_ref() else {
        return "FADT has no SLEEP_CONTROL_REG";
    };
    let Some(typ) = info.slp_typ_s5 else {
        return "DSDT has no \\_S5_";
    };
    if !write_reg(reg, (u64::from(typ & 7) << 2) | 0x20) {
        return "SLEEP_CONTROL_REG in an unsupported address space";
    }
    "power off request ignored"
}

/// Resets through the FADT reset register. Returns only on failure.
pub fn reset(info: Option<&AcpiInfo>) -> &'static str {
    let Some(info) = info else {
        return "no ACPI tables";
    };
    let Some(reg) = info.reset_reg.as_ref() else {
        return "FADT has no RESET_REG";
    };
    if !write_reg(reg, info.reset_value.into()) {
        return "RESET_REG in an unsupported address space";
    }
    "reset request ignored"
}
