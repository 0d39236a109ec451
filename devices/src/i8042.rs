//! Just enough of the i8042 keyboard controller for the guest to reset the machine
//! (command 0xfe on port 0x64), as Linux does with `reboot=k`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::state::check_version;
use crate::{BusDevice, StateError, Stateful, VmRequests};

const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_PORT_OFFSET: u64 = 4;

/// The `I8042State` layout this build writes and the only one it restores.
pub const I8042_STATE_VERSION: u32 = 1;

/// The i8042's state: nothing the guest can see (its reads are constant and the one command it
/// acts on resets the machine), so only the version. A model with a keyboard or a command byte
/// would carry them in a new version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// [`I8042_STATE_VERSION`] when written.
    pub version: u32,
}

pub struct I8042 {
    vm: Arc<dyn VmRequests>,
}

impl I8042 {
    pub fn new(vm: Arc<dyn VmRequests>) -> Self {
        I8042 { vm }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == STATUS_PORT_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.vm.reset();
        }
    }
}

impl Stateful for I8042 {
    const NAME: &'static str = "i8042";
    type State = I8042State;

    fn state(&self) -> I8042State {
        I8042State {
            version: I8042_STATE_VERSION,
        }
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, I8042_STATE_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip, Requests};

    #[test]
    fn only_the_reset_command_resets() {
        let req = Arc::new(Requests::default());
        let mut dev = I8042::new(req.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(4, &[0xad]);
        assert_eq!(req.take(), (0, 0), "no reset yet");
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(req.take(), (0, 1));
    }

    /// Restored, the device reads as the saved one and still resets the machine.
    #[test]
    fn state_round_trip() {
        let req = Arc::new(Requests::default());
        let mut dev = I8042::new(req.clone());
        dev.write(4, &[0xad]);
        let state = json_round_trip(&dev);
        assert_eq!(
            state,
            I8042State {
                version: I8042_STATE_VERSION
            }
        );
        let mut fresh = I8042::new(req.clone());
        fresh.restore(&state).unwrap();
        for offset in [0, 4] {
            let (mut a, mut b) = ([0xaau8], [0x55u8]);
            dev.read(offset, &mut a);
            fresh.read(offset, &mut b);
            assert_eq!(a, b, "offset {offset}");
        }
        fresh.write(4, &[CMD_RESET_CPU]);
        assert_eq!(req.take(), (0, 1));
        check_refusals(&mut fresh);
        assert_eq!(req.take(), (0, 0), "refused states requested nothing");
    }
}
