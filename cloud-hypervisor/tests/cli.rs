//! Bad user input: one line naming the option and the value, exit code 1, no panic.

mod common;

use common::{guest, run};

fn assert_rejected(args: &[&str], expect: &[&str]) {
    let r = run(args);
    assert_eq!(r.code(), Some(1), "{args:?}: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want one line, got:\n{}",
        r.stderr
    );
    for e in expect {
        assert!(
            lines[0].contains(e),
            "{args:?}: '{e}' not in '{}'",
            lines[0]
        );
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
}

#[test]
fn missing_and_unreadable_kernels() {
    assert_rejected(
        &["--kernel", "/nonexistent/vmlinux"],
        &["--kernel", "/nonexistent/vmlinux"],
    );
    let dir = common::scratch("unreadable");
    let k = dir.join("dir-not-file");
    std::fs::create_dir(&k).unwrap();
    assert_rejected(
        &["--kernel", k.to_str().unwrap()],
        &["--kernel", "dir-not-file"],
    );
    assert_rejected(&[], &["--kernel"]);
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let dir = common::scratch("notkernel");
    let k = dir.join("garbage");
    std::fs::write(&k, vec![0x42u8; 8192]).unwrap();
    assert_rejected(
        &["--kernel", k.to_str().unwrap()],
        &["--kernel", "neither an ELF nor a bzImage"],
    );
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_rejected(
        &["--kernel", empty.to_str().unwrap()],
        &["--kernel", "neither"],
    );
}

#[test]
fn bad_firmware_files_and_firmware_with_a_kernel() {
    assert_rejected(
        &["--firmware", "/nonexistent/fw.elf"],
        &["--firmware /nonexistent/fw.elf", "cannot open"],
    );
    let dir = common::scratch("badfw");
    let fw = dir.join("garbage-fw");
    std::fs::write(&fw, vec![0x5au8; 4096]).unwrap();
    let fw = fw.to_str().unwrap();
    assert_rejected(
        &["--firmware", fw],
        &[&format!("--firmware {fw}"), "neither an ELF nor a bzImage"],
    );
    let k = guest().elf_pvh.to_str().unwrap();
    assert_rejected(
        &["--firmware", k, "--kernel", k],
        &[
            "--firmware",
            "specifying a kernel is not supported when a firmware is provided",
        ],
    );
}

#[test]
fn bad_cpu_counts() {
    let k = guest().elf_pvh.to_str().unwrap();
    assert_rejected(
        &["--kernel", k, "--cpus", "boot=0"],
        &["--cpus boot=0", "at least 1"],
    );
    assert_rejected(
        &["--kernel", k, "--cpus", "boot=4,max=2"],
        &["--cpus boot=4,max=2", "must not exceed"],
    );
    assert_rejected(
        &["--kernel", k, "--cpus", "boot=2,topology=1:1:1:1"],
        &["--cpus", "topology"],
    );
    assert_rejected(
        &["--kernel", k, "--cpus", "boot=many"],
        &["--cpus boot=many", "number"],
    );
}

#[test]
fn memory_too_small_and_malformed_sizes() {
    let k = guest().elf_pvh.to_str().unwrap();
    assert_rejected(
        &["--kernel", k, "--memory", "size=1M"],
        &["--kernel", "does not fit"],
    );
    assert_rejected(
        &["--kernel", k, "--memory", "size=12Q"],
        &["--memory size=12Q", "invalid size '12Q'"],
    );
    assert_rejected(&["--kernel", k, "--memory", "size=0"], &["--memory size=0"]);
    assert_rejected(
        &["--kernel", k, "--memory", "size=1000"],
        &["--memory size=1000", "4 KiB"],
    );
}

#[test]
fn unknown_keys_and_options() {
    let k = guest().elf_pvh.to_str().unwrap();
    assert_rejected(
        &["--kernel", k, "--memory", "size=1G,colour=blue"],
        &["--memory", "unknown key 'colour'"],
    );
    assert_rejected(
        &["--kernel", k, "--cpus", "boot=1,turbo=on"],
        &["--cpus", "unknown key 'turbo'"],
    );
    assert_rejected(&["--kernel", k, "--frobnicate"], &["--frobnicate"]);
    assert_rejected(&["--kernel", k, "--serial", "loud"], &["--serial loud"]);
    assert_rejected(
        &["--kernel", k, "--memory", "size=1G,shared=perhaps"],
        &["--memory", "shared"],
    );
}

#[test]
fn conflicting_and_unsupported_options() {
    let k = guest().elf_pvh.to_str().unwrap();
    assert_rejected(
        &["--kernel", k, "--serial", "tty", "--console", "tty"],
        &["--serial", "tty"],
    );
    assert_rejected(
        &["--kernel", k, "--vdpa", "path=/dev/vhost-vdpa-0"],
        &["--vdpa path=/dev/vhost-vdpa-0", "not supported yet"],
    );
    assert_rejected(
        &["--kernel", k, "--net", "tap=t0,num_queues=3"],
        &["--net", "even number"],
    );
    assert_rejected(
        &["--kernel", k, "--net", "ip=1.2.3"],
        &["--net ip=1.2.3", "not an IP address"],
    );
    assert_rejected(
        &["--kernel", k, "--disk", "path=/nonexistent/x.img"],
        &["--disk /nonexistent/x.img", "No such file"],
    );
    let on_segment_1 = format!("path={k},pci_segment=1");
    assert_rejected(
        &["--kernel", k, "--disk", &on_segment_1],
        &["--disk pci_segment=1", "the VM has 1 PCI segment(s)"],
    );
    assert_rejected(
        &["--kernel", k, "--platform", "num_pci_segments=97"],
        &["--platform", "num_pci_segments=97: must be 1-96"],
    );
    assert_rejected(
        &["--kernel", k, "--pci-segment", "pci_segment=2"],
        &["--pci-segment pci_segment=2", "the VM has 1 PCI segment(s)"],
    );
    // The largest weight leaves the other segment less than 4 KiB of the 32-bit window.
    assert_rejected(
        &[
            "--kernel",
            k,
            "--platform",
            "num_pci_segments=2",
            "--pci-segment",
            "pci_segment=1,mmio32_aperture_weight=4294967295",
        ],
        &[
            "--platform num_pci_segments=2",
            "too little of the 32-bit MMIO window",
        ],
    );
    assert_rejected(
        &["--kernel", k, "--rng", "src=/nonexistent/rng"],
        &["--rng /nonexistent/rng", "cannot open"],
    );
    assert_rejected(
        &[
            "--kernel",
            k,
            "--memory",
            "size=1G,hugepages=on,hugepage_size=1G",
        ],
        &["--memory hugepages=on"],
    );
    assert_rejected(
        &["--kernel", k, "--initramfs", "/nonexistent.img"],
        &["--initramfs", "/nonexistent.img"],
    );
    let long = "x".repeat(5000);
    assert_rejected(
        &["--kernel", k, "--cmdline", &long],
        &["--cmdline", "at most"],
    );
}

#[test]
fn help_and_version_have_the_original_shape() {
    let r = run(&["--version"]);
    assert_eq!(r.code(), Some(0));
    assert!(r.stdout.starts_with("cloud-hypervisor v"), "{}", r.stdout);
    assert_eq!(run(&["-V"]).stdout, r.stdout);
    // The original's help word for word (the reference text beside this file was taken from
    // the original's binary): every option, its syntax and its default.
    let r = run(&["--help"]);
    assert_eq!(r.code(), Some(0));
    let reference = include_str!("cloud-hypervisor-help.txt");
    for (i, (ours, theirs)) in r.stdout.lines().zip(reference.lines()).enumerate() {
        assert_eq!(ours, theirs, "--help line {}", i + 1);
    }
    assert_eq!(r.stdout.lines().count(), reference.lines().count());
    // An option of the original this VMM does not implement is named, not taken.
    let r = run(&["--kernel", "/k", "--vdpa", "path=/dev/vhost-vdpa-0"]);
    assert_eq!(r.code(), Some(1));
    assert_eq!(
        r.stderr.trim(),
        "cloud-hypervisor: --vdpa path=/dev/vhost-vdpa-0: this option is not supported yet"
    );
}

#[test]
fn verbose_logging_goes_to_the_log_file() {
    let dir = common::scratch("logfile");
    let log = dir.join("vmm.log");
    let k = guest().elf_pvh.to_str().unwrap();
    let r = run(&[
        "-v",
        "--log-file",
        log.to_str().unwrap(),
        "--kernel",
        k,
        "--cmdline",
        "test=boot",
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("INFO:") && text.contains("guest powered off"),
        "{text}"
    );
    assert!(
        text.lines().all(|l| l.starts_with("cloud-hypervisor: ")),
        "{text}"
    );
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    // Without -v only warnings and errors are logged.
    let quiet = dir.join("quiet.log");
    let r = run(&[
        "--log-file",
        quiet.to_str().unwrap(),
        "--kernel",
        k,
        "--cmdline",
        "test=boot",
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), Some(0));
    // (A kernel without core scheduling gets its warning, as with the original.)
    let quiet = std::fs::read_to_string(&quiet).unwrap();
    assert!(
        quiet
            .lines()
            .all(|l| l.contains(" WARN:") || l.contains(" ERROR:")),
        "{quiet}"
    );
    assert!(!quiet.contains("INFO:"), "{quiet}");
    let r = run(&["--log-file", "/nonexistent-dir/x.log", "--kernel", k]);
    assert_eq!(r.code(), Some(1));
    assert!(
        r.stderr.contains("--log-file /nonexistent-dir/x.log"),
        "{}",
        r.stderr
    );
}

/// `--restore`: its syntax and what this VMM cannot restore are refused in one line naming
/// the whole value; without --kernel/--firmware the VM's options come from the snapshot, so
/// one given is refused (the original's command line refuses it too).
#[test]
fn restore_errors() {
    for (value, why) in [
        ("prefault=on", "source_url missing"),
        ("source_url=file:///s,bogus=1", "unknown key 'bogus'"),
        (
            "source_url=file:///s,memory_restore_mode=lazy",
            "memory_restore_mode=lazy",
        ),
        (
            "source_url=file:///s,net_fds=net0@3",
            "not a list in brackets",
        ),
        (
            "source_url=tcp://1.2.3.4/s",
            "Could not extract path from URL: tcp://1.2.3.4/s",
        ),
        (
            "source_url=file:///s,prefault=on,memory_restore_mode=ondemand",
            "'prefault' cannot be combined with 'memory_restore_mode=ondemand'",
        ),
        ("source_url=file:///s,vfio_fds=[v0@5]", "VFIO"),
        ("source_url=file:///s,iommufd_fd=5", "VFIO"),
        (
            "source_url=file:///s,zone_updates=[z0@0,z0@1]",
            "multiple updates for the same zone defined (z0)",
        ),
    ] {
        assert_rejected(
            &["--restore", value],
            &[&format!("--restore {value}: "), why],
        );
    }
    for (opt, value) in [
        ("--cpus", "boot=2"),
        ("--serial", "tty"),
        ("--disk", "path=/x"),
    ] {
        assert_rejected(
            &["--restore", "source_url=file:///s", opt, value],
            &[
                "--restore source_url=file:///s",
                &format!("{opt} needs --kernel or --firmware"),
            ],
        );
    }
}

/// `--memory-zone` and `--numa`: bad values, and zones that cannot be built, are one line
/// naming the option and the value, exit 1 (at parse time, or when the zone is mapped).
#[test]
fn memory_zone_and_numa_errors() {
    let kernel = guest().elf_pvh.display().to_string();
    let dir = common::scratch("memory-zone-errors");
    let short = dir.join("short");
    std::fs::write(&short, [0u8; 4096]).unwrap();
    let short_zone = format!("id=f,size=4M,file={}", short.display());
    for (args, expect) in [
        (
            vec!["--memory", "size=0", "--memory-zone", "size=64M"],
            vec!["--memory-zone size=64M: ", "id is missing"],
        ),
        (
            vec!["--memory", "size=1G", "--memory-zone", "id=a,size=64M"],
            vec!["--memory-zone id=a,size=64M: ", "needs --memory size=0"],
        ),
        (
            vec!["--memory", "size=0"],
            vec!["--memory size=0: ", "only with --memory-zone"],
        ),
        (
            vec![
                "--memory",
                "size=0",
                "--memory-zone",
                "id=a,size=64M,bogus=1",
            ],
            vec![
                "--memory-zone id=a,size=64M,bogus=1: ",
                "unknown key 'bogus'",
            ],
        ),
        (
            vec![
                "--memory",
                "size=0",
                "--memory-zone",
                "id=a,size=64M",
                "--memory-zone",
                "id=a,size=32M",
            ],
            vec!["--memory-zone id=a,size=32M: ", "used twice"],
        ),
        (
            vec![
                "--memory",
                "size=0",
                "--memory-zone",
                "id=a,size=64M,hotplug_size=128M",
            ],
            vec![
                "--memory-zone id=a,size=64M,hotplug_size=128M: ",
                "hotplug_method=virtio-mem",
            ],
        ),
        (
            vec![
                "--memory",
                "size=0",
                "--memory-zone",
                "id=a,size=64M,host_numa_node=63",
            ],
            vec!["--memory-zone id=a host_numa_node=63: ", "no NUMA node 63"],
        ),
        (
            vec!["--memory", "size=0", "--memory-zone", &short_zone],
            vec!["--memory-zone id=f file=", "holds 4096 bytes"],
        ),
        (
            vec![
                "--memory",
                "size=0",
                "--memory-zone",
                "id=a,size=64M",
                "--numa",
                "guest_numa_id=0,memory_zones=[b]",
            ],
            vec!["--numa guest_numa_id=0: ", "no --memory-zone has the id b"],
        ),
        (
            vec!["--numa", "guest_numa_id=0,cpus=[0],pci_segments=[1]"],
            vec![
                "--numa guest_numa_id=0: ",
                "pci_segments: segment 1: the VM has 1 PCI segment(s)",
            ],
        ),
        // A generic initiator of a device the VM lacks: found out once the devices are placed.
        (
            vec![
                "--numa",
                "guest_numa_id=0,cpus=[0]",
                "--numa",
                "guest_numa_id=1,device_id=nope",
            ],
            vec!["--numa guest_numa_id=1: device_id=nope: no PCI device of the VM has this id"],
        ),
        (
            vec!["--numa", "guest_numa_id=1,device_id=gpu0,cpus=[0]"],
            vec![
                "--numa guest_numa_id=1,device_id=gpu0,cpus=[0]: ",
                "mutually exclusive",
            ],
        ),
    ] {
        let mut all = vec!["--kernel", kernel.as_str()];
        all.extend(args);
        assert_rejected(&all, &expect);
    }
}

/// `--log-format`: the original's tokens; an unknown one is refused naming it.
#[test]
fn log_format_tokens_and_refusals() {
    let k = guest().elf_pvh.to_str().unwrap();
    let r = run(&[
        "-v",
        "--log-format",
        "{levelchar}|{thread}|{{{pid}}}|{msg}",
        "--kernel",
        k,
        "--cmdline",
        "test=boot",
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let pid_field = r
        .stderr
        .lines()
        .find(|l| l.starts_with("I|main|{"))
        .unwrap_or_else(|| panic!("no 'I|main|{{pid}}|' line:\n{}", r.stderr));
    let pid = pid_field.split('|').nth(2).unwrap();
    assert!(
        pid.starts_with('{') && pid.ends_with('}') && pid[1..pid.len() - 1].parse::<u32>().is_ok(),
        "{pid_field}"
    );
    for (format, says) in [
        ("{nope}", "unknown token '{nope}'"),
        ("{msg", "'{msg' has no closing '}'"),
    ] {
        let r = run(&["--log-format", format, "--kernel", k]);
        assert_eq!(r.code(), Some(1), "{format}");
        assert_eq!(
            r.stderr.trim(),
            format!("cloud-hypervisor: --log-format {format}: {says}")
        );
    }
}
