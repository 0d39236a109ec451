//! `test=hostile-suite`, part 4: the virtio device life cycle abused through the common
//! configuration. Selectors and queue numbers out of range, features never offered, status
//! bits out of order, queue registers rewritten while the device runs, notifications for
//! queues that do not exist, resets while requests are in flight, and a storm of activations
//! with broken rings (each one a NEEDS_RESET the VMM reports).

use crate::hostile_virtio::{publish, r16, r32, w16, w32, w64, w8, Dev, Pool, OUTSIDE};
use crate::rawq::{F_NEXT, F_WRITE, VERSION_1};
use crate::{check, fail, pass, println, smp, svc};

const FEATURES_OK: u8 = 8;

/// Out-of-range selectors and features, status out of order: nothing takes, nothing breaks.
fn common_abuse(d: &Dev, p: &Pool) {
    let c = d.l.common;
    d.reset();
    // A queue that does not exist: its registers read as zero whatever is written.
    let mut ghost_ok = true;
    for sel in [d.nq, d.nq + 1, 0x7fff, 0xffff] {
        w16(c + 0x16, sel);
        w16(c + 0x18, 8);
        w64(c + 0x20, 0x1000);
        w16(c + 0x1c, 1);
        w16(c + 0x1a, 0);
        ghost_ok &= r16(c + 0x18) == 0 && r16(c + 0x1c) == 0 && r32(c + 0x20) == 0;
        ghost_ok &= r16(c + 0x1a) == 0xffff;
    }
    // Feature words beyond the two that exist.
    w32(c, 0xffff_ffff);
    let far_features = r32(c + 4);
    w32(c + 8, 7);
    w32(c + 0x0c, 0xffff_ffff);
    // Every feature bit, offered or not: FEATURES_OK must not stick.
    d.l.set_status(1 | 2);
    for half in 0..2 {
        w32(c + 8, half);
        w32(c + 0x0c, 0xffff_ffff);
    }
    d.l.set_status(1 | 2 | FEATURES_OK);
    // Bits never offered do not stick (the VMM drops them, or refuses FEATURES_OK).
    let offered = d.l.device_features();
    let mut acked = 0u64;
    for half in 0..2 {
        w32(c + 8, half);
        acked |= u64::from(r32(c + 0x0c)) << (32 * half);
    }
    let all = d.l.status();
    let only_offered = acked & !offered == 0 || all & FEATURES_OK == 0;
    // DRIVER_OK without FEATURES_OK; then FEATURES_OK after DRIVER_OK; then FAILED.
    d.reset();
    d.l.set_status(1 | 2 | 4);
    let early = d.l.status();
    d.l.set_status(1 | 2 | 4 | FEATURES_OK);
    d.l.set_status(0x80 | 0x7f);
    d.reset();
    let (st, _) = d.start_valid(p);
    d.reset();
    check!(
        &alloc::format!("hostile-{}-common-config", d.name),
        ghost_ok && far_features == 0 && only_offered && st == 0xf,
        "absent queues read zero: {ghost_ok}, feature word 0xffffffff {far_features:#x}, \
         all features: acked {acked:#x} of {offered:#x}, status {all:#x}, DRIVER_OK first: \
         {early:#x}, restart {st:#x}"
    );
}

/// Running device: queue registers rewritten under it, notifications for absent queues,
/// odd-sized notifications.
fn live_abuse(d: &Dev, p: &Pool) {
    let c = d.l.common;
    d.start_valid(p);
    for q in 0..d.queues() {
        w16(c + 0x16, q);
        w64(c + 0x20, OUTSIDE);
        w64(c + 0x28, OUTSIDE);
        w64(c + 0x30, OUTSIDE);
        w16(c + 0x18, 3);
        w16(c + 0x1c, 0);
    }
    let notify0 = d.notify_addr(0);
    for v in [d.nq, 0x7fff, 0xffff] {
        w16(notify0, v);
    }
    w8(notify0, 0xff);
    w32(notify0, 0xffff_ffff);
    w64(notify0, u64::MAX);
    // Past the last queue's notify address, to the end of the notify area.
    let last = d.notify_addr(d.queues() - 1);
    for off in (2..0x40).step_by(2) {
        w16(last + off, 0);
    }
    // The rings the device started with are still the ones it uses: a request on queue 0
    // (whatever the device makes of it) is answered there, or the device broke.
    let m = &p.q[0];
    m.set_desc(0, m.buf, 64, F_NEXT, 1);
    m.set_desc(1, m.buf + 64, 64, F_WRITE, 0);
    publish(m, 0, 0);
    d.notify(0);
    smp::delay_us(20_000);
    let st = d.l.status();
    d.reset();
    let (st2, _) = d.start_valid(p);
    d.reset();
    check!(
        &alloc::format!("hostile-{}-live-rewrites", d.name),
        st & FEATURES_OK != 0 && st2 == 0xf,
        "status while running {st:#x}, after a reset {st2:#x}"
    );
}

/// Resets while 32 KiB reads are in flight on the disk, over and over.
fn reset_in_flight(d: &Dev, p: &Pool) {
    let mut served = 0;
    for i in 0..200u32 {
        d.start_valid(p);
        let m = &p.q[0];
        // Header (IN, sector i % 16), 32 KiB of data in the scratch area, status.
        w32(m.buf, 0);
        w32(m.buf + 4, 0);
        w64(m.buf + 8, u64::from(i % 16));
        m.set_desc(0, m.buf, 16, F_NEXT, 1);
        m.set_desc(1, p.scratch, 0x8000, F_WRITE | F_NEXT, 2);
        m.set_desc(2, m.buf + 0x100, 1, F_WRITE, 0);
        publish(m, 0, 0);
        d.notify(0);
        if i % 4 == 0 {
            smp::delay_us(u64::from(i % 7) * 50);
        }
        d.reset();
        if r16(m.used() + 2) != 0 {
            served += 1;
        }
    }
    let (st, _) = d.start_valid(p);
    d.reset();
    check!(
        "hostile-blk-reset-in-flight",
        st == 0xf,
        "status after 200 resets with reads in flight {st:#x} ({served} served first)"
    );
    println!("INFO hostile blk reset-in-flight: {served} of 200 served before the reset");
}

/// Activations with a broken ring as fast as the guest can, for `ms`: each one makes the VMM
/// mark the device NEEDS_RESET (and log it).
fn activation_storm(d: &Dev, ms: u64) -> u64 {
    let c = d.l.common;
    let t0 = svc::rdtsc();
    let mut n = 0;
    while (svc::rdtsc() - t0) / (smp::TSC_PER_US * 1000) < ms {
        d.l.set_status(0);
        d.l.set_status(1 | 2);
        w32(c + 8, 1);
        w32(c + 0x0c, (VERSION_1 >> 32) as u32);
        d.l.set_status(1 | 2 | FEATURES_OK);
        w16(c + 0x16, 0);
        w16(c + 0x18, 8);
        w64(c + 0x20, OUTSIDE);
        w16(c + 0x1c, 1);
        d.l.set_status(1 | 2 | FEATURES_OK | 4);
        n += 1;
    }
    d.reset();
    n
}

pub(crate) fn run(devs: &[Dev], p: &Pool, storm_ms: u64) {
    for d in devs {
        common_abuse(d, p);
        live_abuse(d, p);
    }
    match devs.iter().find(|d| d.name == "blk") {
        Some(d) => reset_in_flight(d, p),
        None => fail("hostile-blk-reset-in-flight", format_args!("no disk")),
    }
    println!("HOSTILE activation-storm begin");
    let mut n = 0;
    for d in devs {
        n += activation_storm(d, storm_ms / devs.len().max(1) as u64);
    }
    println!("HOSTILE activation-storm end {n}");
    pass("hostile-activation-storm");
}
