//! ACPI tables that describe the x86-64 platform (`docs/platform.md`, `docs/acpi.md`) to the guest.
//!
//! Layout in guest memory, from `layout::RSDP_POINTER` upwards (each table 16-byte aligned):
//! RSDP, DSDT, FACP (FADT), APIC (MADT), MCFG (only with PCI), XSDT. Everything must end below
//! `layout::ACPI_END`, where the VM generation ID (`layout::VMGENID_START`) begins.
//!
//! The platform is ACPI "hardware reduced": there is no SCI, no PM1 blocks, no GPEs and no FACS.
//! Power off and reset go through the sleep control / reset register at I/O port
//! `layout::ACPI_SLEEP_PORT`; the PM timer is at `layout::PM_TIMER_PORT`, as in the original.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;

mod cpus;
mod hotplug;
mod memory;
mod numa;

pub use numa::NumaNode;

pub use cpus::cpu_device_name;
pub use memory::memory_device_name;

/// OEM ID written in every table header.
pub const OEM_ID: [u8; 6] = *b"CLOUDH";
/// OEM table ID written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"CHVMTBL ";
/// OEM revision written in every table header.
pub const OEM_REVISION: u32 = 1;
/// FADT "hypervisor vendor identity" (ASCII, little endian in the table).
pub const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"CLOUDHYP";

/// Most vCPUs the tables can describe. APIC IDs are the vCPU indices, so they stay below 0xff (the
/// xAPIC broadcast ID) and every CPU gets a plain Local APIC MADT entry, which Linux and the
/// IOAPIC (8-bit destinations) handle without interrupt remapping. This is also Cloud
/// Hypervisor's default x86 limit.
pub const MAX_VCPUS: u32 = 254;

/// Alignment of every table in guest memory.
const TABLE_ALIGN: u64 = 16;

/// Size of an ACPI table header (the `Sdt` header).
const HEADER_LEN: usize = 36;

/// What the tables must describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    /// threads_per_core, cores_per_die, dies_per_package, packages
    pub topology: Option<(u8, u8, u8, u8)>,
    /// Describe COM1 (0x3f8, IRQ 4) in the DSDT.
    pub serial: bool,
    /// The PCI host bridges, one per segment, segment 0 first (none: no PCI).
    pub pci: Vec<PciHost>,
    /// Slots of the ACPI memory hotplug controller (`\_SB_.MHPC`); 0: none (no memory is
    /// hot-plugged by ACPI).
    pub memory_slots: u32,
    /// A TPM 2.0 behind the CRB interface at `layout::TPM_START`: the `TPM2` table and
    /// `\_SB_.TPM2` (`MSFT0101`).
    pub tpm: bool,
    /// The guest's NUMA nodes, by id (`--numa`): the SRAT and the SLIT; none, no tables.
    pub numa: Vec<NumaNode>,
    /// A virtio-iommu and the PCI functions behind it: the VIOT table.
    pub viot: Option<Viot>,
}

/// What the VIOT says: where the virtio-iommu is and which PCI functions it translates for.
/// Each function is `(segment, requester id)`; its endpoint id is `segment << 16 | id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viot {
    pub iommu: (u16, u16),
    pub endpoints: Vec<(u16, u16)>,
}

/// A PCI host bridge (one segment). Windows are `(start, size)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHost {
    pub segment: u16,
    /// Address of the configuration space of `bus_start` (ECAM: 1 MiB per bus).
    pub ecam_base: u64,
    pub ecam_size: u64,
    pub bus_start: u8,
    pub bus_end: u8,
    /// The I/O port window; `Some` on segment 0 only, which also decodes ports 0xcf8-0xcff.
    pub io: Option<(u16, u16)>,
    pub mmio32: (u64, u64),
    /// `None`: no 64-bit window (no room between RAM and the physical address limit).
    pub mmio64: Option<(u64, u64)>,
    /// The NUMA node (`_PXM`) a `--numa pci_segments` list puts the segment in; 0 when none
    /// does, as the original's.
    pub proximity: u32,
}

impl PciHost {
    /// Segment `segment` as this VMM lays it out, as the original: bus 0 only, its ECAM the
    /// `segment`th MiB from `layout::PCI_MMCONFIG_START`, the I/O window on segment 0 only;
    /// with the given memory windows.
    pub fn segment(segment: u16, mmio32: (u64, u64), mmio64: Option<(u64, u64)>) -> Self {
        PciHost {
            segment,
            ecam_base: layout::PCI_MMCONFIG_START.0 + (u64::from(segment) << 20),
            ecam_size: 1 << 20,
            bus_start: 0,
            bus_end: 0,
            io: (segment == 0).then_some(layout::PCI_IO_WINDOW),
            mmio32,
            mmio64,
            proximity: 0,
        }
    }

    /// `segment(0, ...)`.
    pub fn segment0(mmio32: (u64, u64), mmio64: Option<(u64, u64)>) -> Self {
        Self::segment(0, mmio32, mmio64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid vCPU counts: boot {boot} max {max} (need 1 <= boot <= max <= {MAX_VCPUS})")]
    InvalidVcpuCount { boot: u32, max: u32 },
    #[error("CPU topology {0:?} does not multiply to max_vcpus {1}")]
    InvalidTopology((u8, u8, u8, u8), u32),
    #[error("invalid PCI host bridge: {0}")]
    InvalidPci(&'static str),
    #[error("ACPI tables end at {end:#x}, beyond the limit {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// One table: `(signature, bytes)`.
pub type Table = ([u8; 4], Vec<u8>);

/// Writes the tables at `layout::RSDP_POINTER` onwards (they must all fit below
/// `layout::ACPI_END`) and returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemory>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, Error> {
    for table in place_tables(cfg)? {
        mem.write_slice(&table.bytes, table.addr)
            .map_err(Error::GuestMemory)?;
    }
    Ok(layout::RSDP_POINTER)
}

/// The same tables as `(signature, bytes)`, in the order they are laid out in guest memory. The
/// RSDP comes first, under the signature `RSDP` (its real signature is `"RSD PTR "`).
pub fn build_tables(cfg: &AcpiConfig) -> Result<Vec<Table>, Error> {
    Ok(place_tables(cfg)?
        .into_iter()
        .map(|t| (t.signature, t.bytes))
        .collect())
}

/// One table at its guest address.
struct PlacedTable {
    addr: GuestAddress,
    signature: [u8; 4],
    bytes: Vec<u8>,
}

/// Hands out aligned addresses from `RSDP_POINTER` upwards.
struct Placer {
    next: u64,
    tables: Vec<PlacedTable>,
}

impl Placer {
    fn place(&mut self, signature: [u8; 4], bytes: Vec<u8>) -> GuestAddress {
        let addr = GuestAddress(self.next);
        self.next = (self.next + bytes.len() as u64).next_multiple_of(TABLE_ALIGN);
        self.tables.push(PlacedTable {
            addr,
            signature,
            bytes,
        });
        addr
    }
}

fn place_tables(cfg: &AcpiConfig) -> Result<Vec<PlacedTable>, Error> {
    validate(cfg)?;

    let rsdp_len = Rsdp::len() as u64;
    let mut placer = Placer {
        next: (layout::RSDP_POINTER.0 + rsdp_len).next_multiple_of(TABLE_ALIGN),
        tables: Vec::new(),
    };

    let dsdt = placer.place(*b"DSDT", build_dsdt(cfg));
    let fadt = placer.place(*b"FACP", build_fadt(dsdt));
    let madt = placer.place(*b"APIC", build_madt(cfg.boot_vcpus, cfg.max_vcpus));
    let mut entries = vec![fadt, madt];
    if !cfg.pci.is_empty() {
        entries.push(placer.place(*b"MCFG", build_mcfg(&cfg.pci)));
    }
    if cfg.tpm {
        entries.push(placer.place(*b"TPM2", build_tpm2()));
    }
    if let Some(v) = &cfg.viot {
        entries.push(placer.place(*b"VIOT", build_viot(v)));
    }
    if !cfg.numa.is_empty() {
        entries.push(placer.place(*b"SRAT", numa::build_srat(&cfg.numa)));
        entries.push(placer.place(*b"SLIT", numa::build_slit(&cfg.numa)));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for entry in entries {
        xsdt.add_entry(entry.0);
    }
    let xsdt = placer.place(*b"XSDT", to_bytes(&xsdt));

    let end = placer
        .tables
        .last()
        .map(|t| t.addr.0 + t.bytes.len() as u64)
        .unwrap_or(placer.next);
    if end > layout::ACPI_END.0 {
        return Err(Error::TooLarge {
            end,
            limit: layout::ACPI_END.0,
        });
    }

    let rsdp = PlacedTable {
        addr: layout::RSDP_POINTER,
        signature: *b"RSDP",
        bytes: to_bytes(&Rsdp::new(OEM_ID, xsdt.0)),
    };
    let mut tables = vec![rsdp];
    tables.append(&mut placer.tables);
    Ok(tables)
}

fn validate(cfg: &AcpiConfig) -> Result<(), Error> {
    let (boot, max) = (cfg.boot_vcpus, cfg.max_vcpus);
    if boot == 0 || boot > max || max > MAX_VCPUS {
        return Err(Error::InvalidVcpuCount { boot, max });
    }
    if let Some(topo @ (threads, cores, dies, packages)) = cfg.topology {
        let product = u32::from(threads) * u32::from(cores) * u32::from(dies) * u32::from(packages);
        if product != max {
            return Err(Error::InvalidTopology(topo, max));
        }
    }
    for (i, pci) in cfg.pci.iter().enumerate() {
        validate_pci(pci)?;
        for other in &cfg.pci[..i] {
            if other.segment == pci.segment {
                return Err(Error::InvalidPci("a segment described twice"));
            }
            if pci.ecam_base < other.ecam_base + other.ecam_size
                && other.ecam_base < pci.ecam_base + pci.ecam_size
            {
                return Err(Error::InvalidPci("ECAM ranges of two segments overlap"));
            }
        }
    }
    Ok(())
}

fn validate_pci(pci: &PciHost) -> Result<(), Error> {
    if pci.bus_start > pci.bus_end {
        return Err(Error::InvalidPci("bus_start > bus_end"));
    }
    let buses = u64::from(pci.bus_end - pci.bus_start) + 1;
    if pci.ecam_size < buses << 20 {
        return Err(Error::InvalidPci("ECAM smaller than 1 MiB per bus"));
    }
    if pci.ecam_base.checked_add(pci.ecam_size).is_none()
        || pci.ecam_base < u64::from(pci.bus_start) << 20
    {
        return Err(Error::InvalidPci("ECAM range out of bounds"));
    }
    if let Some((io_start, io_size)) = pci.io {
        if io_size == 0 || u32::from(io_start) + u32::from(io_size) > 0x1_0000 {
            return Err(Error::InvalidPci("bad I/O window"));
        }
    }
    let (start, size) = pci.mmio32;
    if size == 0 || start + size > 1 << 32 {
        return Err(Error::InvalidPci("bad 32-bit MMIO window"));
    }
    if let Some((start, size)) = pci.mmio64 {
        if size == 0 || start.checked_add(size - 1).is_none() {
            return Err(Error::InvalidPci("bad 64-bit MMIO window"));
        }
    }
    Ok(())
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

/// The first objects of a hotplug controller (PNP0A06) whose registers are `size` bytes of MMIO
/// at `base` (below 4 GiB): `_HID`, `_UID` `uid`, the mutex `lock`, `_CRS` with the range (a
/// DWordMemory), and the SystemMemory OperationRegion `region` over it. The controller's
/// fields and methods follow.
fn mmio_controller_head(uid: &'static str, lock: &str, base: u64, size: u64, region: &str) -> Raw {
    let (base, size) = (base as u32, size as u32);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        base,
        base + (size - 1),
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&window]);
    let mut out = Vec::new();
    aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")).to_aml_bytes(&mut out);
    aml::Name::new("_UID".into(), &uid).to_aml_bytes(&mut out);
    aml::Mutex::new(lock.into(), 0).to_aml_bytes(&mut out);
    aml::Name::new("_CRS".into(), &crs).to_aml_bytes(&mut out);
    aml::OpRegion::new(
        region.into(),
        aml::OpRegionSpace::SystemMemory,
        &base,
        &size,
    )
    .to_aml_bytes(&mut out);
    Raw(out)
}

/// Already-encoded AML, so that objects built in loops can be nested.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// A table: the standard header followed by `body`, with length and checksum filled in.
fn sdt(signature: [u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut table = Sdt::new(
        signature,
        HEADER_LEN as u32,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(body);
    table.as_slice().to_vec()
}

fn gas_io8(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// IA-PC boot architecture flags (FADT offset 109).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

fn build_fadt(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(FadtFlags::HwReducedAcpi)
        .flag(FadtFlags::ResetRegSup)
        // No fixed-hardware power or sleep button (a control-method button may exist).
        .flag(FadtFlags::PwrButton)
        .flag(FadtFlags::SlpButton)
        // The PM timer counts 32 bits.
        .flag(FadtFlags::TmrValExt);
    // No legacy devices flag (no ISA PnP BIOS), no 8042 flag (the i8042 only implements the
    // reset line, the guest should not probe a keyboard), no VGA, MSI supported, the OS must not
    // touch PCIe ASPM; the CMOS RTC is present.
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_PCIE_ASPM_CONTROLS).into();
    let sleep = gas_io8(layout::ACPI_SLEEP_PORT);
    fadt.sleep_control_reg = sleep;
    fadt.sleep_status_reg = sleep;
    fadt.reset_reg = sleep;
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    // The PM timer, as the original publishes it: X_PM_TMR_BLK, SystemIO, 32 bits, dword
    // access. Also PM_TMR_LEN = 4, which the specification requires when there is a PM timer
    // (the original leaves it 0, and readers such as the `acpi` crate then see none), and the
    // same port in PM_TMR_BLK for readers of the 32-bit field only (GRUB's TSC calibration).
    fadt.x_pm_tmr_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::DwordAccess,
        layout::PM_TIMER_PORT,
    );
    fadt.pm_tmr_blk = (layout::PM_TIMER_PORT as u32).into();
    fadt.pm_tmr_len = layout::PM_TIMER_LEN as u8;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    to_bytes(&fadt.finalize())
}

/// MADT structure types and flags.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_LOCAL_X2APIC_NMI: u8 = 0xa;
const MADT_CPU_ENABLED: u32 = 1 << 0;
const MADT_CPU_ONLINE_CAPABLE: u32 = 1 << 1;
/// MADT revision 5 (ACPI 6.3) defines the "online capable" flag.
const MADT_REVISION: u8 = 5;
/// Largest APIC ID a Local APIC (xAPIC) entry can carry; 0xff means "all processors".
const MAX_XAPIC_ID: u32 = 0xfe;

/// The MADT processor structure of `cpu` (APIC ID = UID = `cpu`).
fn madt_cpu_entry(cpu: u32, flags: u32) -> Vec<u8> {
    if cpu <= MAX_XAPIC_ID {
        let mut e = vec![MADT_LOCAL_APIC, 8, cpu as u8, cpu as u8];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    } else {
        let mut e = vec![MADT_LOCAL_X2APIC, 16, 0, 0];
        e.extend_from_slice(&cpu.to_le_bytes()); // x2APIC ID
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&cpu.to_le_bytes()); // ACPI processor UID
        e
    }
}

/// Builds the MADT for `max` processors of which the first `boot` are enabled. Works for any
/// count; `validate` caps it at `MAX_VCPUS`.
fn build_madt(boot: u32, max: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::APIC_START.0 as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // flags: no PCAT_COMPAT (no 8259s)

    for cpu in 0..max {
        let flags = if cpu < boot {
            MADT_CPU_ENABLED
        } else {
            MADT_CPU_ONLINE_CAPABLE
        };
        body.extend_from_slice(&madt_cpu_entry(cpu, flags));
    }

    // IOAPIC 0, GSIs 0..IOAPIC_PINS.
    body.extend_from_slice(&[MADT_IO_APIC, 12, 0, 0]);
    body.extend_from_slice(&(layout::IOAPIC_START.0 as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());

    // ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2, as on a PC (and in KVM's default GSI
    // routing). Flags 0: conforms to the bus (edge, active high). No SCI override: a
    // hardware-reduced platform has no SCI.
    body.extend_from_slice(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());

    // LINT1 of every processor is the NMI input (flags 0: conforming).
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    if max > MAX_XAPIC_ID + 1 {
        body.extend_from_slice(&[MADT_LOCAL_X2APIC_NMI, 12, 0, 0]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[1, 0, 0, 0]);
    }

    sdt(*b"APIC", MADT_REVISION, &body)
}

fn build_mcfg(hosts: &[PciHost]) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for pci in hosts {
        // The MCFG base address is that of bus 0 of the segment.
        let base = pci.ecam_base - (u64::from(pci.bus_start) << 20);
        mcfg.add_ecam(base, pci.segment, pci.bus_start, pci.bus_end);
    }
    to_bytes(&mcfg)
}

/// Bits of the GED's event register the DSDT's `_EVT` acts on: `devices::GED_POWER_BUTTON` and
/// `devices::GED_VMGENID` (`arch` does not depend on `devices`; a test checks they agree).
const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
const GED_EVENT_VMGENID: u8 = 1 << 1;
/// `devices::GED_PCI_HOTPLUG`: `_EVT` runs the PCI hotplug controller's scan.
const GED_EVENT_PCI_HOTPLUG: u8 = 1 << 2;
/// `devices::GED_CPU_HOTPLUG`: `_EVT` runs the CPU scan.
const GED_EVENT_CPU_HOTPLUG: u8 = 1 << 3;
/// `devices::GED_MEMORY_HOTPLUG`: `_EVT` runs the memory scan.
const GED_EVENT_MEMORY_HOTPLUG: u8 = 1 << 4;

/// DSDT revision 2+ means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;

fn build_dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut aml = Vec::new();

    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    let s5_typ = layout::ACPI_S5_SLP_TYP;
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&s5_typ, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut aml);

    let mut sb = Vec::new();
    cpus::controller().to_aml_bytes(&mut sb);
    cpus::container(cfg.max_vcpus, &cfg.numa).to_aml_bytes(&mut sb);
    if cfg.memory_slots > 0 {
        memory::controller(cfg.memory_slots).to_aml_bytes(&mut sb);
    }
    if cfg.serial {
        com1_device().to_aml_bytes(&mut sb);
    }
    rtc_device().to_aml_bytes(&mut sb);
    power_button_device().to_aml_bytes(&mut sb);
    vmgenid_device().to_aml_bytes(&mut sb);
    ged_device(!cfg.pci.is_empty(), cfg.memory_slots > 0).to_aml_bytes(&mut sb);
    if cfg.tpm {
        tpm_device().to_aml_bytes(&mut sb);
    }
    if !cfg.pci.is_empty() {
        let segments: Vec<u16> = cfg.pci.iter().map(|p| p.segment).collect();
        hotplug::controller(&segments).to_aml_bytes(&mut sb);
    }
    for pci in &cfg.pci {
        pci_host_device(pci).to_aml_bytes(&mut sb);
        ecam_reservation_device(pci).to_aml_bytes(&mut sb);
    }
    aml::Scope::new("\\_SB_".into(), vec![&Raw(sb)]).to_aml_bytes(&mut aml);

    sdt(*b"DSDT", DSDT_REVISION, &aml)
}

fn com1_device() -> Raw {
    let port = layout::COM1_PORT as u16;
    let io = aml::IO::new(port, port, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    Raw(to_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )))
}

/// The CMOS RTC (`layout::CMOS_PORT`). Without it Linux's rtc_cmos driver fails to probe on a
/// hardware-reduced platform (no legacy IRQs). No IRQ 8: the RTC raises no alarm interrupts.
fn rtc_device() -> Raw {
    let port = layout::CMOS_PORT as u16;
    let io = aml::IO::new(port, port, 1, 2);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    Raw(to_bytes(&aml::Device::new(
        "RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )))
}

/// A control-method power button, notified by the Generic Event Device.
fn power_button_device() -> Raw {
    Raw(to_bytes(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )))
}

/// The DSDT name of the VM generation ID device.
const VMGENID_DEVICE: &str = "\\_SB_.VGEN";

/// The VM generation ID device, as Linux's `drivers/virt/vmgenid.c` (which matches `_HID`
/// `VMGENCTR` or `VM_GEN_COUNTER`) and Microsoft's "Virtual Machine Generation ID" document
/// (`_CID`/`_DDN` `VM_Gen_Counter`) describe it: `ADDR` gives the guest physical address of the
/// 16-byte ID (`layout::VMGENID_START`) as a package of two integers, its low and high 32 bits.
/// The GED notifies the device (0x80) on bit 1 when the VMM has written a new ID.
fn vmgenid_device() -> Raw {
    let addr = layout::VMGENID_START.0;
    let (low, high) = ((addr & 0xffff_ffff) as u32, (addr >> 32) as u32);
    // `ADDR` is a Name, not a Method: the address is fixed by the layout, so a constant package
    // says it plainly (and iasl shows it as such). Evaluating a named data object yields its
    // value, so Linux's `acpi_evaluate_object(.., "ADDR", ..)` gets the same 2-integer package a
    // Method would return. QEMU needs a Method because its firmware patches the address into a
    // variable at boot; here there is nothing to compute.
    let addr = aml::Package::new(vec![&low, &high]);
    Raw(to_bytes(&aml::Device::new(
        "VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_GEN_COUNTER"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new("ADDR".into(), &addr),
        ],
    )))
}

/// The Generic Event Device: its interrupt makes the guest run `_EVT`, which reads (and so
/// clears) the event register and notifies the power button on bit 0 and the VM generation ID
/// device on bit 1, and (with a PCI segment, `pci_hotplug`) runs the PCI hotplug scan on bit 2.
/// Several bits may be set in one read, so each is tested on its own.
fn ged_device(pci_hotplug: bool, memory_hotplug: bool) -> Raw {
    let irq = aml::Interrupt::new(true, true, false, false, layout::GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let port = layout::GED_PORT as u16;
    let region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemIO,
        &port,
        &aml::ONE,
    );
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = aml::Path::new("GDAT");
    // Local0 = GDAT (one read: it clears the register).
    let read = aml::Store::new(&aml::Local(0), &gdat);
    // Bit 0: Local1 = Local0 & 1; if Local1 == 1, Notify(\_SB_.PWRB, 0x80).
    let button_mask: u8 = GED_EVENT_POWER_BUTTON;
    let button_bit = aml::And::new(&aml::Local(1), &aml::Local(0), &button_mask);
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify_button = aml::Notify::new(&pwrb, &0x80u8);
    let pressed = aml::Equal::new(&aml::Local(1), &button_mask);
    let on_button = aml::If::new(&pressed, vec![&notify_button]);
    // Bit 1: Local2 = Local0 & 2; if Local2 == 2, Notify(\_SB_.VGEN, 0x80).
    let vmgenid_mask: u8 = GED_EVENT_VMGENID;
    let vmgenid_bit = aml::And::new(&aml::Local(2), &aml::Local(0), &vmgenid_mask);
    let vgen = aml::Path::new(VMGENID_DEVICE);
    let notify_vmgenid = aml::Notify::new(&vgen, &0x80u8);
    let changed = aml::Equal::new(&aml::Local(2), &vmgenid_mask);
    let on_vmgenid = aml::If::new(&changed, vec![&notify_vmgenid]);
    // Bit 2: Local3 = Local0 & 4; if Local3 == 4, \_SB_.PHPR.PSCN ().
    let pci_mask: u8 = GED_EVENT_PCI_HOTPLUG;
    let pci_bit = aml::And::new(&aml::Local(3), &aml::Local(0), &pci_mask);
    let pscn = aml::MethodCall::new(
        format!("{}.PSCN", hotplug::PCI_HOTPLUG_DEVICE)
            .as_str()
            .into(),
        vec![],
    );
    let pci_changed = aml::Equal::new(&aml::Local(3), &pci_mask);
    let on_pci = aml::If::new(&pci_changed, vec![&pscn]);
    // Bit 3: Local4 = Local0 & 8; if Local4 == 8, \_SB_.CPUS.CSCN ().
    let cpu_mask: u8 = GED_EVENT_CPU_HOTPLUG;
    let cpu_bit = aml::And::new(&aml::Local(4), &aml::Local(0), &cpu_mask);
    let cscn = aml::MethodCall::new(
        format!("{}.CSCN", cpus::CPU_CONTAINER).as_str().into(),
        vec![],
    );
    let cpu_changed = aml::Equal::new(&aml::Local(4), &cpu_mask);
    let on_cpu = aml::If::new(&cpu_changed, vec![&cscn]);
    let mut body: Vec<&dyn Aml> = vec![
        &read,
        &button_bit,
        &on_button,
        &vmgenid_bit,
        &on_vmgenid,
        &cpu_bit,
        &on_cpu,
    ];
    if pci_hotplug {
        body.extend([&pci_bit as &dyn Aml, &on_pci]);
    }
    // Bit 4: Local5 = Local0 & 0x10; if Local5 == 0x10, \_SB_.MHPC.MSCN ().
    let memory_mask: u8 = GED_EVENT_MEMORY_HOTPLUG;
    let memory_bit = aml::And::new(&aml::Local(5), &aml::Local(0), &memory_mask);
    let mscn = aml::MethodCall::new(
        format!("{}.MSCN", memory::MEMORY_CONTROLLER)
            .as_str()
            .into(),
        vec![],
    );
    let memory_changed = aml::Equal::new(&aml::Local(5), &memory_mask);
    let on_memory = aml::If::new(&memory_changed, vec![&mscn]);
    if memory_hotplug {
        body.extend([&memory_bit as &dyn Aml, &on_memory]);
    }
    let evt = aml::Method::new("_EVT".into(), 1, true, body);
    Raw(to_bytes(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )))
}

fn pci_host_device(pci: &PciHost) -> Raw {
    let buses = aml::AddressSpace::new_bus_number(u16::from(pci.bus_start), u16::from(pci.bus_end));
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io = pci
        .io
        .map(|(start, size)| aml::AddressSpace::new_io(start, start + (size - 1), None));
    let (m32_start, m32_size) = pci.mmio32;
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        m32_start as u32,
        (m32_start + m32_size - 1) as u32,
        None,
    );
    let mmio64 = pci.mmio64.map(|(start, size)| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            start + (size - 1),
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&buses];
    if let Some(io) = &io {
        resources.extend([&cfg_io as &dyn Aml, io]);
    }
    resources.push(&mmio32);
    if let Some(m64) = &mmio64 {
        resources.push(m64);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let segment = pci.segment;
    let bbn = pci.bus_start;
    let name = format!("PC{:02X}", pci.segment & 0xff);
    let (hid, cid) = (
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
        aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
    );
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let (seg, uid) = (
        aml::Name::new("_SEG".into(), &segment),
        aml::Name::new("_UID".into(), &segment),
    );
    let bbn = aml::Name::new("_BBN".into(), &bbn);
    let crs = aml::Name::new("_CRS".into(), &crs);
    // Segment 0 has its host bridge in slot 0; the others can hotplug a device there.
    let slots = hotplug::bridge_objects(if segment == 0 { 1 } else { 0 });
    let node = pci.proximity;
    let ret = aml::Return::new(&node);
    let pxm = aml::Method::new("_PXM".into(), 0, false, vec![&ret]);
    let body: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &pxm, &crs, &slots];
    Raw(to_bytes(&aml::Device::new(name.as_str().into(), body)))
}

/// Offset of the CRB control area (`TPM_CRB_CTRL_REQ`) in the TPM's register page.
pub const TPM_CRB_CONTROL_AREA: u64 = 0x40;
/// `TPM2` table start method 7: Command Response Buffer interface.
pub const TPM2_START_METHOD_CRB: u32 = 7;

/// The `TPM2` table (TCG ACPI specification, revision 4): platform class 0 (client), the
/// address of the CRB control area, start method 7 (CRB), its 12 bytes of start-method
/// parameters (zero) and an empty event log area (length and address 0). The original stops
/// after the start method; ACPICA then reports a truncated table.
/// Offset of the first VIOT node (the virtio-iommu's), which the PCI range nodes point to.
const VIOT_NODE_OFFSET: u16 = 48;

/// The VIOT (virtual I/O translation table): a virtio-pci IOMMU node, then one PCI range node
/// per function behind it, as the original writes it. By hand: acpi_tables' range node leaves
/// the segment out of the endpoint id, so functions of two segments would share ids.
fn build_viot(v: &Viot) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + 16 + 24 * v.endpoints.len());
    let nodes = u16::try_from(1 + v.endpoints.len()).unwrap_or(u16::MAX);
    body.extend_from_slice(&nodes.to_le_bytes());
    body.extend_from_slice(&VIOT_NODE_OFFSET.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    // Type 3: virtio-pci IOMMU, 16 bytes.
    body.extend_from_slice(&[3, 0]);
    body.extend_from_slice(&16u16.to_le_bytes());
    body.extend_from_slice(&v.iommu.0.to_le_bytes());
    body.extend_from_slice(&v.iommu.1.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    for &(segment, bdf) in v.endpoints.iter().take(usize::from(nodes) - 1) {
        // Type 1: PCI range, 24 bytes: endpoint_start, segments, requester ids, output node.
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&24u16.to_le_bytes());
        body.extend_from_slice(&(u32::from(segment) << 16 | u32::from(bdf)).to_le_bytes());
        body.extend_from_slice(&segment.to_le_bytes());
        body.extend_from_slice(&segment.to_le_bytes());
        body.extend_from_slice(&bdf.to_le_bytes());
        body.extend_from_slice(&bdf.to_le_bytes());
        body.extend_from_slice(&VIOT_NODE_OFFSET.to_le_bytes());
        body.extend_from_slice(&[0; 6]);
    }
    sdt(*b"VIOT", 0, &body)
}

fn build_tpm2() -> Vec<u8> {
    let mut body = Vec::with_capacity(40);
    body.extend_from_slice(&0u16.to_le_bytes()); // platform class: client
    body.extend_from_slice(&0u16.to_le_bytes()); // reserved
    body.extend_from_slice(&(layout::TPM_START.0 + TPM_CRB_CONTROL_AREA).to_le_bytes());
    body.extend_from_slice(&TPM2_START_METHOD_CRB.to_le_bytes());
    body.extend_from_slice(&[0; 12]);
    body.extend_from_slice(&0u32.to_le_bytes()); // log area minimum length
    body.extend_from_slice(&0u64.to_le_bytes()); // log area start address
    sdt(*b"TPM2", 4, &body)
}

/// The TPM device Linux's `tpm_crb` driver binds to (`MSFT0101`), with the CRB register page
/// as its only resource, shaped as the original's.
fn tpm_device() -> Raw {
    let region = aml::Memory32Fixed::new(true, layout::TPM_START.0 as u32, layout::TPM_SIZE as u32);
    let crs = aml::ResourceTemplate::new(vec![&region]);
    Raw(to_bytes(&aml::Device::new(
        "TPM2".into(),
        vec![
            &aml::Name::new("_HID".into(), &"MSFT0101"),
            &aml::Name::new("_STA".into(), &0xfu8),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )))
}

/// Motherboard resources: reserves the ECAM range, which Linux requires before it uses MMCONFIG
/// (the range is a hole in the e820 map, not a reserved entry).
fn ecam_reservation_device(pci: &PciHost) -> Raw {
    let (start, end) = (pci.ecam_base, pci.ecam_base + (pci.ecam_size - 1));
    let mem32;
    let mem64;
    let resource: &dyn Aml = if end <= u64::from(u32::MAX) {
        mem32 = aml::Memory32Fixed::new(true, start as u32, pci.ecam_size as u32);
        &mem32
    } else {
        mem64 = aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start,
            end,
            None,
        );
        &mem64
    };
    let crs = aml::ResourceTemplate::new(vec![resource]);
    let name = format!("MB{:02X}", pci.segment & 0xff);
    let uid = u32::from(pci.segment);
    Raw(to_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )))
}

#[cfg(test)]
mod tests;
