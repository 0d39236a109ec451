//! `test=acpimem`: memory hot plug as Linux does it with the original Cloud Hypervisor's ACPI
//! mechanism (`hotplug_method=acpi`). The memory hotplug controller `\_SB_.MHPC` (PNP0A06) is
//! found in the namespace the AML interpreter built (aml.rs): the fields `MSEL` (select a slot)
//! and the flag bits `MEN_`, `MINS`, `MRMV`, `MEJ0` on its `MHPR` region; the methods `MSCN`,
//! `MTFY`, `MSTA` and `MCRS`; and one memory device `Mxxx` (PNP0C80) per slot, whose `_STA`
//! and `_CRS` the guest evaluates with the interpreter (a slot's range is what its `_CRS`
//! returns, a QWordMemory descriptor). `MSCN` ends in `Notify`, which the interpreter cannot
//! run, so the guest walks the slots as `MSCN` does through the fields.
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

use aml_interp::aml::resource::{AddressSpaceResourceType, Resource};

use crate::acpi_sys::AcpiInfo;
use crate::aml::{hid, Aml, Field};
use crate::bootinfo::BootInfo;
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

/// MHPC's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mhpc {
    pub msel: Field,
    pub men: Field,
    pub mins: Field,
    pub mrmv: Field,
    pub mej0: Field,
}

/// Finds `\_SB_.MHPC`, its methods and its registers.
pub fn find(aml: &Aml) -> Result<Mhpc, String> {
    aml.check_device("\\_SB_.MHPC", "PNP0A06", &["MSCN", "MTFY", "MSTA", "MCRS"])?;
    let f = |n: &str| aml.field(&format!("\\_SB_.MHPC.{n}"));
    let m = Mhpc {
        msel: f("MSEL")?,
        men: f("MEN_")?,
        mins: f("MINS")?,
        mrmv: f("MRMV")?,
        mej0: f("MEJ0")?,
    };
    for (n, fl) in [
        ("MEN_", m.men),
        ("MINS", m.mins),
        ("MRMV", m.mrmv),
        ("MEJ0", m.mej0),
    ] {
        if fl.bits != 1 {
            return Err(format!("{n} has {} bits", fl.bits));
        }
    }
    for n in ["MHBL", "MHBH", "MHLL", "MHLH"] {
        f(n)?;
    }
    Ok(m)
}

/// MHPC's memory devices: `Mxxx` (`_HID` PNP0C80, `_UID` xxx, `_STA`, `_CRS`) with `_UID`s
/// 0..n. Returns their paths, by `_UID`.
pub fn memory_devices(aml: &Aml) -> Result<Vec<String>, String> {
    let mut devs = Vec::new();
    for path in aml.devices("\\_SB_.MHPC")? {
        if hid(aml, &path)? != "PNP0C80" {
            continue;
        }
        let uid = aml.int(&format!("{path}._UID"))?;
        if !path.ends_with(&format!("M{uid:03X}")) {
            return Err(format!("{path} has _UID {uid}"));
        }
        for m in ["_STA", "_CRS"] {
            if !aml.exists(&format!("{path}.{m}")) {
                return Err(format!("{path} has no {m}"));
            }
        }
        devs.push((uid, path));
    }
    devs.sort();
    if devs.is_empty() || devs.iter().enumerate().any(|(i, d)| d.0 != i as u64) {
        let uids: Vec<u64> = devs.iter().map(|d| d.0).collect();
        return Err(format!("the PNP0C80 devices' _UIDs are not 0..n: {uids:?}"));
    }
    Ok(devs.into_iter().map(|d| d.1).collect())
}

/// The GED (ACPI0013) has `_EVT` (which calls `MSCN` on bit 0x10; the interpreter cannot run
/// it, see aml.rs).
fn ged_has_evt(aml: &Aml) -> Result<(), String> {
    for dev in aml.devices("\\_SB_")? {
        if hid(aml, &dev).is_ok_and(|h| h == "ACPI0013") {
            return if aml.exists(&format!("{dev}._EVT")) {
                Ok(())
            } else {
                Err(format!("{dev} has no _EVT"))
            };
        }
    }
    Err("no ACPI0013 device".into())
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
    aml: Aml,
    m: Mhpc,
    /// Each slot's device, `\_SB_.MHPC.Mxxx`.
    devs: Vec<String>,
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
    /// MSEL = `slot`.
    fn select(&self, slot: u32) {
        self.m.msel.write(u64::from(slot));
    }

    /// `Mxxx._STA`, evaluated: present (0xf) or not (0).
    fn present(&self, slot: u32) -> Result<bool, String> {
        let path = format!("{}._STA", self.devs[slot as usize]);
        match self.aml.int(&path)? {
            0xf => Ok(true),
            0 => Ok(false),
            v => Err(format!("{path} = {v:#x}")),
        }
    }

    /// `Mxxx._CRS`, evaluated: the one 64-bit memory range it describes, (base, length).
    fn range(&self, slot: u32) -> Result<(u64, u64), String> {
        let path = format!("{}._CRS", self.devs[slot as usize]);
        let res = self.aml.resources(&path)?;
        match res.as_slice() {
            [Resource::AddressSpace(d)]
                if matches!(d.resource_type, AddressSpaceResourceType::MemoryRange) =>
            {
                Ok((d.address_range.0, d.length))
            }
            other => Err(format!("{path}: {other:?}, not one memory range")),
        }
    }

    fn total(&self) -> u64 {
        self.online.iter().flatten().map(|r| r.1).sum()
    }

    /// Checks the selected slot `slot`'s range, maps it and writes and reads back its pattern.
    fn online(&mut self, slot: u32) -> Result<(u64, u64), String> {
        let (base, len) = self.range(slot)?;
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
        // The memory devices have no _EJ0 (memory cannot be removed); the guest tries the
        // register anyway.
        let before = self.range(slot);
        self.select(slot);
        self.m.mej0.write(1);
        let (present, after) = (self.present(slot), self.range(slot));
        match (&present, &after, &before) {
            (Ok(true), Ok(a), Ok(b)) if a == b => println!("INFO acpimem eject refused ok"),
            _ => fail(
                "acpimem-eject",
                format_args!(
                    "slot={slot}: after MEJ0, present {present:?}, range {after:x?} (was {before:x?})"
                ),
            ),
        }
    }

    /// At boot: every present slot (as Linux enumerates the PNP0C80 devices), onlined.
    fn boot_scan(&mut self) {
        for slot in 0..self.slots {
            self.select(slot);
            if self.m.mins.read() != 0 {
                println!("INFO acpimem slot={slot} inserting at boot: acknowledged");
                self.m.mins.write(1);
            }
            match self.present(slot) {
                Ok(true) => self.online_and_report(slot, "present"),
                Ok(false) => {}
                Err(e) => fail("acpimem-sta", format_args!("{e}")),
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
            let (mut ins, rmv) = (self.m.mins.read() != 0, self.m.mrmv.read() != 0);
            let known = self.online[slot as usize].is_some();
            if rmv {
                self.m.mrmv.write(1);
                fail(
                    "acpimem-remove",
                    format_args!("slot={slot}: MRMV set, but memory cannot be removed"),
                );
            }
            let present = match self.present(slot) {
                Ok(p) => p,
                Err(e) => {
                    fail("acpimem-sta", format_args!("{e}"));
                    continue;
                }
            };
            // MINS and `_STA` are two reads: a DIMM plugged between them is present with MINS
            // set (the VMM sets both at once), and its own GED event follows. Take it now.
            if present && !known && !ins {
                self.select(slot);
                ins = self.m.mins.read() != 0;
            }
            if ins {
                self.select(slot);
                self.m.mins.write(1);
                self.select(slot);
                if self.m.mins.read() != 0 {
                    fail(
                        "acpimem-ack",
                        format_args!("slot={slot}: MINS still set after writing it"),
                    );
                }
            }
            if ins {
                if !present {
                    fail(
                        "acpimem-scan",
                        format_args!("slot={slot}: inserting but _STA says not present"),
                    );
                } else if known {
                    fail(
                        "acpimem-scan",
                        format_args!("slot={slot}: inserting again, but it is online already"),
                    );
                } else {
                    self.online_and_report(slot, "added");
                    added = true;
                }
            } else if present && !known {
                fail(
                    "acpimem-scan",
                    format_args!("slot={slot}: present but never inserted"),
                );
            } else if !present && known {
                fail(
                    "acpimem-scan",
                    format_args!("slot={slot}: online, but no longer present"),
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
    let aml = match Aml::load(a.rsdp_addr) {
        Ok(aml) => aml,
        Err(e) => {
            fail("acpimem-aml", format_args!("{e}"));
            return;
        }
    };
    let (m, devs) = match find(&aml).and_then(|m| Ok((m, memory_devices(&aml)?))) {
        Ok(x) => x,
        Err(e) => {
            fail("acpimem-mhpc", format_args!("{e}"));
            return;
        }
    };
    if let Err(e) = ged_has_evt(&aml) {
        fail("acpimem-ged", format_args!("{e}"));
    }
    let slots = devs.len() as u32;
    println!(
        "INFO acpimem mhpr={:#x} msel={:#x} men={:#x}.{} mins={:#x}.{} mrmv={:#x}.{} mej0={:#x}.{} \
         devices={slots} ged_port={ged_port:#x}",
        m.msel.region,
        m.msel.addr,
        m.men.addr,
        m.men.bit,
        m.mins.addr,
        m.mins.bit,
        m.mrmv.addr,
        m.mrmv.bit,
        m.mej0.addr,
        m.mej0.bit
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
        aml,
        m,
        devs,
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
