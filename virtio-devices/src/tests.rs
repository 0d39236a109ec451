//! The fake driver the device tests share: split rings in a test guest memory (one queue,
//! [`Ring`], or one of several, [`QRing`]), a counting interrupt, a disk image to serve, and
//! host helpers (dirty-page bitmaps, a static ARP entry). The tests themselves are in the
//! `*_tests.rs` modules, by device or topic.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivateContext, Block, BlockConfig, DeviceStatus, VirtioDevice, VirtioInterrupt};

pub(crate) const MEM_SIZE: usize = 1 << 20;
pub(crate) const DESC: u64 = 0x1000;
pub(crate) const AVAIL: u64 = 0x2000;
pub(crate) const USED: u64 = 0x3000;
pub(crate) const QSIZE: u16 = 16;
pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;
pub(crate) const INDIRECT: u16 = 4;

#[derive(Default)]
pub(crate) struct Irq {
    pub(crate) queue: AtomicUsize,
    pub(crate) config: AtomicUsize,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _index: usize) {
        self.queue.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {
        self.config.fetch_add(1, Ordering::SeqCst);
    }
}

pub(crate) struct Ring {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) kick: EventFd,
    pub(crate) next_avail: u16,
    pub(crate) irq: Arc<Irq>,
    pub(crate) status: Arc<DeviceStatus>,
}

impl Ring {
    /// Activates `dev` with one ready queue (index `q` of `nqueues`) on fresh memory.
    pub(crate) fn start(dev: &mut dyn VirtioDevice, q: usize, nqueues: usize) -> Ring {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut queues: Vec<Option<(Queue, EventFd)>> = (0..nqueues).map(|_| None).collect();
        queues[q] = Some((queue, kick.try_clone().unwrap()));
        let irq = Arc::new(Irq::default());
        let status = Arc::new(DeviceStatus::default());
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
            acked_features: crate::F_VERSION_1,
            status: status.clone(),
            dma: None,
        })
        .unwrap();
        Ring {
            mem,
            kick,
            next_avail: 0,
            irq,
            status,
        }
    }

    pub(crate) fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    pub(crate) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Publishes `head`, kicks, and waits for the used entry: returns its length.
    pub(crate) fn submit(&mut self, head: u16) -> Option<u32> {
        self.post(head);
        self.kick_and_wait(head)
    }

    /// Puts `head` in the avail ring and publishes it (no kick).
    pub(crate) fn post(&mut self, head: u16) {
        let slot = self.next_avail % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Kicks and waits for the used entry of the last `post`ed `head`: returns its length.
    pub(crate) fn kick_and_wait(&mut self, head: u16) -> Option<u32> {
        self.kick.write(1).unwrap();
        self.wait_used(head)
    }

    /// Waits for the used entry of the last `post`ed `head`: returns its length.
    pub(crate) fn wait_used(&mut self, head: u16) -> Option<u32> {
        let slot = self.next_avail.wrapping_sub(1) % QSIZE;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx() == self.next_avail {
                let e = USED + 4 + 8 * u64::from(slot);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                assert_eq!(id, u32::from(head));
                return self.mem.read_obj(GuestAddress(e + 4)).ok();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

pub(crate) fn disk_with(
    size: u64,
    readonly: bool,
    io_uring: bool,
) -> (tempfile::NamedTempFile, Block) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    f.as_file().write_all(&data).unwrap();
    let opts = block::OpenOptions {
        readonly,
        ..Default::default()
    };
    let d = block::open_disk(f.path(), &opts).unwrap();
    let blk = Block::new(
        d,
        BlockConfig {
            num_queues: 1,
            queue_size: QSIZE,
            serial: "test-serial".into(),
            io_uring,
            queue_affinity: Vec::new(),
        },
    )
    .unwrap();
    (f, blk)
}

/// A data buffer: address, length, flags.
pub(crate) type Buf = (u64, u32, u16);

pub(crate) fn disk(size: u64, readonly: bool) -> (tempfile::NamedTempFile, Block) {
    disk_with(size, readonly, false)
}

pub(crate) const HDR: u64 = 0x10000;
pub(crate) const DATA: u64 = 0x20000;
pub(crate) const STATUS: u64 = 0x30000;

/// A three-descriptor request: header, one data buffer, status.
pub(crate) fn request(
    r: &mut Ring,
    t: u32,
    sector: u64,
    data: (u64, u32, u16),
) -> (Option<u32>, u8) {
    r.mem.write_obj(t, GuestAddress(HDR)).unwrap();
    r.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    r.desc(0, HDR, 16, NEXT, 1);
    r.desc(1, data.0, data.1, data.2 | NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    let used = r.submit(0);
    (used, r.mem.read_obj(GuestAddress(STATUS)).unwrap())
}

/// The guest pages marked dirty in `mem` since the last call (cleared as read), by page number
/// (4 KiB pages of guest addresses; the regions start at page boundaries).
pub(crate) fn dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut out = Vec::new();
    for r in mem.iter() {
        let first = r.start_addr().0 / guest_memory::DIRTY_PAGE_SIZE as u64;
        for (w, bits) in guest_memory::take_dirty_pages(r).into_iter().enumerate() {
            out.extend(
                (0..64)
                    .filter(|b| bits & (1 << b) != 0)
                    .map(|b| first + 64 * w as u64 + b),
            );
        }
    }
    out
}

/// One split ring of a multi-queue device at its own place in guest memory.
pub(crate) struct QRing {
    pub(crate) base: u64,
    pub(crate) kick: EventFd,
    pub(crate) next_avail: u16,
    pub(crate) seen_used: u16,
}

impl QRing {
    pub(crate) fn desc_at(&self) -> u64 {
        self.base
    }
    pub(crate) fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    pub(crate) fn used(&self) -> u64 {
        self.base + 0x2000
    }
    pub(crate) fn desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = GuestAddress(self.desc_at() + 16 * u64::from(i));
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, d.unchecked_add(8)).unwrap();
        mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }
    /// Publishes `head` and kicks, without waiting.
    pub(crate) fn post(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.next_avail % QSIZE;
        mem.write_obj(head, GuestAddress(self.avail() + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.avail() + 2))
            .unwrap();
        self.kick.write(1).unwrap();
    }
    pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }
    /// Waits for the next used entry: (id, len).
    pub(crate) fn next_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.used_idx(mem) != self.seen_used {
                let e = self.used() + 4 + 8 * u64::from(self.seen_used % QSIZE);
                self.seen_used = self.seen_used.wrapping_add(1);
                let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                return Some((id, len));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }
}

/// Adds a permanent ARP entry `ip` -> `mac` on `dev`, so host traffic needs no reply.
pub(crate) fn static_arp(dev: &str, ip: [u8; 4], mac: [u8; 6]) {
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes); we copy its bytes.
    req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM | libc::ATF_PERM;
    for (d, s) in req.arp_dev.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket creation and an ioctl on a request we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let r = libc::ioctl(fd, libc::SIOCSARP, &req);
        let e = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(r, 0, "SIOCSARP: {e}");
    }
}
