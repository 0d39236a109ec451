//! `--memory-zone` and `vm.resize-zone` end to end with the test guest: zones laid out in
//! order around the 32-bit hole in the guest's memory map, each backed as asked (a shared
//! file zone's file holds what the guest wrote), a zone's virtio-mem device plugging what
//! `ch-remote resize-zone` asks for, and a VM with zones snapshotted and restored in a new VMM
//! with the same layout and contents.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);

/// What the test guest writes at guest physical address `a` (`test-guest/src/mem_zones.rs`).
fn pattern(a: u64) -> u64 {
    a ^ 0x6d65_6d7a_6f6e_6573
}

/// A file of `size` bytes (sparse) in `dir`.
fn zone_file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// The 8-byte word at `offset` of `file`.
fn word_at(file: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    u64::from_le_bytes(b)
}

/// The number of the guest's last `MEMZONES check <n> ok` line (0 if none).
fn last_check(serial: &Path) -> u64 {
    serial_text(serial)
        .lines()
        .filter_map(|l| l.strip_prefix("MEMZONES check "))
        .filter_map(|l| l.strip_suffix(" ok"))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits for a `MEMZONES check <n> ok` line with n > `after`.
fn wait_check_after(serial: &Path, after: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = last_check(serial);
        if n > after {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no check after {after}:\n{}",
            serial_text(serial)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Three zones from the command line: 64 MiB anonymous, 3 GiB that reach the 32-bit hole
/// and go on at 4 GiB, and 64 MiB of a shared file after them. The guest's memory map has
/// RAM exactly there, every zone takes the guest's writes, and the file zone's file holds
/// them; vm.info shows the zones.
#[test]
fn zones_from_the_command_line_are_the_guests_ram() {
    require_curl();
    let dir = common::scratch("memory-zones-files");
    let file = zone_file(&dir, "zone-file", 64 * MIB);
    let kernel = common::guest().elf_pvh.display().to_string();
    let scratch = common::scratch("memory-zones-serial");
    let serial = scratch.join("serial.out");
    let serial_arg = format!("file={}", serial.display());
    let file_zone = format!("id=file,size=64M,file={},shared=on", file.display());
    // Zone 0 from 32 MiB (the guest lives below), zone 1 below the hole and above 4 GiB, the
    // file zone at 4 GiB + 64 MiB.
    let cmdline = "test=memzones memtest=0x2000000+0x2000000,0xb0000000+0x1000000,\
                   0x100000000+0x4000000,0x104000000+0x4000000";
    // The low zone bound to the host's node 0 where it has one (never accepted and ignored:
    // the kernel's numa_maps says so below).
    let node0 = Path::new("/sys/devices/system/node/node0").exists();
    let low_zone = if node0 {
        "id=low,size=64M,host_numa_node=0"
    } else {
        "id=low,size=64M"
    };
    let vmm = Vmm::start(
        "memory-zones",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            cmdline,
            "--cpus",
            "boot=1",
            "--memory",
            "size=0",
            "--memory-zone",
            low_zone,
            "--memory-zone",
            "id=big,size=3G",
            "--memory-zone",
            &file_zone,
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    let start = Instant::now();
    wait_check_after(&serial, 0);
    eprintln!("booted, written and checked in {:?}", start.elapsed());
    let text = serial_text(&serial);
    for want in [
        "MEMZONES ram 0x100000+0xbff00000\n",
        "MEMZONES ram 0x100000000+0x8000000\n",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert_eq!(text.matches("MEMZONES ram ").count(), 3, "{text}");
    for i in 0..4 {
        assert!(text.contains(&format!("PASS memzones-{i}\n")), "{text}");
    }
    assert_no_fail(&serial);
    // The file zone's file holds what the guest wrote at 4 GiB + 64 MiB.
    for off in [0, 8, 0x1000, 32 * MIB + 0x88, 64 * MIB - 8] {
        assert_eq!(
            word_at(&file, off),
            pattern(0x1_0400_0000 + off),
            "offset {off:#x}"
        );
    }
    if node0 {
        // The low zone's mapping (split in two by the transparent huge page advice above
        // its first 16 MiB) is bound to node 0; nothing else is.
        let maps = std::fs::read_to_string(format!("/proc/{}/numa_maps", vmm.pid())).unwrap();
        let bound = bound_to_node0(&maps);
        assert!((1..=2).contains(&bound), "{bound} mappings bound:\n{maps}");
    }
    let info = vmm.ok_json("vm.info");
    let zones = &info["config"]["memory"]["zones"];
    assert_eq!(info["config"]["memory"]["size"], 0, "{info}");
    assert_eq!(zones[0]["id"], "low");
    assert_eq!(zones[1]["size"], 3u64 << 30);
    assert_eq!(zones[2]["file"], file.display().to_string());
    assert_eq!(zones[2]["shared"], true);
    assert_eq!(info["memory_actual_size"], (3u64 << 30) + 128 * MIB);
    // A plain vm.resize of the RAM is refused: zones are resized one by one.
    let (status, body) = vmm.curl("PUT", "vm.resize", Some(r#"{"desired_ram": 4294967296}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("vm.resize-zone"), "{body}");
}

/// How many mappings of `numa_maps` are bound (MPOL_BIND) to node 0.
fn bound_to_node0(maps: &str) -> usize {
    maps.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("bind:0"))
        .count()
}

/// The VmConfig of a guest in `test` with `zones` (virtio-mem hotplug).
fn zones_config(test: &str, serial: &Path, zones: Value) -> Value {
    let mut config: Value = serde_json::from_str(&guest_config(test, serial)).unwrap();
    config["cpus"] = json!({"boot_vcpus": 1, "max_vcpus": 1});
    config["memory"] = json!({"size": 0, "hotplug_method": "VirtioMem", "zones": zones});
    config
}

/// vm.info's `memory_actual_size` and the zone `id`'s `hotplugged_size` (0 when absent).
fn zone_info(vmm: &Vmm, id: &str) -> (u64, u64) {
    let info = vmm.ok_json("vm.info");
    let zone = info["config"]["memory"]["zones"]
        .as_array()
        .and_then(|z| z.iter().find(|z| z["id"] == id))
        .unwrap_or_else(|| panic!("no zone {id}: {info}"))
        .clone();
    (
        info["memory_actual_size"].as_u64().unwrap(),
        zone["hotplugged_size"].as_u64().unwrap_or(0),
    )
}

/// `ch-remote resize-zone`: the zone's virtio-mem device asks the guest for the zone's
/// desired RAM less its size; the guest's driver plugs (and writes) it, or unplugs; vm.info
/// follows. Bad requests get the original's statuses: 404 without a VM, 500 otherwise.
#[test]
fn resize_zone_plugs_what_the_guest_takes() {
    require_curl();
    let vmm = Vmm::start("memory-zones-resize", &[]);
    let (status, body) = vmm.curl(
        "PUT",
        "vm.resize-zone",
        Some(r#"{"id": "hp", "desired_ram": 1073741824}"#),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        error_lines(&body),
        [
            "Error from API",
            "The memory zone could not be resized",
            "VM is not created"
        ]
    );
    let serial = vmm.dir.join("serial.out");
    let config = zones_config(
        "virtiomem",
        &serial,
        json!([
            {"id": "base", "size": 256 * MIB},
            {"id": "hp", "size": 64 * MIB, "hotplug_size": 512 * MIB},
        ]),
    );
    let (status, body) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_line(&serial, "READY", 1, WAIT);
    let text = serial_text(&serial);
    // The zone's region follows the RAM (320 MiB) at 4 GiB.
    assert!(
        text.contains("INFO virtiomem addr=0x100000000 region=0x20000000 "),
        "{text}"
    );
    assert_eq!(zone_info(&vmm, "hp"), (320 * MIB, 0));

    let start = Instant::now();
    ch_remote_ok(&vmm, &["resize-zone", "--id", "hp", "--size", "320M"]);
    wait_line(
        &serial,
        &format!("VIRTIOMEM plugged={} requested={} ok", 256 * MIB, 256 * MIB),
        1,
        WAIT,
    );
    eprintln!("resize-zone +256 MiB plugged in {:?}", start.elapsed());
    assert_eq!(zone_info(&vmm, "hp"), (576 * MIB, 256 * MIB));

    ch_remote_ok(&vmm, &["resize-zone", "--id", "hp", "--size", "192M"]);
    wait_line(
        &serial,
        &format!("VIRTIOMEM plugged={} requested={} ok", 128 * MIB, 128 * MIB),
        1,
        WAIT,
    );
    assert_eq!(zone_info(&vmm, "hp"), (448 * MIB, 128 * MIB));

    for (body, why) in [
        (
            r#"{"id": "nope", "desired_ram": 67108864}"#,
            "no memory zone",
        ),
        (
            r#"{"id": "base", "desired_ram": 536870912}"#,
            "no memory to hot-plug",
        ),
        (
            r#"{"id": "hp", "desired_ram": 33554432}"#,
            "must be between",
        ),
        (
            r#"{"id": "hp", "desired_ram": 1073741824}"#,
            "must be between",
        ),
        (
            r#"{"id": "hp", "desired_ram": 68157440}"#,
            "multiple of 2 MiB",
        ),
    ] {
        let (status, text) = vmm.curl("PUT", "vm.resize-zone", Some(body));
        assert_eq!(status, 500, "{body}: {text}");
        let lines = error_lines(&text);
        assert_eq!(
            lines[..3],
            [
                "Error from API",
                "The memory zone could not be resized",
                "Failed resizing a memory zone"
            ],
            "{body}"
        );
        assert!(lines[3].contains(why), "{body}: {lines:?}");
    }
    let (status, text) = vmm.curl("PUT", "vm.resize-zone", Some(r#"{"id": "hp"}"#));
    assert_eq!(status, 400, "{text}");
    assert_eq!(zone_info(&vmm, "hp"), (448 * MIB, 128 * MIB));
    // A reboot builds the zones again, and the new guest is asked for what was plugged.
    assert_eq!(vmm.put("vm.reboot").0, 204);
    wait_line(&serial, "READY", 2, WAIT);
    wait_line(
        &serial,
        &format!("VIRTIOMEM plugged={} requested={} ok", 128 * MIB, 128 * MIB),
        2,
        WAIT,
    );
    assert_eq!(zone_info(&vmm, "hp"), (448 * MIB, 128 * MIB));
    assert_no_fail(&serial);
}

/// A VM with zones (anonymous, a shared file, one with a virtio-mem region resized) paused,
/// snapshotted and restored in a new VMM: the same zones in its configuration, the same
/// layout, and a guest whose memory still holds what it wrote.
#[test]
fn zones_survive_snapshot_and_restore() {
    require_curl();
    let mut a = Vmm::start("memory-zones-snap-a", &[]);
    let serial = a.dir.join("serial.out");
    let file = zone_file(&a.dir, "zone-file", 32 * MIB);
    let config = zones_config(
        "memzones memtest=0x2000000+0x2000000,0x4000000+0x2000000,0x6000000+0x2000000",
        &serial,
        json!([
            {"id": "low", "size": 64 * MIB},
            {"id": "file", "size": 32 * MIB, "file": file, "shared": true},
            {"id": "hp", "size": 32 * MIB, "hotplug_size": 128 * MIB},
        ]),
    );
    let (status, body) = a.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(a.put("vm.boot").0, 204);
    wait_check_after(&serial, 1);
    ch_remote_ok(&a, &["resize-zone", "--id", "hp", "--size", "96M"]);
    assert_eq!(a.put("vm.pause").0, 204);
    let before = last_check(&serial);
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let (status, text) = a.curl(
        "PUT",
        "vm.snapshot",
        Some(&json!({ "destination_url": url }).to_string()),
    );
    assert_eq!(status, 204, "{text}");
    let info_a = a.ok_json("vm.info");
    assert_eq!(
        info_a["config"]["memory"]["zones"][2]["hotplugged_size"],
        64 * MIB
    );
    assert_eq!(a.put("vmm.shutdown").0, 200);
    assert_eq!(a.wait().code(), Some(0));

    let b = Vmm::start("memory-zones-snap-b", &[]);
    // zone_updates naming a zone the snapshot lacks, or a host node the host lacks: refused,
    // nothing restored.
    for (update, why) in [
        (
            json!({"id": "nope", "host_numa_node": 0}),
            "no memory zone nope",
        ),
        (
            json!({"id": "low", "host_numa_node": 63}),
            "no NUMA node 63",
        ),
    ] {
        let body = json!({ "source_url": url, "zone_updates": [update] }).to_string();
        let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
        assert_eq!(status, 500, "{text}");
        assert!(text.contains(why), "{text}");
        assert_eq!(b.curl("GET", "vm.info", None).0, 404);
    }
    // userfaultfd cannot serve a file zone.
    let body = json!({ "source_url": url, "memory_restore_mode": "OnDemand" }).to_string();
    let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("cannot serve memory zone file (file=)"),
        "{text}"
    );
    assert_eq!(b.curl("GET", "vm.info", None).0, 404);
    // The host's node 0 (where it has one) for the low zone.
    let node0 = Path::new("/sys/devices/system/node/node0").exists();
    let updates = if node0 {
        json!([{"id": "low", "host_numa_node": 0}])
    } else {
        json!([])
    };
    let body = json!({ "source_url": url, "zone_updates": updates }).to_string();
    let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
    assert_eq!((status, text.as_str()), (204, ""));
    let mut info_b = b.ok_json("vm.info");
    if node0 {
        let zone = &mut info_b["config"]["memory"]["zones"][0];
        assert_eq!(zone["host_numa_node"], 0);
        zone.as_object_mut().unwrap().remove("host_numa_node");
    }
    assert_eq!(info_b["config"], info_a["config"], "the snapshot's zones");
    assert_eq!(b.put("vm.resume").0, 204);
    wait_check_after(&serial, before);
    assert_no_fail(&serial);
    // The file zone's file still holds the guest's words (at 64 MiB of the guest).
    assert_eq!(word_at(&file, 0x1000), pattern(0x400_0000 + 0x1000));
    // The resized zone can be resized again in the restored VM.
    ch_remote_ok(&b, &["resize-zone", "--id", "hp", "--size", "64M"]);
    assert_eq!(zone_info(&b, "hp").1, 32 * MIB);
}

/// Migrates a guest with zones (one resized) from one VMM to another over a Unix socket,
/// copying its memory or, with `local` (every zone shared), handing its memory files over:
/// the destination has the same zones and the guest's memory goes on holding what it wrote.
fn migrate_zones(name: &str, local: bool) {
    require_curl();
    let mut a = Vmm::start(&format!("{name}-src"), &[]);
    let serial = a.dir.join("serial.out");
    let config = zones_config(
        "memzones memtest=0x2000000+0x2000000,0x4000000+0x2000000,0x6000000+0x2000000",
        &serial,
        json!([
            {"id": "low", "size": 64 * MIB, "shared": local},
            {"id": "sh", "size": 32 * MIB, "shared": true},
            {"id": "hp", "size": 32 * MIB, "hotplug_size": 128 * MIB, "shared": local},
        ]),
    );
    let (status, body) = a.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(a.put("vm.boot").0, 204);
    wait_check_after(&serial, 1);
    ch_remote_ok(&a, &["resize-zone", "--id", "hp", "--size", "96M"]);
    let info_a = a.ok_json("vm.info");

    let b = Vmm::start(&format!("{name}-dst"), &[]);
    let sock = b.dir.join("mig.sock");
    let url = format!("unix:{}", sock.display());
    let rx = std::process::Command::new(ch_remote_bin())
        .arg("--api-socket")
        .arg(&b.sock)
        .args(["receive-migration", &url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nothing listens on {url}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A Unix socket's file appears at bind(), a moment before listen().
    std::thread::sleep(Duration::from_millis(50));
    let body = json!({"destination_url": url, "local": local}).to_string();
    let start = Instant::now();
    let (status, text) = a.curl("PUT", "vm.send-migration", Some(&body));
    assert_eq!(status, 204, "{text}");
    let out = rx.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "receive-migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.wait().code(), Some(0), "the source VMM ends");
    eprintln!("{name}: migrated in {:?}", start.elapsed());
    let before = last_check(&serial);
    assert_eq!(b.state(), "Running");
    let info_b = b.ok_json("vm.info");
    assert_eq!(info_b["config"]["memory"], info_a["config"]["memory"]);
    wait_check_after(&serial, before);
    assert_no_fail(&serial);
    ch_remote_ok(&b, &["resize-zone", "--id", "hp", "--size", "32M"]);
    assert_eq!(zone_info(&b, "hp").1, 0);
}

#[test]
fn zones_survive_live_migration() {
    migrate_zones("memory-zones-mig", false);
}

#[test]
fn zones_survive_local_migration() {
    migrate_zones("memory-zones-mig-local", true);
}

/// Before boot, resize-zone records the zone's plugged size, and the booted guest's driver
/// is asked for it at once.
#[test]
fn resize_zone_before_boot_is_plugged_at_boot() {
    require_curl();
    let vmm = Vmm::start("memory-zones-preboot", &[]);
    let serial = vmm.dir.join("serial.out");
    let config = zones_config(
        "virtiomem",
        &serial,
        json!([
            {"id": "base", "size": 256 * MIB},
            {"id": "hp", "size": 64 * MIB, "hotplug_size": 256 * MIB},
        ]),
    );
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&config.to_string())).0,
        204
    );
    ch_remote_ok(&vmm, &["resize-zone", "--id", "hp", "--size", "192M"]);
    assert_eq!(zone_info(&vmm, "hp"), (320 * MIB, 128 * MIB));
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_line(
        &serial,
        &format!("VIRTIOMEM plugged={} requested={} ok", 128 * MIB, 128 * MIB),
        1,
        WAIT,
    );
    assert_eq!(zone_info(&vmm, "hp"), (448 * MIB, 128 * MIB));
}

/// `--numa`: two guest NUMA nodes, each with a vCPU and a zone (one with a virtio-mem region),
/// and a distance between them, and a third of a disk alone (a generic initiator,
/// `device_id`): the guest's SRAT and SLIT say so.
#[test]
fn numa_nodes_are_in_the_srat_and_slit() {
    require_curl();
    let kernel = common::guest().elf_pvh.display().to_string();
    let scratch = common::scratch("memory-zones-numa-serial");
    let serial = scratch.join("serial.out");
    let serial_arg = format!("file={}", serial.display());
    let disk = scratch.join("gi.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={},id=gpu0", disk.display());
    let vmm = Vmm::start(
        "memory-zones-numa",
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=memzones memtest=0x2000000+0x2000000,0x4000000+0x4000000",
            "--cpus",
            "boot=2",
            "--memory",
            "size=0,hotplug_method=virtio-mem",
            "--memory-zone",
            "id=a,size=64M",
            "--memory-zone",
            "id=b,size=64M,hotplug_size=128M",
            "--numa",
            "guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@25]",
            "--numa",
            "guest_numa_id=1,cpus=[1],memory_zones=[b]",
            "--numa",
            "guest_numa_id=2,device_id=gpu0,distances=[0@30]",
            "--disk",
            &disk_arg,
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    wait_check_after(&serial, 0);
    let text = serial_text(&serial);
    for want in [
        "NUMA mem node=0 0x0+0x4000000 hotplug=0\n",
        "NUMA mem node=1 0x4000000+0x4000000 hotplug=0\n",
        "NUMA mem node=1 0x100000000+0x8000000 hotplug=1\n",
        "NUMA cpu node=0 apic=0\n",
        "NUMA cpu node=1 apic=1\n",
        "NUMA gi node=2 pci=0000:00:01.0\n",
        "NUMA slit 0: 10,25,30\n",
        "NUMA slit 1: 25,10,20\n",
        "NUMA slit 2: 30,20,10\n",
    ] {
        assert!(text.contains(want), "{want}:\n{text}");
    }
    assert_no_fail(&serial);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["numa"][1]["memory_zones"], json!(["b"]));
    assert_eq!(
        info["config"]["numa"][0]["distances"],
        json!([{"destination": 1, "distance": 25}])
    );
    assert_eq!(info["config"]["numa"][2]["device_id"], "gpu0");
}
