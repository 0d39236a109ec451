//! Initial vCPU state: the segment, control and general registers each boot protocol expects,
//! plus the boot GDT and identity page tables for the 64-bit entry, FPU, MSRs and LAPIC LINTs.

use guest_memory::GuestMemoryMmap;
use hypervisor::{
    DescriptorTable, FpuState, LapicState, MsrEntry, SegmentRegister, SpecialRegisters,
    StandardRegisters, Vcpu,
};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{BootProtocol, EntryPoint};
use crate::layout;

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("cannot write boot tables into guest memory: {0}")]
    Memory(String),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error("KVM accepted {set} of {want} boot MSRs")]
    Msrs { set: usize, want: usize },
}

pub type Result<T> = std::result::Result<T, RegsError>;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT slots and their selectors.
const GDT_CODE64: usize = 1;
const GDT_CODE32: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;

/// A flat segment descriptor: `flags` holds the access byte (bits 0-7) and the G/DB/L/AVL
/// nibble (bits 12-15), as in the descriptor's own layout.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, present, DPL 0, accessed
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, 4 GiB
    gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB
    gdt_entry(0x008b, 0, 0x67),    // busy 64-bit TSS
];

fn segment(index: usize) -> SegmentRegister {
    let e = BOOT_GDT[index];
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    SegmentRegister {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT_START.0 + 8 * i as u64))
            .map_err(|e| RegsError::Memory(e.to_string()))?;
    }
    Ok(())
}

/// Identity map of the first 1 GiB with 2 MiB pages, as the 64-bit boot protocol requires.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |v: u64, a: u64| {
        mem.write_obj(v, GuestAddress(a))
            .map_err(|e| RegsError::Memory(e.to_string()))
    };
    w(layout::PDPTE_START.0 | 0x3, layout::PML4_START.0)?;
    w(layout::PDE_START.0 | 0x3, layout::PDPTE_START.0)?;
    for i in 0..512u64 {
        // present, writable, 2 MiB page
        w((i << 21) | 0x83, layout::PDE_START.0 + i * 8)?;
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel's entry in the mode its protocol expects.
pub fn setup_boot_vcpu(vcpu: &dyn Vcpu, mem: &GuestMemoryMmap, entry: EntryPoint) -> Result<()> {
    write_gdt(mem)?;
    let mut sregs: SpecialRegisters = vcpu.get_sregs()?;
    sregs.gdt = DescriptorTable {
        base: layout::BOOT_GDT_START.0,
        limit: (BOOT_GDT.len() * 8 - 1) as u16,
        ..Default::default()
    };
    sregs.idt = DescriptorTable::default();
    sregs.tr = segment(GDT_TSS);
    let data = segment(GDT_DATA);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut regs = StandardRegisters {
        rflags: 0x2,
        rip: entry.addr.0,
        ..Default::default()
    };
    match entry.protocol {
        BootProtocol::Pvh => {
            sregs.cs = segment(GDT_CODE32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = layout::PVH_INFO_START.0;
        }
        BootProtocol::Linux64 => {
            write_page_tables(mem)?;
            sregs.cs = segment(GDT_CODE64);
            sregs.cr3 = layout::PML4_START.0;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsi = layout::ZERO_PAGE_START.0;
            regs.rsp = layout::BOOT_STACK_POINTER.0;
            regs.rbp = layout::BOOT_STACK_POINTER.0;
        }
    }
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// FPU, MSRs and LAPIC as a freshly reset CPU has them; every vCPU gets this.
pub fn setup_vcpu_common(vcpu: &dyn Vcpu) -> Result<()> {
    vcpu.set_fpu(&FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    })?;
    let msrs = boot_msrs();
    let set = vcpu.set_msrs(&msrs)?;
    if set != msrs.len() {
        return Err(RegsError::Msrs {
            set,
            want: msrs.len(),
        });
    }
    setup_lints(vcpu)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLE_WB: u64 = (1 << 11) | 0x6;

fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &LapicState, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut LapicState, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// LINT0 delivers the PIC's ExtINT, LINT1 NMIs: what the MP spec's virtual-wire mode wires.
fn setup_lints(vcpu: &dyn Vcpu) -> Result<()> {
    let mut lapic = vcpu.get_lapic()?;
    let with_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic, APIC_LVT0);
    set_lapic_reg(&mut lapic, APIC_LVT0, with_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic, APIC_LVT1);
    set_lapic_reg(&mut lapic, APIC_LVT1, with_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_flat_segments() {
        let cs64 = segment(GDT_CODE64);
        assert_eq!((cs64.l, cs64.db, cs64.type_, cs64.selector), (1, 0, 0xb, 8));
        let cs32 = segment(GDT_CODE32);
        assert_eq!(
            (cs32.l, cs32.db, cs32.limit, cs32.base),
            (0, 1, 0xffff_ffff, 0)
        );
        let ds = segment(GDT_DATA);
        assert_eq!((ds.type_, ds.s, ds.present, ds.g), (3, 1, 1, 1));
        let tr = segment(GDT_TSS);
        assert_eq!((tr.type_, tr.s, tr.limit), (0xb, 0, 0x67));
    }

    #[test]
    fn lapic_register_round_trip() {
        let mut l = LapicState::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x8000_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x8000_0700);
    }
}
