//! SMBIOS tables (DMTF DSP0134) describing the machine to firmware and guests, as the original
//! writes them: an SMBIOS 3.0 (64-bit, `_SM3_`) entry point at `layout::SMBIOS_START`, the
//! structure table right after it, version 3.2.0. Structures, in order:
//!
//! - type 0 (BIOS Information): vendor "cloud-hypervisor", version "0", characteristics "PCI
//!   supported", extension byte 2 "virtual machine";
//! - type 1 (System Information): manufacturer "Cloud Hypervisor", product "cloud-hypervisor"
//!   unless configured, UUID all zeros unless configured, wake-up type 2;
//! - type 3 (System Enclosure), only with a chassis asset tag;
//! - type 11 (OEM Strings), only with OEM strings;
//! - type 127 (End of Table).
//!
//! Handles count from 1 in that order. Every structure is followed by its string set (the
//! strings, each NUL-terminated, then one more NUL; two NULs when it has none).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;

/// Type 0's vendor and version strings.
pub const BIOS_VENDOR: &str = "cloud-hypervisor";
pub const BIOS_VERSION: &str = "0";
/// Type 1's strings when the configuration names none.
pub const DEFAULT_SYSTEM_MANUFACTURER: &str = "Cloud Hypervisor";
pub const DEFAULT_SYSTEM_PRODUCT_NAME: &str = "cloud-hypervisor";

/// The 3.0 entry point's anchor.
pub const SM3_ANCHOR: &[u8; 5] = b"_SM3_";
/// Size of the SMBIOS 3.0 entry point structure.
pub const ENTRY_POINT_LEN: usize = 0x18;
/// The specification version the tables follow (major, minor, docrev).
pub const VERSION: (u8, u8, u8) = (3, 2, 0);
/// Entry point structure revision 1: the SMBIOS 3.0 format.
const ENTRY_POINT_REVISION: u8 = 1;

pub const TYPE_BIOS_INFORMATION: u8 = 0;
pub const TYPE_SYSTEM_INFORMATION: u8 = 1;
pub const TYPE_SYSTEM_ENCLOSURE: u8 = 3;
pub const TYPE_OEM_STRINGS: u8 = 11;
pub const TYPE_END_OF_TABLE: u8 = 127;

/// BIOS characteristics bit 7: PCI is supported.
const BIOS_CHARACTERISTICS_PCI: u64 = 1 << 7;
/// BIOS characteristics extension byte 2, bit 4: the system is a virtual machine.
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System wake-up type 2 (the value the original writes; the spec calls it "Unknown").
const WAKE_UP_TYPE_UNKNOWN: u8 = 2;
/// Chassis type, boot-up/power-supply/thermal states: 2 = unknown; security status 3 = none.
const CHASSIS_UNKNOWN: u8 = 2;
const CHASSIS_SECURITY_NONE: u8 = 3;

/// Formatted-section lengths of the structures written.
const BIOS_INFO_LEN: u8 = 0x14;
const SYSTEM_INFO_LEN: u8 = 0x1b;
const CHASSIS_LEN: u8 = 0x15;
const OEM_STRINGS_LEN: u8 = 5;
const END_OF_TABLE_LEN: u8 = 4;

/// What `--platform` would set; `SmbiosConfig::default()` gives the original's defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmbiosConfig {
    pub system: SmbiosSystem,
    /// Type 3 is written only with an asset tag.
    pub chassis_asset_tag: Option<String>,
    /// Type 11 is written only when there are some.
    pub oem_strings: Vec<String>,
}

/// Type 1's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SmbiosSystem {
    pub manufacturer: Option<String>,
    pub product_name: Option<String>,
    pub version: Option<String>,
    pub serial_number: Option<String>,
    /// In RFC 4122 byte order (as the text form reads); written in SMBIOS order, the first
    /// three fields little endian. `None`: all zeros.
    pub uuid: Option<[u8; 16]>,
    pub sku_number: Option<String>,
    pub family: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("SMBIOS string {0:?} is empty or contains a NUL byte")]
    BadString(String),
    #[error("too many SMBIOS strings in one structure (at most 255)")]
    TooManyStrings,
    #[error("the SMBIOS tables end at {end:#x}, beyond the limit {limit:#x}")]
    TooLarge { end: u64, limit: u64 },
    #[error("cannot write the SMBIOS tables to guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// One structure: its formatted section, then its string set.
fn push_structure(table: &mut Vec<u8>, formatted: &[u8], strings: &[&str]) -> Result<(), Error> {
    if strings.len() > 255 {
        return Err(Error::TooManyStrings);
    }
    table.extend_from_slice(formatted);
    for s in strings {
        if s.is_empty() || s.contains('\0') {
            return Err(Error::BadString(s.to_string()));
        }
        table.extend_from_slice(s.as_bytes());
        table.push(0);
    }
    if strings.is_empty() {
        table.push(0);
    }
    table.push(0);
    Ok(())
}

/// The start of a formatted section: type, length, handle.
fn header(kind: u8, len: u8, handle: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(len.into());
    b.push(kind);
    b.push(len);
    b.extend_from_slice(&handle.to_le_bytes());
    b
}

/// Numbers the strings present, from 1; 0 for an absent one.
struct Strings<'a> {
    list: Vec<&'a str>,
}

impl<'a> Strings<'a> {
    fn index(&mut self, s: Option<&'a str>) -> u8 {
        match s {
            Some(s) => {
                self.list.push(s);
                // More than 255 is refused by `push_structure`.
                self.list.len().min(255) as u8
            }
            None => 0,
        }
    }
}

/// The RFC 4122 byte order turned into SMBIOS's (time_low, time_mid, time_hi little endian).
fn uuid_smbios_order(u: [u8; 16]) -> [u8; 16] {
    let mut b = u;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// The structure table (without the entry point).
pub fn build_table(cfg: &SmbiosConfig) -> Result<Vec<u8>, Error> {
    let mut table = Vec::new();
    let mut handle = 0u16;
    let mut next_handle = || {
        handle += 1;
        handle
    };

    // Type 0: BIOS Information.
    let mut bios = header(TYPE_BIOS_INFORMATION, BIOS_INFO_LEN, next_handle());
    bios.push(1); // vendor: string 1
    bios.push(2); // version: string 2
    bios.extend_from_slice(&0u16.to_le_bytes()); // starting address segment
    bios.push(0); // release date: none
    bios.push(0); // ROM size
    bios.extend_from_slice(&BIOS_CHARACTERISTICS_PCI.to_le_bytes());
    bios.push(0); // characteristics extension byte 1
    bios.push(BIOS_EXT2_VIRTUAL_MACHINE);
    push_structure(&mut table, &bios, &[BIOS_VENDOR, BIOS_VERSION])?;

    // Type 1: System Information.
    let sys = &cfg.system;
    let mut strings = Strings { list: Vec::new() };
    let mut info = header(TYPE_SYSTEM_INFORMATION, SYSTEM_INFO_LEN, next_handle());
    info.push(
        strings.index(Some(
            sys.manufacturer
                .as_deref()
                .unwrap_or(DEFAULT_SYSTEM_MANUFACTURER),
        )),
    );
    info.push(
        strings.index(Some(
            sys.product_name
                .as_deref()
                .unwrap_or(DEFAULT_SYSTEM_PRODUCT_NAME),
        )),
    );
    info.push(strings.index(sys.version.as_deref()));
    info.push(strings.index(sys.serial_number.as_deref()));
    info.extend_from_slice(&uuid_smbios_order(sys.uuid.unwrap_or([0; 16])));
    info.push(WAKE_UP_TYPE_UNKNOWN);
    info.push(strings.index(sys.sku_number.as_deref()));
    info.push(strings.index(sys.family.as_deref()));
    push_structure(&mut table, &info, &strings.list)?;

    // Type 3: System Enclosure, for the asset tag.
    if let Some(tag) = &cfg.chassis_asset_tag {
        let mut ch = header(TYPE_SYSTEM_ENCLOSURE, CHASSIS_LEN, next_handle());
        ch.push(0); // manufacturer
        ch.push(CHASSIS_UNKNOWN); // type
        ch.push(0); // version
        ch.push(0); // serial number
        ch.push(1); // asset tag: string 1
        ch.extend_from_slice(&[CHASSIS_UNKNOWN; 3]); // boot-up, power supply, thermal
        ch.push(CHASSIS_SECURITY_NONE);
        ch.extend_from_slice(&0u32.to_le_bytes()); // OEM-defined
        ch.extend_from_slice(&[0; 4]); // height, power cords, contained elements, their length
        push_structure(&mut table, &ch, &[tag])?;
    }

    // Type 11: OEM Strings.
    if !cfg.oem_strings.is_empty() {
        if cfg.oem_strings.len() > 255 {
            return Err(Error::TooManyStrings);
        }
        let mut oem = header(TYPE_OEM_STRINGS, OEM_STRINGS_LEN, next_handle());
        oem.push(cfg.oem_strings.len() as u8);
        let list: Vec<&str> = cfg.oem_strings.iter().map(String::as_str).collect();
        push_structure(&mut table, &oem, &list)?;
    }

    // Type 127: End of Table.
    let end = header(TYPE_END_OF_TABLE, END_OF_TABLE_LEN, next_handle());
    push_structure(&mut table, &end, &[])?;
    Ok(table)
}

/// The 3.0 entry point for a table of `table_len` bytes at `table_addr`.
pub fn build_entry_point(table_addr: u64, table_len: u32) -> [u8; ENTRY_POINT_LEN] {
    let mut ep = [0u8; ENTRY_POINT_LEN];
    ep[0..5].copy_from_slice(SM3_ANCHOR);
    // ep[5]: checksum, below.
    ep[6] = ENTRY_POINT_LEN as u8;
    ep[7] = VERSION.0;
    ep[8] = VERSION.1;
    ep[9] = VERSION.2;
    ep[10] = ENTRY_POINT_REVISION;
    // ep[11]: reserved.
    ep[12..16].copy_from_slice(&table_len.to_le_bytes()); // structure table maximum size
    ep[16..24].copy_from_slice(&table_addr.to_le_bytes());
    let sum = ep.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    ep[5] = sum.wrapping_neg();
    ep
}

/// Writes the entry point at `layout::SMBIOS_START` and the table after it; returns the bytes
/// written in all (both below `layout::SMBIOS_END`).
pub fn setup_smbios<M: GuestMemory>(mem: &M, cfg: &SmbiosConfig) -> Result<u64, Error> {
    let table = build_table(cfg)?;
    let table_addr = layout::SMBIOS_START.0 + ENTRY_POINT_LEN as u64;
    let end = table_addr + table.len() as u64;
    if end > layout::SMBIOS_END.0 {
        return Err(Error::TooLarge {
            end,
            limit: layout::SMBIOS_END.0,
        });
    }
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(Error::GuestMemory)?;
    let ep = build_entry_point(table_addr, table.len() as u32);
    mem.write_slice(&ep, layout::SMBIOS_START)
        .map_err(Error::GuestMemory)?;
    Ok(end - layout::SMBIOS_START.0)
}

#[cfg(test)]
mod tests;
