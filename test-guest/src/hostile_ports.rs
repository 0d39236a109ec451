//! `test=hostile-suite`, part 3: the legacy ports. Random writes of every size to the UART's
//! registers, the CMOS index and data ports (RTC status registers included), the i8042, the
//! ACPI sleep/reset register, the PM timer, the GED, the POST port and ports nothing decodes.
//! The few values that would end the run by design (i8042 pulse-reset commands, the ACPI reset
//! value, SLP_EN) are left out. Afterwards: the UART's scratch register and CMOS NVRAM keep
//! what is written, the RTC still reads a valid time, and the PM timer still counts.

use crate::hostile_pci::Rng;
use crate::{check, cmos, fail, pass, println, smp, svc};

fn out(port: u16, size: u64, v: u64) {
    match size {
        1 => svc::outb(port, v as u8),
        2 => svc::outw(port, v as u16),
        _ => svc::outl(port, v as u32),
    }
}

fn inp(port: u16, size: u64) -> u64 {
    match size {
        1 => u64::from(svc::inb(port)),
        2 => u64::from(svc::inw(port)),
        _ => u64::from(svc::inl(port)),
    }
}

/// Ports some device decodes (first, last): random writes elsewhere must reach nothing. A
/// write that starts up to 3 bytes before one of them counts as touching it. The 8259s and
/// their edge/level registers are KVM's in-kernel irqchip (a read of a command port gives its
/// IRR, not all ones).
const DECODED: [(u16, u16); 11] = [
    (0x20, 0x21),
    (0xa0, 0xa1),
    (0x4d0, 0x4d1),
    (0x60, 0x64),
    (0x70, 0x71),
    (0x80, 0x80),
    (0x3f8, 0x3ff),
    (0x600, 0x60b),
    (0x620, 0x620),
    (0xcf8, 0xcff),
    // The hotplug controllers are MMIO; nothing else here.
    (0, 0),
];

fn decoded(port: u16) -> bool {
    DECODED
        .iter()
        .any(|&(a, b)| b != 0 && port.saturating_add(3) >= a && port <= b)
}

fn uart(rng: &mut Rng) {
    let (ier, lcr, mcr) = (svc::inb(0x3f9), svc::inb(0x3fb), svc::inb(0x3fc));
    for _ in 0..200 {
        // Never the transmit register with DLAB clear: that byte would be printed.
        let port = 0x3f9 + rng.below(7) as u16;
        let size = rng.size();
        out(port, size, rng.next());
        let _ = inp(0x3f8 + rng.below(8) as u16, size);
    }
    svc::outb(0x3fb, lcr);
    svc::outb(0x3f9, ier);
    svc::outb(0x3fc, mcr);
    svc::outb(0x3fa, 0);
    svc::outb(0x3ff, 0xa5);
    let scratch = svc::inb(0x3ff);
    let regs = (svc::inb(0x3f9), svc::inb(0x3fb), svc::inb(0x3fc));
    check!(
        "hostile-ports-uart",
        scratch == 0xa5 && regs == (ier, lcr, mcr),
        "scratch {scratch:#x}, IER/LCR/MCR {regs:x?} (were {ier:#x} {lcr:#x} {mcr:#x})"
    );
}

fn cmos_abuse(rng: &mut Rng) {
    let (a, b) = (cmos::read(0x0a), cmos::read(0x0b));
    for _ in 0..300 {
        let index = rng.next() as u8;
        svc::outb(0x70, index);
        if rng.below(4) != 0 {
            svc::outb(0x71, rng.next() as u8);
        } else {
            let _ = svc::inb(0x71);
        }
        // Wider accesses, and to the port pair as a whole.
        out(0x70, [2, 4][rng.below(2) as usize], rng.next());
        let _ = inp(0x70, rng.size());
    }
    // Every mode status B can select is read through once (12-hour, binary, both).
    for mode in [0x00, 0x02, 0x04, 0x06, 0xff] {
        cmos::write(0x0b, mode);
        for reg in [0, 2, 4, 6, 7, 8, 9, 0x32] {
            let _ = cmos::read(reg);
        }
    }
    cmos::write(0x0a, a);
    cmos::write(0x0b, b);
    for i in 0x40..0x80u8 {
        cmos::write(i, i ^ 0x5a);
    }
    let nvram = (0x40..0x80u8).all(|i| cmos::read(i) == i ^ 0x5a);
    let time = cmos::read_time();
    check!(
        "hostile-ports-cmos",
        nvram && time.is_some(),
        "NVRAM kept: {nvram}, time {time:?}"
    );
}

fn pm_timer() -> u32 {
    svc::inl(0x608)
}

fn platform(rng: &mut Rng) {
    for _ in 0..200 {
        // i8042: anything but the pulse-output commands (0xf0-0xff, 0xfe resets).
        let v = rng.next() as u8;
        if v < 0xf0 {
            svc::outb(0x64, v);
        }
        out(0x60, rng.size(), rng.next());
        let _ = svc::inb(0x64);
        let _ = svc::inb(0x60);
        // ACPI sleep/reset: anything but the reset value and SLP_EN.
        let v = rng.next();
        let first = v as u8;
        if first != 1 && first & 0x20 == 0 {
            out(0x600, rng.size(), v);
        }
        let _ = inp(0x600, rng.size());
        // PM timer (read-only), GED (read clears), POST.
        out(0x608 + rng.below(4) as u16, rng.size(), rng.next());
        let _ = inp(0x608 + rng.below(4) as u16, rng.size());
        out(0x620, rng.size(), rng.next());
        let _ = inp(0x620, rng.size());
        out(0x80, rng.size(), rng.next());
    }
    let t0 = pm_timer();
    smp::delay_us(2000);
    let t1 = pm_timer();
    // 2 ms is about 7159 ticks at 3.579545 MHz.
    let d = t1.wrapping_sub(t0);
    check!(
        "hostile-ports-acpi-i8042",
        (3000..1_000_000).contains(&d),
        "the PM timer moved {d} ticks in 2 ms"
    );
}

fn unassigned(rng: &mut Rng) {
    let (mut n, mut not_ones) = (0, 0);
    let mut first = None;
    while n < 400 {
        let port = rng.next() as u16;
        if decoded(port) {
            continue;
        }
        let size = rng.size();
        out(port, size, rng.next());
        let ones = (1u64 << (8 * size)) - 1;
        let v = inp(port, size);
        if v != ones {
            not_ones += 1;
            first.get_or_insert((port, size, v));
        }
        n += 1;
    }
    // Nothing decodes them: reads float high, as on a PC.
    check!(
        "hostile-ports-unassigned",
        not_ones == 0,
        "{not_ones} of {n} reads of unassigned ports were not all ones (first: port {:#x?})",
        first
    );
}

pub(crate) fn run(rng: &mut Rng) {
    // Mask both 8259s first, as an OS does: the random UART writes enable its interrupts, and
    // an unprogrammed PIC would hand IRQ 4 to this CPU as vector 4.
    svc::outb(0x21, 0xff);
    svc::outb(0xa1, 0xff);
    uart(rng);
    cmos_abuse(rng);
    platform(rng);
    unassigned(rng);
    println!("INFO hostile ports done");
}
