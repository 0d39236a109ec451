//! `--generic-vhost-user device_type=block` (and `vm.add-generic-vhost-user`) in front of our
//! `vhost_user_block` backend: the VMM knows nothing of a block device here, so the guest's
//! virtio-blk driver (`virtio-drivers`) sees the backend's features and reads the backend's
//! configuration space through GET_CONFIG; it reads and writes the image byte for byte. The
//! device pauses, snapshots and restores as a vhost-user-blk disk does, and is hot-added and
//! removed as the original's.

use super::*;

/// `--generic-vhost-user`'s value for our backend on `sock`, queues of the given sizes.
fn option(sock: &Path, sizes: &str) -> String {
    format!(
        "device_type=block,socket={},queue_sizes=[{sizes}]",
        sock.display()
    )
}

/// The `blk` scenario through one queue and through the last of two: capacity, serial (GET_ID),
/// flush and the read-only flag are the backend's; the image holds the guest's writes.
#[test]
fn generic_block_device_through_our_backend() {
    for (queues, sizes) in [(1u16, "256"), (2, "256,128")] {
        let fx = BlkFixture::new(&format!("gvu-raw{queues}"), "disk.raw");
        std::fs::write(&fx.img, host_image()).unwrap();
        let _b = fx.backend(&format!(",num_queues={queues}"));
        let cmdline = format!(
            "test=blk blk_disks=1 blk_sectors={SECTORS} blk_id={}",
            serial_of(&fx.img)
        );
        let r = common::boot(
            &guest().elf_pvh,
            &cmdline,
            &[
                "-v",
                "--memory",
                "size=256M,shared=on",
                "--cpus",
                "boot=2",
                "--generic-vhost-user",
                &option(&fx.sock, sizes),
            ],
        );
        assert_blk_passed(&r, queues);
        check_written(&std::fs::read(&fx.img).unwrap(), queues);
        assert!(
            r.stderr
                .contains("generic vhost-user device, type block with"),
            "{}",
            r.stderr
        );
    }
}

/// What the command line refuses, each in one line naming the option, exit code 1: guest RAM
/// the backend cannot map, a type that cannot be a backend, a socket nobody listens on.
#[test]
fn generic_device_refusals() {
    let fx = BlkFixture::new("gvu-refuse", "disk.raw");
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let absent = option(&fx.sock, "256");
    for (args, want) in [
        (
            vec!["--memory", "size=256M", "--generic-vhost-user", &absent],
            "--generic-vhost-user needs --memory shared=on",
        ),
        (
            vec![
                "--memory",
                "size=256M,shared=on",
                "--generic-vhost-user",
                "device_type=watchdog,socket=/s,queue_sizes=[2]",
            ],
            "cannot be a vhost-user backend",
        ),
        (
            vec![
                "--memory",
                "size=256M,shared=on",
                "--generic-vhost-user",
                &absent,
            ],
            "cannot connect to",
        ),
    ] {
        let mut all = vec!["--kernel", &k];
        all.extend(args);
        let r = common::run(&all);
        assert_eq!(r.code(), Some(1), "{all:?}: {}", r.stderr);
        let line = r.stderr.trim();
        assert!(
            line.lines().count() == 1
                && line.contains("--generic-vhost-user")
                && line.contains(want),
            "{all:?}: {line}"
        );
    }
}

/// Pause and snapshot under guest I/O (`blkfault`), then the VMM and its backend gone; a fresh
/// backend and a new VMM restoring the snapshot: the rings are handed back at the saved bases
/// and every write completes, byte for byte.
#[test]
fn generic_device_snapshot_restored_in_a_new_vmm() {
    const BLOCKS: u64 = 800;
    let fx = BlkFixture::zeroed("gvu-restore");
    let snap = fx.dir.join("snap");
    let mut b = fx.backend("");
    let cmdline = format!("test=blkfault blkfault_chunk=8 blkfault_blocks={BLOCKS}");
    let dev = option(&fx.sock, "256");
    let mut child = fx.spawn_vmm(true, &cmdline, ["--generic-vhost-user", &dev], true);
    wait_flushed(&fx.serial, 200);
    let t = pause_and_snapshot_device(&fx.api, &snap, "_generic_vhost_user0", "generic-vhost-user");
    let base = t["queues"][0]["next_avail"].clone();
    assert!(base.as_u64().unwrap() > 0, "{t}");
    let _ = child.kill();
    let _ = child.wait();
    b.restart(&fx.sock);
    let r = restore_and_resume(&fx, &snap);
    let paused = format!("generic-vhost-user: paused: queue 0 at {base} (used {base})");
    assert!(r.stderr.contains(&paused), "{paused:?}:\n{}", r.stderr);
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// `vm.add-generic-vhost-user` on a running guest (`test=hotplug`): the guest's virtio-blk
/// driver reads sector 0 and writes sector 1 through the backend; `vm.info` records the
/// device as the original does; `vm.remove-device` takes it away.
#[test]
fn generic_device_hot_added_used_and_removed() {
    let fx = BlkFixture::new("gvu-hotplug", "disk.img");
    let bytes = hotplug_image(&fx, b"generic vu hot!\n");
    let mut backend = fx.backend("");
    let vmm = fx.spawn_hotplug_guest();
    let add = format!(
        r#"{{"socket":"{}","queue_sizes":[128],"device_type":2,"id":"gvu1"}}"#,
        fx.sock.display()
    );
    let slot = hot_add_and_use(&fx, &bytes, "vm.add-generic-vhost-user", &add, "gvu1");
    let info: serde_json::Value = serde_json::from_str(&api_get_body(&fx.api, "vm.info")).unwrap();
    assert_eq!(
        info["config"]["generic_vhost_user"],
        serde_json::json!([{"socket": fx.sock, "queue_sizes": [128], "device_type": 2,
                            "id": "gvu1", "pci_segment": 0}]),
        "{info}"
    );
    // A second device of the same id is refused.
    let (status, body) = api_put(&fx.api, "vm.add-generic-vhost-user", &add);
    assert!(status.contains(" 400 "), "{status}: {body}");
    hot_remove(&fx, &mut backend, "gvu1", slot);
    let info = api_get_body(&fx.api, "vm.info");
    assert!(!info.contains("generic_vhost_user"), "{info}");
    shut_down(&fx, vmm);
}

/// The hostile guest suite (`test=hostile-suite`, tests/api/hostile.rs) with a generic
/// vhost-user disk (slot 9) among the VMM's own devices: rings in MMIO and outside RAM,
/// malformed chains, config-space and BAR abuse and activation storms reach our backend
/// through the frontend. Every check passes (where a device must set NEEDS_RESET the backend,
/// which vhost-user gives no way to, must serve nothing instead: `hostile_vhost_user=9`), the
/// guest powers off, and the backend never failed a request (a failed one ends its
/// connection: a guest's write to the read-only config space once did) and ends cleanly when
/// the VMM goes.
#[test]
fn a_hostile_guest_against_a_generic_vhost_user_disk() {
    let fx = BlkFixture::zeroed("gvu-hostile");
    let d = &fx.dir;
    // The suite reads the first disk at the end: it must hold what the host wrote.
    std::fs::write(d.join("disk.img"), host_image()).unwrap();
    std::fs::write(d.join("disk2.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("pmem.img"), vec![0u8; 2 << 20]).unwrap();
    let mut b = fx.backend("");
    let (disk, disk2, pmem) = (
        format!("path={}", d.join("disk.img").display()),
        format!("path={}", d.join("disk2.img").display()),
        format!("file={},size=2M", d.join("pmem.img").display()),
    );
    let vsock = format!("cid=3,socket={}", d.join("v.sock").display());
    let console = format!("file={}", d.join("console.out").display());
    let log = d.join("vmm.log").display().to_string();
    let generic = format!("{},pci_device_id=9", option(&fx.sock, "256"));
    let cmdline = "test=hostile-suite hostile_idle_ms=300 hostile_storm_ms=1000 \
                   hostile_vhost_user=9";
    // About 40 s on our build machine (debug build); a loaded one may need more than a minute.
    let vmm = spawn(&[
        "--kernel",
        guest().elf_pvh.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--serial",
        "tty",
        "--cpus",
        "boot=2",
        "--memory",
        "size=256M,hotplug_method=virtio-mem,hotplug_size=128M,shared=on",
        "--disk",
        &disk,
        &disk2,
        "--rng",
        "src=/dev/urandom",
        "--console",
        &console,
        "--vsock",
        &vsock,
        "--balloon",
        "size=0",
        "--pmem",
        &pmem,
        "--watchdog",
        "--pvpanic",
        "--log-file",
        &log,
        "--generic-vhost-user",
        &generic,
    ]);
    let r = wait_with_timeout(vmm, Duration::from_secs(300));
    r.assert_guest_passed();
    assert!(
        r.stdout.contains("INFO hostile blk at 00:09.0") && r.stdout.contains(" vhost-user\n"),
        "the suite did not take slot 9 as the vhost-user disk:\n{}",
        r.stdout
    );
    let status = b.child.wait().unwrap();
    assert!(status.success(), "the backend ended with {status}");
}

/// qemu-storage-daemon (QEMU's own vhost-user-blk export) behind a generic device: the VMM
/// gives it a request channel (BACKEND_REQ), and when QMP's `block_resize` grows its disk the
/// daemon's config-change notice reaches the guest's running driver as a configuration
/// interrupt with a new generation; the guest (`test=blk-resize`) reads the new capacity from
/// the daemon's configuration space and writes the new last sector into the image.
#[test]
fn generic_block_device_resized_by_its_backend() {
    let dir = common::scratch("gvu-qsd-resize");
    common::qsd::grow_under_the_guest(&dir, |sock| {
        ["--generic-vhost-user".into(), option(sock, "128")]
    });
}
