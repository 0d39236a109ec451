//! Disassembles the ACPI tables with ACPICA's `iasl` (Debian package `acpica-tools`) and fails on
//! any error it reports. The DSDT is also recompiled from its disassembly, and run in ACPICA's
//! `acpiexec` (same package) to check what its `_EVT` notifies.

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
                pci: vec![],
                memory_slots: 0,
                tpm: false,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "hotplug-topology",
            AcpiConfig {
                boot_vcpus: 4,
                max_vcpus: 8,
                topology: Some((2, 2, 1, 2)),
                serial: true,
                pci: vec![],
                memory_slots: 0,
                tpm: false,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "pci",
            AcpiConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                topology: None,
                serial: false,
                pci: vec![pci_host(Some((1 << 40, 1 << 38)))],
                memory_slots: 0,
                tpm: true,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "pci-no-mmio64",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
                topology: None,
                serial: true,
                pci: vec![pci_host(None)],
                memory_slots: 0,
                tpm: false,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "pci-segments",
            AcpiConfig {
                boot_vcpus: 2,
                max_vcpus: 2,
                topology: None,
                serial: true,
                pci: (0..3u16)
                    .map(|s| PciHost {
                        proximity: if s == 2 { 1 } else { 0 },
                        ..PciHost::segment(
                            s,
                            (0xc000_0000 + u64::from(s) * 0x0400_0000, 0x0400_0000),
                            Some(((1 << 40) + (u64::from(s) << 34), 1 << 34)),
                        )
                    })
                    .collect(),
                memory_slots: 0,
                tpm: false,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "memory-hotplug",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: 2,
                topology: None,
                serial: false,
                pci: vec![pci_host(Some((1 << 40, 1 << 38)))],
                memory_slots: 16,
                tpm: true,
                numa: Vec::new(),
                viot: None,
            },
        ),
        (
            "max-vcpus",
            AcpiConfig {
                boot_vcpus: 1,
                max_vcpus: arch::acpi::MAX_VCPUS,
                topology: None,
                serial: true,
                pci: vec![],
                memory_slots: 0,
                tpm: false,
                numa: Vec::new(),
                viot: None,
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

/// Runs `tool` with `args` in `dir`: (whether it succeeded, its stdout and stderr).
fn run(tool: &str, dir: &Path, args: &[&str]) -> (bool, String) {
    let out = match Command::new(tool)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run `{tool}` ({e}): install ACPICA's tools (Debian/Ubuntu package \
             `acpica-tools`) to check the ACPI tables"
        ),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs iasl with `args` in `dir`; panics if it cannot run, fails, or reports errors.
fn iasl(dir: &Path, args: &[&str]) -> String {
    let (ok, text) = run("iasl", dir, args);
    assert!(ok, "iasl {args:?} failed:\n{text}");
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

/// The lines of the block that starts with the line `head` in iasl's disassembly `dsl`, up to
/// its closing brace, trimmed and without comments (`//` and `/* */`), blank lines left out.
fn block(dsl: &str, head: &str) -> Vec<String> {
    let strip = |line: &str| {
        let mut line = line.split("//").next().unwrap().to_string();
        while let Some(start) = line.find("/*") {
            let end = line[start..]
                .find("*/")
                .map_or(line.len(), |e| start + e + 2);
            line.replace_range(start..end, "");
        }
        line.trim().to_string()
    };
    let lines: Vec<String> = dsl.lines().map(strip).filter(|l| !l.is_empty()).collect();
    let starts: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == head).collect();
    assert_eq!(
        starts.len(),
        1,
        "{head:?} found {} times in\n{dsl}",
        starts.len()
    );
    let mut depth = 0i32;
    let mut out = Vec::new();
    for line in &lines[starts[0]..] {
        out.push(line.clone());
        depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
        if depth == 0 && line.contains('}') {
            return out;
        }
    }
    panic!("{head:?} is not closed in\n{dsl}");
}

/// iasl's error for an `_HID` string whose last four characters are not hexadecimal digits.
const IASL_HID_SUFFIX_ERROR: &str = "6035";

/// Recompiles `dsdt.dsl` in `dir`. The only error iasl may report is that `_HID` "VMGENCTR"
/// does not end in hexadecimal digits, as the ACPI specification asks of an ACPI ID: Linux's
/// vmgenid driver matches exactly that string, so the DSDT carries it, and iasl (20200925 at
/// least) refuses it. The recompile then ignores that one error and must otherwise be clean.
fn recompile_dsdt(dir: &Path, name: &str) {
    let args = ["-p", "recompiled", "dsdt.dsl"];
    let (ok, text) = run("iasl", dir, &args);
    if !ok {
        let errors: Vec<(&str, &str)> = text
            .lines()
            .zip(text.lines().skip(1))
            .filter(|(_, l)| l.starts_with("Error"))
            .collect();
        assert!(
            text.contains(" 1 Errors,") && errors.len() == 1,
            "{name}: iasl {args:?} reported errors besides VMGENCTR's:\n{text}"
        );
        let (source, error) = errors[0];
        assert!(
            source.contains("Name (_HID, \"VMGENCTR\")")
                && error.split_whitespace().nth(1) == Some(IASL_HID_SUFFIX_ERROR),
            "{name}: unexpected iasl error:\n{text}"
        );
        iasl(
            dir,
            &["-vw", IASL_HID_SUFFIX_ERROR, "-p", "recompiled", "dsdt.dsl"],
        );
    }
    assert!(dir.join("recompiled.aml").exists());
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
            !cfg.pci.is_empty(),
            "{name}: PCI host presence in\n{dsdt}"
        );
        assert_eq!(
            dsdt.contains("QWordMemory"),
            cfg.pci.iter().any(|p| p.mmio64.is_some()),
            "{name}: 64-bit window in\n{dsdt}"
        );
        // The CPU hotplug controller's registers; with PCI, its hotplug controller's and each
        // segment's 32-bit window too.
        let pci_ranges = if cfg.pci.is_empty() {
            0
        } else {
            1 + cfg.pci.len()
        };
        assert_eq!(
            dsdt.matches("DWordMemory").count(),
            1 + pci_ranges + usize::from(cfg.memory_slots > 0),
            "{name}: 32-bit ranges in\n{dsdt}"
        );
        let cpus = dsdt.matches("\"ACPI0007\"").count();
        assert_eq!(cpus, cfg.max_vcpus as usize, "{name}: CPU devices");

        // The TPM: `\_SB_.TPM2` (MSFT0101) over the CRB page, and the TPM2 table pointing at
        // its control area with start method 7 (CRB).
        assert_eq!(
            dsdt.contains("\"MSFT0101\""),
            cfg.tpm,
            "{name}: TPM presence in\n{dsdt}"
        );
        if cfg.tpm {
            let crb = dsdt
                .lines()
                .skip_while(|l| !l.contains("Device (TPM2)"))
                .skip_while(|l| !l.contains("Memory32Fixed"))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                crb.contains("0xFED40000") && crb.contains("0x00001000"),
                "{name}: TPM _CRS in\n{dsdt}"
            );
            let tpm2 = std::fs::read_to_string(dir.join("tpm2.dsl")).unwrap();
            let line = |key: &str| {
                tpm2.lines()
                    .find(|l| l.contains(key))
                    .unwrap_or_else(|| panic!("{name}: no {key:?} line in\n{tpm2}"))
                    .trim_end()
                    .to_string()
            };
            assert!(
                line("Control Address").ends_with(": 00000000FED40040"),
                "{tpm2}"
            );
            assert!(
                line("Start Method").ends_with(": 07 [Command Response Buffer]"),
                "{tpm2}"
            );
            assert!(!tpm2.contains("terminates"), "{name}: {tpm2}");
        } else {
            assert!(!dir.join("tpm2.dsl").exists(), "{name}: a TPM2 table");
        }

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

        // The VM generation ID device, exactly, and `_EVT`'s two bit tests.
        let addr = layout::VMGENID_START.0;
        let (low, high) = (addr & 0xffff_ffff, addr >> 32);
        assert_eq!((low, high), (0xef000, 0));
        assert_eq!(
            block(&dsdt, "Device (VGEN)"),
            [
                "Device (VGEN)",
                "{",
                "Name (_HID, \"VMGENCTR\")",
                "Name (_CID, \"VM_GEN_COUNTER\")",
                "Name (_DDN, \"VM_Gen_Counter\")",
                "Name (ADDR, Package (0x02)",
                "{",
                "0x000EF000,",
                "Zero",
                "})",
                "}",
            ],
            "{name}:\n{dsdt}"
        );
        let mut evt = vec![
            "Method (_EVT, 1, Serialized)",
            "{",
            "Local0 = GDAT",
            "Local1 = (Local0 & One)",
            "If ((Local1 == One))",
            "{",
            "Notify (\\_SB.PWRB, 0x80)",
            "}",
            "Local2 = (Local0 & 0x02)",
            "If ((Local2 == 0x02))",
            "{",
            "Notify (\\_SB.VGEN, 0x80)",
            "}",
            "Local4 = (Local0 & 0x08)",
            "If ((Local4 == 0x08))",
            "{",
            "\\_SB.CPUS.CSCN ()",
            "}",
        ];
        if !cfg.pci.is_empty() {
            evt.extend([
                "Local3 = (Local0 & 0x04)",
                "If ((Local3 == 0x04))",
                "{",
                "\\_SB.PHPR.PSCN ()",
                "}",
            ]);
        }
        if cfg.memory_slots > 0 {
            evt.extend([
                "Local5 = (Local0 & 0x10)",
                "If ((Local5 == 0x10))",
                "{",
                "\\_SB.MHPC.MSCN ()",
                "}",
            ]);
            let devices = dsdt.matches("EisaId (\"PNP0C80\")").count();
            assert_eq!(devices, cfg.memory_slots as usize, "{name}: memory devices");
        }
        evt.push("}");
        assert_eq!(
            block(&dsdt, "Method (_EVT, 1, Serialized)"),
            evt,
            "{name}:\n{dsdt}"
        );

        // PCI hotplug: the controller's registers, ejection and scan, and the slot devices.
        if !cfg.pci.is_empty() {
            for line in [
                "Name (_HID, EisaId (\"PNP0A06\") /* Generic Container Device */)",
                "Name (_UID, \"PCI Hotplug Controller\")",
                "OperationRegion (PCST, SystemMemory, 0xFEA00000, 0x10)",
                "Field (PCST, DWordAcc, NoLock, WriteAsZeros)",
            ] {
                assert!(dsdt.contains(line), "{name}: {line:?} missing in\n{dsdt}");
            }
            assert_eq!(
                block(&dsdt, "Method (PCEJ, 2, Serialized)"),
                [
                    "Method (PCEJ, 2, Serialized)",
                    "{",
                    "Acquire (BLCK, 0xFFFF)",
                    "PSEG = Arg1",
                    "B0EJ = (One << Arg0)",
                    "Release (BLCK)",
                    "Return (Zero)",
                    "}",
                ],
                "{name}:\n{dsdt}"
            );
            // PSCN selects each segment in turn and lets its bridge notify.
            let mut pscn = vec!["Method (PSCN, 0, Serialized)".to_string(), "{".into()];
            for p in &cfg.pci {
                let n = match p.segment {
                    0 => "Zero".to_string(),
                    1 => "One".to_string(),
                    n => format!("0x{n:02X}"),
                };
                pscn.push(format!("PSEG = {n}"));
                pscn.push(format!("\\_SB.PC{:02X}.PCNT ()", p.segment));
            }
            pscn.push("}".into());
            assert_eq!(
                block(&dsdt, "Method (PSCN, 0, Serialized)"),
                pscn,
                "{name}:\n{dsdt}"
            );
            // A bridge per segment, each with its node (`_PXM`).
            for p in &cfg.pci {
                let bridge = format!("Device (PC{:02X})", p.segment);
                assert!(dsdt.contains(&bridge), "{name}: no {bridge} in\n{dsdt}");
            }
            let pxm = cfg.pci.len();
            assert_eq!(
                dsdt.matches("Method (_PXM, 0").count(),
                pxm,
                "{name}:\n{dsdt}"
            );
            // `block` wants one match: with several bridges, check the last one's slot.
            let s031 = dsdt.rfind("Device (S031)").expect("slot 31");
            assert_eq!(
                block(&dsdt[s031..], "Device (S031)"),
                [
                    "Device (S031)",
                    "{",
                    "Name (_ADR, 0x001F0000)",
                    "Name (_SUN, 0x1F)",
                    "Method (_EJ0, 1, Serialized)",
                    "{",
                    "\\_SB.PHPR.PCEJ (_SUN, _SEG)",
                    "}",
                    "}",
                ],
                "{name}:\n{dsdt}"
            );
            // Slot 0 is segment 0's host bridge; the other segments can hotplug there.
            assert_eq!(
                dsdt.matches("Device (S000)").count(),
                cfg.pci.len() - 1,
                "{name}: the host bridge is no slot"
            );
        }

        // The disassembled DSDT must compile back.
        recompile_dsdt(&dir, name);

        if std::env::var_os("ACPI_IASL_KEEP").is_none() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

/// A table for acpiexec: `\TEVT (events)` stores `events` in the GED's event register and runs
/// its `_EVT`, as the guest's GED driver does on the interrupt.
const TEST_SSDT: &str = r#"DefinitionBlock ("", "SSDT", 2, "TEST", "GEDTEST", 1)
{
    External (\_SB_.GED_.GDAT, FieldUnitObj)
    External (\_SB_.GED_._EVT, MethodObj)
    Method (\TEVT, 1, Serialized)
    {
        \_SB_.GED_.GDAT = Arg0
        \_SB_.GED_._EVT (0x05)
    }
}
"#;

/// Runs the DSDT in ACPICA's AML interpreter (`acpiexec`, whose emulated I/O region keeps what
/// is written to it): for each value of the GED's event register, `_EVT` must notify exactly
/// the devices of the bits set (bit 0: PWRB, bit 1: VGEN, both when both are set, none for
/// bits it does not know); and `\_SB_.VGEN.ADDR` must evaluate to the package Linux's vmgenid
/// driver expects, two integers giving `layout::VMGENID_START`.
#[test]
fn acpiexec_runs_evt_for_each_event_bit_and_reads_vgen_addr() {
    let cfg = &configs()[0].1;
    let dir = scratch_dir("acpiexec");
    let tables = build_tables(cfg).unwrap();
    let dsdt = &tables.iter().find(|t| &t.0 == b"DSDT").unwrap().1;
    std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
    std::fs::write(dir.join("tevt.asl"), TEST_SSDT).unwrap();
    iasl(&dir, &["tevt.asl"]);

    // One acpiexec per value, all at once (each takes about a second, mostly waiting): notify
    // handlers run on threads of their own, so in one process their output could come after
    // the next evaluation's.
    let cases: [(u8, &[&str]); 6] = [
        (0, &[]),
        (1, &["PWRB"]),
        (2, &["VGEN"]),
        (3, &["PWRB", "VGEN"]),
        (4, &[]),
        (0xff, &["PWRB", "VGEN"]),
    ];
    let runs: Vec<_> = cases
        .iter()
        .map(|&(value, _)| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let batch = format!(
                    "evaluate \\TEVT {value:#x}; evaluate \\_SB_.VGEN.ADDR; \
                     evaluate \\_SB_.VGEN._HID; evaluate \\_SB_.VGEN._CID"
                );
                run("acpiexec", &dir, &["-b", &batch, "dsdt.aml", "tevt.aml"])
            })
        })
        .collect();
    for ((value, want), handle) in cases.iter().zip(runs) {
        let (ok, out) = handle.join().unwrap();
        assert!(ok, "acpiexec failed for {value:#x}:\n{out}");
        for bad in ["ACPI Error", "ACPI Exception", "AE_", "failed"] {
            assert!(!out.contains(bad), "{value:#x}: {bad:?} in\n{out}");
        }
        assert!(
            out.contains("No object was returned from evaluation of \\TEVT"),
            "{value:#x}: \\TEVT did not run to its end:\n{out}"
        );
        let mut notified: Vec<String> = out
            .lines()
            .filter(|l| l.contains("Notify"))
            .map(|l| {
                let device = l
                    .split('[')
                    .nth(1)
                    .and_then(|r| r.split(']').next())
                    .unwrap_or_else(|| panic!("{value:#x}: odd notify line {l:?}"));
                assert!(
                    l.contains("Device Notify") && l.contains("Value 0x80"),
                    "{value:#x}: {l:?}"
                );
                device.to_string()
            })
            .collect();
        notified.sort();
        assert_eq!(notified, *want, "events {value:#x}:\n{out}");

        let addr = out
            .split("Evaluating \\_SB_.VGEN.ADDR")
            .nth(1)
            .unwrap_or_else(|| panic!("no ADDR evaluation in\n{out}"));
        let addr: Vec<&str> = addr.lines().map(str::trim).skip(2).take(3).collect();
        assert_eq!(
            addr,
            [
                "[Package] Contains 2 Elements:",
                &format!("[Integer] = {:016X}", layout::VMGENID_START.0 & 0xffff_ffff),
                &format!("[Integer] = {:016X}", layout::VMGENID_START.0 >> 32),
            ],
            "{out}"
        );
        assert!(out.contains("[String] Length 08 = \"VMGENCTR\""), "{out}");
        assert!(
            out.contains("[String] Length 0E = \"VM_GEN_COUNTER\""),
            "{out}"
        );
    }

    if std::env::var_os("ACPI_IASL_KEEP").is_none() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The DSDT of configuration `name` and the test table `asl` (compiled) in a scratch dir, and
/// what acpiexec prints for `batch` run over them, checked to have run clean.
fn acpiexec_batch(name: &str, asl: &str, batch: &str) -> (PathBuf, String) {
    let cfg = &configs().into_iter().find(|(n, _)| *n == name).unwrap().1;
    let dir = scratch_dir(&format!("acpiexec-{name}"));
    let tables = build_tables(cfg).unwrap();
    let dsdt = &tables.iter().find(|t| &t.0 == b"DSDT").unwrap().1;
    std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
    std::fs::write(dir.join("test.asl"), asl).unwrap();
    iasl(&dir, &["test.asl"]);
    let (ok, out) = run("acpiexec", &dir, &["-b", batch, "dsdt.aml", "test.aml"]);
    assert!(ok, "acpiexec failed:\n{out}");
    for bad in ["ACPI Error", "ACPI Exception", "AE_", "failed"] {
        assert!(!out.contains(bad), "{bad:?} in\n{out}");
    }
    (dir, out)
}

/// Each notification acpiexec reported, `(device, value)` (`("S003", "0x01")`), sorted.
fn notifications(out: &str) -> Vec<(String, String)> {
    let mut n: Vec<(String, String)> = out
        .lines()
        .filter(|l| l.contains("Notify"))
        .map(|l| {
            let device = l.split('[').nth(1).and_then(|r| r.split(']').next());
            let value = l
                .split("Value ")
                .nth(1)
                .and_then(|v| v.split_whitespace().next());
            match (device, value) {
                (Some(d), Some(v)) => (d.to_string(), v.to_string()),
                _ => panic!("odd notify line {l:?}"),
            }
        })
        .collect();
    n.sort();
    n
}

/// The integers the evaluations returned, in order (`"[Integer] = 000000000000000F"`).
fn integers(out: &str) -> Vec<&str> {
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("[Integer] = "))
        .collect()
}

/// Removes a scratch dir unless ACPI_IASL_KEEP is set.
fn done(dir: &Path) {
    if std::env::var_os("ACPI_IASL_KEEP").is_none() {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// For acpiexec: `\TPCI (up, down)` puts `up` and `down` in the PCI hotplug controller's `PCIU`
/// and `PCID` registers and the PCI bit in the GED's, then runs `_EVT`, as the GED interrupt
/// makes the guest do after the VMM hot-adds or asks to remove devices.
const PCI_SSDT: &str = r#"DefinitionBlock ("", "SSDT", 2, "TEST", "PCITEST", 1)
{
    External (\_SB_.GED_.GDAT, FieldUnitObj)
    External (\_SB_.GED_._EVT, MethodObj)
    External (\_SB_.PHPR.PCIU, FieldUnitObj)
    External (\_SB_.PHPR.PCID, FieldUnitObj)
    Method (\TPCI, 2, Serialized)
    {
        \_SB_.PHPR.PCIU = Arg0
        \_SB_.PHPR.PCID = Arg1
        \_SB_.GED_.GDAT = 0x04
        \_SB_.GED_._EVT (0x05)
    }
}
"#;

/// ACPICA runs the PCI hotplug AML as Linux would: `_EVT` on the PCI bit makes `PSCN` notify
/// each added slot with 1 (device check) and each slot to remove with 3 (eject request), and a
/// slot's `_EJ0` writes its bit to `B0EJ` with segment 0 selected in `PSEG`.
#[test]
fn acpiexec_runs_the_pci_hotplug_scan_and_a_slot_ejection() {
    let up = 1u32 << 3 | 1 << 31;
    let down = 1u32 << 5;
    let batch = format!(
        "evaluate \\TPCI {up:#x} {down:#x}; evaluate \\_SB_.PC00.S007._EJ0 0; \
         evaluate \\_SB_.PHPR.B0EJ; evaluate \\_SB_.PHPR.PSEG"
    );
    let (dir, out) = acpiexec_batch("pci", PCI_SSDT, &batch);
    let want: Vec<(String, String)> = [("S003", "0x01"), ("S005", "0x03"), ("S031", "0x01")]
        .iter()
        .map(|&(d, v)| (d.to_string(), v.to_string()))
        .collect();
    assert_eq!(notifications(&out), want, "\n{out}");
    // B0EJ after S007's _EJ0: bit 7; PSEG: segment 0.
    assert_eq!(
        integers(&out),
        [
            format!("[Integer] = {:016X}", 1u64 << 7).as_str(),
            "[Integer] = 0000000000000000"
        ],
        "\n{out}"
    );
    done(&dir);
}

/// For acpiexec: `\TINS` and `\TRMV` set the CPU hotplug controller's `CINS` or `CRMV` (the
/// emulated region has one flag byte for every CPU, and a write of one flag clears the others:
/// WriteAsZeros) and the CPU bit in the GED's event register, then run `_EVT`; `\TPEN` sets
/// `CPEN`.
const CPU_SSDT: &str = r#"DefinitionBlock ("", "SSDT", 2, "TEST", "CPUTEST", 1)
{
    External (\_SB_.GED_.GDAT, FieldUnitObj)
    External (\_SB_.GED_._EVT, MethodObj)
    External (\_SB_.PRES.CINS, FieldUnitObj)
    External (\_SB_.PRES.CRMV, FieldUnitObj)
    External (\_SB_.PRES.CPEN, FieldUnitObj)
    Method (\TINS, 0, Serialized)
    {
        \_SB_.PRES.CINS = One
        \_SB_.GED_.GDAT = 0x08
        \_SB_.GED_._EVT (0x05)
    }
    Method (\TRMV, 0, Serialized)
    {
        \_SB_.PRES.CRMV = One
        \_SB_.GED_.GDAT = 0x08
        \_SB_.GED_._EVT (0x05)
    }
    Method (\TPEN, 0, Serialized)
    {
        \_SB_.PRES.CPEN = One
    }
}
"#;

/// ACPICA runs the CPU hotplug AML: `_EVT` on the CPU bit makes `CSCN` walk every possible CPU
/// and notify it with 1 when its `CINS` is set and with 3 when its `CRMV` is; a CPU's `_STA`
/// is 0xf exactly when `CPEN` is set; `_EJ0` selects the CPU in `CSEL` and sets `CEJ0`.
#[test]
fn acpiexec_runs_the_cpu_scan_status_and_ejection() {
    let max = configs()
        .into_iter()
        .find(|(n, _)| *n == "hotplug-topology")
        .unwrap()
        .1
        .max_vcpus;
    for (method, value) in [("TINS", "0x01"), ("TRMV", "0x03")] {
        let batch = format!(
            "evaluate \\{method}; evaluate \\_SB_.CPUS.C005._STA; \
             evaluate \\TPEN; evaluate \\_SB_.CPUS.C005._STA; \
             evaluate \\_SB_.CPUS.C006._EJ0 0; evaluate \\_SB_.PRES.CSEL; \
             evaluate \\_SB_.PRES.CEJ0"
        );
        let (dir, out) = acpiexec_batch("hotplug-topology", CPU_SSDT, &batch);
        let want: Vec<(String, String)> = (0..max)
            .map(|cpu| (arch::acpi::cpu_device_name(cpu), value.to_string()))
            .collect();
        assert_eq!(notifications(&out), want, "every CPU is walked\n{out}");
        assert_eq!(
            integers(&out),
            [
                "[Integer] = 0000000000000000",
                "[Integer] = 000000000000000F",
                "[Integer] = 0000000000000006",
                "[Integer] = 0000000000000001",
            ],
            "_STA absent then present, CSEL 6 and CEJ0 set by _EJ0:\n{out}"
        );
        done(&dir);
    }
}

/// For acpiexec: `\TMEM (slot, base, length)` puts a DIMM in the memory hotplug controller's
/// emulated registers (one set for every slot), marked inserting, and runs `_EVT` on the
/// memory bit; `\TMEN` marks it present.
const MEMORY_SSDT: &str = r#"DefinitionBlock ("", "SSDT", 2, "TEST", "MEMTEST", 1)
{
    External (\_SB_.GED_.GDAT, FieldUnitObj)
    External (\_SB_.GED_._EVT, MethodObj)
    External (\_SB_.MHPC.MHBL, FieldUnitObj)
    External (\_SB_.MHPC.MHBH, FieldUnitObj)
    External (\_SB_.MHPC.MHLL, FieldUnitObj)
    External (\_SB_.MHPC.MHLH, FieldUnitObj)
    External (\_SB_.MHPC.MINS, FieldUnitObj)
    External (\_SB_.MHPC.MEN_, FieldUnitObj)
    Method (\TMEM, 2, Serialized)
    {
        \_SB_.MHPC.MHBL = (Arg0 & 0xFFFFFFFF)
        \_SB_.MHPC.MHBH = (Arg0 >> 32)
        \_SB_.MHPC.MHLL = (Arg1 & 0xFFFFFFFF)
        \_SB_.MHPC.MHLH = (Arg1 >> 32)
        \_SB_.MHPC.MINS = One
        \_SB_.GED_.GDAT = 0x10
        \_SB_.GED_._EVT (0x05)
    }
    Method (\TMEN, 0, Serialized)
    {
        \_SB_.MHPC.MEN_ = One
    }
}
"#;

/// ACPICA runs the memory hotplug AML: `_EVT` on the memory bit makes `MSCN` notify every slot
/// marked inserting with 1; a memory device's `_CRS` is one QWordMemory range built from the
/// base and length registers (above 4 GiB: both halves), and its `_STA` is 0xf exactly when
/// `MEN_` is set.
#[test]
fn acpiexec_runs_the_memory_scan_crs_and_status() {
    // The emulated region has one dword at offset 0 for `MSEL` (written) and `MHBL` (read),
    // which the device keeps apart: `_CRS` writes the slot number there before it reads the
    // base, so slot 0 and a base whose low half is 0 keep the two in agreement.
    let (base, len) = (0x5_0000_0000u64, 0x2_0800_0000u64);
    let batch = format!(
        "evaluate \\_SB_.MHPC.M000._STA; evaluate \\TMEM {base:#x} {len:#x}; \
         evaluate \\TMEN; evaluate \\_SB_.MHPC.M000._STA; evaluate \\_SB_.MHPC.M000._CRS"
    );
    let (dir, out) = acpiexec_batch("memory-hotplug", MEMORY_SSDT, &batch);
    let want: Vec<(String, String)> = (0..16)
        .map(|slot| (arch::acpi::memory_device_name(slot), "0x01".to_string()))
        .collect();
    assert_eq!(
        notifications(&out),
        want,
        "every slot reads inserting here\n{out}"
    );
    assert_eq!(
        integers(&out),
        [
            "[Integer] = 0000000000000000",
            "[Integer] = 000000000000000F"
        ],
        "_STA absent, then present:\n{out}"
    );
    // The _CRS buffer's bytes, as acpiexec dumps them (rows of hex after the offset).
    let dump = out
        .split("Evaluating \\_SB_.MHPC.M000._CRS")
        .nth(1)
        .unwrap_or_else(|| panic!("no _CRS in\n{out}"));
    let bytes: Vec<u8> = dump
        .lines()
        .skip_while(|l| !l.contains("[Buffer]"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .flat_map(|l| {
            l.split_whitespace()
                .skip(1)
                .take_while(|w| w.len() == 2 && u8::from_str_radix(w, 16).is_ok())
                .map(|w| u8::from_str_radix(w, 16).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let qword = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    assert!(bytes.len() >= 46, "{bytes:x?}\n{out}");
    assert_eq!(bytes[0], 0x8a, "QWordMemory\n{out}");
    assert_eq!(
        (qword(14), qword(22), qword(38)),
        (base, base + len - 1, len),
        "_MIN, _MAX, _LEN\n{out}"
    );
    done(&dir);
}
