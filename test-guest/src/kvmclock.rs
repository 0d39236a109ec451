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
fn read_ns() -> u64 {
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

/// Enables kvmclock and prints `KVMCLOCK <ns>` every 20 ms, for ever.
pub fn scenario_kvmclock() -> ! {
    let leaf = svc::cpuid_cpl0(0x4000_0001, 0);
    if leaf[0] & FEATURE_CLOCKSOURCE2 == 0 {
        fail(
            "kvmclock-cpuid",
            format_args!("CPUID 0x40000001 eax={:#x}: no CLOCKSOURCE2", leaf[0]),
        );
    } else {
        pass("kvmclock-cpuid");
    }
    // The guest is identity-mapped: the static's address is its guest physical address.
    let pa = addr_of_mut!(PVCLOCK) as u64;
    svc::wrmsr(MSR_SYSTEM_TIME, pa | 1);
    let deadline = svc::rdtsc() + 1_000_000_000;
    // SAFETY: reading our static's version field, written by KVM.
    while unsafe { read_volatile(addr_of!(PVCLOCK.version)) } == 0 {
        if svc::rdtsc() > deadline {
            fail("kvmclock-enabled", format_args!("KVM never wrote the page"));
            break;
        }
        core::hint::spin_loop();
    }
    println!("READY");
    loop {
        println!("KVMCLOCK {}", read_ns());
        smp::delay_us(20_000);
    }
}
