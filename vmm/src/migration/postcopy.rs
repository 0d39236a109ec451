//! Postcopy (`memory_mode=postcopy`, as the original's): the source pauses its VM right after
//! Config and sends no memory; it opens a fault connection ([`Role::Fault`]) and serves
//! PageFault requests from it ([`serve`]) while it sends State and Complete. The destination
//! registers its empty RAM with a userfaultfd before it builds the VM: a page's first touch,
//! by a vCPU or a VMM thread, waits until the [`Fetcher`] has asked the source for the block
//! around it; between faults the fetcher asks for the rest of RAM in order, and once every
//! block is in it closes the connection, which ends the source.
//!
//! On the wire (the original's): a PageFault request's payload is one `{gpa, length}` range;
//! the answer is OK with `length` in its length field, then the bytes.

use std::io::{Read, Write};
use std::time::Instant;

use guest_memory::GuestMemoryMmap;
use log::{error, info, warn};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::connections::check_ranges;
use super::protocol::{encode_ranges, read_ranges, Command, Request, Response, Stream};
use super::SENDING_EVERY;
use crate::poll::Ready;
use crate::snapshot::MemoryRange;
use crate::uffd::{OnDemand, Uffd, PAGE};

/// A page of zeros, for pages the guest discarded after they were fetched.
static ZEROS: [u8; PAGE as usize] = [0; PAGE as usize];

/// The most one PageFault may ask for (the original's bound).
const MAX_FAULT: u64 = 1 << 30;
/// What a fault fetches: the aligned block around the page.
const BLOCK: u64 = 64 << 10;
/// What one background request fetches at most (blocks not yet in, in a row).
const PREFETCH: u64 = 1 << 20;

/// The source's side: answers the destination's PageFault requests from `mem` (the paused
/// VM's RAM) until it closes the connection. Returns the bytes sent; `report` hears of them
/// as they go (at most every [`SENDING_EVERY`]).
pub fn serve(
    s: &mut Stream,
    mem: &GuestMemoryMmap,
    report: &mut dyn FnMut(u64),
) -> Result<u64, String> {
    let mut sent = 0u64;
    let mut said = Instant::now();
    loop {
        let req = match Request::read_from(s) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(sent)
            }
            Err(e) => return Err(format!("reading a PageFault: {e}")),
        };
        match req.command {
            Command::PageFault => {
                let r = (|| {
                    let ranges = read_ranges(s, req.length, 1)
                        .map_err(|e| format!("reading a PageFault's range: {e}"))?;
                    let r = *ranges.first().ok_or("a PageFault without a range")?;
                    if r.length == 0 || r.length > MAX_FAULT {
                        return Err(format!("a PageFault of {} bytes", r.length));
                    }
                    check_ranges(mem, &ranges)?;
                    Ok(r)
                })();
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = s.write_all(&Response::error().encode());
                        return Err(e);
                    }
                };
                s.write_all(&Response::ok_with(r.length).encode())
                    .map_err(|e| format!("answering a PageFault: {e}"))?;
                crate::memory::write_range(mem, r.gpa, r.length, s, 1 << 30)
                    .map_err(|e| format!("sending the page at {:#x}: {e}", r.gpa))?;
                sent += r.length;
                if said.elapsed() >= SENDING_EVERY {
                    report(sent);
                    said = Instant::now();
                }
            }
            Command::Abandon => {
                let _ = s.write_all(&Response::ok().encode());
                return Err("the destination abandoned the migration".into());
            }
            c => {
                let _ = s.write_all(&Response::error().encode());
                return Err(format!("a {c:?} request on the fault connection"));
            }
        }
    }
}

/// Guest RAM as the fetcher sees it.
struct Region {
    host: u64,
    gpa: u64,
    len: u64,
    /// One bit per [`BLOCK`]: fetched.
    fetched: Vec<u64>,
}

impl Region {
    fn blocks(&self) -> u64 {
        self.len.div_ceil(BLOCK)
    }

    fn is_fetched(&self, b: u64) -> bool {
        self.fetched[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set_fetched(&mut self, b: u64) {
        self.fetched[(b / 64) as usize] |= 1 << (b % 64);
    }
}

/// The destination's RAM made ready at Config: registered with a userfaultfd (a touch now
/// waits for the fetcher, so nothing may touch it before one runs).
pub struct Prepared {
    uffd: Uffd,
    regions: Vec<Region>,
}

impl Prepared {
    /// Registers all of `mem` (fresh, untouched RAM).
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, String> {
        let uffd = Uffd::new().map_err(|c| c.to_string())?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r.as_ptr() as u64;
            uffd.register(host, r.len(), r.start_addr().0)
                .map_err(|c| c.to_string())?;
            regions.push(Region {
                host,
                gpa: r.start_addr().0,
                len: r.len(),
                fetched: vec![0; r.len().div_ceil(BLOCK).div_ceil(64) as usize],
            });
        }
        Ok(Prepared { uffd, regions })
    }
}

/// Whether the VM is the destination's yet (Complete came), and whether the source was lost:
/// a loss stops the VM once it runs here; before that, it fails the reception.
pub struct Link {
    state: std::sync::Mutex<(bool, bool)>,
    failed: EventFd,
}

impl Link {
    /// `failed`: written if the source is lost once the VM is armed.
    pub fn new(failed: EventFd) -> Self {
        Link {
            state: std::sync::Mutex::new((false, false)),
            failed,
        }
    }

    /// Complete came: from now on a lost source stops the VM. An error if it is lost already.
    pub fn arm(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1 {
            return Err("the postcopy fault connection to the source is lost".into());
        }
        st.0 = true;
        Ok(())
    }

    fn lost(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1 = true;
        if st.0 {
            let _ = self.failed.write(1);
        }
    }
}

/// The destination's side: fills guest RAM from the source over the fault connection.
pub struct Fetcher {
    uffd: Uffd,
    regions: Vec<Region>,
    s: Option<Stream>,
    buf: Vec<u8>,
    link: std::sync::Arc<Link>,
    /// Where the background fetch is: region, block.
    next: Option<(usize, u64)>,
    fetched: u64,
}

impl Fetcher {
    /// Starts fetching into `ram` from the source over `s`, the fault connection; `link` says
    /// what a lost source means.
    pub fn start(ram: Prepared, s: Stream, link: std::sync::Arc<Link>) -> Result<OnDemand, String> {
        let total: u64 = ram.regions.iter().map(|r| r.len).sum();
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
        let thread_stop = stop.try_clone().map_err(|e| e.to_string())?;
        let mut f = Fetcher {
            uffd: ram.uffd,
            regions: ram.regions,
            s: Some(s),
            buf: vec![0; PREFETCH as usize],
            link,
            next: Some((0, 0)),
            fetched: 0,
        };
        let thread = seccomp::spawn(
            "postcopy".into(),
            crate::seccomp_filters::postcopy(),
            move || f.run(&thread_stop),
        )
        .map_err(|e| format!("cannot start the postcopy thread: {e}"))?;
        info!(
            "postcopy: {} MiB of RAM fetched from the source as the guest touches it",
            total >> 20
        );
        Ok(OnDemand::from_parts(stop, thread))
    }

    fn run(&mut self, stop: &EventFd) {
        let started = Instant::now();
        let mut pages = Vec::new();
        loop {
            // Faults first; the background fetch between them.
            let wait = if self.next.is_some() { 0 } else { -1 };
            match self.uffd.wait(stop, wait) {
                Ready::Stop => {
                    info!(
                        "postcopy: stopped after {:?}, {} MiB fetched",
                        started.elapsed(),
                        self.fetched >> 20
                    );
                    return;
                }
                Ready::Fd => {
                    pages.clear();
                    self.uffd.faults(&mut pages);
                    for &page in &pages {
                        self.fault(page);
                    }
                }
                Ready::Timeout => {
                    if !self.prefetch() {
                        info!(
                            "postcopy: all {} MiB fetched in {:?}",
                            self.fetched >> 20,
                            started.elapsed()
                        );
                        // The source ends when its connection does; the RAM needs the
                        // userfaultfd no more.
                        self.s = None;
                        return;
                    }
                }
            }
        }
    }

    /// Fills the block around `page` and wakes whoever waits for it.
    fn fault(&mut self, page: u64) {
        let Some(i) = self
            .regions
            .iter()
            .position(|r| (r.host..r.host + r.len).contains(&page))
        else {
            error!("postcopy: a fault at {page:#x} outside guest RAM");
            return;
        };
        let b = (page - self.regions[i].host) / BLOCK;
        if !self.regions[i].is_fetched(b) {
            self.fetch(i, b, 1);
        } else {
            // A page of a block fetched before: the guest has given it back since (balloon,
            // free page reporting), so it reads as zeros, as discarded memory does (a page
            // that is there already is skipped).
            self.uffd.copy(page, ZEROS.as_ptr() as u64, PAGE);
        }
        self.uffd.wake(page);
    }

    /// Fetches the next blocks not yet in (at most [`PREFETCH`] bytes in a row); false once
    /// there are none.
    fn prefetch(&mut self) -> bool {
        while let Some((i, b)) = self.next {
            let Some(r) = self.regions.get(i) else {
                self.next = None;
                return false;
            };
            if b >= r.blocks() {
                self.next = Some((i + 1, 0));
                continue;
            }
            if r.is_fetched(b) {
                self.next = Some((i, b + 1));
                continue;
            }
            let mut n = 1;
            while n < PREFETCH / BLOCK && b + n < r.blocks() && !r.is_fetched(b + n) {
                n += 1;
            }
            self.fetch(i, b, n);
            self.next = Some((i, b + n));
            return true;
        }
        false
    }

    /// Fetches `n` blocks from block `b` of region `i` and copies them in. Once the source is
    /// lost, zeros go in instead (no thread may wait for ever) and the VM is stopped.
    fn fetch(&mut self, i: usize, b: u64, n: u64) {
        let r = &self.regions[i];
        let start = b * BLOCK;
        let len = (n * BLOCK).min(r.len - start);
        let (host, gpa) = (r.host + start, r.gpa + start);
        let buf = &mut self.buf[..len as usize];
        let got = match self.s.as_mut() {
            Some(s) => ask(s, gpa, buf),
            None => Err(String::new()),
        };
        if let Err(e) = got {
            if self.s.take().is_some() {
                error!(
                    "postcopy: the source is lost ({e}); the VM cannot go on without its memory"
                );
                self.link.lost();
            }
            buf.fill(0);
        }
        debug_assert!(len.is_multiple_of(PAGE));
        self.fetched += self.uffd.copy(host, buf.as_ptr() as u64, len);
        for k in b..b + n {
            self.regions[i].set_fetched(k);
        }
    }
}

/// One PageFault for `buf.len()` bytes at `gpa`, answered into `buf`.
fn ask(s: &mut Stream, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
    let range = MemoryRange {
        gpa,
        length: buf.len() as u64,
    };
    let mut req = Request::new(Command::PageFault, 16).encode().to_vec();
    req.extend(encode_ranges(&[range]));
    s.write_all(&req)
        .map_err(|e| format!("asking for {gpa:#x}: {e}"))?;
    let answer = Response::read_from(s).map_err(|e| format!("the answer for {gpa:#x}: {e}"))?;
    if !answer.ok {
        return Err(format!("the source refused the page at {gpa:#x}"));
    }
    if answer.length != range.length {
        warn!(
            "postcopy: {} bytes for a request of {}",
            answer.length, range.length
        );
        return Err(format!("a wrong length for the page at {gpa:#x}"));
    }
    s.read_exact(buf)
        .map_err(|e| format!("the page at {gpa:#x}: {e}"))
}

/// The fault connection's side of the source: Role::Fault said.
pub fn open_fault_connection(
    url: &str,
    tls_dir: Option<&std::path::Path>,
) -> Result<Stream, String> {
    let mut s = Stream::connect(url, tls_dir)?;
    s.set_buffers(super::SOCKET_BUFFER);
    s.set_timeouts(super::receive::IDLE_TIMEOUT);
    s.write_all(&super::protocol::Role::Fault.encode())
        .map_err(|e| format!("opening the fault connection: {e}"))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::migration::test_ram::{fill, word};

    fn ram() -> GuestMemoryMmap {
        crate::migration::test_ram::ram(2 << 20, 1 << 20)
    }

    /// A touched page is there at once, the rest arrives in the background, each byte sent
    /// once; then the fetcher closes the connection and the source's server ends.
    #[test]
    fn ram_comes_on_touch_and_in_the_background() {
        let (src, dst) = (ram(), ram());
        fill(&src);
        let (a, b) = UnixStream::pair().unwrap();
        let server_mem = src.clone();
        let server =
            std::thread::spawn(move || serve(&mut Stream::Unix(a), &server_mem, &mut |_| {}));
        let failed = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let link = std::sync::Arc::new(Link::new(failed.try_clone().unwrap()));
        link.arm().unwrap();
        let prepared = Prepared::new(&dst).unwrap();
        let loader = Fetcher::start(prepared, Stream::Unix(b), link).unwrap();
        // A fault in the middle of the second region.
        let at = (1 << 32) + 0x4_2348;
        assert_eq!(dst.read_obj::<u64>(GuestAddress(at)).unwrap(), word(at));
        let sent = server.join().unwrap().unwrap();
        assert_eq!(sent, 3 << 20, "every byte once");
        for r in dst.iter() {
            let base = r.start_addr().0;
            for i in (0..r.len() / 8).step_by(509) {
                let gpa = base + i * 8;
                assert_eq!(dst.read_obj::<u64>(GuestAddress(gpa)).unwrap(), word(gpa));
            }
        }
        assert!(failed.read().is_err(), "no failure reported");
        drop(loader);
    }

    /// A page the guest discards (a balloon) after its block was fetched faults again: it
    /// reads as zeros, as discarded memory does, and nothing loops or hangs.
    #[test]
    fn a_page_discarded_after_its_fetch_reads_zeros() {
        let (src, dst) = (ram(), ram());
        fill(&src);
        let (a, b) = UnixStream::pair().unwrap();
        // A slow source (five requests in all: the faulting block, then four of the
        // background fetch): that fetch is still under way when the page goes.
        let server_mem = src.clone();
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = Arc::clone(&answered);
        let server = std::thread::spawn(move || {
            let mut s = Stream::Unix(a);
            while let Ok(req) = Request::read_from(&mut s) {
                let r = read_ranges(&mut s, req.length, 1).unwrap()[0];
                std::thread::sleep(std::time::Duration::from_millis(50));
                let mut bytes = vec![0u8; r.length as usize];
                server_mem
                    .read_slice(&mut bytes, GuestAddress(r.gpa))
                    .unwrap();
                let answer = [Response::ok_with(r.length).encode().to_vec(), bytes].concat();
                if s.write_all(&answer).is_err() {
                    break;
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let failed = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let link = Arc::new(Link::new(failed.try_clone().unwrap()));
        link.arm().unwrap();
        let loader = Fetcher::start(Prepared::new(&dst).unwrap(), Stream::Unix(b), link).unwrap();
        let at = (1 << 32) + 0x8_0000;
        assert_eq!(dst.read_obj::<u64>(GuestAddress(at)).unwrap(), word(at));
        let host = dst.get_host_address(GuestAddress(at)).unwrap();
        // SAFETY: discards one page of the test's own RAM mapping.
        let r = unsafe { libc::madvise(host.cast(), PAGE as usize, libc::MADV_DONTNEED) };
        assert_eq!(r, 0);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(at)).unwrap(), 0);
        // At once, not once the background fetch is over (the fault would come back until
        // the userfaultfd is closed).
        let n = answered.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n < 5, "the zeros came after the whole fetch ({n} answers)");
        // Its neighbour, fetched with it and kept, is still the source's.
        let next = at + PAGE;
        assert_eq!(dst.read_obj::<u64>(GuestAddress(next)).unwrap(), word(next));
        assert!(failed.read().is_err(), "no failure reported");
        drop(loader);
        server.join().unwrap();
    }

    /// A source that goes away: the VM is reported failed, and touching its RAM does not
    /// hang (zeros come in).
    #[test]
    fn a_lost_source_fails_the_vm_without_a_hang() {
        let dst = ram();
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let failed = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let link = std::sync::Arc::new(Link::new(failed.try_clone().unwrap()));
        link.arm().unwrap();
        let prepared = Prepared::new(&dst).unwrap();
        let loader = Fetcher::start(prepared, Stream::Unix(b), Arc::clone(&link)).unwrap();
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
        assert_eq!(failed.read().unwrap(), 1);
        drop(loader);
        // Lost before Complete: no VM to stop, the reception fails instead.
        let dst = ram();
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let link = Arc::new(Link::new(failed.try_clone().unwrap()));
        let loader = Fetcher::start(
            Prepared::new(&dst).unwrap(),
            Stream::Unix(b),
            Arc::clone(&link),
        )
        .unwrap();
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
        assert!(failed.read().is_err(), "not armed: nothing stopped");
        assert!(link.arm().unwrap_err().contains("lost"));
        drop(loader);
    }

    /// The source refuses PageFaults that are not inside its RAM or too long, and anything
    /// but PageFault, with an error answer; it ends quietly when the destination closes.
    #[test]
    fn the_source_refuses_bad_page_faults() {
        let src = ram();
        let fault = |gpa: u64, length: u64| {
            let mut b = Request::new(Command::PageFault, 16).encode().to_vec();
            b.extend(encode_ranges(&[MemoryRange { gpa, length }]));
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (fault(0x1f_f000, 0x2000), "is not guest RAM"),
            (fault(u64::MAX - 0xfff, 0x1000), "is not guest RAM"),
            (fault(0, 0), "a PageFault of 0 bytes"),
            (fault(0, (1 << 30) + 4096), "a PageFault of"),
            (
                Request::new(Command::PageFault, 32).encode().to_vec(),
                "range",
            ),
            (
                Request::new(Command::Memory, 0).encode().to_vec(),
                "a Memory request",
            ),
        ];
        for (bytes, why) in cases {
            let (mut a, b) = UnixStream::pair().unwrap();
            a.write_all(&bytes).unwrap();
            let e = serve(&mut Stream::Unix(b), &src, &mut |_| {}).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!Response::read_from(&mut a).unwrap().ok, "{why}");
        }
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&fault(0x1000, 0x1000)).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            serve(&mut Stream::Unix(b), &src, &mut |_| {}).unwrap(),
            0x1000
        );
        let answer = Response::read_from(&mut a).unwrap();
        assert_eq!((answer.ok, answer.length), (true, 0x1000));
    }
}
