//! The CPU hotplug controller the DSDT's `\_SB_.PRES` describes (the original's register
//! layout), 12 bytes of MMIO:
//!
//! | offset | size | name | guest read | guest write |
//! |---|---|---|---|---|
//! | 0 | 4 | `CSEL` | the selected CPU | select a CPU |
//! | 4 | 1 | flags | bit 0 `CPEN`: present; bit 1 `CINS`: being inserted; bit 2 `CRMV`: removal requested | a 1 in `CINS` or `CRMV` acknowledges it; a 1 in bit 3 (`CEJ0`) ejects the CPU |
//! | 5 | 1 | `CCMD` | 0 | ignored |
//! | 8 | 4 | `CDAT` | 0 | ignored |
//!
//! The VMM marks CPUs with [`CpuHotplug::insert`] and [`CpuHotplug::request_removal`] and
//! raises the GED's CPU event; the guest's `CSCN` walks the CPUs, notifies those inserting (1)
//! or to remove (3) and acknowledges them; `_EJ0` (`CEJ0`) ejects, which this device passes to
//! its [`CpuEjectSink`] and which it refuses for CPU 0 and for CPUs whose removal the host did
//! not ask.

use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

/// Bytes of MMIO the controller decodes.
pub const CPU_HOTPLUG_SIZE: u64 = 12;
pub const CSEL_OFFSET: u64 = 0;
pub const FLAGS_OFFSET: u64 = 4;
pub const CPEN: u8 = 1 << 0;
pub const CINS: u8 = 1 << 1;
pub const CRMV: u8 = 1 << 2;
pub const CEJ0: u8 = 1 << 3;

/// The `CpuHotplugState` layout this build writes and the only one it restores.
pub const CPU_HOTPLUG_STATE_VERSION: u32 = 1;

/// Who acts on a guest's CPU ejection: called on the vCPU thread that wrote `CEJ0`, so it
/// should only record it and wake whoever stops the vCPU.
pub trait CpuEjectSink: Send + Sync {
    fn eject_cpu(&self, cpu: u32);
}

/// One CPU as the controller reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuSlot {
    pub present: bool,
    /// Reported in `CINS` until the guest acknowledges it.
    pub inserting: bool,
    /// Reported in `CRMV` until the guest acknowledges it.
    pub removing: bool,
    /// The host asked for the removal and the guest has not ejected yet (an ejection is
    /// refused otherwise).
    pub pending_removal: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuHotplugState {
    /// [`CPU_HOTPLUG_STATE_VERSION`] when written.
    pub version: u32,
    pub selected: u32,
    /// One entry per possible CPU (`max_vcpus`).
    pub cpus: Vec<CpuSlot>,
}

pub struct CpuHotplug {
    selected: u32,
    cpus: Vec<CpuSlot>,
    sink: Arc<dyn CpuEjectSink>,
}

impl CpuHotplug {
    /// `max` possible CPUs, the first `present` of them there from the start.
    pub fn new(max: u32, present: u32, sink: Arc<dyn CpuEjectSink>) -> Self {
        let cpus = (0..max)
            .map(|i| CpuSlot {
                present: i < present,
                ..Default::default()
            })
            .collect();
        CpuHotplug {
            selected: 0,
            cpus,
            sink,
        }
    }

    /// CPU `cpu` is now there: the guest's next scan reports it.
    pub fn insert(&mut self, cpu: u32) {
        if let Some(c) = self.cpus.get_mut(cpu as usize) {
            *c = CpuSlot {
                present: true,
                inserting: true,
                ..Default::default()
            };
        }
    }

    /// The host wants CPU `cpu` gone: the guest's next scan asks it to eject it.
    pub fn request_removal(&mut self, cpu: u32) {
        if let Some(c) = self.cpus.get_mut(cpu as usize).filter(|c| c.present) {
            c.removing = true;
            c.pending_removal = true;
            c.inserting = false;
        }
    }

    /// The CPU left (its vCPU is stopped).
    pub fn removed(&mut self, cpu: u32) {
        if let Some(c) = self.cpus.get_mut(cpu as usize) {
            *c = CpuSlot::default();
        }
    }

    /// How many CPUs are present.
    pub fn present(&self) -> u32 {
        self.cpus.iter().filter(|c| c.present).count() as u32
    }

    /// Whether a removal the host asked for has not been ejected yet.
    pub fn removal_pending(&self) -> bool {
        self.cpus.iter().any(|c| c.pending_removal)
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (CSEL_OFFSET, 4) => data.copy_from_slice(&self.selected.to_le_bytes()),
            (FLAGS_OFFSET, 1) => {
                if let Some(c) = self.cpus.get(self.selected as usize) {
                    data[0] = (if c.present { CPEN } else { 0 })
                        | (if c.inserting { CINS } else { 0 })
                        | (if c.removing { CRMV } else { 0 });
                }
            }
            _ => debug!("CPU hotplug: {}-byte read at offset {offset}", data.len()),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (CSEL_OFFSET, 4) => {
                self.selected = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            (FLAGS_OFFSET, 1) => {
                let cpu = self.selected;
                let Some(c) = self.cpus.get_mut(cpu as usize) else {
                    warn!("CPU hotplug: CPU {cpu} selected, which cannot exist");
                    return;
                };
                let v = data[0];
                if v & CINS != 0 {
                    c.inserting = false;
                }
                if v & CRMV != 0 {
                    c.removing = false;
                }
                if v & CEJ0 != 0 {
                    if cpu != 0 && c.present && c.pending_removal {
                        debug!("CPU hotplug: the guest ejects CPU {cpu}");
                        self.sink.eject_cpu(cpu);
                    } else {
                        warn!("CPU hotplug: the guest ejects CPU {cpu}, whose removal was not asked: refused");
                    }
                }
            }
            _ => debug!(
                "CPU hotplug: {}-byte write at offset {offset} ignored",
                data.len()
            ),
        }
    }
}

impl Stateful for CpuHotplug {
    const NAME: &'static str = "cpu-hotplug";
    type State = CpuHotplugState;

    fn state(&self) -> CpuHotplugState {
        CpuHotplugState {
            version: CPU_HOTPLUG_STATE_VERSION,
            selected: self.selected,
            cpus: self.cpus.clone(),
        }
    }

    fn restore(&mut self, state: &CpuHotplugState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, CPU_HOTPLUG_STATE_VERSION)?;
        if state.cpus.len() != self.cpus.len() {
            return Err(invalid(
                Self::NAME,
                format!(
                    "{} CPUs in the state, {} possible here",
                    state.cpus.len(),
                    self.cpus.len()
                ),
            ));
        }
        if !state.cpus.first().is_some_and(|c| c.present) {
            return Err(invalid(Self::NAME, "CPU 0 must be present"));
        }
        self.selected = state.selected;
        self.cpus = state.cpus.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_util::{check_refusals, json_round_trip};

    #[derive(Default)]
    struct Ejected(Mutex<Vec<u32>>);

    impl CpuEjectSink for Ejected {
        fn eject_cpu(&self, cpu: u32) {
            self.0.lock().unwrap().push(cpu);
        }
    }

    fn select(d: &mut CpuHotplug, cpu: u32) {
        d.write(CSEL_OFFSET, &cpu.to_le_bytes());
    }

    fn flags(d: &mut CpuHotplug, cpu: u32) -> u8 {
        select(d, cpu);
        let mut b = [0xffu8];
        d.read(FLAGS_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn insertion_is_reported_until_acknowledged() {
        let sink = Arc::new(Ejected::default());
        let mut d = CpuHotplug::new(4, 2, sink.clone());
        assert_eq!(
            (flags(&mut d, 0), flags(&mut d, 1), flags(&mut d, 2)),
            (CPEN, CPEN, 0)
        );
        assert_eq!(flags(&mut d, 9), 0, "no such CPU");
        d.insert(2);
        assert_eq!(flags(&mut d, 2), CPEN | CINS);
        d.write(FLAGS_OFFSET, &[CINS]);
        assert_eq!(flags(&mut d, 2), CPEN);
        assert_eq!(d.present(), 3);
        let mut sel = [0u8; 4];
        d.read(CSEL_OFFSET, &mut sel);
        assert_eq!(u32::from_le_bytes(sel), 2);
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[test]
    fn only_requested_removals_are_ejected() {
        let sink = Arc::new(Ejected::default());
        let mut d = CpuHotplug::new(4, 3, sink.clone());
        // Unasked ejections are refused, CPU 0 always.
        select(&mut d, 1);
        d.write(FLAGS_OFFSET, &[CEJ0]);
        select(&mut d, 0);
        d.write(FLAGS_OFFSET, &[CEJ0]);
        assert!(sink.0.lock().unwrap().is_empty());
        d.request_removal(2);
        d.request_removal(3); // not present: nothing to remove
        assert!(d.removal_pending());
        assert_eq!(flags(&mut d, 2), CPEN | CRMV);
        assert_eq!(flags(&mut d, 3), 0);
        // The scan acknowledges, then _EJ0 ejects.
        select(&mut d, 2);
        d.write(FLAGS_OFFSET, &[CRMV]);
        assert_eq!(flags(&mut d, 2), CPEN);
        d.write(FLAGS_OFFSET, &[CEJ0]);
        assert_eq!(*sink.0.lock().unwrap(), vec![2]);
        assert!(d.removal_pending(), "until the VMM has stopped the vCPU");
        d.removed(2);
        assert!(!d.removal_pending());
        assert_eq!(flags(&mut d, 2), 0);
        assert_eq!(d.present(), 2);
    }

    #[test]
    fn state_round_trips_and_bad_states_are_refused() {
        let mut d = CpuHotplug::new(4, 2, Arc::new(Ejected::default()));
        d.insert(2);
        d.request_removal(1);
        let s = json_round_trip(&d);
        let mut e = CpuHotplug::new(4, 1, Arc::new(Ejected::default()));
        e.restore(&s).unwrap();
        assert_eq!(e.state(), s);
        check_refusals(&mut e);
        let mut bad = s.clone();
        bad.cpus.pop();
        assert!(e.restore(&bad).is_err(), "another number of CPUs");
        let mut bad = s.clone();
        bad.cpus[0].present = false;
        assert!(e.restore(&bad).is_err(), "CPU 0 absent");
    }
}
