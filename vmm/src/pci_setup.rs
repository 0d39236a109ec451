//! PCI segment 0 and the virtio devices on it: the host bridge, configuration access through
//! ports 0xcf8/0xcfc and ECAM, BARs allocated from the MMIO windows `_CRS` describes (64-bit
//! BARs above RAM), MSI-X routed through the hypervisor's GSI table, and one virtio-pci
//! function per configured device.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use arch::layout;
use devices::{Bus, BusDevice};
use guest_memory::GuestMemoryMmap;
use hypervisor::{IoEventAddress, IrqRoute};
use log::info;
use pci::{BarWindows, PciConfigIo, PciConfigMmio, PciRoot, VmInterface};
use thiserror::Error;
use vm_allocator::IdAllocator;
use virtio_devices::{Block, BlockConfig, Console, Net, Rng, VirtioDevice, VirtioPciDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskConfig, ImageType, VmConfig};

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
    #[error("PCI: {0}")]
    Bus(String),
}

/// What the PCI code needs from the VM, backed by the hypervisor and the MMIO bus.
pub struct VmPci {
    vm: Arc<dyn hypervisor::Vm>,
    /// Weak: the bus holds the devices, which hold this.
    mmio: Weak<Bus>,
    state: Mutex<GsiState>,
}

struct GsiState {
    ids: IdAllocator,
    msi: BTreeMap<u32, (u64, u32)>,
}

impl VmPci {
    pub fn new(vm: Arc<dyn hypervisor::Vm>, mmio: &Arc<Bus>) -> Self {
        VmPci {
            vm,
            mmio: Arc::downgrade(mmio),
            state: Mutex::new(GsiState {
                ids: IdAllocator::new(FIRST_MSI_GSI, MAX_GSI - 1)
                    .expect("FIRST_MSI_GSI < MAX_GSI"),
                msi: BTreeMap::new(),
            }),
        }
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

impl VmInterface for VmPci {
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

/// The PCI MMIO windows of a VM, `(start, size)`: what `_CRS` describes and what BARs are
/// allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32: (u64, u64),
    /// `None` when the guest physical address space has no room above RAM for one; 64-bit
    /// BARs then go to the 32-bit window.
    pub mmio64: Option<(u64, u64)>,
}

impl PciWindows {
    /// The windows of a VM with `ram_size` bytes of RAM whose vCPUs report `phys_bits` of
    /// physical address space (see `arch::cpuid::guest_phys_bits`).
    pub fn new(ram_size: u64, phys_bits: u8) -> Self {
        PciWindows {
            mmio32: (
                layout::MEM_32BIT_DEVICES_START.0,
                layout::MEM_32BIT_DEVICES_SIZE,
            ),
            mmio64: layout::mmio64_window(ram_size, phys_bits),
        }
    }

    fn allocators(&self) -> BarWindows {
        BarWindows::new(self.mmio32, self.mmio64)
    }
}

/// The PCI host bridge as ACPI describes it.
pub fn pci_host(windows: &PciWindows) -> arch::acpi::PciHost {
    arch::acpi::PciHost::segment0(windows.mmio32, windows.mmio64)
}

/// The PCI segment of one VM (the buses hold it too; this names it).
pub struct PciDevices {
    root: Arc<Mutex<PciRoot>>,
    /// The 0xcf8/0xcfc ports (the address register is state).
    config_io: Arc<Mutex<PciConfigIo>>,
    /// Each virtio-pci transport with its device id and device number on bus 0, in the order
    /// they were placed (the root holds them as `dyn PciDevice`).
    transports: Vec<(String, u8, Arc<Mutex<VirtioPciDevice>>)>,
    /// Whether `pause_devices` stopped the device workers (until `resume_devices`).
    devices_paused: bool,
    /// Statistics of the devices that keep them, by device id (for `vm.counters`).
    pub counters: Vec<(String, Arc<dyn devices::DeviceCounters>)>,
    /// Each virtio device's id and its device number on bus 0 (for `vm.info`'s device tree).
    pub placed: Vec<(String, u8)>,
    /// The format each disk was opened as, in `--disk` order (probed where not given), which
    /// the configuration records as the original's does.
    pub disk_image_types: Vec<ImageType>,
    /// Handles on the disk images' locks (a migration's source hands them over).
    disk_locks: Vec<block::DiskLock>,
}

impl PciDevices {
    /// Unplugs the devices (see `DeviceManager::release`).
    pub fn remove_all(&mut self) {
        // The handles share the images' open file descriptions: they go with the disks.
        self.disk_locks.clear();
        self.transports.clear();
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_all();
    }

    /// Stops every virtio device's worker(s) (in-flight requests completed, no guest memory
    /// touched, no interrupt raised afterwards) so that their states can be taken; the VM's
    /// resume starts them again.
    pub fn pause_devices(&mut self) -> Result<(), String> {
        self.devices_paused = true;
        for (_, _, t) in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).pause()?;
        }
        Ok(())
    }

    /// Restarts the workers `pause_devices` stopped (nothing when none were).
    pub fn resume_devices(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.devices_paused) {
            return Ok(());
        }
        let mut first_err = None;
        for (_, _, t) in &self.transports {
            if let Err(e) = t.lock().unwrap_or_else(|e| e.into_inner()).resume() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The segment's state: host bridge, 0xcf8 and every transport with its device's own
    /// state, in placement order. The device workers must be paused (`pause_devices`).
    pub fn state(&self) -> crate::snapshot::PciSnapshot {
        crate::snapshot::PciSnapshot {
            root: self.root.lock().unwrap_or_else(|e| e.into_inner()).state(),
            config_io: self
                .config_io
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            devices: self
                .transports
                .iter()
                .map(|(id, slot, t)| {
                    let t = t.lock().unwrap_or_else(|e| e.into_inner());
                    crate::snapshot::VirtioPciSnapshot {
                        id: id.clone(),
                        slot: *slot,
                        transport: t.state(),
                        device: t.device_state(),
                    }
                })
                .collect(),
        }
    }

    /// Makes segment 0 what `s` describes, in the order docs/pci.md gives: the host bridge
    /// and 0xcf8, then each transport (its device's own state first, since the transport's
    /// may start the device), matched by id and slot (the snapshot's configuration built the
    /// same functions in the same places), then the BARs, last. The device workers the
    /// restore started are paused at once (the VM comes up paused; its resume starts them).
    pub fn restore(&mut self, s: &crate::snapshot::PciSnapshot) -> Result<(), String> {
        let placed: Vec<(&str, u8)> = self
            .transports
            .iter()
            .map(|(id, slot, _)| (id.as_str(), *slot))
            .collect();
        let saved: Vec<(&str, u8)> = s.devices.iter().map(|d| (d.id.as_str(), d.slot)).collect();
        if placed != saved {
            return Err(format!(
                "the state's PCI devices {saved:?} are not the configuration's {placed:?}"
            ));
        }
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_state(&s.root)
            .map_err(|e| e.to_string())?;
        self.config_io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_state(&s.config_io)
            .map_err(|e| e.to_string())?;
        let mut result = Ok(());
        for ((_, _, t), d) in self.transports.iter().zip(&s.devices) {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            result = t
                .set_device_state(&d.device)
                .and_then(|()| t.set_state(&d.transport))
                .map_err(|e| e.to_string());
            if result.is_err() {
                break;
            }
        }
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refresh_bars();
        // Paused even after a failure: whatever started stops before the VM is dropped.
        let paused = self.pause_devices();
        result.and(paused)
    }

    /// Lets go of every disk image's lock (the devices must be paused: a live migration's
    /// destination is about to open the images).
    pub fn release_disk_locks(&self) -> Result<(), String> {
        for l in &self.disk_locks {
            l.release().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Takes the disk images' locks again (a migration failed after releasing them).
    pub fn reacquire_disk_locks(&self) -> Result<(), String> {
        for l in &self.disk_locks {
            l.reacquire().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Occupied device numbers on bus 0 (0 is the host bridge).
    pub fn device_ids(&self) -> Vec<u8> {
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_ids()
    }
}

/// A device waiting for its slot: option it came from, id, wanted slot.
struct Pending {
    option: &'static str,
    id: String,
    slot: Option<u8>,
    dev: Box<dyn VirtioDevice>,
}

fn disk_error(d: &DiskConfig, msg: String) -> PciSetupError {
    PciSetupError::Device {
        option: "--disk",
        value: d.path.display().to_string(),
        msg,
    }
}

/// The block layer's format for a configured image type; `None`: probe the header.
fn block_image_type(t: ImageType) -> Option<block::ImageType> {
    match t {
        ImageType::Raw => Some(block::ImageType::Raw),
        ImageType::Qcow2 => Some(block::ImageType::Qcow2),
        ImageType::FixedVhd => Some(block::ImageType::Vhd),
        ImageType::Vhdx => Some(block::ImageType::Vhdx),
        // The configuration refuses vmdk; probing finds what the file is.
        ImageType::FlatVmdk | ImageType::Unknown => None,
    }
}

/// The configuration's name for a format the block layer opened.
fn config_image_type(t: block::ImageType) -> ImageType {
    match t {
        block::ImageType::Raw => ImageType::Raw,
        block::ImageType::Qcow2 => ImageType::Qcow2,
        block::ImageType::Vhd => ImageType::FixedVhd,
        block::ImageType::Vhdx => ImageType::Vhdx,
    }
}

fn open_disk(d: &DiskConfig) -> Result<(Box<dyn block::DiskFile>, block::DiskLock), PciSetupError> {
    let image_type = block_image_type(d.image_type);
    let opts = block::OpenOptions {
        readonly: d.readonly,
        direct: d.direct,
        image_type,
        backing_files: d.backing_files,
        sparse: d.sparse,
        lock_granularity: match d.lock_granularity {
            vm_config::LockGranularity::ByteRange => block::LockGranularity::ByteRange,
            vm_config::LockGranularity::Full => block::LockGranularity::Full,
        },
    };
    block::open_disk_locked(&d.path, &opts).map_err(|e| disk_error(d, e.to_string()))
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

/// Builds segment 0 with the configured devices, their BARs in `windows`. `console`: `None`
/// for no virtio console.
pub fn create(
    vm: &Arc<dyn hypervisor::Vm>,
    mem: &GuestMemoryMmap,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    cfg: &VmConfig,
    windows: &PciWindows,
    console: Option<ConsoleIo>,
) -> Result<PciDevices, PciSetupError> {
    let vmi: Arc<dyn VmInterface> = Arc::new(VmPci::new(vm.clone(), mmio));
    let root = Arc::new(Mutex::new(PciRoot::new(vmi.clone())));
    let bus_err = |e: devices::BusError| PciSetupError::Bus(e.to_string());
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    pio.insert(
        config_io.clone(),
        layout::PCI_CONFIG_IO_PORT,
        layout::PCI_CONFIG_IO_SIZE,
    )
    .map_err(bus_err)?;
    mmio.insert(
        Arc::new(Mutex::new(PciConfigMmio(root.clone()))),
        layout::PCI_MMCONFIG_START.0,
        layout::PCI_MMCONFIG_SIZE,
    )
    .map_err(bus_err)?;
    let mut bars = windows.allocators();

    let mut list: Vec<Pending> = Vec::new();
    if let Some(io) = console {
        list.push(Pending {
            option: "--console",
            // The original's name for the console device.
            id: cfg.console.id.clone().unwrap_or_else(|| "__console".into()),
            slot: cfg.console.pci_device_id,
            dev: Box::new(Console::new(io.out, io.input, io.size)),
        });
    }
    let mut disk_image_types = Vec::with_capacity(cfg.disks.len());
    let mut disk_locks = Vec::with_capacity(cfg.disks.len());
    for (i, d) in cfg.disks.iter().enumerate() {
        let (disk, lock) = open_disk(d)?;
        disk_locks.push(lock);
        disk_image_types.push(config_image_type(disk.image_type()));
        let id = d.id.clone().unwrap_or_else(|| format!("_disk{i}"));
        let serial = d.serial.clone().unwrap_or_else(|| id.clone());
        let dev = Block::new(
            disk,
            BlockConfig {
                num_queues: d.num_queues,
                queue_size: d.queue_size,
                serial,
                io_uring: d.direct && !d.disable_io_uring,
            },
        )
        .map_err(|e| disk_error(d, e.to_string()))?;
        list.push(Pending {
            option: "--disk",
            id,
            slot: d.pci_device_id,
            dev: Box::new(dev),
        });
    }
    for (i, n) in cfg.net.iter().enumerate() {
        let err = |msg: String| PciSetupError::Device {
            option: "--net",
            value: n.tap.clone().unwrap_or_default(),
            msg,
        };
        let pairs = usize::from(n.num_queues / 2).max(1);
        // As the original: no TAP named, a new one the kernel names from "vmtap%d"; an
        // existing TAP keeps its addresses. With descriptors (`fd=`, a restore's `net_fds`),
        // the caller's TAP, as the caller set it up.
        let name = n.tap.as_deref().unwrap_or("vmtap%d");
        let (existed, taps) = match &n.fds {
            Some(fds) => {
                n.fds_usable().map_err(err)?;
                (
                    true,
                    net_util::Tap::from_fds(fds).map_err(|e| err(e.to_string()))?,
                )
            }
            None => (
                net_util::Tap::exists(name),
                net_util::Tap::open(name, pairs).map_err(|e| err(e.to_string()))?,
            ),
        };
        let tap = &taps[0];
        match (n.ip, n.mask) {
            (Some(IpAddr::V4(ip)), Some(IpAddr::V4(mask))) if !existed => {
                tap.set_ip(ip, mask).map_err(|e| err(e.to_string()))?
            }
            (Some(IpAddr::V6(ip)), Some(IpAddr::V6(mask))) if !existed => {
                // The configuration checked that the mask is contiguous.
                let prefix = u128::from(mask).leading_ones() as u8;
                tap.set_ipv6(ip, prefix).map_err(|e| err(e.to_string()))?
            }
            (Some(_), _) if existed => {
                log::warn!(
                    "--net: TAP {} exists; its addresses are left as they are",
                    tap.name()
                )
            }
            // The configuration refuses an address without its mask, or of two families.
            _ => {}
        }
        if let Some(m) = &n.host_mac {
            let m: net_util::MacAddr = m
                .parse()
                .map_err(|e: net_util::MacParseError| err(e.to_string()))?;
            tap.set_mac(m).map_err(|e| err(e.to_string()))?;
        }
        if let Some(mtu) = n.mtu {
            tap.set_mtu(mtu).map_err(|e| err(e.to_string()))?;
        }
        if n.fds.is_none() {
            tap.enable().map_err(|e| err(e.to_string()))?;
        }
        let mac = match &n.mac {
            Some(m) => m
                .parse()
                .map_err(|e: net_util::MacParseError| err(e.to_string()))?,
            None => net_util::MacAddr::random_local(),
        };
        let host_side = match (n.ip, n.mask) {
            (Some(ip), Some(mask)) => format!("{ip}/{mask}"),
            _ => "no address".into(),
        };
        info!(
            "--net: TAP {} ({host_side}), {pairs} queue pair(s), guest MAC {mac}",
            tap.name()
        );
        let config = virtio_devices::NetConfig {
            mac,
            mtu: n.mtu.unwrap_or(1500),
            queue_size: n.queue_size,
            offloads: virtio_devices::NetOffloads {
                csum: n.offload_csum,
                tso: n.offload_tso,
                ufo: n.offload_ufo,
            },
        };
        let dev = Net::new(taps, config).map_err(err)?;
        let id = n.id.clone().unwrap_or_else(|| format!("_net{i}"));
        list.push(Pending {
            option: "--net",
            id,
            slot: n.pci_device_id,
            dev: Box::new(dev),
        });
    }
    let src = File::open(&cfg.rng.src).map_err(|e| PciSetupError::Device {
        option: "--rng",
        value: cfg.rng.src.display().to_string(),
        msg: format!("cannot open: {e}"),
    })?;
    let rng_id = cfg.rng.id.clone().unwrap_or_else(|| "_rng".into());
    list.push(Pending {
        option: "--rng",
        id: rng_id,
        slot: cfg.rng.pci_device_id,
        dev: Box::new(Rng::new(src)),
    });

    // Devices with an explicit slot first, so automatic ones do not take their slot.
    list.sort_by_key(|p| p.slot.is_none());
    let mut r = root.lock().unwrap_or_else(|e| e.into_inner());
    let mut counters: Vec<(String, Arc<dyn devices::DeviceCounters>)> = Vec::new();
    let mut placed = Vec::new();
    let mut transports = Vec::new();
    for Pending {
        option,
        id,
        slot,
        dev,
    } in list
    {
        let err = |msg: String| PciSetupError::Device {
            option,
            value: id.clone(),
            msg,
        };
        let slot = r.next_device_id(slot).map_err(|e| err(e.to_string()))?;
        let addr = bars
            .allocate(
                virtio_devices::VIRTIO_PCI_BAR_SIZE,
                virtio_devices::VIRTIO_PCI_BAR_KIND,
            )
            .map_err(|e| err(e.to_string()))?;
        if let Some(c) = dev.counters() {
            counters.push((id.clone(), c));
        }
        let pdev =
            VirtioPciDevice::new(id.clone(), dev, mem.clone(), vmi.clone(), addr).map_err(err)?;
        let pdev = Arc::new(Mutex::new(pdev));
        r.add_device(slot, pdev.clone())
            .map_err(|e| err(e.to_string()))?;
        info!("PCI 00:{slot:02x}.0: {id} ({option}), BAR0 at {addr:#x}");
        transports.push((id.clone(), slot, pdev));
        placed.push((id, slot));
    }
    drop(r);
    Ok(PciDevices {
        root,
        config_io,
        transports,
        devices_paused: false,
        counters,
        placed,
        disk_image_types,
        disk_locks,
    })
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
            let w = PciWindows::new(ram, bits);
            assert_eq!(w.mmio64, want64, "ram {ram:#x} bits {bits}");
            let host = pci_host(&w);
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
