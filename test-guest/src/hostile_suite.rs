//! `test=hostile-suite`: the whole hostile guest. An AP beats at CPL3 throughout (other vCPUs
//! keep working); every virtio function gets bad rings and chains (`hostile_virtio`), the PCI
//! layer bad configuration, BAR and MSI-X accesses (`hostile_pci`), the legacy ports random
//! writes (`hostile_ports`); then storms: every queue notified as fast as the guest can,
//! MSI-X vectors and the function mask flipped as fast as it can while a device completes
//! requests, a broken (NEEDS_RESET) device notified on. Two quiet windows, one before and
//! one after, let the host compare the VMM's CPU time (`HOSTILE idle<n> begin/end` lines);
//! the host calls the API during the storm (`HOSTILE storm begin/end`). Finally the devices
//! work again through an independent driver (`virtio-drivers`) and by hand.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::pci::bus::ConfigurationAccess;
use virtio_drivers::transport::DeviceType;

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::hostile_pci::Rng;
use crate::hostile_virtio::{functions, publish, r16, r32, r8, w32, Dev, Pool};
use crate::rawq::F_WRITE;
use crate::virtio::{ecam, find, root, transport, GuestHal};
use crate::{check, fail, pass, println, smp, svc};

/// The AP's timer vector (the other scenarios use 0x30-0x33, 0x3e and 0x3f).
const AP_VECTOR: u32 = 0x3c;
/// A vector nothing raises: waiting on it is an idle guest.
const IDLE_VECTOR: u32 = 0x3b;
static HEARTBEAT: AtomicU64 = AtomicU64::new(0);
/// `hostile_rounds=`: how many times over the random parts run (a longer fuzz by hand).
pub(crate) static ROUNDS: AtomicU64 = AtomicU64::new(1);

pub(crate) fn rounds() -> u64 {
    ROUNDS.load(SeqCst).max(1)
}

extern "C" fn ap_main(_apic_id: u32, _index: u32) -> ! {
    svc::lapic_enable();
    svc::lapic_timer_periodic(AP_VECTOR, 10_000_000);
    loop {
        HEARTBEAT.fetch_add(1, SeqCst);
        svc::wait_irq(AP_VECTOR);
    }
}

/// Starts one AP beating; false when the guest has none.
fn start_ap(acpi: Option<&AcpiInfo>) -> bool {
    let bsp = svc::lapic_enable();
    let Some(ap) = acpi
        .into_iter()
        .flat_map(|a| a.cpus.iter())
        .find(|c| c.enabled && c.apic_id != bsp)
        .map(|c| c.apic_id)
    else {
        return false;
    };
    let stack: Vec<u8> = alloc::vec![0; 16384];
    let top = (stack.as_ptr() as u64 + 16384) & !15;
    core::mem::forget(stack);
    smp::set_ap_entry(ap_main);
    smp::set_ap_stack(ap, top);
    smp::start_one(ap, 2000)
}

fn heartbeat_moves(what: &str) {
    let h0 = HEARTBEAT.load(SeqCst);
    smp::delay_us(100_000);
    let h1 = HEARTBEAT.load(SeqCst);
    check!(
        &alloc::format!("hostile-ap-alive-{what}"),
        h1 > h0,
        "the AP's heartbeat stayed at {h0} for 100 ms"
    );
}

/// A quiet window: the guest halts (a 10 ms LAPIC timer aside) for `ms`.
fn idle(n: u32, ms: u64) {
    println!("HOSTILE idle{n} begin");
    svc::wait_vector(IDLE_VECTOR, 1, ms);
    println!("HOSTILE idle{n} end");
}

fn tsc_ms() -> u64 {
    svc::rdtsc() / (smp::TSC_PER_US * 1000)
}

/// The storms, for about `ms` each.
fn storms(devs: &[Dev], p: &Pool, ms: u64) {
    println!("HOSTILE storm begin");
    // 1. Every queue of every device notified as fast as the guest can, rings empty.
    for d in devs {
        d.start_valid(p);
    }
    let notify: Vec<(u64, u16)> = devs
        .iter()
        .flat_map(|d| (0..d.queues()).map(move |q| (d.notify_addr(q), q)))
        .collect();
    let (t0, mut n) = (tsc_ms(), 0u64);
    while tsc_ms() - t0 < ms {
        for &(a, q) in &notify {
            crate::hostile_virtio::w16(a, q);
            n += 1;
        }
    }
    println!("INFO hostile storm notify: {n} notifications in {ms} ms");
    // 2. MSI-X entry 0 and the function mask flipped as fast as the guest can, while the rng
    // completes requests on that vector.
    let mut flips = 0u64;
    if let Some(rng) = devs.iter().find(|d| d.name == "rng") {
        let mut cam = ecam();
        let cap = root()
            .capabilities(rng.df)
            .find(|c| c.id == 0x11)
            .map(|c| c.offset);
        if let Some(cap) = cap {
            let table = rng.l.bar + u64::from(cam.read_word(rng.df, cap + 4) & !7);
            rng.start_valid(p);
            cam.write_word(rng.df, cap, 0x8000 << 16);
            w32(table, 0xfee0_0000);
            w32(table + 4, 0);
            w32(table + 8, 0x3a);
            crate::hostile_virtio::w16(rng.l.common + 0x16, 0);
            crate::hostile_virtio::w16(rng.l.common + 0x1a, 0);
            let m = &p.q[0];
            let (t0, mut slot) = (tsc_ms(), 0u16);
            let mut last_used = 0u16;
            while tsc_ms() - t0 < ms {
                if r16(m.used() + 2) == slot {
                    m.set_desc(0, m.buf, 64, F_WRITE, 0);
                    publish(m, slot, 0);
                    slot = slot.wrapping_add(1);
                    rng.notify(0);
                }
                last_used = r16(m.used() + 2);
                w32(table + 12, (flips & 1) as u32);
                let fm = if flips & 2 == 0 { 0x8000 } else { 0xc000 };
                cam.write_word(rng.df, cap, fm << 16);
                flips += 1;
            }
            cam.write_word(rng.df, cap, 0);
            println!("INFO hostile storm msix: {flips} flips, {last_used} rng requests served");
            check!(
                "hostile-storm-msix",
                last_used > 0,
                "the rng served nothing during the mask storm"
            );
        }
    }
    // 3. A broken device (NEEDS_RESET) notified on.
    let broken = devs.iter().find(|d| d.name == "blk").or(devs.first());
    if let Some(d) = broken {
        d.start_valid(p);
        let m = &p.q[0];
        crate::hostile_virtio::w16(m.avail() + 2, 200);
        let a = d.notify_addr(0);
        let t0 = tsc_ms();
        while tsc_ms() - t0 < ms / 2 {
            crate::hostile_virtio::w16(a, 0);
        }
        let st = d.l.status();
        check!(
            "hostile-storm-broken-device",
            st & 0x40 != 0,
            "{}: status {st:#x}",
            d.name
        );
    }
    // The broken disk stays broken through the quiet window that follows (its worker must
    // not spin on the notifications it had); the final checks reset it.
    for d in devs.iter().filter(|d| Some(d.df) != broken.map(|b| b.df)) {
        d.reset();
    }
    println!("HOSTILE storm end");
    pass("hostile-storm-done");
}

/// The devices work again: virtio-drivers for blk and console, the rng and pmem by hand.
fn final_checks(devs: &[Dev], p: &Pool) {
    if let Some(df) = find(DeviceType::Block).into_iter().next() {
        if let Some(t) = transport(df) {
            match VirtIOBlk::<GuestHal, _>::new(t) {
                Ok(mut blk) => {
                    let mut b = [0u8; 512];
                    let ok = blk.read_blocks(0, &mut b).is_ok();
                    let want = crate::virtio::host_pattern(0, 0);
                    check!(
                        "hostile-final-blk",
                        ok && b.iter().all(|&x| x == want),
                        "read ok {ok}, sector 0 starts {:x?}",
                        &b[..4]
                    );
                }
                Err(e) => fail("hostile-final-blk", format_args!("{e}")),
            }
        }
    }
    if let Some(df) = find(DeviceType::Console).into_iter().next() {
        if let Some(t) = transport(df) {
            match VirtIOConsole::<GuestHal, _>::new(t) {
                Ok(mut con) => {
                    let ok = b"hostile suite: console ok\n"
                        .iter()
                        .all(|&c| con.send(c).is_ok());
                    check!("hostile-final-console", ok, "send failed");
                }
                Err(e) => fail("hostile-final-console", format_args!("{e}")),
            }
        }
    }
    crate::virtio::scenario_rng();
    // pmem: FLUSH (type 0) answered with status 0.
    if let Some(d) = devs.iter().find(|d| d.name == "pmem") {
        d.start_valid(p);
        let m = &p.q[0];
        w32(m.buf, 0);
        w32(m.buf + 0x100, 0xffff_ffff);
        m.set_desc(0, m.buf, 4, 1, 1);
        m.set_desc(1, m.buf + 0x100, 4, F_WRITE, 0);
        publish(m, 0, 0);
        d.notify(0);
        for _ in 0..1000 {
            if r16(m.used() + 2) != 0 {
                break;
            }
            smp::delay_us(1000);
        }
        let st = r32(m.buf + 0x100);
        check!("hostile-final-pmem", st == 0, "flush status {st:#x}");
        d.reset();
    }
    // Every device starts cleanly (and nothing is left NEEDS_RESET).
    for d in devs {
        let (st, enabled) = d.start_valid(p);
        check!(
            &alloc::format!("hostile-final-{}-starts", d.name),
            st == 0xf && enabled == d.queues(),
            "status {st:#x}, {enabled} queues enabled"
        );
        d.reset();
    }
    let _ = r8(0);
}

const PCI_HOTPLUG: u64 = 0xfea0_0000;

/// The guest ejects, on its own, the second disk while reads are in flight on it, then keeps
/// notifying it and reading its BAR; and it ejects empty slots, the host bridge's slot and
/// slots on a segment that does not exist. The disk must be gone (configuration space and BAR
/// read all ones), everything else still there.
fn eject_abuse(devs: &[Dev], p: &Pool) {
    let Some(d) = devs.iter().filter(|d| d.name == "blk").nth(1) else {
        return;
    };
    d.start_valid(p);
    for (i, m) in p.q[..1].iter().enumerate() {
        for slot in 0..6u16 {
            let h = slot * 3 % 8;
            w32(m.buf + 0x100 * u64::from(slot), 0);
            m.set_desc(h, m.buf + 0x100 * u64::from(slot), 16, 1, (h + 1) % 8);
            m.set_desc((h + 1) % 8, p.scratch, 0x1000, F_WRITE | 1, (h + 2) % 8);
            m.set_desc((h + 2) % 8, m.buf + 0x800 + u64::from(slot), 1, F_WRITE, 0);
            publish(m, slot, h);
        }
        d.notify(i as u16);
    }
    let notify = d.notify_addr(0);
    w32(PCI_HOTPLUG + 8, 1 << d.df.device);
    for _ in 0..1000 {
        crate::hostile_virtio::w16(notify, 0);
        let _ = r32(d.l.common);
    }
    // Empty slot 31, the host bridge's slot 0, and slots of segment 5.
    for _ in 0..50 {
        w32(PCI_HOTPLUG + 8, 1 << 31);
        w32(PCI_HOTPLUG + 8, 1);
    }
    w32(PCI_HOTPLUG + 12, 5);
    w32(PCI_HOTPLUG + 8, u32::MAX);
    w32(PCI_HOTPLUG + 12, 0);
    let mut gone = false;
    for _ in 0..2000 {
        if ecam().read_word(d.df, 0) == u32::MAX {
            gone = true;
            break;
        }
        smp::delay_us(1000);
    }
    let bar = r32(d.l.common);
    let host = ecam().read_word(
        virtio_drivers::transport::pci::bus::DeviceFunction {
            bus: 0,
            device: 0,
            function: 0,
        },
        0,
    );
    let others = devs
        .iter()
        .filter(|o| o.df != d.df)
        .all(|o| r16(o.l.common + 0x12) == o.nq);
    check!(
        "hostile-eject-in-flight",
        gone && bar == u32::MAX && host != u32::MAX && others,
        "disk gone: {gone}, its BAR reads {bar:#x}, host bridge {host:#x}, others answer: {others}"
    );
}

pub fn scenario_hostile_suite(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let seed = boot
        .arg("hostile_seed")
        .and_then(crate::parse_u64)
        .unwrap_or_else(|| svc::rdtsc() | 1);
    let storm_ms = boot
        .arg("hostile_storm_ms")
        .and_then(crate::parse_u64)
        .unwrap_or(2000);
    let idle_ms = boot
        .arg("hostile_idle_ms")
        .and_then(crate::parse_u64)
        .unwrap_or(3000);
    if let Some(r) = boot.arg("hostile_rounds").and_then(crate::parse_u64) {
        ROUNDS.store(r, SeqCst);
    }
    if let Some(slot) = boot.arg("hostile_vhost_user").and_then(crate::parse_u64) {
        crate::hostile_virtio::VHOST_USER_SLOTS.store(1 << (slot & 31), SeqCst);
    }
    println!("INFO hostile seed={seed:#x} rounds={}", rounds());
    let mut rng = Rng(seed);
    let ap = start_ap(acpi);
    check!("hostile-ap-started", ap, "no AP came up");
    let devs = functions();
    let names: Vec<&str> = devs.iter().map(|d| d.name).collect();
    println!("HOSTILE devices {}", names.join(","));
    let pool = Pool::new();
    let ram_end = boot
        .memmap
        .iter()
        .filter(|r| r.kind == 1 && r.addr < 1 << 32)
        .map(|r| r.addr + r.size)
        .max()
        .unwrap_or(0);
    idle(0, idle_ms);
    crate::hostile_virtio::run(&devs, &pool, ram_end);
    heartbeat_moves("virtio");
    crate::hostile_requests::run(&devs, &pool, &mut rng);
    heartbeat_moves("requests");
    crate::hostile_lifecycle::run(&devs, &pool, storm_ms);
    heartbeat_moves("lifecycle");
    crate::hostile_pci::run(&devs, &pool, ram_end, &mut rng);
    heartbeat_moves("pci");
    crate::hostile_ports::run(&mut rng);
    heartbeat_moves("ports");
    storms(&devs, &pool, storm_ms);
    heartbeat_moves("storm");
    idle(1, idle_ms);
    final_checks(&devs, &pool);
    eject_abuse(&devs, &pool);
    heartbeat_moves("end");
    pass("hostile-suite-done");
}
