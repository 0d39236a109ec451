//! `test=net`: virtio-net through `virtio-drivers`. The guest sends a UDP datagram to the host
//! side of the TAP, answers the host's ARP request for its own address, and waits for the
//! host's UDP answer.

use alloc::vec::Vec;

use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::rawq::{r16, r8, w16, w8, Layout, RawQueue, F_NEXT, F_WRITE, VERSION_1};
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

fn udp_frame(
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
struct Setup {
    ip: [u8; 4],
    host_ip: [u8; 4],
    host_mac: [u8; 6],
    net: VirtIONet<GuestHal, PciTransport, 16>,
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
fn setup(boot: &BootInfo) -> Option<Setup> {
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
            return;
        }
    }
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

/// `test=net-mq` (same arguments as `test=net`): the second queue pair, which `virtio-drivers`
/// cannot use, driven by hand. The guest negotiates MQ and CTRL_VQ, sets up only receive and
/// transmit queue 1 and the control queue, turns on two pairs (VQ_PAIRS_SET), sends
/// `hello from pair 1` on transmit queue 1 (again every 500 ms until an answer), and waits for
/// the host's `hello to pair 1` on receive queue 1, the only one with buffers. The host side
/// needs no ARP (it has a static neighbour entry), and the TAP steers the answer to the queue
/// the flow came from.
pub fn scenario_net_mq(boot: &BootInfo) {
    const MAC: u64 = 1 << 5;
    const CTRL_VQ: u64 = 1 << 17;
    const MQ: u64 = 1 << 22;
    /// virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
    /// num_buffers.
    const HDR: usize = 12;
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
    if offered & (MAC | CTRL_VQ | MQ) != MAC | CTRL_VQ | MQ || pairs < 2 {
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
    let Some(mut qs) = l.start(
        "net-mq-setup",
        VERSION_1 | MAC | CTRL_VQ | MQ,
        &[2, 3, 2 * pairs],
    ) else {
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
    // Two receive buffers on receive queue 1, each large enough for a whole frame.
    for i in 0..2u16 {
        rx.set_desc(i, rx.buf + 2048 * u64::from(i), 2048, F_WRITE, 0);
        rx.publish(i);
    }
    let frame = udp_frame(mac, host_mac, ip, host_ip, b"hello from pair 1");
    let mut packet = alloc::vec![0u8; HDR];
    packet.extend_from_slice(&frame);
    copy_to(tx.buf, &packet);
    tx.set_desc(0, tx.buf, packet.len() as u32, 0, 0);
    let sent = send(&mut tx);
    check!("net-mq-tx", sent, "transmit queue 1 returned no buffer");
    for _ in 0..40 {
        if let Some((id, len)) = rx.wait_used(500) {
            let at = rx.buf + 2048 * u64::from(id);
            let f: Vec<u8> = (HDR as u64..u64::from(len)).map(|i| r8(at + i)).collect();
            match udp_payload(ip, &f) {
                Some(p) => {
                    check!(
                        "net-mq-rx",
                        p == b"hello to pair 1",
                        "payload {:?}",
                        core::str::from_utf8(p)
                    );
                    l.set_status(0);
                    return;
                }
                None => println!("INFO net-mq: other frame ({} bytes)", f.len()),
            }
            if id < 2 {
                rx.publish(id as u16);
            }
        } else {
            send(&mut tx);
        }
    }
    fail(
        "net-mq-rx",
        format_args!("nothing for this guest on receive queue 1 in 20 s"),
    );
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
