//! The AML of PCI hotplug, in the original's shape (see `devices::pci_hotplug` for the
//! registers):
//!
//! - `\_SB_.PHPR` (PNP0A06): the controller's four registers as fields `PCIU`, `PCID`, `B0EJ`
//!   and `PSEG` of a SystemMemory region, `PCEJ (slot, segment)` to eject a slot and `PSCN` to
//!   scan every segment, which the GED's `_EVT` calls on its PCI bit.
//! - In each host bridge: a `Snnn` device per slot (decimal; 1-31 on segment 0, whose slot 0 is
//!   the host bridge, 0-31 on the others) (`_ADR`, `_SUN`, `_EJ0` calling `PCEJ`),
//!   `DVNT (bitmap, type)` notifying the slots of a bitmap, and `PCNT`, which notifies the
//!   added slots with 1 (device check) and those to remove with 3 (eject request).

use acpi_tables::aml;
use acpi_tables::Aml;

use super::{mmio_controller_head, to_bytes, Raw};
use crate::layout;

/// The controller's path, as `_EVT` and the slots' `_EJ0` call it.
pub(super) const PCI_HOTPLUG_DEVICE: &str = "\\_SB_.PHPR";

/// Slots past the last on a bus.
const SLOTS_END: u8 = 32;

/// `\_SB_.PHPR`, scanning the host bridges of `segments` (device `PCxx` for segment xx).
pub(super) fn controller(segments: &[u16]) -> Raw {
    let head = mmio_controller_head(
        "PCI Hotplug Controller",
        "BLCK",
        layout::PCI_HOTPLUG_START.0,
        layout::PCI_HOTPLUG_SIZE,
        "PCST",
    );
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    // PCEJ (slot, segment): under the lock, select the segment, then write the slot's bit.
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let (pseg, b0ej) = (aml::Path::new("PSEG"), aml::Path::new("B0EJ"));
    let select = aml::Store::new(&pseg, &aml::Arg(1));
    let eject = aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
    let release = aml::Release::new("BLCK".into());
    let ret = aml::Return::new(&aml::ZERO);
    let pcej = aml::Method::new(
        "PCEJ".into(),
        2,
        true,
        vec![&acquire, &select, &eject, &release, &ret],
    );
    // PSCN: for each segment, select it and let its bridge notify its slots.
    let mut scan = Vec::new();
    for &segment in segments {
        let seg = u32::from(segment);
        aml::Store::new(&aml::Path::new("PSEG"), &seg).to_aml_bytes(&mut scan);
        let pcnt = format!("\\_SB_.PC{:02X}.PCNT", segment & 0xff);
        aml::MethodCall::new(pcnt.as_str().into(), vec![]).to_aml_bytes(&mut scan);
    }
    let scan = Raw(scan);
    let pscn = aml::Method::new("PSCN".into(), 0, true, vec![&scan]);
    Raw(to_bytes(&aml::Device::new(
        "PHPR".into(),
        vec![
            &head,
            &aml::Name::new("_STA".into(), &0x0bu8),
            &field,
            &pcej,
            &pscn,
        ],
    )))
}

/// The slot devices (from `first_slot`: 1 where slot 0 holds the host bridge) and the
/// notification methods that go inside a host bridge's scope.
pub(super) fn bridge_objects(first_slot: u8) -> Raw {
    let slots = first_slot..SLOTS_END;
    let mut out = Vec::new();
    let (sun_path, seg_path) = (aml::Path::new("_SUN"), aml::Path::new("_SEG"));
    for slot in slots.clone() {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let call = aml::MethodCall::new(
            format!("{PCI_HOTPLUG_DEVICE}.PCEJ").as_str().into(),
            vec![&sun_path, &seg_path],
        );
        let ej0 = aml::Method::new("_EJ0".into(), 1, true, vec![&call]);
        aml::Device::new(
            slot_name(slot).as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &adr),
                &aml::Name::new("_SUN".into(), &sun),
                &ej0,
            ],
        )
        .to_aml_bytes(&mut out);
    }
    // DVNT (bitmap, type): Notify (Snnn, type) for each slot whose bit is set.
    let mut tests = Vec::new();
    for slot in slots {
        let bit = 1u32 << slot;
        let path = aml::Path::new(&slot_name(slot));
        let masked = aml::And::new(&aml::Local(0), &aml::Arg(0), &bit);
        let set = aml::Equal::new(&masked, &bit);
        let notify = aml::Notify::new(&path, &aml::Arg(1));
        aml::If::new(&set, vec![&notify]).to_aml_bytes(&mut tests);
    }
    let tests = Raw(tests);
    aml::Method::new("DVNT".into(), 2, true, vec![&tests]).to_aml_bytes(&mut out);
    let pciu = aml::Path::new(&format!("{PCI_HOTPLUG_DEVICE}.PCIU"));
    let pcid = aml::Path::new(&format!("{PCI_HOTPLUG_DEVICE}.PCID"));
    let added = aml::MethodCall::new("DVNT".into(), vec![&pciu, &aml::ONE]);
    let eject_request = 3u8;
    let removed = aml::MethodCall::new("DVNT".into(), vec![&pcid, &eject_request]);
    aml::Method::new("PCNT".into(), 0, true, vec![&added, &removed]).to_aml_bytes(&mut out);
    Raw(out)
}

/// `S000` ... `S031` (decimal, as the original names them).
pub(super) fn slot_name(slot: u8) -> String {
    format!("S{slot:03}")
}
