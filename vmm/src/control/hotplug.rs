//! The control loop's side of hotplug: `vm.add-disk`, `vm.add-net`, `vm.add-vsock`,
//! `vm.add-pmem`, `vm.add-fs`, `vm.add-generic-vhost-user` and `vm.remove-device`, as
//! the original answers them. Before boot they change the configuration (204); on a built VM
//! an added device is on the bus when the call returns (200 with its id and PCI address), and a
//! removal is a request the guest carries out by ejecting the slot, after which the device is
//! dropped from the VM and from the configuration (event `device-removed`).

use std::collections::BTreeSet;

use api::{ApiError, ApiResponse, PciDeviceInfo};
use log::info;

use super::Vmm;
use crate::config::{
    DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig, PciDeviceCommonConfig, PmemConfig,
    VmConfig, VsockConfig,
};
use crate::cpu::{merge_ejections, PciEjections};
use crate::event_monitor::properties;
use crate::pci_setup::PciAddress;
use crate::virtio_build::{self, NewDevice};

/// A device an `add-*` call brings.
pub(super) enum Added {
    Disk(DiskConfig),
    Net(NetConfig),
    Vsock(VsockConfig),
    Pmem(PmemConfig),
    Fs(FsConfig),
    GenericVhostUser(GenericVhostUserConfig),
}

impl Added {
    /// The device's PCI keys (its id, segment and slot).
    fn pci_common(&mut self) -> &mut PciDeviceCommonConfig {
        match self {
            Added::Disk(d) => &mut d.pci_common,
            Added::Net(n) => &mut n.pci_common,
            Added::Vsock(v) => &mut v.pci_common,
            Added::Pmem(p) => &mut p.pci_common,
            Added::Fs(f) => &mut f.pci_common,
            Added::GenericVhostUser(g) => &mut g.pci_common,
        }
    }

    /// `_disk` / `_net`: the prefix of the ids the VMM makes up.
    fn prefix(&self) -> &'static str {
        match self {
            Added::Disk(_) => "_disk",
            Added::Net(_) => "_net",
            Added::Vsock(_) => "_vsock",
            Added::Pmem(_) => "_pmem",
            Added::Fs(_) => "_fs",
            Added::GenericVhostUser(_) => "_generic_vhost_user",
        }
    }

    /// The configuration with the device in it.
    fn added_to(&self, config: &VmConfig) -> VmConfig {
        let mut c = config.clone();
        match self {
            Added::Disk(d) => c.disks.push(d.clone()),
            Added::Net(n) => c.net.push(n.clone()),
            Added::Vsock(v) => c.vsock = Some(v.clone()),
            Added::Pmem(p) => c.pmem.push(p.clone()),
            Added::Fs(f) => c.fs.push(f.clone()),
            Added::GenericVhostUser(g) => c.generic_vhost_user.push(g.clone()),
        }
        c
    }

    fn build(
        &self,
        id: String,
        groups: &virtio_build::RateLimitGroups,
    ) -> Result<NewDevice, crate::pci_setup::PciSetupError> {
        match self {
            Added::Disk(d) => virtio_build::disk(d, id, groups),
            Added::Net(n) => virtio_build::net(n, id),
            Added::Vsock(v) => virtio_build::vsock(&VsockConfig {
                pci_common: PciDeviceCommonConfig {
                    id: Some(id),
                    ..Default::default()
                },
                ..v.clone()
            }),
            Added::Pmem(p) => crate::pmem::pmem(p, id),
            Added::Fs(f) => virtio_build::fs(f, id),
            Added::GenericVhostUser(g) => crate::virtio_build_vhost::generic(g, id),
        }
    }
}

/// The ids of the devices `vm.remove-device` can remove (those the `add-*` calls add).
fn removable_ids(config: &VmConfig) -> impl Iterator<Item = &Option<String>> {
    config
        .disks
        .iter()
        .map(|d| &d.pci_common.id)
        .chain(config.net.iter().map(|n| &n.pci_common.id))
        .chain(config.vsock.iter().map(|v| &v.pci_common.id))
        .chain(config.pmem.iter().map(|p| &p.pci_common.id))
        .chain(config.fs.iter().map(|f| &f.pci_common.id))
        .chain(config.generic_vhost_user.iter().map(|g| &g.pci_common.id))
}

/// Every device id the configuration and the built VM use.
fn ids_in_use(config: &VmConfig, placed: &[(String, PciAddress)]) -> BTreeSet<String> {
    removable_ids(config)
        .chain([&config.rng.pci_common.id, &config.console.pci_common.id])
        .flatten()
        .cloned()
        .chain(placed.iter().map(|(id, _)| id.clone()))
        .collect()
}

/// Takes device `id` out of the configuration; false when no removable device has it.
fn remove_from_config(config: &mut VmConfig, id: &str) -> bool {
    let before = (
        config.disks.len(),
        config.net.len(),
        config.pmem.len(),
        config.fs.len(),
        config.generic_vhost_user.len(),
    );
    config
        .disks
        .retain(|d| d.pci_common.id.as_deref() != Some(id));
    config
        .net
        .retain(|n| n.pci_common.id.as_deref() != Some(id));
    config
        .pmem
        .retain(|p| p.pci_common.id.as_deref() != Some(id));
    config.fs.retain(|f| f.pci_common.id.as_deref() != Some(id));
    config
        .generic_vhost_user
        .retain(|g| g.pci_common.id.as_deref() != Some(id));
    let after = (
        config.disks.len(),
        config.net.len(),
        config.pmem.len(),
        config.fs.len(),
        config.generic_vhost_user.len(),
    );
    let vsock = config
        .vsock
        .as_ref()
        .is_some_and(|v| v.pci_common.id.as_deref() == Some(id));
    if vsock {
        config.vsock = None;
    }
    vsock || before != after
}

impl Vmm {
    /// `vm.add-disk` and `vm.add-net`.
    pub(super) fn add_device(&mut self, mut dev: Added) -> Result<ApiResponse, ApiError> {
        let Some(config) = self.config.as_ref() else {
            return Err(ApiError::VmNotCreated);
        };
        if self.outgoing.is_some() {
            return Err(ApiError::Failed("the VM is being migrated".into()));
        }
        if let (Added::Vsock(_), Some(v)) = (&dev, &config.vsock) {
            return Err(ApiError::BadRequest(format!(
                "the VM has a vsock device already ({}): one per VM",
                v.socket.display()
            )));
        }
        // The whole configuration must still validate (ids and slots unique, files there,
        // queues within the vCPUs), as the original checks it.
        dev.added_to(config).validate()?;
        let Some(vm) = self.vm.as_mut() else {
            // Not built: the device joins the configuration and comes up with the VM.
            self.config = Some(dev.added_to(config));
            return Ok(ApiResponse::Empty);
        };
        // The guest learns which functions are behind the IOMMU from the VIOT, written at
        // boot: only a segment it lists whole can take a device behind it later.
        let segment = dev.pci_common().pci_segment;
        if dev.pci_common().iommu && !config.iommu_segments().contains(&segment) {
            return Err(ApiError::BadRequest(format!(
                "iommu=on: a hot-added device can be behind the IOMMU only on one of \
                 --platform iommu_segments (segment {segment} is not)"
            )));
        }
        let placed = vm.devices().pci.placed();
        let used = ids_in_use(config, &placed);
        let id = match dev.pci_common().id.clone() {
            Some(id) if used.contains(&id) => {
                return Err(ApiError::BadRequest(format!(
                    "id={id}: a device of the VM already has this id"
                )))
            }
            Some(id) => id,
            None => {
                let id = (0..)
                    .map(|n| format!("{}{n}", dev.prefix()))
                    .find(|id| !used.contains(id))
                    .unwrap_or_default();
                dev.pci_common().id = Some(id.clone());
                id
            }
        };
        if let Added::Net(n) = &mut dev {
            // The MAC the guest sees is recorded, so a reboot keeps it (as at boot).
            n.mac
                .get_or_insert_with(|| vm_config::mac::MacAddr::random_local().to_string());
        }
        let built = dev
            .build(id.clone(), &vm.devices().pci.rate_limit_groups)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let image_type = built.image_type;
        let at = vm
            .devices_mut()
            .hot_add(built)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let (Added::Disk(d), Some(t)) = (&mut dev, image_type) {
            d.image_type = t;
        }
        let bdf = at.to_string();
        info!("hot-added {id} at {bdf}");
        if let Some(config) = self.config.as_mut() {
            *config = dev.added_to(config);
        }
        Ok(ApiResponse::PciDevice(PciDeviceInfo { id, bdf }))
    }

    /// `vm.remove-device`.
    pub(super) fn remove_device(&mut self, id: &str) -> Result<(), ApiError> {
        let Some(config) = self.config.as_mut() else {
            return Err(ApiError::VmNotCreated);
        };
        if self.outgoing.is_some() {
            return Err(ApiError::Failed("the VM is being migrated".into()));
        }
        let Some(vm) = self.vm.as_mut() else {
            return if remove_from_config(config, id) {
                Ok(())
            } else {
                Err(ApiError::BadRequest(format!(
                    "id={id}: no disk, net, vsock, pmem, fs or generic vhost-user device has this id"
                )))
            };
        };
        if !removable_ids(config).any(|d| d.as_deref() == Some(id))
            && vm.devices().pci.placed().iter().any(|(p, _)| p == id)
        {
            return Err(ApiError::BadRequest(format!(
                "id={id}: only disk, net, vsock, pmem, fs and generic vhost-user devices can be removed"
            )));
        }
        // Behind the IOMMU outside an IOMMU segment: the boot-time VIOT names its slot, and a
        // device hot-added there later could not be.
        let behind = vm.devices().pci.iommu_endpoint(id);
        if let Some(at) = behind.filter(|at| !config.iommu_segments().contains(&at.segment)) {
            return Err(ApiError::BadRequest(format!(
                "id={id}: a device behind the IOMMU ({at}) can be removed only from one of \
                 --platform iommu_segments"
            )));
        }
        vm.devices_mut()
            .request_removal(id)
            .map_err(|e| ApiError::BadRequest(format!("id={id}: {e}")))?;
        info!("asked the guest to eject {id}");
        Ok(())
    }

    /// The guest ejected PCI slots or CPUs: their devices leave the VM and the configuration;
    /// the CPUs' vCPUs stop. While a migration's thread has the VM, they wait for it to come
    /// back (`apply_ejections`).
    pub(super) fn ejected(&mut self) {
        let (slots, cpus) = self.events.take_ejected();
        if self.vm.is_none() {
            merge_ejections(&mut self.deferred_ejects.0, slots);
            self.deferred_ejects.1.extend(cpus);
            return;
        }
        self.apply_ejections(slots, cpus);
    }

    /// Removes the devices of the ejected `slots` and stops the ejected `cpus`.
    pub(super) fn apply_ejections(&mut self, slots: PciEjections, cpus: Vec<u32>) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        for cpu in cpus {
            vm.cpu_ejected(cpu);
            let present = vm.present_vcpus();
            if let Some(config) = self.config.as_mut() {
                config.cpus.boot_vcpus = present;
            }
        }
        for (id, at) in vm.devices_mut().eject(&slots) {
            if let Some(config) = self.config.as_mut() {
                remove_from_config(config, &id);
            }
            let bdf = at.to_string();
            info!(
                "{id} removed from {bdf}; {} GSIs in use",
                vm.devices().pci.gsis_in_use()
            );
            let props = properties([("id", id), ("bdf", bdf)]);
            self.monitor.emit_with("vm", "device-removed", Some(&props));
        }
    }
}
