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
        // SAFETY: the page tables identity-map the first 8 GiB, so the physical
        // address is also a valid virtual address for `size` bytes.
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
    pub dsdt: Option<(u64, u32)>,
    pub slp_typ_s5: Option<u8>,
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
    }
    if let Ok(dsdt) = tables.dsdt() {
        info.dsdt = Some((dsdt.address as u64, dsdt.length));
        // SAFETY: the AML stream lies inside the validated DSDT.
        let aml =
            unsafe { core::slice::from_raw_parts(dsdt.address as *const u8, dsdt.length as usize) };
        info.slp_typ_s5 = find_s5(aml);
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

/// Decodes an AML integer constant (ZeroOp, OneOp, OnesOp, Byte/Word/DWordPrefix).
fn aml_int(b: &[u8]) -> Option<u64> {
    match *b.first()? {
        0x00 => Some(0),
        0x01 => Some(1),
        0xff => Some(u64::MAX),
        0x0a => b.get(1).map(|&v| v.into()),
        0x0b => Some(u16::from_le_bytes([*b.get(1)?, *b.get(2)?]).into()),
        0x0c => Some(u32::from_le_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]).into()),
        _ => None,
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
