//! Ethernet MAC addresses as the command line writes them (`12:34:56:78:9a:bc`).

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

#[derive(Debug, Error, PartialEq, Eq)]
#[error("'{0}' is not a MAC address (want six hex bytes like 12:34:56:78:9a:bc)")]
pub struct MacParseError(String);

impl MacAddr {
    pub const fn new(bytes: [u8; 6]) -> Self {
        MacAddr(bytes)
    }

    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }

    /// A random unicast, locally administered address whose first byte is 0x2e, as the original
    /// picks when none is given.
    pub fn random_local() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // Fall back to something still unique enough per process and time.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
                ^ u128::from(std::process::id());
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = 0x2e;
        MacAddr(b)
    }
}

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            // Two hex digits each, as the original reads them.
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: MacAddr = "12:34:56:78:9A:bc".parse().unwrap();
        assert_eq!(m.bytes(), [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
        assert_eq!(m.to_string(), "12:34:56:78:9a:bc");
        for bad in [
            "",
            "12:34:56:78:9a",
            "12:34:56:78:9a:bc:de",
            "123:4:5:6:7:8",
            "zz:00:00:00:00:00",
            "1:2:3:4:5:",
            "1:2:3:4:5:6",
            "12:34:56:78:9a:+b",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_addresses_are_local_unicast() {
        let a = MacAddr::random_local();
        assert_eq!(a.bytes()[0], 0x2e);
        assert_ne!(a, MacAddr::random_local());
    }
}
