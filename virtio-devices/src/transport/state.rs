//! Saving and restoring the virtio-pci transport: [`VirtioPciState`] (configuration space,
//! MSI-X table, common configuration, each queue's registers and positions) and the
//! [`VirtioPciDevice`] methods that take it, check it and put it back, plus the pass-through
//! of the device's own state.

use std::sync::atomic::Ordering;

use log::info;
use pci::{MsixState, PciConfigurationState, StateError};
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{build_queues, QueueRegs, VirtioPciDevice, NO_VECTOR};
use crate::STATUS_NEEDS_RESET;

/// The `VirtioPciState` layout this build writes and the only one it restores.
pub const VIRTIO_PCI_STATE_VERSION: u32 = 1;

/// What the virtio-pci transport of one device holds: its PCI configuration space and MSI-X
/// table, the common configuration the driver programmed, and where the device stands in each
/// queue. The device's own state (a disk's requests, a console's input, ...) is not here.
///
/// Taken with [`VirtioPciDevice::state`] while the VM is paused (vCPUs out, the device's
/// worker quiesced), restored with [`VirtioPciDevice::set_state`] into a transport built from
/// the same configuration, after guest memory and before any vCPU runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// [`VIRTIO_PCI_STATE_VERSION`] when written.
    pub version: u32,
    /// The virtio device type (1 net, 2 block, 3 console, 4 rng); restored only into the same.
    pub device_type: u16,
    pub config: PciConfigurationState,
    pub msix: MsixState,
    /// The feature bits the device offered; restored only into a device offering the same.
    pub device_features: u64,
    /// The feature bits the driver accepted (a subset of `device_features`).
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    /// `device_status` as the driver reads it (NEEDS_RESET included).
    pub status: u8,
    /// Whether the device was started (DRIVER_OK with FEATURES_OK) since the last reset; its
    /// queues are then handed to the device again on restore.
    pub activated: bool,
    /// The ISR status byte (bit 0 queue, bit 1 configuration), not yet read by the driver.
    pub isr: u8,
    /// `config_generation` as the device reported it. The generation belongs to the device
    /// (it changes with the device's configuration): a restore leaves it to the device's own
    /// state.
    pub config_generation: u32,
    /// `config_msix_vector` (0xffff: none).
    pub config_vector: u16,
    pub queue_select: u16,
    /// One per queue of the device, in order.
    pub queues: Vec<VirtqueueState>,
}

/// One queue: what the driver programmed through the common configuration, and the device's
/// positions in the rings. The fields are those of `virtio_queue::QueueState` (the maintained
/// crate's state type, which has no serde), plus the MSI-X vector; `event_idx_enabled` is the
/// negotiated EVENT_IDX feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The device's maximum; restored only into a queue of the same maximum.
    pub max_size: u16,
    /// `queue_size` as the driver wrote it (checked when the device starts).
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// `queue_msix_vector` (0xffff: none).
    pub msix_vector: u16,
    /// The next available-ring entry the device will take (0 until the device starts).
    pub next_avail: u16,
    /// The next used-ring entry the device will fill (0 until the device starts).
    pub next_used: u16,
}

impl VirtqueueState {
    /// The queue as `virtio-queue` describes its state.
    pub fn queue_state(&self, event_idx: bool) -> virtio_queue::QueueState {
        virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        }
    }
}

impl VirtioPciDevice {
    /// The device's own state (see [`VirtioDevice::device_state`](crate::VirtioDevice::device_state)).
    pub fn device_state(&self) -> crate::VirtioDeviceState {
        self.device.device_state()
    }

    /// Restores the device's own state; before [`Self::set_state`], which may start it.
    pub fn set_device_state(&mut self, state: &crate::VirtioDeviceState) -> Result<(), StateError> {
        self.device
            .set_device_state(state)
            .map_err(|e| e.within(&self.name))
    }

    /// The transport's state now (see [`VirtioPciState`]); the VM must be paused. For a started
    /// device, each queue's positions come from [`VirtioDevice::queue_positions`](crate::VirtioDevice::queue_positions), or, where
    /// the device cannot say, from the used ring's index in guest memory (both positions: exact
    /// when nothing is in flight).
    pub fn state(&self) -> VirtioPciState {
        let positions = if self.activated {
            self.device.queue_positions()
        } else {
            None
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) =
                    match positions.as_ref().and_then(|p| p.get(i).copied()) {
                        Some(Some(p)) => p,
                        Some(None) => (0, 0),
                        None if self.activated && q.ready => {
                            let used_idx = q
                                .used
                                .checked_add(2)
                                .and_then(|a| self.mem.read_obj::<u16>(GuestAddress(a)).ok())
                                .unwrap_or(0);
                            (used_idx, used_idx)
                        }
                        None => (0, 0),
                    };
                VirtqueueState {
                    max_size: q.max_size,
                    size: q.size,
                    ready: q.ready,
                    desc_table: q.desc,
                    avail_ring: q.avail,
                    used_ring: q.used,
                    msix_vector: self.queue_vectors[i].load(Ordering::Acquire),
                    next_avail,
                    next_used,
                }
            })
            .collect();
        VirtioPciState {
            version: VIRTIO_PCI_STATE_VERSION,
            device_type: self.device.device_type(),
            config: self.config.state(),
            msix: self.msix.lock().unwrap_or_else(|e| e.into_inner()).state(),
            device_features: self.offered,
            driver_features: self.acked,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            status: self.status.get(),
            activated: self.activated,
            isr: self.isr.load(Ordering::Acquire),
            config_generation: self.device.config_generation(),
            config_vector: self.config_vector.load(Ordering::Acquire),
            queue_select: self.queue_select,
            queues,
        }
    }

    /// Makes the transport what `state` describes: configuration space, MSI-X table (its GSIs
    /// routed to the restored messages), common configuration and ISR; a device that was
    /// started gets its queues again at the saved positions (its worker starts) and every
    /// ready queue is notified once when the device next resumes (the restore pauses it at
    /// once: the VM comes up paused), so requests the driver published before the save are
    /// seen without a new notification, and none before the VM runs. A device that had
    /// NEEDS_RESET is not started (it would ignore its queues until the driver resets it
    /// anyway).
    ///
    /// All or nothing for [`StateError::Version`] and [`StateError::Invalid`]: everything is
    /// checked, the rings of a started device against guest memory included, before anything
    /// changes. [`StateError::Host`]: an MSI route or the device's start failed; the state is
    /// in place as far as it went.
    ///
    /// The MMIO bus and the notify ioeventfds follow BAR 0 only once the caller runs
    /// `PciRoot::refresh_bars` (without this transport's lock held). The device's own state,
    /// when it has one, must be restored before this, since this may start the device.
    pub fn set_state(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let queues = self.check_state(state).map_err(|e| e.within(&self.name))?;
        self.kick_at_resume.clear();
        if self.activated {
            // Stops the worker; the queues it held are replaced below.
            self.device.reset();
        }
        let mut failed = None;
        // Checked above: these cannot refuse.
        let _ = self.config.set_state(&state.config);
        {
            let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = msix.set_state(&state.msix) {
                failed = Some(e);
            }
            // The capability's enable and function-mask bits are MSI-X's.
            let reg = self.msix_cap / 4;
            let ctl = u32::from(msix.control_bits()) << 16;
            self.config
                .set_reg(reg, (self.config.read_reg(reg) & !0xc000_0000) | ctl);
        }
        self.acked = state.driver_features;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.queue_select = state.queue_select;
        self.isr.store(state.isr, Ordering::Release);
        self.config_vector
            .store(state.config_vector, Ordering::Release);
        for ((regs, v), q) in self
            .queues
            .iter_mut()
            .zip(self.queue_vectors.iter())
            .zip(&state.queues)
        {
            *regs = QueueRegs {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                desc: q.desc_table,
                avail: q.avail_ring,
                used: q.used_ring,
            };
            v.store(q.msix_vector, Ordering::Release);
        }
        self.status.set(state.status);
        self.activated = state.activated;
        if queues.is_none() {
            // Not started by this restore: a device state restored for a start is dropped.
            self.device.reset();
        }
        if let Some(queues) = queues {
            let ready: Vec<usize> = (0..queues.len()).filter(|&i| queues[i].is_some()).collect();
            match self.start_device(queues) {
                Ok(()) => {
                    info!("{}: restored and started", self.name);
                    // Notified at the resume (`resume`), not now: a notification would have
                    // the device take requests before the VM runs again.
                    self.kick_at_resume = ready;
                }
                Err(e) => {
                    // As a failed start by the driver: the guest sees NEEDS_RESET.
                    self.status.mark_needs_reset();
                    failed.get_or_insert(StateError::Host {
                        what: "virtio-pci".into(),
                        reason: format!("cannot start the device: {e}"),
                    });
                }
            }
        }
        match failed {
            Some(e) => Err(e.within(&self.name)),
            None => Ok(()),
        }
    }

    /// Every check of [`Self::set_state`]; for a started device that is to run again, the
    /// queues it will get.
    #[allow(clippy::type_complexity)]
    fn check_state(
        &self,
        state: &VirtioPciState,
    ) -> Result<Option<Vec<Option<(Queue, EventFd)>>>, StateError> {
        const WHAT: &str = "virtio-pci";
        let invalid = |reason: String| Err(StateError::invalid(WHAT, reason));
        StateError::check_version(WHAT, state.version, VIRTIO_PCI_STATE_VERSION)?;
        let dtype = self.device.device_type();
        if state.device_type != dtype {
            return invalid(format!(
                "the state is of a device of type {}, this one is of type {dtype}",
                state.device_type
            ));
        }
        if state.device_features != self.offered {
            return invalid(format!(
                "the device offered features {:#x}, this one offers {:#x} (another \
                 configuration)",
                state.device_features, self.offered
            ));
        }
        if state.driver_features & !self.offered != 0 {
            return invalid(format!(
                "driver features {:#x} include bits the device does not offer",
                state.driver_features
            ));
        }
        if state.queues.len() != self.queues.len() {
            return invalid(format!(
                "{} queues, this device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        self.config.check_state(&state.config)?;
        let vectors = {
            let msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
            msix.check_state(&state.msix)?;
            msix.count()
        };
        let vector_ok = |v: u16| v == NO_VECTOR || usize::from(v) < vectors;
        if !vector_ok(state.config_vector) {
            return invalid(format!(
                "configuration vector {} of {vectors}",
                state.config_vector
            ));
        }
        let start = state.activated && state.status & STATUS_NEEDS_RESET == 0;
        for (i, (q, mine)) in state.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != mine.max_size {
                return invalid(format!(
                    "queue {i} has at most {} entries, this device's {}",
                    q.max_size, mine.max_size
                ));
            }
            if !vector_ok(q.msix_vector) {
                return invalid(format!("queue {i} vector {} of {vectors}", q.msix_vector));
            }
            if start && q.ready && q.next_avail.wrapping_sub(q.next_used) > q.size {
                return invalid(format!(
                    "queue {i}: {} requests in flight in a queue of {}",
                    q.next_avail.wrapping_sub(q.next_used),
                    q.size
                ));
            }
        }
        if !start {
            return Ok(None);
        }
        if !state.queues.iter().any(|q| q.ready) {
            // A driver's DRIVER_OK without a ready queue ends in NEEDS_RESET.
            return invalid("the device was started without a ready queue".into());
        }
        // The queues as the device will get them: the same checks as a driver's DRIVER_OK.
        let regs: Vec<QueueRegs> = state
            .queues
            .iter()
            .map(|q| QueueRegs {
                max_size: q.max_size,
                size: q.size,
                ready: q.ready,
                desc: q.desc_table,
                avail: q.avail_ring,
                used: q.used_ring,
            })
            .collect();
        let positions: Vec<(u16, u16)> = state
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        build_queues(
            &regs,
            &positions,
            state.driver_features,
            &self.mem,
            &self.notify,
            self.dma_for(state.driver_features),
        )
        .map(Some)
        .map_err(|reason| {
            StateError::invalid(WHAT, format!("the device was started, but {reason}"))
        })
    }
}
