//! Configurations of the virtio PCI devices: `--disk`, `--net`, `--rng`, `--balloon` and the PCI keys
//! (`id=`, `iommu=`, `pci_segment=`, `pci_device_id=`) they share with `--console`. Field
//! order, defaults and which fields are left out when empty follow the original's JSON.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::parser::OptionParser;
use super::rate_limit::{parse_rate_limiter, RateLimiterConfig, RATE_LIMITER_KEYS};
use super::ConfigError;

/// The keys every PCI device takes, as the original's `PciDeviceCommonConfig`: what the
/// device is called and where it sits on PCI, flattened into each device's JSON (first, as the
/// original writes them; a console's after its mode). Whether its segment exists depends on
/// the VM (`--platform num_pci_segments`): see `VmConfig::validate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceCommonConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Behind the virtual IOMMU (`iommu=on`): the device's DMA goes through the
    /// virtio-iommu's mappings.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default)]
    pub pci_segment: u16,
    /// The slot (`pci_device_id=`); the VMM picks one when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
}

impl PciDeviceCommonConfig {
    /// The device's id, or the VMM's name for it when none was given.
    pub fn id_or(&self, default: impl FnOnce() -> String) -> String {
        self.id.clone().unwrap_or_else(default)
    }

    /// The keys' rules, for configurations from the command line or the API: those of
    /// [`check_placement`].
    pub fn check(&self) -> Result<(), String> {
        check_placement(self.pci_segment, self.pci_device_id, self.id.as_deref())
    }

    /// `iommu=on` refused, for devices whose DMA the VMM does not do (a vhost-user backend
    /// reads guest memory itself), as the original refuses it.
    pub fn refuse_iommu(&self) -> Result<(), String> {
        if self.iommu {
            return Err("iommu=on: this device cannot be placed behind the IOMMU".into());
        }
        Ok(())
    }
}

/// The keys every PCI device option knows, as the original's.
pub(crate) const PCI_KEYS: &[&str] = &["id", "iommu", "pci_segment", "pci_device_id"];

/// The PCI keys of a device option, checked.
pub(crate) fn pci_common(p: &OptionParser) -> Result<PciDeviceCommonConfig, ConfigError> {
    let c = PciDeviceCommonConfig {
        id: p.get("id"),
        iommu: p.toggle("iommu", false)?,
        pci_segment: p.number::<u16>("pci_segment")?.unwrap_or(0),
        pci_device_id: p.number::<u8>("pci_device_id")?,
    };
    c.check().map_err(|m| p.error(m))?;
    Ok(c)
}

/// Why a device's `pci_segment` is not one of the VM's `segments`.
pub fn segment_error(segments: u16) -> String {
    format!("the VM has {segments} PCI segment(s) (--platform num_pci_segments)")
}

/// The placement keys' rules, for configurations from the command line or the API: a slot
/// below 32, and not 0 on segment 0 (its host bridge; other segments have none, as the
/// original's). Ids starting with `__` are the VMM's own (`__console`, ...), as in the
/// original.
pub(crate) fn check_placement(
    segment: u16,
    slot: Option<u8>,
    id: Option<&str>,
) -> Result<(), String> {
    if let Some(d) = slot {
        if d > 31 || (d == 0 && segment == 0) {
            return Err(format!(
                "pci_device_id={d}: must be 1-31 on segment 0 (0 is its host bridge), 0-31 on others"
            ));
        }
    }
    if let Some(id) = id {
        if id.starts_with("__") {
            return Err(format!("id={id}: ids starting with '__' are reserved"));
        }
    }
    Ok(())
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// A disk image format, named as the original's API names it. `Unknown` (the default) means
/// probed from the image's header when the VM boots; the configuration then records what was
/// found, as the original's does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FlatVmdk,
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    #[default]
    Unknown,
}

/// The `image_type=` names the block layer opens.
pub const IMAGE_TYPES: &[&str] = &["raw", "qcow2", "vhd", "vhdx", "vmdk"];

impl ImageType {
    /// The command line's name (`image_type=`); `None` for `Unknown`.
    pub fn cli_name(self) -> Option<&'static str> {
        match self {
            ImageType::FlatVmdk => Some("vmdk"),
            ImageType::FixedVhd => Some("vhd"),
            ImageType::Qcow2 => Some("qcow2"),
            ImageType::Raw => Some("raw"),
            ImageType::Vhdx => Some("vhdx"),
            ImageType::Unknown => None,
        }
    }

    /// The command line's names, in any case, as the original reads them.
    fn from_cli(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "vmdk" => Some(ImageType::FlatVmdk),
            "vhd" => Some(ImageType::FixedVhd),
            "qcow2" => Some(ImageType::Qcow2),
            "raw" => Some(ImageType::Raw),
            "vhdx" => Some(ImageType::Vhdx),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// Empty for a vhost-user disk (the backend owns the image): left out of the JSON then, and
    /// optional in what the API reads, as in the original's (`path` is not required there).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default = "default_num_queues")]
    pub num_queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// The disk is served by a vhost-user-blk backend at `vhost_socket` (no `path`).
    #[serde(default)]
    pub vhost_user: bool,
    /// The vhost-user backend's socket (`socket=`), with `vhost_user=on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Ours (`vhost_reconnect_timeout=<seconds>`, with `vhost_user=on`): how long the device
    /// tries to connect to a backend that went away before the guest must reset it (default
    /// 60 s, at most 3600; 0: one try). Not in the JSON unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_reconnect_timeout: Option<u64>,
    /// The original's test knob (`_disable_io_uring=on`): never use io_uring for this disk.
    #[serde(default)]
    pub disable_io_uring: bool,
    /// The original's test knob (`_disable_aio=on`); we never use Linux AIO anyway.
    #[serde(default)]
    pub disable_aio: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default)]
    pub backing_files: bool,
    #[serde(default = "default_true")]
    pub sparse: bool,
    #[serde(default)]
    pub image_type: ImageType,
    /// What the image's lock covers.
    #[serde(default)]
    pub lock_granularity: LockGranularity,
    /// This disk's own limiter (`bw_*`, `ops_*` keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// The `--rate-limit-group` whose limiter this disk shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_group: Option<String>,
    /// The host CPUs of the threads serving some of its queues (`queue_affinity=`): each
    /// queue then has a thread of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_affinity: Option<Vec<crate::VirtQueueAffinity>>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

/// What a disk image's advisory lock covers, as the original's `lock_granularity=`: its bytes
/// `[0, size)` (the default: network filesystems that make whole-file locks mandatory keep
/// byte-range locks advisory, so management tools can still read the image), or the whole file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockGranularity {
    #[default]
    ByteRange,
    Full,
}

/// `null` reads as the default, as the original's API clients send it.
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A MAC address: six two-digit hex bytes (as the original reads them), normalised to lower
/// case. `unicast` refuses multicast addresses (a guest's or the TAP's own address).
pub(crate) fn mac_address(s: &str) -> Result<String, String> {
    let m: crate::mac::MacAddr = s
        .parse()
        .map_err(|e: crate::mac::MacParseError| e.to_string())?;
    if m.bytes()[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    Ok(m.to_string())
}

/// The longest `vhost_reconnect_timeout` (seconds).
pub const MAX_VHOST_RECONNECT_TIMEOUT: u64 = 3600;

fn default_num_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    128
}
fn default_true() -> bool {
    true
}

/// Most queues one disk may have.
pub const MAX_DISK_QUEUES: u16 = 16;

/// The original refuses a block queue of 2 descriptors or fewer (its
/// `MINIMUM_BLOCK_QUEUE_SIZE` is 2 and the size must be above it).
const MIN_DISK_QUEUE_SIZE: u16 = 4;

/// virtio-blk's device id is 20 bytes (VIRTIO_BLK_ID_BYTES).
const MAX_DISK_SERIAL: usize = 20;

impl DiskConfig {
    const KEYS: &'static [&'static str] = &[
        "path",
        "readonly",
        "direct",
        "num_queues",
        "queue_size",
        "vhost_user",
        "socket",
        "vhost_reconnect_timeout",
        "_disable_io_uring",
        "_disable_aio",
        "rate_limit_group",
        "queue_affinity",
        "serial",
        "backing_files",
        "sparse",
        "image_type",
        "lock_granularity",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            "--disk",
            raw,
            &[Self::KEYS, RATE_LIMITER_KEYS, PCI_KEYS],
            &[],
        )?;
        let rate_limiter_config = parse_rate_limiter(&p)?;
        let queue_affinity = crate::affinity::parse(&p, "queue_affinity", "queue")?.map(|l| {
            l.into_iter()
                .map(|(queue_index, host_cpus)| crate::VirtQueueAffinity {
                    queue_index,
                    host_cpus,
                })
                .collect()
        });
        let lock_granularity = match p.get("lock_granularity").as_deref() {
            None => LockGranularity::ByteRange,
            Some("byte-range") => LockGranularity::ByteRange,
            Some("full") => LockGranularity::Full,
            Some(g) => {
                return Err(p.error(format!("lock_granularity={g}: must be byte-range or full")))
            }
        };
        let vhost_user = p.toggle("vhost_user", false)?;
        let vhost_socket = p.get("socket");
        let path = if vhost_user {
            // The backend owns the image and how it is opened.
            for k in [
                "path",
                "readonly",
                "direct",
                "serial",
                "queue_affinity",
                "image_type",
                "backing_files",
                "sparse",
                "lock_granularity",
                "rate_limit_group",
                "bw_size",
                "ops_size",
            ] {
                if p.get(k).is_some() {
                    return Err(p.error(format!("'{k}' does not go with vhost_user=on")));
                }
            }
            PathBuf::new()
        } else {
            if vhost_socket.is_some() {
                return Err(p.error("socket= needs vhost_user=on"));
            }
            if p.get("vhost_reconnect_timeout").is_some() {
                return Err(p.error("vhost_reconnect_timeout= needs vhost_user=on"));
            }
            match p.get("path") {
                Some(s) if !s.is_empty() => PathBuf::from(s),
                _ => return Err(p.error("path=<disk image> is required")),
            }
        };
        let image_type = match p.get("image_type") {
            None => ImageType::Unknown,
            Some(t) => ImageType::from_cli(&t).ok_or_else(|| {
                p.error(format!("image_type={t}: must be raw, qcow2, vhd or vhdx"))
            })?,
        };
        let pci_common = pci_common(&p)?;
        let cfg = DiskConfig {
            extra: Default::default(),
            pci_common,
            path,
            readonly: p.toggle("readonly", false)?,
            direct: p.toggle("direct", false)?,
            num_queues: p.number("num_queues")?.unwrap_or_else(default_num_queues),
            queue_size: p.number("queue_size")?.unwrap_or_else(default_queue_size),
            vhost_user,
            vhost_socket,
            vhost_reconnect_timeout: p.number("vhost_reconnect_timeout")?,
            disable_io_uring: p.toggle("_disable_io_uring", false)?,
            disable_aio: p.toggle("_disable_aio", false)?,
            serial: p.get("serial"),
            backing_files: p.toggle("backing_files", false)?,
            sparse: p.toggle("sparse", true)?,
            image_type,
            lock_granularity,
            rate_limiter_config,
            rate_limit_group: p.get("rate_limit_group"),
            queue_affinity,
        };
        cfg.check().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// The rules that do not need the file system.
    fn check(&self) -> Result<(), String> {
        if self.num_queues == 0 || self.num_queues > MAX_DISK_QUEUES {
            return Err(format!("num_queues must be 1-{MAX_DISK_QUEUES}"));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < MIN_DISK_QUEUE_SIZE {
            return Err(format!(
                "queue_size={}: must be a power of two between {MIN_DISK_QUEUE_SIZE} and 32768",
                self.queue_size
            ));
        }
        self.pci_common.check()?;
        if self.vhost_user {
            self.pci_common.refuse_iommu()?;
        }
        if let Some(s) = &self.serial {
            if s.len() > MAX_DISK_SERIAL {
                return Err(format!(
                    "serial={s}: at most {MAX_DISK_SERIAL} bytes (the virtio-blk device id)"
                ));
            }
        }
        if self.vhost_user != self.vhost_socket.is_some() {
            return Err("vhost_user=on and socket=<backend socket> go together".into());
        }
        if !self.vhost_user && path_is_empty(&self.path) {
            return Err("path=<disk image> is required".into());
        }
        match self.vhost_reconnect_timeout {
            Some(_) if !self.vhost_user => {
                return Err("vhost_reconnect_timeout= needs vhost_user=on".into())
            }
            Some(t) if t > MAX_VHOST_RECONNECT_TIMEOUT => {
                return Err(format!(
                    "vhost_reconnect_timeout={t}: at most {MAX_VHOST_RECONNECT_TIMEOUT} seconds"
                ))
            }
            _ => {}
        }
        if self.rate_limit_group.is_some() && self.rate_limiter_config.is_some() {
            return Err("a disk has either a rate limit of its own or a rate_limit_group".into());
        }
        if let Some(list) = &self.queue_affinity {
            if self.vhost_user {
                // The backend's threads serve the queues.
                return Err("queue_affinity does not go with vhost_user=on".into());
            }
            let entries = list
                .iter()
                .map(|a| (u32::from(a.queue_index), a.host_cpus.as_slice()));
            let limit = (u32::from(self.num_queues), "num_queues");
            crate::affinity::check("queue_affinity", "queue", entries, limit)?;
        }
        Ok(())
    }

    /// What `parse` checks, for a configuration from anywhere (the API), plus that the image
    /// exists. Errors name `--disk` and the path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.vhost_socket {
            return self
                .check()
                .map_err(|m| ConfigError::new("--disk", &format!("socket={s}"), m));
        }
        let err = |m: String| ConfigError::new("--disk", &self.path.display().to_string(), m);
        if path_is_empty(&self.path) {
            return Err(err("path=<disk image> is required".into()));
        }
        let meta = std::fs::metadata(&self.path).map_err(|e| err(format!("cannot open: {e}")))?;
        // Opening a FIFO would block the VMM until a writer came; a socket cannot be opened.
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() || t.is_socket() || t.is_dir() {
            return Err(err("not a disk image (a FIFO, socket or directory)".into()));
        }
        self.check().map_err(err)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    pub src: PathBuf,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

impl Default for RngConfig {
    fn default() -> Self {
        RngConfig {
            extra: Default::default(),
            pci_common: Default::default(),
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
        }
    }
}

impl RngConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets("--rng", raw, &[&["src"], PCI_KEYS], &[])?;
        let pci_common = pci_common(&p)?;
        Ok(RngConfig {
            extra: Default::default(),
            pci_common,
            // `src=` is not given: the default source.
            src: PathBuf::from(p.get("src").as_deref().unwrap_or(DEFAULT_RNG_SOURCE)),
        })
    }

    /// What `parse` checks, plus that the source exists.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new("--rng", &self.src.display().to_string(), m);
        let meta = std::fs::metadata(&self.src).map_err(|e| err(format!("cannot open: {e}")))?;
        // Opening a FIFO would block the VMM at boot until a writer came.
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() || t.is_socket() || t.is_dir() {
            return Err(err(
                "not an entropy source (a FIFO, socket or directory)".into()
            ));
        }
        self.pci_common.check().map_err(err)?;
        Ok(())
    }
}

/// `--balloon`: a virtio-balloon device, and how large the balloon starts (`size`, bytes the
/// guest is asked to give back; `vm.resize`'s `desired_balloon` changes it later).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    pub size: u64,
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back under memory pressure.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// VIRTIO_BALLOON_F_REPORTING: the guest reports its free pages, which the host releases.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl BalloonConfig {
    pub const OPTION: &'static str = "--balloon";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            Self::OPTION,
            raw,
            &[&["size", "deflate_on_oom", "free_page_reporting"], PCI_KEYS],
            &[],
        )?;
        let pci_common = pci_common(&p)?;
        let size = p
            .size("size")?
            .ok_or_else(|| p.error("size= is required (the balloon's size in bytes)"))?;
        Ok(BalloonConfig {
            pci_common,
            size,
            deflate_on_oom: p.toggle("deflate_on_oom", false)?,
            free_page_reporting: p.toggle("free_page_reporting", false)?,
            extra: Default::default(),
        })
    }

    /// What `parse` checks, for a configuration from anywhere (the API), and that the balloon
    /// is smaller than the guest's RAM (`ram`, bytes), as the original requires.
    pub fn validate(&self, ram: u64) -> Result<(), ConfigError> {
        let err = |m: String| ConfigError::new(Self::OPTION, &format!("size={}", self.size), m);
        self.pci_common.check().map_err(err)?;
        if self.size >= ram {
            return Err(err(format!(
                "the balloon must be smaller than the guest RAM ({ram} bytes)"
            )));
        }
        Ok(())
    }
}

/// `vhost_mode=`: whether a vhost-user backend connects to us or we to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum VhostMode {
    #[default]
    Client,
    Server,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The TAP to open or create; none: a new one named by the kernel (`vmtapN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The host side's address, with `mask`; none: the TAP gets no address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<IpAddr>,
    /// The guest's MAC; none: a random one, chosen (and recorded here) when the VM boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default = "default_net_queues")]
    pub num_queues: u16,
    #[serde(default = "default_net_queue_size")]
    pub queue_size: u16,
    /// The device is served by a vhost-user-net backend at `vhost_socket` (no TAP of ours).
    #[serde(default)]
    pub vhost_user: bool,
    /// The vhost-user backend's socket (`socket=`), with `vhost_user=on`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// With vhost-user: `Client`, we connect to the backend's socket; `Server`, we listen on
    /// it and the backend connects.
    #[serde(default)]
    pub vhost_mode: VhostMode,
    #[serde(default = "default_true")]
    pub offload_tso: bool,
    #[serde(default = "default_true")]
    pub offload_ufo: bool,
    #[serde(default = "default_true")]
    pub offload_csum: bool,
    /// The queues of a TAP the caller opened (`--net fd=`, one descriptor per queue pair), or
    /// given to a restore in `net_fds`. As the original's: numbers in JSON are no descriptors
    /// of this process, so they read as -1 (a restore must replace them).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_fds"
    )]
    pub fds: Option<Vec<i32>>,
    /// Each queue pair's receive and transmit are limited by this, separately (`bw_*`,
    /// `ops_*` keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<RateLimiterConfig>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

fn deserialize_fds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<i32>>, D::Error> {
    let fds: Option<Vec<i32>> = serde::Deserialize::deserialize(d)?;
    // An empty list asks for nothing (the original's own configurations carry one).
    Ok(fds.filter(|f| !f.is_empty()).map(|f| vec![-1; f.len()]))
}

/// `fd=3` or `fd=[3,4]`: descriptor numbers.
fn parse_fds(v: &str) -> Result<Vec<i32>, String> {
    let inner = v
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(v);
    let fds = inner
        .split(',')
        .map(|f| {
            f.trim()
                .parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("fd={v}: descriptors are numbers, e.g. fd=3 or fd=[3,4]"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if fds.is_empty() {
        return Err(format!("fd={v}: no descriptor"));
    }
    Ok(fds)
}

fn default_net_queues() -> u16 {
    2
}
fn default_net_queue_size() -> u16 {
    256
}

/// The smallest MTU the original takes (what virtio-net asks of a device, 1280).
pub const MIN_MTU: u16 = 1280;

/// Longest interface name (IFNAMSIZ less the NUL).
const MAX_IF_NAME: usize = 15;

impl NetConfig {
    const KEYS: &'static [&'static str] = &[
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
        "mtu",
        "queue_size",
        "num_queues",
        "vhost_user",
        "socket",
        "vhost_mode",
        "fd",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            "--net",
            raw,
            &[Self::KEYS, RATE_LIMITER_KEYS, PCI_KEYS],
            &[],
        )?;
        let rate_limiter_config = parse_rate_limiter(&p)?;
        let vhost_user = p.toggle("vhost_user", false)?;
        if vhost_user {
            crate::net_vhost::refuse_tap_keys(&p)?;
        }
        let fds = p
            .get("fd")
            .map(|v| parse_fds(&v))
            .transpose()
            .map_err(|m| p.error(m))?;
        let vhost_mode = match p.get("vhost_mode").map(|m| m.to_ascii_lowercase()) {
            None => VhostMode::Client,
            Some(m) if m == "client" => VhostMode::Client,
            Some(m) if m == "server" => VhostMode::Server,
            Some(m) => return Err(p.error(format!("vhost_mode={m}: must be client or server"))),
        };
        let ip_of = |key: &str| -> Result<Option<IpAddr>, ConfigError> {
            p.get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| p.error(format!("{key}={v}: not an IP address")))
                })
                .transpose()
        };
        let mac_of = |key: &str| -> Result<Option<String>, ConfigError> {
            p.get(key)
                .map(|v| mac_address(&v).map_err(|e| p.error(format!("{key}: {e}"))))
                .transpose()
        };
        let pci_common = pci_common(&p)?;
        let cfg = NetConfig {
            extra: Default::default(),
            pci_common,
            tap: p.get("tap"),
            ip: ip_of("ip")?,
            mask: ip_of("mask")?,
            mac: mac_of("mac")?,
            host_mac: mac_of("host_mac")?,
            mtu: p.number("mtu")?,
            // With descriptors, one queue pair each unless num_queues says it (and must agree).
            num_queues: p.number("num_queues")?.unwrap_or_else(|| {
                fds.as_ref().map_or_else(default_net_queues, |f| {
                    (2 * f.len()).min(usize::from(u16::MAX)) as u16
                })
            }),
            queue_size: p
                .number("queue_size")?
                .unwrap_or_else(default_net_queue_size),
            vhost_user,
            vhost_socket: p.get("socket"),
            vhost_mode,
            offload_tso: p.toggle("offload_tso", true)?,
            offload_ufo: p.toggle("offload_ufo", true)?,
            offload_csum: p.toggle("offload_csum", true)?,
            fds,
            rate_limiter_config,
        };
        cfg.check().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// The rules of both the command line and the API.
    fn check(&self) -> Result<(), String> {
        check_net_queues(self.num_queues)?;
        check_queue_size(self.queue_size)?;
        self.pci_common.check()?;
        if self.vhost_user {
            self.pci_common.refuse_iommu()?;
        }
        if let Some(t) = &self.tap {
            if t.len() > MAX_IF_NAME {
                return Err(format!(
                    "tap={t}: an interface name has at most {MAX_IF_NAME} bytes"
                ));
            }
        }
        // As the original: an address needs its mask and a mask its address.
        match (self.ip, self.mask) {
            (Some(_), None) => return Err("ip= needs mask= too".into()),
            (None, Some(_)) => return Err("mask= needs ip= too".into()),
            (Some(IpAddr::V4(_)), Some(IpAddr::V4(mask))) => {
                let m = u32::from(mask);
                if (!m).wrapping_add(1) & !m != 0 {
                    return Err(format!("mask={mask}: not a contiguous netmask"));
                }
            }
            (Some(IpAddr::V6(_)), Some(IpAddr::V6(mask))) => {
                let m = u128::from(mask);
                if (!m).wrapping_add(1) & !m != 0 {
                    return Err(format!("mask={mask}: not a contiguous netmask"));
                }
            }
            (Some(ip), Some(mask)) => {
                return Err(format!(
                    "ip={ip},mask={mask}: the address and the mask must be of one family"
                ))
            }
            (None, None) => {}
        }
        if let Some(m) = self.mtu {
            if m < MIN_MTU {
                return Err(format!("mtu={m}: must be at least {MIN_MTU}"));
            }
        }
        for m in [&self.mac, &self.host_mac].into_iter().flatten() {
            mac_address(m)?;
        }
        if !self.offload_csum && (self.offload_tso || self.offload_ufo) {
            return Err("offload_tso and offload_ufo need offload_csum (turn them off too)".into());
        }
        crate::net_vhost::check(self)?;
        if let Some(fds) = &self.fds {
            if self.tap.is_some()
                || self.ip.is_some()
                || self.host_mac.is_some()
                || self.mtu.is_some()
            {
                return Err(
                    "fd= cannot be combined with tap=, ip=, mask=, host_mac= or mtu=: the TAP \
                     is the caller's, set up by the caller"
                        .into(),
                );
            }
            if usize::from(self.num_queues) != 2 * fds.len() {
                return Err(format!(
                    "num_queues={} with {} descriptor(s): one descriptor per queue pair",
                    self.num_queues,
                    fds.len()
                ));
            }
        }
        Ok(())
    }

    /// Whether the descriptors (if any) can be used: a configuration read from JSON carries
    /// -1 in their place until a restore's `net_fds` gives real ones.
    pub fn fds_usable(&self) -> Result<(), String> {
        match &self.fds {
            Some(f) if f.iter().any(|&fd| fd < 0) => Err(format!(
                "net device {}: its TAP descriptors came through JSON and mean nothing here (a \
                 restore gives new ones in net_fds)",
                self.pci_common.id.as_deref().unwrap_or("?")
            )),
            _ => Ok(()),
        }
    }

    /// What `parse` checks, for a configuration from anywhere (the API).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let value = match &self.vhost_socket {
            Some(s) => format!("socket={s}"),
            None => self.tap.clone().unwrap_or_default(),
        };
        self.check()
            .map_err(|m| ConfigError::new("--net", &value, m))
    }
}

/// Most virtio-net queues (receive and transmit, two per pair; the control queue is extra).
pub const MAX_NET_QUEUES: u16 = 62;

/// `num_queues` of `--net` counts queues, two per pair, as the original's.
fn check_net_queues(n: u16) -> Result<(), String> {
    if n < 2 || !n.is_multiple_of(2) || n > MAX_NET_QUEUES {
        return Err(format!(
            "num_queues must be an even number between 2 and {MAX_NET_QUEUES} (two per queue pair)"
        ));
    }
    Ok(())
}

fn check_queue_size(q: u16) -> Result<(), String> {
    if q.is_power_of_two() && (2..=32768).contains(&q) {
        Ok(())
    } else {
        Err(format!(
            "queue_size={q}: must be a power of two between 2 and 32768"
        ))
    }
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "net_vhost_tests.rs"]
mod net_vhost_tests;

fn path_is_empty<P: AsRef<std::path::Path>>(p: &P) -> bool {
    p.as_ref().as_os_str().is_empty()
}
