//! A Generic Event Device (ACPI0013): one I/O register holding pending event bits, and an
//! interrupt. The VMM sets a bit and raises the interrupt; the guest's `_EVT` method (in the
//! DSDT) reads the register, which clears it, and notifies the matching ACPI device.

use log::{log, Level};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

/// Event bit: the power button was pressed (`_EVT` notifies `\_SB_.PWRB`).
pub const GED_POWER_BUTTON: u8 = 1 << 0;
/// Event bit: the VMM wrote a new VM generation ID (`crate::vmgenid`); `_EVT` notifies
/// `\_SB_.VGEN`, and the guest re-reads the ID.
pub const GED_VMGENID: u8 = 1 << 1;
/// Event bit: PCI devices were added or their removal is requested (`_EVT` calls
/// `\_SB_.PHPR.PSCN`, which reads the hotplug controller's bitmaps: `crate::pci_hotplug`).
pub const GED_PCI_HOTPLUG: u8 = 1 << 2;
/// Event bit: CPUs were added or their removal is requested (`_EVT` calls
/// `\_SB_.CPUS.CSCN`, which walks the CPU hotplug controller: `crate::cpu_hotplug`).
pub const GED_CPU_HOTPLUG: u8 = 1 << 3;
/// Event bit: memory was hot-plugged (`_EVT` calls `\_SB_.MHPC.MSCN`, which walks the memory
/// hotplug controller's slots: `crate::memory_hotplug`).
pub const GED_MEMORY_HOTPLUG: u8 = 1 << 4;
/// Every event bit the device (and the DSDT's `_EVT`) knows.
pub const GED_EVENTS: u8 =
    GED_POWER_BUTTON | GED_VMGENID | GED_PCI_HOTPLUG | GED_CPU_HOTPLUG | GED_MEMORY_HOTPLUG;

/// The `GedState` layout this build writes and the only one it restores.
pub const GED_STATE_VERSION: u32 = 1;

/// The GED's state: the events latched and not yet read by the guest.
///
/// The interrupt that announced them is not here: it went through the irqfd into the in-kernel
/// irqchip when it was raised, and the VM's irqchip and LAPIC state carry it, so a restore does
/// not raise it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GedState {
    /// [`GED_STATE_VERSION`] when written.
    pub version: u32,
    /// Pending event bits, of [`GED_EVENTS`].
    pub pending: u8,
}

pub struct Ged {
    irq: EventFd,
    pending: u8,
    /// Guest writes ignored so far: only the first is logged as a warning, so that a guest
    /// writing the port in a loop cannot flood the VMM's log.
    ignored_writes: u64,
}

impl Ged {
    /// `irq` is an irqfd wired to the GSI the DSDT gives the device.
    pub fn new(irq: EventFd) -> Self {
        Ged {
            irq,
            pending: 0,
            ignored_writes: 0,
        }
    }

    /// Latches `events` and interrupts the guest.
    pub fn notify(&mut self, events: u8) -> std::io::Result<()> {
        self.pending |= events;
        self.irq.write(1)
    }
}

impl Ged {
    /// How to log the guest write being ignored now: a warning the first time, debug after.
    fn ignored_write_level(&mut self) -> Level {
        self.ignored_writes += 1;
        if self.ignored_writes == 1 {
            Level::Warn
        } else {
            Level::Debug
        }
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = std::mem::take(&mut self.pending);
            }
        }
    }

    fn write(&mut self, offset: u64, _data: &[u8]) {
        log!(
            self.ignored_write_level(),
            "GED: ignored write at offset {offset} (only the first is a warning)"
        );
    }
}

impl Stateful for Ged {
    const NAME: &'static str = "ged";
    type State = GedState;

    fn state(&self) -> GedState {
        GedState {
            version: GED_STATE_VERSION,
            pending: self.pending,
        }
    }

    /// Refuses event bits this build does not know (its `_EVT` would not act on them).
    fn restore(&mut self, state: &GedState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, GED_STATE_VERSION)?;
        if state.pending & !GED_EVENTS != 0 {
            return Err(invalid(
                Self::NAME,
                format!(
                    "pending events {:#04x} include bits this build does not know (it knows {GED_EVENTS:#04x})",
                    state.pending
                ),
            ));
        }
        self.pending = state.pending;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip};

    #[test]
    fn read_returns_and_clears_pending_events() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        let mut b = [0xffu8];
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "nothing pending at start");
        assert!(irq.read().is_err(), "no interrupt at start");

        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1, "one interrupt raised");
        ged.read(0, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "reading clears the event");

        let mut wide = [0xffu8; 4];
        ged.notify(GED_POWER_BUTTON).unwrap();
        ged.read(0, &mut wide);
        assert_eq!(wide, [GED_POWER_BUTTON, 0, 0, 0]);
        ged.write(0, &[0xff]);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "writes do not set events");
    }

    /// A guest writing the port in a loop (the hostile guest suite does) gets one warning in
    /// the log, not one per write; the writes change nothing.
    #[test]
    fn a_write_storm_is_warned_about_once() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        assert_eq!(ged.ignored_write_level(), Level::Warn);
        for _ in 0..10_000 {
            assert_eq!(ged.ignored_write_level(), Level::Debug);
        }
        for v in 0..=255u8 {
            ged.write(0, &[v]);
            ged.write(1, &[v, v]);
        }
        let mut b = [0xffu8];
        ged.read(0, &mut b);
        assert_eq!(b[0], 0, "writes set no event");
        assert!(irq.read().is_err(), "writes raise no interrupt");
    }

    /// A power-button press the guest has not read yet survives a save and restore: the
    /// restored device gives the event once, as the original would have; the restore itself
    /// raises no interrupt (the irqchip's state has it).
    #[test]
    fn pending_event_survives_a_restore() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let state = json_round_trip(&ged);
        assert_eq!(state.pending, GED_POWER_BUTTON);

        let fresh_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut fresh = Ged::new(fresh_irq.try_clone().unwrap());
        fresh.restore(&state).unwrap();
        assert!(
            fresh_irq.read().is_err(),
            "no interrupt raised by a restore"
        );
        for _ in 0..2 {
            let (mut a, mut b) = ([0xaau8], [0x55u8]);
            ged.read(0, &mut a);
            fresh.read(0, &mut b);
            assert_eq!(a, b);
        }
        assert_eq!(fresh.state(), ged.state());
        assert_eq!(fresh.state().pending, 0, "read once, then cleared");

        // Unknown event bits are refused, and the device is left as it was.
        fresh.notify(GED_POWER_BUTTON).unwrap();
        for pending in [0x20, 0x80, 0xff, GED_EVENTS | 0x20] {
            let e = fresh
                .restore(&GedState {
                    version: GED_STATE_VERSION,
                    pending,
                })
                .unwrap_err();
            assert!(
                matches!(e, StateError::Invalid { device: "ged", .. }),
                "{e}"
            );
            assert_eq!(fresh.state().pending, GED_POWER_BUTTON);
        }
        check_refusals(&mut fresh);
    }

    #[test]
    fn vmgenid_event_is_known_and_read_with_the_power_button() {
        assert_eq!(GED_VMGENID, 0x02);
        assert_eq!(GED_PCI_HOTPLUG, 0x04);
        assert_eq!(GED_CPU_HOTPLUG, 0x08);
        assert_eq!(
            GED_EVENTS,
            GED_POWER_BUTTON | GED_VMGENID | GED_PCI_HOTPLUG | GED_CPU_HOTPLUG | GED_MEMORY_HOTPLUG
        );
        assert_eq!(GED_MEMORY_HOTPLUG, 0x10);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.notify(GED_VMGENID).unwrap();
        ged.notify(GED_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 2, "one interrupt per event");
        // Both latched events come back in one read, which clears them.
        let state = json_round_trip(&ged);
        assert_eq!(state.pending, GED_POWER_BUTTON | GED_VMGENID);
        let mut b = [0u8];
        ged.read(0, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON | GED_VMGENID);
        ged.read(0, &mut b);
        assert_eq!(b[0], 0);

        // A pending generation-ID event is accepted by a restore and read once after it.
        let mut fresh = Ged::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        for pending in [GED_VMGENID, GED_EVENTS] {
            fresh
                .restore(&GedState {
                    version: GED_STATE_VERSION,
                    pending,
                })
                .unwrap();
            fresh.read(0, &mut b);
            assert_eq!(b[0], pending);
        }
    }
}
