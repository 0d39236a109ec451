//! virtio-rng: fills the driver's write-only buffers from a host entropy source.

use std::fs::File;
use std::io::Read;

use guest_memory::GuestMemoryMmap;
use log::{debug, warn};
use vm_memory::Bytes;

use crate::device_worker::{version_only_state, worker_lifecycle, DeviceWorker};
use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};
use crate::{VirtioDevice, F_VERSION_1, TYPE_RNG};

const QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request.
const MAX_REQUEST: usize = 64 * 1024;

struct RngHandler {
    source: File,
    buf: Vec<u8>,
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-rng",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Entropy from the source file (/dev/urandom by default).
                getrandom,
            ]
        },
        ioctls: &[],
    };

impl QueueHandler for RngHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        let (source, buf) = (&mut self.source, &mut self.buf);
        process_chains(index, q, |_, chain| {
            let mut total = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    debug!("virtio-rng: read-only descriptor; request failed");
                    return Some(0);
                }
                let want = (desc.len() as usize).min(MAX_REQUEST - total);
                if want == 0 {
                    continue;
                }
                buf.resize(want, 0);
                if let Err(e) = source.read_exact(&mut buf[..want]) {
                    warn!("virtio-rng: entropy source: {e}");
                    return Some(total as u32);
                }
                if mem.write_slice(&buf[..want], desc.addr()).is_err() {
                    debug!("virtio-rng: buffer outside guest memory; request failed");
                    return Some(total as u32);
                }
                total += want;
            }
            Some(total as u32)
        })
    }
}

/// virtio-rng's own state: nothing beyond the transport's (its queue positions) — the
/// version only. Requests are served synchronously, so a paused rng has none in flight.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub version: u32,
}

pub struct Rng {
    worker: DeviceWorker<RngHandler>,
}

impl Rng {
    pub fn new(source: File) -> Self {
        Rng {
            worker: DeviceWorker::new(
                "virtio-rng",
                RngHandler {
                    source,
                    buf: Vec::new(),
                },
            ),
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    worker_lifecycle!(worker);
    version_only_state!(Rng, RngState, "virtio-rng");
}
