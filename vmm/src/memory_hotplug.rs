//! ACPI memory hotplug on a running VM (`hotplug_method=acpi`), as the original does it: each
//! `vm.resize` up plugs one "DIMM" after the last in the hotplug region, a KVM memory slot of its
//! own, and tells the guest through the memory hotplug controller (`\_SB_.MHPC`) and the GED;
//! the guest finds its range with the memory device's `_CRS` and onlines it. Memory plugged so
//! cannot be taken back (the original's ACPI hotplug cannot either; virtio-mem can).

use devices::GED_MEMORY_HOTPLUG;
use log::info;

use crate::memory;
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum DimmError {
    #[error("the VM has no ACPI memory hotplug")]
    NoHotplug,
    #[error(
        "every memory hotplug slot is taken ({} DIMMs)",
        devices::memory_hotplug::MEMORY_HOTPLUG_SLOTS
    )]
    NoSlot,
    #[error("cannot add the memory slot: {0}")]
    Slot(#[source] memory::MemoryError),
    #[error("cannot signal the guest: {0}")]
    Event(#[source] std::io::Error),
}

impl Vm {
    /// Bytes ACPI memory hotplug has plugged (`None` without it).
    pub fn acpi_plugged(&self) -> Option<u64> {
        let dev = self.devices().memory_hotplug.as_ref()?;
        let dimms = dev.lock().unwrap_or_else(|e| e.into_inner()).dimms();
        Some(dimms.iter().map(|&(_, len)| len).sum())
    }

    /// Plugs `size` more bytes (a multiple of 128 MiB, inside the hotplug region: checked by
    /// the caller) as a new DIMM after the last one.
    pub fn plug_dimm(&mut self, size: u64) -> Result<(), DimmError> {
        let base = self.acpi_hotplug.ok_or(DimmError::NoHotplug)?;
        let dev = self
            .devices()
            .memory_hotplug
            .clone()
            .ok_or(DimmError::NoHotplug)?;
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if !d.slot_free() {
            return Err(DimmError::NoSlot);
        }
        let mut dimms = d.dimms();
        let start = dimms.last().map_or(base, |&(b, len)| b + len);
        dimms.push((start, size));
        let slots = memory::memory_slots(self.memory(), Some(base), &dimms);
        let slot = slots
            .iter()
            .find(|s| s.gpa == start)
            .copied()
            .ok_or(DimmError::NoHotplug)?;
        memory::register_memory(self.hypervisor_vm(), &[slot], false).map_err(DimmError::Slot)?;
        d.insert(start, size);
        drop(d);
        info!(
            "memory: DIMM {:#x}+{size:#x} plugged (slot {})",
            start, slot.slot
        );
        self.devices()
            .ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify(GED_MEMORY_HOTPLUG)
            .map_err(DimmError::Event)
    }
}
