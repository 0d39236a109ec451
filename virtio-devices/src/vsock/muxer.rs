//! The host side of hybrid vsock, as the original's: a Unix socket at `path` that host programs
//! connect to and open a guest port with `CONNECT <port>\n` (answered `OK <host port>\n` once the
//! guest accepted), and guest connections to host port P made to a listener at `<path>_P`.
//!
//! Everything host-side is non-blocking and watched by one epoll set of the muxer's own, whose
//! fd the device worker watches: the listener, host connections still sending their CONNECT
//! line, a timer that closes the slow ones, and every connection's stream (only for what the
//! connection can take: a stream is not read while its backlog for the guest is full, and not
//! watched at all while it has nothing to do, so level-triggered epoll never spins).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use log::{debug, info, warn};
use virtio_queue::desc::split::Descriptor;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, State, StreamEvent};
use super::packet::*;
use crate::vring::VirtQueue;

/// Most connections at once (as the original).
pub const MAX_CONNECTIONS: usize = 1023;
/// Most host connections still sending their CONNECT line; past it the oldest is closed.
const MAX_HANDSHAKES: usize = 64;
/// How long a host connection may take to send its CONNECT line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest CONNECT line ("CONNECT 4294967295\n" is 19 bytes).
const MAX_CONNECT_LINE: usize = 32;
/// Most RSTs waiting for receive buffers; past it new ones are dropped (the guest's
/// connection times out instead).
const MAX_RSTS: usize = 1024;
/// Host-side ports of host-initiated connections: from 2^30 up, as the original.
const LOCAL_PORT_BASE: u32 = 1 << 30;

const LISTENER: u64 = 0;
const TIMER: u64 = 1;

/// (host-side port, guest port).
pub type Key = (u32, u32);

struct Entry {
    conn: Connection,
    token: u64,
    /// What the stream is registered for (None: not in the epoll set).
    watched: Option<(bool, bool)>,
    /// Host-initiated: its port is ours to free.
    local: bool,
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

pub struct Muxer {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<Key, Entry>,
    by_token: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    next_token: u64,
    rsts: VecDeque<Key>,
    rx_ready: VecDeque<Key>,
    in_rx: HashSet<Key>,
    local_ports: HashSet<u32>,
    last_local_port: u32,
    scratch: Vec<u8>,
    descs: Vec<Descriptor>,
}

/// Binds `path`; a socket file nobody listens on (left by a VMM that died) is replaced.
fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(e);
            }
            let is_socket = std::fs::symlink_metadata(path).map(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            });
            if !matches!(is_socket, Ok(true)) {
                return Err(e);
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        r => r,
    }
}

/// A non-blocking connect to `path`: a listener whose backlog is full refuses at once
/// instead of blocking the worker.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is a valid value of the type.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un and the length is its size.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The port of a `CONNECT <port>` line (the command in any case, as the original).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let (cmd, port) = s.trim_end_matches('\r').split_once(' ')?;
    if !cmd.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse().ok()
}

impl Muxer {
    pub fn new(cid: u64, path: &Path) -> std::io::Result<Muxer> {
        let listener = bind(path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        Ok(Muxer {
            cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            handshakes: HashMap::new(),
            next_token: 2,
            rsts: VecDeque::new(),
            rx_ready: VecDeque::new(),
            in_rx: HashSet::new(),
            local_ports: HashSet::new(),
            last_local_port: LOCAL_PORT_BASE - 1,
            scratch: vec![0; 64 * 1024],
            descs: Vec::new(),
        })
    }

    /// The fd the device worker waits on.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Drops every connection and handshake (a device reset: the guest forgot them).
    pub fn clear(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k, false);
        }
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.rsts.clear();
        self.rx_ready.clear();
        self.in_rx.clear();
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1).max(2);
        self.next_token
    }

    /// Removes a connection; with `rst`, the guest is sent an RST for it.
    fn remove(&mut self, key: Key, rst: bool) {
        if let Some(e) = self.conns.remove(&key) {
            if e.watched.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    e.conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.by_token.remove(&e.token);
            if e.local {
                self.local_ports.remove(&key.0);
            }
        }
        if rst {
            self.push_rst(key);
        }
    }

    fn push_rst(&mut self, key: Key) {
        if self.rsts.len() < MAX_RSTS {
            self.rsts.push_back(key);
        } else {
            debug!("vsock: too many RSTs waiting; one dropped");
        }
    }

    /// After anything happened to `key`: its epoll interest, its place in the receive order,
    /// and whether it is over.
    fn update(&mut self, key: Key) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.state == State::Established && e.conn.finished() {
            self.remove(key, true);
            return;
        }
        e.conn.want_credit();
        let (r, w) = e.conn.interest();
        let want = (r || w).then_some((r, w));
        if want != e.watched {
            let fd = e.conn.stream.as_raw_fd();
            let mut set = EventSet::empty();
            if r {
                set |= EventSet::IN;
            }
            if w {
                set |= EventSet::OUT;
            }
            let res = match (e.watched, want) {
                (Some(_), None) => {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                }
                (None, Some(_)) => {
                    self.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(set, e.token))
                }
                _ => self
                    .epoll
                    .ctl(ControlOperation::Modify, fd, EpollEvent::new(set, e.token)),
            };
            if let Err(err) = res {
                warn!("vsock: cannot watch a connection's stream: {err}");
                self.remove(key, true);
                return;
            }
            e.watched = want;
        }
        if e.conn.has_rx() && self.in_rx.insert(key) {
            self.rx_ready.push_back(key);
        }
    }

    fn add(&mut self, key: Key, conn: Connection, local: bool) {
        let token = self.token();
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Entry {
                conn,
                token,
                watched: None,
                local,
            },
        );
        self.update(key);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            self.last_local_port = (self.last_local_port.wrapping_add(1) & !(1 << 31)) | (1 << 30);
            if self.local_ports.insert(self.last_local_port) {
                return self.last_local_port;
            }
        }
    }

    /// Whether anything waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    /// A packet from the guest (its payload read already).
    pub fn guest_packet(&mut self, h: &Header, payload: &[u8]) {
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            debug!(
                "vsock: packet from cid {} to cid {} dropped",
                h.src_cid, h.dst_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.push_rst(key);
            }
            return;
        }
        let Some(e) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.connect_to_host(key, h),
                OP_RST => {}
                _ => self.push_rst(key),
            }
            return;
        };
        let c = &mut e.conn;
        c.peer_credit(h.buf_alloc, h.fwd_cnt);
        let ok = match (c.state, h.op) {
            (State::Connecting, OP_RESPONSE) => {
                c.state = State::Established;
                c.send_ok(key.0);
                c.flush() == StreamEvent::Nothing
            }
            (State::Connecting, OP_CREDIT_UPDATE) => true,
            (State::Established, OP_RW) => {
                c.guest_data(payload) && c.flush() == StreamEvent::Nothing
            }
            (State::Established, OP_CREDIT_UPDATE) => true,
            (State::Established, OP_CREDIT_REQUEST) => {
                c.pending.credit_update = true;
                true
            }
            (State::Established, OP_SHUTDOWN) => {
                c.peer_shutdown |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                c.flush() == StreamEvent::Nothing
            }
            (_, OP_RST) => {
                self.remove(key, false);
                return;
            }
            // A duplicate request, a response to nothing, an unknown op: a protocol violation.
            _ => false,
        };
        if ok {
            self.update(key);
        } else {
            debug!("vsock: connection {key:?} reset (op {})", h.op);
            self.remove(key, true);
        }
    }

    /// A packet whose length is wrong: its connection (if any) is reset.
    pub fn bad_packet(&mut self, h: &Header) {
        if h.src_cid == self.cid && h.dst_cid == HOST_CID && h.op != OP_RST {
            self.remove((h.dst_port, h.src_port), true);
        }
    }

    /// The guest connects to host port `key.0`: the listener at `<path>_<port>`.
    fn connect_to_host(&mut self, key: Key, h: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            info!("vsock: connection limit ({MAX_CONNECTIONS}) reached");
            self.push_rst(key);
            return;
        }
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{}", key.0));
        match connect_nonblocking(Path::new(&p)) {
            Ok(stream) => {
                let mut c = Connection::new(stream, State::Established);
                c.peer_credit(h.buf_alloc, h.fwd_cnt);
                c.pending.response = true;
                self.add(key, c, false);
            }
            Err(e) => {
                debug!("vsock: guest connection to {p:?}: {e}");
                self.push_rst(key);
            }
        }
    }

    /// Serves what the muxer's epoll set reports (without waiting).
    pub fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != ErrorKind::Interrupted {
                    warn!("vsock: epoll: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => self.accept(),
                TIMER => {
                    let _ = self.timer.wait();
                    self.expire_handshakes();
                }
                t if self.handshakes.contains_key(&t) => self.handshake(t),
                t => {
                    if let Some(&key) = self.by_token.get(&t) {
                        self.stream_event(key, ev.event_set());
                    }
                }
            }
        }
        self.arm_timer();
    }

    fn stream_event(&mut self, key: Key, set: EventSet) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        let (r, w) = e.watched.unwrap_or_default();
        let trouble = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
        let mut broken = false;
        if r && (set.contains(EventSet::IN) || trouble) {
            broken |= e.conn.fill(&mut self.scratch) == StreamEvent::Broken;
        }
        if w && (set.contains(EventSet::OUT) || trouble) {
            broken |= e.conn.flush() == StreamEvent::Broken;
        }
        if broken {
            self.remove(key, true);
        } else {
            self.update(key);
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.handshakes.len() >= MAX_HANDSHAKES {
                if let Some(oldest) = self
                    .handshakes
                    .iter()
                    .min_by_key(|(_, h)| h.since)
                    .map(|(t, _)| *t)
                {
                    self.drop_handshake(oldest);
                }
            }
            let t = self.token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, t),
                )
                .is_ok()
            {
                self.handshakes.insert(
                    t,
                    Handshake {
                        stream,
                        line: Vec::new(),
                        since: Instant::now(),
                    },
                );
            }
        }
    }

    fn drop_handshake(&mut self, t: u64) {
        if let Some(h) = self.handshakes.remove(&t) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn arm_timer(&mut self) {
        let want = !self.handshakes.is_empty();
        if want != self.timer_armed {
            let r = if want {
                self.timer
                    .reset(Duration::from_secs(1), Some(Duration::from_secs(1)))
            } else {
                self.timer.clear()
            };
            if r.is_ok() {
                self.timer_armed = want;
            }
        }
    }

    fn expire_handshakes(&mut self) {
        let old: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= HANDSHAKE_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in old {
            debug!("vsock: a host connection sent no CONNECT line in time");
            self.drop_handshake(t);
        }
    }

    /// Reads the CONNECT line of handshake `t`, never past its newline (what follows is the
    /// connection's data): peeks, and takes only the bytes up to the newline.
    fn handshake(&mut self, t: u64) {
        let Some(h) = self.handshakes.get_mut(&t) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - h.line.len();
        // SAFETY: recv into a buffer of at least `room` bytes.
        let n = unsafe {
            libc::recv(
                h.stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                room,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                return;
            }
            self.drop_handshake(t);
            return;
        }
        let n = n as usize;
        if n == 0 {
            self.drop_handshake(t);
            return;
        }
        let nl = buf[..n].iter().position(|&b| b == b'\n');
        let take = nl.map_or(n, |i| i + 1);
        if h.stream.read_exact(&mut buf[..take]).is_err() {
            self.drop_handshake(t);
            return;
        }
        h.line.extend_from_slice(&buf[..take]);
        if nl.is_none() {
            if h.line.len() >= MAX_CONNECT_LINE {
                debug!("vsock: a host connection sent no CONNECT line");
                self.drop_handshake(t);
            }
            return;
        }
        let port = parse_connect(&h.line[..h.line.len() - 1]);
        let Some(h) = self.handshakes.remove(&t) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            debug!(
                "vsock: bad CONNECT line {:?}",
                String::from_utf8_lossy(&h.line)
            );
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            info!("vsock: connection limit ({MAX_CONNECTIONS}) reached");
            return;
        }
        let local = self.allocate_local_port();
        let mut c = Connection::new(h.stream, State::Connecting);
        c.pending.request = true;
        self.add((local, port), c, true);
    }

    /// Fills receive buffers of `q` with what waits for the guest. Returns whether any buffer
    /// was used.
    pub fn fill_rx(&mut self, q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let mut used = false;
        let mut descs = std::mem::take(&mut self.descs);
        let r = loop {
            if !self.has_rx() {
                break Ok(used);
            }
            let head = match q.pop_one() {
                Ok(Some(h)) => h,
                Ok(None) => match q.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break Ok(used),
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e),
            };
            q.chain(head, &mut descs);
            let room = rx_room(&descs);
            let len = if room < HDR_LEN {
                debug!("vsock: receive buffer of {room} bytes skipped");
                Some(0)
            } else {
                self.next_packet(mem, &descs, room)
            };
            match len {
                Some(len) => {
                    if let Err(e) = q.add_used(head, len) {
                        break Err(e);
                    }
                    used = true;
                }
                None => {
                    q.unpop();
                    break Ok(used);
                }
            }
        };
        self.descs = descs;
        r
    }

    fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            type_: TYPE_STREAM,
            op,
            ..Header::default()
        }
    }

    /// Writes the next packet for the guest into `chain`: Some(bytes written), or None when
    /// nothing waits after all.
    fn next_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &[Descriptor],
        room: usize,
    ) -> Option<u32> {
        if let Some(key) = self.rsts.pop_front() {
            let h = self.header(key, OP_RST);
            return Some(write_rx(mem, chain, &h, [&[], &[]]).unwrap_or(0));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            self.in_rx.remove(&key);
            let mut h = self.header(key, 0);
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            let c = &mut e.conn;
            if !c.has_rx() {
                continue;
            }
            let mut data_len = 0usize;
            if c.pending.response {
                c.pending.response = false;
                h.op = OP_RESPONSE;
            } else if c.pending.request {
                c.pending.request = false;
                h.op = OP_REQUEST;
            } else if c.state == State::Established
                && !c.to_guest.is_empty()
                && c.peer_credit_left() > 0
            {
                data_len = c.take_for_guest((room - HDR_LEN).min(MAX_PKT_PAYLOAD));
                h.op = OP_RW;
                h.len = data_len as u32;
            } else if c.eof_due() {
                c.eof_sent = true;
                h.op = OP_SHUTDOWN;
                h.flags = SHUTDOWN_SEND;
            } else if c.pending.credit_update {
                h.op = OP_CREDIT_UPDATE;
            } else {
                c.pending.credit_request = false;
                c.credit_asked = true;
                h.op = OP_CREDIT_REQUEST;
            }
            (h.buf_alloc, h.fwd_cnt) = c.our_credit();
            let written = {
                let (a, b) = c.to_guest.as_slices();
                let a1 = &a[..data_len.min(a.len())];
                let b1 = &b[..data_len - a1.len()];
                write_rx(mem, chain, &h, [a1, b1])
            };
            c.to_guest.drain(..data_len);
            match written {
                Some(_) => self.update(key),
                // Data would be lost: the connection cannot go on.
                None => {
                    self.remove(key, true);
                    return Some(0);
                }
            }
            return written;
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"connect 52"), Some(52));
        assert_eq!(parse_connect(b"Connect 7\r"), Some(7));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"LISTEN 5"), None);
        assert_eq!(parse_connect(b"\xff\xfe 5"), None);
    }
}
