//! The backend's own requests (the BACKEND_REQ protocol feature): a socket pair whose one end
//! the backend gets with SET_BACKEND_REQ_FD, once the protocol features are set (and again on
//! each reconnection), and whose other end the device's relay thread reads. The one request we
//! serve is CONFIG_CHANGE_MSG: the backend's configuration space changed (a disk it resized,
//! ...), so the configuration generation is bumped and the running device raises its
//! configuration interrupt (`config_signal.rs`: while it is paused, at the resume). Other
//! requests (shared memory maps, shared objects) are refused with ENOSYS, as the original's
//! generic device refuses them.
//!
//! The backend is not the guest, but it is another process: a request cut short does not hold
//! the relay for longer than the socket's receive timeout, and a channel that fails is dropped
//! from the relay's watch (logged once); the device goes on without config-change notices.

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};

use crate::config_signal::{ConfigInterrupt, ConfigSignal};

/// How long a backend may take to send the rest of a request it began.
const RECV_TIMEOUT_S: libc::time_t = 1;

/// What the device does first when its backend's configuration changed (a device that keeps
/// a copy of the space reads it again), on the relay thread.
pub(crate) type OnChange = Box<dyn Fn() + Send>;

/// What a config-change notice does: the device's hook, then the generation bumped and the
/// running device interrupted.
struct ConfigChange {
    signal: Arc<ConfigSignal>,
    on_change: Arc<Mutex<Option<OnChange>>>,
}

impl VhostUserFrontendReqHandler for ConfigChange {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        if let Some(f) = self
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f();
        }
        self.signal.change(|| true);
        Ok(0)
    }
}

/// The channel, shared by the connection (which hands its end to each backend) and the relay
/// (which serves it while the device runs).
pub(crate) struct BackendReqChannel {
    handler: Mutex<FrontendReqHandler<ConfigChange>>,
    tx: RawFd,
    rx: RawFd,
    name: &'static str,
}

impl BackendReqChannel {
    /// A new channel whose notices run `on_change` and change `signal`.
    fn new(
        name: &'static str,
        signal: Arc<ConfigSignal>,
        on_change: Arc<Mutex<Option<OnChange>>>,
    ) -> std::io::Result<Self> {
        let handler = FrontendReqHandler::new(Arc::new(ConfigChange { signal, on_change }))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let rx = handler.as_raw_fd();
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_S,
            tv_usec: 0,
        };
        // SAFETY: sets SO_RCVTIMEO on the handler's own socket from a valid timeval of the
        // size given.
        let r = unsafe {
            libc::setsockopt(
                rx,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(BackendReqChannel {
            tx: handler.get_tx_raw_fd(),
            rx,
            handler: Mutex::new(handler),
            name,
        })
    }

    /// Hands the backend behind `fe` its end of the channel (SET_BACKEND_REQ_FD).
    pub(crate) fn hand_to(&self, fe: &mut Frontend) -> vhost::Result<()> {
        // SAFETY: `tx` is the handler's own socket, open for as long as `self` (which owns
        // the handler) lives; it is only borrowed for the call.
        let tx = unsafe { BorrowedFd::borrow_raw(self.tx) };
        fe.set_backend_request_fd(&tx)
    }

    /// The end the relay watches for requests.
    pub(crate) fn fd(&self) -> RawFd {
        self.rx
    }

    /// Serves one request; false when the channel failed (logged) and is no longer to be
    /// watched.
    pub(crate) fn serve(&self) -> bool {
        let mut h = self.handler.lock().unwrap_or_else(|e| e.into_inner());
        match h.handle_request() {
            Ok(_) => true,
            Err(vhost::vhost_user::Error::ReqHandlerError(e)) => {
                // A request we do not serve: refused (the handler answered it if asked to).
                log::debug!("{}: a backend request was refused: {e}", self.name);
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: the backend's request channel failed ({e}): its configuration \
                     changes are no longer passed on",
                    self.name
                );
                false
            }
        }
    }
}

/// A connection's channel with the configuration generation its notices bump, and the
/// device's side of that signal (its interrupt while it runs).
pub(crate) struct BackendReq {
    pub(crate) channel: Arc<BackendReqChannel>,
    signal: Arc<ConfigSignal>,
    irq: ConfigInterrupt,
    on_change: Arc<Mutex<Option<OnChange>>>,
}

impl BackendReq {
    pub(crate) fn new(name: &'static str) -> std::io::Result<Self> {
        let signal = Arc::new(ConfigSignal::default());
        let on_change = Arc::new(Mutex::new(None));
        Ok(BackendReq {
            channel: Arc::new(BackendReqChannel::new(
                name,
                signal.clone(),
                on_change.clone(),
            )?),
            signal,
            irq: ConfigInterrupt::default(),
            on_change,
        })
    }

    /// What runs first on each notice (see [`OnChange`]).
    pub(crate) fn on_change(&self, f: OnChange) {
        *self.on_change.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    pub(crate) fn generation(&self) -> u32 {
        self.signal.generation()
    }

    /// The generation a snapshot had, without an interrupt.
    pub(crate) fn restore_generation(&mut self, generation: u32) {
        self.signal.restore(generation, || {});
    }

    pub(crate) fn activate(&mut self, interrupt: Arc<dyn crate::VirtioInterrupt>) {
        self.irq.activate(&self.signal, interrupt);
    }

    pub(crate) fn reset(&mut self) {
        self.irq.reset(&self.signal);
    }

    pub(crate) fn pause(&mut self) {
        self.irq.pause(&self.signal);
    }

    pub(crate) fn resume(&mut self) {
        self.irq.resume(&self.signal);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A backend's message on the channel: header (request, flags: version 1, size), body.
    fn send(c: &BackendReqChannel, request: u32, body: &[u8], size: u32) {
        let mut m = Vec::new();
        for w in [request, 1, size] {
            m.extend_from_slice(&w.to_le_bytes());
        }
        m.extend_from_slice(body);
        // SAFETY: writes the bytes of `m` to the channel's backend end, open while `c` lives.
        let n = unsafe { libc::write(c.tx, m.as_ptr().cast(), m.len()) };
        assert_eq!(n, m.len() as isize);
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_runs_the_hook() {
        let b = BackendReq::new("test").unwrap();
        let hooked = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let h = hooked.clone();
        b.on_change(Box::new(move || {
            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        send(&b.channel, 2, &[], 0);
        assert!(b.channel.serve());
        assert_eq!(b.generation(), 1);
        assert_eq!(hooked.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// What a faulty or hostile backend sends ends in a refusal or in the channel's end, never
    /// in a relay held for longer than the receive timeout: a request we do not serve (a shared
    /// object added: refused, the channel goes on), a config change with a body it must not
    /// have, an unknown request, and a header whose body never comes.
    #[test]
    fn a_faulty_backend_cannot_hold_the_relay() {
        let b = BackendReq::new("test").unwrap();
        // SHARED_OBJECT_ADD (6) with its UUID: refused, served; the channel goes on.
        send(&b.channel, 6, &[7u8; 16], 16);
        assert!(b.channel.serve());
        send(&b.channel, 2, &[], 0);
        assert!(b.channel.serve());
        assert_eq!(b.generation(), 1);
        // A config change with a body: a malformed request.
        let b = BackendReq::new("test").unwrap();
        send(&b.channel, 2, &[0u8; 8], 8);
        assert!(!b.channel.serve());
        assert_eq!(b.generation(), 0);
        // An unknown request.
        let b = BackendReq::new("test").unwrap();
        send(&b.channel, 0x7777, &[], 0);
        assert!(!b.channel.serve());
        // A header announcing 64 bytes that never come: given up after the timeout.
        let b = BackendReq::new("test").unwrap();
        send(&b.channel, 2, &[], 64);
        let t = Instant::now();
        assert!(!b.channel.serve());
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(b.generation(), 0);
    }

    /// A snapshot keeps the generation (written only when not 0, so older states read as
    /// before), and a restore puts it back without an interrupt.
    #[test]
    fn the_generation_survives_a_snapshot() {
        use crate::vhost_user::VhostUserState;
        let plain = serde_json::to_value(VhostUserState::of("generic-vhost-user", 0)).unwrap();
        assert!(!plain.to_string().contains("config_generation"), "{plain}");
        let state = VhostUserState::of("generic-vhost-user", 3);
        let back: crate::VirtioDeviceState =
            serde_json::from_value(serde_json::to_value(&state).unwrap()).unwrap();
        assert_eq!(
            VhostUserState::check("generic-vhost-user", &back).unwrap(),
            3
        );
        let older: crate::VirtioDeviceState = serde_json::from_value(plain).unwrap();
        assert_eq!(
            VhostUserState::check("generic-vhost-user", &older).unwrap(),
            0
        );
        let mut b = BackendReq::new("test").unwrap();
        b.restore_generation(3);
        assert_eq!(b.generation(), 3);
    }
}
