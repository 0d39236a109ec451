//! Test doubles shared by the device tests.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::VmRequests;

/// Counts power-off and reset requests.
#[derive(Default)]
pub struct Requests {
    power_off: AtomicU32,
    reset: AtomicU32,
}

impl Requests {
    /// (power-offs, resets) since the last call.
    pub fn take(&self) -> (u32, u32) {
        (
            self.power_off.swap(0, Ordering::SeqCst),
            self.reset.swap(0, Ordering::SeqCst),
        )
    }
}

impl VmRequests for Requests {
    fn power_off(&self) {
        self.power_off.fetch_add(1, Ordering::SeqCst);
    }
    fn reset(&self) {
        self.reset.fetch_add(1, Ordering::SeqCst);
    }
}
