//! One vsock connection: a guest port joined to a host Unix stream, with the credit of both
//! directions (virtio 1.2, 5.10.6.3).
//!
//! Guest to host: what the guest sends is written to the stream at once; what the stream does
//! not take waits in `to_host`, which the credit we give the guest (`TX_BUF_ALLOC`) bounds. A
//! guest that sends past its credit breaks the protocol and the connection is reset.
//! Host to guest: the stream is read into `to_guest` (at most `RX_BACKLOG` bytes; the stream is
//! not read while it is full), and sent to the guest as its receive buffers and its credit
//! (`buf_alloc - (rx_cnt - fwd_cnt)`) allow.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The guest-to-host buffer we advertise (`buf_alloc`): what the guest may have in flight.
pub const TX_BUF_ALLOC: u32 = 256 * 1024;
/// Host bytes read ahead of the guest's receive buffers, per connection.
pub const RX_BACKLOG: usize = 64 * 1024;
/// Forwarded bytes after which the guest is told our `fwd_cnt` without being asked.
const CREDIT_UPDATE_AFTER: u32 = TX_BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or to be sent) to the guest, waiting for its RESPONSE.
    Connecting,
    Established,
}

/// What a connection has to tell the guest (besides data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub request: bool,
    pub response: bool,
    pub credit_update: bool,
    pub credit_request: bool,
}

/// What happened on the host stream.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamEvent {
    Nothing,
    /// The stream failed or vanished: reset the connection.
    Broken,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    pub pending: Pending,
    /// Host-initiated: the "OK <port>\n" line, then guest data, still to be written.
    preamble: Vec<u8>,
    /// Guest bytes the stream has not taken yet.
    to_host: VecDeque<u8>,
    /// Host bytes not yet sent to the guest.
    pub to_guest: VecDeque<u8>,
    /// Guest bytes written to the stream (our `fwd_cnt`), and its value when last sent.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Guest bytes received in total (to check the guest keeps to its credit).
    tx_cnt: u32,
    /// Host bytes sent to the guest (`rx_cnt`), and the guest's `buf_alloc` and `fwd_cnt`.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The stream reached end of file (the host sends no more).
    pub host_eof: bool,
    /// SHUTDOWN(SEND) was sent to the guest.
    pub eof_sent: bool,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// Our stream's write side is shut.
    write_shut: bool,
    /// A CREDIT_REQUEST was sent and no packet came since.
    pub credit_asked: bool,
}

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        Connection {
            stream,
            state,
            pending: Pending::default(),
            preamble: Vec::new(),
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            eof_sent: false,
            peer_shutdown: 0,
            write_shut: false,
            credit_asked: false,
        }
    }

    /// Takes the credit fields of a packet from the guest. A credit update after a request for
    /// one clears the request.
    pub fn peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
        self.pending.credit_request = false;
        self.credit_asked = false;
    }

    /// Bytes the guest can take now. A `fwd_cnt` ahead of what we sent (a hostile guest)
    /// counts as no credit, not as a huge one.
    pub fn peer_credit_left(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The fields of our packets: (buf_alloc, fwd_cnt); remembers what the guest was told.
    pub fn our_credit(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        (TX_BUF_ALLOC, self.fwd_cnt)
    }

    /// Data the guest sent. `false`: more than its credit (the connection must be reset).
    pub fn guest_data(&mut self, data: &[u8]) -> bool {
        let outstanding = self.tx_cnt.wrapping_sub(self.fwd_cnt) as usize;
        if outstanding + data.len() > TX_BUF_ALLOC as usize || self.write_shut {
            return false;
        }
        self.tx_cnt = self.tx_cnt.wrapping_add(data.len() as u32);
        self.to_host.extend(data);
        true
    }

    /// Host-initiated: queues the "OK <port>\n" line the host program waits for.
    pub fn send_ok(&mut self, local_port: u32) {
        self.preamble = format!("OK {local_port}\n").into_bytes();
    }

    /// Writes what is waiting for the stream, as far as it takes it; then shuts the stream's
    /// write side once the guest has shut its sending side and everything is written.
    pub fn flush(&mut self) -> StreamEvent {
        while !self.preamble.is_empty() {
            match self.stream.write(&self.preamble) {
                Ok(0) => return StreamEvent::Broken,
                Ok(n) => {
                    self.preamble.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return StreamEvent::Nothing,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return StreamEvent::Broken,
            }
        }
        while !self.to_host.is_empty() {
            let (a, _) = self.to_host.as_slices();
            match self.stream.write(a) {
                Ok(0) => return StreamEvent::Broken,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return StreamEvent::Broken,
            }
        }
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_AFTER {
            self.pending.credit_update = true;
        }
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.write_shut = true;
        }
        StreamEvent::Nothing
    }

    /// Reads the stream into `to_guest` while there is room.
    pub fn fill(&mut self, scratch: &mut [u8]) -> StreamEvent {
        while !self.host_eof && self.to_guest.len() < RX_BACKLOG {
            let want = (RX_BACKLOG - self.to_guest.len()).min(scratch.len());
            match self.stream.read(&mut scratch[..want]) {
                Ok(0) => self.host_eof = true,
                Ok(n) => self.to_guest.extend(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return StreamEvent::Broken,
            }
        }
        StreamEvent::Nothing
    }

    /// Takes up to `max` bytes of `to_guest` for a packet (as two slices), counting them sent.
    pub fn take_for_guest(&mut self, max: usize) -> usize {
        let n = max
            .min(self.to_guest.len())
            .min(self.peer_credit_left() as usize);
        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
        n
    }

    /// Whether the stream should be watched for reading, and for writing.
    pub fn interest(&self) -> (bool, bool) {
        let read = self.state == State::Established
            && !self.host_eof
            && self.to_guest.len() < RX_BACKLOG
            && self.peer_shutdown & SHUTDOWN_RCV == 0;
        let write = !self.preamble.is_empty() || !self.to_host.is_empty();
        (read, write)
    }

    /// Whether there is a packet for the guest: control, data within credit, or end of file.
    pub fn has_rx(&self) -> bool {
        let p = &self.pending;
        p.request
            || p.response
            || p.credit_update
            || (p.credit_request && !self.to_guest.is_empty())
            || (self.state == State::Established
                && !self.to_guest.is_empty()
                && self.peer_credit_left() > 0)
            || self.eof_due()
    }

    /// The host finished sending and all its data reached the guest: SHUTDOWN(SEND) is due.
    pub fn eof_due(&self) -> bool {
        self.state == State::Established
            && self.host_eof
            && self.to_guest.is_empty()
            && !self.eof_sent
    }

    /// Data waits for a guest that gives no credit: ask it once.
    pub fn want_credit(&mut self) {
        if !self.to_guest.is_empty() && self.peer_credit_left() == 0 && !self.credit_asked {
            self.pending.credit_request = true;
        }
    }

    /// Both sides are done: nothing more can move, the connection can go (with an RST).
    pub fn finished(&self) -> bool {
        let guest_done = self.peer_shutdown & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            == (SHUTDOWN_RCV | SHUTDOWN_SEND)
            || (self.peer_shutdown & SHUTDOWN_SEND != 0 && self.eof_sent);
        guest_done && self.to_host.is_empty() && self.preamble.is_empty()
    }
}
