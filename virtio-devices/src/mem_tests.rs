//! virtio-mem driven through a real split ring (the fake driver of `tests.rs`) with its worker
//! running, on guest memory that includes the region: the configuration, plug and unplug
//! within the requested size, refused ranges, memory given back to the host (private and
//! shared), the requested size and its interrupt, state, hostile chains.

use std::os::fd::FromRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::mem::{
    REQ_PLUG, REQ_SIZE, REQ_STATE, REQ_UNPLUG, REQ_UNPLUG_ALL, RESP_ACK, RESP_ERROR, RESP_NACK,
    RESP_SIZE, STATE_MIXED, STATE_PLUGGED, STATE_UNPLUGGED,
};
use crate::tests::{Irq, QRing, NEXT, QSIZE, WRITE};
use crate::{
    ActivateContext, DeviceStatus, VirtioDevice, VirtioDeviceState, VirtioMem, VirtioMemError,
    VirtioMemOptions, F_MEM_ACPI_PXM, F_MEM_UNPLUGGED_INACCESSIBLE, F_VERSION_1, TYPE_MEM,
};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Boot RAM, where the ring and the requests lie.
const LOW: usize = 1 << 20;
/// The region: 8 blocks of 2 MiB at 16 MiB.
const REGION: u64 = 16 * MIB;
const BLOCK: u64 = 2 * MIB;
const REGION_SIZE: u64 = 8 * BLOCK;
/// The queue's rings.
const RING: u64 = 0x10000;
/// Where requests and responses lie.
const REQ: u64 = 0x80000;
const RESP: u64 = 0x80100;

fn private_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW),
        (GuestAddress(REGION), REGION_SIZE as usize),
    ])
    .unwrap()
}

/// Boot RAM, and the region as `shared=on` maps it: a shared mapping of a memfd (returned).
fn memfd_mem() -> (GuestMemoryMmap, std::fs::File) {
    // SAFETY: a plain memfd_create with a NUL-terminated name; the fd is checked below.
    let fd = unsafe { libc::memfd_create(c"virtio_mem_test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(REGION_SIZE).unwrap();
    let low = guest_memory::region_builder(LOW)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .build()
        .unwrap();
    let m = guest_memory::region_builder(REGION_SIZE as usize)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .unwrap();
    let regions = vec![
        GuestRegionMmap::new(low, GuestAddress(0)).unwrap(),
        GuestRegionMmap::new(m, GuestAddress(REGION)).unwrap(),
    ];
    (GuestMemoryMmap::from_regions(regions).unwrap(), file)
}

fn device() -> VirtioMem {
    VirtioMem::new(REGION, REGION_SIZE, BLOCK, VirtioMemOptions::default()).unwrap()
}

/// Activates `dev` on `mem` with its queue ready (the rings cleared, as a new driver sets
/// them up).
fn start(dev: &mut VirtioMem, mem: &GuestMemoryMmap) -> (QRing, Arc<Irq>) {
    mem.write_slice(&[0u8; 0x3000], GuestAddress(RING)).unwrap();
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_desc_table_address(Some(RING as u32), Some(0));
    queue.set_avail_ring_address(Some(RING as u32 + 0x1000), Some(0));
    queue.set_used_ring_address(Some(RING as u32 + 0x2000), Some(0));
    queue.set_ready(true);
    assert!(queue.is_valid(mem));
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Irq::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![Some((queue, kick.try_clone().unwrap()))],
        acked_features: F_VERSION_1,
        status: Arc::new(DeviceStatus::default()),
        dma: None,
    })
    .unwrap();
    let ring = QRing {
        base: RING,
        kick,
        next_avail: 0,
        seen_used: 0,
    };
    (ring, irq)
}

fn request_bytes(kind: u16, addr: u64, nb: u16) -> [u8; REQ_SIZE] {
    let mut r = [0u8; REQ_SIZE];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..16].copy_from_slice(&addr.to_le_bytes());
    r[16..18].copy_from_slice(&nb.to_le_bytes());
    r
}

/// The response at `at`: (type, state).
fn response_at(mem: &GuestMemoryMmap, at: u64) -> (u16, u16) {
    let t: u16 = mem.read_obj(GuestAddress(at)).unwrap();
    let s: u16 = mem.read_obj(GuestAddress(at + 8)).unwrap();
    (t, s)
}

/// Sends one well-formed request (readable descriptor, then writable) and waits for it:
/// (response type, state).
fn request(ring: &mut QRing, mem: &GuestMemoryMmap, kind: u16, addr: u64, nb: u16) -> (u16, u16) {
    mem.write_slice(&request_bytes(kind, addr, nb), GuestAddress(REQ))
        .unwrap();
    mem.write_slice(&[0xff; RESP_SIZE], GuestAddress(RESP))
        .unwrap();
    ring.desc(mem, 0, REQ, REQ_SIZE as u32, NEXT, 1);
    ring.desc(mem, 1, RESP, RESP_SIZE as u32, WRITE, 0);
    ring.post(mem, 0);
    assert_eq!(ring.next_used(mem), Some((0, RESP_SIZE as u32)));
    response_at(mem, RESP)
}

fn block(i: u64) -> u64 {
    REGION + i * BLOCK
}

fn config(dev: &VirtioMem) -> [u8; 56] {
    let mut c = [0u8; 56];
    dev.read_config(0, &mut c);
    c
}

fn config_u64(dev: &VirtioMem, at: usize) -> u64 {
    u64::from_le_bytes(config(dev)[at..at + 8].try_into().unwrap())
}

/// Fills guest page `addr` with `v`.
fn fill(mem: &GuestMemoryMmap, addr: u64, v: u8) {
    mem.write_slice(&[v; PAGE as usize], GuestAddress(addr))
        .unwrap();
}

/// The first and last byte of the page at `addr`, if they are equal.
fn page_byte(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    let a: u8 = mem.read_obj(GuestAddress(addr)).unwrap();
    let b: u8 = mem.read_obj(GuestAddress(addr + PAGE - 1)).unwrap();
    assert_eq!(a, b, "page {addr:#x} is uniform");
    a
}

/// Whether the page at `addr` is in host memory (mincore on its host address).
fn resident(mem: &GuestMemoryMmap, addr: u64) -> bool {
    let p = mem.get_host_address(GuestAddress(addr)).unwrap();
    let mut v = 0u8;
    // SAFETY: one page of a live mapping (guest RAM); `v` holds the one result byte.
    let rc = unsafe { libc::mincore(p.cast(), PAGE as usize, &mut v) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v & 1 != 0
}

#[test]
fn mem_config_layout_features_and_read_only() {
    let mut dev = device();
    assert_eq!((dev.device_type(), TYPE_MEM), (24, 24));
    assert_eq!(dev.queue_max_sizes().len(), 1);
    assert_eq!(
        dev.features(),
        F_VERSION_1,
        "no ACPI_PXM, no UNPLUGGED_INACCESSIBLE"
    );
    assert_eq!(
        (F_MEM_ACPI_PXM, F_MEM_UNPLUGGED_INACCESSIBLE),
        (1, 2),
        "the spec's bits"
    );
    let opt = VirtioMemOptions {
        unplugged_inaccessible: true,
        node_id: 3,
        acpi_pxm: false,
    };
    let dev2 = VirtioMem::new(REGION, REGION_SIZE, BLOCK, opt).unwrap();
    assert_eq!(dev2.features(), F_VERSION_1 | F_MEM_UNPLUGGED_INACCESSIBLE);
    // With --numa the node is an ACPI proximity domain.
    let numa = VirtioMemOptions {
        acpi_pxm: true,
        ..opt
    };
    let dev3 = VirtioMem::new(REGION, REGION_SIZE, BLOCK, numa).unwrap();
    assert_eq!(
        dev3.features(),
        F_VERSION_1 | F_MEM_UNPLUGGED_INACCESSIBLE | F_MEM_ACPI_PXM
    );
    assert_eq!(config(&dev2)[8..10], [3, 0], "node_id");

    dev.control().set_requested(4 * MIB).unwrap();
    let c = config(&dev);
    assert_eq!(config_u64(&dev, 0), BLOCK, "block_size");
    assert_eq!(c[8..16], [0; 8], "node_id and padding");
    assert_eq!(config_u64(&dev, 16), REGION, "addr");
    assert_eq!(config_u64(&dev, 24), REGION_SIZE, "region_size");
    assert_eq!(config_u64(&dev, 32), REGION_SIZE, "usable_region_size");
    assert_eq!(config_u64(&dev, 40), 0, "plugged_size");
    assert_eq!(config_u64(&dev, 48), 4 * MIB, "requested_size");
    let mut past = [0xffu8; 8];
    dev.read_config(56, &mut past);
    assert_eq!(past, [0; 8]);
    let mut part = [0u8; 4];
    dev.read_config(50, &mut part);
    assert_eq!(part, [0x40, 0, 0, 0], "4 MiB = 0x400000, little-endian");
    // The driver writes nothing.
    for at in [0, 8, 16, 40, 48, 55, u64::MAX] {
        dev.write_config(at, &[0xaa; 8]);
    }
    assert_eq!(config(&dev), c);
    assert_eq!(dev.control().region(), (REGION, REGION_SIZE));
    assert_eq!(dev.control().block_size(), BLOCK);
}

#[test]
fn mem_constructor_refuses_bad_geometry() {
    let o = VirtioMemOptions::default();
    for b in [0, 1, 2048, 3 * MIB, 4096 + 1] {
        assert_eq!(
            VirtioMem::new(REGION, REGION_SIZE, b, o).err(),
            Some(VirtioMemError::BlockSize(b)),
            "block size {b:#x}"
        );
    }
    for s in [0, BLOCK + PAGE, BLOCK / 2] {
        assert!(
            matches!(
                VirtioMem::new(REGION, s, BLOCK, o),
                Err(VirtioMemError::RegionSize { .. })
            ),
            "size {s:#x}"
        );
    }
    assert!(matches!(
        VirtioMem::new(REGION + MIB, REGION_SIZE, BLOCK, o),
        Err(VirtioMemError::Misaligned { .. })
    ));
    assert!(matches!(
        VirtioMem::new(u64::MAX - BLOCK + 1, 2 * BLOCK, BLOCK, o),
        Err(VirtioMemError::Overflow { .. })
    ));
    // 4 KiB blocks and the highest region that fits are fine.
    assert!(VirtioMem::new(REGION, REGION_SIZE, PAGE, o).is_ok());
    assert!(VirtioMem::new(u64::MAX - BLOCK + 1, BLOCK, BLOCK, o).is_err());
    assert!(VirtioMem::new(u64::MAX - 2 * BLOCK + 1, BLOCK, BLOCK, o).is_ok());
}

#[test]
fn mem_set_requested_rules_and_config_interrupt() {
    let mut dev = device();
    let control = dev.control();
    let g0 = dev.config_generation();
    assert!(matches!(
        control.set_requested(BLOCK + PAGE),
        Err(VirtioMemError::RequestedUnaligned { .. })
    ));
    assert!(matches!(
        control.set_requested(REGION_SIZE + BLOCK),
        Err(VirtioMemError::RequestedTooLarge { .. })
    ));
    assert_eq!((control.requested(), dev.config_generation()), (0, g0));
    // Not started: the generation moves, no interrupt (there is none yet).
    control.set_requested(BLOCK).unwrap();
    assert_eq!(dev.config_generation(), g0 + 1);
    let mem = private_mem();
    let (_ring, irq) = start(&mut dev, &mem);
    control.set_requested(REGION_SIZE).unwrap();
    assert_eq!(control.requested(), REGION_SIZE);
    assert_eq!(dev.config_generation(), g0 + 2);
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    control.set_requested(REGION_SIZE).unwrap();
    assert_eq!(dev.config_generation(), g0 + 2, "the same size");
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    // Paused: no interrupt until resumed, then one.
    dev.pause().unwrap();
    control.set_requested(0).unwrap();
    control.set_requested(2 * BLOCK).unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    assert_eq!(config_u64(&dev, 48), 2 * BLOCK);
    dev.resume().unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 2);
    dev.pause().unwrap();
    dev.resume().unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 2, "nothing changed");
    dev.reset();
    control.set_requested(BLOCK).unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 2, "reset: no interrupt");
}

#[test]
fn mem_plug_within_requested_nack_beyond() {
    let mut dev = device();
    let control = dev.control();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(0), 1), (RESP_NACK, 0));
    control.set_requested(3 * BLOCK).unwrap();
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(0), 1), (RESP_ACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(4), 3), (RESP_NACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(4), 2), (RESP_ACK, 0));
    assert_eq!(control.plugged(), 3 * BLOCK);
    assert_eq!(config_u64(&dev, 40), 3 * BLOCK, "plugged_size");
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(7), 1), (RESP_NACK, 0));
    assert_eq!(
        control.plugged_ranges(),
        [(block(0), BLOCK), (block(4), 2 * BLOCK)]
    );
    // A smaller request: nothing more plugs, unplugging still works.
    control.set_requested(BLOCK).unwrap();
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(1), 1), (RESP_NACK, 0));
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(4), 2),
        (RESP_ACK, 0)
    );
    assert_eq!(control.plugged(), BLOCK);
    // The whole region.
    control.set_requested(REGION_SIZE).unwrap();
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(1), 7), (RESP_ACK, 0));
    assert_eq!(control.plugged(), REGION_SIZE);
    assert_eq!(control.plugged_ranges(), [(REGION, REGION_SIZE)]);
    // Plugged memory is usable.
    fill(&mem, block(7) + BLOCK - PAGE, 0x42);
    assert_eq!(page_byte(&mem, block(7) + BLOCK - PAGE), 0x42);
    dev.reset();
}

#[test]
fn mem_plug_errors_for_bad_ranges_and_double_plug() {
    let mut dev = device();
    let control = dev.control();
    control.set_requested(REGION_SIZE).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(2), 2), (RESP_ACK, 0));
    for (addr, nb, why) in [
        (block(0) + PAGE, 1, "unaligned"),
        (block(0) + BLOCK / 2, 1, "half a block in"),
        (block(0), 0, "no blocks"),
        (REGION - BLOCK, 1, "below the region"),
        (REGION - BLOCK, 2, "from below into the region"),
        (0, 1, "boot RAM"),
        (block(8), 1, "just past the end"),
        (block(7), 2, "across the end"),
        (block(0), 9, "more blocks than the region"),
        (block(0), u16::MAX, "the most blocks"),
        (u64::MAX - BLOCK + 1, 2, "wraps around"),
        (u64::MAX - BLOCK + 1, u16::MAX, "wraps around far"),
        (block(1), 2, "overlaps plugged blocks"),
        (block(3), 1, "already plugged"),
        (block(2), 2, "all already plugged"),
    ] {
        assert_eq!(
            request(&mut r, &mem, REQ_PLUG, addr, nb),
            (RESP_ERROR, 0),
            "{why}: {addr:#x} x {nb}"
        );
    }
    // Unknown request types.
    for t in [4, 0xffff] {
        assert_eq!(request(&mut r, &mem, t, block(0), 1), (RESP_ERROR, 0));
    }
    // Unplug and state check their ranges the same way.
    for t in [REQ_UNPLUG, REQ_STATE] {
        assert_eq!(request(&mut r, &mem, t, block(7), 2), (RESP_ERROR, 0));
        assert_eq!(request(&mut r, &mem, t, block(2) + 1, 1), (RESP_ERROR, 0));
        assert_eq!(request(&mut r, &mem, t, block(2), 0), (RESP_ERROR, 0));
    }
    assert_eq!(control.plugged_ranges(), [(block(2), 2 * BLOCK)]);
    dev.reset();
}

/// Unplugging gives private anonymous memory back: its pages leave host memory and read as
/// zero; plugged neighbours keep their data.
#[test]
fn mem_unplug_releases_private_pages() {
    let mut dev = device();
    let control = dev.control();
    control.set_requested(4 * BLOCK).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(1), 3), (RESP_ACK, 0));
    let pages = [block(1), block(2), block(2) + BLOCK - PAGE, block(3)];
    for &p in &pages {
        fill(&mem, p, 0xa5);
        assert!(resident(&mem, p));
    }
    // Unplugging a block that is not (all) plugged is an error and releases nothing.
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(0), 2),
        (RESP_ERROR, 0)
    );
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(3), 2),
        (RESP_ERROR, 0)
    );
    assert_eq!(page_byte(&mem, block(1)), 0xa5);
    assert_eq!(page_byte(&mem, block(3)), 0xa5);
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(2), 1),
        (RESP_ACK, 0)
    );
    assert_eq!(control.plugged(), 2 * BLOCK);
    for &p in &pages {
        let gone = (block(2)..block(3)).contains(&p);
        assert_eq!(resident(&mem, p), !gone, "page {p:#x} resident");
        assert_eq!(page_byte(&mem, p), if gone { 0 } else { 0xa5 }, "{p:#x}");
    }
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(2), 1),
        (RESP_ERROR, 0)
    );
    // Plugged again: usable again.
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(2), 1), (RESP_ACK, 0));
    fill(&mem, block(2), 0x11);
    assert_eq!(page_byte(&mem, block(2)), 0x11);
    dev.reset();
}

/// With `shared=on` the region is a shared memfd mapping: unplugging frees the file's pages.
#[test]
fn mem_unplug_frees_shared_memfd_pages() {
    let mut dev = device();
    dev.control().set_requested(2 * BLOCK).unwrap();
    let (mem, file) = memfd_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(5), 2), (RESP_ACK, 0));
    for p in (block(5)..block(7)).step_by(PAGE as usize) {
        fill(&mem, p, 0x3c);
    }
    let before = file.metadata().unwrap().blocks();
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG, block(6), 1),
        (RESP_ACK, 0)
    );
    let after = file.metadata().unwrap().blocks();
    // st_blocks counts 512-byte blocks.
    assert!(
        before - after >= BLOCK / 512,
        "the memfd kept its pages: {before} -> {after} blocks"
    );
    let mut b = [0xffu8; 16];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut b, 6 * BLOCK).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(page_byte(&mem, block(6)), 0);
    assert_eq!(page_byte(&mem, block(5)), 0x3c);
    // UNPLUG_ALL empties the file.
    assert_eq!(request(&mut r, &mem, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
    assert_eq!(file.metadata().unwrap().blocks(), 0);
    dev.reset();
}

#[test]
fn mem_unplug_all_releases_everything() {
    let mut dev = device();
    let control = dev.control();
    control.set_requested(REGION_SIZE).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    // Nothing plugged: still ACK.
    assert_eq!(request(&mut r, &mem, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(0), 2), (RESP_ACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(5), 1), (RESP_ACK, 0));
    for p in [block(0), block(1) + PAGE, block(5)] {
        fill(&mem, p, 0x77);
    }
    // Its address and count are ignored.
    assert_eq!(
        request(&mut r, &mem, REQ_UNPLUG_ALL, u64::MAX, 7),
        (RESP_ACK, 0)
    );
    assert_eq!(control.plugged(), 0);
    assert_eq!(config_u64(&dev, 40), 0);
    assert!(control.plugged_ranges().is_empty());
    for p in [block(0), block(1) + PAGE, block(5)] {
        assert!(!resident(&mem, p), "{p:#x}");
        assert_eq!(page_byte(&mem, p), 0);
    }
    assert_eq!(
        request(&mut r, &mem, REQ_STATE, REGION, 8),
        (RESP_ACK, STATE_UNPLUGGED)
    );
    dev.reset();
}

#[test]
fn mem_state_requests() {
    let mut dev = device();
    dev.control().set_requested(REGION_SIZE).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    let state = |r: &mut QRing, addr, nb| request(r, &mem, REQ_STATE, addr, nb);
    assert_eq!(state(&mut r, REGION, 8), (RESP_ACK, STATE_UNPLUGGED));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(2), 3), (RESP_ACK, 0));
    assert_eq!(state(&mut r, block(2), 3), (RESP_ACK, STATE_PLUGGED));
    assert_eq!(state(&mut r, block(3), 1), (RESP_ACK, STATE_PLUGGED));
    assert_eq!(state(&mut r, block(1), 2), (RESP_ACK, STATE_MIXED));
    assert_eq!(state(&mut r, block(4), 2), (RESP_ACK, STATE_MIXED));
    assert_eq!(state(&mut r, REGION, 8), (RESP_ACK, STATE_MIXED));
    assert_eq!(state(&mut r, block(5), 3), (RESP_ACK, STATE_UNPLUGGED));
    assert_eq!(state(&mut r, block(0), 2), (RESP_ACK, STATE_UNPLUGGED));
    assert_eq!(state(&mut r, block(5), 4), (RESP_ERROR, 0));
    dev.reset();
}

/// A device reset leaves the blocks as they are (the next driver unplugs all); a pause leaves
/// nothing in flight.
#[test]
fn mem_reset_keeps_blocks_and_pause_is_exact() {
    let mut dev = device();
    let control = dev.control();
    control.set_requested(2 * BLOCK).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(0), 2), (RESP_ACK, 0));
    dev.pause().unwrap();
    assert_eq!(dev.queue_positions().unwrap(), [Some((1, 1))]);
    dev.resume().unwrap();
    dev.reset();
    assert_eq!(control.plugged(), 2 * BLOCK);
    assert_eq!(config_u64(&dev, 40), 2 * BLOCK);
    let (mut r, _irq) = start(&mut dev, &mem);
    assert_eq!(request(&mut r, &mem, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
    assert_eq!(control.plugged(), 0);
    dev.reset();
}

#[test]
fn mem_state_round_trip_and_refusals() {
    let mut a = device();
    a.control().set_requested(5 * BLOCK).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut a, &mem);
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(1), 2), (RESP_ACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(7), 1), (RESP_ACK, 0));
    a.pause().unwrap();
    let state = a.device_state();
    let VirtioDeviceState::Mem(s) = &state else {
        panic!("{state:?}");
    };
    assert_eq!(
        (
            s.addr,
            s.region_size,
            s.block_size,
            s.requested,
            s.plugged.clone(),
            s.config_generation
        ),
        (REGION, REGION_SIZE, BLOCK, 5 * BLOCK, vec![0b1000_0110], 1)
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    a.reset();

    let mut b = device();
    b.set_device_state(&back).unwrap();
    assert_eq!(b.device_state(), state);
    assert_eq!(b.config_generation(), 1);
    assert_eq!(config(&b), config(&a));
    let cb = b.control();
    assert_eq!((cb.plugged(), cb.requested()), (3 * BLOCK, 5 * BLOCK));
    // The restored device serves on from there.
    let (mut r, _irq) = start(&mut b, &mem);
    assert_eq!(
        request(&mut r, &mem, REQ_STATE, block(1), 2),
        (RESP_ACK, STATE_PLUGGED)
    );
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(3), 2), (RESP_ACK, 0));
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(5), 1), (RESP_NACK, 0));
    b.reset();

    // Refusals, each leaving the device as it was.
    let VirtioDeviceState::Mem(good) = state.clone() else {
        unreachable!()
    };
    type Spoil = fn(&mut crate::VirtioMemState);
    let bad: [(&str, Spoil); 10] = [
        ("version", |s| s.version += 1),
        ("addr", |s| s.addr += BLOCK),
        ("region size", |s| s.region_size += BLOCK),
        ("block size", |s| s.block_size *= 2),
        ("requested unaligned", |s| s.requested += PAGE),
        ("requested too large", |s| s.requested = 9 * BLOCK),
        ("bitmap short", |s| s.plugged.clear()),
        ("bitmap long", |s| s.plugged.push(0)),
        ("past the end", |s| s.plugged[0] |= 1 << 8),
        ("far past the end", |s| s.plugged[0] = u64::MAX),
    ];
    for (why, f) in bad {
        let mut c = device();
        c.control().set_requested(BLOCK).unwrap();
        let before = c.device_state();
        let mut s = good.clone();
        f(&mut s);
        assert!(
            c.set_device_state(&VirtioDeviceState::Mem(s)).is_err(),
            "{why}"
        );
        assert_eq!(c.device_state(), before, "{why}: nothing changed");
    }
    let mut c = device();
    let rng = VirtioDeviceState::Rng(crate::RngState { version: 1 });
    assert!(c.set_device_state(&rng).is_err());
    assert_eq!(c.control().plugged(), 0);
    assert!(serde_json::from_str::<VirtioDeviceState>(
        r#"{"mem":{"version":1,"addr":0,"region_size":0,"block_size":0,"requested":0,"plugged":[],"config_generation":0,"x":1}}"#
    )
    .is_err());
    // 4 KiB blocks: the bitmap spans words, the tail check is per block.
    let mut d = VirtioMem::new(REGION, 100 * PAGE, PAGE, VirtioMemOptions::default()).unwrap();
    let VirtioDeviceState::Mem(mut s) = d.device_state() else {
        unreachable!()
    };
    assert_eq!(s.plugged.len(), 2);
    s.plugged = vec![u64::MAX, (1 << 36) - 1];
    d.set_device_state(&VirtioDeviceState::Mem(s.clone()))
        .unwrap();
    assert_eq!(d.control().plugged(), 100 * PAGE);
    s.plugged[1] = 1 << 36;
    assert!(d.set_device_state(&VirtioDeviceState::Mem(s)).is_err());
}

/// Chains a hostile driver could write: short requests get ERROR; a chain without room for
/// the whole response, or with it outside guest RAM, is returned with nothing written and not
/// executed; requests and responses split over descriptors are served. Nothing breaks.
#[test]
fn mem_hostile_chains() {
    let mut dev = device();
    let control = dev.control();
    control.set_requested(REGION_SIZE).unwrap();
    let mem = private_mem();
    let (mut r, _irq) = start(&mut dev, &mem);
    let end = LOW as u64;
    let plug = request_bytes(REQ_PLUG, block(0), 1);
    let send = |r: &mut QRing, descs: &[(u64, u32, u16)]| -> u32 {
        mem.write_slice(&plug, GuestAddress(REQ)).unwrap();
        mem.write_slice(&[0xff; RESP_SIZE], GuestAddress(RESP))
            .unwrap();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let more = if i + 1 < descs.len() { NEXT } else { 0 };
            r.desc(&mem, i as u16, addr, len, flags | more, i as u16 + 1);
        }
        r.post(&mem, 0);
        let (id, len) = r.next_used(&mem).expect("the chain is used");
        assert_eq!(id, 0);
        len
    };
    let rs = RESP_SIZE as u32;
    let w = WRITE;
    // Not executed: no writable buffer, a short one, one outside guest RAM or running past
    // its end, one in the hole below the region.
    for (why, descs) in [
        ("no response buffer", vec![(REQ, 24, 0)]),
        ("response too short", vec![(REQ, 24, 0), (RESP, rs - 1, w)]),
        (
            "response split short",
            vec![(REQ, 24, 0), (RESP, 4, w), (RESP + 4, 5, w)],
        ),
        ("response outside RAM", vec![(REQ, 24, 0), (1 << 40, rs, w)]),
        (
            "response past RAM's end",
            vec![(REQ, 24, 0), (end - 4, rs, w)],
        ),
        (
            "response in the hole",
            vec![(REQ, 24, 0), (REGION - 8, rs, w)],
        ),
        (
            "response at u64::MAX",
            vec![(REQ, 24, 0), (u64::MAX - 3, rs, w)],
        ),
    ] {
        assert_eq!(send(&mut r, &descs), 0, "{why}");
        assert_eq!(control.plugged(), 0, "{why}: not executed");
        assert_eq!(response_at(&mem, RESP).0, 0xffff, "{why}: nothing written");
    }
    // ERROR: the request short, missing or unreadable.
    for (why, descs) in [
        ("no request", vec![(RESP, rs, w)]),
        ("request short", vec![(REQ, 23, 0), (RESP, rs, w)]),
        ("request outside RAM", vec![(1 << 40, 24, 0), (RESP, rs, w)]),
        (
            "request past RAM's end",
            vec![(end - 8, 24, 0), (RESP, rs, w)],
        ),
        (
            "request split short",
            vec![(REQ, 8, 0), (REQ + 8, 8, 0), (RESP, rs, w)],
        ),
    ] {
        assert_eq!(send(&mut r, &descs), rs, "{why}");
        assert_eq!(response_at(&mem, RESP), (RESP_ERROR, 0), "{why}");
        assert_eq!(control.plugged(), 0, "{why}: not executed");
    }
    // Served: the request and the response split over descriptors, in any order, with a
    // request descriptor longer than the request.
    assert_eq!(
        send(
            &mut r,
            &[
                (RESP, 3, w),
                (REQ, 5, 0),
                (REQ + 5, u32::MAX / 2, 0),
                (RESP + 3, 100, w),
            ]
        ),
        rs
    );
    assert_eq!(response_at(&mem, RESP), (RESP_ACK, 0));
    assert_eq!(control.plugged(), BLOCK);
    // A request whose response would overwrite the request itself: read first, then answered.
    mem.write_slice(&request_bytes(REQ_STATE, block(0), 1), GuestAddress(REQ))
        .unwrap();
    r.desc(&mem, 0, REQ, 24, NEXT, 1);
    r.desc(&mem, 1, REQ, rs, WRITE, 0);
    r.post(&mem, 0);
    assert_eq!(r.next_used(&mem), Some((0, rs)));
    assert_eq!(response_at(&mem, REQ), (RESP_ACK, STATE_PLUGGED));
    // Still serving normally.
    assert_eq!(request(&mut r, &mem, REQ_PLUG, block(1), 1), (RESP_ACK, 0));
    assert_eq!(control.plugged(), 2 * BLOCK);
    dev.reset();
}
