//! Linux tap devices: create or attach by name (one fd per queue), virtio-net headers,
//! offloads, and the host-side address.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use crate::MacAddr;

/// Size of `virtio_net_hdr_v1`, which the tap prepends to every frame.
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap name '{0}' is longer than 15 bytes or contains a NUL")]
    BadName(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("cannot create or attach tap '{name}': {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("descriptor {fd}: {reason}")]
    BadFd { fd: i32, reason: String },
    #[error("tap '{name}': {op} failed: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Offloads the guest negotiated, to mirror on the tap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub ufo: bool,
}

impl Offloads {
    fn flags(self) -> libc::c_uint {
        let mut f = 0;
        if self.csum {
            f |= libc::TUN_F_CSUM;
            if self.tso4 {
                f |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                f |= libc::TUN_F_TSO6;
            }
            if self.tso_ecn {
                f |= libc::TUN_F_TSO_ECN;
            }
            if self.ufo {
                f |= libc::TUN_F_UFO;
            }
        }
        f
    }
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the API is meant
    // to be used.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The TAP requests of a running device, for the seccomp filters of the threads that make
/// them: the receive offloads (TUNSETOFFLOAD: the driver's start and reset of the device, the
/// control queue's GUEST_OFFLOADS_SET) and which queues of a multi-queue TAP are attached
/// (TUNSETQUEUE: the same, and the control queue's VQ_PAIRS_SET). Opening and setting up a
/// TAP (TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ, its interface's SIOC* requests) is the control
/// loop's work.
pub const RUNNING_TAP_IOCTLS: &[u64] = &[libc::TUNSETOFFLOAD, libc::TUNSETQUEUE];

impl Tap {
    /// Opens `num_queues` queues of the tap `name` (an empty name lets the kernel pick
    /// `tapN`, a template such as `vmtap%d` the first free number), creating it if it does not
    /// exist, with virtio-net headers on every frame.
    pub fn open(name: &str, num_queues: usize) -> Result<Vec<Tap>, TapError> {
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if num_queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut taps = Vec::with_capacity(num_queues);
        let mut name = name.to_string();
        for _ in 0..num_queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = ifreq_for(&name)?;
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq we own.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if ret < 0 {
                return Err(TapError::Attach {
                    name,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
            name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            let tap = Tap {
                file,
                name: name.clone(),
            };
            tap.set_vnet_hdr_len(VNET_HDR_LEN)?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// The queues of a TAP someone else opened (`--net fd=`, a restore's `net_fds`): each
    /// descriptor is duplicated (the given one stays the caller's), must be a TAP opened with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (IFF_MULTI_QUEUE for several), and is made
    /// non-blocking.
    pub fn from_fds(fds: &[i32]) -> Result<Vec<Tap>, TapError> {
        let mut taps = Vec::with_capacity(fds.len());
        for &fd in fds {
            let bad = |reason: String| TapError::BadFd { fd, reason };
            // SAFETY: F_DUPFD_CLOEXEC on any number is harmless; a negative answer is an error.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if new < 0 {
                return Err(bad(format!("not open: {}", io::Error::last_os_error())));
            }
            // SAFETY: `new` is a fresh descriptor nobody else owns.
            let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(new) };
            // SAFETY: ifreq is plain data; all zeros is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            // SAFETY: TUNGETIFF writes the ifreq we own.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
                return Err(bad(format!("not a TAP: {}", io::Error::last_os_error())));
            }
            // SAFETY: TUNGETIFF wrote the flags into the union's flags member.
            let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
            let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            if flags & wanted != wanted {
                return Err(bad(format!(
                    "the TAP must be opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR (flags \
                     {flags:#x})"
                )));
            }
            if fds.len() > 1 && flags & libc::IFF_MULTI_QUEUE == 0 {
                return Err(bad("several queues need a TAP with IFF_MULTI_QUEUE".into()));
            }
            // SAFETY: O_NONBLOCK on our own descriptor.
            unsafe {
                let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            // SAFETY: the kernel wrote a NUL-terminated name into ifr_name.
            let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
                .to_string_lossy()
                .into_owned();
            let tap = Tap { file, name };
            tap.set_vnet_hdr_len(VNET_HDR_LEN)?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Fuzzing only (the `fuzz/` crate): a queue over any file, e.g. one end of a datagram
    /// socket pair standing for the TAP, with no checks; TAP ioctls on it fail.
    #[doc(hidden)]
    pub fn fuzz_from_file(file: File) -> Tap {
        Tap {
            file,
            name: "fuzz".into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether an interface `name` exists in this network namespace (a name template such as
    /// `vmtap%d` names none).
    pub fn exists(name: &str) -> bool {
        let Ok(c) = std::ffi::CString::new(name) else {
            return false;
        };
        // SAFETY: if_nametoindex reads the NUL-terminated name we own.
        unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
    }

    fn tun_ioctl(
        &self,
        op: &'static str,
        req: libc::Ioctl,
        arg: libc::c_ulong,
    ) -> Result<(), TapError> {
        // SAFETY: the tun ioctls we issue take an integer or a pointer to an int we own.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) };
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let len = len as libc::c_int;
        self.tun_ioctl(
            "TUNSETVNETHDRSZ",
            libc::TUNSETVNETHDRSZ,
            &len as *const _ as libc::c_ulong,
        )
    }

    pub fn set_offloads(&self, o: Offloads) -> Result<(), TapError> {
        self.tun_ioctl(
            "TUNSETOFFLOAD",
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(o.flags()),
        )
    }

    /// Attaches (`true`) or detaches this queue of a multi-queue tap: the kernel only steers
    /// frames to attached queues.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as libc::c_short;
        self.tun_ioctl(
            "TUNSETQUEUE",
            libc::TUNSETQUEUE,
            &mut ifr as *mut libc::ifreq as libc::c_ulong,
        )
    }

    /// Runs a SIOC* request on the interface through a throwaway AF_INET socket.
    fn if_ioctl(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        ifr: &mut libc::ifreq,
    ) -> Result<(), TapError> {
        self.sock_ioctl(libc::AF_INET, op, req, (ifr as *mut libc::ifreq).cast())
    }

    /// Runs a SIOC* request with argument `arg` through a throwaway socket of `family`.
    fn sock_ioctl(
        &self,
        family: libc::c_int,
        op: &'static str,
        req: libc::c_ulong,
        arg: *mut libc::c_void,
    ) -> Result<(), TapError> {
        let err = |source| TapError::Ioctl {
            name: self.name.clone(),
            op,
            source,
        };
        // SAFETY: plain socket creation; the fd is owned right away.
        let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the caller's `arg` is the structure `req` reads or writes, owned by it for
        // the whole call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn set_ip(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        ifr.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.if_ioctl("SIOCSIFADDR", libc::SIOCSIFADDR, &mut ifr)?;
        let mut ifr = ifreq_for(&self.name)?;
        ifr.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.if_ioctl("SIOCSIFNETMASK", libc::SIOCSIFNETMASK, &mut ifr)
    }

    /// Adds an IPv6 address with a prefix of `prefix_len` bits to the interface.
    pub fn set_ipv6(&self, ip: Ipv6Addr, prefix_len: u8) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        self.if_ioctl("SIOCGIFINDEX", libc::SIOCGIFINDEX, &mut ifr)?;
        // The kernel's `struct in6_ifreq` (linux/ipv6.h), which libc does not define.
        #[repr(C)]
        struct In6Ifreq {
            addr: libc::in6_addr,
            prefix_len: u32,
            ifindex: libc::c_int,
        }
        let mut req = In6Ifreq {
            addr: libc::in6_addr {
                s6_addr: ip.octets(),
            },
            prefix_len: u32::from(prefix_len),
            // SAFETY: SIOCGIFINDEX filled the ifindex member.
            ifindex: unsafe { ifr.ifr_ifru.ifru_ifindex },
        };
        self.sock_ioctl(
            libc::AF_INET6,
            "SIOCSIFADDR (IPv6)",
            libc::SIOCSIFADDR,
            (&mut req as *mut In6Ifreq).cast(),
        )
    }

    pub fn set_mac(&self, mac: MacAddr) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        // SAFETY: writing the hwaddr member of the union we own.
        unsafe {
            ifr.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in ifr.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac.bytes()) {
                *d = s as libc::c_char;
            }
        }
        self.if_ioctl("SIOCSIFHWADDR", libc::SIOCSIFHWADDR, &mut ifr)
    }

    /// Brings the interface up.
    pub fn enable(&self) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        self.if_ioctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member.
        unsafe {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        self.if_ioctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut ifr)
    }

    /// Reads one frame (with its virtio-net header). `WouldBlock` when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    /// Reads one frame (with its header) straight into `iov` (e.g. guest buffers).
    /// `WouldBlock` when none is queued.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let n = match iov {
            // One buffer: read(2) spares the kernel copying and checking an iovec array, and
            // moves the same bytes (a TAP read is one frame either way). The system call
            // itself: libc's read is a thread cancellation point (two more calls with atomics),
            // which device threads do not use.
            // SAFETY: the caller guarantees the iovec describes writable memory.
            [v] => unsafe {
                libc::syscall(
                    libc::SYS_read,
                    libc::c_long::from(fd),
                    v.iov_base,
                    v.iov_len,
                ) as isize
            },
            // SAFETY: the caller guarantees the iovecs describe writable memory.
            _ => unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as i32) },
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (with its header) gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let n = match iov {
            // One buffer (header and frame together, as Linux guests send them): write(2),
            // one frame either way, without the iovec array import of writev; the system call
            // itself, without libc's cancellation point (see `readv`).
            // SAFETY: the caller guarantees the iovec describes readable memory.
            [v] => unsafe {
                libc::syscall(
                    libc::SYS_write,
                    libc::c_long::from(fd),
                    v.iov_base,
                    v.iov_len,
                ) as isize
            },
            // SAFETY: the caller guarantees the iovecs describe readable memory.
            _ => unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) },
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name)?;
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.if_ioctl("SIOCSIFMTU", libc::SIOCSIFMTU, &mut ifr)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    /// Moves this test thread into a fresh network namespace so the tap and its traffic stay
    /// private to the test.
    fn private_netns() {
        // SAFETY: unshare affects only the calling thread's network namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET): {}",
            io::Error::last_os_error()
        );
    }

    /// Descriptors of TAPs opened elsewhere become queues (duplicated: the originals stay
    /// open); anything else is refused by number.
    #[test]
    fn taps_from_descriptors() {
        std::thread::spawn(|| {
            private_netns();
            let taps = Tap::open("fdtap%d", 2).unwrap();
            let fds: Vec<i32> = taps.iter().map(|t| t.file.as_raw_fd()).collect();
            let again = Tap::from_fds(&fds).unwrap();
            assert_eq!(again.len(), 2);
            assert_eq!(again[0].name(), taps[0].name());
            assert!(again
                .iter()
                .zip(&fds)
                .all(|(t, &fd)| t.file.as_raw_fd() != fd));
            drop(again);
            // The originals are still open.
            Tap::from_fds(&fds[..1]).unwrap();
            let null = File::open("/dev/null").unwrap();
            for (bad, why) in [
                (vec![null.as_raw_fd()], "not a TAP"),
                (vec![9999], "not open"),
            ] {
                let e = Tap::from_fds(&bad).unwrap_err().to_string();
                assert!(e.contains(why), "{e}");
            }
            // A TAP without IFF_VNET_HDR.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap();
            let mut req = ifreq_for("plain%d").unwrap();
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF on our own descriptor and ifreq.
            assert_eq!(
                unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) },
                0
            );
            let e = Tap::from_fds(&[f.as_raw_fd()]).unwrap_err().to_string();
            assert!(e.contains("IFF_VNET_HDR"), "{e}");
        })
        .join()
        .unwrap();
    }

    /// A template names no interface; a created TAP exists under the name the kernel gave it.
    #[test]
    fn exists_sees_interfaces_of_this_namespace() {
        std::thread::spawn(|| {
            private_netns();
            assert!(Tap::exists("lo"));
            assert!(!Tap::exists("vmtap%d"));
            assert!(!Tap::exists("vmtap0"));
            let taps = Tap::open("vmtap%d", 1).expect("creating a tap (needs root)");
            assert_eq!(taps[0].name(), "vmtap0");
            assert!(Tap::exists("vmtap0"));
            assert!(!Tap::exists("bad\0name"));
        })
        .join()
        .unwrap();
    }

    /// The host side of a TAP can have an IPv6 address, as the original's `ip=`/`mask=` allow.
    #[test]
    fn ipv6_host_address() {
        std::thread::spawn(|| {
            private_netns();
            let taps = Tap::open("v6tap%d", 1).expect("creating a tap (needs root)");
            let tap = &taps[0];
            tap.set_ipv6("fd00:1234::1".parse().unwrap(), 64).unwrap();
            tap.enable().unwrap();
            // /proc/net/if_inet6: address (32 hex digits), ifindex, prefix length, scope,
            // flags, interface name.
            // This thread's namespace: /proc/net is the process's (its main thread's).
            let table = std::fs::read_to_string("/proc/thread-self/net/if_inet6").unwrap();
            let line = table
                .lines()
                .find(|l| l.ends_with(tap.name()) && l.starts_with("fd001234"))
                .unwrap_or_else(|| panic!("no fd00:1234::1 on {}:\n{table}", tap.name()));
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f[0], "fd001234000000000000000000000001");
            assert_eq!(f[2], "40", "prefix length 64");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(
            Tap::open("a-name-that-is-far-too-long", 1),
            Err(TapError::BadName(_))
        ));
    }

    #[test]
    fn host_traffic_reaches_the_tap_with_a_vnet_header() {
        std::thread::spawn(|| {
            private_netns();
            let mut taps =
                Tap::open("chtest%d", 2).expect("creating a tap (needs root and /dev/net/tun)");
            assert_eq!(taps.len(), 2);
            assert!(taps[0].name().starts_with("chtest"));
            assert_eq!(taps[0].name(), taps[1].name());
            let tap = &taps[0];
            tap.set_ip(
                Ipv4Addr::new(192, 168, 249, 1),
                Ipv4Addr::new(255, 255, 255, 0),
            )
            .unwrap();
            tap.set_mac("02:00:00:00:00:01".parse().unwrap()).unwrap();
            tap.set_offloads(Offloads {
                csum: true,
                tso4: true,
                ..Default::default()
            })
            .unwrap();
            tap.enable().unwrap();
            // The host ARPs for the peer before sending: an ARP request must come out of the tap.
            let sock = UdpSocket::bind("192.168.249.1:0").unwrap();
            let _ = sock.send_to(b"hello", "192.168.249.2:9");
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            'found: loop {
                for t in taps.iter_mut() {
                    match t.read_frame(&mut buf) {
                        Ok(n) if n > VNET_HDR_LEN + 14 => {
                            let eth = &buf[VNET_HDR_LEN..n];
                            if eth[12..14] == [0x08, 0x06] {
                                // ARP request from our MAC, asking for 192.168.249.2.
                                assert_eq!(&eth[6..12], &[2, 0, 0, 0, 0, 1]);
                                assert_eq!(&eth[14 + 24..14 + 28], &[192, 168, 249, 2]);
                                break 'found;
                            }
                        }
                        _ => {}
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no ARP request came out of the tap"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .join()
        .unwrap();
    }
}
