//! Two PCI segments as the VM builds them: segment 0 with the host bridge and a virtio-pci
//! function (virtio-console, two queues and a configuration), segment 1 with pvpanic in its
//! slot 0; configuration mechanism #1 (0xcf8/0xcfc, segment 0) and ECAM (a megabyte per
//! segment), with BARs mapped on the MMIO bus wherever the guest programs them. The guest's
//! accesses reach configuration spaces, BAR sizing and moves, the virtio common configuration,
//! device configuration, notifications, ISR and the MSI-X table and PBA.
//!
//! Input: `[L lo, L hi]`, then `L` bytes of accesses, then the first bytes of guest RAM (for
//! the rings a driver sets up). An access is `[sel, a, b, c]` then, for a write, its bytes:
//! `sel & 3` is the space (0: ports 0xcf8-0xcff, offset `a % 8`; 1: ECAM, offset `a | b << 8 | c
//! << 16`, in segment `c >> 4`; 2 and 3: the `a`-th BAR mapped now, offset `b | c << 8`),
//! `sel & 4` a write, `sel >> 3 & 7` the size (1, 2, 4, 8, 3, 0, 16, 1 bytes).

use std::sync::{Arc, Mutex};

use devices::{Bus, BusDevice};
use pci::{PciConfigIo, PciDevice, PciRoot, PciSegmentsEcam, VmInterface};
use vmm_sys_util::eventfd::EventFd;

pub const ECAM: u64 = 0xe000_0000;
pub const VIRTIO_BAR: u64 = 0x1_0000_0000;
pub const PVPANIC_BAR: u64 = 0xc000_0000;

pub(crate) struct FakeVm {
    pub mmio: Arc<Bus>,
    pub mapped: Mutex<Vec<(u64, u64)>>,
}

impl VmInterface for FakeVm {
    fn map_mmio(&self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), String> {
        self.mmio
            .insert(dev, base, len)
            .map_err(|e| e.to_string())?;
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((base, len));
        Ok(())
    }
    fn unmap_mmio(&self, base: u64) {
        self.mmio.remove(base);
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&(b, _)| b != base);
    }
    fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> Result<(), String> {
        Err("no ioeventfds here".into())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) {}
    fn allocate_gsi(&self) -> Result<u32, String> {
        Ok(24)
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

struct NoPanic;

struct ClearOnDrop(Arc<Bus>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}

impl pci::pvpanic::PanicSink for NoPanic {
    fn guest_panic(&self, _event: u8) {}
}

pub fn segment(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let l = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (ops, image) = data[2..].split_at(l);
    virtio_devices::fuzz::inline_workers(true);
    let mem = crate::mem::guest_memory(image);
    let mmio = Arc::new(Bus::new());
    // The bus holds the ECAM window (and so the root) and the BARs (the devices), which hold
    // the VM, which holds the bus: emptied on every way out, or each input leaks its eventfds.
    let _clear = ClearOnDrop(mmio.clone());
    let vm = Arc::new(FakeVm {
        mmio: mmio.clone(),
        mapped: Mutex::new(Vec::new()),
    });
    let pio = Bus::new();
    let root = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
    // A second segment (no host bridge; its slot 0 holds the pvpanic device).
    let root1 = Arc::new(Mutex::new(PciRoot::for_segment(vm.clone(), 1)));
    let console = virtio_devices::Console::new(
        Some(Box::new(std::io::sink())),
        None,
        virtio_devices::ConsoleSize::new(80, 24),
    );
    let Ok(dev) = virtio_devices::VirtioPciDevice::new(
        "fuzz-console".into(),
        Box::new(console),
        mem,
        vm.clone(),
        VIRTIO_BAR,
    ) else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let panic = Arc::new(Mutex::new(pci::pvpanic::PvPanic::new(
        PVPANIC_BAR,
        Arc::new(NoPanic),
    )));
    {
        let mut r = root.lock().unwrap_or_else(|e| e.into_inner());
        let mut r1 = root1.lock().unwrap_or_else(|e| e.into_inner());
        if r.add_device(1, dev.clone()).is_err() || r1.add_device(0, panic).is_err() {
            return;
        }
    }
    let io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    if pio.insert(io.clone(), 0xcf8, 8).is_err()
        || mmio
            .insert(
                Arc::new(Mutex::new(PciSegmentsEcam(vec![
                    root.clone(),
                    root1.clone(),
                ]))),
                ECAM,
                4 << 20,
            )
            .is_err()
    {
        return;
    }
    access(ops, &pio, &mmio, &vm);

    // What a pause, a snapshot and a restore do with what the guest left.
    let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
    let _ = d.pause();
    let state = d.state();
    let json = serde_json::to_vec(&state).expect("a transport state serialises");
    let back: virtio_devices::VirtioPciState =
        serde_json::from_slice(&json).expect("a transport state reads back");
    let _ = d.set_state(&back);
    let _ = d.resume();
    let _ = d.config().read_reg(0);
    drop(d);
    let mut r = root.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = r.state() {
        let _ = r.set_state(&s);
    }
    r.remove_all();
    root1.lock().unwrap_or_else(|e| e.into_inner()).remove_all();
}

fn access(mut data: &[u8], pio: &Bus, mmio: &Bus, vm: &FakeVm) {
    const SIZES: [usize; 8] = [1, 2, 4, 8, 3, 0, 16, 1];
    while data.len() >= 4 {
        let (sel, a, b, c) = (data[0], data[1], data[2], data[3]);
        data = &data[4..];
        let size = SIZES[usize::from(sel >> 3 & 7)];
        let (bus, addr) = match sel & 3 {
            0 => (pio, 0xcf8 + u64::from(a % 8)),
            1 => (
                mmio,
                ECAM + (u64::from(a) | u64::from(b) << 8 | u64::from(c & 0xf) << 16),
            ),
            _ => {
                let mapped = vm.mapped.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(&(base, len)) = mapped.get(usize::from(a) % mapped.len().max(1)) else {
                    continue;
                };
                (mmio, base + (u64::from(b) | u64::from(c) << 8) % len)
            }
        };
        if sel & 4 != 0 {
            let n = size.min(data.len());
            bus.write(addr, &data[..n]);
            data = &data[n..];
        } else {
            let mut buf = [0u8; 16];
            bus.read(addr, &mut buf[..size]);
        }
    }
}

/// One access for the seeds (see the module's doc).
fn op(space: u8, off: u32, bytes: &[u8], read: usize) -> Vec<u8> {
    let code = |n: usize| match n {
        1 => 0u8,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    let o = off.to_le_bytes();
    let mut v = if bytes.is_empty() {
        vec![space | code(read) << 3, o[0], o[1], o[2]]
    } else {
        vec![space | 4 | code(bytes.len()) << 3, o[0], o[1], o[2]]
    };
    v.extend_from_slice(bytes);
    v
}

/// Seeds: enumeration through both mechanisms, BAR sizing, and a virtio driver bringing the
/// console up (features, queues in RAM, MSI-X vectors, DRIVER_OK, a notification).
pub fn seeds() -> Vec<Vec<u8>> {
    let ecam = |dev: u32, reg: u32| dev << 15 | reg;
    let bar0 = |off: u32| off << 8; // BAR index 0 in `a`, offset in b and c
    let w = |space, off, bytes: &[u8]| op(space, off, bytes, 0);
    let r = |space, off, n| op(space, off, &[], n);
    let enumerate = [
        w(0, 0, &0x8000_0800u32.to_le_bytes()),
        r(0, 4, 4),
        w(0, 0, &0x8000_0808u32.to_le_bytes()),
        r(0, 4, 4),
        r(1, ecam(1, 0), 4),
        r(1, ecam(2, 0), 4),
        r(1, ecam(1, 0x34), 1),
        w(1, ecam(1, 0x10), &u32::MAX.to_le_bytes()),
        r(1, ecam(1, 0x10), 4),
        w(1, ecam(1, 0x14), &u32::MAX.to_le_bytes()),
        r(1, ecam(1, 0x14), 4),
        w(1, ecam(1, 0x10), &0x8000_0000u32.to_le_bytes()),
        w(1, ecam(1, 0x14), &0u32.to_le_bytes()),
        w(1, ecam(1, 0x04), &6u16.to_le_bytes()),
        w(1, ecam(2, 0x04), &6u16.to_le_bytes()),
        r(2, 1 << 8, 1),
    ]
    .concat();
    let mut driver = vec![
        w(1, ecam(1, 0x04), &6u16.to_le_bytes()),
        w(2, bar0(0x14), &[1]),
        w(2, bar0(0x14), &[3]),
        w(2, bar0(0x00), &1u32.to_le_bytes()),
        r(2, bar0(0x04), 4),
        w(2, bar0(0x08), &1u32.to_le_bytes()),
        w(2, bar0(0x0c), &1u32.to_le_bytes()),
        w(2, bar0(0x14), &[11]),
        r(2, bar0(0x14), 1),
        // MSI-X: enable, one table entry, the config vector.
        w(1, ecam(1, 0x70), &0u32.to_le_bytes()),
        w(2, bar0(0x8000), &0xfee0_0000u32.to_le_bytes()),
        w(2, bar0(0x8008), &0x41u32.to_le_bytes()),
        w(2, bar0(0x800c), &0u32.to_le_bytes()),
        w(2, bar0(0x10), &0u16.to_le_bytes()),
    ];
    for q in 0..2u16 {
        let (d, a, u) = crate::virtio::rings(usize::from(q));
        driver.extend([
            w(2, bar0(0x16), &q.to_le_bytes()),
            r(2, bar0(0x18), 2),
            w(2, bar0(0x18), &16u16.to_le_bytes()),
            w(2, bar0(0x1a), &0u16.to_le_bytes()),
            w(2, bar0(0x20), &d.to_le_bytes()),
            w(2, bar0(0x28), &a.to_le_bytes()),
            w(2, bar0(0x30), &u.to_le_bytes()),
            w(2, bar0(0x1c), &1u16.to_le_bytes()),
        ]);
    }
    driver.extend([
        w(2, bar0(0x14), &[15]),
        r(2, bar0(0x2000), 4),
        w(2, bar0(0x3004), &1u16.to_le_bytes()),
        r(2, bar0(0x1000), 1),
        r(2, bar0(0xc000), 8),
    ]);
    let driver = driver.concat();
    let mut ring = crate::virtio::Driver::new(0);
    ring.chain(1, &[crate::virtio::Buf::R(b"console output\n")])
        .chain(0, &[crate::virtio::Buf::W(32)]);
    let image = &ring.input()[crate::virtio::HEADER..];
    let with = |ops: &[u8], image: &[u8]| {
        let mut v = (ops.len() as u16).to_le_bytes().to_vec();
        v.extend_from_slice(ops);
        v.extend_from_slice(image);
        v
    };
    vec![with(&enumerate, &[]), with(&driver, image)]
}
