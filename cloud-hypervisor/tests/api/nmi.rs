//! `vm.nmi` (`ch-remote nmi`): a non-maskable interrupt reaches every vCPU of the test guest
//! (`test=nmi` counts them by CPU and passes when each CPU took one per round): while the VM
//! runs, while it is paused (taken when it resumes), and queued in a paused VM that is then
//! snapshotted and restored in a new VMM (the NMI is part of the vCPUs' saved events).

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::restore::shutdown;

#[test]
fn an_nmi_reaches_every_vcpu_running_paused_and_across_a_restore() {
    require_curl();
    let a = Vmm::start("nmi-a", &[]);
    let serial = a.dir.join("serial.out");
    let config = guest_config("nmi nmi_rounds=3", &serial);
    assert_eq!(a.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(a.put("vm.boot").0, 204);
    wait_for(&serial, "READY cpus=2", 1);

    // Running, through our ch-remote.
    ch_remote_ok(&a, &["nmi"]);
    wait_for(&serial, "NMI counts=[1, 1]", 1);

    // Paused: nothing runs, and the guest takes it when it resumes.
    assert_eq!(a.put("vm.pause").0, 204);
    assert_eq!(a.put("vm.nmi").0, 204);
    std::thread::sleep(Duration::from_millis(200));
    let text = serial_text(&serial);
    assert!(
        !text.contains("NMI counts=[2"),
        "taken while paused:\n{text}"
    );
    assert_eq!(a.put("vm.resume").0, 204);
    wait_for(&serial, "NMI counts=[2, 2]", 1);

    // Queued in a paused VM, which is snapshotted and restored in a new VMM.
    assert_eq!(a.put("vm.pause").0, 204);
    assert_eq!(a.put("vm.nmi").0, 204);
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    assert_eq!(
        a.curl("PUT", "vm.snapshot", Some(&body)),
        (204, String::new())
    );
    shutdown(a);
    let text = serial_text(&serial);
    assert!(
        !text.contains("NMI counts=[3"),
        "taken before the restore:\n{text}"
    );

    let mut b = Vmm::start("nmi-b", &[]);
    let body = json!({ "source_url": url }).to_string();
    assert_eq!(
        b.curl("PUT", "vm.restore", Some(&body)),
        (204, String::new())
    );
    assert_eq!(b.put("vm.resume").0, 204);
    let run = b.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let text = serial_text(&serial);
    assert!(text.contains("NMI counts=[3, 3]"), "{text}");
    assert!(text.lines().any(|l| l == "PASS nmi"), "{text}");
    assert!(text.contains("SUMMARY passed=2 failed=0"), "{text}");
}
