//! The whole VM lifecycle over the API, with curl and with ch-remote.

use std::time::Duration;

use crate::common;
use crate::helpers::*;

/// Checks that the guest stops printing while paused and goes on after resume.
fn check_pause_stops_the_guest(pause: impl Fn(), resume: impl Fn(), serial: &std::path::Path) {
    wait_for(serial, "TICK 3", 1);
    pause();
    // A tick being printed at the moment of the pause may still land.
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = ticks(serial);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(ticks(serial), paused_at, "the guest ran on while paused");
    resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ticks(serial) < paused_at + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn lifecycle_over_curl() {
    require_curl();
    let dir = common::scratch("api-curl-events");
    let monitor = dir.join("events.json");
    let monitor_arg = format!("path={}", monitor.display());
    let mut vmm = Vmm::start("api-curl", &["--event-monitor", &monitor_arg]);
    let serial = vmm.dir.join("serial.out");

    let ping = vmm.ok_json("vmm.ping");
    assert_eq!(ping["version"], concat!("v", env!("CARGO_PKG_VERSION")));
    assert_eq!(ping["pid"], vmm.pid());
    assert!(ping["features"].is_array() && ping["build_version"].is_string());

    assert_eq!(vmm.curl("GET", "vm.info", None).0, 404);
    assert_eq!(vmm.put("vm.boot").0, 404);
    let config = guest_config("tick", &serial);
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&config)).0, 204);
    let (status, body) = vmm.curl("PUT", "vm.create", Some(&config));
    assert_eq!(
        status, 500,
        "a second vm.create, as the original answers it"
    );
    assert_eq!(
        error_lines(&body),
        [
            "Error from API",
            "The VM could not be created",
            "VM is already created"
        ]
    );
    assert_eq!(vmm.state(), "Created");
    assert!(vmm.ok_json("vm.info").get("device_tree").is_none());
    assert_eq!(vmm.put("vm.pause").0, 500, "pause before boot");
    assert_eq!(
        vmm.curl("GET", "vm.counters", None).0,
        500,
        "counters before boot"
    );
    assert_eq!(vmm.put("vm.reboot").0, 404, "reboot before boot");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    assert_eq!(vmm.state(), "Running");
    assert_eq!(vmm.put("vm.boot").0, 500, "boot while running");
    assert_eq!(vmm.put("vm.resume").0, 500, "resume while running");

    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);
    assert_eq!(info["config"]["memory"]["size"], 256u64 << 20);
    assert_eq!(info["memory_actual_size"], 256u64 << 20);
    assert_eq!(info["config"]["payload"]["cmdline"], "test=tick");
    // The built VM's devices: the virtio-rng (always there) on bus 0, under its transport.
    let tree = info["device_tree"].as_object().expect("a device tree");
    let transport = &tree["_virtio-pci-__rng"];
    assert_eq!(transport["children"], serde_json::json!(["__rng"]));
    let bdf = transport["pci_bdf"].as_str().unwrap();
    assert!(bdf.starts_with("0000:00:") && bdf.ends_with(".0"), "{bdf}");
    assert_eq!(tree["__rng"]["id"], "__rng");
    // As the original's: the device names its transport, which has the address and the BAR.
    assert_eq!(tree["__rng"]["parent"], "_virtio-pci-__rng");
    assert!(tree["__rng"].get("pci_bdf").is_none(), "{tree:?}");
    let bars = transport["resources"].as_array().unwrap();
    assert_eq!(bars.len(), 1, "{bars:?}");
    let bar = &bars[0]["PciBar"];
    // Our transport's BAR is 64 KiB (the original's 512 KiB).
    assert_eq!(
        (bar["index"].as_u64(), bar["size"].as_u64()),
        (Some(0), Some(0x10000))
    );
    assert!(
        ["Mmio32", "Mmio64"].contains(&bar["type_"].as_str().unwrap()),
        "{bar}"
    );
    assert_eq!(bar["prefetchable"], false);
    assert_eq!(bar["base"].as_u64().unwrap() % 0x10000, 0, "{bar}");

    check_pause_stops_the_guest(
        || {
            assert_eq!(vmm.put("vm.pause").0, 204);
            assert_eq!(vmm.state(), "Paused");
            assert_eq!(vmm.put("vm.pause").0, 500, "pause while paused");
            // As the original: the press waits for the guest to resume.
            assert_eq!(vmm.put("vm.power-button").0, 204, "button while paused");
        },
        || assert_eq!(vmm.put("vm.resume").0, 204),
        &serial,
    );
    assert_eq!(vmm.state(), "Running");
    assert_eq!(vmm.ok_json("vm.counters"), serde_json::json!({}));

    assert_eq!(vmm.put("vm.reboot").0, 204);
    wait_for(&serial, "test-guest: entry pvh", 2);
    wait_for(&serial, "READY", 2);
    assert_eq!(vmm.state(), "Running");
    assert_eq!(vmm.put("vm.power-button").0, 204);

    assert_eq!(vmm.put("vm.shutdown").0, 204);
    // As in the original, whose vm.shutdown drops the VM and keeps its configuration: the
    // state reads Created again, and there is no device tree until the next boot.
    assert_eq!(vmm.state(), "Created");
    assert!(vmm.ok_json("vm.info").get("device_tree").is_none());
    assert_eq!(vmm.put("vm.shutdown").0, 500, "shutdown twice");
    assert_eq!(vmm.put("vm.pause").0, 500, "pause after shutdown");
    // A shut-down VM boots again from its configuration.
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    assert_eq!(vmm.state(), "Running");
    assert_eq!(vmm.put("vm.delete").0, 204);
    assert_eq!(vmm.curl("GET", "vm.info", None).0, 404);
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(!vmm.sock.exists(), "the API socket was left behind");

    // The original's lifecycle events (it has none for a creation or a button press).
    let events: Vec<String> = events(&monitor)
        .into_iter()
        .filter(|e| !e.starts_with("virtio-device:"))
        .collect();
    let expected = [
        "vmm:starting",
        "vm:booting",
        "vm:booted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:rebooting",
        "vm:rebooted",
        "vm:shutdown",
        "vm:booting",
        "vm:booted",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    assert_eq!(events, expected);
}

#[test]
fn lifecycle_over_ch_remote() {
    let mut vmm = Vmm::start("api-ch-remote", &[]);
    let serial = vmm.dir.join("serial.out");
    let config_file = vmm.dir.join("vm.json");
    std::fs::write(&config_file, guest_config("tick", &serial)).unwrap();
    let ok = |args: &[&str]| {
        let out = vmm.ch_remote(args);
        assert!(
            out.status.success(),
            "ch-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fails = |args: &[&str], why: &str| {
        let out = vmm.ch_remote(args);
        assert_eq!(out.status.code(), Some(1), "ch-remote {args:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(why), "ch-remote {args:?}: {err}");
    };

    let ping = ok(&["ping"]);
    assert!(
        ping.starts_with("{\"") && ping.ends_with("}\n"),
        "the body as sent: {ping}"
    );
    let ping: serde_json::Value = serde_json::from_str(&ping).unwrap();
    assert_eq!(ping["pid"], vmm.pid());
    fails(
        &["info"],
        "404: Error from API: The VM info is not available: VM is not created",
    );
    fails(&["boot"], "404");
    ok(&["create", config_file.to_str().unwrap()]);
    fails(
        &["create", config_file.to_str().unwrap()],
        "500: Error from API: The VM could not be created: VM is already created",
    );
    fails(&["create", "/nonexistent.json"], "cannot read");
    ok(&["boot"]);
    wait_for(&serial, "READY", 1);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info"])).unwrap();
    assert_eq!(info["state"], "Running");
    check_pause_stops_the_guest(
        || {
            ok(&["pause"]);
            fails(
                &["pause"],
                "500: Error from API: The VM could not be paused",
            );
        },
        || {
            ok(&["resume"]);
        },
        &serial,
    );
    assert_eq!(ok(&["counters"]).trim(), "{}");
    ok(&["reboot"]);
    wait_for(&serial, "READY", 2);
    ok(&["power-button"]);
    ok(&["shutdown"]);
    let info: serde_json::Value = serde_json::from_str(&ok(&["info"])).unwrap();
    assert_eq!(info["state"], "Created");
    assert_eq!(ok(&["delete"]), "", "a 204 prints nothing, as the original");
    fails(&["info"], "404");
    // What this VMM lacks is still sent; the server answers 501 with its reason.
    fails(&["add-vdpa", "path=/dev/vhost-vdpa-0"], "501");
    fails(
        &["add-vdpa", "path=/dev/vhost-vdpa-0"],
        "vm.add-vdpa is not supported yet",
    );
    // Hotplug needs a created VM, as the original's.
    fails(&["add-disk", "path=/x"], "404");
    fails(&["remove-device", "_disk0"], "404");
    fails(
        &["nmi"],
        "500: Error from API: Error triggering NMI: VM is not running",
    );
    fails(&["resize", "--cpus", "2"], "404");
    fails(
        &["snapshot", "file:///tmp/snap"],
        "500: Error from API: The VM could not be snapshotted: VM is not running",
    );
    // A file that is not a VmConfig is the server's to refuse, as with the original.
    let bad = vmm.dir.join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    fails(&["create", bad.to_str().unwrap()], "400");
    fails(&["frobnicate"], "frobnicate");
    // 200 with an empty body: an empty line, as the original prints it.
    assert_eq!(ok(&["shutdown-vmm"]), "\n");
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(!vmm.sock.exists());

    // Nobody listening: one line, exit 1.
    let out = vmm.ch_remote(&["ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// `vm.info`'s config is the same for a VM from the command line and one from `vm.create`.
#[test]
fn cli_and_api_configs_match() {
    let kernel = common::guest().elf_pvh.display().to_string();
    let cli = Vmm::start(
        "api-cli-config",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=wait",
            "--cpus",
            "boot=2,max=3",
            "--memory",
            "size=128M,mergeable=on",
            "--serial",
            "null",
            "--console",
            "off",
        ],
    );
    let from_cli = cli.ok_json("vm.info");
    assert_eq!(from_cli["state"], "Running");
    let api = Vmm::start("api-api-config", &[]);
    let body = serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 3},
        "memory": {"size": 128u64 << 20, "mergeable": true},
        "payload": {"kernel": kernel, "cmdline": "test=wait"},
        "serial": {"mode": "Null"},
        "console": {"mode": "Off"},
    });
    assert_eq!(api.curl("PUT", "vm.create", Some(&body.to_string())).0, 204);
    assert_eq!(api.put("vm.boot").0, 204);
    let from_api = api.ok_json("vm.info");
    assert_eq!(from_cli["config"], from_api["config"]);
    // And the CLI's config, sent back whole, creates the same VM.
    let again = Vmm::start("api-roundtrip-config", &[]);
    let config = from_cli["config"].to_string();
    assert_eq!(again.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(again.ok_json("vm.info")["config"], from_cli["config"]);
}

/// `vm.create` with `payload.firmware`: the test guest's PVH ELF boots as a firmware (no
/// command line, so its default scenario) and finds SMBIOS.
#[test]
fn vm_create_with_a_firmware_payload() {
    let fw = common::guest().elf_pvh.display().to_string();
    let mut vmm = Vmm::start("api-firmware", &[]);
    let serial = vmm.dir.join("serial.out");
    let body = serde_json::json!({
        "memory": {"size": 128u64 << 20},
        "payload": {"firmware": fw},
        "serial": {"mode": "File", "file": serial},
        "console": {"mode": "Off"},
    });
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&body.to_string())).0, 204);
    let payload = &vmm.ok_json("vm.info")["config"]["payload"];
    assert_eq!(payload["firmware"], fw.as_str());
    assert!(payload.get("kernel").is_none(), "{payload}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let out = std::fs::read_to_string(&serial).unwrap();
    for line in [
        "test-guest: protocol=pvh cmdline=\"\"",
        "PASS smbios-entry",
        "PASS smbios-system",
        "SUMMARY passed=",
    ] {
        assert!(out.contains(line), "no '{line}' in:\n{out}");
    }
    assert!(!out.contains("FAIL"), "{out}");
}

/// Without --no-shutdown the VMM exits when the guest powers off, API socket or not; with it,
/// the VM is shut down (its state reads Created, as the original's does) and the VMM stays.
#[test]
fn guest_power_off_with_an_api_socket() {
    let kernel = common::guest().elf_pvh.display().to_string();
    let boot = [
        "--kernel",
        &kernel,
        "--cmdline",
        "test=boot",
        "--console",
        "off",
    ];
    let mut vmm = Vmm::start("api-poweroff", &boot);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(!vmm.sock.exists(), "the API socket was left behind");

    let vmm = Vmm::start("api-no-shutdown", &[&boot[..], &["--no-shutdown"]].concat());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The VM from the command line was booted before the API answered: Created means shut down.
    while vmm.state() != "Created" {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM did not shut down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vmm.ok_json("vmm.ping")["pid"], vmm.pid());
}

#[test]
fn sigterm_removes_the_socket() {
    let mut vmm = Vmm::start("api-sigterm", &[]);
    assert_eq!(vmm.ok_json("vmm.ping")["pid"], vmm.pid());
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(vmm.pid(), libc::SIGTERM) }, 0);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    assert!(!vmm.sock.exists(), "the API socket was left behind");
}

/// `vm.power-button` reaches the guest: the GED raises its interrupt, the guest reads the
/// power-button bit from the GED's register, passes and powers off; the VMM then exits.
#[test]
fn power_button_reaches_the_guest() {
    let kernel = common::guest().elf_pvh.display().to_string();
    let dir = common::scratch("api-power-button-serial");
    let serial = dir.join("serial.out");
    let serial_arg = format!("file={}", serial.display());
    let mut vmm = Vmm::start(
        "api-power-button",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=power-button",
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    // READY: the guest has routed the GED's IOAPIC pin and waits for the interrupt.
    wait_for(&serial, "READY", 1);
    assert_eq!(vmm.put("vm.power-button").0, 204);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let out = std::fs::read_to_string(&serial).unwrap();
    assert!(out.lines().any(|l| l == "PASS power-button"), "{out}");
    assert!(out.contains("SUMMARY passed=1 failed=0"), "{out}");
}

/// `--api-socket fd=N`: a listening socket handed over by the parent, as orchestrators do.
#[test]
fn api_socket_from_an_inherited_fd() {
    use std::os::fd::AsRawFd;
    let dir = common::scratch("api-fd");
    let path = dir.join("handed.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clears FD_CLOEXEC on a listener this test owns, so the VMM inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let arg = format!("fd={fd}");
    let child = common::spawn(&["--api-socket", &arg]);
    let mut vmm = Vmm {
        child: Some(child),
        dir,
        sock: path.clone(),
    };
    assert_eq!(vmm.ok_json("vmm.ping")["pid"], vmm.pid());
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    let run = vmm.wait();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    drop(listener);

    // A bad fd is one line naming the option.
    let run = common::run(&["--api-socket", "fd=987"]);
    assert_eq!(run.code(), Some(1));
    assert!(
        run.stderr
            .starts_with("cloud-hypervisor: --api-socket fd=987: "),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1);
}

/// The `KVMCLOCK <ns>` samples printed so far (whole lines only).
fn kvmclock_samples(file: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("KVMCLOCK "))
        .map(|n| n.parse().expect("KVMCLOCK <ns>"))
        .collect()
}

/// The guest's kvmclock across a pause: as the original does, the VMM saves the KVM clock at
/// pause and restores it at resume, so the guest does not see the paused second as a jump
/// of its clock. The guest samples kvmclock (CPUID 0x40000001 + MSR_KVM_SYSTEM_TIME_NEW)
/// about every 23 ms.
#[test]
fn kvmclock_does_not_jump_across_a_pause() {
    let vmm = Vmm::start("api-kvmclock", &[]);
    let serial = vmm.dir.join("serial.out");
    let config = guest_config("kvmclock", &serial);
    assert_eq!(vmm.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "KVMCLOCK", 5);
    let out = std::fs::read_to_string(&serial).unwrap();
    assert!(out.contains("PASS kvmclock-cpuid"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");

    assert_eq!(vmm.put("vm.pause").0, 204);
    // A sample being printed at the moment of the pause may still land.
    std::thread::sleep(Duration::from_millis(100));
    let before = kvmclock_samples(&serial).len();
    let paused = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(kvmclock_samples(&serial).len(), before, "ran while paused");
    assert_eq!(vmm.put("vm.resume").0, 204);
    let paused = paused.elapsed();
    wait_for(&serial, "KVMCLOCK", before + 5);

    let samples = kvmclock_samples(&serial);
    for w in samples.windows(2) {
        assert!(w[1] > w[0], "kvmclock went backwards: {samples:?}");
    }
    let steps: Vec<u64> = samples.windows(2).map(|w| w[1] - w[0]).collect();
    let normal = *steps[..before - 1].iter().max().unwrap();
    // The sample just before the pause and the first one after it.
    let across = samples[before] - samples[before - 1];
    assert!(
        across < normal + 200_000_000,
        "kvmclock jumped {across} ns across a pause of {paused:?} (normal step at most {normal} ns)"
    );
}

/// The original's `virtio-device` events: `activated` when a driver starts a device, `reset`
/// when it resets one it had started, each with the device id; and a VMM that ends with its
/// guest's power-off tells of the VM's shutdown and deletion, then its own.
#[test]
fn virtio_device_events_and_the_end_as_the_original() {
    let dir = crate::common::scratch("device-events");
    let monitor = dir.join("events.json");
    let r = crate::common::boot(
        &crate::common::guest().elf_pvh,
        "test=msix",
        &["--event-monitor", &format!("path={}", monitor.display())],
    );
    r.assert_guest_passed();
    let text = std::fs::read_to_string(&monitor).unwrap();
    let device: Vec<(String, String)> = serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .filter(|v| v["source"] == "virtio-device")
        .map(|v| {
            let id = v["properties"]["id"].as_str().unwrap().to_string();
            (v["event"].as_str().unwrap().to_string(), id)
        })
        .collect();
    let want =
        [("activated", "__rng"), ("reset", "__rng")].map(|(e, id)| (e.to_string(), id.to_string()));
    assert_eq!(device, want, "{text}");
    let ev = events(&monitor);
    assert_eq!(
        ev[..3],
        ["vmm:starting", "vm:booting", "vm:booted"],
        "{ev:?}"
    );
    assert_eq!(
        ev[ev.len() - 3..],
        ["vm:shutdown", "vm:deleted", "vmm:shutdown"],
        "{ev:?}"
    );
}
