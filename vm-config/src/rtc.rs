//! `--rtc [iommu=off,id=<id>,pci_segment=<n>,pci_device_id=<slot>]`: a virtio-rtc device (the
//! host's wall clock for the guest, e.g. as a PTP clock), as the original's `RtcConfig`. Given
//! with no value, the device with its defaults.

use serde::{Deserialize, Serialize};

use crate::devices::{pci_common, PciDeviceCommonConfig, PCI_KEYS};
use crate::{ConfigError, OptionParser};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl RtcConfig {
    pub const OPTION: &'static str = "--rtc";

    /// `raw` is empty for a bare `--rtc`.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        if raw.trim().is_empty() {
            return Ok(Self::default());
        }
        let p = OptionParser::parse(Self::OPTION, raw, PCI_KEYS, &[])?;
        let pci_common = pci_common(&p)?;
        Ok(RtcConfig {
            pci_common,
            extra: Default::default(),
        })
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let shown = self.pci_common.id.clone().unwrap_or_default();
        let err = |m: String| ConfigError::new(Self::OPTION, &shown, m);
        self.extra.check("rtc")?;
        self.pci_common.check().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_and_with_keys() {
        assert_eq!(RtcConfig::parse("").unwrap(), RtcConfig::default());
        let c = RtcConfig::parse("id=clock0,pci_device_id=9,iommu=off").unwrap();
        assert_eq!(
            (c.pci_common.id.as_deref(), c.pci_common.pci_device_id),
            (Some("clock0"), Some(9))
        );
        for (bad, why) in [
            ("pci_device_id=0", "0 is its host bridge"),
            ("id=__mine", "reserved"),
            ("colour=red", "unknown key 'colour'"),
        ] {
            let e = RtcConfig::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("--rtc") && e.contains(why), "{bad}: {e}");
        }
        let j: RtcConfig = serde_json::from_str(r#"{"id": "r", "pci_segment": 0}"#).unwrap();
        assert_eq!(j.pci_common.id.as_deref(), Some("r"));
        assert_eq!(
            serde_json::to_value(RtcConfig::default()).unwrap(),
            serde_json::json!({"pci_segment": 0})
        );
    }
}
