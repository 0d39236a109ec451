//! vCPU hotplug on a running VM, as the original does it: `vm.resize` up creates the vCPUs
//! (or takes back ones unplugged earlier), starts their threads and tells the guest through the
//! CPU hotplug controller and the GED, and the guest starts them with INIT/SIPI; `vm.resize`
//! down asks the guest to eject the top CPUs, and each vCPU stops when the guest does.

use devices::GED_CPU_HOTPLUG;
use log::{info, warn};

use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The guest has not ejected a CPU whose removal was asked (the original answers 429).
    #[error("a CPU removal is still pending: the guest has not ejected it yet")]
    RemovalPending,
    #[error("the VM is paused")]
    Paused,
    #[error("cannot start vCPU {id}: {msg}")]
    Vcpu { id: u32, msg: String },
    #[error("cannot signal the guest: {0}")]
    Event(#[source] std::io::Error),
}

impl Vm {
    /// vCPUs the guest has (present in the CPU hotplug controller, removals pending included).
    pub fn present_vcpus(&self) -> u32 {
        lock(&self.devices().cpu_hotplug).present()
    }

    /// Makes the VM have `target` vCPUs (1..=max, checked by the caller): added ones run when
    /// this returns; removed ones go when the guest ejects them.
    pub fn resize_vcpus(&mut self, target: u32) -> Result<(), ResizeError> {
        if self.is_paused() {
            return Err(ResizeError::Paused);
        }
        let hotplug = self.devices().cpu_hotplug.clone();
        let current = {
            let h = lock(&hotplug);
            // As the original: the count the guest has now is no change (a removal still
            // pending included), anything else waits for the pending removal.
            if target == h.present() {
                return Ok(());
            }
            if h.removal_pending() {
                return Err(ResizeError::RemovalPending);
            }
            h.present()
        };
        if target > current {
            for id in current..target {
                let spare = self.spare_vcpus.get_mut(id as usize).and_then(Option::take);
                let vcpu = match spare {
                    Some(v) => v,
                    None => self
                        .cpu_setup
                        .create(self.hypervisor_vm().as_ref(), id)
                        .map_err(|e| ResizeError::Vcpu {
                            id,
                            msg: e.to_string(),
                        })?,
                };
                let threads = self.threads.as_mut().ok_or(ResizeError::Vcpu {
                    id,
                    msg: "the VM has not started".into(),
                })?;
                threads.add(id, vcpu).map_err(|e| ResizeError::Vcpu {
                    id,
                    msg: e.to_string(),
                })?;
                lock(&hotplug).insert(id);
                info!("vCPU {id} added");
            }
        } else {
            let mut h = lock(&hotplug);
            for id in (target..current).rev() {
                h.request_removal(id);
                info!("asked the guest to eject vCPU {id}");
            }
        }
        lock(&self.devices().ged)
            .notify(GED_CPU_HOTPLUG)
            .map_err(ResizeError::Event)
    }

    /// The guest ejected CPU `id`: its vCPU leaves the guest and is kept for a later add.
    pub fn cpu_ejected(&mut self, id: u32) {
        let Some(threads) = self.threads.as_mut() else {
            return;
        };
        match threads.remove(id) {
            Some(vcpu) => {
                let i = id as usize;
                if self.spare_vcpus.len() <= i {
                    self.spare_vcpus.resize_with(i + 1, || None);
                }
                self.spare_vcpus[i] = Some(vcpu);
                info!("vCPU {id} removed");
            }
            None => warn!("the guest ejected CPU {id}, whose vCPU was not running"),
        }
        lock(&self.devices().cpu_hotplug).removed(id);
    }
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
