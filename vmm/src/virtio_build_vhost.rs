//! The vhost-user devices built here rather than in `virtio_build.rs`: `--net
//! vhost_user=on,socket=<path>` (or `vm.add-net` with it), a virtio-net device whose frames a
//! vhost-user-net backend moves, and `--generic-vhost-user`, a device of any type a backend
//! does whole. The configuration checked the keys and that guest RAM is shared.

use log::info;
use virtio_devices::{NetOffloads, VhostUserGeneric, VhostUserNet, VhostUserNetConfig};
use vm_config::VhostMode;

use crate::config::{GenericVhostUserConfig, NetConfig};
use crate::pci_setup::PciSetupError;
use crate::virtio_build::NewDevice;

/// The device named `id` over the backend at `socket`, either connected to (client mode) or
/// waited for (server mode).
pub fn net(n: &NetConfig, socket: &str, id: String) -> Result<NewDevice, PciSetupError> {
    let err = |msg: String| PciSetupError::Device {
        option: "--net",
        value: format!("socket={socket}"),
        msg,
    };
    let mac = match &n.mac {
        Some(m) => m
            .parse()
            .map_err(|e: net_util::MacParseError| err(e.to_string()))?,
        None => net_util::MacAddr::random_local(),
    };
    let server = n.vhost_mode == VhostMode::Server;
    let cfg = VhostUserNetConfig {
        server,
        num_queues: n.num_queues,
        queue_size: n.queue_size,
        mac,
        mtu: n.mtu,
        offloads: NetOffloads {
            csum: n.offload_csum,
            tso: n.offload_tso,
            ufo: n.offload_ufo,
        },
    };
    if server {
        info!("--net: waiting for a vhost-user-net backend to connect to {socket}");
    }
    let dev =
        VhostUserNet::new(std::path::Path::new(socket), &cfg).map_err(|e| err(e.to_string()))?;
    info!(
        "--net: vhost-user-net backend {socket} ({}), {} queue pair(s), guest MAC {mac}",
        if server { "server" } else { "client" },
        n.num_queues / 2
    );
    Ok(NewDevice {
        option: "--net",
        id,
        slot: n.pci_common.pci_device_id,
        segment: n.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    })
}

/// A `--generic-vhost-user` (or `vm.add-generic-vhost-user`) device named `id`: the backend at
/// `socket` does the whole device (the configuration checked that guest RAM is shared).
pub fn generic(g: &GenericVhostUserConfig, id: String) -> Result<NewDevice, PciSetupError> {
    let err = |msg: String| PciSetupError::Device {
        option: GenericVhostUserConfig::OPTION,
        value: format!("socket={}", g.socket.display()),
        msg,
    };
    // The configuration keeps the type within the PCI device ids.
    let device_type = u16::try_from(g.device_type)
        .map_err(|_| err(format!("device_type={}: out of range", g.device_type)))?;
    let dev = VhostUserGeneric::new(&g.socket, device_type, g.queue_sizes.clone())
        .map_err(|e| err(e.to_string()))?;
    info!(
        "{id}: generic vhost-user device, type {} with {} queue(s), through {}",
        vm_config::device_type_name(g.device_type),
        g.queue_sizes.len(),
        g.socket.display()
    );
    Ok(NewDevice {
        option: GenericVhostUserConfig::OPTION,
        id,
        slot: g.pci_common.pci_device_id,
        segment: g.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    })
}
