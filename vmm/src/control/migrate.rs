//! The control loop's side of live migration. Sending lends the VM to a thread (as the
//! original's migration worker) and answers at once; the thread reports progress through a
//! channel and an event fd the loop watches, and gives the VM back at the end: the VMM ends
//! after a success, and keeps running its VM after a failure. Receiving runs on the loop
//! itself (the request is answered when the VM has arrived, as the original's).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::thread::JoinHandle;

use api::{ApiError, VmState};
use guest_memory::GuestMemoryMmap;
use hypervisor::KvmHypervisor;
use log::{error, info, warn};
use vm_config::{ReceiveMigrationConfig, SendMigrationConfig};
use vmm_sys_util::eventfd::EventFd;

use super::{serial_sink, Endpoints, Next, Vmm, EV_MIGRATION};
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
        let paused = self.state == VmState::Paused;
        let Some(mut vm) = self.vm.take() else {
            return Err(send_error("VM is not running"));
        };
        let (tx, rx) = channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| send_error(e.to_string()))?;
        let thread_wake = wake.try_clone().map_err(|e| send_error(e.to_string()))?;
        self.control
            .add(wake.as_raw_fd(), EV_MIGRATION)
            .map_err(|e| send_error(e.to_string()))?;
        info!(
            "sending the VM to {} (local={}, downtime {} ms, timeout {} s)",
            opts.destination_url, opts.local, opts.downtime_ms, opts.timeout_s
        );
        self.monitor.emit("vm", "migration-started");
        let spawned = seccomp::spawn(
            "migration".into(),
            crate::seccomp_filters::migration(),
            move || {
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
                });
                Ok(())
            }
            Err(e) => {
                self.control.remove(wake.as_raw_fd());
                Err(send_error(format!(
                    "cannot start the migration thread: {e}"
                )))
            }
        }
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
                    let props = properties([
                        ("pass", pass.to_string()),
                        ("bytes", bytes.to_string()),
                        ("total_bytes", total.to_string()),
                        ("dirty_bytes", dirty.to_string()),
                    ]);
                    self.monitor
                        .emit_with("vm", "migration-progress", Some(&props));
                }
                Some(Progress::Done {
                    passes,
                    total,
                    downtime,
                }) => {
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
                return Next::Continue;
            }
        };
        self.vm = Some(vm);
        match result {
            Ok(()) => {
                self.monitor.emit("vm", "migration-finished");
                info!("the VM now runs at the destination; this VMM ends");
                self.shutdown_vm();
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
        let mut stream =
            receive::accept(&rc.receiver_url, self.signal_rx.as_raw_fd()).map_err(|e| {
                self.monitor.emit("vm", "migration-receive-failed");
                receive_error(e)
            })?;
        self.monitor.emit("vm", "migration-receive-started");
        let mut incoming = Incoming {
            hv: &self.hv,
            events: &self.events,
            api_socket: self.api_socket.as_deref(),
            config: None,
            zone_updates,
            mem: None,
            ep: None,
            vm: None,
        };
        let result = receive::receive(&mut stream, &mut incoming);
        let Incoming { config, ep, vm, .. } = incoming;
        match (result, config, ep, vm) {
            (Ok(()), Some(config), Some(ep), Some(vm)) => {
                self.config = Some(config);
                if let Err(e) = self.attach(ep, vm) {
                    self.shutdown_vm();
                    self.config = None;
                    self.monitor.emit("vm", "migration-receive-failed");
                    return Err(receive_error(e.to_string()));
                }
                self.state = VmState::Running;
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
    mem: Option<GuestMemoryMmap>,
    ep: Option<Endpoints>,
    vm: Option<Vm>,
}

impl Builder for Incoming<'_> {
    fn memory(&mut self, config: &VmConfig, files: Vec<File>) -> Result<(), String> {
        let mut config = config.clone();
        config.memory.apply_zone_updates(&self.zone_updates)?;
        let config = &config;
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

    fn vm(&mut self, state: VmSnapshot) -> Result<(), String> {
        let (Some(config), Some(mem)) = (self.config.as_ref(), self.mem.take()) else {
            return Err("State before Config".into());
        };
        let ep = Vmm::open_endpoints(config).map_err(|e| e.to_string())?;
        let mut vm = Vm::restore(
            self.hv,
            config,
            &state,
            mem,
            None,
            serial_sink(&ep.serial),
            ep.console_host(),
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

    fn complete(&mut self) -> Result<(), String> {
        let vm = self.vm.as_mut().ok_or("Complete before State")?;
        vm.resume().map_err(|e| e.to_string())
    }
}
