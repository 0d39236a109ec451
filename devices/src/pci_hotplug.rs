//! The PCI hotplug controller the DSDT's `\_SB_.PHPR` describes (the original's register
//! layout): four 32-bit registers in MMIO.
//!
//! | offset | name | guest read | guest write |
//! |---|---|---|---|
//! | 0 | `PCIU` | slots added on the selected segment since the last read (cleared by the read) | ignored |
//! | 4 | `PCID` | slots the host wants removed (cleared by the read) | ignored |
//! | 8 | `B0EJ` | 0 | eject these slots of the selected segment |
//! | 12 | `PSEG` | the selected segment | select a segment |
//!
//! The VMM marks a slot with [`PciHotplug::device_added`] or [`PciHotplug::removal_requested`]
//! and raises the GED's PCI event; the guest's `PSCN` reads the bitmaps and notifies the slot
//! devices; the guest's `_EJ0` writes `B0EJ`, which this device passes to its [`EjectSink`].
//! Each segment has its own bitmaps; `PSEG` selects the one `PCIU`, `PCID` and `B0EJ` act on.

use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

/// Bytes of MMIO the controller decodes.
pub const PCI_HOTPLUG_SIZE: u64 = 16;
/// Register offsets (see the module documentation).
pub const PCIU_OFFSET: u64 = 0;
pub const PCID_OFFSET: u64 = 4;
pub const B0EJ_OFFSET: u64 = 8;
pub const PSEG_OFFSET: u64 = 12;

/// The `PciHotplugState` layout this build writes and the only one it restores.
pub const PCI_HOTPLUG_STATE_VERSION: u32 = 1;

/// Who acts on a guest's ejection: called on the vCPU thread that wrote `B0EJ`, so it should
/// only record the request and wake whoever removes the devices.
pub trait EjectSink: Send + Sync {
    /// The guest ejected the slots whose bits are set in `slots`, on segment `segment`.
    fn eject(&self, segment: u16, slots: u32);
}

/// One segment's slots not yet reported to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentBits {
    /// Slots added and not yet reported (`PCIU`).
    pub up: u32,
    /// Slots whose removal is requested and not yet reported (`PCID`).
    pub down: u32,
}

/// What the guest has not read yet, and its segment selection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciHotplugState {
    /// [`PCI_HOTPLUG_STATE_VERSION`] when written.
    pub version: u32,
    /// Segment 0's slots added and not yet reported (`PCIU`).
    pub up: u32,
    /// Segment 0's slots whose removal is requested and not yet reported (`PCID`).
    pub down: u32,
    /// `PSEG`.
    pub segment: u32,
    /// Segments 1, 2, ...: written only when the VM has more than one (a state without it
    /// has nothing pending on them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentBits>,
}

pub struct PciHotplug {
    /// Pending slots by segment (as many as the VM has).
    bits: Vec<SegmentBits>,
    segment: u32,
    sink: Arc<dyn EjectSink>,
}

impl PciHotplug {
    /// The controller of a VM with `segments` PCI segments (at least 1).
    pub fn new(sink: Arc<dyn EjectSink>, segments: u16) -> Self {
        PciHotplug {
            bits: vec![SegmentBits::default(); usize::from(segments.max(1))],
            segment: 0,
            sink,
        }
    }

    /// A device now sits at `slot` of `segment`: the guest's next scan reports it (a pending
    /// removal request for the slot is withdrawn).
    pub fn device_added(&mut self, segment: u16, slot: u8) {
        let bit = Self::bit(slot);
        if let Some(b) = self.bits.get_mut(usize::from(segment)) {
            b.up |= bit;
            b.down &= !bit;
        }
    }

    /// The host wants the device at `slot` of `segment` gone: the guest's next scan asks it
    /// to eject it.
    pub fn removal_requested(&mut self, segment: u16, slot: u8) {
        if let Some(b) = self.bits.get_mut(usize::from(segment)) {
            b.down |= Self::bit(slot);
        }
    }

    fn bit(slot: u8) -> u32 {
        1u32.checked_shl(u32::from(slot)).unwrap_or(0)
    }

    /// The selected segment's bitmaps, if it exists.
    fn selected(&mut self) -> Option<(u16, &mut SegmentBits)> {
        let segment = u16::try_from(self.segment).ok()?;
        Some((segment, self.bits.get_mut(usize::from(segment))?))
    }
}

fn dword(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            warn!(
                "PCI hotplug: {}-byte read at offset {offset}; registers are 32-bit",
                data.len()
            );
            return;
        }
        // A segment that does not exist has empty bitmaps.
        let value = match offset {
            PCIU_OFFSET => self
                .selected()
                .map_or(0, |(_, b)| std::mem::take(&mut b.up)),
            PCID_OFFSET => self
                .selected()
                .map_or(0, |(_, b)| std::mem::take(&mut b.down)),
            PSEG_OFFSET => self.segment,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(value) = dword(data) else {
            warn!(
                "PCI hotplug: {}-byte write at offset {offset}; registers are 32-bit",
                data.len()
            );
            return;
        };
        match offset {
            B0EJ_OFFSET if value == 0 => {}
            B0EJ_OFFSET => match self.selected() {
                Some((segment, _)) => self.sink.eject(segment, value),
                None => warn!(
                    "PCI hotplug: ejection of slots {value:#x} on segment {}, which does not exist",
                    self.segment
                ),
            },
            PSEG_OFFSET => self.segment = value,
            _ => debug!("PCI hotplug: write of {value:#x} at offset {offset} ignored"),
        }
    }
}

impl Stateful for PciHotplug {
    const NAME: &'static str = "pci-hotplug";
    type State = PciHotplugState;

    fn state(&self) -> PciHotplugState {
        let seg0 = self.bits.first().copied().unwrap_or_default();
        PciHotplugState {
            version: PCI_HOTPLUG_STATE_VERSION,
            up: seg0.up,
            down: seg0.down,
            segment: self.segment,
            segments: self.bits.get(1..).unwrap_or_default().to_vec(),
        }
    }

    fn restore(&mut self, state: &PciHotplugState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, PCI_HOTPLUG_STATE_VERSION)?;
        if (state.up | state.down) & 1 != 0 {
            return Err(invalid(
                Self::NAME,
                "slot 0 of segment 0 (the host bridge) cannot be hotplugged",
            ));
        }
        if state.segments.len() >= self.bits.len() {
            return Err(invalid(
                Self::NAME,
                format!(
                    "the state has {} PCI segments, the VM {}",
                    state.segments.len() + 1,
                    self.bits.len()
                ),
            ));
        }
        let mut bits = vec![SegmentBits::default(); self.bits.len()];
        bits[0] = SegmentBits {
            up: state.up,
            down: state.down,
        };
        bits[1..=state.segments.len()].copy_from_slice(&state.segments);
        self.bits = bits;
        self.segment = state.segment;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_util::{check_refusals, json_round_trip};

    #[derive(Default)]
    struct Ejected(Mutex<Vec<(u16, u32)>>);

    impl EjectSink for Ejected {
        fn eject(&self, segment: u16, slots: u32) {
            self.0.lock().unwrap().push((segment, slots));
        }
    }

    fn read32(d: &mut PciHotplug, offset: u64) -> u32 {
        let mut b = [0xffu8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bitmaps_are_cleared_by_reading() {
        let sink = Arc::new(Ejected::default());
        let mut d = PciHotplug::new(sink.clone(), 1);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 0);
        d.device_added(0, 3);
        d.device_added(0, 5);
        d.removal_requested(0, 2);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 3 | 1 << 5);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 0, "read clears PCIU");
        assert_eq!(read32(&mut d, PCID_OFFSET), 1 << 2);
        assert_eq!(read32(&mut d, PCID_OFFSET), 0, "read clears PCID");
        // Adding a slot withdraws a removal request the guest has not read.
        d.removal_requested(0, 4);
        d.device_added(0, 4);
        assert_eq!(read32(&mut d, PCID_OFFSET), 0);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 4);
        // Narrow accesses read zero and change nothing.
        d.device_added(0, 6);
        let mut b = [0xffu8; 2];
        d.read(PCIU_OFFSET, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 6);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn b0ej_ejects_on_the_selected_segment_only() {
        let sink = Arc::new(Ejected::default());
        let mut d = PciHotplug::new(sink.clone(), 1);
        d.write(B0EJ_OFFSET, &(1u32 << 3).to_le_bytes());
        d.write(B0EJ_OFFSET, &0u32.to_le_bytes());
        d.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read32(&mut d, PSEG_OFFSET), 1);
        d.device_added(0, 7);
        d.device_added(1, 2);
        assert_eq!(read32(&mut d, PCIU_OFFSET), 0, "the VM has no segment 1");
        d.write(B0EJ_OFFSET, &(1u32 << 4).to_le_bytes());
        d.write(PSEG_OFFSET, &0u32.to_le_bytes());
        assert_eq!(read32(&mut d, PCIU_OFFSET), 1 << 7);
        d.write(B0EJ_OFFSET, &[1, 0]);
        assert_eq!(*sink.0.lock().unwrap(), vec![(0, 1 << 3)]);
        assert_eq!(read32(&mut d, B0EJ_OFFSET), 0);
    }

    #[test]
    fn each_segment_has_its_own_bitmaps() {
        let sink = Arc::new(Ejected::default());
        let mut d = PciHotplug::new(sink.clone(), 3);
        d.device_added(0, 4);
        d.device_added(2, 0);
        d.removal_requested(1, 9);
        d.write(PSEG_OFFSET, &2u32.to_le_bytes());
        assert_eq!(read32(&mut d, PCID_OFFSET), 0);
        assert_eq!(
            read32(&mut d, PCIU_OFFSET),
            1,
            "slot 0 exists past segment 0"
        );
        d.write(B0EJ_OFFSET, &1u32.to_le_bytes());
        d.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read32(&mut d, PCIU_OFFSET), 0);
        // Saved and restored mid-way: segment 1's request and segment 0's addition survive.
        let s = json_round_trip(&d);
        assert_eq!(s.segments.len(), 2);
        let mut e = PciHotplug::new(sink.clone(), 3);
        e.restore(&s).unwrap();
        assert_eq!(read32(&mut e, PCID_OFFSET), 1 << 9);
        e.write(PSEG_OFFSET, &0u32.to_le_bytes());
        assert_eq!(read32(&mut e, PCIU_OFFSET), 1 << 4);
        d.write(PSEG_OFFSET, &3u32.to_le_bytes());
        d.write(B0EJ_OFFSET, &2u32.to_le_bytes());
        assert_eq!(*sink.0.lock().unwrap(), vec![(2, 1)]);
        // A VM with fewer segments refuses the state; one without the field reads as empty.
        let mut small = PciHotplug::new(sink.clone(), 2);
        assert!(small.restore(&s).is_err());
        let mut old = s.clone();
        old.segments.clear();
        let mut f = PciHotplug::new(sink, 3);
        f.restore(&old).unwrap();
        f.write(PSEG_OFFSET, &1u32.to_le_bytes());
        assert_eq!(read32(&mut f, PCID_OFFSET), 0);
    }

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        let mut d = PciHotplug::new(Arc::new(Ejected::default()), 1);
        d.device_added(0, 9);
        d.removal_requested(0, 10);
        let s = json_round_trip(&d);
        let mut e = PciHotplug::new(Arc::new(Ejected::default()), 1);
        e.restore(&s).unwrap();
        check_refusals(&mut e);
        let mut bad = s.clone();
        bad.up |= 1;
        assert!(e.restore(&bad).is_err(), "slot 0 refused");
        assert_eq!(read32(&mut e, PCIU_OFFSET), 1 << 9);
        assert_eq!(read32(&mut e, PCID_OFFSET), 1 << 10);
    }
}
