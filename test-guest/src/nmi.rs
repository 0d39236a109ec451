//! `test=nmi`: the VMM's `vm.nmi` reaches every CPU. The APs the MADT lists are started (they
//! park in the monitor, where an NMI wakes them and they halt again); the monitor counts each
//! NMI for the CPU that took it. The guest prints `READY cpus=<n>`, then a line
//! `NMI counts=[..]` (by CPU index, the BSP first) each time the counts change, until every
//! CPU has taken `nmi_rounds=` NMIs (default 1) or 60 s pass. It passes when each CPU took
//! exactly that many, none twice for one round (checked 100 ms after the last).

use alloc::vec::Vec;

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::{check, fail, parse_u64, pass, println, smp, svc};

const WAIT_S: u64 = 60;

pub fn scenario_nmi(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let Some(a) = acpi else {
        fail("nmi", format_args!("no ACPI tables: the CPUs are unknown"));
        return;
    };
    let bsp = svc::lapic_enable();
    let targets: Vec<u32> = a
        .cpus
        .iter()
        .filter(|c| c.enabled && c.apic_id != bsp && c.apic_id < 255)
        .map(|c| c.apic_id)
        .collect();
    let up = if targets.is_empty() {
        0
    } else {
        smp::start_aps(&targets, 5000).len() as u32
    };
    check!(
        "nmi-cpus-up",
        up as usize == targets.len(),
        "{up} of {} APs reported in",
        targets.len()
    );
    let cpus = 1 + up;
    let rounds = boot.arg("nmi_rounds").and_then(parse_u64).unwrap_or(1);
    println!("READY cpus={cpus}");
    let counts = || (0..cpus).map(svc::nmi_count).collect::<Vec<u64>>();
    let mut seen = counts();
    let t0 = svc::rdtsc();
    let waited_s = || (svc::rdtsc() - t0) / smp::TSC_PER_US / 1_000_000;
    while seen.iter().any(|&n| n < rounds) && waited_s() < WAIT_S {
        smp::delay_us(1000);
        let now = counts();
        if now != seen {
            println!("NMI counts={now:?}");
            seen = now;
        }
    }
    smp::delay_us(100_000);
    let last = counts();
    check!(
        "nmi",
        last.iter().all(|&n| n == rounds),
        "NMIs taken by CPU {last:?}, expected {rounds} on each of {cpus}"
    );
}
