//! virtio-balloon driven through real split rings (the fake driver of `tests.rs`) with its
//! worker running: the configuration, the features and queues per option, pages given back to
//! the host (private and shared guest RAM), hostile PFNs and ranges, statistics, state.

use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::balloon::{pfn_runs, release_guest_range};
use crate::tests::{Irq, QRing, QSIZE, WRITE};
use crate::{
    balloon_queues, ActivateContext, Balloon, BalloonOptions, BalloonQueue, DeviceStatus,
    VirtioDevice, VirtioDeviceState, F_BALLOON_DEFLATE_ON_OOM, F_BALLOON_REPORTING,
    F_BALLOON_STATS_VQ, F_VERSION_1, TYPE_BALLOON,
};

const PAGE: u64 = 4096;
const MEM_SIZE: usize = 4 << 20;
/// Where the data pages the tests balloon lie (above the rings, at 0x10000 * (i + 1)).
const DATA: u64 = 1 << 20;
/// Where the PFN arrays and statistics buffers lie.
const BUF: u64 = 0x80000;

fn private_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Guest RAM as `shared=on` maps it: a shared mapping of a memfd. Returns the file too.
fn memfd_mem() -> (GuestMemoryMmap, std::fs::File) {
    // SAFETY: a plain memfd_create with a NUL-terminated name; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"balloon_test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    let m = guest_memory::region_builder(MEM_SIZE)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let r = GuestRegionMmap::new(m, GuestAddress(0)).unwrap();
    (GuestMemoryMmap::from_regions(vec![r]).unwrap(), file)
}

/// Activates `dev` on `mem` with its first `n` queues ready (queue `i` at 0x10000 * (i + 1))
/// and the feature bits `acked`.
fn start(dev: &mut Balloon, mem: &GuestMemoryMmap, n: usize, acked: u64) -> (Vec<QRing>, Arc<Irq>) {
    let mut rings = Vec::new();
    let mut queues = Vec::new();
    for i in 0..n {
        let base = 0x10000 * (i as u64 + 1);
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        queue.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(Some((queue, kick.try_clone().unwrap())));
        rings.push(QRing {
            base,
            kick,
            next_avail: 0,
            seen_used: 0,
        });
    }
    let irq = Arc::new(Irq::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues,
        acked_features: acked,
        status: Arc::new(DeviceStatus::default()),
        dma: None,
    })
    .unwrap();
    (rings, irq)
}

fn balloon(options: BalloonOptions) -> Balloon {
    Balloon::new(0, options).unwrap()
}

/// Sends `pfns` on `ring` (inflate or deflate) in one buffer and waits for it to be used.
fn send_pfns(ring: &mut QRing, mem: &GuestMemoryMmap, pfns: &[u32]) {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    ring.desc(mem, 0, BUF, bytes.len() as u32, 0, 0);
    ring.post(mem, 0);
    assert_eq!(ring.next_used(mem), Some((0, 0)), "the buffer is used");
}

/// Fills page `pfn` with `v`.
fn fill(mem: &GuestMemoryMmap, pfn: u64, v: u8) {
    mem.write_slice(&[v; PAGE as usize], GuestAddress(pfn * PAGE))
        .unwrap();
}

/// The first and last byte of page `pfn`, if they are equal.
fn page_byte(mem: &GuestMemoryMmap, pfn: u64) -> u8 {
    let a: u8 = mem.read_obj(GuestAddress(pfn * PAGE)).unwrap();
    let b: u8 = mem.read_obj(GuestAddress(pfn * PAGE + PAGE - 1)).unwrap();
    assert_eq!(a, b, "page {pfn:#x} is uniform");
    a
}

/// Whether page `pfn` is in host memory (mincore on its host address).
fn resident(mem: &GuestMemoryMmap, pfn: u64) -> bool {
    let p = mem.get_host_address(GuestAddress(pfn * PAGE)).unwrap();
    let mut v = 0u8;
    // SAFETY: one page of a live mapping (guest RAM); `v` holds the one result byte.
    let rc = unsafe { libc::mincore(p.cast(), PAGE as usize, &mut v) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v & 1 != 0
}

fn config(dev: &Balloon) -> (u32, u32) {
    let mut c = [0u8; 8];
    dev.read_config(0, &mut c);
    (
        u32::from_le_bytes(c[0..4].try_into().unwrap()),
        u32::from_le_bytes(c[4..8].try_into().unwrap()),
    )
}

#[test]
fn balloon_config_space_layout_and_read_only_num_pages() {
    let mut dev = Balloon::new(8 << 20, BalloonOptions::default()).unwrap();
    let control = dev.control();
    assert_eq!(dev.device_type(), TYPE_BALLOON);
    assert_eq!(TYPE_BALLOON, 5);
    // num_pages (4 KiB pages) at 0, actual at 4, nothing after.
    assert_eq!(config(&dev), (2048, 0));
    let mut past = [0xffu8; 4];
    dev.read_config(8, &mut past);
    assert_eq!(past, [0; 4]);
    let mut one = [0u8; 2];
    dev.read_config(1, &mut one);
    assert_eq!(one, [8, 0], "2048 = 0x800, little-endian");
    // The driver writes actual (whole or in pieces); num_pages is the host's.
    dev.write_config(4, &100u32.to_le_bytes());
    assert_eq!(config(&dev), (2048, 100));
    assert_eq!(control.actual(), 100 * PAGE);
    dev.write_config(5, &[1]);
    assert_eq!(config(&dev), (2048, 356));
    dev.write_config(0, &7u32.to_le_bytes());
    dev.write_config(2, &[0xff, 0xff]);
    assert_eq!(config(&dev), (2048, 356), "num_pages is read-only");
    dev.write_config(u64::MAX, &[1, 2]);
    assert_eq!(config(&dev), (2048, 356));
    // Sizes round down to pages; more than 2^32 - 1 pages cannot be asked for.
    assert!(control.set_target(8 << 20).is_ok_and(|changed| !changed));
    assert!(control.set_target(PAGE + 1).unwrap());
    assert_eq!((config(&dev).0, control.target()), (1, PAGE));
    assert!(control.set_target(1 << 44).is_err());
    assert!(Balloon::new(1 << 44, BalloonOptions::default()).is_err());
    assert_eq!(control.target(), PAGE, "a refused target changes nothing");
    // A reset gives the pages back to the guest (actual 0); the host's target stays.
    dev.reset();
    assert_eq!(config(&dev), (1, 0));
}

#[test]
fn balloon_target_changes_interrupt_only_while_running() {
    let mut dev = balloon(BalloonOptions::default());
    let control = dev.control();
    let g0 = dev.config_generation();
    // Not started: the generation moves, no interrupt (there is none yet).
    assert!(control.set_target(1 << 20).unwrap());
    assert_eq!(dev.config_generation(), g0 + 1);
    let mem = private_mem();
    let (_rings, irq) = start(&mut dev, &mem, 2, F_VERSION_1);
    assert!(control.set_target(2 << 20).unwrap());
    assert_eq!(dev.config_generation(), g0 + 2);
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    assert!(!control.set_target(2 << 20).unwrap(), "the same target");
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    // Paused: no interrupt until resumed, then one.
    dev.pause().unwrap();
    assert!(control.set_target(3 << 20).unwrap());
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    dev.resume().unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 2);
    dev.pause().unwrap();
    dev.resume().unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 2, "nothing changed");
    dev.reset();
    assert!(control.set_target(4 << 20).unwrap());
    assert_eq!(irq.config.load(Ordering::SeqCst), 2, "reset: no interrupt");
}

#[test]
fn balloon_features_and_queues_follow_the_options() {
    for (options, features, queues) in [
        (BalloonOptions::default(), F_VERSION_1, 2),
        (
            BalloonOptions {
                deflate_on_oom: true,
                ..Default::default()
            },
            F_VERSION_1 | F_BALLOON_DEFLATE_ON_OOM,
            2,
        ),
        (
            BalloonOptions {
                free_page_reporting: true,
                ..Default::default()
            },
            F_VERSION_1 | F_BALLOON_REPORTING,
            3,
        ),
        (
            BalloonOptions {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats: true,
            },
            F_VERSION_1 | F_BALLOON_DEFLATE_ON_OOM | F_BALLOON_REPORTING | F_BALLOON_STATS_VQ,
            4,
        ),
    ] {
        let dev = balloon(options);
        assert_eq!(dev.features(), features, "{options:?}");
        assert_eq!(dev.queue_max_sizes().len(), queues, "{options:?}");
    }
    assert_eq!(
        (
            F_BALLOON_STATS_VQ,
            F_BALLOON_DEFLATE_ON_OOM,
            F_BALLOON_REPORTING
        ),
        (1 << 1, 1 << 2, 1 << 5),
        "the spec's bits"
    );
}

/// A queue whose feature was not negotiated takes no index (5.5.2): the reporting queue is
/// queue 2 without the statistics queue, 3 with it.
#[test]
fn balloon_reporting_queue_index_follows_negotiated_features() {
    use BalloonQueue::*;
    assert_eq!(balloon_queues(F_VERSION_1), [Inflate, Deflate]);
    assert_eq!(
        balloon_queues(F_VERSION_1 | F_BALLOON_REPORTING),
        [Inflate, Deflate, Reporting]
    );
    assert_eq!(
        balloon_queues(F_VERSION_1 | F_BALLOON_STATS_VQ | F_BALLOON_REPORTING),
        [Inflate, Deflate, Stats, Reporting]
    );
    assert_eq!(
        balloon_queues(F_VERSION_1 | F_BALLOON_STATS_VQ | F_BALLOON_DEFLATE_ON_OOM),
        [Inflate, Deflate, Stats]
    );
    // Driven: a device offering both, with a driver that takes reporting only (queue 2) and
    // one that takes both (queue 3); the report is served on that queue.
    let all = BalloonOptions {
        free_page_reporting: true,
        stats: true,
        ..Default::default()
    };
    for (acked, index) in [
        (F_VERSION_1 | F_BALLOON_REPORTING, 2),
        (F_VERSION_1 | F_BALLOON_REPORTING | F_BALLOON_STATS_VQ, 3),
    ] {
        let mut dev = balloon(all);
        let mem = private_mem();
        let (mut rings, _irq) = start(&mut dev, &mem, index + 1, acked);
        let first = DATA / PAGE + 16;
        for p in first..first + 4 {
            fill(&mem, p, 0x5a);
        }
        // One report of two ranges: pages 0-1 and 3 (page 2 stays the guest's).
        let r = &mut rings[index];
        r.desc(&mem, 0, first * PAGE, 2 * PAGE as u32, WRITE | 1, 1);
        r.desc(&mem, 1, (first + 3) * PAGE, PAGE as u32, WRITE, 0);
        r.post(&mem, 0);
        assert_eq!(r.next_used(&mem), Some((0, 0)), "acked {acked:#x}");
        let got: Vec<u8> = (first..first + 4).map(|p| page_byte(&mem, p)).collect();
        assert_eq!(got, [0, 0, 0x5a, 0], "acked {acked:#x}");
        dev.reset();
    }
}

#[test]
fn balloon_pfn_runs_coalesce() {
    assert_eq!(pfn_runs(&mut []), []);
    assert_eq!(pfn_runs(&mut [7]), [(7, 1)]);
    // Linux hands pages over in any order: sorted, consecutive pages make one run.
    assert_eq!(
        pfn_runs(&mut [12, 10, 11, 3, 2, 20, 13]),
        [(2, 2), (10, 4), (20, 1)]
    );
    assert_eq!(pfn_runs(&mut [5, 5, 6, 6, 7]), [(5, 3)], "duplicates once");
    assert_eq!(
        pfn_runs(&mut [u32::MAX, u32::MAX - 1, 0]),
        [(0, 1), (u64::from(u32::MAX) - 1, 2)]
    );
}

/// Inflating really gives private anonymous pages back: they leave host memory and read as
/// zero; their neighbours keep their data; deflating only acknowledges.
#[test]
fn balloon_inflate_drops_private_pages() {
    let mut dev = balloon(BalloonOptions::default());
    let mem = private_mem();
    let (mut rings, _irq) = start(&mut dev, &mem, 2, F_VERSION_1);
    let first = DATA / PAGE;
    for p in first..first + 8 {
        fill(&mem, p, 0xa5);
        assert!(resident(&mem, p));
    }
    // Pages 1, 2, 3 (one run, given in reverse) and 6 of the eight.
    let ballooned = [first + 3, first + 1, first + 2, first + 6];
    send_pfns(
        &mut rings[0],
        &mem,
        &ballooned.map(|p| u32::try_from(p).unwrap()),
    );
    for p in first..first + 8 {
        let gone = ballooned.contains(&p);
        assert_eq!(resident(&mem, p), !gone, "page {p:#x} resident");
        assert_eq!(
            page_byte(&mem, p),
            if gone { 0 } else { 0xa5 },
            "page {p:#x}"
        );
    }
    // Deflate: acknowledged; the pages are there to be used again.
    send_pfns(&mut rings[1], &mem, &[u32::try_from(first + 1).unwrap()]);
    fill(&mem, first + 1, 0x11);
    assert_eq!(page_byte(&mem, first + 1), 0x11);
    dev.reset();
}

/// With `shared=on` guest RAM is a shared memfd mapping: inflating frees the file's pages
/// (MADV_DONTNEED would only unmap them from this process).
#[test]
fn balloon_inflate_frees_shared_memfd_pages() {
    let mut dev = balloon(BalloonOptions::default());
    let (mem, file) = memfd_mem();
    let (mut rings, _irq) = start(&mut dev, &mem, 2, F_VERSION_1);
    let first = DATA / PAGE;
    let n = 64u64;
    for p in first..first + n {
        fill(&mem, p, 0x3c);
    }
    // The pages the inflate request itself writes (its ring, the PFN array) are in the file
    // before it is measured.
    for p in (0x10000 / PAGE..0x13000 / PAGE).chain([BUF / PAGE]) {
        fill(&mem, p, 0);
    }
    let before = file.metadata().unwrap().blocks();
    let pfns: Vec<u32> = (first..first + n)
        .map(|p| u32::try_from(p).unwrap())
        .collect();
    send_pfns(&mut rings[0], &mem, &pfns);
    let after = file.metadata().unwrap().blocks();
    // st_blocks counts 512-byte blocks: 64 pages are 512 of them.
    assert!(
        before - after >= n * PAGE / 512,
        "the memfd kept its pages: {before} -> {after} blocks"
    );
    // The file itself reads zero there now, as the guest does.
    let mut b = [0xffu8; 16];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut b, DATA).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(page_byte(&mem, first), 0);
    dev.reset();
}

/// A hostile driver's PFNs and ranges outside guest RAM are skipped, those inside served;
/// nothing outside guest RAM is touched and the device keeps working.
#[test]
fn balloon_hostile_pfns_and_ranges_are_skipped() {
    let mut dev = balloon(BalloonOptions {
        free_page_reporting: true,
        ..Default::default()
    });
    let mem = private_mem();
    let (mut rings, _irq) = start(&mut dev, &mem, 3, F_VERSION_1 | F_BALLOON_REPORTING);
    let first = DATA / PAGE;
    for p in first..first + 4 {
        fill(&mem, p, 0x77);
    }
    let end_pfn = (MEM_SIZE as u64 / PAGE) as u32;
    send_pfns(
        &mut rings[0],
        &mem,
        &[
            u32::MAX,
            end_pfn,
            end_pfn - 1,
            first as u32 + 1,
            0xdead_beef,
        ],
    );
    assert_eq!(page_byte(&mem, first), 0x77);
    assert_eq!(page_byte(&mem, first + 1), 0);
    // A PFN array that is itself outside guest memory, and an array cut mid-PFN: ignored.
    rings[0].desc(&mem, 0, 1 << 40, 64, 0, 0);
    rings[0].post(&mem, 0);
    assert_eq!(rings[0].next_used(&mem), Some((0, 0)));
    // A report that starts mid-page and runs past the end of RAM: whole pages only.
    let r = &mut rings[2];
    r.desc(&mem, 0, (first + 2) * PAGE + 1, u32::MAX, WRITE, 0);
    r.post(&mem, 0);
    assert_eq!(r.next_used(&mem), Some((0, 0)));
    assert_eq!(page_byte(&mem, first), 0x77);
    assert_eq!(page_byte(&mem, first + 2), 0x77, "a partial page stays");
    assert_eq!(page_byte(&mem, first + 3), 0);
    // Still serving.
    fill(&mem, first, 0x77);
    send_pfns(&mut rings[0], &mem, &[first as u32]);
    assert_eq!(page_byte(&mem, first), 0);
    dev.reset();
}

/// An inflate buffer that starts in RAM but runs past its end (a 4 GiB length) is refused
/// whole: the PFNs in its first part are not released, nor is the rest of RAM read as PFNs.
#[test]
fn balloon_inflate_array_past_the_end_of_ram_is_refused() {
    let mut dev = balloon(BalloonOptions::default());
    let mem = private_mem();
    let (mut rings, _irq) = start(&mut dev, &mem, 2, F_VERSION_1);
    let first = DATA / PAGE;
    for p in first..first + 4 {
        fill(&mem, p, 0x77);
    }
    let pfns: Vec<u8> = (first..first + 4)
        .flat_map(|p| (p as u32).to_le_bytes())
        .collect();
    mem.write_slice(&pfns, GuestAddress(BUF)).unwrap();
    rings[0].desc(&mem, 0, BUF, u32::MAX, 0, 0);
    rings[0].post(&mem, 0);
    assert_eq!(rings[0].next_used(&mem), Some((0, 0)), "the buffer is used");
    for p in first..first + 4 {
        assert_eq!(page_byte(&mem, p), 0x77, "page {p:#x} kept");
    }
    // The same PFNs in a buffer of the right length are served.
    send_pfns(&mut rings[0], &mem, &[first as u32]);
    assert_eq!(page_byte(&mem, first), 0);
    dev.reset();
}

/// A range across two regions and the hole between them: both regions' parts are released.
#[test]
fn balloon_release_spans_regions_and_skips_holes() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x20000), 0x10000),
    ])
    .unwrap();
    for p in 0..0x30 {
        if mem.address_in_range(GuestAddress(p * PAGE)) {
            fill(&mem, p, 0xee);
        }
    }
    // From page 0xe to 0x22: two pages of region 0, the hole, two of region 1.
    let released = release_guest_range(&mem, 0xe * PAGE, 0x14 * PAGE);
    assert_eq!(released, 4 * PAGE);
    for (p, want) in [
        (0xd, 0xee),
        (0xe, 0),
        (0xf, 0),
        (0x20, 0),
        (0x21, 0),
        (0x22, 0xee),
    ] {
        assert_eq!(page_byte(&mem, p), want, "page {p:#x}");
    }
    assert_eq!(release_guest_range(&mem, 0x10000, 0x10000), 0, "the hole");
    assert_eq!(release_guest_range(&mem, u64::MAX - 10, 100), 0);
    assert_eq!(release_guest_range(&mem, 0x100, 0xf00), 0, "no whole page");
}

/// With VIRTIO_BALLOON_F_STATS_VQ: the driver's buffer is read and held; a request hands it
/// back (the driver then sends fresh statistics), and so does a pause.
#[test]
fn balloon_statistics_are_kept_and_requested() {
    let mut dev = balloon(BalloonOptions {
        stats: true,
        ..Default::default()
    });
    let control = dev.control();
    let mem = private_mem();
    let (mut rings, irq) = start(&mut dev, &mem, 3, F_VERSION_1 | F_BALLOON_STATS_VQ);
    let send = |ring: &mut QRing, stats: &[(u16, u64)]| {
        let bytes: Vec<u8> = stats
            .iter()
            .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        ring.desc(&mem, 0, BUF, bytes.len() as u32, 0, 0);
        ring.post(&mem, 0);
    };
    let wait_stats = |want: &[(u16, u64)]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while control.stats() != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                control.stats()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    send(&mut rings[2], &[(4, 1000), (5, 2000)]);
    wait_stats(&[(4, 1000), (5, 2000)]);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rings[2].used_idx(&mem), 0, "the buffer is held");
    let before = irq.queue.load(Ordering::SeqCst);
    control.request_stats();
    assert_eq!(rings[2].next_used(&mem), Some((0, 0)));
    assert!(
        irq.queue.load(Ordering::SeqCst) > before,
        "the driver is told"
    );
    send(&mut rings[2], &[(4, 999)]);
    wait_stats(&[(4, 999)]);
    // A pause leaves nothing in flight: the held buffer is used, positions are exact.
    dev.pause().unwrap();
    assert_eq!(rings[2].next_used(&mem), Some((0, 0)));
    let pos = dev.queue_positions().unwrap();
    assert_eq!(pos[2], Some((2, 2)));
    dev.resume().unwrap();
    dev.reset();
    assert!(control.stats().is_empty(), "a reset forgets them");
}

#[test]
fn balloon_state_round_trip() {
    let mut a = Balloon::new(64 << 20, BalloonOptions::default()).unwrap();
    a.write_config(4, &1234u32.to_le_bytes());
    a.control().set_target(32 << 20).unwrap();
    let state = a.device_state();
    let VirtioDeviceState::Balloon(s) = &state else {
        panic!("{state:?}");
    };
    assert_eq!(
        (s.num_pages, s.actual, s.config_generation),
        (8192, 1234, 1)
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let mut b = Balloon::new(64 << 20, BalloonOptions::default()).unwrap();
    let irq_before = b.config_generation();
    b.set_device_state(&back).unwrap();
    assert_eq!(b.device_state(), state);
    assert_eq!(config(&b), (8192, 1234));
    assert_ne!(b.config_generation(), irq_before);
    assert_eq!(b.control().actual(), 1234 * PAGE);
    // Another version, or another device's state: refused, nothing changed.
    let mut c = Balloon::new(PAGE, BalloonOptions::default()).unwrap();
    let VirtioDeviceState::Balloon(mut s2) = state.clone() else {
        unreachable!()
    };
    s2.version += 1;
    assert!(c.set_device_state(&VirtioDeviceState::Balloon(s2)).is_err());
    let rng = VirtioDeviceState::Rng(crate::RngState { version: 1 });
    assert!(c.set_device_state(&rng).is_err());
    assert_eq!(config(&c), (1, 0));
    assert!(serde_json::from_str::<VirtioDeviceState>(
        r#"{"balloon":{"version":1,"num_pages":1,"actual":0,"config_generation":0,"x":1}}"#
    )
    .is_err());
}
