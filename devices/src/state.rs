//! The save/restore half of the device lifecycle (issue 11): every platform device says its
//! guest-visible state as a versioned serde type kept beside its code, and starts from one.
//!
//! A device is restored into a fresh instance built from the same configuration as the one that
//! was saved (the VMM builds the machine as for a boot, then restores each device before any
//! vCPU runs): host resources (event fds, output sinks, the VM's request handle) are not state
//! and stay as the fresh device has them. States are plain data: a state file is input, so a
//! restore checks what it is given and refuses it with a [`StateError`], never panics, and
//! leaves the device as it was when it refuses.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// A device that can say its state and start from it.
///
/// Devices sit behind `Arc<Mutex<..>>` on the buses, so both calls are made with the device's
/// lock held, while the vCPUs are out of `KVM_RUN` (no guest access is then in flight).
pub trait Stateful {
    /// Names the device in errors (and is the natural key in a VM's state file).
    const NAME: &'static str;
    /// The state as a snapshot carries it; it has a `version` field, and a restore refuses any
    /// version but the one this build writes.
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;

    /// The device's state now. Reading it has no effect on the device.
    fn state(&self) -> Self::State;

    /// Makes the device what `state` describes. All or nothing: on an error the device is
    /// unchanged.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// Why a state was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("cannot restore {device} state version {found}: this build reads version {supported}")]
    Version {
        device: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("cannot restore {device} state: {reason}")]
    Invalid {
        device: &'static str,
        reason: String,
    },
}

/// Refuses a state of another version than `supported`.
pub(crate) fn check_version(
    device: &'static str,
    found: u32,
    supported: u32,
) -> Result<(), StateError> {
    if found == supported {
        Ok(())
    } else {
        Err(StateError::Version {
            device,
            found,
            supported,
        })
    }
}

/// A refusal of a state that this build could not have written.
pub(crate) fn invalid(device: &'static str, reason: impl Into<String>) -> StateError {
    StateError::Invalid {
        device,
        reason: reason.into(),
    }
}
