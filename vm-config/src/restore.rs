//! `vm.restore`'s body and `--restore`'s value: where a snapshot is and how to bring it back,
//! with the original's field names.

use serde::{Deserialize, Serialize};

/// How guest RAM comes back from the snapshot's `memory-ranges` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryRestoreMode {
    /// The original's default: the file is read into freshly allocated guest RAM before the
    /// VM runs.
    #[default]
    Copy,
    /// The original's: pages are loaded from the file on the guest's (or a device's) first
    /// touch (userfaultfd); refused where the host has no userfaultfd.
    OnDemand,
    /// Ours: guest RAM is a private (copy-on-write) mapping of the file itself, so restores of
    /// one snapshot share the pages none of them wrote; refused for memory configurations it
    /// cannot serve (shared RAM, huge pages).
    CopyOnWrite,
}

/// A net device's new file descriptors (the original's `RestoredNetConfig`). The descriptors
/// travel beside the request (SCM_RIGHTS), never in the JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredNetConfig {
    pub id: String,
    #[serde(default)]
    pub num_fds: usize,
    /// Ignored from JSON (as the original's: a number in JSON is no descriptor).
    #[serde(default, skip_serializing)]
    pub fds: Option<Vec<i32>>,
}

/// The original's `RestoreConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///` and the snapshot directory.
    pub source_url: String,
    /// Copy mode: populate all of guest RAM up front.
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub memory_restore_mode: MemoryRestoreMode,
    #[serde(default)]
    pub net_fds: Option<Vec<RestoredNetConfig>>,
    /// VFIO is not supported: any entry is refused.
    #[serde(default)]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    /// VFIO is not supported: refused when given.
    #[serde(default)]
    pub iommufd_fd: Option<serde_json::Value>,
    /// Resume the VM once restored (otherwise it comes up paused).
    #[serde(default)]
    pub resume: bool,
    /// NUMA zones are not supported: any entry is refused.
    #[serde(default)]
    pub zone_updates: Vec<serde_json::Value>,
}
