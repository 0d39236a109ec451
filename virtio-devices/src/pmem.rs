//! virtio-pmem (virtio 1.2, 5.19): a range of guest-physical memory backed by a host file, which
//! the VMM maps and registers with the hypervisor; the guest reads and writes it directly. The
//! device itself only tells the guest where the range is (its configuration: le64 start, le64
//! size) and serves FLUSH requests, which make the guest's writes durable in the file.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress};

use crate::device_worker::{worker_lifecycle, DeviceWorker};
use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};
use crate::{VirtioDevice, VirtioDeviceState, F_VERSION_1, VIRTIO_DEVICE_STATE_VERSION};

pub const TYPE_PMEM: u16 = 27;
const QUEUE_SIZE: u16 = 256;
/// The one request type (`VIRTIO_PMEM_REQ_TYPE_FLUSH`).
const REQ_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;

/// Where the range is and what backs it, shared with the VMM, which sets `start` when it has
/// placed the range (before the device is on the bus).
pub struct PmemRange {
    pub start: AtomicU64,
    pub size: u64,
}

struct PmemHandler {
    /// `None` with `discard_writes`: the guest's writes are private, nothing to make durable.
    file: Option<File>,
}

impl PmemHandler {
    /// A FLUSH: the file's data reaches the disk. The mapping is shared with the page cache,
    /// so what the guest stored is in the file's pages already; `fdatasync` writes them back.
    fn flush(&self) -> u32 {
        let Some(f) = &self.file else {
            return RESP_OK;
        };
        match f.sync_data() {
            Ok(()) => RESP_OK,
            Err(e) => {
                warn!("virtio-pmem: flush: {e}");
                RESP_EIO
            }
        }
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-pmem",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // FLUSH: the mapped file made durable.
                fsync, fdatasync, msync,
            ]
        },
        ioctls: &[],
    };

impl QueueHandler for PmemHandler {
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
        process_chains(index, q, |_, chain| {
            // A readable request (le32 type) and, after it, a writable status (le32).
            let Some(req) = chain.iter().find(|d| !d.is_write_only() && d.len() >= 4) else {
                debug!("virtio-pmem: no request buffer; chain dropped");
                return Some(0);
            };
            let Some(resp) = chain.iter().find(|d| d.is_write_only() && d.len() >= 4) else {
                debug!("virtio-pmem: no status buffer; chain dropped");
                return Some(0);
            };
            let ret = match mem.read_obj::<u32>(GuestAddress(req.addr().0)) {
                Ok(t) if u32::from_le(t) == REQ_FLUSH => self.flush(),
                Ok(t) => {
                    debug!("virtio-pmem: unknown request type {}", u32::from_le(t));
                    RESP_EIO
                }
                Err(_) => {
                    debug!("virtio-pmem: request outside guest memory");
                    RESP_EIO
                }
            };
            match mem.write_obj(ret.to_le(), GuestAddress(resp.addr().0)) {
                Ok(()) => Some(4),
                Err(_) => {
                    debug!("virtio-pmem: status outside guest memory");
                    Some(0)
                }
            }
        })
    }
}

/// virtio-pmem's own state: the range the guest was told of. The range's contents are not in
/// it: the file is the state (with `discard_writes`, what the guest wrote is lost).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemState {
    pub version: u32,
    pub start: u64,
    pub size: u64,
}

pub struct Pmem {
    range: Arc<PmemRange>,
    worker: DeviceWorker<PmemHandler>,
}

impl Pmem {
    /// `file`: `None` when the guest's writes are discarded. `range.start` is set by the VMM
    /// once it has placed the range.
    pub fn new(file: Option<File>, range: Arc<PmemRange>) -> Self {
        Pmem {
            range,
            worker: DeviceWorker::new("virtio-pmem", PmemHandler { file }),
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.range.start.load(Ordering::Acquire).to_le_bytes());
        c[8..].copy_from_slice(&self.range.size.to_le_bytes());
        c
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u16 {
        TYPE_PMEM
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    worker_lifecycle!(worker);
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Pmem(PmemState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            start: self.range.start.load(Ordering::Acquire),
            size: self.range.size,
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-pmem";
        let VirtioDeviceState::Pmem(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        let start = self.range.start.load(Ordering::Acquire);
        if (s.start, s.size) != (start, self.range.size) {
            // The guest maps the range it was told of: it must be where it was.
            return Err(pci::StateError::invalid(
                WHAT,
                format!(
                    "the range {:#x}+{:#x}, placed now at {start:#x}+{:#x}",
                    s.start, s.size, self.range.size
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_state() {
        let range = Arc::new(PmemRange {
            start: AtomicU64::new(0x1_0000_0000),
            size: 2 << 20,
        });
        let mut p = Pmem::new(None, range.clone());
        let mut b = [0u8; 16];
        p.read_config(0, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x1_0000_0000
        );
        assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), 2 << 20);
        let mut tail = [0xffu8; 8];
        p.read_config(10, &mut tail);
        assert_eq!(tail, [0x20, 0, 0, 0, 0, 0, 0, 0]);
        p.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 8]);
        let s = p.device_state();
        p.set_device_state(&s).unwrap();
        range.start.store(0x2_0000_0000, Ordering::Release);
        assert!(p.set_device_state(&s).is_err());
    }
}
