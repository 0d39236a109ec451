//! Application processor start-up: INIT/SIPI through the monitor, with the
//! real-mode trampoline (from monitor.S) copied to `AP_TRAMPOLINE`.

use alloc::vec::Vec;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

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
    static mut ap_user_entry: u64;
    static mut ap_user_stacks: [u64; MAX_CPUS];
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
        // Only this start's reports: a CPU started again (hot-plugged after its removal) has
        // an older one too.
        let all = reported_ids();
        let seen = all.get(base as usize..).unwrap_or_default();
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

/// Starts the AP with APIC ID `id` alone and waits up to `timeout_ms` for it to report in;
/// true when it did.
pub fn start_one(id: u32, timeout_ms: u64) -> bool {
    let base = reported() as usize;
    start_aps(&[id], timeout_ms);
    reported_ids()
        .get(base..)
        .is_some_and(|new| new.contains(&id))
}

/// From now on an AP that reports in goes on at CPL3 in `entry` (APIC ID, index), on the stack
/// `set_ap_stack` gave its APIC ID, instead of parking in the monitor.
pub fn set_ap_entry(entry: extern "C" fn(u32, u32) -> !) {
    // SAFETY: a monitor variable that APs read only when they start; an aligned 8-byte store.
    unsafe { write_volatile(addr_of_mut!(ap_user_entry), entry as usize as u64) }
}

/// The top of the CPL3 stack of the AP with APIC ID `id` (16-aligned; 0: it parks).
pub fn set_ap_stack(id: u32, top: u64) {
    let i = id as usize;
    if i < MAX_CPUS {
        // SAFETY: an index within the monitor's table, which that AP reads when it starts.
        unsafe { write_volatile(addr_of_mut!(ap_user_stacks[i]), top) }
    }
}
