//! `vm.resize`, as the original answers it: every field given is checked before anything
//! changes. `desired_vcpus` hot-adds or asks the guest to eject vCPUs (429 while an ejection
//! is pending); `desired_ram` asks the virtio-mem device for that much memory above `size`
//! (the guest plugs or unplugs it), or with ACPI memory hotplug plugs a DIMM of the difference
//! (growing only); `desired_balloon` sets the balloon's target. Before boot
//! they change the configuration only. Each is recorded in the configuration, so a reboot
//! keeps it.

use api::{ApiError, VmResizeData, VmState};
use log::info;
use vm_config::{HotplugMethod, MemoryConfig, HOTPLUG_ALIGN, VIRTIO_MEM_BLOCK_SIZE};

use super::Vmm;
use crate::memory_hotplug::DimmError;
use crate::vcpu_hotplug::ResizeError;

/// The bytes of the hotplug region `desired_ram` asks for, or why it cannot be had.
/// `plugged`: what a built VM with ACPI memory hotplug has plugged (it can only grow).
fn hotplugged_size(m: &MemoryConfig, ram: u64, plugged: Option<u64>) -> Result<u64, ApiError> {
    if m.zones.is_some() {
        // As the original: memory in zones is resized zone by zone.
        return Err(ApiError::BadRequest(format!(
            "desired_ram={ram}: the VM's memory is in zones (--memory-zone); resize them \
             with vm.resize-zone"
        )));
    }
    let Some(hotplug) = m.hotplug_size else {
        return Err(ApiError::BadRequest(format!(
            "desired_ram={ram}: the VM has no memory to hot-plug \
             (--memory hotplug_size=<size>)"
        )));
    };
    let max = m.size + hotplug;
    let bytes = ram
        .checked_sub(m.size)
        .filter(|&b| b <= hotplug)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "desired_ram={ram}: must be between size ({}) and size + hotplug_size ({max})",
                m.size
            ))
        })?;
    let (step, name) = match m.hotplug_method {
        HotplugMethod::VirtioMem => (VIRTIO_MEM_BLOCK_SIZE, "2 MiB"),
        HotplugMethod::Acpi => (HOTPLUG_ALIGN, "128 MiB"),
    };
    if !bytes.is_multiple_of(step) {
        return Err(ApiError::BadRequest(format!(
            "desired_ram={ram}: must be size plus a multiple of {name}"
        )));
    }
    if m.hotplug_method == HotplugMethod::Acpi && bytes < plugged.unwrap_or(0) {
        return Err(ApiError::BadRequest(format!(
            "desired_ram={ram}: memory plugged by ACPI cannot be removed \
             (hotplug_method=virtio-mem can shrink)"
        )));
    }
    Ok(bytes)
}

impl Vmm {
    pub(super) fn resize(&mut self, r: VmResizeData) -> Result<(), ApiError> {
        let Some(config) = self.config.as_ref() else {
            return Err(ApiError::VmNotCreated);
        };
        if self.outgoing.is_some() {
            return Err(ApiError::Failed("the VM is being migrated".into()));
        }
        let dimms = self.vm.as_ref().and_then(|vm| vm.acpi_plugged());
        let plugged = match r.desired_ram {
            Some(ram) => Some(hotplugged_size(&config.memory, ram, dimms)?),
            None => None,
        };
        let max = config.cpus.max_vcpus;
        if let Some(n) = r.desired_vcpus {
            if n == 0 || n > max {
                return Err(ApiError::BadRequest(format!(
                    "desired_vcpus={n}: must be between 1 and max_vcpus ({max})"
                )));
            }
        }
        if let Some(b) = r.desired_balloon {
            if config.balloon.is_none() {
                return Err(ApiError::BadRequest(format!(
                    "desired_balloon={b}: the VM has no balloon (--balloon)"
                )));
            }
            if b >= config.memory.ram_size() {
                return Err(ApiError::BadRequest(format!(
                    "desired_balloon={b}: must be smaller than the guest RAM ({} bytes)",
                    config.memory.ram_size()
                )));
            }
        }
        if r.desired_vcpus.is_some() && self.vm.is_some() && self.state != VmState::Running {
            return Err(ApiError::InvalidState {
                action: "resize the vCPUs of",
                state: self.state,
            });
        }
        self.monitor.emit("vm", "resizing");
        if let Some(n) = r.desired_vcpus {
            let now = match self.vm.as_mut() {
                Some(vm) => {
                    vm.resize_vcpus(n).map_err(|e| match e {
                        ResizeError::RemovalPending => ApiError::TooManyRequests(e.to_string()),
                        e => ApiError::Failed(e.to_string()),
                    })?;
                    // Removals count when the guest has ejected (`ejected`).
                    vm.present_vcpus().max(n)
                }
                None => n,
            };
            if let Some(config) = self.config.as_mut() {
                config.cpus.boot_vcpus = now;
            }
            info!("vCPUs: {n} wanted, {now} now");
        }
        if let Some(bytes) = plugged {
            if let Some(mem) = self
                .vm
                .as_ref()
                .and_then(|vm| vm.devices().pci.virtio_mem.clone())
            {
                mem.set_requested(bytes)
                    .map_err(|e| ApiError::Failed(e.to_string()))?;
            }
            if let (Some(vm), Some(now)) = (self.vm.as_mut(), dimms) {
                if bytes > now {
                    vm.plug_dimm(bytes - now).map_err(|e| match e {
                        DimmError::NoSlot => ApiError::BadRequest(format!(
                            "desired_ram={}: {e}",
                            r.desired_ram.unwrap_or_default()
                        )),
                        e => ApiError::Failed(e.to_string()),
                    })?;
                }
            }
            if let Some(config) = self.config.as_mut() {
                config.memory.hotplugged_size = (bytes > 0).then_some(bytes);
            }
            info!("memory: {bytes} bytes asked of the hotplug region");
        }
        if let Some(b) = r.desired_balloon {
            if let Some(balloon) = self
                .vm
                .as_ref()
                .and_then(|vm| vm.devices().pci.balloon.clone())
            {
                balloon
                    .set_target(b)
                    .map_err(|e| ApiError::Failed(e.to_string()))?;
            }
            if let Some(bc) = self.config.as_mut().and_then(|c| c.balloon.as_mut()) {
                bc.size = b;
            }
            info!("balloon target {b} bytes");
        }
        self.monitor.emit("vm", "resized");
        Ok(())
    }
}
