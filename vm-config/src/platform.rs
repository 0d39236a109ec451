//! `--platform`: the SMBIOS identity the guest reads (type 1 System Information, type 3's asset
//! tag, type 11 OEM Strings), the number of PCI segments and the original's IOMMU settings, of
//! which only the defaults exist here (no IOMMU). Field names, aliases and defaults follow
//! the original's `PlatformConfig`.

use serde::{Deserialize, Serialize};

use super::parser::OptionParser;
use super::pci_segment::MAX_NUM_PCI_SEGMENTS;
use super::ConfigError;

/// One PCI segment unless `num_pci_segments` says more.
pub const DEFAULT_NUM_PCI_SEGMENTS: u16 = 1;
/// The original's default (and largest) IOMMU address width.
pub const DEFAULT_IOMMU_ADDRESS_WIDTH_BITS: u8 = 64;

fn default_num_pci_segments() -> u16 {
    DEFAULT_NUM_PCI_SEGMENTS
}

fn default_iommu_address_width_bits() -> u8 {
    DEFAULT_IOMMU_ADDRESS_WIDTH_BITS
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformConfig {
    #[serde(default = "default_num_pci_segments")]
    pub num_pci_segments: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_segments: Option<Vec<u16>>,
    /// The bits of I/O virtual address the virtio-iommu translates (its input range).
    #[serde(default = "default_iommu_address_width_bits")]
    pub iommu_address_width_bits: u8,
    #[serde(
        default,
        alias = "serial_number",
        skip_serializing_if = "Option::is_none"
    )]
    pub system_serial_number: Option<String>,
    /// Checked by `validate` (see [`parse_uuid`]); kept as given, as the original keeps it.
    #[serde(default, alias = "uuid", skip_serializing_if = "Option::is_none")]
    pub system_uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oem_strings: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_manufacturer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_product_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_family: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_sku_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chassis_asset_tag: Option<String>,
    /// Only off: there is no iommufd support.
    #[serde(default)]
    pub iommufd: bool,
    /// Peer-to-peer DMA between VFIO devices; with no VFIO devices it changes nothing.
    #[serde(default = "default_true")]
    pub vfio_p2p_dma: bool,
    /// The original's keys this VMM does not model (`tdx`, `sev_snp`, `iommufd_fd`, ...);
    /// refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_pci_segments: DEFAULT_NUM_PCI_SEGMENTS,
            iommu_segments: None,
            iommu_address_width_bits: DEFAULT_IOMMU_ADDRESS_WIDTH_BITS,
            system_serial_number: None,
            system_uuid: None,
            oem_strings: None,
            system_manufacturer: None,
            system_product_name: None,
            system_version: None,
            system_family: None,
            system_sku_number: None,
            chassis_asset_tag: None,
            iommufd: false,
            vfio_p2p_dma: true,
            extra: Default::default(),
        }
    }
}

/// A UUID in any of its textual forms (`67e55044-10b1-426f-9247-bb680e5fe0c8`, the same
/// without hyphens, in braces or as a `urn:uuid:`), as 16 bytes in RFC 4122 (text) order.
///
/// The `uuid` crate does the parsing: it is the well-kept, widely used implementation of
/// RFC 4122/9562, reads every textual form the original's (it uses the same crate) accepts,
/// and spares us a hand-written parser with its own corner cases.
pub fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    uuid::Uuid::parse_str(s)
        .map(|u| *u.as_bytes())
        .map_err(|e| format!("'{s}' is not a UUID: {e}"))
}

/// `[a,b]` or `a`: the items of a list, brackets optional, as the original's string lists.
fn string_list(v: &str) -> Vec<String> {
    let inner = v.trim();
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let inner = inner.strip_suffix(']').unwrap_or(inner);
    inner.split(',').map(|s| s.trim().to_string()).collect()
}

impl PlatformConfig {
    pub const OPTION: &'static str = "--platform";
    pub const KEYS: &'static [&'static str] = &[
        "num_pci_segments",
        "iommu_segments",
        "iommu_address_width",
        "iommufd",
        "iommufd_fd",
        "vfio_p2p_dma",
        "serial_number",
        "uuid",
        "oem_strings",
        "system_manufacturer",
        "system_product_name",
        "system_version",
        "system_serial_number",
        "system_uuid",
        "system_sku_number",
        "system_family",
        "chassis_asset_tag",
        "tdx",
        "sev_snp",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        p.refuse(&["iommufd_fd"])?;
        p.refuse_unless("tdx", false)?;
        p.refuse_unless("sev_snp", false)?;
        let iommu_segments = p
            .get("iommu_segments")
            .map(|v| {
                string_list(&v)
                    .iter()
                    .map(|s| s.parse::<u16>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| p.error(format!("iommu_segments={v}: a list of segment numbers")))
            })
            .transpose()?;
        // The original's legacy `serial_number`/`uuid` give way to the `system_` keys.
        let cfg = PlatformConfig {
            num_pci_segments: p
                .number("num_pci_segments")?
                .unwrap_or(DEFAULT_NUM_PCI_SEGMENTS),
            iommu_segments,
            iommu_address_width_bits: p
                .number("iommu_address_width")?
                .unwrap_or(DEFAULT_IOMMU_ADDRESS_WIDTH_BITS),
            system_serial_number: p
                .get("system_serial_number")
                .or_else(|| p.get("serial_number")),
            system_uuid: p.get("system_uuid").or_else(|| p.get("uuid")),
            oem_strings: p.get("oem_strings").map(|v| string_list(&v)),
            system_manufacturer: p.get("system_manufacturer"),
            system_product_name: p.get("system_product_name"),
            system_version: p.get("system_version"),
            system_family: p.get("system_family"),
            system_sku_number: p.get("system_sku_number"),
            chassis_asset_tag: p.get("chassis_asset_tag"),
            iommufd: p.toggle("iommufd", false)?,
            vfio_p2p_dma: p.toggle("vfio_p2p_dma", true)?,
            extra: Default::default(),
        };
        cfg.validate().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// What this VMM can give: 1-96 PCI segments, IOMMU segments among them, SMBIOS strings it
    /// can write.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_pci_segments == 0 || self.num_pci_segments > MAX_NUM_PCI_SEGMENTS {
            return Err(format!(
                "num_pci_segments={}: must be 1-{MAX_NUM_PCI_SEGMENTS}",
                self.num_pci_segments
            ));
        }
        for &s in self.iommu_segments.iter().flatten() {
            if s >= self.num_pci_segments {
                return Err(format!(
                    "iommu_segments: segment {s} does not exist (num_pci_segments={})",
                    self.num_pci_segments
                ));
            }
        }
        if self.iommu_address_width_bits > DEFAULT_IOMMU_ADDRESS_WIDTH_BITS {
            return Err(format!(
                "iommu_address_width={}: at most {DEFAULT_IOMMU_ADDRESS_WIDTH_BITS}",
                self.iommu_address_width_bits
            ));
        }
        if self.iommufd {
            return Err("iommufd=on is not supported yet".into());
        }
        if let Some(u) = &self.system_uuid {
            parse_uuid(u)?;
        }
        // SMBIOS strings are NUL-terminated and a structure holds at most 255 of them.
        let strings = [
            ("system_serial_number", &self.system_serial_number),
            ("system_manufacturer", &self.system_manufacturer),
            ("system_product_name", &self.system_product_name),
            ("system_version", &self.system_version),
            ("system_family", &self.system_family),
            ("system_sku_number", &self.system_sku_number),
            ("chassis_asset_tag", &self.chassis_asset_tag),
        ];
        let oem = self
            .oem_strings
            .iter()
            .flatten()
            .map(|s| ("oem_strings", s));
        for (key, s) in strings
            .into_iter()
            .filter_map(|(k, s)| Some((k, s.as_ref()?)))
            .chain(oem)
        {
            if s.is_empty() || s.contains('\0') {
                return Err(format!("{key}: {s:?} must be non-empty, without NUL bytes"));
            }
        }
        if self.oem_strings.as_ref().is_some_and(|o| o.len() > 255) {
            return Err("oem_strings: at most 255 strings".into());
        }
        Ok(())
    }

    /// The system UUID as bytes in RFC 4122 order (`validate` checked it).
    pub fn uuid_bytes(&self) -> Option<[u8; 16]> {
        self.system_uuid.as_deref().and_then(|u| parse_uuid(u).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smbios_keys_and_legacy_aliases() {
        let c = PlatformConfig::parse(
            "serial_number=CH-TEST-1,uuid=67e55044-10b1-426f-9247-bb680e5fe0c8,oem_strings=[a,b]",
        )
        .unwrap();
        assert_eq!(c.system_serial_number.as_deref(), Some("CH-TEST-1"));
        assert_eq!(
            c.uuid_bytes().unwrap()[..4],
            [0x67, 0xe5, 0x50, 0x44],
            "text order"
        );
        assert_eq!(c.oem_strings, Some(vec!["a".into(), "b".into()]));
        assert_eq!(c.num_pci_segments, 1);
        let c = PlatformConfig::parse(
            "system_serial_number=S,serial_number=old,system_uuid={67e55044-10b1-426f-9247-bb680e5fe0c8},\
             system_manufacturer=M,system_product_name=P,system_version=V,system_family=F,\
             system_sku_number=K,chassis_asset_tag=T,num_pci_segments=1,vfio_p2p_dma=off",
        )
        .unwrap();
        assert_eq!(c.system_serial_number.as_deref(), Some("S"));
        assert!(c.uuid_bytes().is_some());
        assert_eq!(c.chassis_asset_tag.as_deref(), Some("T"));
        assert!(!c.vfio_p2p_dma);
    }

    #[test]
    fn more_segments_iommus_and_bad_values_are_refused() {
        for (bad, why) in [
            ("num_pci_segments=97", "must be 1-96"),
            ("num_pci_segments=0", "must be 1-96"),
            ("iommu_segments=[0,1]", "segment 1 does not exist"),
            ("iommu_segments=[x]", "a list of segment numbers"),
            ("uuid=not-a-uuid", "is not a UUID"),
            ("system_uuid=67e55044-10b1-426f-9247", "is not a UUID"),
            ("iommufd=on", "iommufd=on"),
            ("iommufd_fd=3", "'iommufd_fd' is not supported"),
            ("tdx=on", "tdx=on"),
            ("iommu_address_width=65", "at most 64"),
            ("colour=red", "unknown key 'colour'"),
        ] {
            let e = PlatformConfig::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--platform {bad}: ")), "{e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn json_follows_the_original() {
        let c: PlatformConfig = serde_json::from_str(
            r#"{"num_pci_segments": 1, "iommu_segments": null, "iommu_address_width_bits": 64,
                "serial_number": "S", "uuid": "67e55044-10b1-426f-9247-bb680e5fe0c8",
                "oem_strings": ["a"], "iommufd": false, "vfio_p2p_dma": true, "tdx": false}"#,
        )
        .unwrap();
        assert_eq!(c.system_serial_number.as_deref(), Some("S"));
        c.validate().unwrap();
        c.extra.check("platform").unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["system_serial_number"], "S");
        assert_eq!(json["system_uuid"], "67e55044-10b1-426f-9247-bb680e5fe0c8");
        assert_eq!(json["num_pci_segments"], 1);
        let d: PlatformConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(d, PlatformConfig::default());
        let bad: PlatformConfig = serde_json::from_str(r#"{"sev_snp": true}"#).unwrap();
        assert_eq!(
            bad.extra.check("platform").unwrap_err().option,
            "platform.sev_snp"
        );
    }
}
