//! `vhost_user_block`: a vhost-user-blk backend (the device runs here, the VMM's
//! `--disk vhost_user=on,socket=` talks to it) serving an image in any format our block crate
//! reads (raw, qcow2, vhd, vhdx: detected as `--disk` does), with the built-in virtio-blk
//! device's request semantics.

pub mod backend;
pub mod config;
pub mod request;

use std::sync::Arc;

use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use backend::{BlockBackend, GuestMemoryMmap};
use config::BackendConfig;
use request::Disk;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--block-backend: path={path}: {source}")]
    Image { path: String, source: block::Error },
    #[error("--block-backend: socket={socket}: {msg}")]
    Socket { socket: String, msg: String },
}

/// Opens the image, listens on the socket, serves one frontend connection until it closes
/// (as the original does: a frontend that comes back needs the backend started again).
pub fn run(c: &BackendConfig) -> Result<(), RunError> {
    let opts = block::OpenOptions {
        readonly: c.readonly,
        direct: c.direct,
        ..Default::default()
    };
    let file = block::open_disk(&c.path, &opts).map_err(|source| RunError::Image {
        path: c.path.display().to_string(),
        source,
    })?;
    log::info!(
        "vhost_user_block: {} ({}, {} bytes{}) on {}",
        c.path.display(),
        file.image_type(),
        file.size(),
        if c.readonly { ", read-only" } else { "" },
        c.socket.display()
    );
    let disk = Disk::new(file, &backend::serial(&c.path));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let be = Arc::new(BlockBackend::new(
        disk,
        c.num_queues,
        c.queue_size,
        c.poll_queue,
        mem.clone(),
    ));
    let socket_err = |msg: String| RunError::Socket {
        socket: c.socket.display().to_string(),
        msg,
    };
    let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), be, mem)
        .map_err(|e| socket_err(e.to_string()))?;
    daemon
        .serve(&c.socket)
        .map_err(|e| socket_err(e.to_string()))
}
