//! `test=hotplug`: PCI hot plug as an OS does it with the original Cloud Hypervisor's ACPI
//! mechanism. The Generic Event Device interrupts with bit 0x04 ("PCI devices changed", whose
//! `_EVT` runs `\_SB_.PHPR.PSCN`); the guest reads PCIU (slots added) and PCID (slots whose
//! removal the host asks for) of PHPR's registers (as `PSCN` does: it ends in `Notify`, which
//! the AML interpreter cannot run, see aml.rs), brings added virtio devices up with
//! `virtio-drivers`, and for a removal resets the device and evaluates the slot's `_EJ0` with
//! the interpreter (→ `PCEJ`: PSEG, then B0EJ = 1 << slot), then waits for the function to
//! leave configuration space. It runs for ever; see docs/test-guest.md for the lines it prints.
//! `hp_segment=<s>`: the slots of PCI segment `s` (PSEG = s, its bridge's slot devices, its
//! ECAM from the MCFG) instead of segment 0's.

use alloc::boxed::Box;
use core::fmt::{self, Write};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, ConfigurationAccess, DeviceFunction, DeviceFunctionInfo, HeaderType,
    MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;

use crate::acpi_sys::AcpiInfo;
use crate::aml::Aml;
use crate::bootinfo::BootInfo;
use crate::phpr::{self, Phpr};
use crate::virtio::GuestHal;
use crate::{fail, heap, parse_u64, println, smp, svc};

/// GED event bit: PCI devices changed.
const GED_PCI: u8 = 0x04;
/// How long an ejected function may stay in configuration space.
const GONE_TIMEOUT_US: u64 = 5_000_000;

/// The driver of a hot-plugged slot (boxed: the same allocation sizes each time, which the heap
/// takes back and hands out again). The drivers are held for their `Drop`, which resets the
/// device.
#[allow(dead_code)]
enum Driver {
    Blk(Box<VirtIOBlk<GuestHal, PciTransport>>),
    Net(Box<VirtIONet<GuestHal, PciTransport, 16>>),
    /// A function without a driver here.
    Other,
}

struct Hotplug {
    aml: Aml,
    /// The segment whose slots are watched, and its ECAM.
    segment: u16,
    ecam: u64,
    /// The segment's host bridge (`\_SB_.PC00` for segment 0).
    bridge: alloc::string::String,
    phpr: Phpr,
    slots: [Option<Driver>; 32],
}

fn df(slot: u8) -> DeviceFunction {
    DeviceFunction {
        bus: 0,
        device: slot,
        function: 0,
    }
}

pub(crate) fn hex(b: &[u8]) -> impl fmt::Display + '_ {
    struct Hex<'a>(&'a [u8]);
    impl fmt::Display for Hex<'_> {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }
    Hex(b)
}

fn mac(m: [u8; 6]) -> impl fmt::Display {
    struct Mac([u8; 6]);
    impl fmt::Display for Mac {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            for (i, b) in self.0.iter().enumerate() {
                if i > 0 {
                    f.write_char(':')?;
                }
                write!(f, "{b:02x}")?;
            }
            Ok(())
        }
    }
    Mac(m)
}

/// What the guest writes to sector 1 of the disk in `slot`: `hotplug-slot-N`, then zeros.
fn sector1(slot: u8) -> [u8; 512] {
    let mut b = [0u8; 512];
    let mut w = Cursor(&mut b, 0);
    let _ = write!(w, "hotplug-slot-{slot}");
    b
}

struct Cursor<'a>(&'a mut [u8], usize);

impl Write for Cursor<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let dst = self.0.get_mut(self.1..self.1 + s.len()).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.1 += s.len();
        Ok(())
    }
}

impl Hotplug {
    fn cam(&self) -> MmioCam<'static> {
        // SAFETY: the segment's ECAM from the MCFG, below 4 GiB and identity mapped; only
        // configuration accesses go there.
        unsafe { MmioCam::new(self.ecam as *mut u8, Cam::Ecam) }
    }

    fn transport(&self, df: DeviceFunction) -> Option<PciTransport> {
        match PciTransport::new::<GuestHal, _>(&mut PciRoot::new(self.cam()), df) {
            Ok(t) => Some(t),
            Err(e) => {
                fail("virtio-transport", format_args!("{df}: {e}"));
                None
            }
        }
    }

    /// `PSCN` for the segment: PSEG = segment, then PCIU and PCID (each cleared by the read).
    fn scan(&mut self) {
        self.phpr.pseg.write(u64::from(self.segment));
        let up = self.phpr.pciu.read() as u32;
        let down = self.phpr.pcid.read() as u32;
        println!("INFO hotplug scan pciu={up:#x} pcid={down:#x}");
        for slot in 0..32u8 {
            if up & (1 << slot) != 0 {
                self.add(slot);
            }
        }
        for slot in 0..32u8 {
            if down & (1 << slot) != 0 {
                self.remove(slot);
            }
        }
        let (top, listed) = heap::usage();
        println!("INFO hotplug heap top={top} free-listed={listed}");
    }

    fn add(&mut self, slot: u8) {
        if self.slots[usize::from(slot)].is_some() {
            fail(
                "hotplug-add",
                format_args!("slot={slot}: already has a driver"),
            );
            return;
        }
        let cam = self.cam();
        let id = cam.read_word(df(slot), 0);
        let (vendor, device) = (id as u16, (id >> 16) as u16);
        if vendor == 0xffff {
            fail(
                "hotplug-add",
                format_args!("slot={slot}: nothing in configuration space"),
            );
            return;
        }
        let class = cam.read_word(df(slot), 8);
        let info = DeviceFunctionInfo {
            vendor_id: vendor,
            device_id: device,
            class: (class >> 24) as u8,
            subclass: (class >> 16) as u8,
            prog_if: (class >> 8) as u8,
            revision: class as u8,
            header_type: HeaderType::from((cam.read_word(df(slot), 12) >> 16) as u8 & 0x7f),
        };
        // Decode memory and master DMA, as an OS enables a function it takes on; map its BARs
        // above 4 GiB (only segment 0's 64-bit window was mapped at start).
        let mut r = PciRoot::new(self.cam());
        let (_, cmd) = r.get_status_command(df(slot));
        r.set_command(df(slot), cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
        for bar in 0..6 {
            if let Ok(Some(BarInfo::Memory { address, size, .. })) = r.bar_info(df(slot), bar) {
                if address >= 1 << 32 && size > 0 {
                    if let Err(e) = crate::paging::map_uncached(address, size) {
                        fail("hotplug-add", format_args!("slot={slot}: BAR{bar}: {e:?}"));
                        return;
                    }
                }
            }
        }
        let driver = match virtio_device_type(&info) {
            Some(DeviceType::Block) => self.add_blk(slot),
            Some(DeviceType::Network) => self.add_net(slot),
            _ => {
                println!("HOTPLUG ADDED slot={slot} type={vendor:04x}:{device:04x}");
                Some(Driver::Other)
            }
        };
        if let Some(d) = driver {
            self.slots[usize::from(slot)] = Some(d);
        }
    }

    fn add_blk(&self, slot: u8) -> Option<Driver> {
        let mut blk = match self.transport(df(slot)).map(VirtIOBlk::<GuestHal, _>::new) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                fail("hotplug-add", format_args!("slot={slot}: virtio-blk: {e}"));
                return None;
            }
            None => return None,
        };
        let mut s0 = [0u8; 512];
        if let Err(e) = blk.read_blocks(0, &mut s0) {
            fail(
                "hotplug-add",
                format_args!("slot={slot}: read of sector 0: {e}"),
            );
            return Some(Driver::Blk(Box::new(blk)));
        }
        println!(
            "HOTPLUG ADDED slot={slot} type=blk sectors={} sector0={}",
            blk.capacity(),
            hex(&s0[..16])
        );
        let want = sector1(slot);
        let mut back = [0u8; 512];
        let r = blk
            .write_blocks(1, &want)
            .and_then(|()| blk.flush())
            .and_then(|()| blk.read_blocks(1, &mut back));
        match r {
            Ok(()) if back == want => println!("HOTPLUG IO slot={slot} ok"),
            Ok(()) => fail(
                "hotplug-io",
                format_args!("slot={slot}: sector 1 read back {}", hex(&back[..16])),
            ),
            Err(e) => fail("hotplug-io", format_args!("slot={slot}: {e}")),
        }
        Some(Driver::Blk(Box::new(blk)))
    }

    fn add_net(&self, slot: u8) -> Option<Driver> {
        let t = self.transport(df(slot))?;
        match VirtIONet::<GuestHal, _, 16>::new(t, 2048) {
            Ok(n) => {
                println!(
                    "HOTPLUG ADDED slot={slot} type=net mac={}",
                    mac(n.mac_address())
                );
                Some(Driver::Net(Box::new(n)))
            }
            Err(e) => {
                fail("hotplug-add", format_args!("slot={slot}: virtio-net: {e}"));
                None
            }
        }
    }

    /// Resets the device (dropping its driver), ejects the slot as `_EJ0` does and waits for
    /// the function to leave configuration space.
    fn remove(&mut self, slot: u8) {
        drop(self.slots[usize::from(slot)].take());
        let ej0 = phpr::slot_device(&self.aml, &self.bridge, slot)
            .and_then(|dev| self.aml.eval(&alloc::format!("{dev}._EJ0"), &[1]));
        if let Err(e) = ej0 {
            fail("hotplug-eject", format_args!("slot={slot}: {e}"));
            return;
        }
        println!("HOTPLUG EJECTED slot={slot}");
        let cam = self.cam();
        let t0 = svc::rdtsc();
        loop {
            let vendor = cam.read_word(df(slot), 0) as u16;
            let us = (svc::rdtsc() - t0) / smp::TSC_PER_US;
            if vendor == 0xffff {
                println!("HOTPLUG GONE slot={slot}");
                println!("INFO hotplug slot={slot} gone after about {} ms", us / 1000);
                return;
            }
            if us > GONE_TIMEOUT_US {
                fail(
                    "hotplug-gone",
                    format_args!(
                        "slot={slot}: vendor {vendor:#06x} still there after about {} s",
                        us / 1_000_000
                    ),
                );
                return;
            }
            smp::delay_us(1000);
        }
    }
}

pub fn scenario_hotplug(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let Some(a) = acpi else {
        fail("hotplug", format_args!("no ACPI tables"));
        return;
    };
    let Some(ged_port) = a.ged_port else {
        fail(
            "hotplug",
            format_args!("no ACPI0013 device with a SystemIO OperationRegion in the DSDT"),
        );
        return;
    };
    let aml = match Aml::load(a.rsdp_addr) {
        Ok(aml) => aml,
        Err(e) => {
            fail("hotplug-aml", format_args!("{e}"));
            return;
        }
    };
    let segment = boot.arg("hp_segment").and_then(parse_u64).unwrap_or(0) as u16;
    let Some(ecam) = a.mcfg.iter().find(|e| e.0 == segment).map(|e| e.1) else {
        fail("hotplug", format_args!("the MCFG has no segment {segment}"));
        return;
    };
    let found = phpr::find(&aml).and_then(|p| Ok((p, phpr::bridge(&aml, segment)?)));
    let (phpr, bridge) = match found {
        Ok(p) => p,
        Err(e) => {
            fail("hotplug-phpr", format_args!("{e}"));
            return;
        }
    };
    println!(
        "INFO hotplug phpr={:#x} pciu={:#x} pcid={:#x} b0ej={:#x} pseg={:#x} bridge={bridge} ged_port={ged_port:#x}",
        phpr.pciu.region, phpr.pciu.addr, phpr.pcid.addr, phpr.b0ej.addr, phpr.pseg.addr
    );
    let mut hp = Hotplug {
        aml,
        segment,
        ecam,
        bridge,
        phpr,
        slots: core::array::from_fn(|_| None),
    };
    crate::route_ged_irq();
    println!("READY");
    // Bits pending without an interrupt are reported (and handled).
    crate::ged_loop(ged_port, "hotplug-irq", |bits| {
        if bits & !GED_PCI != 0 {
            println!("HOTPLUG EVENT bits={bits:#x}");
        }
        if bits & GED_PCI != 0 {
            hp.scan();
        }
    })
}
