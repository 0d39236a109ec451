//! Live migration (issue 11): `vm.send-migration` and `vm.receive-migration` over `unix:` or
//! `tcp:` URLs, in the original's framing (`protocol`), pre-copy over the dirty logs (`dirty`),
//! or, for a local migration, with guest RAM's memory files handed over the Unix socket; over
//! `tcp:` optionally in mutual TLS (`tls`).

pub mod connections;
pub mod dirty;
pub mod postcopy;
pub mod protocol;
pub mod receive;
pub mod send;
pub mod tls;

#[cfg(test)]
mod test_ram;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Socket buffer size asked for on a migration's connection.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// The Config step's payload.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    pub vm_config: VmConfig,
    /// What the original's source adds: the CPUID both hosts must share and its memory
    /// manager's layout. Taken and not used: the VM's CPUID is built from this host's as at a
    /// boot, its RAM from `vm_config` (the state checks the vCPUs against it).
    #[serde(rename = "common_cpuid", default, skip_serializing)]
    _common_cpuid: Option<serde::de::IgnoredAny>,
    #[serde(rename = "memory_manager_data", default, skip_serializing)]
    _memory_manager_data: Option<serde::de::IgnoredAny>,
}

impl MigrationConfig {
    pub fn new(vm_config: VmConfig) -> Self {
        MigrationConfig {
            vm_config,
            _common_cpuid: None,
            _memory_manager_data: None,
        }
    }
}

/// How often a pass in progress reports the bytes it has sent.
pub const SENDING_EVERY: Duration = Duration::from_millis(250);

/// What the sending thread tells the control loop as it goes.
#[derive(Debug)]
pub enum Progress {
    /// A pre-copy pass went out: `bytes` in it, `total` so far, `dirty` left after it.
    Pass {
        pass: u32,
        bytes: u64,
        total: u64,
        dirty: u64,
    },
    /// Part of a pass went out (at most every [`SENDING_EVERY`]): `total` bytes sent so far,
    /// all passes. No event: it only moves `vm.migration-progress` on during a long pass.
    Sending { total: u64 },
    /// Postcopy: the destination has every page (the original's `postcopy-migration-completed`
    /// event).
    PostcopyDrained,
    /// The destination took the VM.
    Done {
        passes: u32,
        total: u64,
        downtime: Duration,
    },
}
