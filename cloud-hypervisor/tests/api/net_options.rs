//! The original README's `--net "tap=,mac=,ip=,mask="`: empty values mean not given, so the VMM
//! creates a TAP the kernel names (`vmtapN`), gives the guest a random MAC (recorded in
//! `vm.info`, first byte 0x2e as the original's) and leaves the host side without an address.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::common::guest;
use crate::helpers::{require_curl, Vmm};

/// Runs `f` in a thread of its own in a new network namespace, which the VMMs it starts
/// inherit: everything network happens there.
fn in_private_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(|| {
        // SAFETY: unshare only moves the calling thread into a new network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
        f();
    })
    .join()
    .unwrap();
}

#[test]
fn net_with_empty_values_gets_a_kernel_named_tap_and_a_random_mac() {
    require_curl();
    in_private_netns(empty_net_values_in_private_netns);
}

fn empty_net_values_in_private_netns() {
    let kernel = guest().elf_pvh.display().to_string();
    // The guest's `test=net` sends a UDP datagram to the host every 500 ms from its MAC.
    let vmm = Vmm::start(
        "net-empty-values",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=net net_ip=10.0.0.2 net_host_ip=10.0.0.1 net_host_mac=52:54:00:00:00:01",
            "--memory",
            "size=256M",
            "--serial",
            "null",
            "--console",
            "off",
            "--net",
            "tap=,mac=,ip=,mask=",
        ],
    );
    let tap = wait_for_interface("vmtap", Duration::from_secs(10));
    assert_eq!(
        tap, "vmtap0",
        "the kernel's first name from the original's template"
    );
    assert!(
        ipv4_addresses(&tap).is_empty(),
        "{tap} has a host address: {:?}",
        ipv4_addresses(&tap)
    );

    let info = vmm.ok_json("vm.info");
    let net = &info["config"]["net"][0];
    for absent in ["tap", "ip", "mask"] {
        assert!(net.get(absent).is_none(), "{absent} in {net}");
    }
    assert_eq!(net["id"], "_net0", "{net}");
    let mac = net["mac"]
        .as_str()
        .unwrap_or_else(|| panic!("no mac in {net}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    assert_eq!(bytes.len(), 6, "{mac}");
    assert_eq!(
        bytes[0], 0x2e,
        "locally administered unicast, as the original's: {mac}"
    );
    assert!(bytes[1..].iter().any(|&b| b != 0), "{mac}");

    // The guest sends from the MAC vm.info reports.
    let src = guest_frame_source(&tap, Duration::from_secs(15));
    assert_eq!(
        src,
        bytes.as_slice(),
        "the guest's frames come from {src:02x?}, not {mac}"
    );
    // vm.info keeps the same MAC (chosen once, at boot).
    assert_eq!(vmm.ok_json("vm.info")["config"]["net"][0]["mac"], mac);
}

/// The first interface whose name starts with `prefix`, once it shows in this namespace.
fn wait_for_interface(prefix: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        if let Some(name) = dev
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, _)| n.trim())
            .find(|n| n.starts_with(prefix))
        {
            return name.to_string();
        }
        assert!(Instant::now() < deadline, "no {prefix}* interface:\n{dev}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The IPv4 addresses of interface `name`.
fn ipv4_addresses(name: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    assert_eq!(unsafe { libc::getifaddrs(&mut list) }, 0);
    let mut p = list;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; names are NUL-terminated.
        let ifa = unsafe { &*p };
        let this = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr, when set, points at a sockaddr of its family.
        if this.to_bytes() == name.as_bytes()
            && !ifa.ifa_addr.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// The source MAC of the first IPv4 frame the guest sends out of `tap` (seen with a packet
/// socket on the host side).
fn guest_frame_source(tap: &str, timeout: Duration) -> [u8; 6] {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(tap).unwrap();
    // SAFETY: reads the NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(ifindex, 0, "{tap}");
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: binds the socket we own to an address of the right size.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no IPv4 frame from the guest on {tap}");
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(200) as i32) };
        // SAFETY: reads into our buffer without blocking.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 14 && buf[12..14] == [0x08, 0x00] {
            let mut src = [0u8; 6];
            src.copy_from_slice(&buf[6..12]);
            return src;
        }
    }
}

/// `ip=`/`mask=` may be IPv6, as in the original: the new TAP gets the address and prefix.
#[test]
fn net_with_an_ipv6_host_address() {
    require_curl();
    in_private_netns(|| {
        let kernel = guest().elf_pvh.display().to_string();
        let vmm = Vmm::start(
            "net-ipv6",
            &[
                "--kernel",
                &kernel,
                "--cmdline",
                "test=wait",
                "--memory",
                "size=128M",
                "--serial",
                "null",
                "--console",
                "off",
                "--net",
                "ip=fd00:1234::1,mask=ffff:ffff:ffff:ff00::",
            ],
        );
        let tap = wait_for_interface("vmtap", Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        let line = loop {
            let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap();
            if let Some(l) = table
                .lines()
                .find(|l| l.ends_with(tap.as_str()) && l.starts_with("fd001234"))
            {
                break l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no fd00:1234::1 on {tap}:\n{table}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], "fd001234000000000000000000000001");
        assert_eq!(f[2], "38", "prefix length 56: {line}");
        let info = vmm.ok_json("vm.info");
        assert_eq!(info["config"]["net"][0]["ip"], "fd00:1234::1");
    });
}
