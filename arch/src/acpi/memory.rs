//! Memory hotplug by ACPI, in the original's shape (`hotplug_method=acpi`): `\_SB_.MHPC`
//! (PNP0A06), the memory hotplug controller's registers (`devices::memory_hotplug`) as fields
//! of a SystemMemory region (`MHBL`/`MHBH` base, `MHLL`/`MHLH` length, `MHPX`, `MSEL` to select
//! a slot, `MEN_`, `MINS`, `MRMV`, `MEJ0`), its methods `MSCN` (the GED's `_EVT` calls it on
//! its memory bit: each slot being inserted is notified with 1 and acknowledged), `MTFY`,
//! `MSTA` and `MCRS`, and one memory device `Mxxx` (PNP0C80) per slot whose `_STA` and `_CRS`
//! (a QWordMemory range built from the registers) come from them.

use acpi_tables::aml;
use acpi_tables::Aml;

use super::{mmio_controller_head, to_bytes, Raw};
use crate::layout;

/// The controller's path, as `_EVT` calls its `MSCN`.
pub(super) const MEMORY_CONTROLLER: &str = "\\_SB_.MHPC";

/// `M000` ... (hexadecimal).
pub fn memory_device_name(slot: u32) -> String {
    format!("M{slot:03X}")
}

/// `\_SB_.MHPC` with `slots` memory devices.
pub(super) fn controller(slots: u32) -> Raw {
    let head = mmio_controller_head(
        "Memory Hotplug Controller",
        "MLCK",
        layout::MEMORY_HOTPLUG_START.0,
        layout::MEMORY_HOTPLUG_SIZE,
        "MHPR",
    );
    let reads = aml::Field::new(
        "MHPR".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            aml::FieldEntry::Named(*b"MHBL", 32),
            aml::FieldEntry::Named(*b"MHBH", 32),
            aml::FieldEntry::Named(*b"MHLL", 32),
            aml::FieldEntry::Named(*b"MHLH", 32),
            aml::FieldEntry::Named(*b"MHPX", 32),
        ],
    );
    let flags = aml::Field::new(
        "MHPR".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(160),
            aml::FieldEntry::Named(*b"MEN_", 1),
            aml::FieldEntry::Named(*b"MINS", 1),
            aml::FieldEntry::Named(*b"MRMV", 1),
            aml::FieldEntry::Named(*b"MEJ0", 1),
        ],
    );
    let select = aml::Field::new(
        "MHPR".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![aml::FieldEntry::Named(*b"MSEL", 32)],
    );
    let (msel, men, mins) = (
        aml::Path::new("MSEL"),
        aml::Path::new("MEN_"),
        aml::Path::new("MINS"),
    );
    let acquire = aml::Acquire::new("MLCK".into(), 0xffff);
    let release = aml::Release::new("MLCK".into());

    // MTFY (slot, type): Notify (Mxxx, type).
    let mut notifies = Vec::new();
    for slot in 0..slots {
        let path = aml::Path::new(&memory_device_name(slot));
        let is = aml::Equal::new(&aml::Arg(0), &slot);
        let notify = aml::Notify::new(&path, &aml::Arg(1));
        aml::If::new(&is, vec![&notify]).to_aml_bytes(&mut notifies);
    }
    let notifies = Raw(notifies);
    let mtfy = aml::Method::new("MTFY".into(), 2, true, vec![&notifies]);

    // MSCN: notify (and acknowledge) each slot being inserted.
    let zero = aml::Store::new(&aml::Local(0), &aml::ZERO);
    let select_local = aml::Store::new(&msel, &aml::Local(0));
    let inserting = aml::Equal::new(&mins, &aml::ONE);
    let check = aml::MethodCall::new("MTFY".into(), vec![&aml::Local(0), &aml::ONE]);
    let ack = aml::Store::new(&mins, &aml::ONE);
    let on_insert = aml::If::new(&inserting, vec![&check, &ack]);
    let next = aml::Add::new(&aml::Local(0), &aml::Local(0), &aml::ONE);
    let more = aml::LessThan::new(&aml::Local(0), &slots);
    let walk = aml::While::new(&more, vec![&select_local, &on_insert, &next]);
    let mscn = aml::Method::new(
        "MSCN".into(),
        0,
        true,
        vec![&acquire, &zero, &walk, &release],
    );

    // MSTA (slot): 0xf when the slot holds memory, else 0.
    let select_arg = aml::Store::new(&msel, &aml::Arg(0));
    let present = aml::Equal::new(&men, &aml::ONE);
    let sta_f = aml::Store::new(&aml::Local(0), &0xfu8);
    let if_present = aml::If::new(&present, vec![&sta_f]);
    let ret0 = aml::Return::new(&aml::Local(0));
    let msta = aml::Method::new(
        "MSTA".into(),
        1,
        true,
        vec![&acquire, &select_arg, &zero, &if_present, &release, &ret0],
    );

    // MCRS (slot): a QWordMemory range from the base and length registers.
    let template = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        0u64,
        0xffff_ffff_ffff_fffeu64,
        None,
    );
    let mr64 = aml::Name::new("MR64".into(), &aml::ResourceTemplate::new(vec![&template]));
    let (mr64_path, minl, maxl, lenl) = (
        aml::Path::new("MR64"),
        aml::Path::new("MINL"),
        aml::Path::new("MAXL"),
        aml::Path::new("LENL"),
    );
    // _MIN, _MAX and _LEN of a QWordMemory descriptor are at bytes 14, 22 and 38.
    let (o14, o22, o38) = (14u8, 22u8, 38u8);
    let f_min = aml::CreateQWordField::new(&minl, &mr64_path, &o14);
    let f_max = aml::CreateQWordField::new(&maxl, &mr64_path, &o22);
    let f_len = aml::CreateQWordField::new(&lenl, &mr64_path, &o38);
    let (mhbl, mhbh, mhll, mhlh) = (
        aml::Path::new("MHBL"),
        aml::Path::new("MHBH"),
        aml::Path::new("MHLL"),
        aml::Path::new("MHLH"),
    );
    // The sums are made in locals and only then stored into the buffer fields: ACPI lets a
    // buffer field be an operand, but not every interpreter does (the `acpi` crate's, which
    // the test guest runs, refuses it), and locals say the same to all of them.
    let thirty_two = 32u8;
    let base_high = aml::ShiftLeft::new(&aml::Local(1), &mhbh, &thirty_two);
    let base_all = aml::Or::new(&aml::Local(1), &aml::Local(1), &mhbl);
    let len_high = aml::ShiftLeft::new(&aml::Local(2), &mhlh, &thirty_two);
    let len_all = aml::Or::new(&aml::Local(2), &aml::Local(2), &mhll);
    let end = aml::Add::new(&aml::Local(3), &aml::Local(1), &aml::Local(2));
    let last = aml::Subtract::new(&aml::Local(3), &aml::Local(3), &aml::ONE);
    let base = aml::Store::new(&minl, &aml::Local(1));
    let len = aml::Store::new(&lenl, &aml::Local(2));
    let max = aml::Store::new(&maxl, &aml::Local(3));
    let ret = aml::Return::new(&mr64_path);
    let mcrs = aml::Method::new(
        "MCRS".into(),
        1,
        true,
        vec![
            &acquire,
            &select_arg,
            &mr64,
            &f_min,
            &f_max,
            &f_len,
            &base_high,
            &base_all,
            &len_high,
            &len_all,
            &end,
            &last,
            &base,
            &len,
            &max,
            &release,
            &ret,
        ],
    );

    let mut devices = Vec::new();
    for slot in 0..slots {
        let sta = aml::MethodCall::new("MSTA".into(), vec![&slot]);
        let crs = aml::MethodCall::new("MCRS".into(), vec![&slot]);
        aml::Device::new(
            memory_device_name(slot).as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C80")),
                &aml::Name::new("_UID".into(), &slot),
                &aml::Method::new("_STA".into(), 0, false, vec![&aml::Return::new(&sta)]),
                &aml::Method::new("_CRS".into(), 0, false, vec![&aml::Return::new(&crs)]),
            ],
        )
        .to_aml_bytes(&mut devices);
    }
    let devices = Raw(devices);
    Raw(to_bytes(&aml::Device::new(
        "MHPC".into(),
        vec![
            &head, &reads, &flags, &select, &mtfy, &mscn, &msta, &mcrs, &devices,
        ],
    )))
}
