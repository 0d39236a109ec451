//! Reads our SMBIOS tables with `dmidecode` (Debian package `dmidecode`), as a guest's tools
//! would: its `--from-dump` file is the entry point at offset 0 with the table address
//! rewritten to 0x20, and the structure table at 0x20 (what `dmidecode --dump-bin` writes).

use std::process::Command;

use arch::smbios::{build_entry_point, build_table, SmbiosConfig, SmbiosSystem};

const TABLE_OFFSET: u64 = 0x20;

/// `dmidecode --from-dump <dump of cfg's tables> args`; `name` names the dump file.
fn dmidecode(name: &str, cfg: &SmbiosConfig, args: &[&str]) -> String {
    let table = build_table(cfg).unwrap();
    let mut dump = build_entry_point(TABLE_OFFSET, table.len() as u32).to_vec();
    dump.resize(TABLE_OFFSET as usize, 0);
    dump.extend_from_slice(&table);
    let dir = tempfile::Builder::new()
        .prefix("smbios-dmidecode-")
        .tempdir()
        .unwrap();
    let file = dir.path().join(format!("{name}.bin"));
    std::fs::write(&file, &dump).unwrap();
    // In /usr/sbin, which a user's PATH may lack.
    let bin = ["/usr/sbin/dmidecode", "/sbin/dmidecode"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("dmidecode");
    let out = Command::new(bin)
        .arg("--from-dump")
        .arg(&file)
        .args(args)
        .output()
        .expect("dmidecode (Debian package dmidecode) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        !err.contains("Invalid") && !err.contains("invalid"),
        "{err}"
    );
    text
}

#[test]
fn dmidecode_reads_the_default_tables() {
    let text = dmidecode("default", &SmbiosConfig::default(), &[]);
    for want in [
        "SMBIOS 3.2.0 present.",
        "Vendor: cloud-hypervisor",
        "Manufacturer: Cloud Hypervisor",
        "Product Name: cloud-hypervisor",
        "System is a virtual machine",
        "End Of Table",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
}

#[test]
fn dmidecode_reads_platform_identity_and_oem_strings() {
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        let text = "67e5504410b1426f9247bb680e5fe0c8";
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
    }
    let cfg = SmbiosConfig {
        system: SmbiosSystem {
            serial_number: Some("CH-TEST-1".into()),
            uuid: Some(uuid),
            ..Default::default()
        },
        chassis_asset_tag: Some("TAG-7".into()),
        oem_strings: vec!["a".into(), "io.systemd.credential:x=y".into()],
    };
    assert_eq!(
        dmidecode("uuid", &cfg, &["-s", "system-uuid"]).trim(),
        "67e55044-10b1-426f-9247-bb680e5fe0c8"
    );
    assert_eq!(
        dmidecode("serial", &cfg, &["-s", "system-serial-number"]).trim(),
        "CH-TEST-1"
    );
    assert_eq!(
        dmidecode("tag", &cfg, &["-s", "chassis-asset-tag"]).trim(),
        "TAG-7"
    );
    let text = dmidecode("oem", &cfg, &["-t", "11"]);
    assert!(
        text.contains("String 1: a") && text.contains("String 2: io.systemd.credential:x=y"),
        "{text}"
    );
}
