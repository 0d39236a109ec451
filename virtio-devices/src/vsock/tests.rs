//! virtio-vsock driven through real split rings (the fake driver of `crate::tests`) with its
//! worker running and real Unix sockets on the host side: both directions of connection,
//! credit, shutdown, resets, and what a hostile guest or host program may send.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::TX_BUF_ALLOC;
use super::packet::*;
use super::{Vsock, TYPE_VSOCK};
use crate::tests::{Irq, QRing, QSIZE, WRITE};
use crate::{ActivateContext, DeviceStatus, VirtioDevice, VirtioDeviceState};

const CID: u64 = 3;
const RX_BUFS: u64 = 0x100000;
const RX_BUF_LEN: u32 = 0x1000;
const TX_BUF: u64 = 0x180000;

struct Guest {
    mem: GuestMemoryMmap,
    rings: Vec<QRing>,
    dev: Vsock,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Guest {
    /// A device at a fresh socket path, activated with its three queues and every receive
    /// buffer posted.
    fn start() -> Guest {
        Guest::start_with(|_| {})
    }

    /// `start`, with `prepare` applied to the device before its activation.
    fn start_with(prepare: impl FnOnce(&mut Vsock)) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let mut dev = Vsock::new(CID, &path).unwrap();
        prepare(&mut dev);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut rings = Vec::new();
        let mut queues = Vec::new();
        for i in 0..3u64 {
            let base = 0x10000 * (i + 1);
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_desc_table_address(Some(base as u32), Some(0));
            q.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
            q.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
            q.set_ready(true);
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            queues.push(Some((q, kick.try_clone().unwrap())));
            rings.push(QRing {
                base,
                kick,
                next_avail: 0,
                seen_used: 0,
            });
        }
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Irq::default()),
            queues,
            acked_features: crate::F_VERSION_1,
            status: Arc::new(DeviceStatus::default()),
            dma: None,
        })
        .unwrap();
        let mut g = Guest {
            mem,
            rings,
            dev,
            _dir: dir,
            path,
        };
        for i in 0..QSIZE {
            g.post_rx(i);
        }
        g
    }

    fn post_rx(&mut self, i: u16) {
        let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF_LEN);
        self.rings[0].desc(&self.mem, i, addr, RX_BUF_LEN, WRITE, 0);
        self.rings[0].post(&self.mem, i);
    }

    /// The next packet for the guest within `wait`, its buffer given back.
    fn recv_within(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        while self.rings[0].used_idx(&self.mem) == self.rings[0].seen_used {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rings[0].next_used(&self.mem).unwrap();
        let addr = RX_BUFS + u64::from(id) * u64::from(RX_BUF_LEN);
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        self.post_rx(id as u16);
        assert!(b.len() >= HDR_LEN, "short packet of {} bytes", b.len());
        let h = Header::parse(b[..HDR_LEN].try_into().unwrap());
        assert_eq!(b.len(), HDR_LEN + h.len as usize);
        Some((h, b[HDR_LEN..].to_vec()))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(Duration::from_secs(5))
            .expect("no packet for the guest")
    }

    /// Sends raw bytes as one transmit chain and waits for it to be used.
    fn send_raw(&mut self, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(TX_BUF)).unwrap();
        self.rings[1].desc(&self.mem, 0, TX_BUF, bytes.len() as u32, 0, 0);
        self.rings[1].post(&self.mem, 0);
        self.rings[1].next_used(&self.mem).expect("tx not used");
    }

    fn send(&mut self, h: Header, data: &[u8]) {
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(data);
        self.send_raw(&b);
    }
}

/// A guest packet header on `(host port, guest port)`.
fn hdr(op: u16, host_port: u32, guest_port: u32, len: usize, buf_alloc: u32, fwd: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: len as u32,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt: fwd,
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host connects with CONNECT; the guest accepts. Returns the host stream and the host port.
fn host_connect(g: &mut Guest, guest_port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    writeln!(s, "CONNECT {guest_port}").unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_REQUEST);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.dst_port),
        (HOST_CID, CID, guest_port)
    );
    assert!(h.src_port >= 1 << 30);
    g.send(
        hdr(OP_RESPONSE, h.src_port, guest_port, 0, buf_alloc, 0),
        &[],
    );
    assert_eq!(read_line(&mut s), format!("OK {}", h.src_port));
    (s, h.src_port)
}

#[test]
fn config_and_queues() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(0x1_0000_0005, &dir.path().join("s")).unwrap();
    assert_eq!(dev.device_type(), TYPE_VSOCK);
    assert_eq!(TYPE_VSOCK, 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1_0000_0005);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(u32::from_le_bytes(hi), 1);
    // A second device on the same live socket is refused; the socket goes with the device.
    assert!(Vsock::new(4, &dir.path().join("s")).is_err());
    drop(dev);
    assert!(!dir.path().join("s").exists());
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    drop(UnixListener::bind(&p).unwrap());
    assert!(p.exists());
    Vsock::new(3, &p).unwrap();
}

#[test]
fn host_initiated_both_directions() {
    let mut g = Guest::start();
    let (mut s, port) = host_connect(&mut g, 1234, 64 * 1024);
    s.write_all(b"hello guest").unwrap();
    let (h, data) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, port, 1234));
    assert_eq!(data, b"hello guest");
    assert_eq!(h.buf_alloc, TX_BUF_ALLOC);
    g.send(hdr(OP_RW, port, 1234, 10, 64 * 1024, 11), b"hello host");
    let mut b = [0u8; 10];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello host");
    // The host closes: SHUTDOWN(SEND) to the guest; the guest closes: RST, and it is gone.
    drop(s);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let mut sh = hdr(OP_SHUTDOWN, port, 1234, 0, 64 * 1024, 11);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sh, &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut g = Guest::start();
    let (mut s, port) = host_connect(&mut g, 7, 100);
    let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    let (h, d) = g.recv();
    assert_eq!(h.op, OP_RW);
    got.extend(d);
    // At most 100 bytes until the guest says it consumed some.
    while let Some((h, d)) = g.recv_within(Duration::from_millis(200)) {
        if h.op == OP_CREDIT_REQUEST {
            continue;
        }
        assert_eq!(h.op, OP_RW);
        got.extend(d);
    }
    assert_eq!(got.len(), 100);
    g.send(hdr(OP_CREDIT_UPDATE, port, 7, 0, 100, 100), &[]);
    while got.len() < 200 {
        let (h, d) = g.recv();
        if h.op == OP_RW {
            got.extend(d);
        }
    }
    assert_eq!(got.len(), 200);
    g.send(hdr(OP_CREDIT_UPDATE, port, 7, 0, 1000, 200), &[]);
    while got.len() < 250 {
        let (h, d) = g.recv();
        if h.op == OP_RW {
            got.extend(d);
        }
    }
    assert_eq!(got, data);
}

#[test]
fn guest_past_its_credit_is_reset() {
    let mut g = Guest::start();
    let (mut s, port) = host_connect(&mut g, 9, 4096);
    // The host does not read: the guest may have TX_BUF_ALLOC bytes in flight, no more.
    let chunk = vec![0x5au8; 4096];
    let mut sent = 0usize;
    let mut reset = false;
    while sent <= 2 * TX_BUF_ALLOC as usize + (1 << 20) {
        g.send(hdr(OP_RW, port, 9, chunk.len(), 4096, 0), &chunk);
        sent += chunk.len();
        if let Some((h, _)) = g.recv_within(Duration::from_millis(0)) {
            if h.op == OP_RST {
                reset = true;
                break;
            }
        }
    }
    if !reset {
        while let Some((h, _)) = g.recv_within(Duration::from_millis(500)) {
            reset |= h.op == OP_RST;
        }
    }
    assert!(reset, "no RST after {sent} bytes");
    // The host stream got only whole data and then end of file.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(all.iter().all(|&b| b == 0x5a));
    assert!(all.len() <= sent);
}

#[test]
fn guest_initiated_to_host_listener_and_refused() {
    let mut g = Guest::start();
    let mut name = g.path.clone().into_os_string();
    name.push("_4321");
    let l = UnixListener::bind(Path::new(&name)).unwrap();
    g.send(hdr(OP_REQUEST, 4321, 5000, 0, 4096, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 4321, 5000));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    g.send(hdr(OP_RW, 4321, 5000, 4, 4096, 0), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    let (h, d) = g.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"pong"[..]));
    // The guest resets: the host sees end of file.
    g.send(hdr(OP_RST, 4321, 5000, 0, 4096, 4), &[]);
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // No listener at port 4322: RST.
    g.send(hdr(OP_REQUEST, 4322, 5001, 0, 4096, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RST, 4322, 5001));
}

#[test]
fn hostile_host_programs() {
    let mut g = Guest::start();
    // Garbage, an overlong line, a bad port: closed without bothering the guest.
    for line in [&b"HELLO 5\n"[..], &[b'x'; 100][..], b"CONNECT abc\n"] {
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(line).unwrap();
        let mut b = [0u8; 8];
        assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    }
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
    // A guest that refuses: the host stream is closed.
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"connect 77\n").unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_REQUEST);
    g.send(hdr(OP_RST, h.src_port, 77, 0, 0, 0), &[]);
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
}

#[test]
fn hostile_guest_packets() {
    let mut g = Guest::start();
    // A short header, a wrong source or destination CID: dropped, no answer.
    g.send_raw(&[1, 2, 3]);
    let mut h = hdr(OP_REQUEST, 1, 2, 0, 0, 0);
    h.src_cid = 99;
    g.send(h, &[]);
    h.src_cid = CID;
    h.dst_cid = 7;
    g.send(h, &[]);
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
    // A payload longer than the chain, or over 64 KiB; data on no connection; an unknown op;
    // a datagram type: RST.
    let (mut s, port) = host_connect(&mut g, 10, 4096);
    g.send(hdr(OP_RW, port, 10, 100, 4096, 0), b"short");
    assert_eq!(g.recv().0.op, OP_RST);
    assert_eq!(s.read(&mut [0u8; 4]).unwrap_or(0), 0);
    g.send(hdr(OP_RW, 5, 6, 1 << 20, 4096, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    g.send(hdr(OP_RW, 5, 6, 3, 4096, 0), b"abc");
    assert_eq!(g.recv().0.op, OP_RST);
    g.send(hdr(99, 5, 6, 0, 4096, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    let mut d = hdr(OP_REQUEST, 5, 6, 0, 4096, 0);
    d.type_ = 2;
    g.send(d, &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    // A huge fwd_cnt (ahead of what was sent) is no credit, not 4 GiB of it.
    let (mut s, port) = host_connect(&mut g, 11, 4096);
    g.send(hdr(OP_CREDIT_UPDATE, port, 11, 0, 4096, 0x8000_0000), &[]);
    s.write_all(b"data").unwrap();
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_CREDIT_REQUEST);
    g.send(hdr(OP_CREDIT_UPDATE, port, 11, 0, 4096, 0), &[]);
    let (h, d) = g.recv();
    assert_eq!((h.op, d.as_slice()), (OP_RW, &b"data"[..]));
    // A duplicate request on an open connection: reset.
    g.send(hdr(OP_REQUEST, port, 11, 0, 4096, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RST);
    assert_eq!(s.read(&mut [0u8; 4]).unwrap_or(0), 0);
}

#[test]
fn no_rx_buffers_then_buffers() {
    let mut g = Guest::start();
    // Use up every receive buffer with refused connections' RSTs, without reposting.
    for p in 0..u32::from(QSIZE) + 5 {
        g.send(hdr(OP_REQUEST, 2, 100 + p, 0, 4096, 0), &[]);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.rings[0].used_idx(&g.mem) != QSIZE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(g.rings[0].used_idx(&g.mem), QSIZE);
    // The rest wait for buffers, and come once they are posted.
    let mut n = 0;
    while g.recv_within(Duration::from_millis(200)).is_some() {
        n += 1;
    }
    assert_eq!(n, QSIZE + 5);
}

#[test]
fn pause_resume_and_state() {
    let mut g = Guest::start();
    let (mut s, port) = host_connect(&mut g, 12, 4096);
    g.dev.pause().unwrap();
    assert!(g.dev.queue_positions().is_some());
    s.write_all(b"while paused").unwrap();
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
    g.dev.resume().unwrap();
    let (h, d) = g.recv();
    assert_eq!(
        (h.op, h.src_port, d.as_slice()),
        (OP_RW, port, &b"while paused"[..])
    );

    let st = g.dev.device_state();
    let json = serde_json::to_string(&st).unwrap();
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
    let dir = tempfile::tempdir().unwrap();
    let mut other = Vsock::new(CID, &dir.path().join("x")).unwrap();
    other.set_device_state(&st).unwrap();
    let mut wrong = Vsock::new(CID + 1, &dir.path().join("y")).unwrap();
    assert!(wrong.set_device_state(&st).is_err());
    let VirtioDeviceState::Vsock(mut v) = st else {
        unreachable!()
    };
    v.version += 1;
    assert!(other
        .set_device_state(&VirtioDeviceState::Vsock(v))
        .is_err());

    // A device reset drops the connections: the host sees end of file.
    g.dev.reset();
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
}

const EVT_BUF: u64 = 0x1c0000;

/// An event buffer of `len` bytes (filled with 0xff) posted as descriptor `i` of the event
/// queue.
fn post_event(g: &mut Guest, i: u16, len: u32) {
    let addr = EVT_BUF + 0x100 * u64::from(i);
    g.mem
        .write_slice(&vec![0xff; len as usize], GuestAddress(addr))
        .unwrap();
    g.rings[2].desc(&g.mem, i, addr, len, WRITE, 0);
    g.rings[2].post(&g.mem, i);
}

/// After a restore (`set_device_state`) the device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
/// once, in the first event buffer of 4 bytes or more (a smaller one is given back empty);
/// without a restore, or after a reset, none.
#[test]
fn transport_reset_event_after_restore() {
    // A device that was not restored keeps its event buffers.
    let mut g = Guest::start();
    post_event(&mut g, 0, 4);
    host_connect(&mut g, 12, 4096);
    assert_eq!(g.rings[2].used_idx(&g.mem), 0);
    let st = g.dev.device_state();

    let mut g = Guest::start_with(|d| d.set_device_state(&st).unwrap());
    // No buffer yet: the event waits for one. A 2-byte buffer is too small.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.rings[2].used_idx(&g.mem), 0);
    post_event(&mut g, 0, 2);
    post_event(&mut g, 1, 8);
    assert_eq!(g.rings[2].next_used(&g.mem), Some((0, 0)));
    assert_eq!(g.rings[2].next_used(&g.mem), Some((1, 4)));
    let mut id = [0u8; 8];
    g.mem
        .read_slice(&mut id, GuestAddress(EVT_BUF + 0x100))
        .unwrap();
    assert_eq!(id, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    // Once only; the device works on.
    post_event(&mut g, 2, 4);
    host_connect(&mut g, 13, 4096);
    assert_eq!(g.rings[2].used_idx(&g.mem), 2);

    // Restored, then reset before it could send it: the event is dropped with the driver.
    let mut g = Guest::start_with(|d| d.set_device_state(&st).unwrap());
    g.dev.reset();
    assert!(!g.dev.restored);
    assert!(!g.dev.worker.idle().unwrap().reset_event);
}
