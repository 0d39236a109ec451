//! `test=cpuhotplug`: CPU hot plug as Linux does it with the original Cloud Hypervisor's ACPI
//! mechanism. The Generic Event Device interrupts with bit 0x08 ("CPUs changed", whose `_EVT`
//! runs `\_SB_.CPUS.CSCN`); the guest walks the CPUs of `\_SB_.PRES`'s registers as `CSCN`
//! does (CSEL, then CINS/CRMV, acknowledged by writing them: `CSCN` itself ends in `Notify`,
//! which the AML interpreter cannot run, see aml.rs), starts an inserted CPU with
//! INIT-SIPI-SIPI (the APIC ID from its `Cxxx._MAT`, evaluated) and sees it run code at CPL3,
//! and for a removal has the CPU park (interrupts off, halted, as Linux's `play_dead`), then
//! evaluates its `_EJ0` and waits for its `_STA` to say it is gone. Every `_STA`, `_MAT`,
//! `_UID` and `_EJ0` is evaluated by the third-party interpreter. It runs for ever; see
//! docs/test-guest.md for the lines it prints.

use alloc::alloc::{alloc, Layout};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use crate::acpi_sys::AcpiInfo;
use crate::aml::Aml;
use crate::pres::{self, CpuDevice, Pres};
use crate::{fail, println, smp, svc};

/// GED event bit: CPUs changed.
const GED_CPU: u8 = 0x08;
/// The vector of the APs' own periodic LAPIC timer (the boot CPU's `wait_vector` has
/// `svc::TIMER_VECTOR`).
const AP_TIMER_VECTOR: u32 = svc::TIMER_VECTOR - 1;
/// 10 ms at KVM's 1 GHz APIC timer.
const AP_TIMER_TICKS: u32 = 10_000_000;
/// Each AP's CPL3 stack (from the heap, kept for the CPU's next start).
const AP_STACK: usize = 8192;
/// How long a started CPU may take to report in.
const START_TIMEOUT_MS: u64 = 5000;
/// How long a started CPU may take to beat `RUNNING_BEATS` times.
const RUNNING_TIMEOUT_US: u64 = 2_000_000;
const RUNNING_BEATS: u64 = 3;
/// How long a CPU told to go offline may take to park.
const PARK_TIMEOUT_US: u64 = 2_000_000;
/// How long an ejected CPU's CPEN may stay set.
const GONE_TIMEOUT_US: u64 = 5_000_000;

/// What an AP shares with the boot CPU, by APIC ID.
struct ApShared {
    /// Bumped by the AP each time it wakes (its timer: every 10 ms).
    heartbeat: AtomicU64,
    /// Set by the boot CPU: go offline.
    offline: AtomicU32,
    /// Set (by the monitor) once the AP is parked.
    parked: AtomicU32,
}

impl ApShared {
    const fn new() -> ApShared {
        ApShared {
            heartbeat: AtomicU64::new(0),
            offline: AtomicU32::new(0),
            parked: AtomicU32::new(0),
        }
    }
}

static AP: [ApShared; smp::MAX_CPUS] = [const { ApShared::new() }; smp::MAX_CPUS];

/// An AP's work at CPL3 (entered from the monitor once it has reported in): beat on each
/// wake-up of its 10 ms timer until told to go offline, then park for good. Nothing here
/// allocates or prints.
extern "C" fn ap_main(apic_id: u32, _index: u32) -> ! {
    let me = &AP[apic_id as usize % smp::MAX_CPUS];
    svc::lapic_enable();
    svc::lapic_timer_periodic(AP_TIMER_VECTOR, AP_TIMER_TICKS);
    loop {
        me.heartbeat.fetch_add(1, SeqCst);
        if me.offline.load(SeqCst) != 0 {
            svc::lapic_timer_stop();
            svc::park(&me.parked);
        }
        svc::wait_irq(AP_TIMER_VECTOR);
    }
}

fn us_since(t0: u64) -> u64 {
    (svc::rdtsc() - t0) / smp::TSC_PER_US
}

/// Polls `done` every millisecond for up to `timeout_us`; the microseconds it took, or None.
fn poll(timeout_us: u64, mut done: impl FnMut() -> bool) -> Option<u64> {
    let t0 = svc::rdtsc();
    loop {
        if done() {
            return Some(us_since(t0));
        }
        if us_since(t0) > timeout_us {
            return None;
        }
        smp::delay_us(1000);
    }
}

/// "0,2,3".
fn list(cpus: impl Iterator<Item = usize>) -> String {
    let mut s = String::new();
    for (i, c) in cpus.enumerate() {
        let _ = write!(s, "{}{c}", if i > 0 { "," } else { "" });
    }
    s
}

struct CpuHotplug {
    aml: Aml,
    pres: Pres,
    cpus: Vec<CpuDevice>,
    bsp: u32,
    online: Vec<bool>,
    /// Each CPU's stack top once it has one.
    stacks: Vec<u64>,
}

impl CpuHotplug {
    /// CSEL = `cpu`.
    fn select(&self, cpu: usize) {
        self.pres.csel.write(cpu as u64);
    }

    /// `Cxxx._STA`, evaluated: present (0xf) or not (0); anything else fails.
    fn present(&self, cpu: usize) -> bool {
        let path = alloc::format!("{}._STA", self.cpus[cpu].path);
        match self.aml.int(&path) {
            Ok(0xf) => true,
            Ok(0) => false,
            Ok(v) => {
                fail("cpuhotplug-sta", format_args!("{path} = {v:#x}"));
                false
            }
            Err(e) => {
                fail("cpuhotplug-sta", format_args!("{e}"));
                false
            }
        }
    }

    /// `CSCN`: every CPU being inserted or to remove, acknowledged; then handled.
    fn scan(&mut self) {
        let (mut ins, mut rmv) = (Vec::new(), Vec::new());
        for cpu in 0..self.cpus.len() {
            self.select(cpu);
            if self.pres.cins.read() != 0 {
                self.pres.cins.write(1);
                ins.push(cpu);
            }
            if self.pres.crmv.read() != 0 {
                self.pres.crmv.write(1);
                rmv.push(cpu);
            }
        }
        println!(
            "INFO cpuhotplug scan inserting={} removing={}",
            list(ins.iter().copied()),
            list(rmv.iter().copied())
        );
        for cpu in ins {
            self.add(cpu);
        }
        for cpu in rmv {
            self.remove(cpu);
        }
    }

    /// Starts `cpu` (INIT-SIPI-SIPI) to run `ap_main`; the APIC ID it reported.
    fn start(&mut self, cpu: usize) -> Result<u32, String> {
        let apic = self.cpus[cpu].apic_id;
        let shared = AP
            .get(apic as usize)
            .ok_or_else(|| alloc::format!("APIC ID {apic}: beyond the xAPIC's"))?;
        if self.stacks[cpu] == 0 {
            let layout = Layout::from_size_align(AP_STACK, 16).expect("a valid layout");
            // SAFETY: a non-zero size; the block is never freed (the CPU keeps it).
            let p = unsafe { alloc(layout) };
            if p.is_null() {
                return Err("no heap for its stack".into());
            }
            self.stacks[cpu] = p as u64 + AP_STACK as u64;
        }
        smp::set_ap_stack(apic, self.stacks[cpu]);
        shared.offline.store(0, SeqCst);
        shared.parked.store(0, SeqCst);
        let base = smp::reported() as usize;
        if !smp::start_one(apic, START_TIMEOUT_MS) {
            return Err(alloc::format!(
                "APIC ID {apic} did not report in within {START_TIMEOUT_MS} ms"
            ));
        }
        self.online[cpu] = true;
        let ids = smp::reported_ids();
        Ok(ids
            .get(base..)
            .and_then(|n| n.last().copied())
            .unwrap_or(apic))
    }

    /// Waits until `cpu` has beaten `RUNNING_BEATS` times more than `from`.
    fn running(&self, cpu: usize, from: u64) -> Result<u64, String> {
        let shared = &AP[self.cpus[cpu].apic_id as usize % smp::MAX_CPUS];
        poll(RUNNING_TIMEOUT_US, || {
            shared.heartbeat.load(SeqCst) >= from + RUNNING_BEATS
        })
        .ok_or_else(|| {
            alloc::format!(
                "heartbeat {} after about {} ms, from {from}",
                shared.heartbeat.load(SeqCst),
                RUNNING_TIMEOUT_US / 1000
            )
        })
    }

    fn add(&mut self, cpu: usize) {
        if self.online[cpu] {
            fail(
                "cpuhotplug-add",
                format_args!("cpu={cpu}: inserted, but it is online already"),
            );
            return;
        }
        let apic = self.cpus[cpu].apic_id;
        let from = AP
            .get(apic as usize)
            .map_or(0, |s| s.heartbeat.load(SeqCst));
        match self.start(cpu) {
            Ok(reported) => println!("CPUHOTPLUG ADDED cpu={cpu} apic={reported}"),
            Err(e) => {
                fail("cpuhotplug-add", format_args!("cpu={cpu}: {e}"));
                return;
            }
        }
        match self.running(cpu, from) {
            Ok(us) => {
                println!("CPUHOTPLUG RUNNING cpu={cpu}");
                println!(
                    "INFO cpuhotplug cpu={cpu} beat {RUNNING_BEATS} times in about {} ms",
                    us / 1000
                );
            }
            Err(e) => fail("cpuhotplug-running", format_args!("cpu={cpu}: {e}")),
        }
    }

    /// Takes `cpu` offline (it parks), ejects it as `_EJ0` does and waits for CPEN to clear.
    fn remove(&mut self, cpu: usize) {
        let dev = &self.cpus[cpu];
        if dev.apic_id == self.bsp {
            fail(
                "cpuhotplug-remove",
                format_args!("cpu={cpu}: the boot CPU, not ejected"),
            );
            return;
        }
        if !dev.ejectable {
            fail(
                "cpuhotplug-eject",
                format_args!("cpu={cpu}: {} has no _EJ0 or no _STA", dev.path),
            );
        }
        if self.online[cpu] {
            let apic = dev.apic_id;
            let shared = &AP[apic as usize % smp::MAX_CPUS];
            shared.offline.store(1, SeqCst);
            // Wake it now rather than at its next tick (fixed, level assert).
            svc::send_ipi(apic, 0x4000 | AP_TIMER_VECTOR);
            match poll(PARK_TIMEOUT_US, || shared.parked.load(SeqCst) != 0) {
                Some(us) => println!("INFO cpuhotplug cpu={cpu} parked after about {us} us"),
                None => fail(
                    "cpuhotplug-offline",
                    format_args!(
                        "cpu={cpu}: not parked after about {} ms (ejected anyway)",
                        PARK_TIMEOUT_US / 1000
                    ),
                ),
            }
            self.online[cpu] = false;
        }
        let ej0 = alloc::format!("{}._EJ0", self.cpus[cpu].path);
        if let Err(e) = self.aml.eval(&ej0, &[0]) {
            fail("cpuhotplug-eject", format_args!("cpu={cpu}: {e}"));
            return;
        }
        println!("CPUHOTPLUG EJECTED cpu={cpu}");
        match poll(GONE_TIMEOUT_US, || !self.present(cpu)) {
            Some(us) => {
                println!("CPUHOTPLUG GONE cpu={cpu}");
                println!(
                    "INFO cpuhotplug cpu={cpu} gone after about {} ms",
                    us / 1000
                );
            }
            None => fail(
                "cpuhotplug-gone",
                format_args!(
                    "cpu={cpu}: still present after about {} s",
                    GONE_TIMEOUT_US / 1_000_000
                ),
            ),
        }
    }
}

pub fn scenario_cpuhotplug(acpi: Option<&AcpiInfo>) {
    let Some(a) = acpi else {
        fail("cpuhotplug", format_args!("no ACPI tables"));
        return;
    };
    let Some(ged_port) = a.ged_port else {
        fail(
            "cpuhotplug",
            format_args!("no ACPI0013 device with a SystemIO OperationRegion in the DSDT"),
        );
        return;
    };
    let aml = match Aml::load(a.rsdp_addr) {
        Ok(aml) => aml,
        Err(e) => {
            fail("cpuhotplug-aml", format_args!("{e}"));
            return;
        }
    };
    let pres = match pres::find(&aml) {
        Ok(p) => p,
        Err(e) => {
            fail("cpuhotplug-pres", format_args!("{e}"));
            return;
        }
    };
    let cpus = match pres::cpus(&aml) {
        Ok(c) => c,
        Err(e) => {
            fail("cpuhotplug-cpus", format_args!("{e}"));
            return;
        }
    };
    if cpus.len() != a.cpus.len() {
        fail(
            "cpuhotplug-cpus",
            format_args!(
                "{} CPU devices in \\_SB_.CPUS, {} processors in the MADT",
                cpus.len(),
                a.cpus.len()
            ),
        );
    }
    println!(
        "INFO cpuhotplug csel={:#x} cpen={:#x}.{} cins={:#x}.{} crmv={:#x}.{} cej0={:#x}.{} ged_port={ged_port:#x}",
        pres.csel.addr,
        pres.cpen.addr,
        pres.cpen.bit,
        pres.cins.addr,
        pres.cins.bit,
        pres.crmv.addr,
        pres.crmv.bit,
        pres.cej0.addr,
        pres.cej0.bit
    );
    crate::route_ged_irq();
    let bsp = svc::lapic_enable();
    let max = cpus.len();
    let mut hp = CpuHotplug {
        aml,
        pres,
        cpus,
        bsp,
        online: alloc::vec![false; max],
        stacks: alloc::vec![0; max],
    };
    smp::set_ap_entry(ap_main);
    // The CPUs the MADT enables are there from the start: bring them up as an OS does at boot.
    for cpu in 0..max {
        let apic = hp.cpus[cpu].apic_id;
        let enabled = a.cpus.iter().any(|c| c.apic_id == apic && c.enabled);
        let present = hp.present(cpu);
        if present != enabled {
            fail(
                "cpuhotplug-cpen",
                format_args!(
                    "cpu={cpu}: _STA present {present}, but enabled in the MADT: {enabled}"
                ),
            );
        }
        if apic == bsp {
            hp.online[cpu] = true;
        } else if enabled {
            let from = AP
                .get(apic as usize)
                .map_or(0, |s| s.heartbeat.load(SeqCst));
            if let Err(e) = hp.start(cpu).and_then(|_| hp.running(cpu, from)) {
                fail("cpuhotplug-boot", format_args!("cpu={cpu}: {e}"));
            }
        }
    }
    let online = (0..max).filter(|&c| hp.online[c]);
    println!(
        "INFO cpuhotplug pres={:#x} max={max} online={}",
        hp.pres.csel.region,
        list(online)
    );
    println!("READY");
    crate::ged_loop(ged_port, "cpuhotplug-irq", |bits| {
        if bits & !GED_CPU != 0 {
            println!("CPUHOTPLUG EVENT bits={bits:#x}");
        }
        if bits & GED_CPU != 0 {
            hp.scan();
        }
    })
}
