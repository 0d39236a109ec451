//! vhost-user-net: a virtio-net device (type 1) whose queues a backend in another process
//! serves (e.g. our `vhost_user_net`, which moves the frames to and from a TAP), over the shared
//! frontend of `vhost_user.rs`. The guest is offered what the backend offers of the net
//! device's data-path features (offloads, mergeable receive buffers), less the offloads the
//! configuration turns off; the configuration space is ours, as for the built-in virtio-net:
//! the MAC, the link up, the queue pairs and the MTU. With more than one queue pair the guest is
//! also offered MQ and a control queue (the last queue), which the VMM serves itself and the
//! backend never sees, as in the original (`net_ctrl.rs`): VQ_PAIRS_SET is checked and
//! acknowledged, and the backend runs every queue the driver enabled.

use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_net as vn;

use crate::net_ctrl::PairsHandler;
use crate::vhost_user::{VhostUserConnection, VhostUserError, VhostUserState};
use crate::vhost_user_socket::VhostSocketError;
use crate::worker::WorkerHandle;
use crate::{
    ActivateContext, ActivateError, NetOffloads, VirtioDevice, VirtioDeviceState, F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};

const NAME: &str = "vhost-user-net";

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
const F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
const F_MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);

/// The checksum offloads, and those that need them (segmentation, by protocol).
const CSUM_OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM;
const TSO_OFFLOADS: u64 =
    F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN;
const UFO_OFFLOADS: u64 = F_HOST_UFO | F_GUEST_UFO;

/// What the guest may get of the backend's offer: the data path's bits (the backend moves the
/// frames), indirect descriptors, event index and VERSION_1. Not the control queue, MQ,
/// announce or anything on the configuration space (which is ours; so are the control queue and
/// MQ), no packed rings or IOMMU.
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
    /// Data queues (two per pair); with more than one pair the control queue follows them.
    num_queues: u16,
    queue_size: u16,
    /// The control queue's worker, while the driver runs it.
    ctrl: Option<WorkerHandle<PairsHandler>>,
    /// The pairs the driver said it uses (VQ_PAIRS_SET; 1 until it does).
    active_pairs: Arc<AtomicU16>,
}

/// The features the guest is offered: the backend's `BACKEND_BITS` less the offloads turned
/// off, the configuration space's own (MAC, link status, MTU when given), and with more than
/// one queue pair MQ and the control queue.
fn guest_features(backend: u64, offloads: NetOffloads, mtu: bool, pairs: u16) -> u64 {
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
    if pairs > 1 {
        f |= F_CTRL_VQ | F_MQ;
    }
    f
}

/// Splits the driver's queues: the control queue's index (2 × pairs with MQ negotiated, else
/// 2), and the data queues the backend gets (every pair's with MQ, else pair 0's).
fn split_queues<T>(queues: &mut [Option<T>], acked: u64, pairs: usize) -> (usize, Option<T>) {
    let mq = acked & F_MQ != 0;
    let index = if mq { 2 * pairs } else { 2 };
    let ctrl = if acked & F_CTRL_VQ != 0 {
        queues.get_mut(index).and_then(Option::take)
    } else {
        None
    };
    let data = if mq { 2 * pairs } else { 2 };
    for q in queues.iter_mut().skip(data) {
        *q = None;
    }
    (index, ctrl)
}

impl VhostUserNet {
    /// Connects to (or, as a server, waits for) the backend at `socket` and reads what it
    /// offers; `num_queues` must be no more than it runs.
    pub fn new(socket: &Path, cfg: &VhostUserNetConfig) -> Result<Self, VhostUserNetError> {
        let stream = crate::vhost_user_socket::open(socket, cfg.server)?;
        let (conn, got) = VhostUserConnection::from_stream(
            NAME,
            stream,
            cfg.num_queues,
            cfg.queue_size,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::LOG_SHMFD,
        )?;
        let have = if got.contains(VhostUserProtocolFeatures::MQ) {
            conn.ask("GET_QUEUE_NUM", |fe| fe.get_queue_num())?
        } else {
            2
        };
        if u64::from(cfg.num_queues) > have {
            return Err(VhostUserError::TooManyQueues(cfg.num_queues, have).into());
        }
        let features = guest_features(
            conn.backend_features,
            cfg.offloads,
            cfg.mtu.is_some(),
            cfg.num_queues / 2,
        );
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
            ctrl: None,
            active_pairs: Arc::new(AtomicU16::new(1)),
        })
    }

    fn pairs(&self) -> usize {
        usize::from(self.num_queues / 2)
    }

    /// Starts the control queue's worker on `queue` (number `index`).
    fn start_ctrl(
        &mut self,
        ctx: &ActivateContext,
        index: usize,
        queue: (virtio_queue::Queue, vmm_sys_util::eventfd::EventFd),
        acked: u64,
    ) -> Result<(), ActivateError> {
        let mut queues: Vec<Option<_>> = (0..=index).map(|_| None).collect();
        queues[index] = Some(queue);
        let handler = PairsHandler {
            index,
            pairs: self.pairs(),
            mq: acked & F_MQ != 0,
            active: self.active_pairs.clone(),
        };
        let ctx = ActivateContext {
            mem: ctx.mem.clone(),
            interrupt: ctx.interrupt.clone(),
            queues,
            acked_features: ctx.acked_features,
            status: ctx.status.clone(),
            dma: ctx.dma.clone(),
        };
        self.ctrl = Some(WorkerHandle::spawn("vhost-user-net-ctrl", handler, ctx)?);
        Ok(())
    }

    fn stop_ctrl(&mut self) {
        if let Some(w) = self.ctrl.take() {
            w.stop();
        }
        self.active_pairs.store(1, Ordering::Release);
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        let ctrl = usize::from(self.features & F_CTRL_VQ != 0);
        vec![self.queue_size; usize::from(self.num_queues) + ctrl]
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_ctrl();
        let acked = ctx.acked_features & self.features;
        let (index, ctrl) = split_queues(&mut ctx.queues, acked, self.pairs());
        if let Some(q) = ctrl {
            self.start_ctrl(&ctx, index, q, acked)?;
        }
        // The backend gets the driver's data-path bits; MAC, STATUS, MTU, MQ and the control
        // queue are ours.
        self.conn.start(ctx, BACKEND_BITS).map_err(|e| {
            self.conn.stop();
            self.stop_ctrl();
            ActivateError::Other(e)
        })
    }
    fn reset(&mut self) {
        self.stop_ctrl();
        self.conn.stop();
    }
    fn pause(&mut self) -> Result<(), String> {
        if let Some(w) = self.ctrl.as_mut() {
            w.pause()?;
        }
        self.conn.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        let r = self.conn.resume();
        if let Some(w) = self.ctrl.as_mut() {
            w.resume()?;
        }
        r
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        let n = self.queue_max_sizes().len();
        let mut p = self.conn.queue_positions(n);
        // The control queue is ours: where its worker stopped.
        if let Some(ctrl) = self.ctrl.as_ref().and_then(|w| w.queue_positions()) {
            let p = p.get_or_insert_with(|| vec![None; n]);
            for (i, q) in ctrl.into_iter().enumerate() {
                if let (Some(q), Some(slot)) = (q, p.get_mut(i)) {
                    *slot = Some(q);
                }
            }
        }
        p
    }
    fn start_dirty_log(&mut self, last_addr: u64) -> Result<(), String> {
        self.conn.start_dirty_log(last_addr)
    }
    fn stop_dirty_log(&mut self) {
        self.conn.stop_dirty_log()
    }
    fn take_dirty_log(&mut self) -> Option<Vec<u64>> {
        self.conn.take_dirty_log()
    }
    fn device_state(&self) -> VirtioDeviceState {
        // The queues' bases are the transport's; the frames in flight are the backend's.
        VhostUserState::of(NAME, 0)
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        VhostUserState::check(NAME, state).map(|_| ())
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
        let f = guest_features(backend, ALL, false, 1);
        assert_eq!(f, BACKEND_BITS | F_MAC | F_STATUS);
        assert_eq!(f & (ctrl_vq | mq | F_MTU), 0);
        assert!(guest_features(backend, ALL, true, 1) & F_MTU != 0);
        // Only what the backend offers of the data path.
        let f = guest_features(F_VERSION_1 | F_CSUM, ALL, false, 1);
        assert_eq!(f, F_VERSION_1 | F_CSUM | F_MAC | F_STATUS);
        // Several pairs: the control queue and MQ are ours, whatever the backend offers.
        let f = guest_features(F_VERSION_1, ALL, false, 2);
        assert_eq!(f, F_VERSION_1 | F_MAC | F_STATUS | ctrl_vq | mq);
    }

    #[test]
    fn offloads_turned_off_are_not_offered() {
        let no_tso = NetOffloads { tso: false, ..ALL };
        let f = guest_features(BACKEND_BITS, no_tso, false, 1);
        assert_eq!(f & TSO_OFFLOADS, 0);
        assert_eq!(f & UFO_OFFLOADS, UFO_OFFLOADS);
        let none = NetOffloads {
            csum: false,
            tso: false,
            ufo: false,
        };
        let f = guest_features(BACKEND_BITS, none, false, 1);
        assert_eq!(f & (CSUM_OFFLOADS | TSO_OFFLOADS | UFO_OFFLOADS), 0);
        assert!(f & F_MRG_RXBUF != 0);
    }

    #[test]
    fn the_control_queue_is_ours_and_the_data_queues_the_backends() {
        // Two pairs, MQ: queues 0-3 to the backend, 4 is the control queue.
        let mut q: Vec<Option<u8>> = (0..5).map(Some).collect();
        let (i, c) = split_queues(&mut q, F_CTRL_VQ | F_MQ, 2);
        assert_eq!((i, c), (4, Some(4)));
        assert_eq!(q, [Some(0), Some(1), Some(2), Some(3), None]);
        // CTRL_VQ without MQ: the control queue is 2, the backend gets pair 0 only.
        let mut q: Vec<Option<u8>> = (0..5).map(Some).collect();
        let (i, c) = split_queues(&mut q, F_CTRL_VQ, 2);
        assert_eq!((i, c), (2, Some(2)));
        assert_eq!(q, [Some(0), Some(1), None, None, None]);
        // Neither: pair 0 only, no control queue (a queue 4 the driver enabled is not used).
        let mut q: Vec<Option<u8>> = (0..5).map(Some).collect();
        assert_eq!(split_queues(&mut q, 0, 2), (2, None));
        assert_eq!(q, [Some(0), Some(1), None, None, None]);
        // A driver that did not enable the control queue.
        let mut q = vec![Some(0), Some(1), Some(2), Some(3), None];
        assert_eq!(split_queues(&mut q, F_CTRL_VQ | F_MQ, 2), (4, None));
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
