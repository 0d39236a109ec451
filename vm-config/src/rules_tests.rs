//! The original's reading of `--cpus`, `--memory`, `--serial` and `--console`, the checks of a
//! whole configuration, its JSON shape, and what booting records in it. Each case was checked
//! against the original's parser (`option_parser`, `vmm/src/config.rs`) or its binary.

use serde_json::json;

use super::*;

/// A configuration from the original's JSON (`payload` is required).
fn config(extra: serde_json::Value) -> VmConfig {
    let mut v = json!({"payload": {"kernel": "/k"}});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(v).unwrap()
}

#[test]
fn cpus_as_the_original_reads_them() {
    // Empty values are not given; a repeated key keeps its last value.
    let c = CpusConfig::parse("boot=,max=,topology=,kvm_hyperv=,max_phys_bits=").unwrap();
    assert_eq!(c, CpusConfig::default());
    assert_eq!(CpusConfig::parse("boot=2,boot=3").unwrap().boot_vcpus, 3);
    assert_eq!(CpusConfig::parse(" boot=2 ").unwrap().boot_vcpus, 2);
    assert_eq!(CpusConfig::parse("boot=+2").unwrap().boot_vcpus, 2);
    // The defaults of what we do as the original's defaults say: accepted.
    for ok in [
        "nested=on",
        "nested=TRUE",
        "profile=Host",
        "kvm_hyperv=OFF",
        "core_scheduling=",
        "affinity=",
    ] {
        assert!(CpusConfig::parse(ok).is_ok(), "{ok}");
    }
    // The original's example, and its JSON.
    let c = CpusConfig::parse("boot=2,affinity=[0@[0,2],1@[1-3]]").unwrap();
    let a = c.affinity.as_deref().unwrap();
    assert_eq!((a[0].vcpu, &a[0].host_cpus[..]), (0, &[0, 2][..]));
    assert_eq!((a[1].vcpu, &a[1].host_cpus[..]), (1, &[1, 2, 3][..]));
    assert_eq!(
        serde_json::to_value(&c).unwrap()["affinity"],
        json!([{"vcpu": 0, "host_cpus": [0, 2]}, {"vcpu": 1, "host_cpus": [1, 2, 3]}])
    );
    let j: CpusConfig = serde_json::from_value(
        json!({"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 0, "host_cpus": []}]}),
    )
    .unwrap();
    assert_eq!(
        j.validate().unwrap_err(),
        "affinity: vCPU 0 has no host CPU"
    );
    for (bad, why) in [
        ("kvm_hyperv=on", "not supported yet"),
        ("profile=host", "the only profile is Host"),
        ("affinity=[1@[1]]", "vCPU 1 is not below max (1)"),
        ("boot=2,affinity=[0@[1],0@[2]]", "vCPU 0 is given twice"),
        ("affinity=[0@[1024]]", "'1024' is more than 1023"),
        ("affinity=[x@[1]]", "'x' is not a vCPU number"),
        ("affinity=[0@[3-1]]", "not a rising range"),
        ("affinity=0@1", "is not a list in brackets"),
        ("features=amx", "not supported yet"),
        ("boot=2,", "empty item"),
        (
            "boot=2,max=4,topology=4:1:1:1",
            "at most 2 threads per core",
        ),
        ("boot=1,nested=maybe", "must be on, off, true or false"),
    ] {
        let e = CpusConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
        assert!(e.starts_with(&format!("--cpus {bad}: ")), "{e}");
    }
}

#[test]
fn memory_as_the_original_reads_it() {
    let m = MemoryConfig::parse("size=,shared=,thp=,hugepage_size=").unwrap();
    assert_eq!(m, MemoryConfig::default());
    assert_eq!(m.size, 512 << 20);
    let m = MemoryConfig::parse("size=1G,size=2G,thp=OFF,shared=True").unwrap();
    assert_eq!((m.size, m.thp, m.shared), (2 << 30, false, true));
    for ok in [
        "hotplug_method=acpi",
        "hotplug_method=ACPI",
        "reserve=off",
        "hotplug_method=virtio-mem",
        "hotplug_method=virtio-mem,hotplug_size=1G,hotplugged_size=512M",
        "hotplug_size=1G,hotplugged_size=256M",
    ] {
        assert!(MemoryConfig::parse(ok).is_ok(), "{ok}");
    }
    for (bad, why) in [
        ("size=512m", "invalid size"),
        ("size=1T", "invalid size"),
        ("size=1g", "invalid size"),
        ("hotplug_method=dimm", "acpi or virtio-mem"),
        ("hotplug_size=1G,hotplugged_size=64M", "multiple of 128 MiB"),
        (
            "hotplug_method=virtio-mem,hotplug_size=100M",
            "multiple of 128 MiB",
        ),
        (
            "hotplug_method=virtio-mem,hotplugged_size=2M",
            "needs a hotplug_size",
        ),
        (
            "hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=256M",
            "more than hotplug_size",
        ),
        (
            "hotplug_method=virtio-mem,hotplug_size=128M,hotplugged_size=1M",
            "multiple of 2 MiB",
        ),
        ("file=/dev/shm/x", "not supported yet"),
        ("shared=on,mergeable=on", "do not go together"),
    ] {
        let e = MemoryConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn serial_and_console_as_the_original_reads_them() {
    let parse = ConsoleConfig::parse;
    // The same mode twice is one mode.
    assert_eq!(
        parse("--serial", "null,null").unwrap().mode,
        ConsoleOutputMode::Null
    );
    // The console takes the PCI keys; the serial port (no PCI device) does not.
    let c = parse(
        "--console",
        "pty,id=con0,pci_device_id=7,pci_segment=0,iommu=off",
    )
    .unwrap();
    assert_eq!(
        (c.pci_common.id.as_deref(), c.pci_common.pci_device_id),
        (Some("con0"), Some(7))
    );
    assert_eq!(parse("--console", "off,id=").unwrap().pci_common.id, None);
    for (option, bad, why) in [
        ("--serial", "file=/x,id=a", "unknown key 'id'"),
        ("--serial", "tty,pci_device_id=3", "unknown key"),
        ("--serial", "file=", "file= needs a path"),
        ("--serial", "socket=", "socket= needs a path"),
        ("--serial", "TTY", "not a key=value pair"),
        ("--serial", "", "give exactly one"),
        // The original takes the first of these and drops the rest: refused, not ignored.
        ("--serial", "tty,off", "give exactly one"),
        ("--serial", "tty,file=/x", "give exactly one"),
        ("--console", "tty,pci_device_id=0", "0 is its host bridge"),
    ] {
        let e = parse(option, bad).unwrap_err().to_string();
        assert!(e.contains(why), "{option} {bad}: {e}");
        let prefix = match bad {
            "" => format!("{option}: "),
            _ => format!("{option} {bad}: "),
        };
        assert!(e.starts_with(&prefix), "{e}");
    }
}

/// The original's `vm.info` shape: devices before the serial port and the console, `iommu`
/// only when on, the serial port with its mode and path only, and net addresses only when given.
#[test]
fn json_has_the_originals_shape() {
    let mut cfg = config(json!({}));
    cfg.console = ConsoleConfig::parse("--console", "file=/tmp/c").unwrap();
    cfg.serial = ConsoleConfig::parse("--serial", "tty").unwrap();
    cfg.net = vec![NetConfig::parse("tap=,mac=,ip=,mask=").unwrap()];
    let v = serde_json::to_value(&cfg).unwrap();
    assert_eq!(v["serial"], json!({"mode": "Tty"}));
    assert_eq!(
        v["console"],
        json!({"file": "/tmp/c", "mode": "File", "pci_segment": 0})
    );
    assert_eq!(v["rng"], json!({"pci_segment": 0, "src": "/dev/urandom"}));
    for absent in ["tap", "ip", "mask", "mac", "iommu", "id"] {
        assert!(
            v["net"][0].get(absent).is_none(),
            "{absent} in {}",
            v["net"]
        );
    }
    let text = serde_json::to_string(&cfg).unwrap();
    let at = |k: &str| text.find(&format!("\"{k}\":")).unwrap();
    let order = [
        "cpus", "memory", "payload", "net", "rng", "serial", "console",
    ];
    assert!(order.windows(2).all(|w| at(w[0]) < at(w[1])), "{text}");
    // And back: what vm.info shows, vm.create takes.
    let back: VmConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (back.serial.mode, back.console.mode),
        (cfg.serial.mode, cfg.console.mode)
    );
    assert_eq!(back.net, cfg.net);
}

#[test]
fn whole_configuration_checks_of_the_original() {
    // No more disk queues, nor net queue pairs, than boot vCPUs.
    let two_queues = config(json!({"disks": [{"path": "/dev/null", "num_queues": 2}]}));
    let e = two_queues.validate_devices().unwrap_err().to_string();
    assert!(e.contains("more than the 1 boot vCPU(s)"), "{e}");
    let ok = config(json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "disks": [{"path": "/dev/null", "num_queues": 2}],
        "net": [{"num_queues": 4}]
    }));
    ok.validate_devices().unwrap();
    let pairs = config(json!({"net": [{"num_queues": 4}]}));
    let e = pairs.validate_devices().unwrap_err().to_string();
    assert!(
        e.contains("more queue pairs than the 1 boot vCPU(s)"),
        "{e}"
    );
    // The console's id counts even when the console is off.
    let clash = config(json!({
        "console": {"mode": "Off", "id": "x"},
        "net": [{"id": "x"}]
    }));
    assert!(clash.validate_devices().is_err());
    // With virtio-mem hotplug and no zones, `mem0` is the virtio-mem device's.
    let taken = config(json!({
        "memory": {"size": 1 << 28, "hotplug_method": "VirtioMem", "hotplug_size": 1 << 28},
        "disks": [{"path": "/dev/null", "id": "mem0"}]
    }));
    let e = taken.validate_devices().unwrap_err();
    assert_eq!(
        (e.option.as_str(), e.value.as_str()),
        ("--disk", "mem0"),
        "{e}"
    );
    // Ids starting with "__" are the VMM's own.
    let reserved = config(json!({"console": {"mode": "Null", "id": "__console"}}));
    assert!(reserved.validate_devices().is_err());
}

/// As the original's device manager: ids `_disk<N>`/`_net<N>`/`_fs<N>`/`_pmem<N>`/`_vsock<N>`
/// from one counter, in that order, skipping ids in use, and random MACs with first byte 0x2e,
/// recorded once and kept.
#[test]
fn booting_records_ids_and_macs() {
    let mut cfg = config(json!({
        "disks": [{"path": "/a", "id": "_disk1"}, {"path": "/b"}],
        "net": [{"id": "_net0"}, {}, {"mac": "52:54:00:00:00:01"}],
        "fs": [{"tag": "t", "socket": "/s"}],
        "pmem": [{"file": "/p", "id": "_pmem4"}, {"file": "/q"}],
        "vsock": {"cid": 3, "socket": "/v"}
    }));
    cfg.assign_generated();
    assert_eq!(cfg.fs[0].pci_common.id.as_deref(), Some("_fs3"));
    let ids: Vec<_> = cfg
        .pmem
        .iter()
        .map(|p| p.pci_common.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["_pmem4", "_pmem5"]);
    assert_eq!(
        cfg.vsock.as_ref().unwrap().pci_common.id.as_deref(),
        Some("_vsock6")
    );
    let ids: Vec<_> = cfg
        .disks
        .iter()
        .map(|d| d.pci_common.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["_disk1", "_disk0"]);
    let ids: Vec<_> = cfg
        .net
        .iter()
        .map(|n| n.pci_common.id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["_net0", "_net1", "_net2"]);
    assert_eq!(cfg.net[2].mac.as_deref(), Some("52:54:00:00:00:01"));
    for n in &cfg.net[..2] {
        let mac: mac::MacAddr = n.mac.as_deref().unwrap().parse().unwrap();
        assert_eq!(mac.bytes()[0], 0x2e, "{mac}");
    }
    assert_ne!(cfg.net[0].mac, cfg.net[1].mac);
    let before = cfg.clone();
    cfg.assign_generated();
    assert_eq!(cfg, before, "a second boot keeps what the first chose");
}

#[test]
fn unmodelled_keys_are_refused_in_every_object_unless_they_ask_for_nothing() {
    for (extra, key) in [
        (
            json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "bogus": [{"vcpu": 0}]}}),
            "cpus.bogus",
        ),
        (
            json!({"memory": {"size": 0, "zones": [{"id": "z", "size": 1 << 28, "bogus": 1}]}}),
            "memory.zones.bogus",
        ),
        (
            json!({"payload": {"kernel": "/k", "host_data": "aa"}}),
            "payload.host_data",
        ),
        (
            json!({"serial": {"mode": "Null", "bogus": 1}}),
            "serial.bogus",
        ),
        (
            json!({"console": {"mode": "Off", "bogus": true}}),
            "console.bogus",
        ),
        (
            json!({"rng": {"src": "/dev/urandom", "bogus": [1]}}),
            "rng.bogus",
        ),
        (json!({"net": [{"bogus": "/s"}]}), "net[0].bogus"),
    ] {
        let err = config(extra.clone()).check_extra().unwrap_err();
        assert_eq!(err.option, key, "{extra}");
        assert!(err.to_string().contains("not supported yet"), "{err}");
    }
    // The original's clients send its defaults for what they do not use: accepted, and not
    // echoed back in vm.info.
    let cfg = config(json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": null},
        "memory": {"size": 1 << 28, "hotplug_size": null, "zones": []},
        "disks": [{"path": "/d", "rate_limiter_config": null, "pci_segment": 0}],
        "net": [{"vhost_socket": null, "fds": []}],
    }));
    cfg.check_extra().unwrap();
    let v = serde_json::to_value(&cfg).unwrap();
    assert!(v["cpus"].get("affinity").is_none(), "{v}");
    assert!(v["disks"][0].get("rate_limiter_config").is_none(), "{v}");
}

#[test]
fn core_scheduling_as_the_original_reads_it() {
    assert_eq!(CpusConfig::default().core_scheduling, CoreScheduling::Vm);
    for (raw, mode) in [
        ("core_scheduling=vm", CoreScheduling::Vm),
        ("core_scheduling=VCPU", CoreScheduling::Vcpu),
        ("core_scheduling=off", CoreScheduling::Off),
        ("core_scheduling=", CoreScheduling::Vm),
    ] {
        assert_eq!(
            CpusConfig::parse(raw).unwrap().core_scheduling,
            mode,
            "{raw}"
        );
    }
    let err = CpusConfig::parse("core_scheduling=some").unwrap_err();
    assert!(err.to_string().contains("must be vm, vcpu or off"), "{err}");
    // The original's JSON names, as its vm.info shows them.
    let c = config(json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "core_scheduling": "Vcpu"}}));
    assert_eq!(c.cpus.core_scheduling, CoreScheduling::Vcpu);
    assert_eq!(
        serde_json::to_value(&c).unwrap()["cpus"]["core_scheduling"],
        "Vcpu"
    );
}

#[test]
fn lock_granularity_as_the_original_reads_it() {
    let d = |raw: &str| DiskConfig::parse(raw).map(|d| d.lock_granularity);
    assert_eq!(d("path=/d").unwrap(), LockGranularity::ByteRange);
    assert_eq!(
        d("path=/d,lock_granularity=").unwrap(),
        LockGranularity::ByteRange
    );
    assert_eq!(
        d("path=/d,lock_granularity=byte-range").unwrap(),
        LockGranularity::ByteRange
    );
    assert_eq!(
        d("path=/d,lock_granularity=full").unwrap(),
        LockGranularity::Full
    );
    let err = d("path=/d,lock_granularity=whole").unwrap_err();
    assert!(
        err.to_string().contains("must be byte-range or full"),
        "{err}"
    );
    let c = config(json!({"disks": [{"path": "/d", "lock_granularity": "Full"}]}));
    assert_eq!(c.disks[0].lock_granularity, LockGranularity::Full);
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["disks"][0]["lock_granularity"], "Full");
}

#[test]
fn nested_off_is_taken() {
    assert!(CpusConfig::parse("").unwrap().nested);
    assert!(!CpusConfig::parse("nested=off").unwrap().nested);
    assert!(!CpusConfig::parse("nested=false").unwrap().nested);
    let c = config(json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "nested": false}}));
    assert!(!c.cpus.nested);
    c.cpus.validate().unwrap();
}

#[test]
fn reserve_is_taken() {
    assert!(!MemoryConfig::parse("size=1G").unwrap().reserve);
    assert!(MemoryConfig::parse("size=1G,reserve=on").unwrap().reserve);
}

/// `balloon` is a field of its own, after `rng` as in the original's JSON, absent when there is
/// none; the whole configuration checks its size against the RAM and its id and slot against
/// the other devices'.
#[test]
fn balloon_in_the_whole_configuration() {
    let cfg = config(json!({}));
    assert!(cfg.balloon.is_none());
    assert!(serde_json::to_value(&cfg).unwrap().get("balloon").is_none());
    assert!(config(json!({"balloon": null})).balloon.is_none());
    let cfg = config(json!({"balloon": {"size": 1 << 20, "deflate_on_oom": true}}));
    let text = serde_json::to_string(&cfg).unwrap();
    let at = |k: &str| text.find(&format!("\"{k}\":")).unwrap();
    assert!(
        at("rng") < at("balloon") && at("balloon") < at("serial"),
        "{text}"
    );
    assert_eq!(serde_json::from_str::<VmConfig>(&text).unwrap(), cfg);
    cfg.validate_devices().unwrap();
    // As large as the RAM (512 MiB by default): refused, naming --balloon.
    let big = config(json!({"balloon": {"size": 512u64 << 20}}));
    let e = big.validate_devices().unwrap_err().to_string();
    assert!(e.starts_with("--balloon size=536870912: "), "{e}");
    let small_ram = config(json!({
        "memory": {"size": 1u64 << 30},
        "balloon": {"size": 512u64 << 20}
    }));
    small_ram.validate_devices().unwrap();
    let clash = config(json!({
        "balloon": {"size": 0, "id": "x"},
        "net": [{"id": "x"}]
    }));
    assert!(clash.validate_devices().is_err());
    let slot = config(json!({
        "balloon": {"size": 0, "pci_device_id": 5},
        "disks": [{"path": "/dev/null", "pci_device_id": 5}]
    }));
    assert!(slot.validate_devices().is_err());
    // A key of the original's we do not model is refused unless it asks for nothing.
    let mut odd = config(json!({"balloon": {"size": 0, "colour": "red"}}));
    assert!(odd.check_extra().is_err());
    odd.balloon.as_mut().unwrap().extra = Default::default();
    odd.check_extra().unwrap();
}

#[test]
fn balloon_is_refused_with_hugepages() {
    let mut cfg = config(json!({"balloon": {"size": 64 << 20}}));
    cfg.memory.hugepages = true;
    let e = cfg.validate_devices().unwrap_err();
    assert_eq!(e.option, "--balloon");
    assert!(e.to_string().contains("hugepages=on"), "{e}");
    cfg.memory.hugepages = false;
    cfg.validate_devices().unwrap();
}

/// `--rate-limit-group` as the original reads it, and the rules of a disk in a group: the
/// group must exist, its id is unique among the devices', and a disk has either a limiter of
/// its own or a group.
#[test]
fn rate_limit_groups() {
    let g = RateLimitGroupConfig::parse("id=g0,bw_size=1000,bw_refill_time=100").unwrap();
    assert_eq!(g.id, "g0");
    assert_eq!(g.rate_limiter_config.bandwidth.unwrap().size, 1000);
    assert!(g.rate_limiter_config.ops.is_none());
    for bad in [
        "bw_size=1000,bw_refill_time=100",
        "id=g0",
        "id=g0,bw_size=1000",
        "id=g0,bw_size=1000,bw_refill_time=100,x=1",
    ] {
        assert!(RateLimitGroupConfig::parse(bad).is_err(), "{bad}");
    }
    let group =
        json!([{"id": "g0", "rate_limiter_config": {"ops": {"size": 10, "refill_time": 100}}}]);
    let ok = config(json!({
        "rate_limit_groups": group,
        "disks": [{"path": "/dev/null", "rate_limit_group": "g0"}, {"path": "/dev/null", "rate_limit_group": "g0"}],
    }));
    ok.validate_devices().unwrap();
    let back: VmConfig = serde_json::from_value(serde_json::to_value(&ok).unwrap()).unwrap();
    assert_eq!(back, ok);
    let d = DiskConfig::parse("path=/dev/null,rate_limit_group=g0").unwrap();
    assert_eq!(d.rate_limit_group.as_deref(), Some("g0"));
    for (cfg, what) in [
        (
            json!({"disks": [{"path": "/dev/null", "rate_limit_group": "g1"}], "rate_limit_groups": group}),
            "no --rate-limit-group",
        ),
        (
            json!({"disks": [{"path": "/dev/null", "id": "g0"}], "rate_limit_groups": group}),
            "used twice",
        ),
        (
            json!({"disks": [{"path": "/dev/null", "rate_limit_group": "g0",
                "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}], "rate_limit_groups": group}),
            "either",
        ),
        (
            json!({"rate_limit_groups": [{"id": "g0", "rate_limiter_config": {}}]}),
            "a group needs",
        ),
    ] {
        let e = config(cfg.clone())
            .validate_devices()
            .unwrap_err()
            .to_string();
        assert!(e.contains(what), "{cfg}: {e}");
    }
}

#[test]
fn pci_segments_as_the_original_checks_them() {
    let kernel = std::env::current_exe().unwrap();
    let with = |extra: serde_json::Value| {
        let mut v = json!({"payload": {"kernel": kernel}});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut c: VmConfig = serde_json::from_value(v).unwrap();
        c.validate().map(|()| c)
    };
    // Slot 0 is free on segments past 0 (no host bridge there); a slot may repeat across
    // segments.
    let c = with(json!({
        "platform": {"num_pci_segments": 3},
        "rng": {"src": "/dev/urandom", "pci_segment": 2, "pci_device_id": 0},
        "console": {"mode": "Off", "pci_segment": 1, "pci_device_id": 0},
        "pci_segments": [{"pci_segment": 2, "mmio32_aperture_weight": 2}]
    }))
    .unwrap();
    assert_eq!(c.num_pci_segments(), 3);
    assert_eq!(
        c.pci_segments.as_ref().unwrap()[0].mmio64_aperture_weight,
        1
    );
    for (extra, option, why) in [
        (
            json!({"rng": {"src": "/dev/urandom", "pci_segment": 1}}),
            "--rng",
            "the VM has 1 PCI segment(s)",
        ),
        (
            json!({"platform": {"num_pci_segments": 0}}),
            "--platform",
            "must be 1-96",
        ),
        (
            json!({"platform": {"num_pci_segments": 2},
                   "pci_segments": [{"pci_segment": 2}]}),
            "--pci-segment",
            "the VM has 2 PCI segment(s)",
        ),
        (
            json!({"platform": {"num_pci_segments": 2},
                   "pci_segments": [{"pci_segment": 1, "mmio64_aperture_weight": 0}]}),
            "--pci-segment",
            "at least 1",
        ),
        (
            json!({"pci_segments": [{"pci_segment": 0, "colour": "red"}]}),
            "pci_segments.colour",
            "",
        ),
        (
            json!({"platform": {"num_pci_segments": 2},
                   "rng": {"src": "/dev/urandom", "pci_segment": 1, "pci_device_id": 3},
                   "balloon": {"size": 0, "pci_segment": 1, "pci_device_id": 3}}),
            "--balloon",
            "used twice on segment 1",
        ),
    ] {
        let e = with(extra.clone()).unwrap_err();
        assert_eq!(e.option, option, "{extra}: {e}");
        assert!(e.msg.contains(why), "{extra}: {e}");
    }
}

/// `iommu=on` as the original takes it: every virtio device kind whose DMA the VMM does
/// goes behind the IOMMU, the VM then has one (`iommu` in `vm.info`), and a device on one of
/// `--platform iommu_segments` must be behind it.
#[test]
fn iommu_as_the_original_takes_it() {
    let kernel = std::env::current_exe().unwrap();
    let kernel = kernel.to_str().unwrap();
    let mut c = config(json!({
        "payload": {"kernel": kernel},
        "disks": [{"path": kernel, "iommu": true}],
        "net": [{"iommu": true}],
        "rng": {"src": "/dev/urandom", "iommu": true},
        "vsock": {"cid": 3, "socket": "/tmp/v", "iommu": true},
        "rtc": {"iommu": true},
        "console": {"mode": "Null", "iommu": true},
    }));
    assert!(!c.iommu);
    c.validate().unwrap();
    assert!(c.iommu);
    // No device behind it: no IOMMU; given at the top level: one with no endpoint.
    let mut c = config(json!({"payload": {"kernel": kernel}}));
    c.validate().unwrap();
    assert!(!c.iommu);
    let mut c = config(json!({"payload": {"kernel": kernel}, "iommu": true}));
    c.validate().unwrap();
    assert!(c.iommu);
    // An IOMMU segment: its devices must all be behind the IOMMU (the rng included).
    let seg = |rng_iommu: bool| {
        config(json!({
            "payload": {"kernel": kernel},
            "platform": {"num_pci_segments": 2, "iommu_segments": [1]},
            "rng": {"src": "/dev/urandom", "iommu": rng_iommu, "pci_segment": 1},
            "console": {"mode": "Off"},
        }))
    };
    let e = seg(false).validate().unwrap_err().to_string();
    assert!(
        e.starts_with("--rng") && e.contains("IOMMU PCI segment (1)"),
        "{e}"
    );
    let mut c = seg(true);
    c.validate().unwrap();
    assert!(c.iommu);
    // Devices a vhost-user backend serves cannot be behind it.
    let errors = [
        FsConfig::parse("tag=t,socket=/s,iommu=on").map(drop),
        GenericVhostUserConfig::parse("device_type=block,socket=/s,queue_sizes=[2],iommu=on")
            .map(drop),
        DiskConfig::parse("vhost_user=on,socket=/s,iommu=on").map(drop),
        NetConfig::parse("vhost_user=on,socket=/s,iommu=on").map(drop),
    ];
    for e in errors {
        let e = e.unwrap_err().to_string();
        assert!(e.contains("cannot be placed behind the IOMMU"), "{e}");
    }
}
