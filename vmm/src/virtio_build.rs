//! What each configured virtio device becomes: a disk image opened and locked, a TAP set up,
//! an entropy source opened; the device ready to be placed on the PCI bus, at boot or when
//! it is hot-added.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use log::info;
use virtio_devices::rate_limiter::{
    BucketConfig, Buckets, LimiterConfig, RateLimiter, SharedBuckets,
};
use virtio_devices::{
    Block, BlockConfig, Net, Rng, VhostUserBlock, VhostUserFs, VirtioDevice, Vsock,
};

use crate::config::{
    BalloonConfig, DiskConfig, FsConfig, ImageType, MemoryConfig, NetConfig, RngConfig, VmConfig,
    VsockConfig,
};
use crate::pci_setup::PciSetupError;

/// A device waiting for its slot: option it came from, id, wanted slot, and what it holds
/// that the VM must keep track of.
pub struct NewDevice {
    pub option: &'static str,
    pub id: String,
    /// The PCI segment it goes on (`pci_segment=`).
    pub segment: u16,
    pub slot: Option<u8>,
    pub dev: Box<dyn VirtioDevice>,
    /// A disk's image lock (a migration hands it over).
    pub lock: Option<block::DiskLock>,
    /// The format a disk was opened as (the configuration records it).
    pub image_type: Option<ImageType>,
    /// A pmem device's mapping, placed in guest-physical memory with the device.
    pub pmem: Option<crate::pmem::PmemBacking>,
    /// Behind the virtual IOMMU (`iommu=on`).
    pub iommu: bool,
}

fn disk_error(d: &DiskConfig, msg: String) -> PciSetupError {
    PciSetupError::Device {
        option: "--disk",
        value: d.path.display().to_string(),
        msg,
    }
}

/// The block layer's format for a configured image type; `None`: probe the header.
fn block_image_type(t: ImageType) -> Option<block::ImageType> {
    match t {
        ImageType::Raw => Some(block::ImageType::Raw),
        ImageType::Qcow2 => Some(block::ImageType::Qcow2),
        ImageType::FixedVhd => Some(block::ImageType::Vhd),
        ImageType::Vhdx => Some(block::ImageType::Vhdx),
        ImageType::FlatVmdk => Some(block::ImageType::Vmdk),
        // Probing finds what the file is (never a VMDK: block::open_disk).
        ImageType::Unknown => None,
    }
}

/// The configuration's name for a format the block layer opened.
fn config_image_type(t: block::ImageType) -> ImageType {
    match t {
        block::ImageType::Raw => ImageType::Raw,
        block::ImageType::Qcow2 => ImageType::Qcow2,
        block::ImageType::Vhd => ImageType::FixedVhd,
        block::ImageType::Vhdx => ImageType::Vhdx,
        block::ImageType::Vmdk => ImageType::FlatVmdk,
    }
}

fn open_disk(d: &DiskConfig) -> Result<(Box<dyn block::DiskFile>, block::DiskLock), PciSetupError> {
    let image_type = block_image_type(d.image_type);
    let opts = block::OpenOptions {
        readonly: d.readonly,
        direct: d.direct,
        image_type,
        backing_files: d.backing_files,
        sparse: d.sparse,
        lock_granularity: match d.lock_granularity {
            vm_config::LockGranularity::ByteRange => block::LockGranularity::ByteRange,
            vm_config::LockGranularity::Full => block::LockGranularity::Full,
        },
    };
    block::open_disk_locked(&d.path, &opts).map_err(|e| disk_error(d, e.to_string()))
}

/// The device's limiter from the configuration's (the same buckets, burst 0 when not given).
pub fn limiter_config(c: &vm_config::RateLimiterConfig) -> LimiterConfig {
    let bucket = |b: &vm_config::TokenBucketConfig| BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    };
    LimiterConfig {
        bandwidth: c.bandwidth.as_ref().map(bucket),
        ops: c.ops.as_ref().map(bucket),
    }
}

/// The buckets of each `--rate-limit-group`, by id: every disk of a group draws from them.
pub type RateLimitGroups = BTreeMap<String, SharedBuckets>;

/// The configuration's rate limit groups, their buckets full.
pub fn rate_limit_groups(cfg: &VmConfig) -> RateLimitGroups {
    cfg.rate_limit_groups
        .iter()
        .flatten()
        .filter_map(|g| {
            let b = Buckets::new(&limiter_config(&g.rate_limiter_config))?;
            Some((g.id.clone(), Arc::new(Mutex::new(b))))
        })
        .collect()
}

/// A `--disk` (or `vm.add-disk`) device named `id`; with `rate_limit_group`, it shares that
/// group's buckets (with a timer of its own).
pub fn disk(
    d: &DiskConfig,
    id: String,
    groups: &RateLimitGroups,
) -> Result<NewDevice, PciSetupError> {
    if let Some(socket) = &d.vhost_socket {
        return vhost_user_disk(d, socket, id);
    }
    let (disk, lock) = open_disk(d)?;
    let image_type = config_image_type(disk.image_type());
    let serial = d.serial.clone().unwrap_or_else(|| id.clone());
    let mut dev = Block::new(
        disk,
        BlockConfig {
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            serial,
            io_uring: d.direct && !d.disable_io_uring,
            queue_affinity: queue_affinity(d)?,
        },
    )
    .map_err(|e| disk_error(d, e.to_string()))?;
    let io = |e: std::io::Error| disk_error(d, e.to_string());
    if let Some(c) = &d.rate_limiter_config {
        let l = RateLimiter::new(&limiter_config(c)).map_err(io)?;
        dev.set_rate_limiter(l).map_err(io)?;
    }
    if let Some(g) = &d.rate_limit_group {
        let b = groups
            .get(g)
            .ok_or_else(|| disk_error(d, format!("rate_limit_group={g}: no such group")))?;
        let l = RateLimiter::shared(b.clone()).map_err(io)?;
        dev.set_rate_limiter(Some(l)).map_err(io)?;
    }
    Ok(NewDevice {
        option: "--disk",
        id,
        slot: d.pci_common.pci_device_id,
        segment: d.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: Some(lock),
        image_type: Some(image_type),
        pmem: None,
        iommu: d.pci_common.iommu,
    })
}

/// The disk's `queue_affinity`, each set checked against the CPUs this VMM may run on (a set
/// with none of them could never run: refused naming the queue, as a vCPU's is).
fn queue_affinity(d: &DiskConfig) -> Result<Vec<(u16, Vec<usize>)>, PciSetupError> {
    let Some(list) = d.queue_affinity.as_deref().filter(|l| !l.is_empty()) else {
        return Ok(Vec::new());
    };
    let allowed = seccomp::CpuSet::allowed().map_err(|e| {
        disk_error(
            d,
            format!("queue_affinity: cannot read this VMM's CPUs: {e}"),
        )
    })?;
    list.iter()
        .map(|a| {
            if !a.host_cpus.iter().any(|&c| allowed.has(c)) {
                return Err(disk_error(
                    d,
                    format!(
                        "queue_affinity: queue {}: none of host CPUs {:?} is one this VMM may \
                         run on ({:?})",
                        a.queue_index,
                        a.host_cpus,
                        allowed.cpus()
                    ),
                ));
            }
            Ok((a.queue_index, a.host_cpus.clone()))
        })
        .collect()
}

/// A `--disk vhost_user=on,socket=` device: the backend at `socket` serves it (the
/// configuration checked that guest RAM is shared).
fn vhost_user_disk(d: &DiskConfig, socket: &str, id: String) -> Result<NewDevice, PciSetupError> {
    let give_up = d.vhost_reconnect_timeout.map_or(
        virtio_devices::VHOST_USER_GIVE_UP,
        std::time::Duration::from_secs,
    );
    let dev = VhostUserBlock::new(
        std::path::Path::new(socket),
        d.num_queues,
        d.queue_size,
        give_up,
    )
    .map_err(|e| PciSetupError::Device {
        option: "--disk",
        value: format!("socket={socket}"),
        msg: e.to_string(),
    })?;
    Ok(NewDevice {
        option: "--disk",
        id,
        slot: d.pci_common.pci_device_id,
        segment: d.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        // Kept beside the other disks' (the configuration records one per disk).
        image_type: Some(d.image_type),
        pmem: None,
        iommu: false,
    })
}

/// A `--fs` (or `vm.add-fs`) device named `id`: the backend at `socket` serves it (the
/// configuration checked that guest RAM is shared).
pub fn fs(f: &FsConfig, id: String) -> Result<NewDevice, PciSetupError> {
    let dev = VhostUserFs::new(&f.socket, &f.tag, f.num_queues, f.queue_size).map_err(|e| {
        PciSetupError::Device {
            option: FsConfig::OPTION,
            value: format!("socket={}", f.socket.display()),
            msg: e.to_string(),
        }
    })?;
    info!(
        "{id}: virtio-fs tag={} through {}",
        f.tag,
        f.socket.display()
    );
    Ok(NewDevice {
        option: FsConfig::OPTION,
        id,
        slot: f.pci_common.pci_device_id,
        segment: f.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    })
}

/// A `--net` (or `vm.add-net`) device named `id`: its TAP opened (or taken from `fds`) and set
/// up as the configuration says.
pub fn net(n: &NetConfig, id: String) -> Result<NewDevice, PciSetupError> {
    if let Some(socket) = &n.vhost_socket {
        return crate::virtio_build_vhost::net(n, socket, id);
    }
    let err = |msg: String| PciSetupError::Device {
        option: "--net",
        value: n.tap.clone().unwrap_or_default(),
        msg,
    };
    let pairs = usize::from(n.num_queues / 2).max(1);
    // As the original: no TAP named, a new one the kernel names from "vmtap%d"; an
    // existing TAP keeps its addresses. With descriptors (`fd=`, a restore's `net_fds`),
    // the caller's TAP, as the caller set it up.
    let name = n.tap.as_deref().unwrap_or("vmtap%d");
    let (existed, taps) = match &n.fds {
        Some(fds) => {
            n.fds_usable().map_err(err)?;
            (
                true,
                net_util::Tap::from_fds(fds).map_err(|e| err(e.to_string()))?,
            )
        }
        None => (
            net_util::Tap::exists(name),
            net_util::Tap::open(name, pairs).map_err(|e| err(e.to_string()))?,
        ),
    };
    let tap = &taps[0];
    match (n.ip, n.mask) {
        (Some(IpAddr::V4(ip)), Some(IpAddr::V4(mask))) if !existed => {
            tap.set_ip(ip, mask).map_err(|e| err(e.to_string()))?
        }
        (Some(IpAddr::V6(ip)), Some(IpAddr::V6(mask))) if !existed => {
            // The configuration checked that the mask is contiguous.
            let prefix = u128::from(mask).leading_ones() as u8;
            tap.set_ipv6(ip, prefix).map_err(|e| err(e.to_string()))?
        }
        (Some(_), _) if existed => {
            log::warn!(
                "--net: TAP {} exists; its addresses are left as they are",
                tap.name()
            )
        }
        // The configuration refuses an address without its mask, or of two families.
        _ => {}
    }
    if let Some(m) = &n.host_mac {
        let m: net_util::MacAddr = m
            .parse()
            .map_err(|e: net_util::MacParseError| err(e.to_string()))?;
        tap.set_mac(m).map_err(|e| err(e.to_string()))?;
    }
    if let Some(mtu) = n.mtu {
        tap.set_mtu(mtu).map_err(|e| err(e.to_string()))?;
    }
    if n.fds.is_none() {
        tap.enable().map_err(|e| err(e.to_string()))?;
    }
    let mac = match &n.mac {
        Some(m) => m
            .parse()
            .map_err(|e: net_util::MacParseError| err(e.to_string()))?,
        None => net_util::MacAddr::random_local(),
    };
    let host_side = match (n.ip, n.mask) {
        (Some(ip), Some(mask)) => format!("{ip}/{mask}"),
        _ => "no address".into(),
    };
    info!(
        "--net: TAP {} ({host_side}), {pairs} queue pair(s), guest MAC {mac}",
        tap.name()
    );
    let config = virtio_devices::NetConfig {
        mac,
        mtu: n.mtu.unwrap_or(1500),
        queue_size: n.queue_size,
        offloads: virtio_devices::NetOffloads {
            csum: n.offload_csum,
            tso: n.offload_tso,
            ufo: n.offload_ufo,
        },
    };
    let mut dev = Net::new(taps, config).map_err(err)?;
    dev.set_rate_limiter(n.rate_limiter_config.as_ref().map(limiter_config));
    Ok(NewDevice {
        option: "--net",
        id,
        slot: n.pci_common.pci_device_id,
        segment: n.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: n.pci_common.iommu,
    })
}

/// The `--balloon` device and the handle `vm.resize` sets its target through.
pub fn balloon(
    cfg: &BalloonConfig,
) -> Result<(NewDevice, Arc<virtio_devices::BalloonControl>), PciSetupError> {
    let dev = virtio_devices::Balloon::new(
        cfg.size,
        virtio_devices::BalloonOptions {
            deflate_on_oom: cfg.deflate_on_oom,
            free_page_reporting: cfg.free_page_reporting,
            stats: false,
        },
    )
    .map_err(|e| PciSetupError::Device {
        option: "--balloon",
        value: format!("size={}", cfg.size),
        msg: e.to_string(),
    })?;
    let control = dev.control();
    let dev = NewDevice {
        option: "--balloon",
        // The original's name for the balloon device.
        id: cfg.pci_common.id_or(|| "__balloon".into()),
        slot: cfg.pci_common.pci_device_id,
        segment: cfg.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: cfg.pci_common.iommu,
    };
    Ok((dev, control))
}

/// The virtio-mem device of `--memory hotplug_method=virtio-mem,hotplug_size=` over the
/// hotplug region, asked for `hotplugged_size` (what a reboot plugs again), and the handle
/// `vm.resize` sets its requested size through.
pub fn virtio_mem(
    cfg: &MemoryConfig,
) -> Result<Option<(NewDevice, Arc<virtio_devices::VirtioMemControl>)>, PciSetupError> {
    let Some((base, size)) = arch::layout::hotplug_region(cfg.size, cfg.hotplug_size.unwrap_or(0))
    else {
        return Ok(None);
    };
    // The original's name for the virtio-mem device of the memory hotplug region: its default
    // zone's (checked against its binary).
    virtio_mem_device(
        vm_config::DEFAULT_ZONE_ID.into(),
        (base.0, size),
        cfg.hotplugged_size.unwrap_or(0),
        "--memory".into(),
        virtio_devices::VirtioMemOptions::default(),
    )
    .map(Some)
}

/// The virtio-mem device of each `--memory-zone` with a `hotplug_size` (named after the zone,
/// as the original's), over the zone's own region, asked for its `hotplugged_size`; with the
/// handle `vm.resize-zone` sets its requested size through.
pub fn zone_virtio_mems(
    vm: &vm_config::VmConfig,
) -> Result<Vec<(NewDevice, String, Arc<virtio_devices::VirtioMemControl>)>, PciSetupError> {
    let cfg = &vm.memory;
    let mut out = Vec::new();
    for z in cfg.zones.iter().flatten() {
        let Some((base, size)) = crate::memory_zones::zone_hotplug_region(cfg, &z.id) else {
            continue;
        };
        // In a guest NUMA node, the device names it (ACPI proximity domain), as the original.
        let options = match crate::numa::zone_node(vm, &z.id) {
            Some(node) => virtio_devices::VirtioMemOptions {
                node_id: node as u16,
                acpi_pxm: true,
                ..Default::default()
            },
            None => virtio_devices::VirtioMemOptions::default(),
        };
        let (dev, control) = virtio_mem_device(
            z.id.clone(),
            (base.0, size),
            z.hotplugged_size.unwrap_or(0),
            format!("--memory-zone id={}", z.id),
            options,
        )?;
        out.push((dev, z.id.clone(), control));
    }
    Ok(out)
}

/// A virtio-mem device `id` over `region` (guest address, bytes), asked for `requested`;
/// `option` names what configured it in errors.
fn virtio_mem_device(
    id: String,
    region: (u64, u64),
    requested: u64,
    option: String,
    options: virtio_devices::VirtioMemOptions,
) -> Result<(NewDevice, Arc<virtio_devices::VirtioMemControl>), PciSetupError> {
    let (base, size) = region;
    let err = |e: virtio_devices::VirtioMemError| PciSetupError::DeviceOf {
        option: option.clone(),
        value: format!("hotplug_size={size}"),
        msg: e.to_string(),
    };
    let dev = virtio_devices::VirtioMem::new(
        base,
        size,
        virtio_devices::VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
        options,
    )
    .map_err(err)?;
    let control = dev.control();
    control.set_requested(requested).map_err(err)?;
    let dev = NewDevice {
        option: "--memory",
        id,
        slot: None,
        segment: 0,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    };
    Ok((dev, control))
}

/// The `--watchdog` device (the original's `__watchdog`): its expiry asks `requests` for a
/// reset. `slot`: where a restored VM had it.
pub fn watchdog(
    requests: Arc<dyn devices::VmRequests>,
    slot: Option<u8>,
) -> Result<NewDevice, PciSetupError> {
    let dev = virtio_devices::Watchdog::new(requests).map_err(|e| PciSetupError::Device {
        option: "--watchdog",
        value: String::new(),
        msg: e.to_string(),
    })?;
    Ok(NewDevice {
        option: "--watchdog",
        id: "__watchdog".into(),
        slot,
        segment: 0,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    })
}

/// The virtio-iommu (`__iommu`, on segment 0, placed after the other virtio devices as the
/// original places it) for the address spaces `mapping`, translating `width` bits
/// (`--platform iommu_address_width`).
pub fn iommu(mapping: Arc<virtio_devices::IommuMapping>, width: u8, slot: Option<u8>) -> NewDevice {
    NewDevice {
        option: "--platform",
        id: crate::pci_setup::IOMMU_ID.into(),
        slot,
        segment: 0,
        dev: Box::new(virtio_devices::Iommu::new(mapping, width)),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: false,
    }
}

/// The `--rtc` device (the original's `__rtc` unless `id=` names it). `hints`: where a
/// restored VM's devices were.
pub fn rtc(cfg: &vm_config::RtcConfig, hints: Option<&crate::pci_setup::SlotHints>) -> NewDevice {
    let id = cfg.pci_common.id_or(|| "__rtc".into());
    let slot = cfg
        .pci_common
        .pci_device_id
        .or_else(|| hints.and_then(|h| h.get(&id)).map(|h| h.slot));
    NewDevice {
        option: "--rtc",
        id,
        slot,
        segment: cfg.pci_common.pci_segment,
        dev: Box::new(virtio_devices::Rtc::default()),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: cfg.pci_common.iommu,
    }
}

/// The `--vsock` device: its Unix socket bound now (a path in use fails the boot).
pub fn vsock(cfg: &VsockConfig) -> Result<NewDevice, PciSetupError> {
    let dev = Vsock::new(cfg.cid, &cfg.socket).map_err(|e| PciSetupError::Device {
        option: "--vsock",
        value: cfg.socket.display().to_string(),
        msg: format!("cannot listen: {e}"),
    })?;
    info!(
        "--vsock: guest cid {}, host socket {}",
        cfg.cid,
        cfg.socket.display()
    );
    Ok(NewDevice {
        option: "--vsock",
        // The original's name: `_vsock` and a number.
        id: cfg.pci_common.id_or(|| "_vsock0".into()),
        slot: cfg.pci_common.pci_device_id,
        segment: cfg.pci_common.pci_segment,
        dev: Box::new(dev),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: cfg.pci_common.iommu,
    })
}

/// The `--rng` device.
pub fn rng(cfg: &RngConfig) -> Result<NewDevice, PciSetupError> {
    let src = File::open(&cfg.src).map_err(|e| PciSetupError::Device {
        option: "--rng",
        value: cfg.src.display().to_string(),
        msg: format!("cannot open: {e}"),
    })?;
    Ok(NewDevice {
        option: "--rng",
        // The original's name for the entropy device.
        id: cfg.pci_common.id_or(|| "__rng".into()),
        slot: cfg.pci_common.pci_device_id,
        segment: cfg.pci_common.pci_segment,
        dev: Box::new(Rng::new(src)),
        lock: None,
        image_type: None,
        pmem: None,
        iommu: cfg.pci_common.iommu,
    })
}
