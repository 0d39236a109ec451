//! `--fs` (`"fs": [{"tag": …, "socket": …}]`, `vm.add-fs`): virtio-fs against the real
//! virtiofsd (built by scripts/virtiofsd into target/virtiofsd) sharing a scratch directory.
//! The test guest (`test=fs`) reads the device's configuration and speaks FUSE to virtiofsd:
//! INIT, LOOKUP, OPEN, READ of a file the host made, WRITE, READ back, RELEASE; the host then
//! finds the guest's bytes in the file. When virtiofsd dies under a running guest, the device
//! needs a reset and the VMM goes on; once the guest resets it, it connects to a new virtiofsd
//! on the same socket and serves a new FUSE session.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

const SIZE: usize = 3000;
const WRITTEN: &[u8] = b"written by guest!";

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7) % 256) as u8
}

/// virtiofsd, built once by scripts/virtiofsd (a few minutes the first time).
fn virtiofsd_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new(root.join("scripts/virtiofsd"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/virtiofsd");
        assert!(out.status.success(), "scripts/virtiofsd failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// virtiofsd sharing `shared` on `sock`; killed when dropped.
struct Virtiofsd(Child);

impl Virtiofsd {
    /// Started, and its socket listening.
    fn start(shared: &Path, sock: &Path, log: &Path) -> Self {
        let mut d = Self::spawn(shared, sock, log);
        // 30 s: a loaded machine. An exit meanwhile is a failure too, with its log.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if Instant::now() >= deadline || !matches!(d.0.try_wait(), Ok(None)) {
                panic!(
                    "no {} (virtiofsd: {:?}); its log:\n{}",
                    sock.display(),
                    d.0.try_wait(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Started, without waiting for its socket: where a VMM is already trying to connect, it
    /// may be served and gone (virtiofsd then ends and removes the socket) between two polls.
    fn spawn(shared: &Path, sock: &Path, log: &Path) -> Self {
        // As root in a container without the namespaces its default sandbox needs.
        let child = Command::new(virtiofsd_bin())
            .arg("--socket-path")
            .arg(sock)
            .arg("--shared-dir")
            .arg(shared)
            .args(["--sandbox", "none", "--cache", "never"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("starting virtiofsd");
        Virtiofsd(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch dir with `shared/data.bin` (`SIZE` bytes of the pattern) and virtiofsd on it.
fn share(dir: &Path) -> (PathBuf, PathBuf, Virtiofsd) {
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let file = shared.join("data.bin");
    std::fs::write(&file, (0..SIZE).map(pattern).collect::<Vec<u8>>()).unwrap();
    let sock = dir.join("vfs.sock");
    let d = Virtiofsd::start(&shared, &sock, &dir.join("virtiofsd.log"));
    (file, sock, d)
}

/// The file as the guest leaves it: the pattern, a hole up to 4096, then its write.
fn assert_written(file: &Path) {
    let data = std::fs::read(file).unwrap();
    assert_eq!(data.len(), 4096 + WRITTEN.len());
    assert!(data[..SIZE]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(i)));
    assert!(data[SIZE..4096].iter().all(|&b| b == 0));
    assert_eq!(&data[4096..], WRITTEN);
}

const FUSE_STEPS: [&str; 8] = [
    "fs-config",
    "fs-init",
    "fs-lookup",
    "fs-open",
    "fs-read",
    "fs-write",
    "fs-read-back",
    "fs-release",
];

#[test]
fn the_guest_speaks_fuse_to_virtiofsd_from_the_command_line() {
    let dir = crate::common::scratch("fs-cli");
    let (file, sock, _d) = share(&dir);
    let fs = format!(
        "tag=myfs,socket={},num_queues=1,queue_size=512",
        sock.display()
    );
    let r = crate::common::boot(
        &crate::common::guest().elf_pvh,
        &format!("test=fs fs_tag=myfs fs_size={SIZE}"),
        &["--memory", "size=256M,shared=on", "--fs", &fs],
    );
    r.assert_guest_passed();
    for step in FUSE_STEPS {
        r.assert_passed(step);
    }
    assert!(
        r.stdout.contains("FS tag=myfs num_request_queues=1"),
        "{}",
        r.stdout
    );
    assert_written(&file);
}

#[test]
fn fs_needs_shared_memory_and_a_backend() {
    let kernel = crate::common::guest().elf_pvh.display().to_string();
    let dir = crate::common::scratch("fs-bad");
    let missing = dir.join("missing.sock");
    for (memory, fs, want) in [
        (
            "size=256M",
            "tag=t,socket=/tmp/x.sock",
            "--fs needs --memory shared=on",
        ),
        (
            "size=256M,shared=on",
            "socket=/tmp/x.sock",
            "tag= is required",
        ),
        (
            "size=256M,shared=on",
            &format!("tag=t,socket={}", missing.display()),
            "cannot connect",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
            .args(["--kernel", &kernel, "--memory", memory, "--fs", fs])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{fs}");
        assert!(err.contains(want), "{fs}: {err}");
    }
}

/// Through the API: the configuration and `vm.info` carry the device; then virtiofsd is
/// killed under the running guest: the device needs a reset, its requests go unanswered, the
/// error is logged, and the VMM still answers.
#[test]
fn a_dying_backend_breaks_the_device_not_the_vmm() {
    require_curl();
    let log = crate::common::scratch("fs-crash-log").join("vmm.log");
    let mut vmm = Vmm::start("fs-crash", &["--log-file", log.to_str().unwrap()]);
    let (file, sock, mut d) = share(&vmm.dir);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("fs", &serial)).unwrap();
    config["memory"]["shared"] = true.into();
    config["payload"]["cmdline"] = format!("test=fs fs_size={SIZE} fs_crash").into();
    config["fs"] = serde_json::json!([{"tag": "myfs", "socket": sock, "num_queues": 1,
                                        "queue_size": 1024, "id": "myfs0"}]);
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["fs"][0]["tag"], "myfs", "{info}");
    assert!(info["device_tree"]["myfs0"].is_object(), "{info}");
    wait_for(&serial, "FS waiting for the backend to go", 1);
    assert_written(&file);
    d.kill();
    let text = wait_line_text(&serial, "fs-needs-reset");
    assert!(text.contains("PASS fs-needs-reset\n"), "{text}");
    // The device is broken; the VMM and the VM go on.
    vmm.ok_json("vmm.ping");
    assert_eq!(vmm.state(), "Running");
    let text = wait_line_text(&serial, "fs-no-backend");
    for step in FUSE_STEPS.iter().chain(&["fs-no-backend"]) {
        assert!(text.contains(&format!("PASS {step}\n")), "{step}:\n{text}");
    }
    // The guest powers off: the VMM ends cleanly, as after any shutdown.
    let r = vmm.wait();
    assert!(r.status.success(), "{}", r.stderr);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("vhost-user-fs: the backend closed its socket"),
        "{log}"
    );
}

/// virtiofsd killed under the guest (NEEDS_RESET), then the guest resets the device and starts
/// it again, and the host starts a new virtiofsd on the same socket: the device connects to it
/// (the relay, within a second of its start), the guest's new FUSE session (INIT, LOOKUP, OPEN,
/// READ of the pattern and of its first session's write, RELEASE) is served.
#[test]
fn a_new_backend_serves_the_device_after_its_reset() {
    require_curl();
    let log = crate::common::scratch("fs-reconnect-log").join("vmm.log");
    let mut vmm = Vmm::start("fs-reconnect", &["--log-file", log.to_str().unwrap()]);
    let (file, sock, mut d) = share(&vmm.dir);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("fs", &serial)).unwrap();
    config["memory"]["shared"] = true.into();
    config["payload"]["cmdline"] = format!("test=fs fs_size={SIZE} fs_reconnect").into();
    config["fs"] = serde_json::json!([{"tag": "myfs", "socket": sock, "num_queues": 1}]);
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "FS waiting for the backend to go", 1);
    assert_written(&file);
    d.kill();
    let text = wait_line_text(&serial, "fs-no-backend");
    assert!(text.contains("PASS fs-needs-reset\n"), "{text}");
    wait_for(&serial, "FS device reset, waiting for a new backend", 1);
    // The dead one's socket file is still there: the new one listens in its place.
    let _ = std::fs::remove_file(&sock);
    let started = Instant::now();
    // The device is polling for it; the guest's lines below show it served.
    let _d2 = Virtiofsd::spawn(
        file.parent().unwrap(),
        &sock,
        &vmm.dir.join("virtiofsd2.log"),
    );
    let text = wait_line_text(&serial, "fs-rerelease");
    eprintln!(
        "fs: new session served {} ms after the new virtiofsd started",
        started.elapsed().as_millis()
    );
    for step in [
        "fs-reset",
        "fs-reinit",
        "fs-relookup",
        "fs-reread",
        "fs-rerelease",
    ] {
        assert!(text.contains(&format!("PASS {step}\n")), "{step}:\n{text}");
    }
    let r = vmm.wait();
    assert!(r.status.success(), "{}", r.stderr);
    assert_no_fail(&serial);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("vhost-user-fs: backend connected after"),
        "{log}"
    );
}

/// Waits (60 s at most: a loaded machine makes these scenarios slow) for a PASS or FAIL line
/// of `check`; the serial output.
fn wait_line_text(serial: &Path, check: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = serial_text(serial);
        if text.contains(&format!("PASS {check}")) || text.contains(&format!("FAIL {check}")) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {check}:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vm.add-fs` (through ch-remote) on the hotplug guest: the function appears (PCI 0x1040 +
/// 26) connected to virtiofsd; removed, the device lets go of the backend, which then exits.
/// Without shared guest RAM the call is refused.
#[test]
fn hotplug_fs_added_and_removed() {
    require_curl();
    let vmm = Vmm::start("fs-hotplug", &[]);
    let (_file, sock, mut d) = share(&vmm.dir);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("hotplug", &serial)).unwrap();
    config["memory"]["shared"] = true.into();
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "READY", 1);
    let arg = format!("tag=hotfs,socket={},num_queues=1", sock.display());
    let answer = ch_remote_ok(&vmm, &["add-fs", &arg]);
    let v: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(v["id"], "_fs0", "{answer}");
    let bdf = v["bdf"].as_str().unwrap();
    let slot = u8::from_str_radix(&bdf[8..10], 16).unwrap();
    wait_for(
        &serial,
        &format!("HOTPLUG ADDED slot={slot} type=1af4:105a\n"),
        1,
    );
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["fs"][0]["tag"], "hotfs", "{info}");
    ch_remote_ok(&vmm, &["remove-device", "_fs0"]);
    wait_for(&serial, &format!("HOTPLUG GONE slot={slot}\n"), 1);
    assert!(vmm.ok_json("vm.info")["config"]["fs"].is_null());
    // The backend's only client went away: virtiofsd ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "virtiofsd still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_fail(&serial);
    assert_eq!(vmm.state(), "Running");

    let plain = Vmm::start("fs-hotplug-private", &[]);
    let config = guest_config("hotplug", &plain.dir.join("serial.out"));
    assert_eq!(plain.curl("PUT", "vm.create", Some(&config)).0, 204);
    assert_eq!(plain.put("vm.boot").0, 204);
    let body = format!(r#"{{"tag": "t", "socket": "{}"}}"#, sock.display());
    let (status, text) = plain.curl("PUT", "vm.add-fs", Some(&body));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("--fs needs --memory shared=on"), "{text}");
}

/// A snapshot of a VM whose driver runs the file system is refused (virtiofsd's FUSE session,
/// inodes and open files cannot be saved, and a new virtiofsd would not know them), with the
/// device named; nothing is written, the VM resumes and the device goes on as before (killing
/// virtiofsd then still shows as NEEDS_RESET in the guest).
#[test]
fn a_snapshot_with_a_running_file_system_is_refused() {
    require_curl();
    let mut vmm = Vmm::start("fs-snapshot", &[]);
    let (file, sock, mut d) = share(&vmm.dir);
    let serial = vmm.dir.join("serial.out");
    let mut config: Value = serde_json::from_str(&guest_config("fs", &serial)).unwrap();
    config["memory"]["shared"] = true.into();
    config["payload"]["cmdline"] = format!("test=fs fs_size={SIZE} fs_crash").into();
    config["fs"] = serde_json::json!([{"tag": "myfs", "socket": sock, "id": "myfs0"}]);
    let (status, text) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "FS waiting for the backend to go", 1);
    assert_written(&file);
    assert_eq!(vmm.put("vm.pause").0, 204);
    let snap = vmm.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body));
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("myfs0: vhost-user-fs: no snapshot or migration while the driver runs"),
        "{text}"
    );
    assert!(!snap.join("state.json").exists());
    assert_eq!(vmm.put("vm.resume").0, 204);
    d.kill();
    let text = wait_line_text(&serial, "fs-needs-reset");
    assert!(text.contains("PASS fs-needs-reset\n"), "{text}");
    let r = vmm.wait();
    assert!(r.status.success(), "{}", r.stderr);
}
