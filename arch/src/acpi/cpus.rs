//! The CPUs in the DSDT, in the original's shape, so that they can be hot-added and removed:
//!
//! - `\_SB_.PRES` (PNP0A06): the CPU hotplug controller's registers (`devices::cpu_hotplug`)
//!   as fields of a SystemMemory region: `CSEL` selects a CPU, then `CPEN` (present), `CINS`
//!   (being inserted), `CRMV` (removal asked) and `CEJ0` (eject) are its flags.
//! - `\_SB_.CPUS` (ACPI0010, a processor container): `CSTA (cpu)` for `_STA`, `CTFY (cpu, type)`
//!   to notify one CPU, `CEJ0 (cpu)` to eject one and `CSCN`, which the GED's `_EVT` calls on its
//!   CPU bit: it notifies each CPU being inserted (1) or to remove (3) and acknowledges it.
//! - `\_SB_.CPUS.Cxxx` (ACPI0007) for each possible CPU: `_UID`, `_STA`, `_MAT` (its MADT entry,
//!   enabled, as Linux wants it for a hot-added CPU), `_EJ0`, and with `--numa` `_PXM` (its
//!   node, which a CPU hot-added after boot is known by: the SRAT is read at boot).

use acpi_tables::aml;
use acpi_tables::Aml;

use super::{madt_cpu_entry, mmio_controller_head, to_bytes, Raw, MADT_CPU_ENABLED};
use crate::layout;

/// The processor container's path, as `_EVT` calls its `CSCN`.
pub(super) const CPU_CONTAINER: &str = "\\_SB_.CPUS";

/// The DSDT name of the CPU device of `cpu`: `C000`, `C001`, ... (hexadecimal), in
/// `\_SB_.CPUS`.
pub fn cpu_device_name(cpu: u32) -> String {
    format!("C{cpu:03X}")
}

/// `\_SB_.PRES`.
pub(super) fn controller() -> Raw {
    let head = mmio_controller_head(
        "CPU Hotplug Controller",
        "CPLK",
        layout::CPU_HOTPLUG_START.0,
        layout::CPU_HOTPLUG_SIZE,
        "PRST",
    );
    let flags = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CPEN", 1),
            aml::FieldEntry::Named(*b"CINS", 1),
            aml::FieldEntry::Named(*b"CRMV", 1),
            aml::FieldEntry::Named(*b"CEJ0", 1),
            aml::FieldEntry::Reserved(4),
            aml::FieldEntry::Named(*b"CCMD", 8),
        ],
    );
    let selection = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::Preserve,
        vec![
            aml::FieldEntry::Named(*b"CSEL", 32),
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CDAT", 32),
        ],
    );
    Raw(to_bytes(&aml::Device::new(
        "PRES".into(),
        vec![&head, &flags, &selection],
    )))
}

/// `\_SB_.CPUS` with its methods and one device per possible CPU; `nodes`: the guest's NUMA
/// nodes, whose vCPUs get `_PXM`.
pub(super) fn container(max_vcpus: u32, nodes: &[super::NumaNode]) -> Raw {
    let lock = "\\_SB_.PRES.CPLK";
    let (csel, cpen, cins, crmv, cej0) = (
        aml::Path::new("\\_SB_.PRES.CSEL"),
        aml::Path::new("\\_SB_.PRES.CPEN"),
        aml::Path::new("\\_SB_.PRES.CINS"),
        aml::Path::new("\\_SB_.PRES.CRMV"),
        aml::Path::new("\\_SB_.PRES.CEJ0"),
    );
    let acquire = aml::Acquire::new(lock.into(), 0xffff);
    let release = aml::Release::new(lock.into());

    // CSTA (cpu): 0xf when present, else 0.
    let select_arg = aml::Store::new(&csel, &aml::Arg(0));
    let zero = aml::Store::new(&aml::Local(0), &aml::ZERO);
    let present = aml::Equal::new(&cpen, &aml::ONE);
    let sta_f = aml::Store::new(&aml::Local(0), &0xfu8);
    let if_present = aml::If::new(&present, vec![&sta_f]);
    let ret = aml::Return::new(&aml::Local(0));
    let csta = aml::Method::new(
        "CSTA".into(),
        1,
        true,
        vec![&acquire, &select_arg, &zero, &if_present, &release, &ret],
    );

    // CTFY (cpu, type): Notify (Cxxx, type) for the CPU given.
    let mut notifies = Vec::new();
    for cpu in 0..max_vcpus {
        let path = aml::Path::new(&cpu_device_name(cpu));
        let is = aml::Equal::new(&aml::Arg(0), &cpu);
        let notify = aml::Notify::new(&path, &aml::Arg(1));
        aml::If::new(&is, vec![&notify]).to_aml_bytes(&mut notifies);
    }
    let notifies = Raw(notifies);
    let ctfy = aml::Method::new("CTFY".into(), 2, true, vec![&notifies]);

    // CEJ0 (cpu): select it, set its eject bit.
    let eject = aml::Store::new(&cej0, &aml::ONE);
    let cej0_method = aml::Method::new(
        "CEJ0".into(),
        1,
        true,
        vec![&acquire, &select_arg, &eject, &release],
    );

    // CSCN: for each CPU, notify (and acknowledge) an insertion or a removal request.
    let select_local = aml::Store::new(&csel, &aml::Local(0));
    let inserting = aml::Equal::new(&cins, &aml::ONE);
    let check = aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &aml::ONE]);
    let ack_insert = aml::Store::new(&cins, &aml::ONE);
    let on_insert = aml::If::new(&inserting, vec![&check, &ack_insert]);
    let removing = aml::Equal::new(&crmv, &aml::ONE);
    let eject_request = 3u8;
    let request = aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &eject_request]);
    let ack_remove = aml::Store::new(&crmv, &aml::ONE);
    let on_remove = aml::If::new(&removing, vec![&request, &ack_remove]);
    let next = aml::Add::new(&aml::Local(0), &aml::Local(0), &aml::ONE);
    let more = aml::LessThan::new(&aml::Local(0), &max_vcpus);
    let walk = aml::While::new(&more, vec![&select_local, &on_insert, &on_remove, &next]);
    let cscn = aml::Method::new(
        "CSCN".into(),
        0,
        true,
        vec![&acquire, &zero, &walk, &release],
    );

    let mut cpus = Vec::new();
    for cpu in 0..max_vcpus {
        let node = nodes.iter().find(|n| n.cpus.contains(&cpu)).map(|n| n.id);
        cpu_device(cpu, node).to_aml_bytes(&mut cpus);
    }
    let cpus = Raw(cpus);
    Raw(to_bytes(&aml::Device::new(
        "CPUS".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0010"),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A05")),
            &csta,
            &ctfy,
            &cej0_method,
            &cscn,
            &cpus,
        ],
    )))
}

fn cpu_device(cpu: u32, node: Option<u32>) -> Raw {
    // _MAT describes the processor as it is once present (hot-plugged): enabled.
    let mat = aml::BufferData::new(madt_cpu_entry(cpu, MADT_CPU_ENABLED));
    let status = aml::MethodCall::new("CSTA".into(), vec![&cpu]);
    let eject = aml::MethodCall::new("CEJ0".into(), vec![&cpu]);
    let hid = aml::Name::new("_HID".into(), &"ACPI0007");
    let uid = aml::Name::new("_UID".into(), &cpu);
    let ret = aml::Return::new(&status);
    let sta = aml::Method::new("_STA".into(), 0, false, vec![&ret]);
    let mat = aml::Name::new("_MAT".into(), &mat);
    let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&eject]);
    let pxm = node.map(|n| aml::Name::new("_PXM".into(), &n));
    let mut body: Vec<&dyn Aml> = vec![&hid, &uid, &sta, &mat, &ej0];
    if let Some(p) = &pxm {
        body.push(p);
    }
    Raw(to_bytes(&aml::Device::new(
        cpu_device_name(cpu).as_str().into(),
        body,
    )))
}
