//! A migration's connections beyond the first, as the original makes them: the source may open
//! more connections to the destination's address after Config, each announcing its [`Role`] in
//! two bytes — `connections=N` (tcp: only) sends pre-copy memory over N of them at once, and
//! postcopy asks for pages over one. The destination keeps its listener until State for them:
//! [`Acceptor`] takes each, reads its role, and receives memory on a thread per memory
//! connection; the source's side is [`Senders`].

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use log::{debug, info, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::{encode_ranges, read_ranges, Command, Request, Response, Role, Stream};
use super::{dirty, postcopy, Progress, SENDING_EVERY};
use crate::snapshot::MemoryRange;
use crate::uffd::OnDemand;

/// The most connections a send may open besides its first (the original's bound).
pub const MAX_CONNECTIONS: u64 = 128;
/// How long a new connection may take to say its role.
const ROLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most ranges in one Memory request.
pub const MAX_RANGES: usize = 1 << 20;
/// The most bytes one job of a pass carries over one connection: small enough that a pass of
/// a few hundred MiB spreads over several connections, large enough that the answer each job
/// waits for costs little.
const JOB: u64 = 16 << 20;

/// Where the destination listens: the source's first connection and any later one come here.
/// A Unix socket's file is removed when the listener goes.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    /// With the TLS configuration where `tls_dir` was given.
    Tcp(std::net::TcpListener, Option<Arc<rustls::ServerConfig>>),
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.unlink();
    }
}

impl Listener {
    /// Listens on `url` (`unix:<path>`, the file replaced; `tcp:<host>:<port>`, in TLS with
    /// `tls_dir`).
    pub fn bind(url: &str, tls_dir: Option<&std::path::Path>) -> Result<Self, String> {
        let fail = |e: std::io::Error| format!("cannot listen on {url}: {e}");
        match url.split_once(':') {
            Some(("unix", path)) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(fail)?;
                Ok(Listener::Unix(l, PathBuf::from(path)))
            }
            Some(("tcp", addr)) => {
                let tls = tls_dir
                    .map(super::tls::TlsStream::server_config)
                    .transpose()
                    .map_err(|e| format!("{url}: {e}"))?;
                let l = std::net::TcpListener::bind(addr).map_err(fail)?;
                Ok(Listener::Tcp(l, tls))
            }
            _ => Err(format!("not a unix: or tcp: URL: {url}")),
        }
    }

    /// Removes a Unix socket's file (once). Landlock may refuse it (the file is left, as the
    /// original leaves it): a warning.
    fn unlink(&mut self) {
        if let Listener::Unix(_, path) = self {
            if !path.as_os_str().is_empty() {
                if let Err(e) = std::fs::remove_file(&*path) {
                    warn!("cannot remove {}: {e}", path.display());
                }
                *path = PathBuf::new();
            }
        }
    }

    fn fd(&self) -> i32 {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l, _) => l.as_raw_fd(),
        }
    }

    /// The next connection, or `None` once `stop` is readable.
    pub fn accept(&self, stop: i32) -> Result<Option<Stream>, String> {
        if crate::poll::fd_or_stop(self.fd(), stop, -1) != crate::poll::Ready::Fd {
            return Ok(None);
        }
        let s = match self {
            Listener::Unix(l, path) => {
                let (s, _) = l
                    .accept()
                    .map_err(|e| format!("cannot accept on unix:{}: {e}", path.display()))?;
                Stream::Unix(s)
            }
            Listener::Tcp(l, tls) => {
                let (s, _) = l.accept().map_err(|e| format!("cannot accept: {e}"))?;
                let _ = s.set_nodelay(true);
                match tls {
                    Some(config) => {
                        // The handshake may not wait for ever on a silent client.
                        let _ = s.set_read_timeout(Some(super::receive::IDLE_TIMEOUT));
                        let t = super::tls::TlsStream::server(s, config)?;
                        Stream::Tls(Box::new(t))
                    }
                    None => Stream::Tcp(s),
                }
            }
        };
        s.set_buffers(super::SOCKET_BUFFER);
        s.set_timeouts(super::receive::IDLE_TIMEOUT);
        Ok(Some(s))
    }
}

/// Refuses a range that is not inside one region of guest RAM.
pub fn check_ranges(mem: &GuestMemoryMmap, ranges: &[MemoryRange]) -> Result<(), String> {
    for r in ranges {
        let fits = mem.find_region(GuestAddress(r.gpa)).is_some_and(|reg| {
            r.gpa
                .checked_add(r.length)
                .is_some_and(|end| end <= reg.start_addr().0 + reg.len())
        });
        if !fits {
            return Err(format!(
                "memory range {:#x}+{:#x} is not guest RAM",
                r.gpa, r.length
            ));
        }
    }
    Ok(())
}

/// Takes one Memory request's table and bytes (its header read) into guest RAM; returns the
/// bytes.
pub fn receive_memory(mem: &GuestMemoryMmap, req: &Request, s: &mut Stream) -> Result<u64, String> {
    let ranges = read_ranges(s, req.length, MAX_RANGES)
        .map_err(|e| format!("reading a memory table: {e}"))?;
    check_ranges(mem, &ranges)?;
    for r in &ranges {
        crate::memory::read_range(mem, r.gpa, r.length, s, 1 << 30)
            .map_err(|e| format!("receiving memory at {:#x}: {e}", r.gpa))?;
    }
    Ok(dirty::bytes(&ranges))
}

/// The destination's side: takes the source's further connections until State.
pub struct Acceptor {
    stop: EventFd,
    /// Gives the listener back: it is dropped (a Unix socket's file removed) by the caller,
    /// whose filter allows that.
    thread: Option<JoinHandle<(Listener, Result<(), String>)>>,
    /// Postcopy: the fetcher, started when the fault connection came.
    fetchers: Receiver<Result<OnDemand, String>>,
    /// A fault connection came (the source migrates in postcopy).
    fault_seen: Arc<AtomicBool>,
}

/// A postcopy reception's RAM, ready for the fetcher the fault connection starts.
pub struct PostcopyRam {
    pub ram: postcopy::Prepared,
    pub link: Arc<postcopy::Link>,
}

/// A memory connection being served, and what stops it.
struct Worker {
    thread: JoinHandle<Result<(), String>>,
    socket: OwnedFd,
}

impl Acceptor {
    /// Starts taking connections on `listener`: memory they carry goes into `mem` (pre-copy),
    /// or, with `postcopy`, the fault connection starts the fetcher into its RAM at once (it
    /// fetches in the background while the source sends State) and memory connections are
    /// refused.
    pub fn start(
        listener: Listener,
        mem: GuestMemoryMmap,
        postcopy: Option<PostcopyRam>,
    ) -> Result<Self, String> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let thread_stop = stop.try_clone().map_err(|e| e.to_string())?;
        let (fetcher_tx, fetchers) = channel();
        let fault_seen = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&fault_seen);
        let thread = seccomp::spawn(
            "mig-accept".into(),
            crate::seccomp_filters::migration_connection(),
            move || {
                let mut postcopy = postcopy;
                let r = accept_loop(
                    &listener,
                    &thread_stop,
                    &mem,
                    &mut postcopy,
                    &fetcher_tx,
                    &seen,
                );
                (listener, r)
            },
        )
        .map_err(|e| format!("cannot start the migration's accepting thread: {e}"))?;
        Ok(Acceptor {
            stop,
            thread: Some(thread),
            fetchers,
            fault_seen,
        })
    }

    /// Whether the source opened a fault connection (it migrates in postcopy).
    pub fn fault_seen(&self) -> bool {
        self.fault_seen.load(Ordering::Acquire)
    }

    /// Postcopy: the fetcher the fault connection started (`None` if none came within
    /// `timeout`).
    pub fn fetcher(&self, timeout: Duration) -> Option<Result<OnDemand, String>> {
        self.fetchers.recv_timeout(timeout).ok()
    }

    /// Stops taking connections and ends the memory connections (the source has had every
    /// Memory request answered before it sends State: whatever still comes is not waited
    /// for). The first error a memory connection met, if any.
    pub fn finish(mut self) -> Result<(), String> {
        self.end()
    }

    fn end(&mut self) -> Result<(), String> {
        let _ = self.stop.write(1);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok((listener, r))) => {
                drop(listener);
                r
            }
            Some(Err(_)) => Err("the migration's accepting thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            debug!("migration connections: {e}");
        }
    }
}

fn accept_loop(
    listener: &Listener,
    stop: &EventFd,
    mem: &GuestMemoryMmap,
    postcopy: &mut Option<PostcopyRam>,
    fetchers: &Sender<Result<OnDemand, String>>,
    fault_seen: &AtomicBool,
) -> Result<(), String> {
    let receiving_postcopy = postcopy.is_some();
    let ended = Arc::new(AtomicBool::new(false));
    let mut workers: Vec<Worker> = Vec::new();
    let mut first_err = Ok(());
    loop {
        let s = match listener.accept(stop.as_raw_fd()) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            Err(e) => {
                // A failed handshake, or no descriptor left: not a reason to spin.
                warn!("migration: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match take(s, &workers, mem, &ended, receiving_postcopy) {
            Ok(Taken::Memory(w)) => workers.push(w),
            Ok(Taken::Fault(s)) => {
                info!("migration: the source opened a fault connection (postcopy)");
                fault_seen.store(true, Ordering::Release);
                match postcopy.take() {
                    Some(p) => {
                        let _ = fetchers.send(postcopy::Fetcher::start(p.ram, s, p.link));
                    }
                    None if receiving_postcopy => {
                        warn!("migration: a second fault connection, dropped");
                    }
                    // Not received in postcopy: State says so.
                    None => {}
                }
            }
            Ok(Taken::Dropped) => {}
            Err(e) => {
                first_err = Err(e);
                break;
            }
        }
    }
    // What the connections still send is not needed (see `finish`): their sockets are shut
    // so that each thread ends now, whatever it waits for.
    ended.store(true, Ordering::Release);
    for w in &workers {
        // SAFETY: shuts down a socket whose descriptor we own (a duplicate).
        unsafe { libc::shutdown(w.socket.as_raw_fd(), libc::SHUT_RDWR) };
    }
    for w in workers {
        let r = w
            .thread
            .join()
            .unwrap_or_else(|_| Err("a migration memory thread panicked".into()));
        if first_err.is_ok() {
            first_err = r;
        }
    }
    first_err
}

enum Taken {
    Memory(Worker),
    Fault(Stream),
    Dropped,
}

/// Reads a new connection's role: memory connections get their thread (at most
/// [`MAX_CONNECTIONS`]), fault connections go to the reception, others are dropped.
fn take(
    mut s: Stream,
    workers: &[Worker],
    mem: &GuestMemoryMmap,
    ended: &Arc<AtomicBool>,
    postcopy: bool,
) -> Result<Taken, String> {
    s.set_timeouts(ROLE_TIMEOUT);
    let role = match Role::read_from(&mut s) {
        Ok(Some(r)) => r,
        Ok(None) => {
            warn!("migration: a connection with an unknown role, dropped");
            return Ok(Taken::Dropped);
        }
        Err(e) => {
            warn!("migration: a connection that did not say its role ({e}), dropped");
            return Ok(Taken::Dropped);
        }
    };
    match role {
        // A source that stops answering is taken for gone, as on the main connection.
        Role::Fault => {
            s.set_timeouts(super::receive::IDLE_TIMEOUT);
            Ok(Taken::Fault(s))
        }
        // Postcopy RAM waits for the fetcher: nothing else may write it.
        Role::PrecopyMemory if postcopy => Err(
            "a memory connection in a postcopy migration (receive with memory_mode=precopy)".into(),
        ),
        Role::PrecopyMemory => {
            // It may wait long between passes; the reception ends it (`finish`, or the
            // Acceptor dropped when the main connection fails).
            s.clear_timeouts();
            if workers.len() as u64 >= MAX_CONNECTIONS {
                return Err(format!(
                    "more than {MAX_CONNECTIONS} memory connections came"
                ));
            }
            let socket = s
                .fd()
                .try_clone_to_owned()
                .map_err(|e| format!("cannot keep a migration connection: {e}"))?;
            let mem = mem.clone();
            let ended = Arc::clone(ended);
            let n = workers.len();
            let thread = seccomp::spawn(
                format!("mig-recv-{n}"),
                crate::seccomp_filters::migration_connection(),
                move || {
                    let r = serve_memory(&mut s, &mem, &ended);
                    match &r {
                        Ok(bytes) => info!(
                            "migration: memory connection {n} ended, {} MiB received",
                            bytes >> 20
                        ),
                        Err(e) => warn!("migration: memory connection {n}: {e}"),
                    }
                    r.map(|_| ())
                },
            )
            .map_err(|e| format!("cannot start a migration memory thread: {e}"))?;
            Ok(Taken::Memory(Worker { thread, socket }))
        }
    }
}

/// One memory connection: Memory requests, each answered once its bytes are in guest RAM,
/// until the source closes it. Anything else ends it with an error.
fn serve_memory(s: &mut Stream, mem: &GuestMemoryMmap, ended: &AtomicBool) -> Result<u64, String> {
    let mut bytes = 0u64;
    loop {
        let req = match Request::read_from(s) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(bytes),
            Err(_) if ended.load(Ordering::Acquire) => return Ok(bytes),
            Err(e) => return Err(format!("reading a request on a memory connection: {e}")),
        };
        let r = if req.command == Command::Memory {
            receive_memory(mem, &req, s).map(|n| bytes += n)
        } else {
            Err(format!(
                "a {:?} request on a memory connection (only Memory goes there)",
                req.command
            ))
        };
        if let Err(e) = r {
            if ended.load(Ordering::Acquire) {
                return Ok(bytes);
            }
            let _ = std::io::Write::write_all(s, &Response::error().encode());
            return Err(e);
        }
        std::io::Write::write_all(s, &Response::ok().encode())
            .map_err(|e| format!("answering on a memory connection: {e}"))?;
    }
}

/// One pass's work, shared by the sending threads: jobs taken in turn, results back.
struct Pass {
    jobs: Mutex<VecDeque<Vec<MemoryRange>>>,
    failed: AtomicBool,
    /// Bytes of this pass sent so far (all threads).
    sent: AtomicU64,
    /// Bytes of earlier passes (for the reports).
    before: u64,
    done: Sender<Result<(), String>>,
}

/// The source's side of `connections=N`: N connections, each with its thread, over which the
/// passes are spread.
pub struct Senders {
    passes: Vec<Sender<Arc<Pass>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Senders {
    /// Opens `n` memory connections to `url` (TLS with `tls_dir`) and their threads, which
    /// send from `mem` and report through `events`.
    pub fn open(
        url: &str,
        tls_dir: Option<&std::path::Path>,
        n: u64,
        mem: &GuestMemoryMmap,
        events: &Sender<Progress>,
    ) -> Result<Self, String> {
        let mut senders = Senders {
            passes: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let mut s = Stream::connect(url, tls_dir)?;
            s.set_buffers(super::SOCKET_BUFFER);
            s.set_timeouts(super::receive::IDLE_TIMEOUT);
            std::io::Write::write_all(&mut s, &Role::PrecopyMemory.encode())
                .map_err(|e| format!("opening memory connection {i}: {e}"))?;
            let (tx, rx) = channel::<Arc<Pass>>();
            let mem = mem.clone();
            let events = events.clone();
            let thread = seccomp::spawn(
                format!("mig-send-{i}"),
                crate::seccomp_filters::migration_connection(),
                move || {
                    for pass in rx {
                        let r = send_jobs(&mut s, &mem, &pass, &events);
                        if r.is_err() {
                            pass.failed.store(true, Ordering::Release);
                        }
                        let _ = pass.done.send(r);
                    }
                },
            )
            .map_err(|e| format!("cannot start a migration memory thread: {e}"))?;
            senders.passes.push(tx);
            senders.threads.push(thread);
        }
        Ok(senders)
    }

    /// Sends `ranges` over every connection; returns once each job is answered. `before`:
    /// bytes sent by earlier passes.
    pub fn pass(&self, ranges: &[MemoryRange], before: u64) -> Result<u64, String> {
        let (done, results) = channel();
        let pass = Arc::new(Pass {
            jobs: Mutex::new(jobs(ranges, JOB).into()),
            failed: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            before,
            done,
        });
        for tx in &self.passes {
            tx.send(Arc::clone(&pass))
                .map_err(|_| "a migration memory thread has ended".to_string())?;
        }
        // Only the threads hold the pass now: one that dies unanswered closes the channel.
        drop(pass);
        let mut first_err = Ok(());
        for _ in &self.passes {
            let r = results
                .recv()
                .unwrap_or_else(|_| Err("a migration memory thread has ended".into()));
            if first_err.is_ok() {
                first_err = r;
            }
        }
        first_err.map(|()| dirty::bytes(ranges))
    }
}

impl Drop for Senders {
    /// Closes the connections (the destination's threads see them end) and joins the threads.
    fn drop(&mut self) {
        self.passes.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Splits `ranges` into jobs of at most `max` bytes each (a range longer than that is cut).
fn jobs(ranges: &[MemoryRange], max: u64) -> Vec<Vec<MemoryRange>> {
    let mut out = Vec::new();
    let mut job = Vec::new();
    let mut size = 0u64;
    for r in ranges {
        let mut at = 0;
        while at < r.length {
            let n = (r.length - at).min(max - size);
            job.push(MemoryRange {
                gpa: r.gpa + at,
                length: n,
            });
            at += n;
            size += n;
            if size == max {
                out.push(std::mem::take(&mut job));
                size = 0;
            }
        }
    }
    if !job.is_empty() {
        out.push(job);
    }
    out
}

/// Takes jobs of `pass` until none is left (or another thread failed), each one a Memory
/// request answered before the next.
fn send_jobs(
    s: &mut Stream,
    mem: &GuestMemoryMmap,
    pass: &Pass,
    events: &Sender<Progress>,
) -> Result<(), String> {
    let mut said = Instant::now();
    loop {
        if pass.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(job) = pass
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
        else {
            return Ok(());
        };
        let table = encode_ranges(&job);
        let mut head = Request::new(Command::Memory, table.len() as u64)
            .encode()
            .to_vec();
        head.extend_from_slice(&table);
        std::io::Write::write_all(s, &head).map_err(|e| format!("sending memory: {e}"))?;
        for r in &job {
            crate::memory::write_range(mem, r.gpa, r.length, s, 1 << 30)
                .map_err(|e| format!("sending memory at {:#x}: {e}", r.gpa))?;
        }
        let answer =
            Response::read_from(s).map_err(|e| format!("waiting for the answer to Memory: {e}"))?;
        if !answer.ok {
            return Err("the destination refused Memory".into());
        }
        let sent = pass.sent.fetch_add(dirty::bytes(&job), Ordering::AcqRel) + dirty::bytes(&job);
        if said.elapsed() >= SENDING_EVERY {
            let _ = events.send(Progress::Sending {
                total: pass.before + sent,
            });
            said = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use vm_memory::Bytes;

    use super::*;
    use crate::migration::test_ram::fill;

    fn ram() -> GuestMemoryMmap {
        crate::migration::test_ram::ram(1 << 20, 1 << 20)
    }

    fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap, ranges: &[MemoryRange]) -> bool {
        ranges.iter().all(|r| {
            let (mut x, mut y) = (vec![0u8; r.length as usize], vec![1u8; r.length as usize]);
            a.read_slice(&mut x, GuestAddress(r.gpa)).unwrap();
            b.read_slice(&mut y, GuestAddress(r.gpa)).unwrap();
            x == y
        })
    }

    fn memory_request(ranges: &[MemoryRange], src: &GuestMemoryMmap) -> Vec<u8> {
        let table = encode_ranges(ranges);
        let mut b = Request::new(Command::Memory, table.len() as u64)
            .encode()
            .to_vec();
        b.extend(table);
        for r in ranges {
            // Zeros where the range is not RAM (a hostile request).
            let mut bytes = vec![0u8; r.length as usize];
            let _ = src.read_slice(&mut bytes, GuestAddress(r.gpa));
            b.extend(bytes);
        }
        b
    }

    /// The destination's acceptor: memory connections fill RAM, a fault connection is handed
    /// over, a connection with an unknown role is dropped, one that sends anything but Memory
    /// fails the reception, and finishing does not wait for a connection left open.
    #[test]
    fn the_acceptor_sorts_connections_by_role() {
        let dir = std::env::temp_dir().join(format!("ch-acceptor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let url = format!("unix:{}", path.display());
        let listener = Listener::bind(&url, None).unwrap();
        let (src, dst) = (ram(), ram());
        fill(&src);
        let acc = Acceptor::start(listener, dst.clone(), None).unwrap();
        let connect = |role: &[u8]| {
            let mut c = UnixStream::connect(&path).unwrap();
            c.write_all(role).unwrap();
            c
        };
        let parts = [
            vec![MemoryRange {
                gpa: 0,
                length: 0x8000,
            }],
            vec![
                MemoryRange {
                    gpa: 1 << 32,
                    length: 0x1000,
                },
                MemoryRange {
                    gpa: (1 << 32) + 0x3000,
                    length: 0xfd000,
                },
            ],
        ];
        let mut open = Vec::new();
        for p in &parts {
            let mut c = connect(&Role::PrecopyMemory.encode());
            c.write_all(&memory_request(p, &src)).unwrap();
            assert!(Response::read_from(&mut c).unwrap().ok);
            open.push(c);
        }
        assert!(same(&src, &dst, &parts.concat()));
        // Outside RAM: refused with an error answer, the connection ended.
        let mut bad = connect(&Role::PrecopyMemory.encode());
        bad.write_all(&memory_request(
            &[MemoryRange {
                gpa: 0xff000,
                length: 0x2000,
            }],
            &ram(),
        ))
        .unwrap_or(());
        assert!(!Response::read_from(&mut bad).unwrap().ok);
        let mut unknown = connect(&7u16.to_le_bytes());
        assert_eq!(unknown.read(&mut [0u8; 1]).unwrap(), 0, "dropped");
        assert!(!acc.fault_seen());
        let _fault = connect(&Role::Fault.encode());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !acc.fault_seen() {
            assert!(Instant::now() < deadline, "the fault connection is seen");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Not receiving in postcopy: no fetcher.
        assert!(acc.fetcher(Duration::from_millis(50)).is_none());
        let e = acc.finish().unwrap_err();
        assert!(e.contains("is not guest RAM"), "{e}");
        assert!(!path.exists(), "the socket file goes with the listener");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The source's senders and the destination's acceptor over TCP: every byte of a pass
    /// spread over three connections lands, and the connections end when the senders go.
    #[test]
    fn senders_spread_a_pass_over_their_connections() {
        let listener = Listener::bind("tcp:127.0.0.1:0", None).unwrap();
        let Listener::Tcp(l, _) = &listener else {
            unreachable!()
        };
        let url = format!("tcp:{}", l.local_addr().unwrap());
        let (src, dst) = (ram(), ram());
        fill(&src);
        let acc = Acceptor::start(listener, dst.clone(), None).unwrap();
        let (events, reports) = channel();
        let senders = Senders::open(&url, None, 3, &src, &events).unwrap();
        let all: Vec<MemoryRange> = src
            .iter()
            .map(|r| MemoryRange {
                gpa: r.start_addr().0,
                length: r.len(),
            })
            .collect();
        let first = vec![MemoryRange {
            gpa: 0x1000,
            length: 0x3000,
        }];
        assert_eq!(senders.pass(&first, 0).unwrap(), 0x3000);
        assert!(same(&src, &dst, &first));
        assert_eq!(senders.pass(&all, 0x3000).unwrap(), 2 << 20);
        assert!(same(&src, &dst, &all));
        drop(senders);
        drop(events);
        assert!(reports
            .iter()
            .all(|p| matches!(p, Progress::Sending { .. })));
        acc.finish().unwrap();
    }

    #[test]
    fn jobs_cut_ranges_to_the_size() {
        let r = |gpa, length| MemoryRange { gpa, length };
        let j = jobs(&[r(0, 10), r(100, 25), r(200, 3)], 16);
        assert_eq!(
            j,
            vec![
                vec![r(0, 10), r(100, 6)],
                vec![r(106, 16)],
                vec![r(122, 3), r(200, 3)],
            ]
        );
        let total: u64 = j.iter().flatten().map(|r| r.length).sum();
        assert_eq!(total, 38);
        assert!(jobs(&[], 16).is_empty());
    }
}
