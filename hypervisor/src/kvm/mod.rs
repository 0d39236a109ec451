//! The KVM backend.

pub mod requests;
mod state;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_clock_data, kvm_irq_routing_entry, kvm_mp_state, kvm_userspace_memory_region, CpuId,
    KvmIrqRouting, Msrs, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
    KVM_MSI_VALID_DEVID, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    ClockData, CpuIdEntry, DebugRegisters, ExtendedControlRegisters, FpuState, Hypervisor,
    HypervisorError, IoEventAddress, IrqRoute, LapicState, MpState, MsrEntry, Result,
    SpecialRegisters, StandardRegisters, Vcpu, VcpuEvents, VcpuState, Vm, VmExit, VmState,
    XsaveState,
};
use state::StateCaps;

/// Where KVM keeps the TSS and identity-map pages it needs for real-mode emulation on Intel:
/// three pages just below the BIOS area at the top of the 32-bit hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |source| HypervisorError::Ioctl { op, source }
}

pub struct KvmHypervisor {
    kvm: Kvm,
    /// KVM_GET_MSR_INDEX_LIST, read at the first VM's creation: the same for every VM.
    msr_index_list: OnceLock<Arc<[u32]>>,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(HypervisorError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        Ok(KvmHypervisor {
            kvm,
            msr_index_list: OnceLock::new(),
        })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        let msrs = match self.msr_index_list.get() {
            Some(list) => list.clone(),
            None => {
                let list: Arc<[u32]> = self.msr_index_list()?.into();
                self.msr_index_list.get_or_init(|| list).clone()
            }
        };
        let caps = Arc::new(StateCaps::probe(&self.kvm, &fd, msrs));
        Ok(Arc::new(KvmVm {
            fd,
            caps,
            irqchip: AtomicBool::new(false),
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    fn msr_index_list(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(list.as_slice().to_vec())
    }
}

pub struct KvmVm {
    fd: VmFd,
    caps: Arc<StateCaps>,
    /// Whether `create_irqchip` ran: the vCPUs then have an in-kernel LAPIC.
    irqchip: AtomicBool,
}

fn ioevent_addr(addr: IoEventAddress) -> kvm_ioctls::IoEventAddress {
    match addr {
        IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
        IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
    }
}

impl Vm for KvmVm {
    unsafe fn set_user_memory_region(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        log_dirty: bool,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the caller guarantees the host range outlives the slot.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))
    }

    fn get_dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>> {
        let size = usize::try_from(size).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_GET_DIRTY_LOG",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        self.fd
            .get_dirty_log(slot, size)
            .map_err(ioctl_err("KVM_GET_DIRTY_LOG"))
    }

    fn create_irqchip(&self) -> Result<()> {
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        self.fd
            .create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        self.irqchip.store(true, Ordering::Release);
        Ok(())
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        Ok(Box::new(KvmVcpu {
            fd,
            caps: self.caps.clone(),
            lapic: self.irqchip.load(Ordering::Acquire),
        }))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(ioctl_err("KVM_IRQFD(deassign)"))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u64>,
    ) -> Result<()> {
        let addr = ioevent_addr(addr);
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(ioctl_err("KVM_IOEVENTFD"))
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> Result<()> {
        self.fd
            .unregister_ioevent(fd, &ioevent_addr(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD(deassign)"))
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(routing_entry).collect();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_GSI_ROUTING",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
    }

    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, active)
            .map_err(ioctl_err("KVM_IRQ_LINE"))
    }

    fn get_clock(&self) -> Result<ClockData> {
        let c = self.fd.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?;
        Ok(ClockData {
            clock: c.clock,
            flags: c.flags,
        })
    }

    fn set_clock(&self, data: ClockData) -> Result<()> {
        let c = kvm_clock_data {
            clock: data.clock,
            // Only KVM_CLOCK_REALTIME-style flags may be passed back; 0 sets the clock as given.
            flags: 0,
            ..Default::default()
        };
        self.fd.set_clock(&c).map_err(ioctl_err("KVM_SET_CLOCK"))
    }

    fn state(&self) -> Result<VmState> {
        self.save_state()
    }

    fn set_state(&self, state: &VmState) -> Result<()> {
        self.restore_state(state)
    }
}

fn routing_entry(route: &IrqRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry::default();
    match *route {
        IrqRoute::Ioapic { gsi, pin } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip.irqchip = kvm_bindings::KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = pin;
        }
        IrqRoute::Pic { gsi, chip, pin } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
        }
        IrqRoute::Msi {
            gsi,
            address,
            data,
            devid,
        } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            if let Some(id) = devid {
                e.flags = KVM_MSI_VALID_DEVID;
                e.u.msi.__bindgen_anon_1.devid = id;
            }
        }
    }
    e
}

pub struct KvmVcpu {
    fd: VcpuFd,
    caps: Arc<StateCaps>,
    /// Whether the VM had an in-kernel irqchip when this vCPU was created.
    lapic: bool,
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        // Taken before `run` borrows the fd: the internal-error details live in the same page.
        let run_page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn(port, data),
                VcpuExit::IoOut(port, data) => VmExit::IoOut(port, data),
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead(addr, data),
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite(addr, data),
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    other => VmExit::Error(format!("unexpected system event {other}")),
                },
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => VmExit::Ignore,
                VcpuExit::InternalError => {
                    // SAFETY: `run_page` is the vCPU's mapped kvm_run page, valid while the fd
                    // lives; the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                    // active member of the exit union.
                    let suberror = unsafe { (*run_page).__bindgen_anon_1.internal.suberror };
                    VmExit::Error(format!("KVM internal error, suberror {suberror}"))
                }
                VcpuExit::FailEntry(reason, cpu) => VmExit::Error(format!(
                    "KVM failed to enter the guest: hardware reason {reason:#x} on cpu {cpu}"
                )),
                other => VmExit::Error(format!("unhandled exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(VmExit::Interrupted)
            }
            Err(source) => Err(HypervisorError::Ioctl {
                op: "KVM_RUN",
                source,
            }),
        }
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn nmi(&self) -> Result<()> {
        self.fd.nmi().map_err(ioctl_err("KVM_NMI"))
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_CPUID2",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd.set_regs(regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    fn get_fpu(&self) -> Result<FpuState> {
        self.fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    fn get_msrs(&self, msrs: &mut [MsrEntry]) -> Result<usize> {
        let mut buf = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = self
            .fd
            .get_msrs(&mut buf)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        msrs[..n].copy_from_slice(&buf.as_slice()[..n]);
        Ok(n)
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<usize> {
        let msrs = Msrs::from_entries(msrs).map_err(|_| HypervisorError::Ioctl {
            op: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))
    }

    fn get_lapic(&self) -> Result<LapicState> {
        self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))
    }

    fn set_lapic(&self, lapic: &LapicState) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    fn get_mp_state(&self) -> Result<MpState> {
        let s = self
            .fd
            .get_mp_state()
            .map_err(ioctl_err("KVM_GET_MP_STATE"))?;
        Ok(match s.mp_state {
            KVM_MP_STATE_RUNNABLE => MpState::Runnable,
            KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
            KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
            KVM_MP_STATE_HALTED => MpState::Halted,
            KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
            other => MpState::Other(other),
        })
    }

    fn set_mp_state(&self, state: MpState) -> Result<()> {
        let mp_state = match state {
            MpState::Runnable => KVM_MP_STATE_RUNNABLE,
            MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
            MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
            MpState::Halted => KVM_MP_STATE_HALTED,
            MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
            MpState::Other(v) => v,
        };
        self.fd
            .set_mp_state(kvm_mp_state { mp_state })
            .map_err(ioctl_err("KVM_SET_MP_STATE"))
    }

    fn get_xsave(&self) -> Result<XsaveState> {
        self.read_xsave()
    }

    fn set_xsave(&self, xsave: &XsaveState) -> Result<()> {
        self.write_xsave(xsave)
    }

    fn get_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_CPUID2"))?;
        Ok(cpuid.as_slice().to_vec())
    }

    fn get_xcrs(&self) -> Result<ExtendedControlRegisters> {
        self.fd.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))
    }

    fn set_xcrs(&self, xcrs: &ExtendedControlRegisters) -> Result<()> {
        self.fd.set_xcrs(xcrs).map_err(ioctl_err("KVM_SET_XCRS"))
    }

    fn get_debug_regs(&self) -> Result<DebugRegisters> {
        self.fd
            .get_debug_regs()
            .map_err(ioctl_err("KVM_GET_DEBUGREGS"))
    }

    fn set_debug_regs(&self, regs: &DebugRegisters) -> Result<()> {
        self.fd
            .set_debug_regs(regs)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))
    }

    fn get_vcpu_events(&self) -> Result<VcpuEvents> {
        self.fd
            .get_vcpu_events()
            .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))
    }

    fn set_vcpu_events(&self, events: &VcpuEvents) -> Result<()> {
        self.fd
            .set_vcpu_events(events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))
    }

    fn state(&self) -> Result<VcpuState> {
        self.save_state()
    }

    fn set_state(&self, state: &VcpuState) -> Result<()> {
        self.restore_state(state)
    }
}
