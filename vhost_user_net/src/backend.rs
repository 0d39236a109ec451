//! The vhost-user side: what the backend offers (features, queues, the optional config space
//! with the guest's MAC and MTU), one worker thread per queue pair (the framework's vring
//! workers), and the events each worker handles: its receive ring's kick (buffers: read the
//! TAP again), its transmit ring's kick, and its TAP becoming readable or writable.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

use log::warn;
use net_util::{Offloads, Tap};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::BackendConfig;
use crate::pair::{self, Mem};

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The data path's features: checksum and segmentation offloads both ways (the TAP does the
/// work), indirect descriptors, event index, VERSION_1.
const FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_F_VERSION_1);

/// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// The receive and transmit rings of a pair, as the framework numbers them in its worker.
const RX: u16 = 0;
const TX: u16 = 1;

/// One pair's TAP queue and what its worker's epoll watches on it.
struct PairState {
    tap: Tap,
    /// The TAP's readable events are watched (there are receive buffers).
    rx_watch: bool,
    /// The TAP's writable events are watched (a transmit waits for room).
    tx_watch: bool,
    /// The TAP queue gets frames (a multi-queue TAP's unused queues are detached).
    attached: bool,
}

pub struct NetBackend {
    pairs: Vec<Mutex<PairState>>,
    /// Each worker's epoll descriptor (the framework's), once the daemon made them.
    epolls: Vec<AtomicI32>,
    exits: Vec<(EventConsumer, EventNotifier)>,
    mem: Mem,
    num_queues: usize,
    queue_size: u16,
    features: u64,
    config: Option<[u8; CONFIG_LEN]>,
}

impl NetBackend {
    /// The backend over the pair's TAP queues `taps` (the first attached, the others detached
    /// until the frontend starts their pair).
    pub fn new(cfg: &BackendConfig, taps: Vec<Tap>, mem: Mem) -> io::Result<Self> {
        let mut pairs = Vec::with_capacity(taps.len());
        for (i, tap) in taps.into_iter().enumerate() {
            tap.set_offloads(Offloads::default())
                .map_err(io::Error::other)?;
            if i > 0 {
                tap.set_queue_attached(false).map_err(io::Error::other)?;
            }
            pairs.push(Mutex::new(PairState {
                tap,
                rx_watch: false,
                tx_watch: false,
                attached: i == 0,
            }));
        }
        let exits = (0..pairs.len())
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let mut features = FEATURES;
        if pairs.len() > 1 {
            features |= bit(vn::VIRTIO_NET_F_MQ);
        }
        let config = (cfg.mac.is_some() || cfg.mtu.is_some()).then(|| {
            let mut c = [0u8; CONFIG_LEN];
            if let Some(m) = cfg.mac {
                features |= bit(vn::VIRTIO_NET_F_MAC);
                c[..6].copy_from_slice(&m.bytes());
            }
            c[6..8].copy_from_slice(&1u16.to_le_bytes());
            c[8..10].copy_from_slice(&(cfg.num_queues / 2).to_le_bytes());
            if let Some(mtu) = cfg.mtu {
                features |= bit(vn::VIRTIO_NET_F_MTU);
                c[10..12].copy_from_slice(&mtu.to_le_bytes());
            }
            c
        });
        Ok(NetBackend {
            epolls: (0..pairs.len()).map(|_| AtomicI32::new(-1)).collect(),
            pairs,
            exits,
            mem,
            num_queues: usize::from(cfg.num_queues),
            queue_size: cfg.queue_size,
            features,
            config,
        })
    }

    /// Where worker `i` waits (the framework's epoll), for the TAP's events.
    pub fn set_epoll(&self, i: usize, fd: RawFd) {
        self.epolls[i].store(fd, Ordering::Release);
    }

    /// Tells every worker to end.
    pub fn stop_workers(&self) {
        for (_, n) in &self.exits {
            let _ = n.notify();
        }
    }

    /// The token of a pair's TAP events: past the queues and the exit event, which the
    /// framework reserves.
    fn tap_token(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// Watches the pair's TAP for what `p` wants (nothing: not at all).
    fn update_watch(&self, thread: usize, p: &mut PairState, rx: bool, tx: bool) {
        if (p.rx_watch, p.tx_watch) == (rx, tx) {
            return;
        }
        let epoll = self.epolls[thread].load(Ordering::Acquire);
        if epoll < 0 {
            return;
        }
        let was = p.rx_watch || p.tx_watch;
        let mut events = 0u32;
        if rx {
            events |= libc::EPOLLIN as u32;
        }
        if tx {
            events |= libc::EPOLLOUT as u32;
        }
        let mut ev = libc::epoll_event {
            events,
            u64: self.tap_token(),
        };
        let op = match (was, rx || tx) {
            (false, _) => libc::EPOLL_CTL_ADD,
            (true, true) => libc::EPOLL_CTL_MOD,
            (true, false) => libc::EPOLL_CTL_DEL,
        };
        // SAFETY: epoll_ctl on the worker's epoll descriptor (it outlives the workers) and
        // our TAP's; `ev` is ours for the call.
        let r = unsafe { libc::epoll_ctl(epoll, op, p.tap.as_raw_fd(), &mut ev) };
        if r < 0 {
            warn!(
                "vhost_user_net: pair {thread}: epoll_ctl: {}",
                io::Error::last_os_error()
            );
            return;
        }
        p.rx_watch = rx;
        p.tx_watch = tx;
    }

    /// Passes over one ring until it is done, with the notification dance of event index
    /// (re-enable, then look again), and an interrupt if the driver wants one.
    fn run_ring(
        &self,
        vring: &VringMutex<Mem>,
        tap: &Tap,
        f: fn(&mut vhost_user_backend::VringState<Mem>, &Mem, &Tap) -> pair::Pass,
    ) -> pair::Pass {
        let mut st = vring.get_mut();
        if !st.get_queue().ready() || !st.is_enabled() {
            return pair::Pass {
                ring_empty: true,
                ..Default::default()
            };
        }
        let mut total = pair::Pass::default();
        loop {
            let _ = st.disable_notification();
            let p = f(&mut st, &self.mem, tap);
            total.used |= p.used;
            total.tap_blocked = p.tap_blocked;
            total.more = p.more;
            total.ring_empty = false;
            if p.tap_blocked || p.more {
                break;
            }
            // The ring is empty: ask for a kick, and look once more for what came meanwhile.
            match st.enable_notification() {
                Ok(true) => continue,
                _ => {
                    total.ring_empty = true;
                    break;
                }
            }
        }
        if total.used && st.needs_notification().unwrap_or(true) {
            if let Err(e) = st.signal_used_queue() {
                warn!("vhost_user_net: interrupt: {e}");
            }
        }
        total
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
    type Vring = VringMutex<Mem>;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        // The TAP hands us what the driver accepts (checksums left partial, GSO frames).
        let o = Offloads {
            csum: features & bit(vn::VIRTIO_NET_F_GUEST_CSUM) != 0,
            tso4: features & bit(vn::VIRTIO_NET_F_GUEST_TSO4) != 0,
            tso6: features & bit(vn::VIRTIO_NET_F_GUEST_TSO6) != 0,
            tso_ecn: features & bit(vn::VIRTIO_NET_F_GUEST_ECN) != 0,
            ufo: features & bit(vn::VIRTIO_NET_F_GUEST_UFO) != 0,
        };
        for p in &self.pairs {
            let p = p.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = p.tap.set_offloads(o) {
                warn!("vhost_user_net: {e}");
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // LOG_SHMFD: every write to guest RAM is marked in the frontend's log once it sets one
        // (vm-memory's accessors mark it; `pair.rs` marks what the TAP reads into).
        let mut f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.config.is_some() {
            f |= VhostUserProtocolFeatures::CONFIG;
        }
        f
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let Some(c) = &self.config else {
            return Vec::new();
        };
        // Bytes past the config space read as zero, as in the VMM's own devices (a generic
        // vhost-user frontend forwards a guest's reads anywhere in the device's window).
        let mut out = vec![0u8; size as usize];
        let have = &c[(offset as usize).min(c.len())..];
        let n = have.len().min(out.len());
        out[..n].copy_from_slice(&have[..n]);
        out
    }

    fn update_memory(&self, _mem: Mem) -> io::Result<()> {
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.pairs.len()).map(|i| 0b11 << (2 * i)).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex<Mem>],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(pair), [rx, tx]) = (self.pairs.get(thread_id), vrings) else {
            return Err(io::Error::other("a worker without its queue pair"));
        };
        let mut p = pair.lock().unwrap_or_else(|e| e.into_inner());
        let tap_event = u64::from(device_event) == self.tap_token();
        let do_rx = device_event == RX || (tap_event && evset.contains(EventSet::IN));
        let do_tx = device_event == TX || (tap_event && evset.contains(EventSet::OUT));
        if !tap_event && device_event > TX {
            return Err(io::Error::other(format!("unknown event {device_event}")));
        }
        if device_event == RX && !p.attached {
            // The frontend started this pair: the TAP may steer frames to it now.
            match p.tap.set_queue_attached(true) {
                Ok(()) => p.attached = true,
                Err(e) => warn!("vhost_user_net: pair {thread_id}: {e}"),
            }
        }
        let mut rx_watch = p.rx_watch;
        let mut tx_watch = p.tx_watch;
        if do_tx {
            let r = self.run_ring(tx, &p.tap, pair::transmit);
            // A full TAP, or the batch limit (the kick is read already): come back when the
            // TAP can take more.
            tx_watch = r.tap_blocked || r.more;
        }
        if do_rx {
            let r = self.run_ring(rx, &p.tap, pair::receive);
            // No buffer left: wait for the driver's kick; otherwise read on as frames come.
            rx_watch = !r.ring_empty;
        }
        self.update_watch(thread_id, &mut p, rx_watch, tx_watch);
        Ok(())
    }
}
