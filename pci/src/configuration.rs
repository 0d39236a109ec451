//! A type-0 configuration space: 4 KiB of registers with per-bit write masks, up to six BARs
//! that answer the all-ones sizing write as the PCI specification says, and a capability list.

use log::warn;
use serde::{Deserialize, Serialize};

use crate::StateError;

/// Bytes of configuration space per function (PCI Express extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
const REGS: usize = CONFIG_SPACE_SIZE / 4;
/// BARs of a type-0 header.
pub const BAR_COUNT: usize = 6;
const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const CAP_PTR_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
const FIRST_CAP: usize = 0x40;
/// Status register bit: the function has a capability list.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Command register bits the guest may change: I/O space, memory space, bus master, INTx
/// disable.
const COMMAND_WRITABLE: u32 = 0x1 | 0x2 | 0x4 | 0x400;
/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY: u32 = 0x2;

/// The `PciConfigurationState` layout this build writes and the only one it restores.
pub const PCI_CONFIG_STATE_VERSION: u32 = 1;

/// A configuration space as the guest left it: every register, so the command register, the
/// BARs as the guest programmed them, the interrupt line and the writable capability fields.
///
/// Restored into a configuration space built for the same device (same IDs, BAR sizes and
/// capabilities); the read-only bits of every register must match it, so a state of another
/// device or configuration is refused. Write masks and BAR sizes are not saved: they come with
/// the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// [`PCI_CONFIG_STATE_VERSION`] when written.
    pub version: u32,
    /// The dwords from offset 0 up to the last non-zero one (at most 1024); the rest are 0.
    pub regs: Vec<u32>,
}

impl PciConfigurationState {
    /// The kind of memory BAR `index` the saved space declares (from its read-only type bits);
    /// `None` for a BAR that is not there or not a memory BAR.
    pub fn bar_kind(&self, index: usize) -> Option<BarKind> {
        let reg = *self.regs.get(BAR0_REG + index)?;
        match reg & 0x7 {
            0x0 if reg != 0 => Some(BarKind::Mem32),
            0x4 => Some(BarKind::Mem64),
            _ => None,
        }
    }
}

/// How a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// 32-bit memory BAR.
    Mem32,
    /// 64-bit memory BAR: uses this register and the next.
    Mem64,
}

/// A BAR as `PciConfiguration::bars` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
}

/// A memory BAR's prefetchable bit.
const BAR_PREFETCHABLE: u32 = 0x8;

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    kind: BarKind,
}

pub struct PciConfiguration {
    regs: Box<[u32; REGS]>,
    wmask: Box<[u32; REGS]>,
    bars: [Option<Bar>; BAR_COUNT],
    /// Where each BAR was last placed: its address after every write that did not leave it
    /// holding the sizing pattern (what `bars()` reports, as the original's device tree).
    placed: [u64; BAR_COUNT],
    /// Offset where the next capability goes; 0 once the standard space is full.
    next_cap: usize,
    /// Offset of the "next" pointer of the last capability (0x34 for the first).
    last_cap_ptr: usize,
}

/// The identity of a function: IDs and class code.
#[derive(Clone, Copy, Debug)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfiguration {
    pub fn new(ids: PciIds) -> Self {
        let mut regs = Box::new([0u32; REGS]);
        let mut wmask = Box::new([0u32; REGS]);
        regs[0] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        regs[2] = u32::from(ids.class) << 24
            | u32::from(ids.subclass) << 16
            | u32::from(ids.prog_if) << 8
            | u32::from(ids.revision);
        regs[11] = u32::from(ids.subsystem) << 16 | u32::from(ids.subsystem_vendor);
        // Memory decoding on: the VMM plays the firmware that assigned the BARs.
        regs[COMMAND_REG] = COMMAND_MEMORY;
        wmask[COMMAND_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch for the OS; no interrupt pin (MSI-X only).
        wmask[INTERRUPT_REG] = 0xff;
        PciConfiguration {
            regs,
            wmask,
            bars: [None; BAR_COUNT],
            placed: [0; BAR_COUNT],
            next_cap: FIRST_CAP,
            last_cap_ptr: CAP_PTR_REG * 4,
        }
    }

    /// Declares BAR `index` of `size` bytes (a power of two, at least 16) at `addr`.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind, addr: u64) {
        let regs_used = if kind == BarKind::Mem64 { 2 } else { 1 };
        assert!(index + regs_used <= BAR_COUNT, "BAR index out of range");
        assert!(size.is_power_of_two() && size >= 16, "bad BAR size");
        assert_eq!(addr & (size - 1), 0, "BAR address not aligned to its size");
        let mask = !(size - 1);
        let reg = BAR0_REG + index;
        match kind {
            BarKind::Mem32 => {
                assert!(addr + size <= 1 << 32, "32-bit BAR above 4 GiB");
                self.regs[reg] = addr as u32;
                self.wmask[reg] = (mask as u32) & !0xf;
            }
            BarKind::Mem64 => {
                self.regs[reg] = (addr as u32) | 0x4;
                self.wmask[reg] = (mask as u32) & !0xf;
                self.regs[reg + 1] = (addr >> 32) as u32;
                self.wmask[reg + 1] = (mask >> 32) as u32;
            }
        }
        self.bars[index] = Some(Bar { size, kind });
        self.placed[index] = addr;
    }

    /// Whether BAR `index` holds the sizing pattern: every address bit of its (low) register
    /// set, as the all-ones write leaves it.
    fn sizing(&self, index: usize) -> bool {
        let reg = BAR0_REG + index;
        self.regs[reg] & self.wmask[reg] == self.wmask[reg]
    }

    /// Notes where the BARs are, after a write that did not leave them being sized.
    fn note_placements(&mut self) {
        for index in 0..BAR_COUNT {
            if let Some((addr, _)) = self.bar(index) {
                if !self.sizing(index) {
                    self.placed[index] = addr;
                }
            }
        }
    }

    /// The address BAR `index` holds now, and its size; `None` for an unused BAR.
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        let bar = self.bars.get(index)?.as_ref()?;
        let low = u64::from(self.regs[BAR0_REG + index] & !0xf);
        let addr = match bar.kind {
            BarKind::Mem32 => low,
            BarKind::Mem64 => low | u64::from(self.regs[BAR0_REG + index + 1]) << 32,
        };
        Some((addr, bar.size))
    }

    /// Every declared BAR: where it was last placed (not the sizing pattern while the guest
    /// sizes it), its size and kind.
    pub fn bars(&self) -> Vec<BarInfo> {
        (0..BAR_COUNT)
            .filter_map(|index| {
                let (_, size) = self.bar(index)?;
                Some(BarInfo {
                    index,
                    addr: self.placed[index],
                    size,
                    kind: self.bars[index]?.kind,
                    prefetchable: self.regs[BAR0_REG + index] & BAR_PREFETCHABLE != 0,
                })
            })
            .collect()
    }

    pub fn memory_enabled(&self) -> bool {
        self.regs[COMMAND_REG] & COMMAND_MEMORY != 0
    }

    pub fn bus_master(&self) -> bool {
        self.regs[COMMAND_REG] & 0x4 != 0
    }

    /// Appends a capability; `bytes[0]` is its ID, `bytes[1]` (the next pointer) is filled in.
    /// Returns its offset, or `None` when the standard 256-byte space is full.
    pub fn add_capability(&mut self, bytes: &[u8]) -> Option<usize> {
        let len = bytes.len().div_ceil(4) * 4;
        if bytes.len() < 2 || self.next_cap == 0 || self.next_cap + len > 256 {
            warn!(
                "no room for PCI capability {:#x}",
                bytes.first().unwrap_or(&0)
            );
            return None;
        }
        let offset = self.next_cap;
        for (i, b) in bytes.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { *b });
        }
        self.set_byte(self.last_cap_ptr, offset as u8);
        self.regs[COMMAND_REG] |= STATUS_CAP_LIST << 16;
        self.last_cap_ptr = offset + 1;
        self.next_cap = offset + len;
        Some(offset)
    }

    fn set_byte(&mut self, offset: usize, v: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | u32::from(v) << shift;
    }

    /// Lets the guest change the bits of `mask` in dword `reg`.
    pub fn set_write_mask(&mut self, reg: usize, mask: u32) {
        if let Some(m) = self.wmask.get_mut(reg) {
            *m = mask;
        }
    }

    /// Sets a register regardless of the write mask (device-side updates).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// Dword `reg`; all ones beyond the space.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(u32::MAX)
    }

    /// A guest write of 1, 2 or 4 bytes at `offset`, inside one dword. Other shapes are ignored.
    /// Returns the dword index that was written.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<usize> {
        let len = data.len();
        if !matches!(len, 1 | 2 | 4) || !offset.is_multiple_of(len) || offset >= CONFIG_SPACE_SIZE {
            return None;
        }
        let reg = offset / 4;
        let shift = (offset % 4) * 8;
        let mut value = [0u8; 4];
        value[..len].copy_from_slice(data);
        let value = u32::from_le_bytes(value) << shift;
        let lane = if len == 4 {
            u32::MAX
        } else {
            ((1u32 << (len * 8)) - 1) << shift
        };
        let mask = self.wmask[reg] & lane;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        if (BAR0_REG..BAR0_REG + BAR_COUNT).contains(&reg) {
            self.note_placements();
        }
        Some(reg)
    }

    /// The registers as they are now.
    pub fn state(&self) -> PciConfigurationState {
        let used = self.regs.iter().rposition(|&r| r != 0).map_or(0, |i| i + 1);
        PciConfigurationState {
            version: PCI_CONFIG_STATE_VERSION,
            regs: self.regs[..used].to_vec(),
        }
    }

    /// Whether `state` can be restored here: its version, its length, and every read-only bit
    /// equal to this space's.
    pub fn check_state(&self, state: &PciConfigurationState) -> Result<(), StateError> {
        const WHAT: &str = "PCI configuration space";
        StateError::check_version(WHAT, state.version, PCI_CONFIG_STATE_VERSION)?;
        if state.regs.len() > REGS {
            return Err(StateError::invalid(
                WHAT,
                format!(
                    "{} registers, a configuration space has {REGS}",
                    state.regs.len()
                ),
            ));
        }
        for (i, (&cur, &mask)) in self.regs.iter().zip(self.wmask.iter()).enumerate() {
            let saved = state.regs.get(i).copied().unwrap_or(0);
            let fixed = !mask;
            if (saved ^ cur) & fixed != 0 {
                return Err(StateError::invalid(
                    WHAT,
                    format!(
                        "register {:#05x} is {saved:#010x}, but this device's read-only bits \
                         there ({fixed:#010x}) are {:#010x}: the state is of another device or \
                         configuration",
                        i * 4,
                        cur & fixed
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Puts the registers back as `state` has them; on an error nothing changes. The caller
    /// makes the MMIO bus follow the BARs (`PciRoot::refresh_bars`).
    pub fn set_state(&mut self, state: &PciConfigurationState) -> Result<(), StateError> {
        self.check_state(state)?;
        for (i, r) in self.regs.iter_mut().enumerate() {
            *r = state.regs.get(i).copied().unwrap_or(0);
        }
        self.note_placements();
        Ok(())
    }

    /// Whether dword `reg` is a BAR or the command register: writes there may move BARs.
    pub fn affects_decoding(reg: usize) -> bool {
        reg == COMMAND_REG || (BAR0_REG..BAR0_REG + BAR_COUNT).contains(&reg)
    }
}

/// Reads `data.len()` bytes at `offset` out of a dword value read from `reg`.
pub fn extract(value: u32, offset: usize, data: &mut [u8]) {
    let shift = (offset % 4) * 8;
    let bytes = (value >> shift).to_le_bytes();
    let n = data.len().min(4 - offset % 4);
    data[..n].copy_from_slice(&bytes[..n]);
    data[n..].fill(0xff);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_space_tells_its_bar_kinds() {
        let mut c = PciConfiguration::new(ids());
        c.add_bar(0, 0x1_0000, BarKind::Mem32, 0xc000_0000);
        c.add_bar(1, 0x1_0000, BarKind::Mem64, 0x1_0000_0000);
        let s = c.state();
        assert_eq!(s.bar_kind(0), Some(BarKind::Mem32));
        assert_eq!(s.bar_kind(1), Some(BarKind::Mem64));
        assert_eq!(s.bar_kind(3), None);
        assert_eq!(s.bar_kind(99), None);
    }

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bar_sizing_with_all_ones() {
        let mut c = PciConfiguration::new(ids());
        c.add_bar(0, 0x4000, BarKind::Mem32, 0xc000_0000);
        c.add_bar(2, 0x10_0000, BarKind::Mem64, 0x1_0000_0000);
        c.write(0x10, &[0xff; 4]);
        assert_eq!(c.read_reg(4), 0xffff_c000);
        // While sized, a BAR is reported where it was placed, not at the pattern.
        assert_eq!(c.bars()[0].addr, 0xc000_0000);
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(c.bar(0), Some((0xc000_0000, 0x4000)));
        assert_eq!(
            c.bars()[0],
            BarInfo {
                index: 0,
                addr: 0xc000_0000,
                size: 0x4000,
                kind: BarKind::Mem32,
                prefetchable: false
            }
        );
        c.write(0x18, &[0xff; 4]);
        c.write(0x1c, &[0xff; 4]);
        assert_eq!(c.read_reg(6), 0xfff0_0004);
        assert_eq!(c.read_reg(7), 0xffff_ffff);
        assert_eq!(c.bars()[1].addr, 0x1_0000_0000);
        c.write(0x18, &0x20_0000u32.to_le_bytes());
        c.write(0x1c, &2u32.to_le_bytes());
        assert_eq!(c.bar(2), Some((0x2_0020_0000, 0x10_0000)));
        // Moved by the guest: reported at its new place.
        assert_eq!(c.bars()[1].addr, 0x2_0020_0000);
        // Unused BARs read 0 and ignore writes.
        c.write(0x14, &[0xff; 4]);
        assert_eq!(c.read_reg(5), 0);
        assert_eq!(c.bar(1), None);
        assert_eq!(c.bar(9), None);
    }

    #[test]
    fn read_only_fields_and_odd_writes() {
        let mut c = PciConfiguration::new(ids());
        c.write(0, &[0; 4]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write(4, &[0xff, 0xff]);
        assert_eq!(c.read_reg(1) & 0xffff, 0x7 | 0x400);
        assert!(c.write(3, &[0; 2]).is_none());
        assert!(c.write(4094, &[0; 4]).is_none());
        assert!(c.write(0x1000, &[0]).is_none());
        assert_eq!(c.read_reg(2000), u32::MAX);
        c.write(0x3c, &[0x0b]);
        assert_eq!(c.read_reg(15) & 0xff, 0x0b);
    }

    #[test]
    fn capability_list() {
        let mut c = PciConfiguration::new(ids());
        let a = c.add_capability(&[0x09, 0xaa, 16, 1]).unwrap();
        let b = c.add_capability(&[0x11, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(c.read_reg(13) & 0xff, 0x40);
        assert_eq!(c.read_reg(0x40 / 4), 0x0110_4409);
        assert_eq!((c.read_reg(0x44 / 4) >> 8) & 0xff, 0);
        assert_ne!(c.read_reg(1) & (STATUS_CAP_LIST << 16), 0);
        while c.add_capability(&[9; 40]).is_some() {}
    }

    #[test]
    fn extract_bytes() {
        let mut b = [0u8; 2];
        extract(0x1234_5678, 2, &mut b);
        assert_eq!(b, [0x34, 0x12]);
        let mut b = [0u8; 4];
        extract(0x1234_5678, 3, &mut b);
        assert_eq!(b, [0x12, 0xff, 0xff, 0xff]);
    }
}
