//! `--landlock` and `--landlock-rules` on the command line: the option's errors, and the test
//! guest's virtio-blk scenario passing with the VMM confined to what its configuration names.
//! Hotplug and snapshots outside the allowed paths are in `tests/api/landlock.rs`.

mod common;

use std::path::Path;

use common::{guest, run, scratch};

const SECTORS: usize = 16;

/// Sector `s` of disk 0 as the host writes it and as the guest rewrites it (the `blk`
/// scenario's patterns, docs/test-guest.md).
fn host_byte(s: usize) -> u8 {
    (s as u8).wrapping_mul(3).wrapping_add(1)
}
fn guest_byte(s: usize) -> u8 {
    (s as u8).wrapping_mul(5).wrapping_add(0x80)
}

fn make_disk(path: &Path) {
    let mut img = vec![0u8; 1 << 20];
    for s in 0..SECTORS {
        img[s * 512..][..512].fill(host_byte(s));
    }
    std::fs::write(path, img).unwrap();
}

fn kernel() -> String {
    guest().elf_pvh.display().to_string()
}

#[test]
fn bad_rules_are_refused_naming_the_option_and_value() {
    let k = kernel();
    for (rule, why) in [
        ("path=/tmp,access=x", "access=x: must be r, w or rw"),
        ("path=/tmp,access=rwx", "access=rwx: must be r, w or rw"),
        ("path=/tmp", "path= and access= are both required"),
        ("access=rw", "path= and access= are both required"),
        ("path=/no/such/landlock/dir,access=r", "No such file"),
    ] {
        let r = run(&["--kernel", &k, "--landlock", "--landlock-rules", rule]);
        assert_eq!(r.code(), Some(1), "{rule}: {}", r.stderr);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{rule}: {}", r.stderr);
        assert!(
            lines[0].starts_with(&format!("cloud-hypervisor: --landlock-rules {rule}: ")),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(why), "{rule}: {}", lines[0]);
    }
}

/// The `blk` scenario reads and rewrites the disk with the VMM confined; the serial port's file
/// (created before Landlock applies) gets the guest's output.
#[test]
fn blk_guest_passes_under_landlock() {
    let dir = scratch("landlock-blk");
    let img = dir.join("disk.img");
    make_disk(&img);
    let serial = dir.join("serial.out");
    let disk = format!("path={},serial=serial0", img.display());
    let serial_arg = format!("file={}", serial.display());
    let cmdline = format!("test=blk blk_disks=1 blk_sectors={SECTORS}");
    let k = kernel();
    let r = run(&[
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--memory",
        "size=256M",
        "--serial",
        &serial_arg,
        "--console",
        "off",
        "--disk",
        &disk,
        "--landlock",
        "-v",
    ]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("landlock: enforced"),
        "no 'landlock: enforced' in the log:\n{}",
        r.stderr
    );
    let out = std::fs::read_to_string(&serial).unwrap();
    for c in ["read", "write", "flush", "read-back", "get-id"] {
        assert!(out.contains(&format!("PASS blk0-{c}")), "{c}:\n{out}");
    }
    assert!(out.contains(" failed=0"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("FAIL")), "{out}");
    let bytes = std::fs::read(&img).unwrap();
    for s in 0..SECTORS {
        assert!(
            bytes[s * 512..][..512].iter().all(|&b| b == guest_byte(s)),
            "sector {s} not rewritten by the guest"
        );
    }
}

/// Without `--landlock` the rules are checked and then do nothing, as the original: the guest
/// boots, and the VMM says so.
#[test]
fn rules_without_landlock_warn_and_do_nothing() {
    let dir = scratch("landlock-rules-only");
    let rule = format!("path={},access=r", dir.display());
    let k = kernel();
    let r = run(&[
        "--kernel",
        &k,
        "--cmdline",
        "test=boot",
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
        "--landlock-rules",
        &rule,
    ]);
    r.assert_guest_passed();
    assert!(
        r.stderr
            .contains("--landlock-rules has no effect without --landlock"),
        "{}",
        r.stderr
    );
}

/// A qcow2 overlay whose backing file is in another directory: the VMM, confined, still reads
/// the backing file (its disks' backing chains are allowed read-only) and the guest passes.
#[test]
fn qcow2_overlay_with_a_backing_file_elsewhere_works_under_landlock() {
    let dir = scratch("landlock-overlay");
    std::fs::create_dir_all(dir.join("base")).unwrap();
    std::fs::create_dir_all(dir.join("vm")).unwrap();
    let base = dir.join("base/base.raw");
    make_disk(&base);
    let overlay = dir.join("vm/overlay.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&overlay)
        .output()
        .expect("qemu-img (Debian's qemu-utils) is needed");
    assert!(out.status.success(), "{:?}", out);
    let disk = format!("path={},backing_files=on,serial=serial0", overlay.display());
    let cmdline = format!("test=blk blk_disks=1 blk_sectors={SECTORS}");
    let k = kernel();
    let r = run(&[
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
        "--disk",
        &disk,
        "--landlock",
    ]);
    r.assert_guest_passed();
    for c in ["read", "write", "read-back"] {
        r.assert_passed(&format!("blk0-{c}"));
    }
    // The guest's writes went to the overlay; the backing file is as the host wrote it.
    let bytes = std::fs::read(&base).unwrap();
    assert!(bytes[..512].iter().all(|&b| b == host_byte(0)));
}
