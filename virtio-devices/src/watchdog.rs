//! The original's virtio-watchdog (device type 35, `--watchdog`): the guest "pings" by giving
//! the device a write-only buffer, which the device fills with a 1 and returns. The first ping
//! arms a periodic 15 s timer; when it fires and the last ping is more than 20 s old, the VM
//! is reset (the guest hung). Time the VM spends paused does not count.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::VmRequests;
use guest_memory::GuestMemoryMmap;
use log::{debug, error, info, warn};
use vm_memory::Bytes;
use vmm_sys_util::timerfd::TimerFd;

use crate::device_worker::DeviceWorker;
use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};
use crate::{
    ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState, F_VERSION_1,
    VIRTIO_DEVICE_STATE_VERSION,
};

/// The original's device type for its watchdog (not a virtio spec id).
pub const TYPE_WATCHDOG: u16 = 35;
const QUEUE_SIZE: u16 = 8;
/// How often the timer looks at the last ping.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(15);
/// A ping older than this when the timer fires resets the VM.
pub const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(20);

/// When the guest last pinged; `None` until its first ping. Shared by the device (a resume
/// counts as a ping: paused time is not the guest's fault) and its worker.
type LastPing = Arc<Mutex<Option<Instant>>>;

fn lock(p: &LastPing) -> std::sync::MutexGuard<'_, Option<Instant>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

struct WatchdogHandler {
    timer: TimerFd,
    last_ping: LastPing,
    requests: Arc<dyn VmRequests>,
}

impl WatchdogHandler {
    fn arm(&mut self) {
        if let Err(e) = self.timer.reset(WATCHDOG_INTERVAL, Some(WATCHDOG_INTERVAL)) {
            warn!("virtio-watchdog: cannot arm the timer: {e}");
        }
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-watchdog",
        // Nothing beyond a worker's own: its expiry timer is a timer fd.
        calls: &[],
        ioctls: &[],
    };

impl QueueHandler for WatchdogHandler {
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
        let mut pinged = false;
        let used = process_chains(index, q, |_, chain| {
            let Some(desc) = chain.first() else {
                return Some(0);
            };
            if !desc.is_write_only() || desc.len() == 0 {
                debug!("virtio-watchdog: a ping without a write-only buffer; ignored");
                return Some(0);
            }
            if mem.write_obj(1u8, desc.addr()).is_err() {
                debug!("virtio-watchdog: buffer outside guest memory; ignored");
                return Some(0);
            }
            pinged = true;
            Some(1)
        })?;
        if pinged {
            let first = lock(&self.last_ping).replace(Instant::now()).is_none();
            if first {
                info!(
                    "virtio-watchdog: first ping; checking every {}s",
                    WATCHDOG_INTERVAL.as_secs()
                );
                self.arm();
            }
        }
        Ok(used)
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.timer.as_raw_fd())
    }

    fn process_extra(
        &mut self,
        _queues: &mut [Option<VirtQueue>],
        _mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if let Err(e) = self.timer.wait() {
            warn!("virtio-watchdog: timer: {e}");
        }
        let last = *lock(&self.last_ping);
        if let Some(gap) = last.map(|t| t.elapsed()).filter(|g| *g > WATCHDOG_TIMEOUT) {
            error!(
                "virtio-watchdog: no ping for {}s: resetting the VM",
                gap.as_secs()
            );
            // The reset rebuilds the VM; no second one from this device meanwhile.
            *lock(&self.last_ping) = None;
            let _ = self.timer.clear();
            self.requests.reset();
        }
        Ok(0)
    }
}

/// The watchdog's own state: whether the guest has pinged (the timer runs then).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogState {
    pub version: u32,
    pub armed: bool,
}

pub struct Watchdog {
    worker: DeviceWorker<WatchdogHandler>,
    last_ping: LastPing,
}

impl Watchdog {
    /// `requests`: where the expiry asks for a reset.
    pub fn new(requests: Arc<dyn VmRequests>) -> std::io::Result<Self> {
        let last_ping: LastPing = Arc::new(Mutex::new(None));
        Ok(Watchdog {
            worker: DeviceWorker::new(
                "virtio-watchdog",
                WatchdogHandler {
                    timer: TimerFd::new()?,
                    last_ping: last_ping.clone(),
                    requests,
                },
            ),
            last_ping,
        })
    }
}

impl VirtioDevice for Watchdog {
    fn device_type(&self) -> u16 {
        TYPE_WATCHDOG
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
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // A restored watchdog that was armed goes on from now.
        if lock(&self.last_ping).is_some() {
            if let Some(h) = self.worker.idle_mut() {
                *lock(&self.last_ping) = Some(Instant::now());
                h.arm();
            }
        }
        self.worker.activate(ctx)
    }
    fn reset(&mut self) {
        let h = self.worker.reset();
        // A new driver starts it again with its first ping.
        *lock(&self.last_ping) = None;
        if let Some(h) = h {
            let _ = h.timer.clear();
        }
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.worker.queue_positions()
    }
    fn pause(&mut self) -> Result<(), String> {
        self.worker.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        // The time paused is not the guest's: the resume counts as a ping.
        let mut last = lock(&self.last_ping);
        if last.is_some() {
            *last = Some(Instant::now());
        }
        drop(last);
        self.worker.resume()
    }
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Watchdog(WatchdogState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            armed: lock(&self.last_ping).is_some(),
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-watchdog";
        let VirtioDeviceState::Watchdog(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        *lock(&self.last_ping) = s.armed.then(Instant::now);
        Ok(())
    }
}
