//! vCPU threads: each runs its vCPU and services the exits that reach user space, and stops
//! when asked (a flag plus a signal that kicks it out of KVM_RUN).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{Bus, VmRequests};
use vm_config::CoreScheduling;

use crate::core_sched::CoreGroup;
use hypervisor::{Vcpu, VmExit};
use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// Events the vCPUs and devices raise for the VMM's control loop. Raising one also sets
/// `halting`, which every vCPU checks before re-entering the guest, so no vCPU runs on past a
/// power-off or reset request.
pub struct VmEvents {
    halting: Arc<AtomicBool>,
    /// The guest powered off.
    pub exit: EventFd,
    /// The guest asked for a reset.
    pub reset: EventFd,
    /// A vCPU failed; the VM cannot go on.
    pub error: EventFd,
}

impl VmEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmEvents {
            halting: Arc::new(AtomicBool::new(false)),
            exit: EventFd::new(libc::EFD_NONBLOCK)?,
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
            error: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VmEvents {
            halting: self.halting.clone(),
            exit: self.exit.try_clone()?,
            reset: self.reset.try_clone()?,
            error: self.error.try_clone()?,
        })
    }

    fn raise(&self, evt: &EventFd, what: &str) {
        self.halting.store(true, Ordering::Release);
        if let Err(e) = evt.write(1) {
            error!("cannot signal {what}: {e}");
        }
    }

    pub fn vcpu_failed(&self) {
        self.raise(&self.error, "vCPU error");
    }

    /// Lets a rebuilt VM's vCPUs run.
    pub fn clear_halting(&self) {
        self.halting.store(false, Ordering::Release);
    }
}

impl VmRequests for VmEvents {
    fn power_off(&self) {
        self.raise(&self.exit, "power-off");
    }

    fn reset(&self) {
        self.raise(&self.reset, "reset");
    }
}

/// The signal that interrupts KVM_RUN. Its handler does nothing: the interrupted ioctl
/// returning EINTR is the point.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler; once per process.
pub fn init_kick_signal() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Parks vCPU threads between two KVM_RUNs while the VM is paused: the vCPUs keep their
/// state, their threads just wait.
#[derive(Default)]
struct PauseGate {
    paused: AtomicBool,
    /// How many vCPU threads are parked.
    parked: Mutex<usize>,
    cv: Condvar,
}

impl PauseGate {
    fn park(&self, halting: &AtomicBool) {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        *parked += 1;
        self.cv.notify_all();
        while self.paused.load(Ordering::Acquire) && !halting.load(Ordering::Acquire) {
            parked = self.cv.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        self.cv.notify_all();
    }

    fn release(&self) {
        self.paused.store(false, Ordering::Release);
        let _guard = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    threads: Vec<JoinHandle<()>>,
}

struct VcpuLoop {
    id: u32,
    vcpu: Box<dyn Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEvents,
    gate: Arc<PauseGate>,
    core: Arc<CoreGroup>,
}

impl VcpuLoop {
    fn run(mut self) {
        self.core.join(self.id);
        while !self.events.halting.load(Ordering::Acquire) {
            if self.gate.paused.load(Ordering::Acquire) {
                self.gate.park(&self.events.halting);
                continue;
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) => {
                    error!("vcpu{}: {e}", self.id);
                    self.events.vcpu_failed();
                    return;
                }
            };
            match exit {
                VmExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        debug!("vcpu{}: read from unclaimed port {port:#x}", self.id);
                        data.fill(0xff);
                    }
                }
                VmExit::IoOut(port, data) => {
                    if !self.pio.write(u64::from(port), data) {
                        debug!("vcpu{}: write to unclaimed port {port:#x}", self.id);
                    }
                }
                VmExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        debug!("vcpu{}: read from unclaimed MMIO {addr:#x}", self.id);
                        data.fill(0xff);
                    }
                }
                VmExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        debug!("vcpu{}: write to unclaimed MMIO {addr:#x}", self.id);
                    }
                }
                VmExit::Hlt | VmExit::Ignore => {}
                VmExit::Interrupted => self.vcpu.set_immediate_exit(false),
                VmExit::Reset | VmExit::Shutdown => {
                    // A triple fault resets a real machine, so it resets ours.
                    info!("vcpu{}: guest reset", self.id);
                    self.events.reset();
                    return;
                }
                VmExit::PowerOff => {
                    self.events.power_off();
                    return;
                }
                VmExit::Error(msg) => {
                    error!("vcpu{}: {msg}", self.id);
                    self.events.vcpu_failed();
                    return;
                }
            }
        }
    }
}

impl VcpuThreads {
    pub fn start(
        vcpus: Vec<Box<dyn Vcpu>>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: &VmEvents,
        core_scheduling: CoreScheduling,
    ) -> std::io::Result<Self> {
        let stop = events.halting.clone();
        let gate = Arc::new(PauseGate::default());
        let core = Arc::new(CoreGroup::new(core_scheduling));
        let mut threads = Vec::with_capacity(vcpus.len());
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let l = VcpuLoop {
                id: id as u32,
                vcpu,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events.try_clone()?,
                gate: gate.clone(),
                core: core.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || l.run())?;
            threads.push(t);
        }
        Ok(VcpuThreads {
            stop,
            gate,
            threads,
        })
    }

    fn kick(t: &JoinHandle<()>) {
        if !t.is_finished() {
            if let Err(e) = t.kill(kick_signal()) {
                debug!("kick failed: {e}");
            }
        }
    }

    /// Takes every vCPU out of the guest and parks its thread; returns once all are parked (or
    /// gone). The vCPUs keep their state for `resume`.
    pub fn pause(&self) -> Result<(), &'static str> {
        self.gate.paused.store(true, Ordering::Release);
        let start = Instant::now();
        let mut parked = self.gate.parked.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let live = self.threads.iter().filter(|t| !t.is_finished()).count();
            if *parked >= live {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(2) {
                drop(parked);
                self.gate.release();
                return Err("a vCPU did not stop within 2 s");
            }
            // A kick can land just before KVM_RUN and be lost: repeat it until all are parked.
            self.threads.iter().for_each(Self::kick);
            parked = self
                .gate
                .cv
                .wait_timeout(parked, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.gate.release();
    }

    /// Stops every vCPU and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.gate.release();
        let kick = Self::kick;
        self.threads.iter().for_each(kick);
        let start = Instant::now();
        let mut last_kick = start;
        for t in self.threads {
            // A kick can land just before its thread enters KVM_RUN and be lost, so repeat it
            // now and then until the thread is gone.
            while !t.is_finished() {
                if start.elapsed() > Duration::from_secs(2) {
                    warn!("a vCPU thread did not stop; leaving it");
                    break;
                }
                if last_kick.elapsed() > Duration::from_millis(1) {
                    kick(&t);
                    last_kick = Instant::now();
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
