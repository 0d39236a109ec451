//! Tests of the configuration types in `lib.rs`.

use super::*;

#[test]
fn cpus() {
    let c = CpusConfig::parse("boot=2,max=4,topology=1:2:1:2").unwrap();
    assert_eq!((c.boot_vcpus, c.max_vcpus), (2, 4));
    assert_eq!(c.topology.unwrap().cores_per_die, 2);
    assert_eq!(CpusConfig::parse("boot=3").unwrap().max_vcpus, 3);
    for (bad, why) in [
        ("boot=0", "boot must be at least 1"),
        ("boot=4,max=2", "boot (4) must not exceed max (2)"),
        ("boot=x", "'boot' must be a number, not 'x'"),
        (
            "boot=2,topology=1:1:1:1",
            "topology describes 1 vCPUs but max is 2",
        ),
        ("boot=1,topology=1:1", "must be threads:cores:dies:packages"),
        ("boot=300", "max must be at most 254"),
        ("boot=1,colour=red", "unknown key 'colour'"),
    ] {
        let e = CpusConfig::parse(bad).unwrap_err();
        assert!(e.to_string().contains(why), "{bad}: {e}");
        assert!(e.to_string().starts_with(&format!("--cpus {bad}: ")));
    }
}

#[test]
fn memory() {
    let m = MemoryConfig::parse("size=1G,shared=on,prefault=on").unwrap();
    assert_eq!(m.size, 1 << 30);
    assert!(m.shared && m.prefault && !m.mergeable && !m.hugepages && m.thp);
    for bad in [
        "size=0",
        "size=12X",
        "size=1000",
        "size=1G,hugepage_size=2M",
        "size=1G,shared=maybe",
    ] {
        assert!(MemoryConfig::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn consoles() {
    assert_eq!(
        ConsoleConfig::parse("--serial", "tty").unwrap().mode,
        ConsoleOutputMode::Tty
    );
    assert_eq!(
        ConsoleConfig::parse("--serial", "off").unwrap().mode,
        ConsoleOutputMode::Off
    );
    let f = ConsoleConfig::parse("--serial", "file=/tmp/x").unwrap();
    assert_eq!(
        (f.mode, f.file),
        (ConsoleOutputMode::File, Some(PathBuf::from("/tmp/x")))
    );
    let s = ConsoleConfig::parse("--serial", "socket=/tmp/s").unwrap();
    assert_eq!(s.mode, ConsoleOutputMode::Socket);
    for bad in ["", "tty,file=/x", "file=", "loud", "file=/x,socket=/y"] {
        assert!(ConsoleConfig::parse("--serial", bad).is_err(), "{bad}");
    }
}

fn config_with(payload: PayloadConfig) -> VmConfig {
    VmConfig {
        cpus: CpusConfig::default(),
        memory: MemoryConfig::default(),
        payload,
        serial: default_serial(),
        console: default_console(),
        disks: Vec::new(),
        net: Vec::new(),
        pmem: Vec::new(),
        fs: Vec::new(),
        generic_vhost_user: Vec::new(),
        rng: RngConfig::default(),
        balloon: None,
        vsock: None,
        platform: None,
        pvpanic: false,
        watchdog: false,
        rate_limit_groups: None,
        tpm: None,
        landlock_enable: false,
        landlock_rules: None,
        numa: None,
        debug_console: Default::default(),
        iommu: false,
        pci_segments: None,
        rtc: None,
        unsupported: UnsupportedConfig::default(),
    }
}

#[test]
fn payload_combinations_follow_the_original() {
    // This crate's manifest stands in for a firmware or kernel file that exists.
    let file: PathBuf = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml").into();
    let mut fw = config_with(PayloadConfig {
        firmware: Some(file.clone()),
        cmdline: Some("console=ttyS0".into()),
        initramfs: Some("/nonexistent/initrd".into()),
        ..Default::default()
    });
    fw.validate().unwrap();
    assert_eq!(
        fw.payload,
        PayloadConfig {
            firmware: Some(file.clone()),
            ..Default::default()
        },
        "a firmware gets neither command line nor initramfs"
    );

    let both = config_with(PayloadConfig {
        firmware: Some("/fw".into()),
        kernel: Some(file.clone()),
        ..Default::default()
    });
    let missing = config_with(PayloadConfig {
        firmware: Some("/nonexistent/fw".into()),
        ..Default::default()
    });
    for (mut cfg, want) in [
        (
            both,
            "--firmware /fw: specifying a kernel is not supported when a firmware is provided",
        ),
        (missing, "--firmware /nonexistent/fw: cannot open: "),
        (
            config_with(PayloadConfig::default()),
            "--kernel: a kernel or a firmware",
        ),
    ] {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}");
    }

    let mut kernel = config_with(PayloadConfig {
        kernel: Some(file),
        cmdline: Some("console=ttyS0".into()),
        ..Default::default()
    });
    kernel.validate().unwrap();
    assert_eq!(kernel.payload.cmdline.as_deref(), Some("console=ttyS0"));
}

#[test]
fn json_field_names_follow_the_api() {
    let cfg = VmConfig {
        cpus: CpusConfig::default(),
        memory: MemoryConfig::default(),
        payload: PayloadConfig {
            kernel: Some("/k".into()),
            ..Default::default()
        },
        serial: default_serial(),
        console: default_console(),
        disks: vec![DiskConfig::parse("path=/d.img,num_queues=2").unwrap()],
        net: vec![NetConfig::parse("tap=t0").unwrap()],
        pmem: Vec::new(),
        fs: Vec::new(),
        generic_vhost_user: Vec::new(),
        rng: RngConfig::default(),
        balloon: None,
        vsock: None,
        platform: None,
        pvpanic: false,
        watchdog: false,
        rate_limit_groups: None,
        tpm: None,
        landlock_enable: false,
        landlock_rules: None,
        numa: None,
        debug_console: Default::default(),
        iommu: false,
        pci_segments: None,
        rtc: None,
        unsupported: UnsupportedConfig::default(),
    };
    let json = serde_json::to_string(&cfg).unwrap();
    for field in [
        "\"boot_vcpus\":1",
        "\"max_phys_bits\":46",
        "\"size\":536870912",
        "\"kernel\":\"/k\"",
        "\"mode\":\"Tty\"",
        "\"disks\":[{\"pci_segment\":0,\"path\":\"/d.img\"",
        "\"num_queues\":2",
        "\"net\":[{\"pci_segment\":0,\"tap\":\"t0\",\"num_queues\":2",
        "\"rng\":{\"pci_segment\":0,\"src\":\"/dev/urandom\"}",
    ] {
        assert!(json.contains(field), "{field} in {json}");
    }
    let back: VmConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
}
