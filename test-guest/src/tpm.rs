//! `test=tpm`: the TPM 2.0 of `--tpm` (CRB interface). Finds the `TPM2` table (listed by the
//! `acpi` crate, read from the XSDT), drives the CRB registers as Linux's `tpm_crb` does:
//! request locality 0, cmdReady, the command into the buffer, `CTRL_START` until it clears;
//! runs TPM2_Startup(SU_CLEAR) (0, or TPM_RC_INITIALIZE when it already ran) and
//! TPM2_GetRandom(16), and prints `TPM random=<32 hex digits>` and `TPM ok`.

use core::ptr::{read_volatile, write_volatile};

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::{check, fail, pass, println};

const LOC_CTRL: u64 = 0x08;
const LOC_STS: u64 = 0x0c;
const INTF_ID: u64 = 0x30;
const CTRL_REQ: u64 = 0x40;
const CTRL_STS: u64 = 0x44;
const CTRL_START: u64 = 0x4c;
const CMD_SIZE: u64 = 0x58;
const CMD_LADDR: u64 = 0x5c;
const CMD_HADDR: u64 = 0x60;
const RSP_SIZE: u64 = 0x64;
const RSP_ADDR: u64 = 0x68;

const STARTUP_CLEAR: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0];
const GET_RANDOM_16: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];
const TPM_RC_INITIALIZE: u32 = 0x100;
/// Register polls before giving up (each is an MMIO exit, tens of µs).
const POLLS: u32 = 100_000;

fn rd32(addr: u64) -> u32 {
    // SAFETY: the CRB page and the ACPI tables are identity mapped below 4 GiB.
    unsafe { read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as rd32.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn rd64(addr: u64) -> u64 {
    u64::from(rd32(addr)) | u64::from(rd32(addr + 4)) << 32
}

/// The `TPM2` table's (control area address, start method), walking RSDP → XSDT.
fn tpm2_table(rsdp: u64) -> Option<(u64, u32)> {
    if rsdp == 0 {
        return None;
    }
    let xsdt = rd64(rsdp + 24);
    let len = u64::from(rd32(xsdt + 4));
    let mut entry = xsdt + 36;
    while entry + 8 <= xsdt + len {
        let table = rd64(entry);
        if rd32(table) == u32::from_le_bytes(*b"TPM2") {
            return Some((rd64(table + 40), rd32(table + 48)));
        }
        entry += 8;
    }
    None
}

/// Waits until `(reg & mask) == want`.
fn poll(reg: u64, mask: u32, want: u32) -> bool {
    (0..POLLS).any(|_| rd32(reg) & mask == want)
}

/// Runs one command: the response's bytes (header included), or why not.
fn execute(base: u64, cmd: &[u8]) -> Result<alloc::vec::Vec<u8>, &'static str> {
    wr32(base + CTRL_REQ, 1);
    if !poll(base + CTRL_REQ, 1, 0) || !poll(base + CTRL_STS, 2, 0) {
        return Err("cmdReady not taken");
    }
    let (cmd_addr, rsp_addr) = (
        u64::from(rd32(base + CMD_LADDR)) | u64::from(rd32(base + CMD_HADDR)) << 32,
        rd64(base + RSP_ADDR),
    );
    if (rd32(base + CMD_SIZE) as usize) < cmd.len() || rd32(base + RSP_SIZE) < 10 {
        return Err("buffer too small");
    }
    for (i, b) in cmd.iter().enumerate() {
        // SAFETY: the command buffer lies in the CRB page.
        unsafe { write_volatile((cmd_addr + i as u64) as *mut u8, *b) };
    }
    wr32(base + CTRL_START, 1);
    if !poll(base + CTRL_START, 1, 0) {
        return Err("CTRL_START never cleared");
    }
    let rd8 = |i: u64| unsafe { read_volatile((rsp_addr + i) as *const u8) };
    let len = u32::from_be_bytes([rd8(2), rd8(3), rd8(4), rd8(5)]);
    if !(10..=rd32(base + RSP_SIZE)).contains(&len) {
        return Err("bad response size");
    }
    Ok((0..u64::from(len)).map(rd8).collect())
}

fn rc(rsp: &[u8]) -> u32 {
    u32::from_be_bytes([rsp[6], rsp[7], rsp[8], rsp[9]])
}

pub fn scenario_tpm(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    check!(
        "tpm-acpi-listed",
        acpi.is_some_and(|a| a.signatures.iter().any(|s| s == b"TPM2")),
        "the acpi crate lists no TPM2 table"
    );
    let Some((control, method)) = tpm2_table(boot.rsdp) else {
        fail("tpm-table", format_args!("no TPM2 table in the XSDT"));
        return;
    };
    println!("INFO TPM2 control={control:#x} start_method={method}");
    check!(
        "tpm-start-method",
        method == 7,
        "start method {method}, want 7 (CRB)"
    );
    let base = control - CTRL_REQ;
    let intf = rd32(base + INTF_ID);
    check!("tpm-intf-crb", intf & 0xf == 1, "INTF_ID {intf:#x}");

    wr32(base + LOC_CTRL, 1);
    if !poll(base + LOC_STS, 1, 1) {
        fail("tpm-locality", format_args!("locality 0 not granted"));
        return;
    }
    pass("tpm-locality");

    let failed = crate::FAILED.load(core::sync::atomic::Ordering::Relaxed);
    match execute(base, &STARTUP_CLEAR) {
        Ok(r) => check!(
            "tpm-startup",
            rc(&r) == 0 || rc(&r) == TPM_RC_INITIALIZE,
            "TPM2_Startup answered {:#x}",
            rc(&r)
        ),
        Err(e) => fail("tpm-startup", format_args!("{e}")),
    }
    match execute(base, &GET_RANDOM_16) {
        Ok(r) if rc(&r) == 0 && r.len() == 28 && r[10..12] == [0, 16] => {
            let mut hex = alloc::string::String::new();
            for b in &r[12..] {
                use core::fmt::Write;
                let _ = write!(hex, "{b:02x}");
            }
            println!("TPM random={hex}");
            pass("tpm-getrandom");
        }
        Ok(r) => fail(
            "tpm-getrandom",
            format_args!("rc {:#x}, {} bytes: {r:02x?}", rc(&r), r.len()),
        ),
        Err(e) => fail("tpm-getrandom", format_args!("{e}")),
    }
    // Go idle and give the locality back, as a driver does between commands.
    wr32(base + CTRL_REQ, 2);
    wr32(base + LOC_CTRL, 2);
    if crate::FAILED.load(core::sync::atomic::Ordering::Relaxed) == failed {
        println!("TPM ok");
    }
}
