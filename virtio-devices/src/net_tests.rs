//! virtio-net on a TAP in a private network namespace, driven through real split rings (the
//! fake driver of `crate::tests`): malformed transmit chains, the pages a received frame
//! marks dirty, and two queue pairs with the control queue and merged receive buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::tests::{dirty_pages, static_arp, Irq, QRing, Ring, DATA, NEXT, QSIZE, USED, WRITE};
use crate::{ActivateContext, DeviceStatus, VirtioDevice};

/// virtio-net with malformed chains, on a TAP in a private network namespace.
#[test]
fn net_malformed_chains_are_dropped() {
    std::thread::spawn(net_malformed_chains_in_private_netns)
        .join()
        .unwrap();
}

fn net_malformed_chains_in_private_netns() {
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        ret,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let tap = net_util::Tap::open("vdt0", 1)
        .expect("creating a TAP (the tests run as root with /dev/net/tun)")
        .remove(0);
    tap.enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        vec![tap],
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], mac.bytes());
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    // Transmit queue (1): a writable descriptor, a buffer outside memory, a header-only frame,
    // an oversized frame: all dropped, all completed.
    let mut r = Ring::start(&mut net, 1, 3);
    for (addr, len, flags) in [
        (DATA, 64, WRITE),
        (1 << 40, 64, 0),
        (DATA, 12, 0),
        (DATA, 70_000, 0),
        (u64::MAX - 8, 64, 0),
    ] {
        r.desc(0, addr, len, flags, 0);
        assert_eq!(r.submit(0), Some(0));
    }
    // A good frame goes out (to a TAP nobody reads).
    r.desc(0, DATA, 12 + 60, 0, 0);
    assert_eq!(r.submit(0), Some(0));
    // The worker publishes its counters once per batch: read them once it has stopped.
    net.reset();
    use devices::DeviceCounters;
    let c = net.counters().unwrap().counters();
    assert_eq!((c["tx_frames"], c["tx_bytes"], c["rx_frames"]), (1, 60, 0));
}

/// Activates `dev` with all its `n` queues ready (queue `i` at 0x10000 * (i + 1)) and the
/// feature bits `acked`.
fn start_all(
    dev: &mut dyn VirtioDevice,
    n: usize,
    acked: u64,
) -> (GuestMemoryMmap, Vec<QRing>, Arc<DeviceStatus>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let mut rings = Vec::new();
    let mut queues = Vec::new();
    for i in 0..n {
        let base = 0x10000 * (i as u64 + 1);
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some(base as u32 + 0x1000), Some(0));
        queue.set_used_ring_address(Some(base as u32 + 0x2000), Some(0));
        queue.set_ready(true);
        queue.set_event_idx(acked & crate::F_RING_EVENT_IDX != 0);
        assert!(queue.is_valid(&mem));
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        queues.push(Some((queue, kick.try_clone().unwrap())));
        rings.push(QRing {
            base,
            kick,
            next_avail: 0,
            seen_used: 0,
        });
    }
    let status = Arc::new(DeviceStatus::default());
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(Irq::default()),
        queues,
        acked_features: acked,
        status: status.clone(),
        dma: None,
    })
    .unwrap();
    (mem, rings, status)
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A `virtio_net_hdr_v1` and an Ethernet/IPv4/UDP frame (UDP checksum 0: none).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A received frame marks exactly the pages it filled (and the used ring's) in the dirty
/// bitmaps, not the rest of the buffer.
#[test]
fn net_receive_marks_the_pages_it_fills() {
    std::thread::spawn(net_receive_marks_in_private_netns)
        .join()
        .unwrap();
}

fn net_receive_marks_in_private_netns() {
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let tap = net_util::Tap::open("vdm0", 1)
        .expect("creating a TAP (the tests run as root with /dev/net/tun)")
        .remove(0);
    // No IPv6 chatter (router solicitations) in the receive queue.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vdm0/disable_ipv6", "1");
    tap.set_ip(
        "10.8.0.1".parse().unwrap(),
        "255.255.255.0".parse().unwrap(),
    )
    .unwrap();
    tap.enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        vec![tap],
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    let mut r = Ring::start(&mut net, 0, 3);
    // One receive buffer of 0x2000 bytes from 0x40 before page 0x21: pages 0x20-0x22.
    let buf = DATA + 0x1000 - 0x40;
    r.desc(0, buf, 0x2000, WRITE, 0);
    r.post(0);
    // The device looks (the TAP is empty) and waits for the frame.
    r.kick.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    static_arp("vdm0", [10, 8, 0, 2], mac.bytes());
    dirty_pages(&r.mem);
    let host = std::net::UdpSocket::bind("10.8.0.1:7000").unwrap();
    host.send_to(&[0x5a; 100], "10.8.0.2:7000").unwrap();
    // Header, Ethernet, IPv4, UDP, payload: 0x40 bytes in page 0x20, the rest in page 0x21.
    let n = 12 + 14 + 20 + 8 + 100;
    assert_eq!(r.wait_used(0), Some(n));
    assert_eq!(
        r.mem
            .read_obj::<u8>(GuestAddress(buf + u64::from(n) - 1))
            .unwrap(),
        0x5a
    );
    assert_eq!(dirty_pages(&r.mem), [USED >> 12, 0x20, 0x21]);
    net.reset();
}

/// Two queue pairs and the control queue: pair 1 transmits to the host, only pair 0 receives
/// until VQ_PAIRS_SET, control commands are checked, and a frame spans merged buffers.
#[test]
fn net_multiqueue_control_queue_and_merged_buffers() {
    std::thread::spawn(net_multiqueue_in_private_netns)
        .join()
        .unwrap();
}

fn net_multiqueue_in_private_netns() {
    use devices::DeviceCounters;
    use virtio_bindings::virtio_net as vn;
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let taps = net_util::Tap::open("vmq0", 2).expect("creating a multi-queue TAP");
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/vmq0/disable_ipv6", "1");
    let host_mac = net_util::MacAddr::random_local();
    taps[0]
        .set_ip(
            "10.9.0.1".parse().unwrap(),
            "255.255.255.0".parse().unwrap(),
        )
        .unwrap();
    taps[0].set_mac(host_mac).unwrap();
    taps[0].enable().unwrap();
    let mac = net_util::MacAddr::random_local();
    let mut net = crate::Net::new(
        taps,
        crate::NetConfig {
            mac,
            mtu: 1500,
            queue_size: QSIZE,
            offloads: Default::default(),
        },
    )
    .unwrap();
    assert_eq!(net.queue_max_sizes().len(), 5);
    let offered = net.features();
    for b in [
        vn::VIRTIO_NET_F_MQ,
        vn::VIRTIO_NET_F_CTRL_VQ,
        vn::VIRTIO_NET_F_MRG_RXBUF,
        vn::VIRTIO_NET_F_CSUM,
        vn::VIRTIO_NET_F_GUEST_CSUM,
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ] {
        assert!(offered & (1 << b) != 0, "feature {b} not offered");
    }
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        2,
        "max_virtqueue_pairs"
    );
    let f = |b: u32| 1u64 << b;
    let acked = crate::F_VERSION_1
        | crate::F_RING_EVENT_IDX
        | f(vn::VIRTIO_NET_F_MQ)
        | f(vn::VIRTIO_NET_F_CTRL_VQ)
        | f(vn::VIRTIO_NET_F_MRG_RXBUF)
        | f(vn::VIRTIO_NET_F_GUEST_CSUM)
        | f(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
    let (mem, mut rings, status) = start_all(&mut net, 5, acked);

    // Control queue (4): readable command, writable status byte.
    let ctrl = |rings: &mut Vec<QRing>, cmd: &[u8]| -> (u32, u8) {
        let r = &mut rings[4];
        mem.write_slice(cmd, GuestAddress(0x80000)).unwrap();
        mem.write_obj(0xaau8, GuestAddress(0x80100)).unwrap();
        r.desc(&mem, 0, 0x80000, cmd.len() as u32, NEXT, 1);
        r.desc(&mem, 1, 0x80100, 1, WRITE, 0);
        r.post(&mem, 0);
        let (id, len) = r.next_used(&mem).expect("control command not completed");
        assert_eq!(id, 0);
        (len, mem.read_obj(GuestAddress(0x80100)).unwrap())
    };
    let (ok, err) = (vn::VIRTIO_NET_OK as u8, vn::VIRTIO_NET_ERR as u8);
    let mq = vn::VIRTIO_NET_CTRL_MQ as u8;
    let set = vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    assert_eq!(ctrl(&mut rings, &[mq, set, 3, 0]), (1, err), "3 pairs of 2");
    assert_eq!(ctrl(&mut rings, &[mq, set, 0, 0]), (1, err), "0 pairs");
    assert_eq!(ctrl(&mut rings, &[mq, set, 1]), (1, err), "short command");
    assert_eq!(ctrl(&mut rings, &[9, 9]), (1, err), "unknown class");
    let off = vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
    let mut cmd = vec![off, vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8];
    cmd.extend_from_slice(&f(vn::VIRTIO_NET_F_GUEST_TSO4).to_le_bytes());
    assert_eq!(ctrl(&mut rings, &cmd), (1, err), "offload not negotiated");
    cmd.truncate(2);
    cmd.extend_from_slice(&f(vn::VIRTIO_NET_F_GUEST_CSUM).to_le_bytes());
    assert_eq!(ctrl(&mut rings, &cmd), (1, ok), "negotiated offload");
    // A command with no status byte is completed with nothing written.
    rings[4].desc(&mem, 0, 0x80000, 4, 0, 0);
    rings[4].post(&mem, 0);
    assert_eq!(rings[4].next_used(&mem), Some((0, 0)));

    // Only pair 0 is in use so far: host traffic arrives on receive queue 0, never 2.
    static_arp("vmq0", [10, 9, 0, 2], mac.bytes());
    for (q, base) in [(0usize, 0x100000u64), (2, 0x140000)] {
        for i in 0..4u16 {
            // Small buffers, so a 300-byte datagram needs three of them (MRG_RXBUF).
            let a = base + 0x1000 * u64::from(i);
            rings[q].desc(&mem, i, a, 128, WRITE, 0);
            rings[q].post(&mem, i);
        }
    }
    let host = std::net::UdpSocket::bind("10.9.0.1:7000").unwrap();
    let payload = [0x5au8; 300];
    host.send_to(&payload, "10.9.0.2:7000").unwrap();
    let mut lens = Vec::new();
    for _ in 0..3 {
        let (id, len) = rings[0]
            .next_used(&mem)
            .expect("frame not received on queue 0");
        lens.push((id, len));
    }
    let frame_len = 12 + 14 + 20 + 8 + 300;
    assert_eq!(lens, vec![(0, 128), (1, 128), (2, frame_len - 256)]);
    let num_buffers: u16 = mem.read_obj(GuestAddress(0x100000 + 10)).unwrap();
    assert_eq!(num_buffers, 3);
    let mut got = vec![0u8; frame_len as usize];
    for (k, chunk) in got.chunks_mut(128).enumerate() {
        mem.read_slice(chunk, GuestAddress(0x100000 + 0x1000 * k as u64))
            .unwrap();
    }
    assert_eq!(&got[12 + 14 + 28..], &payload[..]);
    assert_eq!(
        rings[2].used_idx(&mem),
        0,
        "a frame reached the unused pair"
    );

    // Pair 1 transmits: the host gets the datagram.
    let frame = udp_frame(
        host_mac.bytes(),
        mac.bytes(),
        [10, 9, 0, 2],
        [10, 9, 0, 1],
        7000,
        b"from pair 1",
    );
    mem.write_slice(&frame, GuestAddress(0x90000)).unwrap();
    rings[3].desc(&mem, 0, 0x90000, frame.len() as u32, 0, 0);
    rings[3].post(&mem, 0);
    assert_eq!(rings[3].next_used(&mem), Some((0, 0)));
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = host.recv_from(&mut buf).expect("pair 1's datagram");
    assert_eq!(&buf[..n], b"from pair 1");
    assert_eq!(from.to_string(), "10.9.0.2:7000");

    // Both pairs in use: the TAP steers flows to either; all of them arrive.
    assert_eq!(ctrl(&mut rings, &[mq, set, 2, 0]), (1, ok));
    for q in [0usize, 2] {
        for i in 4..12u16 {
            let a = 0x100000 + 0x40000 * (q as u64 / 2) + 0x1000 * u64::from(i);
            rings[q].desc(&mem, i, a, 2048, WRITE, 0);
            rings[q].post(&mem, i);
        }
    }
    for port in 7001..7005 {
        let s = std::net::UdpSocket::bind(format!("10.9.0.1:{port}")).unwrap();
        s.send_to(b"x", "10.9.0.2:7000").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.counters().unwrap().counters()["rx_frames"] < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let c = net.counters().unwrap().counters();
    assert_eq!((c["rx_frames"], c["tx_frames"]), (5, 1), "{c:?}");
    assert_eq!(c["tx_bytes"], frame.len() as u64 - 12);
    assert_eq!(c["rx_bytes"], 342 + 4 * (14 + 28 + 1));
    assert!(!status.needs_reset());
    net.reset();
}
