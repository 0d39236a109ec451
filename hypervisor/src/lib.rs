//! A thin layer over the host hypervisor. The VMM talks to these traits only, so a second
//! backend (MSHV) can be added beside `kvm` without touching the device or VM code.
//!
//! The x86 register and table types are KVM's own layout (`kvm-bindings`), re-exported under
//! neutral names: they are plain C structs that every x86 hypervisor API mirrors.

mod kvm;
mod state;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

pub use kvm::requests as kvm_requests;
pub use kvm::KvmHypervisor;
pub use kvm_bindings::{
    kvm_cpuid_entry2 as CpuIdEntry, kvm_debugregs as DebugRegisters, kvm_dtable as DescriptorTable,
    kvm_fpu as FpuState, kvm_lapic_state as LapicState, kvm_msr_entry as MsrEntry,
    kvm_regs as StandardRegisters, kvm_segment as SegmentRegister, kvm_sregs as SpecialRegisters,
    kvm_vcpu_events as VcpuEvents, kvm_xcrs as ExtendedControlRegisters,
};
pub use state::{
    IrqchipState, NestedState, VcpuState, VmState, XsaveState, VCPU_STATE_VERSION, VM_STATE_VERSION,
};

#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (want 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability we need: {0}")]
    MissingCapability(&'static str),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot restore {what} state version {found}: this build reads version {supported}")]
    StateVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("cannot restore the saved state: {0}")]
    StateMismatch(String),
    #[error("KVM refused to restore MSRs {}", hex_list(.0))]
    MsrRestore(Vec<u32>),
}

fn hex_list(v: &[u32]) -> String {
    v.iter()
        .map(|i| format!("{i:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Why a vCPU left guest mode, with what the VMM must service.
#[derive(Debug)]
pub enum VmExit<'a> {
    IoIn(u16, &'a mut [u8]),
    IoOut(u16, &'a [u8]),
    MmioRead(u64, &'a mut [u8]),
    MmioWrite(u64, &'a [u8]),
    /// The guest halted with interrupts the in-kernel irqchip does not handle.
    Hlt,
    /// Triple fault or similar: a real machine resets.
    Shutdown,
    /// The guest asked the hypervisor to reset (KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest asked the hypervisor to power off (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// KVM_RUN was interrupted by a signal or `immediate_exit`.
    Interrupted,
    /// The hypervisor could not run the guest.
    Error(String),
    /// Nothing to do; run again.
    Ignore,
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug)]
pub enum IoEventAddress {
    Pio(u64),
    Mmio(u64),
}

/// One entry of the GSI routing table.
#[derive(Clone, Copy, Debug)]
pub enum IrqRoute {
    /// GSI to a pin of the in-kernel IOAPIC.
    Ioapic { gsi: u32, pin: u32 },
    /// GSI to a pin of the in-kernel PIC (`chip` 0 = master, 1 = slave).
    Pic { gsi: u32, chip: u32, pin: u32 },
    /// GSI to a message-signalled interrupt.
    Msi {
        gsi: u32,
        address: u64,
        data: u32,
        devid: Option<u32>,
    },
}

/// Snapshot of the VM's clock, as KVM_GET_CLOCK reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockData {
    pub clock: u64,
    pub flags: u32,
}

/// Multiprocessing state of a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    Runnable,
    Uninitialized,
    InitReceived,
    Halted,
    SipiReceived,
    Other(u32),
}

pub trait Hypervisor: Send + Sync {
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// The CPUID leaves the hypervisor can present to a guest.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    /// The MSRs whose state a vCPU carries (for save/restore).
    fn msr_index_list(&self) -> Result<Vec<u32>>;
}

pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and valid for as long as the slot exists.
    unsafe fn set_user_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> Result<()>;
    /// The pages of memory slot `slot` (`size` bytes, registered with `log_dirty`) the guest
    /// wrote since the last call (or since logging started), one bit per 4 KiB page in 64-bit
    /// words, page 0 in bit 0 of word 0; reading clears the log.
    fn get_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>>;
    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, local APICs).
    fn create_irqchip(&self) -> Result<()>;
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()>;
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> Result<()>;
    /// Replaces the whole GSI routing table.
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()>;
    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()>;
    fn get_clock(&self) -> Result<ClockData>;
    fn set_clock(&self, data: ClockData) -> Result<()>;
    /// The in-kernel irqchip, PIT and clock (see [`VmState`]). Every vCPU must be out of
    /// `KVM_RUN`.
    fn state(&self) -> Result<VmState>;
    /// Puts back what `state` saved: after `create_irqchip` (where the state has an irqchip),
    /// before the vCPUs' state.
    fn set_state(&self, state: &VmState) -> Result<()>;
}

pub trait Vcpu: Send {
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// Makes the next (or current, once signalled) `run` return at once.
    fn set_immediate_exit(&mut self, exit: bool);
    /// Queues a non-maskable interrupt for this vCPU: it is taken before the vCPU's next
    /// instruction in the guest (KVM_NMI). Only the thread that runs the vCPU issues it.
    fn nmi(&self) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    fn get_regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    /// The x87 and SSE registers, without MXCSR: KVM_GET_FPU and KVM_SET_FPU leave `mxcsr` out.
    /// Where the host has XSAVE, the XSAVE area is the authority: KVM_SET_FPU writes the legacy
    /// area without marking x87/SSE present in XSTATE_BV, so use `set_xsave` there.
    fn get_fpu(&self) -> Result<FpuState>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    /// The XSAVE area in the standard (uncompacted) layout; an error where the host has no
    /// KVM_CAP_XSAVE.
    fn get_xsave(&self) -> Result<XsaveState>;
    fn set_xsave(&self, xsave: &XsaveState) -> Result<()>;
    /// Reads the MSRs whose indices `msrs` holds, in order, up to the first one that fails;
    /// returns how many were read.
    fn get_msrs(&self, msrs: &mut [MsrEntry]) -> Result<usize>;
    /// Returns how many of `msrs` were written (in order, up to the first refused).
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<usize>;
    fn get_lapic(&self) -> Result<LapicState>;
    fn set_lapic(&self, lapic: &LapicState) -> Result<()>;
    fn get_mp_state(&self) -> Result<MpState>;
    fn set_mp_state(&self, state: MpState) -> Result<()>;
    /// The CPUID table as set, with what the hypervisor adjusted in it.
    fn get_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    fn get_xcrs(&self) -> Result<ExtendedControlRegisters>;
    fn set_xcrs(&self, xcrs: &ExtendedControlRegisters) -> Result<()>;
    fn get_debug_regs(&self) -> Result<DebugRegisters>;
    fn set_debug_regs(&self, regs: &DebugRegisters) -> Result<()>;
    fn get_vcpu_events(&self) -> Result<VcpuEvents>;
    fn set_vcpu_events(&self, events: &VcpuEvents) -> Result<()>;
    /// Everything the hypervisor holds for this vCPU (see [`VcpuState`]). The vCPU must be out
    /// of `KVM_RUN`, and after an I/O or MMIO exit it must have been run once more with
    /// `immediate_exit` set, so that the instruction has completed.
    fn state(&self) -> Result<VcpuState>;
    /// Puts back what `state` saved, in the order KVM needs, into a vCPU that has not run;
    /// the VM's state goes first.
    fn set_state(&self, state: &VcpuState) -> Result<()>;
}
