//! vhost-user-net: a virtio-net device (type 1) whose queues a backend in another process
//! serves (e.g. our `vhost_user_net`, which moves the frames to and from a TAP), over the shared
//! frontend of `vhost_user.rs`. The guest is offered what the backend offers of the net
//! device's data-path features (offloads, mergeable receive buffers), less the offloads the
//! configuration turns off; the configuration space is ours, as for the built-in virtio-net:
//! the MAC, the link up, the queue pairs and the MTU. No control queue: the guest drives one
//! queue pair (MQ needs the control queue), the backend may run more.

use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_net as vn;

use crate::vhost_user::{proto, VhostUserConnection, VhostUserError};
use crate::vhost_user_socket::VhostSocketError;
use crate::{
    ActivateContext, ActivateError, BlockState, NetOffloads, VirtioDevice, VirtioDeviceState,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET, VIRTIO_DEVICE_STATE_VERSION,
};

const fn bit(b: u32) -> u64 {
    1 << b
}

const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
const F_MTU: u64 = bit(vn::VIRTIO_NET_F_MTU);
const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
const F_GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
const F_HOST_ECN: u64 = bit(vn::VIRTIO_NET_F_HOST_ECN);
const F_HOST_UFO: u64 = bit(vn::VIRTIO_NET_F_HOST_UFO);
const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);

/// The checksum offloads, and those that need them (segmentation, by protocol).
const CSUM_OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM;
const TSO_OFFLOADS: u64 =
    F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN;
const UFO_OFFLOADS: u64 = F_HOST_UFO | F_GUEST_UFO;

/// What the guest may get of the backend's offer: the data path's bits (the backend moves the
/// frames), indirect descriptors, event index and VERSION_1. Not the control queue, MQ,
/// announce or anything on the configuration space (which is ours), no packed rings or IOMMU.
const BACKEND_BITS: u64 = CSUM_OFFLOADS
    | TSO_OFFLOADS
    | UFO_OFFLOADS
    | F_MRG_RXBUF
    | F_RING_INDIRECT_DESC
    | F_RING_EVENT_IDX
    | F_VERSION_1;

/// `struct virtio_net_config` as far as we fill it: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;
const LINK_UP: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error(transparent)]
    Socket(#[from] VhostSocketError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

/// What the configuration asks of the device.
#[derive(Clone, Debug)]
pub struct VhostUserNetConfig {
    /// Listen on the socket (`vhost_mode=server`) instead of connecting to it.
    pub server: bool,
    /// Receive and transmit queues, two per pair.
    pub num_queues: u16,
    pub queue_size: u16,
    pub mac: net_util::MacAddr,
    /// Offered to the guest (VIRTIO_NET_F_MTU) when given.
    pub mtu: Option<u16>,
    pub offloads: NetOffloads,
}

pub struct VhostUserNet {
    conn: VhostUserConnection,
    config: [u8; CONFIG_LEN],
    features: u64,
    num_queues: u16,
    queue_size: u16,
}

/// The features the guest is offered: the backend's `BACKEND_BITS` less the offloads turned
/// off, and the configuration space's own (MAC, link status, MTU when given).
fn guest_features(backend: u64, offloads: NetOffloads, mtu: bool) -> u64 {
    let mut f = backend & BACKEND_BITS;
    if !offloads.csum {
        f &= !(CSUM_OFFLOADS | TSO_OFFLOADS | UFO_OFFLOADS);
    }
    if !offloads.tso {
        f &= !TSO_OFFLOADS;
    }
    if !offloads.ufo {
        f &= !UFO_OFFLOADS;
    }
    f |= F_MAC | F_STATUS;
    if mtu {
        f |= F_MTU;
    }
    f
}

impl VhostUserNet {
    /// Connects to (or, as a server, waits for) the backend at `socket` and reads what it
    /// offers; `num_queues` must be no more than it runs.
    pub fn new(socket: &Path, cfg: &VhostUserNetConfig) -> Result<Self, VhostUserNetError> {
        let stream = crate::vhost_user_socket::open(socket, cfg.server)?;
        let (mut conn, got) = VhostUserConnection::from_stream(
            "vhost-user-net",
            stream,
            cfg.num_queues,
            cfg.queue_size,
            VhostUserProtocolFeatures::MQ,
        )?;
        let have = if got.contains(VhostUserProtocolFeatures::MQ) {
            conn.frontend()
                .get_queue_num()
                .map_err(proto("GET_QUEUE_NUM"))?
        } else {
            2
        };
        if u64::from(cfg.num_queues) > have {
            return Err(VhostUserError::TooManyQueues(cfg.num_queues, have).into());
        }
        let features = guest_features(conn.backend_features, cfg.offloads, cfg.mtu.is_some());
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&cfg.mac.bytes());
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&(cfg.num_queues / 2).to_le_bytes());
        config[10..12].copy_from_slice(&cfg.mtu.unwrap_or(1500).to_le_bytes());
        log::info!(
            "vhost-user-net: backend {} offers {:#x}; the guest gets {features:#x}",
            socket.display(),
            conn.backend_features
        );
        Ok(VhostUserNet {
            conn,
            config,
            features,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
        })
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // The backend gets the driver's data-path bits; MAC, STATUS and MTU are ours.
        self.conn.start(ctx, BACKEND_BITS).map_err(|e| {
            self.conn.stop();
            ActivateError::Other(e)
        })
    }
    fn reset(&mut self) {
        self.conn.stop();
    }
    fn pause(&mut self) -> Result<(), String> {
        if !self.conn.running() {
            return Ok(());
        }
        Err(
            "vhost-user-net: the backend's queues cannot be paused (no snapshot or migration)"
                .into(),
        )
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        // Nothing of its own: the queues' state is the backend's; restore refuses it.
        VirtioDeviceState::Block(BlockState {
            version: VIRTIO_DEVICE_STATE_VERSION,
        })
    }
    fn set_device_state(&mut self, _state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        Err(pci::StateError::Invalid {
            what: "vhost-user-net".into(),
            reason: "its state lives in the backend: not restorable".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: NetOffloads = NetOffloads {
        csum: true,
        tso: true,
        ufo: true,
    };

    #[test]
    fn the_guest_gets_the_backends_data_path_bits_and_our_config_bits() {
        let ctrl_vq = bit(vn::VIRTIO_NET_F_CTRL_VQ);
        let mq = bit(vn::VIRTIO_NET_F_MQ);
        let backend = BACKEND_BITS | ctrl_vq | mq | crate::vhost_user::F_PROTOCOL_FEATURES;
        let f = guest_features(backend, ALL, false);
        assert_eq!(f, BACKEND_BITS | F_MAC | F_STATUS);
        assert_eq!(f & (ctrl_vq | mq | F_MTU), 0);
        assert!(guest_features(backend, ALL, true) & F_MTU != 0);
        // Only what the backend offers of the data path.
        let f = guest_features(F_VERSION_1 | F_CSUM, ALL, false);
        assert_eq!(f, F_VERSION_1 | F_CSUM | F_MAC | F_STATUS);
    }

    #[test]
    fn offloads_turned_off_are_not_offered() {
        let no_tso = NetOffloads { tso: false, ..ALL };
        let f = guest_features(BACKEND_BITS, no_tso, false);
        assert_eq!(f & TSO_OFFLOADS, 0);
        assert_eq!(f & UFO_OFFLOADS, UFO_OFFLOADS);
        let none = NetOffloads {
            csum: false,
            tso: false,
            ufo: false,
        };
        let f = guest_features(BACKEND_BITS, none, false);
        assert_eq!(f & (CSUM_OFFLOADS | TSO_OFFLOADS | UFO_OFFLOADS), 0);
        assert!(f & F_MRG_RXBUF != 0);
    }

    #[test]
    fn no_backend_no_device() {
        let cfg = VhostUserNetConfig {
            server: false,
            num_queues: 2,
            queue_size: 256,
            mac: net_util::MacAddr::random_local(),
            mtu: None,
            offloads: ALL,
        };
        match VhostUserNet::new(Path::new("/nonexistent/vun.sock"), &cfg) {
            Err(e) => assert!(
                e.to_string()
                    .starts_with("cannot connect to /nonexistent/vun.sock"),
                "{e}"
            ),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
