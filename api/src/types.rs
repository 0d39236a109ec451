//! What the API asks of the VMM and what it answers, independent of HTTP: the server turns
//! each request into an `ApiRequest`, the VMM's control loop answers it with an `ApiResult`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_config::{
    ConfigError, DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig, PmemConfig,
    ReceiveMigrationConfig, RestoreConfig, SendMigrationConfig, VmConfig, VsockConfig,
};

/// The states of a VM, as the original names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// A request, as the control loop sees it.
#[derive(Debug)]
pub enum ApiRequest {
    VmmPing,
    VmmShutdown,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    /// `vm.nmi`: a non-maskable interrupt on every vCPU.
    VmNmi,
    VmDelete,
    VmSnapshot(VmSnapshotConfig),
    /// `vm.coredump`: the guest's RAM and vCPU registers as an ELF core file.
    VmCoredump(VmCoredumpData),
    /// Already checked with `RestoreConfig::validate`. The `net_fds` descriptors are not
    /// received (the server reads no SCM_RIGHTS): each entry's `fds` is `None`.
    VmRestore(RestoreConfig),
    VmSendMigration(SendMigrationConfig),
    VmReceiveMigration(ReceiveMigrationConfig),
    /// `vm.migration-progress` (ours, an extension): the current or last outgoing migration.
    VmMigrationProgress,
    /// `vm.add-disk`: before boot the device joins the configuration; on a built VM it is
    /// hot-added.
    VmAddDisk(Box<DiskConfig>),
    /// `vm.add-net`; `fds` holds the descriptors received with the request, if any.
    VmAddNet(Box<NetConfig>),
    VmRemoveDevice(VmRemoveDeviceData),
    VmResize(VmResizeData),
    /// `vm.resize-zone`: a memory zone's RAM (its size plus what its virtio-mem device plugs).
    VmResizeZone(VmResizeZoneData),
    /// `vm.resize-disk`: a disk's new size.
    VmResizeDisk(VmResizeDiskData),
    /// `vm.add-vsock`: before boot the device joins the configuration; on a built VM it is
    /// hot-added (one vsock per VM).
    VmAddVsock(Box<VsockConfig>),
    /// `vm.add-pmem`: before boot the device joins the configuration; on a built VM it is
    /// hot-added, its file mapped into the guest-physical address space.
    VmAddPmem(Box<PmemConfig>),
    /// `vm.add-fs`: before boot the device joins the configuration; on a built VM it is
    /// hot-added, connected to its backend.
    VmAddFs(Box<FsConfig>),
    /// `vm.add-generic-vhost-user`: before boot the device joins the configuration; on a
    /// built VM it is hot-added, connected to its backend.
    VmAddGenericVhostUser(Box<GenericVhostUserConfig>),
}

/// `vm.resize`'s body, as the original's `VmResize`: each field present is a change asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_ram: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_balloon: Option<u64>,
}

/// `vm.resize-zone`'s body, as the original's `VmResizeZone`: both fields required.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeZoneData {
    pub id: String,
    /// The zone's RAM wanted, in bytes: its `size` plus what is to be plugged.
    pub desired_ram: u64,
}

/// `vm.resize-disk`'s body, as the original's `VmResizeDisk`: both fields required.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResizeDiskData {
    pub id: String,
    /// The disk's new size in bytes (a multiple of 512).
    pub desired_size: u64,
}

/// `vm.remove-device`'s body, as the original's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDeviceData {
    pub id: String,
}

/// What a hot-add answers: the new device's id and where it sits (`0000:00:05.0`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

/// `vm.snapshot`'s body, as the original's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// Where the snapshot goes: `file:///` and an existing directory.
    pub destination_url: String,
}

/// `vm.coredump`'s body, as the original's `VmCoredumpData`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCoredumpData {
    /// The core file to create: `file:///` and a path that does not exist yet.
    pub destination_url: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    /// The devices of the built VM (absent when no VM is built: Created), by node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tree: Option<BTreeMap<String, DeviceNode>>,
}

/// One node of `vm.info`'s device tree, in the original's shape: a PCI function's node has its
/// address and its BARs (`{"PciBar": {"index", "base", "size", "type_", "prefetchable"}}`, as
/// they stand when asked), a virtio device's node names its transport node as its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub resources: Vec<serde_json::Value>,
    pub children: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// Where an outgoing migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// The sending thread has the VM: pre-copy passes, or the downtime.
    Running,
    /// The destination runs the VM; this VMM ends.
    Completed,
    /// The migration failed; the VM runs on here.
    Failed,
}

/// `vm.migration-progress`'s answer (ours, an extension; the name the cyberus-technology fork
/// of the original uses): the current or last outgoing migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationProgress {
    pub state: MigrationState,
    pub destination_url: String,
    /// Pre-copy passes done so far (the last pass, made while the VM is paused, counts once
    /// the migration has completed); 0 for a local migration, which copies no memory.
    pub pass: u32,
    /// Bytes the last pass sent.
    pub bytes: u64,
    /// Bytes of guest memory sent so far.
    pub total_bytes: u64,
    /// Bytes the guest dirtied during the last pass, for the next one.
    pub dirty_bytes: u64,
    /// The guest's RAM, in bytes.
    pub memory_bytes: u64,
    /// Since the migration started; frozen at its end.
    pub elapsed_ms: u64,
    /// How long the VM was paused (completed migrations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_us: Option<u64>,
    /// Why it failed (failed migrations only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Device id → counter name → value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

#[derive(Debug)]
pub enum ApiResponse {
    Empty,
    Ping(VmmPingResponse),
    Info(Box<VmInfoResponse>),
    Counters(VmCounters),
    /// A device hot-added to a running VM (200 with the body).
    PciDevice(PciDeviceInfo),
    MigrationProgress(Box<MigrationProgress>),
}

/// Why the VMM refused a request. The messages are the causes that follow the endpoint's own
/// message in an error answer's chain (the original's words where it has them).
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("VM is not created")]
    VmNotCreated,
    #[error("VM is already created")]
    VmAlreadyCreated,
    /// No VM is built (none created, or created and not booted, or shut down).
    #[error("VM is not running")]
    VmNotRunning,
    /// `vm.boot` with no VM created.
    #[error("VM config is missing")]
    VmMissingConfig,
    /// The action needs the VM in another state.
    #[error("cannot {action} the VM: it is {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    #[error("Failed to validate config")]
    Config(#[source] ConfigError),
    #[error("{0}")]
    Failed(String),
    /// A failure with its causes, as the original's error chain reads them from the top (the
    /// lines after the endpoint's own message).
    #[error("{}", .0.first().map(String::as_str).unwrap_or("failed"))]
    Chain(Vec<String>),
    #[error("the VMM is shutting down")]
    Gone,
    /// `vm.migration-progress` before any migration was sent from this VMM: 404.
    #[error("No migration has been started")]
    NoMigration,
    /// One of the original's endpoints for something this VMM does not have yet.
    #[error("{0} is not supported yet")]
    NotYet(String),
    /// No device of the VM has this id (`vm.resize-disk`): 404, as the original answers.
    #[error("Unknown device id: {0}")]
    UnknownDevice(String),
    /// A request the VM cannot carry out as asked (an unknown device id, a full bus): 400.
    #[error("{0}")]
    BadRequest(String),
    /// The VM is busy with an earlier request of the same kind (a removal not yet ejected by
    /// the guest): 429, as the original answers.
    #[error("{0}")]
    TooManyRequests(String),
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::Config(e)
    }
}

impl ApiError {
    /// The HTTP status the original answers this error with: 404 for a VM that is not
    /// created, 400 for a configuration that does not validate, 500 for the rest (a state
    /// that does not allow the action included); 501 for what this VMM lacks.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::VmNotCreated
            | ApiError::VmMissingConfig
            | ApiError::NoMigration
            | ApiError::UnknownDevice(_) => 404,
            ApiError::Config(_) | ApiError::BadRequest(_) => 400,
            ApiError::TooManyRequests(_) => 429,
            ApiError::NotYet(_) => 501,
            ApiError::VmAlreadyCreated
            | ApiError::VmNotRunning
            | ApiError::InvalidState { .. }
            | ApiError::Failed(_)
            | ApiError::Chain(_)
            | ApiError::Gone => 500,
        }
    }
}

pub type ApiResult = Result<ApiResponse, ApiError>;

/// What the VMM itself answers to `vmm.ping` (built once: the pid does not change).
pub fn ping_response() -> VmmPingResponse {
    static PING: std::sync::OnceLock<VmmPingResponse> = std::sync::OnceLock::new();
    PING.get_or_init(|| {
        let version = concat!("v", env!("CARGO_PKG_VERSION")).to_string();
        VmmPingResponse {
            build_version: version.clone(),
            version,
            pid: i64::from(std::process::id()),
            features: vec!["kvm".into()],
        }
    })
    .clone()
}
