//! The hardware-reduced ACPI sleep control/status and reset register named by the FADT.

use std::sync::Arc;

use log::info;

use crate::{BusDevice, VmRequests};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

pub struct AcpiSleepDevice {
    s5_slp_typ: u8,
    reset_value: u8,
    vm: Arc<dyn VmRequests>,
}

impl AcpiSleepDevice {
    /// `s5_slp_typ` is the SLP_TYP the DSDT's `\_S5_` names; `reset_value` the FADT's.
    pub fn new(s5_slp_typ: u8, reset_value: u8, vm: Arc<dyn VmRequests>) -> Self {
        AcpiSleepDevice {
            s5_slp_typ,
            reset_value,
            vm,
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
        if value == self.reset_value {
            info!("guest requested a reset through ACPI");
            self.vm.reset();
        } else if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_slp_typ
        {
            info!("guest requested power-off through ACPI (S5)");
            self.vm.power_off();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Requests;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let req = Arc::new(Requests::default());
        let mut d = AcpiSleepDevice::new(5, 1, req.clone());
        d.write(0, &[(3 << 2) | SLP_EN]); // S3: not supported, ignored
        d.write(0, &[5 << 2]); // no SLP_EN
        assert_eq!(req.take(), (0, 0));
        d.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(req.take(), (1, 0));
        d.write(0, &[1]);
        assert_eq!(req.take(), (0, 1));
        d.write(1, &[1]);
        assert_eq!(req.take(), (0, 0));
    }
}
