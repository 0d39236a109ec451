//! `test=acpimem`: memory hot plug as Linux does it with the original Cloud Hypervisor's ACPI
//! mechanism (`hotplug_method=acpi`). The memory hotplug controller `\_SB_.MHPC` (PNP0A06) is
//! decoded from the DSDT bytes: `OperationRegion (MHPR, SystemMemory, base, len)` and its
//! fields `MHBL`/`MHBH` (the selected slot's base), `MHLL`/`MHLH` (its length), `MHPX`, `MSEL`
//! (select a slot) and the flag bits `MEN_`, `MINS`, `MRMV`, `MEJ0`; the methods `MSCN`,
//! `MTFY`, `MSTA` and `MCRS`; and one memory device `Mxxx` (PNP0C80) per slot whose `_STA`
//! calls `MSTA` and `_CRS` calls `MCRS`. As for PCI and CPU hot plug (phpr.rs, pres.rs) there is
//! no AML interpreter: the guest checks that these objects are there and does what the methods
//! do on the registers itself.
//!
//! At the start it walks the slots (as Linux enumerates the PNP0C80 devices at boot) and
//! onlines every present one; then, for ever, on the GED's memory bit 0x10 (whose `_EVT` calls
//! `MSCN`) it re-verifies the memory it has onlined, and walks the slots as `MSCN` does: a slot
//! being inserted (`MINS`) is acknowledged by writing `MINS` and onlined. Onlining maps the
//! range write-back above 4 GiB (`paging::map_ram`) and writes, then reads back, a pattern of
//! the address in the first and last 8 bytes of every 4 KiB page. Once, on the first present
//! slot, it checks that an ejection (`MEJ0`) is refused: memory cannot be removed. With
//! `acpimem_busy=1` it also rewrites one word of every 2 MiB of onlined memory every 20 ms,
//! checking it still holds the previous round's value (so a live migration's dirty log over the
//! DIMMs is put to the test). See docs/test-guest.md for the lines it prints.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::phpr::{contains, devices, fields, method, name_int, op_region, HID_PNP0A06};
use crate::{fail, parse_u64, println, smp, svc};

/// GED event bit: memory devices changed.
const GED_MEMORY: u8 = 0x10;
const PAGE: u64 = 4096;
/// Linux's memory block (section) size on x86-64: hot-plugged ranges come in these.
const BLOCK: u64 = 128 << 20;
/// `acpimem_busy`: one word per this many bytes is rewritten every round.
const BUSY_STRIDE: u64 = 2 << 20;
/// `acpimem_busy`: a round every this many milliseconds, a report every `BUSY_REPORT` rounds.
const BUSY_MS: u64 = 20;
const BUSY_REPORT: u64 = 25;
/// Mixed into every pattern word ("acpimem").
const SEED: u64 = 0x0061_6370_696d_656d;

/// `_HID` EISAID ("PNP0C80"): NameOp, "_HID", DWordPrefix, the compressed ID.
const HID_PNP0C80: [u8; 10] = [0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0c, 0x80];

/// MHPC's register block: where MHPR lies, the byte offsets of its registers, and the byte and
/// masks of the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mhpc {
    pub base: u64,
    pub len: u64,
    pub mhbl: u64,
    pub mhbh: u64,
    pub mhll: u64,
    pub mhlh: u64,
    pub msel: u64,
    /// Byte offset of the flags byte (MEN_, MINS, MRMV and MEJ0 all lie in it).
    pub flags: u64,
    pub men: u8,
    pub mins: u8,
    pub mrmv: u8,
    pub mej0: u8,
}

/// Finds `\_SB_.MHPC` in the DSDT, checks its methods and decodes its register block.
pub fn find(aml: &[u8]) -> Result<Mhpc, String> {
    let dev = devices(aml)
        .find(|d| d.named(b"MHPC"))
        .ok_or("no Device (MHPC)")?;
    if !contains(dev.body, &HID_PNP0A06) {
        return Err("MHPC's _HID is not EISAID (\"PNP0A06\")".into());
    }
    for (m, uses) in [
        (b"MSCN", &["MSEL", "MINS", "MTFY"][..]),
        (b"MTFY", &[][..]),
        (b"MSTA", &["MSEL", "MEN_"][..]),
        (b"MCRS", &["MSEL", "MHBL", "MHBH", "MHLL", "MHLH"][..]),
    ] {
        let name = String::from_utf8_lossy(m);
        let code = method(dev.body, m).ok_or_else(|| format!("MHPC has no Method ({name})"))?;
        if let Some(w) = uses.iter().find(|w| !contains(code, w.as_bytes())) {
            return Err(format!("{name} does not use {w}"));
        }
    }
    let (space, base, len) =
        op_region(dev.body, b"MHPR").ok_or("MHPC has no OperationRegion (MHPR)")?;
    if space != 0 {
        return Err(format!(
            "MHPR is in address space {space}, not SystemMemory"
        ));
    }
    let all: Vec<_> = fields(dev.body, b"MHPR").collect();
    if all.is_empty() {
        return Err("MHPC has no Field (MHPR)".into());
    }
    let unit = |name: &[u8; 4]| {
        all.iter()
            .find_map(|(flags, units)| units.iter().find(|u| u.0 == *name).map(|u| (*flags, *u)))
    };
    let shown = |name: &[u8; 4]| String::from_utf8_lossy(name).into_owned();
    let dword = |name: &[u8; 4]| -> Result<u64, String> {
        match unit(name) {
            Some((flags, (_, bit, 32))) if flags & 0xf == 3 && bit % 32 == 0 => {
                let at = bit as u64 / 8;
                if at + 4 > len {
                    return Err(format!("{} beyond MHPR's {len} bytes", shown(name)));
                }
                Ok(at)
            }
            Some((flags, (_, bit, width))) => Err(format!(
                "{} at bit {bit}, {width} bits, field flags {flags:#x}: not a DWordAcc dword",
                shown(name)
            )),
            None => Err(format!("no {} in the Fields of MHPR", shown(name))),
        }
    };
    let mut byte = None;
    let mut masks = [0u8; 4];
    for (i, name) in [b"MEN_", b"MINS", b"MRMV", b"MEJ0"].into_iter().enumerate() {
        let (flags, (_, bit, width)) =
            unit(name).ok_or_else(|| format!("no {} in the Fields of MHPR", shown(name)))?;
        // ByteAcc (1), WriteAsZeros (2 << 5): a flag written alone leaves the others alone.
        if flags & 0xf != 1 || (flags >> 5) & 3 != 2 || width != 1 {
            return Err(format!(
                "{}: {width} bits, field flags {flags:#x}: not a ByteAcc WriteAsZeros bit",
                shown(name)
            ));
        }
        if *byte.get_or_insert(bit / 8) != bit / 8 {
            return Err("MEN_, MINS, MRMV and MEJ0 are not in one byte".into());
        }
        masks[i] = 1 << (bit % 8);
    }
    let flags = byte.expect("four flags") as u64;
    if flags >= len {
        return Err(format!("the flags at {flags}: beyond MHPR's {len} bytes"));
    }
    Ok(Mhpc {
        base,
        len,
        mhbl: dword(b"MHBL")?,
        mhbh: dword(b"MHBH")?,
        mhll: dword(b"MHLL")?,
        mhlh: dword(b"MHLH")?,
        msel: dword(b"MSEL")?,
        flags,
        men: masks[0],
        mins: masks[1],
        mrmv: masks[2],
        mej0: masks[3],
    })
}

/// Checks MHPC's memory devices: `Mxxx` (`_HID` PNP0C80, `_UID` xxx, `_STA` calling `MSTA`,
/// `_CRS` calling `MCRS`) with `_UID`s 0..n, each notified by `MTFY`. Returns n.
pub fn memory_devices(aml: &[u8]) -> Result<u32, String> {
    let dev = devices(aml)
        .find(|d| d.named(b"MHPC"))
        .ok_or("no Device (MHPC)")?;
    let mtfy = method(dev.body, b"MTFY").ok_or("MHPC has no Method (MTFY)")?;
    let mut uids = Vec::new();
    for d in devices(dev.body).filter(|d| contains(d.body, &HID_PNP0C80)) {
        let name = String::from_utf8_lossy(d.segs.last().expect("named")).into_owned();
        let uid = name_int(d.body, b"_UID")
            .and_then(|u| u32::try_from(u).ok())
            .ok_or_else(|| format!("{name} has no integer _UID"))?;
        if name != format!("M{uid:03X}") {
            return Err(format!("{name} has _UID {uid}"));
        }
        if !method(d.body, b"_STA").is_some_and(|m| contains(m, b"MSTA")) {
            return Err(format!("{name} has no _STA calling MSTA"));
        }
        if !method(d.body, b"_CRS").is_some_and(|m| contains(m, b"MCRS")) {
            return Err(format!("{name} has no _CRS calling MCRS"));
        }
        if !contains(mtfy, name.as_bytes()) {
            return Err(format!("MTFY does not notify {name}"));
        }
        uids.push(uid);
    }
    uids.sort_unstable();
    if uids.is_empty() || uids.iter().enumerate().any(|(i, &u)| u != i as u32) {
        return Err(format!("the PNP0C80 devices' _UIDs are not 0..n: {uids:?}"));
    }
    Ok(uids.len() as u32)
}

/// Checks that the GED's (ACPI0013) `_EVT` calls `\_SB_.MHPC.MSCN`.
fn ged_calls_mscn(aml: &[u8]) -> Result<(), String> {
    let ged = devices(aml)
        .find(|d| contains(d.body, b"ACPI0013"))
        .ok_or("no ACPI0013 device")?;
    let evt = method(ged.body, b"_EVT").ok_or("the GED has no _EVT")?;
    if !contains(evt, b"_SB_MHPCMSCN") {
        return Err("the GED's _EVT does not call \\_SB_.MHPC.MSCN".into());
    }
    Ok(())
}

fn pattern(a: u64) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED
}

/// The words of `[base, base + size)` the guest writes: the first and last of every page.
fn words(base: u64, size: u64) -> impl Iterator<Item = u64> {
    (base..base + size)
        .step_by(PAGE as usize)
        .flat_map(|p| [p, p + PAGE - 8])
}

/// Reads the words of `[base, base + size)` back; the first one that does not hold its pattern.
fn check(base: u64, size: u64) -> Result<(), String> {
    for w in words(base, size) {
        // SAFETY: an onlined DIMM, mapped by `map_ram`; only this scenario uses it.
        let v = unsafe { read_volatile(w as *const u64) };
        if v != pattern(w) {
            return Err(format!("{w:#x} holds {v:#x}, not {:#x}", pattern(w)));
        }
    }
    Ok(())
}

/// The words `acpimem_busy` rewrites: the second of every 2 MiB (not one `words` has).
fn busy_words(base: u64, size: u64) -> impl Iterator<Item = u64> {
    (base..base + size)
        .step_by(BUSY_STRIDE as usize)
        .map(|c| c + 8)
}

fn busy_pattern(a: u64, round: u64) -> u64 {
    pattern(a) ^ round.wrapping_mul(0x0100_0000_01b3)
}

struct AcpiMem {
    m: Mhpc,
    slots: u32,
    /// Each slot's range once onlined.
    online: Vec<Option<(u64, u64)>>,
    /// Ranges a DIMM must not overlap: the memory map's RAM and the 64-bit PCI window.
    taken: Vec<(u64, u64)>,
    eject_checked: bool,
    /// `acpimem_busy`: the last round whose words are in the onlined DIMMs.
    round: u64,
}

impl AcpiMem {
    fn reg(&self, off: u64) -> u64 {
        self.m.base + off
    }

    /// MSEL = `slot`.
    fn select(&self, slot: u32) {
        // SAFETY: MSEL in MHPC's register block (identity-mapped MMIO below 4 GiB).
        unsafe { write_volatile(self.reg(self.m.msel) as *mut u32, slot) }
    }

    fn read32(&self, off: u64) -> u32 {
        // SAFETY: a register of MHPC's block.
        unsafe { read_volatile(self.reg(off) as *const u32) }
    }

    /// The selected slot's flags byte.
    fn flags(&self) -> u8 {
        // SAFETY: the flags byte of MHPC's block.
        unsafe { read_volatile(self.reg(self.m.flags) as *const u8) }
    }

    /// Writes the selected slot's flags byte (WriteAsZeros: only the bits in `v` act).
    fn write_flags(&self, v: u8) {
        // SAFETY: as in `flags`.
        unsafe { write_volatile(self.reg(self.m.flags) as *mut u8, v) }
    }

    /// The selected slot's range, as `MCRS` builds it: (base, length).
    fn range(&self) -> (u64, u64) {
        let base = u64::from(self.read32(self.m.mhbh)) << 32 | u64::from(self.read32(self.m.mhbl));
        let len = u64::from(self.read32(self.m.mhlh)) << 32 | u64::from(self.read32(self.m.mhll));
        (base, len)
    }

    fn total(&self) -> u64 {
        self.online.iter().flatten().map(|r| r.1).sum()
    }

    /// Checks the selected slot `slot`'s range, maps it and writes and reads back its pattern.
    fn online(&mut self, slot: u32) -> Result<(u64, u64), String> {
        let (base, len) = self.range();
        if len == 0 || base % BLOCK != 0 || len % BLOCK != 0 {
            return Err(format!(
                "range {base:#x}+{len:#x}: not whole 128 MiB memory blocks"
            ));
        }
        let end = base
            .checked_add(len)
            .ok_or_else(|| format!("range {base:#x}+{len:#x} wraps"))?;
        let overlaps = |&(b, l): &(u64, u64)| b < end && base < b + l;
        if let Some((b, l)) = self.taken.iter().find(|r| overlaps(r)) {
            return Err(format!(
                "range {base:#x}+{len:#x} overlaps RAM or the PCI window at {b:#x}+{l:#x}"
            ));
        }
        if let Some((i, (b, l))) = self
            .online
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.filter(overlaps).map(|r| (i, r)))
        {
            return Err(format!(
                "range {base:#x}+{len:#x} overlaps slot {i} at {b:#x}+{l:#x}"
            ));
        }
        crate::paging::map_ram(base, len)
            .map_err(|e| format!("mapping {base:#x}+{len:#x}: {e:?}"))?;
        let t0 = svc::rdtsc();
        for w in words(base, len) {
            // SAFETY: the DIMM's memory, just mapped; nothing else uses it.
            unsafe { write_volatile(w as *mut u64, pattern(w)) };
        }
        check(base, len)?;
        for w in busy_words(base, len) {
            // SAFETY: as above.
            unsafe { write_volatile(w as *mut u64, busy_pattern(w, self.round)) };
        }
        let us = (svc::rdtsc() - t0) / smp::TSC_PER_US;
        println!(
            "INFO acpimem slot={slot} written and read back in about {} ms",
            us / 1000
        );
        self.online[slot as usize] = Some((base, len));
        Ok((base, len))
    }

    /// Onlines the selected slot and prints `ACPIMEM <what> slot=…` (or a FAIL line).
    fn online_and_report(&mut self, slot: u32, what: &str) {
        match self.online(slot) {
            Ok((base, len)) => {
                println!("ACPIMEM {what} slot={slot} base={base:#x} size={len:#x} ok");
                self.check_eject(slot);
            }
            Err(e) => fail("acpimem-online", format_args!("slot={slot}: {e}")),
        }
    }

    /// Once: an ejection of present `slot` is refused (it still holds memory, the same range).
    fn check_eject(&mut self, slot: u32) {
        if self.eject_checked {
            return;
        }
        self.eject_checked = true;
        self.select(slot);
        let before = self.range();
        self.write_flags(self.m.mej0);
        self.select(slot);
        let f = self.flags();
        let after = self.range();
        if f & self.m.men != 0 && after == before {
            println!("INFO acpimem eject refused ok");
        } else {
            fail(
                "acpimem-eject",
                format_args!(
                    "slot={slot}: after MEJ0 flags {f:#x}, range {:#x}+{:#x} (was {:#x}+{:#x})",
                    after.0, after.1, before.0, before.1
                ),
            );
        }
    }

    /// At boot: every present slot (as Linux enumerates the PNP0C80 devices), onlined.
    fn boot_scan(&mut self) {
        for slot in 0..self.slots {
            self.select(slot);
            let f = self.flags();
            if f & self.m.mins != 0 {
                println!("INFO acpimem slot={slot} inserting at boot: acknowledged");
                self.write_flags(self.m.mins);
            }
            if f & self.m.men != 0 {
                self.select(slot);
                self.online_and_report(slot, "present");
            }
        }
    }

    /// Every onlined DIMM still holds its pattern.
    fn verify(&self) {
        for (slot, r) in self.online.iter().enumerate() {
            if let Some((base, len)) = *r {
                if let Err(e) = check(base, len) {
                    fail("acpimem-verify", format_args!("slot={slot}: {e}"));
                    return;
                }
            }
        }
        println!("INFO acpimem verify ok total={}", self.total());
    }

    /// One `acpimem_busy` round: each busy word of the onlined DIMMs must hold the last round's
    /// value, then gets the next one's.
    fn busy_round(&mut self) {
        let (last, next) = (self.round, self.round + 1);
        let mut bad = None;
        for (base, len) in self.online.iter().flatten() {
            for w in busy_words(*base, *len) {
                // SAFETY: an onlined DIMM, mapped by `map_ram`; only this scenario uses it.
                let v = unsafe { read_volatile(w as *const u64) };
                if v != busy_pattern(w, last) && bad.is_none() {
                    bad = Some((w, v));
                }
                // SAFETY: as above.
                unsafe { write_volatile(w as *mut u64, busy_pattern(w, next)) };
            }
        }
        self.round = next;
        if let Some((w, v)) = bad {
            fail(
                "acpimem-busy",
                format_args!(
                    "round {next}: {w:#x} holds {v:#x}, not round {last}'s {:#x}",
                    busy_pattern(w, last)
                ),
            );
        } else if next % BUSY_REPORT == 0 {
            println!("INFO acpimem round={next} ok total={}", self.total());
        }
    }

    fn on_bits(&mut self, bits: u8) {
        if bits & !GED_MEMORY != 0 {
            println!("ACPIMEM EVENT bits={bits:#x}");
        }
        if bits & GED_MEMORY != 0 {
            self.scan();
        }
    }

    /// `MSCN`: each slot being inserted is acknowledged (MINS written) and onlined.
    fn scan(&mut self) {
        self.verify();
        let mut added = false;
        for slot in 0..self.slots {
            self.select(slot);
            let f = self.flags();
            let known = self.online[slot as usize].is_some();
            if f & self.m.mrmv != 0 {
                self.write_flags(self.m.mrmv);
                fail(
                    "acpimem-remove",
                    format_args!("slot={slot}: MRMV set, but memory cannot be removed"),
                );
            }
            if f & self.m.mins != 0 {
                self.write_flags(self.m.mins);
                self.select(slot);
                let again = self.flags();
                if again & self.m.mins != 0 {
                    fail(
                        "acpimem-ack",
                        format_args!("slot={slot}: MINS still set ({again:#x}) after writing it"),
                    );
                }
                if f & self.m.men == 0 {
                    fail(
                        "acpimem-scan",
                        format_args!("slot={slot}: inserting (flags {f:#x}) but not present"),
                    );
                } else if known {
                    fail(
                        "acpimem-scan",
                        format_args!("slot={slot}: inserting again, but it is online already"),
                    );
                } else {
                    self.select(slot);
                    self.online_and_report(slot, "added");
                    added = true;
                }
            } else if f & self.m.men != 0 && !known {
                fail(
                    "acpimem-scan",
                    format_args!("slot={slot}: present (flags {f:#x}) but never inserted"),
                );
            } else if f & self.m.men == 0 && known {
                fail(
                    "acpimem-scan",
                    format_args!("slot={slot}: online, but no longer present (flags {f:#x})"),
                );
            }
        }
        if added {
            println!("INFO acpimem total={}", self.total());
        }
    }
}

pub fn scenario_acpimem(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let busy = boot.arg("acpimem_busy").and_then(parse_u64).unwrap_or(0) != 0;
    let Some(a) = acpi else {
        fail("acpimem", format_args!("no ACPI tables"));
        return;
    };
    let Some(ged_port) = a.ged_port else {
        fail(
            "acpimem",
            format_args!("no ACPI0013 device with a SystemIO OperationRegion in the DSDT"),
        );
        return;
    };
    let Some((addr, len)) = a.dsdt else {
        fail("acpimem", format_args!("no DSDT"));
        return;
    };
    // SAFETY: the DSDT the `acpi` crate validated, identity mapped.
    let dsdt = unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) };
    let (m, slots) = match find(dsdt).and_then(|m| Ok((m, memory_devices(dsdt)?))) {
        Ok(x) => x,
        Err(e) => {
            fail("acpimem-mhpc", format_args!("{e}"));
            return;
        }
    };
    if let Err(e) = ged_calls_mscn(dsdt) {
        fail("acpimem-ged", format_args!("{e}"));
    }
    println!(
        "INFO acpimem mhpr={:#x}+{:#x} mhbl={:#x} mhbh={:#x} mhll={:#x} mhlh={:#x} msel={:#x} \
         flags={:#x} men={:#x} mins={:#x} mrmv={:#x} mej0={:#x} devices={slots} ged_port={ged_port:#x}",
        m.base, m.len, m.mhbl, m.mhbh, m.mhll, m.mhlh, m.msel, m.flags, m.men, m.mins, m.mrmv,
        m.mej0
    );
    let mut taken: Vec<(u64, u64)> = boot
        .memmap
        .iter()
        .filter(|r| r.kind == 1)
        .map(|r| (r.addr, r.size))
        .collect();
    if let Some(w) = a.pci_windows.mmio64 {
        taken.push((w.start, w.size));
    }
    crate::route_ged_irq();
    let mut mem = AcpiMem {
        m,
        slots,
        online: alloc::vec![None; slots as usize],
        taken,
        eject_checked: false,
        round: 0,
    };
    mem.boot_scan();
    let present = mem.online.iter().flatten().count();
    println!("INFO acpimem slots={present} total={}", mem.total());
    println!("READY");
    if !busy {
        crate::ged_loop(ged_port, "acpimem-irq", |bits| mem.on_bits(bits))
    }
    busy_loop(&mut mem, ged_port)
}

/// `crate::ged_loop` with a busy round every `BUSY_MS`: waits for the GED's interrupt at most
/// that long, reads its register (which clears it) and hands non-zero bits on; bits pending
/// without an interrupt within a further 200 ms print `FAIL acpimem-irq: …`.
fn busy_loop(mem: &mut AcpiMem, ged_port: u16) -> ! {
    let mut taken = svc::irq_count(svc::IRQ_VECTOR);
    loop {
        let n = svc::wait_vector(svc::IRQ_VECTOR, taken + 1, BUSY_MS);
        let mut irq = n > taken;
        taken = n;
        let bits = svc::inb(ged_port);
        if bits != 0 {
            if !irq {
                let n = svc::wait_vector(svc::IRQ_VECTOR, taken + 1, 200);
                irq = n > taken;
                taken = n;
                if !irq {
                    fail(
                        "acpimem-irq",
                        format_args!("GED bits {bits:#x} pending without an interrupt"),
                    );
                }
            }
            mem.on_bits(bits);
        }
        mem.busy_round();
    }
}
