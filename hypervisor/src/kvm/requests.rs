//! The KVM ioctl requests this backend issues, by number, for the seccomp filters of the
//! threads that issue them. `kvm-ioctls` keeps its request numbers private, so they are
//! defined here the way it defines them (`linux/kvm.h`: `_IO`/`_IOR`/`_IOW`/`_IOWR` of type
//! `KVMIO`, sized by the `kvm-bindings` struct the kernel's header names), and a unit test
//! compares them with the header's values.
//!
//! A request a thread kind newly needs goes into its list here, with the path that needs it:
//! a thread making a request outside its filter stops the VMM.

use std::mem::size_of;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msrs, kvm_nested_state, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// `_IO(KVMIO, nr)`.
const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0)
}

/// `_IOR(KVMIO, nr, T)`.
const fn ior<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size_of::<T>() as u32)
}

/// `_IOW(KVMIO, nr, T)`.
const fn iow<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size_of::<T>() as u32)
}

/// `_IOWR(KVMIO, nr, T)`.
const fn iowr<T>(nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, KVMIO, nr, size_of::<T>() as u32)
}

// On /dev/kvm and the VM: not a vCPU thread's (the tests name them as neighbours a vCPU's
// filter refuses).
pub const KVM_CREATE_VM: u64 = io(0x01);
pub const KVM_CREATE_VCPU: u64 = io(0x41);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow::<kvm_userspace_memory_region>(0x46);

// On the VM, from device work a vCPU's exits run.
pub const KVM_SET_GSI_ROUTING: u64 = iow::<kvm_irq_routing>(0x6a);
pub const KVM_IRQFD: u64 = iow::<kvm_irqfd>(0x76);
pub const KVM_IOEVENTFD: u64 = iow::<kvm_ioeventfd>(0x79);

// On the vCPU.
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior::<kvm_regs>(0x81);
pub const KVM_SET_REGS: u64 = iow::<kvm_regs>(0x82);
pub const KVM_GET_SREGS: u64 = ior::<kvm_sregs>(0x83);
pub const KVM_GET_MSRS: u64 = iowr::<kvm_msrs>(0x88);
pub const KVM_GET_FPU: u64 = ior::<kvm_fpu>(0x8c);
pub const KVM_GET_LAPIC: u64 = ior::<kvm_lapic_state>(0x8e);
pub const KVM_SET_CPUID2: u64 = iow::<kvm_cpuid2>(0x90);
pub const KVM_GET_CPUID2: u64 = iowr::<kvm_cpuid2>(0x91);
pub const KVM_GET_MP_STATE: u64 = ior::<kvm_mp_state>(0x98);
pub const KVM_NMI: u64 = io(0x9a);
pub const KVM_GET_VCPU_EVENTS: u64 = ior::<kvm_vcpu_events>(0x9f);
pub const KVM_GET_DEBUGREGS: u64 = ior::<kvm_debugregs>(0xa1);
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_XSAVE: u64 = ior::<kvm_xsave>(0xa4);
pub const KVM_GET_XCRS: u64 = ior::<kvm_xcrs>(0xa6);
pub const KVM_GET_NESTED_STATE: u64 = iowr::<kvm_nested_state>(0xbe);
pub const KVM_GET_XSAVE2: u64 = ior::<kvm_xsave>(0xcf);

/// What a vCPU's thread asks of KVM, and why. Everything else on the VM and its vCPUs (creating
/// them, memory slots, CPUID, setting state at a restore, the dirty log, the clock) is the
/// control loop's or the migration sender's.
pub const VCPU_THREAD: &[u64] = &[
    // `Vcpu::run`: the run loop, and completing an I/O exit with `immediate_exit` before a
    // pause (cpu.rs).
    KVM_RUN,
    // Device work on port and MMIO exits (the guest's driver writes): the guest programming
    // a BAR moves the queues' notification ioeventfds (KVM_IOEVENTFD, and with the deassign
    // flag to take the old ones down); MSI-X table and enable writes set the vectors' MSI
    // routes (the whole table: KVM_SET_GSI_ROUTING). The vectors' irqfds are wired when a
    // device is built (control loop); a vCPU takes them down (KVM_IRQFD with the deassign
    // flag) only when it drops the last reference to a device the control loop has just
    // removed (its exit was in flight), as it then also resets the device.
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SET_GSI_ROUTING,
    // `vm.nmi`: each vCPU's thread queues the NMI on its own vCPU (`Vcpu::nmi`, cpu.rs).
    KVM_NMI,
    // `Vcpu::state` (kvm/state.rs), run by the parked thread that owns the vCPU for a
    // snapshot of the paused VM (`Vm::snapshot`: `vm.snapshot`, and a migration once the
    // sender has paused it).
    KVM_GET_MP_STATE,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_FPU,
    // The XSAVE area: KVM_GET_XSAVE2 where KVM_CAP_XSAVE2 gives its size, else KVM_GET_XSAVE.
    KVM_GET_XSAVE,
    KVM_GET_XSAVE2,
    KVM_GET_XCRS,
    KVM_GET_DEBUGREGS,
    KVM_GET_LAPIC,
    KVM_GET_MSRS,
    KVM_GET_NESTED_STATE,
    KVM_GET_CPUID2,
    KVM_GET_TSC_KHZ,
    KVM_GET_VCPU_EVENTS,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers `linux/kvm.h` gives on x86-64 (the kernel's own `_IOC` arithmetic on its
    /// struct sizes), against ours.
    #[test]
    fn requests_are_the_kernels() {
        for (ours, header, name) in [
            (KVM_CREATE_VM, 0xae01, "KVM_CREATE_VM"),
            (KVM_CREATE_VCPU, 0xae41, "KVM_CREATE_VCPU"),
            (
                KVM_SET_USER_MEMORY_REGION,
                0x4020_ae46,
                "KVM_SET_USER_MEMORY_REGION",
            ),
            (KVM_SET_GSI_ROUTING, 0x4008_ae6a, "KVM_SET_GSI_ROUTING"),
            (KVM_IRQFD, 0x4020_ae76, "KVM_IRQFD"),
            (KVM_IOEVENTFD, 0x4040_ae79, "KVM_IOEVENTFD"),
            (KVM_RUN, 0xae80, "KVM_RUN"),
            (KVM_GET_REGS, 0x8090_ae81, "KVM_GET_REGS"),
            (KVM_SET_REGS, 0x4090_ae82, "KVM_SET_REGS"),
            (KVM_GET_SREGS, 0x8138_ae83, "KVM_GET_SREGS"),
            (KVM_GET_MSRS, 0xc008_ae88, "KVM_GET_MSRS"),
            (KVM_GET_FPU, 0x81a0_ae8c, "KVM_GET_FPU"),
            (KVM_GET_LAPIC, 0x8400_ae8e, "KVM_GET_LAPIC"),
            (KVM_SET_CPUID2, 0x4008_ae90, "KVM_SET_CPUID2"),
            (KVM_GET_CPUID2, 0xc008_ae91, "KVM_GET_CPUID2"),
            (KVM_GET_MP_STATE, 0x8004_ae98, "KVM_GET_MP_STATE"),
            (KVM_NMI, 0xae9a, "KVM_NMI"),
            (KVM_GET_VCPU_EVENTS, 0x8040_ae9f, "KVM_GET_VCPU_EVENTS"),
            (KVM_GET_DEBUGREGS, 0x8080_aea1, "KVM_GET_DEBUGREGS"),
            (KVM_GET_TSC_KHZ, 0xaea3, "KVM_GET_TSC_KHZ"),
            (KVM_GET_XSAVE, 0x9000_aea4, "KVM_GET_XSAVE"),
            (KVM_GET_XCRS, 0x8188_aea6, "KVM_GET_XCRS"),
            (KVM_GET_NESTED_STATE, 0xc080_aebe, "KVM_GET_NESTED_STATE"),
            (KVM_GET_XSAVE2, 0x9000_aecf, "KVM_GET_XSAVE2"),
        ] {
            assert_eq!(
                ours, header,
                "{name}: {ours:#x}, the header says {header:#x}"
            );
        }
    }

    #[test]
    fn a_vcpu_thread_neither_creates_nor_maps_nor_writes_state() {
        for no in [
            KVM_CREATE_VM,
            KVM_CREATE_VCPU,
            KVM_SET_USER_MEMORY_REGION,
            KVM_SET_REGS,
            KVM_SET_CPUID2,
        ] {
            assert!(!VCPU_THREAD.contains(&no), "{no:#x}");
        }
    }
}
