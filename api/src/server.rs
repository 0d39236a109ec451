//! The API server, with no thread of its own: the listening socket and its connections sit in
//! an epoll set of their own, whose fd the VMM's control loop watches. When it is readable the
//! loop calls `serve`, which accepts, reads, and answers every complete request at once through
//! the loop's handler, so one request wakes one thread, and its answer leaves in one write.
//!
//! A client cannot stall the VMM: sockets are non-blocking, a partial request waits in its
//! connection's buffer, an answer the client does not read waits there too (the connection is
//! then not read until it drains), and past `MAX_CONNECTIONS` the connection idle the longest
//! is closed.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::http::{self, Parsed, Response};
use crate::routes;
use crate::types::{ApiRequest, ApiResult};

/// The most connections served at once; past it, the one idle the longest is closed.
pub const MAX_CONNECTIONS: usize = 128;
/// How long `Drop` waits for answers still on their way out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const LISTENER: u64 = u64::MAX;
const READ_CHUNK: usize = 16 << 10;

struct Conn {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Close once `output` is out.
    closing: bool,
    /// `100 Continue` already sent for the request being read.
    continued: bool,
    last_active: Instant,
    /// The events the connection is registered for.
    events: EventSet,
    /// Descriptors received with the request being read.
    fds: Vec<std::os::fd::OwnedFd>,
}

pub struct ApiServer {
    epoll: Epoll,
    listener: UnixListener,
    conns: Vec<Option<Conn>>,
    /// The socket file, removed on drop (`None` for a socket passed by fd).
    path: Option<PathBuf>,
}

impl AsRawFd for ApiServer {
    /// The fd to watch for readability: the server's epoll set.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl ApiServer {
    /// Serves on `listener` (made non-blocking); `path` is removed when the server is dropped.
    pub fn new(listener: UnixListener, path: Option<PathBuf>) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(ApiServer {
            epoll,
            listener,
            conns: Vec::new(),
            path,
        })
    }

    /// The socket file this server removes when dropped (none for a socket passed by fd).
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Handles whatever is ready, without waiting: new connections, requests (each answered
    /// through `handle`), answers waiting for room in their socket. Returns how many requests
    /// it answered.
    pub fn serve(&mut self, handle: &mut dyn FnMut(ApiRequest) -> ApiResult) -> usize {
        let mut ready = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut ready) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("API server: epoll_wait failed: {e}");
                }
                return 0;
            }
        };
        let mut answered = 0;
        for ev in &ready[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.accept();
            } else {
                answered += self.service(token as usize, handle);
            }
        }
        answered
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of fds, most likely; the listener stays readable and is tried again.
                    warn!("API socket: accept failed: {e}");
                    return;
                }
            };
            if let Err(e) = stream.set_nonblocking(true) {
                warn!("API socket: {e}");
                continue;
            }
            if self.conns.iter().flatten().count() >= MAX_CONNECTIONS {
                self.evict_idlest();
            }
            let slot = match self.conns.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, slot as u64),
            ) {
                warn!("API socket: cannot watch a connection: {e}");
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                closing: false,
                continued: false,
                last_active: Instant::now(),
                events: EventSet::IN,
                fds: Vec::new(),
            });
        }
    }

    fn evict_idlest(&mut self) {
        let idlest = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c.last_active)))
            .min_by_key(|(_, t)| *t)
            .map(|(i, _)| i);
        if let Some(i) = idlest {
            debug!("API socket: {MAX_CONNECTIONS} connections open, closing the idlest");
            self.close(i);
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Reads what the connection has, answers its complete requests, writes what it can.
    /// Returns how many requests it answered.
    fn service(&mut self, slot: usize, handle: &mut dyn FnMut(ApiRequest) -> ApiResult) -> usize {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return 0;
        };
        conn.last_active = Instant::now();
        let mut open = true;
        let mut answered = 0;
        if conn.output.is_empty() && !conn.closing {
            (open, answered) = conn.read_and_answer(handle);
        }
        if open {
            open = conn.flush();
        }
        if !open || (conn.closing && conn.output.is_empty()) {
            self.close(slot);
            return answered;
        }
        // Wait for room to write while an answer is pending; read otherwise.
        let want = if conn.output.is_empty() {
            EventSet::IN
        } else {
            EventSet::OUT
        };
        if want != conn.events {
            conn.events = want;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(want, slot as u64),
            ) {
                warn!("API socket: {e}");
                self.close(slot);
            }
        }
        answered
    }
}

impl Conn {
    /// Returns false when the connection is finished (the client hung up, or it failed), and
    /// how many requests it answered.
    fn read_and_answer(
        &mut self,
        handle: &mut dyn FnMut(ApiRequest) -> ApiResult,
    ) -> (bool, usize) {
        let mut answered = 0;
        let mut hung_up = false;
        loop {
            let len = self.input.len();
            self.input.resize(len + READ_CHUNK, 0);
            match recv_with_fds(&self.stream, &mut self.input[len..], &mut self.fds) {
                Ok(0) => {
                    self.input.truncate(len);
                    hung_up = true;
                    break;
                }
                Ok(n) => {
                    self.input.truncate(len + n);
                    if n < READ_CHUNK || self.input.len() > http::MAX_HEAD + http::MAX_BODY {
                        break;
                    }
                }
                Err(e) => {
                    self.input.truncate(len);
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => {
                            debug!("API connection: {e}");
                            return (false, 0);
                        }
                    }
                }
            }
        }
        // Every complete request in the buffer, in order.
        let mut used = 0;
        while used < self.input.len() && !self.closing {
            match http::parse(&self.input[used..]) {
                Parsed::Partial { continue_now } => {
                    if continue_now && !self.continued {
                        self.continued = true;
                        Response::continue_100().encode(&mut self.output);
                    }
                    break;
                }
                Parsed::Complete { request, len } => {
                    used += len;
                    self.continued = false;
                    answered += 1;
                    // Descriptors that came with the request (SCM_RIGHTS, as the original's
                    // ch-remote sends a restore's net_fds) go with it; unused ones are closed.
                    let fds = std::mem::take(&mut self.fds);
                    let mut resp = routes::answer(&request, fds, handle);
                    resp.close = request.close;
                    self.closing = request.close;
                    resp.encode(&mut self.output);
                }
                Parsed::Invalid(why) => {
                    debug!("API connection: {why}");
                    let mut resp = routes::error_chain(400, &["Bad Request", &why]);
                    resp.close = true;
                    resp.encode(&mut self.output);
                    self.closing = true;
                }
            }
        }
        self.input.drain(..used);
        if hung_up {
            // Answers still go out to a client that only shut down its sending side.
            self.closing = true;
        }
        (true, answered)
    }

    /// Writes what it can of the pending answers; false if the connection failed.
    fn flush(&mut self) -> bool {
        let mut done = 0;
        while done < self.output.len() {
            match self.stream.write(&self.output[done..]) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("API connection: {e}");
                    return false;
                }
            }
        }
        self.output.drain(..done);
        true
    }
}

impl Drop for ApiServer {
    /// Lets answers still on their way out reach their clients (a second at most: the answer
    /// to `vmm.shutdown` is one of them), then removes the socket file.
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for conn in self.conns.iter_mut().flatten() {
            let left = deadline.saturating_duration_since(Instant::now());
            if conn.output.is_empty() || left.is_zero() {
                continue;
            }
            if conn.stream.set_nonblocking(false).is_ok()
                && conn.stream.set_write_timeout(Some(left)).is_ok()
            {
                let _ = conn.stream.write_all(&conn.output);
            }
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Most descriptors taken with one read.
const MAX_FDS: usize = 64;

/// `read` that also takes the descriptors sent with the bytes (SCM_RIGHTS), close-on-exec,
/// appending them to `fds` (at most [`MAX_FDS`] held; more are closed).
fn recv_with_fds(
    stream: &std::os::unix::net::UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use std::os::fd::FromRawFd;
    // Room for the control message: a header and MAX_FDS ints, 8-byte aligned.
    let mut cmsg = [0u64; 2 + MAX_FDS / 2];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all zeros is valid before we fill it in.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: the iovec and control buffers live across the call and their lengths are theirs.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote into our buffer, with its macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let fd = std::os::fd::OwnedFd::from_raw_fd(data.add(i).read_unaligned());
                    if fds.len() < MAX_FDS {
                        fds.push(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    use super::*;
    use crate::types::{ApiResponse, VmmPingResponse};

    /// A server on a socket in a directory of its own, removed with the `TempDir`.
    fn server(name: &str) -> (ApiServer, PathBuf, tempfile::TempDir) {
        let dir = tempfile::Builder::new()
            .prefix(&format!("api-server-{name}-"))
            .tempdir()
            .unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (
            ApiServer::new(listener, Some(path.clone())).unwrap(),
            path,
            dir,
        )
    }

    fn pong(_: ApiRequest) -> ApiResult {
        Ok(ApiResponse::Ping(VmmPingResponse {
            build_version: "b".into(),
            version: "v".into(),
            pid: 1,
            features: Vec::new(),
        }))
    }

    /// Serves until `done` says so (a few seconds at most).
    fn serve_until(s: &mut ApiServer, mut done: impl FnMut(&ApiServer) -> bool) {
        for _ in 0..5000 {
            s.serve(&mut pong);
            if done(s) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the server did not get there");
    }

    const PING: &[u8] = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";

    #[test]
    fn past_the_limit_the_idlest_connection_goes() {
        let (mut s, path, _dir) = server("evict");
        let mut first = UnixStream::connect(&path).unwrap();
        let open = |s: &ApiServer| s.conns.iter().flatten().count();
        serve_until(&mut s, |s| open(s) == 1);
        let _others: Vec<UnixStream> = (1..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        serve_until(&mut s, |s| open(s) == MAX_CONNECTIONS);
        let mut last = UnixStream::connect(&path).unwrap();
        first.set_nonblocking(true).unwrap();
        // The first connection, idle the longest, is closed to make room.
        serve_until(&mut s, |_| {
            let mut b = [0u8; 1];
            matches!(first.read(&mut b), Ok(0))
        });
        assert_eq!(open(&s), MAX_CONNECTIONS);
        last.write_all(PING).unwrap();
        last.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        serve_until(&mut s, |_| {
            let mut b = [0u8; 512];
            if let Ok(n) = last.read(&mut b) {
                got.extend_from_slice(&b[..n]);
            }
            got.starts_with(b"HTTP/1.1 200 ")
        });
        drop(s);
        assert!(!path.exists(), "the socket file goes with the server");
    }

    #[test]
    fn a_client_that_does_not_read_stalls_only_itself() {
        let (mut s, path, _dir) = server("stall");
        let mut greedy = UnixStream::connect(&path).unwrap();
        greedy.set_nonblocking(true).unwrap();
        // Pipelined requests whose answers it never reads, until its socket is full.
        let mut sent = 0usize;
        for _ in 0..200_000 {
            match greedy.write(PING) {
                Ok(n) => sent += n,
                Err(_) => {
                    s.serve(&mut pong);
                }
            }
            if s.conns.iter().flatten().any(|c| !c.output.is_empty()) {
                break;
            }
        }
        assert!(
            s.conns.iter().flatten().any(|c| !c.output.is_empty()),
            "the answers never backed up ({sent} bytes sent)"
        );
        // Another client is still served at once.
        let mut other = UnixStream::connect(&path).unwrap();
        other.write_all(PING).unwrap();
        other.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        serve_until(&mut s, |_| {
            let mut b = [0u8; 512];
            if let Ok(n) = other.read(&mut b) {
                got.extend_from_slice(&b[..n]);
            }
            got.starts_with(b"HTTP/1.1 200 ")
        });
        // The greedy one gets every answer once it reads.
        let requests = sent / PING.len();
        let mut answers = 0usize;
        let mut tail = Vec::new();
        serve_until(&mut s, |_| {
            let mut b = [0u8; 65536];
            while let Ok(n) = greedy.read(&mut b) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&b[..n]);
            }
            let text = String::from_utf8_lossy(&tail);
            answers = text.matches("HTTP/1.1 200 ").count();
            answers >= requests
        });
        assert_eq!(answers, requests);
    }

    /// Descriptors passed beside a request (ch-remote restore's net_fds) are dropped by the
    /// server, which reads no SCM_RIGHTS, and the request is answered as any other.
    #[test]
    fn a_request_with_descriptors_is_answered() {
        use std::os::unix::fs::FileTypeExt;
        let (mut s, path, _dir) = server("fds");
        let client = std::thread::spawn(move || {
            let mut c = crate::client::Client::connect(&path).unwrap();
            let (r, w) = std::io::pipe().unwrap();
            let fds = [r.as_raw_fd(), w.as_raw_fd()];
            let body = br#"{"source_url": "file:///s", "net_fds": [{"id": "net0", "num_fds": 2}]}"#;
            let first = c
                .call_with_fds(http::Method::Put, "vm.restore", Some(body), &fds)
                .unwrap();
            let second = c.call(http::Method::Get, "vmm.ping", None).unwrap();
            let bad = c.call_with_fds(http::Method::Get, "vmm.ping", None, &[9999]);
            (first.status, second.status, bad.map(|r| r.status))
        });
        let mut restored = None;
        let mut handle = |req: ApiRequest| match req {
            ApiRequest::VmRestore(c) => {
                restored = Some(c);
                Ok(ApiResponse::Empty)
            }
            other => pong(other),
        };
        for _ in 0..5000 {
            s.serve(&mut handle);
            if client.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (first, second, bad) = client.join().unwrap();
        assert_eq!((first, second), (204, 200));
        let e = bad.unwrap_err();
        assert!(
            matches!(e, crate::client::ClientError::SendFds { .. }),
            "{e}"
        );
        let c = restored.expect("the VMM was asked");
        let nets = c.net_fds.unwrap();
        assert_eq!((nets[0].id.as_str(), nets[0].num_fds), ("net0", 2));
        // The two descriptors arrived, as new descriptors of this process (a pipe's ends).
        let fds = nets[0]
            .fds
            .clone()
            .expect("the descriptors came with the request");
        assert_eq!(fds.len(), 2);
        for fd in fds {
            // SAFETY: the descriptor was handed to us and is closed here, once.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            assert!(f.metadata().unwrap().file_type().is_fifo());
        }
    }
}
