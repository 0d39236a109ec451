//! PCI segment 0 as the guest sees it: type-0 configuration spaces with BARs and capabilities,
//! a host bridge at 00:00.0, configuration access through ports 0xcf8/0xcfc and ECAM, BAR
//! allocation by the VMM (there is no firmware) and MSI-X.
//!
//! The crate knows nothing of the hypervisor: what a device needs from the VM (moving a BAR on
//! the MMIO bus, ioeventfds, MSI routes) goes through [`VmInterface`], which the VMM implements.

mod bus;
mod configuration;
mod msix;
pub mod pvpanic;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

use std::sync::{Arc, Mutex};

pub use bus::{
    BarAllocator, BarWindows, PciConfigIo, PciConfigIoState, PciConfigMmio, PciRoot, PciRootError,
    PciRootState, PciSegmentsEcam, PCI_CONFIG_IO_STATE_VERSION, PCI_ROOT_STATE_VERSION,
};
pub use configuration::{
    extract, BarInfo, BarKind, PciConfiguration, PciConfigurationState, PciIds, BAR_COUNT,
    COMMAND_MEMORY, CONFIG_SPACE_SIZE, PCI_CONFIG_STATE_VERSION,
};
pub use msix::{MsixCap, MsixConfig, MsixEntry, MsixState, MSIX_ENTRY_SIZE, MSIX_STATE_VERSION};

use devices::BusDevice;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Vendor ID of the host bridge (Intel, as most virtual platforms use).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// Device ID of the host bridge (a generic "virtual host bridge").
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

/// Why a saved state (of a configuration space, an MSI-X table, the root, a virtio-pci
/// transport, ...) was not restored. A state file is input: every check that can fail is one of
/// these, never a panic. `what` names the object (and the device, where there is one).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("cannot restore {what} state version {found}: this build reads version {supported}")]
    Version {
        what: String,
        found: u32,
        supported: u32,
    },
    /// The state is not one this build could have written for this object (another device,
    /// another configuration, or values the registers cannot hold). Nothing was changed.
    #[error("cannot restore {what} state: {reason}")]
    Invalid { what: String, reason: String },
    /// The state was taken, but the host refused something it needed (an MSI route, a device
    /// thread). The object is left with the state applied as far as the host allowed.
    #[error("cannot restore {what} state: {reason}")]
    Host { what: String, reason: String },
}

impl StateError {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StateError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Refuses a `found` version other than `supported`.
    pub fn check_version(what: &str, found: u32, supported: u32) -> Result<(), Self> {
        if found == supported {
            Ok(())
        } else {
            Err(StateError::Version {
                what: what.into(),
                found,
                supported,
            })
        }
    }

    /// The same error, with `owner` (e.g. a device's name) in front of what it names.
    pub fn within(self, owner: &str) -> Self {
        let name = |what: String| format!("{owner}: {what}");
        match self {
            StateError::Version {
                what,
                found,
                supported,
            } => StateError::Version {
                what: name(what),
                found,
                supported,
            },
            StateError::Invalid { what, reason } => StateError::Invalid {
                what: name(what),
                reason,
            },
            StateError::Host { what, reason } => StateError::Host {
                what: name(what),
                reason,
            },
        }
    }
}

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
    /// Gives back a GSI `allocate_gsi` returned (its route and irqfd already removed), so an
    /// unplugged device's vectors can be used by the next one.
    fn free_gsi(&self, gsi: u32);
    /// Routes `gsi` to the MSI `(address, data)`, or removes its route with `None`.
    fn set_msi_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String>;
    /// Wires `fd` to inject `gsi` when written.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), String>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32);
    /// Device `id` was activated or reset by its driver (`event`: `activated`, `reset`), for
    /// the VMM's event monitor. Nothing by default.
    fn device_event(&self, _id: &str, _event: &'static str) {}
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
