//! Saving and restoring a vCPU's and a VM's KVM state (see `crate::state` for what is kept).
//!
//! The order follows what KVM's ioctls do to each other, as QEMU, Firecracker and the original
//! Cloud Hypervisor found:
//!
//! - Save: KVM_GET_MP_STATE first (it accepts pending INIT/SIPI, which changes CS:RIP and the
//!   LAPIC), KVM_GET_VCPU_EVENTS last (it folds queued NMIs into the pending count).
//! - Restore: CPUID first (it decides which MSRs, XCR0 bits and XSAVE components KVM accepts),
//!   then the TSC rate (so the TSC MSR is written at the right rate); sregs before the nested
//!   state (EFER.SVME) and, with nested state, IA32_FEATURE_CONTROL and the VMX capability MSRs
//!   before it too; the LAPIC after the sregs (the APIC base and x2APIC mode live there) and after
//!   the MP state; IA32_TSC_DEADLINE after the LAPIC (KVM drops it unless the LAPIC timer is
//!   in TSC-deadline mode) and after IA32_TSC (it counts in guest TSC); the events last.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_msr_entry, kvm_xsave, nested::KvmNestedStateBuffer, Xsave,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::warn;
use vmm_sys_util::fam::FamStruct;

use super::{ioctl_err, KvmVcpu, KvmVm};
use crate::state::IrqchipState;
use crate::{
    HypervisorError, MsrEntry, NestedState, Result, Vcpu, VcpuState, VmState, XsaveState,
    VCPU_STATE_VERSION, VM_STATE_VERSION,
};

const MSR_IA32_FEATURE_CONTROL: u32 = 0x3a;
const MSR_IA32_VMX_FIRST: u32 = 0x480;
const MSR_IA32_VMX_LAST: u32 = 0x492;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// KVM takes at most 255 MSRs per KVM_GET_MSRS/KVM_SET_MSRS.
const MSRS_PER_CALL: usize = 128;

/// XSTATE_BV bits of x87 and SSE state: what KVM_GET_FPU also holds.
const XFEATURES_FP_SSE: u64 = 0x3;

/// What the host offers for a vCPU's state, probed once per VM.
pub(crate) struct StateCaps {
    /// KVM_CAP_XSAVE: KVM_GET_XSAVE/KVM_SET_XSAVE exist.
    xsave: bool,
    /// KVM_CAP_XSAVE2: the XSAVE area's size in bytes (0: use the 4 KiB KVM_GET_XSAVE).
    xsave2_size: usize,
    xcrs: bool,
    get_tsc_khz: bool,
    nested_state: bool,
    msr_index_list: std::sync::Arc<[u32]>,
}

impl StateCaps {
    pub(crate) fn probe(kvm: &Kvm, vm: &VmFd, msr_index_list: std::sync::Arc<[u32]>) -> Self {
        StateCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            // Per VM: it grows with the XSAVE features the process was allowed for guests.
            xsave2_size: usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0),
            xcrs: kvm.check_extension(Cap::Xcrs),
            get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            nested_state: kvm.check_extension_int(Cap::NestedState) > 0,
            msr_index_list,
        }
    }

    /// The XSAVE area's length in 32-bit words, and how many of them lie beyond `kvm_xsave`.
    fn xsave_words(&self) -> (usize, usize) {
        let base = size_of::<kvm_xsave>() / 4;
        let total = self.xsave2_size.div_ceil(4).max(base);
        (total, total - base)
    }
}

fn mismatch(msg: impl Into<String>) -> HypervisorError {
    HypervisorError::StateMismatch(msg.into())
}

/// Runs `io` (KVM_GET_MSRS or KVM_SET_MSRS) over all of `entries`, which stops at the first MSR
/// KVM refuses: skips that one and goes on with the rest. Returns the refused MSRs' positions.
fn msr_io(
    entries: &mut [MsrEntry],
    mut io: impl FnMut(&mut [MsrEntry]) -> Result<usize>,
) -> Result<Vec<usize>> {
    let mut refused = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let end = entries.len().min(start + MSRS_PER_CALL);
        let done = io(&mut entries[start..end])?;
        if done < end - start {
            refused.push(start + done);
            start += done + 1;
        } else {
            start = end;
        }
    }
    Ok(refused)
}

impl KvmVcpu {
    pub(super) fn save_state(&self) -> Result<VcpuState> {
        let mp_state = self.get_mp_state()?;
        let regs = self.get_regs()?;
        let sregs = self.get_sregs()?;
        let fpu = self.get_fpu()?;
        let xsave = self.save_xsave()?;
        let xcrs = if self.caps.xcrs {
            Some(self.get_xcrs()?)
        } else {
            None
        };
        let debug_regs = self.get_debug_regs()?;
        let lapic = if self.lapic {
            Some(self.get_lapic()?)
        } else {
            None
        };

        let mut msrs: Vec<MsrEntry> = self
            .caps
            .msr_index_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let refused = msr_io(&mut msrs, |chunk| self.get_msrs(chunk))?;
        let msrs_unreadable: Vec<u32> = refused.iter().map(|&i| msrs[i].index).collect();
        if !msrs_unreadable.is_empty() {
            log::debug!("MSRs this vCPU does not let us read: {msrs_unreadable:x?}");
        }
        for &i in refused.iter().rev() {
            msrs.remove(i);
        }

        let nested = self.save_nested();
        let cpuid = self.get_cpuid()?;
        let tsc_khz = if self.caps.get_tsc_khz {
            Some(
                self.fd
                    .get_tsc_khz()
                    .map_err(ioctl_err("KVM_GET_TSC_KHZ"))?,
            )
        } else {
            None
        };
        let events = self.get_vcpu_events()?;

        Ok(VcpuState {
            version: VCPU_STATE_VERSION,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            lapic,
            msrs,
            msrs_unreadable,
            events,
            mp_state,
            debug_regs,
            cpuid,
            tsc_khz,
            nested,
        })
    }

    fn save_xsave(&self) -> Result<Option<XsaveState>> {
        if self.caps.xsave {
            self.read_xsave().map(Some)
        } else {
            Ok(None)
        }
    }

    /// KVM_GET_XSAVE2 where KVM_CAP_XSAVE2 gives the area's size, else the 4 KiB KVM_GET_XSAVE.
    pub(super) fn read_xsave(&self) -> Result<XsaveState> {
        if self.caps.xsave2_size > 0 {
            let (_, extra) = self.caps.xsave_words();
            let mut buf = Xsave::new(extra).map_err(|_| mismatch("XSAVE area too large"))?;
            // SAFETY: `buf` holds the KVM_CAP_XSAVE2 size this VM reported, and we never widen
            // the process's guest XSAVE permissions afterwards.
            unsafe { self.fd.get_xsave2(&mut buf) }.map_err(ioctl_err("KVM_GET_XSAVE2"))?;
            let x = buf.as_fam_struct_ref();
            let mut region = x.xsave.region.to_vec();
            region.extend_from_slice(x.as_slice());
            Ok(XsaveState { region })
        } else if self.caps.xsave {
            let x = self.fd.get_xsave().map_err(ioctl_err("KVM_GET_XSAVE"))?;
            Ok(XsaveState {
                region: x.region.to_vec(),
            })
        } else {
            Err(HypervisorError::MissingCapability("KVM_CAP_XSAVE"))
        }
    }

    /// The nested state, where the host gives one. PVM, for one, has no KVM_CAP_NESTED_STATE
    /// and refuses KVM_GET_NESTED_STATE: a save never fails for it.
    fn save_nested(&self) -> Option<NestedState> {
        if !self.caps.nested_state {
            return None;
        }
        let mut buf = KvmNestedStateBuffer::empty();
        // Kept even when KVM filled in the header alone: on VMX that header says whether the
        // guest is in VMX operation (VMXON), which a restore must not lose.
        match self.fd.nested_state(&mut buf) {
            Ok(_) => Some(NestedState(buf)),
            Err(e) => {
                warn!("KVM_GET_NESTED_STATE failed ({e}): the vCPU state is saved without it");
                None
            }
        }
    }

    pub(super) fn restore_state(&self, s: &VcpuState) -> Result<()> {
        if s.version != VCPU_STATE_VERSION {
            return Err(HypervisorError::StateVersion {
                what: "vCPU",
                found: s.version,
                supported: VCPU_STATE_VERSION,
            });
        }
        if s.lapic.is_some() != self.lapic {
            return Err(mismatch(if self.lapic {
                "the state has no LAPIC but this VM has an in-kernel irqchip"
            } else {
                "the state has a LAPIC but this VM has no in-kernel irqchip"
            }));
        }
        let nested = match &s.nested {
            Some(n) if !self.caps.nested_state => {
                if n.in_use() {
                    return Err(mismatch(
                        "the guest was using nested virtualization and this host has no \
                         nested state (KVM_CAP_NESTED_STATE)",
                    ));
                }
                None
            }
            n => n.as_ref(),
        };

        self.set_cpuid(&s.cpuid)?;
        self.restore_tsc_khz(s.tsc_khz)?;
        self.set_sregs(&s.sregs)?;

        let before_nested = |i: u32| {
            nested.is_some()
                && (i == MSR_IA32_FEATURE_CONTROL
                    || (MSR_IA32_VMX_FIRST..=MSR_IA32_VMX_LAST).contains(&i))
        };
        let after_lapic = |i: u32| i == MSR_IA32_TSC_DEADLINE;
        let (early, rest): (Vec<MsrEntry>, Vec<MsrEntry>) =
            s.msrs.iter().partition(|m| before_nested(m.index));
        let (late, main): (Vec<MsrEntry>, Vec<MsrEntry>) =
            rest.into_iter().partition(|m| after_lapic(m.index));

        self.restore_msrs(early)?;
        if let Some(n) = nested {
            self.fd
                .set_nested_state(&n.0)
                .map_err(ioctl_err("KVM_SET_NESTED_STATE"))?;
        }
        self.set_regs(&s.regs)?;
        // XSAVE holds the FPU state too and, where present, is the authority: it goes after.
        self.set_fpu(&s.fpu)?;
        self.restore_xsave(s.xsave.as_ref())?;
        match (&s.xcrs, self.caps.xcrs) {
            (Some(x), true) => self.set_xcrs(x)?,
            (Some(x), false) if x.nr_xcrs > 0 && x.xcrs[0].value & !XFEATURES_FP_SSE != 0 => {
                return Err(mismatch(
                    "the state has XCR0 bits beyond x87/SSE and this host has no KVM_CAP_XCRS",
                ));
            }
            _ => {}
        }
        self.restore_msrs(main)?;
        self.set_mp_state(s.mp_state)?;
        if let Some(lapic) = &s.lapic {
            self.set_lapic(lapic)?;
        }
        self.restore_msrs(late)?;
        self.set_debug_regs(&s.debug_regs)?;
        self.set_vcpu_events(&s.events)?;
        Ok(())
    }

    fn restore_tsc_khz(&self, khz: Option<u32>) -> Result<()> {
        let Some(khz) = khz else { return Ok(()) };
        if !self.caps.get_tsc_khz {
            return Ok(());
        }
        let here = self
            .fd
            .get_tsc_khz()
            .map_err(ioctl_err("KVM_GET_TSC_KHZ"))?;
        if here == khz {
            return Ok(());
        }
        // Without TSC scaling KVM still takes a rate within 250 ppm of the host's.
        self.fd.set_tsc_khz(khz).map_err(|e| {
            mismatch(format!(
                "the guest's TSC ran at {khz} kHz, this host's runs at {here} kHz and KVM \
                 cannot scale it ({e})"
            ))
        })
    }

    /// Writes `msrs`; one KVM refuses is an error only if the vCPU does not already hold the
    /// saved value (KVM refuses, for one, even a 0 for MSR_KVM_ASYNC_PF_INT without an
    /// in-kernel LAPIC, while it reads it as 0).
    fn restore_msrs(&self, mut msrs: Vec<MsrEntry>) -> Result<()> {
        let refused = msr_io(&mut msrs, |chunk| self.set_msrs(chunk))?;
        let mut differ = Vec::new();
        for i in refused {
            let saved = msrs[i];
            let mut now = [kvm_msr_entry {
                index: saved.index,
                ..Default::default()
            }];
            if self.get_msrs(&mut now)? != 1 || now[0].data != saved.data {
                differ.push(saved.index);
            }
        }
        if differ.is_empty() {
            Ok(())
        } else {
            Err(HypervisorError::MsrRestore(differ))
        }
    }

    fn restore_xsave(&self, xsave: Option<&XsaveState>) -> Result<()> {
        let Some(x) = xsave else {
            return Ok(());
        };
        if !self.caps.xsave {
            // KVM_SET_FPU put back x87 and SSE (but MXCSR); anything more would be lost.
            if x.xstate_bv() & !XFEATURES_FP_SSE != 0 {
                return Err(mismatch(format!(
                    "the state has XSAVE components {:#x} and this host has no KVM_CAP_XSAVE",
                    x.xstate_bv()
                )));
            }
            return Ok(());
        }
        self.write_xsave(x)
    }

    pub(super) fn write_xsave(&self, x: &XsaveState) -> Result<()> {
        if !self.caps.xsave {
            return Err(HypervisorError::MissingCapability("KVM_CAP_XSAVE"));
        }
        let (words, extra) = self.caps.xsave_words();
        if x.region.len() > words && x.region[words..].iter().any(|&w| w != 0) {
            return Err(mismatch(format!(
                "the XSAVE area is {} bytes and this host's holds {}",
                x.region.len() * 4,
                words * 4
            )));
        }
        let mut buf = Xsave::new(extra).map_err(|_| mismatch("XSAVE area too large"))?;
        let base = {
            // SAFETY: the FAM's length is left as it is.
            let xs = unsafe { buf.as_mut_fam_struct() };
            let base = xs.xsave.region.len();
            let n = x.region.len().min(base);
            xs.xsave.region[..n].copy_from_slice(&x.region[..n]);
            base
        };
        if x.region.len() > base {
            let tail = &x.region[base..];
            let m = tail.len().min(extra);
            buf.as_mut_slice()[..m].copy_from_slice(&tail[..m]);
        }
        if self.caps.xsave2_size > 0 {
            // SAFETY: `buf` holds the KVM_CAP_XSAVE2 size this VM reported.
            unsafe { self.fd.set_xsave2(&buf) }.map_err(ioctl_err("KVM_SET_XSAVE"))
        } else {
            // SAFETY: without KVM_CAP_XSAVE2 KVM reads the 4 KiB `kvm_xsave` alone.
            unsafe { self.fd.set_xsave(&buf.as_fam_struct_ref().xsave) }
                .map_err(ioctl_err("KVM_SET_XSAVE"))
        }
    }
}

impl KvmVm {
    pub(super) fn save_state(&self) -> Result<VmState> {
        let irqchip = if self.irqchip.load(std::sync::atomic::Ordering::Acquire) {
            let mut chips = IrqchipState::empty();
            for chip in [
                &mut chips.pic_master,
                &mut chips.pic_slave,
                &mut chips.ioapic,
            ] {
                self.fd
                    .get_irqchip(chip)
                    .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
            }
            Some(chips)
        } else {
            None
        };
        let pit = match self.fd.get_pit2() {
            Ok(p) => Some(p),
            // KVM's answer where the VM has no PIT.
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(e) => return Err(ioctl_err("KVM_GET_PIT2")(e)),
        };
        let clock = self.fd.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?;
        Ok(VmState {
            version: VM_STATE_VERSION,
            irqchip,
            pit,
            clock,
        })
    }

    pub(super) fn restore_state(&self, s: &VmState) -> Result<()> {
        if s.version != VM_STATE_VERSION {
            return Err(HypervisorError::StateVersion {
                what: "VM",
                found: s.version,
                supported: VM_STATE_VERSION,
            });
        }
        let has_irqchip = self.irqchip.load(std::sync::atomic::Ordering::Acquire);
        match (&s.irqchip, has_irqchip) {
            (Some(chips), true) => {
                for chip in [&chips.pic_master, &chips.pic_slave, &chips.ioapic] {
                    self.set_chip(chip)?;
                }
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(mismatch(
                    "the state has an in-kernel irqchip and this VM has none",
                ))
            }
            (None, true) => {
                return Err(mismatch(
                    "the state has no in-kernel irqchip and this VM has one",
                ))
            }
        }
        if let Some(pit) = &s.pit {
            self.fd.set_pit2(pit).map_err(|e| {
                if e.errno() == libc::ENXIO {
                    mismatch("the state has a PIT and this VM has none")
                } else {
                    ioctl_err("KVM_SET_PIT2")(e)
                }
            })?;
        }
        // Flags (KVM_CLOCK_REALTIME and co.) are only given back on purpose: the clock resumes
        // at the value it had, as across a pause.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(ioctl_err("KVM_SET_CLOCK"))
    }

    fn set_chip(&self, chip: &kvm_irqchip) -> Result<()> {
        self.fd
            .set_irqchip(chip)
            .map_err(ioctl_err("KVM_SET_IRQCHIP"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for KVM_GET_MSRS: stops at the first index in `refuse`, as KVM does.
    fn fake_io(refuse: &[u32]) -> impl FnMut(&mut [MsrEntry]) -> Result<usize> + '_ {
        move |chunk: &mut [MsrEntry]| {
            assert!(chunk.len() <= MSRS_PER_CALL);
            for (n, m) in chunk.iter_mut().enumerate() {
                if refuse.contains(&m.index) {
                    return Ok(n);
                }
                m.data = u64::from(m.index) * 3;
            }
            Ok(chunk.len())
        }
    }

    #[test]
    fn msr_io_skips_each_refused_msr_and_reads_all_the_others() {
        // Refused ones first, last, side by side, and across a call's boundary.
        let refuse = [0, 3, 4, 127, 128, 200, 299];
        let mut msrs: Vec<MsrEntry> = (0..300)
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let refused = msr_io(&mut msrs, fake_io(&refuse)).unwrap();
        assert_eq!(refused, vec![0, 3, 4, 127, 128, 200, 299]);
        for m in &msrs {
            let want = if refuse.contains(&m.index) {
                0
            } else {
                u64::from(m.index) * 3
            };
            assert_eq!(m.data, want, "MSR {}", m.index);
        }
    }

    #[test]
    fn msr_io_with_nothing_refused_or_nothing_to_do() {
        let mut none: Vec<MsrEntry> = Vec::new();
        assert!(msr_io(&mut none, fake_io(&[])).unwrap().is_empty());
        let mut all_bad = vec![kvm_msr_entry::default(); 3];
        assert_eq!(msr_io(&mut all_bad, fake_io(&[0])).unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn msr_io_passes_ioctl_errors_on() {
        let mut msrs = vec![kvm_msr_entry::default(); 2];
        let err = msr_io(&mut msrs, |_| Err(mismatch("boom"))).unwrap_err();
        assert!(err.to_string().contains("boom"));
    }
}
