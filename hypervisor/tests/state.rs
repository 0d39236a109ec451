//! vCPU and VM state on the real KVM: what is set reads back, survives a restore into a fresh VM
//! and a JSON round trip, and a running guest continues where it was saved.
//!
//! These need /dev/kvm: without it they fail (they do not skip).

use std::sync::Arc;

use hypervisor::{
    CpuIdEntry, DebugRegisters, DescriptorTable, ExtendedControlRegisters, FpuState, Hypervisor,
    HypervisorError, KvmHypervisor, MpState, MsrEntry, SegmentRegister, StandardRegisters, Vcpu,
    VcpuState, Vm, VmExit, VmState,
};

const MEM_SIZE: usize = 4 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x500;
const CODE: u64 = 0x10000;
const DATA: u64 = 0x20000;
const OUT_PORT: u16 = 0x80;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_PAT: u32 = 0x277;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// LAPIC register offsets (bytes into `kvm_lapic_state.regs`).
const APIC_TPR: usize = 0x80;
const APIC_SVR: usize = 0xf0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_LVTT: usize = 0x320;
const APIC_LVTERR: usize = 0x370;
const APIC_TMCCT: usize = 0x390;
const APIC_TDCR: usize = 0x3e0;

const KVM_VCPUEVENT_VALID_NMI_PENDING: u32 = 1;
const KVM_VCPUEVENT_VALID_SHADOW: u32 = 4;

fn kvm() -> KvmHypervisor {
    KvmHypervisor::new().expect("these tests need a usable /dev/kvm")
}

/// Anonymous guest RAM, unmapped on drop.
struct Mem {
    ptr: *mut u8,
}

impl Mem {
    fn new() -> Self {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest RAM");
        Mem { ptr: ptr.cast() }
    }

    /// A copy of `ram` in a new mapping.
    fn copy_of(ram: &[u8]) -> Self {
        let m = Mem::new();
        m.write(0, ram);
        m
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is MEM_SIZE bytes and lives as long as `self`; the tests only look
        // at it while no vCPU runs.
        unsafe { std::slice::from_raw_parts(self.ptr, MEM_SIZE) }
    }

    /// Guest RAM is written behind shared references, as the guest itself does.
    fn write(&self, addr: u64, data: &[u8]) {
        let addr = addr as usize;
        assert!(addr + data.len() <= MEM_SIZE);
        // SAFETY: in bounds (checked), and no reference into the mapping is alive while the
        // tests write it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(addr), data.len()) };
    }

    fn read_u64(&self, addr: u64) -> u64 {
        let b = &self.bytes()[addr as usize..addr as usize + 8];
        u64::from_le_bytes(b.try_into().unwrap())
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of MEM_SIZE bytes.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

/// A VM with RAM and the in-kernel irqchip. Fields drop in order: the VM before its RAM.
struct TestVm {
    vm: Arc<dyn Vm>,
    mem: Mem,
}

impl TestVm {
    fn new(hv: &KvmHypervisor, mem: Mem) -> Self {
        let vm = hv.create_vm().expect("create VM");
        // SAFETY: `mem` is MEM_SIZE bytes and outlives the VM (field order).
        unsafe {
            vm.set_user_memory_region(0, 0, MEM_SIZE as u64, mem.ptr as u64, false)
                .expect("memory slot")
        };
        vm.create_irqchip().expect("irqchip");
        TestVm { vm, mem }
    }

    /// A vCPU with the host's supported CPUID.
    fn vcpu(&self, hv: &KvmHypervisor) -> Box<dyn Vcpu> {
        let vcpu = self.vm.create_vcpu(0).expect("create vCPU");
        vcpu.set_cpuid(&hv.supported_cpuid().expect("supported CPUID"))
            .expect("set CPUID");
        vcpu
    }
}

/// Identity-mapped 64-bit long mode, CPL 0: page tables, a GDT, and the guest's code.
fn write_guest(mem: &Mem, code: &[u8]) {
    mem.write(PML4, &(PDPT | 3).to_le_bytes());
    mem.write(PDPT, &(PD | 3).to_le_bytes());
    for i in 0..2u64 {
        mem.write(PD + 8 * i, &((i << 21) | 0x83).to_le_bytes());
    }
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff, // 64-bit code
        0x00cf_9300_0000_ffff, // data
        0x0000_8b00_0000_0067, // busy TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write(GDT + 8 * i as u64, &e.to_le_bytes());
    }
    mem.write(CODE, code);
}

fn seg(selector: u16, type_: u8, l: u8, db: u8, s: u8) -> SegmentRegister {
    SegmentRegister {
        base: 0,
        limit: if s == 1 { 0xffff_ffff } else { 0x67 },
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g: s,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn enter_long_mode(vcpu: &dyn Vcpu, rip: u64) {
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = seg(0x08, 0xb, 1, 0, 1);
    let data = seg(0x10, 0x3, 0, 1, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(0x18, 0xb, 0, 0, 0);
    sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 4 * 8 - 1,
        ..Default::default()
    };
    sregs.cr3 = PML4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG, ET, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&StandardRegisters {
        rip,
        rflags: 0x2,
        rsp: 0x8000,
        ..Default::default()
    })
    .unwrap();
}

fn msr(index: u32, data: u64) -> MsrEntry {
    MsrEntry {
        index,
        data,
        ..Default::default()
    }
}

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| regs[off + i] as u8))
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// XCR0 bits the host lets a guest enable, from CPUID leaf 0xD.
fn supported_xcr0(cpuid: &[CpuIdEntry]) -> u64 {
    cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
        .unwrap_or(0)
}

const DISTINCT_MSRS: [(u32, u64); 9] = [
    (MSR_IA32_SYSENTER_CS, 0x10),
    (MSR_IA32_SYSENTER_ESP, 0xffff_8000_1234_5000),
    (MSR_IA32_SYSENTER_EIP, 0xffff_ffff_8100_1230),
    (MSR_STAR, 0x0023_0010_0000_0000),
    (MSR_LSTAR, 0xffff_ffff_8100_0040),
    (MSR_CSTAR, 0xffff_ffff_8100_0080),
    (MSR_SYSCALL_MASK, 0x4700),
    (MSR_KERNEL_GS_BASE, 0xffff_8880_1234_0000),
    (MSR_PAT, 0x0007_0406_0007_0106),
];
const TSC_START: u64 = 1 << 40;
/// Far in the future: the timer must not fire (and clear it) while the test runs.
const TSC_DEADLINE: u64 = TSC_START + (1 << 50);
/// LVT timer: TSC-deadline mode, masked, vector 0xec.
const LVTT_TSC_DEADLINE: u32 = 0x0005_00ec;

const ST0: [u8; 10] = [1, 2, 3, 4, 5, 6, 7, 0x80, 0xff, 0x3f];
const XMM3: [u8; 16] = *b"xmm3 of the test";
const YMM3_HI: [u8; 16] = *b"YMM3 upper half!";

/// Where the AVX component (the upper halves of YMM0-15) sits in the standard XSAVE layout:
/// CPUID leaf 0xD, sub-leaf 2, EBX.
fn xsave_avx_offset(cpuid: &[CpuIdEntry]) -> usize {
    cpuid
        .iter()
        .find(|e| e.function == 0xd && e.index == 2)
        .map(|e| e.ebx as usize)
        .expect("CPUID leaf 0xD.2 where XCR0 has AVX")
}

fn put_bytes(region: &mut [u32], byte: usize, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        let (w, shift) = ((byte + i) / 4, 8 * ((byte + i) % 4));
        region[w] = (region[w] & !(0xff << shift)) | (u32::from(*b) << shift);
    }
}

fn get_bytes(region: &[u32], byte: usize, len: usize) -> Vec<u8> {
    (byte..byte + len)
        .map(|i| (region[i / 4] >> (8 * (i % 4))) as u8)
        .collect()
}

/// x87, SSE (with MXCSR) and, where XCR0 has it, AVX state: through the XSAVE area where the
/// host has one (KVM_SET_FPU would not mark them present), else through KVM_SET_FPU.
fn set_distinctive_fpu(vcpu: &dyn Vcpu, xcr0: u64) {
    let Ok(mut x) = vcpu.get_xsave() else {
        let mut fpu = FpuState {
            fcw: 0x27f,
            ftwx: 0x01,
            ..Default::default()
        };
        fpu.fpr[0][..10].copy_from_slice(&ST0);
        fpu.xmm[3] = XMM3;
        vcpu.set_fpu(&fpu).unwrap();
        return;
    };
    let r = &mut x.region;
    put_bytes(r, 0, &0x27fu16.to_le_bytes()); // FCW
    put_bytes(r, 4, &[0x01]); // abridged tag: ST0 valid
    put_bytes(r, 24, &0x3f80u32.to_le_bytes()); // MXCSR: round down
    put_bytes(r, 32, &ST0);
    put_bytes(r, 160 + 3 * 16, &XMM3);
    let mut bv = 0x3u64;
    if xcr0 & 4 != 0 {
        let avx = xsave_avx_offset(&vcpu.get_cpuid().unwrap());
        put_bytes(r, avx + 3 * 16, &YMM3_HI);
        bv |= 4;
    }
    put_bytes(r, 512, &bv.to_le_bytes()); // XSTATE_BV
    vcpu.set_xsave(&x).unwrap();
}

/// Puts a distinctive value in every part of the vCPU's state that the guest has not run with.
fn make_distinctive(vcpu: &dyn Vcpu, xcr0: u64) {
    enter_long_mode(vcpu, CODE);
    let mut regs = vcpu.get_regs().unwrap();
    regs.rax = 0x1111_0000_0000_0001;
    regs.rbx = 0x2222_0000_0000_0002;
    regs.rcx = 0x3333_0000_0000_0003;
    regs.rdx = 0x4444_0000_0000_0004;
    regs.rsi = 0x5555_0000_0000_0005;
    regs.rdi = 0x6666_0000_0000_0006;
    regs.rbp = 0x7777_0000_0000_0007;
    regs.r8 = 0x8888_0000_0000_0008;
    regs.r15 = 0xffff_0000_0000_000f;
    regs.rflags = 0x887; // CF PF SF OF and the fixed bit
    vcpu.set_regs(&regs).unwrap();

    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cr2 = 0xdead_b000;
    sregs.idt = DescriptorTable {
        base: 0x7000,
        limit: 0xfff,
        ..Default::default()
    };
    vcpu.set_sregs(&sregs).unwrap();

    set_distinctive_fpu(vcpu, xcr0);

    let mut xcrs = ExtendedControlRegisters {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = xcr0;
    vcpu.set_xcrs(&xcrs).unwrap();

    let mut msrs: Vec<MsrEntry> = DISTINCT_MSRS.iter().map(|&(i, d)| msr(i, d)).collect();
    msrs.push(msr(MSR_IA32_TSC, TSC_START));
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), msrs.len(), "set MSRs");

    let mut lapic = vcpu.get_lapic().unwrap();
    set_lapic_reg(&mut lapic.regs, APIC_TPR, 0x20);
    set_lapic_reg(&mut lapic.regs, APIC_SVR, 0x1ff);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, 0x0001_0700);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, 0x400);
    set_lapic_reg(&mut lapic.regs, APIC_LVTERR, 0x0001_00fe);
    set_lapic_reg(&mut lapic.regs, APIC_TDCR, 0xb);
    set_lapic_reg(&mut lapic.regs, APIC_LVTT, LVTT_TSC_DEADLINE);
    vcpu.set_lapic(&lapic).unwrap();
    // KVM keeps a TSC deadline only while the LAPIC timer is in TSC-deadline mode.
    assert_eq!(
        vcpu.set_msrs(&[msr(MSR_IA32_TSC_DEADLINE, TSC_DEADLINE)])
            .unwrap(),
        1
    );

    vcpu.set_debug_regs(&DebugRegisters {
        db: [0x1000, 0x2000, 0x3000, 0x4000],
        dr6: 0xffff_0ff1,
        dr7: 0x000d_0409,
        ..Default::default()
    })
    .unwrap();

    let mut events = vcpu.get_vcpu_events().unwrap();
    events.nmi.masked = 1;
    events.nmi.pending = 1;
    events.interrupt.shadow = 1;
    events.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW;
    vcpu.set_vcpu_events(&events).unwrap();

    vcpu.set_mp_state(MpState::Halted).unwrap();
}

/// What a save must hold after `make_distinctive`.
fn check_distinctive(s: &VcpuState, xcr0: u64) {
    assert_eq!(s.regs.rax, 0x1111_0000_0000_0001);
    assert_eq!(s.regs.r15, 0xffff_0000_0000_000f);
    assert_eq!(s.regs.rip, CODE);
    assert_eq!(s.regs.rflags, 0x887);
    assert_eq!(s.sregs.cr2, 0xdead_b000);
    assert_eq!((s.sregs.idt.base, s.sregs.idt.limit), (0x7000, 0xfff));
    assert_eq!(s.sregs.efer & 0x500, 0x500, "long mode");
    // Both views of the FPU agree.
    assert_eq!(s.fpu.fcw, 0x27f);
    assert_eq!(s.fpu.ftwx, 0x01);
    assert_eq!(s.fpu.fpr[0][..10], ST0);
    assert_eq!(s.fpu.xmm[3], XMM3);
    if let Some(x) = &s.xsave {
        assert_eq!(
            get_bytes(&x.region, 0, 2),
            0x27fu16.to_le_bytes(),
            "XSAVE FCW"
        );
        assert_eq!(
            get_bytes(&x.region, 24, 4),
            0x3f80u32.to_le_bytes(),
            "XSAVE MXCSR"
        );
        assert_eq!(get_bytes(&x.region, 32, 10), ST0, "XSAVE ST0");
        assert_eq!(get_bytes(&x.region, 208, 16), XMM3, "XSAVE XMM3");
        if xcr0 & 4 != 0 {
            assert_eq!(x.xstate_bv() & 7, 7, "XSTATE_BV");
            let hi = get_bytes(&x.region, xsave_avx_offset(&s.cpuid) + 48, 16);
            assert_eq!(hi, YMM3_HI, "XSAVE YMM3 upper half");
        }
    }
    let xcrs = s.xcrs.expect("XCRs (KVM_CAP_XCRS)");
    assert_eq!(xcrs.xcrs[0].value, xcr0, "XCR0");
    for (i, d) in DISTINCT_MSRS {
        assert_eq!(s.msr(i), Some(d), "MSR {i:#x}");
    }
    let tsc = s.msr(MSR_IA32_TSC).expect("TSC saved");
    assert!(
        tsc >= TSC_START,
        "TSC {tsc:#x} went back from {TSC_START:#x}"
    );
    let lapic = s.lapic.expect("LAPIC");
    assert_eq!(lapic_reg(&lapic.regs, APIC_TPR), 0x20);
    assert_eq!(lapic_reg(&lapic.regs, APIC_SVR), 0x1ff);
    assert_eq!(lapic_reg(&lapic.regs, APIC_LVT0), 0x0001_0700);
    assert_eq!(lapic_reg(&lapic.regs, APIC_LVT1), 0x400);
    assert_eq!(lapic_reg(&lapic.regs, APIC_LVTERR), 0x0001_00fe);
    assert_eq!(lapic_reg(&lapic.regs, APIC_TDCR), 0xb);
    assert_eq!(lapic_reg(&lapic.regs, APIC_LVTT), LVTT_TSC_DEADLINE);
    assert_eq!(
        s.msr(MSR_IA32_TSC_DEADLINE),
        Some(TSC_DEADLINE),
        "TSC deadline"
    );
    assert_eq!(s.debug_regs.db, [0x1000, 0x2000, 0x3000, 0x4000]);
    assert_eq!(s.debug_regs.dr7, 0x000d_0409);
    assert_eq!(s.debug_regs.dr6, 0xffff_0ff1);
    assert_eq!(s.events.nmi.masked, 1, "NMI masked");
    assert_eq!(s.events.nmi.pending, 1, "NMI pending");
    assert_eq!(s.events.interrupt.shadow, 1, "interrupt shadow");
    assert_eq!(s.mp_state, MpState::Halted);
    assert!(!s.cpuid.is_empty(), "CPUID as set");
}

/// `a` and `b` are the same state, but for the TSC (which counts on, by less than `max_ns`
/// worth) and the LAPIC timer's current count.
fn assert_same_state(a: &VcpuState, b: &VcpuState, max_ns: u64) {
    let tsc_a = a.msr(MSR_IA32_TSC).unwrap();
    let tsc_b = b.msr(MSR_IA32_TSC).unwrap();
    let khz = u64::from(a.tsc_khz.unwrap_or(10_000_000));
    assert!(
        tsc_b >= tsc_a && tsc_b - tsc_a <= max_ns * khz / 1_000_000,
        "TSC {tsc_a:#x} -> {tsc_b:#x}"
    );
    let mask = |s: &VcpuState| {
        let mut s = s.clone();
        for m in &mut s.msrs {
            if m.index == MSR_IA32_TSC {
                m.data = 0;
            }
        }
        if let Some(l) = &mut s.lapic {
            set_lapic_reg(&mut l.regs, APIC_TMCCT, 0);
        }
        s
    };
    let (a, b) = (mask(a), mask(b));
    // Field by field first, for a readable failure.
    assert_eq!(a.regs, b.regs, "regs");
    assert_eq!(a.sregs, b.sregs, "sregs");
    assert_eq!(a.fpu, b.fpu, "fpu");
    assert_eq!(a.xsave, b.xsave, "xsave");
    assert_eq!(a.xcrs, b.xcrs, "xcrs");
    assert_eq!(a.lapic, b.lapic, "lapic");
    assert_eq!(a.msrs, b.msrs, "msrs");
    assert_eq!(a.msrs_unreadable, b.msrs_unreadable, "unreadable MSRs");
    assert_eq!(a.events, b.events, "events");
    assert_eq!(a.mp_state, b.mp_state, "mp_state");
    assert_eq!(a.debug_regs, b.debug_regs, "debug regs");
    assert_eq!(a.cpuid, b.cpuid, "cpuid");
    assert_eq!(a.tsc_khz, b.tsc_khz, "tsc_khz");
    assert_eq!(a.nested, b.nested, "nested");
    assert_eq!(a, b);
}

#[test]
fn vcpu_state_reads_back_what_was_set_and_restores_into_a_fresh_vm() {
    let hv = kvm();
    let cpuid = hv.supported_cpuid().unwrap();
    // x87 | SSE, and AVX where the host has it.
    let xcr0 = supported_xcr0(&cpuid) & 0x7;
    assert!(xcr0 & 3 == 3, "host XCR0 {xcr0:#x}");

    let a = TestVm::new(&hv, Mem::new());
    write_guest(&a.mem, &[0xf4]);
    let vcpu = a.vcpu(&hv);
    make_distinctive(&*vcpu, xcr0);
    let saved = vcpu.state().expect("save the vCPU state");
    check_distinctive(&saved, xcr0);
    eprintln!(
        "saved: {} MSRs, unreadable {:x?}, xsave {} bytes (XSTATE_BV {:#x}), tsc_khz {:?}, \
         nested {:?}",
        saved.msrs.len(),
        saved.msrs_unreadable,
        saved.xsave.as_ref().map_or(0, |x| x.region.len() * 4),
        saved.xsave.as_ref().map_or(0, |x| x.xstate_bv()),
        saved.tsc_khz,
        saved.nested,
    );

    // Restoring into the same vCPU changes nothing.
    vcpu.set_state(&saved).expect("restore into the same vCPU");
    assert_same_state(&saved, &vcpu.state().unwrap(), 5_000_000_000);

    // A fresh VM and vCPU, with nothing set: the restore alone makes it the same vCPU.
    let b = TestVm::new(&hv, Mem::new());
    let fresh = b.vm.create_vcpu(0).unwrap();
    fresh.set_state(&saved).expect("restore into a fresh vCPU");
    let again = fresh.state().unwrap();
    check_distinctive(&again, xcr0);
    assert_same_state(&saved, &again, 5_000_000_000);
}

#[test]
fn vcpu_and_vm_state_survive_json() {
    let hv = kvm();
    let cpuid = hv.supported_cpuid().unwrap();
    let xcr0 = supported_xcr0(&cpuid) & 0x7;
    let t = TestVm::new(&hv, Mem::new());
    let vcpu = t.vcpu(&hv);
    make_distinctive(&*vcpu, xcr0);
    let saved = vcpu.state().unwrap();

    let json = serde_json::to_string(&saved).unwrap();
    let back: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["mp_state"], "Halted");

    // The JSON restores too.
    let u = TestVm::new(&hv, Mem::new());
    let fresh = u.vm.create_vcpu(0).unwrap();
    fresh.set_state(&back).unwrap();
    check_distinctive(&fresh.state().unwrap(), xcr0);

    let vm_state = t.vm.state().unwrap();
    let json = serde_json::to_string(&vm_state).unwrap();
    let back: VmState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, vm_state);
}

#[test]
fn a_state_of_another_version_is_refused() {
    let hv = kvm();
    let t = TestVm::new(&hv, Mem::new());
    let vcpu = t.vcpu(&hv);
    let mut s = vcpu.state().unwrap();
    s.version = 2;
    let err = vcpu.set_state(&s).unwrap_err();
    assert!(
        matches!(
            err,
            HypervisorError::StateVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let mut v = t.vm.state().unwrap();
    v.version = 7;
    let err = t.vm.set_state(&v).unwrap_err();
    assert!(err.to_string().contains("VM state version 7"), "{err}");
}

#[test]
fn kvm_get_msrs_stops_at_the_first_msr_it_refuses() {
    // What the state's MSR loop relies on: KVM reads in order up to the first refused index
    // and says how many it read.
    let hv = kvm();
    let t = TestVm::new(&hv, Mem::new());
    let vcpu = t.vcpu(&hv);
    let mut msrs = [msr(MSR_LSTAR, 0), msr(0x4b56_4dff, 0), msr(MSR_STAR, 0)];
    assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 1);
    // And the state records nothing unreadable of KVM's own list here, or says which.
    let s = vcpu.state().unwrap();
    for i in &s.msrs_unreadable {
        assert!(s.msr(*i).is_none(), "{i:#x} both read and unreadable");
    }
}

#[test]
fn an_msr_the_vcpu_will_not_take_fails_the_restore_and_is_named() {
    let hv = kvm();
    let t = TestVm::new(&hv, Mem::new());
    let vcpu = t.vcpu(&hv);
    let mut s = vcpu.state().unwrap();
    let gs = s
        .msrs
        .iter_mut()
        .find(|m| m.index == MSR_KERNEL_GS_BASE)
        .expect("KERNEL_GS_BASE is in KVM's list");
    gs.data = 0x8000_0000_0000_0000; // not canonical
    let u = TestVm::new(&hv, Mem::new());
    let err = u.vm.create_vcpu(0).unwrap().set_state(&s).unwrap_err();
    assert!(
        matches!(&err, HypervisorError::MsrRestore(v) if v == &[MSR_KERNEL_GS_BASE]),
        "{err}"
    );
    assert!(err.to_string().contains("0xc0000102"), "{err}");
}

#[test]
fn a_tsc_rate_the_host_cannot_give_is_refused_clearly_or_given() {
    let hv = kvm();
    let t = TestVm::new(&hv, Mem::new());
    let vcpu = t.vcpu(&hv);
    let mut s = vcpu.state().unwrap();
    let khz = s.tsc_khz.expect("the TSC rate (KVM_CAP_GET_TSC_KHZ)");
    // Half the rate: without TSC scaling (PVM has no KVM_CAP_TSC_CONTROL) KVM cannot slow it.
    s.tsc_khz = Some(khz / 2);
    let u = TestVm::new(&hv, Mem::new());
    let fresh = u.vm.create_vcpu(0).unwrap();
    match fresh.set_state(&s) {
        Ok(()) => assert_eq!(fresh.state().unwrap().tsc_khz, Some(khz / 2)),
        Err(e @ HypervisorError::StateMismatch(_)) => {
            assert!(e.to_string().contains(&format!("{} kHz", khz / 2)), "{e}");
            eprintln!("refused as expected here: {e}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn vm_state_reads_back_what_was_set_and_restores_into_a_fresh_vm() {
    let hv = kvm();
    let a = TestVm::new(&hv, Mem::new());
    let _vcpu = a.vcpu(&hv);
    let mut s = a.vm.state().expect("save the VM state");
    assert!(s.pit.is_none(), "no PIT was created");
    {
        let chips = s.irqchip.as_mut().expect("irqchip");
        let m = chips.pic_mut(true);
        m.irq_base = 0x20;
        m.imr = 0xb8;
        m.elcr = 0x08;
        let sl = chips.pic_mut(false);
        sl.irq_base = 0x28;
        sl.imr = 0x8f;
        let io = chips.ioapic_mut();
        io.id = 5;
        // Masked, level-triggered, vector 0x31 to APIC 1; and an edge one.
        io.redirtbl[4].bits = 0x0100_0000_0001_a031;
        io.redirtbl[9].bits = 0x0000_0000_0001_0039;
    }
    a.vm.set_state(&s).expect("restore into the same VM");
    let read = a.vm.state().unwrap();
    assert_eq!(read.irqchip, s.irqchip);
    {
        let chips = read.irqchip.as_ref().unwrap();
        assert_eq!(chips.pic(true).imr, 0xb8);
        assert_eq!(chips.ioapic().id, 5);
        let redir = chips.redirection_entries();
        assert_eq!(
            (redir[4], redir[9]),
            (0x0100_0000_0001_a031, 0x0000_0000_0001_0039)
        );
    }

    let b = TestVm::new(&hv, Mem::new());
    let _vcpu = b.vcpu(&hv);
    b.vm.set_state(&read).expect("restore into a fresh VM");
    let again = b.vm.state().unwrap();
    assert_eq!(again.irqchip, read.irqchip);
    assert_eq!(again.pit, None);
    // The clock goes on from the saved value.
    assert!(
        again.clock.clock >= read.clock.clock
            && again.clock.clock - read.clock.clock < 5_000_000_000,
        "clock {} -> {}",
        read.clock.clock,
        again.clock.clock
    );
}

#[test]
fn without_an_irqchip_there_is_no_lapic_or_irqchip_state_and_restores_say_so() {
    let hv = kvm();
    let mem = Mem::new();
    let bare = hv.create_vm().unwrap();
    // SAFETY: `mem` outlives `bare` (declared before it, so dropped after).
    unsafe {
        bare.set_user_memory_region(0, 0, MEM_SIZE as u64, mem.ptr as u64, false)
            .unwrap()
    };
    let vcpu = bare.create_vcpu(0).unwrap();
    let vcpu_state = vcpu.state().unwrap();
    let vm_state = bare.state().unwrap();
    assert!(vcpu_state.lapic.is_none());
    assert!(vm_state.irqchip.is_none());
    // The same kind of VM takes them back.
    vcpu.set_state(&vcpu_state).unwrap();
    bare.set_state(&vm_state).unwrap();

    // One with an irqchip does not: a clear error instead of a vCPU without its LAPIC state.
    let t = TestVm::new(&hv, Mem::new());
    let err = t.vm.set_state(&vm_state).unwrap_err();
    assert!(err.to_string().contains("irqchip"), "{err}");
    let err =
        t.vm.create_vcpu(0)
            .unwrap()
            .set_state(&vcpu_state)
            .unwrap_err();
    assert!(err.to_string().contains("LAPIC"), "{err}");
}

/// `inc rax; add rbx, rax; mov [DATA], rax; out 0x80, eax; jmp back`: a counter the guest
/// reports on every turn, and a running sum that only the vCPU state carries.
const COUNTER: [u8; 18] = [
    0x48, 0xff, 0xc0, // inc rax
    0x48, 0x01, 0xc3, // add rbx, rax
    0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00, // mov [0x20000], rax
    0xe7, 0x80, // out 0x80, eax
    0xeb, 0xee, // jmp -18
];

/// Runs until the guest's next OUT to the counter port and returns its value.
fn next_out(vcpu: &mut dyn Vcpu) -> u32 {
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VmExit::IoOut(OUT_PORT, data) => {
                let mut v = [0u8; 4];
                v[..data.len()].copy_from_slice(data);
                return u32::from_le_bytes(v);
            }
            VmExit::Ignore | VmExit::Interrupted => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no OUT in 1000 exits");
}

/// After an I/O exit the instruction completes on the next KVM_RUN: that run, with
/// `immediate_exit`, must happen before a save.
fn complete_pending_io(vcpu: &mut dyn Vcpu) {
    vcpu.set_immediate_exit(true);
    match vcpu.run().expect("KVM_RUN") {
        VmExit::Interrupted => {}
        other => panic!("immediate exit gave {other:?}"),
    }
    vcpu.set_immediate_exit(false);
}

#[test]
fn a_running_guest_continues_where_it_was_saved_in_two_clones() {
    let hv = kvm();
    let src = TestVm::new(&hv, Mem::new());
    write_guest(&src.mem, &COUNTER);
    let mut vcpu = src.vcpu(&hv);
    enter_long_mode(&*vcpu, CODE);
    for want in 1..=5 {
        assert_eq!(next_out(&mut *vcpu), want);
    }
    complete_pending_io(&mut *vcpu);
    let vcpu_state = vcpu.state().unwrap();
    let vm_state = src.vm.state().unwrap();
    assert_eq!(vcpu_state.regs.rax, 5);
    assert_eq!(vcpu_state.regs.rbx, 15);
    // Through JSON, as a snapshot file would carry it.
    let vcpu_state: VcpuState =
        serde_json::from_str(&serde_json::to_string(&vcpu_state).unwrap()).unwrap();
    let vm_state: VmState =
        serde_json::from_str(&serde_json::to_string(&vm_state).unwrap()).unwrap();
    let ram = src.mem.bytes().to_vec();
    assert_eq!(src.mem.read_u64(DATA), 5);

    // The source runs on...
    assert_eq!(next_out(&mut *vcpu), 6);
    drop(vcpu);
    drop(src);

    // ...and so do two clones of the saved state, from the same place.
    for clone in 0..2 {
        let t = TestVm::new(&hv, Mem::copy_of(&ram));
        t.vm.set_state(&vm_state).unwrap();
        let mut vcpu = t.vm.create_vcpu(0).unwrap();
        vcpu.set_state(&vcpu_state).unwrap();
        for want in 6..=8 {
            assert_eq!(next_out(&mut *vcpu), want, "clone {clone}");
        }
        complete_pending_io(&mut *vcpu);
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rax, regs.rbx), (8, 36), "clone {clone}");
        assert_eq!(t.mem.read_u64(DATA), 8, "clone {clone}");
    }
}
