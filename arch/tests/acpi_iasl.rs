//! Disassembles the ACPI tables with ACPICA's `iasl` (Debian package `acpica-tools`) and fails on
//! any error it reports. The DSDT is also recompiled from its disassembly.

use std::path::{Path, PathBuf};
use std::process::Command;

use arch::acpi::{build_tables, AcpiConfig, PciHost};
use arch::layout;

/// The PCI host bridge as the VMM sets it up, with the 64-bit window `mmio64`.
fn pci_host(mmio64: Option<(u64, u64)>) -> PciHost {
    PciHost::segment0(
        (
            layout::MEM_32BIT_DEVICES_START.0,
            layout::MEM_32BIT_DEVICES_SIZE,
        ),
        mmio64,
    )
}

fn configs() -> Vec<(&'static str, AcpiConfig)> {
    vec![
        (
            "one-vcpu",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                topology: None,
                serial: true,
                pci: None,
            },
        ),
        (
            "hotplug-topology",
            AcpiConfig {
                boot_vcpus: 4,
                max_vcpus: 8,
                topology: Some((2, 2, 1, 2)),
                serial: true,
                pci: None,
            },
        ),
        (
            "pci",
            AcpiConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                topology: None,
                serial: false,
                pci: Some(pci_host(Some((1 << 40, 1 << 38)))),
            },
        ),
        (
            "pci-no-mmio64",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                topology: None,
                serial: true,
                pci: Some(pci_host(None)),
            },
        ),
        (
            "max-vcpus",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: arch::acpi::MAX_VCPUS,
                topology: None,
                serial: true,
                pci: None,
            },
        ),
    ]
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("acpi-iasl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs iasl with `args` in `dir`; panics if it cannot run, fails, or reports errors.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = match Command::new("iasl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `iasl` ({e}): install ACPICA's iasl (Debian/Ubuntu package `acpica-tools`) \
             to check the ACPI tables"
        ),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "iasl {args:?} failed ({}):\n{text}",
        out.status
    );
    for line in text.lines() {
        let lower = line.to_ascii_lowercase();
        // Summary lines such as "Compilation complete. 0 Errors, 1 Warnings, ..." must say 0.
        if let Some(pos) = lower.find(" error") {
            let count = lower[..pos].split_whitespace().last().unwrap_or("");
            if count.parse::<u32>().is_ok() {
                assert_eq!(count, "0", "iasl {args:?} reported errors:\n{text}");
                continue;
            }
        }
        assert!(
            !lower.contains("error") && !line.contains("****"),
            "iasl {args:?} complained: {line}\n{text}"
        );
    }
    text
}

#[test]
fn iasl_disassembles_every_table_without_errors() {
    for (name, cfg) in configs() {
        let dir = scratch_dir(name);
        let tables = build_tables(&cfg).unwrap();
        for (sig, bytes) in &tables {
            if sig == b"RSDP" {
                // iasl only disassembles tables with a standard header; the RSDP's checksums and
                // XSDT pointer are checked by the unit tests.
                assert_eq!(&bytes[..8], b"RSD PTR ");
                continue;
            }
            let sig = String::from_utf8_lossy(sig).to_lowercase();
            let file = format!("{sig}.dat");
            std::fs::write(dir.join(&file), bytes).unwrap();
            let out = iasl(&dir, &["-d", &file]);
            let dsl = dir.join(format!("{sig}.dsl"));
            assert!(dsl.exists(), "{name}: iasl wrote no {sig}.dsl:\n{out}");
        }

        let dsdt = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        assert!(dsdt.contains("_S5_"), "{name}: no \\_S5_ in\n{dsdt}");
        assert!(
            dsdt.contains("ACPI0007"),
            "{name}: no CPU device in\n{dsdt}"
        );
        assert!(
            dsdt.contains("PNP0C0C"),
            "{name}: no power button in\n{dsdt}"
        );
        assert!(dsdt.contains("PNP0B00"), "{name}: no RTC in\n{dsdt}");
        assert_eq!(
            dsdt.contains("PNP0501"),
            cfg.serial,
            "{name}: COM1 presence in\n{dsdt}"
        );
        assert_eq!(
            dsdt.contains("PNP0A08"),
            cfg.pci.is_some(),
            "{name}: PCI host presence in\n{dsdt}"
        );
        assert_eq!(
            dsdt.contains("QWordMemory"),
            cfg.pci.as_ref().is_some_and(|p| p.mmio64.is_some()),
            "{name}: 64-bit window in\n{dsdt}"
        );
        assert_eq!(
            dsdt.contains("DWordMemory"),
            cfg.pci.is_some(),
            "{name}: 32-bit window in\n{dsdt}"
        );
        let cpus = dsdt.matches("\"ACPI0007\"").count();
        assert_eq!(cpus, cfg.max_vcpus as usize, "{name}: CPU devices");

        let madt = std::fs::read_to_string(dir.join("apic.dsl")).unwrap();
        let local_apics = madt.matches("Processor Local APIC").count();
        assert_eq!(local_apics, cfg.max_vcpus as usize, "{name}:\n{madt}");

        let fadt = std::fs::read_to_string(dir.join("facp.dsl")).unwrap();
        let hw_reduced = fadt
            .lines()
            .find(|l| l.contains("Hardware Reduced"))
            .unwrap_or_else(|| panic!("{name}: no HW reduced flag line in\n{fadt}"));
        assert!(hw_reduced.trim_end().ends_with(": 1"), "{hw_reduced}");
        // The PM timer at 0x608, as in the original: 32 bits (TMR_VAL_EXT), X_PM_TMR_BLK in
        // SystemIO with dword access, and the legacy block of length 4.
        let line = |key: &str| {
            fadt.lines()
                .find(|l| l.contains(key))
                .unwrap_or_else(|| panic!("{name}: no {key:?} line in\n{fadt}"))
                .trim_end()
                .to_string()
        };
        assert!(line("32-bit PM Timer").ends_with(": 1"), "{fadt}");
        assert!(
            line("PM Timer Block Address").ends_with(": 00000608"),
            "{fadt}"
        );
        assert!(line("PM Timer Block Length").ends_with(": 04"), "{fadt}");
        let x_tmr: Vec<&str> = fadt
            .lines()
            .skip_while(|l| !l.contains("PM Timer Block : [Generic Address Structure]"))
            .take(6)
            .collect();
        let x_tmr = x_tmr.join("\n");
        for want in [
            "Space ID : 01 [SystemIO]",
            "Bit Width : 20",
            "[DWord Access:32]",
            "Address : 0000000000000608",
        ] {
            assert!(
                x_tmr.contains(want),
                "{name}: X_PM_TMR_BLK lacks {want:?}:\n{x_tmr}"
            );
        }
        // The GED's event register, moved off the PM timer's port.
        assert!(
            dsdt.contains("OperationRegion (GDST, SystemIO, 0x0620, One)"),
            "{name}: GED region in\n{dsdt}"
        );

        // The disassembled DSDT must compile back.
        iasl(&dir, &["-p", "recompiled", "dsdt.dsl"]);
        assert!(dir.join("recompiled.aml").exists());

        if std::env::var_os("ACPI_IASL_KEEP").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
