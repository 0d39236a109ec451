//! COM1: a 16550A UART (the `vm-superio` model) whose interrupt is an irqfd.

use std::io::{self, Write};

use log::warn;
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Raises the serial IRQ through an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest output goes. `Write` errors (a closed pipe or socket) are logged once and the
/// output dropped afterwards: a vanished reader must not stop the guest.
pub struct SerialOutput {
    sink: Option<Box<dyn Write + Send>>,
}

impl SerialOutput {
    pub fn new(sink: Option<Box<dyn Write + Send>>) -> Self {
        SerialOutput { sink }
    }

    /// Replaces the sink, e.g. when a client connects to the serial socket.
    pub fn set(&mut self, sink: Option<Box<dyn Write + Send>>) {
        self.sink = sink;
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(sink) = self.sink.as_mut() {
            if let Err(e) = sink.write_all(buf).and_then(|_| sink.flush()) {
                warn!("serial output failed, dropping further output: {e}");
                self.sink = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl Serial {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    pub fn output_mut(&mut self) -> &mut SerialOutput {
        self.uart.writer_mut()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives_with_interrupts() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut s = Serial::new(
            irq.try_clone().unwrap(),
            SerialOutput::new(Some(Box::new(out.clone()))),
        );
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Malformed accesses are ignored, not fatal.
        s.write(9, &[1]);
        let mut wide = [0u8; 2];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn a_failing_sink_is_dropped() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = SerialOutput::new(Some(Box::new(Broken)));
        assert_eq!(out.write(b"abc").unwrap(), 3);
        assert!(out.sink.is_none());
    }
}
