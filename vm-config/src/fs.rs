//! `--fs tag=<tag>,socket=<path>[,num_queues=<n>][,queue_size=<n>]`: a virtio-fs device served
//! by a vhost-user backend (virtiofsd) listening on `socket`; the guest mounts it as `tag`
//! (see docs/pci.md, virtio-fs).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::{pci_common, PciDeviceCommonConfig, PCI_KEYS};
use crate::{ConfigError, OptionParser};

/// The longest tag: `struct virtio_fs_config`'s `tag[36]`.
pub const FS_TAG_MAX: usize = 36;
/// Request queues at most (the high-priority queue comes on top; the transport has 64).
pub const FS_MAX_QUEUES: u16 = 63;

fn default_num_queues() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    1024
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// What the guest mounts (`mount -t virtiofs <tag> /mnt`): 1 to 36 bytes.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues (the high-priority queue comes on top).
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl FsConfig {
    pub const OPTION: &'static str = "--fs";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            Self::OPTION,
            raw,
            &[&["tag", "socket", "num_queues", "queue_size"], PCI_KEYS],
            &[],
        )?;
        let pci_common = pci_common(&p)?;
        let tag = p
            .get("tag")
            .ok_or_else(|| p.error("tag= is required (what the guest mounts)"))?;
        let socket = p
            .get("socket")
            .ok_or_else(|| p.error("socket= is required (the backend's vhost-user socket)"))?;
        let c = FsConfig {
            tag,
            socket: PathBuf::from(socket),
            num_queues: p.number("num_queues")?.unwrap_or_else(default_num_queues),
            queue_size: p.number("queue_size")?.unwrap_or_else(default_queue_size),
            pci_common,
            extra: Default::default(),
        };
        c.validate()?;
        Ok(c)
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(Self::OPTION, &format!("tag={}", self.tag), m);
        if self.tag.is_empty() || self.tag.len() > FS_TAG_MAX {
            return Err(err(format!(
                "the tag must be 1 to {FS_TAG_MAX} bytes, not {}",
                self.tag.len()
            )));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(err(
                "socket= is required (the backend's vhost-user socket)".into()
            ));
        }
        if self.num_queues == 0 || self.num_queues > FS_MAX_QUEUES {
            return Err(err(format!(
                "num_queues={}: must be 1 to {FS_MAX_QUEUES}",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(err(format!(
                "queue_size={}: must be a power of two, 2 to 32768",
                self.queue_size
            )));
        }
        self.pci_common.check().map_err(err)?;
        self.pci_common.refuse_iommu().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_originals_option_with_its_defaults() {
        let c = FsConfig::parse("tag=myfs,socket=/tmp/vfs.sock").unwrap();
        assert_eq!(c.tag, "myfs");
        assert_eq!(c.socket, PathBuf::from("/tmp/vfs.sock"));
        assert_eq!((c.num_queues, c.queue_size), (1, 1024));
        let c = FsConfig::parse(
            "tag=t,socket=/s,num_queues=2,queue_size=256,id=fs0,pci_segment=0,pci_device_id=9",
        )
        .unwrap();
        assert_eq!((c.num_queues, c.queue_size), (2, 256));
        assert_eq!(
            (c.pci_common.id.as_deref(), c.pci_common.pci_device_id),
            (Some("fs0"), Some(9))
        );
    }

    #[test]
    fn refuses_what_cannot_work_naming_it() {
        for (raw, msg) in [
            ("socket=/s", "tag= is required"),
            ("tag=t", "socket= is required"),
            (
                "tag=0123456789012345678901234567890123456,socket=/s",
                "1 to 36 bytes",
            ),
            ("tag=t,socket=/s,num_queues=0", "num_queues=0"),
            ("tag=t,socket=/s,num_queues=64", "num_queues=64"),
            ("tag=t,socket=/s,queue_size=100", "power of two"),
            ("tag=t,socket=/s,iommu=on", "iommu"),
            ("tag=t,socket=/s,cache=always", "cache"),
        ] {
            let e = FsConfig::parse(raw).unwrap_err().to_string();
            assert!(e.contains(msg), "{raw}: {e}");
            assert!(e.starts_with("--fs"), "{raw}: {e}");
        }
    }

    #[test]
    fn json_as_the_originals_api_sends_it() {
        let c: FsConfig = serde_json::from_str(
            r#"{"tag": "myfs", "socket": "/s", "num_queues": 1, "queue_size": 1024,
                "pci_segment": 0, "id": "fs0"}"#,
        )
        .unwrap();
        c.validate().unwrap();
        c.extra.check("fs[0]").unwrap();
        assert_eq!(c.pci_common.id.as_deref(), Some("fs0"));
        let c: FsConfig = serde_json::from_str(r#"{"tag": "t", "socket": "/s"}"#).unwrap();
        assert_eq!((c.num_queues, c.queue_size), (1, 1024));
        let back: FsConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
