//! The SRAT and SLIT of `--numa`, disassembled by ACPICA's iasl (package `acpica-tools`):
//! every node's vCPUs, RAM and hot-pluggable memory in the SRAT, the distances in the SLIT.

use std::process::Command;

use arch::acpi::{build_tables, AcpiConfig, NumaNode};

fn config(numa: Vec<NumaNode>) -> AcpiConfig {
    AcpiConfig {
        boot_vcpus: 2,
        max_vcpus: 3,
        topology: None,
        serial: true,
        pci: vec![],
        memory_slots: 0,
        tpm: false,
        numa,
        viot: None,
    }
}

/// iasl's disassembly of `table` (`srat`, `slit`) for `cfg`.
fn disassemble(cfg: &AcpiConfig, table: &[u8; 4]) -> String {
    // One folder per call: tests run in parallel, and two may disassemble the same table.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "acpi-numa-{}-{n}-{}",
        std::process::id(),
        String::from_utf8_lossy(table)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = build_tables(cfg)
        .unwrap()
        .into_iter()
        .find(|(s, _)| s == table)
        .map(|(_, b)| b)
        .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(table)));
    let name = String::from_utf8_lossy(table).to_lowercase();
    std::fs::write(dir.join(format!("{name}.dat")), &bytes).unwrap();
    let out = Command::new("iasl")
        .args(["-d", &format!("{name}.dat")])
        .current_dir(&dir)
        .output()
        .expect("iasl (Debian/Ubuntu package acpica-tools) checks the ACPI tables");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl -d {name}: {text}");
    let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
    assert!(!dsl.contains("**** ") && !dsl.contains("Invalid"), "{dsl}");
    let _ = std::fs::remove_dir_all(&dir);
    dsl
}

/// The values of the lines of `dsl` whose label contains `key`, in order.
fn values(dsl: &str, key: &str) -> Vec<String> {
    dsl.lines()
        .filter(|l| l.split(':').next().is_some_and(|k| k.contains(key)))
        .filter_map(|l| l.rsplit_once(": ").map(|(_, v)| v.trim().to_string()))
        .collect()
}

#[test]
fn no_numa_no_tables() {
    let tables = build_tables(&config(Vec::new())).unwrap();
    assert!(tables.iter().all(|(s, _)| s != b"SRAT" && s != b"SLIT"));
}

#[test]
fn srat_and_slit_describe_the_nodes() {
    let cfg = config(vec![
        NumaNode {
            id: 0,
            cpus: vec![0],
            memory: vec![(0, 0x4000000)],
            hotplug: vec![],
            distances: vec![(1, 25)],
            initiators: vec![],
        },
        NumaNode {
            id: 1,
            cpus: vec![1, 2],
            memory: vec![(0x4000000, 0x2000000), (0x1_0000_0000, 0x1000_0000)],
            hotplug: vec![(0x1_4000_0000, 0x800_0000)],
            distances: vec![],
            initiators: vec![],
        },
    ]);
    let srat = disassemble(&cfg, b"SRAT");
    assert_eq!(
        values(&srat, "Proximity Domain"),
        ["00000000", "00000000", "00000001", "00000001", "00000001", "00000001", "00000001"],
        "{srat}"
    );
    assert_eq!(
        values(&srat, "Base Address"),
        [
            "0000000000000000",
            "0000000004000000",
            "0000000100000000",
            "0000000140000000"
        ],
        "{srat}"
    );
    assert_eq!(
        values(&srat, "Address Length"),
        [
            "0000000004000000",
            "0000000002000000",
            "0000000010000000",
            "0000000008000000"
        ],
        "{srat}"
    );
    assert_eq!(
        values(&srat, "Hot Pluggable"),
        ["0", "0", "0", "1"],
        "{srat}"
    );
    assert_eq!(
        values(&srat, "Apic ID"),
        ["00000000", "00000001", "00000002"],
        "{srat}"
    );
    let slit = disassemble(&cfg, b"SLIT");
    assert!(slit.contains("Localities : 0000000000000002"), "{slit}");
    // Node 1 stated no distances: its distance to node 0 is node 0's to it.
    let matrix: Vec<&str> = slit
        .lines()
        .filter(|l| l.contains("Locality"))
        .skip(1)
        .map(|l| l.rsplit_once(": ").unwrap().1.trim())
        .collect();
    assert_eq!(matrix, ["0A 19", "19 0A"], "{slit}");
    // Each CPU device names its node (vCPU 2, not booted, for when it is hot-added).
    let dsdt = disassemble(&cfg, b"DSDT");
    let pxm: Vec<String> = dsdt
        .lines()
        .filter(|l| l.contains("Device (C00") || l.contains("_PXM"))
        .map(|l| l.split("//").next().unwrap().trim().to_string())
        .collect();
    assert_eq!(
        pxm,
        [
            "Device (C000)",
            "Name (_PXM, Zero)",
            "Device (C001)",
            "Name (_PXM, One)",
            "Device (C002)",
            "Name (_PXM, One)",
        ],
        "{dsdt}"
    );
}

/// A generic initiator (`--numa device_id=`): a node with one PCI function and nothing else, as
/// iasl reads its SRAT structure (type 5, PCI handle: segment, bus, device and function).
#[test]
fn a_generic_initiator_node() {
    let cfg = config(vec![
        NumaNode {
            id: 0,
            cpus: vec![0, 1, 2],
            memory: vec![(0, 0x4000000)],
            hotplug: vec![],
            distances: vec![],
            initiators: vec![],
        },
        NumaNode {
            id: 1,
            cpus: vec![],
            memory: vec![],
            hotplug: vec![],
            distances: vec![(0, 30)],
            initiators: vec![(1, 5 << 3)],
        },
    ]);
    let srat = disassemble(&cfg, b"SRAT");
    assert!(srat.contains("Generic Initiator Affinity"), "{srat}");
    assert_eq!(
        values(&srat, "Proximity Domain"),
        ["00000000", "00000000", "00000000", "00000000", "00000001"],
        "{srat}"
    );
    assert_eq!(values(&srat, "Device Handle Type"), ["01"], "{srat}");
    // Segment 1 (little endian), bus 0, device 5 function 0 (ACPI 6.3's PCI device handle).
    assert_eq!(
        values(&srat, "Device Handle"),
        ["01", "01 00 00 28 00 00 00 00 00 00 00 00 00 00 00 00"],
        "{srat}"
    );
    let slit = disassemble(&cfg, b"SLIT");
    assert!(slit.contains("Localities : 0000000000000002"), "{slit}");
}
