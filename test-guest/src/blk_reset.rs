//! `test=blk-reset`: a vhost-user-blk disk whose backend stays away longer than the device waits
//! for it (`--disk ...,vhost_reconnect_timeout=<s>`), driven by hand (`rawq`, queue 0) so that a
//! request can be waited for with a time-out. It reads sectors 0-7 (`blkreset-read`: the host's
//! pattern), prints `BLKRESET waiting for the backend to go`, makes one more read available and
//! waits (`blkreset_wait_ms=`, default 30 s) for the device to need a reset
//! (`blkreset-needs-reset`: the host killed the backend and the device gave up on it). Then,
//! as a driver does, it resets the device and initialises it again (`BLKRESET device reset,
//! attempt <n>`), which makes the device connect to its socket afresh, and reads sector 0 (up
//! to 20 s); a device that needs a reset again meanwhile (no backend in time) is reset again,
//! ten times at most. Then `blkreset-reread` (sectors 0-7 again) and `blkreset-write` (sector 8
//! written with `0xa5` and read back).

use virtio_drivers::transport::pci::bus::Command;
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::rawq::{r8, w32, w64, w8, Layout, RawQueue, F_NEXT, F_WRITE, VERSION_1};
use crate::virtio::{find, host_pattern, root};
use crate::{check, fail, parse_u64, pass, println, smp};

const NEEDS_RESET: u8 = 0x40;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
/// Where the request's parts lie in the queue's page.
const HDR: u64 = 0;
const STATUS: u64 = 0x100;
const DATA: u64 = 0x200;

/// Makes a one-sector request available (without waiting): a read, or a write of `fill`.
fn submit(q: &mut RawQueue, sector: u64, write: Option<u8>) {
    let b = q.buf;
    w32(b + HDR, if write.is_some() { T_OUT } else { T_IN });
    w32(b + HDR + 4, 0);
    w64(b + HDR + 8, sector);
    w8(b + STATUS, 0xff);
    if let Some(v) = write {
        for i in 0..512 {
            w8(b + DATA + i, v);
        }
    }
    let data_flags = if write.is_some() { 0 } else { F_WRITE };
    q.set_desc(0, b + HDR, 16, F_NEXT, 1);
    q.set_desc(1, b + DATA, 512, data_flags | F_NEXT, 2);
    q.set_desc(2, b + STATUS, 1, F_WRITE, 0);
    q.publish(0);
}

/// Waits up to `ms` for the request's completion, giving up early when the device needs a
/// reset: the status byte, or None.
fn complete(l: &Layout, q: &mut RawQueue, ms: u64) -> Option<u8> {
    for _ in 0..ms / 10 {
        if q.wait_used(10).is_some() {
            return Some(r8(q.buf + STATUS));
        }
        if l.status() & NEEDS_RESET != 0 {
            return None;
        }
    }
    None
}

/// Reads `sector` (up to `ms`): whether every byte is `want`, or None without a completion.
fn read_is(l: &Layout, q: &mut RawQueue, sector: u64, want: u8, ms: u64) -> Option<bool> {
    submit(q, sector, None);
    let status = complete(l, q, ms)?;
    Some(status == 0 && (0..512).all(|i| r8(q.buf + DATA + i) == want))
}

/// Sectors 0-7 hold the host's pattern.
fn host_sectors_ok(l: &Layout, q: &mut RawQueue) -> bool {
    (0..8).all(|s| read_is(l, q, s, host_pattern(0, s), 5000) == Some(true))
}

pub fn scenario_blk_reset(boot: &BootInfo) {
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("blkreset-present", format_args!("no virtio-blk function"));
        return;
    };
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let Some(l) = Layout::find(df) else { return };
    let Some(mut q) = l.start_queue0("blkreset-start") else {
        return;
    };
    check!("blkreset-read", host_sectors_ok(&l, &mut q), "sectors 0-7");
    println!("BLKRESET waiting for the backend to go");
    submit(&mut q, 1, None);
    let wait_ms = boot
        .arg("blkreset_wait_ms")
        .and_then(parse_u64)
        .unwrap_or(30_000);
    let mut waited = 0;
    while l.status() & NEEDS_RESET == 0 && waited < wait_ms {
        smp::delay_us(10_000);
        waited += 10;
    }
    let status = l.status();
    check!(
        "blkreset-needs-reset",
        status & NEEDS_RESET != 0,
        "status {status:#x} after {waited} ms"
    );
    for attempt in 1..=10 {
        let Some(mut q) = l
            .start("blkreset-start", VERSION_1, &[0])
            .and_then(|mut v| v.pop())
        else {
            return;
        };
        println!("BLKRESET device reset, attempt {attempt}");
        if read_is(&l, &mut q, 0, host_pattern(0, 0), 20_000).is_none() {
            continue;
        }
        check!(
            "blkreset-reread",
            host_sectors_ok(&l, &mut q),
            "sectors 0-7"
        );
        submit(&mut q, 8, Some(0xa5));
        let wrote = complete(&l, &mut q, 5000) == Some(0);
        check!(
            "blkreset-write",
            wrote && read_is(&l, &mut q, 8, 0xa5, 5000) == Some(true),
            "sector 8 (written: {wrote})"
        );
        return;
    }
    fail(
        "blkreset-reread",
        format_args!("no backend after 10 resets"),
    );
}
