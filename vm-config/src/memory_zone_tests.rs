use super::*;

const MIB: u64 = 1 << 20;

fn parse(memory: &str, zones: &[&str]) -> Result<MemoryConfig, ConfigError> {
    MemoryConfig::parse_with_zones(memory, zones)
}

#[test]
fn zones_parse_with_the_original_keys_and_defaults() {
    let m = parse(
        "size=0,mergeable=on,hotplug_method=virtio-mem",
        &[
            "id=z0,size=128M",
            "id=z1,size=1G,file=/dev/shm/z1,mergeable=off,prefault=on,reserve=on,\
             host_numa_node=0,hotplug_size=256M,hotplugged_size=64M",
        ],
    )
    .unwrap();
    let z = m.zones.as_ref().unwrap();
    assert_eq!(z.len(), 2);
    assert_eq!((z[0].id.as_str(), z[0].size), ("z0", 128 * MIB));
    // --memory's mergeable is the zones' default.
    assert!(z[0].mergeable && !z[0].shared && z[0].file.is_none());
    assert_eq!(
        z[1].file.as_deref(),
        Some(std::path::Path::new("/dev/shm/z1"))
    );
    assert!(!z[1].shared && !z[1].mergeable && z[1].prefault && z[1].reserve);
    assert_eq!(z[1].host_numa_node, Some(0));
    assert_eq!(z[1].hotplug_size, Some(256 * MIB));
    assert_eq!(z[1].hotplugged_size, Some(64 * MIB));
    assert_eq!(m.ram_size(), 128 * MIB + (1 << 30));
    assert_eq!(m.hotplug_total(), 256 * MIB);
    assert_eq!(m.hotplugged_total(), 64 * MIB);
    assert!(!m.all_shared() && !m.any_shared() && !m.any_hugepages());
    // The default zone size is the original's 512 MiB.
    let m = parse("size=0", &["id=a"]).unwrap();
    assert_eq!(m.ram_size(), 512 * MIB);
}

#[test]
fn zones_round_trip_through_json_in_the_original_shape() {
    let m = parse("size=0", &["id=a,size=64M,shared=on"]).unwrap();
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["zones"][0]["id"], "a");
    assert_eq!(json["zones"][0]["size"], 64 * MIB);
    assert_eq!(json["zones"][0]["shared"], true);
    let back: MemoryConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, m);
    // The original's own client sends every key, nulls included.
    let m: MemoryConfig = serde_json::from_str(
        r#"{"size": 0, "zones": [{"id": "a", "size": 67108864, "file": null,
            "mergeable": false, "shared": false, "hugepages": false, "hugepage_size": null,
            "host_numa_node": null, "hotplug_size": null, "hotplugged_size": null,
            "prefault": false, "reserve": false}]}"#,
    )
    .unwrap();
    m.validate_zones().unwrap();
    let m: MemoryConfig =
        serde_json::from_str(r#"{"size": 0, "zones": [{"id": "a", "size": 4096, "x": 1}]}"#)
            .unwrap();
    let e = m.validate_zones().unwrap_err();
    assert_eq!(e.option, "memory.zones.x");
}

/// Every bad value is one line naming the option and the value given.
#[test]
fn bad_zones_are_refused_naming_the_option_and_value() {
    for (memory, zones, option, value, msg) in [
        (
            "size=0",
            &["size=1G"][..],
            "--memory-zone",
            "size=1G",
            "id is missing",
        ),
        (
            "size=0",
            &["id=a,size=1G,bogus=1"][..],
            "--memory-zone",
            "id=a,size=1G,bogus=1",
            "unknown key 'bogus'",
        ),
        (
            "size=0",
            &["id=a,size=abc"][..],
            "--memory-zone",
            "id=a,size=abc",
            "invalid size 'abc'",
        ),
        (
            "size=0",
            &["id=a,size=0"][..],
            "--memory-zone",
            "id=a,size=0",
            "size must not be zero",
        ),
        (
            "size=0",
            &["id=a,size=1000"][..],
            "--memory-zone",
            "id=a,size=1000",
            "not a multiple",
        ),
        (
            "size=0",
            &["id=a,size=1G,hugepage_size=2M"][..],
            "--memory-zone",
            "id=a,size=1G,hugepage_size=2M",
            "needs hugepages=on",
        ),
        (
            "size=0",
            &["id=a,size=1G,hugepages=on,hugepage_size=3M"][..],
            "--memory-zone",
            "id=a,size=1G,hugepages=on,hugepage_size=3M",
            "power of two",
        ),
        (
            "size=0",
            &["id=a,size=1G,shared=on,mergeable=on"][..],
            "--memory-zone",
            "id=a,size=1G,shared=on,mergeable=on",
            "do not go together",
        ),
        (
            "size=0",
            &["id=a,size=1G,shared=x"][..],
            "--memory-zone",
            "id=a,size=1G,shared=x",
            "must be on, off",
        ),
        (
            "size=0",
            &["id=a,size=1G,host_numa_node=-1"][..],
            "--memory-zone",
            "id=a,size=1G,host_numa_node=-1",
            "must be a number",
        ),
        (
            "size=0",
            &["id=a,size=1G,hotplugged_size=2M"][..],
            "--memory-zone",
            "id=a,size=1G,hotplugged_size=2M",
            "needs a hotplug_size",
        ),
        (
            "size=0,hotplug_method=virtio-mem",
            &["id=a,size=1G,hotplug_size=100M"][..],
            "--memory-zone",
            "id=a,size=1G,hotplug_size=100M",
            "multiple of 128 MiB",
        ),
        (
            "size=0,hotplug_method=virtio-mem",
            &["id=a,size=1G,hotplug_size=128M,hotplugged_size=256M"][..],
            "--memory-zone",
            "id=a,size=1G,hotplug_size=128M,hotplugged_size=256M",
            "more than hotplug_size",
        ),
        (
            "size=0",
            &["id=a,size=1G,hotplug_size=1G"][..],
            "--memory-zone",
            "id=a,size=1G,hotplug_size=1G",
            "hotplug_method=virtio-mem",
        ),
        (
            "size=0",
            &["id=a,size=1G", "id=a,size=1G"][..],
            "--memory-zone",
            "id=a,size=1G",
            "used twice",
        ),
        (
            "size=1G",
            &["id=a,size=1G"][..],
            "--memory-zone",
            "id=a,size=1G",
            "needs --memory size=0",
        ),
        (
            "size=0,shared=on",
            &["id=a,size=1G"][..],
            "--memory",
            "",
            "shared does not apply",
        ),
        (
            "size=0,hotplug_size=1G",
            &["id=a,size=1G"][..],
            "--memory",
            "",
            "hotplug_size does not apply",
        ),
        (
            "size=0",
            &["id=a,size=1G,file=/f,hugepages=on"][..],
            "--memory-zone",
            "id=a,size=1G,file=/f,hugepages=on",
            "do not go together",
        ),
        (
            "size=0",
            &["id=a,size=1G,file=/f,shared=on,host_numa_node=0"][..],
            "--memory-zone",
            "id=a,size=1G,file=/f,shared=on,host_numa_node=0",
            "host_numa_node",
        ),
        (
            "size=0",
            &[][..],
            "--memory",
            "size=0",
            "only with --memory-zone",
        ),
    ] {
        let e = parse(memory, zones).unwrap_err();
        assert_eq!(
            (e.option.as_str(), e.value.as_str()),
            (option, value),
            "{memory} {zones:?}: {e}"
        );
        assert!(e.msg.contains(msg), "{memory} {zones:?}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
}

#[test]
fn zone_ids_share_the_device_id_space() {
    let mut cfg: crate::VmConfig = serde_json::from_str(
        r#"{"payload": {"kernel": "/k"}, "memory": {"size": 0, "zones": [{"id": "z", "size": 4096}]},
            "disks": [{"path": "/dev/null", "id": "z"}]}"#,
    )
    .unwrap();
    let e = cfg.validate_devices().unwrap_err();
    assert!(e.msg.contains("used twice"), "{e}");
    cfg.disks.clear();
    cfg.validate_devices().unwrap();
}

/// Through the API the zone is named by its id and size.
#[test]
fn api_zone_errors_name_the_zone() {
    let m: MemoryConfig = serde_json::from_str(
        r#"{"size": 0, "zones": [{"id": "a", "size": 4096}, {"id": "a", "size": 8192}]}"#,
    )
    .unwrap();
    let e = m.validate_zones().unwrap_err();
    assert_eq!(
        (e.option.as_str(), e.value.as_str()),
        ("--memory-zone", "id=a,size=8192")
    );
    let m: MemoryConfig =
        serde_json::from_str(r#"{"size": 1048576, "zones": [{"id": "a", "size": 4096}]}"#).unwrap();
    assert!(m.validate_zones().unwrap_err().msg.contains("size=0"));
}

/// `--landlock` lets the VMM open a zone's file: read-write when it is mapped shared.
#[test]
fn landlock_grants_the_zone_files() {
    let cfg: crate::VmConfig = serde_json::from_str(
        r#"{"payload": {"kernel": "/k"}, "memory": {"size": 0, "zones": [
            {"id": "a", "size": 4096, "file": "/z/a", "shared": true},
            {"id": "b", "size": 4096, "file": "/z/b"},
            {"id": "c", "size": 4096}]}}"#,
    )
    .unwrap();
    let grants: Vec<_> = cfg
        .landlock_grants()
        .into_iter()
        .filter(|g| g.option == "--memory-zone")
        .map(|g| (g.path.display().to_string(), g.access))
        .collect();
    assert_eq!(
        grants,
        [
            ("/z/a".to_string(), crate::LandlockAccess::ReadWrite),
            ("/z/b".to_string(), crate::LandlockAccess::Read),
        ]
    );
}
