//! A small, bounds-checked reader for the only ELF files this crate handles: the
//! test guest's static little-endian ELF64 executable.
//!
//! Why not `object`/`goblin`: we need just `e_entry` and the program headers, plus
//! the file offsets of a few fields so the PVH note can be patched out in place.
//! Forty lines of explicit, checked reads do that without another dependency.

use crate::Error;

pub const PT_LOAD: u32 = 1;
pub const PT_NOTE: u32 = 4;
/// Xen ELF note type of the PVH 32-bit entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phdr {
    /// File offset of this program header itself (for patching).
    pub header_offset: usize,
    pub p_type: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

#[derive(Debug)]
pub struct Elf {
    pub entry: u64,
    pub phdrs: Vec<Phdr>,
}

fn bad(why: impl Into<String>) -> Error {
    Error::BadElf(why.into())
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, Error> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| bad(format!("truncated at {off:#x}")))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, Error> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| bad(format!("truncated at {off:#x}")))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, Error> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| bad(format!("truncated at {off:#x}")))
}

/// Parses the ELF header and program headers.
pub fn parse(b: &[u8]) -> Result<Elf, Error> {
    if b.len() < EHDR_SIZE || &b[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(bad("not a little-endian ELF64 file"));
    }
    if u16_at(b, 18)? != 62 {
        return Err(bad("not an x86-64 ELF file"));
    }
    let entry = u64_at(b, 24)?;
    let phoff = usize::try_from(u64_at(b, 32)?).map_err(|_| bad("e_phoff too large"))?;
    let phentsize = usize::from(u16_at(b, 54)?);
    let phnum = usize::from(u16_at(b, 56)?);
    if phentsize != PHDR_SIZE {
        return Err(bad(format!("e_phentsize {phentsize}")));
    }
    let phdrs = (0..phnum)
        .map(|i| {
            let h = phoff + i * PHDR_SIZE;
            let p = Phdr {
                header_offset: h,
                p_type: u32_at(b, h)?,
                offset: u64_at(b, h + 8)?,
                paddr: u64_at(b, h + 24)?,
                filesz: u64_at(b, h + 32)?,
                memsz: u64_at(b, h + 40)?,
            };
            let end = p
                .offset
                .checked_add(p.filesz)
                .ok_or_else(|| bad("segment overflows"))?;
            if end > b.len() as u64 {
                return Err(bad(format!("segment {i} extends past the end of the file")));
            }
            Ok(p)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Elf { entry, phdrs })
}

/// Finds the PVH entry note; returns (file offset of the note's n_type, entry).
pub fn find_pvh_note(b: &[u8], elf: &Elf) -> Result<Option<(usize, u32)>, Error> {
    for p in elf.phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        let start = p.offset as usize;
        let end = start + p.filesz as usize;
        let mut off = start;
        while off + 12 <= end {
            let namesz = u32_at(b, off)? as usize;
            let descsz = u32_at(b, off + 4)? as usize;
            let ntype = u32_at(b, off + 8)?;
            let name = off + 12;
            let desc = name + namesz.next_multiple_of(4);
            let next = desc + descsz.next_multiple_of(4);
            if next > end {
                return Err(bad("note extends past its segment"));
            }
            if ntype == XEN_ELFNOTE_PHYS32_ENTRY
                && namesz == 4
                && &b[name..name + 4] == b"Xen\0"
                && descsz >= 4
            {
                return Ok(Some((off + 8, u32_at(b, desc)?)));
            }
            off = next;
        }
    }
    Ok(None)
}

/// Returns a copy of the ELF without the PVH entry: the note's type is zeroed, so a
/// loader scanning the PT_NOTE segment (or the note section) finds no
/// `XEN_ELFNOTE_PHYS32_ENTRY` and reports the entry as not present. Nothing else
/// changes (the loaded image differs only in those 4 bytes at 0x100008).
pub fn strip_pvh_note(b: &[u8]) -> Result<Vec<u8>, Error> {
    let elf = parse(b)?;
    let mut out = b.to_vec();
    if let Some((type_off, _)) = find_pvh_note(b, &elf)? {
        out[type_off..type_off + 4].copy_from_slice(&0u32.to_le_bytes());
    }
    Ok(out)
}

/// The loadable image as one flat block: (load address, bytes, memory size).
/// The PT_LOAD segments must be in address order and may only leave gaps that are
/// filled with zeros.
pub fn flat_image(b: &[u8], elf: &Elf) -> Result<(u64, Vec<u8>, u64), Error> {
    let loads: Vec<&Phdr> = elf.phdrs.iter().filter(|p| p.p_type == PT_LOAD).collect();
    let first = loads.first().ok_or_else(|| bad("no PT_LOAD segment"))?;
    let base = first.paddr;
    let mut flat = Vec::new();
    let mut mem_end = base;
    for p in loads {
        if p.paddr < mem_end {
            return Err(bad(format!(
                "PT_LOAD at {:#x} overlaps or is out of order",
                p.paddr
            )));
        }
        if p.filesz > 0 {
            let at = (p.paddr - base) as usize;
            flat.resize(at, 0);
            flat.extend_from_slice(&b[p.offset as usize..(p.offset + p.filesz) as usize]);
        }
        mem_end = p.paddr + p.memsz.max(p.filesz);
    }
    Ok((base, flat, mem_end - base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"").is_err());
        assert!(parse(&[0u8; 64]).is_err());
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 1; // ELF32
        h[5] = 1;
        assert!(parse(&h).is_err());
    }

    #[test]
    fn rejects_truncated_program_headers() {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 62;
        h[32] = 64; // e_phoff
        h[54] = 56; // e_phentsize
        h[56] = 1; // e_phnum, but no room for it
        assert!(parse(&h).is_err());
    }
}
