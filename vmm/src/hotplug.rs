//! PCI hotplug on a running VM, as the original does it: a device is placed on the bus at once
//! and announced (the hotplug controller's `PCIU` bit and the GED's PCI event); a removal is a
//! request to the guest (`PCID`), and the device goes only when the guest ejects its slot
//! (`_EJ0` writes `B0EJ`), which reaches the control loop through `VmEvents::eject`.

use std::sync::{Arc, Mutex};

use devices::GED_PCI_HOTPLUG;
use log::{info, warn};

use crate::device_manager::DeviceManager;
use crate::pci_setup::{PciDevices, PciSetupError};
use crate::virtio_build::NewDevice;

/// Why a removal cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("no device has the id {0:?}")]
    UnknownId(String),
}

impl PciDevices {
    /// Unplugs the function at `slot`: its BAR leaves the bus and goes back to the allocator,
    /// and dropping it stops its workers, removes its interrupt routes and frees their GSIs,
    /// and closes what it holds (the disk image and its lock, the TAP). Returns its id.
    fn unplug(&mut self, slot: u8) -> Option<String> {
        let i = self.functions.iter().position(|f| f.slot == slot)?;
        let mut f = self.functions.remove(i);
        if let Err(e) = self
            .root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_device(slot)
        {
            warn!("PCI 00:{slot:02x}.0 ({}): {e}", f.id);
        }
        if let Err(e) = self.bars.free(f.bar, f.bar_size) {
            warn!("PCI 00:{slot:02x}.0 ({}): {e}", f.id);
        }
        // A pmem range: its KVM slot is removed (the device is off the bus), then the range
        // goes back to the window.
        if let Some(m) = f.memory.take() {
            let (gpa, len) = (m.gpa, m.len);
            drop(m);
            if let Err(e) = self.bars.free(gpa, len) {
                warn!("PCI 00:{slot:02x}.0 ({}): {e}", f.id);
            }
        }
        info!("PCI 00:{slot:02x}.0: {} ({}) unplugged", f.id, f.option);
        Some(f.id.clone())
    }

    /// GSIs the segment's devices hold (for leak checks).
    pub fn gsis_in_use(&self) -> usize {
        self.vmi.gsis_in_use()
    }
}

impl DeviceManager {
    /// Places `d` on the running (or paused) VM's bus and tells the guest. Returns its slot.
    pub fn hot_add(&mut self, d: NewDevice) -> Result<u8, PciSetupError> {
        let slot = self.pci.place(d)?;
        if self.pci.devices_paused {
            // A paused VM's devices start with the others when it resumes.
            if let Some(f) = self.pci.functions.last() {
                if let Some(Err(e)) = f.transport().map(|t| lock(t).pause()) {
                    warn!("PCI 00:{slot:02x}.0 ({}): cannot pause it: {e}", f.id);
                }
            }
        }
        lock(&self.pci.hotplug).device_added(slot);
        self.notify_pci();
        Ok(slot)
    }

    /// Asks the guest to eject the device `id`. Asking again repeats the request (a guest that
    /// was not listening hears it now). Returns its slot.
    pub fn request_removal(&mut self, id: &str) -> Result<u8, RemoveError> {
        let f = self
            .pci
            .functions
            .iter_mut()
            .find(|f| f.id == id)
            .ok_or_else(|| RemoveError::UnknownId(id.to_string()))?;
        f.removal_requested = true;
        let slot = f.slot;
        lock(&self.pci.hotplug).removal_requested(slot);
        self.notify_pci();
        Ok(slot)
    }

    /// Removes the devices of the slots the guest ejected (bitmap of segment 0). Returns each
    /// removed device's id and slot.
    pub fn eject(&mut self, slots: u32) -> Vec<(String, u8)> {
        let mut gone = Vec::new();
        for slot in (1..32u8).filter(|s| slots & (1 << s) != 0) {
            let Some(f) = self.pci.functions.iter().find(|f| f.slot == slot) else {
                warn!("the guest ejects PCI slot {slot}, which is empty");
                continue;
            };
            if !f.removal_requested {
                info!("the guest ejects {} on its own", f.id);
            }
            if let Some(id) = self.pci.unplug(slot) {
                gone.push((id, slot));
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
