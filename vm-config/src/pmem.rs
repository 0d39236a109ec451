//! `--pmem file=<path>[,size=<bytes>][,discard_writes=on|off]`: a virtio-pmem device whose
//! memory is the file, mapped into the guest's physical address space (see docs/pci.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::{pci_common, PciDeviceCommonConfig, PCI_KEYS};
use crate::{ConfigError, OptionParser};

/// The mapping's size must be a multiple of this, as the original requires (its guest-physical
/// range is aligned to it too, so the guest can map it with huge pages).
pub const PMEM_ALIGNMENT: u64 = 2 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmemConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The backing file (or a directory: an unnamed temporary file of `size` bytes in it, as
    /// the original).
    pub file: PathBuf,
    /// Bytes mapped (a multiple of 2 MiB, at most the file's length); the file's length when
    /// not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The guest's writes go to a private copy: the file is never changed.
    #[serde(default)]
    pub discard_writes: bool,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl PmemConfig {
    pub const OPTION: &'static str = "--pmem";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            Self::OPTION,
            raw,
            &[&["file", "size", "discard_writes"], PCI_KEYS],
            &[],
        )?;
        let pci_common = pci_common(&p)?;
        let file = p
            .get("file")
            .ok_or_else(|| p.error("file= is required (the backing file)"))?;
        let c = PmemConfig {
            file: PathBuf::from(file),
            size: p.size("size")?,
            pci_common,
            discard_writes: p.toggle("discard_writes", false)?,
            extra: Default::default(),
        };
        c.validate_fields()?;
        Ok(c)
    }

    fn error(&self, msg: String) -> ConfigError {
        ConfigError::new(Self::OPTION, &self.file.display().to_string(), msg)
    }

    /// What can be checked without the file (the parser's checks, for JSON too).
    fn validate_fields(&self) -> Result<(), ConfigError> {
        if self.file.as_os_str().is_empty() {
            return Err(self.error("file= is required (the backing file)".into()));
        }
        if let Some(size) = self.size {
            if size == 0 || !size.is_multiple_of(PMEM_ALIGNMENT) {
                return Err(
                    self.error(format!("size={size}: must be a non-zero multiple of 2 MiB"))
                );
            }
        }
        self.pci_common.check().map_err(|m| self.error(m))?;
        Ok(())
    }

    /// The configuration's checks, the file's included: it exists, and the size mapped is a
    /// multiple of 2 MiB within it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_fields()?;
        self.mapped_size(&self.file).map(|_| ())
    }

    /// The bytes to map of `file` (the configured path): `size`, or the file's length.
    pub fn mapped_size(&self, file: &Path) -> Result<u64, ConfigError> {
        let meta = std::fs::metadata(file).map_err(|e| self.error(format!("cannot open: {e}")))?;
        if meta.is_dir() {
            return self.size.ok_or_else(|| {
                self.error("a directory needs size= (the temporary file's size)".into())
            });
        }
        if !meta.is_file() {
            return Err(self.error("not a regular file or a directory".into()));
        }
        let len = meta.len();
        let size = self.size.unwrap_or(len);
        if size > len {
            return Err(self.error(format!("size={size} is more than the file's {len} bytes")));
        }
        if size == 0 || !size.is_multiple_of(PMEM_ALIGNMENT) {
            return Err(self.error(format!(
                "{size} bytes: the size mapped must be a non-zero multiple of 2 MiB"
            )));
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_validate() {
        let dir = std::env::temp_dir().join(format!("pmem-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.img");
        std::fs::write(&f, vec![0u8; 4 << 20]).unwrap();
        let odd = dir.join("odd.img");
        std::fs::write(&odd, vec![0u8; 3 << 20]).unwrap();
        let p = f.display();
        let c = PmemConfig::parse(&format!("file={p},discard_writes=on,id=pm,pci_device_id=9"))
            .unwrap();
        assert!(c.discard_writes);
        assert_eq!(c.pci_common.id.as_deref(), Some("pm"));
        assert_eq!(c.mapped_size(&c.file).unwrap(), 4 << 20);
        let c = PmemConfig::parse(&format!("file={p},size=2M")).unwrap();
        assert_eq!(c.mapped_size(&c.file).unwrap(), 2 << 20);
        c.validate().unwrap();
        for bad in [
            "size=2M".to_string(),
            format!("file={p},size=3M"),
            format!("file={p},size=0"),
            format!("file={p},discard_writes=maybe"),
            format!("file={p},foo=1"),
            format!("file={p},pci_device_id=0"),
        ] {
            assert!(PmemConfig::parse(&bad).is_err(), "{bad}");
        }
        for bad in [
            format!("file={p},size=8M"),
            format!("file={}", odd.display()),
            format!("file={}/missing", dir.display()),
            format!("file={}", dir.display()),
        ] {
            let e = PmemConfig::parse(&bad).unwrap().validate().unwrap_err();
            assert!(e.to_string().contains("--pmem"), "{bad}: {e}");
        }
        PmemConfig::parse(&format!("file={},size=2M", dir.display()))
            .unwrap()
            .validate()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_names_as_the_original() {
        let c: PmemConfig = serde_json::from_str(
            r#"{"file": "/p", "size": 2097152, "iommu": false, "discard_writes": true,
                "pci_segment": 0, "id": "p0"}"#,
        )
        .unwrap();
        assert_eq!(c.size, Some(2 << 20));
        assert!(c.discard_writes);
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["file"], "/p");
        assert_eq!(j["discard_writes"], true);
        assert_eq!(j["id"], "p0");
    }
}
