//! PCI segments through the API: a busy guest whose disk is on segment 1 is snapshotted and
//! restored in a new VMM and goes on using it; devices hot-added to a segment past 0 get its
//! addresses; a segment the VM lacks is refused.

use serde_json::json;

use crate::helpers::*;
use crate::restore::{busy_config, busy_snapshot, goes_on, shutdown};

#[test]
fn a_disk_on_segment_1_survives_a_restore_and_hotplug_uses_the_segment() {
    require_curl();
    let a = Vmm::start("segments-a", &[]);
    let serial = a.dir.join("serial.out");
    let disk = a.dir.join("disk.img");
    let mut config = busy_config(Some(&serial), Some(&disk));
    config["payload"]["cmdline"] = json!("test=busy busy_segment=1");
    config["platform"] = json!({"num_pci_segments": 2});
    config["disks"][0]["pci_segment"] = json!(1);
    let (url, before, info_config) = busy_snapshot(&a, &config, Some(&serial));
    assert!(before.disk == "ok", "the guest used the disk: {before:?}");
    let tree = &a.ok_json("vm.info")["device_tree"];
    let node = &tree["_virtio-pci-_disk0"];
    assert_eq!(node["pci_bdf"], "0001:00:00.0", "{tree}");
    // Past segment 0 a disk's BAR is 64-bit, as the original's.
    let bar = node["resources"][0]["PciBar"].clone();
    assert_eq!(bar["type_"], "Mmio64", "{node}");
    shutdown(a);

    let b = Vmm::start("segments-b", &[]);
    let body = json!({ "source_url": url }).to_string();
    assert_eq!(b.curl("PUT", "vm.restore", Some(&body)).0, 204);
    let info = b.ok_json("vm.info");
    assert_eq!(info["config"], info_config);
    let node = &info["device_tree"]["_virtio-pci-_disk0"];
    assert_eq!(node["pci_bdf"], "0001:00:00.0");
    assert_eq!(node["resources"][0]["PciBar"], bar, "the BAR where it was");
    assert_eq!(b.put("vm.resume").0, 204);
    let after = goes_on(&serial, &before);
    assert!(after.iter().all(|r| r.disk == "ok"), "{after:?}");

    // Hot-added: the segment's next free slot; a segment the VM lacks is refused.
    let extra = b.dir.join("extra.img");
    std::fs::write(&extra, vec![0u8; 1 << 20]).unwrap();
    let add = |segment: u16| {
        let d = json!({"path": extra, "pci_segment": segment, "readonly": true}).to_string();
        b.curl("PUT", "vm.add-disk", Some(&d))
    };
    let (status, text) = add(1);
    assert_eq!(status, 200, "{text}");
    let added: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(added["bdf"], "0001:00:01.0", "{text}");
    let (status, text) = add(2);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("pci_segment=2") && text.contains("the VM has 2 PCI segment(s)"),
        "{text}"
    );
    let tree = &b.ok_json("vm.info")["device_tree"];
    let id = added["id"].as_str().unwrap();
    assert_eq!(
        tree[format!("_virtio-pci-{id}")]["pci_bdf"],
        "0001:00:01.0",
        "{tree}"
    );
    shutdown(b);
}

/// Hotplug on segment 1, as a guest OS sees it: the GED's PCI event, PSEG = 1, the segment's
/// PCIU; the guest brings the disk up at `0001:00:00.0` and writes to it; a removal request
/// reaches it through that segment's PCID, it ejects the slot with `\_SB_.PC01.S000._EJ0`
/// (PCEJ with `_SEG` 1), and the device leaves, with the original's event naming its BDF.
#[test]
fn hotplug_on_segment_1_reaches_the_guest_and_back() {
    require_curl();
    let dir = crate::common::scratch("segments-hotplug-events");
    let monitor = dir.join("events.json");
    let vmm = Vmm::start(
        "segments-hotplug",
        &["--event-monitor", &format!("path={}", monitor.display())],
    );
    let serial = vmm.dir.join("serial.out");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config("hotplug hp_segment=1", &serial)).unwrap();
    config["platform"] = json!({"num_pci_segments": 2});
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    let img = vmm.dir.join("seg1.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = json!({"path": img, "id": "seg1disk", "pci_segment": 1}).to_string();
    let (status, text) = vmm.curl("PUT", "vm.add-disk", Some(&disk));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(r#""bdf":"0001:00:00.0""#), "{text}");
    wait_for(&serial, "HOTPLUG ADDED slot=0 type=blk", 1);
    wait_for(&serial, "HOTPLUG IO slot=0 ok\n", 1);
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[512..].starts_with(b"hotplug-slot-0"),
        "the guest's write"
    );
    assert_eq!(vmm.put("vm.remove-device").0, 400, "no body");
    let (status, text) = vmm.curl("PUT", "vm.remove-device", Some(r#"{"id": "seg1disk"}"#));
    assert_eq!(status, 204, "{text}");
    wait_for(&serial, "HOTPLUG EJECTED slot=0\n", 1);
    wait_for(&serial, "HOTPLUG GONE slot=0\n", 1);
    assert_no_fail(&serial);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&monitor).unwrap_or_default();
        if text.contains("device-removed") {
            assert!(text.contains("0001:00:00.0"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no device-removed event: {text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let info = vmm.ok_json("vm.info");
    assert!(
        info["device_tree"].get("_virtio-pci-seg1disk").is_none(),
        "{info}"
    );
    shutdown(vmm);
}
