//! What a snapshot or a migration carries of a vCPU and of the VM's in-kernel devices, as
//! versioned serde types.
//!
//! The C structs are KVM's own (`kvm-bindings`, serialized by its `serde` feature as their raw
//! bytes: a newer kernel's longer struct is truncated, an older one's zero-padded). Only what that
//! crate does not serialize has a mirror here (`kvm_fpu`), and what has a variable size
//! (XSAVE, nested state) gets a type of its own.

use kvm_bindings::{
    kvm_clock_data, kvm_ioapic_state, kvm_irqchip, kvm_pic_state, kvm_pit_state2,
    nested::KvmNestedStateBuffer, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_STATE_NESTED_FORMAT_VMX, KVM_STATE_NESTED_GUEST_MODE,
    KVM_STATE_NESTED_RUN_PENDING,
};
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use crate::{
    CpuIdEntry, DebugRegisters, ExtendedControlRegisters, FpuState, LapicState, MpState, MsrEntry,
    SpecialRegisters, StandardRegisters, VcpuEvents,
};

/// The `VcpuState` layout this build writes and the only one it restores.
pub const VCPU_STATE_VERSION: u32 = 1;
/// The `VmState` layout this build writes and the only one it restores.
pub const VM_STATE_VERSION: u32 = 1;

/// Everything KVM holds for one x86 vCPU.
///
/// Taken with [`crate::Vcpu::state`] while the vCPU is out of `KVM_RUN` (after an I/O or MMIO
/// exit, run it once more with `immediate_exit` set so the instruction completes first), and put
/// back with [`crate::Vcpu::set_state`] into a vCPU that has not run yet, after the VM's state.
///
/// Two fields move on their own between a save and the next: the TSC (`msrs` entry 0x10, it
/// counts on from where it was) and the LAPIC timer's current count (`lapic` offset 0x390, while
/// the timer runs). Everything else reads back as it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// [`VCPU_STATE_VERSION`] when written.
    pub version: u32,
    pub regs: StandardRegisters,
    pub sregs: SpecialRegisters,
    /// KVM_GET_FPU: x87 and SSE registers (`mxcsr` is not carried by KVM, it stays 0), for hosts
    /// without XSAVE. Where `xsave` is present it is the authority and is restored after this:
    /// KVM_SET_FPU writes the legacy area without marking it present in XSTATE_BV, so this view
    /// can hold bytes that the XSAVE area (and the guest) see as in their init state.
    #[serde(with = "fpu_serde")]
    pub fpu: FpuState,
    /// `None` where the host has no `KVM_CAP_XSAVE`.
    #[serde(default)]
    pub xsave: Option<XsaveState>,
    /// `None` where the host has no `KVM_CAP_XCRS`.
    #[serde(default)]
    pub xcrs: Option<ExtendedControlRegisters>,
    /// `None` where the VM has no in-kernel irqchip.
    #[serde(default)]
    pub lapic: Option<LapicState>,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` that this vCPU let us read, in that list's order.
    pub msrs: Vec<MsrEntry>,
    /// The indices of `KVM_GET_MSR_INDEX_LIST` that this vCPU refused to read (so not saved).
    #[serde(default)]
    pub msrs_unreadable: Vec<u32>,
    pub events: VcpuEvents,
    pub mp_state: MpState,
    pub debug_regs: DebugRegisters,
    /// The CPUID table as set (`KVM_GET_CPUID2`: with what KVM adjusted).
    pub cpuid: Vec<CpuIdEntry>,
    /// The guest's TSC rate; `None` where the host cannot say (`KVM_CAP_GET_TSC_KHZ`).
    #[serde(default)]
    pub tsc_khz: Option<u32>,
    /// Nested virtualization state; `None` where the host has none to give
    /// (`KVM_CAP_NESTED_STATE` absent, or `KVM_GET_NESTED_STATE` refused, as on PVM).
    #[serde(default)]
    pub nested: Option<NestedState>,
}

impl VcpuState {
    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// The XSAVE area as `KVM_GET_XSAVE2` (or `KVM_GET_XSAVE`, 4 KiB) returns it, in 32-bit words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsaveState {
    pub region: Vec<u32>,
}

impl XsaveState {
    /// XSTATE_BV: which state components the area holds (the others are in their init state).
    pub fn xstate_bv(&self) -> u64 {
        // The XSAVE header starts at byte 512.
        let lo = self.region.get(128).copied().unwrap_or(0);
        let hi = self.region.get(129).copied().unwrap_or(0);
        u64::from(lo) | (u64::from(hi) << 32)
    }
}

/// `KVM_GET_NESTED_STATE`'s buffer (header and VMX/SVM data). Serialized as the `size` bytes
/// KVM filled in (128 for a header alone), not the whole 8 KiB buffer.
#[derive(Clone, Copy)]
pub struct NestedState(pub KvmNestedStateBuffer);

impl NestedState {
    /// Whether the guest was using nested virtualization: inside a nested guest, or (VMX) in
    /// VMX operation. A state without it can be dropped on a host that has no nested state.
    pub fn in_use(&self) -> bool {
        let s = &self.0;
        if s.flags & (KVM_STATE_NESTED_GUEST_MODE | KVM_STATE_NESTED_RUN_PENDING) as u16 != 0 {
            return true;
        }
        // SAFETY: the VMX header is integers only, within the union's initialized 120 bytes.
        u32::from(s.format) == KVM_STATE_NESTED_FORMAT_VMX
            && unsafe { s.hdr.vmx.vmxon_pa } != u64::MAX
    }

    fn filled(&self) -> &[u8] {
        let bytes = self.0.as_bytes();
        &bytes[..(self.0.size as usize).min(bytes.len())]
    }
}

impl Serialize for NestedState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.filled())
    }
}

impl<'de> Deserialize<'de> for NestedState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // kvm-bindings zero-pads a shorter byte string to the whole buffer.
        KvmNestedStateBuffer::deserialize(d).map(NestedState)
    }
}

impl PartialEq for NestedState {
    fn eq(&self, other: &Self) -> bool {
        self.filled() == other.filled()
    }
}

impl std::fmt::Debug for NestedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedState")
            .field("flags", &self.0.flags)
            .field("format", &self.0.format)
            .field("size", &self.0.size)
            .finish_non_exhaustive()
    }
}

/// The VM-wide state KVM holds: the in-kernel interrupt controllers, the PIT if one was
/// created, and the kvmclock.
///
/// Taken with [`crate::Vm::state`] while every vCPU is out of `KVM_RUN`; put back with
/// [`crate::Vm::set_state`] after `create_irqchip` and before any vCPU state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// [`VM_STATE_VERSION`] when written.
    pub version: u32,
    /// `KVM_GET_IRQCHIP` for chip 0, 1 and 2: PIC master, PIC slave, IOAPIC. `None` where the VM
    /// has no in-kernel irqchip.
    #[serde(default)]
    pub irqchip: Option<IrqchipState>,
    /// `None` where the VM has no in-kernel PIT (ours creates none).
    #[serde(default)]
    pub pit: Option<kvm_pit_state2>,
    /// The kvmclock at the time of the save; it moves on from there after a restore.
    pub clock: kvm_clock_data,
}

/// The in-kernel PICs and IOAPIC, as `KVM_GET_IRQCHIP` returns them.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl IrqchipState {
    pub(crate) fn empty() -> Self {
        let chip = |chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        IrqchipState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
        }
    }

    pub fn pic(&self, master: bool) -> &kvm_pic_state {
        let chip = if master {
            &self.pic_master
        } else {
            &self.pic_slave
        };
        // SAFETY: kvm_pic_state is plain integers (any bit pattern is valid) and fits in the
        // union's 512 bytes, all of which are initialized.
        unsafe { &chip.chip.pic }
    }

    pub fn pic_mut(&mut self, master: bool) -> &mut kvm_pic_state {
        let chip = if master {
            &mut self.pic_master
        } else {
            &mut self.pic_slave
        };
        // SAFETY: as in `pic`.
        unsafe { &mut chip.chip.pic }
    }

    pub fn ioapic(&self) -> &kvm_ioapic_state {
        // SAFETY: kvm_ioapic_state is plain integers and unions of integers (any bit pattern is
        // valid) and fits in the union's 512 bytes, all of which are initialized.
        unsafe { &self.ioapic.chip.ioapic }
    }

    pub fn ioapic_mut(&mut self) -> &mut kvm_ioapic_state {
        // SAFETY: as in `ioapic`.
        unsafe { &mut self.ioapic.chip.ioapic }
    }

    /// The IOAPIC's redirection table entries as 64-bit words.
    pub fn redirection_entries(&self) -> Vec<u64> {
        self.ioapic()
            .redirtbl
            .iter()
            // SAFETY: each entry is a union of a u64 and bit fields of the same 8 bytes.
            .map(|e| unsafe { e.bits })
            .collect()
    }

    fn chips(&self) -> [&kvm_irqchip; 3] {
        [&self.pic_master, &self.pic_slave, &self.ioapic]
    }
}

impl PartialEq for IrqchipState {
    fn eq(&self, other: &Self) -> bool {
        self.chips()
            .iter()
            .zip(other.chips())
            .all(|(a, b)| a.as_bytes() == b.as_bytes())
    }
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let io = self.ioapic();
        f.debug_struct("IrqchipState")
            .field("pic_master", self.pic(true))
            .field("pic_slave", self.pic(false))
            .field("ioapic.id", &io.id)
            .field("ioapic.irr", &io.irr)
            .field("ioapic.redirtbl", &self.redirection_entries())
            .finish()
    }
}

impl PartialEq for VmState {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.irqchip == other.irqchip
            && self.pit == other.pit
            && self.clock == other.clock
    }
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("version", &self.version)
            .field("irqchip", &self.irqchip)
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .finish()
    }
}

/// `kvm_fpu` has no serde in kvm-bindings: a mirror with the same fields (padding left out).
mod fpu_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::FpuState;

    #[derive(Serialize, Deserialize)]
    struct Fpu {
        fpr: [[u8; 16]; 8],
        fcw: u16,
        fsw: u16,
        ftwx: u8,
        last_opcode: u16,
        last_ip: u64,
        last_dp: u64,
        xmm: [[u8; 16]; 16],
        mxcsr: u32,
    }

    pub fn serialize<S: Serializer>(f: &FpuState, s: S) -> Result<S::Ok, S::Error> {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FpuState, D::Error> {
        let f = Fpu::deserialize(d)?;
        Ok(FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_only(flags: u16, vmxon_pa: u64) -> NestedState {
        let mut b = KvmNestedStateBuffer::empty();
        b.flags = flags;
        b.format = KVM_STATE_NESTED_FORMAT_VMX as u16;
        b.size = 128;
        b.hdr.vmx.vmxon_pa = vmxon_pa;
        b.hdr.vmx.vmcs12_pa = u64::MAX;
        NestedState(b)
    }

    #[test]
    fn nested_state_is_serialized_as_the_bytes_kvm_filled_in() {
        let n = header_only(0, 0x1234_5000);
        let json = serde_json::to_string(&n).unwrap();
        let v: Vec<u8> = serde_json::from_str(&json).unwrap();
        assert_eq!(v.len(), 128, "the header alone, not the 8 KiB buffer");
        let back: NestedState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, n);
        // SAFETY: reading an integer of the VMX header.
        assert_eq!(unsafe { back.0.hdr.vmx.vmxon_pa }, 0x1234_5000);
    }

    #[test]
    fn nested_state_in_use_when_in_guest_mode_or_vmx_operation() {
        assert!(!header_only(0, u64::MAX).in_use());
        assert!(header_only(0, 0x1000).in_use());
        assert!(header_only(KVM_STATE_NESTED_GUEST_MODE as u16, u64::MAX).in_use());
    }

    #[test]
    fn xstate_bv_is_read_from_the_xsave_header() {
        let mut region = vec![0u32; 1024];
        region[128] = 0xe7;
        region[129] = 0x2;
        assert_eq!(XsaveState { region }.xstate_bv(), 0x2_0000_00e7);
        assert_eq!(XsaveState { region: vec![] }.xstate_bv(), 0);
    }
}
