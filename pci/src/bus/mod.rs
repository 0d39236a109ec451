//! Bus 0 of a PCI segment: segment 0's host bridge and the devices, reached through the legacy
//! configuration ports (0xcf8 address, 0xcfc data; segment 0 only) or ECAM, and the VMM's BAR
//! allocator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::configuration::{extract, PciIds};
use crate::{
    BarKind, BarRegion, PciConfiguration, PciConfigurationState, PciDevice, StateError,
    VmInterface, BAR_COUNT, HOST_BRIDGE_DEVICE, HOST_BRIDGE_VENDOR,
};

/// The `PciRootState` layout this build writes and the only one it restores.
pub const PCI_ROOT_STATE_VERSION: u32 = 1;
/// The `PciConfigIoState` layout this build writes and the only one it restores.
pub const PCI_CONFIG_IO_STATE_VERSION: u32 = 1;

/// What the root itself holds: the host bridge's configuration space. Each device on the bus
/// saves its own (with its configuration space and BARs); the root redoes the BAR mappings
/// after they are restored ([`PciRoot::refresh_bars`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// [`PCI_ROOT_STATE_VERSION`] when written.
    pub version: u32,
    pub host_bridge: PciConfigurationState,
}

/// The configuration address register (port 0xcf8): a vCPU may have written it and not yet
/// used the data port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    /// [`PCI_CONFIG_IO_STATE_VERSION`] when written.
    pub version: u32,
    pub address: u32,
}

/// Device numbers on a bus.
pub const DEVICES_PER_BUS: u8 = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    #[error("PCI device id {0} is out of range (1-31; 0-31 on a segment past 0)")]
    BadDeviceId(u8),
    #[error("PCI device id {0} is already in use")]
    DeviceIdInUse(u8),
    #[error("no free PCI device id left on the bus")]
    BusFull,
    #[error("no room left in the PCI MMIO window for a {0:#x}-byte BAR")]
    NoBarSpace(u64),
    #[error("BAR size {0:#x} is not a power of two")]
    BadBarSize(u64),
    #[error("no BAR was allocated at {0:#x}")]
    NotAllocated(u64),
    #[error("no device at PCI device id {0}")]
    NoDevice(u8),
}

/// Hands out naturally aligned ranges from a window, lowest first, and takes them back when a
/// device is unplugged (vm-allocator's interval tree keeps the free ranges).
pub struct BarAllocator {
    /// `None` for an empty window.
    space: Option<AddressAllocator>,
}

impl BarAllocator {
    pub fn new(start: u64, size: u64) -> Self {
        let size = size.min((u64::MAX - start).saturating_add(1));
        BarAllocator {
            space: AddressAllocator::new(start, size).ok(),
        }
    }

    /// A naturally aligned range of `size` bytes (a power of two).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciRootError> {
        if !size.is_power_of_two() {
            return Err(PciRootError::BadBarSize(size));
        }
        let space = self.space.as_mut().ok_or(PciRootError::NoBarSpace(size))?;
        space
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciRootError::NoBarSpace(size))
    }

    /// A range of `size` bytes aligned to `align` (a power of two): device memory that is not
    /// a BAR (virtio-pmem's), whose size need not be a power of two.
    pub fn allocate_aligned(&mut self, size: u64, align: u64) -> Result<u64, PciRootError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(PciRootError::BadBarSize(size));
        }
        let space = self.space.as_mut().ok_or(PciRootError::NoBarSpace(size))?;
        space
            .allocate(size, align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|_| PciRootError::NoBarSpace(size))
    }

    /// Whether `addr` lies in this window.
    fn contains(&self, addr: u64) -> bool {
        self.space
            .as_ref()
            .is_some_and(|s| (s.base()..=s.end()).contains(&addr))
    }

    /// Gives back the range `allocate` returned at `addr`.
    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), PciRootError> {
        let range = addr
            .checked_add(size.saturating_sub(1))
            .and_then(|end| RangeInclusive::new(addr, end).ok())
            .ok_or(PciRootError::NotAllocated(addr))?;
        self.space
            .as_mut()
            .ok_or(PciRootError::NotAllocated(addr))?
            .free(&range)
            .map_err(|_| PciRootError::NotAllocated(addr))
    }
}

/// Where the VMM (playing the firmware) places BARs: 64-bit memory BARs in the 64-bit window,
/// 32-bit ones in the 32-bit window. A 64-bit BAR goes to the 32-bit window only when there is
/// no 64-bit window (a guest physical address space too small for one) or it is full.
pub struct BarWindows {
    mmio32: BarAllocator,
    mmio64: Option<BarAllocator>,
}

impl BarWindows {
    /// Windows are `(start, size)`.
    pub fn new(mmio32: (u64, u64), mmio64: Option<(u64, u64)>) -> Self {
        BarWindows {
            mmio32: BarAllocator::new(mmio32.0, mmio32.1),
            mmio64: mmio64.map(|(start, size)| BarAllocator::new(start, size)),
        }
    }

    /// An address for a BAR of `size` bytes (a power of two) that decodes as `kind`.
    pub fn allocate(&mut self, size: u64, kind: BarKind) -> Result<u64, PciRootError> {
        if kind == BarKind::Mem64 {
            if let Some(m64) = &mut self.mmio64 {
                match m64.allocate(size) {
                    Ok(addr) => return Ok(addr),
                    Err(e) => debug!("64-bit BAR of {size:#x} bytes: {e}; trying below 4 GiB"),
                }
            }
        }
        self.mmio32.allocate(size)
    }

    /// `size` bytes of device memory aligned to `align`, from the 64-bit window only (above
    /// RAM and 4 GiB; `free` gives them back).
    pub fn allocate_memory(&mut self, size: u64, align: u64) -> Result<u64, PciRootError> {
        self.mmio64
            .as_mut()
            .ok_or(PciRootError::NoBarSpace(size))?
            .allocate_aligned(size, align)
    }

    /// Gives back a BAR range `allocate` returned (the device was unplugged).
    pub fn free(&mut self, addr: u64, size: u64) -> Result<(), PciRootError> {
        match &mut self.mmio64 {
            Some(m64) if m64.contains(addr) => m64.free(addr, size),
            _ => self.mmio32.free(addr, size),
        }
    }
}

struct HostBridge(PciConfiguration);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    /// Where each BAR decodes on the MMIO bus now.
    mapped: [Option<u64>; BAR_COUNT],
}

/// Bus 0 of a segment. On segment 0, slot 0 is the host bridge; other segments have none (as
/// the original's), and a device may take their slot 0.
pub struct PciRoot {
    slots: BTreeMap<u8, Slot>,
    vm: Arc<dyn VmInterface>,
    segment: u16,
}

impl PciRoot {
    /// Segment 0's bus, with its host bridge.
    pub fn new(vm: Arc<dyn VmInterface>) -> Self {
        Self::for_segment(vm, 0)
    }

    /// The bus of `segment`: a host bridge at slot 0 on segment 0 only.
    pub fn for_segment(vm: Arc<dyn VmInterface>, segment: u16) -> Self {
        let mut root = PciRoot {
            slots: BTreeMap::new(),
            vm,
            segment,
        };
        if segment != 0 {
            return root;
        }
        let bridge = PciConfiguration::new(PciIds {
            vendor: HOST_BRIDGE_VENDOR,
            device: HOST_BRIDGE_DEVICE,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        root.slots.insert(
            0,
            Slot {
                dev: Arc::new(Mutex::new(HostBridge(bridge))),
                mapped: [None; BAR_COUNT],
            },
        );
        root
    }

    /// The segment this bus belongs to.
    pub fn segment(&self) -> u16 {
        self.segment
    }

    /// Whether slot 0 holds the host bridge (segment 0).
    fn has_bridge(&self) -> bool {
        self.segment == 0
    }

    /// The first slot a device can take.
    fn first_slot(&self) -> u8 {
        u8::from(self.has_bridge())
    }

    /// The device number a new device gets: `wanted`, or the lowest free one.
    pub fn next_device_id(&self, wanted: Option<u8>) -> Result<u8, PciRootError> {
        match wanted {
            Some(id) if id < self.first_slot() || id >= DEVICES_PER_BUS => {
                Err(PciRootError::BadDeviceId(id))
            }
            Some(id) if self.slots.contains_key(&id) => Err(PciRootError::DeviceIdInUse(id)),
            Some(id) => Ok(id),
            None => (self.first_slot()..DEVICES_PER_BUS)
                .find(|id| !self.slots.contains_key(id))
                .ok_or(PciRootError::BusFull),
        }
    }

    /// Plugs `dev` in at device number `id` (function 0) and maps its BARs.
    pub fn add_device(
        &mut self,
        id: u8,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciRootError> {
        let id = self.next_device_id(Some(id))?;
        self.slots.insert(
            id,
            Slot {
                dev,
                mapped: [None; BAR_COUNT],
            },
        );
        self.update_mappings(id);
        Ok(())
    }

    /// Unplugs every device but the host bridge (their BARs stay on the MMIO bus until it is
    /// cleared too). Used when the VM is torn down, so devices release their host resources.
    pub fn remove_all(&mut self) {
        let bridge = self.has_bridge();
        self.slots.retain(|&id, _| bridge && id == 0);
    }

    /// Unplugs the device at `id`: its BARs leave the MMIO bus (they hold the device) and the
    /// slot reads as empty. The caller gets the device back to drop it.
    pub fn remove_device(&mut self, id: u8) -> Result<Arc<Mutex<dyn PciDevice>>, PciRootError> {
        if id < self.first_slot() {
            return Err(PciRootError::BadDeviceId(id));
        }
        let slot = self.slots.remove(&id).ok_or(PciRootError::NoDevice(id))?;
        let mut dev = slot.dev.lock().unwrap_or_else(|e| e.into_inner());
        for (bar, mapped) in slot.mapped.iter().enumerate() {
            if let Some(addr) = *mapped {
                self.vm.unmap_mmio(addr);
                dev.bar_moved(bar, Some(addr), None);
            }
        }
        drop(dev);
        Ok(slot.dev)
    }

    pub fn device_ids(&self) -> Vec<u8> {
        self.slots.keys().copied().collect()
    }

    fn slot(&self, bus: u8, device: u8, function: u8) -> Option<&Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(&device)
    }

    /// Reads `data.len()` bytes at byte `offset` of a function's configuration space; a
    /// missing function reads all ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.slot(bus, device, function) {
            Some(slot) => {
                let value = slot
                    .dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read_config_register(offset / 4);
                extract(value, offset, data);
            }
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        let Some(slot) = self.slot(bus, device, function) else {
            return;
        };
        slot.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_config(offset, data);
        if PciConfiguration::affects_decoding(offset / 4) {
            self.update_mappings(device);
        }
    }

    /// The host bridge's state (devices save their own); `None` on a segment without one,
    /// whose bus holds no state of its own.
    pub fn state(&self) -> Option<PciRootState> {
        if !self.has_bridge() {
            return None;
        }
        let bridge = self.slots.get(&0)?;
        Some(PciRootState {
            version: PCI_ROOT_STATE_VERSION,
            host_bridge: bridge
                .dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config()
                .state(),
        })
    }

    /// Restores the host bridge; on an error nothing changes.
    pub fn set_state(&mut self, state: &PciRootState) -> Result<(), StateError> {
        StateError::check_version("PCI root", state.version, PCI_ROOT_STATE_VERSION)?;
        let bridge = self
            .slots
            .get(&0)
            .filter(|_| self.has_bridge())
            .ok_or_else(|| {
                StateError::invalid(
                    "PCI root",
                    format!("segment {} has no host bridge", self.segment),
                )
            })?;
        bridge
            .dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_mut()
            .set_state(&state.host_bridge)
            .map_err(|e| e.within("PCI host bridge"))
    }

    /// Makes the MMIO bus match every device's BARs and memory-enable bit, after the devices'
    /// configuration spaces were restored (their BARs may be where the guest had moved them, or
    /// decoding off). Each device hears of its moves through `PciDevice::bar_moved` (virtio
    /// moves its notify ioeventfds there). BARs that move are all taken off the bus before any
    /// is put back, so restored BARs that swapped places do not collide with their old selves.
    /// The devices must not be locked by the caller.
    pub fn refresh_bars(&mut self) {
        let ids: Vec<u8> = self.slots.keys().copied().collect();
        for &id in &ids {
            let vm = self.vm.clone();
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            let mut dev = slot.dev.lock().unwrap_or_else(|e| e.into_inner());
            let wanted = Self::wanted(dev.config());
            for (bar, (mapped, wanted)) in slot.mapped.iter_mut().zip(wanted).enumerate() {
                if let Some(old) = *mapped {
                    if wanted != Some(old) {
                        vm.unmap_mmio(old);
                        *mapped = None;
                        dev.bar_moved(bar, Some(old), None);
                    }
                }
            }
        }
        for id in ids {
            self.update_mappings(id);
        }
    }

    /// Where each BAR of `config` should decode now: its address while memory decoding is on
    /// and the address is neither zero nor wrapping (the sizing pattern), otherwise nowhere.
    fn wanted(config: &PciConfiguration) -> [Option<u64>; BAR_COUNT] {
        let enabled = config.memory_enabled();
        std::array::from_fn(|bar| {
            let (addr, size) = config.bar(bar)?;
            let valid = addr != 0 && addr.checked_add(size).is_some();
            (enabled && valid).then_some(addr)
        })
    }

    /// Makes the MMIO bus match the BARs and the memory-enable bit of device `id`.
    fn update_mappings(&mut self, id: u8) {
        let vm = self.vm.clone();
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let mut dev = slot.dev.lock().unwrap_or_else(|e| e.into_inner());
        let wanted_all = Self::wanted(dev.config());
        for (bar, wanted) in wanted_all.into_iter().enumerate() {
            let Some((_, size)) = dev.config().bar(bar) else {
                continue;
            };
            let old = slot.mapped[bar];
            if wanted == old {
                continue;
            }
            if let Some(old) = old {
                vm.unmap_mmio(old);
            }
            let mut new = None;
            if let Some(addr) = wanted {
                let region = Arc::new(Mutex::new(BarRegion {
                    dev: slot.dev.clone(),
                    bar,
                }));
                match vm.map_mmio(region, addr, size) {
                    Ok(()) => new = Some(addr),
                    Err(e) => warn!(
                        "PCI {:04x}:00:{id:02x}.0 BAR{bar} at {addr:#x}: {e}; not mapped",
                        self.segment
                    ),
                }
            }
            debug!(
                "PCI {:04x}:00:{id:02x}.0 BAR{bar}: {old:x?} -> {new:x?}",
                self.segment
            );
            slot.mapped[bar] = new;
            dev.bar_moved(bar, old, new);
        }
    }
}

/// Splits a configuration address (ECAM offset layout) into bus, device, function, register.
fn ecam_decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

fn access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

/// ECAM: 4 KiB of configuration space per function, 1 MiB per bus, on the MMIO bus.
pub struct PciConfigMmio(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        if !access_ok(reg, data.len()) {
            data.fill(0xff);
            return;
        }
        let root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        root.config_read(bus, dev, func, reg, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, dev, func, reg) = ecam_decode(offset);
        if !access_ok(reg, data.len()) {
            debug!("ECAM: ignoring a {}-byte write at {offset:#x}", data.len());
            return;
        }
        let mut root = self.0.lock().unwrap_or_else(|e| e.into_inner());
        root.config_write(bus, dev, func, reg, data);
    }
}

/// ECAM for several segments, as this VMM lays them out: 1 MiB (bus 0 only) per segment, one
/// after the other from segment 0. Past the last segment, reads give all ones.
pub struct PciSegmentsEcam(pub Vec<Arc<Mutex<PciRoot>>>);

impl PciSegmentsEcam {
    /// The bus `offset` falls in, and the offset within its 1 MiB.
    fn target(&self, offset: u64) -> Option<(&Arc<Mutex<PciRoot>>, u64)> {
        let segment = usize::try_from(offset >> 20).ok()?;
        Some((self.0.get(segment)?, offset & 0xf_ffff))
    }
}

impl BusDevice for PciSegmentsEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((root, offset)) = self.target(offset) else {
            data.fill(0xff);
            return;
        };
        PciConfigMmio(root.clone()).read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((root, offset)) = self.target(offset) {
            PciConfigMmio(root.clone()).write(offset, data);
        } else {
            debug!("ECAM: write at {offset:#x}, past the last segment, ignored");
        }
    }
}

/// Configuration mechanism #1: ports 0xcf8-0xcff (address register, then data window).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    pub fn state(&self) -> PciConfigIoState {
        PciConfigIoState {
            version: PCI_CONFIG_IO_STATE_VERSION,
            address: self.address,
        }
    }

    pub fn set_state(&mut self, state: &PciConfigIoState) -> Result<(), StateError> {
        StateError::check_version(
            "PCI configuration ports",
            state.version,
            PCI_CONFIG_IO_STATE_VERSION,
        )?;
        self.address = state.address;
        Ok(())
    }

    /// Bus, device, function and byte offset the address register selects, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = u64::from(self.address);
        let (bus, dev, func) = (
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 7) as u8,
        );
        Some((bus, dev, func, (a & 0xfc) as usize + data_offset as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            return;
        }
        let Some((bus, dev, func, reg)) = self.target(offset - 4) else {
            return;
        };
        if access_ok(reg, data.len()) {
            let root = self.root.lock().unwrap_or_else(|e| e.into_inner());
            root.config_read(bus, dev, func, reg, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        let Some((bus, dev, func, reg)) = self.target(offset - 4) else {
            return;
        };
        if access_ok(reg, data.len()) {
            let mut root = self.root.lock().unwrap_or_else(|e| e.into_inner());
            root.config_write(bus, dev, func, reg, data);
        }
    }
}

#[cfg(test)]
mod tests;
