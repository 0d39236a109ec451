//! A restore's net devices, applied to the snapshot's configuration before the VM is built:
//! `net_fds` (the original's: new TAP descriptors for devices backed by descriptors) and
//! `net_macs` (ours: a new guest MAC address, so each clone of a snapshot has its own).

use log::info;
use virtio_devices::VirtioDeviceState;
use vm_config::{RestoreConfig, VmConfig};

use crate::snapshot::VmSnapshot;

/// A restore's `net_fds`: each names a net device of the snapshot's configuration that is backed
/// by descriptors and gives as many new ones, which replace the old (meaningless) numbers. An
/// entry that fits no such device is refused (the original ignores it with a warning).
pub(crate) fn give_net_fds(config: &mut VmConfig, rc: &RestoreConfig) -> Result<(), String> {
    for n in rc.net_fds.iter().flatten() {
        let net = config
            .net
            .iter_mut()
            .find(|c| c.pci_common.id.as_deref() == Some(n.id.as_str()))
            .ok_or_else(|| format!("net_fds: the snapshot has no net device '{}'", n.id))?;
        let Some(old) = &net.fds else {
            return Err(format!(
                "net_fds: net device '{}' opens its TAP by name, not from descriptors",
                n.id
            ));
        };
        let new = n.fds.clone().unwrap_or_default();
        if new.len() != old.len() {
            return Err(format!(
                "net_fds: net device '{}' has {} queue pair(s), {} descriptor(s) given",
                n.id,
                old.len(),
                new.len()
            ));
        }
        net.fds = Some(new);
    }
    Ok(())
}

/// A restore's `net_macs` (already checked as addresses by `RestoreConfig::validate`): each
/// names a net device of the snapshot's configuration, whose guest MAC becomes the one given;
/// its TAP side (`host_mac`, the descriptors) stays. The error, for an id that is no net device
/// of the snapshot, names `net_macs` and the id.
///
/// First each virtio-net state that does not record the MAC its guest saw (a snapshot from
/// before it was recorded) gets the snapshot configuration's, so that the restored device can
/// tell its driver the configuration changed.
pub(crate) fn give_net_macs(
    config: &mut VmConfig,
    state: &mut VmSnapshot,
    rc: &RestoreConfig,
) -> Result<(), String> {
    for d in &mut state.pci.devices {
        if let VirtioDeviceState::Net(s) = &mut d.device {
            if s.mac.is_none() {
                s.mac = config
                    .net
                    .iter()
                    .find(|n| n.pci_common.id.as_deref() == Some(d.id.as_str()))
                    .and_then(|n| n.mac.clone());
            }
        }
    }
    for m in &rc.net_macs {
        let Some(net) = config
            .net
            .iter_mut()
            .find(|c| c.pci_common.id.as_deref() == Some(m.id.as_str()))
        else {
            let ids: Vec<&str> = config
                .net
                .iter()
                .filter_map(|n| n.pci_common.id.as_deref())
                .collect();
            return Err(format!(
                "net_macs: the snapshot has no net device '{}' (its net devices: {})",
                m.id,
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ));
        };
        info!(
            "restore: net device '{}' gets guest MAC {} (was {})",
            m.id,
            m.mac,
            net.mac.as_deref().unwrap_or("none")
        );
        net.mac = Some(m.mac.clone());
    }
    Ok(())
}
