//! The CPU hot-plug controller of the original Cloud Hypervisor's ACPI mechanism, found in the
//! namespace the AML interpreter built (aml.rs): `Device (\_SB_.PRES)` (`_HID` PNP0A06) whose
//! fields on its `PRST` region hold `CSEL` (the selected CPU), and the flags `CPEN`, `CINS`,
//! `CRMV` and `CEJ0` of the selected CPU; the processor container `\_SB_.CPUS` (`_HID`
//! "ACPI0010") with `CSTA`, `CTFY`, `CEJ0` and `CSCN`; and in it a `Device (Cxxx)` per possible
//! CPU (`_HID` "ACPI0007", `_UID`, `_STA`, `_MAT` (its MADT entry), `_EJ0`).
//!
//! The guest evaluates `_STA`, `_UID`, `_MAT` and `_EJ0` with the interpreter. `CSCN` ends in
//! `Notify`, which the interpreter cannot run, so the guest does its register walk itself
//! through the fields (see aml.rs).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::aml::{hid, Aml, Field};

/// PRES's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pres {
    pub csel: Field,
    pub cpen: Field,
    pub cins: Field,
    pub crmv: Field,
    pub cej0: Field,
}

/// One `\_SB_.CPUS.Cxxx` device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuDevice {
    /// Its full path, `\_SB_.CPUS.Cxxx`.
    pub path: String,
    /// `_UID`: the CPU number (what CSEL selects).
    pub uid: u32,
    /// The APIC ID of its `_MAT` (a local APIC or local x2APIC entry).
    pub apic_id: u32,
    /// Whether it has `_EJ0`.
    pub ejectable: bool,
}

/// Finds `\_SB_.PRES` and its registers.
pub fn find(aml: &Aml) -> Result<Pres, String> {
    aml.check_device("\\_SB_.PRES", "PNP0A06", &[])?;
    let f = |n: &str| aml.field(&format!("\\_SB_.PRES.{n}"));
    let pres = Pres {
        csel: f("CSEL")?,
        cpen: f("CPEN")?,
        cins: f("CINS")?,
        crmv: f("CRMV")?,
        cej0: f("CEJ0")?,
    };
    if pres.csel.bits != 32 {
        return Err(format!("CSEL has {} bits", pres.csel.bits));
    }
    for (n, fl) in [
        ("CPEN", pres.cpen),
        ("CINS", pres.cins),
        ("CRMV", pres.crmv),
        ("CEJ0", pres.cej0),
    ] {
        if fl.bits != 1 {
            return Err(format!("{n} has {} bits", fl.bits));
        }
    }
    Ok(pres)
}

/// The APIC ID and processor UID of a `_MAT` entry: a local APIC (type 0) or local x2APIC (9).
fn mat_ids(mat: &[u8]) -> Option<(u32, u32)> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(mat.get(o..o + 4)?.try_into().ok()?));
    match (mat.first()?, mat.get(1)?) {
        (0, 8) => Some((u32::from(mat[3]), u32::from(mat[2]))),
        (9, 16) => Some((u32_at(4)?, u32_at(12)?)),
        _ => None,
    }
}

/// Checks `\_SB_.CPUS` and returns its CPU devices, ordered by `_UID`.
pub fn cpus(aml: &Aml) -> Result<Vec<CpuDevice>, String> {
    aml.check_device("\\_SB_.CPUS", "ACPI0010", &["CSTA", "CTFY", "CEJ0", "CSCN"])?;
    let mut out = Vec::new();
    for path in aml.devices("\\_SB_.CPUS")? {
        if hid(aml, &path)? != "ACPI0007" {
            continue;
        }
        let uid = aml.int(&format!("{path}._UID"))?;
        let uid = u32::try_from(uid).map_err(|_| format!("{path}._UID is {uid}"))?;
        if !path.ends_with(&format!("C{uid:03X}")) {
            return Err(format!("{path} has _UID {uid}"));
        }
        let mat = aml.buffer(&format!("{path}._MAT"))?;
        let (apic_id, mat_uid) = mat_ids(&mat)
            .ok_or_else(|| format!("{path}._MAT {mat:02x?} is no local (x2)APIC entry"))?;
        if mat_uid != uid {
            return Err(format!("{path}._MAT has processor UID {mat_uid}"));
        }
        let ejectable = aml.exists(&format!("{path}._EJ0")) && aml.exists(&format!("{path}._STA"));
        out.push(CpuDevice {
            path,
            uid,
            apic_id,
            ejectable,
        });
    }
    out.sort_by_key(|c| c.uid);
    if out.iter().enumerate().any(|(i, c)| c.uid != i as u32) {
        return Err(format!(
            "the CPU devices' _UIDs are not 0..{}: {:?}",
            out.len(),
            out.iter().map(|c| c.uid).collect::<Vec<_>>()
        ));
    }
    Ok(out)
}
