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
    pub freed_gsis: Mutex<Vec<u32>>,
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
    fn free_gsi(&self, gsi: u32) {
        self.freed_gsis.lock().unwrap().push(gsi);
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
fn segments_past_0_have_no_host_bridge_and_their_own_ecam_megabyte() {
    let vm = Arc::new(FakeVm::default());
    let seg0 = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
    let seg1 = Arc::new(Mutex::new(PciRoot::for_segment(vm.clone(), 1)));
    {
        let mut r = seg1.lock().unwrap();
        assert_eq!(r.segment(), 1);
        assert!(r.state().is_none(), "no host bridge, no state of its own");
        let bridge = seg0.lock().unwrap().state().unwrap();
        assert!(r.set_state(&bridge).is_err());
        // Slot 0 is the first free one here.
        assert_eq!(r.next_device_id(None), Ok(0));
        r.add_device(0, dummy(0x1000_0000)).unwrap();
        assert_eq!(r.next_device_id(None), Ok(1));
        r.add_device(5, dummy(0x1000_1000)).unwrap();
        assert_eq!(r.device_ids(), [0, 5]);
    }
    assert_eq!(
        seg0.lock().unwrap().next_device_id(Some(0)),
        Err(PciRootError::BadDeviceId(0))
    );
    let mut ecam = PciSegmentsEcam(vec![seg0.clone(), seg1.clone()]);
    let read = |ecam: &mut PciSegmentsEcam, offset: u64| {
        let mut b = [0u8; 4];
        ecam.read(offset, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(read(&mut ecam, 0), 0x0d57_8086, "segment 0: host bridge");
    assert_eq!(read(&mut ecam, 1 << 20), 0x1044_1af4, "segment 1, slot 0");
    assert_eq!(read(&mut ecam, (1 << 20) | (5 << 15)), 0x1044_1af4);
    assert_eq!(read(&mut ecam, (1 << 20) | (1 << 15)), u32::MAX);
    assert_eq!(read(&mut ecam, 2 << 20), u32::MAX, "no segment 2");
    assert_eq!(read(&mut ecam, u64::MAX - 3), u32::MAX);
    // A write reaches that segment's device only: memory decoding off at slot 0.
    assert_eq!(read(&mut ecam, (1 << 20) | 4) & 2, 2);
    ecam.write((1 << 20) | 4, &0u32.to_le_bytes());
    assert_eq!(read(&mut ecam, (1 << 20) | 4) & 2, 0);
    assert_eq!(read(&mut ecam, (1 << 20) | (5 << 15) | 4) & 2, 2);
    ecam.write(7 << 20, &[1, 2, 3, 4]);
    // Unplugging everything leaves a segment past 0 empty, segment 0 its bridge.
    seg1.lock().unwrap().remove_all();
    assert!(seg1.lock().unwrap().device_ids().is_empty());
    seg0.lock().unwrap().remove_all();
    assert_eq!(seg0.lock().unwrap().device_ids(), [0]);
    assert_eq!(
        seg1.lock().unwrap().remove_device(0).err(),
        Some(PciRootError::NoDevice(0))
    );
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
    assert_eq!(
        a.allocate(0x1000),
        Ok(0xc000_1000),
        "first fit: the hole below the second range"
    );
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

// ---- Saved state: configuration spaces, the root, the ports, MSI-X ----

use crate::test_utils::check_mutations;
use crate::{MsixState, PciConfigurationState, StateError, MSIX_ENTRY_SIZE};

/// A function with a 32-bit BAR 0, a 64-bit BAR 2 and a capability with writable bytes.
fn rich_config(bar0: u64, bar2: u64) -> PciConfiguration {
    let mut c = PciConfiguration::new(PciIds {
        vendor: 0x1af4,
        device: 0x1045,
        class: 0xff,
        subclass: 0,
        prog_if: 0,
        revision: 1,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    });
    c.add_bar(0, 0x1000, BarKind::Mem32, bar0);
    c.add_bar(2, 0x1_0000, BarKind::Mem64, bar2);
    let cap = c
        .add_capability(&[0x09, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    c.set_write_mask(cap / 4 + 1, 0xffff_ff00);
    c.set_write_mask(cap / 4 + 2, u32::MAX);
    c
}

fn ecam_regs(ecam: &mut PciConfigMmio, dev: u8) -> Vec<u32> {
    (0..0x1000)
        .step_by(4)
        .map(|o| ecam_read32(ecam, u64::from(dev) << 15 | o))
        .collect()
}

/// A guest programs two functions and the host bridge through ECAM and the ports (BARs moved,
/// one function's decoding off, bus master, interrupt line, capability fields); the root, the
/// ports and each configuration space are saved, go through JSON and are restored into fresh
/// objects: every register of every function reads back the same, and the MMIO bus holds the
/// BARs where the guest had put them.
#[test]
fn configuration_spaces_and_bars_survive_save_and_restore() {
    let build = |vm: &Arc<FakeVm>| {
        let root = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
        let a: Arc<Mutex<Dummy>> =
            Arc::new(Mutex::new(Dummy(rich_config(0xc000_0000, 0x1_0000_0000))));
        let b: Arc<Mutex<Dummy>> =
            Arc::new(Mutex::new(Dummy(rich_config(0xc000_1000, 0x1_0001_0000))));
        root.lock().unwrap().add_device(1, a.clone()).unwrap();
        root.lock().unwrap().add_device(3, b.clone()).unwrap();
        (root, a, b)
    };
    let vm = Arc::new(FakeVm::default());
    let (root, a, b) = build(&vm);
    let mut ecam = PciConfigMmio(root.clone());
    let mut io = PciConfigIo::new(root.clone());
    let (d1, d3) = (1u64 << 15, 3u64 << 15);
    // Device 1: bus master, BAR 0 and BAR 2 moved (BAR 2 one dword at a time, above 4 GiB),
    // interrupt line, capability bytes.
    ecam.write(d1 + 4, &[2 | 4, 0]);
    ecam.write(d1 + 0x10, &0xd000_0000u32.to_le_bytes());
    ecam.write(d1 + 0x18, &0x0042_0000u32.to_le_bytes());
    ecam.write(d1 + 0x1c, &0x20u32.to_le_bytes());
    ecam.write(d1 + 0x3c, &[0x0b]);
    ecam.write(d1 + 0x44, &0x1234_5678u32.to_le_bytes());
    ecam.write(d1 + 0x48, &0x9abc_def0u32.to_le_bytes());
    // Device 3: decoding off (its BARs leave the bus), BAR 0 set to the sizing pattern.
    ecam.write(d3 + 4, &[0, 0]);
    ecam.write(d3 + 0x10, &[0xff; 4]);
    // Host bridge: the guest's command bits and interrupt line; the port's address register
    // left selecting device 3's BAR 2 (a vCPU between its two accesses).
    ecam.write(4, &[4, 0]);
    ecam.write(0x3c, &[0x05]);
    io.write(0, &(0x8000_0000u32 | 3 << 11 | 0x18).to_le_bytes());
    let mapped_before = {
        let mut m = vm.mapped.lock().unwrap().clone();
        m.sort();
        m
    };
    assert_eq!(
        mapped_before,
        vec![(0xd000_0000, 0x1000), (0x20_0042_0000, 0x1_0000)]
    );
    let regs_before: Vec<Vec<u32>> = [0, 1, 3].map(|d| ecam_regs(&mut ecam, d)).to_vec();

    let json = serde_json::to_string(&(
        root.lock().unwrap().state().unwrap(),
        io.state(),
        a.lock().unwrap().0.state(),
        b.lock().unwrap().0.state(),
    ))
    .unwrap();
    let (root_s, io_s, a_s, b_s): (
        PciRootState,
        PciConfigIoState,
        PciConfigurationState,
        PciConfigurationState,
    ) = serde_json::from_str(&json).unwrap();
    // Registers past the last non-zero one are not written out.
    assert!(a_s.regs.len() <= 0x50 / 4, "{} registers", a_s.regs.len());

    let vm2 = Arc::new(FakeVm::default());
    let (root2, a2, b2) = build(&vm2);
    let mut io2 = PciConfigIo::new(root2.clone());
    root2.lock().unwrap().set_state(&root_s).unwrap();
    io2.set_state(&io_s).unwrap();
    a2.lock().unwrap().0.set_state(&a_s).unwrap();
    b2.lock().unwrap().0.set_state(&b_s).unwrap();
    root2.lock().unwrap().refresh_bars();

    let mut ecam2 = PciConfigMmio(root2.clone());
    let regs_after: Vec<Vec<u32>> = [0, 1, 3].map(|d| ecam_regs(&mut ecam2, d)).to_vec();
    assert_eq!(regs_after, regs_before);
    let mut mapped_after = vm2.mapped.lock().unwrap().clone();
    mapped_after.sort();
    assert_eq!(mapped_after, mapped_before);
    let r2 = root2.lock().unwrap();
    assert_eq!(r2.slots[&1].mapped[0], Some(0xd000_0000));
    assert_eq!(r2.slots[&1].mapped[2], Some(0x20_0042_0000));
    assert_eq!(r2.slots[&3].mapped, [None; BAR_COUNT]);
    drop(r2);
    // The data port continues the access the address register had selected.
    let mut b4 = [0u8; 4];
    io2.read(4, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), regs_before[2][6]);
    // And the restored functions go on as before: decoding back on maps device 3's BAR 2.
    ecam2.write(d3 + 4, &[2, 0]);
    assert!(vm2
        .mapped
        .lock()
        .unwrap()
        .contains(&(0x1_0001_0000, 0x1_0000)));
}

/// Restored BARs that swapped places are both mapped (all moves leave the bus before any
/// comes back), and the devices hear of each move.
#[test]
fn refresh_bars_handles_swapped_bars() {
    let (vm, root) = setup();
    let a = dummy(0xc000_0000);
    let b = dummy(0xc000_1000);
    root.lock().unwrap().add_device(1, a.clone()).unwrap();
    root.lock().unwrap().add_device(2, b.clone()).unwrap();
    let mut sa = a.lock().unwrap().config().state();
    let mut sb = b.lock().unwrap().config().state();
    std::mem::swap(&mut sa.regs[4], &mut sb.regs[4]);
    a.lock().unwrap().config_mut().set_state(&sa).unwrap();
    b.lock().unwrap().config_mut().set_state(&sb).unwrap();
    root.lock().unwrap().refresh_bars();
    let mut m = vm.mapped.lock().unwrap().clone();
    m.sort();
    assert_eq!(m, vec![(0xc000_0000, 0x1000), (0xc000_1000, 0x1000)]);
    let r = root.lock().unwrap();
    assert_eq!(r.slots[&1].mapped[0], Some(0xc000_1000));
    assert_eq!(r.slots[&2].mapped[0], Some(0xc000_0000));
}

/// Other versions, states of another device, over-long ones and every corruption of a good one
/// are refused without a panic, and a refused state changes nothing.
#[test]
fn configuration_space_refuses_bad_states() {
    let mut c = rich_config(0xc000_0000, 0x1_0000_0000);
    c.write(0x10, &0xd000_0000u32.to_le_bytes());
    c.write(4, &[6, 0]);
    let good = c.state();
    let mut fresh = rich_config(0xc000_0000, 0x1_0000_0000);
    let before = fresh.state();

    let e = fresh
        .set_state(&PciConfigurationState {
            version: 2,
            ..good.clone()
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot restore PCI configuration space state version 2: this build reads version 1"
    );
    // Another device's identity (device ID 0x1045 vs 0x1044).
    let other = {
        let d = dummy(0xc000_0000);
        let s = d.lock().unwrap().config().state();
        s
    };
    let e = fresh.set_state(&other).unwrap_err().to_string();
    assert!(
        e.contains("register 0x000") && e.contains("another device"),
        "{e}"
    );
    // A 32-bit BAR's type bits, a BAR's size bits, a read-only capability byte.
    for (reg, bits) in [(4usize, 0x4u32), (4, 0x800), (0x40 / 4, 0x0100)] {
        let mut s = good.clone();
        s.regs[reg] ^= bits;
        assert!(
            matches!(fresh.set_state(&s), Err(StateError::Invalid { .. })),
            "reg {reg} bits {bits:#x}"
        );
    }
    let mut long = good.clone();
    long.regs.resize(1025, 0);
    assert!(fresh.set_state(&long).is_err());
    assert_eq!(fresh.state(), before);

    let v = serde_json::to_value(&good).unwrap();
    let cell = std::cell::RefCell::new(rich_config(0xc000_0000, 0x1_0000_0000));
    let (taken, refused) = check_mutations::<PciConfigurationState>(
        &v,
        |s| {
            let mut t = cell.borrow_mut();
            let r = t.set_state(s);
            if r.is_ok() {
                // Back to the pristine device for the next one.
                *t = rich_config(0xc000_0000, 0x1_0000_0000);
            }
            r
        },
        || cell.borrow().state() == before,
    );
    assert!(taken > 0 && refused > 0, "{taken} taken, {refused} refused");
    // Not JSON of a state at all.
    for bad in [
        "",
        "{",
        "{\"version\":1}",
        "{\"version\":1,\"regs\":[-1]}",
        "[1,2]",
    ] {
        assert!(
            serde_json::from_str::<PciConfigurationState>(bad).is_err(),
            "{bad}"
        );
    }
    // Root and ports: other versions.
    let (_vm, root) = setup();
    let mut rs = root.lock().unwrap().state().unwrap();
    rs.version = 0;
    assert!(matches!(
        root.lock().unwrap().set_state(&rs),
        Err(StateError::Version { .. })
    ));
    rs.version = PCI_ROOT_STATE_VERSION;
    rs.host_bridge.regs[0] = 0x1234_1af4;
    let e = root.lock().unwrap().set_state(&rs).unwrap_err().to_string();
    assert!(
        e.starts_with("cannot restore PCI host bridge: PCI configuration space state"),
        "{e}"
    );
    let mut io = PciConfigIo::new(root.clone());
    assert!(io
        .set_state(&PciConfigIoState {
            version: 7,
            address: 1
        })
        .is_err());
    assert_eq!(io.state().address, 0);
}

fn msix_dwords(m: &MsixConfig) -> Vec<u32> {
    (0..m.count() as u64 * MSIX_ENTRY_SIZE)
        .step_by(4)
        .map(|o| {
            let mut b = [0u8; 4];
            m.read_table(o, &mut b);
            u32::from_le_bytes(b)
        })
        .collect()
}

fn msix_pba(m: &MsixConfig) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    m.read_pba(0, &mut b);
    b
}

/// A guest programs a 70-vector table (two PBA words): messages written with 4- and 8-byte
/// accesses, some vectors unmasked, MSI-X enabled, interrupts raised on masked vectors (pending
/// bits in both words), then the function masked. Saved, through JSON, restored into a fresh
/// table of a fresh VM: every table dword, the PBA, the control bits and the VM's MSI routes
/// are the same, and the restored table goes on as the original would (unmasking delivers the
/// pending vector once, through the same irqfd GSI).
#[test]
fn msix_table_and_pba_survive_save_and_restore() {
    let vm = Arc::new(FakeVm::default());
    let mut m = MsixConfig::new(70, vm.clone());
    m.set_control(1 << 15);
    for i in [0u64, 5, 64, 69] {
        let o = i * MSIX_ENTRY_SIZE;
        let addr = 0xfee0_0000u64 | (i << 12);
        if i % 2 == 0 {
            m.write_table(o, &addr.to_le_bytes());
        } else {
            m.write_table(o, &(addr as u32).to_le_bytes());
            m.write_table(o + 4, &0u32.to_le_bytes());
        }
        m.write_table(o + 8, &(0x40 + i as u32).to_le_bytes());
    }
    m.write_table(12, &0u32.to_le_bytes()); // vector 0 unmasked
    m.write_table(64 * MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes()); // vector 64 unmasked
    m.trigger(5);
    m.trigger(69);
    m.set_control(1 << 15 | 1 << 14);
    m.trigger(0); // function masked: pending too
    let routes_before = vm.routes.lock().unwrap().clone();
    let (table, pba, ctl) = (msix_dwords(&m), msix_pba(&m), m.control_bits());
    assert_eq!(&pba[..1], &[0x21]);
    assert_eq!(pba[8], 0x20);

    let json = serde_json::to_string(&m.state()).unwrap();
    let s: MsixState = serde_json::from_str(&json).unwrap();
    let vm2 = Arc::new(FakeVm::default());
    let mut m2 = MsixConfig::new(70, vm2.clone());
    m2.set_state(&s).unwrap();
    assert_eq!(msix_dwords(&m2), table);
    assert_eq!(msix_pba(&m2), pba);
    assert_eq!(m2.control_bits(), ctl);
    assert_eq!(*vm2.routes.lock().unwrap(), routes_before);
    assert_eq!(m2.routes(), m.routes());
    assert_eq!(m2.routes()[5], (29, (0xfee0_5000, 0x45)));
    assert_eq!(m2.state(), m.state());

    // Lifting the function mask delivers vector 0's pending bit; unmasking 5 delivers its own.
    m2.set_control(1 << 15);
    assert_eq!(msix_pba(&m2)[0], 0x20);
    m2.write_table(5 * MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
    assert_eq!(msix_pba(&m2)[0], 0);
    assert_eq!(msix_pba(&m2)[8], 0x20);
}

#[test]
fn msix_refuses_bad_states() {
    let vm = Arc::new(FakeVm::default());
    let mut m = MsixConfig::new(3, vm.clone());
    m.set_control(1 << 15);
    m.write_table(0, &0xfee0_0000u64.to_le_bytes());
    m.write_table(8, &0x41u32.to_le_bytes());
    m.trigger(1);
    let good = m.state();
    let fresh_vm = Arc::new(FakeVm::default());
    let mut fresh = MsixConfig::new(3, fresh_vm.clone());
    let before = fresh.state();
    let routes = fresh_vm.routes.lock().unwrap().clone();

    let e = fresh
        .set_state(&MsixState {
            version: 9,
            ..good.clone()
        })
        .unwrap_err();
    assert_eq!(
        e,
        StateError::Version {
            what: "MSI-X".into(),
            found: 9,
            supported: 1
        }
    );
    let bad: Vec<(&str, MsixState)> = vec![
        ("a longer table", {
            let mut s = good.clone();
            s.table.push(Default::default());
            s
        }),
        ("a shorter table", {
            let mut s = good.clone();
            s.table.pop();
            s
        }),
        ("two PBA words", {
            let mut s = good.clone();
            s.pba.push(0);
            s
        }),
        ("a pending bit past the table", {
            let mut s = good.clone();
            s.pba[0] |= 1 << 3;
            s
        }),
        ("vector control bits other than the mask", {
            let mut s = good.clone();
            s.table[2].control = 0x8000_0001;
            s
        }),
        ("an unaligned message address", {
            let mut s = good.clone();
            s.table[1].addr_lo = 0xfee0_0002;
            s
        }),
    ];
    for (what, s) in bad {
        let e = fresh.set_state(&s).unwrap_err();
        assert!(matches!(e, StateError::Invalid { .. }), "{what}: {e}");
    }
    assert_eq!(fresh.state(), before);
    assert_eq!(*fresh_vm.routes.lock().unwrap(), routes, "no route touched");

    let v = serde_json::to_value(&good).unwrap();
    let cell = std::cell::RefCell::new(fresh);
    let (taken, refused) = check_mutations::<MsixState>(
        &v,
        |s| {
            let mut t = cell.borrow_mut();
            let r = t.set_state(s);
            if r.is_ok() {
                *t = MsixConfig::new(3, fresh_vm.clone());
            }
            r
        },
        || cell.borrow().state() == before,
    );
    assert!(taken > 0 && refused > 0, "{taken} taken, {refused} refused");
}

#[test]
fn bar_ranges_come_back_when_freed() {
    let mut w = BarWindows::new((0xc000_0000, 0x10_0000), Some((6 << 30, 0x2_0000)));
    let a = w.allocate(0x1_0000, BarKind::Mem64).unwrap();
    let b = w.allocate(0x1_0000, BarKind::Mem64).unwrap();
    assert_eq!((a, b), (6 << 30, (6 << 30) + 0x1_0000));
    let low = w.allocate(0x1000, BarKind::Mem32).unwrap();
    w.free(a, 0x1_0000).unwrap();
    assert_eq!(
        w.allocate(0x1_0000, BarKind::Mem64),
        Ok(a),
        "the freed range is reused"
    );
    w.free(low, 0x1000).unwrap();
    assert_eq!(w.allocate(0x1000, BarKind::Mem32), Ok(low));
    assert_eq!(
        w.free(0xc008_0000, 0x1000),
        Err(PciRootError::NotAllocated(0xc008_0000)),
        "a range never allocated is refused"
    );
}

#[test]
fn removing_a_device_unmaps_its_bars_and_frees_the_slot() {
    let vm = Arc::new(FakeVm::default());
    let mut root = PciRoot::new(vm.clone());
    let dev = dummy64(0x1_0000_0000);
    root.add_device(3, dev.clone()).unwrap();
    assert_eq!(root.device_ids(), vec![0, 3]);
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0x1_0000_0000, 0x1_0000)]);
    let back = root.remove_device(3).unwrap();
    assert!(Arc::ptr_eq(&back, &dev));
    assert_eq!(root.device_ids(), vec![0]);
    assert!(
        vm.mapped.lock().unwrap().is_empty(),
        "the BAR left the MMIO bus"
    );
    // The bus entry held the device: with it gone, the caller's handles are the last ones.
    drop(back);
    assert_eq!(Arc::strong_count(&dev), 1);
    assert_eq!(root.remove_device(3).err(), Some(PciRootError::NoDevice(3)));
    assert_eq!(
        root.remove_device(0).err(),
        Some(PciRootError::BadDeviceId(0))
    );
    assert_eq!(root.next_device_id(None), Ok(1));
    root.add_device(3, dev).unwrap();
    assert_eq!(*vm.mapped.lock().unwrap(), vec![(0x1_0000_0000, 0x1_0000)]);
}

#[test]
fn msix_vectors_give_their_gsis_back_when_dropped() {
    let vm = Arc::new(FakeVm::default());
    let m = crate::MsixConfig::new(3, vm.clone());
    let gsis: Vec<u32> = m.routes().iter().map(|&(g, _)| g).collect();
    assert_eq!(gsis.len(), 3);
    assert!(vm.freed_gsis.lock().unwrap().is_empty());
    drop(m);
    assert_eq!(*vm.freed_gsis.lock().unwrap(), gsis);
    for g in gsis {
        assert_eq!(
            vm.routes.lock().unwrap()[&g],
            None,
            "route of GSI {g} removed"
        );
    }
}
