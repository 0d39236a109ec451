//! Configurations of the virtio PCI devices: `--disk`, `--rng` and the PCI placement keys
//! (`id=`, `pci_segment=`, `pci_device_id=`) they share with `--console`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::parser::OptionParser;
use super::ConfigError;

/// Where a device sits on PCI and what it is called. Only segment 0 exists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciPlacement {
    pub id: Option<String>,
    pub pci_segment: u16,
    pub pci_device_id: Option<u8>,
}

pub(crate) fn placement(p: &OptionParser) -> Result<PciPlacement, ConfigError> {
    let pci_segment = p.number::<u16>("pci_segment")?.unwrap_or(0);
    if pci_segment != 0 {
        return Err(p.error(format!(
            "pci_segment={pci_segment}: only PCI segment 0 exists (no --pci-segment support yet)"
        )));
    }
    let pci_device_id = p.number::<u8>("pci_device_id")?;
    if let Some(d) = pci_device_id {
        if d == 0 || d > 31 {
            return Err(p.error(format!(
                "pci_device_id={d}: must be 1-31 (0 is the host bridge)"
            )));
        }
    }
    let id = p.get("id").map(str::to_string);
    if id.as_deref() == Some("") {
        return Err(p.error("id= must not be empty"));
    }
    Ok(PciPlacement {
        id,
        pci_segment,
        pci_device_id,
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default)]
    pub backing_files: bool,
    #[serde(default = "default_true")]
    pub sparse: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_type: Option<String>,
}

/// `null` reads as the default, as the original's API clients send it.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The `image_type=` names the block layer opens (`vpc` is qemu's name for vhd).
pub const IMAGE_TYPES: &[&str] = &["raw", "qcow2", "vhd", "vpc", "vhdx"];

/// A guest MAC address: parsed, and unicast.
fn unicast_mac(s: &str) -> Result<crate::mac::MacAddr, String> {
    let m: crate::mac::MacAddr = s
        .parse()
        .map_err(|e: crate::mac::MacParseError| e.to_string())?;
    if m.bytes()[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(m)
}

fn default_num_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    128
}
fn default_true() -> bool {
    true
}

/// The rate limiter's keys, which `--disk` and `--net` know as the original does (besides
/// their own `KEYS`) but refuse (no rate limiting yet).
const RATE_LIMITER_KEYS: &[&str] = &[
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

/// Most queues one disk may have.
pub const MAX_DISK_QUEUES: u16 = 16;

impl DiskConfig {
    const KEYS: &'static [&'static str] = &[
        "path",
        "readonly",
        "direct",
        "iommu",
        "num_queues",
        "queue_size",
        "vhost_user",
        "socket",
        "id",
        "pci_segment",
        "pci_device_id",
        "rate_limit_group",
        "queue_affinity",
        "serial",
        "backing_files",
        "sparse",
        "image_type",
        "lock_granularity",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets("--disk", raw, &[Self::KEYS, RATE_LIMITER_KEYS], &[])?;
        p.refuse(RATE_LIMITER_KEYS)?;
        p.refuse(&[
            "vhost_user",
            "socket",
            "rate_limit_group",
            "queue_affinity",
            "lock_granularity",
        ])?;
        let path = match p.get("path") {
            Some(s) if !s.is_empty() => PathBuf::from(s),
            _ => return Err(p.error("path=<disk image> is required")),
        };
        if p.toggle("iommu", false)? {
            return Err(p.error("iommu=on is not supported yet"));
        }
        let num_queues = p.number::<u16>("num_queues")?.unwrap_or(1);
        if num_queues == 0 || num_queues > MAX_DISK_QUEUES {
            return Err(p.error(format!("num_queues must be 1-{MAX_DISK_QUEUES}")));
        }
        let queue_size = p.number::<u16>("queue_size")?.unwrap_or(128);
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(p.error("queue_size must be a power of two between 2 and 32768"));
        }
        let image_type = p.get("image_type").map(str::to_string);
        if let Some(t) = &image_type {
            if !IMAGE_TYPES.contains(&t.to_ascii_lowercase().as_str()) {
                return Err(p.error(format!("image_type={t}: must be raw, qcow2, vhd or vhdx")));
            }
        }
        let serial = p.get("serial").map(str::to_string);
        let pl = placement(&p)?;
        Ok(DiskConfig {
            path,
            readonly: p.toggle("readonly", false)?,
            direct: p.toggle("direct", false)?,
            iommu: false,
            num_queues,
            queue_size,
            id: pl.id,
            serial,
            pci_segment: pl.pci_segment,
            pci_device_id: pl.pci_device_id,
            backing_files: p.toggle("backing_files", false)?,
            sparse: p.toggle("sparse", true)?,
            image_type,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: PathBuf,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            src: PathBuf::from("/dev/urandom"),
            iommu: false,
            id: None,
            pci_segment: 0,
            pci_device_id: None,
        }
    }
}

impl RngConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "--rng",
            raw,
            &["src", "iommu", "id", "pci_segment", "pci_device_id"],
            &[],
        )?;
        if p.toggle("iommu", false)? {
            return Err(p.error("iommu=on is not supported yet"));
        }
        let pl = placement(&p)?;
        let src = match p.get("src") {
            Some("") => return Err(p.error("src= needs a path")),
            Some(s) => PathBuf::from(s),
            None => PathBuf::from("/dev/urandom"),
        };
        Ok(RngConfig {
            src,
            iommu: false,
            id: pl.id,
            pci_segment: pl.pci_segment,
            pci_device_id: pl.pci_device_id,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default = "default_ip")]
    pub ip: Ipv4Addr,
    #[serde(default = "default_mask")]
    pub mask: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default)]
    pub iommu: bool,
    #[serde(default = "default_net_queues")]
    pub num_queues: u16,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    #[serde(default = "default_true")]
    pub offload_csum: bool,
}

fn default_ip() -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 249, 1)
}
fn default_mask() -> Ipv4Addr {
    Ipv4Addr::new(255, 255, 255, 0)
}
fn default_net_queues() -> u16 {
    2
}
fn default_net_queue_size() -> u16 {
    256
}

impl NetConfig {
    const KEYS: &'static [&'static str] = &[
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "mtu",
        "fd",
        "iommu",
        "num_queues",
        "queue_size",
        "id",
        "vhost_user",
        "socket",
        "vhost_mode",
        "pci_segment",
        "pci_device_id",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets("--net", raw, &[Self::KEYS, RATE_LIMITER_KEYS], &[])?;
        p.refuse(RATE_LIMITER_KEYS)?;
        p.refuse(&["fd", "vhost_user", "socket", "vhost_mode"])?;
        if p.toggle("iommu", false)? {
            return Err(p.error("iommu=on is not supported yet"));
        }
        let ip_of = |key: &str, default: Ipv4Addr| -> Result<Ipv4Addr, ConfigError> {
            match p.get(key) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| {
                    p.error(format!(
                        "{key}={v}: not an IPv4 address (IPv6 is not supported yet)"
                    ))
                }),
            }
        };
        let ip = ip_of("ip", default_ip())?;
        let mask = ip_of("mask", default_mask())?;
        if (!u32::from(mask)).wrapping_add(1) & !u32::from(mask) != 0 {
            return Err(p.error(format!("mask={mask}: not a contiguous netmask")));
        }
        let mac_of = |key: &str| -> Result<Option<String>, ConfigError> {
            match p.get(key) {
                None => Ok(None),
                Some(v) => unicast_mac(v)
                    .map(|m| Some(m.to_string()))
                    .map_err(|e| p.error(format!("{key}: {e}"))),
            }
        };
        let tap = p.get("tap").map(str::to_string);
        if let Some(t) = &tap {
            if t.is_empty() || t.len() > 15 {
                return Err(p.error("tap= must name an interface of 1-15 bytes"));
            }
        }
        let num_queues = p.number::<u16>("num_queues")?.unwrap_or(2);
        check_net_queues(num_queues).map_err(|e| p.error(e))?;
        let queue_size = p.number::<u16>("queue_size")?.unwrap_or(256);
        if !queue_size.is_power_of_two() || !(2..=32768).contains(&queue_size) {
            return Err(p.error("queue_size must be a power of two between 2 and 32768"));
        }
        let mtu = p.number::<u16>("mtu")?;
        if let Some(m) = mtu {
            if m < 68 {
                return Err(p.error("mtu must be at least 68"));
            }
        }
        let pl = placement(&p)?;
        Ok(NetConfig {
            tap,
            ip,
            mask,
            mac: mac_of("mac")?,
            host_mac: mac_of("host_mac")?,
            mtu,
            iommu: false,
            num_queues,
            queue_size,
            id: pl.id,
            pci_segment: pl.pci_segment,
            pci_device_id: pl.pci_device_id,
            offload_tso: p.toggle("offload_tso", true)?,
            offload_ufo: p.toggle("offload_ufo", true)?,
            offload_csum: p.toggle("offload_csum", true)?,
        })
    }
}

/// Most virtio-net queues (receive and transmit, two per pair; the control queue is extra).
pub const MAX_NET_QUEUES: u16 = 62;

/// `num_queues` of `--net` counts queues, two per pair, as the original's.
fn check_net_queues(n: u16) -> Result<(), String> {
    if n < 2 || !n.is_multiple_of(2) || n > MAX_NET_QUEUES {
        return Err(format!(
            "num_queues must be an even number between 2 and {MAX_NET_QUEUES} (two per queue pair)"
        ));
    }
    Ok(())
}

/// The placement keys' rules, for configurations that did not come through `parse` (API).
fn check_placement(segment: u16, slot: Option<u8>) -> Result<(), String> {
    if segment != 0 {
        return Err(format!(
            "pci_segment={segment}: only PCI segment 0 exists (no --pci-segment support yet)"
        ));
    }
    match slot {
        Some(d) if d == 0 || d > 31 => Err(format!(
            "pci_device_id={d}: must be 1-31 (0 is the host bridge)"
        )),
        _ => Ok(()),
    }
}

fn check_queue_size(q: u16) -> Result<(), String> {
    if q.is_power_of_two() && (2..=32768).contains(&q) {
        Ok(())
    } else {
        Err(format!(
            "queue_size={q}: must be a power of two between 2 and 32768"
        ))
    }
}

impl DiskConfig {
    /// What `parse` checks, for a configuration from anywhere (the API), plus that the image
    /// exists. Errors name `--disk` and the path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new("--disk", &self.path.display().to_string(), m);
        std::fs::metadata(&self.path).map_err(|e| err(format!("cannot open: {e}")))?;
        if self.num_queues == 0 || self.num_queues > MAX_DISK_QUEUES {
            return Err(err(format!("num_queues must be 1-{MAX_DISK_QUEUES}")));
        }
        check_queue_size(self.queue_size).map_err(err)?;
        check_placement(self.pci_segment, self.pci_device_id).map_err(err)?;
        if let Some(t) = &self.image_type {
            if !IMAGE_TYPES.contains(&t.to_ascii_lowercase().as_str()) {
                return Err(err(format!(
                    "image_type={t}: must be raw, qcow2, vhd or vhdx"
                )));
            }
        }
        if self.iommu {
            return Err(err("iommu=on is not supported yet".into()));
        }
        Ok(())
    }
}

impl NetConfig {
    /// What `parse` checks, for a configuration from anywhere (the API).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new("--net", self.tap.as_deref().unwrap_or(""), m);
        check_net_queues(self.num_queues).map_err(err)?;
        check_queue_size(self.queue_size).map_err(err)?;
        check_placement(self.pci_segment, self.pci_device_id).map_err(err)?;
        if self.mtu.is_some_and(|m| m < 68) {
            return Err(err("mtu must be at least 68".into()));
        }
        for m in [&self.mac, &self.host_mac].into_iter().flatten() {
            unicast_mac(m).map_err(|e| err(format!("{m}: {e}")))?;
        }
        if let Some(t) = &self.tap {
            if t.is_empty() || t.len() > 15 {
                return Err(err("tap= must name an interface of 1-15 bytes".into()));
            }
        }
        if self.iommu {
            return Err(err("iommu=on is not supported yet".into()));
        }
        Ok(())
    }
}

impl RngConfig {
    /// What `parse` checks, plus that the source exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new("--rng", &self.src.display().to_string(), m);
        std::fs::metadata(&self.src).map_err(|e| err(format!("cannot open: {e}")))?;
        check_placement(self.pci_segment, self.pci_device_id).map_err(err)?;
        if self.iommu {
            return Err(err("iommu=on is not supported yet".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk() {
        let d = DiskConfig::parse(
            "path=/x.img,readonly=on,num_queues=2,queue_size=64,serial=abc,id=d0,pci_device_id=5",
        )
        .unwrap();
        assert!(d.readonly && !d.direct);
        assert_eq!((d.num_queues, d.queue_size), (2, 64));
        assert_eq!(d.serial.as_deref(), Some("abc"));
        assert_eq!(d.id.as_deref(), Some("d0"));
        assert_eq!(d.pci_device_id, Some(5));
        for (bad, why) in [
            ("readonly=on", "path="),
            ("path=/x,num_queues=0", "num_queues"),
            ("path=/x,queue_size=100", "power of two"),
            ("path=/x,pci_segment=1", "only PCI segment 0"),
            ("path=/x,pci_device_id=0", "1-31"),
            ("path=/x,pci_device_id=32", "1-31"),
            ("path=/x,image_type=iso", "image_type"),
            ("path=/x,vhost_user=on", "not supported"),
        ] {
            let e = DiskConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.starts_with("--disk "), "{e}");
        }
    }

    /// Every rate-limiter key is accepted as a key and refused with its name, on both options.
    #[test]
    fn rate_limiter_keys_are_refused() {
        for k in RATE_LIMITER_KEYS {
            let e = DiskConfig::parse(&format!("path=/x,{k}=1"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("'{k}' is not supported yet")), "{e}");
            let e = NetConfig::parse(&format!("tap=t0,{k}=1"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("'{k}' is not supported yet")), "{e}");
        }
    }

    #[test]
    fn net() {
        let n =
            NetConfig::parse("tap=tap7,ip=10.1.2.1,mask=255.255.0.0,mac=52:54:00:00:00:01,id=n0")
                .unwrap();
        assert_eq!(n.tap.as_deref(), Some("tap7"));
        assert_eq!(n.ip, Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(n.mac.as_deref(), Some("52:54:00:00:00:01"));
        assert_eq!((n.num_queues, n.queue_size), (2, 256));
        let q = NetConfig::parse("tap=t0,num_queues=8,offload_tso=off").unwrap();
        assert_eq!(
            (q.num_queues, q.offload_tso, q.offload_csum),
            (8, false, true)
        );
        let d = NetConfig::parse("").unwrap();
        assert_eq!((d.ip, d.mask), (default_ip(), default_mask()));
        for (bad, why) in [
            ("ip=fe80::1", "IPv6"),
            ("mask=255.0.255.0", "contiguous"),
            ("mac=01:00:5e:00:00:01", "multicast"),
            ("num_queues=3", "even number"),
            ("num_queues=0", "even number"),
            ("num_queues=64", "even number"),
            ("tap=averyveryverylongname", "1-15"),
            ("vhost_user=on", "not supported"),
            ("fd=3", "not supported"),
        ] {
            let e = NetConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn validate_catches_what_the_api_can_send() {
        let mut d = DiskConfig::parse("path=/dev/null").unwrap();
        d.validate().unwrap();
        for bad in [
            DiskConfig {
                num_queues: 0,
                ..d.clone()
            },
            DiskConfig {
                queue_size: 0,
                ..d.clone()
            },
            DiskConfig {
                queue_size: 100,
                ..d.clone()
            },
            DiskConfig {
                pci_segment: 1,
                ..d.clone()
            },
            DiskConfig {
                pci_device_id: Some(0),
                ..d.clone()
            },
            DiskConfig {
                path: "/nonexistent".into(),
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        d.image_type = Some("iso".into());
        assert!(d.validate().is_err());
        let n = NetConfig::parse("").unwrap();
        n.validate().unwrap();
        for bad in [
            NetConfig {
                num_queues: 5,
                ..n.clone()
            },
            NetConfig {
                queue_size: 3,
                ..n.clone()
            },
            NetConfig {
                mtu: Some(10),
                ..n.clone()
            },
            NetConfig {
                mac: Some("zz".into()),
                ..n.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let r = RngConfig {
            src: "/nonexistent".into(),
            ..RngConfig::default()
        };
        assert!(r.validate().is_err());
    }

    #[test]
    fn rng() {
        assert_eq!(
            RngConfig::parse("src=/dev/urandom").unwrap(),
            RngConfig::default()
        );
        assert_eq!(
            RngConfig::parse("src=/r,id=rng0").unwrap().id.as_deref(),
            Some("rng0")
        );
        assert!(RngConfig::parse("src=").is_err());
        assert!(RngConfig::parse("src=/r,pci_segment=2").is_err());
    }
}
