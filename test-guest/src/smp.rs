//! Application processor start-up: INIT/SIPI through the monitor, with the
//! real-mode trampoline (from monitor.S) copied to `AP_TRAMPOLINE`.

use alloc::vec::Vec;
use core::ptr::{addr_of, read_volatile};

use crate::svc;

/// Where the trampoline is copied; SIPI vector = page number (0x40).
pub const AP_TRAMPOLINE: u64 = 0x40000;
/// Slots the monitor keeps for reporting CPUs (must match MAX_CPUS in monitor.S).
pub const MAX_CPUS: usize = 256;

const ICR_INIT: u32 = 0x4500; // delivery mode INIT, level assert
const ICR_SIPI: u32 = 0x4600; // delivery mode start-up, level assert

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_reported: u32;
    static ap_apic_ids: [u32; MAX_CPUS];
}

/// Rough TSC rate used for delays and time-outs (lower bounds on faster parts).
pub const TSC_PER_US: u64 = 3000;

pub fn delay_us(us: u64) {
    let end = svc::rdtsc() + us * TSC_PER_US;
    while svc::rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Number of APs that have reported in.
pub fn reported() -> u32 {
    // SAFETY: a 4-byte aligned monitor variable, written by APs with locked instructions.
    unsafe { read_volatile(addr_of!(ap_reported)) }
}

/// APIC IDs written by the APs that reported in.
pub fn reported_ids() -> Vec<u32> {
    let n = (reported() as usize).min(MAX_CPUS - 1);
    (1..=n)
        .map(|i| {
            // SAFETY: index within the monitor's array; each slot is written before the
            // count is incremented (x86 stores are ordered).
            unsafe { read_volatile(addr_of!(ap_apic_ids[i])) }
        })
        .collect()
}

/// Starts every AP in `targets` (APIC IDs) and waits up to `timeout_ms` for all of
/// them to report. Returns the APIC IDs that reported.
pub fn start_aps(targets: &[u32], timeout_ms: u64) -> Vec<u32> {
    // SAFETY: the trampoline symbols delimit a byte range in the image; the target page
    // is free low RAM by the platform contract (the VMM uses 0x500-0xbfff, 0x20000-0x20fff
    // and 0x9fc00 and up).
    unsafe {
        let start = addr_of!(ap_trampoline_start);
        let len = addr_of!(ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE as *mut u8, len);
    }
    let vector = (AP_TRAMPOLINE >> 12) as u32;
    let base = reported();
    let want = base + targets.len() as u32;
    for &id in targets {
        svc::send_ipi(id, ICR_INIT);
    }
    delay_us(200);
    for &id in targets {
        svc::send_ipi(id, ICR_SIPI | vector);
    }
    // Second SIPI (as the MP start-up sequence asks) to those that have not reported yet.
    let t0 = svc::rdtsc();
    while reported() < want && svc::rdtsc() - t0 < 1000 * TSC_PER_US {
        core::hint::spin_loop();
    }
    if reported() < want {
        let seen = reported_ids();
        for &id in targets.iter().filter(|id| !seen.contains(id)) {
            svc::send_ipi(id, ICR_SIPI | vector);
        }
    }
    let t0 = svc::rdtsc();
    while reported() < want && svc::rdtsc() - t0 < timeout_ms * 1000 * TSC_PER_US {
        core::hint::spin_loop();
    }
    reported_ids()
}
