//! PCI segment 0 as the guest sees it: type-0 configuration spaces with BARs and capabilities,
//! a host bridge at 00:00.0, configuration access through ports 0xcf8/0xcfc and ECAM, BAR
//! allocation by the VMM (there is no firmware) and MSI-X.
//!
//! The crate knows nothing of the hypervisor: what a device needs from the VM (moving a BAR on
//! the MMIO bus, ioeventfds, MSI routes) goes through [`VmInterface`], which the VMM implements.

mod bus;
mod configuration;
mod msix;

use std::sync::{Arc, Mutex};

pub use bus::{BarAllocator, BarWindows, PciConfigIo, PciConfigMmio, PciRoot, PciRootError};
pub use configuration::{
    extract, BarKind, PciConfiguration, PciIds, BAR_COUNT, COMMAND_MEMORY, CONFIG_SPACE_SIZE,
};
pub use msix::{MsixCap, MsixConfig, MSIX_ENTRY_SIZE};

use devices::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// Vendor ID of the host bridge (Intel, as most virtual platforms use).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// Device ID of the host bridge (a generic "virtual host bridge").
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

/// What PCI devices need from the VM. Every call may fail; a device that cannot get what it asks
/// for logs it and keeps running with the feature unavailable.
pub trait VmInterface: Send + Sync {
    /// Puts `dev` on the MMIO bus at `[base, base + len)`.
    fn map_mmio(&self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), String>;
    /// Takes whatever starts at `base` off the MMIO bus.
    fn unmap_mmio(&self, base: u64);
    /// Signals `fd` on any guest write to MMIO address `addr`, without a VM exit to user space.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), String>;
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64);
    /// A fresh GSI for a message-signalled interrupt.
    fn allocate_gsi(&self) -> Result<u32, String>;
    /// Routes `gsi` to the MSI `(address, data)`, or removes its route with `None`.
    fn set_msi_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String>;
    /// Wires `fd` to inject `gsi` when written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), String>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32);
}

/// A PCI function. Configuration accesses come through the root (ports or ECAM); accesses to
/// BARs come from the MMIO bus, where the root maps each BAR with a [`BarRegion`].
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// A register of the configuration space was read; devices with special registers (MSI-X
    /// message control, virtio's pci-cfg window) override this. `reg` is the dword index.
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }
    /// A configuration write: `offset` is the byte offset, `data` 1, 2 or 4 bytes inside one
    /// dword. The default stores it with the write masks of the configuration space.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `new` (or nowhere with `None`); it was at `old`. Devices move
    /// their ioeventfds here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

/// The MMIO bus entry of one BAR: forwards accesses to the device.
pub struct BarRegion {
    pub dev: Arc<Mutex<dyn PciDevice>>,
    pub bar: usize,
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_bar(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_bar(self.bar, offset, data);
    }
}
