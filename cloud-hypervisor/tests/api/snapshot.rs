//! `vm.snapshot` over curl and ch-remote: the original's directory layout (`config.json`,
//! `state.json`, `memory-ranges`), its errors, and a guest that goes on after the resume.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common;
use crate::helpers::*;

const RAM: u64 = 256 << 20;

/// The test guest's flat image as the VMM loads it at 1 MiB: the bzImage's payload (after its
/// setup sectors). Its first 64 KiB are code and read-only data.
fn loaded_image() -> Vec<u8> {
    let bz = std::fs::read(&common::guest().bzimage).unwrap();
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    bz[(setup_sects + 1) * 512..].to_vec()
}

/// Checks a snapshot directory: the three files, the configuration as `vm.info` shows it, one
/// vCPU state per vCPU, and the guest's RAM with the loaded image at 1 MiB.
fn check_snapshot_dir(dir: &Path, info_config: &serde_json::Value, vcpus: usize) {
    for f in ["config.json", "state.json", "memory-ranges"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    let config_text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config: vmm::VmConfig = serde_json::from_str(&config_text).expect("a VmConfig");
    assert_eq!(
        serde_json::to_value(&config).unwrap(),
        *info_config,
        "config.json is vm.info's config"
    );
    let state_text = std::fs::read_to_string(dir.join("state.json")).unwrap();
    let state: vmm::snapshot::VmSnapshot =
        serde_json::from_str(&state_text).expect("state.json is a VmSnapshot");
    assert_eq!(state.version, vmm::snapshot::VM_SNAPSHOT_VERSION);
    assert_eq!(state.vcpus.len(), vcpus, "one state per vCPU");
    assert!(state.vm.irqchip.is_some(), "the in-kernel irqchip is saved");
    let ids: Vec<&str> = state.pci.devices.iter().map(|d| d.id.as_str()).collect();
    assert!(ids.contains(&"__rng"), "the virtio-rng transport: {ids:?}");
    let total: u64 = state.memory_ranges.iter().map(|r| r.length).sum();
    assert_eq!(total, RAM, "the ranges cover guest RAM");
    let mem_len = std::fs::metadata(dir.join("memory-ranges")).unwrap().len();
    assert_eq!(mem_len, RAM, "memory-ranges holds guest RAM");

    // The bytes at guest address 1 MiB are the loaded guest image.
    let mut offset = None;
    let mut at = 0u64;
    for r in &state.memory_ranges {
        if (r.gpa..r.gpa + r.length).contains(&(1 << 20)) {
            offset = Some(at + (1 << 20) - r.gpa);
        }
        at += r.length;
    }
    let offset = offset.expect("a range holds 1 MiB") as usize;
    let image = loaded_image();
    let n = 64 << 10;
    let mem = std::fs::read(dir.join("memory-ranges")).unwrap();
    assert!(
        mem[offset..offset + n] == image[..n],
        "memory-ranges at 1 MiB differs from the loaded image"
    );
    // A guest that ran wrote somewhere beyond its image (stack, page tables, data).
    assert!(mem[..1 << 20].iter().any(|&b| b != 0));
}

fn wait_ticks(serial: &Path, more_than: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ticks(serial) < more_than + 3 {
        assert!(Instant::now() < deadline, "the guest did not go on");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn snapshot_over_curl() {
    require_curl();
    let dir = common::scratch("api-snapshot-events");
    let monitor = dir.join("events.json");
    let monitor_arg = format!("path={}", monitor.display());
    let vmm = Vmm::start("api-snapshot", &["--event-monitor", &monitor_arg]);
    let serial = vmm.dir.join("serial.out");
    let snap = vmm.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let body = |p: &Path| format!(r#"{{"destination_url": "file://{}"}}"#, p.display());

    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&snap)));
    assert_eq!(status, 500);
    assert_eq!(
        error_lines(&text),
        [
            "Error from API",
            "The VM could not be snapshotted",
            "VM is not running"
        ]
    );
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&guest_config("tick", &serial)))
            .0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "TICK 3", 1);

    // Running: the original's refusal.
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&snap)));
    assert_eq!(status, 500);
    assert_eq!(
        error_lines(&text),
        [
            "Error from API",
            "The VM could not be snapshotted",
            "Cannot snapshot VM",
            "Failed to snapshot migratable component",
            "Trying to snapshot while VM is running"
        ]
    );
    assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 0);

    assert_eq!(vmm.put("vm.pause").0, 204);
    let paused_at = ticks(&serial);
    // Bad destinations.
    let missing = vmm.dir.join("missing");
    for (url, why) in [
        (
            format!("file://{}", missing.display()),
            format!("Destination is not a directory: {missing:?}"),
        ),
        (
            "tcp://127.0.0.1:1".to_string(),
            "Could not extract path from URL: tcp://127.0.0.1:1".to_string(),
        ),
    ] {
        let b = format!(r#"{{"destination_url": "{url}"}}"#);
        let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&b));
        assert_eq!(status, 500, "{url}");
        assert_eq!(
            error_lines(&text)[1..],
            [
                "The VM could not be snapshotted",
                "Cannot send VM snapshot",
                "Failed to send migratable component snapshot",
                &why
            ]
        );
    }
    assert_eq!(vmm.curl("PUT", "vm.snapshot", Some("{")).0, 400);
    assert_eq!(vmm.curl("PUT", "vm.snapshot", None).0, 400);

    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&snap)));
    assert_eq!((status, text.as_str()), (204, ""));
    assert_eq!(vmm.state(), "Paused", "a snapshot leaves the VM paused");
    let info = vmm.ok_json("vm.info");
    check_snapshot_dir(&snap, &info["config"], 2);

    // Into the same directory again: its files exist, nothing is overwritten.
    let before = std::fs::metadata(snap.join("state.json")).unwrap().len();
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&snap)));
    assert_eq!(status, 500);
    let lines = error_lines(&text);
    assert_eq!(
        lines[2..5],
        [
            "Cannot send VM snapshot",
            "Failed to send migratable component snapshot",
            "Error creating VM config snapshot file"
        ]
    );
    assert!(lines[5].contains("File exists"), "{lines:?}");
    assert_eq!(
        std::fs::metadata(snap.join("state.json")).unwrap().len(),
        before
    );

    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(ticks(&serial), paused_at, "the guest ran while paused");
    assert_eq!(vmm.put("vm.resume").0, 204);
    wait_ticks(&serial, paused_at);
    let _ = std::fs::remove_dir_all(&snap);

    assert_eq!(vmm.put("vm.shutdown").0, 204);
    let ev = events(&monitor);
    let at = |e: &str| ev.iter().position(|x| x == e);
    let done = at("vm:snapshotted").expect("snapshotted");
    assert!(at("vm:snapshotting").unwrap() < done, "{ev:?}");
    assert!(at("vm:resumed").unwrap() > done, "{ev:?}");
}

/// `ch-remote snapshot`, with shared RAM (written from its memfd) and one vCPU.
#[test]
fn snapshot_over_ch_remote_with_shared_memory() {
    let vmm = Vmm::start("api-snapshot-ch-remote", &[]);
    let serial = vmm.dir.join("serial.out");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config("tick", &serial)).unwrap();
    config["memory"]["shared"] = true.into();
    config["cpus"] = serde_json::json!({"boot_vcpus": 1, "max_vcpus": 1});
    let config_file = vmm.dir.join("vm.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let ok = |args: &[&str]| {
        let out = vmm.ch_remote(args);
        assert!(
            out.status.success(),
            "ch-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&["create", config_file.to_str().unwrap()]);
    ok(&["boot"]);
    wait_for(&serial, "TICK 3", 1);
    let snap = vmm.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let out = vmm.ch_remote(&["snapshot", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("500: Error from API: The VM could not be snapshotted: Cannot snapshot VM"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(&["pause"]);
    let paused_at = ticks(&serial);
    ok(&["snapshot", &url]);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["memory"]["shared"], true);
    check_snapshot_dir(&snap, &info["config"], 1);
    ok(&["resume"]);
    wait_ticks(&serial, paused_at);
    let _ = std::fs::remove_dir_all(&snap);
}
