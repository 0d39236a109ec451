//! `vm.coredump` (`ch-remote coredump file:///path`): the guest's RAM and vCPU registers as an
//! ELF core file in the layout QEMU's `dump-guest-memory` writes and the original's
//! `guest_debug` build writes too, so `crash`, `gdb` and the kernel's own tools read it:
//! - the ELF header (ET_CORE, x86-64), then one PT_NOTE program header and one PT_LOAD per RAM
//!   region (`p_paddr` its guest-physical address, `p_vaddr` 0);
//! - the notes: per vCPU an NT_PRSTATUS note named `CORE` (Linux's `elf_prstatus`, the pid
//!   being the vCPU's id and `pr_reg` its general registers), then per vCPU a note of type 0
//!   named `QEMU` (QEMU's `QEMUCPUState`, version 1: registers, segments with their descriptor
//!   flags, descriptor tables, control registers, KERNEL_GS_BASE);
//! - each region's bytes, in address order.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use guest_memory::GuestMemoryMmap;
use hypervisor::{DescriptorTable, SegmentRegister, VcpuState};

use crate::snapshot::{memory_ranges, write_memory, Cause};

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const NHDR_SIZE: usize = 12;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
/// The `QEMU` note's type.
const NT_QEMU_CPU: u32 = 0;
/// Linux's `struct elf_prstatus` on x86-64: 112 bytes of signal and process fields
/// (`pr_pid` at 32), `pr_reg` (27 registers), `pr_fpvalid` and padding.
const PRSTATUS_SIZE: usize = 336;
const PRSTATUS_PID: usize = 32;
const PRSTATUS_REGS: usize = 112;
/// QEMU's `QEMUCPUState`: version, size, 18 registers, 10 segments of 24 bytes, cr[5],
/// kernel_gs_base.
const QEMU_CPU_SIZE: usize = 8 + 18 * 8 + 10 * 24 + 5 * 8 + 8;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The path of a `file://` URL: the core file to create (it must not exist).
pub fn url_to_file(url: &str) -> Result<PathBuf, Cause> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| Cause::new(format!("Could not extract path from URL: {url}")))?;
    if path.is_empty() {
        return Err(Cause::new(format!("no file in the URL: {url}")));
    }
    Ok(PathBuf::from(path))
}

/// One note: its header, the name (NUL-terminated, padded to 4) and the description (padded).
fn note(out: &mut Vec<u8>, name: &str, kind: u32, desc: &[u8]) {
    let start = out.len();
    let namesz = name.len() as u32 + 1;
    out.extend_from_slice(&namesz.to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    debug_assert_eq!(out.len() - start, NHDR_SIZE);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn put(buf: &mut [u8], at: usize, values: &[u64]) {
    for (i, v) in values.iter().enumerate() {
        buf[at + 8 * i..at + 8 * i + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// vCPU `id`'s `elf_prstatus`: `pr_reg` in `user_regs_struct` order.
fn prstatus(id: u32, s: &VcpuState) -> Vec<u8> {
    let (r, sr) = (&s.regs, &s.sregs);
    let mut d = vec![0u8; PRSTATUS_SIZE];
    d[PRSTATUS_PID..PRSTATUS_PID + 4].copy_from_slice(&id.to_le_bytes());
    put(
        &mut d,
        PRSTATUS_REGS,
        &[
            r.r15,
            r.r14,
            r.r13,
            r.r12,
            r.rbp,
            r.rbx,
            r.r11,
            r.r10,
            r.r9,
            r.r8,
            r.rax,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            0, // orig_rax
            r.rip,
            u64::from(sr.cs.selector),
            r.rflags,
            r.rsp,
            u64::from(sr.ss.selector),
            sr.fs.base,
            sr.gs.base,
            u64::from(sr.ds.selector),
            u64::from(sr.es.selector),
            u64::from(sr.fs.selector),
            u64::from(sr.gs.selector),
        ],
    );
    d
}

/// A segment as QEMU's `QEMUCPUSegment`: selector, limit, the descriptor's flag bits where a
/// descriptor's second word has them, padding, base.
fn segment(out: &mut Vec<u8>, s: &SegmentRegister) {
    let present = s.present != 0 && s.unusable == 0;
    let flags = u32::from(s.type_) << 8
        | u32::from(s.s) << 12
        | u32::from(s.dpl) << 13
        | u32::from(present) << 15
        | u32::from(s.avl) << 20
        | u32::from(s.l) << 21
        | u32::from(s.db) << 22
        | u32::from(s.g) << 23;
    out.extend_from_slice(&u32::from(s.selector).to_le_bytes());
    out.extend_from_slice(&s.limit.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&s.base.to_le_bytes());
}

fn table(out: &mut Vec<u8>, t: &DescriptorTable) {
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&u32::from(t.limit).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    out.extend_from_slice(&t.base.to_le_bytes());
}

/// vCPU state as QEMU's `QEMUCPUState` (version 1).
fn qemu_cpu(s: &VcpuState) -> Vec<u8> {
    let (r, sr) = (&s.regs, &s.sregs);
    let mut d = Vec::with_capacity(QEMU_CPU_SIZE);
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(QEMU_CPU_SIZE as u32).to_le_bytes());
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    for seg in [
        &sr.cs, &sr.ds, &sr.es, &sr.fs, &sr.gs, &sr.ss, &sr.ldt, &sr.tr,
    ] {
        segment(&mut d, seg);
    }
    table(&mut d, &sr.gdt);
    table(&mut d, &sr.idt);
    for cr in [sr.cr0, 0, sr.cr2, sr.cr3, sr.cr4] {
        d.extend_from_slice(&cr.to_le_bytes());
    }
    let kernel_gs_base = s
        .msrs
        .iter()
        .find(|m| m.index == MSR_KERNEL_GS_BASE)
        .map_or(0, |m| m.data);
    d.extend_from_slice(&kernel_gs_base.to_le_bytes());
    debug_assert_eq!(d.len(), QEMU_CPU_SIZE);
    d
}

/// The notes: every vCPU's NT_PRSTATUS, then every vCPU's QEMU note.
fn notes(vcpus: &[VcpuState]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, s) in vcpus.iter().enumerate() {
        note(&mut out, "CORE", NT_PRSTATUS, &prstatus(id as u32, s));
    }
    for s in vcpus {
        note(&mut out, "QEMU", NT_QEMU_CPU, &qemu_cpu(s));
    }
    out
}

fn phdr(out: &mut Vec<u8>, kind: u32, offset: u64, paddr: u64, size: u64) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // p_flags
    for v in [offset, 0, paddr, size, size, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The headers and notes that come before the RAM of `ranges` ((gpa, length) each).
fn headers(vcpus: &[VcpuState], ranges: &[(u64, u64)]) -> Vec<u8> {
    let phnum = 1 + ranges.len() as u64;
    let notes = notes(vcpus);
    let notes_at = EHDR_SIZE + PHDR_SIZE * phnum;
    let mut out = Vec::with_capacity(notes_at as usize + notes.len());
    // e_ident: magic, 64-bit, little-endian, version 1, System V ABI.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&4u16.to_le_bytes()); // ET_CORE
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]); // no section headers
    phdr(&mut out, PT_NOTE, notes_at, 0, notes.len() as u64);
    let mut at = notes_at + notes.len() as u64;
    for &(gpa, len) in ranges {
        phdr(&mut out, PT_LOAD, at, gpa, len);
        at += len;
    }
    out.extend_from_slice(&notes);
    out
}

/// Writes the core file at `path` (created; it must not exist) for a paused VM whose vCPUs
/// are in `vcpus` (in id order) and whose RAM is `mem`: the RAM as a snapshot writes it
/// (`snapshot::write_memory`: `sendfile` from a memory file; of fresh anonymous RAM
/// (`fresh`) only the pages that hold anything, the rest holes that read as zeros). Returns
/// the file's size. A partly written file is removed.
pub fn write(
    path: &Path,
    vcpus: &[VcpuState],
    mem: &GuestMemoryMmap,
    fresh: bool,
) -> Result<u64, Cause> {
    let ranges = memory_ranges(mem);
    if ranges.len() >= usize::from(u16::MAX) {
        return Err(Cause::new("too many RAM regions for one ELF file"));
    }
    let loads: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.length)).collect();
    let head = headers(vcpus, &loads);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Cause::io(format!("cannot create {}", path.display())))?;
    let written = (|| -> Result<u64, Cause> {
        file.write_all(&head)
            .map_err(Cause::io("Error writing the core file"))?;
        let ram = write_memory(mem, &ranges, &mut file, head.len() as u64, fresh)?;
        file.flush()
            .map_err(Cause::io("Error writing the core file"))?;
        Ok(head.len() as u64 + ram)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu(rip: u64) -> VcpuState {
        let mut s = VcpuState {
            version: 1,
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: None,
            xcrs: None,
            lapic: None,
            msrs: vec![hypervisor::MsrEntry {
                index: MSR_KERNEL_GS_BASE,
                data: 0x4242,
                ..Default::default()
            }],
            msrs_unreadable: Vec::new(),
            events: Default::default(),
            mp_state: hypervisor::MpState::Runnable,
            debug_regs: Default::default(),
            cpuid: Vec::new(),
            tsc_khz: None,
            nested: None,
        };
        s.regs.rip = rip;
        s.regs.rax = 0x1111;
        s.regs.r15 = 0xf15;
        s.sregs.cs.selector = 0x10;
        s.sregs.cs.type_ = 11;
        s.sregs.cs.present = 1;
        s.sregs.cs.l = 1;
        s.sregs.cr3 = 0x1000;
        s
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The header, the program headers and the notes as `readelf` and `crash` read them.
    #[test]
    fn headers_and_notes_have_the_core_layout() {
        let vcpus = [vcpu(0x1000), vcpu(0x2000)];
        let ranges = [(0u64, 0x8000u64), (0x1_0000_0000, 0x1000)];
        let h = headers(&vcpus, &ranges);
        assert_eq!(&h[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([h[16], h[17]]), 4, "ET_CORE");
        assert_eq!(u16::from_le_bytes([h[18], h[19]]), 62, "EM_X86_64");
        assert_eq!(u16::from_le_bytes([h[56], h[57]]), 3, "e_phnum");
        // PT_NOTE, then the loads back to back after the notes.
        let ph = |i: usize| &h[64 + 56 * i..64 + 56 * (i + 1)];
        assert_eq!(u32_at(ph(0), 0), PT_NOTE);
        let (notes_at, notes_len) = (u64_at(ph(0), 8), u64_at(ph(0), 32));
        assert_eq!(notes_at, 64 + 3 * 56);
        assert_eq!(h.len() as u64, notes_at + notes_len);
        assert_eq!(u32_at(ph(1), 0), PT_LOAD);
        assert_eq!(u64_at(ph(1), 8), notes_at + notes_len);
        assert_eq!((u64_at(ph(1), 24), u64_at(ph(1), 32)), (0, 0x8000));
        assert_eq!(u64_at(ph(2), 8), notes_at + notes_len + 0x8000);
        assert_eq!(u64_at(ph(2), 24), 0x1_0000_0000);
        // Two CORE notes (pid = vCPU id, rip at pr_reg[16]), then two QEMU notes.
        let mut at = notes_at as usize;
        let mut seen = Vec::new();
        while at < h.len() {
            let (namesz, descsz, kind) = (u32_at(&h, at), u32_at(&h, at + 4), u32_at(&h, at + 8));
            let name = &h[at + NHDR_SIZE..at + NHDR_SIZE + namesz as usize - 1];
            let desc = at + NHDR_SIZE + (namesz as usize).next_multiple_of(4);
            let d = &h[desc..desc + descsz as usize];
            seen.push((String::from_utf8_lossy(name).into_owned(), kind, d.len()));
            if name == b"CORE" {
                let rip = u64_at(d, PRSTATUS_REGS + 16 * 8);
                let pid = u32_at(d, PRSTATUS_PID);
                assert_eq!(rip, 0x1000 * (u64::from(pid) + 1));
                assert_eq!(u64_at(d, PRSTATUS_REGS), 0xf15, "r15 first");
                assert_eq!(u64_at(d, PRSTATUS_REGS + 10 * 8), 0x1111, "rax");
                assert_eq!(u64_at(d, PRSTATUS_REGS + 17 * 8), 0x10, "cs");
            } else {
                assert_eq!((u32_at(d, 0), u32_at(d, 4)), (1, QEMU_CPU_SIZE as u32));
                assert_eq!(u64_at(d, 8), 0x1111, "rax first");
                // cs: selector, then flags with type 11, S 0, P and L.
                let cs = 8 + 18 * 8;
                assert_eq!(u32_at(d, cs), 0x10);
                assert_eq!(u32_at(d, cs + 8), 11 << 8 | 1 << 15 | 1 << 21);
                assert_eq!(u64_at(d, 8 + 18 * 8 + 10 * 24 + 3 * 8), 0x1000, "cr3");
                assert_eq!(u64_at(d, QEMU_CPU_SIZE - 8), 0x4242, "kernel_gs_base");
            }
            at = desc + (descsz as usize).next_multiple_of(4);
        }
        assert_eq!(
            seen,
            [
                ("CORE".into(), NT_PRSTATUS, PRSTATUS_SIZE),
                ("CORE".into(), NT_PRSTATUS, PRSTATUS_SIZE),
                ("QEMU".into(), NT_QEMU_CPU, QEMU_CPU_SIZE),
                ("QEMU".into(), NT_QEMU_CPU, QEMU_CPU_SIZE),
            ]
        );
    }

    #[test]
    fn urls_name_a_file() {
        assert_eq!(
            url_to_file("file:///var/core").unwrap(),
            PathBuf::from("/var/core")
        );
        assert!(url_to_file("tcp://x").is_err());
        assert!(url_to_file("file://").is_err());
    }
}
