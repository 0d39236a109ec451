//! `test=vsock`: virtio-vsock through `virtio-drivers`' `VsockConnectionManager`. First it
//! connects to host port 4321 (a listener at `<socket>_4321` on the host), sends
//! `hello from guest\n` and expects `hello from host\n` back; then it listens on port 1234 and
//! echoes every byte each connection sends, for `vsock_secs=` seconds (default 120). Prints
//! `VSOCK connected port=4321 ok` (or `refused`), `VSOCK listening port=1234`, `VSOCK accepted
//! port=<host port>` and `VSOCK echo bytes=<n>` when a connection ends. With `vsock_evq=1` it
//! also keeps an event buffer on the event queue (`vsock_event.rs`) and, on a transport reset
//! (after a restore), prints `VSOCK transport-reset cid=<the CID read again>`, drops every
//! connection it had and posts the buffer again; any other event is a `vsock-event` FAIL.

use alloc::vec::Vec;

use virtio_drivers::device::socket::{
    SocketError, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType, VMADDR_CID_HOST,
};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Error;

use crate::bootinfo::BootInfo;
use crate::virtio::{find, transport, GuestHal};
use crate::vsock_event::{EventQueue, TRANSPORT_RESET};
use crate::{check, fail, parse_u64, pass, println, smp, svc};

const LISTEN_PORT: u32 = 1234;
const HOST_PORT: u32 = 4321;
const OUR_PORT: u32 = 5000;
/// Receive buffers of 16 KiB: fewer packets per MiB than the driver's default 512 bytes.
const RX_BUF: usize = 16 * 1024;
/// What each connection may have buffered (the credit the host gets).
const CONN_BUF: u32 = 64 * 1024;

type Manager = VsockConnectionManager<GuestHal, PciTransport, RX_BUF>;

fn now_us() -> u64 {
    svc::rdtsc() / smp::TSC_PER_US
}

/// One accepted connection: the host's address, and what was received but not yet echoed.
struct Echo {
    peer: VsockAddr,
    pending: Vec<u8>,
    echoed: u64,
}

/// Sends as much of `pending` as the peer's credit allows; false on an error other than no
/// credit.
fn push(m: &mut Manager, e: &mut Echo) -> bool {
    while !e.pending.is_empty() {
        let mut n = e.pending.len().min(32 * 1024);
        loop {
            match m.send(e.peer, LISTEN_PORT, &e.pending[..n]) {
                Ok(()) => break,
                Err(Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer))
                    if n > 1 =>
                {
                    n /= 2
                }
                Err(Error::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                    return true
                }
                Err(err) => {
                    fail("vsock-echo-send", format_args!("{err:?}"));
                    return false;
                }
            }
        }
        e.pending.drain(..n);
        e.echoed += n as u64;
    }
    true
}

/// Connects to host port 4321 and exchanges one line.
fn connect_out(m: &mut Manager) {
    let host = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: HOST_PORT,
    };
    if let Err(e) = m.connect(host, OUR_PORT) {
        fail("vsock-connect", format_args!("{e:?}"));
        return;
    }
    let deadline = now_us() + 5_000_000;
    let mut reply = Vec::new();
    let mut sent = false;
    while now_us() < deadline {
        let ev = match m.poll() {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(e) => {
                fail("vsock-connect", format_args!("poll: {e:?}"));
                return;
            }
        };
        match ev.event_type {
            VsockEventType::Connected if !sent => {
                if let Err(e) = m.send(host, OUR_PORT, b"hello from guest\n") {
                    fail("vsock-connect", format_args!("send: {e:?}"));
                    return;
                }
                sent = true;
            }
            VsockEventType::Received { .. } => {
                let mut b = [0u8; 64];
                if let Ok(n) = m.recv(host, OUR_PORT, &mut b) {
                    reply.extend_from_slice(&b[..n]);
                }
                if reply.ends_with(b"\n") {
                    let ok = reply == b"hello from host\n";
                    println!(
                        "VSOCK connected port={HOST_PORT} {}",
                        if ok { "ok" } else { "bad" }
                    );
                    check!("vsock-connect", ok, "reply {:?}", reply);
                    let _ = m.shutdown(host, OUR_PORT);
                    return;
                }
            }
            VsockEventType::Disconnected { .. } => {
                println!("VSOCK connected port={HOST_PORT} refused");
                return;
            }
            _ => {}
        }
    }
    fail("vsock-connect", format_args!("no answer in 5 s"));
}

pub fn scenario_vsock(boot: &BootInfo) {
    let Some(df) = find(DeviceType::Socket).into_iter().next() else {
        fail("vsock-present", format_args!("no virtio-vsock function"));
        return;
    };
    pass("vsock-present");
    let Some(t) = transport(df) else { return };
    let driver = match VirtIOSocket::<GuestHal, PciTransport, RX_BUF>::new(t) {
        Ok(d) => d,
        Err(e) => {
            fail("vsock-init", format_args!("{e:?}"));
            return;
        }
    };
    let mut m = Manager::new_with_capacity(driver, CONN_BUF);
    println!("VSOCK cid={}", m.guest_cid());
    let mut evq = match boot.arg("vsock_evq") {
        Some("1") => {
            let Some(q) = EventQueue::adopt(df) else {
                return;
            };
            Some(q)
        }
        _ => None,
    };
    if let Some(q) = evq.as_mut() {
        q.post();
        println!("VSOCK event buffer posted");
    }
    connect_out(&mut m);
    m.listen(LISTEN_PORT);
    println!("VSOCK listening port={LISTEN_PORT}");
    let secs = boot.arg("vsock_secs").and_then(parse_u64).unwrap_or(120);
    let deadline = now_us() + secs * 1_000_000;
    let mut conns: Vec<Echo> = Vec::new();
    let mut buf = alloc::vec![0u8; 32 * 1024];
    while now_us() < deadline {
        if let Some(q) = evq.as_mut() {
            if !transport_event(q, &mut m, &mut conns) {
                return;
            }
        }
        let ev = match m.poll() {
            Ok(ev) => ev,
            Err(e) => {
                fail("vsock-poll", format_args!("{e:?}"));
                return;
            }
        };
        if let Some(ev) = ev {
            match ev.event_type {
                VsockEventType::ConnectionRequest => {
                    println!("VSOCK accepted port={}", ev.source.port);
                    conns.retain(|c| c.peer != ev.source);
                    conns.push(Echo {
                        peer: ev.source,
                        pending: Vec::new(),
                        echoed: 0,
                    });
                }
                VsockEventType::Disconnected { .. } => {
                    if let Some(i) = conns.iter().position(|c| c.peer == ev.source) {
                        println!("VSOCK echo bytes={}", conns[i].echoed);
                        conns.swap_remove(i);
                    }
                }
                _ => {}
            }
        }
        for c in conns.iter_mut() {
            // Take what arrived while little waits to go back: the rest stays in the
            // driver's buffer, so the host runs out of credit instead of us out of memory.
            if c.pending.len() < 64 * 1024 {
                if let Ok(n) = m.recv(c.peer, LISTEN_PORT, &mut buf) {
                    c.pending.extend_from_slice(&buf[..n]);
                }
            }
            if !push(&mut m, c) {
                return;
            }
        }
    }
    println!("VSOCK done");
}

/// Handles an event from the event queue, if one came. False after a `vsock-event` FAIL.
fn transport_event(q: &mut EventQueue, m: &mut Manager, conns: &mut Vec<Echo>) -> bool {
    let Some((id, len)) = q.poll() else {
        return true;
    };
    if id != TRANSPORT_RESET || len != 4 {
        fail("vsock-event", format_args!("event id {id} of {len} bytes"));
        return false;
    }
    // Every connection is gone: forget them (the RSTs the driver sends are answered by nobody).
    for c in conns.drain(..) {
        let _ = m.force_close(c.peer, LISTEN_PORT);
    }
    println!("VSOCK transport-reset cid={}", q.guest_cid());
    q.post();
    true
}
