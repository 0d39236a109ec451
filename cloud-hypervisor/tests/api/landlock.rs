//! `--landlock` with the API: a disk hot-added from outside the paths the configuration and
//! `--landlock-rules` allow fails with the OS's refusal and the VM runs on, one inside a rule's
//! directory works; a snapshot into a directory outside fails, one inside works; a VM created
//! through the API with `landlock_enable` is confined the same way.

use std::path::{Path, PathBuf};

use crate::common;
use crate::helpers::*;

/// A 1 MiB raw image.
fn image(path: &Path) -> PathBuf {
    std::fs::write(path, vec![0u8; 1 << 20]).unwrap();
    path.to_path_buf()
}

/// Starts a VMM with the test guest in scenario `test` on the command line, confined by
/// `--landlock` with `rules`; waits for `ready` on the serial port.
fn start_confined(name: &str, test: &str, rules: &[&str], ready: &str) -> (Vmm, PathBuf) {
    require_curl();
    let dir = common::scratch(&format!("{name}-files"));
    let serial = dir.join("serial.out");
    let kernel = common::guest().elf_pvh.display().to_string();
    let cmdline = format!("test={test}");
    let serial_arg = format!("file={}", serial.display());
    let mut args = vec![
        "--kernel",
        &kernel,
        "--cmdline",
        &cmdline,
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--serial",
        &serial_arg,
        "--console",
        "off",
        "--landlock",
    ];
    if !rules.is_empty() {
        args.push("--landlock-rules");
        args.extend_from_slice(rules);
    }
    let vmm = Vmm::start(name, &args);
    wait_for(&serial, ready, 1);
    (vmm, serial)
}

/// The JSON error chain of a failed request, as one string.
fn chain(body: &str) -> String {
    error_lines(body).join(": ")
}

#[test]
fn hotplug_outside_the_allowed_paths_fails_inside_a_rule_works() {
    let allowed = common::scratch("landlock-hp-allowed");
    let outside = common::scratch("landlock-hp-outside");
    let rule = format!("path={},access=rw", allowed.display());
    let (vmm, serial) = start_confined("landlock-hotplug", "hotplug", &[&rule], "READY");

    let out_img = image(&outside.join("out.img"));
    let body = format!(r#"{{"path": "{}", "id": "outdisk"}}"#, out_img.display());
    let (status, text) = vmm.curl("PUT", "vm.add-disk", Some(&body));
    assert!((400..600).contains(&status), "{status}: {text}");
    let why = chain(&text);
    assert!(why.contains("Permission denied"), "{why}");
    assert!(why.contains("out.img"), "{why}");
    // ch-remote says the same, and the VMM and its VM run on.
    let out = vmm.ch_remote(&["add-disk", &format!("path={}", out_img.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(vmm.state(), "Running");
    assert_eq!(vmm.curl("GET", "vmm.ping", None).0, 200);

    let in_img = image(&allowed.join("in.img"));
    let answer = ch_remote_ok(
        &vmm,
        &["add-disk", &format!("path={},id=indisk", in_img.display())],
    );
    assert!(answer.contains("\"indisk\""), "{answer}");
    wait_for(&serial, "type=blk sectors=2048", 1);
    wait_for(&serial, " ok\n", 1);
    let info = vmm.ok_json("vm.info");
    let disks = info["config"]["disks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(disks.iter().any(|d| d["id"] == "indisk"), "{info}");
    assert!(!disks.iter().any(|d| d["id"] == "outdisk"), "{info}");
    assert_eq!(info["config"]["landlock_enable"], true, "{info}");
    assert_eq!(
        info["config"]["landlock_rules"][0]["path"],
        allowed.display().to_string()
    );
    assert_no_fail(&serial);
}

#[test]
fn snapshot_outside_the_allowed_paths_fails_inside_a_rule_works() {
    let snaps = common::scratch("landlock-snap-allowed");
    let elsewhere = common::scratch("landlock-snap-outside");
    let rule = format!("path={},access=rw", snaps.display());
    let (vmm, serial) = start_confined("landlock-snapshot", "tick", &[&rule], "TICK 2");
    assert_eq!(vmm.put("vm.pause").0, 204);
    let body = |p: &Path| format!(r#"{{"destination_url": "file://{}"}}"#, p.display());

    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&elsewhere)));
    assert_eq!(status, 500, "{text}");
    let why = chain(&text);
    assert!(why.contains("The VM could not be snapshotted"), "{why}");
    assert!(why.contains("Permission denied"), "{why}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert_eq!(vmm.state(), "Paused");

    let inside = snaps.join("s1");
    std::fs::create_dir(&inside).unwrap();
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body(&inside)));
    assert_eq!((status, text.as_str()), (204, ""));
    for f in ["config.json", "state.json", "memory-ranges"] {
        assert!(inside.join(f).exists(), "{f}");
    }
    let paused_at = ticks(&serial);
    assert_eq!(vmm.put("vm.resume").0, 204);
    wait_for(&serial, &format!("TICK {}", paused_at + 1), 1);
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    drop(vmm);

    // Restored on the command line, the snapshot's configuration confines the new VMM too:
    // the guest ticks on, a disk from outside is refused.
    let source = format!("source_url=file://{},resume=on", inside.display());
    let restored = Vmm::start("landlock-restored", &["--restore", &source]);
    wait_for(&serial, &format!("TICK {}", paused_at + 2), 1);
    let out_img = image(&elsewhere.join("out.img"));
    let body = format!(r#"{{"path": "{}"}}"#, out_img.display());
    let (status, text) = restored.curl("PUT", "vm.add-disk", Some(&body));
    assert!((400..600).contains(&status), "{status}: {text}");
    assert!(chain(&text).contains("Permission denied"), "{text}");
    assert_eq!(restored.state(), "Running");
}

/// `vm.create` with `landlock_enable` confines the VMM when the request comes, with the rules
/// from the JSON: with seccomp (the default) the control loop and the seccomp spawner join the
/// domain, so the vCPUs and device workers started later are in it too; without seccomp the
/// control loop is the only thread. A bad rule is a 400 naming the option.
#[test]
fn vm_create_with_landlock_enable_confines_the_vmm() {
    create_confined("landlock-api-create", &[]);
}

#[test]
fn vm_create_with_landlock_enable_confines_the_vmm_without_seccomp() {
    create_confined("landlock-api-create-noseccomp", &["--seccomp", "false"]);
}

fn create_confined(name: &str, extra: &[&str]) {
    require_curl();
    let vmm = Vmm::start(name, extra);
    let allowed = common::scratch(&format!("{name}-allowed"));
    let serial = vmm.dir.join("serial.out");
    let mut config: serde_json::Value =
        serde_json::from_str(&guest_config("hotplug", &serial)).unwrap();
    config["landlock_enable"] = true.into();
    config["landlock_rules"] = serde_json::json!([{"path": allowed, "access": "x"}]);
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 400, "{text}");
    let why = chain(&text);
    assert!(why.contains("--landlock-rules"), "{why}");
    assert!(why.contains("access=x"), "{why}");

    config["landlock_rules"] = serde_json::json!([{"path": allowed, "access": "rw"}]);
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);

    let outside = image(&vmm.dir.join("outside.img"));
    let body = format!(r#"{{"path": "{}"}}"#, outside.display());
    let (status, text) = vmm.curl("PUT", "vm.add-disk", Some(&body));
    assert!((400..600).contains(&status), "{status}: {text}");
    assert!(chain(&text).contains("Permission denied"), "{text}");
    let inside = image(&allowed.join("in.img"));
    let body = format!(r#"{{"path": "{}"}}"#, inside.display());
    let (status, text) = vmm.curl("PUT", "vm.add-disk", Some(&body));
    assert_eq!(status, 200, "{text}");
    wait_for(&serial, "type=blk sectors=2048", 1);
    wait_for(&serial, " ok\n", 1);
    assert_eq!(vmm.state(), "Running");
    // Every thread has no_new_privs, which Landlock sets on the threads it confines (seccomp
    // sets it too; without seccomp it comes from Landlock alone).
    let pid = vmm.pid();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let nnp = status
            .lines()
            .find(|l| l.starts_with("NoNewPrivs:"))
            .unwrap_or_default();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        assert!(
            nnp.ends_with('1'),
            "{} ({}): {nnp}",
            comm.trim(),
            task.path().display()
        );
    }
    // The API socket's file goes with the VMM, as without Landlock.
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    let mut vmm = vmm;
    vmm.wait();
    assert!(!vmm.sock.exists(), "the API socket was left behind");
}
