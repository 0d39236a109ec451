//! The ACPI PM timer, found through the FADT as an OS finds it, read around a busy wait timed
//! by kvmclock: it must count at 3.579545 MHz.

use acpi::address::AddressSpace;

use crate::acpi_sys::AcpiInfo;
use crate::{check, fail, kvmclock, pass, println, smp, svc};

/// The ACPI PM timer's rate.
const PM_TIMER_HZ: u64 = 3_579_545;
/// How long the timer is watched: long enough that a tick of rounding and the tens of
/// microseconds an emulated port read may take weigh little, short enough for every boot.
const WINDOW_NS: u64 = 20_000_000;
/// How far the measured rate may stray from the nominal one, in percent. kvmclock and the
/// VMM's monotonic clock both follow the host's clock, so the true error is in parts per
/// million; the margin only keeps a noisy host from failing a correct timer, while a timer
/// that stands still or counts at another rate (a wrong unit, 24-bit confusion) still fails.
const TOLERANCE_PERCENT: u64 = 2;

fn ticks_in(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64
}

/// `acpi-pm-timer`: the FADT names a 32-bit PM timer in I/O space. `pm-timer-rate`: it
/// advances at 3.579545 MHz against kvmclock (without kvmclock: only that it advances).
pub fn check_pm_timer(a: &AcpiInfo) {
    let Some((block, ext32)) = a.pm_timer else {
        fail(
            "acpi-pm-timer",
            format_args!("no PM timer in the FADT (X_PM_TMR_BLK/PM_TMR_BLK, PM_TMR_LEN 4)"),
        );
        return;
    };
    println!(
        "INFO pm-timer space={:?} width={} address={:#x} tmr_val_ext={}",
        block.address_space, block.bit_width, block.address, ext32
    );
    let in_io = block.address_space == AddressSpace::SystemIo && block.address <= 0xfffc;
    check!(
        "acpi-pm-timer",
        in_io && block.bit_width == 32 && ext32,
        "PM timer {:?} {} bits at {:#x}, TMR_VAL_EXT {ext32}: expected a 32-bit I/O port",
        block.address_space,
        block.bit_width,
        block.address
    );
    if !in_io {
        return;
    }
    let port = block.address as u16;
    let mask: u32 = if ext32 { u32::MAX } else { 0xff_ffff };

    if let Err(eax) = kvmclock::available() {
        println!("INFO pm-timer: no kvmclock (CPUID 0x40000001 eax={eax:#x}), rate not checked");
        return check_advances(port, mask);
    }
    if !kvmclock::enable() {
        println!("INFO pm-timer: KVM never wrote the kvmclock page, rate not checked");
        return check_advances(port, mask);
    }
    // Each port read is bracketed by clock reads: [t1, t2] lies certainly between the two
    // counter reads and [t0, t3] certainly around them, however long the vCPU was away.
    let t0 = kvmclock::read_ns();
    let c0 = svc::inl(port);
    let t1 = kvmclock::read_ns();
    while kvmclock::read_ns().saturating_sub(t1) < WINDOW_NS {
        core::hint::spin_loop();
    }
    let t2 = kvmclock::read_ns();
    let c1 = svc::inl(port);
    let t3 = kvmclock::read_ns();
    kvmclock::disable();

    let ticks = u64::from(c1.wrapping_sub(c0) & mask);
    let inside = t2.saturating_sub(t1);
    let around = t3.saturating_sub(t0);
    let least = ticks_in(inside) * (100 - TOLERANCE_PERCENT) / 100;
    let most = ticks_in(around) * (100 + TOLERANCE_PERCENT) / 100 + 1;
    println!(
        "INFO pm-timer ticks={ticks} ({c0:#x} -> {c1:#x}) in {inside}..{around} ns, ~{} kHz",
        ticks * 2_000_000 / (inside + around).max(1)
    );
    check!(
        "pm-timer-rate",
        least <= ticks && ticks <= most,
        "{ticks} ticks in {inside}..{around} ns of kvmclock, expected {least}..={most} \
         (3.579545 MHz)"
    );
}

/// Without a reference clock: the counter must at least move in ~10 ms.
fn check_advances(port: u16, mask: u32) {
    let c0 = svc::inl(port);
    smp::delay_us(10_000);
    let c1 = svc::inl(port);
    check!(
        "pm-timer-rate",
        c1.wrapping_sub(c0) & mask != 0,
        "the counter stood at {c0:#x}"
    );
}
