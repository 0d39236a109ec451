//! `--generic-vhost-user device_type=<type>,socket=<path>,queue_sizes=[<n>,...]`: a virtio
//! device of any type whose whole work a vhost-user backend does, as the original's
//! `GenericVhostUserConfig`. The VMM knows nothing of the device beyond its type and its
//! queues: features and configuration space are the backend's (docs/pci.md, "Generic
//! vhost-user").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::{pci_common, PciDeviceCommonConfig, PCI_KEYS};
use crate::parser::int_list;
use crate::{ConfigError, OptionParser};

/// The virtio device types by the names the original's option takes, indexed by type (the
/// numbers of the virtio specification, section 5); `None`: no name (14 and 15).
const TYPE_NAMES: [Option<&str>; 50] = [
    None,
    Some("net"),
    Some("block"),
    Some("console"),
    Some("rng"),
    Some("balloon"),
    Some("iomem"),
    Some("rpmsg"),
    Some("scsi"),
    Some("9p"),
    Some("mac80211_wlan"),
    Some("rproc_serial"),
    Some("caif"),
    Some("memory_balloon"),
    None,
    None,
    Some("gpu"),
    Some("clock"),
    Some("input"),
    Some("vsock"),
    Some("crypto"),
    Some("signal_dist"),
    Some("pstore"),
    Some("iommu"),
    Some("mem"),
    Some("sound"),
    Some("fs"),
    Some("pmem"),
    Some("rpmb"),
    Some("mac80211_hwsim"),
    Some("video_encoder"),
    Some("video_decoder"),
    Some("scmi"),
    Some("nitro_sec_mod"),
    Some("i2c"),
    Some("watchdog"),
    Some("can"),
    Some("dmabuf"),
    Some("param_serv"),
    Some("audio_policy"),
    Some("bt"),
    Some("gpio"),
    Some("rdma"),
    Some("camera"),
    Some("ism"),
    Some("spi"),
    Some("tee"),
    Some("cpu_balloon"),
    Some("media"),
    Some("usb"),
];

/// The device types a backend cannot be: the watchdog resets the guest and the IOMMU
/// translates the other devices' addresses, both the VMM's own work (refused as the original
/// refuses them).
const NOT_VHOST_USER: [u32; 2] = [35, 23];

/// The highest type whose PCI device id (0x1040 + type) fits 16 bits.
pub const MAX_DEVICE_TYPE: u32 = 0xffff - 0x1040;

/// Queues at most: the transport's limit.
pub const GENERIC_MAX_QUEUES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenericVhostUserConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Each queue's largest size; as many queues as sizes.
    pub queue_sizes: Vec<u16>,
    /// The virtio device type (2: block, 26: fs, ...).
    pub device_type: u32,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

/// The type named `raw`: one of the names above or a number without leading zeros, as the
/// original reads it.
fn device_type(raw: &str) -> Result<u32, String> {
    if let Some(t) = TYPE_NAMES.iter().position(|n| *n == Some(raw)) {
        return Ok(t as u32);
    }
    let bad = || {
        format!("device_type={raw}: not a virtio device type (a name such as block, or a number without leading zeros)")
    };
    if !raw.starts_with(|c: char| ('1'..='9').contains(&c)) {
        return Err(bad());
    }
    raw.parse::<u32>().map_err(|_| bad())
}

/// The name of device type `t`, for messages and logs (the number when it has none).
pub fn device_type_name(t: u32) -> String {
    match TYPE_NAMES.get(t as usize).copied().flatten() {
        Some(n) => n.to_string(),
        None => t.to_string(),
    }
}

impl GenericVhostUserConfig {
    pub const OPTION: &'static str = "--generic-vhost-user";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            Self::OPTION,
            raw,
            &[
                &["device_type", "virtio_id", "socket", "queue_sizes"],
                PCI_KEYS,
            ],
            &[],
        )?;
        let pci_common = pci_common(&p)?;
        let socket = p
            .get("socket")
            .ok_or_else(|| p.error("socket= is required (the backend's vhost-user socket)"))?;
        let sizes = p
            .get("queue_sizes")
            .ok_or_else(|| p.error("queue_sizes= is required (e.g. queue_sizes=[256,256])"))?;
        let queue_sizes = int_list(&sizes, u32::from(u16::MAX))
            .map_err(|m| p.error(format!("queue_sizes={sizes}: {m}")))?
            .into_iter()
            .map(|n| n as u16)
            .collect();
        // The original's older name for the key, still taken (with its warning).
        let legacy = p.get("virtio_id");
        if legacy.is_some() {
            log::warn!(
                "{}: 'virtio_id' is deprecated; use 'device_type'",
                Self::OPTION
            );
        }
        let t = p
            .get("device_type")
            .or(legacy)
            .ok_or_else(|| p.error("device_type= is required (e.g. device_type=block)"))?;
        let c = GenericVhostUserConfig {
            socket: PathBuf::from(socket),
            queue_sizes,
            device_type: device_type(&t).map_err(|m| p.error(m))?,
            pci_common,
            extra: Default::default(),
        };
        c.validate()?;
        Ok(c)
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shown = format!("socket={}", self.socket.display());
        let err = |m: String| ConfigError::new(Self::OPTION, &shown, m);
        if self.socket.as_os_str().is_empty() {
            return Err(err(
                "socket= is required (the backend's vhost-user socket)".into()
            ));
        }
        self.pci_common.refuse_iommu().map_err(err)?;
        let t = self.device_type;
        if t == 0 || t > MAX_DEVICE_TYPE {
            return Err(err(format!(
                "device_type={t}: must be 1 to {MAX_DEVICE_TYPE} (its PCI device id is 0x1040 + the type)"
            )));
        }
        if NOT_VHOST_USER.contains(&t) {
            return Err(err(format!(
                "device_type={}: this device cannot be a vhost-user backend (the VMM must do its work)",
                device_type_name(t)
            )));
        }
        if self.queue_sizes.is_empty() || self.queue_sizes.len() > GENERIC_MAX_QUEUES {
            return Err(err(format!(
                "queue_sizes: {} queues; must be 1 to {GENERIC_MAX_QUEUES}",
                self.queue_sizes.len()
            )));
        }
        if let Some(bad) = self.queue_sizes.iter().find(|s| !s.is_power_of_two()) {
            return Err(err(format!(
                "queue_sizes: {bad} is not a power of two (1 to 32768)"
            )));
        }
        self.pci_common.check().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_originals_option() {
        let c = GenericVhostUserConfig::parse(
            "device_type=block,socket=/tmp/b.sock,queue_sizes=[256,128]",
        )
        .unwrap();
        assert_eq!(c.device_type, 2);
        assert_eq!(c.queue_sizes, [256, 128]);
        assert_eq!(c.socket, PathBuf::from("/tmp/b.sock"));
        let c = GenericVhostUserConfig::parse(
            "device_type=26,socket=/s,queue_sizes=1024,id=g0,pci_segment=0,pci_device_id=7",
        )
        .unwrap();
        assert_eq!((c.device_type, c.queue_sizes.clone()), (26, vec![1024]));
        assert_eq!(
            (c.pci_common.id.as_deref(), c.pci_common.pci_device_id),
            (Some("g0"), Some(7))
        );
        // The older key, and numbers past the named types.
        let c = GenericVhostUserConfig::parse("virtio_id=gpu,socket=/s,queue_sizes=[64]").unwrap();
        assert_eq!(c.device_type, 16);
        let c = GenericVhostUserConfig::parse("device_type=60,socket=/s,queue_sizes=[64]").unwrap();
        assert_eq!(c.device_type, 60);
        for (name, t) in [("net", 1), ("9p", 9), ("i2c", 34), ("usb", 49), ("fs", 26)] {
            let raw = format!("device_type={name},socket=/s,queue_sizes=[2]");
            assert_eq!(GenericVhostUserConfig::parse(&raw).unwrap().device_type, t);
            assert_eq!(device_type_name(t), name);
        }
        assert_eq!(device_type_name(14), "14");
    }

    #[test]
    fn refuses_what_cannot_work_naming_it() {
        for (raw, msg) in [
            ("socket=/s,queue_sizes=[2]", "device_type= is required"),
            ("device_type=block,queue_sizes=[2]", "socket= is required"),
            ("device_type=block,socket=/s", "queue_sizes= is required"),
            (
                "device_type=floppy,socket=/s,queue_sizes=[2]",
                "not a virtio device type",
            ),
            ("device_type=02,socket=/s,queue_sizes=[2]", "leading zeros"),
            (
                "device_type=0,socket=/s,queue_sizes=[2]",
                "not a virtio device type",
            ),
            (
                "device_type=70000,socket=/s,queue_sizes=[2]",
                "must be 1 to",
            ),
            (
                "device_type=watchdog,socket=/s,queue_sizes=[2]",
                "cannot be a vhost-user",
            ),
            (
                "device_type=23,socket=/s,queue_sizes=[2]",
                "cannot be a vhost-user",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[100]",
                "not a power of two",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[0]",
                "not a power of two",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[70000]",
                "more than 65535",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[x]",
                "not a number",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[2],iommu=on",
                "iommu",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[2],pci_device_id=0",
                "pci_device_id=0",
            ),
            (
                "device_type=block,socket=/s,queue_sizes=[2],colour=red",
                "unknown key",
            ),
        ] {
            let e = GenericVhostUserConfig::parse(raw).unwrap_err().to_string();
            assert!(e.contains(msg), "{raw}: {e}");
            assert!(e.starts_with("--generic-vhost-user"), "{raw}: {e}");
        }
        let many = format!(
            "device_type=block,socket=/s,queue_sizes=[{}]",
            vec!["2"; 65].join(",")
        );
        let e = GenericVhostUserConfig::parse(&many)
            .unwrap_err()
            .to_string();
        assert!(e.contains("65 queues"), "{e}");
    }

    #[test]
    fn json_as_the_originals_api_sends_it() {
        let c: GenericVhostUserConfig = serde_json::from_str(
            r#"{"socket": "/s", "queue_sizes": [256], "device_type": 2, "id": "g0",
                "pci_segment": 0}"#,
        )
        .unwrap();
        c.validate().unwrap();
        c.extra.check("generic_vhost_user[0]").unwrap();
        let back: GenericVhostUserConfig =
            serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"socket": "/s", "queue_sizes": [256], "device_type": 2,
                               "id": "g0", "pci_segment": 0})
        );
        let bad: GenericVhostUserConfig =
            serde_json::from_str(r#"{"socket": "/s", "queue_sizes": [], "device_type": 2}"#)
                .unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("0 queues"));
    }
}
