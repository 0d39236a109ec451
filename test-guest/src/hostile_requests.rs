//! `test=hostile-suite`, part 5: well-formed chains carrying hostile requests. Every queue of
//! every device gets requests whose fields are edge values (0, 1, all ones, sign bits, sizes
//! that overflow when added or multiplied) and whose type is one the device knows about, in
//! chains of every shape. What a device must do with them is its own business (fail them,
//! serve them, break); it must not panic on the arithmetic, must not report more written
//! than the chain's writable buffers hold, and must start cleanly afterwards. The first disk is
//! left alone (the final checks read it); a second one, if any, takes the disk requests.

use crate::hostile_pci::Rng;
use crate::hostile_virtio::{publish, r16, r32, w32, w64, Dev, Pool};
use crate::rawq::{F_NEXT, F_WRITE};
use crate::{check, fail, pass, println, smp};

const EDGE: [u64; 14] = [
    0,
    1,
    2,
    7,
    0x200,
    0x1000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX - 7,
    u64::MAX,
];

fn edge(rng: &mut Rng, small_ok: bool) -> u64 {
    let v = if rng.below(5) == 0 {
        rng.next()
    } else {
        EDGE[rng.below(EDGE.len() as u64) as usize]
    };
    if small_ok {
        return v;
    }
    // The balloon reads 32-bit page frame numbers: none may name the guest's own RAM (the first
    // 0x10000 pages), or the device would rightly take those pages away from it.
    let half = |h: u64| if h < 0x1_0000 { 0xffff_ffff } else { h };
    half(v >> 32) << 32 | half(v & 0xffff_ffff)
}

/// Request types the device knows (the first word of its request), so that the edge values
/// reach the code behind them.
fn types(name: &str) -> &'static [u32] {
    match name {
        "blk" => &[0, 1, 4, 8, 11, 13, 0xffff_ffff],
        "mem" => &[0, 1, 2, 3, 0xffff],
        "pmem" => &[0, 1],
        "net" => &[
            0x0000, 0x0100, 0x0200, 0x0400, 0x0001, 0x0101, 0x0501, 0x0004,
        ],
        "vsock" => &[0, 1, 2, 3, 4, 5, 6, 7],
        _ => &[0, 1, 2, 0xffff_ffff],
    }
}

fn fill_request(rng: &mut Rng, d: &Dev, at: u64, len: u64) {
    let small_ok = d.name != "balloon";
    for off in (0..len).step_by(8) {
        w64(at + off, edge(rng, small_ok));
    }
    if small_ok && rng.below(4) != 0 {
        let t = types(d.name);
        w32(at, t[rng.below(t.len() as u64) as usize]);
    }
}

/// `n` requests on each queue of `d`; returns (requests answered, whether it broke).
fn requests(d: &Dev, p: &Pool, rng: &mut Rng, n: u16) -> (u32, bool, u32) {
    let mut answered = 0u32;
    let mut max_len = 0u32;
    let mut broken = false;
    d.start_valid(p);
    for slot in 0..n {
        for (q, m) in p.q[..d.queues() as usize].iter().enumerate() {
            let rlen = [16u32, 24, 44, 64, 512, 2048][rng.below(6) as usize];
            let wlen = [1u32, 4, 16, 512, 513, 0x2001, 0x8000][rng.below(7) as usize];
            fill_request(rng, d, m.buf, u64::from(rlen));
            // vsock: the header's op is a u16 at 30, its length at 24.
            if d.name == "vsock" {
                w32(m.buf + 28, (rng.below(8) as u32) << 16);
            }
            // The whole chain in slot-distinct descriptors, so a held buffer is not rewritten.
            let base = (slot % 2) * 4;
            match rng.below(4) {
                0 => m.set_desc(base, m.buf, rlen, 0, 0),
                1 => m.set_desc(base, p.scratch, wlen, F_WRITE, 0),
                2 => {
                    m.set_desc(base, m.buf, rlen, F_NEXT, base + 1);
                    m.set_desc(base + 1, m.buf + 0x800, 64, F_NEXT, base + 2);
                    m.set_desc(base + 2, p.scratch, wlen, F_WRITE, 0);
                }
                _ => {
                    m.set_desc(base, m.buf, rlen, F_NEXT, base + 1);
                    m.set_desc(base + 1, p.scratch, wlen, F_WRITE, 0);
                }
            }
            publish(m, slot, base);
            // used_event (after the avail ring's 8 entries) at an edge value.
            let ev = [
                0u16,
                1,
                0x7fff,
                0x8000,
                0xfffe,
                0xffff,
                slot,
                slot.wrapping_sub(1),
            ];
            crate::hostile_virtio::w16(m.avail() + 4 + 2 * 8, ev[rng.below(8) as usize]);
            d.notify(q as u16);
        }
        smp::delay_us(300);
        if d.l.status() & 0x40 != 0 {
            broken = true;
            break;
        }
    }
    smp::delay_us(20_000);
    for m in &p.q[..d.queues() as usize] {
        let idx = r16(m.used() + 2);
        answered += u32::from(idx);
        for e in 0..idx.min(8) {
            max_len = max_len.max(r32(m.used() + 4 + 8 * u64::from(e) + 4));
        }
    }
    d.reset();
    (answered, broken || d.l.status() & 0x40 != 0, max_len)
}

pub(crate) fn run(devs: &[Dev], p: &Pool, rng: &mut Rng) {
    crate::hostile_virtio::WITH_EVENT_IDX.store(true, core::sync::atomic::Ordering::Relaxed);
    run_all(devs, p, rng);
    crate::hostile_virtio::WITH_EVENT_IDX.store(false, core::sync::atomic::Ordering::Relaxed);
}

fn run_all(devs: &[Dev], p: &Pool, rng: &mut Rng) {
    let first_blk = devs.iter().position(|d| d.name == "blk");
    for (i, d) in devs.iter().enumerate() {
        if Some(i) == first_blk {
            continue;
        }
        let (mut answered, mut broke, mut max_len) = (0, 0, 0);
        let rounds = 20 * crate::hostile_suite::rounds();
        for _ in 0..rounds {
            // 6 requests a round: the queues hold 8, and a broken device is reset each round.
            let (a, b, l) = requests(d, p, rng, 6);
            answered += a;
            broke += u32::from(b);
            max_len = max_len.max(l);
        }
        let (st, enabled) = d.start_valid(p);
        d.reset();
        println!(
            "INFO hostile requests {}: {answered} answered, broken in {broke} of {rounds} rounds, largest used length {max_len:#x}",
            d.name
        );
        check!(
            &alloc::format!("hostile-{}-requests", d.name),
            max_len <= 0x8000 + 64 && st == 0xf && enabled == d.queues(),
            "largest used length {max_len:#x}, restart status {st:#x}, {enabled} queues"
        );
    }
}
