//! The KVM paravirtual clock (kvmclock): the guest hands KVM a `pvclock_vcpu_time_info` page
//! through MSR_KVM_SYSTEM_TIME_NEW and reads the time from it and the TSC. The VMM's pause
//! tests watch this clock across a pause.

use core::ptr::{addr_of, addr_of_mut, read_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::{fail, pass, println, smp, svc};

/// MSR_KVM_SYSTEM_TIME_NEW.
const MSR_SYSTEM_TIME: u32 = 0x4b56_4d01;
/// CPUID 0x40000001 EAX: KVM_FEATURE_CLOCKSOURCE2 (the MSR above).
const FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// `struct pvclock_vcpu_time_info`, written by KVM.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

/// Nanoseconds of kvmclock now (the pvclock algorithm: a consistent snapshot by version).
/// Meaningful only after `enable`.
pub fn read_ns() -> u64 {
    let p = addr_of!(PVCLOCK);
    loop {
        // SAFETY: `p` points at our static, which KVM updates; volatile reads of its fields.
        let (v1, ts, sys, mul, shift) = unsafe {
            (
                read_volatile(addr_of!((*p).version)),
                read_volatile(addr_of!((*p).tsc_timestamp)),
                read_volatile(addr_of!((*p).system_time)),
                read_volatile(addr_of!((*p).tsc_to_system_mul)),
                read_volatile(addr_of!((*p).tsc_shift)),
            )
        };
        let tsc = svc::rdtsc();
        fence(Ordering::Acquire);
        // SAFETY: as above.
        let v2 = unsafe { read_volatile(addr_of!((*p).version)) };
        if v1 & 1 != 0 || v1 != v2 {
            continue;
        }
        let mut delta = tsc.saturating_sub(ts);
        if shift < 0 {
            delta >>= u32::from(shift.unsigned_abs());
        } else {
            delta <<= shift as u32;
        }
        return sys.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
    }
}

/// Whether KVM offers kvmclock through MSR_KVM_SYSTEM_TIME_NEW (CPUID 0x40000001 at CPL0);
/// the leaf's EAX.
pub fn available() -> Result<(), u32> {
    let leaf = svc::cpuid_cpl0(0x4000_0001, 0);
    if leaf[0] & FEATURE_CLOCKSOURCE2 == 0 {
        Err(leaf[0])
    } else {
        Ok(())
    }
}

/// Hands KVM our pvclock page and waits (about a second at most) for its first update;
/// false if it never came.
pub fn enable() -> bool {
    // The guest is identity-mapped: the static's address is its guest physical address.
    let pa = addr_of_mut!(PVCLOCK) as u64;
    svc::wrmsr(MSR_SYSTEM_TIME, pa | 1);
    let deadline = svc::rdtsc() + 1_000_000_000;
    // SAFETY: reading our static's version field, written by KVM.
    while unsafe { read_volatile(addr_of!(PVCLOCK.version)) } == 0 {
        if svc::rdtsc() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Takes the pvclock page back from KVM.
pub fn disable() {
    svc::wrmsr(MSR_SYSTEM_TIME, 0);
}

/// Enables kvmclock and prints `KVMCLOCK <ns>` every 20 ms, for ever.
pub fn scenario_kvmclock() -> ! {
    match available() {
        Err(eax) => fail(
            "kvmclock-cpuid",
            format_args!("CPUID 0x40000001 eax={eax:#x}: no CLOCKSOURCE2"),
        ),
        Ok(()) => pass("kvmclock-cpuid"),
    }
    if !enable() {
        fail("kvmclock-enabled", format_args!("KVM never wrote the page"));
    }
    println!("READY");
    loop {
        println!("KVMCLOCK {}", read_ns());
        smp::delay_us(20_000);
    }
}
