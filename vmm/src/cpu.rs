//! vCPU threads: each runs its vCPU and services the exits that reach user space, and stops
//! when asked (a flag plus a signal that kicks it out of KVM_RUN).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::{Bus, VmRequests};
use vm_config::CoreScheduling;

use crate::core_sched::CoreGroup;
use crate::vcpu_affinity::{CpuSet, VcpuAffinity};
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
    /// The guest ejected hot-pluggable PCI slots (`ejected` says which): the control loop
    /// removes their devices. Not a halting event: the guest runs on.
    pub eject: EventFd,
    ejected: Arc<Mutex<PciEjections>>,
    /// The CPUs the guest ejected (same event fd).
    ejected_cpus: Arc<Mutex<Vec<u32>>>,
    /// The guest reported events through its pvpanic device (`panics` says which): the
    /// control loop reports them. Not a halting event either.
    pub panic: EventFd,
    panics: Arc<Mutex<Vec<u8>>>,
    /// Virtio devices were activated or reset (`device_events` says which, by device id): the
    /// control loop writes the original's `virtio-device` events.
    pub device: EventFd,
    device_events: Arc<crate::device_events::DeviceEvents>,
}

impl VmEvents {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmEvents {
            halting: Arc::new(AtomicBool::new(false)),
            exit: EventFd::new(libc::EFD_NONBLOCK)?,
            reset: EventFd::new(libc::EFD_NONBLOCK)?,
            error: EventFd::new(libc::EFD_NONBLOCK)?,
            eject: EventFd::new(libc::EFD_NONBLOCK)?,
            ejected: Arc::default(),
            ejected_cpus: Arc::new(Mutex::new(Vec::new())),
            panic: EventFd::new(libc::EFD_NONBLOCK)?,
            panics: Arc::new(Mutex::new(Vec::new())),
            device: EventFd::new(libc::EFD_NONBLOCK)?,
            device_events: Arc::default(),
        })
    }

    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(VmEvents {
            halting: self.halting.clone(),
            exit: self.exit.try_clone()?,
            reset: self.reset.try_clone()?,
            error: self.error.try_clone()?,
            eject: self.eject.try_clone()?,
            ejected: self.ejected.clone(),
            ejected_cpus: self.ejected_cpus.clone(),
            panic: self.panic.try_clone()?,
            panics: self.panics.clone(),
            device: self.device.try_clone()?,
            device_events: self.device_events.clone(),
        })
    }

    /// What the guest ejected since the last call: PCI slots (a bitmap per segment) and
    /// CPUs.
    pub fn take_ejected(&self) -> (PciEjections, Vec<u32>) {
        let _ = self.eject.read();
        let cpus =
            std::mem::take(&mut *self.ejected_cpus.lock().unwrap_or_else(|e| e.into_inner()));
        let slots = std::mem::take(&mut *self.ejected.lock().unwrap_or_else(|e| e.into_inner()));
        (slots, cpus)
    }

    /// The pvpanic events the guest reported since the last call, in order.
    pub fn take_panics(&self) -> Vec<u8> {
        let _ = self.panic.read();
        std::mem::take(&mut *self.panics.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The virtio device events since the last call, in order: (device id, event); and how
    /// many were dropped meanwhile (see `device_events`).
    pub fn take_device_events(&self) -> (Vec<(String, &'static str)>, u64) {
        let _ = self.device.read();
        self.device_events.take()
    }

    /// Virtio device `id` was activated or reset (`event`).
    pub fn device_event(&self, id: &str, event: &'static str) {
        if !self.device_events.push(id, event, Instant::now()) {
            return;
        }
        if let Err(e) = self.device.write(1) {
            error!("cannot signal a device event: {e}");
        }
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

/// PCI slots the guest ejected: a bitmap of slots by segment.
pub type PciEjections = std::collections::BTreeMap<u16, u32>;

/// Adds the ejections of `more` to `into`.
pub fn merge_ejections(into: &mut PciEjections, more: PciEjections) {
    for (segment, slots) in more {
        *into.entry(segment).or_default() |= slots;
    }
}

impl devices::EjectSink for VmEvents {
    fn eject(&self, segment: u16, slots: u32) {
        *self
            .ejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(segment)
            .or_default() |= slots;
        if let Err(e) = self.eject.write(1) {
            error!("cannot signal an ejection: {e}");
        }
    }
}

impl pci::pvpanic::PanicSink for VmEvents {
    fn guest_panic(&self, event: u8) {
        self.panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        if let Err(e) = self.panic.write(1) {
            error!("cannot signal a guest panic: {e}");
        }
    }
}

impl devices::CpuEjectSink for VmEvents {
    fn eject_cpu(&self, cpu: u32) {
        self.ejected_cpus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cpu);
        if let Err(e) = self.eject.write(1) {
            error!("cannot signal a CPU ejection: {e}");
        }
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

/// Work for a parked vCPU thread, run on that thread with its vCPU (the thread owns it).
type VcpuJob = Box<dyn FnOnce(&mut dyn Vcpu) + Send>;

#[derive(Default)]
struct GateState {
    /// How many vCPU threads are parked.
    parked: usize,
    /// Per vCPU id: a job waiting for that parked thread.
    jobs: Vec<Option<VcpuJob>>,
    /// How many of the jobs handed out have run.
    done: usize,
}

/// Parks vCPU threads between two KVM_RUNs while the VM is paused: the vCPUs keep their
/// state, their threads just wait, and run the jobs the control loop hands them (reading or
/// writing their vCPU's state: only the owning thread has it).
#[derive(Default)]
struct PauseGate {
    paused: AtomicBool,
    state: Mutex<GateState>,
    cv: Condvar,
}

impl PauseGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the VM is paused, running the jobs given to vCPU `id`. A job is always
    /// run before the thread leaves: the check and the leaving happen under the lock.
    fn park(&self, id: usize, vcpu: &mut dyn Vcpu, halting: &AtomicBool, unplug: &AtomicBool) {
        let mut s = self.lock();
        s.parked += 1;
        self.cv.notify_all();
        loop {
            if let Some(job) = s.jobs.get_mut(id).and_then(Option::take) {
                drop(s);
                job(vcpu);
                s = self.lock();
                s.done += 1;
                self.cv.notify_all();
                continue;
            }
            if !self.paused.load(Ordering::Acquire)
                || halting.load(Ordering::Acquire)
                || unplug.load(Ordering::Acquire)
            {
                break;
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked -= 1;
        self.cv.notify_all();
    }

    fn release(&self) {
        self.paused.store(false, Ordering::Release);
        let _guard = self.lock();
        self.cv.notify_all();
    }
}

/// One vCPU's thread; it gives its vCPU back when it ends.
struct VcpuThread {
    handle: JoinHandle<Box<dyn Vcpu>>,
    /// Set to take this vCPU alone out of the guest (its CPU was ejected).
    unplug: Arc<AtomicBool>,
    /// Set by `nmi`: the thread queues an NMI on its vCPU before it next enters the guest.
    nmi: Arc<AtomicBool>,
}

pub struct VcpuThreads {
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    /// By vCPU id; `None` for a vCPU that is not running (never added, or unplugged).
    threads: Vec<Option<VcpuThread>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEvents,
    core: Arc<CoreGroup>,
    affinity: VcpuAffinity,
}

struct VcpuLoop {
    id: u32,
    vcpu: Box<dyn Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    events: VmEvents,
    gate: Arc<PauseGate>,
    core: Arc<CoreGroup>,
    /// The host CPUs this vCPU's thread pins itself to (`--cpus affinity=`).
    pin: Option<CpuSet>,
    unplug: Arc<AtomicBool>,
    nmi: Arc<AtomicBool>,
}

/// What a vCPU thread does after an exit.
enum Flow {
    /// Back into the guest.
    Run,
    /// An I/O or MMIO exit was served: the instruction completes on the next KVM_RUN.
    IoServed,
    /// KVM_RUN was interrupted (a kick, or `immediate_exit`).
    Interrupted,
    /// The thread ends (power-off, reset, error: the event is raised).
    Stop,
}

/// Serves one exit on vCPU `id`'s thread.
fn serve_exit(id: u32, exit: VmExit<'_>, pio: &Bus, mmio: &Bus, events: &VmEvents) -> Flow {
    match exit {
        VmExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                debug!("vcpu{id}: read from unclaimed port {port:#x}");
                data.fill(0xff);
            }
            Flow::IoServed
        }
        VmExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                debug!("vcpu{id}: write to unclaimed port {port:#x}");
            }
            Flow::IoServed
        }
        VmExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                debug!("vcpu{id}: read from unclaimed MMIO {addr:#x}");
                data.fill(0xff);
            }
            Flow::IoServed
        }
        VmExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                debug!("vcpu{id}: write to unclaimed MMIO {addr:#x}");
            }
            Flow::IoServed
        }
        VmExit::Hlt | VmExit::Ignore => Flow::Run,
        VmExit::Interrupted => Flow::Interrupted,
        VmExit::Reset | VmExit::Shutdown => {
            // A triple fault resets a real machine, so it resets ours.
            info!("vcpu{id}: guest reset");
            events.reset();
            Flow::Stop
        }
        VmExit::PowerOff => {
            events.power_off();
            Flow::Stop
        }
        VmExit::Error(msg) => {
            error!("vcpu{id}: {msg}");
            events.vcpu_failed();
            Flow::Stop
        }
    }
}

impl VcpuLoop {
    /// Runs the vCPU until the VM halts or this vCPU is unplugged; gives the vCPU back.
    fn run(mut self) -> Box<dyn Vcpu> {
        if let Some(set) = self.pin {
            if let Err(e) = set.pin_caller() {
                error!(
                    "vcpu{}: cannot run on its --cpus affinity CPUs: {e}",
                    self.id
                );
                self.events.vcpu_failed();
                return self.vcpu;
            }
        }
        self.core.join(self.id);
        self.run_loop();
        self.vcpu
    }

    fn leaving(&self) -> bool {
        self.events.halting.load(Ordering::Acquire) || self.unplug.load(Ordering::Acquire)
    }

    fn run_loop(&mut self) {
        // Whether the last exit was an I/O or MMIO exit whose instruction has not completed.
        let mut io_pending = false;
        while !self.leaving() {
            // Before a pause too: a snapshot of the paused VM then holds the NMI (pending in
            // the vCPU's events). A plain load first: this runs after every exit, and the
            // locked swap only when an NMI is asked for.
            if self.nmi.load(Ordering::Relaxed) && self.nmi.swap(false, Ordering::AcqRel) {
                if let Err(e) = self.vcpu.nmi() {
                    warn!("vcpu{}: the NMI was not queued: {e}", self.id);
                }
            }
            if self.gate.paused.load(Ordering::Acquire) {
                // A paused vCPU is always between two instructions, so its state can be saved
                // (and is whole) at any time while it is parked.
                if io_pending {
                    io_pending = false;
                    if !self.complete_io() {
                        return;
                    }
                }
                self.gate.park(
                    self.id as usize,
                    self.vcpu.as_mut(),
                    &self.events.halting,
                    &self.unplug,
                );
                continue;
            }
            let flow = match self.vcpu.run() {
                Ok(exit) => serve_exit(self.id, exit, &self.pio, &self.mmio, &self.events),
                Err(e) => {
                    error!("vcpu{}: {e}", self.id);
                    self.events.vcpu_failed();
                    return;
                }
            };
            match flow {
                Flow::Run => io_pending = false,
                Flow::IoServed => io_pending = true,
                Flow::Interrupted => {
                    io_pending = false;
                    self.vcpu.set_immediate_exit(false);
                }
                Flow::Stop => return,
            }
        }
        if io_pending {
            // An unplugged vCPU may run again: its last instruction completes first.
            self.complete_io();
        }
    }

    /// After an I/O or MMIO exit the instruction completes only on the next KVM_RUN: runs it
    /// with `immediate_exit`, so KVM completes it and returns before entering the guest. A
    /// string instruction may exit again first: those exits are served as usual. False when
    /// the thread must end.
    fn complete_io(&mut self) -> bool {
        self.vcpu.set_immediate_exit(true);
        let ok = loop {
            let flow = match self.vcpu.run() {
                Ok(exit) => serve_exit(self.id, exit, &self.pio, &self.mmio, &self.events),
                Err(e) => {
                    error!("vcpu{}: completing an I/O exit: {e}", self.id);
                    self.events.vcpu_failed();
                    break false;
                }
            };
            match flow {
                Flow::Interrupted => break true,
                Flow::IoServed | Flow::Run => {}
                Flow::Stop => break false,
            }
        };
        self.vcpu.set_immediate_exit(false);
        ok
    }
}

impl VcpuThreads {
    /// Starts one thread per vCPU; with `paused`, each parks before it first enters the guest.
    pub fn start(
        vcpus: Vec<Box<dyn Vcpu>>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        events: &VmEvents,
        core_scheduling: CoreScheduling,
        affinity: VcpuAffinity,
        paused: bool,
    ) -> std::io::Result<Self> {
        let stop = events.halting.clone();
        let gate = Arc::new(PauseGate::default());
        // A restored VM's threads park before their first KVM_RUN, until `resume`.
        gate.paused.store(paused, Ordering::Release);
        let core = Arc::new(CoreGroup::new(core_scheduling));
        let mut t = VcpuThreads {
            stop,
            gate,
            threads: Vec::with_capacity(vcpus.len()),
            pio,
            mmio,
            events: events.try_clone()?,
            core,
            affinity,
        };
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            t.add(id as u32, vcpu)?;
        }
        Ok(t)
    }

    /// Starts a thread for vCPU `id` (hot-added, or re-added after an unplug). It parks first
    /// if the VM is paused.
    pub fn add(&mut self, id: u32, vcpu: Box<dyn Vcpu>) -> std::io::Result<()> {
        let i = id as usize;
        if self.threads.get(i).is_some_and(Option::is_some) {
            return Err(std::io::Error::other(format!(
                "vCPU {id} is running already"
            )));
        }
        let unplug = Arc::new(AtomicBool::new(false));
        let nmi = Arc::new(AtomicBool::new(false));
        let l = VcpuLoop {
            id,
            vcpu,
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            events: self.events.try_clone()?,
            gate: self.gate.clone(),
            core: self.core.clone(),
            pin: self.affinity.of(id),
            unplug: unplug.clone(),
            nmi: nmi.clone(),
        };
        let mut filter = crate::seccomp_filters::vcpu();
        if l.pin.is_some() {
            filter = filter.allow(&[::seccomp::Sysno::sched_setaffinity]);
        }
        let handle = seccomp::spawn(format!("vcpu{id}"), filter, move || l.run())
            .map_err(std::io::Error::other)?;
        if self.threads.len() <= i {
            self.threads.resize_with(i + 1, || None);
        }
        self.threads[i] = Some(VcpuThread {
            handle,
            unplug,
            nmi,
        });
        Ok(())
    }

    /// Takes vCPU `id` out of the guest for good (its CPU was ejected) and returns it once its
    /// thread has ended, for a later `add`. `None` if it is not running or does not stop
    /// within 2 s (its thread is then left to end on its own).
    pub fn remove(&mut self, id: u32) -> Option<Box<dyn Vcpu>> {
        let t = self.threads.get_mut(id as usize)?.take()?;
        t.unplug.store(true, Ordering::Release);
        // A parked thread wakes to see the flag; one in the guest is kicked out, repeatedly
        // (a kick can land just before KVM_RUN).
        {
            let _guard = self.gate.lock();
            self.gate.cv.notify_all();
        }
        let start = Instant::now();
        while !t.handle.is_finished() {
            if start.elapsed() > Duration::from_secs(2) {
                warn!("vcpu{id} did not stop; leaving its thread");
                return None;
            }
            Self::kick(&t.handle);
            std::thread::sleep(Duration::from_micros(50));
        }
        t.handle.join().ok()
    }

    /// The running threads, by vCPU id.
    fn running(&self) -> impl Iterator<Item = (usize, &VcpuThread)> {
        self.threads
            .iter()
            .enumerate()
            .filter_map(|(id, t)| Some((id, t.as_ref()?)))
    }

    fn kick<T>(t: &JoinHandle<T>) {
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
        let mut parked = self.gate.lock();
        loop {
            let live = self
                .running()
                .filter(|(_, t)| !t.handle.is_finished())
                .count();
            if parked.parked >= live {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(2) {
                drop(parked);
                self.gate.release();
                return Err("a vCPU did not stop within 2 s");
            }
            // A kick can land just before KVM_RUN and be lost: repeat it until all are parked.
            self.running().for_each(|(_, t)| Self::kick(&t.handle));
            parked = self
                .gate
                .cv
                .wait_timeout(parked, Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `job` on every running vCPU, on its own thread, while the VM is paused (after
    /// `pause`); the results come back in vCPU id order.
    pub fn on_parked<T, F>(&self, job: F) -> Result<Vec<T>, String>
    where
        T: Send + 'static,
        F: Fn(&mut dyn Vcpu) -> T + Send + Sync + 'static,
    {
        let ids: Vec<usize> = self.running().map(|(id, _)| id).collect();
        let slots = self.threads.len();
        let job = Arc::new(job);
        let results: Arc<Mutex<Vec<Option<T>>>> =
            Arc::new(Mutex::new((0..slots).map(|_| None).collect()));
        let mut s = self.gate.lock();
        if !self.gate.paused.load(Ordering::Acquire) {
            return Err("the vCPUs are not paused".into());
        }
        if let Some((id, _)) = self.running().find(|(_, t)| t.handle.is_finished()) {
            return Err(format!("vCPU {id} has stopped"));
        }
        // Every thread is parked (`pause` returned) and stays parked while the gate is closed.
        if s.parked < ids.len() {
            return Err("the vCPUs are not all parked".into());
        }
        s.jobs = (0..slots).map(|_| None).collect();
        for &id in &ids {
            let job = job.clone();
            let results = results.clone();
            s.jobs[id] = Some(Box::new(move |vcpu: &mut dyn Vcpu| {
                let r = job(vcpu);
                results.lock().unwrap_or_else(|e| e.into_inner())[id] = Some(r);
            }) as VcpuJob);
        }
        s.done = 0;
        self.gate.cv.notify_all();
        let start = Instant::now();
        while s.done < ids.len() {
            if start.elapsed() > Duration::from_secs(5) {
                s.jobs.clear();
                return Err("a vCPU did not answer within 5 s".into());
            }
            s = self
                .gate
                .cv
                .wait_timeout(s, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.jobs.clear();
        drop(s);
        let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter()
            .map(|&id| {
                results[id]
                    .take()
                    .ok_or_else(|| format!("vCPU {id} gave no answer"))
            })
            .collect()
    }

    /// `vm.nmi`: a non-maskable interrupt on every running vCPU, as the original sends it
    /// (KVM_NMI, each vCPU on its own thread). Paused, each parked thread queues it at once, so
    /// the guest takes it when it resumes (and a snapshot holds it). Running, each thread is
    /// kicked out of the guest and queues it before it goes back in; kicks repeat for up to
    /// 100 ms (one can land just before KVM_RUN), after which a thread still in the guest
    /// queues it at its next exit.
    pub fn nmi(&self) -> Result<(), String> {
        if self.gate.paused.load(Ordering::Acquire) {
            // A restored VM's threads may still be on their way to the gate.
            self.pause()?;
            return self
                .on_parked(|vcpu| vcpu.nmi().map_err(|e| e.to_string()))?
                .into_iter()
                .collect();
        }
        self.running()
            .for_each(|(_, t)| t.nmi.store(true, Ordering::Release));
        let start = Instant::now();
        loop {
            let waiting = self
                .running()
                .filter(|(_, t)| t.nmi.load(Ordering::Acquire) && !t.handle.is_finished());
            let mut any = false;
            for (_, t) in waiting {
                any = true;
                Self::kick(&t.handle);
            }
            if !any {
                return Ok(());
            }
            if start.elapsed() > Duration::from_millis(100) {
                debug!("vm.nmi: a vCPU stays in the guest; it takes the NMI at its next exit");
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(50));
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
        let threads: Vec<JoinHandle<Box<dyn Vcpu>>> = self
            .threads
            .into_iter()
            .flatten()
            .map(|t| t.handle)
            .collect();
        threads.iter().for_each(Self::kick);
        let start = Instant::now();
        let mut last_kick = start;
        for t in threads {
            // A kick can land just before its thread enters KVM_RUN and be lost, so repeat it
            // now and then until the thread is gone.
            while !t.is_finished() {
                if start.elapsed() > Duration::from_secs(2) {
                    warn!("a vCPU thread did not stop; leaving it");
                    break;
                }
                if last_kick.elapsed() > Duration::from_millis(1) {
                    Self::kick(&t);
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
