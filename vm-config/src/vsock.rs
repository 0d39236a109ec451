//! `--vsock cid=<cid>,socket=<path>`: a virtio-vsock device whose host side is the original's
//! hybrid vsock over the Unix socket `path` (see docs/vsock.md).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::devices::{pci_common, PciDeviceCommonConfig, PCI_KEYS};
use crate::{ConfigError, OptionParser};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The guest's context id: 3 or more (0-2 are reserved), below u32::MAX (-1 is "any").
    pub cid: u64,
    /// Where host programs connect to reach the guest; guest connections to host port P go
    /// to a listener at `<socket>_P`.
    pub socket: PathBuf,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl VsockConfig {
    pub const OPTION: &'static str = "--vsock";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(Self::OPTION, raw, &[&["cid", "socket"], PCI_KEYS], &[])?;
        let pci_common = pci_common(&p)?;
        let cid = p
            .number::<u64>("cid")?
            .ok_or_else(|| p.error("cid= is required (the guest's context id, 3 or more)"))?;
        let socket = p
            .get("socket")
            .ok_or_else(|| p.error("socket= is required (the path of the Unix socket)"))?;
        let c = VsockConfig {
            cid,
            socket: PathBuf::from(socket),
            pci_common,
            extra: Default::default(),
        };
        c.validate()?;
        Ok(c)
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(Self::OPTION, &format!("cid={}", self.cid), m);
        if self.cid < 3 || self.cid >= u64::from(u32::MAX) {
            return Err(err(format!(
                "cid={}: must be at least 3 and below {} (0-2 are reserved)",
                self.cid,
                u32::MAX
            )));
        }
        if self.socket.as_os_str().is_empty() {
            return Err(err(
                "socket= is required (the path of the Unix socket)".into()
            ));
        }
        // sun_path holds 108 bytes with its NUL, and `<socket>_<port>` must fit too.
        if self.socket.as_os_str().len() > 96 {
            return Err(err(format!(
                "socket={}: too long for a Unix socket path",
                self.socket.display()
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
    fn parse_and_validate() {
        let c = VsockConfig::parse("cid=3,socket=/tmp/v.sock,id=vs,pci_device_id=7").unwrap();
        assert_eq!(c.cid, 3);
        assert_eq!(c.socket, PathBuf::from("/tmp/v.sock"));
        assert_eq!(c.pci_common.id.as_deref(), Some("vs"));
        assert_eq!(c.pci_common.pci_device_id, Some(7));
        for bad in [
            "socket=/s",
            "cid=3",
            "cid=2,socket=/s",
            "cid=4294967295,socket=/s",
            "cid=x,socket=/s",
            "cid=3,socket=/s,pci_device_id=32",
            "cid=3,socket=/s,foo=1",
        ] {
            assert!(VsockConfig::parse(bad).is_err(), "{bad}");
        }
        let long = format!("cid=3,socket=/{}", "a".repeat(120));
        assert!(VsockConfig::parse(&long).is_err());
    }

    #[test]
    fn json_names_as_the_original() {
        let c: VsockConfig = serde_json::from_str(
            r#"{"cid": 5, "socket": "/s", "iommu": false, "pci_segment": 0, "id": "v"}"#,
        )
        .unwrap();
        assert_eq!(c.cid, 5);
        c.validate().unwrap();
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["cid"], 5);
        assert_eq!(j["socket"], "/s");
        assert_eq!(j["id"], "v");
        let bad: VsockConfig = serde_json::from_str(r#"{"cid": 1, "socket": "/s"}"#).unwrap();
        assert!(bad.validate().is_err());
    }
}
