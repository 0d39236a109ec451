//! The hardware-reduced ACPI sleep control/status and reset register named by the FADT.

use std::sync::Arc;

use log::info;
use serde::{Deserialize, Serialize};

use crate::state::check_version;
use crate::{BusDevice, StateError, Stateful, VmRequests};

/// The `AcpiSleepState` layout this build writes and the only one it restores.
pub const ACPI_SLEEP_STATE_VERSION: u32 = 1;

/// The sleep/reset register's state: nothing the guest can see (it reads 0, and the writes it
/// acts on power off or reset the machine; the S5 type and the reset value are configuration,
/// given again to the device a restore starts from), so only the version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiSleepState {
    /// [`ACPI_SLEEP_STATE_VERSION`] when written.
    pub version: u32,
}

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

impl Stateful for AcpiSleepDevice {
    const NAME: &'static str = "acpi-sleep";
    type State = AcpiSleepState;

    fn state(&self) -> AcpiSleepState {
        AcpiSleepState {
            version: ACPI_SLEEP_STATE_VERSION,
        }
    }

    fn restore(&mut self, state: &AcpiSleepState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, ACPI_SLEEP_STATE_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip, Requests};

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

    /// Restored, the register reads as the saved one and still powers off and resets.
    #[test]
    fn state_round_trip() {
        let req = Arc::new(Requests::default());
        let mut d = AcpiSleepDevice::new(5, 1, req.clone());
        d.write(0, &[(3 << 2) | SLP_EN]);
        let state = json_round_trip(&d);
        let mut fresh = AcpiSleepDevice::new(5, 1, req.clone());
        fresh.restore(&state).unwrap();
        let (mut a, mut b) = ([0xaau8], [0x55u8]);
        d.read(0, &mut a);
        fresh.read(0, &mut b);
        assert_eq!(a, b);
        fresh.write(0, &[(5 << 2) | SLP_EN]);
        fresh.write(0, &[1]);
        assert_eq!(req.take(), (1, 1));
        check_refusals(&mut fresh);
        assert_eq!(req.take(), (0, 0), "refused states requested nothing");
    }
}
