//! `iommu=on`: a disk behind the virtio-iommu. The test guest's `test=iommu` drives the
//! IOMMU by hand and the disk with the `virtio-drivers` block driver through a DMA layer that
//! maps every buffer at an I/O virtual address unlike its physical one (docs/iommu.md): the
//! VIOT, the configuration, PROBE, the request statuses, rings refused while unmapped,
//! translated I/O, unmapped and read-only buffers failing their requests, the faults on the
//! event queue, an identity domain.
//! Then the translations across a snapshot restored in a new VMM, and the hotplug rules of
//! IOMMU segments.

use std::path::Path;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::restore::shutdown;

/// Sector `s` as the host writes it / as the guest rewrites it (test-guest/src/virtio.rs).
fn host_pattern(s: usize) -> u8 {
    (s as u8).wrapping_mul(3).wrapping_add(1)
}
fn guest_pattern(s: usize) -> u8 {
    (s as u8).wrapping_mul(5).wrapping_add(0x80)
}

fn make_disk(path: &Path) {
    let mut img = vec![0u8; 1 << 20];
    for s in 0..16 {
        img[s * 512..][..512].fill(host_pattern(s));
    }
    std::fs::write(path, img).unwrap();
}

/// The test guest in `test` with one disk behind the IOMMU, whose input range is 48 bits (so
/// a MAP past it can be tried).
fn config(test: &str, serial: &Path, disk: &Path) -> String {
    let mut c: Value = serde_json::from_str(&guest_config(test, serial)).unwrap();
    c["disks"] = json!([{"path": disk, "iommu": true}]);
    c["platform"] = json!({"iommu_address_width_bits": 48});
    c.to_string()
}

const CHECKS: &[&str] = &[
    "iommu-present",
    "iommu-viot",
    "iommu-config",
    "iommu-probe",
    "iommu-bypass-off",
    "iommu-no-bypass",
    "iommu-attach-noent",
    "iommu-map-noent",
    "iommu-attach",
    "iommu-map-range",
    "iommu-map-overlap",
    "iommu-unmap-split",
    "iommu-unmap",
    "iommu-unsupp",
    "iommu-blk-init",
    "iommu-blk-capacity",
    "iommu-blk-read",
    "iommu-blk-write",
    "iommu-blk-flush",
    "iommu-blk-read-back",
    "iommu-unmapped-buffer",
    "iommu-after-fault",
    "iommu-readonly-mapping",
    "iommu-after-readonly",
    "iommu-blk-mappings",
    "iommu-blk-dealloc",
    "iommu-fault-events",
    "iommu-bypass-domain",
    "iommu",
];

#[test]
fn a_disk_behind_the_iommu_reaches_only_what_is_mapped() {
    require_curl();
    let a = Vmm::start("iommu", &[]);
    let serial = a.dir.join("serial.out");
    let disk = a.dir.join("disk.img");
    make_disk(&disk);
    let c = config("iommu end=wait", &serial, &disk);
    assert_eq!(a.curl("PUT", "vm.create", Some(&c)).0, 204);
    assert_eq!(a.put("vm.boot").0, 204);
    let text = wait_for(&serial, "SUMMARY", 1);
    for check in CHECKS {
        assert!(
            text.lines().any(|l| l == format!("PASS {check}")),
            "{check}:\n{text}"
        );
    }
    assert!(!text.contains("FAIL"), "{text}");
    // As the original: the configuration says the VM has an IOMMU, `__iommu` is after the
    // other virtio devices (the disk at 00:01.0, the rng at 00:02.0).
    let info = a.ok_json("vm.info");
    assert_eq!(info["config"]["iommu"], true, "{info}");
    assert_eq!(info["config"]["disks"][0]["iommu"], true, "{info}");
    let tree = &info["device_tree"];
    assert_eq!(
        tree["_virtio-pci-__iommu"]["pci_bdf"], "0000:00:03.0",
        "{tree}"
    );
    assert_eq!(tree["_virtio-pci-__iommu"]["children"], json!(["__iommu"]));
    // What the guest wrote through translated addresses is where it meant it.
    let img = std::fs::read(&disk).unwrap();
    for s in 0..8 {
        assert!(
            img[s * 512..][..512].iter().all(|&b| b == guest_pattern(s)),
            "sector {s}: {:x?}",
            &img[s * 512..][..8]
        );
    }
    shutdown(a);
}

/// The value under `key` anywhere in `v`.
fn find<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.get(key).or_else(|| m.values().find_map(|x| find(x, key))),
        Value::Array(a) => a.iter().find_map(|x| find(x, key)),
        _ => None,
    }
}

/// The guest reads its disk through translated addresses every 20 ms; paused, snapshotted and
/// restored in a new VMM, it goes on reading right (the IOMMU's address spaces are in the
/// state, restored before the disk's transport translates its rings through them).
#[test]
fn translations_go_on_after_a_restore_in_a_new_vmm() {
    require_curl();
    let a = Vmm::start("iommu-snap-a", &[]);
    let serial = a.dir.join("serial.out");
    let disk = a.dir.join("disk.img");
    make_disk(&disk);
    let c = config("iommu iommu_loop=1", &serial, &disk);
    assert_eq!(a.curl("PUT", "vm.create", Some(&c)).0, 204);
    assert_eq!(a.put("vm.boot").0, 204);
    wait_for(&serial, "IOMMU-IO 3 ok", 1);
    assert_eq!(a.put("vm.pause").0, 204);
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    assert_eq!(
        a.curl("PUT", "vm.snapshot", Some(&body)),
        (204, String::new())
    );
    shutdown(a);
    let before = serial_text(&serial).matches(" ok\n").count();

    // The state holds the disk (endpoint 0x8) in domain 1, with its mappings.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("state.json")).unwrap()).unwrap();
    let iommu = find(&state, "iommu").expect("the IOMMU's state");
    let spaces = &iommu["spaces"];
    assert_eq!(spaces["endpoints"], json!({"8": 1}), "{iommu}");
    let mappings = spaces["domains"]["1"]["mappings"].as_array().unwrap();
    assert!(
        mappings.iter().all(|m| m["iova"].as_u64() >= Some(1 << 32)) && !mappings.is_empty(),
        "{iommu}"
    );

    let mut b = Vmm::start("iommu-snap-b", &[]);
    let body = json!({ "source_url": url }).to_string();
    assert_eq!(
        b.curl("PUT", "vm.restore", Some(&body)),
        (204, String::new())
    );
    assert_eq!(b.put("vm.resume").0, 204);
    let text = wait_for(&serial, " ok\n", before + 5);
    assert!(!text.contains("FAIL"), "{text}");
    assert_eq!(b.put("vmm.shutdown").0, 200);
    assert_eq!(b.wait().code(), Some(0));
}

/// IOMMU segments: a device hot-added behind the IOMMU must go on one, every device on one
/// must be behind it, and a device behind it elsewhere cannot be removed (the guest's VIOT,
/// written at boot, names its slot). Each refusal is a 400 with the reason.
#[test]
fn hotplug_behind_the_iommu_only_on_iommu_segments() {
    require_curl();
    let a = Vmm::start("iommu-hotplug", &[]);
    let serial = a.dir.join("serial.out");
    let disk = a.dir.join("disk.img");
    make_disk(&disk);
    let mut c: Value = serde_json::from_str(&config("wait", &serial, &disk)).unwrap();
    c["platform"] = json!({"num_pci_segments": 2, "iommu_segments": [1]});
    assert_eq!(a.curl("PUT", "vm.create", Some(&c.to_string())).0, 204);
    assert_eq!(a.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    let extra = a.dir.join("extra.img");
    make_disk(&extra);
    let add = |body: Value| a.curl("PUT", "vm.add-disk", Some(&body.to_string()));
    let (code, text) = add(json!({"path": extra, "iommu": true}));
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("only on one of --platform iommu_segments"),
        "{text}"
    );
    let (code, text) = add(json!({"path": extra, "pci_segment": 1}));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("IOMMU PCI segment (1)"), "{text}");
    let (code, text) = add(json!({"path": extra, "pci_segment": 1, "iommu": true, "id": "x"}));
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("0001:00:00.0"), "{text}");
    let info = a.ok_json("vm.info");
    assert_eq!(info["config"]["disks"][1]["iommu"], true, "{info}");
    let remove = |id: &str| {
        a.curl(
            "PUT",
            "vm.remove-device",
            Some(&json!({ "id": id }).to_string()),
        )
    };
    let (code, text) = remove("_disk0");
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("behind the IOMMU"), "{text}");
    assert_eq!(remove("x").0, 204);
    shutdown(a);
}
