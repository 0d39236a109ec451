//! One VM, built step by step in boot order: hypervisor VM, interrupt controllers, RAM,
//! devices, ACPI and SMBIOS tables, kernel (or firmware) and boot data, vCPUs.

use std::fs::File;
use std::sync::Arc;

use arch::boot::{self, BootError, BootProtocol};
use arch::cpuid::{self, Topology};
use arch::{acpi, regs, smbios};
use devices::CMOS_NVRAM_SIZE;
use guest_memory::GuestMemoryMmap;
use hypervisor::{Hypervisor, Vcpu};
use log::info;
use thiserror::Error;

use crate::config::VmConfig;
use crate::cpu::{VcpuThreads, VmEvents};
use crate::device_manager::{DeviceError, DeviceManager, DeviceSetup, HostIo};
use crate::memory::{self, MemoryError};
use crate::snapshot::{self, Cause, PlatformSnapshot, VmSnapshot, VM_SNAPSHOT_VERSION};
use crate::vcpu_affinity::VcpuAffinity;

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    DeviceSetup(#[from] DeviceError),
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(String),
    #[error("cannot build the SMBIOS tables: {0}")]
    Smbios(String),
    #[error("{option} {path}: {source}")]
    Boot {
        option: &'static str,
        path: String,
        #[source]
        source: BootError,
    },
    #[error("--cmdline: {0}")]
    Cmdline(#[source] BootError),
    #[error("cannot set up vCPU {id}: {source}")]
    Vcpu {
        id: u32,
        #[source]
        source: regs::RegsError,
    },
    #[error("cannot start the vCPU threads: {0}")]
    Threads(#[source] std::io::Error),
    #[error("cannot pause the vCPUs: {0}")]
    Pause(&'static str),
    #[error("cannot signal the guest: {0}")]
    Event(#[source] std::io::Error),
    #[error("cannot resume the devices: {0}")]
    Devices(String),
    #[error("{0}")]
    Affinity(String),
}

/// A BAR as the original's device tree gives it.
fn pci_bar_resource(b: &pci::BarInfo) -> serde_json::Value {
    let kind = match b.kind {
        pci::BarKind::Mem32 => "Mmio32",
        pci::BarKind::Mem64 => "Mmio64",
    };
    serde_json::json!({"PciBar": {
        "index": b.index,
        "base": b.addr,
        "size": b.size,
        "type_": kind,
        "prefetchable": b.prefetchable,
    }})
}

/// Writes a fresh VM Generation ID where the DSDT's `VGEN` device says it is.
fn write_new_generation_id(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let id = devices::vmgenid::new_generation_id().map_err(VmError::Event)?;
    devices::vmgenid::write_generation_id(mem, arch::layout::VMGENID_START, &id)
        .map_err(|e| VmError::Event(std::io::Error::other(e.to_string())))
}

pub struct Vm {
    // Field order is drop order: the vCPUs and the hypervisor VM go before the memory they map.
    pub(crate) threads: Option<VcpuThreads>,
    vcpus: Vec<Box<dyn Vcpu>>,
    hv_vm: Arc<dyn hypervisor::Vm>,
    /// The guest clock saved by `pause`, restored by `resume`.
    clock: Option<hypervisor::ClockData>,
    devices: DeviceManager,
    core_scheduling: vm_config::CoreScheduling,
    /// The host CPUs of the vCPUs `--cpus affinity=` lists.
    affinity: VcpuAffinity,
    /// How a vCPU of this VM is set up (a hot-added one too).
    pub(crate) cpu_setup: CpuSetup,
    /// Where ACPI memory hotplug plugs DIMMs, if it does (see `memory::memory_slots`).
    pub(crate) acpi_hotplug: Option<u64>,
    /// vCPUs whose CPU the guest ejected, by id, kept for a later hot-add (KVM cannot destroy
    /// a vCPU).
    pub(crate) spare_vcpus: Vec<Option<Box<dyn Vcpu>>>,
    /// The on-demand loader of a restored VM's RAM (it must stop before the RAM goes).
    _on_demand: Option<crate::uffd::OnDemand>,
    _memory: GuestMemoryMmap,
}

/// Where ACPI memory hotplug plugs DIMMs (`hotplug_method=acpi` with a `hotplug_size`): the
/// hotplug region's start.
pub(crate) fn acpi_hotplug_base(cfg: &VmConfig) -> Option<u64> {
    if cfg.memory.hotplug_method != vm_config::HotplugMethod::Acpi {
        return None;
    }
    if cfg.memory.zones.is_some() {
        // Zones plug their memory with virtio-mem only.
        return None;
    }
    arch::layout::hotplug_region(cfg.memory.size, cfg.memory.hotplug_size.unwrap_or(0))
        .map(|(base, _)| base.0)
}

/// The DIMMs a VM boots with: what `hotplugged_size` says was plugged, as one DIMM at the
/// start of the hotplug region (ACPI memory hotplug; none otherwise).
fn boot_dimms(cfg: &VmConfig) -> Vec<(u64, u64)> {
    match (acpi_hotplug_base(cfg), cfg.memory.hotplugged_size) {
        (Some(base), Some(size)) if size > 0 => vec![(base, size)],
        _ => Vec::new(),
    }
}

/// What a new vCPU of a VM needs: the CPUID KVM supports and the VM's topology and options.
pub(crate) struct CpuSetup {
    supported: Vec<hypervisor::CpuIdEntry>,
    topology: Topology,
    max_phys_bits: u8,
    nested: bool,
}

impl CpuSetup {
    fn new(cfg: &VmConfig, supported: Vec<hypervisor::CpuIdEntry>) -> Self {
        let topology = cfg
            .cpus
            .topology
            .map(|t| Topology {
                threads_per_core: t.threads_per_core,
                cores_per_die: t.cores_per_die,
                dies_per_package: t.dies_per_package,
                packages: t.packages,
            })
            .unwrap_or_else(|| Topology::flat(cfg.cpus.max_vcpus as u8));
        CpuSetup {
            supported,
            topology,
            max_phys_bits: cfg.cpus.max_phys_bits,
            nested: cfg.cpus.nested,
        }
    }

    /// vCPU `id`, created with its CPUID and the registers every vCPU starts with; a vCPU
    /// other than 0 then waits in the in-kernel LAPIC for the guest's INIT/SIPI.
    pub(crate) fn create(
        &self,
        vm: &dyn hypervisor::Vm,
        id: u32,
    ) -> Result<Box<dyn Vcpu>, VmError> {
        let vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&cpuid::vcpu_cpuid(
            &self.supported,
            id as u8,
            self.topology,
            self.max_phys_bits,
            self.nested,
        ))?;
        regs::setup_vcpu_common(vcpu.as_ref()).map_err(|source| VmError::Vcpu { id, source })?;
        Ok(vcpu)
    }
}

fn open(option: &'static str, path: &std::path::Path) -> Result<File, VmError> {
    File::open(path).map_err(|e| VmError::Boot {
        option,
        path: path.display().to_string(),
        source: BootError::Read(e),
    })
}

/// What a boot and a restore build alike: the hypervisor VM with its irqchip, guest RAM
/// registered, and the devices.
struct Machine {
    vm: Arc<dyn hypervisor::Vm>,
    devices: DeviceManager,
    /// Each PCI segment's windows.
    pci_windows: Vec<crate::pci_setup::PciWindows>,
    supported: Vec<hypervisor::CpuIdEntry>,
}

impl Machine {
    #[allow(clippy::too_many_arguments)]
    fn build(
        hv: &dyn Hypervisor,
        cfg: &VmConfig,
        mem: &GuestMemoryMmap,
        io: HostIo,
        nvram: Option<[u8; CMOS_NVRAM_SIZE]>,
        events: &VmEvents,
        slot_hints: Option<&crate::pci_setup::SlotHints>,
        dimms: &[(u64, u64)],
    ) -> Result<Self, VmError> {
        let vm = hv.create_vm()?;
        let slots = memory::memory_slots(mem, acpi_hotplug_base(cfg), dimms);
        memory::register_memory(&vm, &slots, false)?;
        // After the memory: with the irqchip in place, KVM's first memory-slot update waits for
        // an SRCU grace period of several milliseconds.
        vm.create_irqchip()?;
        let ram = memory::ram_split(cfg.memory.ram_size());
        let supported = hv.supported_cpuid()?;
        let phys_bits = cpuid::guest_phys_bits(&supported, cfg.cpus.max_phys_bits);
        let pci_windows = crate::pci_setup::PciWindows::new(
            cfg.memory.ram_size(),
            cfg.memory.hotplug_total(),
            phys_bits,
        );
        let (m32, m32_size) = pci_windows.mmio32;
        info!(
            "PCI MMIO windows: 32-bit {m32:#x}+{m32_size:#x}, 64-bit {} ({phys_bits} physical \
             address bits)",
            pci_windows
                .mmio64
                .map_or("none".into(), |(s, n)| format!("{s:#x}+{n:#x}"))
        );
        let pci_windows =
            crate::pci_segments::segment_windows(cfg, &pci_windows).map_err(|msg| {
                DeviceError::Pci(crate::pci_setup::PciSetupError::Segments {
                    count: cfg.num_pci_segments(),
                    msg,
                })
            })?;
        let devices = DeviceManager::new(
            DeviceSetup {
                vm: &vm,
                mem,
                cfg,
                ram,
                pci_windows: &pci_windows,
                io,
                nvram,
                slot_hints,
                dimms,
            },
            events,
        )?;
        info!("PCI devices: {:?}", devices.pci.device_ids());
        Ok(Machine {
            vm,
            devices,
            pci_windows,
            supported,
        })
    }
}

impl Vm {
    pub fn new(
        hv: &dyn Hypervisor,
        cfg: &VmConfig,
        io: HostIo,
        nvram: Option<[u8; CMOS_NVRAM_SIZE]>,
        events: &VmEvents,
    ) -> Result<Self, VmError> {
        let affinity =
            VcpuAffinity::new(cfg.cpus.affinity.as_deref()).map_err(VmError::Affinity)?;
        let mem = memory::create_guest_memory(&cfg.memory)?;
        let serial_enabled = io.serial.is_some();
        let Machine {
            vm,
            devices,
            pci_windows,
            supported,
        } = Machine::build(hv, cfg, &mem, io, nvram, events, None, &boot_dimms(cfg))?;

        let topology = cfg.cpus.topology.map(|t| Topology {
            threads_per_core: t.threads_per_core,
            cores_per_die: t.cores_per_die,
            dies_per_package: t.dies_per_package,
            packages: t.packages,
        });
        // A generic initiator's device, by id, where it was placed.
        let placed = devices.pci.placed();
        let numa = crate::numa::acpi_nodes(cfg, |id| {
            placed.iter().find(|(p, _)| p == id).map(|(_, a)| {
                let e = crate::pci_setup::endpoint_id(*a);
                ((e >> 16) as u16, e as u16)
            })
        })
        .map_err(VmError::Acpi)?;
        let rsdp = acpi::create_acpi_tables(
            &mem,
            &acpi::AcpiConfig {
                boot_vcpus: cfg.cpus.boot_vcpus,
                max_vcpus: cfg.cpus.max_vcpus,
                topology: topology.map(|t| {
                    (
                        t.threads_per_core,
                        t.cores_per_die,
                        t.dies_per_package,
                        t.packages,
                    )
                }),
                serial: serial_enabled,
                pci: crate::pci_segments::pci_hosts(cfg, &pci_windows),
                memory_slots: if acpi_hotplug_base(cfg).is_some() {
                    devices::memory_hotplug::MEMORY_HOTPLUG_SLOTS as u32
                } else {
                    0
                },
                tpm: cfg.tpm.is_some(),
                numa,
                viot: devices.pci.viot(),
            },
        )
        .map_err(|e| VmError::Acpi(e.to_string()))?;

        write_new_generation_id(&mem)?;

        // As the original: SMBIOS for every boot, with --platform's identity or its default.
        smbios::setup_smbios(&mem, &crate::platform::smbios_config(cfg.platform.as_ref()))
            .map_err(|e| VmError::Smbios(e.to_string()))?;

        // validate() made sure there is exactly one of a firmware and a kernel. A firmware goes
        // through the kernel's loader (the firmwares of the original's users are PVH ELF
        // images), without a command line or initramfs.
        let (image_option, kernel_path) = match &cfg.payload.firmware {
            Some(fw) => ("--firmware", fw.as_path()),
            None => (
                "--kernel",
                cfg.payload
                    .kernel
                    .as_deref()
                    .unwrap_or_else(|| std::path::Path::new("")),
            ),
        };
        let boot_err = |option, path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| VmError::Boot {
                option,
                path,
                source,
            }
        };
        let mut kernel_file = open(image_option, kernel_path)?;
        let kernel = boot::load_kernel(&mem, &mut kernel_file)
            .map_err(boot_err(image_option, kernel_path))?;
        let mut initramfs = cfg
            .payload
            .initramfs
            .as_deref()
            .map(|p| open("--initramfs", p))
            .transpose()?;
        boot::configure_boot(
            &mem,
            &kernel,
            cfg.memory.ram_size(),
            cfg.payload.cmdline.as_deref().unwrap_or(""),
            initramfs.as_mut(),
            Some(rsdp),
        )
        .map_err(|e| match e {
            BootError::CmdlineTooLong(_) | BootError::CmdlineNul => VmError::Cmdline(e),
            e => {
                let path = cfg.payload.initramfs.as_deref().unwrap_or(kernel_path);
                let option = if cfg.payload.initramfs.is_some() {
                    "--initramfs"
                } else {
                    image_option
                };
                boot_err(option, path)(e)
            }
        })?;
        info!(
            "kernel entry {:#x} via {}",
            kernel.entry.addr.0,
            match kernel.entry.protocol {
                BootProtocol::Pvh => "PVH",
                BootProtocol::Linux64 => "the Linux 64-bit boot protocol",
            }
        );

        let cpu_setup = CpuSetup::new(cfg, supported);
        let mut vcpus = Vec::with_capacity(cfg.cpus.boot_vcpus as usize);
        for id in 0..cfg.cpus.boot_vcpus {
            let vcpu = cpu_setup.create(vm.as_ref(), id)?;
            if id == 0 {
                regs::setup_boot_vcpu(vcpu.as_ref(), &mem, kernel.entry)
                    .map_err(|source| VmError::Vcpu { id, source })?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vm {
            threads: None,
            vcpus,
            hv_vm: vm,
            clock: None,
            devices,
            core_scheduling: cfg.cpus.core_scheduling,
            affinity,
            cpu_setup,
            acpi_hotplug: acpi_hotplug_base(cfg),
            spare_vcpus: Vec::new(),
            _on_demand: None,
            _memory: mem,
        })
    }

    /// The VM a snapshot describes, paused: built from its configuration as for a boot, over
    /// `mem` (RAM already restored, or loaded on demand by `on_demand`), without loading a
    /// kernel or writing boot tables (RAM holds what the guest had). The state goes in in the
    /// order docs/pci.md gives: vCPUs (their CPUID first), the VM's irqchip and clock, the
    /// platform devices, PCI segment 0 (devices paused again at once). `start` then starts the
    /// vCPU threads parked, and `resume` lets the guest go on.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        hv: &dyn Hypervisor,
        cfg: &VmConfig,
        snapshot: &VmSnapshot,
        mem: GuestMemoryMmap,
        on_demand: Option<crate::uffd::OnDemand>,
        io: HostIo,
        events: &VmEvents,
        new_identity: bool,
    ) -> Result<Self, Cause> {
        let affinity = VcpuAffinity::new(cfg.cpus.affinity.as_deref()).map_err(Cause::new)?;
        if snapshot.vcpus.len() != cfg.cpus.boot_vcpus as usize {
            return Err(Cause::new(format!(
                "the state has {} vCPU(s), the configuration boots {}",
                snapshot.vcpus.len(),
                cfg.cpus.boot_vcpus
            )));
        }
        // Devices hot-added or removed before the snapshot leave the configuration's order
        // unlike the bus: each goes back to the slot it had.
        let slots = snapshot
            .pci
            .devices
            .iter()
            .map(|d| {
                let bar_kind = d.transport.config.bar_kind(0);
                let hint = crate::pci_setup::SlotHint {
                    slot: d.slot,
                    bar_kind,
                };
                (d.id.clone(), hint)
            })
            .collect();
        // The DIMMs ACPI memory hotplug had plugged, each a memory slot again.
        let dimms = match &snapshot.devices.memory_hotplug {
            Some(s) => s.dimms.iter().map(|d| (d.base, d.size)).collect(),
            None => boot_dimms(cfg),
        };
        let m = Machine::build(hv, cfg, &mem, io, None, events, Some(&slots), &dimms)
            .map_err(|e| Cause::new(e.to_string()))?;
        let mut vcpus = Vec::with_capacity(snapshot.vcpus.len());
        for (id, state) in snapshot.vcpus.iter().enumerate() {
            let vcpu =
                m.vm.create_vcpu(id as u32)
                    .map_err(|e| Cause::new(format!("vCPU {id}: {e}")))?;
            vcpu.set_state(state)
                .map_err(|e| Cause::new(format!("vCPU {id}: {e}")))?;
            vcpus.push(vcpu);
        }
        m.vm.set_state(&snapshot.vm)
            .map_err(|e| Cause::new(format!("VM state: {e}")))?;
        snapshot.devices.restore_into(&m.devices)?;
        let mut vm = Vm {
            threads: None,
            vcpus,
            hv_vm: m.vm,
            // Paused at the saved clock: `resume` sets it.
            clock: Some(hypervisor::ClockData {
                clock: snapshot.vm.clock.clock,
                ..Default::default()
            }),
            devices: m.devices,
            core_scheduling: cfg.cpus.core_scheduling,
            affinity,
            cpu_setup: CpuSetup::new(cfg, m.supported),
            acpi_hotplug: acpi_hotplug_base(cfg),
            spare_vcpus: Vec::new(),
            _on_demand: on_demand,
            _memory: mem,
        };
        vm.devices.pci.restore(&snapshot.pci).map_err(Cause::new)?;
        if !new_identity {
            // A migrated VM is the same VM.
            return Ok(vm);
        }
        // A new identity for this restore (each clone of a snapshot gets its own): the guest's
        // vmgenid driver hears of it through the GED as soon as it runs.
        write_new_generation_id(vm.memory()).map_err(|e| Cause::new(e.to_string()))?;
        vm.devices
            .ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify(devices::GED_VMGENID)
            .map_err(Cause::io("cannot signal the new VM generation ID"))?;
        Ok(vm)
    }

    pub fn start(&mut self, events: &VmEvents) -> Result<(), VmError> {
        let vcpus = std::mem::take(&mut self.vcpus);
        self.threads = Some(
            VcpuThreads::start(
                vcpus,
                self.devices.pio.clone(),
                self.devices.mmio.clone(),
                events,
                self.core_scheduling,
                self.affinity.clone(),
                self.clock.is_some(),
            )
            .map_err(VmError::Threads)?,
        );
        Ok(())
    }

    /// Takes the vCPUs out of the guest and parks them; saves the guest clock so the time the
    /// VM spends paused does not show in the guest.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if let Some(t) = &self.threads {
            t.pause().map_err(VmError::Pause)?;
        }
        self.clock = Some(self.hv_vm.get_clock()?);
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        if let Some(clock) = self.clock.take() {
            self.hv_vm.set_clock(clock)?;
        }
        // Device workers a snapshot paused start again before the vCPUs do.
        let devices = self.devices.pci.resume_devices();
        if let Some(t) = &self.threads {
            t.resume();
        }
        devices.map_err(VmError::Devices)?;
        Ok(())
    }

    /// The state of the paused VM: the virtio device workers are paused first (their in-flight
    /// requests complete and interrupt, so the irqchip and LAPIC states below include them;
    /// `resume` restarts them), then every vCPU's state (read on its own thread, which owns
    /// it; a paused vCPU is always between two instructions), the VM's (irqchip, and the clock
    /// as it was at the pause), the platform devices' and PCI segment 0's.
    pub fn snapshot(&mut self) -> Result<VmSnapshot, Cause> {
        if self.threads.is_none() {
            return Err(Cause::new("the VM has not started"));
        }
        if self.clock.is_none() {
            return Err(Cause::new("Trying to snapshot while VM is running"));
        }
        let vcpus = self.vcpu_states()?;
        let mut vm = self
            .hv_vm
            .state()
            .map_err(|e| Cause::new(format!("VM state: {e}")))?;
        if let Some(clock) = self.clock {
            vm.clock.clock = clock.clock;
        }
        Ok(VmSnapshot {
            version: VM_SNAPSHOT_VERSION,
            vcpus,
            vm,
            devices: PlatformSnapshot::of(&self.devices),
            pci: self.devices.pci.state(),
            memory_ranges: snapshot::memory_ranges(&self._memory),
        })
    }

    /// Every vCPU's state, in id order, of a paused VM: its devices quiesced (no DMA into
    /// guest RAM) and its vCPU threads parked first (for `snapshot`, `vm.coredump`).
    pub fn vcpu_states(&mut self) -> Result<Vec<hypervisor::VcpuState>, Cause> {
        let threads = self
            .threads
            .as_ref()
            .ok_or_else(|| Cause::new("the VM has not started"))?;
        if self.clock.is_none() {
            return Err(Cause::new("the VM is not paused"));
        }
        self.devices
            .pci
            .pause_devices()
            .map_err(|e| Cause::new(format!("cannot pause a device: {e}")))?;
        // Returns once every thread is parked (a restored VM's may still be on their way).
        threads.pause().map_err(Cause::new)?;
        threads
            .on_parked(|vcpu| vcpu.state().map_err(|e| e.to_string()))
            .map_err(|e| Cause::new(format!("cannot reach the vCPUs: {e}")))?
            .into_iter()
            .enumerate()
            .map(|(id, r)| r.map_err(|e| Cause::new(format!("vCPU {id}: {e}"))))
            .collect()
    }

    /// The KVM memory slots of this VM's memory now (ACPI-plugged DIMMs included).
    pub fn memory_slots(&self) -> Vec<memory::MemSlot> {
        let dimms = self
            .devices
            .memory_hotplug
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).dimms())
            .unwrap_or_default();
        memory::memory_slots(&self._memory, self.acpi_hotplug, &dimms)
    }

    /// The hypervisor's VM (memory slots, dirty log).
    pub fn hypervisor_vm(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.hv_vm
    }

    /// Whether `pause` stopped the vCPUs (and `resume` has not yet let them go).
    pub fn is_paused(&self) -> bool {
        self.clock.is_some()
    }

    /// Whether guest RAM was made fresh, not loaded on demand from a snapshot (whose pages
    /// not yet loaded are not zeros).
    pub fn ram_is_fresh(&self) -> bool {
        self._on_demand.is_none()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self._memory
    }

    /// Presses the ACPI power button.
    pub fn power_button(&self) -> Result<(), VmError> {
        self.devices
            .ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify(devices::GED_POWER_BUTTON)
            .map_err(VmError::Event)
    }

    /// `vm.nmi`: a non-maskable interrupt on every vCPU (see `VcpuThreads::nmi`).
    pub fn nmi(&self) -> Result<(), Cause> {
        self.threads
            .as_ref()
            .ok_or_else(|| Cause::new("the VM has not started"))?
            .nmi()
            .map_err(Cause::new)
    }

    /// Counters of every device that keeps some, by device id.
    pub fn counters(&self) -> api::VmCounters {
        self.devices
            .pci
            .counters()
            .iter()
            .map(|(id, dev)| (id.clone(), dev.counters()))
            .collect()
    }

    /// The format each disk was opened as, in configuration order.
    pub fn disk_image_types(&self) -> &[crate::config::ImageType] {
        &self.devices.pci.disk_image_types
    }

    /// `vm.info`'s device tree: the IOAPIC, the serial port, the debug console, and for each
    /// virtio device its virtio-pci transport node (with the PCI address) and the device node
    /// under it, named as the original names them.
    pub fn device_tree(&self) -> std::collections::BTreeMap<String, api::DeviceNode> {
        let mut tree = std::collections::BTreeMap::new();
        // `pci`: the node of PCI function `function` at `at`, with its address and BARs.
        let mut node = |id: &str,
                        parent: Option<&str>,
                        children,
                        pci: Option<(crate::pci_setup::PciAddress, &str)>| {
            let resources = match pci {
                Some((_, function)) => self.devices.pci.bars(function),
                None => Vec::new(),
            };
            let node = api::DeviceNode {
                id: id.to_string(),
                parent: parent.map(str::to_string),
                resources: resources.iter().map(pci_bar_resource).collect(),
                children,
                pci_bdf: pci.map(|(at, _)| at.to_string()),
            };
            tree.insert(id.to_string(), node);
        };
        // The platform devices the original lists too.
        let platform = ["__ioapic"]
            .into_iter()
            .chain(self.devices.serial.is_some().then_some("__serial"))
            .chain(
                self.devices
                    .debug_console
                    .is_some()
                    .then_some("__debug_console"),
            );
        for id in platform {
            node(id, None, Vec::new(), None);
        }
        for (id, at) in &self.devices.pci.placed() {
            if !self.devices.pci.is_virtio(id) {
                // Not virtio (pvpanic): one node, with the PCI address, as the original's.
                node(id, None, Vec::new(), Some((*at, id)));
                continue;
            }
            let transport = format!("_virtio-pci-{id}");
            node(&transport, None, vec![id.clone()], Some((*at, id)));
            node(id, Some(&transport), Vec::new(), None);
        }
        tree
    }

    /// Bytes of guest RAM the host currently backs with pages.
    pub fn resident_guest_bytes(&self) -> u64 {
        memory::resident_bytes(&self._memory)
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    pub fn devices_mut(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// Stops the vCPUs; returns the CMOS contents to carry into a rebuilt VM.
    /// The devices are released too: the VM cannot run again.
    pub fn stop(&mut self) -> [u8; CMOS_NVRAM_SIZE] {
        if let Some(t) = self.threads.take() {
            t.stop();
        }
        self.devices.release();
        self.clock = None;
        self.devices
            .cmos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .nvram()
    }
}
