//! The vhost-user frontend the vhost-user devices share (vhost-user-blk, virtio-fs): the device
//! runs in another process (the backend), which maps guest RAM from the memory files we hand it
//! and serves the queues itself. We negotiate over its socket, give it each queue's rings, the
//! transport's notify eventfd as the kick and an eventfd of ours as the call; a relay thread
//! turns the calls into the transport's queue interrupts (the transport's interrupt is not an
//! eventfd the backend could write). The relay also watches the socket: a backend that goes
//! away (crash, exit) marks the device NEEDS_RESET and is logged, and the VMM goes on.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_memory::GuestMemoryMmap;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivateContext, ActivateError, DeviceStatus, VirtioInterrupt};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never the guest's.
pub(crate) const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, vhost::Error),
    #[error("vhost-user {0}: {1}")]
    Protocol(&'static str, vhost::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("num_queues={0}: the backend has {1} queues")]
    TooManyQueues(u16, u64),
}

pub(crate) fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |e| VhostUserError::Protocol(what, e)
}

/// The relay thread's handle: its stop eventfd and the thread.
struct Relay {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// One connection to a backend and the queues it runs for us.
pub(crate) struct VhostUserConnection {
    /// `vhost-user-blk`, `vhost-user-fs`: log prefix and the relay thread's name.
    name: &'static str,
    fe: Frontend,
    /// What the backend offers (GET_FEATURES).
    pub(crate) backend_features: u64,
    queue_size: u16,
    /// The queues the backend runs (their index), while active.
    started: Vec<usize>,
    relay: Option<Relay>,
    /// Set by the relay when the backend hangs up: no more requests are sent to it.
    gone: Arc<AtomicBool>,
}

impl VhostUserConnection {
    /// Connects to the backend at `socket` (which may serve `max_queues` queues), sets the
    /// owner, checks that it offers VERSION_1 and protocol features, and negotiates the protocol
    /// features in `want` that it offers (returned).
    pub(crate) fn connect(
        name: &'static str,
        socket: &Path,
        max_queues: u16,
        queue_size: u16,
        want: VhostUserProtocolFeatures,
    ) -> Result<(Self, VhostUserProtocolFeatures), VhostUserError> {
        let fe = Frontend::connect(socket, u64::from(max_queues))
            .map_err(|e| VhostUserError::Connect(socket.display().to_string(), e))?;
        Self::negotiate(name, fe, queue_size, want)
    }

    /// As `connect`, over a stream the caller connected or accepted (vhost-user-net: either
    /// way, with timeouts on the socket).
    pub(crate) fn from_stream(
        name: &'static str,
        stream: std::os::unix::net::UnixStream,
        max_queues: u16,
        queue_size: u16,
        want: VhostUserProtocolFeatures,
    ) -> Result<(Self, VhostUserProtocolFeatures), VhostUserError> {
        let fe = Frontend::from_stream(stream, u64::from(max_queues));
        Self::negotiate(name, fe, queue_size, want)
    }

    fn negotiate(
        name: &'static str,
        mut fe: Frontend,
        queue_size: u16,
        want: VhostUserProtocolFeatures,
    ) -> Result<(Self, VhostUserProtocolFeatures), VhostUserError> {
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        let backend_features = fe.get_features().map_err(proto("GET_FEATURES"))?;
        if backend_features & F_PROTOCOL_FEATURES == 0 {
            return Err(VhostUserError::Missing("protocol features"));
        }
        if backend_features & F_VERSION_1 == 0 {
            return Err(VhostUserError::Missing("VIRTIO_F_VERSION_1"));
        }
        fe.set_features(backend_features)
            .map_err(proto("SET_FEATURES"))?;
        let offered = fe
            .get_protocol_features()
            .map_err(proto("GET_PROTOCOL_FEATURES"))?;
        let got = offered & want;
        fe.set_protocol_features(got)
            .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        let c = VhostUserConnection {
            name,
            fe,
            backend_features,
            queue_size,
            started: Vec::new(),
            relay: None,
            gone: Arc::new(AtomicBool::new(false)),
        };
        Ok((c, got))
    }

    /// The frontend, for the device's own requests before activation (GET_CONFIG, ...).
    pub(crate) fn frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Whether the backend runs queues for us.
    pub(crate) fn running(&self) -> bool {
        !self.started.is_empty()
    }

    /// The mem table: every region of guest RAM with the memory file it maps.
    fn regions(
        &self,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
        mem.iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| {
                    ActivateError::Other(format!(
                        "{}: guest RAM is not shareable ({e}): needs --memory shared=on",
                        self.name
                    ))
                })
            })
            .collect()
    }

    /// DRIVER_OK: hands the backend the driver's features (those of `guest_features` it
    /// acked), the mem table and every enabled queue, and starts the relay. On an error the
    /// caller calls `stop`.
    pub(crate) fn start(
        &mut self,
        ctx: ActivateContext,
        guest_features: u64,
    ) -> Result<(), String> {
        if self.gone.load(Ordering::Acquire) {
            return Err(format!("{}: the backend has gone away", self.name));
        }
        let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
        let features =
            (ctx.acked_features & guest_features & self.backend_features) | F_PROTOCOL_FEATURES;
        self.fe.set_features(features).map_err(e("SET_FEATURES"))?;
        let regions = self.regions(&ctx.mem).map_err(|x| x.to_string())?;
        self.fe
            .set_mem_table(&regions)
            .map_err(e("SET_MEM_TABLE"))?;
        let name = self.name;
        let host = |a: u64| -> Result<u64, String> {
            ctx.mem
                .get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| format!("{name}: ring address {a:#x} outside guest RAM"))
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
        let watch = RelayWatch {
            name: self.name,
            socket: self.fe.as_raw_fd(),
            gone: self.gone.clone(),
            status: ctx.status.clone(),
        };
        self.relay = Some(spawn_relay(calls, ctx.interrupt, watch).map_err(|x| x.to_string())?);
        for &i in &self.started {
            self.fe
                .set_vring_enable(i, true)
                .map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Reset: the backend stops each ring (GET_VRING_BASE), the relay stops.
    pub(crate) fn stop(&mut self) {
        let gone = self.gone.load(Ordering::Acquire);
        for i in std::mem::take(&mut self.started) {
            if gone {
                continue;
            }
            if let Err(e) = self.fe.get_vring_base(i) {
                log::warn!("{}: GET_VRING_BASE {i}: {e}", self.name);
            }
        }
        if let Some(r) = self.relay.take() {
            let _ = r.stop.write(1);
            let _ = r.thread.join();
        }
    }
}

impl Drop for VhostUserConnection {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the relay watches besides the calls: the backend's socket hanging up.
struct RelayWatch {
    name: &'static str,
    socket: RawFd,
    gone: Arc<AtomicBool>,
    status: Arc<DeviceStatus>,
}

const STOP_TOKEN: u64 = u64::MAX;
const HANGUP_TOKEN: u64 = u64::MAX - 1;

/// A thread waiting on the backend's call eventfds, raising queue `i`'s interrupt for each;
/// and on the socket's hang-up, after which the device needs a reset.
fn spawn_relay(
    calls: Vec<(usize, EventFd)>,
    interrupt: Arc<dyn VirtioInterrupt>,
    watch: RelayWatch,
) -> std::io::Result<Relay> {
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    // Only the hang-up: the socket's data is the frontend's replies, read by the device.
    epoll.ctl(
        ControlOperation::Add,
        watch.socket,
        EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, HANGUP_TOKEN),
    )?;
    for (k, (_, call)) in calls.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, k as u64),
        )?;
    }
    let thread_stop = stop.try_clone()?;
    let name = watch.name;
    let thread = seccomp::spawn(format!("{name}-relay"), relay_filter(), move || {
        let _keep = thread_stop;
        let mut events = vec![EpollEvent::default(); calls.len() + 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{name} relay: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => return,
                    HANGUP_TOKEN => {
                        log::error!(
                            "{name}: the backend closed its socket (crashed or exited): \
                             the device needs a reset"
                        );
                        watch.gone.store(true, Ordering::Release);
                        let _ = epoll.ctl(
                            ControlOperation::Delete,
                            watch.socket,
                            EpollEvent::default(),
                        );
                        watch.status.mark_needs_reset();
                        interrupt.signal_config();
                    }
                    k => {
                        let (i, call) = &calls[k as usize];
                        if call.read().is_ok() {
                            interrupt.signal_queue(*i);
                        }
                    }
                }
            }
        }
    })
    .map_err(std::io::Error::other)?;
    Ok(Relay { stop, thread })
}

/// The relays' seccomp filter (one kind for every vhost-user device): they wait on eventfds,
/// write irqfds, and take the socket out of their epoll set once it hung up.
pub(crate) fn relay_filter() -> seccomp::Filter {
    seccomp::Filter::new("vhost-user-relay").allow(&[
        seccomp::Sysno::epoll_wait,
        seccomp::Sysno::epoll_pwait,
        seccomp::Sysno::epoll_ctl,
    ])
}
