//! vCPU threads: each runs its vCPU and services the exits that reach user space, and stops
//! when asked (a flag plus a signal that kicks it out of KVM_RUN).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use hypervisor::{Vcpu, VmExit};
use log::{debug, error, info, warn};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

/// Events a vCPU raises for the VMM's control loop.
pub struct VmEvents {
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
            exit: EventFd::new(libc::EFD_NONBLOCK)?,
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
            error: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VmEvents {
            exit: self.exit.try_clone()?,
            reset: self.reset.try_clone()?,
            error: self.error.try_clone()?,
        })
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

pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

struct VcpuLoop {
    id: u32,
    vcpu: Box<dyn Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEvents,
    stop: Arc<AtomicBool>,
}

fn signal(evt: &EventFd, what: &str) {
    if let Err(e) = evt.write(1) {
        error!("cannot signal {what}: {e}");
    }
}

impl VcpuLoop {
    fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) => {
                    error!("vcpu{}: {e}", self.id);
                    signal(&self.events.error, "vCPU error");
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
                    signal(&self.events.reset, "reset");
                    return;
                }
                VmExit::PowerOff => {
                    signal(&self.events.exit, "power-off");
                    return;
                }
                VmExit::Error(msg) => {
                    error!("vcpu{}: {msg}", self.id);
                    signal(&self.events.error, "vCPU error");
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
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(vcpus.len());
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let l = VcpuLoop {
                id: id as u32,
                vcpu,
                pio: pio.clone(),
                mmio: mmio.clone(),
                events: events.try_clone()?,
                stop: stop.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || l.run())?;
            threads.push(t);
        }
        Ok(VcpuThreads { stop, threads })
    }

    /// Stops every vCPU and waits for its thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(2);
        for t in self.threads {
            // A kick can land just before the thread enters KVM_RUN and be lost, so repeat it
            // until the thread is gone.
            while !t.is_finished() {
                if let Err(e) = t.kill(kick_signal()) {
                    debug!("kick failed: {e}");
                }
                if Instant::now() > deadline {
                    warn!("a vCPU thread did not stop; leaving it");
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}
