use std::sync::{Arc, Mutex};

use devices::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::configuration::PciIds;
use crate::{BarKind, MsixConfig, PciConfiguration, PciDevice, VmInterface};

#[derive(Default)]
pub struct FakeVm {
    pub mapped: Mutex<Vec<(u64, u64)>>,
    pub routes: Mutex<BTreeMap<u32, Option<(u64, u32)>>>,
    pub next_gsi: Mutex<u32>,
}

impl VmInterface for FakeVm {
    fn map_mmio(&self, _d: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), String> {
        let mut m = self.mapped.lock().unwrap();
        if m.iter().any(|&(b, l)| base < b + l && b < base + len) {
            return Err("overlap".into());
        }
        m.push((base, len));
        Ok(())
    }
    fn unmap_mmio(&self, base: u64) {
        self.mapped.lock().unwrap().retain(|&(b, _)| b != base);
    }
    fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> Result<(), String> {
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) {}
    fn allocate_gsi(&self) -> Result<u32, String> {
        let mut g = self.next_gsi.lock().unwrap();
        *g += 1;
        Ok(23 + *g)
    }
    fn set_msi_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String> {
        self.routes.lock().unwrap().insert(gsi, msi);
        Ok(())
    }
    fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<(), String> {
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, _gsi: u32) {}
}

struct Dummy(PciConfiguration);

impl PciDevice for Dummy {
    fn config(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn dummy(addr: u64) -> Arc<Mutex<dyn PciDevice>> {
    dummy_bar(addr, 0x1000, BarKind::Mem32)
}

/// A function with one BAR 0 of `size` bytes and `kind` at `addr`.
fn dummy_bar(addr: u64, size: u64, kind: BarKind) -> Arc<Mutex<dyn PciDevice>> {
    let mut c = PciConfiguration::new(PciIds {
        vendor: 0x1af4,
        device: 0x1044,
        class: 0xff,
        subclass: 0,
        prog_if: 0,
        revision: 1,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    });
    c.add_bar(0, size, kind, addr);
    Arc::new(Mutex::new(Dummy(c)))
}

fn setup() -> (Arc<FakeVm>, Arc<Mutex<PciRoot>>) {
    let vm = Arc::new(FakeVm::default());
    let root = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
    (vm, root)
}

fn io_read32(io: &mut PciConfigIo, dev: u8, reg: u32) -> u32 {
    io.write(0, &(0x8000_0000 | u32::from(dev) << 11 | reg).to_le_bytes());
    let mut b = [0u8; 4];
    io.read(4, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn host_bridge_through_ports_and_ecam() {
    let (_vm, root) = setup();
    let mut io = PciConfigIo::new(root.clone());
    assert_eq!(io_read32(&mut io, 0, 0), 0x0d57_8086);
    assert_eq!(io_read32(&mut io, 0, 8) >> 16, 0x0600);
    assert_eq!(io_read32(&mut io, 3, 0), u32::MAX);
    // Disabled address register: all ones.
    io.write(0, &0u32.to_le_bytes());
    let mut b = [0u8; 2];
    io.read(4, &mut b);
    assert_eq!(b, [0xff, 0xff]);
    // Byte read at 0xcfe selects the upper half.
    io.write(0, &0x8000_0000u32.to_le_bytes());
    io.read(6, &mut b);
    assert_eq!(u16::from_le_bytes(b), 0x0d57);
    let mut ecam = PciConfigMmio(root);
    let mut b = [0u8; 4];
    ecam.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0d57_8086);
    // Other buses and functions are absent; misaligned accesses read ones.
    ecam.read(1 << 20, &mut b);
    assert_eq!(b, [0xff; 4]);
    ecam.read(1 << 12, &mut b);
    assert_eq!(b, [0xff; 4]);
    ecam.read(2, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn device_ids_and_bar_moves() {
    let (vm, root) = setup();
    let mut r = root.lock().unwrap();
    assert_eq!(r.next_device_id(None), Ok(1));
    assert_eq!(r.next_device_id(Some(0)), Err(PciRootError::BadDeviceId(0)));
    assert_eq!(
        r.next_device_id(Some(32)),
        Err(PciRootError::BadDeviceId(32))
    );
    r.add_device(1, dummy(0xc000_0000)).unwrap();
    assert_eq!(
        r.add_device(1, dummy(0xc000_1000)),
        Err(PciRootError::DeviceIdInUse(1))
    );
    r.add_device(5, dummy(0xc000_1000)).unwrap();
    assert_eq!(r.device_ids(), vec![0, 1, 5]);
    assert_eq!(
        *vm.mapped.lock().unwrap(),
        vec![(0xc000_0000, 0x1000), (0xc000_1000, 0x1000)]
    );
    drop(r);
    let mut ecam = PciConfigMmio(root.clone());
    let dev1 = 1 << 15;
    // Sizing: memory decoding off, all ones, read back, restore.
    ecam.write(dev1 + 4, &[0, 0]);
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0xc000_1000, 0x1000)]);
    ecam.write(dev1 + 0x10, &[0xff; 4]);
    let mut b = [0u8; 4];
    ecam.read(dev1 + 0x10, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xffff_f000);
    // Moving onto the other device's BAR fails cleanly; a free address works.
    ecam.write(dev1 + 0x10, &0xc000_1000u32.to_le_bytes());
    ecam.write(dev1 + 4, &[2, 0]);
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0xc000_1000, 0x1000)]);
    ecam.write(dev1 + 0x10, &0xd000_0000u32.to_le_bytes());
    assert_eq!(
        *vm.mapped.lock().unwrap(),
        vec![(0xc000_1000, 0x1000), (0xd000_0000, 0x1000)]
    );
}

#[test]
fn bar_allocator_aligns_and_runs_out() {
    let mut a = BarAllocator::new(0xc000_0000, 0x10_0000);
    assert_eq!(a.allocate(0x1000), Ok(0xc000_0000));
    assert_eq!(a.allocate(0x4_0000), Ok(0xc004_0000));
    assert_eq!(a.allocate(0x1000), Ok(0xc008_0000));
    assert_eq!(
        a.allocate(0x10_0000),
        Err(PciRootError::NoBarSpace(0x10_0000))
    );
    let mut a = BarAllocator::new(u64::MAX - 0xfff, 0x1000);
    assert!(a.allocate(0x2000).is_err());
    assert_eq!(a.allocate(0), Err(PciRootError::BadBarSize(0)));
    assert_eq!(a.allocate(0x3000), Err(PciRootError::BadBarSize(0x3000)));
}

#[test]
fn bar_windows_put_64bit_bars_high() {
    let mut w = BarWindows::new((0xc000_0000, 0x10_0000), Some((6 << 30, 0x2_0000)));
    assert_eq!(w.allocate(0x1_0000, BarKind::Mem64), Ok(6 << 30));
    assert_eq!(w.allocate(0x1000, BarKind::Mem32), Ok(0xc000_0000));
    assert_eq!(
        w.allocate(0x1_0000, BarKind::Mem64),
        Ok((6 << 30) + 0x1_0000)
    );
    // The 64-bit window is full: the next 64-bit BAR goes below 4 GiB.
    assert_eq!(w.allocate(0x1_0000, BarKind::Mem64), Ok(0xc001_0000));
    assert_eq!(
        w.allocate(0x10_0000, BarKind::Mem64),
        Err(PciRootError::NoBarSpace(0x10_0000))
    );
    // No 64-bit window at all: everything in the 32-bit one.
    let mut w = BarWindows::new((0xc000_0000, 0x10_0000), None);
    assert_eq!(w.allocate(0x1_0000, BarKind::Mem64), Ok(0xc000_0000));
    assert_eq!(w.allocate(0x1000, BarKind::Mem32), Ok(0xc001_0000));
}

fn dummy64(addr: u64) -> Arc<Mutex<dyn PciDevice>> {
    dummy_bar(addr, 0x1_0000, BarKind::Mem64)
}

fn ecam_read32(ecam: &mut PciConfigMmio, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    ecam.read(offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn bar_above_4g_sizes_and_moves() {
    let (vm, root) = setup();
    root.lock()
        .unwrap()
        .add_device(1, dummy64(0x1_8000_0000))
        .unwrap();
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0x1_8000_0000, 0x1_0000)]);
    let mut ecam = PciConfigMmio(root.clone());
    let dev1 = 1 << 15;
    // The guest reads both halves: low dword with the type bits (64-bit, not prefetchable).
    assert_eq!(ecam_read32(&mut ecam, dev1 + 0x10), 0x8000_0004);
    assert_eq!(ecam_read32(&mut ecam, dev1 + 0x14), 1);
    // Sizing both dwords with decoding off, then restoring.
    ecam.write(dev1 + 4, &[0, 0]);
    assert!(vm.mapped.lock().unwrap().is_empty());
    ecam.write(dev1 + 0x10, &[0xff; 4]);
    ecam.write(dev1 + 0x14, &[0xff; 4]);
    assert_eq!(ecam_read32(&mut ecam, dev1 + 0x10), 0xffff_0004);
    assert_eq!(ecam_read32(&mut ecam, dev1 + 0x14), 0xffff_ffff);
    // Turning decoding on with the sizing pattern in place maps nothing (it would wrap).
    ecam.write(dev1 + 4, &[2, 0]);
    assert!(vm.mapped.lock().unwrap().is_empty());
    ecam.write(dev1 + 4, &[0, 0]);
    ecam.write(dev1 + 0x10, &0x8000_0000u32.to_le_bytes());
    ecam.write(dev1 + 0x14, &1u32.to_le_bytes());
    ecam.write(dev1 + 4, &[2, 0]);
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0x1_8000_0000, 0x1_0000)]);
    // Moved with decoding on, one dword at a time: it ends up where both halves say.
    ecam.write(dev1 + 0x10, &0xffff_0000u32.to_le_bytes());
    ecam.write(dev1 + 0x14, &0x10u32.to_le_bytes());
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0x10_ffff_0000, 0x1_0000)]);
    // And below 4 GiB (upper dword 0).
    ecam.write(dev1 + 0x14, &0u32.to_le_bytes());
    ecam.write(dev1 + 0x10, &0xd000_0000u32.to_le_bytes());
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0xd000_0000, 0x1_0000)]);
    assert_eq!(root.lock().unwrap().slots[&1].mapped[0], Some(0xd000_0000));
}

#[test]
fn msix_masking_and_pending_bits() {
    let vm = Arc::new(FakeVm::default());
    let mut m = MsixConfig::new(3, vm.clone());
    assert_eq!(m.count(), 3);
    m.trigger(0); // disabled: dropped
    let mut pba = [0u8; 8];
    m.read_pba(0, &mut pba);
    assert_eq!(pba[0], 0);
    m.set_control(1 << 15);
    m.trigger(1); // vector masked: pending
    m.read_pba(0, &mut pba);
    assert_eq!(pba[0], 2);
    m.write_table(16, &0xfee0_0000u32.to_le_bytes());
    m.write_table(24, &0x41u32.to_le_bytes());
    assert_eq!(vm.routes.lock().unwrap()[&25], Some((0xfee0_0000, 0x41)));
    m.write_table(28, &0u32.to_le_bytes()); // unmask: pending delivered
    m.read_pba(0, &mut pba);
    assert_eq!(pba[0], 0);
    let mut b = [0u8; 8];
    m.read_table(16, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0xfee0_0000);
    // Hostile accesses: out of range, odd sizes, huge vectors.
    m.write_table(16 * 100, &[1; 4]);
    m.write_table(17, &[1; 4]);
    m.write_table(16, &[1; 3]);
    m.read_table(16 * 100, &mut b);
    assert_eq!(b, [0xff; 8]);
    m.trigger(0xffff);
    m.read_pba(4096, &mut pba);
    assert_eq!(pba, [0; 8]);
    m.reset();
    assert!(!m.enabled());
}
