//! The memory hotplug controller the DSDT's `\_SB_.MHPC` describes (the original's register
//! layout, 0x18 bytes of MMIO), for `hotplug_method=acpi`: hot-plugged memory comes as "DIMM"
//! slots, each a guest-physical range the guest finds with the `Mxxx` (PNP0C80) device's `_CRS`.
//!
//! | offset | size | guest read | guest write |
//! |---|---|---|---|
//! | 0x00 | 4 | `MHBL`: the selected slot's base, low half | `MSEL`: select a slot |
//! | 0x04 | 4 | `MHBH`: base, high half | ignored |
//! | 0x08 | 4 | `MHLL`: length, low half | ignored |
//! | 0x0c | 4 | `MHLH`: length, high half | ignored |
//! | 0x10 | 4 | `MHPX`: proximity domain (0) | ignored |
//! | 0x14 | 1 | bit 0 `MEN_` (present), bit 1 `MINS` (being inserted), bit 2 `MRMV` | a 1 in `MINS` or `MRMV` acknowledges it; bit 3 `MEJ0` (eject) is refused: memory cannot be taken back |

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

/// Bytes of MMIO the controller decodes.
pub const MEMORY_HOTPLUG_SIZE: u64 = 0x18;
/// How many DIMM slots there are (each `vm.resize` up takes one).
pub const MEMORY_HOTPLUG_SLOTS: usize = 16;
pub const MSEL_OFFSET: u64 = 0x00;
pub const MHBL_OFFSET: u64 = 0x00;
pub const MHBH_OFFSET: u64 = 0x04;
pub const MHLL_OFFSET: u64 = 0x08;
pub const MHLH_OFFSET: u64 = 0x0c;
pub const MHPX_OFFSET: u64 = 0x10;
pub const STATUS_OFFSET: u64 = 0x14;
pub const MEN: u8 = 1 << 0;
pub const MINS: u8 = 1 << 1;
pub const MRMV: u8 = 1 << 2;
pub const MEJ0: u8 = 1 << 3;

/// The `MemoryHotplugState` layout this build writes and the only one it restores.
pub const MEMORY_HOTPLUG_STATE_VERSION: u32 = 1;

/// One DIMM slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimm {
    pub base: u64,
    pub size: u64,
    /// Reported in `MINS` until the guest acknowledges it.
    pub inserting: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugState {
    /// [`MEMORY_HOTPLUG_STATE_VERSION`] when written.
    pub version: u32,
    pub selected: u32,
    /// The slots in use, in order (slot `i` is `dimms[i]`).
    pub dimms: Vec<Dimm>,
}

#[derive(Default)]
pub struct MemoryHotplug {
    selected: u32,
    dimms: Vec<Dimm>,
}

impl MemoryHotplug {
    /// A controller whose first slots hold `present` (plugged before the guest boots: not
    /// reported as inserting).
    pub fn new(present: &[(u64, u64)]) -> Self {
        MemoryHotplug {
            selected: 0,
            dimms: present
                .iter()
                .map(|&(base, size)| Dimm {
                    base,
                    size,
                    inserting: false,
                })
                .collect(),
        }
    }

    /// Puts a DIMM of `size` bytes at `base` in the next slot: the guest's next scan reports
    /// it. `None` when every slot is taken.
    pub fn insert(&mut self, base: u64, size: u64) -> Option<usize> {
        if self.dimms.len() >= MEMORY_HOTPLUG_SLOTS {
            return None;
        }
        self.dimms.push(Dimm {
            base,
            size,
            inserting: true,
        });
        Some(self.dimms.len() - 1)
    }

    /// The DIMMs, as `(base, size)`.
    pub fn dimms(&self) -> Vec<(u64, u64)> {
        self.dimms.iter().map(|d| (d.base, d.size)).collect()
    }

    /// Whether another DIMM fits.
    pub fn slot_free(&self) -> bool {
        self.dimms.len() < MEMORY_HOTPLUG_SLOTS
    }
}

impl BusDevice for MemoryHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(d) = self.dimms.get(self.selected as usize).copied() else {
            return;
        };
        let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
        let value = match (offset, data.len()) {
            (MHBL_OFFSET, 4) => half(d.base, false),
            (MHBH_OFFSET, 4) => half(d.base, true),
            (MHLL_OFFSET, 4) => half(d.size, false),
            (MHLH_OFFSET, 4) => half(d.size, true),
            (MHPX_OFFSET, 4) => 0,
            (STATUS_OFFSET, 1) => {
                data[0] = MEN | if d.inserting { MINS } else { 0 };
                return;
            }
            _ => {
                debug!("memory hotplug: {}-byte read at {offset:#x}", data.len());
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (MSEL_OFFSET, 4) => {
                self.selected = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            (STATUS_OFFSET, 1) => {
                let slot = self.selected;
                let Some(d) = self.dimms.get_mut(slot as usize) else {
                    warn!("memory hotplug: slot {slot} selected, which is empty");
                    return;
                };
                if data[0] & MINS != 0 {
                    d.inserting = false;
                }
                if data[0] & MEJ0 != 0 {
                    warn!("memory hotplug: the guest ejects slot {slot}: memory cannot be removed, refused");
                }
            }
            _ => debug!(
                "memory hotplug: {}-byte write at {offset:#x} ignored",
                data.len()
            ),
        }
    }
}

impl Stateful for MemoryHotplug {
    const NAME: &'static str = "memory-hotplug";
    type State = MemoryHotplugState;

    fn state(&self) -> MemoryHotplugState {
        MemoryHotplugState {
            version: MEMORY_HOTPLUG_STATE_VERSION,
            selected: self.selected,
            dimms: self.dimms.clone(),
        }
    }

    fn restore(&mut self, state: &MemoryHotplugState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, MEMORY_HOTPLUG_STATE_VERSION)?;
        if state.dimms.len() > MEMORY_HOTPLUG_SLOTS {
            return Err(invalid(
                Self::NAME,
                format!(
                    "{} DIMMs, at most {MEMORY_HOTPLUG_SLOTS}",
                    state.dimms.len()
                ),
            ));
        }
        // The VM's memory slots were built from the same list (the VMM checks it): only the
        // inserting flags and the selection can differ.
        if self.dimms()
            != state
                .dimms
                .iter()
                .map(|d| (d.base, d.size))
                .collect::<Vec<_>>()
        {
            return Err(invalid(
                Self::NAME,
                "the DIMMs are not the ones this VM's memory was built with",
            ));
        }
        self.selected = state.selected;
        self.dimms = state.dimms.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip};

    fn select(d: &mut MemoryHotplug, slot: u32) {
        d.write(MSEL_OFFSET, &slot.to_le_bytes());
    }

    fn read32(d: &mut MemoryHotplug, offset: u64) -> u32 {
        let mut b = [0xffu8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn status(d: &mut MemoryHotplug) -> u8 {
        let mut b = [0xffu8];
        d.read(STATUS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn slots_report_base_length_and_insertion() {
        let mut d = MemoryHotplug::new(&[(0x1_0000_0000, 128 << 20)]);
        select(&mut d, 0);
        assert_eq!(
            status(&mut d),
            MEN,
            "plugged at boot: present, not inserting"
        );
        assert_eq!(read32(&mut d, MHBL_OFFSET), 0);
        assert_eq!(read32(&mut d, MHBH_OFFSET), 1);
        assert_eq!(read32(&mut d, MHLL_OFFSET), 128 << 20);
        assert_eq!(read32(&mut d, MHLH_OFFSET), 0);
        assert_eq!(d.insert(0x1_0800_0000, 0x2_0000_0000), Some(1));
        select(&mut d, 1);
        assert_eq!(status(&mut d), MEN | MINS);
        assert_eq!(read32(&mut d, MHBL_OFFSET), 0x0800_0000);
        assert_eq!(read32(&mut d, MHLH_OFFSET), 2);
        d.write(STATUS_OFFSET, &[MINS]);
        assert_eq!(status(&mut d), MEN, "acknowledged");
        // Ejection is refused: still there.
        d.write(STATUS_OFFSET, &[MEJ0]);
        assert_eq!(status(&mut d), MEN);
        // An empty slot reads as nothing.
        select(&mut d, 2);
        assert_eq!(status(&mut d), 0);
        assert_eq!(read32(&mut d, MHLL_OFFSET), 0);
        d.write(STATUS_OFFSET, &[MINS | MEJ0]);
        assert_eq!(
            d.dimms(),
            vec![(0x1_0000_0000, 128 << 20), (0x1_0800_0000, 0x2_0000_0000)]
        );
    }

    #[test]
    fn slots_run_out() {
        let mut d = MemoryHotplug::new(&[]);
        for i in 0..MEMORY_HOTPLUG_SLOTS as u64 {
            assert!(d.slot_free());
            assert_eq!(d.insert(i << 27, 1 << 27), Some(i as usize));
        }
        assert!(!d.slot_free());
        assert_eq!(d.insert(1 << 40, 1 << 27), None);
    }

    #[test]
    fn state_round_trips_and_other_dimms_are_refused() {
        let mut d = MemoryHotplug::new(&[(1 << 32, 1 << 27)]);
        d.insert(1 << 33, 1 << 28);
        let s = json_round_trip(&d);
        let mut e = MemoryHotplug::new(&[(1 << 32, 1 << 27), (1 << 33, 1 << 28)]);
        e.restore(&s).unwrap();
        assert_eq!(e.state(), s);
        check_refusals(&mut e);
        let mut other = MemoryHotplug::new(&[(1 << 32, 1 << 27)]);
        assert!(other.restore(&s).is_err(), "another list of DIMMs");
    }
}
