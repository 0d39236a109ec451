//! `vm.resize-disk` (and `ch-remote resize-disk`) on a running guest (`test=blk-resize`): the
//! disk grows under its driver, which sees the new capacity and configuration generation and
//! writes the new last sector into the image; the original's answers for what cannot be done.

use std::process::Command;

use crate::common;
use crate::helpers::*;

#[test]
fn a_disk_grows_under_its_running_driver() {
    require_curl();
    let dir = common::scratch("api-resize-disk-files");
    let (img, qcow, vhd, serial) = (
        dir.join("disk.raw"),
        dir.join("disk.qcow2"),
        dir.join("disk.vhd"),
        dir.join("serial.out"),
    );
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qemu_img = |args: &[&str]| {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    qemu_img(&["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        vhd.to_str().unwrap(),
        "1M",
    ]);
    let kernel = common::guest().elf_pvh.display().to_string();
    let (disk, disk2, disk3, serial_arg) = (
        format!("path={},id=disk0", img.display()),
        format!("path={},id=q0", qcow.display()),
        format!("path={},id=v0", vhd.display()),
        format!("file={}", serial.display()),
    );
    let mut vmm = Vmm::start(
        "api-resize-disk",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=blk-resize",
            "--disk",
            &disk,
            &disk2,
            &disk3,
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    wait_for(&serial, "BLKRESIZE waiting capacity=2048", 1);
    let body = |id: &str, size: u64| format!(r#"{{"id": "{id}", "desired_size": {size}}}"#);
    // What cannot be done: changes nothing.
    for (b, status, why) in [
        (body("nothing", 4 << 20), 404, "Unknown device id: nothing"),
        (body("disk0", 1000), 500, "multiple of 512"),
        (body("q0", 512 << 10), 500, "a qcow2 image only grows"),
        (body("v0", 4 << 20), 500, "a vhd image cannot be resized"),
        (body("_rng", 4 << 20), 404, "Unknown device id"),
        (body("__rng", 4 << 20), 500, "this device cannot be resized"),
    ] {
        let (got, text) = vmm.curl("PUT", "vm.resize-disk", Some(&b));
        assert_eq!(got, status, "{b}: {text}");
        assert!(text.contains(why), "{b}: {text}");
        assert!(
            text.contains("The disk could not be resized"),
            "{b}: {text}"
        );
    }
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    // A qcow2 image grows (qemu-img sees it).
    assert_eq!(
        vmm.curl("PUT", "vm.resize-disk", Some(&body("q0", 2 << 20)))
            .0,
        204
    );
    let info = qemu_img(&["info", "-U", qcow.to_str().unwrap()]);
    assert!(info.contains("virtual size: 2 MiB"), "{info}");
    // The original's ch-remote syntax: 1 MiB to 4 MiB.
    ch_remote_ok(&vmm, &["resize-disk", "--disk", "disk0", "--size", "4M"]);
    let run = vmm.wait();
    let text = serial_text(&serial);
    assert!(run.status.success(), "{text}\n{}", run.stderr);
    assert_no_fail(&serial);
    common::assert_blk_grew_to_4m(&text, &img);
}
