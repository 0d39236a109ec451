//! The PCI hot-plug controller of the original Cloud Hypervisor's ACPI mechanism, found in the
//! namespace the AML interpreter built (aml.rs): `Device (\_SB_.PHPR)` (`_HID` PNP0A06) with
//! the fields `PCIU` (slots added), `PCID` (slots whose removal the host asks for), `B0EJ` and
//! `PSEG` on its `PCST` region, and the methods `PCEJ` and `PSCN`; and in the host bridge
//! (`\_SB_.PC00`, the PNP0A08 device of segment 0) a `Device` per slot with `_ADR` = slot << 16,
//! `_SUN` = slot and `_EJ0`, and `PCNT`.
//!
//! `PSCN` ends in `Notify`, which the interpreter cannot run, so the guest reads PCIU and PCID
//! itself (PSEG selecting the segment) through the fields; a slot is ejected by evaluating its
//! `_EJ0` with the interpreter.

use alloc::format;
use alloc::string::String;

use crate::aml::{hid, Aml, Field};

/// PHPR's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phpr {
    pub pciu: Field,
    pub pcid: Field,
    pub b0ej: Field,
    pub pseg: Field,
}

/// Finds `\_SB_.PHPR`, its methods and its registers.
pub fn find(aml: &Aml) -> Result<Phpr, String> {
    aml.check_device("\\_SB_.PHPR", "PNP0A06", &["PCEJ", "PSCN"])?;
    let f = |n: &str| -> Result<Field, String> {
        let f = aml.field(&format!("\\_SB_.PHPR.{n}"))?;
        if f.io || f.bits != 32 || f.bit != 0 {
            return Err(format!("{n}: {f:?}, not a 32-bit memory register"));
        }
        Ok(f)
    };
    Ok(Phpr {
        pciu: f("PCIU")?,
        pcid: f("PCID")?,
        b0ej: f("B0EJ")?,
        pseg: f("PSEG")?,
    })
}

/// The host bridge of `segment`: the PNP0A08 device in `\_SB_` whose `_SEG` is `segment` (0
/// when absent).
pub fn bridge(aml: &Aml, segment: u16) -> Result<String, String> {
    for dev in aml.devices("\\_SB_")? {
        if hid(aml, &dev).is_ok_and(|h| h == "PNP0A08") {
            let seg_path = format!("{dev}._SEG");
            let seg = if aml.exists(&seg_path) {
                aml.int(&seg_path)?
            } else {
                0
            };
            if seg == u64::from(segment) {
                if !aml.exists(&format!("{dev}.PCNT")) {
                    return Err(format!("{dev} has no PCNT"));
                }
                return Ok(dev);
            }
        }
    }
    Err(format!("no PNP0A08 host bridge of segment {segment}"))
}

/// The slot device of `slot` in `bridge` (`_ADR` = slot << 16, `_SUN` = slot, with `_EJ0`),
/// found by evaluating each device's `_ADR`.
pub fn slot_device(aml: &Aml, bridge: &str, slot: u8) -> Result<String, String> {
    let adr = u64::from(slot) << 16;
    for dev in aml.devices(bridge)? {
        if aml.int(&format!("{dev}._ADR")).ok() != Some(adr) {
            continue;
        }
        let sun = aml.int(&format!("{dev}._SUN"))?;
        if sun != u64::from(slot) {
            return Err(format!("{dev}: _SUN {sun}, expected {slot}"));
        }
        if !aml.exists(&format!("{dev}._EJ0")) {
            return Err(format!("{dev} has no _EJ0"));
        }
        return Ok(dev);
    }
    Err(format!("no device with _ADR {adr:#x} in {bridge}"))
}
