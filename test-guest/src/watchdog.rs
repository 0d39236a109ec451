//! `test=watchdog`: drives the original's virtio-watchdog (device type 35, PCI device 0x1063),
//! which `virtio-drivers` does not know, with the hand-written queue of `rawq`. It pings
//! `pings=<n>` times (default 3) a second apart, each ping a 1-byte write-only buffer the device
//! fills with 1, then stops, as a hung guest would: the VMM resets the VM 20-35 s later and the
//! guest boots again.

use virtio_drivers::transport::pci::bus::{Command, DeviceFunction};

use crate::bootinfo::BootInfo;
use crate::rawq::{r8, w8, Layout, F_WRITE};
use crate::virtio::root;
use crate::{fail, parse_u64, println, smp};

/// The watchdog function (virtio device type 35 as a modern PCI device: 0x1040 + 35).
fn find_watchdog() -> Option<DeviceFunction> {
    root()
        .enumerate_bus(0)
        .find(|(_, info)| info.vendor_id == 0x1af4 && info.device_id == 0x1063)
        .map(|(df, _)| df)
}

pub fn scenario_watchdog(boot: &BootInfo) {
    let Some(df) = find_watchdog() else {
        fail(
            "watchdog-present",
            format_args!("no virtio-watchdog function"),
        );
        return;
    };
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let Some(mut q) = Layout::find(df).and_then(|l| l.start_queue0("watchdog")) else {
        return;
    };
    let pings = boot.arg("pings").and_then(parse_u64).unwrap_or(3);
    println!("INFO watchdog {df} pings={pings}");
    println!("READY");
    for n in 1..=pings {
        w8(q.buf, 0);
        q.set_desc(0, q.buf, 1, F_WRITE, 0);
        if !q.submit(0) || r8(q.buf) != 1 {
            fail(
                "watchdog-ping",
                format_args!("ping {n}: not used, or not filled with 1 ({})", r8(q.buf)),
            );
            return;
        }
        println!("WATCHDOG ping {n} ok");
        smp::delay_us(1_000_000);
    }
    println!("WATCHDOG stopped");
    // Hung: no more pings, for ever.
    loop {
        smp::delay_us(1_000_000);
    }
}
