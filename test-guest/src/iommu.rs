//! `test=iommu` (`--disk path=IMG,iommu=on`): the virtio-iommu (device 23) and a disk behind it.
//! The VIOT table names the IOMMU's function and gives the disk's endpoint ID; the IOMMU's request
//! queue is driven by hand (src/rawq.rs): config, PROBE (the MSI window reserved), its error
//! statuses; with bypass off an unattached disk's rings cannot be translated (NEEDS_RESET); the
//! disk attached to domain 1 then runs `virtio-drivers`' VirtIOBlk through `IommuHal`, which maps
//! every DMA range at an IOVA of its own (not the physical address) and unmaps it again; a buffer
//! left unmapped, or mapped read-only for the device to write, fails its request; last, a bypass
//! (identity) domain lets the disk work with untranslated addresses.
//!
//! The disk negotiates VIRTIO_F_ACCESS_PLATFORM through `AckPlatform`, a transport wrapper
//! (`virtio-drivers` does not ask for the feature itself). Every wait is bounded.

use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::bootinfo::BootInfo;
use crate::heap::SpinLock;
use crate::rawq::{r16, r32, r8, w8, Layout, RawQueue, F_NEXT, F_WRITE, QSIZE, VERSION_1};
use crate::virtio::{dma_pages, find, guest_pattern, host_pattern, transport, GuestHal};
use crate::{check, fail, pass, println, smp};

const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;
const S_INVAL: u8 = 4;
const S_RANGE: u8 = 5;
const S_NOENT: u8 = 6;
const MAP_READ: u32 = 1;
const MAP_WRITE: u32 = 2;
const ATTACH_F_BYPASS: u32 = 1;
const F_INPUT_RANGE: u64 = 1 << 0;
const F_DOMAIN_RANGE: u64 = 1 << 1;
const F_MAP_UNMAP: u64 = 1 << 2;
const F_PROBE: u64 = 1 << 4;
const F_BYPASS_CONFIG: u64 = 1 << 6;
const ACCESS_PLATFORM: u64 = 1 << 33;
const NEEDS_RESET: u8 = 0x40;
/// Where `IommuHal`'s IOVAs start when the input range reaches that far (else at 4 GiB).
const IOVA_BASE: u64 = 0x10_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;
/// Offset of a request's device-writable part in the queue's page.
const WRITABLE: u64 = 0x400;
/// The disk's sectors that are read and written (the image holds `host_pattern(0, s)`).
const SECTORS: usize = 8;
/// Bytes between event buffers (each a 24-byte `virtio_iommu_fault`).
const EVENT_SIZE: u64 = 32;
/// The domain the disk is attached to, where `IommuHal` maps.
const DOMAIN: u32 = 1;

/// The IOMMU's request queue and `IommuHal`'s bookkeeping.
struct Iommu {
    /// None before set-up, and after a request went unanswered (given up for good).
    q: Option<RawQueue>,
    probe_size: u32,
    next_iova: u64,
    /// `IommuHal`'s live mappings: (IOVA, bytes); bytes 0 = a free slot.
    live: [(u64, u64); 64],
    maps: u32,
    unmaps: u32,
    /// MAP/UNMAP requests of `IommuHal` not answered OK (or a full `live` table).
    errors: u32,
    /// What `share` does wrong with device-written data buffers (the checks of faults).
    fault: Fault,
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Hands out an IOVA it did not map.
    Unmapped,
    /// Maps the buffer READ only.
    ReadOnly,
}

static IOMMU: SpinLock<Iommu> = SpinLock::new(Iommu {
    q: None,
    probe_size: 0,
    next_iova: IOVA_BASE,
    live: [(0, 0); 64],
    maps: 0,
    unmaps: 0,
    errors: 0,
    fault: Fault::None,
});

/// A request's device-readable part: the head (type, 3 reserved bytes), then the fields.
struct Req {
    b: [u8; 80],
    n: usize,
}

impl Req {
    fn new(kind: u8) -> Req {
        let mut b = [0; 80];
        b[0] = kind;
        Req { b, n: 4 }
    }
    fn put(mut self, bytes: &[u8]) -> Req {
        self.b[self.n..self.n + bytes.len()].copy_from_slice(bytes);
        self.n += bytes.len();
        self
    }
    fn u32(self, v: u32) -> Req {
        self.put(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> Req {
        self.put(&v.to_le_bytes())
    }
    fn attach(kind: u8, domain: u32, endpoint: u32, flags: u32) -> Req {
        Req::new(kind).u32(domain).u32(endpoint).u32(flags).u32(0)
    }
    fn map(domain: u32, start: u64, bytes: u64, phys: u64, flags: u32) -> Req {
        let r = Req::new(T_MAP).u32(domain).u64(start);
        r.u64(start.wrapping_add(bytes - 1)).u64(phys).u32(flags)
    }
    fn unmap(domain: u32, start: u64, bytes: u64) -> Req {
        let r = Req::new(T_UNMAP).u32(domain).u64(start);
        r.u64(start.wrapping_add(bytes - 1)).u32(0)
    }
}

/// Polls `done` every 10 µs, for `ms` at most: whether it came true.
fn poll(ms: u64, mut done: impl FnMut() -> bool) -> bool {
    (0..ms * 100).any(|_| {
        done() || {
            smp::delay_us(10);
            false
        }
    })
}

fn r64(a: u64) -> u64 {
    u64::from(r32(a)) | u64::from(r32(a + 4)) << 32
}

impl Iommu {
    /// Sends `req` with a device-writable part of `props` bytes of properties and the tail, and
    /// waits (1 s at most) for it: the status byte. None without a queue, or when no answer
    /// came (the queue is then given up, so a late answer is never taken for another's).
    fn send(&mut self, req: &Req, props: u32) -> Option<u8> {
        let q = self.q.as_mut()?;
        let (out, inp) = (q.buf, q.buf + WRITABLE);
        for (i, &b) in req.b[..req.n].iter().enumerate() {
            w8(out + i as u64, b);
        }
        for i in 0..u64::from(props) {
            w8(inp + i, 0);
        }
        w8(inp + u64::from(props), 0xee);
        q.set_desc(0, out, req.n as u32, F_NEXT, 1);
        q.set_desc(1, inp, props + 4, F_WRITE, 0);
        q.publish(0);
        if poll(1000, || q.poll_used().is_some()) {
            return Some(r8(inp + u64::from(props)));
        }
        println!("INFO iommu: request type {} unanswered", req.b[0]);
        self.q = None;
        None
    }

    /// `bytes` of IOVA space (page multiple), with an unmapped guard page after it.
    fn take_iova(&mut self, bytes: u64) -> u64 {
        let iova = self.next_iova;
        self.next_iova += bytes + PAGE;
        iova
    }

    /// MAPs `bytes` at `phys` at a fresh IOVA in `DOMAIN`: (IOVA, whether it worked).
    fn map(&mut self, phys: u64, bytes: u64, flags: u32) -> (u64, bool) {
        let iova = self.take_iova(bytes);
        let st = self.send(&Req::map(DOMAIN, iova, bytes, phys, flags), 0);
        self.maps += 1;
        let slot = self.live.iter_mut().find(|s| s.1 == 0);
        match (st, slot) {
            (Some(S_OK), Some(slot)) => *slot = (iova, bytes),
            _ => self.errors += 1,
        }
        (iova, st == Some(S_OK))
    }

    /// UNMAPs the live mapping at `iova` (none there, as for a faked IOVA: nothing).
    fn unmap(&mut self, iova: u64) {
        let Some(slot) = self.live.iter_mut().find(|s| s.1 != 0 && s.0 == iova) else {
            return;
        };
        let bytes = slot.1;
        *slot = (0, 0);
        let st = self.send(&Req::unmap(DOMAIN, iova, bytes), 0);
        self.unmaps += 1;
        if st != Some(S_OK) {
            self.errors += 1;
        }
    }

    fn live_count(&self) -> usize {
        self.live.iter().filter(|s| s.1 != 0).count()
    }

    /// PROBEs `endpoint`: (status, the RESV_MEM properties as (subtype, start, end)).
    fn probe(&mut self, endpoint: u32) -> Option<(u8, Vec<Resv>)> {
        let size = self.probe_size;
        let st = self.send(&Req::new(T_PROBE).u32(endpoint).put(&[0; 64]), size)?;
        let at = self.q.as_ref()?.buf + WRITABLE;
        let (mut resv, mut off) = (Vec::new(), 0u64);
        while off + 4 <= u64::from(size) {
            let (kind, len) = (r16(at + off) & 0xfff, u64::from(r16(at + off + 2)));
            if kind == 0 {
                break;
            }
            if kind == 1 && len >= 20 && off + 4 + len <= u64::from(size) {
                resv.push((r8(at + off + 4), r64(at + off + 8), r64(at + off + 16)));
            }
            off += 4 + len;
        }
        Some((st, resv))
    }
}

/// A RESV_MEM property of a PROBE answer: (subtype, start, end).
type Resv = (u8, u64, u64);

/// A request outside `IommuHal`: its status (None: no answer).
fn call(req: Req) -> Option<u8> {
    IOMMU.with(|s| s.send(&req, 0))
}

/// `virtio-drivers`' DMA through the IOMMU: memory from `GuestHal`, seen by the device at IOVAs
/// that `IommuHal` MAPs in the disk's domain (READ|WRITE for allocations; per direction for
/// shared buffers) and UNMAPs when the memory is given back or unshared.
pub struct IommuHal;

// SAFETY: the memory is `GuestHal`'s (disjoint, zeroed, page-aligned, identity mapped; see its
// contract) and the CPU-side pointers are its; only the device-side addresses differ: each range
// is mapped in the IOMMU at an IOVA of its own, which is what is handed to the device (for a
// shared buffer plus its offset in the first page), and unmapped before the memory is reused.
unsafe impl Hal for IommuHal {
    fn dma_alloc(pages: usize, dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let (phys, ptr) = GuestHal::dma_alloc(pages, dir);
        let bytes = (pages * PAGE_SIZE) as u64;
        match IOMMU.with(|s| s.map(phys, bytes, MAP_READ | MAP_WRITE)) {
            (iova, true) => (iova, ptr),
            _ => {
                // SAFETY: just allocated with `pages` by GuestHal, and used by no one.
                unsafe { GuestHal::dma_dealloc(phys, ptr, pages) };
                (0, ptr)
            }
        }
    }
    unsafe fn dma_dealloc(iova: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        IOMMU.with(|s| s.unmap(iova));
        // SAFETY: `vaddr` is what GuestHal::dma_alloc returned for these `pages` (physical =
        // virtual), and the device can no longer reach it (unmapped).
        unsafe { GuestHal::dma_dealloc(vaddr.as_ptr() as u64, vaddr, pages) }
    }
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: the caller's guarantees are passed on unchanged.
        unsafe { GuestHal::mmio_phys_to_virt(paddr, size) }
    }
    unsafe fn share(buffer: NonNull<[u8]>, dir: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr() as *mut u8 as u64;
        let (page, off) = (addr & !(PAGE - 1), addr & (PAGE - 1));
        let bytes = (off + buffer.len() as u64 + PAGE - 1) & !(PAGE - 1);
        // A device-written data buffer (not the 1-byte status): what the fault flags affect.
        let data_in = dir == BufferDirection::DeviceToDriver && buffer.len() >= SECTOR_SIZE;
        IOMMU.with(|s| {
            let flags = match dir {
                BufferDirection::DriverToDevice => MAP_READ,
                BufferDirection::DeviceToDriver if data_in && s.fault == Fault::ReadOnly => {
                    MAP_READ
                }
                BufferDirection::DeviceToDriver => MAP_WRITE,
                BufferDirection::Both => MAP_READ | MAP_WRITE,
            };
            if data_in && s.fault == Fault::Unmapped {
                return s.take_iova(bytes) + off;
            }
            s.map(page, bytes, flags).0 + off
        })
    }
    unsafe fn unshare(iova: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {
        IOMMU.with(|s| s.unmap(iova & !(PAGE - 1)));
    }
}

/// A transport that also accepts VIRTIO_F_ACCESS_PLATFORM when the device offers it (the
/// drivers of `virtio-drivers` leave it out); everything else is passed through.
pub struct AckPlatform<T: Transport> {
    inner: T,
    offered: bool,
}

/// Whether the last `AckPlatform` accepted ACCESS_PLATFORM.
static ACKED: AtomicBool = AtomicBool::new(false);

/// Methods passed through to `self.inner` unchanged.
macro_rules! through {
    (&self $($f:ident($($a:ident: $t:ty),*) -> $r:ty;)*) => {
        $(fn $f(&self, $($a: $t),*) -> $r { self.inner.$f($($a),*) })*
    };
    (&mut self $($f:ident($($a:ident: $t:ty),*) $(-> $r:ty)?;)*) => {
        $(fn $f(&mut self, $($a: $t),*) $(-> $r)? { self.inner.$f($($a),*) })*
    };
}

impl<T: Transport> Transport for AckPlatform<T> {
    through!(&self
        device_type() -> DeviceType;
        get_status() -> DeviceStatus;
        requires_legacy_layout() -> bool;
        read_config_generation() -> u32;
    );
    through!(&mut self
        max_queue_size(queue: u16) -> u32;
        notify(queue: u16);
        set_status(status: DeviceStatus);
        set_guest_page_size(size: u32);
        queue_set(queue: u16, size: u32, desc: PhysAddr, driver: PhysAddr, device: PhysAddr);
        queue_unset(queue: u16);
        queue_used(queue: u16) -> bool;
        ack_interrupt() -> InterruptStatus;
    );
    fn read_device_features(&mut self) -> u64 {
        let f = self.inner.read_device_features();
        self.offered = f & ACCESS_PLATFORM != 0;
        f
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let extra = if self.offered { ACCESS_PLATFORM } else { 0 };
        ACKED.store(self.offered, Ordering::Relaxed);
        self.inner.write_driver_features(driver_features | extra);
    }
    fn read_config_space<V: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

fn ack(inner: PciTransport) -> Plat {
    AckPlatform {
        inner,
        offered: false,
    }
}

type Plat = AckPlatform<PciTransport>;

/// One read (or write) of `buf` at sector 0, waited for 2 s at most: `Err(None)` when no answer
/// came; the device is then reset (so that it lets go of `buf`) and the driver is unusable.
fn io<H: Hal>(
    blk: &mut VirtIOBlk<H, Plat>,
    l: &Layout,
    write: bool,
    buf: &mut [u8],
) -> Result<(), Option<virtio_drivers::Error>> {
    let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
    // SAFETY: `req`, `buf` and `resp` are not touched again until the request completed below,
    // or the device was reset (and so no longer uses them).
    let token = unsafe {
        if write {
            blk.write_blocks_nb(0, &mut req, buf, &mut resp)
        } else {
            blk.read_blocks_nb(0, &mut req, buf, &mut resp)
        }
    }
    .map_err(Some)?;
    if poll(2000, || blk.peek_used() == Some(token)) {
        // SAFETY: the buffers given to the `_nb` call, which the device has finished with.
        let r = unsafe {
            if write {
                blk.complete_write_blocks(token, &req, buf, &mut resp)
            } else {
                blk.complete_read_blocks(token, &req, buf, &mut resp)
            }
        };
        return r.map_err(Some);
    }
    l.set_status(0);
    poll(1000, || l.status() == 0);
    Err(None)
}

fn bdf(df: DeviceFunction) -> u16 {
    u16::from(df.bus) << 8 | u16::from(df.device) << 3 | u16::from(df.function)
}

/// Reads a little-endian value from the (identity-mapped) ACPI tables.
fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: the VMM's ACPI tables lie in identity-mapped, readable low memory; the addresses
    // come from the RSDP and XSDT it wrote, and the lengths from their headers.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// The VIOT, checked: the disk's endpoint ID, given the IOMMU's and the disk's BDFs (segment 0).
fn viot(rsdp: u64, iommu_bdf: u16, disk_bdf: u16) -> Result<u32, String> {
    if rsdp == 0 || rd::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return Err("no RSDP".into());
    }
    let xsdt: u64 = rd(rsdp + 24);
    let xsdt_len: u32 = rd(xsdt + 4);
    let table = (0..u64::from(xsdt_len.saturating_sub(36)) / 8)
        .map(|i| rd::<u64>(xsdt + 36 + 8 * i))
        .find(|&t| rd::<[u8; 4]>(t) == *b"VIOT")
        .ok_or("no VIOT in the XSDT")?;
    let len = u64::from(rd::<u32>(table + 4));
    if !(48..=0x1_0000).contains(&len) {
        return Err(alloc::format!("VIOT length {len}"));
    }
    let sum = (0..len).fold(0u8, |a, i| a.wrapping_add(rd(table + i)));
    let (count, first) = (rd::<u16>(table + 36), u64::from(rd::<u16>(table + 38)));
    let (mut iommu, mut ranges, mut at) = (None, Vec::new(), first);
    for _ in 0..count {
        let (kind, nlen) = (rd::<u8>(table + at), u64::from(rd::<u16>(table + at + 2)));
        if nlen < 4 || at + nlen > len {
            return Err(alloc::format!("node at {at}: length {nlen}"));
        }
        let n = table + at;
        if kind == 3 && nlen >= 16 && iommu.is_none() {
            iommu = Some((at, rd::<u16>(n + 4), rd::<u16>(n + 6)));
        } else if kind == 1 && nlen >= 24 {
            let (seg, b) = (rd::<[u16; 2]>(n + 8), rd::<[u16; 2]>(n + 12));
            ranges.push((rd::<u32>(n + 4), seg, b, u64::from(rd::<u16>(n + 16))));
        }
        at += nlen;
    }
    println!("INFO iommu VIOT at {table:#x}: IOMMU {iommu:x?}, PCI ranges {ranges:x?}");
    let Some((iommu_at, seg, b)) = iommu else {
        return Err("no virtio-pci IOMMU node".into());
    };
    if sum != 0 || seg != 0 || b != iommu_bdf {
        return Err(alloc::format!(
            "checksum {sum:#x}, IOMMU node {seg:04x}:{b:04x}, function {iommu_bdf:04x}"
        ));
    }
    ranges
        .iter()
        .find(|(_, s, b, out)| s[0] == 0 && (b[0]..=b[1]).contains(&disk_bdf) && *out == iommu_at)
        .map(|(ep, _, b, _)| ep.wrapping_add(u32::from(disk_bdf - b[0])))
        .ok_or_else(|| alloc::format!("no PCI range for {disk_bdf:04x} to the IOMMU node"))
}

pub fn scenario_iommu(boot: &BootInfo) {
    let failed = crate::FAILED.load(Ordering::Relaxed);
    let (Some(idf), Some(ddf)) = (
        find(DeviceType::IOMMU).into_iter().next(),
        find(DeviceType::Block).into_iter().next(),
    ) else {
        fail("iommu-present", format_args!("no virtio-iommu or no disk"));
        return;
    };
    let (Some(il), Some(dl)) = (Layout::find(idf), Layout::find(ddf)) else {
        return;
    };
    pass("iommu-present");

    // 1. VIOT.
    let ep = match viot(boot.rsdp, bdf(idf), bdf(ddf)) {
        Ok(ep) => {
            pass("iommu-viot");
            ep
        }
        Err(e) => {
            fail("iommu-viot", format_args!("{e}"));
            u32::from(bdf(ddf))
        }
    };
    println!("INFO iommu at {idf}, disk at {ddf}: endpoint {ep:#x}");

    // 2. Features, config, request queue.
    let want = VERSION_1 | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG;
    let offered = il.device_features();
    // The event queue (1) gets buffers for the faults the disk's accesses will raise.
    let Some((q, mut ev)) = il
        .start("iommu-config", want & offered, &[0, 1])
        .and_then(|v| {
            let mut v = v.into_iter();
            Some((v.next()?, v.next()?))
        })
    else {
        return;
    };
    for i in 0..QSIZE {
        ev.set_desc(i, ev.buf + EVENT_SIZE * u64::from(i), 24, F_WRITE, 0);
        ev.publish(i);
    }
    let c = il.device;
    let (mask, in_start, in_end) = (r64(c), r64(c + 8), r64(c + 16));
    let (dom_start, dom_end, probe_size, bypass) =
        (r32(c + 24), r32(c + 28), r32(c + 32), r8(c + 36));
    println!(
        "INFO iommu features {offered:#x} page_size_mask {mask:#x} input {in_start:#x}..={in_end:#x} \
         domains {dom_start}..={dom_end} probe_size {probe_size} bypass {bypass}"
    );
    check!(
        "iommu-config",
        offered & want == want
            && mask.trailing_zeros() == 12
            && in_start == 0
            && in_end > 1 << 32
            && dom_start <= dom_end
            && (32..=0xbfc).contains(&probe_size)
            && bypass == 1,
        "offered {offered:#x} (want {want:#x}), see the INFO line"
    );
    let base = if in_end >= IOVA_BASE + (1 << 32) {
        IOVA_BASE
    } else {
        1 << 32
    };
    IOMMU.with(|s| {
        s.q = Some(q);
        s.probe_size = probe_size.min(0xbfc);
        s.next_iova = base;
    });

    // 3. PROBE.
    let probe = IOMMU.with(|s| s.probe(ep));
    println!("INFO iommu probe {ep:#x}: {probe:x?}");
    check!(
        "iommu-probe",
        probe
            .as_ref()
            .is_some_and(|(st, resv)| *st == S_OK && resv.contains(&(1, 0xfee0_0000, 0xfeef_ffff))),
        "{probe:x?}"
    );

    // 4. Bypass off: the unattached disk's rings cannot be translated.
    w8(c + 36, 0);
    let bypass = r8(c + 36);
    check!("iommu-bypass-off", bypass == 0, "bypass reads {bypass}");
    no_bypass(ddf, &dl);

    // 5. Error statuses, and the disk attached to domain 1.
    errors(ep, in_end);

    // 6-8. The disk through translated addresses.
    let wrote = translated(ddf, &dl);
    IOMMU.with(|s| s.fault = Fault::None);

    // The faults of steps 4, 7 and 8 on the event queue: the rings of the unattached disk
    // (no domain, a read), then the buffers the device was to write (no mapping for it).
    let mut events = Vec::new();
    while let Some((head, len)) = ev.poll_used() {
        let at = ev.buf + EVENT_SIZE * u64::from(head);
        events.push((len, r8(at), r32(at + 4), r32(at + 8), r64(at + 16)));
    }
    println!("INFO iommu fault events (len, reason, flags, endpoint, address): {events:x?}");
    let domain = events
        .iter()
        .filter(|e| *e == &(24, 1, 0x101, ep, e.4))
        .count();
    let mapping = events
        .iter()
        .filter(|e| *e == &(24, 2, 0x102, ep, e.4))
        .count();
    check!(
        "iommu-fault-events",
        domain == 1 && mapping == 2 && events.len() == 3,
        "{domain} domain faults (want 1), {mapping} write faults (want 2), {} in all",
        events.len()
    );

    // 9. A bypass domain: identity DMA.
    let detach = call(Req::attach(T_DETACH, DOMAIN, ep, 0));
    let attach = call(Req::attach(T_ATTACH, 2, ep, ATTACH_F_BYPASS));
    let read = transport(ddf).and_then(|t| {
        let mut blk = VirtIOBlk::<GuestHal, Plat>::new(ack(t)).ok()?;
        let mut one = [0x5au8; SECTOR_SIZE];
        let r = io(&mut blk, &dl, false, &mut one);
        Some(r.map(|()| one[0] == expected(wrote, 0) && one.iter().all(|&b| b == one[0])))
    });
    check!(
        "iommu-bypass-domain",
        detach == Some(S_OK) && attach == Some(S_OK) && matches!(read, Some(Ok(true))),
        "DETACH {detach:?}, ATTACH bypass {attach:?}, read {read:?}"
    );

    if crate::FAILED.load(Ordering::Relaxed) == failed {
        pass("iommu");
    } else {
        fail("iommu", format_args!("a check above failed"));
    }
    if boot.arg("iommu_loop").is_some() {
        io_loop(ddf, &dl, ep, wrote);
    }
}

/// `iommu_loop=1`: the disk back in domain 1, read through translated addresses for ever,
/// `IOMMU-IO <n> ok` (or `FAIL iommu-io`) every 20 ms: a snapshot restored in another VMM
/// must go on translating (its address spaces, and the rings translated through them).
fn io_loop(ddf: DeviceFunction, dl: &Layout, ep: u32, wrote: bool) -> ! {
    let detach = call(Req::attach(T_DETACH, 2, ep, 0));
    let attach = call(Req::attach(T_ATTACH, DOMAIN, ep, 0));
    if detach != Some(S_OK) || attach != Some(S_OK) {
        fail(
            "iommu-io",
            format_args!("DETACH {detach:?}, ATTACH {attach:?}"),
        );
    }
    let mut blk = transport(ddf).and_then(|t| VirtIOBlk::<IommuHal, Plat>::new(ack(t)).ok());
    if blk.is_none() {
        fail("iommu-io", format_args!("the driver did not start"));
    }
    println!("IOMMU-IO READY");
    let mut buf = alloc::vec![0u8; SECTORS * SECTOR_SIZE];
    let mut n = 0u64;
    loop {
        if let Some(b) = blk.as_mut() {
            buf.fill(0);
            let r = io(b, dl, false, &mut buf);
            let good = (0..SECTORS).all(|s| {
                buf[s * SECTOR_SIZE..][..SECTOR_SIZE]
                    .iter()
                    .all(|&x| x == expected(wrote, s as u64))
            });
            if r.is_ok() && good {
                println!("IOMMU-IO {n} ok");
            } else {
                fail(
                    "iommu-io",
                    format_args!("read {n}: {r:?}, data right: {good}"),
                );
            }
        }
        n += 1;
        smp::delay_us(20_000);
    }
}

/// What sector `s` holds: the guest's pattern once written, else the host's.
fn expected(wrote: bool, s: u64) -> u8 {
    [host_pattern, guest_pattern][usize::from(wrote)](0, s)
}

/// `iommu-no-bypass`: the disk, unattached with bypass off, offers and gets ACCESS_PLATFORM
/// (FEATURES_OK holds), and asks for a reset at DRIVER_OK (its rings cannot be translated). No
/// I/O is tried.
fn no_bypass(ddf: DeviceFunction, dl: &Layout) {
    let offered = dl.device_features() & ACCESS_PLATFORM != 0;
    let Some(t) = transport(ddf) else { return };
    let blk = VirtIOBlk::<GuestHal, Plat>::new(ack(t));
    poll(1000, || dl.status() & NEEDS_RESET != 0);
    let (status, acked) = (dl.status(), ACKED.load(Ordering::Relaxed));
    check!(
        "iommu-no-bypass",
        blk.is_ok() && offered && acked && status & (NEEDS_RESET | 8) == NEEDS_RESET | 8,
        "init {:?}, ACCESS_PLATFORM offered {offered} acked {acked}, status {status:#x}",
        blk.as_ref().err()
    );
    drop(blk);
}

/// The error statuses; leaves the disk attached to domain 1.
fn errors(ep: u32, in_end: u64) {
    let scratch = dma_pages(2);
    let a = IOMMU.with(|s| s.take_iova(2 * PAGE));
    let st = call(Req::attach(T_ATTACH, DOMAIN, 0xffff_fff0, 0));
    check!("iommu-attach-noent", st == Some(S_NOENT), "status {st:?}");
    let st = call(Req::map(77, a, PAGE, scratch, MAP_READ));
    check!("iommu-map-noent", st == Some(S_NOENT), "status {st:?}");
    let st = call(Req::attach(T_ATTACH, DOMAIN, ep, 0));
    check!("iommu-attach", st == Some(S_OK), "status {st:?}");
    match in_end.checked_add(PAGE + 1) {
        Some(_) => {
            let st = call(Req::map(DOMAIN, in_end + 1, PAGE, scratch, MAP_READ));
            check!("iommu-map-range", st == Some(S_RANGE), "status {st:?}");
        }
        None => println!("INFO iommu: input range to the top, no MAP beyond it"),
    }
    let rw = MAP_READ | MAP_WRITE;
    let two = call(Req::map(DOMAIN, a, 2 * PAGE, scratch, rw));
    let over = call(Req::map(DOMAIN, a + PAGE, PAGE, scratch, MAP_READ));
    check!(
        "iommu-map-overlap",
        two == Some(S_OK) && over == Some(S_INVAL),
        "MAP of 2 pages {two:?}, then of the second {over:?}"
    );
    let split = call(Req::unmap(DOMAIN, a, PAGE));
    let still = call(Req::map(DOMAIN, a + PAGE, PAGE, scratch, MAP_READ));
    check!(
        "iommu-unmap-split",
        split == Some(S_RANGE) && still == Some(S_INVAL),
        "UNMAP of the first page {split:?}, then MAP of the second {still:?}"
    );
    let whole = call(Req::unmap(DOMAIN, a, 2 * PAGE));
    let again = call(Req::map(DOMAIN, a + PAGE, PAGE, scratch, MAP_READ));
    let last = call(Req::unmap(DOMAIN, a + PAGE, PAGE));
    check!(
        "iommu-unmap",
        whole == Some(S_OK) && again == Some(S_OK) && last == Some(S_OK),
        "UNMAP of both pages {whole:?}, MAP of the second {again:?}, UNMAP of it {last:?}"
    );
    let st = call(Req::new(0x42).put(&[0; 20]));
    check!("iommu-unsupp", st == Some(S_UNSUPP), "status {st:?}");
}

/// `iommu-blk-*` and the fault checks, with `IommuHal` in domain 1. Whether the guest's pattern
/// was written.
fn translated(ddf: DeviceFunction, dl: &Layout) -> bool {
    let mut wrote = false;
    let Some(t) = transport(ddf) else {
        return wrote;
    };
    let mut blk = match VirtIOBlk::<IommuHal, Plat>::new(ack(t)) {
        Ok(b) => b,
        Err(e) => {
            fail("iommu-blk-init", format_args!("{e}"));
            return wrote;
        }
    };
    let st = dl.status();
    check!(
        "iommu-blk-init",
        st & NEEDS_RESET == 0 && st & 4 != 0,
        "status {st:#x}"
    );
    let (maps0, unmaps0, live0) = IOMMU.with(|s| (s.maps, s.unmaps, s.live_count()));
    check!(
        "iommu-blk-capacity",
        blk.capacity() >= SECTORS as u64,
        "{} sectors",
        blk.capacity()
    );
    let bad_sector = |buf: &[u8], wrote: bool| {
        (0..SECTORS as u64).find(|&s| {
            buf[s as usize * SECTOR_SIZE..][..SECTOR_SIZE]
                .iter()
                .any(|&b| b != expected(wrote, s))
        })
    };
    let mut buf = alloc::vec![0u8; SECTORS * SECTOR_SIZE];
    macro_rules! io_or_stop {
        ($name:expr, $write:expr, $buf:expr) => {
            match io(&mut blk, dl, $write, $buf) {
                Err(None) => {
                    fail($name, format_args!("no answer in 2 s; device reset"));
                    return wrote;
                }
                r => r,
            }
        };
    }
    let r = io_or_stop!("iommu-blk-read", false, &mut buf);
    let bad = bad_sector(&buf, false);
    check!(
        "iommu-blk-read",
        r.is_ok() && bad.is_none(),
        "{r:?}, sector {bad:?} differs"
    );
    for s in 0..SECTORS {
        buf[s * SECTOR_SIZE..][..SECTOR_SIZE].fill(guest_pattern(0, s as u64));
    }
    let r = io_or_stop!("iommu-blk-write", true, &mut buf);
    wrote = r.is_ok();
    check!("iommu-blk-write", r.is_ok(), "{r:?}");
    let r = blk.flush();
    check!("iommu-blk-flush", r.is_ok(), "{r:?}");
    buf.fill(0);
    let r = io_or_stop!("iommu-blk-read-back", false, &mut buf);
    let bad = bad_sector(&buf, wrote);
    check!(
        "iommu-blk-read-back",
        r.is_ok() && bad.is_none(),
        "{r:?}, sector {bad:?} differs"
    );

    // 7-8. A data buffer at an IOVA never mapped, then one mapped READ only for the device to
    // write: the request fails and the buffer is untouched; the next one works again.
    let one = &mut buf[..SECTOR_SIZE];
    for (fault, name, after) in [
        (
            Fault::Unmapped,
            "iommu-unmapped-buffer",
            "iommu-after-fault",
        ),
        (
            Fault::ReadOnly,
            "iommu-readonly-mapping",
            "iommu-after-readonly",
        ),
    ] {
        one.fill(0x5a);
        IOMMU.with(|s| s.fault = fault);
        let r = io_or_stop!(name, false, one);
        IOMMU.with(|s| s.fault = Fault::None);
        check!(
            name,
            matches!(r, Err(Some(_))) && one.iter().all(|&b| b == 0x5a),
            "{r:?} (want an error), buffer[0] {:#x} (want 0x5a, untouched)",
            one[0]
        );
        let r = io_or_stop!(after, false, one);
        check!(
            after,
            r.is_ok() && one.iter().all(|&b| b == expected(wrote, 0)),
            "{r:?}, buffer[0] {:#x}",
            one[0]
        );
    }

    let (maps, unmaps, live, errors) =
        IOMMU.with(|s| (s.maps - maps0, s.unmaps - unmaps0, s.live_count(), s.errors));
    println!("INFO iommu blk: {maps} MAPs and {unmaps} UNMAPs for I/O, {live0} live for the rings");
    check!(
        "iommu-blk-mappings",
        maps > 0 && maps == unmaps && live == live0 && live0 > 0 && errors == 0,
        "{maps} MAPs, {unmaps} UNMAPs, {live} live (rings {live0}), {errors} not OK"
    );
    drop(blk);
    let (live, errors) = IOMMU.with(|s| (s.live_count(), s.errors));
    check!(
        "iommu-blk-dealloc",
        live == 0 && errors == 0,
        "{live} mappings left after the driver was dropped, {errors} not OK"
    );
    wrote
}
