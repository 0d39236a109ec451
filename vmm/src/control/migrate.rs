//! The control loop's side of live migration. Sending lends the VM to a thread (as the
//! original's migration worker) and answers at once; the thread reports progress through a
//! channel and an event fd the loop watches, and gives the VM back at the end: the VMM ends
//! after a success, and keeps running its VM after a failure. Receiving runs on the loop
//! itself (the request is answered when the VM has arrived, as the original's).
//!
//! `vm.migration-progress` (ours) answers where the current or last send stands. After a
//! success, a VMM whose progress someone polls (asked within `WATCHED`) waits to end until
//! the next poll has been answered "completed" (`LINGER` at most), so a poller (`ch-remote
//! send-migration`) learns the outcome instead of finding the socket gone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::{ApiError, ApiResponse, ApiResult, MigrationProgress, MigrationState, VmState};
use guest_memory::GuestMemoryMmap;
use hypervisor::KvmHypervisor;
use log::{error, info, warn};
use vm_config::{MigrationMode, ReceiveMigrationConfig, SendMigrationConfig};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Endpoints, Next, Vmm, EV_MIGRATION};
use crate::config::VmConfig;
use crate::cpu::VmEvents;
use crate::event_monitor::properties;
use crate::migration::receive::{self, Builder};
use crate::migration::{send, Progress};
use crate::snapshot::VmSnapshot;
use crate::vm::Vm;
use crate::{memory, restore, Outcome};

/// A send in progress: the thread that has the VM.
pub(super) struct Outgoing {
    thread: JoinHandle<(Vm, Result<(), String>)>,
    progress: Receiver<Option<Progress>>,
    wake: EventFd,
    /// `preserve_source`: after a success the VM stays here, paused.
    preserve_source: bool,
}

/// A poll of `vm.migration-progress` this recent when a send succeeds means someone watches
/// it: the VMM waits for their next poll before it ends.
const WATCHED: Duration = Duration::from_secs(5);
/// The longest the VMM waits, after a success, for a watcher to learn of it.
const LINGER: Duration = Duration::from_secs(3);

/// What `vm.migration-progress` answers from: the current or last send.
pub(super) struct Status {
    started: Instant,
    ended: Option<Instant>,
    progress: MigrationProgress,
}

impl Status {
    fn new(destination_url: &str, memory_bytes: u64) -> Self {
        Status {
            started: Instant::now(),
            ended: None,
            progress: MigrationProgress {
                state: MigrationState::Running,
                destination_url: destination_url.to_string(),
                pass: 0,
                bytes: 0,
                total_bytes: 0,
                dirty_bytes: 0,
                memory_bytes,
                elapsed_ms: 0,
                downtime_us: None,
                error: None,
            },
        }
    }

    fn end(&mut self, state: MigrationState) {
        self.progress.state = state;
        self.ended = Some(Instant::now());
    }

    /// The answer now: the time since the start, frozen at the end.
    pub(super) fn progress(&self) -> MigrationProgress {
        let elapsed = self.ended.unwrap_or_else(Instant::now) - self.started;
        MigrationProgress {
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            ..self.progress.clone()
        }
    }

    pub(super) fn completed(&self) -> bool {
        self.progress.state == MigrationState::Completed
    }
}

/// The original's chain for a send that could not start or failed.
fn send_error(msg: impl Into<String>) -> ApiError {
    ApiError::Chain(vec![
        "Failed to send migratable component snapshot".into(),
        msg.into(),
    ])
}

fn receive_error(msg: impl Into<String>) -> ApiError {
    ApiError::Chain(vec![
        "Failed to receive migratable component snapshot".into(),
        msg.into(),
    ])
}

impl Vmm {
    /// `vm.send-migration`: checks, then lends the VM to the sending thread.
    pub(super) fn send_migration(&mut self, opts: SendMigrationConfig) -> Result<(), ApiError> {
        if self.outgoing.is_some() {
            return Err(send_error("There is already an ongoing migration"));
        }
        let (Some(config), true) = (self.config.clone(), self.vm.is_some()) else {
            return Err(send_error("VM is not running"));
        };
        opts.validate().map_err(|e| {
            ApiError::Chain(vec![
                "Failed to send migratable component snapshot".into(),
                "Invalid send migration configuration".into(),
                e.to_string(),
            ])
        })?;
        if opts.local && !config.memory.all_shared() {
            return Err(send_error(
                "Local migration requires shared memory or hugepages enabled",
            ));
        }
        if opts.preserve_source && opts.local {
            // Allowed, as by the original; the two VMs then share their RAM's pages.
            warn!(
                "preserve_source with local=on: the kept VM shares its memory with the \
                 destination's; resuming both corrupts both guests"
            );
        }
        let paused = self.state == VmState::Paused;
        let preserve_source = opts.preserve_source;
        let memory_bytes = self
            .vm
            .as_ref()
            .map_or(0, |vm| vm.memory().iter().map(|r| r.len()).sum());
        let status = Status::new(&opts.destination_url, memory_bytes);
        let (tx, rx) = channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| send_error(e.to_string()))?;
        let thread_wake = wake.try_clone().map_err(|e| send_error(e.to_string()))?;
        self.control
            .add(wake.as_raw_fd(), EV_MIGRATION)
            .map_err(|e| send_error(e.to_string()))?;
        // The thread takes the VM out of this slot when it starts; a thread that cannot start
        // (or never runs its body: its filter failed) leaves it here to be taken back.
        let Some(vm) = self.vm.take() else {
            self.control.remove(wake.as_raw_fd());
            return Err(send_error("VM is not running"));
        };
        let slot = Arc::new(Mutex::new(Some(vm)));
        let thread_slot = Arc::clone(&slot);
        info!(
            "sending the VM to {} (local={}, downtime {} ms, timeout {} s)",
            opts.destination_url, opts.local, opts.downtime_ms, opts.timeout_s
        );
        self.monitor.emit("vm", "migration-started");
        let spawned = seccomp::spawn(
            "migration".into(),
            crate::seccomp_filters::migration(),
            move || {
                let mut vm = thread_slot
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .expect("the VM was put in the slot before the thread started");
                let (ptx, prx) = channel();
                // Progress goes on as it comes: a relay that wakes the loop for each message.
                let relay_wake = thread_wake.try_clone();
                let relay_tx = tx.clone();
                let relay = seccomp::spawn(
                    "migration-relay".into(),
                    crate::seccomp_filters::migration_relay(),
                    move || {
                        for p in prx {
                            let _ = relay_tx.send(Some(p));
                            if let Ok(w) = &relay_wake {
                                let _ = w.write(1);
                            }
                        }
                    },
                );
                let result = send::send(&mut vm, &config, &opts, paused, &ptx);
                drop(ptx);
                if let Ok(relay) = relay {
                    let _ = relay.join();
                }
                let _ = tx.send(None);
                let _ = thread_wake.write(1);
                (vm, result)
            },
        );
        match spawned {
            Ok(thread) => {
                self.outgoing = Some(Outgoing {
                    thread,
                    progress: rx,
                    wake,
                    preserve_source,
                });
                self.migration = Some(status);
                Ok(())
            }
            Err(e) => {
                self.control.remove(wake.as_raw_fd());
                // The VM runs on here.
                self.vm = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                Err(send_error(format!(
                    "cannot start the migration thread: {e}"
                )))
            }
        }
    }

    /// `vm.migration-progress`. After a watched migration's success, the answer "completed"
    /// is the VMM's last word.
    pub(super) fn migration_progress(&mut self) -> (ApiResult, Next) {
        self.progress_asked = Some(std::time::Instant::now());
        let Some(st) = self.migration.as_ref() else {
            return (Err(ApiError::NoMigration), Next::Continue);
        };
        let next = if self.linger.is_some() && st.completed() {
            info!("the migration's watcher has seen it complete; this VMM ends");
            Next::Exit(Outcome::Migrated)
        } else {
            Next::Continue
        };
        (
            Ok(ApiResponse::MigrationProgress(Box::new(st.progress()))),
            next,
        )
    }

    /// The sending thread has news: progress events, or its end (the VM comes back).
    pub(super) fn migration_news(&mut self) -> Next {
        let Some(out) = self.outgoing.as_ref() else {
            return Next::Continue;
        };
        let _ = out.wake.read();
        let mut ended = false;
        while let Ok(msg) = out.progress.try_recv() {
            match msg {
                Some(Progress::Pass {
                    pass,
                    bytes,
                    total,
                    dirty,
                }) => {
                    if let Some(st) = self.migration.as_mut() {
                        st.progress.pass = pass;
                        st.progress.bytes = bytes;
                        st.progress.total_bytes = total;
                        st.progress.dirty_bytes = dirty;
                    }
                    let props = properties([
                        ("pass", pass.to_string()),
                        ("bytes", bytes.to_string()),
                        ("total_bytes", total.to_string()),
                        ("dirty_bytes", dirty.to_string()),
                    ]);
                    self.monitor
                        .emit_with("vm", "migration-progress", Some(&props));
                }
                Some(Progress::PostcopyDrained) => {
                    self.monitor.emit("vm", "postcopy-migration-completed");
                }
                Some(Progress::Sending { total }) => {
                    if let Some(st) = self.migration.as_mut() {
                        st.progress.total_bytes = total;
                    }
                }
                Some(Progress::Done {
                    passes,
                    total,
                    downtime,
                }) => {
                    if let Some(st) = self.migration.as_mut() {
                        // The last pass, made while the VM was paused, left nothing dirty.
                        if passes > st.progress.pass {
                            st.progress.bytes = total.saturating_sub(st.progress.total_bytes);
                        }
                        st.progress.pass = passes;
                        st.progress.total_bytes = total;
                        st.progress.dirty_bytes = 0;
                        st.progress.downtime_us =
                            Some(u64::try_from(downtime.as_micros()).unwrap_or(u64::MAX));
                    }
                    let props = properties([
                        ("passes", passes.to_string()),
                        ("total_bytes", total.to_string()),
                        ("downtime_us", downtime.as_micros().to_string()),
                    ]);
                    self.monitor
                        .emit_with("vm", "migration-completed", Some(&props));
                }
                None => ended = true,
            }
        }
        if !ended {
            return Next::Continue;
        }
        let Some(out) = self.outgoing.take() else {
            return Next::Continue;
        };
        self.control.remove(out.wake.as_raw_fd());
        let (vm, result) = match out.thread.join() {
            Ok(r) => r,
            Err(_) => {
                error!("the migration thread panicked; the VM is lost");
                if let Some(st) = self.migration.as_mut() {
                    st.progress.error =
                        Some("the migration thread panicked; the VM is lost".into());
                    st.end(MigrationState::Failed);
                }
                return Next::Continue;
            }
        };
        self.vm = Some(vm);
        match result {
            Ok(()) if out.preserve_source => {
                if let Some(st) = self.migration.as_mut() {
                    st.end(MigrationState::Completed);
                }
                self.monitor.emit("vm", "migration-finished");
                // The migration paused it (or it was paused): it stays so, here, until resumed
                // or shut down (a copy runs at the destination).
                self.state = VmState::Paused;
                info!(
                    "the VM also runs at the destination; it stays here, paused (preserve_source)"
                );
                Next::Continue
            }
            Ok(()) => {
                if let Some(st) = self.migration.as_mut() {
                    st.end(MigrationState::Completed);
                }
                self.monitor.emit("vm", "migration-finished");
                self.shutdown_vm();
                let watched = self.progress_asked.is_some_and(|t| t.elapsed() <= WATCHED);
                if watched {
                    info!(
                        "the VM now runs at the destination; this VMM ends once the migration's \
                         watcher has seen it (within {LINGER:?})"
                    );
                    self.linger = Some(Instant::now() + LINGER);
                    return Next::Continue;
                }
                info!("the VM now runs at the destination; this VMM ends");
                Next::Exit(Outcome::Migrated)
            }
            Err(e) => {
                error!("migration failed: {e}; the VM runs on here");
                // What the guest asked for meanwhile (its vCPUs stopped, so the migration could
                // not finish) is acted on now.
                if std::mem::take(&mut self.deferred_exit) {
                    let _ = self.events.exit.write(1);
                }
                if std::mem::take(&mut self.deferred_reset) {
                    let _ = self.events.reset.write(1);
                }
                let (slots, cpus) = std::mem::take(&mut self.deferred_ejects);
                self.apply_ejections(slots, cpus);
                if let Some(st) = self.migration.as_mut() {
                    st.progress.error = Some(e.clone());
                    st.end(MigrationState::Failed);
                }
                let props = properties([("error", e)]);
                self.monitor
                    .emit_with("vm", "migration-failed", Some(&props));
                Next::Continue
            }
        }
    }

    /// `vm.receive-migration`: waits for the source, takes the VM, and answers once it runs
    /// here. Refused while a VM is created; on any failure nothing is kept.
    pub(super) fn receive_migration(&mut self, rc: ReceiveMigrationConfig) -> Result<(), ApiError> {
        if self.config.is_some() {
            return Err(ApiError::VmAlreadyCreated);
        }
        rc.validate().map_err(|e| receive_error(e.to_string()))?;
        let zone_updates = vm_config::zone_updates(&rc.zone_updates).map_err(receive_error)?;
        self.monitor.emit("vm", "migration-receive-ready");
        let tls_dir = rc.tls_dir.as_deref().map(std::path::Path::new);
        let postcopy = rc.memory_mode == MigrationMode::Postcopy;
        let (mut stream, listener) =
            receive::accept(&rc.receiver_url, self.signal_rx.as_raw_fd(), tls_dir).map_err(
                |e| {
                    self.monitor.emit("vm", "migration-receive-failed");
                    receive_error(e)
                },
            )?;
        self.monitor.emit("vm", "migration-receive-started");
        let mut incoming = Incoming {
            hv: &self.hv,
            events: &self.events,
            api_socket: self.api_socket.as_deref(),
            config: None,
            zone_updates,
            postcopy,
            mem: None,
            loader: None,
            ep: None,
            vm: None,
        };
        let failed = match postcopy {
            true => Some(
                self.events
                    .error
                    .try_clone()
                    .map_err(|e| receive_error(e.to_string()))?,
            ),
            false => None,
        };
        let result = receive::receive(&mut stream, Some(listener), &mut incoming, failed);
        let Incoming { config, ep, vm, .. } = incoming;
        match (result, config, ep, vm) {
            (Ok(resumed), Some(config), Some(ep), Some(vm)) => {
                self.config = Some(config);
                if let Err(e) = self.attach(ep, vm) {
                    self.shutdown_vm();
                    self.config = None;
                    self.monitor.emit("vm", "migration-receive-failed");
                    return Err(receive_error(e.to_string()));
                }
                // A VM paused at the source stays so (CompletePaused).
                self.state = if resumed {
                    VmState::Running
                } else {
                    VmState::Paused
                };
                self.monitor.emit("vm", "migration-receive-finished");
                Ok(())
            }
            (result, _, _, vm) => {
                if let Some(mut vm) = vm {
                    vm.stop();
                }
                let e = result
                    .err()
                    .unwrap_or_else(|| "the migration ended early".into());
                warn!("migration not received: {e}");
                self.monitor.emit("vm", "migration-receive-failed");
                Err(receive_error(e))
            }
        }
    }
}

/// What a reception has built so far.
struct Incoming<'a> {
    hv: &'a KvmHypervisor,
    events: &'a VmEvents,
    /// The API socket, whose directory Landlock must allow (`landlock_enable`).
    api_socket: Option<&'a std::path::Path>,
    config: Option<VmConfig>,
    /// `zone_updates`: the incoming zones' new host NUMA nodes.
    zone_updates: Vec<(String, u32)>,
    /// `memory_mode=postcopy`: RAM comes from the source as the guest touches it.
    postcopy: bool,
    mem: Option<GuestMemoryMmap>,
    /// Postcopy's fetcher, for the VM to hold.
    loader: Option<crate::uffd::OnDemand>,
    ep: Option<Endpoints>,
    vm: Option<Vm>,
}

impl Builder for Incoming<'_> {
    fn memory(&mut self, config: &VmConfig, files: Vec<File>) -> Result<(), String> {
        let mut config = config.clone();
        config.memory.apply_zone_updates(&self.zone_updates)?;
        let config = &config;
        if self.postcopy {
            if config.memory.any_hugepages() {
                return Err(
                    "memory_mode=postcopy cannot serve hugepages=on memory (the pages \
                            are loaded 4 KiB at a time)"
                        .into(),
                );
            }
            if let Some(z) = config
                .memory
                .zones
                .iter()
                .flatten()
                .find(|z| z.file.is_some())
            {
                return Err(format!(
                    "memory_mode=postcopy cannot serve memory zone {} (file=): userfaultfd \
                     serves anonymous and memfd memory only",
                    z.id
                ));
            }
        }
        // The VM's configuration is known now: confined before anything of it is built.
        crate::landlock::confine(config, self.api_socket, None).map_err(|e| e.to_string())?;
        let mem = if files.is_empty() {
            memory::create_guest_memory(&config.memory).map_err(|e| e.to_string())?
        } else {
            if !config.memory.all_shared() {
                return Err("memory files for RAM that is not shared".into());
            }
            restore::map_memory_files(&config.memory, files).map_err(|e| e.to_string())?
        };
        self.mem = Some(mem);
        self.config = Some(config.clone());
        Ok(())
    }

    fn ram(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }

    fn postcopy(&mut self, loader: crate::uffd::OnDemand) -> Result<(), String> {
        self.loader = Some(loader);
        Ok(())
    }

    fn vm(&mut self, state: VmSnapshot) -> Result<(), String> {
        let (Some(config), Some(mem)) = (self.config.as_ref(), self.mem.take()) else {
            return Err("State before Config".into());
        };
        let ep = Endpoints::open(config).map_err(|e| e.to_string())?;
        let mut vm = Vm::restore(
            self.hv,
            config,
            &state,
            mem,
            self.loader.take(),
            ep.host_io(),
            self.events,
            false,
        )
        .map_err(|c| crate::snapshot::SnapshotError::restore(c).one_line())?;
        self.events.clear_halting();
        vm.start(self.events).map_err(|e| e.to_string())?;
        self.ep = Some(ep);
        self.vm = Some(vm);
        Ok(())
    }

    fn complete(&mut self, resume: bool) -> Result<(), String> {
        let vm = self.vm.as_mut().ok_or("Complete before State")?;
        if resume {
            vm.resume().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `vm.migration-progress` answers from: running with the time going on, then the
    /// end's state with the time frozen.
    #[test]
    fn status_freezes_at_the_end() {
        let mut st = Status::new("unix:/m", 256 << 20);
        let p = st.progress();
        assert_eq!(p.state, MigrationState::Running);
        assert_eq!((p.pass, p.total_bytes, p.memory_bytes), (0, 0, 256 << 20));
        assert!(!st.completed());
        std::thread::sleep(Duration::from_millis(5));
        assert!(st.progress().elapsed_ms >= 5);
        st.end(MigrationState::Completed);
        assert!(st.completed());
        let at_end = st.progress().elapsed_ms;
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(st.progress().elapsed_ms, at_end);
        assert_eq!(st.progress().state, MigrationState::Completed);
    }
}
