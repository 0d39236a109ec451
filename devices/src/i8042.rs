//! Just enough of the i8042 keyboard controller for the guest to reset the machine
//! (command 0xfe on port 0x64), as Linux does with `reboot=k`.

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_PORT_OFFSET: u64 = 4;

pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == STATUS_PORT_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset_evt.write(1) {
                warn!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_resets() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(4, &[0xad]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
