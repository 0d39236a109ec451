//! Just enough of the i8042 keyboard controller for the guest to reset the machine
//! (command 0xfe on port 0x64), as Linux does with `reboot=k`.

use std::sync::Arc;

use crate::{BusDevice, VmRequests};

const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_PORT_OFFSET: u64 = 4;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Requests;

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
}
