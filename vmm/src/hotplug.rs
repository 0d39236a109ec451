//! PCI hotplug on a running VM, as the original does it: a device is placed on the bus at once
//! and announced (the hotplug controller's `PCIU` bit and the GED's PCI event); a removal is a
//! request to the guest (`PCID`), and the device goes only when the guest ejects its slot
//! (`_EJ0` writes `B0EJ`), which reaches the control loop through `VmEvents::eject`.

use std::sync::{Arc, Mutex};

use devices::GED_PCI_HOTPLUG;
use log::{info, warn};

use crate::cpu::PciEjections;
use crate::device_manager::DeviceManager;
use crate::pci_setup::{PciAddress, PciDevices, PciSetupError};
use crate::virtio_build::NewDevice;

/// Why a removal cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no device has the id {0:?}")]
    UnknownId(String),
}

impl PciDevices {
    /// Unplugs the function at `at`: its BAR leaves the bus and goes back to the allocator,
    /// and dropping it stops its workers, removes its interrupt routes and frees their GSIs,
    /// and closes what it holds (the disk image and its lock, the TAP). Returns its id.
    fn unplug(&mut self, at: PciAddress) -> Option<String> {
        let i = self.functions.iter().position(|f| f.address() == at)?;
        let mut f = self.functions.remove(i);
        let segment = self.segment(at.segment)?;
        if let Err(e) = segment.root().remove_device(at.slot) {
            warn!("PCI {at} ({}): {e}", f.id);
        }
        if let Err(e) = segment.bars.free(f.bar, f.bar_size) {
            warn!("PCI {at} ({}): {e}", f.id);
        }
        // A pmem range: its KVM slot is removed (the device is off the bus), then the range
        // goes back to the window.
        if let Some(m) = f.memory.take() {
            let (gpa, len) = (m.gpa, m.len);
            drop(m);
            if let Err(e) = segment.bars.free(gpa, len) {
                warn!("PCI {at} ({}): {e}", f.id);
            }
        }
        // Behind the IOMMU: the endpoint leaves its domain (its slot stays behind the IOMMU:
        // only devices of IOMMU segments are removed).
        if let (Some(m), Some(t)) = (&self.iommu, f.transport()) {
            if let Some(endpoint) = lock(t).dma_endpoint() {
                m.release(endpoint);
            }
        }
        info!("PCI {at}: {} ({}) unplugged", f.id, f.option);
        Some(f.id.clone())
    }

    /// GSIs the segment's devices hold (for leak checks).
    pub fn gsis_in_use(&self) -> usize {
        self.vmi.gsis_in_use()
    }
}

impl DeviceManager {
    /// Places `d` on the running (or paused) VM's bus and tells the guest. Returns its address.
    pub fn hot_add(&mut self, d: NewDevice) -> Result<PciAddress, PciSetupError> {
        let at = self.pci.place(d)?;
        if self.pci.devices_paused {
            // A paused VM's devices start with the others when it resumes.
            if let Some(f) = self.pci.functions.last() {
                if let Some(Err(e)) = f.transport().map(|t| lock(t).pause()) {
                    warn!("PCI {at} ({}): cannot pause it: {e}", f.id);
                }
            }
        }
        lock(&self.pci.hotplug).device_added(at.segment, at.slot);
        self.notify_pci();
        Ok(at)
    }

    /// Asks the guest to eject the device `id`. Asking again repeats the request (a guest that
    /// was not listening hears it now). Returns its address.
    pub fn request_removal(&mut self, id: &str) -> Result<PciAddress, RemoveError> {
        let f = self
            .pci
            .functions
            .iter_mut()
            .find(|f| f.id == id)
            .ok_or_else(|| RemoveError::UnknownId(id.to_string()))?;
        f.removal_requested = true;
        let at = f.address();
        lock(&self.pci.hotplug).removal_requested(at.segment, at.slot);
        self.notify_pci();
        Ok(at)
    }

    /// Removes the devices of the slots the guest ejected (a bitmap per segment). Returns each
    /// removed device's id and address.
    pub fn eject(&mut self, ejected: &PciEjections) -> Vec<(String, PciAddress)> {
        let mut gone = Vec::new();
        for (&segment, &slots) in ejected {
            for slot in (0..32u8).filter(|s| slots & (1 << s) != 0) {
                let at = PciAddress { segment, slot };
                let Some(f) = self.pci.functions.iter().find(|f| f.address() == at) else {
                    warn!("the guest ejects PCI {at}, which is empty");
                    continue;
                };
                if !f.removal_requested {
                    info!("the guest ejects {} on its own", f.id);
                }
                if let Some(id) = self.pci.unplug(at) {
                    gone.push((id, at));
                }
            }
        }
        gone
    }

    fn notify_pci(&self) {
        if let Err(e) = lock(&self.ged).notify(GED_PCI_HOTPLUG) {
            warn!("cannot signal the guest of a PCI change: {e}");
        }
    }
}

fn lock<T: ?Sized>(m: &Arc<Mutex<T>>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
