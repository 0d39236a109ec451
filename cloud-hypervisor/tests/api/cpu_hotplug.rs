//! CPU hotplug over the API (`vm.resize` with `desired_vcpus`, `ch-remote resize --cpus`), with
//! the test guest's `test=cpuhotplug` handling it as Linux does with the original's ACPI
//! mechanism (the GED's CPU bit, `\_SB_.PRES`'s CSEL/CINS/CRMV/CEJ0): a CPU added is started
//! with INIT/SIPI and runs code, a CPU removed parks and is ejected, and an ejected CPU comes
//! back; a removal the guest never ejects holds further resizes off (429).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

/// Starts the VMM, creates and boots the test guest in scenario `test` with `boot` of `max`
/// vCPUs, and waits for its READY.
fn boot_guest(name: &str, test: &str, boot: u32, max: u32) -> (Vmm, PathBuf) {
    require_curl();
    let vmm = Vmm::start(name, &[]);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config(test, &serial)).unwrap();
    config["cpus"] = serde_json::json!({"boot_vcpus": boot, "max_vcpus": max});
    let (status, body) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    (vmm, serial)
}

/// `ch-remote resize --cpus n`, which must succeed.
fn resize(vmm: &Vmm, n: u32) {
    let out = vmm.ch_remote(&["resize", "--cpus", &n.to_string()]);
    assert!(
        out.status.success(),
        "resize --cpus {n}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `config.cpus.boot_vcpus` in vm.info.
fn boot_vcpus(vmm: &Vmm) -> u64 {
    let info = vmm.ok_json("vm.info");
    info["config"]["cpus"]["boot_vcpus"]
        .as_u64()
        .unwrap_or_else(|| panic!("no config.cpus.boot_vcpus: {info}"))
}

/// Waits (up to 5 s) until vm.info's `boot_vcpus` is `n`.
fn wait_boot_vcpus(vmm: &Vmm, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = boot_vcpus(vmm);
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "boot_vcpus {now}, expected {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the guest to start CPU `cpu` (APIC ID `cpu`) and see it run, for the `round`th
/// time.
fn wait_added(serial: &Path, cpu: u32, round: usize) {
    wait_for(
        serial,
        &format!("CPUHOTPLUG ADDED cpu={cpu} apic={cpu}\n"),
        round,
    );
    wait_for(serial, &format!("CPUHOTPLUG RUNNING cpu={cpu}\n"), round);
}

/// Waits for the guest to park and eject CPU `cpu` and see it gone, for the `round`th time.
fn wait_removed(serial: &Path, cpu: u32, round: usize) {
    wait_for(serial, &format!("CPUHOTPLUG EJECTED cpu={cpu}\n"), round);
    wait_for(serial, &format!("CPUHOTPLUG GONE cpu={cpu}\n"), round);
}

/// `vm.resize` with `desired_vcpus` `n` refused with a 4xx that names desired_vcpus, by the API
/// and by ch-remote.
fn refused(vmm: &Vmm, n: u32) {
    let (status, body) = vmm.curl(
        "PUT",
        "vm.resize",
        Some(&format!("{{\"desired_vcpus\": {n}}}")),
    );
    assert!(
        (400..500).contains(&status),
        "desired_vcpus {n}: {status} {body}"
    );
    assert!(body.contains("desired_vcpus"), "desired_vcpus {n}: {body}");
    let out = vmm.ch_remote(&["resize", "--cpus", &n.to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "resize --cpus {n} succeeded");
    assert!(
        err.contains(&status.to_string()) && err.contains("desired_vcpus"),
        "resize --cpus {n}: {err}"
    );
}

#[test]
fn cpu_hotplug_resize_adds_removes_and_adds_again() {
    let (vmm, serial) = boot_guest("cpu-hotplug", "cpuhotplug", 1, 4);
    let text = serial_text(&serial);
    assert!(
        text.contains("INFO cpuhotplug pres=0xfea01000 max=4 online=0\n"),
        "{text}"
    );

    resize(&vmm, 3);
    wait_added(&serial, 1, 1);
    wait_added(&serial, 2, 1);
    assert_eq!(boot_vcpus(&vmm), 3);
    assert_no_fail(&serial);

    resize(&vmm, 2);
    wait_removed(&serial, 2, 1);
    wait_boot_vcpus(&vmm, 2);
    assert!(!serial_text(&serial).contains("EJECTED cpu=1"));
    assert_no_fail(&serial);

    // CPU 2 comes back (the same vCPU, started again from the trampoline), CPU 3 is new.
    resize(&vmm, 4);
    wait_added(&serial, 2, 2);
    wait_added(&serial, 3, 1);
    assert_eq!(boot_vcpus(&vmm), 4);
    assert_no_fail(&serial);

    // Above max_vcpus and zero: refused, nothing changes (no scan in the guest).
    let scans = serial_text(&serial).matches("INFO cpuhotplug scan").count();
    refused(&vmm, 5);
    refused(&vmm, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        serial_text(&serial).matches("INFO cpuhotplug scan").count(),
        scans
    );
    assert_eq!(boot_vcpus(&vmm), 4);
    assert_eq!(vmm.state(), "Running");
    assert_no_fail(&serial);
}

/// The CPUs up at boot are started by the guest as well, and one of them can go and come back.
#[test]
fn cpu_hotplug_boot_cpu_removed_and_added_again() {
    let (vmm, serial) = boot_guest("cpu-hotplug-boot", "cpuhotplug", 2, 3);
    let text = serial_text(&serial);
    assert!(
        text.contains("INFO cpuhotplug pres=0xfea01000 max=3 online=0,1\n"),
        "{text}"
    );
    resize(&vmm, 1);
    wait_removed(&serial, 1, 1);
    wait_boot_vcpus(&vmm, 1);
    resize(&vmm, 3);
    wait_added(&serial, 1, 1);
    wait_added(&serial, 2, 1);
    assert_eq!(boot_vcpus(&vmm), 3);
    assert_eq!(vmm.state(), "Running");
    assert_no_fail(&serial);
}

/// A guest that never ejects (test=wait halts with interrupts off): the removal stays pending
/// and a resize that would change the count is answered 429, as the original answers it.
#[test]
fn cpu_hotplug_resize_while_a_removal_is_pending_is_429() {
    let (vmm, _serial) = boot_guest("cpu-hotplug-429", "wait", 2, 2);
    let resize_to_1 = r#"{"desired_vcpus": 1}"#;
    let (status, body) = vmm.curl("PUT", "vm.resize", Some(resize_to_1));
    assert_eq!(status, 204, "{body}");
    // Not ejected: the CPU is still there.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(boot_vcpus(&vmm), 2);
    let (status, body) = vmm.curl("PUT", "vm.resize", Some(resize_to_1));
    assert_eq!(status, 429, "{body}");
    let out = vmm.ch_remote(&["resize", "--cpus", "1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("429"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The count the VM has now (the pending removal included) is no change, as in the
    // original; the removal stays pending.
    let (status, body) = vmm.curl("PUT", "vm.resize", Some(r#"{"desired_vcpus": 2}"#));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.curl("PUT", "vm.resize", Some(resize_to_1)).0, 429);
    assert_eq!(boot_vcpus(&vmm), 2);
    assert_eq!(vmm.state(), "Running");
}
