//! CPL3 side of the monitor's `ud2` service interface, and console output.
//!
//! Convention: `rax` = service number, arguments in `rdi`, `rsi`, `rdx`, result in
//! `rax` (`cpuid` also returns in `rdi`, `rsi`, `rdx`). The monitor skips the 2-byte
//! `ud2` on return. See `monitor.S` and docs/test-guest.md.

// The full service set is the interface scenarios use; not every call is used yet.
#![allow(dead_code)]

use core::arch::asm;
use core::fmt::{self, Write};

pub const SVC_OUTB: u64 = 0;
pub const SVC_OUTW: u64 = 1;
pub const SVC_OUTL: u64 = 2;
pub const SVC_INB: u64 = 3;
pub const SVC_INW: u64 = 4;
pub const SVC_INL: u64 = 5;
pub const SVC_WRITE: u64 = 6;
pub const SVC_HLT: u64 = 7;
pub const SVC_LAPIC_ENABLE: u64 = 8;
pub const SVC_IPI: u64 = 9;
pub const SVC_CPUID: u64 = 10;
pub const SVC_RDMSR: u64 = 11;
pub const SVC_WRMSR: u64 = 12;
pub const SVC_WAIT_IRQ: u64 = 13;
pub const SVC_IRQ_COUNT: u64 = 14;
pub const SVC_PARK: u64 = 15;
pub const SVC_NMI_COUNT: u64 = 16;
/// The first of the external interrupt vectors the monitor counts (`IRQ_VECTOR` in monitor.S).
pub const IRQ_VECTOR: u32 = 0x30;
/// How many vectors from `IRQ_VECTOR` on the monitor counts (`IRQ_VECTORS`).
pub const IRQ_VECTORS: u32 = 16;
/// The vector `wait_vector` uses for its LAPIC timer (the last counted one).
pub const TIMER_VECTOR: u32 = IRQ_VECTOR + IRQ_VECTORS - 1;

/// Calls monitor service `n`.
#[inline(always)]
pub fn svc(n: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    // SAFETY: `ud2` traps to the monitor, which performs the requested service on
    // the given arguments and returns right after the `ud2` with only `rax` changed.
    // The trap switches to the kernel stack (TSS rsp0), so the user stack (and its
    // red zone) is untouched. Memory may be read (SVC_WRITE), hence no `nomem`.
    unsafe {
        asm!("ud2", inout("rax") n => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack));
    }
    ret
}

pub fn outb(port: u16, v: u8) {
    svc(SVC_OUTB, port.into(), v.into(), 0);
}
pub fn outw(port: u16, v: u16) {
    svc(SVC_OUTW, port.into(), v.into(), 0);
}
pub fn outl(port: u16, v: u32) {
    svc(SVC_OUTL, port.into(), v.into(), 0);
}
pub fn inb(port: u16) -> u8 {
    svc(SVC_INB, port.into(), 0, 0) as u8
}
pub fn inw(port: u16) -> u16 {
    svc(SVC_INW, port.into(), 0, 0) as u16
}
pub fn inl(port: u16) -> u32 {
    svc(SVC_INL, port.into(), 0, 0) as u32
}
/// Halts the CPU (at CPL0, interrupts off): does not return unless an NMI/INIT arrives.
/// Enables interrupts at CPL0 and halts until one arrives (any vector); returns how many
/// interrupts on `vector` have been taken so far.
pub fn wait_irq(vector: u32) -> u64 {
    svc(SVC_WAIT_IRQ, vector.into(), 0, 0)
}

/// How many interrupts on `vector` (`IRQ_VECTOR` .. `IRQ_VECTOR + IRQ_VECTORS - 1`) the
/// monitor has taken; 0 for any other vector.
pub fn irq_count(vector: u32) -> u64 {
    svc(SVC_IRQ_COUNT, vector.into(), 0, 0)
}

/// How many NMIs the CPU with monitor index `cpu` (0 the BSP, then the APs in the order they
/// reported in) has taken.
pub fn nmi_count(cpu: u32) -> u64 {
    svc(SVC_NMI_COUNT, cpu.into(), 0, 0)
}

const LAPIC: u64 = 0xfee0_0000;

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the xAPIC's MMIO page, identity-mapped, uncached and user-accessible.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, v) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as in lapic_write.
    unsafe { core::ptr::read_volatile((LAPIC + reg) as *const u32) }
}

/// Waits (interrupts enabled only inside the monitor's `sti; hlt`) until `vector` has been
/// taken at least `at_least` times, or about `timeout_ms` milliseconds have passed; a LAPIC
/// one-shot timer on `TIMER_VECTOR` bounds each halt to 10 ms. Returns the final count. The
/// xAPIC must be enabled (`lapic_enable`).
pub fn wait_vector(vector: u32, at_least: u64, timeout_ms: u64) -> u64 {
    // Divide by 1; KVM's APIC timer counts at 1 GHz, so 10 ms is 10^7 (longer elsewhere).
    lapic_write(0x3e0, 0xb);
    lapic_write(0x320, TIMER_VECTOR);
    let ticks = irq_count(TIMER_VECTOR);
    let mut n = irq_count(vector);
    while n < at_least && irq_count(TIMER_VECTOR) - ticks < timeout_ms.div_ceil(10) {
        // Re-arm only an expired timer, so other interrupts cannot stretch the timeout.
        if lapic_read(0x390) == 0 {
            lapic_write(0x380, 10_000_000);
        }
        n = wait_irq(vector);
    }
    lapic_write(0x380, 0);
    lapic_write(0x320, 1 << 16);
    n
}

/// Runs this CPU's LAPIC timer periodically on `vector`, every `ticks` (divide by 1: KVM's APIC
/// timer counts at 1 GHz, so 10^7 is 10 ms). The xAPIC must be enabled.
pub fn lapic_timer_periodic(vector: u32, ticks: u32) {
    lapic_write(0x3e0, 0xb);
    lapic_write(0x320, 1 << 17 | vector);
    lapic_write(0x380, ticks);
}

/// Stops this CPU's LAPIC timer and masks it.
pub fn lapic_timer_stop() {
    lapic_write(0x380, 0);
    lapic_write(0x320, 1 << 16);
}

/// Goes offline for good: the monitor sets `*parked` to 1 and halts at CPL0 with interrupts
/// off (only an INIT, then a SIPI, starts the CPU again, from the trampoline).
pub fn park(parked: &core::sync::atomic::AtomicU32) -> ! {
    svc(SVC_PARK, parked.as_ptr() as u64, 0, 0);
    loop {
        hlt();
    }
}

pub fn hlt() {
    svc(SVC_HLT, 0, 0, 0);
}
/// Software-enables this CPU's xAPIC (SVR = 0x1ff); returns its APIC ID.
pub fn lapic_enable() -> u32 {
    svc(SVC_LAPIC_ENABLE, 0, 0, 0) as u32
}
/// Sends an IPI (ICR low `icr_low`) to `apic_id`. Returns false if it stayed pending.
pub fn send_ipi(apic_id: u32, icr_low: u32) -> bool {
    svc(SVC_IPI, apic_id.into(), icr_low.into(), 0) != 0
}
/// CPUID executed at CPL0 (where the VMM's CPUID table applies, also under PVM).
pub fn cpuid_cpl0(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: as in `svc`; the cpuid service returns its results in rax/rdi/rsi/rdx.
    unsafe {
        asm!("ud2", inout("rax") SVC_CPUID => a, inout("rdi") u64::from(leaf) => b,
             inout("rsi") u64::from(subleaf) => c, inout("rdx") 0u64 => d, options(nostack));
    }
    [a as u32, b as u32, c as u32, d as u32]
}
pub fn rdmsr(msr: u32) -> u64 {
    svc(SVC_RDMSR, msr.into(), 0, 0)
}
pub fn wrmsr(msr: u32, v: u64) {
    svc(SVC_WRMSR, msr.into(), v, 0);
}

/// Writes raw bytes to COM1 (one service call for the whole slice).
pub fn write_bytes(b: &[u8]) {
    if !b.is_empty() {
        svc(SVC_WRITE, b.as_ptr() as u64, b.len() as u64, 0);
    }
}

/// Line buffer: formats a whole line, then sends it in one service call.
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }
    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

pub fn print_fmt(args: fmt::Arguments) {
    let mut l = Line::new();
    let _ = l.write_fmt(args);
    l.flush();
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::svc::print_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Time stamp counter (native at CPL3).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time stamp counter (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}
