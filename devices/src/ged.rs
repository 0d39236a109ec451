//! A Generic Event Device (ACPI0013): one I/O register holding pending event bits, and an
//! interrupt. The VMM sets a bit and raises the interrupt; the guest's `_EVT` method (in the
//! DSDT) reads the register, which clears it, and notifies the matching ACPI device.

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 0;

pub struct Ged {
    irq: EventFd,
    pending: u8,
}

impl Ged {
    /// `irq` is an irqfd wired to the GSI the DSDT gives the device.
    pub fn new(irq: EventFd) -> Self {
        Ged { irq, pending: 0 }
    }

    /// Latches `events` and interrupts the guest.
    pub fn notify(&mut self, events: u8) -> std::io::Result<()> {
        self.pending |= events;
        self.irq.write(1)
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
        warn!("GED: ignored write at offset {offset}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
