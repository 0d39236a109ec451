//! `--seccomp`: every thread of a running VMM is confined by a filter of its own (mode `true`,
//! the default), none with `--seccomp false`. What each filter refuses is proven per thread
//! kind by the unit tests beside the filters (`vmm::seccomp_filters`,
//! `virtio_devices::worker_seccomp`); the rest of this suite runs confined, which proves the
//! lists are complete for what it does.

use std::time::{Duration, Instant};

use crate::common;
use crate::helpers::Vmm;

/// (thread name, Seccomp mode, number of filters) of every thread of `pid`.
fn threads(pid: i32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

/// A running VM with two vCPUs, a disk, the rng and the console: the VMM's usual threads.
fn start(name: &str, extra: &[&str]) -> Vmm {
    let kernel = common::guest().elf_pvh.display().to_string();
    let dir = common::scratch(&format!("{name}-img"));
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", img.display());
    let mut args = vec![
        "--kernel",
        &kernel,
        "--cmdline",
        "test=busy",
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M",
        "--disk",
        &disk,
        "--serial",
        "null",
        "--console",
        "off",
    ];
    args.extend_from_slice(extra);
    let vmm = Vmm::start(name, &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    // The workers start when the guest's drivers do: wait for the disk's.
    while !threads(vmm.pid()).iter().any(|t| t.0 == "virtio-blk") {
        assert!(
            Instant::now() < deadline,
            "no virtio-blk worker: {:?}",
            threads(vmm.pid())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vmm
}

#[test]
fn every_thread_is_confined_by_default() {
    let vmm = start("seccomp-on", &[]);
    let threads = threads(vmm.pid());
    for kind in ["cloud-hyperviso", "spawner", "vcpu0", "vcpu1", "virtio-blk"] {
        assert!(
            threads.iter().any(|t| t.0 == kind),
            "no thread {kind}: {threads:?}"
        );
    }
    // KVM's own workers (kvm-nx-lpage-recovery) are kernel threads in the VMM's process that
    // never run its code; they inherit whichever thread created them.
    for (name, mode, filters) in threads.iter().filter(|t| !t.0.starts_with("kvm")) {
        assert_eq!(*mode, 2, "thread {name} is not confined: {threads:?}");
        // The main thread and the spawner have one filter; the others the spawner's and
        // theirs, which is two for threads that may not open files (the second makes glibc's
        // stray open fail quietly: seccomp/src/base.rs).
        let want = if name == "cloud-hyperviso" || name == "spawner" {
            1
        } else {
            3
        };
        assert_eq!(*filters, want, "thread {name}: {threads:?}");
    }
    assert_eq!(vmm.state(), "Running");
}

#[test]
fn seccomp_false_installs_nothing() {
    let vmm = start("seccomp-off", &["--seccomp", "false"]);
    let threads = threads(vmm.pid());
    assert!(!threads.iter().any(|t| t.0 == "spawner"), "{threads:?}");
    for (name, mode, _) in &threads {
        assert_eq!(*mode, 0, "thread {name} is confined: {threads:?}");
    }
    assert_eq!(vmm.state(), "Running");
}

#[test]
fn a_bad_seccomp_value_is_refused() {
    let out = std::process::Command::new(common::VMM)
        .args(["--seccomp", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--seccomp") && err.contains("maybe"), "{err}");
}
