//! On-demand restore (`memory_restore_mode=ondemand`): guest RAM starts empty and registered
//! with a userfaultfd; the first touch of a page, by a vCPU (through KVM) or by a VMM thread
//! (a device worker, a snapshot), stops that thread until a loader thread has copied the page's
//! block from the snapshot's memory file into place (`UFFDIO_COPY`). Nothing is read up front,
//! so a restore reaches the guest's next instruction in the time it takes to build the VM.
//!
//! The kernel interface is a handful of ioctls on plain structs (`linux/userfaultfd.h`), written
//! out here: the `userfaultfd` crate generates its bindings with bindgen at build time, which
//! would put libclang and kernel headers into every build for five ioctls.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use guest_memory::GuestMemoryMmap;
use log::{debug, error, info};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

use crate::poll::Ready;
use crate::snapshot::{Cause, MemoryRange};

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `_UFFDIO_COPY`'s bit in the ioctls a registration allows.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
/// A `struct uffd_msg`: 32 bytes, the event first, a page fault's address at byte 16.
const MSG_SIZE: usize = 32;

ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER_IOCTL, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_WAKE_IOCTL, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY_IOCTL, UFFDIO, 0x03, UffdioCopy);

/// The requests the loader thread makes (its seccomp filter): UFFDIO_COPY and UFFDIO_WAKE.
pub(crate) fn loader_ioctls() -> [u64; 2] {
    [UFFDIO_COPY_IOCTL(), UFFDIO_WAKE_IOCTL()]
}

pub(crate) const PAGE: u64 = 4096;
/// What one fault loads: the aligned block around the faulting page (fewer faults for the
/// guest's sequential touches; pages of it already present are skipped).
const BLOCK: u64 = 64 << 10;

/// A guest RAM region as the loader sees it: where it is mapped, and where its bytes are in the
/// mapping of the memory file.
#[derive(Clone, Copy)]
struct Region {
    host: u64,
    len: u64,
    src: u64,
}

/// The loader thread; dropping it stops the thread (guest RAM must outlive it: the VM holds it
/// before its memory).
pub struct OnDemand {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

fn last_error(what: &str) -> Cause {
    Cause::io(what.to_string())(std::io::Error::last_os_error())
}

/// A new userfaultfd (close-on-exec, non-blocking): the system call, else `/dev/userfaultfd`
/// (where `vm.unprivileged_userfaultfd` is 0 and the caller lacks CAP_SYS_PTRACE).
fn create_uffd() -> Result<OwnedFd, Cause> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: a system call with integer arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: see above.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let first = std::io::Error::last_os_error();
    let dev = File::open("/dev/userfaultfd").map_err(|_| {
        Cause::io(
            "loading guest RAM on demand (memory_restore_mode=ondemand, postcopy migration) \
             needs userfaultfd, which this host refuses (see vm.unprivileged_userfaultfd)",
        )(first)
    })?;
    // USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00).
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
    // SAFETY: the ioctl takes the flags as its integer argument and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(last_error(
            "cannot create a userfaultfd through /dev/userfaultfd",
        ));
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd: guest RAM registered on it faults, where a page is missing, to its reader,
/// which fills the page in. Both loaders (on-demand restore, postcopy) are built on it.
pub(crate) struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    pub(crate) fn new() -> Result<Self, Cause> {
        let fd = create_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: the fd is a userfaultfd and `api` the struct this ioctl reads and writes.
        if unsafe { ioctl_with_mut_ref(&fd, UFFDIO_API_IOCTL(), &mut api) } < 0 {
            return Err(last_error("UFFDIO_API failed"));
        }
        Ok(Uffd { fd })
    }

    /// Registers `len` bytes of RAM at `host` (guest address `gpa`, for the messages): its
    /// missing pages fault from now on.
    pub(crate) fn register(&self, host: u64, len: u64, gpa: u64) -> Result<(), Cause> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: host, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: registers a range of a mapping we own with the userfaultfd; `reg` is the
        // struct the ioctl reads and writes.
        if unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_REGISTER_IOCTL(), &mut reg) } < 0 {
            return Err(last_error(&format!(
                "cannot register guest RAM at {gpa:#x} with the userfaultfd"
            )));
        }
        if reg.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(Cause::new(format!(
                "the userfaultfd cannot copy into guest RAM at {gpa:#x}"
            )));
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` (memory of ours, readable for that length) into
    /// registered RAM at `dst`, page-aligned, skipping pages already there. Returns the bytes
    /// copied.
    pub(crate) fn copy(&self, dst: u64, src: u64, len: u64) -> u64 {
        let (mut copied, mut at, mut retries) = (0, 0, 0);
        while at < len {
            let mut c = UffdioCopy {
                dst: dst + at,
                src: src + at,
                len: len - at,
                mode: 0,
                copy: 0,
            };
            // SAFETY: copies from memory the caller vouches for into registered guest RAM
            // (both `len` bytes long).
            let ret = unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_COPY_IOCTL(), &mut c) };
            let done = u64::try_from(c.copy).unwrap_or(0);
            copied += done;
            if ret == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // A page already there (loaded before, or written): skip it.
                Some(libc::EEXIST) => at += done + PAGE,
                Some(libc::EAGAIN) if retries < 100 => {
                    retries += 1;
                    at += done;
                }
                _ => {
                    error!("userfaultfd: UFFDIO_COPY at {:#x}: {e}", dst + at);
                    break;
                }
            }
        }
        copied
    }

    /// Wakes whoever waits for the page at `page` (it may have been loaded by another
    /// thread's fault meanwhile).
    pub(crate) fn wake(&self, page: u64) {
        let mut range = UffdioRange {
            start: page,
            len: PAGE,
        };
        // SAFETY: wakes threads waiting on a registered range; `range` is read by the ioctl.
        unsafe { ioctl_with_mut_ref(&self.fd, UFFDIO_WAKE_IOCTL(), &mut range) };
    }

    /// Waits at most `timeout_ms` (-1: for ever) for faults (`Fd`), or for `stop`.
    pub(crate) fn wait(&self, stop: &EventFd, timeout_ms: i32) -> Ready {
        crate::poll::fd_or_stop(self.fd.as_raw_fd(), stop.as_raw_fd(), timeout_ms)
    }

    /// The page faults waiting: their pages' addresses, added to `out`.
    pub(crate) fn faults(&self, out: &mut Vec<u64>) {
        let mut buf = [0u8; MSG_SIZE * 16];
        // SAFETY: reads into our buffer, at most its length (the fd is non-blocking).
        let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            return;
        }
        for msg in buf[..got as usize].chunks_exact(MSG_SIZE) {
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let mut addr = [0u8; 8];
            addr.copy_from_slice(&msg[16..24]);
            out.push(u64::from_ne_bytes(addr) & !(PAGE - 1));
        }
    }
}

/// The memory file mapped read-only (the loader's source); unmapped on drop.
struct SourceMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: a read-only mapping; only the loader thread reads it (the kernel reads it for
// UFFDIO_COPY).
unsafe impl Send for SourceMap {}

impl Drop for SourceMap {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `SourceMap::new` with this length and is not used
        // after this.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

impl SourceMap {
    fn new(file: &File, len: u64) -> Result<Self, Cause> {
        let len = usize::try_from(len).map_err(|_| Cause::new("memory file too large"))?;
        // SAFETY: a new read-only shared mapping of an open file; checked for failure.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(last_error("cannot map the memory snapshot file"));
        }
        Ok(SourceMap { addr, len })
    }
}

impl OnDemand {
    /// Registers every region of `mem` (fresh, untouched RAM) and starts the loader, whose
    /// source is `file` (`ranges`: each region's range and its offset in the file).
    pub fn start(
        mem: &GuestMemoryMmap,
        file: &File,
        ranges: &[(MemoryRange, u64)],
    ) -> Result<Self, Cause> {
        let uffd = Uffd::new()?;
        let total: u64 = ranges.iter().map(|(r, _)| r.length).sum();
        let source = SourceMap::new(file, total)?;
        let mut regions = Vec::with_capacity(ranges.len());
        for (r, offset) in ranges {
            let region = mem
                .find_region(vm_memory::GuestAddress(r.gpa))
                .ok_or_else(|| Cause::new(format!("no RAM region at {:#x}", r.gpa)))?;
            let host = region.as_ptr() as u64;
            uffd.register(host, region.len(), r.gpa)?;
            regions.push(Region {
                host,
                len: region.len(),
                src: source.addr as u64 + offset,
            });
        }
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(Cause::io("cannot create an eventfd"))?;
        let stop_rx = stop
            .try_clone()
            .map_err(Cause::io("cannot clone an eventfd"))?;
        let regions: Arc<[Region]> = regions.into();
        let thread = seccomp::spawn("uffd".into(), crate::seccomp_filters::uffd(), move || {
            Loader {
                uffd,
                regions,
                _source: source,
            }
            .run(&stop_rx)
        })
        .map_err(std::io::Error::other)
        .map_err(Cause::io("cannot start the on-demand loader thread"))?;
        info!(
            "on-demand restore: {} MiB of RAM loaded on first touch",
            total >> 20
        );
        Ok(OnDemand {
            stop,
            thread: Some(thread),
        })
    }
}

impl OnDemand {
    /// A loader of another kind (postcopy's): `thread` ends when `stop` is written.
    pub(crate) fn from_parts(stop: EventFd, thread: JoinHandle<()>) -> Self {
        OnDemand {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for OnDemand {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loader {
    uffd: Uffd,
    regions: Arc<[Region]>,
    _source: SourceMap,
}

impl Loader {
    fn run(self, stop: &EventFd) {
        let mut loaded = 0u64;
        let mut pages = Vec::new();
        loop {
            match self.uffd.wait(stop, -1) {
                Ready::Stop => {
                    debug!("on-demand loader stops; {} KiB loaded", loaded >> 10);
                    return;
                }
                Ready::Timeout => continue,
                Ready::Fd => {}
            }
            pages.clear();
            self.uffd.faults(&mut pages);
            for &page in &pages {
                loaded += self.serve(page);
            }
        }
    }

    /// Loads the block around `page` and wakes whoever waits for it. Returns the bytes
    /// copied.
    fn serve(&self, page: u64) -> u64 {
        let Some(r) = self
            .regions
            .iter()
            .find(|r| (r.host..r.host + r.len).contains(&page))
        else {
            error!("on-demand loader: a fault at {page:#x} outside guest RAM");
            return 0;
        };
        let start = (page - r.host) & !(BLOCK - 1);
        let end = (start + BLOCK).min(r.len);
        // SAFETY of the source: `r.src` maps the file's bytes for the whole region.
        let copied = self.uffd.copy(r.host + start, r.src + start, end - start);
        self.uffd.wake(page);
        copied
    }
}
