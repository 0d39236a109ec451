//! SMBIOS, found as a guest OS finds it: the 3.0 entry point ("_SM3_") searched for on
//! 16-byte boundaries in 0xf0000-0xfffff, then its structure table walked.

use alloc::string::String;
use alloc::vec::Vec;

const SEARCH_START: usize = 0xf_0000;
const SEARCH_END: usize = 0x10_0000;

pub struct Structure {
    pub kind: u8,
    pub handle: u16,
    pub formatted: Vec<u8>,
    pub strings: Vec<String>,
}

impl Structure {
    /// The string the formatted-section byte at `off` refers to (index 0, or none: `None`).
    pub fn string(&self, off: usize) -> Option<&str> {
        match *self.formatted.get(off)? {
            0 => None,
            i => self.strings.get(usize::from(i) - 1).map(String::as_str),
        }
    }
}

/// A type 1 UUID as text: the first three fields are stored little endian (SMBIOS 2.6+).
pub fn uuid_text(b: &[u8]) -> String {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[..16]);
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    let mut s = String::new();
    for (i, x) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&alloc::format!("{x:02x}"));
    }
    s
}

pub struct Smbios {
    pub entry_addr: usize,
    pub version: (u8, u8, u8),
    pub table_addr: u64,
    pub table_max: u32,
    pub structures: Vec<Structure>,
}

fn bytes(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: the first 4 GiB are identity mapped and user-accessible; callers stay inside
    // the BIOS area or inside a table the entry point says lies below 4 GiB.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

/// Looks for the entry point and checks it. `Err` names what is wrong.
pub fn find_entry() -> Result<Smbios, String> {
    let area = bytes(SEARCH_START, SEARCH_END - SEARCH_START);
    let off = (0..area.len())
        .step_by(16)
        .find(|&o| area[o..].starts_with(b"_SM3_"))
        .ok_or_else(|| String::from("no _SM3_ anchor in 0xf0000-0xfffff"))?;
    let ep = &area[off..];
    let len = usize::from(ep[6]);
    if !(0x18..=0x20).contains(&len) || off + len > area.len() {
        return Err(alloc::format!("entry point length {len:#x}"));
    }
    let sum = ep[..len].iter().fold(0u8, |s, &b| s.wrapping_add(b));
    if sum != 0 {
        return Err(alloc::format!("entry point checksum off by {sum:#x}"));
    }
    if ep[7] < 3 || ep[10] != 1 {
        return Err(alloc::format!(
            "version {}.{} entry point revision {} (want 3.x, revision 1)",
            ep[7],
            ep[8],
            ep[10]
        ));
    }
    let table_max = u32::from_le_bytes([ep[12], ep[13], ep[14], ep[15]]);
    let mut a = [0u8; 8];
    a.copy_from_slice(&ep[16..24]);
    let table_addr = u64::from_le_bytes(a);
    if table_max == 0 || table_addr + u64::from(table_max) > 0xc000_0000 {
        return Err(alloc::format!(
            "structure table {table_addr:#x}+{table_max:#x} not in low memory"
        ));
    }
    Ok(Smbios {
        entry_addr: SEARCH_START + off,
        version: (ep[7], ep[8], ep[9]),
        table_addr,
        table_max,
        structures: Vec::new(),
    })
}

/// Walks the structure table up to the End of Table structure (type 127), all within the
/// maximum size the entry point gives.
pub fn walk(s: &mut Smbios) -> Result<(), String> {
    let t = bytes(s.table_addr as usize, s.table_max as usize);
    let mut at = 0;
    loop {
        if at + 4 > t.len() {
            return Err(alloc::format!(
                "no End of Table structure within {:#x}",
                t.len()
            ));
        }
        let (kind, flen) = (t[at], usize::from(t[at + 1]));
        if flen < 4 || at + flen > t.len() {
            return Err(alloc::format!("type {kind} at +{at:#x}: length {flen}"));
        }
        let handle = u16::from_le_bytes([t[at + 2], t[at + 3]]);
        if s.structures.iter().any(|x| x.handle == handle) {
            return Err(alloc::format!("handle {handle} used twice"));
        }
        let mut p = at + flen;
        let mut strings = Vec::new();
        let unterminated = || alloc::format!("type {kind} at +{at:#x}: string set runs off");
        if *t.get(p).ok_or_else(unterminated)? == 0 {
            if *t.get(p + 1).ok_or_else(unterminated)? != 0 {
                return Err(alloc::format!("type {kind}: empty string set with one NUL"));
            }
            p += 2;
        } else {
            while *t.get(p).ok_or_else(unterminated)? != 0 {
                let n = t[p..]
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or_else(unterminated)?;
                strings.push(String::from_utf8_lossy(&t[p..p + n]).into_owned());
                p += n + 1;
            }
            p += 1;
        }
        s.structures.push(Structure {
            kind,
            handle,
            formatted: t[at..at + flen].to_vec(),
            strings,
        });
        at = p;
        if kind == 127 {
            return Ok(());
        }
    }
}
