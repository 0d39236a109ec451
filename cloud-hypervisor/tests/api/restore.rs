//! `vm.restore`, `ch-remote restore` and `--restore`: a busy guest (test=busy: a memory
//! pattern it verifies, a disk it writes and reads back, a clock it prints) snapshotted in one
//! VMM and restored in new ones, in each memory restore mode, as clones, and refused clearly
//! for broken snapshots.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

/// A busy guest's configuration: 2 vCPUs, 256 MiB, serial into `serial` (or on stdout), and
/// a 1 MiB disk where `disk` is given.
pub(crate) fn busy_config(serial: Option<&Path>, disk: Option<&Path>) -> Value {
    let kernel = common::guest().elf_pvh.display().to_string();
    let mut c = json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256u64 << 20},
        "payload": {"kernel": kernel, "cmdline": "test=busy"},
        "serial": match serial {
            Some(p) => json!({"mode": "File", "file": p}),
            None => json!({"mode": "Tty"}),
        },
        "console": {"mode": "Off"},
    });
    if let Some(d) = disk {
        std::fs::write(d, vec![0u8; 1 << 20]).unwrap();
        c["disks"] = json!([{"path": d}]);
    }
    c
}

/// Waits until `file` shows BUSY round `n`; returns its rounds.
fn wait_round(file: &Path, n: u64) -> Vec<Busy> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        assert!(!text.contains("FAIL"), "{}:\n{text}", file.display());
        let lines = busy_lines(&text);
        if lines.last().is_some_and(|b| b.n >= n) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no BUSY {n} in {}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Checks that `after` goes on from `before` (the rounds before the snapshot): the next round,
/// no restart, every check good, the guest's clock without a jump for the time the VM was
/// away, and a new VM generation ID.
fn check_goes_on(before: &Busy, after: &[Busy], text: &str) {
    assert!(!text.contains("READY"), "the guest started again:\n{text}");
    let first = after.first().expect("rounds after the restore");
    // The next round, or the one after where the snapshot caught the next one's line half
    // printed.
    assert!(
        first.n == before.n + 1 || first.n == before.n + 2,
        "round {} after round {}:\n{text}",
        first.n,
        before.n
    );
    for (a, b) in after.iter().zip(after.iter().skip(1)) {
        assert_eq!(b.n, a.n + 1, "rounds in order:\n{text}");
    }
    for b in after {
        assert_eq!(b.mem, "ok", "memory pattern, round {}:\n{text}", b.n);
        assert!(
            b.disk == "ok" || b.disk == "none",
            "disk, round {}:\n{text}",
            b.n
        );
    }
    // A round is ~20 ms; the seconds the VM spent saved do not show in its clock.
    let gap = first.clock.saturating_sub(before.clock);
    assert!(gap < 500_000_000, "the clock jumped {gap} ns:\n{text}");
    assert_ne!(before.gen, "none", "the guest found no VM generation ID");
    // A round the snapshot caught after its ID read still prints the old one.
    let last = after.last().expect("rounds");
    assert_ne!(last.gen, before.gen, "the generation ID is new:\n{text}");
    assert!(
        after.iter().skip(2).all(|b| b.gen == last.gen),
        "one new ID:\n{text}"
    );
    assert!(text.contains("VMGENID-CHANGED"), "{text}");
}

/// Waits for ten more rounds in `serial` and checks them with `check_goes_on`; returns them.
pub(crate) fn goes_on(serial: &Path, before: &Busy) -> Vec<Busy> {
    wait_round(serial, before.n + 10);
    let text = std::fs::read_to_string(serial).unwrap();
    let after: Vec<Busy> = busy_lines(&text)
        .into_iter()
        .filter(|l| l.n > before.n)
        .collect();
    check_goes_on(before, &after, &text);
    after
}

/// Boots a busy guest in a VMM, lets it run, pauses it and snapshots it into `<dir>/snap`;
/// returns the snapshot URL, the last round before the pause, and the VMM's config.
pub(crate) fn busy_snapshot(
    vmm: &Vmm,
    config: &Value,
    serial: Option<&Path>,
) -> (String, Busy, Value) {
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    if let Some(s) = serial {
        wait_round(s, 5);
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(vmm.put("vm.pause").0, 204);
    let before = serial.map(|s| {
        busy_lines(&std::fs::read_to_string(s).unwrap())
            .pop()
            .expect("rounds")
    });
    let snap = vmm.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    let (status, text) = vmm.curl("PUT", "vm.snapshot", Some(&body));
    assert_eq!(status, 204, "{text}");
    let info = vmm.ok_json("vm.info");
    (
        url,
        before.unwrap_or(Busy {
            n: 0,
            clock: 0,
            gen: String::new(),
            mem: String::new(),
            disk: String::new(),
        }),
        info["config"].clone(),
    )
}

pub(crate) fn shutdown(mut vmm: Vmm) {
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    assert_eq!(vmm.wait().code(), Some(0));
}

/// Snapshot, then restore in a new VMM over the API (copy mode): paused until resumed, the same
/// configuration, and a guest that goes on where it was.
#[test]
fn restore_in_a_new_process_goes_on() {
    require_curl();
    let a = Vmm::start("restore-a", &[]);
    let serial = a.dir.join("serial.out");
    let disk = a.dir.join("disk.img");
    let mut config = busy_config(Some(&serial), Some(&disk));
    // A pattern from 32 to 192 MiB: the copy's data spans several of its 64 MiB pieces, so
    // more than one thread reads it where the host has the CPUs (restore_copy).
    config["payload"]["cmdline"] = json!("test=busy busy_mem=160");
    let (url, before, info_config) = busy_snapshot(&a, &config, Some(&serial));
    shutdown(a);

    let dir = common::scratch("restore-b-events");
    let monitor = dir.join("events.json");
    let b = Vmm::start(
        "restore-b",
        &["--event-monitor", &format!("path={}", monitor.display())],
    );
    let body = json!({ "source_url": url }).to_string();
    let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
    assert_eq!((status, text.as_str()), (204, ""));
    let info = b.ok_json("vm.info");
    assert_eq!(info["state"], "Paused");
    assert_eq!(info["config"], info_config, "the snapshot's configuration");
    // The disk present at boot has a 32-bit BAR (as the original's), and keeps it.
    let bar = &info["device_tree"]["_virtio-pci-_disk0"]["resources"][0]["PciBar"];
    assert_eq!(bar["type_"], "Mmio32", "{info}");
    assert!(bar["base"].as_u64().unwrap() < 1 << 32, "{bar}");
    // A second restore: a VM is there.
    assert_eq!(b.curl("PUT", "vm.restore", Some(&body)).0, 500);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        busy_lines(&text).iter().all(|l| l.n <= before.n),
        "the guest ran before the resume:\n{text}"
    );
    assert_eq!(b.put("vm.resume").0, 204);
    let after = goes_on(&serial, &before);
    assert!(after.iter().all(|b| b.disk == "ok"), "{after:?}");
    shutdown(b);
    let ev = events(&monitor);
    let at = |e: &str| ev.iter().position(|x| x == e).unwrap_or(usize::MAX);
    assert!(at("vm:restoring") < at("vm:restored"), "{ev:?}");
    assert!(at("vm:restored") < at("vm:resumed"), "{ev:?}");
    assert!(at("vm:resumed") < ev.len(), "{ev:?}");
}

/// The other modes, through the other front ends: `ch-remote restore` on demand, then a
/// snapshot of that VM restored with `--restore` copy-on-write, each resumed at once.
#[test]
fn restore_on_demand_and_copy_on_write() {
    let a = Vmm::start("restore-modes-a", &[]);
    let serial = a.dir.join("serial.out");
    let config = busy_config(Some(&serial), None);
    let (url, before, _) = busy_snapshot(&a, &config, Some(&serial));
    shutdown(a);

    let b = Vmm::start("restore-modes-b", &[]);
    let arg = format!("source_url={url},memory_restore_mode=ondemand,resume=on");
    let out = b.ch_remote(&["restore", &arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.state(), "Running");
    goes_on(&serial, &before);
    // A snapshot of the VM still loading on demand (its pages not yet touched come from the
    // first snapshot as the second one reads them), restored copy-on-write.
    assert_eq!(b.put("vm.pause").0, 204);
    let before = busy_lines(&std::fs::read_to_string(&serial).unwrap())
        .pop()
        .unwrap();
    let snap2 = b.dir.join("snap2");
    std::fs::create_dir(&snap2).unwrap();
    let url2 = format!("file://{}", snap2.display());
    let body = json!({ "destination_url": url2 }).to_string();
    assert_eq!(b.curl("PUT", "vm.snapshot", Some(&body)).0, 204);
    shutdown(b);

    let arg = format!("source_url={url2},memory_restore_mode=copyonwrite,resume=on");
    let c = Vmm::start("restore-modes-c", &["--restore", &arg]);
    goes_on(&serial, &before);
    assert_eq!(c.state(), "Running");
    shutdown(c);
}

/// Reads a clone's stdout until round `n`; returns the rounds.
pub(crate) fn clone_rounds(vmm: &mut Vmm, n: u64, got: &mut String) -> Vec<Busy> {
    let child = vmm.child.as_mut().unwrap();
    let out = child.stdout.as_mut().unwrap();
    let fd = out.as_raw_fd();
    // SAFETY: sets O_NONBLOCK on the pipe we own.
    unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = busy_lines(got);
        if lines.last().is_some_and(|b| b.n >= n) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no BUSY {n}:\n{got}");
        let mut buf = [0u8; 4096];
        match out.read(&mut buf) {
            Ok(0) => panic!("the clone ended:\n{got}"),
            Ok(k) => got.push_str(&String::from_utf8_lossy(&buf[..k])),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Two clones of one snapshot at once, copy-on-write: both run on from the snapshot, each with
/// its own VM generation ID.
#[test]
fn two_clones_of_one_snapshot() {
    let a = Vmm::start("restore-clones-a", &[]);
    let config = busy_config(None, None);
    let (url, _, _) = busy_snapshot(&a, &config, None);
    shutdown(a);
    let arg = format!("source_url={url},memory_restore_mode=copyonwrite,resume=on");
    let mut clones = [
        Vmm::start("restore-clone-1", &["--restore", &arg]),
        Vmm::start("restore-clone-2", &["--restore", &arg]),
    ];
    let mut texts = [String::new(), String::new()];
    let mut gens = Vec::new();
    let mut first = Vec::new();
    for (vmm, text) in clones.iter_mut().zip(texts.iter_mut()) {
        let lines = clone_rounds(vmm, 0, text);
        first.push(lines[0].n);
    }
    for (vmm, text) in clones.iter_mut().zip(texts.iter_mut()) {
        let target = busy_lines(text).last().unwrap().n + 10;
        let lines = clone_rounds(vmm, target, text);
        assert!(!text.contains("READY") && !text.contains("FAIL"), "{text}");
        assert!(lines.iter().all(|b| b.mem == "ok"), "{text}");
        gens.push(lines.last().unwrap().gen.clone());
    }
    assert_eq!(first[0], first[1], "both clones go on from the same round");
    assert_ne!(gens[0], "none");
    assert_ne!(gens[0], gens[1], "each clone has its own generation ID");
    for c in clones {
        shutdown(c);
    }
}

/// Copies the snapshot directory `from` to `to`, the memory file as a link.
pub(crate) fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "state.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(from.join("memory-ranges"), to.join("memory-ranges")).unwrap();
}

pub(crate) fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Broken snapshots are refused with one clear error chain, and nothing is left behind: no VM,
/// no configuration (a good restore works next, in the same VMM). `--restore` says it in one
/// line and exits 1.
#[test]
fn broken_snapshots_are_refused_cleanly() {
    require_curl();
    let a = Vmm::start("restore-bad-a", &[]);
    let serial = a.dir.join("serial.out");
    let (url, _, _) = busy_snapshot(&a, &busy_config(Some(&serial), None), Some(&serial));
    shutdown(a);
    let snap = PathBuf::from(url.strip_prefix("file://").unwrap());
    let b = Vmm::start("restore-bad-b", &[]);
    let bad = |name: &str, f: &dyn Fn(&Path)| -> String {
        let dir = b.dir.join(name);
        copy_snapshot(&snap, &dir);
        f(&dir);
        format!("file://{}", dir.display())
    };
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            format!("file://{}/missing", b.dir.display()),
            vec![
                "Failed to send migratable component snapshot",
                "Destination is not a directory",
            ],
        ),
        (
            "tcp://127.0.0.1:1".into(),
            vec!["Could not extract path from URL: tcp://127.0.0.1:1"],
        ),
        (
            bad("no-state", &|d| {
                std::fs::remove_file(d.join("state.json")).unwrap()
            }),
            vec![
                "Failed to receive migratable component snapshot",
                "Error opening VM state snapshot file",
            ],
        ),
        (
            bad("corrupt-state", &|d| {
                std::fs::write(d.join("state.json"), "{\"version\": 1, ").unwrap()
            }),
            vec!["Error deserialising VM state snapshot"],
        ),
        (
            bad("corrupt-config", &|d| {
                std::fs::write(d.join("config.json"), "[]").unwrap()
            }),
            vec!["Error deserialising VM config snapshot"],
        ),
        (
            bad("other-version", &|d| {
                edit_json(&d.join("state.json"), |v| v["version"] = 99.into())
            }),
            vec![
                "Failed to restore migratable component",
                "the snapshot's state is of version 99; this build restores version 1",
            ],
        ),
        (
            bad("short-memory", &|d| {
                std::fs::remove_file(d.join("memory-ranges")).unwrap();
                std::fs::write(d.join("memory-ranges"), [0u8; 4096]).unwrap();
            }),
            vec!["holds 4096 bytes, the state lists 268435456 bytes of RAM"],
        ),
        (
            bad("fewer-vcpus", &|d| {
                edit_json(&d.join("config.json"), |v| {
                    v["cpus"]["boot_vcpus"] = 1.into();
                })
            }),
            vec!["the state has 2 vCPU(s), the configuration boots 1"],
        ),
        (
            bad("another-device", &|d| {
                let disk = d.join("disk.img");
                std::fs::write(&disk, [0u8; 4096]).unwrap();
                edit_json(&d.join("config.json"), |v| {
                    v["disks"] = json!([{"path": disk, "id": "_disk9"}]);
                })
            }),
            vec!["the state's PCI devices"],
        ),
        (
            bad("other-memory-size", &|d| {
                edit_json(&d.join("config.json"), |v| {
                    v["memory"]["size"] = (128u64 << 20).into();
                })
            }),
            vec!["the state's RAM ranges"],
        ),
    ];
    for (url, wanted) in &cases {
        let body = json!({ "source_url": url }).to_string();
        let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
        assert_eq!(status, 500, "{url}: {text}");
        let lines = error_lines(&text);
        assert_eq!(
            lines[..3],
            [
                "Error from API",
                "The VM could not be restored",
                "Cannot restore VM"
            ],
            "{url}"
        );
        let all = lines.join("\n");
        for w in wanted {
            assert!(all.contains(w), "{url}: {w:?} not in {lines:?}");
        }
        assert_eq!(
            b.curl("GET", "vm.info", None).0,
            404,
            "{url}: a VM was left"
        );
    }
    // Memory configurations a mode cannot serve: an error naming both, not a fallback.
    for (name, key, mode, why) in [
        (
            "cow-shared",
            "shared",
            "CopyOnWrite",
            "memory_restore_mode=copyonwrite cannot serve shared=on memory",
        ),
        (
            "cow-hugepages",
            "hugepages",
            "CopyOnWrite",
            "memory_restore_mode=copyonwrite cannot serve hugepages=on memory",
        ),
        (
            "ondemand-hugepages",
            "hugepages",
            "OnDemand",
            "memory_restore_mode=ondemand cannot serve hugepages=on memory",
        ),
    ] {
        let url = bad(name, &|d| {
            edit_json(&d.join("config.json"), |v| v["memory"][key] = true.into())
        });
        let body = json!({ "source_url": url, "memory_restore_mode": mode }).to_string();
        let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
        assert_eq!(status, 500, "{name}: {text}");
        let lines = error_lines(&text);
        assert!(
            lines.iter().any(|l| l.starts_with(why)),
            "{name}: {lines:?}"
        );
        assert_eq!(
            b.curl("GET", "vm.info", None).0,
            404,
            "{name}: a VM was left"
        );
    }
    // Refused before anything is read.
    let body = json!({"source_url": url, "memory_restore_mode": "OnDemand", "prefault": true});
    assert_eq!(b.curl("PUT", "vm.restore", Some(&body.to_string())).0, 400);
    // The same VMM restores a good one.
    let body = json!({ "source_url": url, "resume": true }).to_string();
    assert_eq!(b.curl("PUT", "vm.restore", Some(&body)).0, 204);
    assert_eq!(b.state(), "Running");
    shutdown(b);

    // The command line: one line, exit code 1.
    let missing = format!("source_url=file://{}/missing", snap.display());
    let run = common::run(&["--restore", &missing]);
    assert_eq!(run.code(), Some(1), "{}", run.stderr);
    let err: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(err.len(), 1, "{}", run.stderr);
    assert!(
        err[0].contains("Destination is not a directory"),
        "{}",
        run.stderr
    );
}

/// A TAP opened here (in this thread's network namespace), as a caller of the VMM opens one to
/// hand it over: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, named `name`.
pub(crate) fn open_tap(name: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    // SAFETY: ifreq is plain data; all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF on our descriptor with our ifreq.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    f
}

/// `cmd` with `fd` as its descriptor 3.
pub(crate) fn with_fd3(cmd: &mut std::process::Command, fd: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only dup2 between fork and exec (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The TAP interfaces a process has open (`iff:` of each descriptor's fdinfo).
pub(crate) fn taps_of(pid: i32) -> Vec<String> {
    let mut taps = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
    {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("iff:")) {
            taps.push(l["iff:".len()..].trim().to_string());
        }
    }
    taps.sort();
    taps.dedup();
    taps
}

/// A net device backed by a TAP the caller opened (`--net fd=3`), snapshotted and restored as
/// two clones at once, each given a TAP of its own (`--restore ...,net_fds=[_net0@[3]]`, and
/// `ch-remote restore` sending the descriptor over the API socket, as the original's): both
/// run on, each attached to its own TAP only.
#[test]
fn clones_get_their_own_taps_through_net_fds() {
    std::thread::spawn(|| {
        // SAFETY: unshare only moves this thread into a new network namespace (and the VMMs
        // it starts with it): the TAPs stay private to the test.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
        clones_with_taps();
    })
    .join()
    .unwrap();
}

fn clones_with_taps() {
    let dir = common::scratch("restore-net-fds");
    let kernel = common::guest().elf_pvh.display().to_string();
    let sock = dir.join("a.sock");
    let tap_a = open_tap("snaptap0");
    let mut cmd = std::process::Command::new(common::VMM);
    cmd.args(["--api-socket", &format!("path={}", sock.display())])
        .args(["--kernel", &kernel, "--cmdline", "test=busy"])
        .args(["--memory", "size=256M", "--cpus", "boot=1"])
        .args(["--serial", "tty", "--console", "off"])
        .args(["--net", "fd=3,mac=12:34:56:78:9a:bc"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    with_fd3(&mut cmd, tap_a.as_raw_fd());
    let a = cmd.spawn().unwrap();
    let mut a = Vmm {
        child: Some(a),
        dir: dir.clone(),
        sock,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.curl("GET", "vmm.ping", None).0 != 200 {
        assert!(Instant::now() < deadline, "the VMM did not come up");
        assert!(
            a.child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten()
                .is_none(),
            "the VMM ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(taps_of(a.pid()), ["snaptap0"]);
    let info = a.ok_json("vm.info");
    assert_eq!(info["config"]["net"][0]["fds"], json!([3]));
    assert_eq!(a.put("vm.pause").0, 204);
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    assert_eq!(a.curl("PUT", "vm.snapshot", Some(&body)).0, 204);
    shutdown(a);

    // Without new descriptors the snapshot's net device cannot come back.
    let run = common::run(&["--restore", &format!("source_url={url}")]);
    assert_eq!(run.code(), Some(1));
    assert!(run.stderr.contains("net_fds"), "{}", run.stderr);

    // Clone 1: --restore with an inherited descriptor.
    let tap_b = open_tap("clonetap1");
    let mut cmd = std::process::Command::new(common::VMM);
    let sock_b = dir.join("b.sock");
    cmd.args(["--api-socket", &format!("path={}", sock_b.display())])
        .args([
            "--restore",
            &format!("source_url={url},net_fds=[_net0@[3]],resume=on"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    with_fd3(&mut cmd, tap_b.as_raw_fd());
    let mut b = Vmm {
        child: Some(cmd.spawn().unwrap()),
        dir: dir.clone(),
        sock: sock_b,
    };
    // Clone 2: an empty VMM, and ch-remote sending its descriptor with the request.
    let c = Vmm::start("restore-net-fds-c", &[]);
    let tap_c = open_tap("clonetap2");
    let mut cmd = std::process::Command::new(ch_remote_bin());
    cmd.arg("--api-socket").arg(&c.sock).args([
        "restore",
        &format!("source_url={url},net_fds=[_net0@[3]],resume=on"),
    ]);
    with_fd3(&mut cmd, tap_c.as_raw_fd());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut text = String::new();
    let n = clone_rounds(&mut b, 0, &mut text)[0].n;
    let lines = clone_rounds(&mut b, n + 5, &mut text);
    assert!(lines.iter().all(|l| l.mem == "ok"), "{text}");
    assert_eq!(c.state(), "Running");
    assert_eq!(taps_of(b.pid()), ["clonetap1"]);
    assert_eq!(taps_of(c.pid()), ["clonetap2"]);
    // The restored configuration names the new descriptor.
    let info = c.ok_json("vm.info");
    assert_eq!(
        info["config"]["net"][0]["fds"].as_array().map(Vec::len),
        Some(1)
    );
    shutdown(b);
    shutdown(c);
}

/// A snapshot an earlier build wrote names the hotplug region's virtio-mem device
/// `__virtio_mem`; this build names it `mem0` (the original's name) and restores it so.
#[test]
fn a_snapshot_naming_the_old_virtio_mem_id_restores() {
    require_curl();
    let a = Vmm::start("restore-old-id-a", &[]);
    let serial = a.dir.join("serial.out");
    let mut config = busy_config(Some(&serial), None);
    config["memory"] = json!({
        "size": 256u64 << 20, "hotplug_method": "VirtioMem", "hotplug_size": 128u64 << 20
    });
    let (url, before, _) = busy_snapshot(&a, &config, Some(&serial));
    shutdown(a);
    let state = PathBuf::from(url.strip_prefix("file://").unwrap()).join("state.json");
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains("\"id\":\"mem0\""), "{text:.300}");
    std::fs::write(
        &state,
        text.replace("\"id\":\"mem0\"", "\"id\":\"__virtio_mem\""),
    )
    .unwrap();

    let b = Vmm::start("restore-old-id-b", &[]);
    let body = json!({ "source_url": url }).to_string();
    let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
    assert_eq!((status, text.as_str()), (204, ""));
    let info = b.ok_json("vm.info");
    assert!(info["device_tree"]["mem0"].is_object(), "{info}");
    assert_eq!(b.put("vm.resume").0, 204);
    goes_on(&serial, &before);
    shutdown(b);
}
