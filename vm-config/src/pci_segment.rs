//! `--pci-segment pci_segment=<id>,mmio32_aperture_weight=<w>,mmio64_aperture_weight=<w>`: how
//! much of the 32-bit and 64-bit PCI MMIO windows a segment gets, relative to the others (every
//! segment's weight is 1 unless given). The segments themselves come from `--platform
//! num_pci_segments`. Names and defaults follow the original's `PciSegmentConfig`.

use serde::{Deserialize, Serialize};

use crate::{ConfigError, OptionParser};

/// The original's limit on `--platform num_pci_segments`.
pub const MAX_NUM_PCI_SEGMENTS: u16 = 96;

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciSegmentConfig {
    #[serde(default)]
    pub pci_segment: u16,
    #[serde(default = "default_weight")]
    pub mmio32_aperture_weight: u32,
    #[serde(default = "default_weight")]
    pub mmio64_aperture_weight: u32,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl PciSegmentConfig {
    pub const OPTION: &'static str = "--pci-segment";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            Self::OPTION,
            raw,
            &[
                "pci_segment",
                "mmio32_aperture_weight",
                "mmio64_aperture_weight",
            ],
            &[],
        )?;
        let c = PciSegmentConfig {
            pci_segment: p.number("pci_segment")?.unwrap_or(0),
            mmio32_aperture_weight: p.number("mmio32_aperture_weight")?.unwrap_or(1),
            mmio64_aperture_weight: p.number("mmio64_aperture_weight")?.unwrap_or(1),
            extra: Default::default(),
        };
        c.validate(None).map_err(|m| p.error(m))?;
        Ok(c)
    }

    /// The weights are at least 1; with `num_segments` (the VM's, once it is known), the
    /// segment must be one of them.
    pub fn validate(&self, num_segments: Option<u16>) -> Result<(), String> {
        if let Some(n) = num_segments.filter(|&n| self.pci_segment >= n) {
            return Err(format!(
                "pci_segment={}: the VM has {n} PCI segment(s) (--platform num_pci_segments)",
                self.pci_segment
            ));
        }
        for (key, w) in [
            ("mmio32_aperture_weight", self.mmio32_aperture_weight),
            ("mmio64_aperture_weight", self.mmio64_aperture_weight),
        ] {
            if w == 0 {
                return Err(format!("{key}=0: a weight is at least 1"));
            }
        }
        Ok(())
    }

    /// The value errors name.
    pub fn shown(&self) -> String {
        format!("pci_segment={}", self.pci_segment)
    }
}

/// Each segment's 32-bit and 64-bit window weights, by segment (1 where `configs` is silent;
/// the last setting of a segment counts, as in the original).
pub fn aperture_weights(num_segments: u16, configs: &[PciSegmentConfig]) -> Vec<(u32, u32)> {
    let mut w = vec![(1, 1); usize::from(num_segments)];
    for c in configs {
        if let Some(slot) = w.get_mut(usize::from(c.pci_segment)) {
            *slot = (c.mmio32_aperture_weight, c.mmio64_aperture_weight);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_defaults_and_refusals() {
        let c = PciSegmentConfig::parse("pci_segment=2").unwrap();
        assert_eq!((c.pci_segment, c.mmio32_aperture_weight), (2, 1));
        assert_eq!(c.mmio64_aperture_weight, 1);
        let c = PciSegmentConfig::parse(
            "pci_segment=1,mmio32_aperture_weight=3,mmio64_aperture_weight=5",
        )
        .unwrap();
        assert_eq!((c.mmio32_aperture_weight, c.mmio64_aperture_weight), (3, 5));
        for (bad, why) in [
            ("pci_segment=1,mmio32_aperture_weight=0", "at least 1"),
            ("pci_segment=1,mmio64_aperture_weight=0", "at least 1"),
            ("pci_segment=x", "pci_segment"),
            ("pci_segment=1,size=3", "unknown key 'size'"),
        ] {
            let e = PciSegmentConfig::parse(bad).unwrap_err();
            assert_eq!(e.option, "--pci-segment", "{bad}");
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
        let e = c.validate(Some(1)).unwrap_err();
        assert!(e.contains("num_pci_segments"), "{e}");
        c.validate(Some(2)).unwrap();
    }

    #[test]
    fn weights_default_to_one_and_the_last_setting_counts() {
        let cfg = |raw| PciSegmentConfig::parse(raw).unwrap();
        let w = aperture_weights(
            3,
            &[
                cfg("pci_segment=2,mmio32_aperture_weight=4"),
                cfg("pci_segment=2,mmio64_aperture_weight=7"),
            ],
        );
        assert_eq!(w, [(1, 1), (1, 1), (1, 7)]);
    }

    #[test]
    fn json_as_the_original() {
        let c: PciSegmentConfig = serde_json::from_str(r#"{"pci_segment": 1}"#).unwrap();
        assert_eq!(c.mmio32_aperture_weight, 1);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"pci_segment": 1, "mmio32_aperture_weight": 1,
                "mmio64_aperture_weight": 1})
        );
    }
}
