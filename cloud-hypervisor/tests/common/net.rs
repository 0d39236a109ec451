//! The test guest's network scenarios (`test=net`, `test=net-mq`) over a TAP in a network
//! namespace of the test's own: the addresses both ends use, the namespace, and the host end of
//! the guest's UDP exchange.

use std::net::UdpSocket;
use std::process::Child;
use std::time::{Duration, Instant};

pub const HOST_IP: &str = "192.168.100.1";
pub const GUEST_IP: &str = "192.168.100.2";
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
pub const HOST_MAC: &str = "52:54:00:65:43:21";

/// The guest's command line for the network scenario `test`, with the addresses above.
pub fn cmdline(test: &str) -> String {
    format!(
        "test={test} net_ip={GUEST_IP} net_host_ip={HOST_IP} net_host_mac={HOST_MAC} \
         net_mac={GUEST_MAC}"
    )
}

/// Runs `f` on a thread moved into a network namespace of its own (the processes it starts
/// inherit it), so nothing there can reach or collide with the machine's networks; IPv6 is off
/// on the interfaces created there (no chatter on a TAP).
pub fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare only moves the calling thread into a new network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) failed (these tests run as root): {}",
            std::io::Error::last_os_error()
        );
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
        f()
    })
    .join()
    .unwrap();
}

/// Whether the interface `name` is in the calling thread's network namespace.
pub fn has_interface(name: &str) -> bool {
    std::fs::read_to_string("/proc/thread-self/net/dev")
        .unwrap()
        .contains(&format!("{name}:"))
}

/// The host end of the guest's UDP exchange (`HOST_IP`:5001, 20 s read timeout). Bind it once
/// the TAP has its address: binding alone proves nothing (this kernel lets a UDP socket bind an
/// address no interface has).
pub fn host_socket() -> UdpSocket {
    let sock = UdpSocket::bind(format!("{HOST_IP}:5001")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    sock
}

/// Waits (10 s at most) for the TAP `tap`, then binds `host_socket`.
pub fn host_socket_on(tap: &str) -> UdpSocket {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_interface(tap) {
        assert!(Instant::now() < deadline, "no TAP {tap} after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    host_socket()
}

/// Receives one datagram on `sock` and checks it is `want`: its sender.
pub fn expect_datagram(sock: &UdpSocket, want: &[u8]) -> std::net::SocketAddr {
    let mut buf = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut buf)
        .expect("no datagram from the guest");
    assert_eq!(&buf[..n], want, "{:?}", String::from_utf8_lossy(&buf[..n]));
    from
}

/// Receives one datagram on `sock` and checks it is `want`, from the guest's port.
pub fn expect_from_guest(sock: &UdpSocket, want: &[u8]) {
    let from = expect_datagram(sock, want);
    assert_eq!(from.to_string(), format!("{GUEST_IP}:5000"));
}

/// Sends `msg` to the guest's port up to five times, 200 ms apart, until the VMM exits.
pub fn answer_guest(sock: &UdpSocket, vmm: &mut Child, msg: &[u8]) {
    for _ in 0..5 {
        sock.send_to(msg, format!("{GUEST_IP}:5000")).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        if let Ok(Some(_)) = vmm.try_wait() {
            break;
        }
    }
}

/// Gives the host end a permanent ARP entry for the guest on `tap` (SIOCSARP), so that it
/// sends to the guest without asking first (the guest's `net-mq` answers no ARP).
pub fn static_arp_entry(sock: &UdpSocket, tap: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: arpreq is plain data; zero is a valid value for every field.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let ip: std::net::Ipv4Addr = GUEST_IP.parse().unwrap();
    let pa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in the sockaddr it is copied over (both 16 bytes).
    unsafe { std::ptr::write((&mut req.arp_pa as *mut libc::sockaddr).cast(), pa) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (i, b) in GUEST_MAC.split(':').enumerate() {
        req.arp_ha.sa_data[i] = u8::from_str_radix(b, 16).unwrap() as libc::c_char;
    }
    req.arp_flags = libc::ATF_PERM | libc::ATF_COM;
    for (i, b) in tap.bytes().enumerate() {
        req.arp_dev[i] = b as libc::c_char;
    }
    // SAFETY: SIOCSARP reads one arpreq; the socket is open.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP, &req) };
    assert_eq!(ret, 0, "SIOCSARP: {}", std::io::Error::last_os_error());
}

/// The host's side of the guest's `net-mq` scenario: pair 1's datagram in, a static ARP entry
/// for the guest on `tap` (it answers no ARP there), and a 1000-byte answer sent back until
/// the VMM exits (`answer_guest`).
pub fn net_mq_exchange(sock: &UdpSocket, vmm: &mut Child, tap: &str) {
    expect_from_guest(sock, b"hello from pair 1");
    static_arp_entry(sock, tap);
    let mut answer = b"hello to pair 1".to_vec();
    answer.extend((15..1000).map(|i| (i % 251) as u8));
    answer_guest(sock, vmm, &answer);
}
