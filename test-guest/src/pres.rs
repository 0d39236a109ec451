//! The CPU hot-plug controller of the original Cloud Hypervisor's ACPI mechanism, decoded from
//! the DSDT bytes: `Device (\_SB_.PRES)` (`_HID` PNP0A06) with `OperationRegion (PRST,
//! SystemMemory, base, len)` and two fields on it, `Field (PRST, ByteAcc, NoLock,
//! WriteAsZeros) { Offset (4), CPEN, 1, CINS, 1, CRMV, 1, CEJ0, 1, … }` and `Field (PRST,
//! DWordAcc, …) { CSEL, 32, … }`; the processor container `\_SB_.CPUS` (`_HID` "ACPI0010")
//! with `CSTA`, `CTFY`, `CEJ0` and `CSCN`; and in it a `Device (Cxxx)` per possible CPU
//! (`_HID` "ACPI0007", `_UID`, `_STA` → `CSTA`, `_MAT` (its MADT entry), `_EJ0` → `CEJ0`).
//!
//! As for PCI hot plug (phpr.rs), this guest has no AML interpreter: it checks that these
//! objects are there and does what `CSCN` (select each CPU with CSEL, read CINS/CRMV, write 1
//! to acknowledge), `CSTA` (CPEN) and `CEJ0` (select, write CEJ0) do itself.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::acpi_sys::{aml_int_len, pkg_length};
use crate::phpr::{contains, devices, fields, method, name_int, op_region, HID_PNP0A06};

/// PRES's register block: where PRST lies, the byte offset of CSEL, and the byte and bit of
/// each flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pres {
    pub base: u64,
    pub len: u64,
    /// Byte offset of the 32-bit CSEL.
    pub csel: u64,
    /// Byte offset of the flags byte (CPEN, CINS, CRMV and CEJ0 all lie in it).
    pub flags: u64,
    /// The flag masks within that byte.
    pub cpen: u8,
    pub cins: u8,
    pub crmv: u8,
    pub cej0: u8,
}

/// One `\_SB_.CPUS.Cxxx` device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuDevice {
    /// "Cxxx".
    pub name: String,
    /// `_UID`: the CPU number (what CSEL selects).
    pub uid: u32,
    /// The APIC ID of its `_MAT` (a local APIC or local x2APIC entry).
    pub apic_id: u32,
    /// Whether `_EJ0` calls `CEJ0` and `_STA` calls `CSTA`.
    pub ejectable: bool,
}

/// `Name (_HID, "ACPI0010")`: NameOp, "_HID", StringPrefix, the string, NUL.
const HID_ACPI0010: &[u8] = b"\x08_HID\x0dACPI0010\x00";
/// `Name (_HID, "ACPI0007")`.
const HID_ACPI0007: &[u8] = b"\x08_HID\x0dACPI0007\x00";

/// Finds `\_SB_.PRES` in the DSDT and decodes its register block.
pub fn find(aml: &[u8]) -> Result<Pres, String> {
    let dev = devices(aml)
        .find(|d| d.named(b"PRES"))
        .ok_or("no Device (PRES)")?;
    if !contains(dev.body, &HID_PNP0A06) {
        return Err("PRES's _HID is not EISAID (\"PNP0A06\")".into());
    }
    let (space, base, len) =
        op_region(dev.body, b"PRST").ok_or("PRES has no OperationRegion (PRST)")?;
    if space != 0 {
        return Err(format!(
            "PRST is in address space {space}, not SystemMemory"
        ));
    }
    let all: Vec<_> = fields(dev.body, b"PRST").collect();
    if all.is_empty() {
        return Err("PRES has no Field (PRST)".into());
    }
    let unit = |name: &[u8; 4]| {
        all.iter()
            .find_map(|(flags, units)| units.iter().find(|u| u.0 == *name).map(|u| (*flags, *u)))
    };
    let shown = |name: &[u8; 4]| String::from_utf8_lossy(name).into_owned();
    let csel = match unit(b"CSEL") {
        Some((flags, (_, bit, 32))) if flags & 0xf == 3 && bit % 32 == 0 => bit as u64 / 8,
        Some((flags, (_, bit, width))) => {
            return Err(format!(
                "CSEL at bit {bit}, {width} bits, field flags {flags:#x}: not a DWordAcc dword"
            ))
        }
        None => return Err("no CSEL in the Fields of PRST".into()),
    };
    let mut byte = None;
    let mut masks = [0u8; 4];
    for (i, name) in [b"CPEN", b"CINS", b"CRMV", b"CEJ0"].into_iter().enumerate() {
        let (flags, (_, bit, width)) =
            unit(name).ok_or_else(|| format!("no {} in the Fields of PRST", shown(name)))?;
        // ByteAcc (1), WriteAsZeros (2 << 5): a flag written alone leaves the others alone.
        if flags & 0xf != 1 || (flags >> 5) & 3 != 2 || width != 1 {
            return Err(format!(
                "{}: {width} bits, field flags {flags:#x}: not a ByteAcc WriteAsZeros bit",
                shown(name)
            ));
        }
        if *byte.get_or_insert(bit / 8) != bit / 8 {
            return Err("CPEN, CINS, CRMV and CEJ0 are not in one byte".into());
        }
        masks[i] = 1 << (bit % 8);
    }
    let flags = byte.expect("four flags") as u64;
    if csel + 4 > len || flags + 1 > len {
        return Err(format!(
            "CSEL at {csel}, flags at {flags}: beyond PRST's {len} bytes"
        ));
    }
    Ok(Pres {
        base,
        len,
        csel,
        flags,
        cpen: masks[0],
        cins: masks[1],
        crmv: masks[2],
        cej0: masks[3],
    })
}

/// The bytes of `Name (name, Buffer (n) { … })` in `body`.
fn name_buffer<'a>(body: &'a [u8], name: &[u8; 4]) -> Option<&'a [u8]> {
    let mut pat = [0x08u8, 0, 0, 0, 0, 0x11];
    pat[1..5].copy_from_slice(name);
    let at = body.windows(6).position(|w| w == pat)? + 6;
    let (len, n) = pkg_length(body.get(at..)?)?;
    let end = at + len;
    let (size, m) = aml_int_len(body.get(at + n..)?)?;
    let data = body.get(at + n + m..end)?;
    data.get(..usize::try_from(size).ok()?)
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
pub fn cpus(aml: &[u8]) -> Result<Vec<CpuDevice>, String> {
    let dev = devices(aml)
        .find(|d| d.named(b"CPUS") && contains(d.body, HID_ACPI0010))
        .ok_or("no Device (CPUS) with _HID \"ACPI0010\"")?;
    for m in [b"CSTA", b"CTFY", b"CEJ0"] {
        if method(dev.body, m).is_none() {
            return Err(format!(
                "CPUS has no Method ({})",
                String::from_utf8_lossy(m)
            ));
        }
    }
    let cej0 = method(dev.body, b"CEJ0").expect("checked");
    if !contains(cej0, b"CSEL") || !contains(cej0, b"CEJ0") {
        return Err("CEJ0 does not write CSEL and CEJ0".into());
    }
    let cscn = method(dev.body, b"CSCN").ok_or("CPUS has no Method (CSCN)")?;
    if !["CSEL", "CINS", "CRMV", "CTFY"]
        .iter()
        .all(|w| contains(cscn, w.as_bytes()))
    {
        return Err("CSCN does not select CPUs, look at CINS and CRMV and call CTFY".into());
    }
    let mut out = Vec::new();
    for d in devices(dev.body).filter(|d| contains(d.body, HID_ACPI0007)) {
        let name = String::from_utf8_lossy(d.segs.last().expect("named")).into_owned();
        let uid = name_int(d.body, b"_UID")
            .and_then(|u| u32::try_from(u).ok())
            .ok_or_else(|| format!("{name} has no integer _UID"))?;
        if name != format!("C{uid:03X}") {
            return Err(format!("{name} has _UID {uid}"));
        }
        let mat = name_buffer(d.body, b"_MAT").ok_or_else(|| format!("{name} has no _MAT"))?;
        let (apic_id, mat_uid) = mat_ids(mat)
            .ok_or_else(|| format!("{name}._MAT {mat:02x?} is no local (x2)APIC entry"))?;
        if mat_uid != uid {
            return Err(format!("{name}._MAT has processor UID {mat_uid}"));
        }
        let sta = method(d.body, b"_STA").is_some_and(|m| contains(m, b"CSTA"));
        let ej0 = method(d.body, b"_EJ0").is_some_and(|m| contains(m, b"CEJ0"));
        out.push(CpuDevice {
            name,
            uid,
            apic_id,
            ejectable: sta && ej0,
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
