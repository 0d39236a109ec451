//! `test=hostile-suite`, part 2: the PCI layer. Random configuration writes of every size at
//! every offset (ECAM and ports 0xcf8/0xcfc, aligned or not, to functions that exist and to
//! ones that do not), BAR sizing games, BARs moved over RAM, over another device's BAR, over
//! the ECAM window and past the address space, and MSI-X tables written out of range,
//! unaligned, with bad messages, and the PBA written. Read-only registers must stay as they
//! were, and every device must work again once its BARs are put back.

use alloc::vec::Vec;

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};

use crate::hostile_virtio::{r16, r32, r8, w16, w32, w64, w8, Dev, Pool, OUTSIDE};
use crate::virtio::{ecam, root, ECAM_BASE};
use crate::{check, fail, pass, println, smp, svc};

/// A vector the monitor counts and nothing waits for.
pub(crate) const HARMLESS_VECTOR: u32 = 0x3a;

/// xorshift64: the suite's random numbers (the seed is printed, so a run can be repeated).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn size(&mut self) -> u64 {
        [1, 2, 4][self.below(3) as usize]
    }
}

fn cfg_addr(df: DeviceFunction, off: u64) -> u64 {
    ECAM_BASE
        | u64::from(df.bus) << 20
        | u64::from(df.device) << 15
        | u64::from(df.function) << 12
        | off
}

fn cfg_write(a: u64, size: u64, v: u64) {
    match size {
        1 => w8(a, v as u8),
        2 => w16(a, v as u16),
        4 => w32(a, v as u32),
        _ => w64(a, v),
    }
}

fn cfg_read(a: u64, size: u64) -> u64 {
    match size {
        1 => u64::from(r8(a)),
        2 => u64::from(r16(a)),
        _ => u64::from(r32(a)),
    }
}

/// What must not change whatever the guest writes: IDs, class, header type, the capability
/// list (each capability's ID and next pointer).
fn read_only_view(df: DeviceFunction) -> Vec<u32> {
    let cam = ecam();
    let mut v = alloc::vec![
        cam.read_word(df, 0),
        cam.read_word(df, 8),
        cam.read_word(df, 0x0c) & 0x00ff_0000,
        cam.read_word(df, 0x2c),
        cam.read_word(df, 0x34) & 0xff,
    ];
    for c in root().capabilities(df) {
        v.push(u32::from(c.offset) << 16 | u32::from(c.id));
    }
    v
}

/// Random writes over the whole configuration space of `df`, except the command register and
/// the BARs (moved on purpose below); then MSI-X off again.
fn config_fuzz(df: DeviceFunction, name: &str, rng: &mut Rng) {
    let before = read_only_view(df);
    let mut cam = ecam();
    let (cmd, line) = (cam.read_word(df, 4), cam.read_word(df, 0x3c));
    for _ in 0..400 * crate::hostile_suite::rounds() {
        let size = [1, 2, 4, 8][rng.below(4) as usize];
        let off = rng.below(0x1000 - 8);
        if off < 0x28 && off + size > 4 || (0x30..0x34).contains(&off) {
            continue;
        }
        cfg_write(cfg_addr(df, off), size, rng.next());
        let _ = cfg_read(cfg_addr(df, off), size.min(4));
    }
    // Unaligned accesses across a dword, and across the end of the function's 4 KiB.
    cfg_write(cfg_addr(df, 0x3e), 4, 0xffff_ffff);
    cfg_write(cfg_addr(df, 0x3d), 2, 0xffff);
    cfg_write(cfg_addr(df, 0xffe), 4, 0xffff_ffff);
    let _ = cfg_read(cfg_addr(df, 0xffd), 4);
    // Take back whatever the random writes enabled.
    for c in root().capabilities(df) {
        if c.id == 0x11 || c.id == 0x05 {
            cam.write_word(df, c.offset, 0);
        }
    }
    cam.write_word(df, 4, cmd & 0xffff);
    cam.write_word(df, 0x3c, line);
    let after = read_only_view(df);
    check!(
        &alloc::format!("hostile-pci-{name}-readonly-intact"),
        before == after,
        "{before:x?} -> {after:x?}"
    );
}

/// Ports 0xcf8-0xcff with every size and odd offsets, and a disabled address register.
fn port_fuzz(rng: &mut Rng, real: &[DeviceFunction]) {
    for _ in 0..150 {
        let dev = if rng.below(2) == 0 {
            real[rng.below(real.len() as u64) as usize].device
        } else {
            31
        };
        let reg = rng.below(0x100) as u32;
        // Sometimes the enable bit is off, sometimes a bus nothing is on.
        let bus = if rng.below(4) == 0 { 7 } else { 0 };
        let en = if rng.below(4) == 0 { 0 } else { 0x8000_0000 };
        // Registers 0x04 (command) and 0x10-0x27 (BARs) of the real devices stay alone.
        if bus == 0 && dev != 31 && (reg < 0x28 || (0x30..0x34).contains(&reg)) {
            continue;
        }
        svc::outl(0xcf8, en | bus << 16 | u32::from(dev) << 11 | reg);
        let size = rng.size();
        let port = 0xcfc + rng.below(4) as u16;
        let v = rng.next();
        match size {
            1 => svc::outb(port, v as u8),
            2 => svc::outw(port, v as u16),
            _ => svc::outl(port, v as u32),
        }
        let _ = svc::inl(0xcfc);
        // Narrow accesses to the address register itself.
        svc::outb(0xcf8 + rng.below(4) as u16, v as u8);
        svc::outw(0xcfa, v as u16);
    }
    svc::outl(0xcf8, 0);
    // A function that does not exist reads all ones, whatever was written to it.
    let ghost = DeviceFunction {
        bus: 0,
        device: 31,
        function: 7,
    };
    let far = DeviceFunction {
        bus: 255,
        device: 31,
        function: 7,
    };
    for df in [ghost, far] {
        for off in (0..0x100).step_by(4) {
            w32(cfg_addr(df, off), 0x1234_5678);
        }
    }
    let ids = (r32(cfg_addr(ghost, 0)), r32(cfg_addr(far, 0)));
    check!(
        "hostile-pci-absent-functions",
        ids == (u32::MAX, u32::MAX),
        "vendor/device {ids:x?}"
    );
}

fn bar0(df: DeviceFunction) -> (u32, u32) {
    let cam = ecam();
    (cam.read_word(df, 0x10), cam.read_word(df, 0x14))
}

fn set_bar0(df: DeviceFunction, lo: u32, hi: u32) {
    let mut cam = ecam();
    cam.write_word(df, 0x10, lo);
    cam.write_word(df, 0x14, hi);
}

/// BAR0 of `d` through ports 0xcf8/0xcfc (when ECAM may be shadowed).
fn set_bar0_ports(df: DeviceFunction, lo: u32, hi: u32) {
    let sel = 0x8000_0000 | u32::from(df.device) << 11 | u32::from(df.function) << 8;
    svc::outl(0xcf8, sel | 0x10);
    svc::outl(0xcfc, lo);
    svc::outl(0xcf8, sel | 0x14);
    svc::outl(0xcfc, hi);
    svc::outl(0xcf8, 0);
}

/// Whether `d`'s common configuration answers at its BAR as before: the queue count reads back.
fn answers(d: &Dev) -> bool {
    r16(d.l.common + 0x12) == d.nq
}

/// BAR games on device `a`, with `b` another device whose BAR it is moved onto.
fn bar_games(a: &Dev, b: &Dev, ram_end: u64) {
    let (lo, hi) = bar0(a.df);
    let mut cam = ecam();
    // Sizing with decoding on, then an unaligned address: the low bits read back as zero.
    set_bar0(a.df, u32::MAX, u32::MAX);
    let sized = bar0(a.df);
    set_bar0(a.df, lo | 0x1230, hi);
    let unaligned = bar0(a.df);
    set_bar0(a.df, lo, hi);
    check!(
        "hostile-bar-sizing",
        sized.0 & !0xf == (!(a.bar_size as u32 - 1)) && unaligned == (lo, hi) && answers(a),
        "sized {sized:x?}, unaligned write read {unaligned:x?}"
    );
    // Over RAM: RAM stays RAM (reads and writes), and the device is back where it was after.
    let target = (ram_end / 2) & !(a.bar_size - 1);
    for off in (0..0x100).step_by(8) {
        w64(target + off, 0x5a5a_5a5a_0000_0000 | off);
    }
    set_bar0(a.df, target as u32, (target >> 32) as u32);
    w32(target + 0x2000, 0xdead_beef); // where the notify area would be
    let ram_ok = (0..0x100)
        .step_by(8)
        .all(|off| r32(target + off + 4) == 0x5a5a_5a5a && r32(target + off) as u64 == off)
        && r32(target + 0x2000) == 0xdead_beef;
    set_bar0(a.df, lo, hi);
    check!(
        "hostile-bar-over-ram",
        ram_ok && answers(a),
        "RAM at {target:#x} changed: {ram_ok}, device answers {}",
        answers(a)
    );
    // Over another device's BAR: that device keeps answering at its address.
    let (blo, bhi) = bar0(b.df);
    set_bar0(a.df, blo, bhi);
    let b_ok = answers(b);
    set_bar0(a.df, lo, hi);
    check!(
        "hostile-bar-over-other-bar",
        b_ok && answers(a) && answers(b),
        "{} answers while covered: {b_ok}; after: {} {}",
        b.name,
        answers(a),
        answers(b)
    );
    // Over the ECAM window (put back through the ports, in case ECAM were shadowed), past
    // the address space, over the LAPIC, and at 0.
    set_bar0(a.df, ECAM_BASE as u32, 0);
    let ecam_ok = cam.read_word(a.df, 0) & 0xffff == 0x1af4;
    set_bar0_ports(a.df, lo, hi);
    for (l, h) in [
        (0xfff0_0000, u32::MAX),
        (0xfee0_0000, 0),
        (0, 0),
        (OUTSIDE as u32, (OUTSIDE >> 32) as u32),
    ] {
        set_bar0(a.df, l, h);
        let _ = r32(0xfee0_0030);
    }
    set_bar0(a.df, lo, hi);
    check!(
        "hostile-bar-over-ecam-lapic-nowhere",
        ecam_ok && answers(a),
        "ECAM still answers while covered: {ecam_ok}, device answers {}",
        answers(a)
    );
    // Memory decoding toggled fast, with notifications in between.
    let cmd = cam.read_word(a.df, 4);
    for i in 0..200 {
        cam.write_word(a.df, 4, if i % 2 == 0 { cmd & !2 } else { cmd | 2 });
        a.notify(0);
    }
    cam.write_word(a.df, 4, cmd);
    // BARs that do not exist and the expansion ROM read back as zero after all-ones.
    let mut empty = true;
    for off in [0x18, 0x1c, 0x20, 0x24, 0x30] {
        cam.write_word(a.df, off, u32::MAX);
        empty &= cam.read_word(a.df, off) == 0;
        cam.write_word(a.df, off, 0);
    }
    check!(
        "hostile-bar-toggle-and-empty-bars",
        empty && answers(a),
        "empty BARs read non-zero: {}, device answers {}",
        !empty,
        answers(a)
    );
}

/// MSI-X: writes out of the table, unaligned, of every size, bad messages, PBA writes; a
/// queue vector beyond the table must read back NO_VECTOR.
fn msix_abuse(d: &Dev, p: &Pool) {
    let mut cam = ecam();
    let Some(cap) = root()
        .capabilities(d.df)
        .find(|c| c.id == 0x11)
        .map(|c| c.offset)
    else {
        return;
    };
    let ctl = cam.read_word(d.df, cap) >> 16;
    let n = u64::from(ctl & 0x7ff) + 1;
    let table = d.l.bar + u64::from(cam.read_word(d.df, cap + 4) & !7);
    let pba = d.l.bar + u64::from(cam.read_word(d.df, cap + 8) & !7);
    d.start_valid(p);
    // Enabled, function masked.
    cam.write_word(d.df, cap, 0xc000 << 16);
    let pba_before = r32(pba);
    for off in [2u64, 3, 5, 13, 15] {
        w32(table + off, 0xffff_ffff);
        w16(table + off, 0xffff);
        w8(table + off, 0xff);
    }
    w64(table + 12, u64::MAX); // across entries 0 and 1
    w64(table + 16 * n, u64::MAX); // just past the table
    w32(table + 16 * n + 0x100, 0xffff_ffff);
    for off in (0..16).step_by(4) {
        w32(pba + off, 0xffff_ffff);
    }
    w64(pba, u64::MAX);
    let pba_after = r32(pba);
    for off in 0..16 * n + 8 {
        let _ = r8(table + off);
    }
    // Bad messages: an address that is not the LAPIC's (high bits set, destination 0x45, a
    // CPU that does not exist), reserved data bits set; then unmasked.
    for e in 0..n {
        w32(table + 16 * e, 0x1234_5670);
        w32(table + 16 * e + 4, 0xffff_ffff);
        w32(table + 16 * e + 8, 0xffff_0000 | HARMLESS_VECTOR);
        w32(table + 16 * e + 12, 0);
    }
    let c = d.l.common;
    w16(c + 0x10, 0);
    w16(c + 0x16, 0);
    w16(c + 0x1a, 0x7fff);
    let beyond = r16(c + 0x1a);
    w16(c + 0x1a, 0);
    cam.write_word(d.df, cap, 0x8000 << 16);
    // Every queue kicked with a request: completions go to the bad message.
    for (i, m) in p.q[..d.queues() as usize].iter().enumerate() {
        m.set_desc(0, m.buf, 64, 2, 0);
        crate::hostile_virtio::publish(m, 0, 0);
        d.notify(i as u16);
    }
    smp::delay_us(20_000);
    cam.write_word(d.df, cap, 0);
    d.reset();
    check!(
        &alloc::format!("hostile-msix-{}", d.name),
        pba_after == pba_before && beyond == 0xffff && answers(d),
        "PBA {pba_before:#x} -> {pba_after:#x} after writes, vector 0x7fff reads {beyond:#x}"
    );
}

/// Random accesses of every size over the whole of `d`'s BAR (common and device
/// configuration, ISR, notify area, MSI-X table and PBA), its last bytes included.
fn bar_fuzz(d: &Dev, p: &Pool, rng: &mut Rng) {
    d.start_valid(p);
    let mut cam = ecam();
    for i in 0..600 * crate::hostile_suite::rounds() {
        let size = [1u64, 2, 4, 8][rng.below(4) as usize];
        let off = if i < 16 {
            d.bar_size - 1 - (i % 8)
        } else {
            rng.below(d.bar_size)
        };
        let a = d.l.bar + off;
        // Reset (status 0) from time to time, so writes land on a device in every state.
        if rng.below(50) == 0 {
            d.reset();
        }
        if rng.below(2) == 0 {
            cfg_write(a, size, rng.next());
        } else if size < 8 {
            let _ = cfg_read(a, size);
        }
    }
    if let Some(c) = root().capabilities(d.df).find(|c| c.id == 0x11) {
        cam.write_word(d.df, c.offset, 0);
        // The random writes left random messages in the table; a later enable must not send
        // this CPU an exception vector, so every entry gets a harmless one, masked.
        let n = u64::from((cam.read_word(d.df, c.offset) >> 16) & 0x7ff) + 1;
        let table = d.l.bar + u64::from(cam.read_word(d.df, c.offset + 4) & !7);
        for e in 0..n {
            w32(table + 16 * e, 0xfee0_0000);
            w32(table + 16 * e + 4, 0);
            w32(table + 16 * e + 8, HARMLESS_VECTOR);
            w32(table + 16 * e + 12, 1);
        }
    }
    d.reset();
    let (st, enabled) = d.start_valid(p);
    d.reset();
    check!(
        &alloc::format!("hostile-bar-fuzz-{}", d.name),
        st == 0xf && enabled == d.queues() && answers(d),
        "after the fuzz and a reset: status {st:#x}, {enabled} queues enabled"
    );
}

/// Random reads and writes of every width where no device decodes: the 32-bit PCI window
/// between BARs and the 256 MiB of the 64-bit window above the last BAR (and pmem's range).
/// Reads float high.
fn unassigned_mmio(devs: &[Dev], rng: &mut Rng) {
    let mut bars = Vec::new();
    // virtio-pmem's memory is no BAR: its device configuration says where it is.
    for d in devs.iter().filter(|d| d.name == "pmem") {
        let start = u64::from(r32(d.l.device)) | u64::from(r32(d.l.device + 4)) << 32;
        let size = u64::from(r32(d.l.device + 8)) | u64::from(r32(d.l.device + 12)) << 32;
        bars.push((start, start + size));
    }
    let mut r = root();
    let all: Vec<DeviceFunction> = r.enumerate_bus(0).map(|(df, _)| df).collect();
    for df in all {
        if let Ok(b) = r.bars(df) {
            for info in b.into_iter().flatten() {
                if let virtio_drivers::transport::pci::bus::BarInfo::Memory {
                    address, size, ..
                } = info
                {
                    bars.push((address, address + size));
                }
            }
        }
    }
    let top = bars.iter().map(|b| b.1).max().unwrap_or(0).max(1 << 32);
    let (mut n, mut not_ones) = (0, 0);
    while n < 400 {
        let a = if rng.below(2) == 0 {
            0xc000_0000 + rng.below(0x2800_0000)
        } else {
            top + rng.below(0x1000_0000)
        } & !7;
        if bars.iter().any(|&(s, e)| a + 8 > s && a < e) {
            continue;
        }
        let size = [1u64, 2, 4, 8][rng.below(4) as usize];
        cfg_write(a, size, rng.next());
        // SAFETY: an identity-mapped, uncached address in a PCI window that no BAR covers.
        let v = unsafe { core::ptr::read_volatile(a as *const u64) };
        if v != u64::MAX {
            not_ones += 1;
        }
        n += 1;
    }
    check!(
        "hostile-mmio-unassigned",
        not_ones == 0,
        "{not_ones} of {n} reads where no device decodes were not all ones (BARs {bars:x?})"
    );
}

pub(crate) fn run(devs: &[Dev], p: &Pool, ram_end: u64, rng: &mut Rng) {
    unassigned_mmio(devs, rng);
    for d in devs {
        bar_fuzz(d, p, rng);
    }
    let all: Vec<DeviceFunction> = root().enumerate_bus(0).map(|(df, _)| df).collect();
    for &df in &all {
        let name = alloc::format!("{:02x}", df.device);
        config_fuzz(df, &name, rng);
    }
    port_fuzz(rng, &all);
    if devs.len() >= 2 {
        bar_games(&devs[devs.len() - 1], &devs[0], ram_end);
    }
    for d in devs {
        msix_abuse(d, p);
    }
    println!("INFO hostile pci: {} functions", all.len());
    pass("hostile-pci-done");
}
