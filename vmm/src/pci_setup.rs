//! The PCI segments and the devices on them: configuration access through ports 0xcf8/0xcfc
//! (segment 0) and ECAM (every segment, see `pci_segments`), BARs allocated from each
//! segment's share of the MMIO windows `_CRS` describes (64-bit BARs above RAM), MSI-X routed
//! through the hypervisor's GSI table, and one virtio-pci function per configured device.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, Weak};

use arch::layout;
use devices::{Bus, BusDevice};
use devices::{EjectSink, PciHotplug, Stateful};
use guest_memory::GuestMemoryMmap;
use hypervisor::{IoEventAddress, IrqRoute};
use log::info;
use pci::{BarKind, PciConfigIo, PciDevice, PciSegmentsEcam, VmInterface};
use thiserror::Error;
use virtio_devices::{Console, IommuMapping, VirtioPciDevice};
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ImageType, VmConfig};
use crate::pci_segments::PciSegment;
pub use crate::pci_segments::{PciAddress, PciWindows};
use crate::virtio_build::{self, NewDevice};

/// GSIs below this belong to the IOAPIC/PIC routes KVM sets up by default.
const FIRST_MSI_GSI: u32 = 24;
/// KVM_MAX_IRQ_ROUTES on x86.
const MAX_GSI: u32 = 4096;

#[derive(Debug, Error)]
pub enum PciSetupError {
    #[error("{option} {value}: {msg}")]
    Device {
        option: &'static str,
        value: String,
        msg: String,
    },
    /// As `Device`, for an option named at run time (`--memory-zone id=<id>`).
    #[error("{option} {value}: {msg}")]
    DeviceOf {
        option: String,
        value: String,
        msg: String,
    },
    #[error("PCI: {0}")]
    Bus(String),
    /// The MMIO windows cannot be shared among the segments.
    #[error("--platform num_pci_segments={count}: {msg}")]
    Segments { count: u16, msg: String },
}

/// What the PCI code needs from the VM, backed by the hypervisor and the MMIO bus.
pub struct VmPci {
    vm: Arc<dyn hypervisor::Vm>,
    /// Where device activations and resets go (the control loop's event monitor).
    events: crate::cpu::VmEvents,
    /// Weak: the bus holds the devices, which hold this.
    mmio: Weak<Bus>,
    state: Mutex<GsiState>,
}

struct GsiState {
    ids: IdAllocator,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl VmPci {
    pub fn new(vm: Arc<dyn hypervisor::Vm>, mmio: &Arc<Bus>, events: crate::cpu::VmEvents) -> Self {
        VmPci {
            vm,
            events,
            mmio: Arc::downgrade(mmio),
            state: Mutex::new(GsiState {
                ids: IdAllocator::new(FIRST_MSI_GSI, MAX_GSI - 1).expect("FIRST_MSI_GSI < MAX_GSI"),
                msi: BTreeMap::new(),
            }),
        }
    }

    /// GSIs handed out and not given back.
    pub fn gsis_in_use(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (FIRST_MSI_GSI..MAX_GSI)
            .filter(|&g| s.ids.is_allocated(g))
            .count()
    }

    /// The whole routing table: KVM's default IOAPIC and PIC routes for GSIs 0-23 (the table
    /// is replaced as a whole, so they must stay), then every MSI route.
    fn routes(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<IrqRoute> {
        let mut r = Vec::with_capacity(40 + msi.len());
        for gsi in 0..layout::IOAPIC_PINS {
            r.push(IrqRoute::Ioapic { gsi, pin: gsi });
            if gsi < 16 {
                r.push(IrqRoute::Pic {
                    gsi,
                    chip: gsi / 8,
                    pin: gsi % 8,
                });
            }
        }
        for (&gsi, &(address, data)) in msi {
            r.push(IrqRoute::Msi {
                gsi,
                address,
                data,
                devid: None,
            });
        }
        r
    }
}

impl VmPci {
    /// The hypervisor's VM (device memory slots).
    pub(crate) fn hypervisor(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.vm
    }
}

impl VmInterface for VmPci {
    fn device_event(&self, id: &str, event: &'static str) {
        self.events.device_event(id, event);
    }
    fn map_mmio(&self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), String> {
        let bus = self.mmio.upgrade().ok_or("the VM is gone")?;
        bus.insert(dev, base, len).map_err(|e| e.to_string())
    }
    fn unmap_mmio(&self, base: u64) {
        if let Some(bus) = self.mmio.upgrade() {
            bus.remove(base);
        }
    }
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> Result<(), String> {
        self.vm
            .register_ioevent(fd, IoEventAddress::Mmio(addr), None)
            .map_err(|e| e.to_string())
    }
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) {
        let _ = self.vm.unregister_ioevent(fd, IoEventAddress::Mmio(addr));
    }
    fn allocate_gsi(&self) -> Result<u32, String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.ids.allocate_id().map_err(|_| "out of GSIs".to_string())
    }
    fn free_gsi(&self, gsi: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = s.ids.free_id(gsi) {
            log::warn!("GSI {gsi}: {e}");
        }
    }
    fn set_msi_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match msi {
            Some(m) => s.msi.insert(gsi, m),
            None => s.msi.remove(&gsi),
        };
        self.vm
            .set_gsi_routing(&Self::routes(&s.msi))
            .map_err(|e| e.to_string())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), String> {
        self.vm.register_irqfd(fd, gsi).map_err(|e| e.to_string())
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) {
        let _ = self.vm.unregister_irqfd(fd, gsi);
    }
}

/// What a function on bus 0 is.
pub(crate) enum FunctionDevice {
    /// A virtio device behind its virtio-pci transport.
    Virtio(Arc<Mutex<VirtioPciDevice>>),
    /// A device of its own (pvpanic): its configuration space is all its state.
    Plain(Arc<Mutex<dyn PciDevice>>),
}

/// One function on bus 0 of a segment.
pub(crate) struct Function {
    pub(crate) id: String,
    /// The option it came from (`--disk`, ...), for messages.
    pub(crate) option: &'static str,
    pub(crate) segment: u16,
    pub(crate) slot: u8,
    pub(crate) device: FunctionDevice,
    /// Where the VMM put its BAR 0, and its size (given back to the allocator when it is
    /// unplugged).
    pub(crate) bar: u64,
    pub(crate) bar_size: u64,
    /// A disk's image lock (a migration's source hands it over).
    pub(crate) lock: Option<block::DiskLock>,
    pub(crate) counters: Option<Arc<dyn devices::DeviceCounters>>,
    /// The host asked the guest to eject it (`vm.remove-device`); it goes when the guest does.
    pub(crate) removal_requested: bool,
    /// A pmem device's range of guest-physical memory (its KVM slot goes with it; `unplug`
    /// gives the range back to the window).
    pub(crate) memory: Option<crate::pmem::PmemMemory>,
}

impl Function {
    pub(crate) fn address(&self) -> PciAddress {
        PciAddress {
            segment: self.segment,
            slot: self.slot,
        }
    }

    /// Its virtio-pci transport; `None` for a device that is not virtio.
    pub(crate) fn transport(&self) -> Option<&Arc<Mutex<VirtioPciDevice>>> {
        match &self.device {
            FunctionDevice::Virtio(t) => Some(t),
            FunctionDevice::Plain(_) => None,
        }
    }

    /// Its BARs as they stand now (the guest may have moved them).
    pub(crate) fn bars(&self) -> Vec<pci::BarInfo> {
        use pci::PciDevice;
        match &self.device {
            FunctionDevice::Virtio(t) => {
                t.lock().unwrap_or_else(|e| e.into_inner()).config().bars()
            }
            FunctionDevice::Plain(d) => d.lock().unwrap_or_else(|e| e.into_inner()).config().bars(),
        }
    }
}

/// Where and how a new function goes on the bus (see `PciDevices::place_function`).
struct FunctionSpec {
    option: &'static str,
    id: String,
    segment: u16,
    slot: Option<u8>,
    bar_size: u64,
    bar_kind: BarKind,
    lock: Option<block::DiskLock>,
    counters: Option<Arc<dyn devices::DeviceCounters>>,
}

/// The PCI segments of one VM, alive as long as the VM: the buses, the BAR and slot
/// allocators and the functions, so that devices can be added and removed while it runs
/// (`hotplug.rs`).
pub struct PciDevices {
    /// By segment number.
    pub(crate) segments: Vec<PciSegment>,
    /// The 0xcf8/0xcfc ports of segment 0 (the address register is state).
    config_io: Arc<Mutex<PciConfigIo>>,
    pub(crate) vmi: Arc<VmPci>,
    pub(crate) mem: GuestMemoryMmap,
    /// The hotplug controller the DSDT's `\_SB_.PHPR` describes.
    pub(crate) hotplug: Arc<Mutex<PciHotplug>>,
    /// Every function, in the order it was placed.
    pub(crate) functions: Vec<Function>,
    /// Whether `pause_devices` stopped the device workers (until `resume_devices`).
    pub(crate) devices_paused: bool,
    /// The balloon's target and actual size, when the VM has one (`vm.resize`).
    pub balloon: Option<Arc<virtio_devices::BalloonControl>>,
    /// The virtio-mem device's requested and plugged sizes, when memory can be hot-plugged.
    pub virtio_mem: Option<Arc<virtio_devices::VirtioMemControl>>,
    /// The virtio-mem device of each `--memory-zone` with a `hotplug_size`, by zone id.
    pub zone_virtio_mem: Vec<(String, Arc<virtio_devices::VirtioMemControl>)>,
    /// The statistics of the devices `remove_all` unplugged.
    released_counters: Vec<(String, Arc<dyn devices::DeviceCounters>)>,
    /// The format each disk was opened as, in `--disk` order (probed where not given), which
    /// the configuration records as the original's does.
    pub disk_image_types: Vec<ImageType>,
    /// The `--rate-limit-group` limiters, which disks share (hot-added ones too).
    pub(crate) rate_limit_groups: virtio_build::RateLimitGroups,
    /// The virtio-iommu's address spaces, when the VM has one: the devices placed behind it
    /// translate through them.
    pub(crate) iommu: Option<Arc<IommuMapping>>,
}

impl PciDevices {
    /// Unplugs the devices (see `DeviceManager::release`). Their statistics stay readable
    /// (the VMM logs them at exit).
    pub fn remove_all(&mut self) {
        self.released_counters = self.counters();
        // The locks share the images' open file descriptions: they go with the disks.
        self.functions.clear();
        for s in &self.segments {
            s.root().remove_all();
        }
    }

    /// The VIOT's contents: the virtio-iommu's address and the functions behind it (every
    /// slot of an IOMMU segment among them).
    pub fn viot(&self) -> Option<arch::acpi::Viot> {
        let m = self.iommu.as_ref()?;
        let iommu = self
            .functions
            .iter()
            .find(|f| f.id == IOMMU_ID)
            .map(Function::address)?;
        let rid = |endpoint: u32| ((endpoint >> 16) as u16, endpoint as u16);
        Some(arch::acpi::Viot {
            iommu: rid(endpoint_id(iommu)),
            endpoints: m.managed().into_iter().map(rid).collect(),
        })
    }

    /// Where device `id` is, when it is behind the IOMMU.
    pub fn iommu_endpoint(&self, id: &str) -> Option<PciAddress> {
        let f = self.functions.iter().find(|f| f.id == id)?;
        let t = f.transport()?;
        let behind = t
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .dma_endpoint()
            .is_some();
        behind.then(|| f.address())
    }

    /// Each device's id and address, in placement order.
    pub fn placed(&self) -> Vec<(String, PciAddress)> {
        self.functions
            .iter()
            .map(|f| (f.id.clone(), f.address()))
            .collect()
    }

    /// Segment `id`, if the VM has it.
    pub(crate) fn segment(&mut self, id: u16) -> Option<&mut PciSegment> {
        self.segments.get_mut(usize::from(id))
    }

    /// The BARs of device `id` as they stand now; none for an unknown id.
    pub fn bars(&self, id: &str) -> Vec<pci::BarInfo> {
        self.functions
            .iter()
            .find(|f| f.id == id)
            .map(Function::bars)
            .unwrap_or_default()
    }

    /// `vm.resize-disk`: device `id` resized to `size` bytes (a disk whose image can be);
    /// `None` when no device has that id.
    pub fn resize_disk(&mut self, id: &str, size: u64) -> Option<Result<(), String>> {
        let f = self.functions.iter().find(|f| f.id == id)?;
        Some(match f.transport() {
            Some(t) => t.lock().unwrap_or_else(|e| e.into_inner()).resize(size),
            None => Err("this device cannot be resized".into()),
        })
    }

    /// Whether the device `id` is a virtio one (behind a virtio-pci transport).
    pub fn is_virtio(&self, id: &str) -> bool {
        self.functions
            .iter()
            .any(|f| f.id == id && f.transport().is_some())
    }

    /// Statistics of the devices that keep them, by device id (for `vm.counters`); after
    /// `remove_all`, their final values.
    pub fn counters(&self) -> Vec<(String, Arc<dyn devices::DeviceCounters>)> {
        if self.functions.is_empty() {
            return self.released_counters.clone();
        }
        self.functions
            .iter()
            .filter_map(|f| Some((f.id.clone(), f.counters.clone()?)))
            .collect()
    }

    /// Stops every virtio device's worker(s) (in-flight requests completed, no guest memory
    /// touched, no interrupt raised afterwards) so that their states can be taken; the VM's
    /// resume starts them again.
    pub fn pause_devices(&mut self) -> Result<(), String> {
        self.devices_paused = true;
        for t in self.functions.iter().filter_map(Function::transport) {
            t.lock().unwrap_or_else(|e| e.into_inner()).pause()?;
        }
        Ok(())
    }

    /// Live migration: every virtio device logs the guest RAM it writes unseen (a vhost-user
    /// backend's writes), up to `last_addr`. The first device that cannot is the error (those
    /// before it keep logging: the caller stops them all).
    pub fn start_dirty_log(&self, last_addr: u64) -> Result<(), String> {
        for t in self.functions.iter().filter_map(Function::transport) {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .start_dirty_log(last_addr)?;
        }
        Ok(())
    }

    /// Ends `start_dirty_log` on every device.
    pub fn stop_dirty_log(&self) {
        for t in self.functions.iter().filter_map(Function::transport) {
            t.lock().unwrap_or_else(|e| e.into_inner()).stop_dirty_log();
        }
    }

    /// The devices' logs since the last call (bit i of word w: the page at (64 w + i) × 4 KiB).
    pub fn take_dirty_log(&self) -> Vec<Vec<u64>> {
        self.functions
            .iter()
            .filter_map(Function::transport)
            .filter_map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).take_dirty_log())
            .collect()
    }

    /// Restarts the workers `pause_devices` stopped (nothing when none were).
    pub fn resume_devices(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.devices_paused) {
            return Ok(());
        }
        let mut first_err = None;
        for t in self.functions.iter().filter_map(Function::transport) {
            if let Err(e) = t.lock().unwrap_or_else(|e| e.into_inner()).resume() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The segments' state: segment 0's host bridge and 0xcf8, the hotplug controller and
    /// every transport with its device's own state, in placement order (other segments' buses
    /// hold no state of their own). The device workers must be paused (`pause_devices`).
    pub fn state(&self) -> crate::snapshot::PciSnapshot {
        crate::snapshot::PciSnapshot {
            root: self.segments[0]
                .root()
                .state()
                .expect("segment 0 has its host bridge"),
            config_io: self
                .config_io
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            hotplug: Some(
                self.hotplug
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .state(),
            ),
            devices: self
                .functions
                .iter()
                .filter_map(|f| {
                    let t = f.transport()?.lock().unwrap_or_else(|e| e.into_inner());
                    Some(crate::snapshot::VirtioPciSnapshot {
                        id: f.id.clone(),
                        segment: f.segment,
                        slot: f.slot,
                        transport: t.state(),
                        device: t.device_state(),
                    })
                })
                .collect(),
            others: self
                .functions
                .iter()
                .filter_map(|f| match &f.device {
                    FunctionDevice::Plain(d) => Some(crate::snapshot::PlainPciSnapshot {
                        id: f.id.clone(),
                        segment: f.segment,
                        slot: f.slot,
                        config: d.lock().unwrap_or_else(|e| e.into_inner()).config().state(),
                    }),
                    FunctionDevice::Virtio(_) => None,
                })
                .collect(),
        }
    }

    /// Makes the segments what `s` describes, in the order docs/pci.md gives: the host bridge
    /// and 0xcf8, then each transport (its device's own state first, since the transport's
    /// may start the device), matched by id and address (the snapshot's configuration built
    /// the same functions in the same places: see `slot_hints`), then the BARs, last. The
    /// device workers the restore started are paused at once (the VM comes up paused; its
    /// resume starts them).
    pub fn restore(&mut self, s: &crate::snapshot::PciSnapshot) -> Result<(), String> {
        let mut placed: Vec<(&str, u16, u8)> = self
            .functions
            .iter()
            .map(|f| (f.id.as_str(), f.segment, f.slot))
            .collect();
        let mut saved: Vec<(&str, u16, u8)> = s
            .devices
            .iter()
            .map(|d| (d.id.as_str(), d.segment, d.slot))
            .chain(s.others.iter().map(|d| (d.id.as_str(), d.segment, d.slot)))
            .collect();
        placed.sort_unstable();
        saved.sort_unstable();
        if placed != saved {
            return Err(format!(
                "the state's PCI devices {saved:?} are not the configuration's {placed:?}"
            ));
        }
        self.segments[0]
            .root()
            .set_state(&s.root)
            .map_err(|e| e.to_string())?;
        self.config_io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_state(&s.config_io)
            .map_err(|e| e.to_string())?;
        if let Some(h) = &s.hotplug {
            self.hotplug
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(h)
                .map_err(|e| e.to_string())?;
        }
        let mut result = Ok(());
        for d in &s.others {
            let Some(FunctionDevice::Plain(dev)) = self
                .functions
                .iter()
                .find(|f| f.id == d.id)
                .map(|f| &f.device)
            else {
                return Err(format!("{}: not the configuration's device", d.id));
            };
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            dev.config_mut()
                .set_state(&d.config)
                .map_err(|e| e.within(&d.id).to_string())?;
        }
        // The virtio-iommu's address spaces first: the devices behind it translate their rings
        // through them when their transports start.
        let iommu_first = s
            .devices
            .iter()
            .filter(|d| d.id == IOMMU_ID)
            .chain(s.devices.iter().filter(|d| d.id != IOMMU_ID));
        for d in iommu_first {
            let Some(t) = self
                .functions
                .iter()
                .find(|f| f.id == d.id)
                .and_then(Function::transport)
            else {
                continue;
            };
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            result = t
                .set_device_state(&d.device)
                .and_then(|()| t.set_state(&d.transport))
                .map_err(|e| e.to_string());
            if result.is_err() {
                break;
            }
        }
        for segment in &self.segments {
            segment.root().refresh_bars();
        }
        // Paused even after a failure: whatever started stops before the VM is dropped.
        let paused = self.pause_devices();
        result.and(paused)
    }

    /// Lets go of every disk image's lock (the devices must be paused: a live migration's
    /// destination is about to open the images).
    pub fn release_disk_locks(&self) -> Result<(), String> {
        for l in self.functions.iter().filter_map(|f| f.lock.as_ref()) {
            l.release().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Takes the disk images' locks again (a migration failed after releasing them).
    pub fn reacquire_disk_locks(&self) -> Result<(), String> {
        for l in self.functions.iter().filter_map(|f| f.lock.as_ref()) {
            l.reacquire().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Occupied addresses (segment 0's slot 0 is its host bridge).
    pub fn device_ids(&self) -> Vec<PciAddress> {
        (0u16..)
            .zip(&self.segments)
            .flat_map(|(segment, s)| {
                s.root()
                    .device_ids()
                    .into_iter()
                    .map(move |slot| PciAddress { segment, slot })
            })
            .collect()
    }

    /// Puts `d` on its segment's bus: at `slot` (its own wish, else the lowest free slot),
    /// with a BAR from the segment's windows, behind a virtio-pci transport. Everything it
    /// took is given back if it cannot be placed.
    pub(crate) fn place(&mut self, d: NewDevice) -> Result<PciAddress, PciSetupError> {
        self.place_with_bar(d, virtio_devices::VIRTIO_PCI_BAR_KIND)
    }

    /// `place` with a BAR 0 of `bar_kind`.
    fn place_with_bar(
        &mut self,
        d: NewDevice,
        bar_kind: BarKind,
    ) -> Result<PciAddress, PciSetupError> {
        let NewDevice {
            option,
            id,
            segment,
            slot,
            dev,
            lock,
            image_type: _,
            pmem,
            iommu,
        } = d;
        let dma = match (iommu, &self.iommu) {
            (false, _) => None,
            (true, Some(m)) => Some(m.clone()),
            (true, None) => {
                return Err(PciSetupError::Device {
                    option,
                    value: id,
                    msg: "iommu=on: the VM has no IOMMU".into(),
                })
            }
        };
        let counters = dev
            .counters()
            .map(|c| c as Arc<dyn devices::DeviceCounters>);
        let memory = pmem
            .map(|b| self.place_memory(option, &id, segment, b))
            .transpose()?;
        let mem = self.mem.clone();
        let vmi: Arc<dyn VmInterface> = self.vmi.clone();
        let name = id.clone();
        let spec = FunctionSpec {
            option,
            id,
            segment,
            slot,
            bar_size: virtio_devices::VIRTIO_PCI_BAR_SIZE,
            bar_kind,
            lock,
            counters,
        };
        let range = memory.as_ref().map(|m| (m.gpa, m.len));
        let slot = self.place_function(spec, move |bar| {
            VirtioPciDevice::with_bar(name, dev, mem, vmi, (bar, bar_kind))
                .map(|t| FunctionDevice::Virtio(Arc::new(Mutex::new(t))))
        });
        match (slot, memory) {
            (Ok(slot), memory) => {
                if let Some(f) = self.functions.last_mut() {
                    f.memory = memory;
                    if let (Some(m), Some(t)) = (dma, f.transport()) {
                        let endpoint = endpoint_id(slot);
                        m.manage(endpoint);
                        t.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .set_dma(m.endpoint(endpoint));
                    }
                }
                Ok(slot)
            }
            (Err(e), memory) => {
                // The KVM slot goes first, then the range.
                drop(memory);
                if let (Some((gpa, len)), Some(s)) = (range, self.segment(segment)) {
                    let _ = s.bars.free(gpa, len);
                }
                Err(e)
            }
        }
    }

    /// Places a pmem device's mapping: a range of its segment's 64-bit window, a KVM memory
    /// slot.
    fn place_memory(
        &mut self,
        option: &'static str,
        id: &str,
        segment: u16,
        b: crate::pmem::PmemBacking,
    ) -> Result<crate::pmem::PmemMemory, PciSetupError> {
        let err = |msg: String| PciSetupError::Device {
            option,
            value: id.to_string(),
            msg,
        };
        let len = b.range.size;
        let bars = &mut self
            .segment(segment)
            .ok_or_else(|| err(no_segment(segment)))?
            .bars;
        let gpa = bars
            .allocate_memory(len, crate::pmem::PMEM_RANGE_ALIGN)
            .map_err(|e| err(format!("no room for its {len:#x} bytes of memory: {e}")))?;
        let slot = crate::pmem::free_slot(
            self.functions
                .iter()
                .filter_map(|f| f.memory.as_ref().map(|m| m.slot)),
        );
        crate::pmem::PmemMemory::register(self.vmi.hypervisor(), b, slot, gpa).map_err(|e| {
            if let Some(s) = self.segment(segment) {
                let _ = s.bars.free(gpa, len);
            }
            err(e)
        })
    }

    /// Puts a device that is not virtio on segment 0's bus, as `place` does: `build` makes it
    /// with its BAR 0 (`bar_size` bytes of `bar_kind`) at the address it is given.
    pub(crate) fn place_pci(
        &mut self,
        option: &'static str,
        id: String,
        slot: Option<u8>,
        (bar_size, bar_kind): (u64, BarKind),
        build: impl FnOnce(u64) -> Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciAddress, PciSetupError> {
        let spec = FunctionSpec {
            option,
            id,
            segment: 0,
            slot,
            bar_size,
            bar_kind,
            lock: None,
            counters: None,
        };
        self.place_function(spec, |bar| Ok(FunctionDevice::Plain(build(bar))))
    }

    /// The slot and BAR allocation `place` and `place_pci` share.
    fn place_function(
        &mut self,
        spec: FunctionSpec,
        build: impl FnOnce(u64) -> Result<FunctionDevice, String>,
    ) -> Result<PciAddress, PciSetupError> {
        let FunctionSpec {
            option,
            id,
            segment,
            slot,
            bar_size,
            bar_kind,
            lock,
            counters,
        } = spec;
        let err = |msg: String| PciSetupError::Device {
            option,
            value: id.clone(),
            msg,
        };
        let seg = self
            .segments
            .get_mut(usize::from(segment))
            .ok_or_else(|| err(no_segment(segment)))?;
        let mut root = seg.root.lock().unwrap_or_else(|e| e.into_inner());
        let slot = root.next_device_id(slot).map_err(|e| err(e.to_string()))?;
        let bar = seg
            .bars
            .allocate(bar_size, bar_kind)
            .map_err(|e| err(e.to_string()))?;
        let placed = build(bar).map_err(err).and_then(|device| {
            let pci: Arc<Mutex<dyn PciDevice>> = match &device {
                FunctionDevice::Virtio(t) => t.clone(),
                FunctionDevice::Plain(d) => d.clone(),
            };
            root.add_device(slot, pci)
                .map(|()| device)
                .map_err(|e| err(e.to_string()))
        });
        let device = match placed {
            Ok(d) => d,
            Err(e) => {
                drop(root);
                let _ = seg.bars.free(bar, bar_size);
                return Err(e);
            }
        };
        drop(root);
        let address = PciAddress { segment, slot };
        info!("PCI {address}: {id} ({option}), BAR0 at {bar:#x}");
        self.functions.push(Function {
            id,
            option,
            segment,
            slot,
            device,
            bar,
            bar_size,
            lock,
            counters,
            removal_requested: false,
            memory: None,
        });
        Ok(address)
    }
}

/// The virtio-iommu's id, as the original's.
pub(crate) const IOMMU_ID: &str = "__iommu";

/// The virtio-iommu's name for the function at `a` (VIOT's PCI range nodes give it so):
/// segment, then the requester id (bus 0, the slot, function 0).
pub(crate) fn endpoint_id(a: PciAddress) -> u32 {
    u32::from(a.segment) << 16 | u32::from(a.slot) << 3
}

fn no_segment(segment: u16) -> String {
    format!("pci_segment={segment}: the VM has no such PCI segment")
}

/// The host side of the virtio console.
pub struct ConsoleIo {
    /// Where its output goes (`None`: discarded).
    pub out: Option<Box<dyn Write + Send>>,
    /// What it reads (`None`: no input).
    pub input: Option<File>,
    /// Its size (columns, rows), which the control loop keeps up to date.
    pub size: Arc<virtio_devices::ConsoleSize>,
}

/// Where a restored VM's device was: its slot, and the kind of its BAR 0.
#[derive(Clone, Copy, Debug)]
pub struct SlotHint {
    pub slot: u8,
    pub bar_kind: Option<BarKind>,
}

/// A restored VM's devices by id (see `create`).
pub type SlotHints = BTreeMap<String, SlotHint>;

/// The BAR kind of a device placed when the VM is built: as the original, a disk's on segment 0
/// is 32-bit, so firmware that maps only the first 4 GiB (rust-hypervisor-firmware, edk2 early
/// on) reaches the disk it boots from; every other device's, and a hot-added disk's, is 64-bit.
fn boot_bar_kind(d: &NewDevice) -> BarKind {
    if d.segment == 0 && d.dev.device_type() == virtio_devices::TYPE_BLOCK {
        BarKind::Mem32
    } else {
        virtio_devices::VIRTIO_PCI_BAR_KIND
    }
}

/// Builds the segments with the configured devices, their BARs in `windows` (one per segment,
/// see `pci_segments::segment_windows`). `console`: `None` for no virtio console.
/// `slot_hints`: where a restored VM's devices were (by id: slot and BAR kind), so that a
/// configuration changed by hotplug rebuilds the snapshot's bus. `ejections`:
/// who hears of the guest's ejections; `events`, of its devices' activations and resets.
#[allow(clippy::too_many_arguments)]
pub fn create(
    vm: &Arc<dyn hypervisor::Vm>,
    mem: &GuestMemoryMmap,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    cfg: &VmConfig,
    windows: &[PciWindows],
    console: Option<ConsoleIo>,
    slot_hints: Option<&SlotHints>,
    ejections: Arc<dyn EjectSink>,
    events: &crate::cpu::VmEvents,
) -> Result<PciDevices, PciSetupError> {
    let events = events
        .try_clone()
        .map_err(|e| PciSetupError::Bus(e.to_string()))?;
    let vmi = Arc::new(VmPci::new(vm.clone(), mmio, events));
    let segments: Vec<PciSegment> = (0u16..)
        .zip(windows)
        .map(|(id, w)| PciSegment::new(vmi.clone(), id, w))
        .collect();
    if segments.is_empty() || segments.len() > usize::from(vm_config::MAX_NUM_PCI_SEGMENTS) {
        return Err(PciSetupError::Bus(format!(
            "{} PCI segments: must be 1-{}",
            segments.len(),
            vm_config::MAX_NUM_PCI_SEGMENTS
        )));
    }
    let bus_err = |e: devices::BusError| PciSetupError::Bus(e.to_string());
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(segments[0].root.clone())));
    pio.insert(
        config_io.clone(),
        layout::PCI_CONFIG_IO_PORT,
        layout::PCI_CONFIG_IO_SIZE,
    )
    .map_err(bus_err)?;
    // One megabyte of ECAM per segment; the rest of the range reads all ones.
    let ecam = PciSegmentsEcam(segments.iter().map(|s| s.root.clone()).collect());
    mmio.insert(
        Arc::new(Mutex::new(ecam)),
        layout::PCI_MMCONFIG_START.0,
        layout::PCI_MMCONFIG_SIZE,
    )
    .map_err(bus_err)?;
    let hotplug = Arc::new(Mutex::new(PciHotplug::new(
        ejections,
        segments.len() as u16,
    )));
    mmio.insert(
        hotplug.clone(),
        layout::PCI_HOTPLUG_START.0,
        layout::PCI_HOTPLUG_SIZE,
    )
    .map_err(bus_err)?;

    let mut list: Vec<NewDevice> = Vec::new();
    if let Some(io) = console {
        list.push(NewDevice {
            option: "--console",
            // The original's name for the console device.
            id: cfg.console.pci_common.id_or(|| "__console".into()),
            segment: cfg.console.pci_common.pci_segment,
            slot: cfg.console.pci_common.pci_device_id,
            dev: Box::new(Console::new(io.out, io.input, io.size)),
            lock: None,
            image_type: None,
            pmem: None,
            iommu: cfg.console.pci_common.iommu,
        });
    }
    let rate_limit_groups = virtio_build::rate_limit_groups(cfg);
    let mut disk_image_types = Vec::with_capacity(cfg.disks.len());
    for (i, d) in cfg.disks.iter().enumerate() {
        let id = d.pci_common.id_or(|| format!("_disk{i}"));
        let dev = virtio_build::disk(d, id, &rate_limit_groups)?;
        disk_image_types.extend(dev.image_type);
        list.push(dev);
    }
    for (i, n) in cfg.net.iter().enumerate() {
        let id = n.pci_common.id_or(|| format!("_net{i}"));
        list.push(virtio_build::net(n, id)?);
    }
    // In the original's order (it decides the slots of devices without one): console, disks,
    // net, rng, generic vhost-user, virtio-fs, pmem, vsock, virtio-mem, balloon (then the
    // watchdog and pvpanic, `device_manager`).
    list.push(virtio_build::rng(&cfg.rng)?);
    for (i, g) in cfg.generic_vhost_user.iter().enumerate() {
        let id = g.pci_common.id_or(|| format!("_generic_vhost_user{i}"));
        list.push(crate::virtio_build_vhost::generic(g, id)?);
    }
    for (i, f) in cfg.fs.iter().enumerate() {
        let id = f.pci_common.id_or(|| format!("_fs{i}"));
        list.push(virtio_build::fs(f, id)?);
    }
    for (i, p) in cfg.pmem.iter().enumerate() {
        let id = p.pci_common.id_or(|| format!("_pmem{i}"));
        list.push(crate::pmem::pmem(p, id)?);
    }
    list.extend(cfg.vsock.as_ref().map(virtio_build::vsock).transpose()?);
    let mut virtio_mem = None;
    if cfg.memory.hotplug_method == vm_config::HotplugMethod::VirtioMem {
        if let Some((dev, control)) = virtio_build::virtio_mem(&cfg.memory)? {
            list.push(dev);
            virtio_mem = Some(control);
        }
    }
    let mut zone_virtio_mem = Vec::new();
    if cfg.memory.hotplug_method == vm_config::HotplugMethod::VirtioMem {
        for (dev, zone, control) in virtio_build::zone_virtio_mems(cfg)? {
            list.push(dev);
            zone_virtio_mem.push((zone, control));
        }
    }
    let mut balloon = None;
    if let Some(b) = &cfg.balloon {
        let (dev, control) = virtio_build::balloon(b)?;
        list.push(dev);
        balloon = Some(control);
    }
    if let Some(hints) = slot_hints {
        for d in list.iter_mut().filter(|d| d.slot.is_none()) {
            d.slot = hints.get(&d.id).map(|h| h.slot);
        }
    }

    // Devices with an explicit slot first, so automatic ones do not take their slot.
    list.sort_by_key(|p| p.slot.is_none());
    let mut pci = PciDevices {
        segments,
        config_io,
        vmi,
        mem: mem.clone(),
        hotplug,
        functions: Vec::new(),
        devices_paused: false,
        balloon,
        virtio_mem,
        zone_virtio_mem,
        released_counters: Vec::new(),
        disk_image_types,
        rate_limit_groups,
        iommu: None,
    };
    if cfg.iommu {
        let m = Arc::new(IommuMapping::new());
        // Every slot of an IOMMU segment is behind it, for devices hot-added there.
        for segment in cfg.iommu_segments() {
            for slot in 0..32 {
                m.manage(endpoint_id(PciAddress { segment, slot }));
            }
        }
        pci.iommu = Some(m);
    }
    for d in list {
        let hint = slot_hints
            .and_then(|h| h.get(&d.id))
            .and_then(|h| h.bar_kind);
        let kind = hint.unwrap_or_else(|| boot_bar_kind(&d));
        pci.place_with_bar(d, kind)?;
    }
    Ok(pci)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inside(addr: u64, size: u64, (start, len): (u64, u64)) -> bool {
        addr >= start && addr + size <= start + len
    }

    /// `_CRS` and the BAR allocator use the same windows, and a virtio BAR lands in the 64-bit
    /// one (above RAM and 4 GiB, below the physical address limit) whenever there is one.
    #[test]
    fn crs_windows_and_bar_allocation_agree() {
        let bar = virtio_devices::VIRTIO_PCI_BAR_SIZE;
        for (ram, bits, want64) in [
            (256u64 << 20, 46u8, Some((4u64 << 30, 64u64 << 30))),
            (5 << 30, 46, Some((6 << 30, 64 << 30))),
            (3 << 30, 36, Some((4 << 30, 60 << 30))),
            (5 << 30, 33, Some((6 << 30, 2 << 30))),
            (256 << 20, 32, None),
            (7 << 30, 33, None),
        ] {
            let w = PciWindows::new(ram, 0, bits);
            assert_eq!(w.mmio64, want64, "ram {ram:#x} bits {bits}");
            let host = arch::acpi::PciHost::segment0(w.mmio32, w.mmio64);
            assert_eq!(host.mmio64, w.mmio64);
            assert_eq!(host.mmio32, w.mmio32);
            let mut bars = w.allocators();
            let a = bars
                .allocate(bar, virtio_devices::VIRTIO_PCI_BAR_KIND)
                .unwrap();
            let b = bars
                .allocate(bar, virtio_devices::VIRTIO_PCI_BAR_KIND)
                .unwrap();
            assert_eq!(b, a + bar);
            match host.mmio64 {
                Some(m64) => {
                    let ram_end = layout::ram_regions(ram)
                        .last()
                        .map(|&(s, n)| s.0 + n)
                        .unwrap();
                    assert!(inside(a, 2 * bar, m64), "{a:#x} outside {m64:x?}");
                    assert!(a >= 1 << 32 && a >= ram_end);
                    assert!(m64.0 + m64.1 <= 1 << bits);
                    assert_eq!(a, m64.0);
                }
                None => assert!(inside(a, 2 * bar, host.mmio32), "{a:#x}"),
            }
        }
    }
}
