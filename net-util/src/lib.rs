//! Host networking for virtio-net: TAP devices (with the virtio-net header) and MAC addresses.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Bytes of `struct virtio_net_hdr_v1`, which the TAP prepends to every frame.
pub const VNET_HDR_LEN: usize = 12;

const IFNAMSIZ: usize = 16;
const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("TAP interface name {0:?} is longer than 15 bytes or contains a NUL")]
    BadName(String),
    #[error("cannot create TAP interface {name:?}: {source}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot configure TAP interface {name}: {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most b.len() bytes into b.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
                ^ u128::from(std::process::id());
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        MacAddr(b)
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address (xx:xx:xx:xx:xx:xx)"));
        }
        let mut b = [0u8; 6];
        for (o, p) in b.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address (xx:xx:xx:xx:xx:xx)"));
            }
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (xx:xx:xx:xx:xx:xx)"))?;
        }
        if b[0] & 1 != 0 {
            return Err(format!("{s:?} is a multicast address"));
        }
        Ok(MacAddr(b))
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// `struct ifreq`: the name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn sockaddr_in(&mut self, ip: Ipv4Addr) {
        // struct sockaddr_in: family (host order u16), port, address (network order).
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&ip.octets());
    }
}

/// A TAP interface: frames carry a 12-byte virtio-net header, no offloads are enabled.
/// The interface goes away when this is dropped (it is not persistent).
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_err(name: &str, what: &'static str) -> TapError {
    TapError::Configure {
        name: name.to_string(),
        what,
        source: io::Error::last_os_error(),
    }
}

impl Tap {
    /// Creates (or attaches to) TAP interface `name`; `None` lets the kernel pick `vmtapN`.
    pub fn open(name: Option<&str>) -> Result<Tap, TapError> {
        let wanted = name.unwrap_or("vmtap%d");
        if wanted.len() >= IFNAMSIZ || wanted.contains('\0') || wanted.is_empty() {
            return Err(TapError::BadName(wanted.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(wanted);
        req.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Create {
                name: wanted.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| wanted.to_string());
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(ioctl_err(&name, "TUNSETVNETHDRSZ"));
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(ioctl_err(&name, "TUNSETOFFLOAD"));
        }
        Ok(Tap { file, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn with_socket(
        &self,
        what: &'static str,
        f: impl FnOnce(RawFd) -> libc::c_int,
    ) -> Result<(), TapError> {
        // SAFETY: plain socket(2); the fd is owned below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(ioctl_err(&self.name, what));
        }
        // SAFETY: `s` is a fresh fd nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        if f(sock.as_raw_fd()) < 0 {
            return Err(ioctl_err(&self.name, what));
        }
        Ok(())
    }

    /// Gives the host side an IPv4 address and netmask.
    pub fn set_ip(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        self.with_socket("SIOCSIFADDR", |s| {
            let mut r = IfReq::new(&self.name);
            r.sockaddr_in(ip);
            // SAFETY: SIOCSIFADDR reads an ifreq.
            unsafe { libc::ioctl(s, libc::SIOCSIFADDR, &r) }
        })?;
        self.with_socket("SIOCSIFNETMASK", |s| {
            let mut r = IfReq::new(&self.name);
            r.sockaddr_in(mask);
            // SAFETY: SIOCSIFNETMASK reads an ifreq.
            unsafe { libc::ioctl(s, libc::SIOCSIFNETMASK, &r) }
        })
    }

    /// Sets the host side's MAC address.
    pub fn set_mac(&self, mac: MacAddr) -> Result<(), TapError> {
        self.with_socket("SIOCSIFHWADDR", |s| {
            let mut r = IfReq::new(&self.name);
            // struct sockaddr: family ARPHRD_ETHER (1), then the address.
            r.data[..2].copy_from_slice(&1u16.to_ne_bytes());
            r.data[2..8].copy_from_slice(&mac.0);
            // SAFETY: SIOCSIFHWADDR reads an ifreq.
            unsafe { libc::ioctl(s, libc::SIOCSIFHWADDR, &r) }
        })
    }

    /// Sets the MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        self.with_socket("SIOCSIFMTU", |s| {
            let mut r = IfReq::new(&self.name);
            r.data[..4].copy_from_slice(&i32::from(mtu).to_ne_bytes());
            // SAFETY: SIOCSIFMTU reads an ifreq.
            unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &r) }
        })
    }

    /// Brings the interface up.
    pub fn up(&self) -> Result<(), TapError> {
        self.with_socket("SIOCSIFFLAGS", |s| {
            let mut r = IfReq::new(&self.name);
            // SAFETY: SIOCGIFFLAGS fills the ifreq.
            if unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut r) } < 0 {
                return -1;
            }
            let flags = i16::from_ne_bytes([r.data[0], r.data[1]])
                | libc::IFF_UP as i16
                | libc::IFF_RUNNING as i16;
            r.data[..2].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: SIOCSIFFLAGS reads the ifreq.
            unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &r) }
        })
    }

    /// Reads one frame (header included) into `iov`; `WouldBlock` when there is none.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for the whole call.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs describe writable memory.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (header included) from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs describe readable memory.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
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

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "52:54:00:12:34:ab".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0xab]);
        assert_eq!(m.to_string(), "52:54:00:12:34:ab");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:zz",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:ab",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let r = MacAddr::random();
        assert_eq!(r.0[0] & 3, 2);
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(matches!(
            Tap::open(Some("a-name-that-is-too-long")),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(Tap::open(Some("")), Err(TapError::BadName(_))));
    }
}
