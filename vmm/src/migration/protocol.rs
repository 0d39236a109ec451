//! The live-migration wire protocol, in the original's framing: every step is a 16-byte request
//! (command as a little-endian u16, six bytes of command headers — the protocol version for
//! Start —, payload length as a u64), its payload, then a 16-byte response (status u16, six bytes
//! of padding, length u64). Memory payloads are a table of `{gpa: u64, length: u64}` ranges
//! followed by the bytes of each range, in table order.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::tls::TlsStream;
use crate::snapshot::MemoryRange;

/// The protocol version this VMM speaks (the original's current one).
pub const PROTOCOL_VERSION: u16 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Start = 1,
    Config = 2,
    State = 3,
    Memory = 4,
    Complete = 5,
    Abandon = 6,
    MemoryFd = 7,
    /// Complete for a VM that was paused at the source: it stays paused here.
    CompletePaused = 8,
    /// Postcopy, on the fault connection: the destination asks for one range (a 16-byte
    /// `{gpa, length}` payload); the answer's length is the bytes that follow it.
    PageFault = 9,
}

impl Command {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Command::Start,
            2 => Command::Config,
            3 => Command::State,
            4 => Command::Memory,
            5 => Command::Complete,
            6 => Command::Abandon,
            7 => Command::MemoryFd,
            8 => Command::CompletePaused,
            9 => Command::PageFault,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub headers: [u8; 6],
    pub length: u64,
}

impl Request {
    pub fn new(command: Command, length: u64) -> Self {
        let mut headers = [0u8; 6];
        if command == Command::Start {
            headers[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        }
        Request {
            command,
            headers,
            length,
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..2].copy_from_slice(&(self.command as u16).to_le_bytes());
        b[2..8].copy_from_slice(&self.headers);
        b[8..].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; 16]) -> io::Result<Self> {
        let cmd = u16::from_le_bytes([b[0], b[1]]);
        let command = Command::from_u16(cmd).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("received request with unknown command {cmd}"),
            )
        })?;
        let mut headers = [0u8; 6];
        headers.copy_from_slice(&b[2..8]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[8..]);
        Ok(Request {
            command,
            headers,
            length: u64::from_le_bytes(len),
        })
    }

    /// For Start: the sender's protocol version.
    pub fn version(&self) -> u16 {
        u16::from_le_bytes([self.headers[0], self.headers[1]])
    }

    pub fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        Self::decode(&b)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    pub length: u64,
}

impl Response {
    pub const STATUS_OK: u16 = 1;
    pub const STATUS_ERROR: u16 = 2;

    pub fn ok() -> Self {
        Response {
            ok: true,
            length: 0,
        }
    }

    pub fn error() -> Self {
        Response {
            ok: false,
            length: 0,
        }
    }

    /// OK, with `length` bytes following (a PageFault's page).
    pub fn ok_with(length: u64) -> Self {
        Response { ok: true, length }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        let status = if self.ok {
            Self::STATUS_OK
        } else {
            Self::STATUS_ERROR
        };
        b[..2].copy_from_slice(&status.to_le_bytes());
        b[8..].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    pub fn read_from(r: &mut impl Read) -> io::Result<Self> {
        let mut b = [0u8; 16];
        r.read_exact(&mut b)?;
        let status = u16::from_le_bytes([b[0], b[1]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[8..]);
        match status {
            Self::STATUS_OK | Self::STATUS_ERROR => Ok(Response {
                ok: status == Self::STATUS_OK,
                length: u64::from_le_bytes(len),
            }),
            s => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("received response with unknown status {s}"),
            )),
        }
    }
}

/// What an additional connection to the destination carries, said in its first two bytes
/// (little-endian) before any request: pre-copy Memory requests, or postcopy's PageFaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Role {
    PrecopyMemory = 1,
    Fault = 2,
}

impl Role {
    pub fn encode(self) -> [u8; 2] {
        (self as u16).to_le_bytes()
    }

    /// The role a connection announces; `None` for any other value (0 is the original's
    /// "invalid").
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Self>> {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        Ok(match u16::from_le_bytes(b) {
            1 => Some(Role::PrecopyMemory),
            2 => Some(Role::Fault),
            _ => None,
        })
    }
}

/// A range table as the wire carries it.
pub fn encode_ranges(ranges: &[MemoryRange]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ranges.len() * 16);
    for r in ranges {
        b.extend_from_slice(&r.gpa.to_le_bytes());
        b.extend_from_slice(&r.length.to_le_bytes());
    }
    b
}

/// Reads a table of `length` bytes; refuses a length that is not whole ranges, or too big to
/// be a table for guest RAM (`max` ranges).
pub fn read_ranges(r: &mut impl Read, length: u64, max: usize) -> io::Result<Vec<MemoryRange>> {
    if !length.is_multiple_of(16) || length / 16 > max as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a memory range table of {length} bytes"),
        ));
    }
    let mut b = vec![0u8; length as usize];
    r.read_exact(&mut b)?;
    Ok(b.chunks_exact(16)
        .map(|c| {
            let mut g = [0u8; 8];
            let mut l = [0u8; 8];
            g.copy_from_slice(&c[..8]);
            l.copy_from_slice(&c[8..]);
            MemoryRange {
                gpa: u64::from_le_bytes(g),
                length: u64::from_le_bytes(l),
            }
        })
        .collect())
}

/// The connection: a Unix or a TCP stream, or TLS over TCP (`tls_dir`).
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Connects to `unix:<path>` or `tcp:<host>:<port>`; with `tls_dir`, in TLS (`tcp:` only;
    /// the receiver's certificate must name `host`).
    pub fn connect(url: &str, tls_dir: Option<&Path>) -> Result<Self, String> {
        let s = match url.split_once(':') {
            Some(("unix", path)) => UnixStream::connect(path).map(Stream::Unix),
            Some(("tcp", addr)) => TcpStream::connect(addr).and_then(|s| {
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a unix: or tcp: URL: {url}"),
            )),
        }
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        match (s, tls_dir) {
            (Stream::Tcp(s), Some(dir)) => {
                let host = url["tcp:".len()..]
                    .rsplit_once(':')
                    .map_or("", |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                TlsStream::client(s, dir, host)
                    .map(|t| Stream::Tls(Box::new(t)))
                    .map_err(|e| format!("{url}: {e}"))
            }
            (Stream::Unix(_), Some(_)) => Err(format!("{url}: TLS goes over tcp: only")),
            (s, _) => Ok(s),
        }
    }

    /// Asks for socket buffers of `bytes` each way (the kernel caps it at `net.core.wmem_max`
    /// / `rmem_max`): a Unix socket's default, about 200 KiB, makes every megabyte of RAM cost
    /// a handful of round trips between the two VMMs.
    pub fn set_buffers(&self, bytes: usize) {
        let fd = self.fd().as_raw_fd();
        let v = bytes as libc::c_int;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt reads the int we pass; a failure only leaves the default.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }

    /// Makes a read or write that waits longer than `t` fail (the other side is gone or stuck).
    pub fn set_timeouts(&self, t: std::time::Duration) {
        self.timeouts(Some(t));
    }

    /// Lets reads and writes wait as long as they must (a connection something else ends).
    pub fn clear_timeouts(&self) {
        self.timeouts(None);
    }

    fn timeouts(&self, t: Option<std::time::Duration>) {
        let r = match self {
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Tls(s) => s
                .tcp()
                .set_read_timeout(t)
                .and_then(|()| s.tcp().set_write_timeout(t)),
        };
        if let Err(e) = r {
            log::warn!("cannot set the migration socket's timeouts: {e}");
        }
    }

    /// The socket (its options; data goes through `Read`/`Write` and their volatile forms).
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
            Stream::Tls(s) => s.tcp().as_fd(),
        }
    }

    /// Sends `data` with `fd` beside it (SCM_RIGHTS; Unix sockets only).
    pub fn send_with_fd(&self, data: &[u8], fd: RawFd) -> io::Result<()> {
        let Stream::Unix(s) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "descriptors go over Unix sockets only",
            ));
        };
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fd(s, data, fd)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
            .and_then(|n| {
                if n == data.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, "short send"))
                }
            })
    }

    /// Receives exactly `buf.len()` bytes and the descriptor sent beside them.
    pub fn recv_with_fd(&self, buf: &mut [u8]) -> io::Result<OwnedFd> {
        let Stream::Unix(s) = self else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "descriptors come over Unix sockets only",
            ));
        };
        let (n, fd) = vmm_sys_util::sock_ctrl_msg::ScmSocket::recv_with_fd(s, buf)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let fd = OwnedFd::from(fd.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no descriptor came with MemoryFd",
            )
        })?);
        if n != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short MemoryFd",
            ));
        }
        Ok(fd)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Bytes of guest memory a TLS stream sends at a time (through a buffer: the data must be
/// encrypted on its way).
const TLS_PIECE: usize = 256 << 10;
/// Bytes asked of a TLS stream per read: one record's plaintext at most comes at a time.
const TLS_RECORD: usize = 16 << 10;

/// Guest memory straight from the socket, or through TLS.
impl vm_memory::ReadVolatile for Stream {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Stream::Tls(s) => {
                let mut b = vec![0u8; buf.len().min(TLS_RECORD)];
                let n = s
                    .read(&mut b)
                    .map_err(vm_memory::VolatileMemoryError::IOError)?;
                buf.copy_from(&b[..n]);
                Ok(n)
            }
            s => s.fd().read_volatile(buf),
        }
    }
}

/// Guest memory straight to the socket, or through TLS.
impl vm_memory::WriteVolatile for Stream {
    fn write_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        match self {
            Stream::Tls(s) => {
                let mut b = vec![0u8; buf.len().min(TLS_PIECE)];
                let n = buf.copy_to(&mut b);
                s.write_all(&b[..n])
                    .map_err(vm_memory::VolatileMemoryError::IOError)?;
                Ok(n)
            }
            s => s.fd().write_volatile(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sixteen_bytes_little_endian() {
        let r = Request::new(Command::Memory, 0x1122);
        let b = r.encode();
        assert_eq!(&b[..2], &[4, 0]);
        assert_eq!(&b[8..], &0x1122u64.to_le_bytes());
        assert_eq!(Request::decode(&b).unwrap(), r);
        let s = Request::new(Command::Start, 0);
        assert_eq!(
            Request::decode(&s.encode()).unwrap().version(),
            PROTOCOL_VERSION
        );
        let mut bad = b;
        bad[0] = 99;
        assert!(Request::decode(&bad).is_err());
        let ok = Response::ok().encode();
        assert_eq!(&ok[..2], &[1, 0]);
        assert!(Response::read_from(&mut &ok[..]).unwrap().ok);
        assert!(
            !Response::read_from(&mut &Response::error().encode()[..])
                .unwrap()
                .ok
        );
        assert!(Response::read_from(&mut &[7u8; 16][..]).is_err());
    }

    #[test]
    fn range_tables_round_trip_and_bad_lengths_are_refused() {
        let ranges = vec![
            MemoryRange {
                gpa: 0x1000,
                length: 0x2000,
            },
            MemoryRange {
                gpa: 1 << 32,
                length: 4096,
            },
        ];
        let b = encode_ranges(&ranges);
        assert_eq!(b.len(), 32);
        assert_eq!(read_ranges(&mut &b[..], 32, 10).unwrap(), ranges);
        assert!(read_ranges(&mut &b[..], 31, 10).is_err());
        assert!(read_ranges(&mut &b[..], 32, 1).is_err());
    }
}
