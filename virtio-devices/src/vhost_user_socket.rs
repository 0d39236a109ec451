//! The socket of a vhost-user backend. Every device connects to its backend's socket as a
//! client (retrying for 5 s while the file is missing or nobody listens: the backend may still
//! be starting); a vhost-user-net device may instead be the server (`vhost_mode=server`),
//! listening on it and waiting, a bounded time, for the backend to connect. Either way the
//! stream gets read and write timeouts, so a backend that stops answering fails the request
//! instead of holding the VMM's thread.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a client keeps trying to connect to a backend that is not there (yet).
pub(crate) const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How long a server waits for its backend to connect.
pub(crate) const ACCEPT_WAIT: Duration = Duration::from_secs(30);
/// How long one request may wait for the backend's answer.
pub(crate) const REPLY_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VhostSocketError {
    #[error("cannot connect to {0}: {1} (tried for {2} s)")]
    Connect(String, #[source] io::Error, u64),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, #[source] io::Error),
    #[error("{0} exists and is not a socket")]
    NotASocket(String),
    #[error("{0}: a process listens there already")]
    InUse(String),
    #[error("no backend connected to {0} within {1} s")]
    NoBackend(String, u64),
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
}

/// The connected stream, with the reply timeouts set.
pub(crate) fn open(path: &Path, server: bool) -> Result<UnixStream, VhostSocketError> {
    let stream = if server {
        accept(path, ACCEPT_WAIT)?
    } else {
        connect(path, CONNECT_WAIT)?
    };
    let name = || path.display().to_string();
    stream
        .set_read_timeout(Some(REPLY_WAIT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_WAIT)))
        .map_err(|e| VhostSocketError::Io(name(), e))?;
    Ok(stream)
}

/// Connects to `path`, trying again every 100 ms for `wait` while nobody listens there.
fn connect(path: &Path, wait: Duration) -> Result<UnixStream, VhostSocketError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if start.elapsed() < wait
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(VhostSocketError::Connect(
                    path.display().to_string(),
                    e,
                    wait.as_secs(),
                ))
            }
        }
    }
}

/// Listens on `path` and takes the first connection within `wait`. A socket file nobody
/// listens on (left by an earlier run) is replaced; the file goes once the backend is in.
fn accept(path: &Path, wait: Duration) -> Result<UnixStream, VhostSocketError> {
    let name = || path.display().to_string();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VhostSocketError::NotASocket(name()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VhostSocketError::InUse(name()));
        }
        std::fs::remove_file(path).map_err(|e| VhostSocketError::Listen(name(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| VhostSocketError::Listen(name(), e))?;
    let got = wait_readable(&listener, wait);
    // Nobody else may connect: the file goes whatever happened.
    let _ = std::fs::remove_file(path);
    match got {
        Ok(true) => {}
        Ok(false) => return Err(VhostSocketError::NoBackend(name(), wait.as_secs())),
        Err(e) => return Err(VhostSocketError::Io(name(), e)),
    }
    let (stream, _) = listener
        .accept()
        .map_err(|e| VhostSocketError::Io(name(), e))?;
    stream
        .set_nonblocking(false)
        .map_err(|e| VhostSocketError::Io(name(), e))?;
    Ok(stream)
}

/// Whether `listener` has a connection waiting within `wait`.
fn wait_readable(listener: &UnixListener, wait: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll reads and writes the one pollfd we own for the length of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n > 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_takes_its_backend_and_removes_the_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let p = path.clone();
        let backend = std::thread::spawn(move || connect(&p, Duration::from_secs(5)).unwrap());
        let s = accept(&path, Duration::from_secs(5)).unwrap();
        let _b = backend.join().unwrap();
        assert!(!path.exists(), "the socket file is left behind");
        drop(s);
    }

    #[test]
    fn a_server_without_a_backend_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        let e = accept(&path, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().starts_with("no backend connected to"), "{e}");
        assert!(!path.exists());
        // A file that is no socket is not replaced.
        std::fs::write(&path, b"x").unwrap();
        let e = accept(&path, Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_stale_socket_is_replaced_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vu.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let e = accept(&path, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VhostSocketError::NoBackend(..)), "{e}");
        let live = UnixListener::bind(&path).unwrap();
        let e = accept(&path, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, VhostSocketError::InUse(..)), "{e}");
        drop(live);
    }

    #[test]
    fn a_client_gives_up_on_a_missing_backend() {
        let t = Instant::now();
        let e = connect(
            Path::new("/nonexistent/vu.sock"),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to /nonexistent/vu.sock"),
            "{e}"
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
    }
}
