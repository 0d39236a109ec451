//! vhost-user-blk frontend: the block device runs in another process (the backend, e.g.
//! `qemu-storage-daemon --export type=vhost-user-blk`), which maps guest RAM from the memory
//! files we hand it and serves the queues itself. We negotiate over its socket, give it each
//! queue's rings, the transport's notify eventfd as the kick and an eventfd of ours as the
//! call; a relay thread turns the calls into the transport's queue interrupts (the
//! transport's interrupt is not an eventfd the backend could write).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_memory::GuestMemoryMmap;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    ActivateContext, ActivateError, BlockState, VirtioDevice, VirtioDeviceState, VirtioInterrupt,
    VIRTIO_DEVICE_STATE_VERSION,
};

const TYPE_BLOCK: u16 = 2;
/// `struct virtio_blk_config` up to and including the write-zeroes fields.
const CONFIG_LEN: u32 = 60;
/// Offset of `num_queues` in the config space.
const CONFIG_NUM_QUEUES: usize = 34;
const F_BLK_MQ: u64 = 1 << 12;
/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never the guest's.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// What the guest may see of the backend's features: the block device's own bits, indirect
/// descriptors, event index and VERSION_1 (split rings only; no IOMMU, no packed rings).
const GUEST_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | (1 << 32);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlockError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, vhost::Error),
    #[error("vhost-user {0}: {1}")]
    Protocol(&'static str, vhost::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("num_queues={0}: the backend has {1} queues")]
    TooManyQueues(u16, u64),
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserBlockError {
    move |e| VhostUserBlockError::Protocol(what, e)
}

/// The relay thread's handle: its stop eventfd and the thread.
struct Relay {
    stop: EventFd,
    thread: JoinHandle<()>,
}

pub struct VhostUserBlock {
    fe: Frontend,
    backend_features: u64,
    config: Vec<u8>,
    num_queues: u16,
    queue_size: u16,
    /// The queues the backend runs (their index), while active.
    started: Vec<usize>,
    relay: Option<Relay>,
}

impl VhostUserBlock {
    /// Connects to the backend at `socket` and reads what it offers (features, config space).
    pub fn new(
        socket: &Path,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, VhostUserBlockError> {
        let mut fe = Frontend::connect(socket, u64::from(num_queues))
            .map_err(|e| VhostUserBlockError::Connect(socket.display().to_string(), e))?;
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        let backend_features = fe.get_features().map_err(proto("GET_FEATURES"))?;
        if backend_features & F_PROTOCOL_FEATURES == 0 {
            return Err(VhostUserBlockError::Missing("protocol features"));
        }
        if backend_features & (1 << 32) == 0 {
            return Err(VhostUserBlockError::Missing("VIRTIO_F_VERSION_1"));
        }
        fe.set_features(backend_features)
            .map_err(proto("SET_FEATURES"))?;
        let offered = fe
            .get_protocol_features()
            .map_err(proto("GET_PROTOCOL_FEATURES"))?;
        if !offered.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserBlockError::Missing("the CONFIG protocol feature"));
        }
        let want = offered & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
        fe.set_protocol_features(want)
            .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        if num_queues > 1 {
            let have = if want.contains(VhostUserProtocolFeatures::MQ) {
                fe.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?
            } else {
                1
            };
            if u64::from(num_queues) > have || backend_features & F_BLK_MQ == 0 {
                return Err(VhostUserBlockError::TooManyQueues(num_queues, have));
            }
        }
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, mut config) = fe
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(proto("GET_CONFIG"))?;
        config.resize(CONFIG_LEN as usize, 0);
        config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&num_queues.to_le_bytes());
        Ok(VhostUserBlock {
            fe,
            backend_features,
            config,
            num_queues,
            queue_size,
            started: Vec::new(),
            relay: None,
        })
    }

    /// The mem table: every region of guest RAM with the memory file it maps.
    fn regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
        mem.iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| {
                    ActivateError::Other(format!(
                        "vhost-user-blk: guest RAM is not shareable ({e}): needs --memory shared=on"
                    ))
                })
            })
            .collect()
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
        let features = (ctx.acked_features & self.backend_features) | F_PROTOCOL_FEATURES;
        self.fe.set_features(features).map_err(e("SET_FEATURES"))?;
        let regions = Self::regions(&ctx.mem).map_err(|x| x.to_string())?;
        self.fe
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let host = |a: u64| -> Result<u64, String> {
            ctx.mem
                .get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| format!("vhost-user-blk: ring address {a:#x} outside guest RAM"))
        };
        let mut calls = Vec::new();
        for (i, q) in ctx.queues.iter().enumerate() {
            let Some((q, kick)) = q else { continue };
            let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|x| x.to_string())?;
            let size = q.size();
            self.fe.set_vring_num(i, size).map_err(e("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: size,
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.fe
                .set_vring_addr(i, &cfg)
                .map_err(e("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, q.next_avail())
                .map_err(e("SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, &call)
                .map_err(e("SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, kick)
                .map_err(e("SET_VRING_KICK"))?;
            self.started.push(i);
            calls.push((i, call));
        }
        if calls.is_empty() {
            return Err(ActivateError::NoQueues.to_string());
        }
        // The relay is running before the backend may call.
        self.relay = Some(spawn_relay(calls, ctx.interrupt).map_err(|x| x.to_string())?);
        for &i in &self.started {
            self.fe
                .set_vring_enable(i, true)
                .map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    fn stop(&mut self) {
        for i in std::mem::take(&mut self.started) {
            // GET_VRING_BASE stops the ring in the backend.
            if let Err(e) = self.fe.get_vring_base(i) {
                log::warn!("vhost-user-blk: GET_VRING_BASE {i}: {e}");
            }
        }
        if let Some(r) = self.relay.take() {
            let _ = r.stop.write(1);
            let _ = r.thread.join();
        }
    }
}

/// A thread waiting on the backend's call eventfds, raising queue `i`'s interrupt for each.
fn spawn_relay(
    calls: Vec<(usize, EventFd)>,
    interrupt: Arc<dyn VirtioInterrupt>,
) -> std::io::Result<Relay> {
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    let stop_token = u64::MAX;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    for (k, (_, call)) in calls.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, k as u64),
        )?;
    }
    let thread_stop = stop.try_clone()?;
    let thread = seccomp::spawn("vhost-user-blk-relay".into(), relay_filter(), move || {
        let _keep = thread_stop;
        let mut events = vec![EpollEvent::default(); calls.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vhost-user-blk relay: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let k = ev.data();
                if k == stop_token {
                    return;
                }
                let (i, call) = &calls[k as usize];
                if call.read().is_ok() {
                    interrupt.signal_queue(*i);
                }
            }
        }
    })
    .map_err(std::io::Error::other)?;
    Ok(Relay { stop, thread })
}

/// The relay's seccomp filter: it waits on eventfds and writes irqfds.
pub(crate) fn relay_filter() -> seccomp::Filter {
    seccomp::Filter::new("vhost-user-blk-relay")
        .allow(&[seccomp::Sysno::epoll_wait, seccomp::Sysno::epoll_pwait])
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }
    fn features(&self) -> u64 {
        let mut f = self.backend_features & GUEST_FEATURES;
        if self.num_queues == 1 {
            f &= !F_BLK_MQ;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off < self.config.len() {
            let n = data.len().min(self.config.len() - off);
            data[..n].copy_from_slice(&self.config[off..off + n]);
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.start(ctx).map_err(|e| {
            self.stop();
            ActivateError::Other(e)
        })
    }
    fn reset(&mut self) {
        self.stop();
    }
    fn pause(&mut self) -> Result<(), String> {
        if self.started.is_empty() {
            return Ok(());
        }
        Err(
            "vhost-user-blk: the backend's queues cannot be paused (no snapshot or migration)"
                .into(),
        )
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            version: VIRTIO_DEVICE_STATE_VERSION,
        })
    }
    fn set_device_state(&mut self, _state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        Err(pci::StateError::Invalid {
            what: "vhost-user-blk".into(),
            reason: "its state lives in the backend: not restorable".into(),
        })
    }
}

impl Drop for VhostUserBlock {
    fn drop(&mut self) {
        self.stop();
    }
}
