//! A virtio device's one worker across the device's lifecycle: the handler while no driver
//! runs the device, the worker (running or paused) once one activated it. The devices that
//! serve their queues from one worker thread keep one of these, so that activation, reset,
//! pause, resume and the queue positions of a snapshot work alike in every device; what a
//! device adds (a configuration interrupt, state of its own) goes around these calls.

use log::warn;

use crate::worker::{QueueHandler, WorkerHandle};
use crate::{ActivateContext, ActivateError};

pub struct DeviceWorker<H> {
    name: &'static str,
    /// The handler between activations. A device that keeps it (`new`) gets it back at each
    /// reset, for the next driver; one that builds it at each activation (`fresh`) drops it.
    idle: Option<H>,
    keep: bool,
    active: Option<WorkerHandle<H>>,
}

impl<H: QueueHandler> DeviceWorker<H> {
    /// A worker whose handler (`handler`, e.g. the disk it serves) lives as long as the device.
    pub fn new(name: &'static str, handler: H) -> Self {
        DeviceWorker {
            name,
            idle: Some(handler),
            keep: true,
            active: None,
        }
    }

    /// A worker whose handler each activation builds anew (`activate_with`).
    pub fn fresh(name: &'static str) -> Self {
        DeviceWorker {
            name,
            idle: None,
            keep: false,
            active: None,
        }
    }

    /// Whether a driver activated the device (and no reset came since).
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The kept handler between activations (`None` while active, and for good once a worker
    /// thread died with it).
    pub fn idle(&self) -> Option<&H> {
        self.idle.as_ref()
    }

    /// See `idle`: what a device changes in its handler before the next activation.
    pub fn idle_mut(&mut self) -> Option<&mut H> {
        self.idle.as_mut()
    }

    /// Starts the worker thread with the kept handler.
    pub fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.refuse_if_active()?;
        let handler = self.idle.take().ok_or_else(|| {
            ActivateError::Other(format!(
                "{}: its worker died earlier; the device stays broken until the VMM restarts",
                self.name
            ))
        })?;
        self.active = Some(WorkerHandle::spawn(self.name, handler, ctx)?);
        Ok(())
    }

    /// Starts the worker thread with `handler`, built for this activation.
    pub fn activate_with(&mut self, handler: H, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.refuse_if_active()?;
        self.active = Some(WorkerHandle::spawn(self.name, handler, ctx)?);
        Ok(())
    }

    fn refuse_if_active(&self) -> Result<(), ActivateError> {
        match self.active {
            Some(_) => Err(ActivateError::Other(format!(
                "{}: already active",
                self.name
            ))),
            None => Ok(()),
        }
    }

    /// A device reset: stops the worker, if active, and for a device that keeps its handler
    /// takes it back. Returns the kept handler (active before or not), for what the reset must
    /// clear in it.
    pub fn reset(&mut self) -> Option<&mut H> {
        if let Some(w) = self.active.take() {
            let handler = w.stop();
            if self.keep {
                if handler.is_none() {
                    warn!(
                        "{}: the worker died; the device stays broken until the VMM restarts",
                        self.name
                    );
                }
                self.idle = handler;
            }
        }
        self.idle.as_mut()
    }

    /// Runs `f` on the handler: the kept one while no driver runs the device, otherwise the
    /// worker's, its thread paused for it (and resumed after, unless it was paused already:
    /// a snapshot's pause stays). `Err`: the worker thread had died.
    pub fn with_handler<R>(&mut self, f: impl FnOnce(&mut H) -> R) -> Result<R, String> {
        let Some(w) = self.active.as_mut() else {
            return self
                .idle
                .as_mut()
                .map(f)
                .ok_or_else(|| format!("{}: no handler", self.name));
        };
        let was_running = !w.is_paused();
        w.pause()?;
        let r = w
            .handler_mut()
            .map(f)
            .ok_or_else(|| format!("{}: the worker thread died", self.name))?;
        if was_running {
            w.resume()?;
        }
        Ok(r)
    }

    /// Each queue's `(next_avail, next_used)` while active and paused; `None` otherwise.
    pub fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.active.as_ref()?.queue_positions()
    }

    /// Pauses an active worker (`WorkerHandle::pause`); nothing to do when inactive.
    pub fn pause(&mut self) -> Result<(), String> {
        self.active.as_mut().map_or(Ok(()), |w| w.pause())
    }

    /// Resumes a paused worker (`WorkerHandle::resume`); nothing to do when inactive.
    pub fn resume(&mut self) -> Result<(), String> {
        self.active.as_mut().map_or(Ok(()), |w| w.resume())
    }
}

/// The lifecycle methods of `VirtioDevice` (activate, reset, queue_positions, pause, resume)
/// for a device whose whole lifecycle is its `DeviceWorker` field `$worker` (virtio-rng,
/// virtio-rtc, virtio-pmem): written inside the device's `impl VirtioDevice`. A device that
/// does more around these calls (a configuration interrupt, state of its own) writes them out,
/// or only activate and reset (`worker_pausing!` for the rest).
macro_rules! worker_lifecycle {
    ($worker:ident) => {
        fn activate(&mut self, ctx: $crate::ActivateContext) -> Result<(), $crate::ActivateError> {
            self.$worker.activate(ctx)
        }
        fn reset(&mut self) {
            self.$worker.reset();
        }
        $crate::device_worker::worker_pausing!($worker);
    };
}
pub(crate) use worker_lifecycle;

/// `queue_positions`, `pause` and `resume` of `worker_lifecycle!`, for a device that does more
/// at activation or reset only (virtio-vsock, virtio-iommu).
macro_rules! worker_pausing {
    ($worker:ident) => {
        fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
            self.$worker.queue_positions()
        }
        fn pause(&mut self) -> Result<(), String> {
            self.$worker.pause()
        }
        fn resume(&mut self) -> Result<(), String> {
            self.$worker.resume()
        }
    };
}
pub(crate) use worker_pausing;

/// `device_state`/`set_device_state` for a device whose own state is its version only
/// (`$state { version }` in `VirtioDeviceState::$variant`), named `$what` in errors.
macro_rules! version_only_state {
    ($variant:ident, $state:ident, $what:literal) => {
        fn device_state(&self) -> $crate::VirtioDeviceState {
            $crate::VirtioDeviceState::$variant($state {
                version: $crate::VIRTIO_DEVICE_STATE_VERSION,
            })
        }
        fn set_device_state(
            &mut self,
            state: &$crate::VirtioDeviceState,
        ) -> Result<(), pci::StateError> {
            let $crate::VirtioDeviceState::$variant(s) = state else {
                return Err(state.wrong($what));
            };
            pci::StateError::check_version($what, s.version, $crate::VIRTIO_DEVICE_STATE_VERSION)
        }
    };
}
pub(crate) use version_only_state;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use guest_memory::GuestMemoryMmap;

    use super::*;
    use crate::vring::VirtQueue;
    use crate::worker::tests::one_queue as ctx;

    /// Counts the times it is asked to serve; panics on its `panic_at`th time.
    struct Count {
        served: Arc<AtomicU32>,
        panic_at: u32,
    }
    impl QueueHandler for Count {
        fn process_queue(
            &mut self,
            _index: usize,
            _queues: &mut [Option<VirtQueue>],
            _mem: &GuestMemoryMmap,
        ) -> Result<u64, String> {
            let n = self.served.fetch_add(1, Ordering::SeqCst) + 1;
            assert_ne!(n, self.panic_at, "the handler fails as the test asks");
            Ok(0)
        }
    }

    fn wait_for(served: &AtomicU32, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while served.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the queue was not served");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A handler that counts into `served` and panics on its `panic_at`th time (0: never).
    fn count(served: &Arc<AtomicU32>, panic_at: u32) -> Count {
        Count {
            served: served.clone(),
            panic_at,
        }
    }

    fn message(r: Result<(), ActivateError>) -> String {
        match r {
            Err(ActivateError::Other(m)) => m,
            other => panic!("wanted a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_kept_handler_serves_each_driver_and_refuses_a_second_activation() {
        let served = Arc::new(AtomicU32::new(0));
        let mut w = DeviceWorker::new("dw-kept", count(&served, 0));
        assert!(!w.is_active() && w.idle().is_some());
        // Inactive: pause, resume and a reset are no-ops, and no positions are known.
        w.pause().unwrap();
        w.resume().unwrap();
        assert!(w.reset().is_some());
        assert!(w.queue_positions().is_none());

        let (c, kick) = ctx();
        w.activate(c).unwrap();
        assert!(w.is_active() && w.idle().is_none());
        kick.write(1).unwrap();
        wait_for(&served, 1);
        let (c2, _k2) = ctx();
        assert_eq!(message(w.activate(c2)), "dw-kept: already active");

        w.pause().unwrap();
        assert_eq!(w.queue_positions(), Some(vec![Some((0, 0))]));
        w.resume().unwrap();
        assert!(w.queue_positions().is_none(), "running: no positions");

        // A reset gives the handler back for the next driver, which it serves.
        assert!(w.reset().is_some());
        assert!(!w.is_active());
        let (c, kick) = ctx();
        w.activate(c).unwrap();
        let before = served.load(Ordering::SeqCst);
        kick.write(1).unwrap();
        wait_for(&served, before + 1);
        w.reset();
    }

    #[test]
    fn a_worker_that_died_leaves_the_device_broken_not_the_vmm() {
        let served = Arc::new(AtomicU32::new(0));
        let mut w = DeviceWorker::new("dw-dies", count(&served, 1));
        let (c, kick) = ctx();
        w.activate(c).unwrap();
        kick.write(1).unwrap();
        wait_for(&served, 1);
        // The thread ended with its handler: pause says so, a reset has nothing to give
        // back, and the next driver's activation is refused with the reason.
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.pause().is_ok() {
            assert!(Instant::now() < deadline, "the dead worker paused");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(w.reset().is_none());
        let (c, _kick) = ctx();
        let m = message(w.activate(c));
        assert!(m.starts_with("dw-dies: its worker died earlier"), "{m}");
    }

    #[test]
    fn a_fresh_handler_is_built_for_each_activation_and_dropped_at_reset() {
        let served = Arc::new(AtomicU32::new(0));
        let mut w = DeviceWorker::fresh("dw-fresh");
        let (c, _kick) = ctx();
        assert!(
            message(w.activate(c)).contains("its worker died earlier"),
            "a fresh worker has no kept handler"
        );
        let (c, kick) = ctx();
        w.activate_with(count(&served, 0), c).unwrap();
        let (c2, _k2) = ctx();
        assert_eq!(
            message(w.activate_with(count(&served, 0), c2)),
            "dw-fresh: already active"
        );
        kick.write(1).unwrap();
        wait_for(&served, 1);
        assert!(w.reset().is_none(), "nothing kept");
        assert!(!w.is_active() && w.idle().is_none());
    }
}
