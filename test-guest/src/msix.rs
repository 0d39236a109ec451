//! `test=msix` and `test=console-size`: MSI-X messages delivered all the way to this CPU's IDT
//! (the monitor counts each vector from `svc::IRQ_VECTOR` on), and virtio-console size changes
//! with their configuration interrupt.

use core::ptr::read_volatile;

use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::rawq::{r16, r8, w16, w32, Layout, F_WRITE};
use crate::virtio::{ecam, find, root, transport, wait_pending_bit, GuestHal};
use crate::{check, fail, pass, println, smp, svc};

/// The vector the rng's queue 0 and the console's configuration changes are sent on.
const MSIX_VECTOR: u32 = svc::IRQ_VECTOR + 1;

/// Where a virtio function's MSI-X structures and other structures are.
struct Msix {
    df: DeviceFunction,
    l: Layout,
    cap: u8,
    table: u64,
    pba: u64,
}

impl Msix {
    fn find(df: DeviceFunction) -> Option<Msix> {
        let l = Layout::find(df)?;
        let Some(cap) = root()
            .capabilities(df)
            .find(|c| c.id == 0x11)
            .map(|c| c.offset)
        else {
            fail("msix-cap", format_args!("no MSI-X capability"));
            return None;
        };
        let cam = ecam();
        Some(Msix {
            df,
            cap,
            table: l.bar + u64::from(cam.read_word(df, cap + 4) & !7),
            pba: l.bar + u64::from(cam.read_word(df, cap + 8) & !7),
            l,
        })
    }

    /// Table entry `entry`: fixed delivery of `vector` to the CPU with APIC ID `apic`.
    fn program(&self, entry: u64, apic: u32, vector: u32, masked: bool) {
        let e = self.table + 16 * entry;
        w32(e, 0xfee0_0000 | apic << 12);
        w32(e + 4, 0);
        w32(e + 8, vector);
        w32(e + 12, u32::from(masked));
    }

    fn mask(&self, entry: u64, masked: bool) {
        w32(self.table + 16 * entry + 12, u32::from(masked));
    }

    /// Message control: enabled, function not masked. Returns what reads back.
    fn enable(&self) -> u32 {
        let mut cam = ecam();
        cam.write_word(self.df, self.cap, 0x8000 << 16);
        cam.read_word(self.df, self.cap) >> 16
    }

    fn disable(&self) {
        ecam().write_word(self.df, self.cap, 0);
    }
}

/// `test=msix`: the rng's queue 0 on MSI-X entry 0 → `MSIX_VECTOR` on this CPU.
pub fn scenario_msix() {
    let Some(df) = find(DeviceType::EntropySource).into_iter().next() else {
        fail("rng-present", format_args!("no virtio-rng function"));
        return;
    };
    let Some(m) = Msix::find(df) else { return };
    // A hand-made driver without EVENT_IDX: every completion must interrupt.
    let Some(mut q) = m.l.start_queue0("msix-setup") else {
        return;
    };
    let apic = svc::lapic_enable();
    m.program(0, apic, MSIX_VECTOR, false);
    w16(m.l.common + 0x16, 0);
    w16(m.l.common + 0x1a, 0);
    let v = r16(m.l.common + 0x1a);
    check!("msix-queue-vector", v == 0, "queue 0 vector reads {v:#x}");
    let ctl = m.enable();
    check!(
        "msix-enable",
        ctl & 0xc000 == 0x8000,
        "message control {ctl:#x}"
    );
    let before = svc::irq_count(MSIX_VECTOR);
    let buf = q.buf;
    q.set_desc(0, buf, 64, F_WRITE, 0);
    let answered = q.submit(0);
    let n = svc::wait_vector(MSIX_VECTOR, before + 1, 5000);
    check!(
        "msix-delivered",
        answered && n > before,
        "answered={answered} vector {MSIX_VECTOR:#x} taken {before} -> {n}"
    );
    let other = svc::irq_count(svc::IRQ_VECTOR);
    check!("msix-vector-only", other == 0, "vector 0x30 taken {other}");

    // A masked entry holds the message in the PBA; unmasking delivers it.
    m.mask(0, true);
    let before = n;
    let answered = q.submit(0);
    let pending = wait_pending_bit(m.l.bar, m.pba - m.l.bar);
    let held = svc::wait_vector(MSIX_VECTOR, before + 1, 50);
    check!(
        "msix-masked-pending",
        answered && pending & 1 == 1 && held == before,
        "answered={answered} PBA {pending:#x}, taken {before} -> {held}"
    );
    m.mask(0, false);
    let n = svc::wait_vector(MSIX_VECTOR, before + 1, 5000);
    // SAFETY: the PBA in our device's BAR.
    let pba = unsafe { read_volatile(m.pba as *const u64) };
    check!(
        "msix-unmask-delivers",
        n == before + 1 && pba & 1 == 0,
        "taken {before} -> {n}, PBA {pba:#x}"
    );
    m.disable();
    m.l.set_status(0);
}

/// `name CxR`: a check's name with the size it saw.
fn sized(name: &str, size: Option<(u16, u16)>) -> alloc::string::String {
    match size {
        Some((c, r)) => alloc::format!("{name} {c}x{r}"),
        None => alloc::format!("{name} none"),
    }
}

fn parse_size(s: &str) -> Option<(u16, u16)> {
    let (c, r) = s.split_once('x')?;
    Some((c.parse().ok()?, r.parse().ok()?))
}

/// `test=console-size`: the console's size (`console_size=CxR`), then, after `READY`, the size
/// the host changes it to (`console_resize=CxR`), with a new configuration generation and a
/// configuration interrupt (MSI-X, the last entry → `MSIX_VECTOR`).
pub fn scenario_console_size(boot: &BootInfo) {
    let want = boot.arg("console_size").and_then(parse_size);
    let want2 = boot.arg("console_resize").and_then(parse_size);
    let Some(df) = find(DeviceType::Console).into_iter().next() else {
        fail(
            "console-present",
            format_args!("no virtio-console function"),
        );
        return;
    };
    let Some(m) = Msix::find(df) else { return };
    let Some(t) = transport(df) else { return };
    let c = match VirtIOConsole::<GuestHal, _>::new(t) {
        Ok(c) => c,
        Err(e) => {
            fail("console-init", format_args!("{e}"));
            return;
        }
    };
    let size = |c: &VirtIOConsole<GuestHal, _>| match c.size() {
        Ok(Some(s)) => Some((s.columns, s.rows)),
        _ => None,
    };
    let first = size(&c);
    println!("INFO console size {first:?}");
    check!(
        &sized("console-size", first),
        first.is_some() && (want.is_none() || first == want),
        "size {first:?}, expected {want:?}"
    );
    let apic = svc::lapic_enable();
    // Entries: one per queue (2), then the configuration's.
    m.program(2, apic, MSIX_VECTOR, false);
    w16(m.l.common + 0x10, 2);
    let v = r16(m.l.common + 0x10);
    check!(
        "console-config-vector",
        v == 2,
        "config vector reads {v:#x}"
    );
    let ctl = m.enable();
    check!(
        "msix-enable",
        ctl & 0xc000 == 0x8000,
        "message control {ctl:#x}"
    );
    let generation = r8(m.l.common + 0x15);
    let taken = svc::irq_count(MSIX_VECTOR);
    println!("READY");
    let mut now = first;
    for _ in 0..10_000 {
        now = size(&c);
        if now != first {
            break;
        }
        smp::delay_us(1000);
    }
    println!("INFO console size {now:?}");
    check!(
        &sized("console-resize", now),
        now != first && (want2.is_none() || now == want2),
        "size {first:?} -> {now:?}, expected {want2:?}"
    );
    let g = r8(m.l.common + 0x15);
    check!(
        "console-config-generation",
        g != generation,
        "generation {generation} -> {g}"
    );
    let n = svc::wait_vector(MSIX_VECTOR, taken + 1, 5000);
    check!(
        "console-config-interrupt",
        n > taken,
        "vector {MSIX_VECTOR:#x} taken {taken} -> {n}"
    );
    m.disable();
}
