//! A generic vhost-user device (`--generic-vhost-user`): a virtio device of any type whose
//! whole work a backend does, over the shared frontend of `vhost_user.rs`. The VMM knows the
//! device's type and queue sizes only:
//! - **features**: the backend's device-specific bits (0-23 and 50-63) pass to the guest as
//!   they are, with the transport bits this VMM implements (indirect descriptors, event index,
//!   VERSION_1);
//! - **configuration space**: each guest read or write goes to the backend as it comes
//!   (GET_CONFIG / SET_CONFIG, within the reply deadline), as the original does. A read asks
//!   for the space from offset 0 to the end of the access, as QEMU's frontend reads it:
//!   libvhost-user backends (qemu-storage-daemon) answer from offset 0 whatever offset is
//!   asked, so forwarding the guest's offset (as the original does) reads the wrong bytes
//!   there. Without the
//!   CONFIG protocol feature it reads all ones and writes are dropped, logged once. A request
//!   that fails reads zeroes (logged), where the original's VMM would panic. A backend that
//!   offers BACKEND_REQ gets a request channel, and its config-change notices bump the
//!   configuration generation and raise the configuration interrupt, as in the original
//!   (`vhost_user_backend_req.rs`);
//! - **state**: the backend's. A pause stops its rings and keeps their bases, as for
//!   vhost-user-blk; a backend that goes away leaves the device needing a reset (we cannot
//!   know whether a new one could take the queues over).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;

use crate::vhost_user::{vhost_user_lifecycle, VhostUserConnection, VhostUserError};
use crate::VirtioDevice;

const NAME: &str = "generic-vhost-user";

/// The guest may see the backend's device-type bits and the transport bits we implement:
/// INDIRECT_DESC (28), EVENT_IDX (29), VERSION_1 (32).
const GUEST_FEATURES: u64 = 0x00ff_ffff | (0x3fff << 50) | (1 << 28) | (1 << 29) | (1 << 32);

/// The largest configuration space a GET_CONFIG carries (VHOST_USER_MAX_CONFIG_SIZE).
const MAX_CONFIG: usize = 256;

pub struct VhostUserGeneric {
    conn: VhostUserConnection,
    device_type: u16,
    queue_sizes: Vec<u16>,
    /// Whether the backend serves the configuration space (CONFIG negotiated).
    config: bool,
    /// One warning for the guest's first config access without CONFIG.
    warned: AtomicBool,
    /// One warning for the first config access the backend fails (later ones are debug
    /// lines: the guest decides how often it touches the space).
    failed: AtomicBool,
}

impl VhostUserGeneric {
    /// Connects to the backend at `socket` for a device of `device_type` with one queue per
    /// entry of `queue_sizes` (each its largest size).
    pub fn new(
        socket: &Path,
        device_type: u16,
        queue_sizes: Vec<u16>,
    ) -> Result<Self, VhostUserError> {
        let queues = u16::try_from(queue_sizes.len())
            .map_err(|_| VhostUserError::TooManyQueues(u16::MAX, 0))?;
        let largest = queue_sizes.iter().copied().max().unwrap_or(0);
        let (conn, got) = VhostUserConnection::connect(
            NAME,
            socket,
            queues,
            largest,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::BACKEND_REQ,
        )?;
        if got.contains(VhostUserProtocolFeatures::MQ) {
            let have = conn.ask("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
            if u64::from(queues) > have {
                return Err(VhostUserError::TooManyQueues(queues, have));
            }
        }
        Ok(VhostUserGeneric {
            conn,
            device_type,
            queue_sizes,
            config: got.contains(VhostUserProtocolFeatures::CONFIG),
            warned: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }

    /// A configuration access the backend did not serve: a warning the first time, then
    /// debug lines.
    fn config_failed(&self, what: std::fmt::Arguments) {
        if self.failed.swap(true, Ordering::Relaxed) {
            log::debug!("{NAME}: {what}");
        } else {
            log::warn!("{NAME}: {what} (further failures are logged at debug level)");
        }
    }

    /// Whether the guest may touch the configuration space through the backend; the first
    /// access without it is logged.
    fn config_served(&self) -> bool {
        if !self.config && !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!(
                "{NAME}: the backend does not serve the configuration space (no CONFIG \
                 protocol feature): the guest reads all ones and its writes are dropped"
            );
        }
        self.config
    }
}

impl VirtioDevice for VhostUserGeneric {
    fn device_type(&self) -> u16 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }
    fn features(&self) -> u64 {
        self.conn.backend_features & GUEST_FEATURES
    }
    fn config_generation(&self) -> u32 {
        self.conn.config_generation()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if !self.config_served() {
            data.fill(0xff);
            return;
        }
        data.fill(0);
        let len = data.len();
        let end = match usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(len))
        {
            Some(end) if end <= MAX_CONFIG => end,
            // Past what vhost-user can carry: as past the end of a space, zeroes.
            _ => return,
        };
        let start = end - len;
        let asked = vec![0u8; end];
        match self.conn.ask("GET_CONFIG", |fe| {
            fe.get_config(0, end as u32, VhostUserConfigFlags::empty(), &asked)
        }) {
            Ok((_, bytes)) if bytes.len() == end => data.copy_from_slice(&bytes[start..]),
            Ok(_) => {
                self.config_failed(format_args!("GET_CONFIG 0+{end}: a reply of another size"))
            }
            Err(e) => self.config_failed(format_args!("GET_CONFIG 0+{end}: {e}")),
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.config_served() {
            return;
        }
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        if let Err(e) = self.conn.ask("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        }) {
            self.config_failed(format_args!("SET_CONFIG {offset}+{}: {e}", data.len()));
        }
    }
    vhost_user_lifecycle!(conn, GUEST_FEATURES, NAME);
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.conn.queue_positions(self.queue_sizes.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_bits_pass_and_only_our_transport_bits() {
        // Every device-type bit, and of the transport's only those the transport implements.
        for bit in (0..24).chain(50..64) {
            assert_ne!(GUEST_FEATURES & (1 << bit), 0, "bit {bit}");
        }
        for bit in (24..50).filter(|b| ![28, 29, 32].contains(b)) {
            assert_eq!(GUEST_FEATURES & (1 << bit), 0, "bit {bit}");
        }
    }

    #[test]
    fn no_backend_no_device() {
        let e = VhostUserGeneric::new(Path::new("/nonexistent/g.sock"), 2, vec![256])
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/g.sock"), "{e}");
    }
}
