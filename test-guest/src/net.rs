//! `test=net`: virtio-net through `virtio-drivers`. The guest sends a UDP datagram to the host
//! side of the TAP, answers the host's ARP request for its own address, and waits for the
//! host's UDP answer.

use alloc::vec::Vec;

use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::rawq::{r16, r8, w16, w8, Layout, RawQueue, F_NEXT, F_WRITE, QSIZE, VERSION_1};
use crate::virtio::{find, transport, GuestHal};
use crate::{check, fail, pass, println, smp};

const GUEST_PORT: u16 = 5000;
const HOST_PORT: u16 = 5001;

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in ip.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(crate) fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&GUEST_PORT.to_be_bytes());
    f.extend_from_slice(&HOST_PORT.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    f.extend_from_slice(payload);
    f
}

fn arp_reply(mac: [u8; 6], ip: [u8; 4], req: &[u8]) -> Option<Vec<u8>> {
    // Ethernet (14) + ARP request for `ip`.
    if req.len() < 42 || req[12..14] != [0x08, 0x06] || req[20..22] != [0, 1] || req[38..42] != ip {
        return None;
    }
    let (their_mac, their_ip) = (&req[22..28], &req[28..32]);
    let mut f = Vec::new();
    f.extend_from_slice(their_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(their_mac);
    f.extend_from_slice(their_ip);
    Some(f)
}

/// The payload of a UDP datagram to `ip`:`GUEST_PORT`, if `f` is one.
fn udp_payload(ip: [u8; 4], f: &[u8]) -> Option<&[u8]> {
    if f.len() < 42 || f[12..14] != [0x08, 0x00] || f[23] != 17 || f[30..34] != ip {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    let udp = f.get(14 + ihl..)?;
    if udp.len() < 8 || udp[2..4] != GUEST_PORT.to_be_bytes() {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    udp.get(8..len)
}

/// The addresses the host passed and the virtio-net device, initialised.
pub(crate) struct Setup {
    pub ip: [u8; 4],
    pub host_ip: [u8; 4],
    pub host_mac: [u8; 6],
    pub net: VirtIONet<GuestHal, PciTransport, 16>,
}

/// The boot arguments net_ip=, net_host_ip=, net_host_mac=, and the first virtio-net function.
struct Addresses {
    ip: [u8; 4],
    host_ip: [u8; 4],
    host_mac: [u8; 6],
    df: DeviceFunction,
}

/// `Addresses`; None after reporting what is missing.
fn addresses(boot: &BootInfo) -> Option<Addresses> {
    let (Some(ip), Some(host_ip), Some(host_mac)) = (
        boot.arg("net_ip").and_then(parse_ip),
        boot.arg("net_host_ip").and_then(parse_ip),
        boot.arg("net_host_mac").and_then(parse_mac),
    ) else {
        fail(
            "net-args",
            format_args!("need net_ip=, net_host_ip=, net_host_mac="),
        );
        return None;
    };
    let Some(df) = find(DeviceType::Network).into_iter().next() else {
        fail("net-present", format_args!("no virtio-net function"));
        return None;
    };
    Some(Addresses {
        ip,
        host_ip,
        host_mac,
        df,
    })
}

/// `Setup` from the boot arguments (see `addresses`); None after reporting what failed.
pub(crate) fn setup(boot: &BootInfo) -> Option<Setup> {
    let Addresses {
        ip,
        host_ip,
        host_mac,
        df,
    } = addresses(boot)?;
    let net = match VirtIONet::<GuestHal, _, 16>::new(transport(df)?, 2048) {
        Ok(n) => n,
        Err(e) => {
            fail("net-init", format_args!("{e}"));
            return None;
        }
    };
    Some(Setup {
        ip,
        host_ip,
        host_mac,
        net,
    })
}

pub fn scenario_net(boot: &BootInfo) {
    let Some(Setup {
        ip,
        host_ip,
        host_mac,
        mut net,
    }) = setup(boot)
    else {
        return;
    };
    let mac = net.mac_address();
    if let Some(want) = boot.arg("net_mac").and_then(parse_mac) {
        check!(
            "net-mac",
            mac == want,
            "MAC {mac:02x?}, expected {want:02x?}"
        );
    }
    let frame = udp_frame(mac, host_mac, ip, host_ip, b"hello from guest");
    let mut tx = net.new_tx_buffer(frame.len());
    tx.packet_mut().copy_from_slice(&frame);
    let r = net.send(tx);
    check!("net-tx", r.is_ok(), "{r:?}");
    // Frames and bytes (Ethernet frames, no virtio header) each way, for the host to compare
    // with the device's counters.
    let mut counts = [0usize; 4];
    if r.is_ok() {
        counts[0] += 1;
        counts[1] += frame.len();
    }
    println!("READY");
    let mut waited_ms = 0;
    let mut arp_answered = false;
    loop {
        if !net.can_recv() {
            // The host may not listen yet: say hello again every 500 ms.
            if waited_ms % 500 == 499 {
                let mut tx = net.new_tx_buffer(frame.len());
                tx.packet_mut().copy_from_slice(&frame);
                if net.send(tx).is_ok() {
                    counts[0] += 1;
                    counts[1] += frame.len();
                }
            }
            if waited_ms > 20_000 {
                fail(
                    "net-rx",
                    format_args!(
                        "no datagram from the host in 20 s (ARP answered: {arp_answered})"
                    ),
                );
                return;
            }
            smp::delay_us(1000);
            waited_ms += 1;
            continue;
        }
        let rx = match net.receive() {
            Ok(rx) => rx,
            Err(e) => {
                fail("net-rx", format_args!("{e}"));
                return;
            }
        };
        let pkt = rx.packet();
        counts[2] += 1;
        counts[3] += pkt.len();
        let reply = arp_reply(mac, ip, pkt);
        let payload = udp_payload(ip, pkt).map(|p| p.to_vec());
        let _ = net.recycle_rx_buffer(rx);
        if let Some(reply) = reply {
            let mut tx = net.new_tx_buffer(reply.len());
            tx.packet_mut().copy_from_slice(&reply);
            if net.send(tx).is_ok() {
                counts[0] += 1;
                counts[1] += reply.len();
                if !arp_answered {
                    arp_answered = true;
                    pass("net-arp-reply");
                }
            }
        }
        if let Some(p) = payload {
            check!(
                "net-rx",
                p == b"hello from host",
                "payload {:?}",
                core::str::from_utf8(&p)
            );
            println!(
                "NET-COUNTS tx_frames={} tx_bytes={} rx_frames={} rx_bytes={}",
                counts[0], counts[1], counts[2], counts[3]
            );
            if boot.has_token("net_crash") {
                backend_gone();
            }
            return;
        }
    }
}

/// `net_crash` (vhost-user-net): the host kills the backend now; the device must say it
/// needs a reset (status bit 0x40) while the guest goes on (for 5 s more, so the host can ask
/// the VMM's API about it).
fn backend_gone() {
    let Some(l) = find(DeviceType::Network)
        .into_iter()
        .next()
        .and_then(Layout::find)
    else {
        return;
    };
    println!("NET waiting for the backend to go");
    let mut waited = 0;
    while l.status() & 0x40 == 0 && waited < 30_000 {
        smp::delay_us(10_000);
        waited += 10;
    }
    let status = l.status();
    check!(
        "net-needs-reset",
        status & 0x40 != 0,
        "status {status:#x} after {waited} ms"
    );
    // The host asks the VMM's API about the VM meanwhile.
    println!("NET running on without a backend");
    smp::delay_us(5_000_000);
}

/// `test=net-bench` (same arguments as `test=net`): sends 300 1514-byte UDP frames to the host
/// side with `virtio-drivers` (one frame at a time, each waited for; every frame's buffer stays
/// in the 1 MiB bump heap, hence so few),
/// between `NET-BENCH tx start` and `NET-BENCH tx done <frames> <bytes>` lines, which the host
/// times.
pub fn scenario_net_bench(boot: &BootInfo) {
    let Some(Setup {
        ip,
        host_ip,
        host_mac,
        mut net,
    }) = setup(boot)
    else {
        return;
    };
    let mac = net.mac_address();
    let frame = udp_frame(mac, host_mac, ip, host_ip, &[0x5a; 1472]);
    println!("NET-BENCH tx start");
    let (t0, mut n) = (crate::svc::rdtsc(), 0u64);
    while n < 300 && crate::svc::rdtsc() - t0 < 1_000_000 * crate::smp::TSC_PER_US {
        let mut tx = net.new_tx_buffer(frame.len());
        tx.packet_mut().copy_from_slice(&frame);
        if let Err(e) = net.send(tx) {
            fail("net-bench", format_args!("{e}"));
            return;
        }
        n += 1;
    }
    println!("NET-BENCH tx done {n} {}", n * frame.len() as u64);
    pass("net-bench");
}

/// `test=net-mq` (same arguments as `test=net`): what `virtio-drivers` cannot do, driven by
/// hand on the second queue pair. The guest negotiates MQ, CTRL_VQ, MRG_RXBUF, CSUM and
/// GUEST_CSUM, sets up only receive and transmit queue 1 and the control queue, turns on two
/// pairs (VQ_PAIRS_SET), sends `hello from pair 1` on transmit queue 1 with its UDP checksum
/// left to the device (NEEDS_CSUM; again every 500 ms until an answer), and waits for the
/// host's answer on receive queue 1, the only one with buffers: `ANSWER_LEN` bytes, so with
/// 256-byte buffers it must arrive merged over several. A device that does not offer
/// MRG_RXBUF (vhost-user-net with our backend) gets two 2 KiB buffers instead, and the answer
/// must come in one (`net-mq-rx-single`). The host side needs no ARP (it has a static neighbour
/// entry), and the TAP steers the answer to the queue the flow came from.
pub fn scenario_net_mq(boot: &BootInfo) {
    const CSUM: u64 = 1 << 0;
    const GUEST_CSUM: u64 = 1 << 1;
    const MAC: u64 = 1 << 5;
    const MRG_RXBUF: u64 = 1 << 15;
    const CTRL_VQ: u64 = 1 << 17;
    const MQ: u64 = 1 << 22;
    const WANT: u64 = CSUM | GUEST_CSUM | MAC | CTRL_VQ | MQ;
    let Some(Addresses {
        ip,
        host_ip,
        host_mac,
        df,
    }) = addresses(boot)
    else {
        return;
    };
    let Some(l) = Layout::find(df) else { return };
    let offered = l.device_features();
    let pairs = r16(l.device + 8);
    println!("INFO net features {offered:#x}, {pairs} queue pairs");
    let mrg = offered & MRG_RXBUF != 0;
    // Small buffers to merge into, or two that each hold the answer (one page in all).
    let (rx_buf, rx_count): (u64, u16) = if mrg { (256, QSIZE) } else { (2048, 2) };
    if offered & WANT != WANT || pairs < 2 {
        fail(
            "net-mq-offered",
            format_args!("features {offered:#x}, {pairs} pairs"),
        );
        return;
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = r8(l.device + i as u64);
    }
    let features = VERSION_1 | WANT | if mrg { MRG_RXBUF } else { 0 };
    let Some(mut qs) = l.start("net-mq-setup", features, &[2, 3, 2 * pairs]) else {
        return;
    };
    let (mut ctrl, mut tx, mut rx) = (qs.pop().unwrap(), qs.pop().unwrap(), qs.pop().unwrap());
    // VQ_PAIRS_SET 2: class MQ (4), command 0, then the ack the device writes.
    let (cmd, ack) = (ctrl.buf, ctrl.buf + 0x100);
    w8(cmd, 4);
    w8(cmd + 1, 0);
    w16(cmd + 2, 2);
    w8(ack, 0xee);
    ctrl.set_desc(0, cmd, 4, F_NEXT, 1);
    ctrl.set_desc(1, ack, 1, F_WRITE, 0);
    let answered = ctrl.submit(0);
    let a = r8(ack);
    check!(
        "net-mq-ctrl",
        answered && a == 0,
        "answered={answered} ack={a:#x}"
    );
    // Every receive buffer of the queue, small.
    for i in 0..rx_count {
        rx.set_desc(i, rx.buf + rx_buf * u64::from(i), rx_buf as u32, F_WRITE, 0);
        rx.publish(i);
    }
    let mut frame = udp_frame(mac, host_mac, ip, host_ip, b"hello from pair 1");
    // The checksum left to the device: the field holds the pseudo-header's sum (its first 12
    // bytes, without the datagram).
    let partial = !checksum(&pseudo_header(ip, host_ip, &frame[34..])[..12]);
    frame[40..42].copy_from_slice(&partial.to_be_bytes());
    let mut packet = VirtioNetHdr {
        flags: 1,
        csum_start: 34,
        csum_offset: 6,
        ..Default::default()
    }
    .bytes()
    .to_vec();
    packet.extend_from_slice(&frame);
    copy_to(tx.buf, &packet);
    tx.set_desc(0, tx.buf, packet.len() as u32, 0, 0);
    let sent = send(&mut tx);
    check!("net-mq-tx", sent, "transmit queue 1 returned no buffer");
    for _ in 0..40 {
        let Some(first) = rx.wait_used(500) else {
            send(&mut tx);
            continue;
        };
        // The first buffer's header says how many buffers the frame took.
        let mut bufs = alloc::vec![first];
        let base = rx.buf;
        let at = move |id: u32| base + rx_buf * u64::from(id);
        let hdr = VirtioNetHdr::read(at(first.0));
        while bufs.len() < usize::from(hdr.num_buffers) {
            match rx.wait_used(1000) {
                Some(b) => bufs.push(b),
                None => break,
            }
        }
        let mut f: Vec<u8> = Vec::new();
        for (k, &(id, len)) in bufs.iter().enumerate() {
            let skip = if k == 0 { VirtioNetHdr::LEN } else { 0 };
            f.extend((skip as u64..u64::from(len)).map(|i| r8(at(id) + i)));
        }
        for &(id, _) in &bufs {
            rx.publish(id as u16);
        }
        let Some(p) = udp_payload(ip, &f) else {
            println!("INFO net-mq: other frame ({} bytes)", f.len());
            continue;
        };
        println!(
            "INFO net-mq: answer in {} buffers, header {hdr:?}",
            bufs.len()
        );
        check!(
            "net-mq-rx",
            p.len() == ANSWER_LEN && p.starts_with(b"hello to pair 1") && answer_tail_ok(p),
            "{} bytes: {:?}",
            p.len(),
            core::str::from_utf8(&p[..p.len().min(15)])
        );
        if mrg {
            check!(
                "net-mq-rx-merged",
                usize::from(hdr.num_buffers) == bufs.len() && bufs.len() > 1,
                "num_buffers {}, {} buffers",
                hdr.num_buffers,
                bufs.len()
            );
        } else {
            check!(
                "net-mq-rx-single",
                hdr.num_buffers == 1 && bufs.len() == 1,
                "num_buffers {}, {} buffers",
                hdr.num_buffers,
                bufs.len()
            );
        }
        let csum = rx_checksum_ok(&hdr, host_ip, ip, &mut f);
        check!("net-mq-rx-csum", csum, "header {hdr:?}");
        l.set_status(0);
        return;
    }
    fail(
        "net-mq-rx",
        format_args!("nothing for this guest on receive queue 1 in 20 s"),
    );
}

/// The length of the host's answer in `test=net-mq`: `hello to pair 1`, then byte i (from 15)
/// is `i % 251`.
const ANSWER_LEN: usize = 1000;

fn answer_tail_ok(p: &[u8]) -> bool {
    p.iter()
        .enumerate()
        .skip(15)
        .all(|(i, &b)| b == (i % 251) as u8)
}

/// The UDP pseudo-header followed by the datagram `udp`, for its checksum.
fn pseudo_header(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&[0, 17]);
    v.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    v.extend_from_slice(udp);
    v
}

/// Whether the received frame `f` (Ethernet, IPv4, UDP) has a good checksum as its virtio
/// header describes it: DATA_VALID (the host checked it), NEEDS_CSUM (the field holds the
/// pseudo-header's sum; completed here over `csum_start..` and stored at `csum_offset`), or
/// neither (a full checksum, or none).
fn rx_checksum_ok(hdr: &VirtioNetHdr, src: [u8; 4], dst: [u8; 4], f: &mut [u8]) -> bool {
    const NEEDS_CSUM: u8 = 1;
    const DATA_VALID: u8 = 2;
    if hdr.flags & DATA_VALID != 0 {
        return true;
    }
    if hdr.flags & NEEDS_CSUM != 0 {
        let (start, off) = (usize::from(hdr.csum_start), usize::from(hdr.csum_offset));
        if start != 34 || off != 6 || f.len() < start + off + 2 {
            return false;
        }
        let c = checksum(&f[start..]);
        f[start + off..start + off + 2].copy_from_slice(&c.to_be_bytes());
    }
    let udp = &f[34..];
    let field = u16::from_be_bytes([udp[6], udp[7]]);
    // Over the pseudo-header and the datagram with its checksum, a good sum is all ones.
    field == 0 || checksum(&pseudo_header(src, dst, udp)) == 0
}

/// `virtio_net_hdr_v1` (12 bytes, little endian).
#[derive(Debug, Default)]
struct VirtioNetHdr {
    flags: u8,
    csum_start: u16,
    csum_offset: u16,
    num_buffers: u16,
}

impl VirtioNetHdr {
    const LEN: usize = 12;

    fn bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.flags;
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    fn read(at: u64) -> VirtioNetHdr {
        let u16_at = |o: u64| u16::from_le_bytes([r8(at + o), r8(at + o + 1)]);
        VirtioNetHdr {
            flags: r8(at),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

fn copy_to(at: u64, data: &[u8]) {
    for (i, &b) in data.iter().enumerate() {
        w8(at + i as u64, b);
    }
}

/// Sends the frame that descriptor 0 of `tx` holds; whether the device returned it.
fn send(tx: &mut RawQueue) -> bool {
    tx.publish(0);
    tx.wait_used(1000).is_some()
}
