//! PCI hotplug over the API, with the test guest's `test=hotplug` handling it as an OS does
//! with the original's ACPI mechanism (the GED's PCI bit, `\_SB_.PHPR`'s PCIU/PCID, eject
//! through PSEG/B0EJ): `ch-remote add-disk`/`add-net` bring a device up in the guest,
//! `remove-device` has the guest reset and eject it, and the same id can come back.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::helpers::*;

/// Starts the VMM, creates and boots the `hotplug` guest and waits for its READY.
fn boot_hotplug_guest(name: &str) -> (Vmm, PathBuf) {
    require_curl();
    let vmm = Vmm::start(name, &[]);
    let serial = vmm.dir.join("serial.out");
    let config = guest_config("hotplug", &serial);
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    (vmm, serial)
}

/// The slot of the device an add-* answer (`{"id": …, "bdf": "0000:00:NN.0"}`) describes.
fn slot_of(answer: &str, id: &str) -> u8 {
    let v: Value = serde_json::from_str(answer.trim())
        .unwrap_or_else(|e| panic!("add answer is not JSON ({e}): {answer}"));
    assert_eq!(v["id"], id, "{answer}");
    let bdf = v["bdf"]
        .as_str()
        .unwrap_or_else(|| panic!("no bdf: {answer}"));
    let (_, dev_fn) = bdf.rsplit_once(':').expect("segment:bus:device.function");
    let (dev, func) = dev_fn.split_once('.').expect("device.function");
    assert_eq!(func, "0", "{bdf}");
    assert!(bdf.starts_with("0000:00:"), "{bdf}");
    u8::from_str_radix(dev, 16).unwrap_or_else(|_| panic!("{bdf}"))
}

/// The serial output's lines that start with `prefix`.
fn lines_with(serial: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Removes `id` (in `slot`) and waits for the guest to eject it and see it gone; `round` is
/// how many times that slot has gone before, plus one.
fn remove(vmm: &Vmm, serial: &Path, id: &str, slot: u8, round: usize) {
    ch_remote_ok(vmm, &["remove-device", id]);
    wait_for(serial, &format!("HOTPLUG EJECTED slot={slot}\n"), round);
    wait_for(serial, &format!("HOTPLUG GONE slot={slot}\n"), round);
}

const SECTOR0: &[u8; 16] = b"hotplug sector 0";

/// A 1 MiB raw image whose sector 0 starts with `SECTOR0` and sector 1 is filled with 0xee.
fn disk_image(dir: &Path) -> PathBuf {
    let mut img = vec![0u8; 1 << 20];
    img[..16].copy_from_slice(SECTOR0);
    img[512..1024].fill(0xee);
    let path = dir.join("hotplug.img");
    std::fs::write(&path, &img).unwrap();
    path
}

#[test]
fn hotplug_disk_added_used_removed_and_added_again() {
    let (vmm, serial) = boot_hotplug_guest("hotplug-disk");
    let img = disk_image(&vmm.dir);
    let disk = format!("path={},id=hpdisk0", img.display());
    let hex0: String = SECTOR0.iter().map(|b| format!("{b:02x}")).collect();
    let mut first_slot = None;
    for round in 1..=3 {
        // The guest wrote sector 1 last time: start from the host's bytes again.
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[512..1024].fill(0xee);
        std::fs::write(&img, &bytes).unwrap();
        let slot = slot_of(&ch_remote_ok(&vmm, &["add-disk", &disk]), "hpdisk0");
        assert_ne!(slot, 0, "slot 0 is the host bridge");
        // The id's slot is given back on removal, so the device comes back where it was.
        assert_eq!(*first_slot.get_or_insert(slot), slot, "round {round}");
        let added = format!("HOTPLUG ADDED slot={slot} type=blk sectors=2048 sector0={hex0}\n");
        wait_for(&serial, &added, round);
        wait_for(&serial, &format!("HOTPLUG IO slot={slot} ok\n"), round);
        // What the guest wrote reached the image.
        let bytes = std::fs::read(&img).unwrap();
        let want = format!("hotplug-slot-{slot}");
        assert_eq!(&bytes[512..512 + want.len()], want.as_bytes());
        assert!(bytes[512 + want.len()..1024].iter().all(|&b| b == 0));
        let info = vmm.ok_json("vm.info");
        let disks = info["config"]["disks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            disks.iter().any(|d| d["id"] == "hpdisk0"),
            "vm.info has no hpdisk0: {info}"
        );
        // vm.counters covers it: the guest's I/O counted.
        let counters = vmm.ok_json("vm.counters");
        let reads = counters["hpdisk0"]["read_ops"].as_u64().unwrap_or(0);
        let writes = counters["hpdisk0"]["write_ops"].as_u64().unwrap_or(0);
        assert!(reads >= 1 && writes >= 1, "vm.counters: {counters}");
        remove(&vmm, &serial, "hpdisk0", slot, round);
        let info = vmm.ok_json("vm.info");
        let disks = info["config"]["disks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            !disks.iter().any(|d| d["id"] == "hpdisk0"),
            "vm.info still has hpdisk0: {info}"
        );
        assert_no_fail(&serial);
    }
    // After the first round, each add and each removal leaves the guest's heap where the same
    // step of the round before left it: drivers set up again reuse what they freed.
    let tops: Vec<String> = lines_with(&serial, "INFO hotplug heap")
        .iter()
        .map(|l| {
            l.split(' ')
                .find(|w| w.starts_with("top="))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(tops.len(), 6, "{tops:?}");
    assert!((4..6).all(|i| tops[i] == tops[i - 2]), "{tops:?}");
    assert_eq!(vmm.state(), "Running");
}

/// `add-net` on a TAP the VMM creates (in a network namespace of the test's own): the guest
/// brings virtio-net up with the MAC given, and gives it back on `remove-device`; twice.
#[test]
fn hotplug_net_added_removed_and_added_again() {
    std::thread::spawn(|| {
        // SAFETY: unshare only moves the calling thread into a new network namespace, which
        // the VMM started from it inherits.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNET) (these tests run as root): {}",
            std::io::Error::last_os_error()
        );
        let (vmm, serial) = boot_hotplug_guest("hotplug-net");
        let mac = "52:54:00:12:34:99";
        let net = format!("tap=hptap0,mac={mac},id=hpnet0");
        for round in 1..=2 {
            let slot = slot_of(&ch_remote_ok(&vmm, &["add-net", &net]), "hpnet0");
            wait_for(
                &serial,
                &format!("HOTPLUG ADDED slot={slot} type=net mac={mac}\n"),
                round,
            );
            remove(&vmm, &serial, "hpnet0", slot, round);
            assert_no_fail(&serial);
        }
        assert_eq!(vmm.state(), "Running");
    })
    .join()
    .unwrap();
}

/// Pauses `vmm`'s VM, snapshots it into its dir's `snap`, ends that VMM and restores the
/// snapshot in a new one (`name`). Returns vm.info before, the new VMM, and the snapshot dir.
fn snapshot_and_restore(vmm: Vmm, name: &str) -> (Value, Vmm, PathBuf) {
    let before = vmm.ok_json("vm.info");
    assert_eq!(vmm.put("vm.pause").0, 204);
    let snap = vmm.dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) });
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body.to_string()));
    assert_eq!(status, 204, "{text}");
    drop(vmm);
    let restored = Vmm::start(name, &[]);
    let body = serde_json::json!({ "source_url": format!("file://{}", snap.display()) });
    let (status, text) = restored.curl("PUT", "vm.restore", Some(&body.to_string()));
    assert_eq!(status, 204, "{text}");
    (before, restored, snap)
}

/// What the VMM process holds: open descriptors, threads, resident KiB.
fn process_usage(pid: i32) -> (usize, usize, u64) {
    let count = |dir: String| std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
        rss,
    )
}

/// The GSIs in use after each removal, from the VMM's log.
fn gsis_after_removals(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("; ").nth(1))
        .filter(|t| t.ends_with("GSIs in use"))
        .map(str::to_string)
        .collect()
}

/// Many add/remove cycles of a disk and a NIC leak nothing: after a first cycle (which sets up
/// what stays), the VMM's descriptors, threads and GSIs come back to the same numbers after
/// each cycle, and its RSS stays within a small margin.
#[test]
fn hotplug_cycles_leak_no_descriptors_threads_gsis_or_memory() {
    std::thread::spawn(|| {
        // SAFETY: unshare only moves the calling thread into a new network namespace, which
        // the VMM started from it inherits.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        require_curl();
        let dir = crate::common::scratch("hotplug-leak-log");
        let log = dir.join("vmm.log");
        let log_arg = log.display().to_string();
        let vmm = Vmm::start("hotplug-leak", &["-v", "--log-file", &log_arg]);
        let serial = vmm.dir.join("serial.out");
        let config = guest_config("hotplug", &serial);
        assert_eq!(vmm.curl("PUT", "vm.create", Some(&config)).0, 204);
        assert_eq!(vmm.put("vm.boot").0, 204);
        wait_for(&serial, "READY", 1);
        let img = disk_image(&vmm.dir);
        let disk = format!("path={},id=leakdisk", img.display());
        let net = "tap=leaktap0,id=leaknet";
        let cycles = 8;
        let mut usage = Vec::new();
        for round in 1..=cycles {
            let d = slot_of(&ch_remote_ok(&vmm, &["add-disk", &disk]), "leakdisk");
            let n = slot_of(&ch_remote_ok(&vmm, &["add-net", net]), "leaknet");
            wait_for(&serial, &format!("HOTPLUG IO slot={d} ok\n"), round);
            wait_for(&serial, &format!("HOTPLUG ADDED slot={n} type=net"), round);
            remove(&vmm, &serial, "leakdisk", d, round);
            remove(&vmm, &serial, "leaknet", n, round);
            assert_no_fail(&serial);
            // The removal is done (the device dropped, its threads joined) when the VMM logs
            // it, a moment after the guest sees the slot empty.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while gsis_after_removals(&log).len() < 2 * round {
                assert!(std::time::Instant::now() < deadline, "no removal logged");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            usage.push(process_usage(vmm.pid()));
        }
        let (fds, threads, rss) = usage[0];
        for (i, &(f, t, r)) in usage.iter().enumerate().skip(1) {
            assert_eq!((f, t), (fds, threads), "cycle {}: {usage:?}", i + 1);
            assert!(r < rss + 2048, "cycle {}: RSS grew: {usage:?}", i + 1);
        }
        // Each removal gives its device's GSIs back: after every cycle, the same number.
        let gsis = gsis_after_removals(&log);
        assert_eq!(gsis.len(), 2 * cycles, "{gsis:?}");
        let after_cycles: Vec<&String> = gsis.iter().skip(1).step_by(2).collect();
        assert!(after_cycles.windows(2).all(|w| w[0] == w[1]), "{gsis:?}");
        assert_eq!(vmm.state(), "Running");
    })
    .join()
    .unwrap();
}

/// A hot-added device stays across a guest reboot (same id, same place) and a removal is
/// recorded; a snapshot of a VM whose devices were added and removed restores with each device
/// at the slot it had, though the configuration's order would place it elsewhere.
#[test]
fn hotplugged_devices_survive_reboot_snapshot_and_restore() {
    let (vmm, serial) = boot_hotplug_guest("hotplug-keep");
    let img = disk_image(&vmm.dir);
    let img2 = vmm.dir.join("second.img");
    std::fs::copy(&img, &img2).unwrap();
    let a = slot_of(
        &ch_remote_ok(
            &vmm,
            &["add-disk", &format!("path={},id=first", img.display())],
        ),
        "first",
    );
    let b = slot_of(
        &ch_remote_ok(
            &vmm,
            &["add-disk", &format!("path={},id=second", img2.display())],
        ),
        "second",
    );
    assert!(b > a, "{a} {b}");
    wait_for(&serial, &format!("HOTPLUG IO slot={b} ok\n"), 1);
    remove(&vmm, &serial, "first", a, 1);
    let bdf_of = |info: &Value, id: &str| -> Option<String> {
        info["device_tree"][format!("_virtio-pci-{id}")]["pci_bdf"]
            .as_str()
            .map(str::to_string)
    };
    let want = format!("0000:00:{b:02x}.0");
    assert_eq!(
        bdf_of(&vmm.ok_json("vm.info"), "second"),
        Some(want.clone())
    );
    assert_eq!(bdf_of(&vmm.ok_json("vm.info"), "first"), None);

    // A reboot rebuilds the VM from the configuration: `second` is there, `first` is not.
    assert_eq!(vmm.put("vm.reboot").0, 204);
    wait_for(&serial, "READY", 2);
    let info = vmm.ok_json("vm.info");
    let ids: Vec<&str> = info["config"]["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["second"], "{info}");
    assert!(bdf_of(&info, "second").is_some(), "{info}");

    // `first` again after the reboot (above `second`), then `second` removed and `third` added
    // at the slot it left: the configuration lists `first` before `third`, the bus the other
    // way round.
    let a2 = slot_of(
        &ch_remote_ok(
            &vmm,
            &["add-disk", &format!("path={},id=first", img.display())],
        ),
        "first",
    );
    wait_for(&serial, &format!("HOTPLUG IO slot={a2} ok\n"), 2);
    let b2 = bdf_of(&vmm.ok_json("vm.info"), "second").unwrap();
    let b2: u8 = u8::from_str_radix(&b2[8..10], 16).unwrap();
    assert!(a2 > b2, "{a2} {b2}");
    remove(&vmm, &serial, "second", b2, 1);
    let img3 = vmm.dir.join("third.img");
    std::fs::copy(&img, &img3).unwrap();
    let c = slot_of(
        &ch_remote_ok(
            &vmm,
            &["add-disk", &format!("path={},id=third", img3.display())],
        ),
        "third",
    );
    assert_eq!(c, b2, "the lowest free slot");
    let (before, restored, _snap) = snapshot_and_restore(vmm, "hotplug-keep-restored");
    let after = restored.ok_json("vm.info");
    for id in ["first", "third", "__rng"] {
        assert_eq!(bdf_of(&after, id), bdf_of(&before, id), "{id}: {after}");
    }
    assert_eq!(restored.put("vm.resume").0, 204);
    assert_eq!(restored.state(), "Running");
}

/// Starts a VMM and boots `test=wait` (a guest that does nothing with hotplug) with `disks`.
fn boot_waiting_guest(name: &str, disks: &[&Path]) -> Vmm {
    require_curl();
    let vmm = Vmm::start(name, &[]);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("wait", &serial)).unwrap();
    config["disks"] = disks
        .iter()
        .map(|d| serde_json::json!({ "path": d }))
        .collect();
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    vmm
}

/// Every refusal is a 400 that names what is wrong, and leaves the VM as it was: a duplicate
/// id, an image another VM has open, a full bus, an unknown id to remove.
#[test]
fn hotplug_refusals_name_the_field_and_leave_the_vm_alone() {
    let a = boot_waiting_guest("hotplug-refuse-a", &[]);
    let held = disk_image(&a.dir);
    let b = boot_waiting_guest("hotplug-refuse-b", &[&held]);
    let devices = |v: &Vmm| -> Vec<String> {
        let info = v.ok_json("vm.info");
        let mut ids: Vec<String> = info["device_tree"]
            .as_object()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    };
    let put = |v: &Vmm, ep: &str, body: String| v.curl("PUT", ep, Some(&body));
    let before = devices(&a);

    // The image VM b has open.
    let (status, text) = put(
        &a,
        "vm.add-disk",
        format!(r#"{{"path": "{}", "id": "x"}}"#, held.display()),
    );
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains(&held.display().to_string()) && text.contains("in use"),
        "{text}"
    );
    assert_eq!(devices(&a), before);

    // A duplicate id: one added, then another with its id; and the rng's, which is reserved
    // (`__`).
    let img = a.dir.join("own.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img2 = a.dir.join("own2.img");
    std::fs::write(&img2, vec![0u8; 1 << 20]).unwrap();
    let (status, text) = put(
        &a,
        "vm.add-disk",
        format!(r#"{{"path": "{}", "id": "dup"}}"#, img.display()),
    );
    assert_eq!(status, 200, "{text}");
    let with_dup = devices(&a);
    for id in ["dup", "__rng"] {
        let (status, text) = put(
            &a,
            "vm.add-disk",
            format!(r#"{{"path": "{}", "id": "{id}"}}"#, img2.display()),
        );
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(id), "{text}");
        assert_eq!(devices(&a), with_dup);
    }
    let (status, _) = put(&a, "vm.remove-device", r#"{"id": "dup"}"#.into());
    assert_eq!(status, 204);

    // Removing an unknown id.
    let (status, text) = put(&a, "vm.remove-device", r#"{"id": "nothing"}"#.into());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("nothing"), "{text}");

    // Fill the bus: slot 0 is the host bridge, one slot holds the rng; then 400.
    let mut added = 0;
    loop {
        let path = a.dir.join(format!("fill{added}.img"));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let (status, text) = put(
            &a,
            "vm.add-disk",
            format!(r#"{{"path": "{}", "id": "fill{added}"}}"#, path.display()),
        );
        if status != 200 {
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("no free PCI device id"), "{text}");
            break;
        }
        added += 1;
        assert!(added <= 30, "the bus never filled");
    }
    // 31 slots less the rng's and `dup`'s (its removal is asked, never ejected: test=wait).
    assert_eq!(added, 29);
    let full = devices(&a);
    assert_eq!(full.len(), before.len() + 2 * (added + 1));
    // The refused device took nothing: removing one makes room for exactly one more (the
    // guest does not eject, so the slot stays taken until then: still full).
    let (status, _) = put(&a, "vm.remove-device", r#"{"id": "fill0"}"#.into());
    assert_eq!(status, 204);
    let path = a.dir.join("late.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let (status, text) = put(
        &a,
        "vm.add-disk",
        format!(r#"{{"path": "{}", "id": "late"}}"#, path.display()),
    );
    assert_eq!(status, 400, "{text}");
    assert_eq!(devices(&a), full);
    assert_eq!(a.state(), "Running");
    assert_eq!(b.state(), "Running");
}

/// `vm.add-vsock` on a running VM: the vsock function appears on the bus (the hotplug guest
/// reports it by its PCI ids), its socket listens, and `remove-device` has the guest eject it,
/// after which the socket is gone and a vsock can be added again.
#[test]
fn hotplug_vsock_added_and_removed() {
    let (vmm, serial) = boot_hotplug_guest("hotplug-vsock");
    let sock = vmm.dir.join("vsock.sock");
    let arg = format!("cid=3,socket={}", sock.display());
    for round in 1..=2 {
        let slot = slot_of(&ch_remote_ok(&vmm, &["add-vsock", &arg]), "_vsock0");
        // virtio-vsock: device type 19, PCI device 0x1040 + 19.
        wait_for(
            &serial,
            &format!("HOTPLUG ADDED slot={slot} type=1af4:1053\n"),
            round,
        );
        assert!(
            std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            "the vsock socket listens"
        );
        let info = vmm.ok_json("vm.info");
        assert_eq!(info["config"]["vsock"]["cid"], 3, "{info}");
        // One vsock per VM.
        let (status, text) = vmm.curl(
            "PUT",
            "vm.add-vsock",
            Some(&format!(
                r#"{{"cid": 4, "socket": "{}.2"}}"#,
                sock.display()
            )),
        );
        assert_eq!(status, 400, "{text}");
        remove(&vmm, &serial, "_vsock0", slot, round);
        let info = vmm.ok_json("vm.info");
        assert!(info["config"]["vsock"].is_null(), "{info}");
        assert_no_fail(&serial);
    }
    assert_eq!(vmm.state(), "Running");
}

/// A VM with every device this round added (balloon, watchdog, pvpanic, vsock, a virtio-mem
/// hotplug region, a hot-added disk and vCPU) is snapshotted and restored in a new VMM: the
/// same devices at the same places, and the guest runs on.
#[test]
fn a_vm_with_the_new_devices_is_snapshotted_and_restored() {
    require_curl();
    let vmm = Vmm::start("hotplug-all-snap", &[]);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("hotplug", &serial)).unwrap();
    config["cpus"] = serde_json::json!({"boot_vcpus": 1, "max_vcpus": 2});
    config["memory"] = serde_json::json!({
        "size": 256u64 << 20, "hotplug_method": "VirtioMem", "hotplug_size": 128u64 << 20
    });
    config["balloon"] = serde_json::json!({"size": 0});
    config["watchdog"] = true.into();
    config["pvpanic"] = true.into();
    let sock = vmm.dir.join("vsock.sock");
    config["vsock"] = serde_json::json!({"cid": 3, "socket": sock});
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    let img = disk_image(&vmm.dir);
    let slot = slot_of(
        &ch_remote_ok(
            &vmm,
            &["add-disk", &format!("path={},id=late", img.display())],
        ),
        "late",
    );
    wait_for(&serial, &format!("HOTPLUG IO slot={slot} ok\n"), 1);
    ch_remote_ok(&vmm, &["resize", "--cpus", "2"]);
    let (before, restored, snap) = snapshot_and_restore(vmm, "hotplug-all-snap-restored");
    let after = restored.ok_json("vm.info");
    assert_eq!(
        after["device_tree"], before["device_tree"],
        "the same devices"
    );
    assert_eq!(after["config"]["cpus"]["boot_vcpus"], 2);
    for id in [
        "__balloon",
        "__watchdog",
        "__pvpanic",
        "_vsock0",
        "mem0",
        "late",
    ] {
        assert!(after["device_tree"][id].is_object(), "{id}: {after}");
    }
    // A hot-added disk's BAR is 64-bit (only a disk present at boot gets a 32-bit one), and
    // the restored VM's is the same (the device trees above are equal).
    let bar = &after["device_tree"]["_virtio-pci-late"]["resources"][0]["PciBar"];
    assert_eq!(bar["type_"], "Mmio64", "{after}");
    assert_eq!(restored.put("vm.resume").0, 204);
    // The guest goes on: it still handles hotplug (the disk can be removed).
    remove(&restored, &serial, "late", slot, 1);
    assert_eq!(restored.state(), "Running");
    std::fs::remove_dir_all(&snap).unwrap();
}
