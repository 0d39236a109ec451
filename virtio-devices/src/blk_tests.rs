//! virtio-blk driven through a real split ring with its worker running (the fake driver of
//! `crate::tests`), with and without io_uring: well-formed requests, malformed ones a hostile
//! driver could write, a read-only disk, a broken avail index, and the guest pages it marks
//! dirty.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::block::{
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use crate::tests::{
    dirty_pages, disk, disk_with, request, Buf, Ring, AVAIL, DATA, DESC, HDR, INDIRECT, NEXT,
    STATUS, USED, WRITE,
};
use crate::VirtioDevice;

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

/// With `queue_affinity` each queue has a worker of its own: a driver that enables queue 1 only
/// gets it served, and a pause reports that queue's position (queue 0's worker never started).
#[test]
fn blk_queue_of_its_own_is_served_and_paused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f.as_file(), &[5u8; 64 * 1024]).unwrap();
    let d = block::open_disk(f.path(), &Default::default()).unwrap();
    let cpu = seccomp::CpuSet::allowed().unwrap().cpus()[0];
    let mut blk = crate::Block::new(
        d,
        crate::BlockConfig {
            num_queues: 2,
            queue_size: crate::tests::QSIZE,
            serial: "per-queue".into(),
            io_uring: false,
            queue_affinity: vec![(1, vec![cpu])],
        },
    )
    .unwrap();
    let mut r = Ring::start(&mut blk, 1, 2);
    assert_eq!(
        request(&mut r, T_IN, 1, (DATA, 512, WRITE)),
        (Some(513), S_OK)
    );
    let mut buf = [0u8; 512];
    r.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 5));
    assert!(blk.queue_positions().is_none(), "running");
    blk.pause().unwrap();
    assert_eq!(blk.queue_positions(), Some(vec![None, Some((1, 1))]));
    blk.resume().unwrap();
    assert_eq!(request(&mut r, T_FLUSH, 0, (DATA, 0, 0)).1, S_OK);
    blk.reset();
    assert!(blk.queue_positions().is_none(), "reset");
}

/// A queue thread that cannot be pinned (its CPU is not one the host lets it run on) marks the
/// device NEEDS_RESET instead of serving unpinned; the VMM goes on.
#[test]
fn blk_queue_thread_that_cannot_be_pinned_breaks_the_device() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut f.as_file(), &[0u8; 64 * 1024]).unwrap();
    let d = block::open_disk(f.path(), &Default::default()).unwrap();
    let mut blk = crate::Block::new(
        d,
        crate::BlockConfig {
            num_queues: 1,
            queue_size: crate::tests::QSIZE,
            serial: "unpinnable".into(),
            io_uring: false,
            queue_affinity: vec![(0, vec![1023])],
        },
    )
    .unwrap();
    let r = Ring::start(&mut blk, 0, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.status.needs_reset() {
        assert!(Instant::now() < deadline, "not marked NEEDS_RESET");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(r.irq.config.load(Ordering::SeqCst) > 0, "config interrupt");
    blk.reset();
}

/// `vm.resize-disk` on a running disk: the worker is paused for it and goes on, the config
/// space says the new capacity with a new generation and a configuration interrupt, a
/// request past the old end is served, the file has the new length; what cannot be done is
/// refused and changes nothing.
#[test]
fn blk_resized_while_running() {
    let (f, mut blk) = disk(8192, false);
    let mut r = Ring::start(&mut blk, 0, 1);
    let capacity = |blk: &crate::Block| {
        let mut c = [0u8; 8];
        blk.read_config(0, &mut c);
        u64::from_le_bytes(c)
    };
    assert_eq!(capacity(&blk), 16);
    assert_eq!(request(&mut r, T_IN, 20, (DATA, 512, WRITE)).1, S_IOERR);
    let generation = blk.config_generation();
    for (bad, why) in [(0u64, "multiple of 512"), (1000, "multiple of 512")] {
        let e = blk.resize(bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    assert_eq!((capacity(&blk), blk.config_generation()), (16, generation));
    blk.resize(32 * 512).unwrap();
    assert_eq!(capacity(&blk), 32);
    assert_ne!(blk.config_generation(), generation);
    assert_eq!(r.irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 32 * 512);
    r.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut r, T_OUT, 20, (DATA, 512, 0)).1, S_OK);
    assert_eq!(request(&mut r, T_IN, 20, (DATA, 512, WRITE)).1, S_OK);
    let content = std::fs::read(f.path()).unwrap();
    assert!(content[20 * 512..21 * 512].iter().all(|&b| b == 0x5a));
    let (_g, mut ro) = disk(8192, true);
    assert!(ro.resize(16384).unwrap_err().contains("read-only"));
}
