//! `test=hostile`: drives a virtio-blk queue by hand with malformed descriptor chains. The VMM
//! must fail each request (or mark the device NEEDS_RESET), keep running, and keep serving the
//! other devices.

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::DeviceType;

use crate::rawq::{r8, w32, w64, w8, Layout, F_NEXT, F_WRITE};
use crate::virtio::{find, transport, GuestHal};
use crate::{check, fail, pass, smp};

/// A data descriptor: address, length, flags.
type Buf = (u64, u32, u16);

pub fn scenario_hostile() {
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("hostile-blk", format_args!("no virtio-blk function"));
        return;
    };
    let Some(l) = Layout::find(df) else { return };
    let Some(mut q) = l.start_queue0("hostile-setup") else {
        return;
    };
    let (hdr, data, status) = (q.buf, q.buf + 0x200, q.buf + 0xfff);
    let header = |sector: u64| {
        w32(hdr, 0); // IN
        w32(hdr + 4, 0);
        w64(hdr + 8, sector);
        w8(status, 0xee);
    };
    // (name, data descriptor (addr, len, flags) or None, header flags, sector)
    let cases: [(&str, Option<Buf>, u16, u64); 6] = [
        (
            "hostile-addr-outside-ram",
            Some((0x7fff_ffff_0000, 512, F_WRITE)),
            0,
            0,
        ),
        ("hostile-readonly-data-for-in", Some((data, 512, 0)), 0, 0),
        ("hostile-writable-header", None, F_WRITE, 0),
        (
            "hostile-oversized",
            Some((data, 0x8000_0000, F_WRITE)),
            0,
            0,
        ),
        (
            "hostile-sector-beyond-end",
            Some((data, 512, F_WRITE)),
            0,
            u64::MAX / 512,
        ),
        (
            "hostile-addr-wraps",
            Some((u64::MAX - 100, 512, F_WRITE)),
            0,
            0,
        ),
    ];
    for (name, d, hflags, sector) in cases {
        header(sector);
        match d {
            Some((a, l, f)) => {
                q.set_desc(0, hdr, 16, hflags | F_NEXT, 1);
                q.set_desc(1, a, l, f | F_NEXT, 2);
                q.set_desc(2, status, 1, F_WRITE, 0);
            }
            None => {
                q.set_desc(0, hdr, 16, hflags | F_NEXT, 2);
                q.set_desc(2, status, 1, F_WRITE, 0);
            }
        }
        let answered = q.submit(0);
        let s = r8(status);
        check!(
            name,
            answered && s == 1,
            "answered={answered} status={s:#x}"
        );
    }
    // A chain longer than 4 GiB in total is cut before the status descriptor: the request is
    // dropped (completed without data), never served.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, u32::MAX, F_WRITE | F_NEXT, 2);
    q.set_desc(2, status, 1, F_WRITE, 0);
    let answered = q.submit(0);
    check!(
        "hostile-chain-over-4g",
        answered && r8(status) != 0,
        "answered={answered} status={:#x}",
        r8(status)
    );
    // Zero-length status descriptor: nothing to write the status into, still completed.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, status, 0, F_WRITE, 0);
    check!("hostile-zero-length-status", q.submit(0), "no used entry");
    // A descriptor loop: the chain is cut at the queue size.
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, 16, F_NEXT, 0);
    check!("hostile-descriptor-loop", q.submit(0), "no used entry");
    // MSI-X: function masked, entry 0 programmed, queue 0 routed to it. This driver did not
    // negotiate EVENT_IDX, so the next completion must raise vector 0: pending while masked.
    let msix = crate::virtio::msix_mask_and_route(df);
    // A well-formed read still works on the same queue.
    header(0);
    q.set_desc(0, hdr, 16, F_NEXT, 1);
    q.set_desc(1, data, 512, F_WRITE | F_NEXT, 2);
    q.set_desc(2, status, 1, F_WRITE, 0);
    let ok = q.submit(0) && r8(status) == 0;
    check!("hostile-valid-after-bad", ok, "status {:#x}", r8(status));
    if let Some((bar, cap, pba)) = msix {
        let bits = crate::virtio::wait_pending_bit(bar, pba);
        check!("msix-pending-bit", bits & 1 == 1, "PBA {bits:#x}");
        crate::virtio::msix_disable(df, cap);
    }
    // An available index far beyond the queue size breaks the queue: NEEDS_RESET.
    q.next_avail = q.next_avail.wrapping_add(100);
    q.kick();
    let mut st = 0;
    for _ in 0..2000 {
        st = l.status();
        if st & 0x40 != 0 {
            break;
        }
        smp::delay_us(500);
    }
    check!("hostile-needs-reset", st & 0x40 != 0, "status {st:#x}");
    // Another device still works.
    crate::virtio::scenario_rng();
    // The broken disk recovers after a reset (virtio-drivers resets it first).
    if let Some(t) = transport(df) {
        match VirtIOBlk::<GuestHal, _>::new(t) {
            Ok(mut blk) => {
                let mut b = [0u8; 512];
                check!(
                    "hostile-recovered",
                    blk.read_blocks(0, &mut b).is_ok(),
                    "read failed"
                );
            }
            Err(e) => fail("hostile-recovered", format_args!("{e}")),
        }
    }
    pass("hostile-vmm-alive");
}
