//! The command-line option parsers (`vm-config`'s `XxxConfig::parse`, as `cloud-hypervisor`
//! and `ch-remote` call them) and, for what they accept, validation and the JSON round trip a
//! configuration makes through `vm.info`, a snapshot's `config.json` and `vm.create`.
//!
//! Input: a selector byte (which option), then the option's value (UTF-8, lossily).

use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_config::*;

/// The options, by selector (their command-line names, for the seeds).
pub const OPTIONS: &[&str] = &[
    "disk",
    "net",
    "rng",
    "balloon",
    "cpus",
    "memory",
    "serial",
    "console",
    "platform",
    "pmem",
    "rate-limit-group",
    "restore",
    "tpm",
    "vsock",
    "landlock-rules",
    "fs",
    "memory-zone",
    "numa",
    "debug-console",
    "generic-vhost-user",
    "mac",
];

fn round_trip<T: Serialize + DeserializeOwned>(v: &T) {
    let json = serde_json::to_vec(v).expect("an accepted option serialises");
    let _: T = serde_json::from_slice(&json).expect("an accepted option reads back from JSON");
}

fn check<T: Serialize + DeserializeOwned>(r: Result<T, ConfigError>, validate: impl Fn(&T)) {
    if let Ok(v) = r {
        validate(&v);
        round_trip(&v);
    }
}

pub fn options(data: &[u8]) {
    let Some((&sel, raw)) = data.split_first() else {
        return;
    };
    let raw = String::from_utf8_lossy(raw);
    let raw = raw.as_ref();
    match usize::from(sel) % OPTIONS.len() {
        0 => check(DiskConfig::parse(raw), |v| drop(v.validate())),
        1 => check(NetConfig::parse(raw), |v| drop(v.validate())),
        2 => check(RngConfig::parse(raw), |_| ()),
        3 => check(BalloonConfig::parse(raw), |_| ()),
        4 => check(CpusConfig::parse(raw), |_| ()),
        5 => check(MemoryConfig::parse(raw), |_| ()),
        6 => check(ConsoleConfig::parse("--serial", raw), |_| ()),
        7 => check(ConsoleConfig::parse("--console", raw), |_| ()),
        8 => check(PlatformConfig::parse(raw), |_| ()),
        9 => check(PmemConfig::parse(raw), |_| ()),
        10 => check(RateLimitGroupConfig::parse(raw), |_| ()),
        11 => check(RestoreConfig::parse(raw), |v| drop(v.validate())),
        12 => check(TpmConfig::parse(raw), |_| ()),
        13 => check(VsockConfig::parse(raw), |_| ()),
        14 => check(LandlockConfig::parse(raw), |v| drop(v.validate())),
        15 => check(FsConfig::parse(raw), |v| drop(v.validate())),
        // A zone is checked with `--memory` as the original requires it beside zones.
        16 => check(
            MemoryConfig::parse_with_zones("size=0,hotplug_method=virtio-mem", &[raw]),
            |_| (),
        ),
        17 => check(NumaConfig::parse(raw), |_| ()),
        18 => check(DebugConsoleConfig::parse(raw), |v| drop(v.validate())),
        19 => check(GenericVhostUserConfig::parse(raw), |v| drop(v.validate())),
        _ => {
            if let Ok(m) = raw.parse::<mac::MacAddr>() {
                assert_eq!(m.to_string().parse::<mac::MacAddr>().ok(), Some(m));
            }
        }
    }
}

/// Seeds: option values as the README, the docs and the original's documentation write them.
pub fn seeds() -> Vec<Vec<u8>> {
    let values: &[(&str, &str)] = &[
        ("disk", "path=/var/img/disk.qcow2,readonly=on,direct=on,num_queues=2,queue_size=128,id=disk0"),
        ("disk", "path=disk.raw,image_type=raw,serial=abc,rate_limit_group=g0,pci_segment=0"),
        ("disk", "path=a.vhdx,bw_size=1048576,bw_refill_time=100,ops_size=100,ops_refill_time=10"),
        ("disk", "vhost_user=on,socket=/tmp/vub.sock,num_queues=4"),
        ("net", "tap=tap0,mac=52:54:00:12:34:56,ip=192.168.1.1,mask=255.255.255.0,num_queues=2"),
        ("net", "fd=[3,4],mtu=9000,offload_tso=off,queue_size=256,id=net0"),
        ("rng", "src=/dev/urandom"),
        ("balloon", "size=1G,deflate_on_oom=on,free_page_reporting=on"),
        ("cpus", "boot=2,max=4,kvm_hyperv=off,max_phys_bits=46,affinity=[0@[0-3],1@[4,5]]"),
        ("cpus", "boot=1,topology=1:1:1:1"),
        ("memory", "size=1G,shared=on,hugepages=off,hotplug_method=virtio-mem,hotplug_size=2G"),
        ("memory", "size=512M,mergeable=on,prefault=on,thp=on"),
        ("serial", "tty"),
        ("debug-console", "off,iobase=0xe9"),
        ("debug-console", "file=/tmp/debug.log,iobase=0x402"),
        ("serial", "file=/tmp/serial.log"),
        ("serial", "socket=/tmp/serial.sock"),
        ("console", "off"),
        ("console", "pty"),
        ("platform", "num_pci_segments=1,serial_number=ABC,uuid=1e8aa0a3-7eb5-4c8c-a5b5-3e2fd3c6d13f,oem_strings=[a,b]"),
        ("pmem", "file=/tmp/pmem.img,size=128M,discard_writes=on,id=pmem0"),
        ("rate-limit-group", "id=g0,bw_size=1000,bw_refill_time=100"),
        ("restore", "source_url=file:///var/snap,memory_restore_mode=ondemand,resume=on,prefault=off"),
        ("restore", "source_url=file:///s,net_fds=[net0@[3,4]]"),
        ("restore", "source_url=file:///s,net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:12:34:56]"),
        ("tpm", "socket=/tmp/swtpm.sock"),
        ("vsock", "cid=3,socket=/tmp/vsock.sock,id=vsock0"),
        ("landlock-rules", "path=/tmp/dir,access=rw"),
        ("fs", "tag=myfs,socket=/tmp/vfs.sock,num_queues=1,queue_size=1024,id=fs0"),
        ("generic-vhost-user", "device_type=block,socket=/tmp/g.sock,queue_sizes=[256,128],id=g0"),
        ("generic-vhost-user", "virtio_id=26,socket=/tmp/g.sock,queue_sizes=[1024,1024],pci_device_id=7"),
        ("memory-zone", "id=mem0,size=1G,shared=on,hotplug_size=512M,hotplugged_size=128M"),
        ("memory-zone", "id=z1,size=256M,file=/dev/shm/zone,prefault=on,host_numa_node=0"),
        ("numa", "guest_numa_id=0,cpus=[0-1,3],distances=[1@20,2@30],memory_zones=[mem0,z1]"),
        ("mac", "52:54:00:ab:cd:ef"),
    ];
    values
        .iter()
        .map(|(opt, v)| {
            let sel = OPTIONS
                .iter()
                .position(|o| o == opt)
                .expect("a known option") as u8;
            let mut s = vec![sel];
            s.extend_from_slice(v.as_bytes());
            s
        })
        .collect()
}
