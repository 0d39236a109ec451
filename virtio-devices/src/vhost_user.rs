//! The vhost-user frontend the vhost-user devices share (vhost-user-blk, -net, virtio-fs): the
//! device runs in another process (the backend), which maps guest RAM from the memory files we hand
//! it and serves the queues itself. We negotiate over its socket, give it each queue's rings, the
//! transport's notify eventfd as the kick and an eventfd of ours as the call; a relay thread turns
//! the calls into the transport's queue interrupts (the transport's interrupt is not an eventfd the
//! backend could write). The relay also watches the socket: a backend that goes away (crash, exit)
//! is logged and the VMM goes on; the device then needs a reset, or (where the device asks for it:
//! vhost-user-blk) the relay connects again and replays the set-up (`vhost_user_reconnect.rs`). A
//! device whose backend is gone connects to the socket again when the driver starts it next. A
//! pause (snapshot, migration) stops the relay and the backend's rings (GET_VRING_BASE, the bases
//! kept as the queues' positions); the resume hands the rings back at those bases (docs/pci.md,
//! "Pause, snapshot, restore, migration").

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use guest_memory::GuestMemoryMmap;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::vhost_user_backend_req::BackendReq;
use crate::vhost_user_deadline::{within, Watchdog};
use crate::vhost_user_log::{DirtyLog, F_LOG_ALL};
use crate::vhost_user_reconnect::{
    spawn_relay, Policy, QueueSetup, Relay, RelayParts, Setup, Target,
};
use crate::vhost_user_socket::REPLY_WAIT;
use crate::{ActivateContext, ActivateError};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never the guest's.
pub(crate) const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(transparent)]
    Socket(#[from] crate::vhost_user_socket::VhostSocketError),
    #[error("vhost-user {0}: {1}")]
    Protocol(&'static str, vhost::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("the backend did not answer within {0} s")]
    NoAnswer(u64),
    #[error("num_queues={0}: the backend has {1} queues")]
    TooManyQueues(u16, u64),
}

pub(crate) fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |e| VhostUserError::Protocol(what, e)
}

/// One connection to a backend and the queues it runs for us.
pub(crate) struct VhostUserConnection {
    /// `vhost-user-blk`, `vhost-user-fs`: log prefix and the relay thread's name.
    name: &'static str,
    /// Shared with the relay, which replaces it when it reconnects.
    fe: Arc<Mutex<Frontend>>,
    /// What the backend offers (GET_FEATURES).
    pub(crate) backend_features: u64,
    /// The protocol features negotiated.
    protocol: VhostUserProtocolFeatures,
    queue_size: u16,
    /// The queues the backend runs (their index), while active.
    started: Vec<usize>,
    relay: Option<Relay>,
    /// Set by the relay when the backend hangs up: no more requests are sent to it.
    gone: Arc<AtomicBool>,
    /// The socket to connect to again (a connection made by path).
    target: Option<Target>,
    policy: Policy,
    /// How long the relay tries to connect to a backend that went away.
    give_up: std::time::Duration,
    /// While paused: the running queues' set-up, each queue's `base` where the backend
    /// stopped it (GET_VRING_BASE), for the resume to hand back.
    paused: Option<RelayParts>,
    /// Whether the backend can log its writes to guest RAM (it offers LOG_SHMFD, negotiated,
    /// and VHOST_F_LOG_ALL).
    loggable: bool,
    /// The dirty log while a live migration runs.
    log: Option<Arc<DirtyLog>>,
    /// The backend's request channel, where the device asked for BACKEND_REQ and the backend
    /// offers it: its configuration-change notices.
    backend_req: Option<BackendReq>,
    /// The reply deadline's watchdog for this connection's requests (`None`: one per call).
    watchdog: Option<Arc<Watchdog>>,
}

/// Runs `f`, requests to the backend on socket `fd`, within the reply deadline: on the
/// connection's watchdog, or (none could start) on one started for the call.
fn deadline<T>(
    watchdog: &Option<Arc<Watchdog>>,
    name: &str,
    fd: std::os::fd::RawFd,
    f: impl FnOnce() -> T,
) -> (T, bool) {
    match watchdog {
        Some(w) => w.run(fd, REPLY_WAIT, f),
        None => within(name, fd, REPLY_WAIT, f),
    }
}

/// A vhost-user device's own state in a snapshot: the version and the device kind. The
/// queues' positions (each one's base from the pause) are the transport's; the backend's own
/// state is not ours (a restore connects to whichever backend listens on the socket).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserState {
    pub version: u32,
    /// `vhost-user-blk`, `vhost-user-net`.
    pub device: String,
    /// The configuration generation the backend's config-change notices bumped (BACKEND_REQ);
    /// written only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub config_generation: u32,
}

fn is_zero(g: &u32) -> bool {
    *g == 0
}

impl VhostUserState {
    pub(crate) fn of(device: &str, config_generation: u32) -> crate::VirtioDeviceState {
        crate::VirtioDeviceState::VhostUser(VhostUserState {
            version: crate::VIRTIO_DEVICE_STATE_VERSION,
            device: device.into(),
            config_generation,
        })
    }

    /// Checks that `state` is a state of a `device` of this version; its configuration
    /// generation.
    pub(crate) fn check(
        device: &'static str,
        state: &crate::VirtioDeviceState,
    ) -> Result<u32, pci::StateError> {
        let crate::VirtioDeviceState::VhostUser(s) = state else {
            return Err(state.wrong(device));
        };
        if s.device != device {
            return Err(pci::StateError::invalid(
                device,
                format!("the state of a {} device", s.device),
            ));
        }
        pci::StateError::check_version(device, s.version, crate::VIRTIO_DEVICE_STATE_VERSION)?;
        Ok(s.config_generation)
    }
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
        // A backend still starting is waited for (5 s), as in vhost-user-net's client mode.
        let stream = crate::vhost_user_socket::open(socket, false)?;
        let fe = Frontend::from_stream(stream, u64::from(max_queues));
        let (mut c, got) = Self::negotiate(name, fe, queue_size, want)?;
        c.target = Some(Target {
            socket: socket.to_path_buf(),
            max_queues: u64::from(max_queues),
        });
        Ok((c, got))
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
        let fd = fe.as_raw_fd();
        let watchdog = Watchdog::start(name).map(Arc::new);
        let (r, late) = deadline(&watchdog, name, fd, || -> Result<_, VhostUserError> {
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
            // LOG_SHMFD (dirty logging for live migration) only where the device asks for it.
            let got = offered & want;
            fe.set_protocol_features(got)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            Ok((backend_features, got))
        });
        if late {
            return Err(VhostUserError::NoAnswer(REPLY_WAIT.as_secs()));
        }
        let (backend_features, got) = r?;
        let backend_req = if got.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let b = BackendReq::new(name).map_err(|e| {
                VhostUserError::Protocol("SET_BACKEND_REQ_FD", vhost::Error::IOError(e))
            })?;
            let (r, late) = deadline(&watchdog, name, fd, || b.channel.hand_to(&mut fe));
            if late {
                return Err(VhostUserError::NoAnswer(REPLY_WAIT.as_secs()));
            }
            r.map_err(proto("SET_BACKEND_REQ_FD"))?;
            Some(b)
        } else {
            None
        };
        let c = VhostUserConnection {
            name,
            fe: Arc::new(Mutex::new(fe)),
            backend_features,
            protocol: got,
            queue_size,
            started: Vec::new(),
            relay: None,
            gone: Arc::new(AtomicBool::new(false)),
            target: None,
            policy: Policy::NeedsReset,
            give_up: crate::vhost_user_reconnect::GIVE_UP,
            paused: None,
            loggable: got.contains(VhostUserProtocolFeatures::LOG_SHMFD)
                && backend_features & F_LOG_ALL != 0,
            log: None,
            backend_req,
            watchdog,
        };
        Ok((c, got))
    }

    /// The frontend, for the device's own requests before activation (GET_CONFIG, ...).
    fn frontend(&self) -> MutexGuard<'_, Frontend> {
        self.fe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One of the device's own requests before activation (GET_CONFIG, GET_QUEUE_NUM, ...),
    /// `what` naming it in an error, within the reply deadline.
    pub(crate) fn ask<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, VhostUserError> {
        let name = self.name;
        let mut fe = self.frontend();
        let fd = fe.as_raw_fd();
        let (r, late) = deadline(&self.watchdog, name, fd, || f(&mut fe));
        if late {
            return Err(VhostUserError::NoAnswer(REPLY_WAIT.as_secs()));
        }
        r.map_err(proto(what))
    }

    /// A backend that goes away while the device runs is connected to again and given the
    /// running queues back (`vhost_user_reconnect.rs`), instead of the device needing a reset.
    /// For devices whose backend keeps no state the guest relies on (vhost-user-blk). After
    /// `give_up` without a backend the device needs a reset.
    pub(crate) fn reconnect_running_queues(&mut self, give_up: std::time::Duration) {
        self.policy = Policy::Reconnect;
        self.give_up = give_up;
    }

    /// Where the backend offers BACKEND_REQ (and the device asked for it): `refresh` runs on
    /// each of its config-change notices, before the guest is told, with the frontend (within
    /// the reply deadline). False without the channel.
    pub(crate) fn on_config_change(
        &self,
        refresh: impl Fn(&mut Frontend) + Send + 'static,
    ) -> bool {
        let Some(b) = &self.backend_req else {
            return false;
        };
        let (fe, gone, name) = (self.fe.clone(), self.gone.clone(), self.name);
        let watchdog = self.watchdog.clone();
        b.on_change(Box::new(move || {
            if gone.load(Ordering::Acquire) {
                return;
            }
            let mut fe = fe.lock().unwrap_or_else(|e| e.into_inner());
            let fd = fe.as_raw_fd();
            let (_, late) = deadline(&watchdog, name, fd, || refresh(&mut fe));
            if late {
                log::warn!("{name}: the backend did not answer after its configuration change");
            }
        }));
        true
    }

    /// The configuration generation the backend's notices bump (0 without BACKEND_REQ).
    pub(crate) fn config_generation(&self) -> u32 {
        self.backend_req.as_ref().map_or(0, BackendReq::generation)
    }

    /// The generation a snapshot had (a restore; without the channel there is none to keep).
    pub(crate) fn restore_config_generation(&mut self, generation: u32) {
        if let Some(b) = &mut self.backend_req {
            b.restore_generation(generation);
        }
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
        let gone = self.gone.load(Ordering::Acquire);
        if gone && self.target.is_none() {
            return Err(format!("{}: the backend has gone away", self.name));
        }
        let features =
            (ctx.acked_features & guest_features & self.backend_features) | F_PROTOCOL_FEATURES;
        let regions = self.regions(&ctx.mem).map_err(|x| x.to_string())?;
        let name = self.name;
        let host = |a: u64| -> Result<u64, String> {
            ctx.mem
                .get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| format!("{name}: ring address {a:#x} outside guest RAM"))
        };
        let mut queues = Vec::new();
        let mut calls = Vec::new();
        for (i, q) in ctx.queues.iter().enumerate() {
            let Some((q, kick)) = q else { continue };
            queues.push(QueueSetup {
                index: i,
                size: q.size(),
                desc: host(q.desc_table())?,
                avail: host(q.avail_ring())?,
                used: host(q.used_ring())?,
                avail_gpa: GuestAddress(q.avail_ring()),
                used_gpa: GuestAddress(q.used_ring()),
                base: q.next_avail(),
                kick: kick.try_clone().map_err(|x| x.to_string())?,
            });
            calls.push((
                i,
                EventFd::new(libc::EFD_NONBLOCK).map_err(|x| x.to_string())?,
            ));
        }
        if queues.is_empty() {
            return Err(ActivateError::NoQueues.to_string());
        }
        let setup = Setup {
            name,
            features,
            protocol: self.protocol,
            queue_max_size: self.queue_size,
            mem: ctx.mem.clone(),
            regions,
            queues,
            log: self.log.clone(),
            backend_req: self.backend_req.as_ref().map(|b| b.channel.clone()),
        };
        if let Some(b) = &mut self.backend_req {
            b.activate(ctx.interrupt.clone());
        }
        self.started = setup.queues.iter().map(|q| q.index).collect();
        // A backend that went away: the relay connects to the socket again (off this thread)
        // and hands the new one this set-up; the queues wait for it meanwhile.
        if !gone {
            let mut fe = self.frontend();
            let fd = fe.as_raw_fd();
            let (r, _) = deadline(&self.watchdog, name, fd, || {
                setup.apply(&mut fe, &calls, &[], &AtomicBool::new(false))
            });
            r?;
        }
        let parts = RelayParts {
            setup,
            calls,
            policy: self.policy,
            give_up: self.give_up,
            target: self.target.clone(),
            interrupt: ctx.interrupt,
            status: ctx.status.clone(),
            fe: self.fe.clone(),
            gone: self.gone.clone(),
            applied: !gone,
            served: !gone,
        };
        self.relay = Some(spawn_relay(parts).map_err(|x| x.to_string())?);
        Ok(())
    }

    /// Pause (for a snapshot or a migration): the relay stops (a reconnection in progress with
    /// it), then the backend stops each running ring with GET_VRING_BASE, which answers the
    /// ring's next available index (the backend serves a batch under the ring's lock, so no
    /// request is in flight once it answers), kept as the queue's base; a completion signalled
    /// meanwhile is passed on as the queue's interrupt. Afterwards the backend neither reads
    /// the rings nor writes guest RAM (a backend that keeps to the protocol) and no interrupt is
    /// raised until `resume`. A backend gone (or that does not answer: the socket's reply
    /// timeout) leaves each queue's base at the used ring's index, where a reconnection would
    /// start. Idempotent; nothing to do for a device that is not started.
    pub(crate) fn pause(&mut self) -> Result<(), String> {
        if self.paused.is_some() || self.started.is_empty() {
            return Ok(());
        }
        let Some(relay) = self.relay.take() else {
            return Ok(());
        };
        // Configuration changes wait for the resume (the relay serves no notice meanwhile).
        if let Some(b) = &mut self.backend_req {
            b.pause();
        }
        let name = self.name;
        let mut parts = relay
            .stop()
            .ok_or_else(|| format!("{name}: the relay thread had died"))?;
        let mut bases = Vec::new();
        if !self.gone.load(Ordering::Acquire) {
            let fe = self.fe.lock().unwrap_or_else(|e| e.into_inner());
            let queues = &parts.setup.queues;
            let (r, _) = deadline(&self.watchdog, name, fe.as_raw_fd(), || {
                queues
                    .iter()
                    .map(|q| {
                        fe.get_vring_base(q.index)
                            .map(|b| b as u16)
                            .map_err(|e| (q.index, e))
                    })
                    .collect::<Result<Vec<u16>, _>>()
            });
            match r {
                Ok(b) => bases = b,
                Err((i, e)) => {
                    log::warn!("{name}: GET_VRING_BASE {i}: {e}: the backend is taken as gone");
                    hang_up(&fe);
                    self.gone.store(true, Ordering::Release);
                }
            }
        }
        if bases.is_empty() {
            bases = parts.setup.bases(parts.served);
        }
        for (q, b) in parts.setup.queues.iter_mut().zip(&bases) {
            q.base = *b;
        }
        parts.served = false;
        // Completions the backend signalled after the relay stopped.
        for (i, call) in &parts.calls {
            if call.read().is_ok() {
                parts.interrupt.signal_queue(*i);
            }
        }
        let at: Vec<String> = parts
            .setup
            .queues
            .iter()
            .map(|q| {
                let used = parts.setup.ring_index(q.used_gpa);
                format!("queue {} at {} (used {used})", q.index, q.base)
            })
            .collect();
        log::info!("{name}: paused: {}", at.join(", "));
        self.paused = Some(parts);
        Ok(())
    }

    /// Resume: hands the backend the paused rings again (SET_FEATURES, SET_MEM_TABLE, and per
    /// ring NUM, ADDR, BASE (the base the pause saved), CALL, KICK, then ENABLE), kicks each
    /// queue once (what the driver published meanwhile is seen) and starts the relay again. A
    /// backend that went away meanwhile (or refuses) is as one that goes away while running:
    /// vhost-user-blk connects again (the new backend starts at the saved bases), the others
    /// need a reset. Nothing to do when not paused.
    pub(crate) fn resume(&mut self) -> Result<(), String> {
        let Some(mut parts) = self.paused.take() else {
            return Ok(());
        };
        if let Some(b) = &mut self.backend_req {
            b.resume();
        }
        let name = self.name;
        let mut applied = false;
        if !self.gone.load(Ordering::Acquire) {
            let bases: Vec<u16> = parts.setup.queues.iter().map(|q| q.base).collect();
            let mut fe = self.fe.lock().unwrap_or_else(|e| e.into_inner());
            let fd = fe.as_raw_fd();
            let (setup, calls) = (&parts.setup, &parts.calls);
            let (r, _) = deadline(&self.watchdog, name, fd, || {
                setup.apply(&mut fe, calls, &bases, &AtomicBool::new(false))
            });
            match r {
                Ok(()) => applied = true,
                Err(e) => {
                    log::warn!("{name}: resume: {e}: the backend is taken as gone");
                    hang_up(&fe);
                    self.gone.store(true, Ordering::Release);
                }
            }
        }
        if !applied && (self.policy != Policy::Reconnect || self.target.is_none()) {
            log::error!("{name}: the backend went away while paused: the device needs a reset");
            parts.status.mark_needs_reset();
            parts.interrupt.signal_config();
            return Ok(());
        }
        if applied {
            for q in &parts.setup.queues {
                let _ = q.kick.write(1);
            }
            log::info!("{name}: resumed");
        }
        parts.applied = applied;
        parts.served = applied;
        self.relay = Some(spawn_relay(parts).map_err(|e| format!("{name}: relay: {e}"))?);
        Ok(())
    }

    /// While paused, each queue's `(next_avail, next_used)`: the base the pause saved and the
    /// used ring's index (the same for a backend that completes in ring order); `None` for the
    /// queues the backend does not run. `None` when not paused.
    pub(crate) fn queue_positions(&self, queues: usize) -> Option<Vec<Option<(u16, u16)>>> {
        let parts = self.paused.as_ref()?;
        let mut out = vec![None; queues];
        for q in &parts.setup.queues {
            if let Some(p) = out.get_mut(q.index) {
                *p = Some((q.base, parts.setup.ring_index(q.used_gpa)));
            }
        }
        Some(out)
    }

    /// Live migration: from now on the backend logs the pages of guest RAM it writes (up to
    /// `last_addr`) in a shared bitmap (LOG_SHMFD: SET_LOG_BASE, VHOST_F_LOG_ALL, the used rings
    /// logged), read by `take_dirty_log`; every later set-up (resume, reconnection) includes
    /// it. `Err` naming the device: the backend does not offer it (its writes could not be
    /// tracked), or a running backend refused it.
    pub(crate) fn start_dirty_log(&mut self, last_addr: u64) -> Result<(), String> {
        let name = self.name;
        if !self.loggable {
            return Err(format!(
                "{name}: the backend does not offer dirty logging (VHOST_USER_PROTOCOL_F_LOG_SHMFD \
                 and VHOST_F_LOG_ALL): its writes to guest RAM could not be tracked"
            ));
        }
        let log = DirtyLog::new(last_addr).map_err(|e| format!("{name}: dirty log: {e}"))?;
        let log = Arc::new(log);
        log::info!(
            "{name}: dirty logging on (LOG_SHMFD, a {} KiB bitmap)",
            log.region().mmap_size.div_ceil(1024)
        );
        self.log = Some(log.clone());
        self.set_running_log(Some(log))
    }

    /// Ends the logging: the running backend gets its features without VHOST_F_LOG_ALL and
    /// its rings without logging (errors are logged: the backend then logs into a bitmap nobody
    /// reads).
    pub(crate) fn stop_dirty_log(&mut self) {
        if self.log.take().is_some() {
            if let Err(e) = self.set_running_log(None) {
                log::warn!("{e}");
            }
        }
    }

    /// The pages the backend wrote since the last call (bit i of word w: the page at guest
    /// address (64 w + i) × 4 KiB), cleared as read; `None` when not logging.
    pub(crate) fn take_dirty_log(&self) -> Option<Vec<u64>> {
        self.log.as_ref().map(|l| l.take())
    }

    /// Hands `log` to the rings the backend runs (a paused device's set-up gets it for the
    /// resume; a device not started gets it with its set-up at activation): the relay stops,
    /// the backend is told, the relay starts again.
    fn set_running_log(&mut self, log: Option<Arc<DirtyLog>>) -> Result<(), String> {
        let name = self.name;
        if let Some(p) = self.paused.as_mut() {
            p.setup.log = log;
            return Ok(());
        }
        let Some(relay) = self.relay.take() else {
            return Ok(());
        };
        let mut parts = relay
            .stop()
            .ok_or_else(|| format!("{name}: the relay thread had died"))?;
        parts.setup.log = log;
        let gone = self.gone.load(Ordering::Acquire);
        let mut told = Ok(());
        if !gone {
            let mut fe = self.fe.lock().unwrap_or_else(|e| e.into_inner());
            let fd = fe.as_raw_fd();
            let setup = &parts.setup;
            let (r, _) = deadline(&self.watchdog, name, fd, || setup.set_logging(&mut fe));
            told = r.map_err(|e| format!("{name}: dirty logging: {e}"));
        }
        for (i, call) in &parts.calls {
            if call.read().is_ok() {
                parts.interrupt.signal_queue(*i);
            }
        }
        if gone && parts.status.needs_reset() {
            // The relay had given up: nothing runs.
            return told;
        }
        parts.applied = !gone;
        self.relay = Some(spawn_relay(parts).map_err(|e| format!("{name}: relay: {e}"))?);
        told
    }

    /// Reset: the relay stops (a reconnection in progress with it), then the backend stops
    /// each ring (GET_VRING_BASE).
    pub(crate) fn stop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        if let Some(b) = &mut self.backend_req {
            b.reset();
        }
        let started = std::mem::take(&mut self.started);
        // Rings a pause stopped are stopped already.
        if self.paused.take().is_some() || self.gone.load(Ordering::Acquire) {
            return;
        }
        let fe = self.fe.lock().unwrap_or_else(|e| e.into_inner());
        let name = self.name;
        deadline(&self.watchdog, name, fe.as_raw_fd(), || {
            for i in started {
                if let Err(e) = fe.get_vring_base(i) {
                    log::warn!("{name}: GET_VRING_BASE {i}: {e}");
                    break;
                }
            }
        });
    }
}

impl Drop for VhostUserConnection {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `VirtioDevice` methods of a device whose whole lifecycle is its `VhostUserConnection`
/// field `$conn` (vhost-user-blk, generic vhost-user): activation hands the backend the rings
/// with the driver's features among `$features`, reset/pause/resume and the dirty log are the
/// connection's, and the device's own state is `VhostUserState` named `$name`. Written inside
/// the device's `impl VirtioDevice`; `queue_positions` stays the device's (it knows how many
/// queues it has).
macro_rules! vhost_user_lifecycle {
    ($conn:ident, $features:expr, $name:expr) => {
        fn activate(&mut self, ctx: $crate::ActivateContext) -> Result<(), $crate::ActivateError> {
            self.$conn.start(ctx, $features).map_err(|e| {
                self.$conn.stop();
                $crate::ActivateError::Other(e)
            })
        }
        fn reset(&mut self) {
            self.$conn.stop();
        }
        fn pause(&mut self) -> Result<(), String> {
            self.$conn.pause()
        }
        fn resume(&mut self) -> Result<(), String> {
            self.$conn.resume()
        }
        fn start_dirty_log(&mut self, last_addr: u64) -> Result<(), String> {
            self.$conn.start_dirty_log(last_addr)
        }
        fn stop_dirty_log(&mut self) {
            self.$conn.stop_dirty_log()
        }
        fn take_dirty_log(&mut self) -> Option<Vec<u64>> {
            self.$conn.take_dirty_log()
        }
        fn device_state(&self) -> $crate::VirtioDeviceState {
            $crate::vhost_user::VhostUserState::of($name, self.$conn.config_generation())
        }
        fn set_device_state(
            &mut self,
            state: &$crate::VirtioDeviceState,
        ) -> Result<(), pci::StateError> {
            // The queues' bases are the transport's; the backend is whichever listens on the
            // socket (the user starts it before the restore, as with the original).
            let generation = $crate::vhost_user::VhostUserState::check($name, state)?;
            self.$conn.restore_config_generation(generation);
            Ok(())
        }
    };
}
pub(crate) use vhost_user_lifecycle;

/// Closes both ways of a backend's socket that failed a request (a time-out, a refusal): a
/// backend still there (stopped, slow) sees the hang-up and lets go of the rings, instead of
/// running them beside the backend a reconnection finds.
fn hang_up(fe: &Frontend) {
    // SAFETY: shutdown on the frontend's own socket, which stays open (only its traffic ends).
    unsafe { libc::shutdown(fe.as_raw_fd(), libc::SHUT_RDWR) };
}

/// The relays' seccomp filter (one kind for every vhost-user device): they wait on eventfds,
/// write irqfds, and take the socket out of their epoll set once it hung up; to reconnect they
/// open a Unix socket, connect it, set its timeouts and exchange messages (with descriptors:
/// the memory files, the queues' eventfds) over it.
pub(crate) fn relay_filter() -> seccomp::Filter {
    use ::seccomp::Sysno::*;
    ::seccomp::Filter::new("vhost-user-relay").allow(&[
        epoll_wait,
        epoll_pwait,
        epoll_ctl,
        socket,
        connect,
        setsockopt,
        sendmsg,
        recvmsg,
        // The reply deadline's watchdog (`vhost_user_deadline.rs`), which a reconnecting relay
        // starts too.
        eventfd2,
        poll,
        ppoll,
        shutdown,
    ])
}
