//! A deadline on a vhost-user backend's replies. The vhost crate reads a reply until it has
//! all of it and takes a read that timed out (SO_RCVTIMEO: EAGAIN) as a reason to read again,
//! so the socket's time-outs alone do not bound the wait: a backend that stops (SIGSTOP, a
//! hang) would hold the caller forever. [`within`] runs requests beside a watchdog thread that
//! shuts the socket down both ways once the deadline passes: the read then sees the end of the
//! stream and the request fails, and the backend, when it runs again, sees the hang-up.
//!
//! A connection keeps one [`Watchdog`] thread for its requests (a generic device's config
//! accesses are requests, from the vCPU thread); [`within`] starts one for a single use (the
//! handshake of a reconnection).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Runs `f` (requests to the backend on socket `fd`) for at most about `wait`: past it the
/// socket is shut down (for good: the backend is then taken as gone). Returns what `f` returned
/// and whether the deadline fired. Without a watchdog thread (none could start) `f` runs alone.
pub(crate) fn within<T>(name: &str, fd: RawFd, wait: Duration, f: impl FnOnce() -> T) -> (T, bool) {
    let fired = Arc::new(AtomicBool::new(false));
    let watchdog = EventFd::new(libc::EFD_NONBLOCK).ok().and_then(|done| {
        let wake = done.try_clone().ok()?;
        let fired = fired.clone();
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        let h = seccomp::spawn(
            format!("{name}-deadline"),
            crate::vhost_user::relay_filter(),
            move || {
                let mut pfd = libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                loop {
                    // SAFETY: poll reads and writes the one pollfd we own for the call.
                    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    if n == 0 {
                        fired.store(true, Ordering::Release);
                        // SAFETY: shutdown of the caller's socket, which stays open until the
                        // caller (waiting for this thread's end) drops it.
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    }
                    return;
                }
            },
        )
        .ok()?;
        Some((done, h))
    });
    let r = f();
    if let Some((done, h)) = watchdog {
        let _ = done.write(1);
        let _ = h.join();
    }
    (r, fired.load(Ordering::Acquire))
}

/// A watchdog thread that lives as long as its connection: [`Watchdog::run`] is [`within`]
/// without a thread started per call.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    /// One call at a time (the connection's requests are one at a time anyway).
    calls: Mutex<()>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<Armed>,
    cv: Condvar,
}

#[derive(Default)]
struct Armed {
    /// The socket to shut down, and when.
    at: Option<(RawFd, Instant)>,
    fired: bool,
    stop: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Armed> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watchdog thread: waits to be armed, and shuts the socket down at its deadline
    /// unless disarmed first.
    fn watch(&self) {
        let mut a = self.lock();
        while !a.stop {
            a = match a.at {
                None => self.cv.wait(a).unwrap_or_else(|e| e.into_inner()),
                Some((fd, at)) => {
                    let now = Instant::now();
                    if now >= at {
                        a.at = None;
                        a.fired = true;
                        // SAFETY: shutdown of the caller's socket, open while the caller is in
                        // `run` (it disarms, under this lock, before it returns).
                        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                        a
                    } else {
                        self.cv
                            .wait_timeout(a, at - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                }
            };
        }
    }
}

impl Watchdog {
    /// Starts the thread (`<name>-deadline`); `None` if it could not start.
    pub(crate) fn start(name: &str) -> Option<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = seccomp::spawn(
            format!("{name}-deadline"),
            crate::vhost_user::relay_filter(),
            move || s.watch(),
        )
        .ok()?;
        Some(Watchdog {
            shared,
            calls: Mutex::new(()),
            thread: Some(thread),
        })
    }

    /// As [`within`]: `f` with socket `fd` shut down if it takes longer than `wait`; what `f`
    /// returned and whether the deadline fired.
    pub(crate) fn run<T>(&self, fd: RawFd, wait: Duration, f: impl FnOnce() -> T) -> (T, bool) {
        let _one = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut a = self.shared.lock();
            a.at = Some((fd, Instant::now() + wait));
            a.fired = false;
            self.shared.cv.notify_all();
        }
        let r = f();
        let mut a = self.shared.lock();
        a.at = None;
        (r, std::mem::take(&mut a.fired))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn a_read_that_would_wait_forever_ends_at_the_deadline() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        // As the vhost crate does: a timed-out read is read again.
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let fd = a.as_raw_fd();
        let t = Instant::now();
        let (n, fired) = within("test", fd, Duration::from_millis(300), || loop {
            let mut buf = [0u8; 8];
            match a.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break r.ok(),
            }
        });
        assert!(fired);
        assert_eq!(n, Some(0), "the end of the stream");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // A quick answer: no deadline, the socket stays usable.
        let (c, _d) = UnixStream::pair().unwrap();
        let (v, fired) = within("test", c.as_raw_fd(), Duration::from_secs(5), || 7);
        assert_eq!((v, fired), (7, false));
        use std::io::Write;
        assert!((&c).write_all(b"x").is_ok());
    }

    #[test]
    fn a_watchdog_serves_many_calls_and_fires_on_a_stuck_one() {
        let w = Watchdog::start("test").unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        for i in 0..100 {
            assert_eq!(
                w.run(c.as_raw_fd(), Duration::from_secs(5), || i),
                (i, false)
            );
        }
        let (mut a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let fd = a.as_raw_fd();
        let t = Instant::now();
        let (n, fired) = w.run(fd, Duration::from_millis(300), || loop {
            let mut buf = [0u8; 8];
            match a.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => break r.ok(),
            }
        });
        assert!(fired);
        assert_eq!(n, Some(0));
        assert!(t.elapsed() < Duration::from_secs(5));
        // The next call is not taken as late.
        assert_eq!(
            w.run(c.as_raw_fd(), Duration::from_secs(5), || 1),
            (1, false)
        );
    }
}
