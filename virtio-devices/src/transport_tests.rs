//! The virtio-pci transport driven through its BAR and configuration space with a fake VM:
//! feature negotiation, queue setup, notification, ISR, ioeventfds following the BAR, the
//! pci-cfg window, and hostile or random writes that must not break the device.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::tests::{disk, AVAIL, DATA, DESC, MEM_SIZE, QSIZE, USED, WRITE};
use crate::Rng;

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
