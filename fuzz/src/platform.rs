//! The platform devices on their buses at the VM's addresses (16550, CMOS/RTC, i8042, ACPI
//! sleep and PM timer, GED, CPU/memory/PCI hotplug controllers, TPM CRB), driven by a guest's
//! port and MMIO accesses.
//!
//! Input: accesses, each `[sel, off_lo, off_hi]` then, for a write, its bytes: `sel & 15` picks
//! the device, `sel & 16` a write, `sel >> 5` the size (1, 2, 4, 8, 3, 0, 16, 1 bytes); the
//! offset (16 bits) is taken modulo the device's length plus 8, so accesses also fall just
//! past a device.

use std::sync::{Arc, Mutex};

use devices::{
    AcpiPmTimer, AcpiSleepDevice, Bus, BusDevice, Cmos, CpuHotplug, Ged, MemoryHotplug, PciHotplug,
    Serial, SerialOutput, Stateful, I8042,
};
use vmm_sys_util::eventfd::EventFd;

struct Sinks;

impl devices::VmRequests for Sinks {
    fn power_off(&self) {}
    fn reset(&self) {}
}
impl devices::CpuEjectSink for Sinks {
    fn eject_cpu(&self, _cpu: u32) {}
}
impl devices::EjectSink for Sinks {
    fn eject(&self, _segment: u16, _slots: u32) {}
}

/// A TPM that answers every command with a fixed response header.
struct FakeTpm;

impl devices::tpm::TpmBackend for FakeTpm {
    fn execute(&mut self, _locality: u8, cmd: &[u8], rsp: &mut [u8]) -> Result<usize, String> {
        if cmd.first() == Some(&0xff) {
            return Err("refused".into());
        }
        let r = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0];
        let n = r.len().min(rsp.len());
        rsp[..n].copy_from_slice(&r[..n]);
        Ok(n)
    }
    fn established(&mut self) -> bool {
        false
    }
}

/// A device, whether it is on the MMIO bus (else ports), its base and length.
type Placed = (Arc<Mutex<dyn BusDevice>>, bool, u64, u64);

pub struct Platform {
    pub pio: Bus,
    pub mmio: Bus,
    /// (bus is mmio, base, length) of each device, by selector.
    map: Vec<(bool, u64, u64)>,
    pub serial: Arc<Mutex<Serial>>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_sleep: Arc<Mutex<AcpiSleepDevice>>,
    pub pm_timer: Arc<Mutex<AcpiPmTimer>>,
    pub ged: Arc<Mutex<Ged>>,
    pub cpu_hotplug: Arc<Mutex<CpuHotplug>>,
    pub memory_hotplug: Arc<Mutex<MemoryHotplug>>,
    pub pci_hotplug: Arc<Mutex<PciHotplug>>,
}

impl Platform {
    pub fn new() -> Option<Self> {
        let s = Arc::new(Sinks);
        let serial = Arc::new(Mutex::new(Serial::new(
            EventFd::new(libc::EFD_NONBLOCK).ok()?,
            SerialOutput::new(Some(Box::new(std::io::sink()))),
        )));
        let cmos = Arc::new(Mutex::new(Cmos::new(1 << 30, 1 << 30, None)));
        let i8042 = Arc::new(Mutex::new(I8042::new(s.clone())));
        let acpi_sleep = Arc::new(Mutex::new(AcpiSleepDevice::new(5, 1, s.clone())));
        let pm_timer = Arc::new(Mutex::new(AcpiPmTimer::new()));
        let ged = Arc::new(Mutex::new(Ged::new(EventFd::new(libc::EFD_NONBLOCK).ok()?)));
        let cpu_hotplug = Arc::new(Mutex::new(CpuHotplug::new(8, 2, s.clone())));
        let memory_hotplug = Arc::new(Mutex::new(MemoryHotplug::new(&[
            (1 << 32, 128 << 20),
            ((1 << 32) + (128 << 20), 256 << 20),
        ])));
        let pci_hotplug = Arc::new(Mutex::new(PciHotplug::new(s, 1)));
        let tpm = Arc::new(Mutex::new(devices::tpm::TpmCrb::new(
            Box::new(FakeTpm),
            0xfed4_0000,
        )));
        let pio = Bus::new();
        let mmio = Bus::new();
        let devs: Vec<Placed> = vec![
            (serial.clone(), false, 0x3f8, 8),
            (cmos.clone(), false, 0x70, 2),
            (i8042.clone(), false, 0x60, 5),
            (acpi_sleep.clone(), false, 0x600, 1),
            (pm_timer.clone(), false, 0x608, 4),
            (ged.clone(), false, 0x620, 1),
            (cpu_hotplug.clone(), true, 0xfea0_1000, 0xc),
            (memory_hotplug.clone(), true, 0xfea0_2000, 0x18),
            (pci_hotplug.clone(), true, 0xfea0_0000, 0x10),
            (tpm, true, 0xfed4_0000, 0x5000),
        ];
        let mut map = Vec::new();
        for (d, is_mmio, base, len) in devs {
            let bus = if is_mmio { &mmio } else { &pio };
            bus.insert(d, base, len).ok()?;
            map.push((is_mmio, base, len));
        }
        Some(Platform {
            pio,
            mmio,
            map,
            serial,
            cmos,
            i8042,
            acpi_sleep,
            pm_timer,
            ged,
            cpu_hotplug,
            memory_hotplug,
            pci_hotplug,
        })
    }

    /// Runs the accesses `data` describes (see the module's doc).
    pub fn access(&self, mut data: &[u8]) {
        const SIZES: [usize; 8] = [1, 2, 4, 8, 3, 0, 16, 1];
        while data.len() >= 3 {
            let (sel, off) = (data[0], u64::from(u16::from_le_bytes([data[1], data[2]])));
            data = &data[3..];
            let (is_mmio, base, len) = self.map[usize::from(sel & 15) % self.map.len()];
            let bus = if is_mmio { &self.mmio } else { &self.pio };
            let addr = base + off % (len + 8);
            let size = SIZES[usize::from(sel >> 5)];
            if sel & 16 != 0 {
                let n = size.min(data.len());
                bus.write(addr, &data[..n]);
                data = &data[n..];
            } else {
                let mut buf = [0u8; 16];
                bus.read(addr, &mut buf[..size]);
            }
        }
    }

    /// Each device's state through JSON and back into it, as a snapshot and restore do.
    pub fn round_trip(&self) {
        fn one<T: Stateful>(d: &Mutex<T>) {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            let s = d.state();
            let json = serde_json::to_vec(&s).expect("a state serialises");
            let back: T::State = serde_json::from_slice(&json).expect("a state reads back");
            assert_eq!(back, s, "{}: the state read back differs", T::NAME);
            d.restore(&back).expect("a device takes its own state back");
        }
        one(&self.serial);
        one(&self.cmos);
        one(&self.i8042);
        one(&self.acpi_sleep);
        one(&self.pm_timer);
        one(&self.ged);
        one(&self.cpu_hotplug);
        one(&self.memory_hotplug);
        one(&self.pci_hotplug);
    }
}

pub fn ports(data: &[u8]) {
    let Some(p) = Platform::new() else { return };
    p.access(data);
    p.round_trip();
}

/// An access for the seeds: device `sel`, offset `off`, written `bytes` or read `read` bytes.
pub fn op(sel: u8, off: u16, bytes: &[u8], read: usize) -> Vec<u8> {
    let code = |n: usize| match n {
        1 => 0u8,
        2 => 1,
        4 => 2,
        _ => 3,
    };
    let mut v = if bytes.is_empty() {
        vec![sel | (code(read) << 5)]
    } else {
        vec![sel | 16 | (code(bytes.len()) << 5)]
    };
    v.extend_from_slice(&off.to_le_bytes());
    v.extend_from_slice(bytes);
    v
}

/// Seeds: what a guest's drivers do (8250 probe and output, RTC reads and NVRAM writes, the
/// keyboard controller's reset, ACPI sleep, GED and hotplug registers, a TPM command).
pub fn seeds() -> Vec<Vec<u8>> {
    let w = |sel, off, bytes: &[u8]| op(sel, off, bytes, 0);
    let r = |sel, off, n| op(sel, off, &[], n);
    let serial = [
        w(0, 3, &[0x80]),
        w(0, 0, &[1]),
        w(0, 1, &[0]),
        w(0, 3, &[3]),
        w(0, 1, &[0x0f]),
        w(0, 4, &[0x10]),
        w(0, 0, b"A"),
        r(0, 5, 1),
        r(0, 0, 1),
        r(0, 2, 1),
        w(0, 4, &[0x0b]),
        w(0, 0, b"h"),
    ]
    .concat();
    let cmos = [
        w(1, 0, &[0x0a]),
        r(1, 1, 1),
        w(1, 0, &[0x0b]),
        w(1, 1, &[0x02]),
        w(1, 0, &[0x40]),
        w(1, 1, &[0x55]),
        w(1, 0, &[0x00]),
        r(1, 1, 1),
        w(1, 0, &[0x8f]),
        r(1, 1, 1),
    ]
    .concat();
    let i8042 = [r(2, 4, 1), w(2, 4, &[0x20]), r(2, 0, 1), w(2, 4, &[0xfe])].concat();
    let acpi = [
        r(4, 0, 4),
        w(3, 0, &[0x34]),
        w(3, 0, &[0x01]),
        r(5, 0, 1),
        w(5, 0, &[0xff]),
    ]
    .concat();
    let hotplug = [
        w(6, 0, &[1, 0, 0, 0]),
        r(6, 4, 1),
        w(6, 4, &[2]),
        r(6, 8, 4),
        w(7, 0, &[1, 0, 0, 0]),
        r(7, 0, 4),
        r(7, 4, 4),
        r(7, 8, 4),
        r(7, 0x14, 1),
        w(7, 0x14, &[2]),
        r(8, 0, 4),
        w(8, 8, &[1, 0, 0, 0]),
    ]
    .concat();
    let tpm = [
        r(9, 0, 4),
        w(9, 8, &[2, 0, 0, 0]),
        r(9, 0x44, 4),
        w(9, 0x40, &[2, 0, 0, 0]),
        w(9, 0x80, &[0x80, 1, 0, 0, 0, 12, 0, 0]),
        w(9, 0x88, &[1, 0x44, 0, 0]),
        w(9, 0x4c, &[1, 0, 0, 0]),
        r(9, 0x4c, 4),
        r(9, 0x80, 8),
    ]
    .concat();
    vec![serial, cmos, i8042, acpi, hotplug, tpm]
}
