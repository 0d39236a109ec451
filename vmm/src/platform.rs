//! What `--platform` and `--pvpanic` give the guest: the SMBIOS identity and the pvpanic device.

use arch::smbios::{SmbiosConfig, SmbiosSystem};
use vm_config::PlatformConfig;

/// The SMBIOS tables' contents for `platform` (the original's defaults without one).
pub(crate) fn smbios_config(platform: Option<&PlatformConfig>) -> SmbiosConfig {
    let Some(p) = platform else {
        return SmbiosConfig::default();
    };
    SmbiosConfig {
        system: SmbiosSystem {
            manufacturer: p.system_manufacturer.clone(),
            product_name: p.system_product_name.clone(),
            version: p.system_version.clone(),
            serial_number: p.system_serial_number.clone(),
            uuid: p.uuid_bytes(),
            sku_number: p.system_sku_number.clone(),
            family: p.system_family.clone(),
        },
        chassis_asset_tag: p.chassis_asset_tag.clone(),
        oem_strings: p.oem_strings.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_options_reach_the_smbios_tables() {
        assert_eq!(smbios_config(None), SmbiosConfig::default());
        let p = PlatformConfig::parse(
            "serial_number=CH-TEST-1,uuid=67e55044-10b1-426f-9247-bb680e5fe0c8,oem_strings=[a,b]",
        )
        .unwrap();
        let c = smbios_config(Some(&p));
        assert_eq!(c.system.serial_number.as_deref(), Some("CH-TEST-1"));
        assert_eq!(c.system.uuid.unwrap()[0..2], [0x67, 0xe5]);
        assert_eq!(c.oem_strings, ["a", "b"]);
        assert_eq!(c.system.manufacturer, None, "the default stays");
        arch::smbios::build_table(&c).unwrap();
    }
}
