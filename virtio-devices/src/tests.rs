//! Devices driven through real split rings in a test guest memory, with the worker threads
//! running: well-formed requests, and malformed ones a hostile driver could write.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use crate::{
    ActivateContext, Block, BlockConfig, Console, ConsoleSize, DeviceStatus, Rng, VirtioDevice,
    VirtioInterrupt,
};

const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
pub(crate) const QSIZE: u16 = 16;
pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

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

struct Ring {
    mem: GuestMemoryMmap,
    kick: EventFd,
    next_avail: u16,
    irq: Arc<Irq>,
    status: Arc<DeviceStatus>,
}

impl Ring {
    /// Activates `dev` with one ready queue (index `q` of `nqueues`) on fresh memory.
    fn start(dev: &mut dyn VirtioDevice, q: usize, nqueues: usize) -> Ring {
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

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Publishes `head`, kicks, and waits for the used entry: returns its length.
    fn submit(&mut self, head: u16) -> Option<u32> {
        self.post(head);
        self.kick_and_wait(head)
    }

    /// Puts `head` in the avail ring and publishes it (no kick).
    fn post(&mut self, head: u16) {
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
    fn kick_and_wait(&mut self, head: u16) -> Option<u32> {
        self.kick.write(1).unwrap();
        self.wait_used(head)
    }

    /// Waits for the used entry of the last `post`ed `head`: returns its length.
    fn wait_used(&mut self, head: u16) -> Option<u32> {
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

fn disk_with(size: u64, readonly: bool, io_uring: bool) -> (tempfile::NamedTempFile, Block) {
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
        },
    )
    .unwrap();
    (f, blk)
}

/// A data buffer: address, length, flags.
type Buf = (u64, u32, u16);

fn disk(size: u64, readonly: bool) -> (tempfile::NamedTempFile, Block) {
    disk_with(size, readonly, false)
}

const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;

/// A three-descriptor request: header, one data buffer, status.
fn request(r: &mut Ring, t: u32, sector: u64, data: (u64, u32, u16)) -> (Option<u32>, u8) {
    r.mem.write_obj(t, GuestAddress(HDR)).unwrap();
    r.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    r.desc(0, HDR, 16, NEXT, 1);
    r.desc(1, data.0, data.1, data.2 | NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    let used = r.submit(0);
    (used, r.mem.read_obj(GuestAddress(STATUS)).unwrap())
}

#[test]
fn blk_read_write_flush_get_id() {
    read_write(false);
}

#[test]
fn blk_read_write_flush_get_id_io_uring() {
    read_write(true);
}

fn read_write(io_uring: bool) {
    let (f, mut blk) = disk_with(64 * 1024, false, io_uring);
    assert_eq!(
        blk.uses_io_uring(),
        io_uring && block::async_io::io_uring_supported()
    );
    let mut r = Ring::start(&mut blk, 0, 1);
    assert_eq!(
        request(&mut r, T_IN, 3, (DATA, 1024, WRITE)),
        (Some(1025), S_OK)
    );
    let mut buf = [0u8; 1024];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
    r.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut r, T_OUT, 7, (DATA, 512, 0)), (Some(1), S_OK));
    assert_eq!(request(&mut r, T_FLUSH, 0, (DATA, 0, 0)).1, S_OK);
    assert_eq!(
        request(&mut r, T_GET_ID, 0, (DATA, 20, WRITE)),
        (Some(21), S_OK)
    );
    let mut id = [0u8; 11];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"test-serial");
    // Write zeroes over sector 8, discard sector 9.
    let seg = |r: &Ring, start: u64| {
        r.mem.write_obj(start, GuestAddress(DATA)).unwrap();
        r.mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
        r.mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    };
    seg(&r, 8);
    assert_eq!(request(&mut r, T_WRITE_ZEROES, 0, (DATA, 16, 0)).1, S_OK);
    seg(&r, 9);
    assert_eq!(request(&mut r, T_DISCARD, 0, (DATA, 16, 0)).1, S_OK);
    assert!(r.irq.queue.load(Ordering::SeqCst) > 0);
    // The worker publishes its counters once per batch: read them once it has stopped.
    blk.reset();
    use devices::DeviceCounters;
    let c = blk.counters().unwrap().counters();
    assert_eq!((c["read_bytes"], c["read_ops"]), (1024, 1));
    assert_eq!((c["write_bytes"], c["write_ops"]), (512, 1));
    let img = std::fs::read(f.path()).unwrap();
    assert!(img[7 * 512..8 * 512].iter().all(|&b| b == 0xab));
    assert!(img[8 * 512..9 * 512].iter().all(|&b| b == 0));
    assert!(img[6 * 512..7 * 512].iter().all(|&b| b == 6));
}

#[test]
fn blk_malformed_requests_fail_cleanly() {
    malformed(false);
}

#[test]
fn blk_malformed_requests_fail_cleanly_io_uring() {
    malformed(true);
}

fn malformed(io_uring: bool) {
    let (f, mut blk) = disk_with(64 * 1024, false, io_uring);
    let mut r = Ring::start(&mut blk, 0, 1);
    let cases: [(&str, u32, u64, Buf, u8); 8] = [
        (
            "address outside memory",
            T_IN,
            0,
            (1 << 40, 512, WRITE),
            S_IOERR,
        ),
        (
            "address wraps",
            T_IN,
            0,
            (u64::MAX - 10, 512, WRITE),
            S_IOERR,
        ),
        ("read-only buffer for IN", T_IN, 0, (DATA, 512, 0), S_IOERR),
        (
            "writable buffer for OUT",
            T_OUT,
            0,
            (DATA, 512, WRITE),
            S_IOERR,
        ),
        (
            "not a sector multiple",
            T_IN,
            0,
            (DATA, 100, WRITE),
            S_IOERR,
        ),
        ("beyond the end", T_IN, 127, (DATA, 1024, WRITE), S_IOERR),
        ("sector overflow", T_OUT, u64::MAX, (DATA, 512, 0), S_IOERR),
        ("unknown type", 99, 0, (DATA, 512, 0), S_UNSUPP),
    ];
    for (what, t, sector, d, want) in cases {
        let (used, status) = request(&mut r, t, sector, d);
        assert_eq!(status, want, "{what}");
        assert_eq!(used, Some(1), "{what}");
    }
    // Oversized (over the per-request cap) and over 4 GiB in total.
    assert_eq!(
        request(&mut r, T_IN, 0, (DATA, 0x8000_0000, WRITE)).1,
        S_IOERR
    );
    let (used, status) = request(&mut r, T_IN, 0, (DATA, u32::MAX, WRITE));
    assert_eq!((used, status), (Some(0), 0xee));
    // Header too short, header writable, no status descriptor, zero-length status.
    r.desc(0, HDR, 8, NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    r.submit(0);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    r.desc(0, HDR, 16, WRITE | NEXT, 2);
    r.submit(0);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_IOERR);
    r.desc(0, HDR, 16, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    r.desc(0, HDR, 16, NEXT, 1);
    r.desc(1, STATUS, 0, WRITE, 0);
    assert_eq!(r.submit(0), Some(0));
    // A loop is cut at the queue size; a head beyond the table and a bad next index too.
    r.desc(0, HDR, 16, NEXT, 1);
    r.desc(1, DATA, 512, WRITE | NEXT, 0);
    assert_eq!(r.submit(0), Some(1));
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
        S_IOERR
    );
    r.desc(0, HDR, 16, NEXT, 200);
    assert_eq!(r.submit(0), Some(0));
    // An indirect table outside memory.
    r.desc(0, 1 << 40, 32, INDIRECT, 0);
    assert_eq!(r.submit(0), Some(0));
    // Discard with bad flags, too many segments, beyond the end.
    r.mem.write_obj(0u64, GuestAddress(DATA)).unwrap();
    r.mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
    r.mem.write_obj(0xffu32, GuestAddress(DATA + 12)).unwrap();
    assert_eq!(request(&mut r, T_DISCARD, 0, (DATA, 16, 0)).1, S_UNSUPP);
    assert_eq!(request(&mut r, T_DISCARD, 0, (DATA, 32, 0)).1, S_UNSUPP);
    r.mem.write_obj(1000u64, GuestAddress(DATA)).unwrap();
    r.mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    assert_eq!(request(&mut r, T_DISCARD, 0, (DATA, 16, 0)).1, S_IOERR);
    // The device still works, and nothing was written to the image.
    assert_eq!(
        request(&mut r, T_IN, 1, (DATA, 512, WRITE)),
        (Some(513), S_OK)
    );
    assert!(!r.status.needs_reset());
    blk.reset();
    let img = std::fs::read(f.path()).unwrap();
    assert!(img
        .chunks(512)
        .enumerate()
        .all(|(i, s)| s.iter().all(|&b| b == i as u8)));
}

#[test]
fn blk_readonly_refuses_writes() {
    let (_f, mut blk) = disk(8192, true);
    assert_ne!(blk.features() & (1 << 5), 0);
    let mut r = Ring::start(&mut blk, 0, 1);
    assert_eq!(request(&mut r, T_OUT, 0, (DATA, 512, 0)).1, S_IOERR);
    r.mem.write_obj(0u64, GuestAddress(DATA)).unwrap();
    r.mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
    assert_eq!(request(&mut r, T_WRITE_ZEROES, 0, (DATA, 16, 0)).1, S_IOERR);
    assert_eq!(request(&mut r, T_IN, 0, (DATA, 512, WRITE)).1, S_OK);
}

#[test]
fn broken_avail_index_needs_reset_and_reset_recovers() {
    let (_f, mut blk) = disk(8192, false);
    let r = Ring::start(&mut blk, 0, 1);
    r.mem.write_obj(500u16, GuestAddress(AVAIL + 2)).unwrap();
    r.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.status.needs_reset() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(r.status.needs_reset());
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    // Further kicks are ignored, not spun on.
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    blk.reset();
    let mut r = Ring::start(&mut blk, 0, 1);
    assert_eq!(request(&mut r, T_IN, 0, (DATA, 512, WRITE)).1, S_OK);
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

#[test]
fn blk_marks_the_pages_it_writes() {
    blk_marks(false);
}

#[test]
fn blk_marks_the_pages_it_writes_io_uring() {
    blk_marks(true);
}

/// What virtio-blk writes into guest memory through host pointers and the kernel (a read's
/// data, the status byte, the used ring) marks exactly those pages in the dirty bitmaps, as
/// vm-memory's own writes (GET_ID's) do; what it only reads (the header, a write's data, the
/// descriptors, the avail ring) stays clean.
fn blk_marks(io_uring: bool) {
    let (_f, mut blk) = disk_with(64 * 1024, false, io_uring);
    assert_eq!(
        blk.uses_io_uring(),
        io_uring && block::async_io::io_uring_supported()
    );
    let mut r = Ring::start(&mut blk, 0, 1);
    // Ten sectors into two buffers: the last 0x200 bytes of page 0x20, and 0x1200 bytes from
    // 0x100 into page 0x24 (pages 0x24 and 0x25).
    let (a, b) = (DATA + 0x1000 - 0x200, DATA + 0x4100);
    let req = |r: &mut Ring, t: u32, write: u16| {
        r.mem.write_obj(t, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(2u64, GuestAddress(HDR + 8)).unwrap();
        r.desc(0, HDR, 16, NEXT, 1);
        r.desc(1, a, 0x200, write | NEXT, 2);
        r.desc(2, b, 0x1200, write | NEXT, 3);
        r.desc(3, STATUS, 1, WRITE, 0);
        r.post(0);
        // The driver's own writes (through vm-memory here): descriptors, avail ring, header.
        assert_eq!(dirty_pages(&r.mem), [DESC >> 12, AVAIL >> 12, HDR >> 12]);
        let used = r.kick_and_wait(0);
        (used, r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    };
    let page = |addr: u64| addr >> 12;
    let (used_page, status_page) = (page(USED), page(STATUS));
    assert_eq!(req(&mut r, T_IN, WRITE), (Some(0x1401), S_OK));
    assert_eq!(
        dirty_pages(&r.mem),
        [used_page, page(a), page(b), page(b) + 1, status_page]
    );
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(b)).unwrap(),
        3,
        "sector 3"
    );
    // A write only reads the buffers.
    assert_eq!(req(&mut r, T_OUT, 0), (Some(1), S_OK));
    assert_eq!(dirty_pages(&r.mem), [used_page, status_page]);
    // GET_ID writes through vm-memory: 20 bytes at the end of page 0x20.
    r.desc(0, HDR, 16, NEXT, 1);
    r.mem.write_obj(T_GET_ID, GuestAddress(HDR)).unwrap();
    r.desc(1, DATA + 0x1000 - 20, 20, WRITE | NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    r.post(0);
    dirty_pages(&r.mem);
    assert_eq!(r.kick_and_wait(0), Some(21));
    assert_eq!(dirty_pages(&r.mem), [used_page, page(a), status_page]);
    blk.reset();
}

#[test]
fn rng_fills_writable_buffers_only() {
    let mut rng = Rng::new(std::fs::File::open("/dev/urandom").unwrap());
    let mut r = Ring::start(&mut rng, 0, 1);
    r.desc(0, DATA, 4096, WRITE, 0);
    assert_eq!(r.submit(0), Some(4096));
    let mut buf = vec![0u8; 4096];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().any(|&b| b != buf[0]));
    r.desc(0, DATA, 4096, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    r.desc(0, 1 << 40, 4096, WRITE, 0);
    assert_eq!(r.submit(0), Some(0));
    r.desc(0, DATA, u32::MAX, WRITE, 0);
    assert_eq!(r.submit(0), Some(64 * 1024));
    rng.reset();
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn console_transmits_to_the_sink() {
    let sink = Sink::default();
    let mut c = Console::new(Some(Box::new(sink.clone())), None, ConsoleSize::new(80, 25));
    let mut r = Ring::start(&mut c, 1, 2);
    r.mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
    r.mem
        .write_slice(b" world", GuestAddress(DATA + 0x100))
        .unwrap();
    r.desc(0, DATA, 5, NEXT, 1);
    r.desc(1, DATA + 0x100, 6, NEXT, 2);
    r.desc(2, 1 << 40, 6, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    assert_eq!(&*sink.0.lock().unwrap(), b"hello world");
    c.reset();
}

#[test]
fn console_size_changes_bump_the_generation_and_interrupt_only_while_running() {
    let size = ConsoleSize::new(100, 40);
    let mut c = Console::new(None, None, size.clone());
    assert_ne!(c.features() & crate::F_CONSOLE_SIZE, 0);
    let cfg = |c: &Console| {
        let mut b = [0u8; 4];
        c.read_config(0, &mut b);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        )
    };
    assert_eq!(cfg(&c), (100, 40));
    let g0 = c.config_generation();
    // Before the driver starts the device: new size and generation, nobody to interrupt.
    assert!(size.set(120, 30));
    assert_eq!(cfg(&c), (120, 30));
    assert_ne!(c.config_generation(), g0);
    let r = Ring::start(&mut c, 1, 2);
    let g1 = c.config_generation();
    assert!(!size.set(120, 30), "same size is no change");
    assert_eq!(c.config_generation(), g1);
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 0);
    assert!(size.set(132, 50));
    assert_eq!(cfg(&c), (132, 50));
    assert_ne!(c.config_generation(), g1);
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    // After a reset (and once the device is gone) changes no longer interrupt.
    c.reset();
    assert!(size.set(80, 24));
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    drop(c);
    assert_eq!(
        Arc::strong_count(&r.irq),
        1,
        "the device's interrupt was released"
    );
}

/// A VM that records what the transport asks for.
#[derive(Default)]
struct FakeVm {
    ioevents: Mutex<Vec<u64>>,
    gsi: AtomicUsize,
}

impl pci::VmInterface for FakeVm {
    fn map_mmio(
        &self,
        _d: Arc<Mutex<dyn devices_bus::BusDevice>>,
        _base: u64,
        _len: u64,
    ) -> Result<(), String> {
        Ok(())
    }
    fn unmap_mmio(&self, _base: u64) {}
    fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> Result<(), String> {
        self.ioevents.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) {
        self.ioevents.lock().unwrap().retain(|&a| a != addr);
    }
    fn allocate_gsi(&self) -> Result<u32, String> {
        Ok(24 + self.gsi.fetch_add(1, Ordering::SeqCst) as u32)
    }
    fn free_gsi(&self, _gsi: u32) {}
    fn set_msi_route(&self, _gsi: u32, _msi: Option<(u64, u32)>) -> Result<(), String> {
        Ok(())
    }
    fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<(), String> {
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, _gsi: u32) {}
}

use devices as devices_bus;
use pci::PciDevice;

#[test]
fn transport_negotiation_queue_setup_and_hostile_writes() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vm = Arc::new(FakeVm::default());
    let rng = Rng::new(std::fs::File::open("/dev/urandom").unwrap());
    let mut d = crate::VirtioPciDevice::new(
        "rng".into(),
        Box::new(rng),
        mem.clone(),
        vm.clone(),
        0xc000_0000,
    )
    .unwrap();
    d.bar_moved(0, None, Some(0xc000_0000));
    assert_eq!(*vm.ioevents.lock().unwrap(), vec![0xc000_3000]);
    let w = |d: &mut crate::VirtioPciDevice, off: u64, v: &[u8]| d.write_bar(0, off, v);
    let r32 = |d: &mut crate::VirtioPciDevice, off: u64| {
        let mut b = [0u8; 4];
        d.read_bar(0, off, &mut b);
        u32::from_le_bytes(b)
    };
    // Hostile: odd sizes, huge offsets, other BARs, unknown fields.
    w(&mut d, 0xffff_ffff_ffff, &[1; 4]);
    w(&mut d, 0x14, &[1; 16]);
    d.write_bar(3, 0, &[1; 4]);
    w(&mut d, 0x36, &[0xff; 2]);
    assert_eq!(r32(&mut d, 0x12) & 0xffff, 1);
    w(&mut d, 0x14, &[1 | 2]);
    // Features: VERSION_1 is offered; an unoffered bit is masked, and without VERSION_1
    // FEATURES_OK is refused.
    w(&mut d, 0x00, &1u32.to_le_bytes());
    assert_eq!(r32(&mut d, 0x04), 1);
    w(&mut d, 0x14, &[1 | 2 | 8]);
    assert_eq!(d.device_status() & 8, 0);
    w(&mut d, 0x08, &1u32.to_le_bytes());
    w(&mut d, 0x0c, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(r32(&mut d, 0x0c), 1);
    w(&mut d, 0x14, &[1 | 2 | 8]);
    assert_eq!(d.device_status() & 8, 8);
    // A queue outside guest memory: DRIVER_OK leads to NEEDS_RESET, not a crash.
    w(&mut d, 0x16, &0u16.to_le_bytes());
    w(&mut d, 0x18, &16u16.to_le_bytes());
    w(&mut d, 0x20, &(1u64 << 40).to_le_bytes());
    w(&mut d, 0x1c, &1u16.to_le_bytes());
    // Queue select past the end reads zeros and ignores writes.
    w(&mut d, 0x16, &9u16.to_le_bytes());
    w(&mut d, 0x18, &0x8000u16.to_le_bytes());
    assert_eq!(r32(&mut d, 0x18) & 0xffff, 0);
    w(&mut d, 0x14, &[1 | 2 | 8 | 4]);
    assert_ne!(d.device_status() & crate::STATUS_NEEDS_RESET, 0);
    // Reset, then a valid queue works end to end through the notify ioeventfd's fallback.
    w(&mut d, 0x14, &[0]);
    assert_eq!(d.device_status(), 0);
    w(&mut d, 0x08, &1u32.to_le_bytes());
    w(&mut d, 0x0c, &1u32.to_le_bytes());
    w(&mut d, 0x14, &[1 | 2 | 8]);
    w(&mut d, 0x16, &0u16.to_le_bytes());
    w(&mut d, 0x18, &QSIZE.to_le_bytes());
    w(&mut d, 0x20, &(DESC as u32).to_le_bytes());
    w(&mut d, 0x24, &0u32.to_le_bytes());
    w(&mut d, 0x28, &AVAIL.to_le_bytes());
    w(&mut d, 0x30, &USED.to_le_bytes());
    w(&mut d, 0x1c, &1u16.to_le_bytes());
    w(&mut d, 0x14, &[1 | 2 | 8 | 4]);
    assert_eq!(d.device_status(), 1 | 2 | 8 | 4);
    mem.write_obj(DATA, GuestAddress(DESC)).unwrap();
    mem.write_obj(64u32, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(WRITE, GuestAddress(DESC + 12)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    w(&mut d, 0x3000, &0u16.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(5);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
        assert!(Instant::now() < deadline, "no used entry");
        std::thread::sleep(Duration::from_millis(1));
    }
    // ISR: queue interrupt bit, cleared by reading.
    assert_eq!(r32(&mut d, 0x1000) & 1, 1);
    assert_eq!(r32(&mut d, 0x1000), 0);
    // The BAR moves: the ioeventfd follows.
    d.bar_moved(0, Some(0xc000_0000), Some(0xd000_0000));
    assert_eq!(*vm.ioevents.lock().unwrap(), vec![0xd000_3000]);
    // pci-cfg window: read the device-type-independent num_queues through config space.
    let cap = (0x40..0x100)
        .step_by(4)
        .find(|&o| {
            let v = d.read_config_register(o / 4);
            v & 0xff == 0x09 && (v >> 24) & 0xff == 5
        })
        .unwrap();
    d.write_config(cap + 4, &[0]);
    d.write_config(cap + 8, &0x12u32.to_le_bytes());
    d.write_config(cap + 12, &2u32.to_le_bytes());
    assert_eq!(d.read_config_register(cap / 4 + 4), 1);
    d.write_config(cap + 8, &0xffff_fff0u32.to_le_bytes());
    assert_eq!(d.read_config_register(cap / 4 + 4), 0);
    drop(d);
    assert!(vm.ioevents.lock().unwrap().is_empty());
}

/// Random configuration-space and BAR traffic, as a hostile driver could send: nothing panics,
/// the device keeps answering with its identity.
#[test]
fn random_config_and_bar_writes_do_not_break_the_device() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let vm = Arc::new(FakeVm::default());
    let (_f, blk) = disk(64 * 1024, false);
    let dev = crate::VirtioPciDevice::new("d".into(), Box::new(blk), mem, vm.clone(), 0xc000_0000)
        .unwrap();
    let root = Arc::new(Mutex::new(pci::PciRoot::new(vm)));
    root.lock()
        .unwrap()
        .add_device(1, Arc::new(Mutex::new(dev)))
        .unwrap();
    let mut ecam = pci::PciConfigMmio(root.clone());
    let mut io = pci::PciConfigIo::new(root.clone());
    use devices::BusDevice;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 4, 8, 3][(r % 5) as usize];
        let data = next().to_le_bytes();
        let off = (1 << 15) + (next() % 0x1000);
        match r % 4 {
            0 => ecam.write(off, &data[..len]),
            1 => {
                let mut b = [0u8; 8];
                ecam.read(off, &mut b[..len]);
            }
            2 => io.write(next() % 8, &data[..len]),
            _ => {
                let mut b = [0u8; 8];
                io.read(next() % 8, &mut b[..len]);
            }
        }
    }
    let mut id = [0u8; 4];
    ecam.read(1 << 15, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
}

#[test]
fn console_receives_host_input() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    use std::os::fd::FromRawFd;
    // SAFETY: fresh fds we own.
    let (rd, mut wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mut c = Console::new(None, Some(rd), ConsoleSize::new(80, 25));
    let mut r = Ring::start(&mut c, 0, 2);
    // Input before any buffer: kept until the driver adds one.
    wr.write_all(b"abc").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.used_idx(), 0);
    r.desc(0, DATA, 2, WRITE | NEXT, 1);
    r.desc(1, DATA + 0x100, 64, WRITE, 0);
    assert_eq!(r.submit(0), Some(3));
    let mut b = [0u8; 2];
    r.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(&b, b"ab");
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap(),
        b'c'
    );
    // A read-only receive buffer takes nothing; end of input closes it without spinning.
    wr.write_all(b"xyz").unwrap();
    r.desc(0, DATA, 64, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    drop(wr);
    r.desc(0, DATA, 64, WRITE, 0);
    assert_eq!(r.submit(0), Some(3));
    c.reset();
}

/// virtio-net with malformed chains, on a TAP in a private network namespace.
#[test]
fn net_malformed_chains_are_dropped() {
    std::thread::spawn(net_malformed_chains_in_private_netns)
        .join()
        .unwrap();
}

fn net_malformed_chains_in_private_netns() {
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let tap = net_util::Tap::open("vdt0", 1)
        .expect("creating a TAP (the tests run as root with /dev/net/tun)")
        .remove(0);
    tap.enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        vec![tap],
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], mac.bytes());
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    // Transmit queue (1): a writable descriptor, a buffer outside memory, a header-only frame,
    // an oversized frame: all dropped, all completed.
    let mut r = Ring::start(&mut net, 1, 3);
    for (addr, len, flags) in [
        (DATA, 64, WRITE),
        (1 << 40, 64, 0),
        (DATA, 12, 0),
        (DATA, 70_000, 0),
        (u64::MAX - 8, 64, 0),
    ] {
        r.desc(0, addr, len, flags, 0);
        assert_eq!(r.submit(0), Some(0));
    }
    // A good frame goes out (to a TAP nobody reads).
    r.desc(0, DATA, 12 + 60, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    // The worker publishes its counters once per batch: read them once it has stopped.
    net.reset();
    use devices::DeviceCounters;
    let c = net.counters().unwrap().counters();
    assert_eq!((c["tx_frames"], c["tx_bytes"], c["rx_frames"]), (1, 60, 0));
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

/// Activates `dev` with all its `n` queues ready (queue `i` at 0x10000 * (i + 1)) and the
/// feature bits `acked`.
fn start_all(
    dev: &mut dyn VirtioDevice,
    n: usize,
    acked: u64,
) -> (GuestMemoryMmap, Vec<QRing>, Arc<DeviceStatus>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let mut rings = Vec::new();
    let mut queues = Vec::new();
    for i in 0..n {
        let base = 0x10000 * (i as u64 + 1);
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        queue.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        queue.set_ready(true);
        queue.set_event_idx(acked & crate::F_RING_EVENT_IDX != 0);
        assert!(queue.is_valid(&mem));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(Some((queue, kick.try_clone().unwrap())));
        rings.push(QRing {
            base,
            kick,
            next_avail: 0,
            seen_used: 0,
        });
    }
    let status = Arc::new(DeviceStatus::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Irq::default()),
        queues,
        acked_features: acked,
        status: status.clone(),
    })
    .unwrap();
    (mem, rings, status)
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A `virtio_net_hdr_v1` and an Ethernet/IPv4/UDP frame (UDP checksum 0: none).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
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

/// A received frame marks exactly the pages it filled (and the used ring's) in the dirty
/// bitmaps, not the rest of the buffer.
#[test]
fn net_receive_marks_the_pages_it_fills() {
    std::thread::spawn(net_receive_marks_in_private_netns)
        .join()
        .unwrap();
}

fn net_receive_marks_in_private_netns() {
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let tap = net_util::Tap::open("vdm0", 1)
        .expect("creating a TAP (the tests run as root with /dev/net/tun)")
        .remove(0);
    // No IPv6 chatter (router solicitations) in the receive queue.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vdm0/disable_ipv6", "1");
    tap.set_ip(
        "10.8.0.1".parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
    )
    .unwrap();
    tap.enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        vec![tap],
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    let mut r = Ring::start(&mut net, 0, 3);
    // One receive buffer of 0x2000 bytes from 0x40 before page 0x21: pages 0x20-0x22.
    let buf = DATA + 0x1000 - 0x40;
    r.desc(0, buf, 0x2000, WRITE, 0);
    r.post(0);
    // The device looks (the TAP is empty) and waits for the frame.
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    static_arp("vdm0", [10, 8, 0, 2], mac.bytes());
    dirty_pages(&r.mem);
    let host = std::net::UdpSocket::bind("10.8.0.1:7000").unwrap();
    host.send_to(&[0x5a; 100], "10.8.0.2:7000").unwrap();
    // Header, Ethernet, IPv4, UDP, payload: 0x40 bytes in page 0x20, the rest in page 0x21.
    let n = 12 + 14 + 20 + 8 + 100;
    assert_eq!(r.wait_used(0), Some(n));
    assert_eq!(
        r.mem
            .read_obj::<u8>(GuestAddress(buf + u64::from(n) - 1))
            .unwrap(),
        0x5a
    );
    assert_eq!(dirty_pages(&r.mem), [USED >> 12, 0x20, 0x21]);
    net.reset();
}

/// Two queue pairs and the control queue: pair 1 transmits to the host, only pair 0 receives
/// until VQ_PAIRS_SET, control commands are checked, and a frame spans merged buffers.
#[test]
fn net_multiqueue_control_queue_and_merged_buffers() {
    std::thread::spawn(net_multiqueue_in_private_netns)
        .join()
        .unwrap();
}

fn net_multiqueue_in_private_netns() {
    use devices::DeviceCounters;
    use virtio_bindings::virtio_net as vn;
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let taps = net_util::Tap::open("vmq0", 2).expect("creating a multi-queue TAP");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vmq0/disable_ipv6", "1");
    let host_mac = net_util::MacAddr::random_local();
    taps[0]
        .set_ip(
            "10.9.0.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
        )
        .unwrap();
    taps[0].set_mac(host_mac).unwrap();
    taps[0].enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        taps,
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    assert_eq!(net.queue_max_sizes().len(), 5);
    let offered = net.features();
    for b in [
        vn::VIRTIO_NET_F_MQ,
        vn::VIRTIO_NET_F_CTRL_VQ,
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ] {
        assert!(offered & (1 << b) != 0, "feature {b} not offered");
    }
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        2,
        "max_virtqueue_pairs"
    );
    let f = |b: u32| 1u64 << b;
    let acked = crate::F_VERSION_1
        | crate::F_RING_EVENT_IDX
        | f(vn::VIRTIO_NET_F_MQ)
        | f(vn::VIRTIO_NET_F_CTRL_VQ)
        | f(vn::VIRTIO_NET_F_MRG_RXBUF)
        | f(vn::VIRTIO_NET_F_GUEST_CSUM)
        | f(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
    let (mem, mut rings, status) = start_all(&mut net, 5, acked);

    // Control queue (4): readable command, writable status byte.
    let ctrl = |rings: &mut Vec<QRing>, cmd: &[u8]| -> (u32, u8) {
        let r = &mut rings[4];
        mem.write_slice(cmd, GuestAddress(0x80000)).unwrap();
        mem.write_obj(0xaau8, GuestAddress(0x80100)).unwrap();
        r.desc(&mem, 0, 0x80000, cmd.len() as u32, NEXT, 1);
        r.desc(&mem, 1, 0x80100, 1, WRITE, 0);
        r.post(&mem, 0);
        let (id, len) = r.next_used(&mem).expect("control command not completed");
        assert_eq!(id, 0);
        (len, mem.read_obj(GuestAddress(0x80100)).unwrap())
    };
    let (ok, err) = (vn::VIRTIO_NET_OK as u8, vn::VIRTIO_NET_ERR as u8);
    let mq = vn::VIRTIO_NET_CTRL_MQ as u8;
    let set = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    assert_eq!(ctrl(&mut rings, &[mq, set, 3, 0]), (1, err), "3 pairs of 2");
    assert_eq!(ctrl(&mut rings, &[mq, set, 0, 0]), (1, err), "0 pairs");
    assert_eq!(ctrl(&mut rings, &[mq, set, 1]), (1, err), "short command");
    assert_eq!(ctrl(&mut rings, &[9, 9]), (1, err), "unknown class");
    let off = vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
    let mut cmd = vec![off, vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8];
    cmd.extend_from_slice(&f(vn::VIRTIO_NET_F_GUEST_TSO4).to_le_bytes());
    assert_eq!(ctrl(&mut rings, &cmd), (1, err), "offload not negotiated");
    cmd.truncate(2);
    cmd.extend_from_slice(&f(vn::VIRTIO_NET_F_GUEST_CSUM).to_le_bytes());
    assert_eq!(ctrl(&mut rings, &cmd), (1, ok), "negotiated offload");
    // A command with no status byte is completed with nothing written.
    rings[4].desc(&mem, 0, 0x80000, 4, 0, 0);
    rings[4].post(&mem, 0);
    assert_eq!(rings[4].next_used(&mem), Some((0, 0)));

    // Only pair 0 is in use so far: host traffic arrives on receive queue 0, never 2.
    static_arp("vmq0", [10, 9, 0, 2], mac.bytes());
    for (q, base) in [(0usize, 0x100000u64), (2, 0x140000)] {
        for i in 0..4u16 {
            // Small buffers, so a 300-byte datagram needs three of them (MRG_RXBUF).
            let a = base + 0x1000 * u64::from(i);
            rings[q].desc(&mem, i, a, 128, WRITE, 0);
            rings[q].post(&mem, i);
        }
    }
    let host = std::net::UdpSocket::bind("10.9.0.1:7000").unwrap();
    let payload = [0x5au8; 300];
    host.send_to(&payload, "10.9.0.2:7000").unwrap();
    let mut lens = Vec::new();
    for _ in 0..3 {
        let (id, len) = rings[0]
            .next_used(&mem)
            .expect("frame not received on queue 0");
        lens.push((id, len));
    }
    let frame_len = 12 + 14 + 20 + 8 + 300;
    assert_eq!(lens, vec![(0, 128), (1, 128), (2, frame_len - 256)]);
    let num_buffers: u16 = mem.read_obj(GuestAddress(0x100000 + 10)).unwrap();
    assert_eq!(num_buffers, 3);
    let mut got = vec![0u8; frame_len as usize];
    for (k, chunk) in got.chunks_mut(128).enumerate() {
        mem.read_slice(chunk, GuestAddress(0x100000 + 0x1000 * k as u64))
            .unwrap();
    }
    assert_eq!(&got[12 + 14 + 28..], &payload[..]);
    assert_eq!(
        rings[2].used_idx(&mem),
        0,
        "a frame reached the unused pair"
    );

    // Pair 1 transmits: the host gets the datagram.
    let frame = udp_frame(
        host_mac.bytes(),
        mac.bytes(),
        [10, 9, 0, 2],
        [10, 9, 0, 1],
        7000,
        b"from pair 1",
    );
    mem.write_slice(&frame, GuestAddress(0x90000)).unwrap();
    rings[3].desc(&mem, 0, 0x90000, frame.len() as u32, 0, 0);
    rings[3].post(&mem, 0);
    assert_eq!(rings[3].next_used(&mem), Some((0, 0)));
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = host.recv_from(&mut buf).expect("pair 1's datagram");
    assert_eq!(&buf[..n], b"from pair 1");
    assert_eq!(from.to_string(), "10.9.0.2:7000");

    // Both pairs in use: the TAP steers flows to either; all of them arrive.
    assert_eq!(ctrl(&mut rings, &[mq, set, 2, 0]), (1, ok));
    for q in [0usize, 2] {
        for i in 4..12u16 {
            let a = 0x100000 + 0x40000 * (q as u64 / 2) + 0x1000 * u64::from(i);
            rings[q].desc(&mem, i, a, 2048, WRITE, 0);
            rings[q].post(&mem, i);
        }
    }
    for port in 7001..7005 {
        let s = std::net::UdpSocket::bind(format!("10.9.0.1:{port}")).unwrap();
        s.send_to(b"x", "10.9.0.2:7000").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.counters().unwrap().counters()["rx_frames"] < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = net.counters().unwrap().counters();
    assert_eq!((c["rx_frames"], c["tx_frames"]), (5, 1), "{c:?}");
    assert_eq!(c["tx_bytes"], frame.len() as u64 - 12);
    assert_eq!(c["rx_bytes"], 342 + 4 * (14 + 28 + 1));
    assert!(!status.needs_reset());
    net.reset();
}
