//! A device configuration the host changes while the device runs (the console's size, the
//! balloon's target, virtio-mem's requested size): each change bumps the configuration
//! generation and raises the configuration interrupt of the running device. While the device
//! is paused no interrupt is raised; if the configuration changed meanwhile, `resume` raises
//! one.
//!
//! [`ConfigSignal`] is the host's side (shared with whoever changes the configuration);
//! [`ConfigInterrupt`] the device's (its interrupt and the generation at a pause).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::VirtioInterrupt;

#[derive(Default)]
pub struct ConfigSignal {
    generation: AtomicU32,
    /// The running device's interrupt; `None` while it is stopped or paused. The lock also
    /// orders changes with the device's start, stop and pause.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
}

impl ConfigSignal {
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Runs `change`, which says whether it changed the configuration; if it did, bumps the
    /// generation and interrupts the running device. Returns what `change` said.
    pub fn change(&self, change: impl FnOnce() -> bool) -> bool {
        let irq = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        if !change() {
            return false;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(i) = irq.as_ref() {
            i.signal_config();
        }
        true
    }

    /// Sets the configuration (`set`) and the generation as a snapshot had them, without an
    /// interrupt.
    pub fn restore(&self, generation: u32, set: impl FnOnce()) {
        let _irq = self.interrupt.lock().unwrap_or_else(|e| e.into_inner());
        set();
        self.generation.store(generation, Ordering::Release);
    }

    fn attach(&self, interrupt: Option<Arc<dyn VirtioInterrupt>>) {
        *self.interrupt.lock().unwrap_or_else(|e| e.into_inner()) = interrupt;
    }
}

/// The device's side: its interrupt while active, and while paused the generation at the
/// pause.
#[derive(Default)]
pub struct ConfigInterrupt {
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    paused_generation: Option<u32>,
}

impl ConfigInterrupt {
    /// The device started with `interrupt`: changes interrupt it from now on.
    pub fn activate(&mut self, signal: &ConfigSignal, interrupt: Arc<dyn VirtioInterrupt>) {
        signal.attach(Some(interrupt.clone()));
        self.interrupt = Some(interrupt);
        self.paused_generation = None;
    }

    /// The device stopped: changes interrupt nothing.
    pub fn reset(&mut self, signal: &ConfigSignal) {
        signal.attach(None);
        self.interrupt = None;
        self.paused_generation = None;
    }

    /// The device pauses: changes wait for `resume`.
    pub fn pause(&mut self, signal: &ConfigSignal) {
        if self.paused_generation.is_none() {
            signal.attach(None);
            self.paused_generation = Some(signal.generation());
        }
    }

    /// The device runs again: one interrupt if the configuration changed while it was paused.
    pub fn resume(&mut self, signal: &ConfigSignal) {
        if let Some(g) = self.paused_generation.take() {
            signal.attach(self.interrupt.clone());
            if signal.generation() != g {
                if let Some(i) = &self.interrupt {
                    i.signal_config();
                }
            }
        }
    }
}
