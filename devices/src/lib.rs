//! Platform devices of the x86-64 machine and the buses the vCPUs dispatch port and MMIO
//! accesses through. Devices know nothing of the VMM: they get event fds to signal interrupts,
//! resets and power-off, and the VMM decides what those mean.

mod acpi_pm_timer;
mod acpi_sleep;
mod bus;
mod cmos;
pub mod cpu_hotplug;
mod debug_console;
mod ged;
mod i8042;
pub mod memory_hotplug;
pub mod pci_hotplug;
mod serial;
mod state;
#[cfg(test)]
mod test_util;
pub mod tpm;
pub mod vmgenid;

pub use acpi_pm_timer::{AcpiPmTimer, PmTimerState, PM_TIMER_FREQUENCY_HZ, PM_TIMER_STATE_VERSION};
pub use acpi_sleep::{AcpiSleepDevice, AcpiSleepState, ACPI_SLEEP_STATE_VERSION};
pub use bus::{Bus, BusDevice, BusError};
pub use cmos::{Cmos, CmosState, CMOS_NVRAM_SIZE, CMOS_STATE_VERSION};
pub use cpu_hotplug::{CpuEjectSink, CpuHotplug, CpuHotplugState, CPU_HOTPLUG_SIZE};
pub use debug_console::DebugConsole;
pub use ged::{
    Ged, GedState, GED_CPU_HOTPLUG, GED_EVENTS, GED_MEMORY_HOTPLUG, GED_PCI_HOTPLUG,
    GED_POWER_BUTTON, GED_STATE_VERSION, GED_VMGENID,
};
pub use i8042::{I8042State, I8042, I8042_STATE_VERSION};
pub use memory_hotplug::{MemoryHotplug, MemoryHotplugState, MEMORY_HOTPLUG_SIZE};
pub use pci_hotplug::{EjectSink, PciHotplug, PciHotplugState, PCI_HOTPLUG_SIZE};
pub use serial::{Serial, SerialOutput, SerialState, SERIAL_STATE_VERSION};
pub use state::{StateError, Stateful};
pub use vmgenid::{new_generation_id, write_generation_id};

/// A device's statistics for `vm.counters`: counter name → value.
pub trait DeviceCounters: Send + Sync {
    fn counters(&self) -> std::collections::BTreeMap<String, u64>;
}

/// What a device may ask of the machine as a whole. The VMM decides what it means; the vCPU
/// that made the request should not run on past it.
pub trait VmRequests: Send + Sync {
    fn power_off(&self);
    fn reset(&self);
}
