//! The debug console (`--debug-console`): one x86 I/O port whose writes go to the host byte for
//! byte, the Bochs and QEMU "port E9 hack" that firmware and bare-metal programs print through
//! with one `out` instruction a byte (edk2's debug builds use port 0x402). There is nothing to
//! set up from the guest and no state to save.

use std::io::Write;

use crate::{BusDevice, SerialOutput};

pub struct DebugConsole {
    port: u8,
    out: SerialOutput,
}

impl DebugConsole {
    /// A console at `port` writing to `out`.
    pub fn new(port: u16, out: SerialOutput) -> Self {
        DebugConsole {
            port: port as u8,
            out,
        }
    }
}

impl BusDevice for DebugConsole {
    /// Reads give the port's low byte (0xe9 at the usual port), as Bochs and QEMU answer, so a
    /// guest can tell the console is there.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(self.port);
    }

    /// Every byte written goes out; a failing host side is logged once and then dropped
    /// (`SerialOutput`), never stopping the guest.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let _ = self.out.write(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Broken, Shared};

    #[test]
    fn writes_go_out_and_reads_name_the_port() {
        let sink = Shared::default();
        let mut dev = DebugConsole::new(0xe9, SerialOutput::new(Some(Box::new(sink.clone()))));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        dev.write(0, b"wide");
        assert_eq!(&sink.0.lock().unwrap()[..], b"hi\nwide");
        let mut r = [0u8; 2];
        dev.read(0, &mut r);
        assert_eq!(r, [0xe9, 0xe9]);
    }

    #[test]
    fn a_broken_host_side_does_not_stop_the_guest() {
        let mut dev = DebugConsole::new(0x402, SerialOutput::new(Some(Box::new(Broken))));
        dev.write(0, b"x");
        dev.write(0, b"y");
        let mut r = [0u8; 1];
        dev.read(0, &mut r);
        assert_eq!(r, [0x02]);
    }
}
