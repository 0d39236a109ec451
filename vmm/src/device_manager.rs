//! Creates the platform devices and puts them on the buses.

use std::sync::{Arc, Mutex};

use arch::layout;
use devices::{
    AcpiPmTimer, AcpiSleepDevice, Bus, BusDevice, BusError, Cmos, CpuHotplug, DebugConsole, Ged,
    MemoryHotplug, Serial, SerialOutput, CMOS_NVRAM_SIZE, I8042,
};
use hypervisor::Vm;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::cpu::VmEvents;
use crate::pci_setup::{self, ConsoleIo, PciDevices, PciSetupError, PciWindows};

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("cannot create an event fd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot wire a device interrupt: {0}")]
    Irq(#[source] hypervisor::HypervisorError),
    #[error("device address conflict: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Pci(#[from] PciSetupError),
    #[error("--debug-console iobase={0:#x}: another device has that I/O port")]
    DebugConsolePort(u16),
    #[error("--tpm socket={path}: {source}")]
    Tpm {
        path: String,
        #[source]
        source: devices::tpm::SwtpmError,
    },
}

/// Accepts and ignores accesses: the POST port Linux uses as an I/O delay.
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

const POST_PORT: u64 = 0x80;

pub struct DeviceManager {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Option<Arc<Mutex<Serial>>>,
    /// `--debug-console`, when it writes somewhere.
    pub debug_console: Option<Arc<Mutex<DebugConsole>>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_sleep: Arc<Mutex<AcpiSleepDevice>>,
    pub pm_timer: Arc<Mutex<AcpiPmTimer>>,
    pub pci: PciDevices,
    pub ged: Arc<Mutex<Ged>>,
    /// The CPU hotplug controller (`\_SB_.PRES`).
    pub cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    /// The memory hotplug controller (`\_SB_.MHPC`), with `hotplug_method=acpi`.
    pub memory_hotplug: Option<Arc<Mutex<MemoryHotplug>>>,
}

/// The host sides of the VM's character devices, opened before it is built.
pub struct HostIo {
    /// `None` for no serial port; `Some(sink)` for a port whose output goes to `sink`.
    pub serial: Option<Option<Box<dyn std::io::Write + Send>>>,
    /// The virtio console's host side; `None` for no virtio console.
    pub console: Option<ConsoleIo>,
    /// `None` for no debug console; `Some(sink)` for one whose output goes to `sink`.
    pub debug: Option<Option<Box<dyn std::io::Write + Send>>>,
}

/// Everything the device manager builds from.
pub struct DeviceSetup<'a> {
    pub vm: &'a Arc<dyn Vm>,
    pub mem: &'a guest_memory::GuestMemoryMmap,
    pub cfg: &'a VmConfig,
    pub ram: (u64, u64),
    /// Where each PCI segment's BARs go (the same windows the DSDT's `_CRS` describes).
    pub pci_windows: &'a [PciWindows],
    pub io: HostIo,
    pub nvram: Option<[u8; CMOS_NVRAM_SIZE]>,
    /// A restored VM's device slots by id (see `pci_setup::create`).
    pub slot_hints: Option<&'a pci_setup::SlotHints>,
    /// The DIMMs ACPI memory hotplug has plugged (`(gpa, len)`), with `hotplug_method=acpi`.
    pub dimms: &'a [(u64, u64)],
}

impl DeviceManager {
    pub fn new(setup: DeviceSetup, events: &VmEvents) -> Result<Self, DeviceError> {
        let DeviceSetup {
            vm,
            mem,
            cfg,
            ram,
            pci_windows,
            io,
            nvram,
            slot_hints,
            dimms,
        } = setup;
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let requests: Arc<dyn devices::VmRequests> =
            Arc::new(events.try_clone().map_err(DeviceError::EventFd)?);

        let HostIo {
            serial,
            console,
            debug,
        } = io;
        let serial = match serial {
            Some(sink) => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
                vm.register_irqfd(&irq, layout::COM1_IRQ)
                    .map_err(DeviceError::Irq)?;
                let dev = Arc::new(Mutex::new(Serial::new(irq, SerialOutput::new(sink))));
                pio.insert(dev.clone(), layout::COM1_PORT, 8)?;
                Some(dev)
            }
            None => None,
        };
        let debug_console = debug.map(|sink| {
            let port = cfg.debug_console.port();
            Arc::new(Mutex::new(DebugConsole::new(port, SerialOutput::new(sink))))
        });
        let cmos = Arc::new(Mutex::new(Cmos::new(ram.0, ram.1, nvram)));
        pio.insert(cmos.clone(), layout::CMOS_PORT, 2)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(requests.clone())));
        pio.insert(i8042.clone(), layout::I8042_PORT, 5)?;
        let acpi_sleep = Arc::new(Mutex::new(AcpiSleepDevice::new(
            layout::ACPI_S5_SLP_TYP,
            layout::ACPI_RESET_VALUE,
            requests.clone(),
        )));
        pio.insert(acpi_sleep.clone(), layout::ACPI_SLEEP_PORT, 1)?;
        let pm_timer = Arc::new(Mutex::new(AcpiPmTimer::new()));
        pio.insert(
            pm_timer.clone(),
            layout::PM_TIMER_PORT,
            layout::PM_TIMER_LEN,
        )?;
        pio.insert(Arc::new(Mutex::new(Sink)), POST_PORT, 1)?;
        let ejections = Arc::new(events.try_clone().map_err(DeviceError::EventFd)?);
        let cpu_hotplug = Arc::new(Mutex::new(CpuHotplug::new(
            cfg.cpus.max_vcpus,
            cfg.cpus.boot_vcpus,
            ejections.clone(),
        )));
        mmio.insert(
            cpu_hotplug.clone(),
            layout::CPU_HOTPLUG_START.0,
            layout::CPU_HOTPLUG_SIZE,
        )?;
        let memory_hotplug = match crate::vm::acpi_hotplug_base(cfg) {
            Some(_) => {
                let dev = Arc::new(Mutex::new(MemoryHotplug::new(dimms)));
                mmio.insert(
                    dev.clone(),
                    layout::MEMORY_HOTPLUG_START.0,
                    layout::MEMORY_HOTPLUG_SIZE,
                )?;
                Some(dev)
            }
            None => None,
        };
        let mut pci = pci_setup::create(
            vm,
            mem,
            &pio,
            &mmio,
            cfg,
            pci_windows,
            console,
            slot_hints,
            ejections.clone(),
            events,
        )?;
        // The original's order: the watchdog with the virtio devices, then pvpanic.
        if cfg.watchdog {
            let slot = slot_hints.and_then(|h| h.get("__watchdog")).map(|h| h.slot);
            pci.place(crate::virtio_build::watchdog(requests.clone(), slot)?)?;
        }
        // Then the RTC (after the vDPA devices we do not have), as the original.
        if let Some(r) = &cfg.rtc {
            pci.place(crate::virtio_build::rtc(r, slot_hints))?;
        }
        // Then the virtio-iommu, as the original.
        if let Some(m) = pci.iommu.clone() {
            let slot = slot_hints
                .and_then(|h| h.get(crate::pci_setup::IOMMU_ID))
                .map(|h| h.slot);
            let width = cfg
                .platform
                .as_ref()
                .map_or(64, |p| p.iommu_address_width_bits);
            pci.place(crate::virtio_build::iommu(m, width, slot))?;
        }
        if cfg.pvpanic {
            crate::platform::add_pvpanic(&mut pci, slot_hints, ejections)?;
        }
        if let Some(tpm) = &cfg.tpm {
            let swtpm =
                devices::tpm::Swtpm::connect(&tpm.socket).map_err(|source| DeviceError::Tpm {
                    path: tpm.socket.display().to_string(),
                    source,
                })?;
            let crb = devices::tpm::TpmCrb::new(Box::new(swtpm), layout::TPM_START.0);
            mmio.insert(
                Arc::new(Mutex::new(crb)),
                layout::TPM_START.0,
                layout::TPM_SIZE,
            )?;
        }
        let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&ged_irq, layout::GED_IRQ)
            .map_err(DeviceError::Irq)?;
        let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
        pio.insert(ged.clone(), layout::GED_PORT, 1)?;
        // Last, so a port another device has is refused naming the option.
        if let Some(dev) = &debug_console {
            let port = cfg.debug_console.port();
            pio.insert(dev.clone(), port.into(), 1)
                .map_err(|_| DeviceError::DebugConsolePort(port))?;
        }
        Ok(DeviceManager {
            pio,
            mmio,
            serial,
            debug_console,
            cmos,
            i8042,
            acpi_sleep,
            pm_timer,
            pci,
            ged,
            cpu_hotplug,
            memory_hotplug,
        })
    }

    /// Drops every device once the vCPUs are stopped, so the host resources they hold (disk
    /// image locks, TAP interfaces, worker threads) are released before a rebuilt VM asks for
    /// them again.
    pub fn release(&mut self) {
        self.pci.remove_all();
        self.pio.clear();
        self.mmio.clear();
    }
}
