//! What the VMM chooses for a configuration when the VM boots, recorded in the configuration
//! as the original records it: device ids and guest MAC addresses. `vm.info` then shows them and
//! a reboot keeps them.

use std::collections::BTreeSet;

use super::mac::MacAddr;
use super::VmConfig;

impl VmConfig {
    /// Names each disk, net, generic vhost-user, virtio-fs, pmem and vsock device that has no
    /// id `_disk<N>`, `_net<N>`, `_generic_vhost_user<N>`, `_fs<N>`, `_pmem<N>`, `_vsock<N>`,
    /// N counting every name made so far in that order (the order the original's device
    /// manager makes them) and skipping ids in use; gives each net device without a MAC a
    /// random one (first byte 0x2e). Ids and MACs already there stay.
    pub fn assign_generated(&mut self) {
        let mut used: BTreeSet<String> = self
            .disks
            .iter()
            .map(|d| &d.pci_common.id)
            .chain(self.net.iter().map(|n| &n.pci_common.id))
            .chain([&self.rng.pci_common.id, &self.console.pci_common.id])
            .chain(self.balloon.iter().map(|b| &b.pci_common.id))
            .chain(self.generic_vhost_user.iter().map(|g| &g.pci_common.id))
            .chain(self.fs.iter().map(|f| &f.pci_common.id))
            .chain(self.pmem.iter().map(|p| &p.pci_common.id))
            .chain(self.vsock.iter().map(|v| &v.pci_common.id))
            .flatten()
            .cloned()
            .collect();
        let mut counter = 0usize;
        let mut next = |prefix: &str| loop {
            let name = format!("{prefix}{counter}");
            counter += 1;
            if used.insert(name.clone()) {
                return name;
            }
        };
        for d in self.disks.iter_mut().filter(|d| d.pci_common.id.is_none()) {
            d.pci_common.id = Some(next("_disk"));
        }
        for n in &mut self.net {
            if n.pci_common.id.is_none() {
                n.pci_common.id = Some(next("_net"));
            }
            if n.mac.is_none() {
                n.mac = Some(MacAddr::random_local().to_string());
            }
        }
        for g in self
            .generic_vhost_user
            .iter_mut()
            .filter(|g| g.pci_common.id.is_none())
        {
            g.pci_common.id = Some(next("_generic_vhost_user"));
        }
        for f in self.fs.iter_mut().filter(|f| f.pci_common.id.is_none()) {
            f.pci_common.id = Some(next("_fs"));
        }
        for p in self.pmem.iter_mut().filter(|p| p.pci_common.id.is_none()) {
            p.pci_common.id = Some(next("_pmem"));
        }
        for v in self.vsock.iter_mut().filter(|v| v.pci_common.id.is_none()) {
            v.pci_common.id = Some(next("_vsock"));
        }
    }
}
