//! The vhost-user relay thread and backend reconnection (used by `vhost_user.rs`).
//!
//! The relay turns the backend's call eventfds into the transport's queue interrupts and
//! watches the socket. When the backend hangs up (crash, exit):
//! - [`Policy::NeedsReset`] (virtio-fs, vhost-user-net): the device is marked NEEDS_RESET
//!   and the relay idles. A later activation (after the guest resets the device) connects
//!   afresh to the same socket.
//! - [`Policy::Reconnect`] (vhost-user-blk): the relay connects to the same socket again,
//!   10 ms after the hang-up, then with the wait doubling up to 1 s between tries, on its own
//!   thread (the control loop and the vCPUs never wait for it). When a backend answers it
//!   replays the whole set-up: owner, features (the guest's, which the new backend must
//!   offer), protocol features, memory table, and per running queue its size, ring
//!   addresses, base, call and kick, then enables the rings; it kicks every queue and raises
//!   every queue's interrupt once (a kick or a call the dead backend swallowed is not lost).
//!   After its give-up time without a backend ([`GIVE_UP`] unless the disk's
//!   `vhost_reconnect_timeout` says otherwise) the device is marked NEEDS_RESET, as above.
//!
//! The replayed base of a queue that a backend was running is the used ring's index, read
//! from guest memory (as the original Cloud Hypervisor does): every request the driver made
//! available that the dead backend had not marked used is run again by the new one. That is
//! exact for a backend that completes each queue's requests in ring order (ours,
//! `vhost_user_block`): before the used index everything completed, after it nothing did but
//! what the backend ran without reporting it (a read read again, a write written again with
//! the same data: the guest cannot tell). A backend that completes out of order (several
//! requests in flight, e.g. qemu-storage-daemon) gives no such guarantee: the used index
//! counts completions, not ring positions, so a request completed past a lost one is run and
//! reported again and the lost one is never run (the guest waits for it). docs/pci.md has
//! the whole guarantee.
//!
//! A pause stops the relay ([`Relay::stop`] hands its parts back) and the backend's rings;
//! the resume replays the set-up at the bases the pause saved (each [`QueueSetup::base`],
//! with `served` false) and starts a relay again; a backend that died meanwhile is reconnected
//! to from those bases.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::vhost_user_backend_req::BackendReqChannel;
use crate::vhost_user_deadline::within;
use crate::vhost_user_log::{DirtyLog, F_LOG_ALL};
use crate::{DeviceStatus, VirtioInterrupt};

/// VHOST_VRING_F_LOG: the ring's used ring is logged.
const VRING_F_LOG: u32 = 1;

/// First wait after a hang-up, and the longest between two tries.
pub(crate) const FIRST_TRY: Duration = Duration::from_millis(10);
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(1);
/// How long a running device waits for its backend before it needs a reset, by default.
pub const GIVE_UP: Duration = Duration::from_secs(60);
/// The longest a reconnecting backend may take to answer one message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a device does when its backend goes away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Policy {
    NeedsReset,
    Reconnect,
}

/// Where to connect again: the socket and how many queues the frontend may address.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub socket: PathBuf,
    pub max_queues: u64,
}

/// One running queue as the backend gets it.
pub(crate) struct QueueSetup {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Guest addresses of the avail and used rings (their indexes are read for a replay).
    pub avail_gpa: GuestAddress,
    pub used_gpa: GuestAddress,
    /// Where the backend starts the first time (the transport's next available index).
    pub base: u16,
    pub kick: EventFd,
}

/// Everything a backend is told at activation, kept to tell a new one again.
pub(crate) struct Setup {
    pub name: &'static str,
    /// The driver's features and F_PROTOCOL_FEATURES.
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queue_max_size: u16,
    pub mem: GuestMemoryMmap,
    pub regions: Vec<VhostUserMemoryRegionInfo>,
    pub queues: Vec<QueueSetup>,
    /// The dirty log during a live migration: the backend gets it (SET_LOG_BASE after the mem
    /// table, VHOST_F_LOG_ALL, each ring's used ring logged) with every set-up.
    pub log: Option<Arc<DirtyLog>>,
    /// The backend's request channel, handed to every backend this set-up is given to.
    pub backend_req: Option<Arc<BackendReqChannel>>,
}

impl Setup {
    /// Hands the set-up to `fe` with `bases[k]` as queue k's base, and enables the rings.
    /// `stop` is checked between messages (a reset waits for no more than one reply).
    pub(crate) fn apply(
        &self,
        fe: &mut Frontend,
        calls: &[(usize, EventFd)],
        bases: &[u16],
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
        let stopped = || {
            if stop.load(Ordering::Acquire) {
                Err("stopped".to_string())
            } else {
                Ok(())
            }
        };
        fe.set_features(self.features_now())
            .map_err(e("SET_FEATURES"))?;
        fe.set_mem_table(&self.regions)
            .map_err(e("SET_MEM_TABLE"))?;
        if let Some(log) = &self.log {
            // A new mem table comes without the log: set it again.
            fe.set_log_base(0, Some(log.region()))
                .map_err(e("SET_LOG_BASE"))?;
        }
        for (k, q) in self.queues.iter().enumerate() {
            stopped()?;
            let i = q.index;
            fe.set_vring_num(i, q.size).map_err(e("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, &self.ring_addr(q))
                .map_err(e("SET_VRING_ADDR"))?;
            let base = bases.get(k).copied().unwrap_or(q.base);
            fe.set_vring_base(i, base).map_err(e("SET_VRING_BASE"))?;
            let call = calls
                .iter()
                .find(|(j, _)| *j == i)
                .map(|(_, c)| c)
                .ok_or_else(|| format!("{}: no call eventfd for queue {i}", self.name))?;
            fe.set_vring_call(i, call).map_err(e("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, &q.kick).map_err(e("SET_VRING_KICK"))?;
        }
        for q in &self.queues {
            stopped()?;
            fe.set_vring_enable(q.index, true)
                .map_err(e("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// The features the backend runs with: the driver's, and VHOST_F_LOG_ALL while logging.
    pub(crate) fn features_now(&self) -> u64 {
        if self.log.is_some() {
            self.features | F_LOG_ALL
        } else {
            self.features
        }
    }

    /// SET_VRING_ADDR's message for `q`: its rings, and while logging, its used ring's guest
    /// address to log (VHOST_VRING_F_LOG).
    fn ring_addr(&self, q: &QueueSetup) -> VringConfigData {
        let log = self.log.is_some();
        VringConfigData {
            queue_max_size: self.queue_max_size,
            queue_size: q.size,
            flags: if log { VRING_F_LOG } else { 0 },
            desc_table_addr: q.desc,
            used_ring_addr: q.used,
            avail_ring_addr: q.avail,
            log_addr: log.then_some(q.used_gpa.0),
        }
    }

    /// Turns the running backend's logging on or off as `self.log` says: SET_LOG_BASE (on),
    /// SET_FEATURES, and each ring's addresses with or without its used ring logged.
    pub(crate) fn set_logging(&self, fe: &mut Frontend) -> Result<(), String> {
        let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
        if let Some(log) = &self.log {
            fe.set_log_base(0, Some(log.region()))
                .map_err(e("SET_LOG_BASE"))?;
        }
        fe.set_features(self.features_now())
            .map_err(e("SET_FEATURES"))?;
        for q in &self.queues {
            fe.set_vring_addr(q.index, &self.ring_addr(q))
                .map_err(e("SET_VRING_ADDR"))?;
        }
        Ok(())
    }

    /// The bases a new backend starts from: each queue's `base` (the transport's, or where a
    /// pause stopped it) until a backend ran the queue, the used ring's index after.
    pub(crate) fn bases(&self, served: bool) -> Vec<u16> {
        self.queues
            .iter()
            .map(|q| {
                if served {
                    self.ring_index(q.used_gpa)
                } else {
                    q.base
                }
            })
            .collect()
    }

    /// The `idx` field of the ring at `ring` (0 if the guest moved it out of RAM: the new
    /// backend then starts from 0, which can only hurt that guest).
    pub(crate) fn ring_index(&self, ring: GuestAddress) -> u16 {
        ring.0
            .checked_add(2)
            .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
            .map(u16::from_le)
            .unwrap_or(0)
    }
}

/// Connects to `target` again (the socket, with its time-outs), for `handshake`: the owner,
/// the driver's features (which the new backend must offer) and the protocol features
/// negotiated before.
fn connect(target: &Target) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(&target.socket)
        .map_err(|e| format!("connect {}: {e}", target.socket.display()))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    Ok(stream)
}

/// Negotiates over `stream` (from `connect`) what `setup` needs.
fn handshake(stream: UnixStream, target: &Target, setup: &Setup) -> Result<Frontend, String> {
    let mut fe = Frontend::from_stream(stream, target.max_queues);
    let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
    fe.set_owner().map_err(e("SET_OWNER"))?;
    let offered = fe.get_features().map_err(e("GET_FEATURES"))?;
    let missing = setup.features_now() & !offered;
    if missing != 0 {
        return Err(format!(
            "the new backend lacks features {missing:#x} the driver uses"
        ));
    }
    fe.set_features(setup.features).map_err(e("SET_FEATURES"))?;
    let proto = fe
        .get_protocol_features()
        .map_err(e("GET_PROTOCOL_FEATURES"))?;
    if !proto.contains(setup.protocol) {
        return Err(format!(
            "the new backend lacks protocol features {:?}",
            setup.protocol - proto
        ));
    }
    fe.set_protocol_features(setup.protocol)
        .map_err(e("SET_PROTOCOL_FEATURES"))?;
    if let Some(c) = &setup.backend_req {
        c.hand_to(&mut fe).map_err(e("SET_BACKEND_REQ_FD"))?;
    }
    Ok(fe)
}

/// What a relay thread needs.
pub(crate) struct RelayParts {
    pub setup: Setup,
    pub calls: Vec<(usize, EventFd)>,
    pub policy: Policy,
    /// How long to try to connect before the device needs a reset.
    pub give_up: Duration,
    /// `None`: the device cannot connect again by itself (a stream its caller made).
    pub target: Option<Target>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub status: Arc<DeviceStatus>,
    /// The device's frontend: replaced by a reconnection.
    pub fe: Arc<Mutex<Frontend>>,
    /// Whether the backend behind `fe` has gone (requests to it are not sent).
    pub gone: Arc<AtomicBool>,
    /// Whether `setup` is applied to `fe` already (false: connect first).
    pub applied: bool,
    /// Whether a backend ran the queues since their bases were set (a replay then starts at
    /// the used index; otherwise at each queue's `base`: the transport's, or a pause's).
    pub served: bool,
}

/// A running relay: stopped (and joined) by [`Relay::stop`].
pub(crate) struct Relay {
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    thread: JoinHandle<RelayParts>,
}

impl Relay {
    /// Stops the relay; a reconnection in progress ends at its next message (at most one
    /// reply timeout). Returns what the relay had (`None` if its thread panicked), with
    /// `served` as it stands.
    pub(crate) fn stop(self) -> Option<RelayParts> {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

const STOP_TOKEN: u64 = u64::MAX;
const HANGUP_TOKEN: u64 = u64::MAX - 1;
const BACKEND_REQ_TOKEN: u64 = u64::MAX - 2;

enum State {
    Connected,
    /// Waiting for a backend since `since`; the next try at `next`, then `wait` later.
    Reconnecting {
        since: Instant,
        next: Instant,
        wait: Duration,
    },
    /// Nothing more to do until the device is reset.
    Idle,
}

struct RelayThread {
    p: RelayParts,
    epoll: Epoll,
    stopping: Arc<AtomicBool>,
    state: State,
    /// The socket fd watched for a hang-up.
    watched: Option<RawFd>,
}

/// Starts the relay thread for `p` (named `<device>-relay`).
pub(crate) fn spawn_relay(p: RelayParts) -> std::io::Result<Relay> {
    let stop = EventFd::new(libc::EFD_NONBLOCK)?;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, STOP_TOKEN),
    )?;
    for (k, (_, call)) in p.calls.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            call.as_raw_fd(),
            EpollEvent::new(EventSet::IN, k as u64),
        )?;
    }
    if let Some(c) = &p.setup.backend_req {
        epoll.ctl(
            ControlOperation::Add,
            c.fd(),
            EpollEvent::new(EventSet::IN, BACKEND_REQ_TOKEN),
        )?;
    }
    let stopping = Arc::new(AtomicBool::new(false));
    let now = Instant::now();
    let mut t = RelayThread {
        state: if p.applied {
            State::Connected
        } else {
            State::Reconnecting {
                since: now,
                next: now,
                wait: FIRST_TRY,
            }
        },
        watched: None,
        p,
        epoll,
        stopping: stopping.clone(),
    };
    if t.p.applied {
        let fd = t.p.fe.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
        t.watch(fd)?;
    }
    let thread_stop = stop.try_clone()?;
    let name = t.p.setup.name;
    let thread = seccomp::spawn(
        format!("{name}-relay"),
        crate::vhost_user::relay_filter(),
        move || {
            let _keep = thread_stop;
            t.run();
            t.p
        },
    )
    .map_err(std::io::Error::other)?;
    Ok(Relay {
        stop,
        stopping,
        thread,
    })
}

impl RelayThread {
    /// Watches `fd` for the backend hanging up (only that: its data is the frontend's replies).
    fn watch(&mut self, fd: RawFd) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, HANGUP_TOKEN),
        )?;
        self.watched = Some(fd);
        Ok(())
    }

    fn run(&mut self) {
        let name = self.p.setup.name;
        let mut events = vec![EpollEvent::default(); self.p.calls.len() + 3];
        loop {
            let timeout = match &self.state {
                State::Reconnecting { next, .. } => {
                    let ms = next.saturating_duration_since(Instant::now()).as_millis();
                    i32::try_from(ms).unwrap_or(i32::MAX)
                }
                _ => -1,
            };
            let n = match self.epoll.wait(timeout, &mut events) {
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
                    HANGUP_TOKEN => self.hung_up(),
                    BACKEND_REQ_TOKEN => self.backend_request(),
                    k => {
                        if let Some((i, call)) = self.p.calls.get(k as usize) {
                            if call.read().is_ok() {
                                self.p.interrupt.signal_queue(*i);
                            }
                        }
                    }
                }
            }
            if let State::Reconnecting { next, .. } = self.state {
                if Instant::now() >= next {
                    self.try_reconnect();
                }
            }
        }
    }

    /// A request on the backend's channel: served; a channel that failed is no longer watched.
    fn backend_request(&mut self) {
        let Some(c) = &self.p.setup.backend_req else {
            return;
        };
        if !c.serve() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, c.fd(), EpollEvent::default());
        }
    }

    fn needs_reset(&mut self) {
        self.p.status.mark_needs_reset();
        self.p.interrupt.signal_config();
        self.state = State::Idle;
    }

    fn hung_up(&mut self) {
        let name = self.p.setup.name;
        self.p.gone.store(true, Ordering::Release);
        if let Some(fd) = self.watched.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if self.p.policy == Policy::Reconnect && self.p.target.is_some() {
            log::warn!("{name}: the backend closed its socket (crashed or exited): reconnecting");
            let now = Instant::now();
            self.state = State::Reconnecting {
                since: now,
                next: now + FIRST_TRY,
                wait: FIRST_TRY,
            };
        } else {
            log::error!(
                "{name}: the backend closed its socket (crashed or exited): \
                 the device needs a reset"
            );
            self.needs_reset();
        }
    }

    fn try_reconnect(&mut self) {
        let State::Reconnecting { since, wait, .. } = self.state else {
            return;
        };
        let Some(target) = self.p.target.clone() else {
            self.needs_reset();
            return;
        };
        let name = self.p.setup.name;
        let setup = &self.p.setup;
        let bases = setup.bases(self.p.served);
        // What waits past each base, counted before the new backend runs the queue: read
        // after, it would also count what the guest made available once the new backend had
        // completed the waiting requests (a synchronous driver's next request).
        let waiting: Vec<u16> = setup
            .queues
            .iter()
            .zip(&bases)
            .map(|(q, base)| setup.ring_index(q.avail_gpa).wrapping_sub(*base))
            .collect();
        let (calls, stopping) = (&self.p.calls, &self.stopping);
        // The whole set-up within twice a reply's time-out (the vhost crate's reads would
        // wait for a stopped backend forever: `vhost_user_deadline.rs`).
        let r = connect(&target).and_then(|stream| {
            let fd = stream.as_raw_fd();
            let (r, late) = within(name, fd, 2 * REPLY_TIMEOUT, || {
                handshake(stream, &target, setup).and_then(|mut fe| {
                    setup.apply(&mut fe, calls, &bases, stopping)?;
                    Ok(fe)
                })
            });
            if late {
                return Err("the backend did not answer in time".into());
            }
            r
        });
        match r {
            Ok(fe) => {
                let fd = fe.as_raw_fd();
                *self.p.fe.lock().unwrap_or_else(|e| e.into_inner()) = fe;
                self.p.gone.store(false, Ordering::Release);
                let mut resumed = Vec::new();
                for ((q, base), waiting) in setup.queues.iter().zip(&bases).zip(&waiting) {
                    resumed.push(format!(
                        "queue {} at {base} ({waiting} to run again)",
                        q.index
                    ));
                    // Whatever the dead backend swallowed: a kick, a call.
                    let _ = q.kick.write(1);
                    self.p.interrupt.signal_queue(q.index);
                }
                log::warn!(
                    "{name}: backend {} after {} ms: {}",
                    if self.p.served {
                        "reconnected"
                    } else {
                        "connected"
                    },
                    since.elapsed().as_millis(),
                    resumed.join(", ")
                );
                self.p.served = true;
                self.state = State::Connected;
                if let Err(e) = self.watch(fd) {
                    log::error!("{name} relay: cannot watch the new socket: {e}");
                }
            }
            Err(e) if since.elapsed() >= self.p.give_up => {
                log::error!(
                    "{name}: no backend on {} for {} s ({e}): the device needs a reset",
                    target.socket.display(),
                    self.p.give_up.as_secs()
                );
                self.needs_reset();
            }
            Err(e) => {
                log::debug!("{name}: reconnecting: {e}");
                let wait = (wait * 2).min(MAX_WAIT);
                self.state = State::Reconnecting {
                    since,
                    next: Instant::now() + wait,
                    wait,
                };
            }
        }
    }
}
