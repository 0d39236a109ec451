//! PCI and virtio scenarios: enumeration through ECAM and ports 0xcf8/0xcfc, and the
//! `virtio-drivers` crate (an independent driver stack) on the VMM's virtio-pci devices.

use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::heap::SpinLock;
use crate::rawq::{r16, r8, w32, w64, w8, Layout, F_NEXT, F_WRITE, VERSION_1};
use crate::{fail, parse_u64, pass, println, smp, svc};

pub const ECAM_BASE: u64 = 0xe800_0000;
/// DMA arena: guest RAM at 16-32 MiB, identity mapped (guest physical = virtual).
const DMA_START: u64 = 0x100_0000;
const DMA_END: u64 = 0x200_0000;
static DMA_NEXT: AtomicU64 = AtomicU64::new(DMA_START);
/// DMA ranges given back (address, pages) and not at the arena's top, for `dma_alloc` to use
/// again (exact page counts only): drivers of hot-plugged devices come and go for ever.
static DMA_FREE: SpinLock<[(u64, usize); 64]> = SpinLock::new([(0, 0); 64]);

pub struct GuestHal;

// SAFETY: dma_alloc hands out disjoint, zeroed, page-aligned ranges of RAM that nothing else
// in the guest uses (fresh ones, or ranges given back through dma_dealloc, which the driver no
// longer uses and whose device it has reset); all memory is identity mapped, so physical =
// virtual everywhere.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let len = (pages * PAGE_SIZE) as u64;
        let reused = DMA_FREE.with(|free| {
            let slot = free.iter_mut().find(|(_, p)| *p == pages)?;
            let addr = slot.0;
            *slot = (0, 0);
            Some(addr)
        });
        let addr = reused.unwrap_or_else(|| {
            let addr = DMA_NEXT.fetch_add(len, Ordering::Relaxed);
            assert!(addr + len <= DMA_END, "DMA arena exhausted");
            addr
        });
        // SAFETY: [addr, addr+len) is RAM reserved for DMA (above).
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
        (addr, NonNull::new(addr as *mut u8).expect("non-null"))
    }
    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let len = (pages * PAGE_SIZE) as u64;
        if DMA_NEXT
            .compare_exchange(paddr + len, paddr, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            // Not at the top: keep it for a request of the same size (or leak it when the
            // list is full).
            DMA_FREE.with(|free| {
                if let Some(slot) = free.iter_mut().find(|(_, p)| *p == 0) {
                    *slot = (paddr, pages);
                }
            });
        }
        0
    }
    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("non-null MMIO")
    }
    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as u64
    }
    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

pub fn dma_pages(pages: usize) -> u64 {
    GuestHal::dma_alloc(pages, BufferDirection::Both).0
}

pub fn ecam() -> MmioCam<'static> {
    // SAFETY: the ECAM range is identity mapped (uncached) and only used for config accesses.
    unsafe { MmioCam::new(ECAM_BASE as *mut u8, Cam::Ecam) }
}

pub fn root() -> PciRoot<MmioCam<'static>> {
    PciRoot::new(ecam())
}

/// Config dword through ports 0xcf8/0xcfc (monitor port-I/O services).
fn port_read(dev: u8, reg: u8) -> u32 {
    svc::outl(0xcf8, 0x8000_0000 | u32::from(dev) << 11 | u32::from(reg));
    svc::inl(0xcfc)
}

/// Every function on bus 0 with its device type (None for non-virtio).
pub fn devices(root: &PciRoot<MmioCam<'static>>) -> Vec<(DeviceFunction, Option<DeviceType>)> {
    root.enumerate_bus(0)
        .map(|(df, info)| (df, virtio_device_type(&info)))
        .collect()
}

/// Identity-maps (uncached) the memory BARs of bus 0's functions that lie in `window`, for a
/// 64-bit window too large to map whole (the original's spans tens of TiB). Returns how many
/// BARs it mapped, or the first mapping error.
pub fn map_bars_in(window: (u64, u64)) -> Result<usize, crate::paging::MapError> {
    let (start, size) = window;
    let mut root = root();
    let mut mapped = 0;
    for (df, _) in devices(&root) {
        for bar in 0..6 {
            let Ok(Some(BarInfo::Memory {
                address, size: len, ..
            })) = root.bar_info(df, bar)
            else {
                continue;
            };
            if len > 0 && address >= start && address - start < size {
                crate::paging::map_uncached(address, len)?;
                mapped += 1;
            }
        }
    }
    Ok(mapped)
}

pub fn find(kind: DeviceType) -> Vec<DeviceFunction> {
    devices(&root())
        .into_iter()
        .filter(|(_, t)| *t == Some(kind))
        .map(|(df, _)| df)
        .collect()
}

pub fn transport(df: DeviceFunction) -> Option<PciTransport> {
    let mut r = root();
    match PciTransport::new::<GuestHal, _>(&mut r, df) {
        Ok(t) => Some(t),
        Err(e) => {
            fail("virtio-transport", format_args!("{df}: {e}"));
            None
        }
    }
}

pub fn scenario_pci(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let mut root = root();
    let cam = ecam();
    let devs = devices(&root);
    for (df, t) in &devs {
        let id = cam.read_word(*df, 0);
        println!("INFO pci {df} id={id:08x} type={t:?}");
    }
    let bridge = cam.read_word(
        DeviceFunction {
            bus: 0,
            device: 0,
            function: 0,
        },
        0,
    );
    let class = cam.read_word(
        DeviceFunction {
            bus: 0,
            device: 0,
            function: 0,
        },
        8,
    ) >> 16;
    crate::check!(
        "pci-host-bridge",
        bridge == 0x0d57_8086 && class == 0x0600,
        "00:00.0 id {bridge:#x} class {class:#x}"
    );
    // The same functions through the legacy ports.
    let mut mismatches = 0;
    for dev in 0..32u8 {
        let via_port = port_read(dev, 0);
        let via_ecam = cam.read_word(
            DeviceFunction {
                bus: 0,
                device: dev,
                function: 0,
            },
            0,
        );
        if via_port != via_ecam {
            println!("INFO pci dev {dev}: ports {via_port:#x} ecam {via_ecam:#x}");
            mismatches += 1;
        }
    }
    crate::check!(
        "pci-ports-match-ecam",
        mismatches == 0,
        "{mismatches} differences"
    );
    let virtio: Vec<_> = devs.iter().filter(|(_, t)| t.is_some()).collect();
    if let Some(want) = boot.arg("expect_virtio").and_then(parse_u64) {
        crate::check!(
            "pci-virtio-count",
            virtio.len() as u64 == want,
            "{} virtio functions, expected {want}",
            virtio.len()
        );
    }
    // The host bridge's windows, from its _CRS: BARs must lie inside them.
    let windows = acpi.map(|a| a.pci_windows).unwrap_or_default();
    let ram_end = boot.ram_end();
    println!(
        "INFO pci windows mmio32={:x?} mmio64={:x?} ram_end={ram_end:#x}",
        windows.mmio32, windows.mmio64
    );
    let m64_ok = windows
        .mmio64
        .is_none_or(|w| w.start >= 1 << 32 && w.start >= ram_end && !w.prefetchable);
    crate::check!(
        "pci-windows",
        windows.mmio32.is_some_and(|w| !w.prefetchable) && m64_ok,
        "{windows:x?}, RAM ends at {ram_end:#x}"
    );
    // A 64-bit BAR belongs in the 64-bit window when there is one (and so above 4 GiB and
    // above RAM), otherwise in the 32-bit one. As the original's, a disk present at boot has a
    // 32-bit BAR in the 32-bit window instead (firmware that maps only the first 4 GiB can
    // reach the disk it boots from).
    let home = windows.mmio64.or(windows.mmio32);
    let mut bad_bars = 0;
    let mut bad_caps = 0;
    let mut ends: Vec<(u64, u64)> = Vec::new();
    for (df, t) in &virtio {
        let disk = *t == Some(DeviceType::Block);
        let (want_type, want_home) = match disk {
            true => (MemoryBarType::Width32, windows.mmio32),
            false => (MemoryBarType::Width64, home),
        };
        match root.bar_info(*df, 0) {
            Ok(Some(BarInfo::Memory {
                address_type,
                prefetchable,
                address,
                size,
            })) => {
                let high_ok =
                    disk || windows.mmio64.is_none() || (address >= 1 << 32 && address >= ram_end);
                let ok = size == 0x1_0000
                    && address_type == want_type
                    && !prefetchable
                    && want_home.is_some_and(|w| w.contains(address, size))
                    && high_ok
                    && address % size == 0
                    && ends
                        .iter()
                        .all(|&(a, s)| address + size <= a || a + s <= address);
                println!("INFO {df}: BAR0 {address:#x} size {size:#x}");
                if !ok {
                    println!("INFO {df}: BAR0 {address_type:?} prefetchable={prefetchable} bad");
                    bad_bars += 1;
                }
                ends.push((address, size));
            }
            other => {
                println!("INFO {df}: BAR0 {other:?}");
                bad_bars += 1;
            }
        }
        for bar in 2..6 {
            if !matches!(root.bar_info(*df, bar), Ok(None)) {
                bad_bars += 1;
            }
        }
        let mut types = 0u32;
        let mut msix = false;
        for cap in root.capabilities(*df) {
            if cap.id == 0x09 {
                types |= 1 << ((cap.private_header >> 8) & 0xff);
            }
            if cap.id == 0x11 {
                msix = true;
            }
        }
        if types != 0b11_1110 || !msix {
            println!("INFO {df}: cap types {types:#b} msix {msix}");
            bad_caps += 1;
        }
    }
    crate::check!(
        "pci-bars",
        bad_bars == 0 && !virtio.is_empty(),
        "{bad_bars} bad BARs"
    );
    if let Some((df, _)) = virtio.first() {
        bar_sizing(*df);
    }
    crate::check!(
        "pci-capabilities",
        bad_caps == 0 && !virtio.is_empty(),
        "{bad_caps} devices with missing capabilities"
    );
    // Move the rng's BAR (decoding off while it changes, as an OS does) and use the device at
    // its new address: the VMM must move the MMIO range and the notify ioeventfd with it.
    // First below 4 GiB (upper dword 0), then to the top of the 64-bit window.
    if let Some((df, _)) = devs
        .iter()
        .find(|(_, t)| *t == Some(DeviceType::EntropySource))
    {
        let (works, moved) = move_bar_and_use(&mut root, *df, 0xd000_0000);
        crate::check!("pci-bar-move", works, "to 0xd0000000: moved={moved}");
        if let Some(w) = windows.mmio64 {
            let top = (w.end() - 0x1_0000) & !0xffff;
            let (works, moved) = move_bar_and_use(&mut root, *df, top);
            crate::check!("pci-bar-move-64", works, "to {top:#x}: moved={moved}");
        }
    }
}

/// Moves BAR 0 of `df` to `new` and reads 64 bytes from the rng there: (worked, moved).
fn move_bar_and_use(
    root: &mut PciRoot<MmioCam<'static>>,
    df: DeviceFunction,
    new: u64,
) -> (bool, bool) {
    let (_, cmd) = root.get_status_command(df);
    root.set_command(df, cmd - Command::MEMORY_SPACE);
    root.set_bar_64(df, 0, new);
    root.set_command(df, cmd);
    let moved = matches!(
        root.bar_info(df, 0),
        Ok(Some(BarInfo::Memory { address, .. })) if address == new
    );
    let works = moved
        && transport(df)
            .and_then(|t| VirtIORng::<GuestHal, _>::new(t).ok())
            .is_some_and(|mut rng| {
                let mut b = [0u8; 64];
                rng.request_entropy(&mut b).is_ok_and(|n| n == 64)
            });
    (works, moved)
}

/// `pci-bar-sizing`: all ones in both dwords of a 64-bit BAR (decoding off) read back the
/// 64 KiB size mask with the type bits (64-bit, not prefetchable) and all ones above; the
/// original address comes back when it is restored.
fn bar_sizing(df: DeviceFunction) {
    let mut cam = ecam();
    let (lo, hi) = (cam.read_word(df, 0x10), cam.read_word(df, 0x14));
    let cmd = cam.read_word(df, 4) & 0xffff;
    cam.write_word(df, 4, cmd & !2);
    cam.write_word(df, 0x10, u32::MAX);
    cam.write_word(df, 0x14, u32::MAX);
    let (size_lo, size_hi) = (cam.read_word(df, 0x10), cam.read_word(df, 0x14));
    cam.write_word(df, 0x10, lo);
    cam.write_word(df, 0x14, hi);
    cam.write_word(df, 4, cmd);
    let back = (cam.read_word(df, 0x10), cam.read_word(df, 0x14));
    crate::check!(
        "pci-bar-sizing",
        size_lo == 0xffff_0004 && size_hi == u32::MAX && back == (lo, hi),
        "sizing read {size_hi:#x}:{size_lo:#x}, restored {back:x?} from {hi:#x}:{lo:#x}"
    );
}

pub fn scenario_rng() {
    let Some(df) = find(DeviceType::EntropySource).into_iter().next() else {
        fail("rng-present", format_args!("no virtio-rng function"));
        return;
    };
    pass("rng-present");
    let Some(t) = transport(df) else { return };
    match VirtIORng::<GuestHal, _>::new(t) {
        Ok(mut rng) => {
            let msix = msix_mask_and_route(df);
            let mut buf = [0u8; 256];
            match rng.request_entropy(&mut buf) {
                Ok(n) => {
                    let distinct = buf[..n].iter().any(|&b| b != buf[0]);
                    crate::check!(
                        "rng-read",
                        n > 0 && distinct,
                        "{n} bytes, all {:#x}",
                        buf[0]
                    );
                }
                Err(e) => fail("rng-read", format_args!("{e}")),
            }
            if let Some((_, cap, _)) = msix {
                // With EVENT_IDX the driver may consume the completion before the device
                // decides whether to interrupt, so the pending bit is checked by the hostile
                // scenario (its hand-made driver does not negotiate EVENT_IDX). Disable MSI-X.
                msix_disable(df, cap);
            }
        }
        Err(e) => fail("rng-init", format_args!("{e}")),
    }
}

/// Reads the PBA's first word at `bar + pba`, waiting up to 5 s for bit 0 (the device
/// publishes the used entry before it raises the interrupt, and a loaded host may deschedule it
/// in between).
pub fn wait_pending_bit(bar: u64, pba: u64) -> u64 {
    let mut bits = 0;
    for _ in 0..50_000 {
        // SAFETY: PBA in our device's BAR (identity-mapped MMIO).
        bits = unsafe { core::ptr::read_volatile((bar + pba) as *const u64) };
        if bits & 1 == 1 {
            break;
        }
        smp::delay_us(100);
    }
    bits
}

/// Disables MSI-X of `df` (capability at `cap`).
pub fn msix_disable(df: DeviceFunction, cap: u8) {
    ecam().write_word(df, cap, 0);
}

/// Enables MSI-X with the function masked, programs entry 0 and routes queue 0 to it.
/// Returns (BAR address, MSI-X capability offset, PBA offset).
pub fn msix_mask_and_route(df: DeviceFunction) -> Option<(u64, u8, u64)> {
    let mut r = root();
    let bar = match r.bar_info(df, 0) {
        Ok(Some(BarInfo::Memory { address, .. })) => address,
        _ => return None,
    };
    let mut cam = ecam();
    let mut msix = None;
    let mut common = None;
    for c in r.capabilities(df) {
        if c.id == 0x11 {
            msix = Some(c.offset);
        }
        if c.id == 0x09 && (c.private_header >> 8) & 0xff == 1 {
            common = Some(u64::from(cam.read_word(df, c.offset + 8)));
        }
    }
    let (Some(cap), Some(common)) = (msix, common) else {
        fail("msix-cap", format_args!("no MSI-X or common capability"));
        return None;
    };
    let table = u64::from(cam.read_word(df, cap + 4) & !7);
    let pba = u64::from(cam.read_word(df, cap + 8) & !7);
    cam.write_word(df, cap, 0xc000 << 16);
    let ctl = cam.read_word(df, cap) >> 16;
    crate::check!(
        "msix-enable",
        ctl & 0xc000 == 0xc000,
        "message control {ctl:#x}"
    );
    let w32 = |a: u64, v: u32| {
        // SAFETY: our device's BAR (identity-mapped MMIO).
        unsafe { core::ptr::write_volatile((bar + a) as *mut u32, v) }
    };
    w32(table, 0xfee0_0000);
    w32(table + 4, 0);
    w32(table + 8, 0x30);
    w32(table + 12, 0);
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile((bar + common + 0x16) as *mut u16, 0);
        core::ptr::write_volatile((bar + common + 0x1a) as *mut u16, 0);
    }
    // SAFETY: as above.
    let v = unsafe { core::ptr::read_volatile((bar + common + 0x1a) as *const u16) };
    crate::check!("msix-queue-vector", v == 0, "queue 0 vector reads {v:#x}");
    Some((bar, cap, pba))
}

/// Byte of sector `s` of disk `k` as the host wrote it, and as the guest rewrites it.
pub fn host_pattern(k: usize, s: u64) -> u8 {
    (s as u8).wrapping_mul(3).wrapping_add(k as u8 + 1)
}
pub fn guest_pattern(k: usize, s: u64) -> u8 {
    (s as u8).wrapping_mul(5).wrapping_add(k as u8 + 0x80)
}

pub fn scenario_blk(boot: &BootInfo) {
    let disks = find(DeviceType::Block);
    let want = boot.arg("blk_disks").and_then(parse_u64).unwrap_or(1) as usize;
    crate::check!(
        "blk-count",
        disks.len() == want,
        "{} disks, expected {want}",
        disks.len()
    );
    let sectors = boot
        .arg("blk_sectors")
        .and_then(parse_u64)
        .unwrap_or(8)
        .clamp(1, 256);
    let ro_mask = boot.arg("blk_ro").and_then(parse_u64).unwrap_or(0);
    for (k, df) in disks.into_iter().enumerate() {
        let Some(t) = transport(df) else { continue };
        let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
            Ok(b) => b,
            Err(e) => {
                fail("blk-init", format_args!("disk {k}: {e}"));
                continue;
            }
        };
        let name = |n: &str| alloc::format!("blk{k}-{n}");
        crate::check!(
            &name("capacity"),
            blk.capacity() >= sectors,
            "{} sectors",
            blk.capacity()
        );
        let mut id = [0u8; 20];
        match blk.device_id(&mut id) {
            Ok(n) => {
                let s = core::str::from_utf8(&id[..n]).unwrap_or("?");
                // `blk_id=`: every disk's id (a backend that names its disks itself).
                let want = match boot.arg("blk_id") {
                    Some(id) => alloc::string::String::from(id),
                    None => alloc::format!("serial{k}"),
                };
                crate::check!(&name("get-id"), s == want, "id {s:?}, expected {want:?}");
            }
            Err(e) => fail(&name("get-id"), format_args!("{e}")),
        }
        let mut buf = alloc::vec![0u8; 512 * sectors as usize];
        match blk.read_blocks(0, &mut buf) {
            Ok(()) => {
                let bad = (0..sectors).find(|&s| {
                    buf[s as usize * 512..][..512]
                        .iter()
                        .any(|&b| b != host_pattern(k, s))
                });
                crate::check!(&name("read"), bad.is_none(), "sector {bad:?} differs");
            }
            Err(e) => fail(&name("read"), format_args!("{e}")),
        }
        // Read past the end fails.
        let mut one = [0u8; 512];
        crate::check!(
            &name("read-beyond-end"),
            blk.read_blocks(blk.capacity() as usize, &mut one).is_err(),
            "succeeded"
        );
        for s in 0..sectors {
            buf[s as usize * 512..][..512].fill(guest_pattern(k, s));
        }
        let readonly = ro_mask & (1 << k) != 0;
        crate::check!(
            &name("ro-flag"),
            blk.readonly() == readonly,
            "readonly={}",
            blk.readonly()
        );
        let w = blk.write_blocks(0, &buf);
        if readonly {
            crate::check!(
                &name("write-rejected"),
                w.is_err(),
                "write to a read-only disk succeeded"
            );
        } else {
            crate::check!(&name("write"), w.is_ok(), "{w:?}");
            crate::check!(&name("flush"), blk.flush().is_ok(), "flush failed");
            let mut back = alloc::vec![0u8; buf.len()];
            let ok = blk.read_blocks(0, &mut back).is_ok() && back == buf;
            crate::check!(&name("read-back"), ok, "data read back differs");
        }
        drop(blk);
        blk_last_queue(k, df, sectors, readonly);
    }
}

/// What the `blk` scenario writes through a disk's last queue, to sector `blk_sectors`.
pub fn mq_pattern(k: usize) -> u8 {
    0x40 + k as u8
}

/// Disk `k` through its last queue when it has more than one (`virtio-drivers` uses only the
/// first), driven by hand with VIRTIO_BLK_F_MQ negotiated and only that queue set up: reads
/// back the first sectors as queue 0 left them, then (unless read-only) writes
/// `mq_pattern(k)` to sector `sectors` and flushes.
fn blk_last_queue(k: usize, df: DeviceFunction, sectors: u64, readonly: bool) {
    const MQ: u64 = 1 << 12;
    let name = |n: &str| alloc::format!("blk{k}-mq-{n}");
    let Some(l) = Layout::find(df) else { return };
    let queues = r16(l.device + 34);
    if l.device_features() & MQ == 0 || queues < 2 {
        return;
    }
    println!("INFO blk{k}: {queues} queues, using queue {}", queues - 1);
    let Some(mut q) = l
        .start(&name("setup"), VERSION_1 | MQ, &[queues - 1])
        .and_then(|mut v| v.pop())
    else {
        return;
    };
    // Header, up to six sectors of data, status: all in the queue's page.
    let (hdr, data, status) = (q.buf, q.buf + 0x200, q.buf + 0xfff);
    let mut request = |kind: u32, sector: u64, len: u32, flags: u16| {
        w32(hdr, kind);
        w32(hdr + 4, 0);
        w64(hdr + 8, sector);
        w8(status, 0xee);
        if len > 0 {
            q.set_desc(0, hdr, 16, F_NEXT, 1);
            q.set_desc(1, data, len, flags | F_NEXT, 2);
        } else {
            q.set_desc(0, hdr, 16, F_NEXT, 2);
        }
        q.set_desc(2, status, 1, F_WRITE, 0);
        q.submit(0).then(|| r8(status))
    };
    let n = sectors.min(6);
    let st = request(0, 0, n as u32 * 512, F_WRITE);
    let want = |s| {
        if readonly {
            host_pattern(k, s)
        } else {
            guest_pattern(k, s)
        }
    };
    let bad = (0..n).find(|&s| (0..512).any(|i| r8(data + s * 512 + i) != want(s)));
    crate::check!(
        &name("read"),
        st == Some(0) && bad.is_none(),
        "status {st:?}, sector {bad:?} differs"
    );
    if !readonly {
        for i in 0..512 {
            w8(data + i, mq_pattern(k));
        }
        let st = request(1, sectors, 512, 0);
        crate::check!(&name("write"), st == Some(0), "status {st:?}");
        let st = request(4, 0, 0, 0);
        crate::check!(&name("flush"), st == Some(0), "status {st:?}");
    }
    l.set_status(0);
}

pub fn scenario_console() {
    let Some(df) = find(DeviceType::Console).into_iter().next() else {
        fail(
            "console-present",
            format_args!("no virtio-console function"),
        );
        return;
    };
    let Some(t) = transport(df) else { return };
    match VirtIOConsole::<GuestHal, _>::new(t) {
        Ok(mut c) => {
            let r = c.send_bytes(b"hello from virtio-console\n");
            crate::check!("console-write", r.is_ok(), "{r:?}");
        }
        Err(e) => fail("console-init", format_args!("{e}")),
    }
    smp::delay_us(1000);
}

/// Reads a line from the virtio console (up to 5 s) and writes it back as `ECHO <line>`.
pub fn scenario_console_echo() {
    let Some(df) = find(DeviceType::Console).into_iter().next() else {
        fail(
            "console-present",
            format_args!("no virtio-console function"),
        );
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut c = match VirtIOConsole::<GuestHal, _>::new(t) {
        Ok(c) => c,
        Err(e) => {
            fail("console-init", format_args!("{e}"));
            return;
        }
    };
    println!("READY");
    let mut line = Vec::new();
    let mut waited_us = 0u64;
    loop {
        match c.recv(true) {
            Ok(Some(b'\n' | b'\r')) if line.is_empty() => {}
            Ok(Some(b'\n' | b'\r')) => break,
            Ok(Some(b)) if line.len() < 256 => line.push(b),
            Ok(Some(_)) => break,
            Ok(None) => {
                smp::delay_us(1000);
                waited_us += 1000;
                if waited_us > 5_000_000 {
                    break;
                }
            }
            Err(e) => {
                fail("console-echo", format_args!("{e}"));
                return;
            }
        }
    }
    let text = core::str::from_utf8(&line).unwrap_or("?");
    let mut out = Vec::new();
    out.extend_from_slice(b"ECHO ");
    out.extend_from_slice(text.as_bytes());
    out.push(b'\n');
    let r = c.send_bytes(&out);
    crate::check!(
        "console-echo",
        r.is_ok() && !line.is_empty(),
        "read {text:?}, send {r:?}"
    );
    smp::delay_us(1000);
}

/// `test=blk-bench`: synchronous (queue depth 1, as `virtio-drivers` does it) 4 KiB and 64 KiB
/// reads and writes on the first disk, each for `BENCH_REQUESTS` requests or about a second,
/// between `BLK-BENCH ... start` and `BLK-BENCH ... done <requests>` lines: the host times the
/// lines (the guest has no calibrated clock), e.g. with `scripts/guest-io-throughput`. (The
/// cap dates from when each request leaked its indirect descriptor table in the 1 MiB bump
/// heap; the heap now takes back its most recent allocation, which that table is.)
pub const BENCH_REQUESTS: u64 = 1500;

pub fn scenario_blk_bench() {
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("blk-bench", format_args!("no virtio-blk function"));
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("blk-bench", format_args!("{e}"));
            return;
        }
    };
    let sectors = blk.capacity() as usize;
    let mut buf = alloc::vec![0x5au8; 64 << 10];
    for (write, size) in [
        (false, 4096usize),
        (true, 4096),
        (false, 65536),
        (true, 65536),
    ] {
        let op = if write { "write" } else { "read" };
        let per = size / 512;
        if sectors < per {
            fail("blk-bench", format_args!("disk too small"));
            return;
        }
        println!("BLK-BENCH {op} {size} start");
        let (t0, mut n, mut sector) = (svc::rdtsc(), 0u64, 0usize);
        while n < BENCH_REQUESTS && svc::rdtsc() - t0 < 1_000_000 * smp::TSC_PER_US {
            let b = &mut buf[..size];
            let r = if write {
                blk.write_blocks(sector, b)
            } else {
                blk.read_blocks(sector, b)
            };
            if let Err(e) = r {
                fail("blk-bench", format_args!("{op} at sector {sector}: {e}"));
                return;
            }
            n += 1;
            sector = (sector + per) % (sectors - per + 1);
        }
        println!("BLK-BENCH {op} {size} done {n}");
    }
    pass("blk-bench");
}
