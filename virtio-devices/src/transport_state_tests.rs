//! The virtio-pci transport's saved state: a guest driver's whole set-up (BAR moved, MSI-X
//! programmed, features negotiated, a queue started and used), saved, through JSON, restored
//! into fresh objects over a copy of guest memory; and every bad state refused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::BusDevice;
use guest_memory::GuestMemoryMmap;
use pci::{PciConfigMmio, PciDevice, PciRoot, StateError, VmInterface};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    Console, ConsoleSize, Rng, VirtioPciDevice, VirtioPciState, F_RING_EVENT_IDX, F_VERSION_1,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x10000;
const QSIZE: u16 = 16;
const WRITE: u16 = 2;
/// Where the VMM puts BAR 0, and where the guest moves it.
const BUILD_BAR: u64 = 0x1_0000_0000;
const GUEST_BAR: u64 = 0x2_0020_0000;
const SLOT: u8 = 2;
const ECAM_DEV: u64 = (SLOT as u64) << 15;

/// A VM that records what the PCI code asks of it: MMIO mappings, ioeventfds, MSI routes and
/// (clones of) the irqfds, by GSI.
#[derive(Default)]
struct FakeVm {
    mapped: Mutex<Vec<(u64, u64)>>,
    ioevents: Mutex<Vec<u64>>,
    routes: Mutex<BTreeMap<u32, Option<(u64, u32)>>>,
    irqfds: Mutex<BTreeMap<u32, EventFd>>,
    gsi: AtomicU32,
}

impl VmInterface for FakeVm {
    fn map_mmio(&self, _d: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), String> {
        self.mapped.lock().unwrap().push((base, len));
        Ok(())
    }
    fn unmap_mmio(&self, base: u64) {
        self.mapped.lock().unwrap().retain(|&(b, _)| b != base);
    }
    fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> Result<(), String> {
        self.ioevents.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) {
        self.ioevents.lock().unwrap().retain(|&a| a != addr);
    }
    fn allocate_gsi(&self) -> Result<u32, String> {
        Ok(24 + self.gsi.fetch_add(1, Ordering::SeqCst))
    }
    fn free_gsi(&self, _gsi: u32) {}
    fn set_msi_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String> {
        self.routes.lock().unwrap().insert(gsi, msi);
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), String> {
        self.irqfds
            .lock()
            .unwrap()
            .insert(gsi, fd.try_clone().unwrap());
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) {
        self.irqfds.lock().unwrap().remove(&gsi);
    }
}

impl FakeVm {
    /// How many times the irqfd of `gsi` was signalled since the last call.
    fn fired(&self, gsi: u32) -> u64 {
        self.irqfds.lock().unwrap()[&gsi].read().unwrap_or(0)
    }
}

/// One VM's PCI segment with an rng at `SLOT`, as the VMM builds it.
struct Machine {
    vm: Arc<FakeVm>,
    mem: GuestMemoryMmap,
    root: Arc<Mutex<PciRoot>>,
    dev: Arc<Mutex<VirtioPciDevice>>,
    ecam: PciConfigMmio,
}

impl Machine {
    fn new(mem: GuestMemoryMmap) -> Machine {
        let vm = Arc::new(FakeVm::default());
        let rng = Rng::new(std::fs::File::open("/dev/urandom").unwrap());
        let dev = Arc::new(Mutex::new(
            VirtioPciDevice::new(
                "rng".into(),
                Box::new(rng),
                mem.clone(),
                vm.clone(),
                BUILD_BAR,
            )
            .unwrap(),
        ));
        let root = Arc::new(Mutex::new(PciRoot::new(vm.clone())));
        root.lock().unwrap().add_device(SLOT, dev.clone()).unwrap();
        let ecam = PciConfigMmio(root.clone());
        Machine {
            vm,
            mem,
            root,
            dev,
            ecam,
        }
    }

    fn fresh_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// A fresh machine over a copy of this one's guest memory (as a restore loads it).
    fn clone_memory(&self) -> GuestMemoryMmap {
        let mem = Self::fresh_mem();
        let mut buf = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        mem.write_slice(&buf, GuestAddress(0)).unwrap();
        mem
    }

    fn cfg_read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.read(ECAM_DEV | off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.ecam.write(ECAM_DEV | off, data);
    }
    fn bar_write(&self, off: u64, data: &[u8]) {
        self.dev.lock().unwrap().write_bar(0, off, data);
    }
    fn bar_read(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.lock().unwrap().read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&self) -> u8 {
        self.bar_read(0x14, 1) as u8
    }

    /// The MSI-X capability's offset, found as a driver finds it.
    fn msix_cap(&mut self) -> u64 {
        let mut p = u64::from(self.cfg_read(0x34) & 0xff);
        while p != 0 {
            let v = self.cfg_read(p);
            if v & 0xff == 0x11 {
                return p;
            }
            p = u64::from((v >> 8) & 0xff);
        }
        panic!("no MSI-X capability");
    }

    /// Memory and bus mastering on, BAR 0 moved to `GUEST_BAR`, MSI-X entries 0 (config) and 1
    /// (queue 0) programmed and unmasked, MSI-X enabled.
    fn guest_pci_setup(&mut self) {
        self.cfg_write(4, &[2 | 4, 0]);
        self.cfg_write(0x10, &(GUEST_BAR as u32).to_le_bytes());
        self.cfg_write(0x14, &((GUEST_BAR >> 32) as u32).to_le_bytes());
        for (i, data) in [(0u64, 0x30u32), (1, 0x31)] {
            let e = 0x8000 + 16 * i;
            self.bar_write(e, &(0xfee0_0000u64 | i << 12).to_le_bytes());
            self.bar_write(e + 8, &data.to_le_bytes());
            self.bar_write(e + 12, &0u32.to_le_bytes());
        }
        let cap = self.msix_cap();
        self.cfg_write(cap + 2, &0x8000u16.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features VERSION_1 | EVENT_IDX, FEATURES_OK.
    fn negotiate(&self) {
        self.bar_write(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        let want = F_VERSION_1 | F_RING_EVENT_IDX;
        for sel in 0..2u32 {
            self.bar_write(0x08, &sel.to_le_bytes());
            self.bar_write(0x0c, &((want >> (32 * sel)) as u32).to_le_bytes());
        }
        self.bar_write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
    }

    /// Queue 0 programmed (vector 1) and the configuration vector set to 0; not ready yet.
    fn program_queue(&self) {
        self.bar_write(0x10, &0u16.to_le_bytes());
        self.bar_write(0x16, &0u16.to_le_bytes());
        self.bar_write(0x18, &QSIZE.to_le_bytes());
        self.bar_write(0x1a, &1u16.to_le_bytes());
        self.bar_write(0x20, &DESC.to_le_bytes());
        self.bar_write(0x28, &(AVAIL as u32).to_le_bytes());
        self.bar_write(0x2c, &0u32.to_le_bytes());
        self.bar_write(0x30, &USED.to_le_bytes());
    }

    fn start_queue(&self) {
        self.bar_write(0x1c, &1u16.to_le_bytes());
        self.bar_write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
    }

    /// Puts a one-descriptor request for `len` random bytes in descriptor (and avail slot)
    /// `n`, publishes it, and notifies the device if `kick`.
    fn post(&self, n: u16, len: u32, kick: bool) {
        let d = DESC + 16 * u64::from(n);
        let m = &self.mem;
        m.write_obj(DATA + 0x100 * u64::from(n), GuestAddress(d))
            .unwrap();
        m.write_obj(len, GuestAddress(d + 8)).unwrap();
        m.write_obj(WRITE, GuestAddress(d + 12)).unwrap();
        m.write_obj(n, GuestAddress(AVAIL + 4 + 2 * u64::from(n % QSIZE)))
            .unwrap();
        // used_event (EVENT_IDX): an interrupt once the device passes what the driver saw.
        let seen: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        m.write_obj(seen, GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE)))
            .unwrap();
        m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
        if kick {
            // Through the BAR (the ioeventfd's fallback path).
            self.bar_write(0x3000, &0u16.to_le_bytes());
        }
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn wait_used(&self, idx: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.used_idx() != idx {
            assert!(
                Instant::now() < deadline,
                "used index {} (want {idx})",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Everything a driver can read without side effects, read as a driver reads it (the
    /// selectors are stepped through and put back): every configuration-space dword, the
    /// common configuration for each feature word and queue, the device configuration, the
    /// MSI-X table and PBA. The ISR (read clears it) is not included.
    fn registers(&mut self) -> Vec<u64> {
        let mut r: Vec<u64> = (0..0x1000)
            .step_by(4)
            .map(|o| u64::from(self.cfg_read(o)))
            .collect();
        let (dfs, drs, qs) = (
            self.bar_read(0x00, 4),
            self.bar_read(0x08, 4),
            self.bar_read(0x16, 2),
        );
        r.extend([dfs, drs, qs]);
        for sel in 0..3u32 {
            self.bar_write(0x00, &sel.to_le_bytes());
            r.push(self.bar_read(0x04, 4));
            self.bar_write(0x08, &sel.to_le_bytes());
            r.push(self.bar_read(0x0c, 4));
        }
        r.extend([0x10, 0x12].map(|o| self.bar_read(o, 2)));
        r.extend([0x14, 0x15].map(|o| self.bar_read(o, 1)));
        for q in 0..3u16 {
            self.bar_write(0x16, &q.to_le_bytes());
            r.extend([0x18, 0x1a, 0x1c, 0x1e].map(|o| self.bar_read(o, 2)));
            r.extend((0x20..0x38).step_by(4).map(|o| self.bar_read(o, 4)));
        }
        self.bar_write(0x00, &(dfs as u32).to_le_bytes());
        self.bar_write(0x08, &(drs as u32).to_le_bytes());
        self.bar_write(0x16, &(qs as u16).to_le_bytes());
        r.extend((0x2000..0x2010).step_by(8).map(|o| self.bar_read(o, 8)));
        r.extend(
            (0x8000..0x8000 + 2 * 16)
                .step_by(4)
                .map(|o| self.bar_read(o, 4)),
        );
        r.push(self.bar_read(0xc000, 8));
        r
    }

    fn mapped(&self) -> Vec<(u64, u64)> {
        let mut m = self.vm.mapped.lock().unwrap().clone();
        m.sort();
        m
    }

    fn state(&self) -> VirtioPciState {
        self.dev.lock().unwrap().state()
    }

    /// What the VMM does to restore this segment: the root, then the device, then the BARs;
    /// the device paused at once (the VM comes up paused). `resume` is the VM's resume.
    fn restore(&self, root: &pci::PciRootState, dev: &VirtioPciState) -> Result<(), StateError> {
        self.root.lock().unwrap().set_state(root)?;
        self.dev.lock().unwrap().set_state(dev)?;
        self.root.lock().unwrap().refresh_bars();
        // The VMM restores the other devices before it pauses them all: time enough for this
        // one to take a request, were it notified before the resume.
        std::thread::sleep(Duration::from_millis(20));
        self.dev.lock().unwrap().pause().unwrap();
        Ok(())
    }

    fn resume(&self) {
        self.dev.lock().unwrap().resume().unwrap();
    }
}

/// The whole life of a driver's set-up across a save: BAR 0 moved, MSI-X programmed and
/// enabled, VERSION_1 and EVENT_IDX negotiated, queue 0 started and one request served, a
/// second request published without a notification, the ISR left unread. Saved, through JSON,
/// restored into a fresh machine over a copy of guest memory: every register reads the same,
/// BAR 0 is mapped where the guest put it with the notify ioeventfd beside it, the MSI routes
/// are the same, the restored device takes the second request (and only it: its ring
/// positions came back) without a new notification and interrupts through the queue's vector,
/// and the driver goes on with a third request and a reset.
#[test]
fn transport_survives_save_and_restore_of_a_running_device() {
    let mut a = Machine::new(Machine::fresh_mem());
    a.guest_pci_setup();
    a.negotiate();
    a.program_queue();
    a.start_queue();
    assert_eq!(
        a.status(),
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    );
    assert_eq!(a.mapped(), vec![(GUEST_BAR, 0x1_0000)]);
    a.post(0, 64, true);
    a.wait_used(1);
    // Queue 0 is MSI-X vector 1: GSI 25.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.vm.fired(25) == 0 {
        assert!(Instant::now() < deadline, "no interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.post(1, 32, false);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(a.used_idx(), 1, "not notified: not taken");

    let saved = a.state();
    assert!(saved.activated);
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(saved.isr, 1);
    let json =
        serde_json::to_string_pretty(&(a.root.lock().unwrap().state().unwrap(), &saved)).unwrap();
    let regs = a.registers();
    let (ioevents, routes) = (
        a.vm.ioevents.lock().unwrap().clone(),
        a.vm.routes.lock().unwrap().clone(),
    );
    assert_eq!(ioevents, vec![GUEST_BAR + 0x3000]);
    assert_eq!(routes[&25], Some((0xfee0_1000, 0x31)));

    let (root_s, dev_s): (pci::PciRootState, VirtioPciState) = serde_json::from_str(&json).unwrap();
    assert_eq!(dev_s, saved);
    let mut b = Machine::new(a.clone_memory());
    drop(a);
    assert_eq!(b.mapped(), vec![(BUILD_BAR, 0x1_0000)]);
    b.restore(&root_s, &dev_s).unwrap();

    // Nothing moves before the VM's resume; then the second request is taken once, without a
    // notification from the driver.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b.used_idx(), 1, "a request taken before the resume");
    b.resume();
    b.wait_used(2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.used_idx(), 2);
    let id: u32 = b.mem.read_obj(GuestAddress(USED + 4 + 8)).unwrap();
    let len: u32 = b.mem.read_obj(GuestAddress(USED + 4 + 12)).unwrap();
    assert_eq!((id, len), (1, 32));
    assert!(
        b.vm.fired(25) > 0,
        "queue interrupt through the restored route"
    );

    assert_eq!(b.registers(), regs);
    assert_eq!(b.mapped(), vec![(GUEST_BAR, 0x1_0000)]);
    assert_eq!(*b.vm.ioevents.lock().unwrap(), ioevents);
    assert_eq!(*b.vm.routes.lock().unwrap(), routes);
    assert_eq!(b.bar_read(0x1000, 1), 1, "ISR: the queue bit");
    assert_eq!(b.bar_read(0x1000, 1), 0);
    let again = b.state();
    assert_eq!(
        (again.queues[0].next_avail, again.queues[0].next_used),
        (2, 2)
    );

    // The driver goes on: a third request, then a reset and a new start.
    b.post(2, 16, true);
    b.wait_used(3);
    b.bar_write(0x14, &[0]);
    assert_eq!(b.status(), 0);
    b.negotiate();
    b.program_queue();
    b.start_queue();
    assert_eq!(b.status() & STATUS_NEEDS_RESET, 0);
}

/// A state saved half-way through the driver's set-up (features accepted, queue 0 programmed
/// but not ready): restored, the driver finishes on the new device and it works.
#[test]
fn transport_restored_mid_negotiation_finishes_its_setup() {
    let mut a = Machine::new(Machine::fresh_mem());
    a.guest_pci_setup();
    a.negotiate();
    a.program_queue();
    let saved = a.state();
    assert!(!saved.activated);
    assert_eq!(saved.queues[0].desc_table, DESC);
    let regs = a.registers();
    let json = serde_json::to_string(&saved).unwrap();

    let mut b = Machine::new(a.clone_memory());
    drop(a);
    let root_s = b.root.lock().unwrap().state().unwrap();
    b.restore(&root_s, &serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(b.registers(), regs);
    assert_eq!(b.mapped(), vec![(GUEST_BAR, 0x1_0000)]);
    b.start_queue();
    assert_eq!(b.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    b.post(0, 8, true);
    b.wait_used(1);
}

/// A device the driver broke (rings outside guest memory: NEEDS_RESET at DRIVER_OK) is
/// restored as broken, not started; the driver's reset and a good set-up then work.
#[test]
fn transport_restored_needing_reset_stays_so_until_reset() {
    let a = Machine::new(Machine::fresh_mem());
    a.negotiate();
    a.program_queue();
    a.bar_write(0x20, &(1u64 << 40).to_le_bytes());
    a.start_queue();
    assert_ne!(a.status() & STATUS_NEEDS_RESET, 0);
    let saved = a.state();
    let b = Machine::new(a.clone_memory());
    b.dev.lock().unwrap().set_state(&saved).unwrap();
    assert_eq!(b.state(), saved);
    assert_ne!(b.status() & STATUS_NEEDS_RESET, 0);
    b.bar_write(0x14, &[0]);
    b.negotiate();
    b.program_queue();
    b.start_queue();
    assert_eq!(b.status() & STATUS_NEEDS_RESET, 0);
    b.post(0, 8, true);
    b.wait_used(1);
}

/// Other versions, other devices and configurations, values the registers cannot hold, a
/// started device whose rings are not in guest memory, and every corruption of a good state's
/// JSON: refused (or taken) without a panic, a refusal changing nothing.
#[test]
fn transport_refuses_bad_states() {
    let mut a = Machine::new(Machine::fresh_mem());
    a.guest_pci_setup();
    a.negotiate();
    a.program_queue();
    a.start_queue();
    a.post(0, 8, true);
    a.wait_used(1);
    let good = a.state();
    let b = Machine::new(a.clone_memory());
    let before = b.state();
    let refuse = |s: &VirtioPciState, what: &str| {
        let e = b
            .dev
            .lock()
            .unwrap()
            .set_state(s)
            .expect_err(&format!("{what}: taken"));
        assert!(
            e.to_string().starts_with("cannot restore rng: "),
            "{what}: {e}"
        );
        assert_eq!(b.state(), before, "{what}: changed the device");
        e
    };
    let with = |f: &dyn Fn(&mut VirtioPciState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let e = refuse(&with(&|s| s.version = 2), "version");
    assert_eq!(
        e.to_string(),
        "cannot restore rng: virtio-pci state version 2: this build reads version 1"
    );
    let e = refuse(&with(&|s| s.msix.version = 0), "MSI-X version");
    assert!(matches!(e, StateError::Version { .. }), "{e}");
    type Edit = fn(&mut VirtioPciState);
    let invalid: Vec<(&str, Edit)> = vec![
        ("device type", |s| s.device_type = 3),
        ("offered features", |s| s.device_features |= 1 << 5),
        ("unoffered driver features", |s| s.driver_features |= 1 << 5),
        ("more queues", |s| s.queues.push(s.queues[0])),
        ("no queues", |s| s.queues.clear()),
        ("queue maximum", |s| s.queues[0].max_size = 128),
        ("queue vector", |s| s.queues[0].msix_vector = 2),
        ("config vector", |s| s.config_vector = 7),
        ("device ID", |s| s.config.regs[0] = 0x1042_1af4),
        ("BAR type bits", |s| s.config.regs[4] &= !4),
        ("MSI-X table size", |s| s.msix.table.truncate(1)),
        ("rings outside memory", |s| s.queues[0].used_ring = 1 << 40),
        ("queue size", |s| s.queues[0].size = 12),
        ("misaligned ring", |s| s.queues[0].desc_table = DESC + 8),
        ("more in flight than the queue holds", |s| {
            s.queues[0].next_avail = 40
        }),
        ("no ready queue", |s| s.queues[0].ready = false),
    ];
    for (what, f) in &invalid {
        let e = refuse(&with(f), what);
        assert!(matches!(e, StateError::Invalid { .. }), "{what}: {e}");
    }
    // The same corrupt rings are fine in a device that was not started or needs a reset: the
    // driver's DRIVER_OK (or reset) comes after the restore, as it came after the save.
    for f in [
        |s: &mut VirtioPciState| s.activated = false,
        |s: &mut VirtioPciState| s.status |= STATUS_NEEDS_RESET,
    ] {
        let mut s = with(&|s| s.queues[0].used_ring = 1 << 40);
        f(&mut s);
        let c = Machine::new(Machine::fresh_mem());
        c.dev.lock().unwrap().set_state(&s).unwrap();
        // Ring positions mean nothing for a queue the device does not run.
        s.queues[0].next_avail = 0;
        s.queues[0].next_used = 0;
        assert_eq!(c.state(), s);
    }
    // A console's state in an rng: another device type.
    let console = VirtioPciDevice::new(
        "console".into(),
        Box::new(Console::new(None, None, ConsoleSize::new(80, 25))),
        b.mem.clone(),
        Arc::new(FakeVm::default()),
        BUILD_BAR,
    )
    .unwrap()
    .state();
    refuse(&console, "console state");
    for bad in ["", "{}", "null", "{\"version\":1}", "[1]"] {
        assert!(
            serde_json::from_str::<VirtioPciState>(bad).is_err(),
            "{bad}"
        );
    }

    // Every corruption of the JSON, each into a fresh device (over the same memory).
    let v = serde_json::to_value(&good).unwrap();
    let mem = b.mem.clone();
    let cell = std::cell::RefCell::new(Machine::new(mem.clone()));
    let before = cell.borrow().state();
    let (taken, refused) = pci::test_utils::check_mutations::<VirtioPciState>(
        &v,
        |s| {
            let r = cell.borrow().dev.lock().unwrap().set_state(s);
            if r.is_ok() {
                *cell.borrow_mut() = Machine::new(mem.clone());
            }
            r
        },
        || cell.borrow().state() == before,
    );
    eprintln!("mutations: {taken} taken, {refused} refused");
    assert!(
        taken > 10 && refused > 100,
        "{taken} taken, {refused} refused"
    );
}

/// Accesses of no bytes (a fuzzer found the ISR read indexing an empty buffer) do nothing in
/// any region of BAR 0, and the status stays as the driver set it.
#[test]
fn transport_ignores_empty_accesses() {
    let a = Machine::new(Machine::fresh_mem());
    a.negotiate();
    let status = a.status();
    for off in [0x14, 0x1000, 0x2000, 0x3000, 0x8000, 0xc000, 0xf_fff0] {
        a.dev.lock().unwrap().read_bar(0, off, &mut []);
        a.dev.lock().unwrap().write_bar(0, off, &[]);
    }
    assert_eq!(a.status(), status);
}
