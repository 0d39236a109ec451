//! `--net-backend "ip=,mask=,mac=,host_mac=,mtu=,socket=,client=on|off,num_queues=,queue_size=,
//! tap="`, the original's keys and defaults: the TAP gets 192.168.100.1/24 unless told
//! otherwise, two queues (one pair) of 256, and the backend listens on `socket` unless
//! `client=on` (then it connects to a VMM listening there, `vhost_mode=server`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use net_util::MacAddr;
use vm_config::{ConfigError, OptionParser};

pub const OPTION: &str = "--net-backend";

/// The original's help text for `--net-backend`.
pub const SYNTAX: &str = "vhost-user-net backend parameters \
\"ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,host_mac=<mac_addr>,mtu=<mtu>,\
socket=<socket_path>,client=on|off,num_queues=<number_of_queues>,\
queue_size=<size_of_each_queue>,tap=<if_name>\"";

const KEYS: &[&str] = &[
    "ip",
    "mask",
    "mac",
    "host_mac",
    "mtu",
    "socket",
    "client",
    "num_queues",
    "queue_size",
    "tap",
];

/// Most queues: two per pair, one worker thread per pair, a 64-bit queue mask per thread.
pub const MAX_QUEUES: u16 = 62;
const MIN_MTU: u16 = 1280;
const MAX_IF_NAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub ip: IpAddr,
    pub mask: IpAddr,
    /// The guest's MAC, offered in the configuration space (VIRTIO_NET_F_MAC) when given.
    pub mac: Option<MacAddr>,
    /// The TAP's own MAC; none: the kernel's choice.
    pub host_mac: Option<MacAddr>,
    pub mtu: Option<u16>,
    pub socket: PathBuf,
    /// Connect to `socket` (a VMM listening there) instead of listening on it.
    pub client: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The TAP to open or create; none: a new one named by the kernel (`vmtapN`).
    pub tap: Option<String>,
}

impl BackendConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(OPTION, raw, &[KEYS], &[])?;
        let ip_of = |key: &str, default: Ipv4Addr| -> Result<IpAddr, ConfigError> {
            match p.get(key) {
                None => Ok(IpAddr::V4(default)),
                Some(v) => v
                    .parse()
                    .map_err(|_| p.error(format!("{key}={v}: not an IP address"))),
            }
        };
        let mac_of = |key: &str| -> Result<Option<MacAddr>, ConfigError> {
            let Some(v) = p.get(key) else { return Ok(None) };
            let m: MacAddr = v
                .parse()
                .map_err(|e: net_util::MacParseError| p.error(format!("{key}: {e}")))?;
            if m.bytes()[0] & 1 != 0 {
                return Err(p.error(format!("{key}={v}: a multicast address")));
            }
            Ok(Some(m))
        };
        let socket = match p.get("socket") {
            Some(s) => PathBuf::from(s),
            None => return Err(p.error("socket=<path> is required")),
        };
        let cfg = BackendConfig {
            ip: ip_of("ip", Ipv4Addr::new(192, 168, 100, 1))?,
            mask: ip_of("mask", Ipv4Addr::new(255, 255, 255, 0))?,
            mac: mac_of("mac")?,
            host_mac: mac_of("host_mac")?,
            mtu: p.number("mtu")?,
            socket,
            client: p.toggle("client", false)?,
            num_queues: p.number("num_queues")?.unwrap_or(2),
            queue_size: p.number("queue_size")?.unwrap_or(256),
            tap: p.get("tap"),
        };
        cfg.check().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let n = self.num_queues;
        if n < 2 || !n.is_multiple_of(2) || n > MAX_QUEUES {
            return Err(format!(
                "num_queues={n}: must be an even number between 2 and {MAX_QUEUES} (two per \
                 queue pair)"
            ));
        }
        let q = self.queue_size;
        if !q.is_power_of_two() || !(2..=32768).contains(&q) {
            return Err(format!(
                "queue_size={q}: must be a power of two between 2 and 32768"
            ));
        }
        if let Some(t) = &self.tap {
            if t.len() > MAX_IF_NAME {
                return Err(format!(
                    "tap={t}: an interface name has at most {MAX_IF_NAME} bytes"
                ));
            }
        }
        if let Some(m) = self.mtu {
            if m < MIN_MTU {
                return Err(format!("mtu={m}: must be at least {MIN_MTU}"));
            }
        }
        let contiguous = |m: u128| (!m).wrapping_add(1) & !m == 0;
        match (self.ip, self.mask) {
            (IpAddr::V4(_), IpAddr::V4(m)) if !contiguous(u128::from(u32::from(m)) << 96) => {
                Err(format!("mask={m}: not a contiguous netmask"))
            }
            (IpAddr::V6(_), IpAddr::V6(m)) if !contiguous(u128::from(m)) => {
                Err(format!("mask={m}: not a contiguous netmask"))
            }
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => Ok(()),
            (ip, mask) => Err(format!(
                "ip={ip},mask={mask}: the address and the mask must be of one family"
            )),
        }
    }

    /// Queue pairs, each with a TAP queue and a worker thread.
    pub fn pairs(&self) -> usize {
        usize::from(self.num_queues / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_originals_defaults() {
        let c = BackendConfig::parse("socket=/tmp/vun.sock").unwrap();
        assert_eq!(c.ip, IpAddr::V4(Ipv4Addr::new(192, 168, 100, 1)));
        assert_eq!(c.mask, IpAddr::V4(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!((c.num_queues, c.queue_size, c.client), (2, 256, false));
        assert_eq!(
            (&c.tap, c.mac, c.host_mac, c.mtu),
            (&None, None, None, None)
        );
        assert_eq!(c.socket, PathBuf::from("/tmp/vun.sock"));
        assert_eq!(c.pairs(), 1);
    }

    #[test]
    fn every_key() {
        let c = BackendConfig::parse(
            "ip=fd00::1,mask=ffff:ffff::,mac=52:54:00:00:00:02,host_mac=52:54:00:00:00:01,\
             mtu=9000,socket=/s,client=on,num_queues=4,queue_size=1024,tap=vun0",
        )
        .unwrap();
        assert_eq!(c.ip, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(c.mac.unwrap().to_string(), "52:54:00:00:00:02");
        assert_eq!(c.host_mac.unwrap().to_string(), "52:54:00:00:00:01");
        assert_eq!((c.mtu, c.client, c.pairs()), (Some(9000), true, 2));
        assert_eq!((c.queue_size, c.tap.as_deref()), (1024, Some("vun0")));
    }

    #[test]
    fn bad_options_are_named() {
        for (bad, why) in [
            ("", "socket=<path> is required"),
            ("tap=t0", "socket=<path> is required"),
            ("socket=/s,ip=1.2.3", "ip=1.2.3: not an IP address"),
            ("socket=/s,mask=255.0.255.0", "not a contiguous netmask"),
            ("socket=/s,ip=fd00::1", "of one family"),
            ("socket=/s,mac=01:00:5e:00:00:01", "multicast"),
            ("socket=/s,host_mac=zz", "host_mac"),
            ("socket=/s,mtu=1000", "mtu=1000"),
            ("socket=/s,mtu=x", "'mtu' must be a number"),
            ("socket=/s,num_queues=3", "num_queues=3"),
            ("socket=/s,num_queues=64", "num_queues=64"),
            ("socket=/s,queue_size=100", "queue_size=100"),
            ("socket=/s,client=maybe", "'client' must be on, off"),
            ("socket=/s,tap=averyveryverylongname", "at most 15 bytes"),
            ("socket=/s,bogus=1", "bogus"),
        ] {
            let e = BackendConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            let prefix = match bad {
                "" => format!("{OPTION}:"),
                _ => format!("{OPTION} {bad}"),
            };
            assert!(e.starts_with(&prefix), "{e}");
        }
    }
}
