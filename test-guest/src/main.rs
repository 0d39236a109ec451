//! test-guest: a tiny freestanding guest for the VMM's integration tests.
//!
//! `monitor.S` is a minimal CPL0 monitor (boot entries, page tables, GDT/TSS/IDT,
//! AP start-up, `ud2` services). Everything in Rust runs at CPL3 and reaches the
//! hardware through the monitor's services (port I/O) or directly (MMIO, RAM).
//! See docs/test-guest.md for the scenarios and the lines printed.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi_memory;
mod acpi_sys;
mod aml;
mod balloon;
mod blk_rate;
mod blk_reset;
mod blk_resize;
mod bootinfo;
mod busy;
mod busy_net;
mod cmos;
mod cpu_hotplug;
mod debugcon;
mod faults;
mod fs;
mod fs_reconnect;
mod heap;
mod hostile;
mod hostile_lifecycle;
mod hostile_pci;
mod hostile_ports;
mod hostile_requests;
mod hostile_suite;
mod hostile_virtio;
mod hotplug;
mod iommu;
mod kvmclock;
mod mem;
mod mem_zones;
mod msix;
mod net;
mod nmi;
mod numa;
mod paging;
mod phpr;
mod pmem;
mod pmtimer;
mod pres;
mod pvpanic;
mod rawq;
mod segments;
mod smbios;
mod smp;
mod svc;
mod tpm;
mod virtio;
mod virtio_mem;
mod virtio_rtc;
mod vsock;
mod vsock_event;
mod watchdog;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use acpi_sys::AcpiInfo;
use bootinfo::BootInfo;

core::arch::global_asm!(include_str!("monitor.S"), options(att_syntax));

// ---------------------------------------------------------------------------
// Runtime support: panic, personality (the allocator is in heap.rs).

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("FAIL panic: {}", info);
    println!(
        "SUMMARY passed={} failed={}",
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed) + 1
    );
    svc::outb(0x600, 0x34);
    loop {
        svc::hlt();
    }
}

/// The precompiled `core` refers to it even with `panic = "abort"`.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// The precompiled `alloc`'s landing pads call it (they free what unwinding drops, now that
/// `dealloc` can free); with `panic = "abort"` nothing unwinds, so it is never reached.
#[allow(non_snake_case)]
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    loop {
        svc::hlt();
    }
}

// ---------------------------------------------------------------------------
// Check bookkeeping.

static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

fn pass(name: &str) {
    PASSED.fetch_add(1, Ordering::Relaxed);
    println!("PASS {name}");
}

fn fail(name: &str, why: core::fmt::Arguments) {
    FAILED.fetch_add(1, Ordering::Relaxed);
    println!("FAIL {name}: {why}");
}

#[macro_export]
macro_rules! check {
    ($name:expr, $cond:expr, $($why:tt)*) => {
        if $cond { pass($name) } else { fail($name, format_args!($($why)*)) }
    };
}

fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// The largest 64-bit PCI window mapped whole (ours is at most 64 GiB less the RAM above 4 GiB).
const MAP_WHOLE_MMIO64: u64 = 256 << 30;

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x").trim_start_matches("0X"), 16).ok()
}

/// Prints the summary and powers off (through ACPI if possible).
fn finish(acpi: Option<&AcpiInfo>) -> ! {
    summary();
    let why = acpi_sys::power_off(acpi);
    // The VMM may take a moment to stop the vCPUs: only then is it a failure.
    smp::delay_us(1_000_000);
    // Still running: the ACPI way failed or was ignored. Report it (with a second,
    // final summary line) and fall back to the platform's port directly.
    fail(
        "acpi-poweroff",
        format_args!("{why}; falling back to port 0x600"),
    );
    summary();
    svc::outb(0x600, 0x34);
    loop {
        svc::hlt();
    }
}

fn summary() {
    println!(
        "SUMMARY passed={} failed={}",
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------

/// Entered at CPL3 from the monitor (`user_start`), .bss already zeroed.
#[no_mangle]
extern "C" fn guest_main(protocol: u32, info: u64) -> ! {
    // SAFETY: `protocol`/`info` are what the monitor recorded at the boot entry.
    let boot = match unsafe { bootinfo::parse(protocol, info) } {
        Ok(b) => b,
        Err(e) => {
            fail("boot-info", format_args!("{e}"));
            summary();
            svc::outb(0x600, 0x34);
            loop {
                svc::hlt();
            }
        }
    };
    println!(
        "test-guest: protocol={} cmdline=\"{}\"",
        boot.protocol_name(),
        boot.cmdline
    );
    let acpi = match acpi_sys::discover(boot.rsdp) {
        Ok(a) => Some(a),
        Err(e) => {
            fail("acpi-tables", format_args!("{e}"));
            None
        }
    };
    // BARs may lie in the 64-bit PCI window: map it before any scenario touches a device. A
    // window too large for the page-table pool (the original's spans tens of TiB) gets only
    // the BARs that bus 0's functions have in it now (devices hot-added later are not mapped).
    if let Some(w) = acpi.as_ref().and_then(|a| a.pci_windows.mmio64) {
        let mapped = if w.size <= MAP_WHOLE_MMIO64 {
            paging::map_uncached(w.start, w.size).map(|_| ())
        } else {
            virtio::map_bars_in((w.start, w.size)).map(|n| {
                println!(
                    "INFO mmio64 {:#x}+{:#x}: mapped its {n} BARs",
                    w.start, w.size
                )
            })
        };
        if let Err(e) = mapped {
            fail(
                "paging-mmio64",
                format_args!("{:#x}+{:#x}: {e:?}", w.start, w.size),
            );
        }
    }
    let scenario = boot.arg("test").unwrap_or("boot");
    match scenario {
        "boot" => scenario_boot(&boot, acpi.as_ref()),
        "reboot" => scenario_reboot(acpi.as_ref(), 0x50, false),
        "i8042-reset" => scenario_reboot(acpi.as_ref(), 0x51, true),
        "rtc" => scenario_rtc(&boot),
        "echo" => scenario_echo(),
        "wait" => scenario_wait(),
        "tick" => scenario_tick(),
        "busy" => busy::scenario_busy(&boot, acpi.as_ref()),
        "kvmclock" => kvmclock::scenario_kvmclock(),
        "power-button" => scenario_power_button(acpi.as_ref()),
        "fault" => scenario_fault(),
        "pci" => virtio::scenario_pci(&boot, acpi.as_ref()),
        "segments" => segments::scenario_segments(&boot, acpi.as_ref()),
        "virtio-rtc" => virtio_rtc::scenario_virtio_rtc(),
        "rng" => virtio::scenario_rng(),
        "blk" => virtio::scenario_blk(&boot),
        "blk-bench" => virtio::scenario_blk_bench(),
        "blk-rate" => blk_rate::scenario_blk_rate(&boot),
        "blk-reset" => blk_reset::scenario_blk_reset(&boot),
        "blk-resize" => blk_resize::scenario_blk_resize(),
        "console" => virtio::scenario_console(),
        "console-echo" => virtio::scenario_console_echo(),
        "console-size" => msix::scenario_console_size(&boot),
        "msix" => msix::scenario_msix(),
        "hostile" => hostile::scenario_hostile(),
        "hostile-suite" => hostile_suite::scenario_hostile_suite(&boot, acpi.as_ref()),
        "net" => net::scenario_net(&boot),
        "net-bench" => net::scenario_net_bench(&boot),
        "net-mq" => net::scenario_net_mq(&boot),
        "nmi" => nmi::scenario_nmi(&boot, acpi.as_ref()),
        "hotplug" => hotplug::scenario_hotplug(&boot, acpi.as_ref()),
        "cpuhotplug" => cpu_hotplug::scenario_cpuhotplug(acpi.as_ref()),
        "balloon" => balloon::scenario_balloon(&boot),
        "watchdog" => watchdog::scenario_watchdog(&boot),
        "virtiomem" => virtio_mem::scenario_virtiomem(&boot),
        "acpimem" => acpi_memory::scenario_acpimem(&boot, acpi.as_ref()),
        "memzones" => mem_zones::scenario_memzones(&boot),
        "vsock" => vsock::scenario_vsock(&boot),
        "pvpanic" => pvpanic::scenario_pvpanic(&boot),
        "debugcon" => debugcon::scenario_debugcon(&boot),
        "pmem" => pmem::scenario_pmem(),
        "fs" => fs::scenario_fs(&boot),
        "tpm" => tpm::scenario_tpm(&boot, acpi.as_ref()),
        "iommu" => iommu::scenario_iommu(&boot),
        "blkfault" => faults::scenario_blkfault(&boot),
        "netfault" => faults::scenario_netfault(&boot),
        other => fail("scenario", format_args!("unknown test={other}")),
    }
    // `end=wait`: after the summary the guest halts for good instead of powering off, so a
    // test can still look at the running VM (its device tree) once the checks are done.
    match boot.arg("end") {
        Some("wait") => {
            summary();
            loop {
                svc::hlt();
            }
        }
        None => {}
        Some(other) => fail("end", format_args!("unknown end={other} (only end=wait)")),
    }
    finish(acpi.as_ref())
}

/// The SMBIOS entry point and tables, with the original's default identity: BIOS vendor
/// "cloud-hypervisor" version "0", system "Cloud Hypervisor" / "cloud-hypervisor", and no
/// serial number and a nil UUID unless `smbios_serial=` / `smbios_uuid=` say what
/// `--platform` gave. Prints `SMBIOS serial=… uuid=… oem=[…]` (type 1 and type 11).
fn check_smbios(boot: &BootInfo) {
    let mut s = match smbios::find_entry() {
        Ok(s) => s,
        Err(e) => {
            fail("smbios-entry", format_args!("{e}"));
            return;
        }
    };
    let (major, minor, rev) = s.version;
    println!(
        "INFO smbios entry={:#x} version={major}.{minor}.{rev} table={:#x}+{:#x}",
        s.entry_addr, s.table_addr, s.table_max
    );
    pass("smbios-entry");
    if let Err(e) = smbios::walk(&mut s) {
        fail("smbios-tables", format_args!("{e}"));
        return;
    }
    let kinds: Vec<u8> = s.structures.iter().map(|x| x.kind).collect();
    println!("INFO smbios types={kinds:?}");
    pass("smbios-tables");
    let find = |kind: u8| s.structures.iter().find(|x| x.kind == kind);
    match find(0) {
        Some(b) => check!(
            "smbios-bios",
            b.string(4) == Some("cloud-hypervisor")
                && b.string(5) == Some("0")
                && b.formatted.get(0x13).is_some_and(|x| x & 0x10 != 0),
            "vendor {:?} version {:?}, or not marked a virtual machine",
            b.string(4),
            b.string(5)
        ),
        None => fail("smbios-bios", format_args!("no type 0 structure")),
    }
    match find(1) {
        Some(sys) if sys.formatted.len() >= 0x19 => {
            let uuid = smbios::uuid_text(&sys.formatted[8..24]);
            let (manufacturer, product, serial) = (sys.string(4), sys.string(5), sys.string(7));
            println!(
                "INFO smbios system manufacturer={manufacturer:?} product={product:?} \
                 serial={serial:?} uuid={uuid}"
            );
            let oem: Vec<&str> = find(11)
                .map(|o| o.strings.iter().map(String::as_str).collect())
                .unwrap_or_default();
            println!(
                "SMBIOS serial={} uuid={uuid} oem=[{}]",
                serial.unwrap_or(""),
                oem.join(",")
            );
            let want_serial = boot.arg("smbios_serial");
            let want_uuid = boot
                .arg("smbios_uuid")
                .unwrap_or("00000000-0000-0000-0000-000000000000");
            check!(
                "smbios-system",
                manufacturer == Some("Cloud Hypervisor")
                    && product == Some("cloud-hypervisor")
                    && serial == want_serial
                    && uuid.eq_ignore_ascii_case(want_uuid),
                "manufacturer {manufacturer:?} product {product:?} serial {serial:?} uuid \
                 {uuid}, want serial {want_serial:?} uuid {want_uuid}"
            );
        }
        _ => fail("smbios-system", format_args!("no type 1 structure")),
    }
}

fn scenario_boot(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    // Protocol.
    let proto = boot.protocol_name();
    let name = alloc::format!("boot-protocol {proto}");
    match boot.arg("expect_protocol") {
        Some(want) if want != proto => fail(&name, format_args!("expected {want}")),
        _ => pass(&name),
    }

    // Memory map.
    let total = boot.total_ram();
    let mut line = String::new();
    for r in &boot.memmap {
        use core::fmt::Write;
        let _ = write!(line, " [{:#x}+{:#x} t{}]", r.addr, r.size, r.kind);
    }
    println!(
        "INFO memmap entries={} ram={:#x}{}",
        boot.memmap.len(),
        total,
        line
    );
    let low_ok =
        boot.ram_between(0, 0x9_fc00) > 0 && boot.ram_between(0x10_0000, 0x20_0000) == 0x10_0000;
    check!("memory-map", low_ok, "no RAM below 640 KiB or at 1 MiB");
    if let Some(want) = boot.arg("expect_mem").and_then(parse_u64) {
        check!(
            "memory-size",
            total <= want && total + (1 << 20) >= want,
            "RAM in the map {total:#x}, expected {want:#x} (within 1 MiB below)"
        );
    }

    // Command line.
    if let Some(tok) = boot.arg("expect_cmdline_token") {
        check!(
            "cmdline",
            boot.has_token(tok),
            "token {tok:?} not in {:?}",
            boot.cmdline
        );
    }

    // Initramfs.
    if let Some(want) = boot.arg("expect_initrd_size").and_then(parse_u64) {
        match boot.initrd {
            Some((addr, size)) => {
                println!("INFO initrd addr={addr:#x} size={size:#x}");
                check!("initrd-size", size == want, "size {size}, expected {want}");
                if let Some(want_sum) = boot.arg("expect_initrd_sum").and_then(parse_hex) {
                    // SAFETY: the VMM placed the initramfs in RAM at [addr, addr + size).
                    let sum = unsafe { bootinfo::fnv1a(addr, size) };
                    check!(
                        "initrd-checksum",
                        u64::from(sum) == want_sum,
                        "fnv1a {sum:08x}, expected {want_sum:08x}"
                    );
                }
            }
            None => fail("initrd-size", format_args!("no initramfs handed over")),
        }
    }

    check_smbios(boot);

    // ACPI.
    let Some(a) = acpi else {
        fail(
            "acpi",
            format_args!("no ACPI tables, skipping ACPI and SMP checks"),
        );
        return;
    };
    let sigs: Vec<&str> = a
        .signatures
        .iter()
        .map(|s| core::str::from_utf8(s).unwrap_or("????"))
        .collect();
    println!(
        "INFO acpi rsdp={:#x} revision={} tables={:?}",
        a.rsdp_addr, a.revision, sigs
    );
    check!(
        "acpi-rsdp",
        a.rsdp_addr != 0,
        "RSDP found only by searching the BIOS area"
    );
    check!(
        "acpi-xsdt",
        a.revision >= 2,
        "RSDP revision {} (no XSDT)",
        a.revision
    );
    check!("acpi-fadt", a.has_fadt, "no FACP table");
    check!(
        "acpi-hw-reduced",
        a.hw_reduced,
        "FADT HW_REDUCED_ACPI flag not set"
    );
    check!(
        "acpi-sleep-control",
        a.sleep_control.is_some(),
        "FADT SLEEP_CONTROL_REG missing"
    );
    check!(
        "acpi-reset-reg",
        a.reset_reg.is_some() && a.reset_supported,
        "FADT RESET_REG missing or not supported"
    );
    check!("acpi-dsdt", a.dsdt.is_some(), "no DSDT");
    match a.slp_typ_s5 {
        Some(t) => {
            println!("INFO acpi s5 slp_typ={t}");
            pass("acpi-s5");
        }
        None => fail("acpi-s5", format_args!("no \\_S5_ package in the DSDT")),
    }
    // Opt-in: the interpreter's namespace takes heap pages that would count in the footprint
    // benchmark, which boots this scenario (scripts/bench).
    if boot.arg("aml") == Some("1") {
        aml::check_namespace(a);
    }
    check!(
        "acpi-madt",
        a.has_madt && !a.cpus.is_empty(),
        "no MADT or no CPUs in it"
    );
    pmtimer::check_pm_timer(a);

    // SMP.
    let enabled: Vec<u32> = a
        .cpus
        .iter()
        .filter(|c| c.enabled)
        .map(|c| c.apic_id)
        .collect();
    let bsp = svc::lapic_enable();
    println!(
        "INFO cpus madt={} enabled={} bsp_apic_id={} ids={:?}",
        a.cpus.len(),
        enabled.len(),
        bsp,
        enabled
    );
    if let Some(want) = boot.arg("expect_cpus").and_then(parse_u64) {
        check!(
            "madt-cpus",
            enabled.len() as u64 == want,
            "{} enabled CPUs in the MADT, expected {want}",
            enabled.len()
        );
    }
    check!(
        "smp-bsp-in-madt",
        enabled.contains(&bsp),
        "BSP APIC ID {bsp} not in the MADT"
    );
    let targets: Vec<u32> = enabled
        .iter()
        .copied()
        .filter(|&id| id != bsp && id < 255)
        .collect();
    let t0 = svc::rdtsc();
    let up = if targets.is_empty() {
        Vec::new()
    } else {
        smp::start_aps(&targets, 5000)
    };
    let us = (svc::rdtsc() - t0) / smp::TSC_PER_US;
    let missing: Vec<u32> = targets
        .iter()
        .copied()
        .filter(|id| !up.contains(id))
        .collect();
    println!(
        "INFO smp started={} reported={:?} approx_us={}",
        targets.len(),
        up,
        us
    );
    check!(
        "smp",
        missing.is_empty(),
        "APs {missing:?} did not report in"
    );
    if let Some(want) = boot.arg("expect_cpus").and_then(parse_u64) {
        let online = 1 + up.len() as u64;
        check!(
            "smp-cpus",
            online == want,
            "{online} CPUs online, expected {want}"
        );
    }
}

/// `reboot` (FADT reset, NVRAM byte 0x50) and `i8042-reset` (port 0x64, byte 0x51).
fn scenario_reboot(acpi: Option<&AcpiInfo>, nvram: u8, i8042: bool) {
    match cmos::read(nvram) {
        0 => {
            println!("REBOOT 1");
            cmos::write(nvram, 0xa5);
            if i8042 {
                svc::outb(0x64, 0xfe);
                smp::delay_us(1_000_000);
                fail(
                    "reset",
                    format_args!("i8042 reset (0xfe to port 0x64) did not reset"),
                );
            } else {
                let why = acpi_sys::reset(acpi);
                smp::delay_us(1_000_000);
                fail("reset", format_args!("{why}"));
            }
            cmos::write(nvram, 0);
        }
        0xa5 => {
            cmos::write(nvram, 0);
            check!(
                "reboot-survived-nvram",
                cmos::read(nvram) == 0,
                "NVRAM byte {nvram:#x} not writable"
            );
        }
        v => fail(
            "reboot-survived-nvram",
            format_args!("NVRAM byte {nvram:#x} = {v:#x}, expected 0 or 0xa5"),
        ),
    }
}

fn scenario_rtc(boot: &BootInfo) {
    match cmos::read_time() {
        Some(t) => {
            println!(
                "INFO rtc {:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                t.year, t.month, t.day, t.hour, t.minute, t.second
            );
            let valid = (1..=12).contains(&t.month)
                && (1..=31).contains(&t.day)
                && t.hour < 24
                && t.minute < 60
                && t.second < 60;
            check!("rtc-fields", valid, "invalid time fields {t:?}");
            check!("rtc-year", t.year >= 2024, "year {}", t.year);
        }
        None => fail(
            "rtc-fields",
            format_args!("RTC registers are not valid BCD"),
        ),
    }
    let below = boot.ram_between(16 << 20, 4 << 30) >> 16;
    let above = boot.ram_between(4 << 30, u64::MAX) >> 16;
    let c_below = u64::from(cmos::read(0x34)) | u64::from(cmos::read(0x35)) << 8;
    let c_above = u64::from(cmos::read(0x5b))
        | u64::from(cmos::read(0x5c)) << 8
        | u64::from(cmos::read(0x5d)) << 16;
    println!(
        "INFO cmos mem 0x34/0x35={c_below:#x} 0x5b-0x5d={c_above:#x} map: {below:#x} {above:#x}"
    );
    check!(
        "cmos-mem-below-4g",
        c_below == below.min(0xffff),
        "CMOS {c_below:#x}, memory map {below:#x} (64 KiB units)"
    );
    check!(
        "cmos-mem-above-4g",
        c_above == above.min(0xff_ffff),
        "CMOS {c_above:#x}, memory map {above:#x} (64 KiB units)"
    );
}

fn scenario_echo() {
    println!("READY");
    let mut line: Vec<u8> = Vec::new();
    loop {
        if svc::inb(0x3fd) & 1 == 0 {
            continue;
        }
        match svc::inb(0x3f8) {
            // A line ends at `\n` (or `\r`, as a terminal in raw mode sends);
            // line-end bytes before any text are skipped.
            b'\n' | b'\r' if line.is_empty() => {}
            b'\n' | b'\r' => break,
            b => line.push(b),
        }
        if line.len() >= 256 {
            break;
        }
    }
    println!("ECHO {}", String::from_utf8_lossy(&line));
    pass("echo");
}

fn scenario_wait() -> ! {
    println!("READY");
    loop {
        svc::hlt();
    }
}

/// Prints `TICK <n>` every 20 ms, for ever: a guest whose progress shows on the serial port
/// (the VMM's pause/resume tests watch it stop and go on).
fn scenario_tick() -> ! {
    println!("READY");
    let mut n: u64 = 0;
    loop {
        println!("TICK {n}");
        n += 1;
        smp::delay_us(20_000);
    }
}

const IOAPIC: usize = 0xfec0_0000;
const GED_IRQ: u32 = 5;

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC's index and data registers, identity-mapped and user-accessible.
    unsafe {
        core::ptr::write_volatile(IOAPIC as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC + 0x10) as *mut u32, value);
    }
}

/// Enables the xAPIC and routes the Generic Event Device's IOAPIC pin to `svc::IRQ_VECTOR`
/// (edge, active high), with the 8259s masked.
pub fn route_ged_irq() {
    let apic_id = svc::lapic_enable();
    // Mask the 8259s: the GED's GSI reaches them too, and an unprogrammed PIC would deliver it
    // as a stray exception vector.
    svc::outb(0x21, 0xff);
    svc::outb(0xa1, 0xff);
    // Redirection entry: fixed delivery, physical destination, edge, active high, unmasked.
    ioapic_write(0x11 + 2 * GED_IRQ, apic_id << 24);
    ioapic_write(0x10 + 2 * GED_IRQ, svc::IRQ_VECTOR);
}

/// For ever: waits for the GED's interrupt (`route_ged_irq`), reading its register (which
/// clears it) every second anyway, and hands each non-zero value to `on_bits`. Bits pending
/// without an interrupt within a further 200 ms print `FAIL <irq_fail>: …` (and are handed on).
pub fn ged_loop(ged_port: u16, irq_fail: &str, mut on_bits: impl FnMut(u8)) -> ! {
    let mut taken = svc::irq_count(svc::IRQ_VECTOR);
    loop {
        let n = svc::wait_vector(svc::IRQ_VECTOR, taken + 1, 1000);
        let mut irq = n > taken;
        taken = n;
        let bits = svc::inb(ged_port);
        if bits == 0 {
            continue;
        }
        if !irq {
            // The VMM sets the bits, then raises the interrupt: it may be on its way.
            let n = svc::wait_vector(svc::IRQ_VECTOR, taken + 1, 200);
            irq = n > taken;
            taken = n;
            if !irq {
                fail(
                    irq_fail,
                    format_args!("GED bits {bits:#x} pending without an interrupt"),
                );
            }
        }
        on_bits(bits);
    }
}

/// Routes the Generic Event Device's IOAPIC pin to the monitor's vector, waits for the VMM's
/// power-button event, reads the GED's event register (at the port of the DSDT's GED
/// `OperationRegion`) and checks the power-button bit.
fn scenario_power_button(acpi: Option<&AcpiInfo>) {
    let Some(ged_port) = acpi.and_then(|a| a.ged_port) else {
        fail(
            "power-button",
            format_args!("no ACPI0013 device with a SystemIO OperationRegion in the DSDT"),
        );
        return;
    };
    route_ged_irq();
    println!("READY");
    let taken = svc::wait_irq(svc::IRQ_VECTOR);
    let events = svc::inb(ged_port);
    let again = svc::inb(ged_port);
    check!(
        "power-button",
        taken >= 1 && events & 1 == 1 && again == 0,
        "interrupts {taken}, GED events at port {ged_port:#x} {events:#x} then {again:#x}"
    );
}

/// Deliberately faults (a privileged instruction at CPL3 gives #GP), to check that the
/// monitor reports unexpected exceptions and powers off.
fn scenario_fault() {
    println!("READY");
    // SAFETY: `hlt` at CPL3 raises #GP, which the monitor turns into a FAIL line and a
    // power off; nothing after it runs.
    unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    fail("fault", format_args!("hlt at CPL3 did not fault"));
}
