//! `test=pmem`: finds the virtio-pmem function (device type 27, PCI device 0x105b), which
//! `virtio-drivers` does not know, and drives it with `rawq`: reads the range's start and size
//! from its configuration, maps the range, prints its first 16 bytes, writes `pmem-written` at
//! offset 4096 and sends a FLUSH. A chain with no status buffer first: the device must skip it
//! and go on.

use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::transport::pci::bus::{Command, DeviceFunction};

use crate::rawq::{r8, w8, Layout, F_NEXT, F_WRITE};
use crate::virtio::root;
use crate::{fail, paging, println};

const MARK: &[u8] = b"pmem-written";

fn find_pmem() -> Option<DeviceFunction> {
    root()
        .enumerate_bus(0)
        .find(|(_, info)| info.vendor_id == 0x1af4 && info.device_id == 0x105b)
        .map(|(df, _)| df)
}

fn r64(a: u64) -> u64 {
    // SAFETY: the device's configuration (BAR 0, identity mapped); two dword reads, as a
    // driver reads a 64-bit field of it.
    let (lo, hi) = unsafe {
        (
            read_volatile(a as *const u32),
            read_volatile((a + 4) as *const u32),
        )
    };
    u64::from(lo) | u64::from(hi) << 32
}

pub fn scenario_pmem() {
    let Some(df) = find_pmem() else {
        fail("pmem-present", format_args!("no virtio-pmem function"));
        return;
    };
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let Some(layout) = Layout::find(df) else {
        return;
    };
    let (start, size) = (r64(layout.device), r64(layout.device + 8));
    let Some(mut q) = layout.start_queue0("pmem") else {
        return;
    };
    if size < 8192 {
        fail("pmem-size", format_args!("start={start:#x} size={size:#x}"));
        return;
    }
    if let Err(e) = paging::map_ram(start, size) {
        fail("pmem-map", format_args!("{start:#x}+{size:#x}: {e:?}"));
        return;
    }
    let mut head = [0u8; 16];
    for (i, b) in head.iter_mut().enumerate() {
        // SAFETY: inside the range the device reported, mapped above.
        *b = unsafe { read_volatile((start + i as u64) as *const u8) };
    }
    println!(
        "PMEM start={start:#x} size={size:#x} head={}",
        crate::hotplug::hex(&head)
    );
    for (i, &b) in MARK.iter().enumerate() {
        // SAFETY: as above.
        unsafe { write_volatile((start + 4096 + i as u64) as *mut u8, b) };
    }
    // A request without a status buffer: used with nothing written, the device goes on.
    let (req, status) = (q.buf, q.buf + 64);
    for i in 0..4 {
        w8(req + i, 0);
    }
    q.set_desc(0, req, 4, 0, 0);
    if !q.submit(0) {
        fail(
            "pmem-bad-chain",
            format_args!("a chain without status not used"),
        );
        return;
    }
    w8(status, 0xff);
    q.set_desc(0, req, 4, F_NEXT, 1);
    q.set_desc(1, status, 4, F_WRITE, 0);
    if !q.submit(0) || r8(status) != 0 {
        fail(
            "pmem-flush",
            format_args!("not used, or status {:#x}", r8(status)),
        );
        return;
    }
    println!("PMEM flush ok");
    println!("READY");
}
