//! `--pmem` (`"pmem": [{"file": …}]`): the test guest (`test=pmem`) reads the start of the
//! mapped file, writes `pmem-written` at offset 4096 and flushes; the file has it after the
//! flush, unless `discard_writes` keeps it unchanged. `vm.add-pmem` on a running guest adds the
//! device through the hotplug path, and its removal frees the memory slot and the range, so it
//! can be added again.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::helpers::*;

const HEAD: &[u8; 16] = b"pmem test head!\n";
const MARK: &[u8] = b"pmem-written";

/// A 2 MiB file starting with `HEAD`.
fn pmem_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let mut data = vec![0u8; 2 << 20];
    data[..16].copy_from_slice(HEAD);
    std::fs::write(&path, data).unwrap();
    path
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn boot_pmem_guest(name: &str, discard_writes: bool) -> (Vmm, PathBuf, PathBuf) {
    require_curl();
    let vmm = Vmm::start(name, &[]);
    let serial = vmm.dir.join("serial.out");
    let file = pmem_file(&vmm.dir, "pmem.img");
    let mut config: Value = serde_json::from_str(&guest_config("pmem", &serial)).unwrap();
    config["pmem"] = serde_json::json!([{"file": file, "discard_writes": discard_writes}]);
    // The guest would power off once its checks are done, possibly before the test asks
    // vm.info (the VM is then shut down, and has no device tree): it halts instead.
    config["payload"]["cmdline"] = serde_json::json!("test=pmem end=wait");
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    (vmm, serial, file)
}

#[test]
fn the_guest_maps_the_file_and_a_flush_makes_its_writes_durable() {
    let (vmm, serial, file) = boot_pmem_guest("pmem", false);
    let info = vmm.ok_json("vm.info");
    assert_eq!(
        info["config"]["pmem"][0]["file"],
        file.display().to_string()
    );
    assert!(info["device_tree"]["_pmem0"].is_object(), "{info}");
    let text = wait_for(&serial, "PMEM flush ok", 1);
    assert!(
        text.contains(&format!("size=0x200000 head={}", hex(HEAD))),
        "{text}"
    );
    let data = std::fs::read(&file).unwrap();
    assert_eq!(&data[4096..4096 + MARK.len()], MARK);
    assert_eq!(&data[..16], HEAD);
    assert_no_fail(&serial);
}

#[test]
fn discard_writes_leaves_the_file_unchanged() {
    let (_vmm, serial, file) = boot_pmem_guest("pmem-discard", true);
    let text = wait_for(&serial, "PMEM flush ok", 1);
    assert!(text.contains(&format!("head={}", hex(HEAD))), "{text}");
    let data = std::fs::read(&file).unwrap();
    assert!(data[16..].iter().all(|&b| b == 0), "the file changed");
    assert_eq!(&data[..16], HEAD);
    assert_no_fail(&serial);
}

#[test]
fn bad_pmem_files_are_refused_naming_the_option() {
    let dir = crate::common::scratch("pmem-bad");
    let ok = pmem_file(&dir, "ok.img");
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 3 << 20]).unwrap();
    let missing = dir.join("missing.img");
    let kernel = crate::common::guest().elf_pvh.display().to_string();
    for arg in [
        format!("file={}", missing.display()),
        format!("file={}", odd.display()),
        format!("file={},size=4M", ok.display()),
        format!("file={},size=1M", ok.display()),
        "size=2M".to_string(),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
            .args(["--kernel", &kernel, "--pmem", &arg])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{arg}");
        assert!(err.contains("--pmem"), "{arg}: {err}");
    }
}

/// `vm.add-pmem` on the hotplug guest: the function appears (PCI 0x1040 + 27), and once the
/// guest ejects it its memory slot and range are free, so it is added again.
#[test]
fn hotplug_pmem_added_removed_and_added_again() {
    require_curl();
    let vmm = Vmm::start("pmem-hotplug", &[]);
    let serial = vmm.dir.join("serial.out");
    let config = guest_config("hotplug", &serial);
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    let file = pmem_file(&vmm.dir, "hp.img");
    let arg = format!("file={}", file.display());
    for round in 1..=2 {
        let answer = ch_remote_ok(&vmm, &["add-pmem", &arg]);
        let v: Value = serde_json::from_str(answer.trim()).unwrap();
        assert_eq!(v["id"], "_pmem0", "{answer}");
        let bdf = v["bdf"].as_str().unwrap();
        let slot = u8::from_str_radix(&bdf[8..10], 16).unwrap();
        wait_for(
            &serial,
            &format!("HOTPLUG ADDED slot={slot} type=1af4:105b\n"),
            round,
        );
        let info = vmm.ok_json("vm.info");
        assert_eq!(
            info["config"]["pmem"][0]["file"],
            file.display().to_string()
        );
        ch_remote_ok(&vmm, &["remove-device", "_pmem0"]);
        wait_for(&serial, &format!("HOTPLUG EJECTED slot={slot}\n"), round);
        wait_for(&serial, &format!("HOTPLUG GONE slot={slot}\n"), round);
        let info = vmm.ok_json("vm.info");
        assert!(info["config"]["pmem"].is_null(), "{info}");
    }
    let (status, text) = vmm.curl(
        "PUT",
        "vm.add-pmem",
        Some(&format!(
            r#"{{"file": "{}", "size": 1048576}}"#,
            file.display()
        )),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("--pmem"), "{text}");
    assert_no_fail(&serial);
    assert_eq!(vmm.state(), "Running");
}
