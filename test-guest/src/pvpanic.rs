//! `test=pvpanic`: the pvpanic PCI device (`--pvpanic`), found by its IDs on bus 0 as Linux's
//! `pvpanic-pci` driver finds it. Its BAR reads the supported events (panicked | crash
//! loaded = 3); writing 1 reports a panic to the VMM, which keeps the guest running, so the
//! guest prints `PVPANIC reported` and finishes normally; with `pvpanic_then=wait` it prints
//! `READY` and idles instead, so a test can look at the running VM.

use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::transport::pci::bus::BarInfo;

use crate::bootinfo::BootInfo;
use crate::virtio::root;
use crate::{check, fail, pass, println, svc};

const VENDOR: u16 = 0x1b36;
const DEVICE: u16 = 0x0011;
const PANICKED: u8 = 1;
const EVENTS: u8 = 0x3;

pub fn scenario_pvpanic(boot: &BootInfo) {
    let mut r = root();
    let Some((df, info)) = r
        .enumerate_bus(0)
        .find(|(_, i)| i.vendor_id == VENDOR && i.device_id == DEVICE)
    else {
        fail(
            "pvpanic-device",
            format_args!("no {VENDOR:04x}:{DEVICE:04x} on bus 0"),
        );
        return;
    };
    println!(
        "INFO pvpanic at {df} class={:#04x}/{:#04x} revision={}",
        info.class, info.subclass, info.revision
    );
    check!(
        "pvpanic-class",
        info.class == 0x08 && info.subclass == 0x80,
        "class {:#x} subclass {:#x}, want 0x08/0x80",
        info.class,
        info.subclass
    );
    let bar = match r.bar_info(df, 0) {
        Ok(Some(BarInfo::Memory { address, size, .. })) if address != 0 => {
            println!("INFO pvpanic BAR0 {address:#x}+{size:#x}");
            address
        }
        other => {
            fail("pvpanic-bar", format_args!("{df}: {other:?}"));
            return;
        }
    };
    pass("pvpanic-bar");
    // SAFETY: the BAR lies in the 32-bit PCI window, identity mapped uncached below 4 GiB.
    let events = unsafe { read_volatile(bar as *const u8) };
    check!(
        "pvpanic-events",
        events == EVENTS,
        "the BAR reads {events:#x}, want {EVENTS:#x}"
    );
    // SAFETY: as above; a one-byte write is what the device takes.
    unsafe { write_volatile(bar as *mut u8, PANICKED) };
    println!("PVPANIC reported");
    pass("pvpanic-write");
    if boot.arg("pvpanic_then") == Some("wait") {
        println!("READY");
        loop {
            svc::hlt();
        }
    }
}
