//! virtio-fs (device type 26) over vhost-user: the file system is served by a backend such as
//! virtiofsd, which answers the guest's FUSE requests from the queues itself. The device is
//! the shared frontend of `vhost_user.rs` plus the config space, which we make: the mount tag
//! (36 bytes, NUL-padded) and the number of request queues. Queue 0 is the high-priority queue,
//! queues 1..=num_queues the request queues; no notification queue is offered.

use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;

use crate::vhost_user::{VhostUserConnection, VhostUserError};
use crate::{
    ActivateContext, ActivateError, BlockState, VirtioDevice, VirtioDeviceState,
    VIRTIO_DEVICE_STATE_VERSION,
};

pub const TYPE_FS: u16 = 26;
/// `struct virtio_fs_config`: `tag[36]`, `num_request_queues` (le32).
pub const FS_TAG_LEN: usize = 36;
const CONFIG_LEN: usize = FS_TAG_LEN + 4;
/// Indirect descriptors, event index and VERSION_1 (no VIRTIO_FS_F_NOTIFICATION).
const GUEST_FEATURES: u64 = (1 << 28) | (1 << 29) | (1 << 32);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    #[error("tag={0:?}: must be 1 to 36 bytes")]
    Tag(String),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

pub struct VhostUserFs {
    conn: VhostUserConnection,
    config: [u8; CONFIG_LEN],
    /// Request queues (the high-priority queue comes on top).
    num_queues: u16,
    queue_size: u16,
}

impl VhostUserFs {
    /// Connects to the backend at `socket` for a file system the guest mounts as `tag`, with
    /// `num_queues` request queues of `queue_size`.
    pub fn new(
        socket: &Path,
        tag: &str,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, VhostUserFsError> {
        if tag.is_empty() || tag.len() > FS_TAG_LEN {
            return Err(VhostUserFsError::Tag(tag.into()));
        }
        let total = num_queues + 1;
        let (conn, got) = VhostUserConnection::connect(
            "vhost-user-fs",
            socket,
            total,
            queue_size,
            VhostUserProtocolFeatures::MQ,
        )?;
        if got.contains(VhostUserProtocolFeatures::MQ) {
            let have = conn.ask("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
            if u64::from(total) > have {
                return Err(
                    VhostUserError::TooManyQueues(num_queues, have.saturating_sub(1)).into(),
                );
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[FS_TAG_LEN..].copy_from_slice(&u32::from(num_queues).to_le_bytes());
        Ok(VhostUserFs {
            conn,
            config,
            num_queues,
            queue_size,
        })
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u16 {
        TYPE_FS
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues) + 1]
    }
    fn features(&self) -> u64 {
        self.conn.backend_features & GUEST_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.conn.start(ctx, GUEST_FEATURES).map_err(|e| {
            self.conn.stop();
            ActivateError::Other(e)
        })
    }
    fn reset(&mut self) {
        self.conn.stop();
    }
    fn pause(&mut self) -> Result<(), String> {
        if !self.conn.running() {
            return Ok(());
        }
        // The file system's state is virtiofsd's (the FUSE session from INIT, the inodes the
        // guest looked up, its open files): a snapshot could not give it to the backend a
        // restore connects to. Pauses are only taken for snapshots and migrations.
        Err(
            "vhost-user-fs: no snapshot or migration while the driver runs the file system \
             (virtiofsd's FUSE session, inodes and open files cannot be saved)"
                .into(),
        )
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn start_dirty_log(&mut self, _last_addr: u64) -> Result<(), String> {
        // As for a snapshot (see `pause`): the file system's state cannot go with the VM (nor
        // is LOG_SHMFD negotiated with its backend). A device the driver has not started has
        // nothing to lose (if it starts meanwhile, the pause at the end refuses).
        if !self.conn.running() {
            return Ok(());
        }
        Err(
            "vhost-user-fs: no migration (virtiofsd's FUSE session, inodes and open files \
             cannot be moved)"
                .into(),
        )
    }
    fn device_state(&self) -> VirtioDeviceState {
        // Nothing of its own (the file system's state is the backend's); a snapshot could
        // only be taken before the driver started it, and is refused at restore.
        VirtioDeviceState::Block(BlockState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            config_generation: 0,
        })
    }
    fn set_device_state(&mut self, _state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        Err(pci::StateError::Invalid {
            what: "vhost-user-fs".into(),
            reason: "its state lives in the backend: not restorable".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_must_fit_the_config_space_and_the_backend_must_answer() {
        let long = "x".repeat(FS_TAG_LEN + 1);
        for tag in ["", long.as_str()] {
            match VhostUserFs::new(Path::new("/nonexistent/vfs.sock"), tag, 1, 1024) {
                Err(VhostUserFsError::Tag(t)) => assert_eq!(t, tag),
                Err(e) => panic!("{tag:?}: {e}"),
                Ok(_) => panic!("{tag:?} accepted"),
            }
        }
        let tag = "y".repeat(FS_TAG_LEN);
        match VhostUserFs::new(Path::new("/nonexistent/vfs.sock"), &tag, 1, 1024) {
            Err(e) => assert!(
                e.to_string()
                    .starts_with("cannot connect to /nonexistent/vfs.sock"),
                "{e}"
            ),
            Ok(_) => panic!("connected to nothing"),
        }
    }
}
