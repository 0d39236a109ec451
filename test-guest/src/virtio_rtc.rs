//! `test=virtio-rtc` (`--rtc`): the virtio-rtc device (device 17) driven by hand on its request
//! queue (src/rawq.rs): CFG says one clock; CLOCK_CAP says clock 0 is UTC (maybe smeared) with
//! no alarm; CROSS_CAP says no cross-timestamping; two READs of clock 0 go forward and agree
//! with the CMOS clock to within 2 s; clock 1 is ENODEV, an unknown request EOPNOTSUPP, a
//! response buffer too small gets EINVAL in the header alone.

use virtio_drivers::transport::DeviceType;

use crate::rawq::{r8, w16, w8, Layout, RawQueue, F_NEXT, F_WRITE};
use crate::virtio::find;
use crate::{cmos, fail, pass, println};

const REQ_READ: u16 = 0x0001;
const REQ_CFG: u16 = 0x1000;
const REQ_CLOCK_CAP: u16 = 0x1001;
const REQ_CROSS_CAP: u16 = 0x1002;

/// Sends `msg_type` with clock `clock` in the body (16 bytes of request) and a response
/// buffer of `resp_len` bytes; returns (used length, the response's first 16 bytes).
fn call(q: &mut RawQueue, msg_type: u16, clock: u16, resp_len: u32) -> Option<(u32, [u8; 16])> {
    let (req, resp) = (q.buf, q.buf + 0x100);
    for i in 0..16 {
        w8(req + i, 0);
        w8(resp + i, 0xee);
    }
    w16(req, msg_type);
    w16(req + 8, clock);
    q.set_desc(0, req, 16, F_NEXT, 1);
    q.set_desc(1, resp, resp_len, F_WRITE, 0);
    q.publish(0);
    let (_, len) = q.wait_used(1000)?;
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = r8(resp + i as u64);
    }
    Some((len, out))
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn scenario_virtio_rtc() {
    let Some(df) = find(DeviceType::Timer).into_iter().next() else {
        fail("virtio-rtc-present", format_args!("no virtio device 17"));
        return;
    };
    let Some(layout) = Layout::find_no_config(df) else {
        fail(
            "virtio-rtc-present",
            format_args!("{df}: no virtio capabilities"),
        );
        return;
    };
    let Some(mut q) = layout.start_queue0("virtio-rtc-init") else {
        return;
    };
    pass("virtio-rtc-present");
    let ok = |(len, r): (u32, [u8; 16])| (len == 16 && r[0] == 0).then_some(r);
    let cfg = call(&mut q, REQ_CFG, 0, 16).and_then(ok);
    crate::check!(
        "virtio-rtc-cfg",
        cfg.is_some_and(|r| r[8] == 1 && r[9] == 0),
        "{cfg:x?}"
    );
    let cap = call(&mut q, REQ_CLOCK_CAP, 0, 16).and_then(ok);
    crate::check!(
        "virtio-rtc-clock-cap",
        cap.is_some_and(|r| r[8] == 4 && r[10] == 0),
        "{cap:x?}"
    );
    let cross = call(&mut q, REQ_CROSS_CAP, 0, 16).and_then(ok);
    crate::check!(
        "virtio-rtc-cross-cap",
        cross.is_some_and(|r| r[8] == 0),
        "{cross:x?}"
    );
    let read = |q: &mut RawQueue| {
        call(q, REQ_READ, 0, 16)
            .and_then(ok)
            .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap_or_default()))
    };
    let (a, b) = (read(&mut q), read(&mut q));
    let wall = cmos::read_time().map(|t| {
        let d = days(i64::from(t.year), i64::from(t.month), i64::from(t.day));
        d * 86_400 + i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second)
    });
    println!("INFO virtio-rtc read {a:?} {b:?} cmos {wall:?}");
    let agree = match (a, b, wall) {
        (Some(a), Some(b), Some(w)) => b >= a && ((a / 1_000_000_000) as i64 - w).abs() <= 2,
        _ => false,
    };
    crate::check!(
        "virtio-rtc-read",
        agree,
        "{a:?} {b:?} against CMOS {wall:?} s"
    );
    let enodev = call(&mut q, REQ_READ, 1, 16);
    crate::check!(
        "virtio-rtc-enodev",
        enodev.is_some_and(|(len, r)| len >= 8 && r[0] == 3),
        "{enodev:x?}"
    );
    let unknown = call(&mut q, 0x7777, 0, 16);
    crate::check!(
        "virtio-rtc-eopnotsupp",
        unknown.is_some_and(|(len, r)| len >= 8 && r[0] == 2),
        "{unknown:x?}"
    );
    let small = call(&mut q, REQ_READ, 0, 12);
    crate::check!(
        "virtio-rtc-einval",
        small.is_some_and(|(len, r)| len == 8 && r[0] == 4 && r[8] == 0xee),
        "{small:x?}"
    );
    layout.set_status(0);
}
