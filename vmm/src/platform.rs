//! What `--platform` and `--pvpanic` give the guest: the SMBIOS identity and the pvpanic device.

use std::sync::{Arc, Mutex};

use arch::smbios::{SmbiosConfig, SmbiosSystem};
use pci::pvpanic::{PanicSink, PvPanic, PVPANIC_BAR_KIND, PVPANIC_BAR_SIZE, PVPANIC_ID};
use vm_config::PlatformConfig;

use crate::pci_setup::{PciDevices, PciSetupError};

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

/// Puts the pvpanic device on segment 0, after the configured devices (the lowest free slot,
/// or the one a restored VM had it in), its BAR in the 32-bit window; what the guest writes
/// goes to `sink`.
pub(crate) fn add_pvpanic(
    pci: &mut PciDevices,
    slot_hints: Option<&crate::pci_setup::SlotHints>,
    sink: Arc<dyn PanicSink>,
) -> Result<crate::pci_setup::PciAddress, PciSetupError> {
    let slot = slot_hints.and_then(|h| h.get(PVPANIC_ID)).map(|h| h.slot);
    pci.place_pci(
        "--pvpanic",
        PVPANIC_ID.to_string(),
        slot,
        (PVPANIC_BAR_SIZE, PVPANIC_BAR_KIND),
        |bar| Arc::new(Mutex::new(PvPanic::new(bar, sink))),
    )
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
