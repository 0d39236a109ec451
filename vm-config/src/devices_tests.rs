//! Tests of `devices.rs`: the disk, net and rng options as the original reads them.

use std::net::Ipv4Addr;

use super::*;

#[test]
fn disk() {
    let d = DiskConfig::parse(
        "path=/x.img,readonly=on,num_queues=2,queue_size=64,serial=abc,id=d0,pci_device_id=5",
    )
    .unwrap();
    assert!(d.readonly && !d.direct);
    assert_eq!((d.num_queues, d.queue_size), (2, 64));
    assert_eq!(d.serial.as_deref(), Some("abc"));
    assert_eq!(d.pci_common.id.as_deref(), Some("d0"));
    assert_eq!(d.pci_common.pci_device_id, Some(5));
    for (bad, why) in [
        ("readonly=on", "path="),
        ("path=", "path="),
        ("path=/x,num_queues=0", "num_queues"),
        ("path=/x,queue_size=100", "power of two"),
        ("path=/x,pci_device_id=0", "0 is its host bridge"),
        ("path=/x,pci_device_id=0", "1-31"),
        ("path=/x,pci_device_id=32", "1-31"),
        ("path=/x,image_type=iso", "image_type"),
        (
            "path=/x,vhost_user=on",
            "'path' does not go with vhost_user=on",
        ),
        ("vhost_user=on", "go together"),
        ("socket=/s", "socket= needs vhost_user=on"),
        ("vhost_user=on,socket=/s,serial=x", "'serial' does not go"),
        (
            "path=/x,vhost_reconnect_timeout=5",
            "vhost_reconnect_timeout= needs vhost_user=on",
        ),
        (
            "vhost_user=on,socket=/s,vhost_reconnect_timeout=3601",
            "at most 3600 seconds",
        ),
        (
            "vhost_user=on,socket=/s,vhost_reconnect_timeout=-1",
            "must be a number",
        ),
        (
            "vhost_user=on,socket=/s,iommu=on",
            "cannot be placed behind the IOMMU",
        ),
        ("path=/x,id=__mine", "reserved"),
    ] {
        let e = DiskConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
        assert!(e.starts_with("--disk "), "{e}");
    }
}

/// `vhost_reconnect_timeout` (ours): with vhost_user=on only, in the JSON only when given,
/// and checked for the API's configurations too.
/// `queue_affinity=[<queue>@[<host cpus>],...]`, as the original reads and writes it; a queue
/// the disk does not have, one listed twice or one without CPUs is refused.
#[test]
fn disk_queue_affinity() {
    let d = DiskConfig::parse("path=/x,num_queues=3,queue_affinity=[0@[1],2@[3,5-6]]").unwrap();
    let a = d.queue_affinity.as_ref().unwrap();
    assert_eq!((a[0].queue_index, a[0].host_cpus.as_slice()), (0, &[1][..]));
    assert_eq!(
        (a[1].queue_index, a[1].host_cpus.as_slice()),
        (2, &[3, 5, 6][..])
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(
        json["queue_affinity"],
        serde_json::json!([{"queue_index": 0, "host_cpus": [1]},
                           {"queue_index": 2, "host_cpus": [3, 5, 6]}])
    );
    let back: DiskConfig = serde_json::from_value(json).unwrap();
    assert_eq!(back, d);
    assert!(DiskConfig::parse("path=/x")
        .unwrap()
        .queue_affinity
        .is_none());
    for (bad, why) in [
        (
            "path=/x,num_queues=2,queue_affinity=[2@[0]]",
            "queue_affinity: queue 2 is not below num_queues (2)",
        ),
        (
            "path=/x,num_queues=2,queue_affinity=[1@[0],1@[1]]",
            "queue 1 is given twice",
        ),
        ("path=/x,queue_affinity=[0@[]]", "'' is not a number"),
        ("path=/x,queue_affinity=[0@[1024]]", "more than 1023"),
        (
            "path=/x,queue_affinity=[x@[0]]",
            "'x' is not a queue number",
        ),
        ("path=/x,queue_affinity=0@0", "not a list in brackets"),
        (
            "vhost_user=on,socket=/s,queue_affinity=[0@[0]]",
            "'queue_affinity' does not go with vhost_user=on",
        ),
    ] {
        let e = DiskConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn disk_vhost_reconnect_timeout() {
    let d = DiskConfig::parse("vhost_user=on,socket=/s,vhost_reconnect_timeout=2").unwrap();
    assert_eq!(d.vhost_reconnect_timeout, Some(2));
    assert_eq!(
        serde_json::to_value(&d).unwrap()["vhost_reconnect_timeout"],
        2
    );
    let d = DiskConfig::parse("vhost_user=on,socket=/s").unwrap();
    assert_eq!(d.vhost_reconnect_timeout, None);
    assert!(serde_json::to_value(&d)
        .unwrap()
        .get("vhost_reconnect_timeout")
        .is_none());
    let api: DiskConfig =
        serde_json::from_str(r#"{"path": "/dev/null", "vhost_reconnect_timeout": 5}"#).unwrap();
    let e = api.validate().unwrap_err().to_string();
    assert!(e.contains("needs vhost_user=on"), "{e}");
}

/// What the original's `--disk` takes and we now take as it does.
#[test]
fn disk_keys_as_the_original_reads_them() {
    // Empty values are not given: defaults apply.
    let d = DiskConfig::parse(
        "path=/x,readonly=,num_queues=,queue_size=,serial=,id=,image_type=,pci_device_id=",
    )
    .unwrap();
    assert_eq!(d, DiskConfig::parse("path=/x").unwrap());
    assert_eq!((d.num_queues, d.queue_size, d.sparse), (1, 128, true));
    assert_eq!((d.pci_common.id, d.serial), (None, None));
    assert_eq!(d.image_type, ImageType::Unknown);
    // The off value of what we lack is no request; on is refused.
    let d = DiskConfig::parse("path=/x,vhost_user=off,iommu=false").unwrap();
    assert!(!d.vhost_user && !d.pci_common.iommu);
    // The original's test knobs.
    let d = DiskConfig::parse("path=/x,_disable_io_uring=on,_disable_aio=on").unwrap();
    assert!(d.disable_io_uring && d.disable_aio);
    // Image types in any case; `vpc` is qemu's name, not the original's.
    for (t, want) in [
        ("raw", ImageType::Raw),
        ("QCOW2", ImageType::Qcow2),
        ("vhd", ImageType::FixedVhd),
        ("Vhdx", ImageType::Vhdx),
    ] {
        let d = DiskConfig::parse(&format!("path=/x,image_type={t}")).unwrap();
        assert_eq!(d.image_type, want, "{t}");
    }
    assert!(DiskConfig::parse("path=/x,image_type=vpc").is_err());
    assert_eq!(
        DiskConfig::parse("path=/x,image_type=vmdk")
            .unwrap()
            .image_type,
        ImageType::FlatVmdk
    );
    // The original refuses queues of two descriptors and serials over 20 bytes.
    assert!(DiskConfig::parse("path=/x,queue_size=4").is_ok());
    assert!(DiskConfig::parse("path=/x,queue_size=2").is_err());
    assert!(DiskConfig::parse(&format!("path=/x,serial={}", "s".repeat(20))).is_ok());
    assert!(DiskConfig::parse(&format!("path=/x,serial={}", "s".repeat(21))).is_err());
    // A quoted path may hold commas.
    let d = DiskConfig::parse("path=\"/a,b.img\",readonly=on").unwrap();
    assert_eq!(d.path, PathBuf::from("/a,b.img"));
}

/// The JSON the original's vm.info shows for a disk given as `path=/x`, before boot.
#[test]
fn disk_json_has_the_originals_fields() {
    let d = DiskConfig::parse("path=/x").unwrap();
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::json!({
            "pci_segment": 0, "path": "/x", "readonly": false, "direct": false,
            "num_queues": 1, "queue_size": 128, "vhost_user": false,
            "disable_io_uring": false, "disable_aio": false, "backing_files": false,
            "sparse": true, "image_type": "Unknown", "lock_granularity": "ByteRange"
        })
    );
    let back: DiskConfig =
        serde_json::from_str(r#"{"path": "/x", "image_type": "Qcow2", "id": "d"}"#).unwrap();
    assert_eq!(back.image_type, ImageType::Qcow2);
    assert!(
        serde_json::from_str::<DiskConfig>(r#"{"path": "/x", "image_type": "qcow3"}"#).is_err()
    );
}

/// `--disk` and `--net` take the rate limiter's keys as the original reads them (a bucket
/// only when its size and refill time are non-zero, the burst defaulting to 0).
#[test]
fn rate_limits() {
    let d = DiskConfig::parse(
        "path=/x,bw_size=1000,bw_refill_time=100,bw_one_time_burst=5,ops_size=10,ops_refill_time=1000",
    )
    .unwrap();
    let r = d.rate_limiter_config.unwrap();
    assert_eq!(
        r.bandwidth,
        Some(crate::TokenBucketConfig {
            size: 1000,
            one_time_burst: Some(5),
            refill_time: 100
        })
    );
    assert_eq!(
        r.ops.map(|b| (b.size, b.one_time_burst)),
        Some((10, Some(0)))
    );
    let d = DiskConfig::parse("path=/x,ops_size=10,ops_refill_time=1000").unwrap();
    assert!(d.rate_limiter_config.unwrap().bandwidth.is_none());
    let back: DiskConfig = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
    assert_eq!(back, d);
    let n = NetConfig::parse("tap=t0,bw_size=1000,bw_refill_time=100").unwrap();
    assert_eq!(n.rate_limiter_config.unwrap().bandwidth.unwrap().size, 1000);
    let back: NetConfig = serde_json::from_value(serde_json::to_value(&n).unwrap()).unwrap();
    assert_eq!(back, n);
    for (size, refill) in [
        ("bw_size", "bw_refill_time"),
        ("ops_size", "ops_refill_time"),
    ] {
        for none in [
            format!("{size}=0,{refill}=100"),
            format!("{size}=1000,{refill}=0"),
            format!("{size}=1000"),
            format!("{refill}=100"),
            format!("{size}=,{refill}="),
        ] {
            let d = DiskConfig::parse(&format!("path=/x,{none}")).unwrap();
            assert!(d.rate_limiter_config.is_none(), "{none}");
            let n = NetConfig::parse(&format!("tap=t0,{none}")).unwrap();
            assert!(n.rate_limiter_config.is_none(), "{none}");
        }
    }
    assert!(DiskConfig::parse("path=/x,bw_one_time_burst=x").is_err());
    assert!(NetConfig::parse("tap=t0,bw_size=lots").is_err());
    assert!(serde_json::from_str::<DiskConfig>(
        r#"{"path": "/x", "rate_limiter_config": {"bandwidth": {"size": 1, "refill_time": 1, "x": 1}}}"#
    )
    .is_err());
}

#[test]
fn net() {
    let n = NetConfig::parse("tap=tap7,ip=10.1.2.1,mask=255.255.0.0,mac=52:54:00:00:00:01,id=n0")
        .unwrap();
    assert_eq!(n.tap.as_deref(), Some("tap7"));
    assert_eq!(n.ip, Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 1))));
    assert_eq!(n.mac.as_deref(), Some("52:54:00:00:00:01"));
    assert_eq!((n.num_queues, n.queue_size), (2, 256));
    // IPv6 host addresses, as the original takes them.
    let v6 = NetConfig::parse("ip=fd00::1,mask=ffff:ffff:ffff:ffff::").unwrap();
    assert_eq!(v6.ip, Some("fd00::1".parse().unwrap()));
    let q = NetConfig::parse("tap=t0,num_queues=8,offload_tso=off").unwrap();
    assert_eq!(
        (q.num_queues, q.offload_tso, q.offload_csum),
        (8, false, true)
    );
    for (bad, why) in [
        ("ip=fd00::1,mask=255.255.255.0", "one family"),
        ("ip=fd00::1,mask=ffff::ff", "contiguous"),
        ("ip=1.2.3", "not an IP address"),
        ("ip=10.0.0.1,mask=255.0.255.0", "contiguous"),
        ("mac=01:00:5e:00:00:01", "multicast"),
        ("mac=1:2:3:4:5:6", "not a MAC address"),
        ("num_queues=3", "even number"),
        ("num_queues=0", "even number"),
        ("num_queues=64", "even number"),
        ("tap=averyveryverylongname", "at most 15 bytes"),
        ("vhost_user=on", "needs socket="),
        ("vhost_mode=server", "needs vhost_user=on"),
        ("vhost_mode=sideways", "client or server"),
        ("fd=x", "descriptors are numbers"),
        ("fd=[3,-4]", "descriptors are numbers"),
        ("fd=[3,4],num_queues=2", "one descriptor per queue pair"),
        ("fd=3,tap=t0", "cannot be combined"),
        ("fd=3,mtu=1400", "cannot be combined"),
        (
            "vhost_user=on,socket=/s,iommu=on",
            "cannot be placed behind the IOMMU",
        ),
    ] {
        let e = NetConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    // Descriptors: one queue pair each; from JSON they mean nothing (-1) until a restore.
    let n = NetConfig::parse("fd=[3,4],mac=12:34:56:78:9a:bc").unwrap();
    assert_eq!((n.fds.clone(), n.num_queues), (Some(vec![3, 4]), 4));
    assert_eq!(n.fds_usable(), Ok(()));
    assert_eq!(NetConfig::parse("fd=5").unwrap().num_queues, 2);
    let json = serde_json::to_string(&n).unwrap();
    assert!(json.contains(r#""fds":[3,4]"#), "{json}");
    let back: NetConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back.fds, Some(vec![-1, -1]));
    assert!(back.fds_usable().unwrap_err().contains("net_fds"));
}

/// The README's `--net "tap=,mac=,ip=,mask="`: every key not given. The TAP is then a new
/// one the kernel names, the guest MAC random, and the host side gets no address.
#[test]
fn net_empty_values_are_not_given() {
    let n = NetConfig::parse("tap=,mac=,ip=,mask=").unwrap();
    assert_eq!(n, NetConfig::parse("").unwrap());
    assert_eq!((&n.tap, n.ip, n.mask, &n.mac), (&None, None, None, &None));
    assert_eq!(
        serde_json::to_value(&n).unwrap(),
        serde_json::json!({
            "pci_segment": 0, "num_queues": 2, "queue_size": 256, "vhost_user": false,
            "vhost_mode": "Client", "offload_tso": true, "offload_ufo": true,
            "offload_csum": true
        })
    );
}

/// The original checks these when it validates the configuration; we refuse the same.
#[test]
fn net_rules_of_the_original() {
    // An address and its mask go together.
    assert!(NetConfig::parse("ip=10.0.0.1")
        .unwrap_err()
        .to_string()
        .contains("mask="));
    assert!(NetConfig::parse("mask=255.0.0.0")
        .unwrap_err()
        .to_string()
        .contains("ip="));
    assert!(NetConfig::parse("ip=10.0.0.1,mask=255.0.0.0").is_ok());
    // TSO and UFO need checksum offload.
    assert!(NetConfig::parse("offload_csum=off").is_err());
    assert!(NetConfig::parse("offload_csum=off,offload_tso=off,offload_ufo=off").is_ok());
    // The MTU virtio-net asks for at least.
    assert!(NetConfig::parse("mtu=1279").is_err());
    assert!(NetConfig::parse("mtu=1280").is_ok());
    // MACs are six two-digit bytes, written back in lower case.
    let n = NetConfig::parse("mac=52:54:00:AB:cd:EF").unwrap();
    assert_eq!(n.mac.as_deref(), Some("52:54:00:ab:cd:ef"));
    // The defaults of what we lack are accepted; anything else is not.
    let n = NetConfig::parse("vhost_user=false,vhost_mode=Client").unwrap();
    assert_eq!((n.vhost_user, n.vhost_mode), (false, VhostMode::Client));
    // `id=` is not given.
    assert_eq!(NetConfig::parse("id=").unwrap().pci_common.id, None);
}

/// Paths whose opening would block the VMM, or that are no image at all, are refused.
#[test]
fn validate_refuses_fifos_sockets_and_directories() {
    let dir = std::env::temp_dir().join(format!("vm-config-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(dir.join("sock")).unwrap();
    for p in [fifo.clone(), dir.join("sock"), dir.clone()] {
        let d = DiskConfig::parse(&format!("path={}", p.display())).unwrap();
        let e = d.validate().unwrap_err().to_string();
        assert!(e.contains("not a disk image"), "{e}");
    }
    let rng = RngConfig::parse(&format!("src={}", fifo.display())).unwrap();
    assert!(rng
        .validate()
        .unwrap_err()
        .to_string()
        .contains("not an entropy source"));
    // The same for a kernel: a FIFO as the payload would block vm.create.
    let mut cfg: crate::VmConfig =
        serde_json::from_value(serde_json::json!({"payload": {"kernel": fifo}})).unwrap();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validate_catches_what_the_api_can_send() {
    let mut d = DiskConfig::parse("path=/dev/null").unwrap();
    d.validate().unwrap();
    for bad in [
        DiskConfig {
            num_queues: 0,
            ..d.clone()
        },
        DiskConfig {
            queue_size: 0,
            ..d.clone()
        },
        DiskConfig {
            queue_size: 100,
            ..d.clone()
        },
        DiskConfig {
            pci_common: PciDeviceCommonConfig {
                pci_device_id: Some(32),
                ..Default::default()
            },
            ..d.clone()
        },
        DiskConfig {
            queue_affinity: Some(vec![crate::VirtQueueAffinity {
                queue_index: 0,
                host_cpus: Vec::new(),
            }]),
            ..d.clone()
        },
        DiskConfig {
            pci_common: PciDeviceCommonConfig {
                pci_device_id: Some(0),
                ..Default::default()
            },
            ..d.clone()
        },
        DiskConfig {
            path: "/nonexistent".into(),
            ..d.clone()
        },
        DiskConfig {
            vhost_user: true,
            ..d.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    d.image_type = ImageType::FlatVmdk;
    d.validate().unwrap();
    let n = NetConfig::parse("").unwrap();
    n.validate().unwrap();
    for bad in [
        NetConfig {
            num_queues: 5,
            ..n.clone()
        },
        NetConfig {
            queue_size: 3,
            ..n.clone()
        },
        NetConfig {
            mtu: Some(10),
            ..n.clone()
        },
        NetConfig {
            mac: Some("zz".into()),
            ..n.clone()
        },
        NetConfig {
            ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..n.clone()
        },
        NetConfig {
            pci_common: PciDeviceCommonConfig {
                id: Some("__console".into()),
                ..Default::default()
            },
            ..n.clone()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let r = RngConfig {
        src: "/nonexistent".into(),
        ..RngConfig::default()
    };
    assert!(r.validate().is_err());
}

#[test]
fn rng() {
    assert_eq!(
        RngConfig::parse("src=/dev/urandom").unwrap(),
        RngConfig::default()
    );
    assert_eq!(
        RngConfig::parse("src=/r,id=rng0")
            .unwrap()
            .pci_common
            .id
            .as_deref(),
        Some("rng0")
    );
    // `src=` is not given: the default source, as the original.
    assert_eq!(RngConfig::parse("src=").unwrap(), RngConfig::default());
    assert!(RngConfig::parse("src=/r,pci_device_id=32").is_err());
    assert_eq!(
        RngConfig::parse("src=/r,pci_segment=2,pci_device_id=0")
            .unwrap()
            .pci_common
            .pci_segment,
        2
    );
    assert!(
        RngConfig::parse("src=/r,iommu=on")
            .unwrap()
            .pci_common
            .iommu
    );
    assert_eq!(
        serde_json::to_value(RngConfig::default()).unwrap(),
        serde_json::json!({"pci_segment": 0, "src": "/dev/urandom"})
    );
}

#[test]
fn balloon() {
    let b = BalloonConfig::parse("size=1G,deflate_on_oom=on,free_page_reporting=on").unwrap();
    assert_eq!(b.size, 1 << 30);
    assert!(b.deflate_on_oom && b.free_page_reporting);
    let b = BalloonConfig::parse("size=4096,id=b0,pci_device_id=7,iommu=off").unwrap();
    assert_eq!(
        (b.size, b.deflate_on_oom, b.free_page_reporting),
        (4096, false, false)
    );
    assert_eq!(
        (b.pci_common.id.as_deref(), b.pci_common.pci_device_id),
        (Some("b0"), Some(7))
    );
    // Empty values are not given; the toggles read as the original's.
    let b = BalloonConfig::parse("size=0,deflate_on_oom=,free_page_reporting=TRUE").unwrap();
    assert!(!b.deflate_on_oom && b.free_page_reporting);
    for (bad, why) in [
        ("", "size= is required"),
        ("size=", "size= is required"),
        ("deflate_on_oom=on", "size= is required"),
        ("size=1X", "invalid size"),
        (
            "size=1G,deflate_on_oom=maybe",
            "must be on, off, true or false",
        ),
        ("size=1G,colour=red", "unknown key 'colour'"),
        ("size=1G,pci_device_id=40", "must be 1-31"),
        ("size=1G,id=__balloon", "reserved"),
    ] {
        let e = BalloonConfig::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
        let prefix = if bad.is_empty() {
            "--balloon:"
        } else {
            "--balloon "
        };
        assert!(e.starts_with(prefix), "{e}");
    }
}

/// The original's JSON: `size` required, the toggles default to off and are always written.
#[test]
fn balloon_json_as_the_api() {
    let b: BalloonConfig = serde_json::from_value(serde_json::json!({"size": 1024})).unwrap();
    assert_eq!(b, BalloonConfig::parse("size=1K").unwrap());
    assert_eq!(
        serde_json::to_value(&b).unwrap(),
        serde_json::json!({
            "pci_segment": 0,
            "size": 1024,
            "deflate_on_oom": false,
            "free_page_reporting": false
        })
    );
    assert!(serde_json::from_value::<BalloonConfig>(serde_json::json!({})).is_err());
    let b: BalloonConfig = serde_json::from_value(serde_json::json!(
        {"size": 2048, "deflate_on_oom": true, "free_page_reporting": true, "id": "b"}
    ))
    .unwrap();
    assert!(b.deflate_on_oom && b.free_page_reporting);
    assert_eq!(
        serde_json::from_value::<BalloonConfig>(serde_json::to_value(&b).unwrap()).unwrap(),
        b
    );
}

#[test]
fn balloon_must_be_smaller_than_ram() {
    let ram = 512 << 20;
    BalloonConfig::parse("size=511M")
        .unwrap()
        .validate(ram)
        .unwrap();
    BalloonConfig::parse("size=0")
        .unwrap()
        .validate(ram)
        .unwrap();
    for size in ["512M", "1G"] {
        let e = BalloonConfig::parse(&format!("size={size}"))
            .unwrap()
            .validate(ram)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--balloon size="), "{e}");
        assert!(
            e.contains("smaller than the guest RAM (536870912 bytes)"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

/// Through the API a vhost-user disk has no `path` (the original's DiskConfig does not require
/// one); it stays out of the JSON then. Any other disk without one is refused.
#[test]
fn disk_json_path_optional_only_with_vhost_user() {
    let d: DiskConfig =
        serde_json::from_str(r#"{"vhost_user":true,"vhost_socket":"/run/vub.sock"}"#).unwrap();
    assert!(d.validate().is_ok());
    let back = serde_json::to_value(&d).unwrap();
    assert!(back.get("path").is_none(), "{back}");
    let d: DiskConfig = serde_json::from_str(r#"{"readonly":true}"#).unwrap();
    let e = d.validate().unwrap_err().to_string();
    assert!(e.contains("path=<disk image> is required"), "{e}");
}

/// The PCI keys are one flattened object, as the original's `PciDeviceCommonConfig`: read from
/// the device's own JSON object (never taken for keys this VMM does not model), and written
/// first, in the original's order, with `id`, `iommu` and `pci_device_id` left out when empty.
#[test]
fn pci_keys_flattened_first_in_json() {
    let d: DiskConfig = serde_json::from_str(
        r#"{"path":"/x","pci_device_id":3,"iommu":false,"pci_segment":1,"id":"d0"}"#,
    )
    .unwrap();
    assert!(d.extra.0.is_empty(), "{:?}", d.extra);
    assert_eq!(
        d.pci_common,
        PciDeviceCommonConfig {
            id: Some("d0".into()),
            iommu: false,
            pci_segment: 1,
            pci_device_id: Some(3)
        }
    );
    let text = serde_json::to_string(&d).unwrap();
    assert!(
        text.starts_with(r#"{"id":"d0","pci_segment":1,"pci_device_id":3,"path":"/x","#),
        "{text}"
    );
    let r = RngConfig::default();
    let text = serde_json::to_string(&r).unwrap();
    assert_eq!(text, r#"{"pci_segment":0,"src":"/dev/urandom"}"#);
    let fs: crate::FsConfig =
        serde_json::from_str(r#"{"tag":"t","socket":"/s","iommu":true}"#).unwrap();
    assert!(fs.pci_common.iommu && fs.extra.0.is_empty());
    assert!(fs.validate().unwrap_err().to_string().contains("iommu"));
}
