//! The PCI hot-plug controller of the original Cloud Hypervisor's ACPI mechanism, decoded from
//! the DSDT bytes: `Device (\_SB_.PHPR)` (`_HID` PNP0A06) with `OperationRegion (PCST,
//! SystemMemory, base, len)`, `Field (PCST, DWordAcc, …) { PCIU, 32, PCID, 32, B0EJ, 32, PSEG,
//! 32 }` and the methods `PCEJ` and `PSCN`; and in the host bridge (`\_SB_.PC00`, the
//! PNP0A08 device of segment 0) a `Device` per slot with `_ADR` = slot << 16, `_SUN` = slot and
//! `_EJ0`, which calls `\_SB_.PHPR.PCEJ`, and `PCNT`.
//!
//! This guest has no AML interpreter (see acpi_sys.rs), so it checks that these objects exist
//! and does what their methods do itself: `PSCN` reads PCIU and PCID with PSEG selecting the
//! segment, `PCEJ` writes PSEG and then B0EJ.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::acpi_sys::{aml_int_len, name_string, pkg_length};

/// PHPR's register block: where PCST lies and the byte offsets of its four fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phpr {
    pub base: u64,
    pub len: u64,
    pub pciu: u64,
    pub pcid: u64,
    pub b0ej: u64,
    pub pseg: u64,
}

/// A named block of AML (a `Device` or a `Scope`): its name's segments and its body (the bytes
/// after the name, to the end of its PkgLength).
pub struct Block<'a> {
    pub segs: Vec<[u8; 4]>,
    pub body: &'a [u8],
}

impl Block<'_> {
    pub fn named(&self, name: &[u8; 4]) -> bool {
        self.segs.last() == Some(name)
    }
}

/// Every block that starts with `op` (`[0x5b, 0x82]`: Device; `[0x10]`: Scope) in `aml`,
/// nested ones included, found by a byte scan and kept only when its PkgLength and name make
/// sense.
fn blocks<'a>(aml: &'a [u8], op: &'static [u8]) -> impl Iterator<Item = Block<'a>> + 'a {
    let mut i = 0;
    core::iter::from_fn(move || {
        while let Some(at) = aml.get(i..)?.windows(op.len()).position(|w| w == op) {
            let start = i + at + op.len();
            i = start;
            let Some((len, n)) = aml.get(start..).and_then(pkg_length) else {
                continue;
            };
            let end = start + len;
            let Some((segs, name_len)) = aml.get(start + n..).and_then(name_string) else {
                continue;
            };
            let body = start + n + name_len;
            if segs.is_empty() || body > end || end > aml.len() {
                continue;
            }
            return Some(Block {
                segs,
                body: &aml[body..end],
            });
        }
        None
    })
}

pub fn devices(aml: &[u8]) -> impl Iterator<Item = Block<'_>> {
    blocks(aml, &[0x5b, 0x82])
}

pub(crate) fn contains(b: &[u8], what: &[u8]) -> bool {
    b.windows(what.len()).any(|w| w == what)
}

/// The code of `Method (name, …)` in `body` (after its flags byte).
pub(crate) fn method<'a>(body: &'a [u8], name: &[u8; 4]) -> Option<&'a [u8]> {
    let mut i = 0;
    while let Some(at) = body.get(i..)?.iter().position(|&b| b == 0x14) {
        let m = i + at + 1;
        i = m;
        let Some((len, n)) = body.get(m..).and_then(pkg_length) else {
            continue;
        };
        let Some((segs, name_len)) = body.get(m + n..).and_then(name_string) else {
            continue;
        };
        let (code, end) = (m + n + name_len + 1, m + len);
        if segs.last() == Some(name) && code <= end && end <= body.len() {
            return Some(&body[code..end]);
        }
    }
    None
}

/// The value of `Name (name, <integer constant>)` in `body`.
pub(crate) fn name_int(body: &[u8], name: &[u8; 4]) -> Option<u64> {
    let mut pat = [0x08u8; 5];
    pat[1..].copy_from_slice(name);
    let at = body.windows(5).position(|w| w == pat)?;
    aml_int_len(&body[at + 5..]).map(|(v, _)| v)
}

/// `OperationRegion (name, space, offset, length)` in `body`: (space, offset, length).
pub(crate) fn op_region(body: &[u8], name: &[u8; 4]) -> Option<(u8, u64, u64)> {
    let mut pat = [0u8; 6];
    pat[..2].copy_from_slice(&[0x5b, 0x80]);
    pat[2..].copy_from_slice(name);
    let at = body.windows(6).position(|w| w == pat)? + 6;
    let space = *body.get(at)?;
    let (offset, n) = aml_int_len(body.get(at + 1..)?)?;
    let (len, _) = aml_int_len(body.get(at + 1 + n..)?)?;
    Some((space, offset, len))
}

/// A field unit: (name, bit offset, bit width).
pub(crate) type FieldUnit = ([u8; 4], usize, usize);

/// `Field (region, flags) { … }` in `body`: its flags and named units.
fn field(body: &[u8], region: &[u8; 4]) -> Option<(u8, Vec<FieldUnit>)> {
    field_units(blocks(body, &[0x5b, 0x81]).find(|b| b.named(region))?.body)
}

/// Every `Field (region, flags) { … }` in `body` (a region may have several): the flags and
/// named units of each that decodes.
pub(crate) fn fields<'a>(
    body: &'a [u8],
    region: &'a [u8; 4],
) -> impl Iterator<Item = (u8, Vec<FieldUnit>)> + 'a {
    blocks(body, &[0x5b, 0x81])
        .filter(|b| b.named(region))
        .filter_map(|b| field_units(b.body))
}

/// A field's flags byte and units list: the flags and named units.
fn field_units(f: &[u8]) -> Option<(u8, Vec<FieldUnit>)> {
    let (&flags, list) = f.split_first()?;
    let (mut p, mut bit, mut units) = (0, 0, Vec::new());
    while p < list.len() {
        match list[p] {
            // ReservedField: a PkgLength of bits.
            0x00 => {
                let (w, n) = pkg_length(list.get(p + 1..)?)?;
                bit += w;
                p += 1 + n;
            }
            // AccessField (type, attribute); ExtendedAccessField (type, attribute, length).
            0x01 => p += 3,
            0x03 => p += 4,
            // ConnectField: not in a PHPR.
            0x02 => return None,
            _ => {
                let seg: [u8; 4] = list.get(p..p + 4)?.try_into().ok()?;
                let (w, n) = pkg_length(list.get(p + 4..)?)?;
                units.push((seg, bit, w));
                bit += w;
                p += 4 + n;
            }
        }
    }
    Some((flags, units))
}

/// `_HID` EISAID ("PNP0A06"): NameOp, "_HID", DWordPrefix, the compressed ID.
pub(crate) const HID_PNP0A06: [u8; 10] =
    [0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x06];

/// Finds `\_SB_.PHPR` in the DSDT and decodes its register block.
pub fn find(aml: &[u8]) -> Result<Phpr, String> {
    let dev = devices(aml)
        .find(|d| d.named(b"PHPR"))
        .ok_or("no Device (PHPR)")?;
    if !contains(dev.body, &HID_PNP0A06) {
        return Err("PHPR's _HID is not EISAID (\"PNP0A06\")".into());
    }
    let pcej = method(dev.body, b"PCEJ").ok_or("PHPR has no Method (PCEJ)")?;
    if !contains(pcej, b"PSEG") || !contains(pcej, b"B0EJ") {
        return Err("PCEJ does not write PSEG and B0EJ".into());
    }
    let pscn = method(dev.body, b"PSCN").ok_or("PHPR has no Method (PSCN)")?;
    if !contains(pscn, b"PCNT") {
        return Err("PSCN does not call PCNT".into());
    }
    let (space, base, len) =
        op_region(dev.body, b"PCST").ok_or("PHPR has no OperationRegion (PCST)")?;
    if space != 0 {
        return Err(format!(
            "PCST is in address space {space}, not SystemMemory"
        ));
    }
    let (flags, units) = field(dev.body, b"PCST").ok_or("PHPR has no Field (PCST)")?;
    if flags & 0xf != 3 {
        return Err(format!("PCST's Field flags {flags:#x}: not DWordAcc"));
    }
    let offset = |name: &[u8; 4]| -> Result<u64, String> {
        let shown = core::str::from_utf8(name).unwrap_or("?");
        match units.iter().find(|u| u.0 == *name) {
            Some(&(_, bit, 32)) if bit % 32 == 0 && (bit / 8 + 4) as u64 <= len => {
                Ok(bit as u64 / 8)
            }
            Some(&(_, bit, width)) => Err(format!(
                "field {shown} at bit {bit}, {width} bits: not a dword in the region"
            )),
            None => Err(format!("Field (PCST) has no {shown}")),
        }
    };
    Ok(Phpr {
        base,
        len,
        pciu: offset(b"PCIU")?,
        pcid: offset(b"PCID")?,
        b0ej: offset(b"B0EJ")?,
        pseg: offset(b"PSEG")?,
    })
}

/// `_HID` EISAID ("PNP0A08"): a PCI Express host bridge.
const HID_PNP0A08: [u8; 10] = [0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08];

/// Checks that segment 0's host bridge (the PNP0A08 device with `_SEG` 0 or none, `PC00` as
/// the original names it) has `PCNT` and a slot device for `slot` (`_ADR` = slot << 16, `_SUN`
/// = slot) whose `_EJ0` calls `PCEJ`; returns "bridge.device".
pub fn slot_device(aml: &[u8], slot: u8) -> Result<String, String> {
    let bridge = devices(aml)
        .find(|d| contains(d.body, &HID_PNP0A08) && name_int(d.body, b"_SEG").unwrap_or(0) == 0)
        .ok_or("no PNP0A08 host bridge of segment 0")?;
    let bridge_name = String::from_utf8_lossy(bridge.segs.last().expect("named")).into_owned();
    if method(bridge.body, b"PCNT").is_none() {
        return Err(format!("{bridge_name} has no Method (PCNT)"));
    }
    let adr = u64::from(slot) << 16;
    let dev = devices(bridge.body)
        .find(|d| name_int(d.body, b"_ADR") == Some(adr))
        .ok_or_else(|| format!("no Device with _ADR {adr:#x} in {bridge_name}"))?;
    let name = format!(
        "{bridge_name}.{}",
        String::from_utf8_lossy(dev.segs.last().expect("named"))
    );
    let sun = name_int(dev.body, b"_SUN");
    if sun != Some(u64::from(slot)) {
        return Err(format!("{name}: _SUN {sun:?}, expected {slot}"));
    }
    let ej0 = method(dev.body, b"_EJ0").ok_or_else(|| format!("{name} has no _EJ0"))?;
    if !contains(ej0, b"PCEJ") {
        return Err(format!("{name}._EJ0 does not call PCEJ"));
    }
    Ok(name)
}
