//! Platform devices of the x86-64 machine and the buses the vCPUs dispatch port and MMIO
//! accesses through. Devices know nothing of the VMM: they get event fds to signal interrupts,
//! resets and power-off, and the VMM decides what those mean.

mod acpi_sleep;
mod bus;
mod cmos;
mod i8042;
mod serial;

pub use acpi_sleep::AcpiSleepDevice;
pub use bus::{Bus, BusDevice, BusError};
pub use cmos::{Cmos, CMOS_NVRAM_SIZE};
pub use i8042::I8042;
pub use serial::{Serial, SerialOutput};
