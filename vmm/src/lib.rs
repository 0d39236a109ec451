//! The VMM: turns a `VmConfig` into a running VM and runs the control loop that reacts to the
//! guest (power-off, reset), to signals and to serial input.

pub mod config;
mod cpu;
mod device_manager;
mod memory;
mod pci_setup;
mod serial_io;
mod vm;

use std::fs::File;
use std::io;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use hypervisor::{Hypervisor, KvmHypervisor};
use log::{error, info, warn};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

pub use config::{ConfigError, VmConfig};
use cpu::VmEvents;
pub use serial_io::restore_terminal;
use serial_io::{SerialEndpoint, SerialIoError};
use vm::{Vm, VmError};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Serial(#[from] SerialIoError),
    #[error("VMM set-up failed: {0}")]
    Setup(#[source] io::Error),
    #[error("the guest stopped with an error (see the log above)")]
    GuestFailed,
}

/// How the VMM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// SIGTERM or SIGINT.
    Signal(i32),
}

const EV_EXIT: u64 = 1;
const EV_RESET: u64 = 2;
const EV_ERROR: u64 = 3;
const EV_SIGNAL: u64 = 4;
const EV_SERIAL_IN: u64 = 5;
const EV_SERIAL_LISTEN: u64 = 6;

struct Control {
    epoll: Epoll,
}

impl Control {
    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

fn serial_sink(endpoint: &SerialEndpoint) -> Option<Option<Box<dyn io::Write + Send>>> {
    endpoint.enabled().then(|| endpoint.writer())
}

/// The virtio console's output and input (a duplicate of the endpoint's input fd).
fn console_io(endpoint: &SerialEndpoint) -> Option<pci_setup::ConsoleIo> {
    endpoint.enabled().then(|| pci_setup::ConsoleIo {
        out: endpoint.writer(),
        input: endpoint.input_fd().and_then(|fd| {
            // SAFETY: `fd` is open for as long as the endpoint; dup gives us our own copy.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            // SAFETY: `new` is a fresh fd nobody else owns.
            (new >= 0).then(|| File::from(unsafe { OwnedFd::from_raw_fd(new) }))
        }),
    })
}

/// Boots the VM described by `config` and runs it until it powers off, fails, or the VMM is
/// told to stop by a signal.
pub fn run(config: VmConfig) -> Result<Outcome, Error> {
    config.validate()?;
    let hv = KvmHypervisor::new()?;
    cpu::init_kick_signal().map_err(Error::Setup)?;
    let events = VmEvents::new().map_err(Error::Setup)?;

    let (signal_rx, signal_tx) = UnixStream::pair().map_err(Error::Setup)?;
    signal_rx.set_nonblocking(true).map_err(Error::Setup)?;
    let mut signal_ids = Vec::new();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let tx = signal_tx.try_clone().map_err(Error::Setup)?;
        signal_ids.push(signal_hook::low_level::pipe::register(sig, tx).map_err(Error::Setup)?);
    }

    let mut endpoints = HostEndpoints {
        serial: SerialEndpoint::open("--serial", &config.serial)?,
        console: SerialEndpoint::open("--console", &config.console)?,
    };
    let serial = &endpoints.serial;
    let mut vm = Vm::new(
        &hv as &dyn Hypervisor,
        &config,
        serial_sink(serial),
        console_io(&endpoints.console),
        None,
        &events,
    )?;
    vm.start(&events)?;

    let control = Control {
        epoll: Epoll::new().map_err(Error::Setup)?,
    };
    let setup = |c: &Control| -> io::Result<()> {
        c.add(events.exit.as_raw_fd(), EV_EXIT)?;
        c.add(events.reset.as_raw_fd(), EV_RESET)?;
        c.add(events.error.as_raw_fd(), EV_ERROR)?;
        c.add(signal_rx.as_raw_fd(), EV_SIGNAL)?;
        if let Some(fd) = serial.input_fd() {
            c.add(fd, EV_SERIAL_IN)?;
        }
        if let Some(fd) = serial.listener_fd() {
            c.add(fd, EV_SERIAL_LISTEN)?;
        }
        Ok(())
    };
    setup(&control).map_err(Error::Setup)?;

    let result = control_loop(
        &control,
        &hv,
        &config,
        &mut vm,
        &mut endpoints,
        &events,
        &signal_rx,
    );
    vm.stop();
    if log::log_enabled!(log::Level::Info) {
        // For scripts/bench: what the VMM itself costs, guest RAM aside.
        info!(
            "memory: peak RSS {} KiB, guest RAM resident {} KiB",
            memory::peak_rss().unwrap_or(0) >> 10,
            vm.resident_guest_bytes() >> 10
        );
    }
    for id in signal_ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

/// The host side of the serial port and of the virtio console.
struct HostEndpoints {
    serial: SerialEndpoint,
    console: SerialEndpoint,
}

fn control_loop(
    control: &Control,
    hv: &KvmHypervisor,
    config: &VmConfig,
    vm: &mut Vm,
    io: &mut HostEndpoints,
    events: &VmEvents,
    mut signal_rx: &UnixStream,
) -> Result<Outcome, Error> {
    let HostEndpoints { serial, console } = io;
    let mut ready = vec![EpollEvent::default(); 8];
    let mut pending_input: Vec<u8> = Vec::new();
    loop {
        // With input waiting for room in the UART's FIFO, poll instead of sleeping.
        let timeout = if pending_input.is_empty() { -1 } else { 5 };
        let n = match control.epoll.wait(timeout, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::Setup(e)),
        };
        for ev in &ready[..n] {
            match ev.data() {
                EV_EXIT => {
                    info!("guest powered off");
                    return Ok(Outcome::PowerOff);
                }
                EV_ERROR => return Err(Error::GuestFailed),
                EV_SIGNAL => {
                    let mut b = [0u8; 16];
                    let _ = signal_rx.read(&mut b);
                    info!("received a signal, shutting down");
                    return Ok(Outcome::Signal(libc::SIGTERM));
                }
                EV_RESET => {
                    let _ = events.reset.read();
                    info!("guest reset: rebuilding the VM");
                    let nvram = vm.stop();
                    // Drop the old VM (and its memory) before the new one maps its own.
                    *vm = Vm::new(
                        hv,
                        config,
                        serial_sink(serial),
                        console_io(console),
                        Some(nvram),
                        events,
                    )?;
                    let _ = events.reset.read();
                    events.clear_halting();
                    vm.start(events)?;
                }
                EV_SERIAL_LISTEN => {
                    if let Some(old) = serial.input_fd() {
                        control.remove(old);
                    }
                    if let Some(fd) = serial.accept() {
                        control.add(fd, EV_SERIAL_IN).map_err(Error::Setup)?;
                        if let Some(dev) = &vm.devices().serial {
                            dev.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .output_mut()
                                .set(serial.writer());
                        }
                    }
                }
                EV_SERIAL_IN => {
                    let mut buf = [0u8; 64];
                    match serial.read_input(&mut buf) {
                        Ok(0) => {
                            // The source hung up (socket client gone, stdin closed).
                            if let Some(fd) = serial.input_fd() {
                                control.remove(fd);
                            }
                            serial.disconnect();
                        }
                        Ok(n) => pending_input.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            warn!("serial input failed: {e}");
                            if let Some(fd) = serial.input_fd() {
                                control.remove(fd);
                            }
                        }
                    }
                }
                other => error!("unexpected epoll token {other}"),
            }
        }
        if !pending_input.is_empty() {
            if let Some(dev) = &vm.devices().serial {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                let room = dev.input_capacity().min(pending_input.len());
                if room > 0 {
                    let taken = dev.enqueue_input(&pending_input[..room]);
                    pending_input.drain(..taken);
                }
            } else {
                pending_input.clear();
            }
        }
    }
}
