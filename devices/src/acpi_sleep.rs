//! The hardware-reduced ACPI sleep control/status and reset register named by the FADT.

use log::{info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiSleepDevice {
    s5_slp_typ: u8,
    reset_value: u8,
    exit_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiSleepDevice {
    /// `s5_slp_typ` is the SLP_TYP the DSDT's `\_S5_` names; `reset_value` the FADT's.
    pub fn new(s5_slp_typ: u8, reset_value: u8, exit_evt: EventFd, reset_evt: EventFd) -> Self {
        AcpiSleepDevice {
            s5_slp_typ,
            reset_value,
            exit_evt,
            reset_evt,
        }
    }
}

impl BusDevice for AcpiSleepDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never asleep (WAK_STS clear).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), 0) = (data.first(), offset) else {
            return;
        };
        let evt = if value == self.reset_value {
            info!("guest requested a reset through ACPI");
            &self.reset_evt
        } else if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_slp_typ
        {
            info!("guest requested power-off through ACPI (S5)");
            &self.exit_evt
        } else {
            return;
        };
        if let Err(e) = evt.write(1) {
            warn!("acpi: cannot signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (AcpiSleepDevice, EventFd, EventFd) {
        let exit = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = AcpiSleepDevice::new(5, 1, exit.try_clone().unwrap(), reset.try_clone().unwrap());
        (d, exit, reset)
    }

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (mut d, exit, reset) = dev();
        d.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        d.write(0, &[5 << 2]); // no SLP_EN
        assert!(exit.read().is_err());
        d.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.read().unwrap(), 1);
        d.write(0, &[1]);
        assert_eq!(reset.read().unwrap(), 1);
        d.write(1, &[1]);
        assert!(reset.read().is_err());
    }
}
