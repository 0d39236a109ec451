//! What the API asks of the VMM and what it answers, independent of HTTP. The API thread sends
//! `ApiRequest`s through an `ApiSender`; the control loop, woken by an event fd, answers each
//! through the request's own `Responder`.

use std::collections::BTreeMap;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConfigError, VmConfig};

/// The states of a VM, as the original names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

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
    VmDelete,
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

/// One node of `vm.info`'s device tree, in the original's shape. `resources` stays empty:
/// BARs can move while the guest runs, and the original's resource enum is not reproduced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    pub resources: Vec<serde_json::Value>,
    pub children: Vec<String>,
    pub pci_bdf: Option<String>,
}

/// Device id → counter name → value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

#[derive(Debug)]
pub enum ApiResponse {
    Empty,
    Ping(VmmPingResponse),
    Info(Box<VmInfoResponse>),
    Counters(VmCounters),
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("the VM is not created")]
    VmNotCreated,
    #[error("the VM is already created")]
    VmAlreadyCreated,
    #[error("cannot {action} the VM: it is {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    #[error("invalid VM configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Failed(String),
    #[error("the VMM is shutting down")]
    Gone,
}

pub type ApiResult = Result<ApiResponse, ApiError>;

/// Delivers one answer to whoever asked (the API thread wraps its own reply channel in it).
pub type Responder = Box<dyn FnOnce(ApiResult) + Send>;

/// The API thread's end.
pub struct ApiSender {
    tx: mpsc::Sender<(ApiRequest, Responder)>,
    wake: EventFd,
}

impl ApiSender {
    /// Queues `req` for the control loop. If the VMM is gone, `respond` gets `ApiError::Gone`.
    pub fn send(&self, req: ApiRequest, respond: Responder) {
        if let Err(mpsc::SendError((_, respond))) = self.tx.send((req, respond)) {
            respond(Err(ApiError::Gone));
            return;
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the control loop: {e}");
        }
    }
}

/// The control loop's end.
pub struct ApiReceiver {
    pub(crate) rx: mpsc::Receiver<(ApiRequest, Responder)>,
    pub(crate) wake: EventFd,
}

pub fn channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let wake = EventFd::new(libc::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        ApiSender {
            tx,
            wake: wake.try_clone()?,
        },
        ApiReceiver { rx, wake },
    ))
}

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
