//! COM1: a 16550A UART (the `vm-superio` model) whose interrupt is an irqfd.

use std::io::{self, Write};
use std::sync::Arc;

use log::warn;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

/// The `SerialState` layout this build writes and the only one it restores.
pub const SERIAL_STATE_VERSION: u32 = 1;

/// Raises the serial IRQ through an eventfd registered as a KVM irqfd. Shared, so that a
/// restored UART raises the same one.
pub struct EventFdTrigger(Arc<EventFd>);

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
            uart: vm_superio::Serial::new(EventFdTrigger(Arc::new(irq)), out),
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

/// COM1's state: `vm_superio::SerialState` (the 16550A's registers and its receive FIFO), the
/// maintained crate's own model of what a saved UART is, mirrored field for field so that serde
/// can write it. (rust-vmm's serde companion, `vm-superio-ser` 0.4.1, pins `vm-superio` 0.8.1,
/// not the 0.8.2 we use, and brings `versionize`; so the fields are mirrored here, and the
/// conversions below name every one of them, so a field added upstream fails to compile.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    /// [`SERIAL_STATE_VERSION`] when written.
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        let vm_superio::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        } = s;
        SerialState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Stateful for Serial {
    const NAME: &'static str = "serial";
    type State = SerialState;

    fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Rebuilds the UART with `vm_superio::Serial::from_state`, which refuses a FIFO longer than
    /// the UART's and raises the interrupt again if the state has one enabled and pending (the
    /// guest's driver sees at most one spurious interrupt). The output sink and the irqfd stay.
    fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, SERIAL_STATE_VERSION)?;
        let trigger = EventFdTrigger(self.uart.interrupt_evt().0.clone());
        let mut uart = vm_superio::Serial::from_state(
            &state.into(),
            trigger,
            NoEvents,
            SerialOutput::new(None),
        )
        .map_err(|e| match e {
            UartError::FullFifo => invalid(
                Self::NAME,
                format!(
                    "{} received bytes are more than the UART's FIFO holds",
                    state.in_buffer.len()
                ),
            ),
            e => invalid(Self::NAME, format!("raising its pending interrupt: {e}")),
        })?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip, Broken, Shared};

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
        let mut out = SerialOutput::new(Some(Box::new(Broken)));
        assert_eq!(out.write(b"abc").unwrap(), 3);
        assert!(out.sink.is_none());
    }

    /// A guest programs the UART (divisor, 8N1, receive interrupt, modem lines, scratch) and
    /// has read one of three bytes typed at the host: the restored UART, with its own sink and
    /// irqfd, answers the same sequence of reads with the same bytes, raises the pending
    /// receive interrupt on its own irqfd, and writes to its own sink.
    #[test]
    fn state_round_trip() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut s = Serial::new(
            irq.try_clone().unwrap(),
            SerialOutput::new(Some(Box::new(out.clone()))),
        );
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]); // 9600 baud
        s.write(1, &[0x00]);
        s.write(3, &[0x03]); // 8N1
        s.write(1, &[0x01]); // receive interrupt
        s.write(4, &[0x0b]); // DTR, RTS, OUT2
        s.write(7, &[0x5a]);
        s.write(0, b">");
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
        assert_eq!(s.enqueue_input(b"d"), 1);
        while irq.read().is_ok() {}

        let state = json_round_trip(&s);
        assert_eq!(state.in_buffer, b"bcd");
        assert_eq!(state.line_control, 0x03);
        assert_eq!(state.scratch, 0x5a);

        let fresh_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fresh_out = Shared::default();
        let mut fresh = Serial::new(
            fresh_irq.try_clone().unwrap(),
            SerialOutput::new(Some(Box::new(fresh_out.clone()))),
        );
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state);
        assert_eq!(
            fresh_irq.read().unwrap(),
            1,
            "pending receive interrupt raised"
        );
        assert!(irq.read().is_err(), "nothing on the saved UART's irqfd");
        assert_eq!(fresh.input_capacity(), s.input_capacity());

        // The same reads, in the same order, side effects included (IIR and data reads clear).
        let reads: &[u64] = &[2, 2, 5, 1, 3, 4, 6, 7, 0, 5, 0, 0, 5, 0, 2];
        for &offset in reads {
            let (mut a, mut b) = ([0u8], [0u8]);
            s.read(offset, &mut a);
            fresh.read(offset, &mut b);
            assert_eq!(a, b, "offset {offset}");
        }
        for (dev, what) in [(&mut s, "saved"), (&mut fresh, "restored")] {
            dev.write(3, &[0x83]);
            let (mut lo, mut hi) = ([0u8], [0u8]);
            dev.read(0, &mut lo);
            dev.read(1, &mut hi);
            assert_eq!((lo[0], hi[0]), (0x0c, 0x00), "{what} divisor");
            dev.write(3, &[0x03]);
        }
        assert_eq!(fresh.state(), s.state());

        fresh.write(0, b"z");
        assert_eq!(&*fresh_out.0.lock().unwrap(), b"z");
        assert_eq!(
            &*out.0.lock().unwrap(),
            b">",
            "the saved UART's sink is its own"
        );
    }

    #[test]
    fn refuses_a_fifo_longer_than_the_uart_s() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut s = Serial::new(irq, SerialOutput::new(Some(Box::new(out.clone()))));
        s.enqueue_input(b"q");
        let good = s.state();
        let mut full = good.clone();
        full.in_buffer = vec![b'x'; 64];
        s.restore(&full).unwrap();
        assert_eq!(s.input_capacity(), 0);
        s.restore(&good).unwrap();
        for len in [65, 1 << 20] {
            let bad = SerialState {
                in_buffer: vec![b'x'; len],
                ..good.clone()
            };
            let e = s.restore(&bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    StateError::Invalid {
                        device: "serial",
                        ..
                    }
                ),
                "{e}"
            );
            assert_eq!(s.state(), good);
        }
        check_refusals(&mut s);
        s.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!", "the sink survives refusals");
    }
}
