//! The VM configuration: one set of typed structs, filled from the command line (here) or,
//! later, from the API's JSON (serde, with the original's field names).

mod affinity;
mod cpus;
mod debug_console;
mod devices;
pub mod extra;
mod fs;
mod generated;
mod generic_vhost_user;
mod landlock;
pub mod mac;
mod memory_zone;
mod migration;
mod net_vhost;
mod numa;
mod parser;
mod pci_segment;
mod platform;
mod pmem;
mod rate_limit;
mod restore;
mod restore_mac;
mod rtc;
#[cfg(test)]
mod rules_tests;
mod tpm;
mod unsupported;
mod vsock;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use affinity::{VirtQueueAffinity, MAX_HOST_CPUS};
pub use cpus::{CoreScheduling, CpuAffinity, CpuFeatures, CpuProfile, CpuTopology, CpusConfig};
pub use debug_console::{DebugConsoleConfig, DEBUG_CONSOLE_PORT};
pub use devices::{
    BalloonConfig, DiskConfig, ImageType, LockGranularity, NetConfig, PciDeviceCommonConfig,
    RngConfig, VhostMode, IMAGE_TYPES, MAX_DISK_QUEUES, MIN_MTU,
};
pub use extra::Extra;
pub use fs::{FsConfig, FS_MAX_QUEUES, FS_TAG_MAX};
pub use generic_vhost_user::{device_type_name, GenericVhostUserConfig, GENERIC_MAX_QUEUES};
pub use landlock::{parent_dir, LandlockAccess, LandlockConfig, LandlockGrant};
pub use memory_zone::{zone_updates, MemoryZoneConfig, DEFAULT_ZONE_ID};
pub use migration::{MigrationMode, ReceiveMigrationConfig, SendMigrationConfig, TimeoutStrategy};
pub use numa::{NumaConfig, NumaDistance};
pub use parser::{parse_size, OptionParser};
pub use pci_segment::{aperture_weights, PciSegmentConfig, MAX_NUM_PCI_SEGMENTS};
pub use platform::{parse_uuid, PlatformConfig};
pub use pmem::{PmemConfig, PMEM_ALIGNMENT};
pub use rate_limit::{RateLimitGroupConfig, RateLimiterConfig, TokenBucketConfig};
pub use restore::{MemoryRestoreMode, RestoreConfig, RestoredNetConfig};
pub use restore_mac::RestoredNetMac;
pub use rtc::RtcConfig;
pub use tpm::TpmConfig;
pub use unsupported::UnsupportedConfig;
pub use vsock::VsockConfig;

/// A bad option value: names the option and the value the user gave (`--cpus boot=0: ...`,
/// or `--cpus: ...` when the fault is no one value).
#[derive(Debug, Error, PartialEq, Eq)]
pub struct ConfigError {
    pub option: String,
    pub value: String,
    pub msg: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value.as_str() {
            "" => write!(f, "{}: {}", self.option, self.msg),
            value => write!(f, "{} {value}: {}", self.option, self.msg),
        }
    }
}

impl ConfigError {
    pub fn new(option: &str, value: &str, msg: String) -> Self {
        ConfigError {
            option: option.to_string(),
            value: value.to_string(),
            msg,
        }
    }
}

/// Most vCPUs a VM may have: APIC IDs must fit the xAPIC's 8 bits (0xff is broadcast).
pub const MAX_VCPUS: u32 = 254;
pub(crate) const PAGE_SIZE: u64 = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    #[serde(default)]
    pub mergeable: bool,
    /// How memory is hot-plugged: by ACPI (DIMMs; the original's default) or `virtio-mem`.
    #[serde(default)]
    pub hotplug_method: HotplugMethod,
    /// Bytes that can be hot-plugged above `size` (`vm.resize`'s `desired_ram` up to
    /// `size + hotplug_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// Bytes of `hotplug_size` plugged now (what a reboot plugs again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    /// Commit the whole of guest RAM when it is mapped (no MAP_NORESERVE).
    #[serde(default)]
    pub reserve: bool,
    #[serde(default = "default_true")]
    pub thp: bool,
    /// `--memory-zone`: the guest RAM in zones (with `size` 0), in guest-physical order.
    /// An empty list (the original's clients send one) is no zones.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "memory_zone::none_if_empty"
    )]
    pub zones: Option<Vec<MemoryZoneConfig>>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// `hotplug_size` is a multiple of this (Linux's memory block size on x86).
pub const HOTPLUG_ALIGN: u64 = 128 << 20;
/// The virtio-mem device's block size: what is plugged or unplugged at a time.
pub const VIRTIO_MEM_BLOCK_SIZE: u64 = 2 << 20;

/// How memory is hot-plugged (`hotplug_method=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HotplugMethod {
    #[default]
    Acpi,
    VirtioMem,
}

fn default_true() -> bool {
    true
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            extra: Default::default(),
            size: 512 << 20,
            mergeable: false,
            hotplug_method: HotplugMethod::Acpi,
            hotplug_size: None,
            hotplugged_size: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            prefault: false,
            reserve: false,
            thp: true,
            zones: None,
        }
    }
}

impl MemoryConfig {
    pub const OPTION: &'static str = "--memory";
    pub const KEYS: &'static [&'static str] = &[
        "size",
        "mergeable",
        "shared",
        "hugepages",
        "hugepage_size",
        "file",
        "hotplug_method",
        "hotplug_size",
        "hotplugged_size",
        "prefault",
        "reserve",
        "thp",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        Self::parse_with_zones(raw, &[])
    }

    /// `--memory` with its `--memory-zone` values (each parsed with `--memory`'s `mergeable`
    /// as its default), checked together.
    pub fn parse_with_zones(raw: &str, zones: &[&str]) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        p.refuse(&["file"])?;
        // Without hotplug the method chooses nothing; ACPI is the original's default.
        let hotplug_method = match p.get("hotplug_method") {
            None => HotplugMethod::Acpi,
            Some(m) => match m.to_ascii_lowercase().as_str() {
                "acpi" => HotplugMethod::Acpi,
                "virtio-mem" => HotplugMethod::VirtioMem,
                _ => return Err(p.error(format!("hotplug_method={m}: must be acpi or virtio-mem"))),
            },
        };
        let cfg = MemoryConfig {
            extra: Default::default(),
            size: p.size("size")?.unwrap_or(512 << 20),
            mergeable: p.toggle("mergeable", false)?,
            hotplug_method,
            hotplug_size: p.size("hotplug_size")?,
            hotplugged_size: p.size("hotplugged_size")?,
            shared: p.toggle("shared", false)?,
            hugepages: p.toggle("hugepages", false)?,
            hugepage_size: p.size("hugepage_size")?,
            prefault: p.toggle("prefault", false)?,
            reserve: p.toggle("reserve", false)?,
            thp: p.toggle("thp", true)?,
            zones: None,
        };
        let mut cfg = cfg;
        if !zones.is_empty() {
            cfg.zones = Some(
                zones
                    .iter()
                    .map(|z| MemoryZoneConfig::parse(z, cfg.mergeable))
                    .collect::<Result<_, _>>()?,
            );
            cfg.validate_zones_as_given(zones)?;
        }
        cfg.validate().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// `--memory`'s own rules; with zones, `validate_zones` checks them all instead.
    pub fn validate(&self) -> Result<(), String> {
        if self.zones.is_some() {
            return Ok(());
        }
        if self.size == 0 {
            return Err("size must not be zero (size=0 only with --memory-zone)".into());
        }
        if !self.size.is_multiple_of(PAGE_SIZE) {
            return Err(format!("size {} is not a multiple of 4 KiB", self.size));
        }
        // What is plugged at a time: a virtio-mem block, an ACPI memory block.
        let step = match self.hotplug_method {
            HotplugMethod::VirtioMem => (VIRTIO_MEM_BLOCK_SIZE, "2 MiB"),
            HotplugMethod::Acpi => (HOTPLUG_ALIGN, "128 MiB"),
        };
        check_hotplug(
            self.hotplug_size,
            self.hotplugged_size,
            step,
            self.hugepages,
        )?;
        if self.shared && self.mergeable {
            return Err("shared=on and mergeable=on do not go together".into());
        }
        if let Some(hp) = self.hugepage_size {
            if !self.hugepages {
                return Err("hugepage_size needs hugepages=on".into());
            }
            if !hp.is_power_of_two() || hp < PAGE_SIZE {
                return Err(format!("hugepage_size {hp} is not a power of two"));
            }
            if !self.size.is_multiple_of(hp) {
                return Err("size is not a multiple of hugepage_size".into());
            }
        }
        // The guest address space above the 32-bit hole reaches at most 2^46 here.
        if self.size.saturating_add(self.hotplug_size.unwrap_or(0)) > (1u64 << 46) {
            return Err("size (with hotplug_size) is larger than the guest address space".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleOutputMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
    #[serde(flatten)]
    pub pci_common: PciDeviceCommonConfig,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// The serial port's configuration as the original's JSON has it: its mode and path only (it
/// is not a PCI device).
fn serialize_serial<S: serde::Serializer>(c: &ConsoleConfig, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Serial<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        file: &'a Option<PathBuf>,
        #[serde(skip_serializing_if = "Option::is_none")]
        socket: &'a Option<PathBuf>,
        mode: ConsoleOutputMode,
    }
    Serial {
        file: &c.file,
        socket: &c.socket,
        mode: c.mode,
    }
    .serialize(s)
}

impl ConsoleConfig {
    pub fn new(mode: ConsoleOutputMode) -> Self {
        ConsoleConfig {
            extra: Default::default(),
            file: None,
            socket: None,
            mode,
            pci_common: Default::default(),
        }
    }

    /// `off|null|pty|tty|file=<path>|socket=<path>`, for `--serial` and `--console` (which also
    /// takes the PCI keys, as in the original).
    pub fn parse(option: &'static str, raw: &str) -> Result<Self, ConfigError> {
        const MODES: &[&str] = &["off", "null", "pty", "tty"];
        const PATHS: &[&str] = &["file", "socket"];
        let pci: &[&str] = if option == "--serial" {
            &[]
        } else {
            devices::PCI_KEYS
        };
        let p = OptionParser::parse_sets(option, raw, &[PATHS, pci], MODES)?;
        // The original takes the first of off, pty, tty, null, file, socket and drops the
        // others; a second mode is refused here rather than ignored.
        let chosen = p.bare_words().len() + PATHS.iter().filter(|k| p.is_set(k)).count();
        if chosen != 1 {
            return Err(
                p.error("give exactly one of off, null, pty, tty, file=<path>, socket=<path>")
            );
        }
        let mut cfg = ConsoleConfig::new(ConsoleOutputMode::Null);
        if let Some((mode, file)) = mode_or_file(&p)? {
            (cfg.mode, cfg.file) = (mode, file);
        }
        if p.is_set("socket") {
            let s = p
                .get("socket")
                .ok_or_else(|| p.error("socket= needs a path"))?;
            cfg.mode = ConsoleOutputMode::Socket;
            cfg.socket = Some(PathBuf::from(s));
        }
        cfg.pci_common = devices::pci_common(&p)?;
        Ok(cfg)
    }
}

/// The output a console-like option's bare word (`off`, `null`, `pty`, `tty`) or `file=<path>`
/// names, with the file; `None` when it has neither.
pub(crate) fn mode_or_file(
    p: &OptionParser,
) -> Result<Option<(ConsoleOutputMode, Option<PathBuf>)>, ConfigError> {
    if p.is_set("file") {
        let f = p.get("file").ok_or_else(|| p.error("file= needs a path"))?;
        return Ok(Some((ConsoleOutputMode::File, Some(PathBuf::from(f)))));
    }
    Ok(p.bare_words().first().map(|word| {
        let mode = match word.as_str() {
            "off" => ConsoleOutputMode::Off,
            "null" => ConsoleOutputMode::Null,
            "pty" => ConsoleOutputMode::Pty,
            _ => ConsoleOutputMode::Tty,
        };
        (mode, None)
    }))
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default)]
    pub cpus: CpusConfig,
    #[serde(default)]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(
        default,
        deserialize_with = "devices::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub disks: Vec<DiskConfig>,
    #[serde(
        default,
        deserialize_with = "devices::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub net: Vec<NetConfig>,
    /// `--pmem`: virtio-pmem devices, each a file mapped into guest-physical memory.
    #[serde(
        default,
        deserialize_with = "devices::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pmem: Vec<PmemConfig>,
    /// `--fs`: virtio-fs devices, each served by a vhost-user backend (virtiofsd).
    #[serde(
        default,
        deserialize_with = "devices::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub fs: Vec<FsConfig>,
    /// `--generic-vhost-user`: virtio devices of any type served whole by a vhost-user
    /// backend.
    #[serde(
        default,
        deserialize_with = "devices::null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub generic_vhost_user: Vec<GenericVhostUserConfig>,
    #[serde(default, deserialize_with = "devices::null_as_default")]
    pub rng: RngConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// `--vsock`: virtio-vsock over the original's hybrid vsock Unix socket (one per VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// `--watchdog`: the original's virtio-watchdog.
    #[serde(default)]
    pub watchdog: bool,
    /// `--rtc`: a virtio-rtc device, the host's wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtc: Option<RtcConfig>,
    #[serde(default = "default_serial", serialize_with = "serialize_serial")]
    pub serial: ConsoleConfig,
    #[serde(default = "default_console")]
    pub console: ConsoleConfig,
    /// `--debug-console`: an I/O port whose writes go to the host (off by default).
    #[serde(default)]
    pub debug_console: DebugConsoleConfig,
    /// The VM has a virtio-iommu: given, or set by `validate` when a device is behind it
    /// (`iommu=on`) or `--platform iommu_segments` names a segment (as the original).
    #[serde(default)]
    pub iommu: bool,
    /// `--platform`: the SMBIOS identity, the number of PCI segments, the IOMMU's segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformConfig>,
    /// `--pvpanic`: a pvpanic PCI device through which the guest reports its panics.
    #[serde(default)]
    pub pvpanic: bool,
    /// `--tpm`: a TPM 2.0 (CRB) backed by swtpm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
    /// `--rate-limit-group`: limiters that disks share (`rate_limit_group=<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_groups: Option<Vec<RateLimitGroupConfig>>,
    /// `--landlock`: once the VM is created, the VMM reaches only the paths its configuration
    /// names and `landlock_rules` add (docs/security.md).
    #[serde(default)]
    pub landlock_enable: bool,
    /// `--landlock-rules`: more paths the VMM may reach under `--landlock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock_rules: Option<Vec<LandlockConfig>>,
    /// `--numa`: the guest's NUMA nodes (ACPI SRAT and SLIT). An empty list is none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "numa_none_if_empty"
    )]
    pub numa: Option<Vec<NumaConfig>>,
    /// `--pci-segment`: the segments' shares of the PCI MMIO windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Vec<PciSegmentConfig>>,
    /// The original's fields for what we do not implement yet: accepted only when empty.
    #[serde(flatten)]
    pub unsupported: UnsupportedConfig,
}

/// `numa` as the JSON gives it, an empty list (or null) as none.
fn numa_none_if_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<NumaConfig>>, D::Error> {
    let nodes: Option<Vec<NumaConfig>> = Deserialize::deserialize(d)?;
    Ok(nodes.filter(|n| !n.is_empty()))
}

fn default_serial() -> ConsoleConfig {
    ConsoleConfig::new(ConsoleOutputMode::Null)
}

fn default_console() -> ConsoleConfig {
    ConsoleConfig::new(ConsoleOutputMode::Tty)
}

impl VmConfig {
    /// Checks what a single option cannot: the combination, and that the files exist.
    ///
    /// As the original's `PayloadConfig::validate`: a firmware and a kernel together are
    /// refused; with a firmware, a command line and an initramfs are dropped from the
    /// configuration with a warning each (a firmware gets neither).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        self.check_extra()?;
        let check_file = |option: &'static str, path: &PathBuf| {
            let err = |msg: String| ConfigError::new(option, &path.display().to_string(), msg);
            // A regular file only: opening a FIFO would block whoever validates (the API's
            // control loop) until a writer came.
            let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot open: {e}")))?;
            if !meta.is_file() {
                return Err(err("not a regular file".into()));
            }
            std::fs::File::open(path)
                .map(|_| ())
                .map_err(|e| err(format!("cannot open: {e}")))
        };
        match (&self.payload.firmware, &self.payload.kernel) {
            (Some(fw), Some(_)) => {
                return Err(ConfigError::new(
                    "--firmware",
                    &fw.display().to_string(),
                    "specifying a kernel is not supported when a firmware is provided".into(),
                ))
            }
            (Some(fw), None) => {
                check_file("--firmware", fw)?;
                if self.payload.cmdline.take().is_some() {
                    log::warn!("Ignoring cmdline parameter as firmware is provided as the payload");
                }
                if self.payload.initramfs.take().is_some() {
                    log::warn!(
                        "Ignoring initramfs parameter as firmware is provided as the payload"
                    );
                }
            }
            (None, Some(kernel)) => {
                check_file("--kernel", kernel)?;
                if let Some(initramfs) = &self.payload.initramfs {
                    check_file("--initramfs", initramfs)?;
                }
            }
            (None, None) => {
                return Err(ConfigError::new(
                    "--kernel",
                    "",
                    "a kernel or a firmware is required (--kernel <path> or --firmware <path>)"
                        .into(),
                ))
            }
        }
        if self.serial.mode == ConsoleOutputMode::Tty && self.console.mode == ConsoleOutputMode::Tty
        {
            return Err(ConfigError::new(
                "--serial",
                "tty",
                "only one of --serial and --console can use the terminal (add --console off)"
                    .into(),
            ));
        }
        // The number of PCI segments first: the devices are placed on them.
        if let Some(p) = &self.platform {
            p.validate()
                .map_err(|m| ConfigError::new(PlatformConfig::OPTION, "", m))?;
        }
        self.validate_devices()?;
        self.cpus
            .validate()
            .map_err(|m| ConfigError::new("--cpus", "", m))?;
        self.memory
            .validate()
            .map_err(|m| ConfigError::new("--memory", "", m))?;
        self.memory.validate_zones()?;
        if let Some(nodes) = &self.numa {
            let zones: Vec<&str> = self
                .memory
                .zones
                .iter()
                .flatten()
                .map(|z| z.id.as_str())
                .collect();
            numa::validate_nodes(nodes, &zones, self.cpus.max_vcpus, self.num_pci_segments())?;
        }
        for c in self.pci_segments.iter().flatten() {
            c.extra.check("pci_segments")?;
            c.validate(Some(self.num_pci_segments()))
                .map_err(|m| ConfigError::new(PciSegmentConfig::OPTION, &c.shown(), m))?;
        }
        self.validate_landlock()?;
        // As the original: the VM has a virtio-iommu when a device is behind it or a segment
        // is an IOMMU segment (`vm.info` shows it).
        self.iommu |= self.any_iommu_device()
            || self
                .platform
                .as_ref()
                .is_some_and(|p| p.iommu_segments.is_some());
        self.unsupported.validate()
    }
}

/// A device on one of the `--platform iommu_segments` must be behind the IOMMU, as the
/// original requires (the guest's VIOT table puts the whole segment behind it).
pub fn check_iommu_segment(
    iommu_segments: &[u16],
    c: &PciDeviceCommonConfig,
) -> Result<(), String> {
    if iommu_segments.contains(&c.pci_segment) && !c.iommu {
        return Err(format!(
            "the device is on an IOMMU PCI segment ({}) but not placed behind the IOMMU (iommu=on)",
            c.pci_segment
        ));
    }
    Ok(())
}

impl VmConfig {
    /// `--platform iommu_segments`: the PCI segments whose every device is behind the IOMMU.
    pub fn iommu_segments(&self) -> Vec<u16> {
        self.platform
            .as_ref()
            .and_then(|p| p.iommu_segments.clone())
            .unwrap_or_default()
    }

    /// Whether a configured device has `iommu=on`.
    fn any_iommu_device(&self) -> bool {
        let console = self.console.mode != ConsoleOutputMode::Off && self.console.pci_common.iommu;
        console
            || self.disks.iter().any(|d| d.pci_common.iommu)
            || self.net.iter().any(|n| n.pci_common.iommu)
            || self.rng.pci_common.iommu
            || self.balloon.as_ref().is_some_and(|b| b.pci_common.iommu)
            || self.rtc.as_ref().is_some_and(|r| r.pci_common.iommu)
            || self.vsock.as_ref().is_some_and(|v| v.pci_common.iommu)
            || self.pmem.iter().any(|p| p.pci_common.iommu)
    }

    /// The PCI segments the VM has (`--platform num_pci_segments`, 1 by default).
    pub fn num_pci_segments(&self) -> u16 {
        self.platform
            .as_ref()
            .map_or(platform::DEFAULT_NUM_PCI_SEGMENTS, |p| p.num_pci_segments)
    }

    /// Refuses the original's keys this VMM does not model, in every object, unless they ask
    /// for nothing (see `extra`).
    fn check_extra(&self) -> Result<(), ConfigError> {
        self.cpus.extra.check("cpus")?;
        self.memory.extra.check("memory")?;
        for z in self.memory.zones.iter().flatten() {
            z.extra.check("memory.zones")?;
        }
        self.payload.extra.check("payload")?;
        self.serial.extra.check("serial")?;
        self.console.extra.check("console")?;
        self.debug_console.validate()?;
        self.rng.extra.check("rng")?;
        if let Some(b) = &self.balloon {
            b.extra.check("balloon")?;
        }
        if let Some(v) = &self.vsock {
            v.extra.check("vsock")?;
        }
        if let Some(p) = &self.platform {
            p.extra.check("platform")?;
        }
        if let Some(t) = &self.tpm {
            t.validate()?;
        }
        for (i, d) in self.disks.iter().enumerate() {
            d.extra.check(&format!("disks[{i}]"))?;
        }
        for (i, n) in self.net.iter().enumerate() {
            n.extra.check(&format!("net[{i}]"))?;
        }
        for (i, p) in self.pmem.iter().enumerate() {
            p.extra.check(&format!("pmem[{i}]"))?;
        }
        for (i, f) in self.fs.iter().enumerate() {
            f.extra.check(&format!("fs[{i}]"))?;
        }
        for (i, g) in self.generic_vhost_user.iter().enumerate() {
            g.extra.check(&format!("generic_vhost_user[{i}]"))?;
        }
        Ok(())
    }

    /// Device ids and PCI slots (within a segment) must be unique, each device on a segment
    /// the VM has; disk images must exist.
    fn validate_devices(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::BTreeSet::new();
        let mut slots = std::collections::BTreeSet::new();
        let segments = self.num_pci_segments();
        let mut check_at =
            |option: &'static str, id: &Option<String>, segment: u16, slot: Option<u8>| {
                if let Some(id) = id {
                    if !ids.insert(id.clone()) {
                        return Err(ConfigError::new(option, id, "this id is used twice".into()));
                    }
                }
                if segment >= segments {
                    return Err(ConfigError::new(
                        option,
                        &format!("pci_segment={segment}"),
                        devices::segment_error(segments),
                    ));
                }
                if let Some(slot) = slot {
                    if !slots.insert((segment, slot)) {
                        return Err(ConfigError::new(
                            option,
                            &format!("pci_device_id={slot}"),
                            format!("this PCI device id is used twice on segment {segment}"),
                        ));
                    }
                }
                Ok(())
            };
        // Zone ids share the devices' id space too (a zone's virtio-mem device is named so),
        // and so does the default zone's when it has a virtio-mem device.
        for z in self.memory.zones.iter().flatten() {
            check_at(MemoryZoneConfig::OPTION, &Some(z.id.clone()), 0, None)?;
        }
        if self.memory.zones.is_none()
            && self.memory.hotplug_method == HotplugMethod::VirtioMem
            && self.memory.hotplug_size.unwrap_or(0) > 0
        {
            check_at("--memory", &Some(DEFAULT_ZONE_ID.into()), 0, None)?;
        }
        // Group ids share the devices' id space, as the original's.
        let groups = self.rate_limit_groups.as_deref().unwrap_or_default();
        for g in groups {
            g.check()
                .map_err(|m| ConfigError::new("--rate-limit-group", &g.id, m))?;
            check_at("--rate-limit-group", &Some(g.id.clone()), 0, None)?;
        }
        // Every PCI device: its id, segment and slot; on an IOMMU segment, behind the IOMMU.
        let iommu_segments = self.iommu_segments();
        let mut check_device = |option: &'static str, c: &PciDeviceCommonConfig| {
            check_iommu_segment(&iommu_segments, c)
                .map_err(|m| ConfigError::new(option, c.id.as_deref().unwrap_or(""), m))?;
            check_at(option, &c.id, c.pci_segment, c.pci_device_id)
        };
        // As the original: no more queues (disks) or queue pairs (net) than boot vCPUs.
        let vcpus = self.cpus.boot_vcpus;
        for d in &self.disks {
            d.validate()?;
            if d.vhost_user && !self.memory.all_shared() {
                // The backend maps guest RAM from the memory files we hand it.
                return Err(ConfigError::new(
                    "--disk",
                    "vhost_user=on",
                    "--disk vhost_user=on needs --memory shared=on".into(),
                ));
            }
            if let Some(g) = &d.rate_limit_group {
                if !groups.iter().any(|x| &x.id == g) {
                    return Err(ConfigError::new(
                        "--disk",
                        &format!("rate_limit_group={g}"),
                        "no --rate-limit-group has this id".into(),
                    ));
                }
            }
            if u32::from(d.num_queues) > vcpus {
                return Err(ConfigError::new(
                    "--disk",
                    &d.path.display().to_string(),
                    format!(
                        "num_queues={} is more than the {vcpus} boot vCPU(s)",
                        d.num_queues
                    ),
                ));
            }
            check_device("--disk", &d.pci_common)?;
        }
        for n in &self.net {
            n.validate()?;
            if n.vhost_user && !self.memory.all_shared() {
                // The backend maps guest RAM from the memory files we hand it.
                return Err(net_vhost::shared_memory_error());
            }
            if u32::from(n.num_queues / 2) > vcpus {
                return Err(ConfigError::new(
                    "--net",
                    &format!("num_queues={}", n.num_queues),
                    format!("more queue pairs than the {vcpus} boot vCPU(s)"),
                ));
            }
            check_device("--net", &n.pci_common)?;
        }
        self.rng.validate()?;
        check_device("--rng", &self.rng.pci_common)?;
        if let Some(b) = &self.balloon {
            b.validate(self.memory.ram_size())?;
            if self.memory.any_hugepages() {
                // The driver hands pages back 4 KiB at a time; a huge page cannot be returned
                // in parts, so nothing would be freed.
                return Err(ConfigError::new(
                    BalloonConfig::OPTION,
                    &format!("size={}", b.size),
                    "not supported with --memory hugepages=on".into(),
                ));
            }
            check_device(BalloonConfig::OPTION, &b.pci_common)?;
        }
        if let Some(r) = &self.rtc {
            r.validate()?;
            check_device(RtcConfig::OPTION, &r.pci_common)?;
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
            check_device(VsockConfig::OPTION, &v.pci_common)?;
        }
        for p in &self.pmem {
            p.validate()?;
            check_device(PmemConfig::OPTION, &p.pci_common)?;
        }
        for f in &self.fs {
            f.validate()?;
            if !self.memory.all_shared() {
                // The backend maps guest RAM from the memory files we hand it.
                return Err(ConfigError::new(
                    FsConfig::OPTION,
                    &format!("tag={}", f.tag),
                    "--fs needs --memory shared=on".into(),
                ));
            }
            check_device(FsConfig::OPTION, &f.pci_common)?;
        }
        for g in &self.generic_vhost_user {
            g.validate()?;
            if !self.memory.all_shared() {
                // The backend maps guest RAM from the memory files we hand it.
                return Err(ConfigError::new(
                    GenericVhostUserConfig::OPTION,
                    &format!("socket={}", g.socket.display()),
                    "--generic-vhost-user needs --memory shared=on".into(),
                ));
            }
            check_device(GenericVhostUserConfig::OPTION, &g.pci_common)?;
        }
        let c = &self.console;
        let pc = &c.pci_common;
        devices::check_placement(pc.pci_segment, pc.pci_device_id, pc.id.as_deref())
            .map_err(|m| ConfigError::new("--console", pc.id.as_deref().unwrap_or(""), m))?;
        // The original checks the console's id even when the console is off (and then not
        // its slot).
        let slot = pc
            .pci_device_id
            .filter(|_| c.mode != ConsoleOutputMode::Off);
        check_device(
            "--console",
            &PciDeviceCommonConfig {
                pci_device_id: slot,
                // A console that is off is no device on any segment.
                iommu: pc.iommu || c.mode == ConsoleOutputMode::Off,
                ..pc.clone()
            },
        )?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "lib_tests.rs"]
mod tests;

/// `hotplug_size` and `hotplugged_size` of `--memory` or a `--memory-zone`: the hot-pluggable
/// size a non-zero multiple of 128 MiB, the plugged size no larger and a multiple of `step`
/// (what is plugged at a time, and its name for the error), no hot-plug with huge pages yet.
pub(crate) fn check_hotplug(
    hotplug_size: Option<u64>,
    hotplugged_size: Option<u64>,
    (step, step_name): (u64, &str),
    hugepages: bool,
) -> Result<(), String> {
    let Some(hp) = hotplug_size else {
        return match hotplugged_size {
            Some(_) => Err("hotplugged_size needs a hotplug_size".into()),
            None => Ok(()),
        };
    };
    if hp == 0 || !hp.is_multiple_of(HOTPLUG_ALIGN) {
        return Err(format!(
            "hotplug_size {hp} is not a (non-zero) multiple of 128 MiB"
        ));
    }
    if let Some(p) = hotplugged_size {
        if p > hp {
            return Err(format!(
                "hotplugged_size {p} is more than hotplug_size {hp}"
            ));
        }
        if !p.is_multiple_of(step) {
            return Err(format!(
                "hotplugged_size {p} is not a multiple of {step_name}"
            ));
        }
    }
    if hugepages {
        return Err("hotplug_size with hugepages=on is not supported yet".into());
    }
    Ok(())
}
