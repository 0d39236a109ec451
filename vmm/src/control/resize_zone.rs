//! `vm.resize-zone {"id", "desired_ram"}`: a memory zone's RAM, its `size` plus what its
//! virtio-mem device plugs (`--memory-zone hotplug_size=`), as the original's. The zone's
//! device is asked for `desired_ram - size` and the guest plugs or unplugs blocks; the
//! configuration's `hotplugged_size` records it, so a reboot and a snapshot keep it. Before
//! boot only the configuration changes. Failures answer 500 with the original's
//! "Failed resizing a memory zone" and the reason after it.

use api::{ApiError, VmResizeZoneData};
use log::info;
use vm_config::VIRTIO_MEM_BLOCK_SIZE;

use super::Vmm;

/// The original's words for every failed zone resize, then ours.
fn failed(msg: String) -> ApiError {
    ApiError::Chain(vec!["Failed resizing a memory zone".into(), msg])
}

impl Vmm {
    pub(super) fn resize_zone(&mut self, r: VmResizeZoneData) -> Result<(), ApiError> {
        let Some(config) = self.config.as_ref() else {
            return Err(ApiError::VmNotCreated);
        };
        if self.outgoing.is_some() {
            return Err(ApiError::Failed("the VM is being migrated".into()));
        }
        let zone = config
            .memory
            .zones
            .iter()
            .flatten()
            .find(|z| z.id == r.id)
            .ok_or_else(|| failed(format!("id={}: the VM has no memory zone of that id", r.id)))?;
        let Some(hotplug) = zone.hotplug_size else {
            return Err(failed(format!(
                "id={}: the zone has no memory to hot-plug (--memory-zone hotplug_size=)",
                r.id
            )));
        };
        let ram = r.desired_ram;
        let bytes = ram
            .checked_sub(zone.size)
            .filter(|&b| b <= hotplug)
            .ok_or_else(|| {
                failed(format!(
                    "desired_ram={ram}: must be between the zone's size ({}) and size + \
                     hotplug_size ({})",
                    zone.size,
                    zone.size + hotplug
                ))
            })?;
        if !bytes.is_multiple_of(VIRTIO_MEM_BLOCK_SIZE) {
            return Err(failed(format!(
                "desired_ram={ram}: must be the zone's size plus a multiple of 2 MiB"
            )));
        }
        if let Some(vm) = self.vm.as_ref() {
            let control = vm
                .devices()
                .pci
                .zone_virtio_mem
                .iter()
                .find(|(id, _)| *id == r.id)
                .map(|(_, c)| c.clone())
                .ok_or_else(|| failed(format!("id={}: the zone has no virtio-mem device", r.id)))?;
            control
                .set_requested(bytes)
                .map_err(|e| failed(e.to_string()))?;
        }
        if let Some(z) = self
            .config
            .as_mut()
            .and_then(|c| c.memory.zones.as_mut())
            .and_then(|zones| zones.iter_mut().find(|z| z.id == r.id))
        {
            z.hotplugged_size = (bytes > 0).then_some(bytes);
        }
        info!(
            "memory zone {}: {bytes} bytes asked of its hotplug region",
            r.id
        );
        Ok(())
    }
}
