//! The snapshot state (`state.json`, a `VmSnapshot`) and the migration stream: read as the
//! restoring or receiving VMM reads them, then every device state in them restored into a
//! device of its kind, which the guest then uses (register reads, queues served from restored
//! positions) and which is saved again.

use std::sync::{Arc, Mutex};

use devices::Stateful;
use pci::{PciConfigIo, PciRoot};
use virtio_devices::{VirtioDeviceState, VirtioPciDevice};
use vmm::snapshot::{VirtioPciSnapshot, VmSnapshot};

use crate::pci::FakeVm;
use crate::platform::{op, Platform};

/// The platform devices' states into fresh devices; the guest reads every register after.
fn platform(s: &VmSnapshot) {
    let Some(p) = Platform::new() else { return };
    fn one<T: Stateful>(d: &Mutex<T>, s: &T::State) {
        let _ = d.lock().unwrap_or_else(|e| e.into_inner()).restore(s);
    }
    let d = &s.devices;
    if let Some(x) = &d.serial {
        one(&p.serial, x);
    }
    one(&p.cmos, &d.cmos);
    one(&p.i8042, &d.i8042);
    one(&p.acpi_sleep, &d.acpi_sleep);
    one(&p.pm_timer, &d.pm_timer);
    one(&p.ged, &d.ged);
    if let Some(x) = &d.cpu_hotplug {
        one(&p.cpu_hotplug, x);
    }
    if let Some(x) = &d.memory_hotplug {
        one(&p.memory_hotplug, x);
    }
    if let Some(x) = &s.pci.hotplug {
        one(&p.pci_hotplug, x);
    }
    let mut reads = Vec::new();
    for (sel, len) in [
        (0u8, 8u16),
        (1, 2),
        (2, 5),
        (3, 1),
        (4, 4),
        (5, 1),
        (6, 12),
        (7, 24),
        (8, 16),
    ] {
        for off in 0..len {
            reads.extend(op(sel, off, &[], 1));
        }
        reads.extend(op(sel, 0, &[], 4));
    }
    // The CMOS index register, then every byte of the RTC and NVRAM.
    for i in 0..128u8 {
        reads.extend(op(1, 0, &[i], 0));
        reads.extend(op(1, 1, &[], 1));
    }
    p.access(&reads);
    p.round_trip();
}

/// The fuzz target building a device of the state's kind; none for a vhost-user device
/// (restoring one needs its backend process; its state is still read with the snapshot).
fn kind(d: &VirtioDeviceState) -> Option<&'static str> {
    Some(match d {
        VirtioDeviceState::Block(_) => "virtio_blk",
        VirtioDeviceState::Net(_) => "virtio_net",
        VirtioDeviceState::Console(_) => "virtio_console",
        VirtioDeviceState::Rng(_) => "virtio_rng",
        VirtioDeviceState::Balloon(_) => "virtio_balloon",
        VirtioDeviceState::Mem(_) => "virtio_mem",
        VirtioDeviceState::Watchdog(_) => "virtio_watchdog",
        VirtioDeviceState::Vsock(_) => "virtio_vsock",
        VirtioDeviceState::Pmem(_) => "virtio_pmem",
        VirtioDeviceState::Rtc(_) => "virtio_rtc",
        VirtioDeviceState::Iommu(_) => "virtio_iommu",
        VirtioDeviceState::VhostUser(_) => return None,
    })
}

/// A virtio-pci function restored as `pci_setup` restores it (device, then transport, which
/// may start the device: its queues are then served from the restored positions, in the
/// fuzzer's guest RAM), then read, paused, saved and resumed.
fn virtio(v: &VirtioPciSnapshot, image: &[u8]) {
    virtio_devices::fuzz::inline_workers(true);
    let Some(b) = kind(&v.device).and_then(|k| crate::virtio_targets::build(k, &[])) else {
        return;
    };
    let mem = crate::mem::guest_memory(image);
    let vm = Arc::new(FakeVm {
        mmio: Arc::new(devices::Bus::new()),
        mapped: Mutex::new(Vec::new()),
    });
    let Ok(mut dev) = VirtioPciDevice::new(v.id.clone(), b.dev, mem, vm, crate::pci::VIRTIO_BAR)
    else {
        return;
    };
    if dev
        .set_device_state(&v.device)
        .and_then(|()| dev.set_state(&v.transport))
        .is_err()
    {
        return;
    }
    use pci::PciDevice;
    let mut buf = [0u8; 4];
    for off in (0..0x38).step_by(4) {
        dev.read_bar(0, off, &mut buf);
    }
    dev.read_bar(0, 0x2000, &mut buf);
    dev.read_bar(0, 0xc000, &mut buf);
    let _ = dev.pause();
    let t = dev.state();
    let json = serde_json::to_vec(&t).expect("a transport state serialises");
    let _: virtio_devices::VirtioPciState =
        serde_json::from_slice(&json).expect("a transport state reads back");
    let d = dev.device_state();
    let json = serde_json::to_vec(&d).expect("a device state serialises");
    let _: VirtioDeviceState = serde_json::from_slice(&json).expect("a device state reads back");
    let _ = dev.resume();
}

/// Restores everything `s` holds (but the vCPU and irqchip states, which KVM checks); RAM
/// for restored queues is `image`.
pub fn restore(s: &VmSnapshot, image: &[u8]) {
    platform(s);
    let vm = Arc::new(FakeVm {
        mmio: Arc::new(devices::Bus::new()),
        mapped: Mutex::new(Vec::new()),
    });
    let root = Arc::new(Mutex::new(PciRoot::new(vm)));
    let _ = root
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_state(&s.pci.root);
    let mut io = PciConfigIo::new(root.clone());
    let _ = io.set_state(&s.pci.config_io);
    let _ = io.state();
    for v in s.pci.devices.iter().take(4) {
        virtio(v, image);
    }
    if let Ok(mem) = vm_config::MemoryConfig::parse("size=128K") {
        let _ = vmm::restore::file_offsets(s, &mem);
    }
}

/// `state.json` as `--restore` reads it.
pub fn state_json(data: &[u8]) {
    if let Ok(s) = serde_json::from_slice::<VmSnapshot>(data) {
        restore(&s, &[]);
    }
}

/// A migration stream as the receiving VMM reads it; its memory lands in guarded RAM.
pub fn migration(data: &[u8]) {
    vmm::fuzz::receive_migration(data, &mut || crate::mem::guest_memory(&[]), &mut |s| {
        restore(&s, &[])
    });
}

/// What a postcopy destination sends its source on the fault connection, served from guarded
/// RAM.
pub fn migration_faults(data: &[u8]) {
    let ram = crate::mem::guest_memory(&[]);
    vmm::fuzz::serve_page_faults(data, &ram);
}

/// PageFaults: a page, a 64 KiB block, one past RAM, then an Abandon.
pub fn migration_faults_seeds() -> Vec<Vec<u8>> {
    let range = |gpa: u64, len: u64| [gpa.to_le_bytes(), len.to_le_bytes()].concat();
    let (page, block, past) = (
        range(0x1000, 0x1000),
        range(0, 0x1_0000),
        range(0x1f_f000, 0x2000),
    );
    vec![
        vmm::fuzz::migration_frames(&[(9, &page), (9, &block)]),
        vmm::fuzz::migration_frames(&[(9, &page), (6, b"")]),
        vmm::fuzz::migration_frames(&[(9, &past)]),
    ]
}

/// A `state.json` as this build writes it: every platform device's state, PCI segment 0 with
/// one virtio function of each kind (as plugged, before a driver), the RAM ranges of 128 KiB.
pub fn snapshot_seed() -> Option<VmSnapshot> {
    use vmm::snapshot::{MemoryRange, PciSnapshot, PlatformSnapshot, VM_SNAPSHOT_VERSION};
    fn st<T: Stateful>(d: &Mutex<T>) -> T::State {
        d.lock().unwrap_or_else(|e| e.into_inner()).state()
    }
    let p = Platform::new()?;
    let devices = PlatformSnapshot {
        serial: Some(st(&p.serial)),
        cmos: st(&p.cmos),
        i8042: st(&p.i8042),
        acpi_sleep: st(&p.acpi_sleep),
        pm_timer: st(&p.pm_timer),
        ged: st(&p.ged),
        cpu_hotplug: Some(st(&p.cpu_hotplug)),
        memory_hotplug: Some(st(&p.memory_hotplug)),
    };
    let vm = Arc::new(FakeVm {
        mmio: Arc::new(devices::Bus::new()),
        mapped: Mutex::new(Vec::new()),
    });
    let root = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
    let mut functions = Vec::new();
    for (i, name) in crate::virtio_targets::DEVICES.iter().enumerate() {
        let b = crate::virtio_targets::build(name, &[])?;
        let dev = VirtioPciDevice::new(
            format!("_{name}{i}"),
            b.dev,
            crate::mem::guest_memory(&[]),
            vm.clone(),
            crate::pci::VIRTIO_BAR + (i as u64) * virtio_devices::VIRTIO_PCI_BAR_SIZE,
        )
        .ok()?;
        functions.push(VirtioPciSnapshot {
            id: format!("_{name}{i}"),
            segment: 0,
            slot: i as u8 + 1,
            transport: dev.state(),
            device: dev.device_state(),
        });
    }
    let pci = PciSnapshot {
        root: root.lock().unwrap_or_else(|e| e.into_inner()).state()?,
        config_io: PciConfigIo::new(root.clone()).state(),
        hotplug: Some(st(&p.pci_hotplug)),
        devices: functions,
        others: Vec::new(),
    };
    Some(VmSnapshot {
        version: VM_SNAPSHOT_VERSION,
        vcpus: Vec::new(),
        vm: hypervisor::VmState {
            version: hypervisor::VM_STATE_VERSION,
            irqchip: None,
            pit: None,
            clock: Default::default(),
        },
        devices,
        pci,
        memory_ranges: vec![MemoryRange {
            gpa: 0,
            length: 128 << 10,
        }],
    })
}

pub fn state_seeds() -> Vec<Vec<u8>> {
    let Some(s) = snapshot_seed() else {
        return Vec::new();
    };
    let full = serde_json::to_vec(&s).expect("a state serialises");
    let mut one = s.clone();
    one.pci.devices.truncate(1);
    vec![full, serde_json::to_vec(&one).expect("a state serialises")]
}

/// A whole migration (Start, Config, Memory, State, Complete) and one abandoned.
pub fn migration_seeds() -> Vec<Vec<u8>> {
    let config = br#"{"vm_config":{"payload":{"kernel":"/bin/true"},"memory":{"size":131072}}}"#;
    let mut memory = Vec::new();
    for (gpa, len) in [(0x1000u64, 8u64), (0x1_0000, 16)] {
        memory.extend_from_slice(&gpa.to_le_bytes());
        memory.extend_from_slice(&len.to_le_bytes());
    }
    memory.extend_from_slice(&[0x5a; 24]);
    let mut state = None;
    if let Some(mut s) = snapshot_seed() {
        s.pci.devices.truncate(1);
        state = serde_json::to_vec(&s).ok();
    }
    let state = state.unwrap_or_default();
    vec![
        vmm::fuzz::migration_frames(&[(1, b""), (2, config), (4, &memory), (3, &state), (5, b"")]),
        vmm::fuzz::migration_frames(&[(1, b""), (2, config), (6, b"")]),
        // A paused VM's migration ends with CompletePaused.
        vmm::fuzz::migration_frames(&[(1, b""), (2, config), (4, &memory), (3, &state), (8, b"")]),
    ]
}
