//! vhost-user-blk frontend: the block device runs in another process (the backend, e.g.
//! `qemu-storage-daemon --export type=vhost-user-blk`) over the shared frontend of
//! `vhost_user.rs`; this file adds the block device's part: the CONFIG protocol feature, the
//! config space read from the backend (again on each of its config-change notices, where it
//! offers BACKEND_REQ: a disk it resized reaches the guest as a configuration interrupt),
//! multiqueue, and reconnection: a backend that dies is replaced by the next one listening on
//! the socket, the queues resuming where it left them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::vhost_user::{vhost_user_lifecycle, VhostUserConnection, VhostUserError};
use crate::VirtioDevice;

const NAME: &str = "vhost-user-blk";

const TYPE_BLOCK: u16 = 2;
/// `struct virtio_blk_config` up to and including the write-zeroes fields.
const CONFIG_LEN: u32 = 60;
/// Offset of `num_queues` in the config space.
const CONFIG_NUM_QUEUES: usize = 34;
const F_BLK_MQ: u64 = 1 << 12;
/// What the guest may see of the backend's features: the block device's own bits, indirect
/// descriptors, event index and VERSION_1 (split rings only; no IOMMU, no packed rings).
const GUEST_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | (1 << 32);

/// The errors of building a vhost-user-blk device (those of any vhost-user frontend).
pub type VhostUserBlockError = VhostUserError;

pub struct VhostUserBlock {
    conn: VhostUserConnection,
    /// The backend's config space, `num_queues` ours; read again on a config-change notice.
    config: Arc<Mutex<Vec<u8>>>,
    num_queues: u16,
    queue_size: u16,
}

impl VhostUserBlock {
    /// Connects to the backend at `socket` and reads what it offers (features, config space).
    /// A backend that goes away is waited for `give_up` (then the device needs a reset).
    pub fn new(
        socket: &Path,
        num_queues: u16,
        queue_size: u16,
        give_up: std::time::Duration,
    ) -> Result<Self, VhostUserBlockError> {
        let (mut conn, got) = VhostUserConnection::connect(
            NAME,
            socket,
            num_queues,
            queue_size,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::BACKEND_REQ,
        )?;
        if !got.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Missing("the CONFIG protocol feature"));
        }
        // The disk's state is the image's: a backend started again on the same socket takes
        // the running queues over (docs/pci.md, "Reconnection").
        conn.reconnect_running_queues(give_up);
        if num_queues > 1 {
            let have = if got.contains(VhostUserProtocolFeatures::MQ) {
                conn.ask("GET_QUEUE_NUM", |fe| fe.get_queue_num())?
            } else {
                1
            };
            if u64::from(num_queues) > have || conn.backend_features & F_BLK_MQ == 0 {
                return Err(VhostUserError::TooManyQueues(num_queues, have));
            }
        }
        let config = conn.ask("GET_CONFIG", |fe| read_config_space(fe, num_queues))?;
        let config = Arc::new(Mutex::new(config));
        let cache = config.clone();
        conn.on_config_change(move |fe| match read_config_space(fe, num_queues) {
            Ok(c) => *cache.lock().unwrap_or_else(|e| e.into_inner()) = c,
            Err(e) => log::warn!("{NAME}: GET_CONFIG after a configuration change: {e}"),
        });
        Ok(VhostUserBlock {
            conn,
            config,
            num_queues,
            queue_size,
        })
    }
}

/// The backend's config space (GET_CONFIG from offset 0), with `num_queues` the device's.
fn read_config_space(fe: &mut Frontend, num_queues: u16) -> vhost::Result<Vec<u8>> {
    let buf = vec![0u8; CONFIG_LEN as usize];
    let (_, mut config) = fe.get_config(0, CONFIG_LEN, VhostUserConfigFlags::WRITABLE, &buf)?;
    config.resize(CONFIG_LEN as usize, 0);
    config[CONFIG_NUM_QUEUES..CONFIG_NUM_QUEUES + 2].copy_from_slice(&num_queues.to_le_bytes());
    Ok(config)
}

impl VirtioDevice for VhostUserBlock {
    fn device_type(&self) -> u16 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.queue_size; usize::from(self.num_queues)]
    }
    fn features(&self) -> u64 {
        let mut f = self.conn.backend_features & GUEST_FEATURES;
        if self.num_queues == 1 {
            f &= !F_BLK_MQ;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        crate::read_config_bytes(&config, offset, data);
    }
    fn config_generation(&self) -> u32 {
        self.conn.config_generation()
    }
    vhost_user_lifecycle!(conn, GUEST_FEATURES, NAME);
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.conn.queue_positions(usize::from(self.num_queues))
    }
}
