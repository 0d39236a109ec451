//! The control loop and the VM state machine. One thread owns the VM: it reacts to the guest
//! (power-off, reset, vCPU failure), to signals, to serial input, and to API requests, which
//! arrive through a channel with an event fd that wakes the loop.

use std::io;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use hypervisor::KvmHypervisor;
use log::{error, info, warn};
use virtio_devices::ConsoleSize;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::VmConfig;
use crate::cpu::VmEvents;
use crate::event_monitor::EventMonitor;
use crate::serial_io::{ConsoleRelay, SerialEndpoint};
use crate::vm::Vm;
use crate::{memory, restore, restore_nets, snapshot, Error, Outcome};
use api::{ApiError, ApiRequest, ApiResponse, ApiResult, ApiServer, VmInfoResponse, VmState};
use endpoints::Endpoints;
use vm_config::RestoreConfig;

const EV_EXIT: u64 = 1;
const EV_RESET: u64 = 2;
const EV_ERROR: u64 = 3;
const EV_SIGNAL: u64 = 4;
const EV_SERIAL_IN: u64 = 5;
const EV_SERIAL_LISTEN: u64 = 6;
const EV_API: u64 = 7;
const EV_CONSOLE_LISTEN: u64 = 8;
const EV_CONSOLE_IN: u64 = 9;
const EV_CONSOLE_OUT: u64 = 10;
const EV_WINCH: u64 = 11;
const EV_CONSOLE_RESIZE: u64 = 12;
const EV_MIGRATION: u64 = 13;
const EV_EJECT: u64 = 14;
const EV_PANIC: u64 = 15;
const EV_DEVICE: u64 = 16;

mod endpoints;
mod hotplug;
mod migrate;
mod resize;
mod resize_zone;

/// How long the loop keeps polling, instead of sleeping, after it answered an API request. On a
/// virtualised host a sleeping thread's wake-up (idle exit, IPI) costs tens of microseconds,
/// more than the whole request; a client that sends its next request within this window finds
/// the loop awake. Like KVM's halt polling (also 200 µs by default), the cost is bounded: at
/// most this much CPU per request, none while the API is quiet.
const API_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// The virtio console's size when the endpoint has no terminal size.
const DEFAULT_CONSOLE_SIZE: (u16, u16) = (80, 25);

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

/// What loop iteration should do next.
enum Next {
    Continue,
    Exit(Outcome),
}

pub(crate) struct Vmm {
    hv: KvmHypervisor,
    events: VmEvents,
    control: Control,
    signal_rx: UnixStream,
    /// SIGWINCH: the terminal's size changed.
    winch_rx: UnixStream,
    api: Option<ApiServer>,
    monitor: EventMonitor,
    no_shutdown: bool,
    /// The created VM's configuration; `None` until `vm.create` (or the command line).
    config: Option<VmConfig>,
    /// The state of the created VM; meaningless while `config` is `None`.
    state: VmState,
    /// The built VM, while Running or Paused.
    vm: Option<Vm>,
    serial: Option<SerialEndpoint>,
    /// For `--console socket=`: the device's side of the console, relayed to the client.
    console_relay: Option<ConsoleRelay>,
    /// The virtio console's host side (kept across guest reboots, like the serial port's).
    console: Option<SerialEndpoint>,
    /// The virtio console's size (the endpoint's terminal size), shared with the device.
    console_size: Arc<ConsoleSize>,
    /// The debug console's host side, when it has one (kept across guest reboots too).
    debug_console: Option<SerialEndpoint>,
    pending_input: Vec<u8>,
    /// Until when the loop polls instead of sleeping (after an API request).
    api_poll_until: Option<std::time::Instant>,
    /// A live migration being sent: the thread has the VM meanwhile.
    outgoing: Option<migrate::Outgoing>,
    /// The current or last migration sent, for `vm.migration-progress`.
    migration: Option<migrate::Status>,
    /// When `vm.migration-progress` was last asked.
    progress_asked: Option<std::time::Instant>,
    /// After a migration that someone watched: the VM is gone, and the VMM ends once the
    /// progress has been answered "completed", or at this deadline.
    linger: Option<std::time::Instant>,
    /// The guest powered off, or asked for a reset, while the migration thread had the VM.
    deferred_exit: bool,
    deferred_reset: bool,
    /// PCI slots and CPUs the guest ejected meanwhile.
    deferred_ejects: (crate::cpu::PciEjections, Vec<u32>),
    /// The command line's VM was confined by Landlock at start (its `create` skips it).
    pub(crate) landlocked: bool,
    /// The API socket's file (Landlock must let the VMM remove it at the end). Kept apart
    /// from `api`, which is taken out while a request is served.
    api_socket: Option<std::path::PathBuf>,
}

impl Vmm {
    pub(crate) fn new(
        events: VmEvents,
        signal_rx: UnixStream,
        winch_rx: UnixStream,
        api: Option<ApiServer>,
        monitor: EventMonitor,
        no_shutdown: bool,
    ) -> Result<Self, Error> {
        let hv = KvmHypervisor::new()?;
        let control = Control {
            epoll: Epoll::new().map_err(Error::Setup)?,
        };
        let add = |c: &Control| -> io::Result<()> {
            c.add(events.exit.as_raw_fd(), EV_EXIT)?;
            c.add(events.reset.as_raw_fd(), EV_RESET)?;
            c.add(events.error.as_raw_fd(), EV_ERROR)?;
            c.add(events.eject.as_raw_fd(), EV_EJECT)?;
            c.add(events.panic.as_raw_fd(), EV_PANIC)?;
            c.add(events.device.as_raw_fd(), EV_DEVICE)?;
            c.add(signal_rx.as_raw_fd(), EV_SIGNAL)?;
            c.add(winch_rx.as_raw_fd(), EV_WINCH)?;
            if let Some(api) = &api {
                c.add(api.as_raw_fd(), EV_API)?;
            }
            Ok(())
        };
        add(&control).map_err(Error::Setup)?;
        let api_socket = api.as_ref().and_then(|a| a.path()).map(|p| p.to_path_buf());
        Ok(Vmm {
            hv,
            events,
            control,
            signal_rx,
            winch_rx,
            api,
            monitor,
            no_shutdown,
            config: None,
            state: VmState::Created,
            vm: None,
            serial: None,
            console_relay: None,
            console: None,
            console_size: ConsoleSize::new(DEFAULT_CONSOLE_SIZE.0, DEFAULT_CONSOLE_SIZE.1),
            debug_console: None,
            pending_input: Vec::new(),
            api_poll_until: None,
            outgoing: None,
            migration: None,
            progress_asked: None,
            linger: None,
            deferred_exit: false,
            deferred_reset: false,
            deferred_ejects: Default::default(),
            landlocked: false,
            api_socket,
        })
    }

    pub(crate) fn monitor(&mut self) -> &mut EventMonitor {
        &mut self.monitor
    }

    /// Creates the VM from `config` (checked first); it is not booted.
    pub(crate) fn create(&mut self, mut config: VmConfig) -> Result<(), ApiError> {
        if self.config.is_some() {
            return Err(ApiError::VmAlreadyCreated);
        }
        config.validate()?;
        self.confine(&config, None)?;
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(())
    }

    /// With `landlock_enable`, confines the VMM to what `config` names (`landlock.rs`), unless
    /// the command line's VM already was, at start.
    fn confine(
        &mut self,
        config: &VmConfig,
        source: Option<&std::path::Path>,
    ) -> Result<(), ApiError> {
        if std::mem::take(&mut self.landlocked) {
            return Ok(());
        }
        crate::landlock::confine(config, self.api_socket.as_deref(), source)
            .map(|_| ())
            .map_err(|e| ApiError::BadRequest(e.to_string()))
    }

    /// Takes the built `vm` with its endpoints into the loop: records the paths of
    /// pseudo-terminals in the configuration (as the original), watches the endpoints' fds.
    fn attach(&mut self, ep: Endpoints, vm: Vm) -> Result<(), Error> {
        if let Some(config) = self.config.as_mut() {
            ep.record_ptys(config);
        }
        let Endpoints {
            serial,
            console,
            relay,
            resize_fd,
            size,
            debug,
        } = ep;
        self.console_size = size;
        let mut watch = vec![
            (serial.input_fd(), EV_SERIAL_IN),
            (serial.listener_fd(), EV_SERIAL_LISTEN),
            (console.listener_fd(), EV_CONSOLE_LISTEN),
            (relay.as_ref().map(ConsoleRelay::output_fd), EV_CONSOLE_OUT),
        ];
        watch.push((resize_fd, EV_CONSOLE_RESIZE));
        for (fd, token) in watch {
            if let Some(fd) = fd {
                self.control.add(fd, token).map_err(Error::Setup)?;
            }
        }
        self.serial = Some(serial);
        self.console = Some(console);
        self.console_relay = relay;
        self.debug_console = debug;
        // Ejections the previous VM's guest made are no news to this one.
        self.events.take_ejected();
        self.deferred_ejects = Default::default();
        self.vm = Some(vm);
        Ok(())
    }

    /// Builds and starts the created VM.
    pub(crate) fn boot(&mut self) -> Result<(), Error> {
        let Some(config) = self.config.as_mut() else {
            return Err(Error::Api(ApiError::VmMissingConfig));
        };
        if self.state != VmState::Created {
            // The original's words: its VM object exists while the VM runs or is paused.
            return Err(Error::Api(ApiError::VmAlreadyCreated));
        }
        // Device ids and guest MACs not given are chosen now and kept, as the original does.
        config.assign_generated();
        let config = config.clone();
        self.monitor.emit("vm", "booting");
        let ep = Endpoints::open(&config)?;
        let mut vm = Vm::new(&self.hv, &config, ep.host_io(), None, &self.events)?;
        self.events.clear_halting();
        vm.start(&self.events)?;
        // Recorded as the original records them: probed disk formats (a reboot opens the same
        // format).
        if let Some(config) = self.config.as_mut() {
            for (d, t) in config.disks.iter_mut().zip(vm.disk_image_types()) {
                d.image_type = *t;
            }
        }
        self.attach(ep, vm)?;
        self.state = VmState::Running;
        self.monitor.emit("vm", "booted");
        Ok(())
    }

    /// `vm.restore` (and `--restore`): the VM a snapshot directory describes, built and
    /// paused, or running with `resume`. Refused while a VM is created, as the original. On
    /// any failure nothing is left: no configuration, no VM.
    pub(crate) fn restore(&mut self, rc: RestoreConfig) -> Result<(), ApiError> {
        if self.config.is_some() {
            return Err(ApiError::VmAlreadyCreated);
        }
        let chain = |e: snapshot::SnapshotError| ApiError::Chain(e.chain());
        let refuse =
            |msg: String| chain(snapshot::SnapshotError::restore(snapshot::Cause::new(msg)));
        self.monitor.emit("vm", "restoring");
        let start = std::time::Instant::now();
        let mut src = restore::open(&rc.source_url).map_err(chain)?;
        let mut config = src.config.clone();
        restore_nets::give_net_macs(&mut config, &mut src.state, &rc)
            .map_err(ApiError::BadRequest)?;
        restore_nets::give_net_fds(&mut config, &rc).map_err(refuse)?;
        // `zone_updates`: the snapshot's zones on other host NUMA nodes.
        let updates = vm_config::zone_updates(&rc.zone_updates).map_err(&refuse)?;
        config
            .memory
            .apply_zone_updates(&updates)
            .map_err(&refuse)?;
        config
            .validate()
            .map_err(|e| refuse(format!("the snapshot's configuration is invalid: {e}")))?;
        self.confine(&config, Some(&src.dir))?;
        let ep = Endpoints::open(&config).map_err(|e| refuse(e.to_string()))?;
        let (mem, on_demand) =
            restore::load_memory(&src, &config.memory, rc.memory_restore_mode, rc.prefault)
                .map_err(|c| chain(snapshot::SnapshotError::restore(c)))?;
        let loaded = start.elapsed();
        let mut vm = Vm::restore(
            &self.hv,
            &config,
            &src.state,
            mem,
            on_demand,
            ep.host_io(),
            &self.events,
            true,
        )
        .map_err(|c| chain(snapshot::SnapshotError::restore(c)))?;
        self.events.clear_halting();
        vm.start(&self.events).map_err(|e| refuse(e.to_string()))?;
        self.config = Some(config);
        if let Err(e) = self.attach(ep, vm) {
            self.shutdown_vm();
            self.config = None;
            return Err(refuse(e.to_string()));
        }
        self.state = VmState::Paused;
        info!(
            "restored from {} ({:?} mode): RAM in {loaded:?}, VM in {:?}",
            src.dir.display(),
            rc.memory_restore_mode,
            start.elapsed()
        );
        self.monitor.emit("vm", "restored");
        if rc.resume {
            self.resume_vm()?;
        }
        Ok(())
    }

    fn resume_vm(&mut self) -> Result<(), ApiError> {
        self.require("resume", &[VmState::Paused])?;
        self.monitor.emit("vm", "resuming");
        if let Some(vm) = self.vm.as_mut() {
            vm.resume().map_err(Self::vm_failed)?;
        }
        self.state = VmState::Running;
        self.monitor.emit("vm", "resumed");
        Ok(())
    }

    /// Stops and drops the running VM; its configuration stays, so it can boot again. As in the
    /// original, whose `vm.shutdown` drops its VM object, the state then reads Created.
    fn shutdown_vm(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            log_memory(&vm);
        }
        if let Some(serial) = self.serial.take() {
            serial.drain_output();
            for fd in [serial.input_fd(), serial.listener_fd()]
                .into_iter()
                .flatten()
            {
                self.control.remove(fd);
            }
        }
        if let Some(console) = self.console.take() {
            console.drain_output();
            for fd in [
                console.input_fd(),
                console.listener_fd(),
                console.resize_fd(),
            ]
            .into_iter()
            .flatten()
            {
                self.control.remove(fd);
            }
        }
        if let Some(r) = self.console_relay.take() {
            self.control.remove(r.output_fd());
        }
        self.debug_console = None;
        self.pending_input.clear();
        // Clear what the stopped vCPUs may have raised on their way out.
        let _ = self.events.exit.read();
        let _ = self.events.reset.read();
        self.state = VmState::Created;
        self.monitor.emit("vm", "shutdown");
    }

    fn reboot(&mut self) -> Result<(), Error> {
        let (Some(vm), Some(config)) = (self.vm.as_mut(), self.config.as_ref()) else {
            return Err(Error::Api(ApiError::VmNotCreated));
        };
        self.monitor.emit("vm", "rebooting");
        let nvram = vm.stop();
        // Drop the old VM (and its memory) before the new one maps its own.
        self.vm = None;
        let io = self.kept_host_io();
        let mut vm = Vm::new(&self.hv, config, io, Some(nvram), &self.events)?;
        let _ = self.events.reset.read();
        self.events.clear_halting();
        vm.start(&self.events)?;
        self.vm = Some(vm);
        self.state = VmState::Running;
        self.monitor.emit("vm", "rebooted");
        Ok(())
    }

    /// `vm.delete`: the VM stopped (if it runs) and its configuration dropped.
    fn delete_vm(&mut self) {
        if self.vm.is_some() {
            self.shutdown_vm();
        }
        if self.config.take().is_some() {
            self.state = VmState::Created;
            self.monitor.emit("vm", "deleted");
        }
    }

    /// The VMM ends (`vmm.shutdown`, the guest's power-off, a signal): its VM goes as
    /// `vm.delete` takes it, then the `vmm`/`shutdown` event, as the original's events go.
    fn end(&mut self) {
        self.delete_vm();
        self.monitor.emit("vmm", "shutdown");
    }

    /// Checks that the VM is built (running or paused) and in one of the `ok` states. As the
    /// original answers: "VM is not running" (500) when no VM is built, whether or not one is
    /// created.
    fn require(&self, action: &'static str, ok: &[VmState]) -> Result<(), ApiError> {
        if self.vm.is_none() {
            return Err(ApiError::VmNotRunning);
        }
        if !ok.contains(&self.state) {
            return Err(ApiError::InvalidState {
                action,
                state: self.state,
            });
        }
        Ok(())
    }

    fn vm_failed(e: impl std::fmt::Display) -> ApiError {
        ApiError::Failed(e.to_string())
    }

    /// `vm.snapshot`: the paused VM's configuration, state and RAM into the directory
    /// `destination_url` names (see `snapshot`). The VM stays paused.
    fn snapshot(&mut self, destination_url: &str) -> Result<(), ApiError> {
        let (Some(vm), Some(config)) = (self.vm.as_mut(), self.config.as_ref()) else {
            return Err(ApiError::VmNotRunning);
        };
        let chain = |e: snapshot::SnapshotError| ApiError::Chain(e.chain());
        self.monitor.emit("vm", "snapshotting");
        if self.state != VmState::Paused {
            return Err(chain(snapshot::SnapshotError::snapshot(
                snapshot::Cause::new("Trying to snapshot while VM is running"),
            )));
        }
        // The destination first: nothing is paused for a snapshot that cannot be written.
        let dir = snapshot::url_to_path(destination_url)
            .map_err(|e| chain(snapshot::SnapshotError::Send(e)))?;
        let start = std::time::Instant::now();
        let state = vm
            .snapshot()
            .map_err(|c| chain(snapshot::SnapshotError::snapshot(c)))?;
        let bytes =
            snapshot::write(&dir, config, &state, vm.memory(), vm.ram_is_fresh()).map_err(chain)?;
        info!(
            "snapshot written to {}: {} vCPU(s), {} MiB of RAM in {:?}",
            dir.display(),
            state.vcpus.len(),
            bytes >> 20,
            start.elapsed()
        );
        self.monitor.emit("vm", "snapshotted");
        Ok(())
    }

    /// `vm.resize-disk`: disk `id` of the built VM gets `size` bytes (`Block::resize`); its
    /// image file changes with it, so a reboot or a restore finds the new size.
    fn resize_disk(&mut self, id: &str, size: u64) -> Result<(), ApiError> {
        if self.config.is_none() {
            return Err(ApiError::VmNotCreated);
        }
        if self.outgoing.is_some() {
            return Err(ApiError::Failed("the VM is being migrated".into()));
        }
        let Some(vm) = self.vm.as_mut() else {
            return Err(ApiError::VmNotRunning);
        };
        match vm.devices_mut().pci.resize_disk(id, size) {
            None => Err(ApiError::UnknownDevice(id.to_string())),
            Some(Err(e)) => Err(ApiError::Chain(vec![format!("id={id}: {e}")])),
            Some(Ok(())) => {
                info!("disk {id} resized to {size} bytes");
                Ok(())
            }
        }
    }

    /// `vm.coredump`: the guest's RAM and vCPU registers into the core file `destination_url`
    /// names (`coredump.rs`). A running VM is paused for it and resumed after, as by the
    /// original; a paused one stays paused.
    fn coredump(&mut self, destination_url: &str) -> Result<(), ApiError> {
        if self.config.is_none() {
            return Err(ApiError::VmNotCreated);
        }
        let state = self.state;
        let Some(vm) = self.vm.as_mut() else {
            return Err(ApiError::VmNotRunning);
        };
        let chain = |c: snapshot::Cause| ApiError::Chain(vec![c.to_string()]);
        // The destination first: nothing is paused for a file that cannot be written.
        let path = crate::coredump::url_to_file(destination_url).map_err(chain)?;
        if path.exists() {
            return Err(ApiError::BadRequest(format!(
                "{}: the file exists already",
                path.display()
            )));
        }
        let resume = match state {
            VmState::Running => {
                vm.pause().map_err(Self::vm_failed)?;
                true
            }
            VmState::Paused => false,
            s => {
                return Err(ApiError::InvalidState {
                    action: "coredump",
                    state: s,
                })
            }
        };
        self.monitor.emit("vm", "coredumping");
        let start = std::time::Instant::now();
        let written = vm.vcpu_states().and_then(|vcpus| {
            crate::coredump::write(&path, &vcpus, vm.memory(), vm.ram_is_fresh())
        });
        if resume {
            vm.resume().map_err(Self::vm_failed)?;
        }
        let bytes = written.map_err(chain)?;
        info!(
            "core file written to {}: {} MiB in {:?}",
            path.display(),
            bytes >> 20,
            start.elapsed()
        );
        self.monitor.emit("vm", "coredumped");
        Ok(())
    }

    /// Runs one API request; says whether the VMM should exit afterwards.
    fn handle_api(&mut self, req: ApiRequest) -> (ApiResult, Next) {
        use ApiRequest::*;
        let done = |r: Result<(), ApiError>| (r.map(|()| ApiResponse::Empty), Next::Continue);
        if self.linger.is_some() && !matches!(req, VmMigrationProgress | VmmPing | VmmShutdown) {
            // The VM has left; only its migration's outcome is still told.
            return (Err(ApiError::Gone), Next::Continue);
        }
        match req {
            VmmPing => (Ok(ApiResponse::Ping(api::ping_response())), Next::Continue),
            VmmShutdown => {
                self.end();
                (Ok(ApiResponse::Empty), Next::Exit(Outcome::ApiShutdown))
            }
            VmCreate(config) => done(self.create(*config)),
            VmBoot => done(self.boot().map_err(|e| match e {
                Error::Api(e) => e,
                Error::Config(e) => ApiError::Config(e),
                e => Self::vm_failed(e),
            })),
            VmInfo => match &self.config {
                None => (Err(ApiError::VmNotCreated), Next::Continue),
                Some(config) => (
                    Ok(ApiResponse::Info(Box::new(VmInfoResponse {
                        config: config.clone(),
                        state: self.state,
                        memory_actual_size: Some(self.memory_actual_size(config)),
                        device_tree: self.vm.as_ref().map(Vm::device_tree),
                    }))),
                    Next::Continue,
                ),
            },
            VmCounters => match &self.vm {
                None => (Err(ApiError::VmNotRunning), Next::Continue),
                Some(vm) => (Ok(ApiResponse::Counters(vm.counters())), Next::Continue),
            },
            VmPause => done(self.require("pause", &[VmState::Running]).and_then(|()| {
                self.monitor.emit("vm", "pausing");
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause().map_err(Self::vm_failed)?;
                }
                self.state = VmState::Paused;
                self.monitor.emit("vm", "paused");
                Ok(())
            })),
            VmResume => done(self.resume_vm()),
            VmRestore(rc) => {
                let fds: Vec<i32> = rc
                    .net_fds
                    .iter()
                    .flatten()
                    .flat_map(|n| n.fds.clone().unwrap_or_default())
                    .collect();
                let r = self.restore(rc);
                if r.is_err() {
                    // The descriptors the request brought are the VMM's; nothing uses them.
                    for fd in fds {
                        // SAFETY: received with the request and used by nothing else.
                        unsafe { libc::close(fd) };
                    }
                }
                done(r)
            }
            VmSendMigration(opts) => done(self.send_migration(opts)),
            VmReceiveMigration(rc) => done(self.receive_migration(rc)),
            VmMigrationProgress => self.migration_progress(),
            VmShutdown => done(
                self.require("shut down", &[VmState::Running, VmState::Paused])
                    .map(|()| self.shutdown_vm()),
            ),
            // A built VM is running or paused, both of which reboot; with none built the
            // original answers "VM is not created" (404).
            VmReboot => done(if self.vm.is_none() {
                Err(ApiError::VmNotCreated)
            } else {
                self.reboot().map_err(Self::vm_failed)
            }),
            VmPowerButton => done(
                // As the original: a paused guest sees the press when it resumes.
                self.require(
                    "press the power button of",
                    &[VmState::Running, VmState::Paused],
                )
                .and_then(|()| {
                    if let Some(vm) = &self.vm {
                        vm.power_button().map_err(Self::vm_failed)?;
                    }
                    Ok(())
                }),
            ),
            // As the original: "VM is not running" (500) until the VM is booted; a paused
            // guest takes the NMI when it resumes.
            VmNmi => done(
                self.require("send an NMI to", &[VmState::Running, VmState::Paused])
                    .and_then(|()| match &self.vm {
                        Some(vm) => vm.nmi().map_err(Self::vm_failed),
                        None => Ok(()),
                    }),
            ),
            VmSnapshot(cfg) => done(self.snapshot(&cfg.destination_url)),
            VmCoredump(cfg) => done(self.coredump(&cfg.destination_url)),
            VmAddDisk(d) => (self.add_device(hotplug::Added::Disk(*d)), Next::Continue),
            VmAddNet(n) => {
                let fds = n.fds.clone().unwrap_or_default();
                let r = self.add_device(hotplug::Added::Net(*n));
                if r.is_err() {
                    // The descriptors the request brought are the VMM's; nothing uses them.
                    for fd in fds {
                        // SAFETY: received with the request and used by nothing else.
                        unsafe { libc::close(fd) };
                    }
                }
                (r, Next::Continue)
            }
            VmRemoveDevice(d) => done(self.remove_device(&d.id)),
            VmResize(r) => done(self.resize(r)),
            VmResizeZone(r) => done(self.resize_zone(r)),
            VmResizeDisk(r) => done(self.resize_disk(&r.id, r.desired_size)),
            VmAddVsock(v) => (self.add_device(hotplug::Added::Vsock(*v)), Next::Continue),
            VmAddPmem(p) => (self.add_device(hotplug::Added::Pmem(*p)), Next::Continue),
            VmAddFs(f) => (self.add_device(hotplug::Added::Fs(*f)), Next::Continue),
            VmAddGenericVhostUser(g) => (
                self.add_device(hotplug::Added::GenericVhostUser(*g)),
                Next::Continue,
            ),
            VmDelete => {
                self.delete_vm();
                done(Ok(()))
            }
        }
    }

    /// The guest's memory now: RAM, plus what it plugged of the hotplug region, less what
    /// the balloon holds.
    fn memory_actual_size(&self, config: &VmConfig) -> u64 {
        let Some(vm) = self.vm.as_ref() else {
            return config.memory.ram_size();
        };
        let pci = &vm.devices().pci;
        let plugged = pci.virtio_mem.as_ref().map_or(0, |m| m.plugged())
            + pci
                .zone_virtio_mem
                .iter()
                .map(|(_, m)| m.plugged())
                .sum::<u64>()
            + vm.acpi_plugged().unwrap_or(0);
        let ballooned = pci.balloon.as_ref().map_or(0, |b| b.actual());
        (config.memory.ram_size() + plugged).saturating_sub(ballooned)
    }

    /// Runs until the VMM should exit.
    pub(crate) fn run(&mut self) -> Result<Outcome, Error> {
        let mut ready = vec![EpollEvent::default(); 8];
        loop {
            // With input waiting for room in the UART's FIFO, poll instead of sleeping.
            let mut timeout = if self.pending_input.is_empty() { -1 } else { 5 };
            if let Some(until) = self.api_poll_until {
                if std::time::Instant::now() < until {
                    timeout = 0;
                } else {
                    self.api_poll_until = None;
                }
            }
            if let Some(deadline) = self.linger {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    info!("no word from the migration's watcher; this VMM ends");
                    return Ok(Outcome::Migrated);
                }
                let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
                timeout = if timeout < 0 { ms } else { timeout.min(ms) };
            }
            let n = match self.control.epoll.wait(timeout, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Setup(e)),
            };
            for ev in &ready[..n] {
                if let Next::Exit(outcome) = self.dispatch(ev.data())? {
                    return Ok(outcome);
                }
            }
            self.feed_serial_input();
        }
    }

    fn dispatch(&mut self, token: u64) -> Result<Next, Error> {
        match token {
            EV_EXIT => {
                if self.events.exit.read().is_err() {
                    return Ok(Next::Continue);
                }
                if self.vm.is_none() {
                    // The migration thread has the VM: acted on when it comes back.
                    if self.outgoing.is_some() {
                        self.deferred_exit = true;
                    }
                    return Ok(Next::Continue);
                }
                info!("guest powered off");
                if self.no_shutdown {
                    self.shutdown_vm();
                    return Ok(Next::Continue);
                }
                self.end();
                return Ok(Next::Exit(Outcome::PowerOff));
            }
            EV_ERROR => {
                let _ = self.events.error.read();
                return Err(Error::GuestFailed);
            }
            EV_SIGNAL => {
                let mut b = [0u8; 16];
                let _ = self.signal_rx.read(&mut b);
                info!("received a signal, shutting down");
                self.end();
                return Ok(Next::Exit(Outcome::Signal(libc::SIGTERM)));
            }
            EV_RESET => {
                let raised = self.events.reset.read().is_ok();
                if raised && self.vm.is_none() && self.outgoing.is_some() {
                    self.deferred_reset = true;
                }
                if raised && self.vm.is_some() {
                    info!("guest reset: rebuilding the VM");
                    self.reboot()?;
                }
            }
            EV_WINCH => {
                let mut b = [0u8; 16];
                while matches!(self.winch_rx.read(&mut b), Ok(n) if n > 0) {}
                self.update_console_size();
            }
            EV_CONSOLE_RESIZE => {
                if let Some(c) = &self.console {
                    c.drain_resizes();
                }
                self.update_console_size();
            }
            EV_API => return Ok(self.serve_api()),
            EV_MIGRATION => return Ok(self.migration_news()),
            EV_EJECT => self.ejected(),
            EV_PANIC => self.guest_panicked(),
            EV_DEVICE => {
                // The original's events: source `virtio-device`, the device id as `id`.
                let (events, dropped) = self.events.take_device_events();
                for (id, event) in events {
                    let props = [("id".to_string(), id)].into_iter().collect();
                    self.monitor.emit_with("virtio-device", event, Some(&props));
                }
                if dropped > 0 {
                    warn!(
                        "{dropped} virtio-device events not written: the guest made more than {} \
                         a second",
                        crate::device_events::PER_SECOND
                    );
                }
            }
            EV_SERIAL_LISTEN => self.accept_serial()?,
            EV_SERIAL_IN => self.read_serial(),
            EV_CONSOLE_LISTEN => self.accept_console()?,
            EV_CONSOLE_IN => self.read_console(),
            EV_CONSOLE_OUT => {
                if let Some(r) = self.console_relay.as_mut() {
                    r.pump_output(self.console.as_ref().and_then(|c| c.client()));
                }
            }
            other => error!("unexpected epoll token {other}"),
        }
        Ok(Next::Continue)
    }

    /// Reports what the guest wrote to its pvpanic device, as the original: a log line and a
    /// `guest`/`panic` event naming it. The VM runs on.
    fn guest_panicked(&mut self) {
        for event in self.events.take_panics() {
            let name = pci::pvpanic::event_name(event);
            warn!("the guest reports a panic through pvpanic: {name} ({event:#x})");
            let props = crate::event_monitor::properties([("event", name.to_string())]);
            self.monitor.emit_with("guest", "panic", Some(&props));
        }
    }

    /// Reads the console endpoint's terminal size again (after SIGWINCH); a change reaches
    /// the guest as a virtio-console configuration change.
    fn update_console_size(&mut self) {
        let Some(size) = self.console.as_ref().and_then(SerialEndpoint::window_size) else {
            return;
        };
        if self.console_size.set(size.0, size.1) {
            info!("console size now {}x{}", size.0, size.1);
        }
    }

    /// Serves the API: every request that is ready is run here, on the control loop, and
    /// answered at once.
    fn serve_api(&mut self) -> Next {
        let Some(mut server) = self.api.take() else {
            return Next::Continue;
        };
        let mut next = Next::Continue;
        let answered = server.serve(&mut |req| {
            if matches!(next, Next::Exit(_)) {
                return Err(ApiError::Gone);
            }
            let (result, n) = self.handle_api(req);
            if let Err(e) = &result {
                info!("API request refused: {e}");
            }
            next = n;
            result
        });
        self.api = Some(server);
        if answered > 0 {
            self.api_poll_until = Some(std::time::Instant::now() + API_POLL);
        }
        next
    }

    fn accept_serial(&mut self) -> Result<(), Error> {
        let Some(serial) = self.serial.as_mut() else {
            return Ok(());
        };
        if let Some(old) = serial.input_fd() {
            self.control.remove(old);
        }
        if let Some(fd) = serial.accept() {
            self.control.add(fd, EV_SERIAL_IN).map_err(Error::Setup)?;
            if let Some(dev) = self.vm.as_ref().and_then(|vm| vm.devices().serial.as_ref()) {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .output_mut()
                    .set(serial.writer());
            }
        }
        Ok(())
    }

    fn accept_console(&mut self) -> Result<(), Error> {
        let Some(console) = self.console.as_mut() else {
            return Ok(());
        };
        if let Some(old) = console.input_fd() {
            self.control.remove(old);
        }
        if let Some(fd) = console.accept() {
            self.control.add(fd, EV_CONSOLE_IN).map_err(Error::Setup)?;
        }
        Ok(())
    }

    /// Client input for the virtio console, through the relay.
    fn read_console(&mut self) {
        let (Some(console), Some(relay)) = (self.console.as_mut(), self.console_relay.as_mut())
        else {
            return;
        };
        let mut buf = [0u8; 4096];
        match console.read_input(&mut buf) {
            Ok(0) => {
                if let Some(fd) = console.input_fd() {
                    self.control.remove(fd);
                }
                console.disconnect();
            }
            Ok(n) => relay.push_input(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!("console socket input failed: {e}");
                if let Some(fd) = console.input_fd() {
                    self.control.remove(fd);
                }
                console.disconnect();
            }
        }
    }

    fn read_serial(&mut self) {
        let Some(serial) = self.serial.as_mut() else {
            return;
        };
        let mut buf = [0u8; 64];
        match serial.read_input(&mut buf) {
            Ok(0) => {
                // The source hung up (socket client gone, stdin closed).
                if let Some(fd) = serial.input_fd() {
                    self.control.remove(fd);
                }
                serial.disconnect();
            }
            Ok(n) => self.pending_input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                warn!("serial input failed: {e}");
                if let Some(fd) = serial.input_fd() {
                    self.control.remove(fd);
                }
            }
        }
    }

    fn feed_serial_input(&mut self) {
        if self.pending_input.is_empty() {
            return;
        }
        match self.vm.as_ref().and_then(|vm| vm.devices().serial.as_ref()) {
            Some(dev) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                let room = dev.input_capacity().min(self.pending_input.len());
                if room > 0 {
                    let taken = dev.enqueue_input(&self.pending_input[..room]);
                    self.pending_input.drain(..taken);
                }
            }
            None => self.pending_input.clear(),
        }
    }

    /// Stops whatever still runs.
    pub(crate) fn stop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            log_memory(&vm);
        }
    }
}

fn log_memory(vm: &Vm) {
    if log::log_enabled!(log::Level::Info) {
        // For scripts/bench: what the VMM itself costs, guest RAM aside.
        info!(
            "memory: peak RSS {} KiB, guest RAM resident {} KiB",
            memory::peak_rss().unwrap_or(0) >> 10,
            vm.resident_guest_bytes() >> 10
        );
        // The devices' final statistics (vm.counters while it ran), for scripts and tests.
        for (id, counters) in vm.counters() {
            let list: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            info!("counters {id}: {}", list.join(" "));
        }
    }
}
