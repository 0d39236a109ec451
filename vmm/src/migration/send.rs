//! The sending side of a live migration, run on its own thread with the VM (the control loop
//! lends it and takes it back): Start, the memory files for a local migration, Config, pre-copy
//! passes over the dirty log until what is left fits the downtime, then pause, the last pass,
//! State and Complete. On any failure the source sends Abandon where it still can, stops dirty
//! logging and gives the VM back as it was (running again if it ran).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vm_config::{MigrationMode, SendMigrationConfig, TimeoutStrategy};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::connections::Senders;
use super::postcopy;
use super::protocol::{encode_ranges, Command, Request, Response, Stream};
use super::{dirty, MigrationConfig, Progress, SENDING_EVERY};
use crate::config::VmConfig;
use crate::snapshot::MemoryRange;
use crate::vm::Vm;

/// What went wrong, one line.
pub type SendError = String;

/// The most one write of a pass sends before the pass may report how far it is.
const SENDING_PIECE: u64 = 8 << 20;

struct Link<'a> {
    stream: Stream,
    events: &'a Sender<Progress>,
}

impl Link<'_> {
    fn request(&mut self, cmd: Command, payload: &[u8]) -> Result<(), SendError> {
        let mut frame = Request::new(cmd, payload.len() as u64).encode().to_vec();
        frame.extend_from_slice(payload);
        self.stream
            .write_all(&frame)
            .map_err(|e| format!("sending {cmd:?}: {e}"))?;
        self.response(cmd)
    }

    fn response(&mut self, cmd: Command) -> Result<(), SendError> {
        let r = Response::read_from(&mut self.stream)
            .map_err(|e| format!("waiting for the answer to {cmd:?}: {e}"))?;
        if r.ok {
            Ok(())
        } else {
            Err(format!("the destination refused {cmd:?}"))
        }
    }

    /// One Memory request: the table, then each range's bytes straight from guest RAM.
    /// Sends `ranges` as one Memory request; `before`: the bytes earlier passes sent (for the
    /// reports of a pass in progress).
    fn memory(&mut self, vm: &Vm, ranges: &[MemoryRange], before: u64) -> Result<u64, SendError> {
        let table = encode_ranges(ranges);
        self.stream
            .write_all(&Request::new(Command::Memory, table.len() as u64).encode())
            .and_then(|()| self.stream.write_all(&table))
            .map_err(|e| format!("sending memory: {e}"))?;
        let mem = vm.memory();
        let (mut sent, mut said) = (0u64, Instant::now());
        for r in ranges {
            // In pieces, so that a long pass reports as it goes.
            let mut at = 0;
            while at < r.length {
                let n = (r.length - at).min(SENDING_PIECE);
                crate::memory::write_range(mem, r.gpa + at, n, &mut self.stream, 1 << 30)
                    .map_err(|e| format!("sending memory at {:#x}: {e}", r.gpa + at))?;
                (at, sent) = (at + n, sent + n);
                if said.elapsed() >= SENDING_EVERY {
                    let _ = self.events.send(Progress::Sending {
                        total: before + sent,
                    });
                    said = Instant::now();
                }
            }
        }
        self.response(Command::Memory)?;
        Ok(dirty::bytes(ranges))
    }
}

/// Migrates `vm` to `opts.destination_url`. `paused`: the VM was paused when asked (it stays
/// so on failure). On success the VM is paused and its devices released, for the VMM to end.
pub fn send(
    vm: &mut Vm,
    config: &VmConfig,
    opts: &SendMigrationConfig,
    paused: bool,
    events: &Sender<Progress>,
) -> Result<(), SendError> {
    let start = Instant::now();
    if precopy(opts) {
        // The devices that write guest RAM unseen (vhost-user backends) log it from now on;
        // one that cannot refuses the migration before anything is sent.
        let last = vm.memory().last_addr().0;
        if let Err(e) = vm.devices().pci.start_dirty_log(last) {
            vm.devices().pci.stop_dirty_log();
            return Err(format!(
                "cannot track the devices' writes to guest RAM: {e}"
            ));
        }
    }
    let result = send_logged(vm, config, opts, paused, events, start);
    if precopy(opts) {
        vm.devices().pci.stop_dirty_log();
    }
    result
}

/// Whether memory goes over the connection before the destination runs (not local, not
/// postcopy).
fn precopy(opts: &SendMigrationConfig) -> bool {
    !opts.local && opts.memory_mode == MigrationMode::Precopy
}

fn send_logged(
    vm: &mut Vm,
    config: &VmConfig,
    opts: &SendMigrationConfig,
    paused: bool,
    events: &Sender<Progress>,
    start: Instant,
) -> Result<(), SendError> {
    let tls_dir = opts.tls_dir.as_deref().map(std::path::Path::new);
    let stream = Stream::connect(&opts.destination_url, tls_dir)?;
    stream.set_buffers(super::SOCKET_BUFFER);
    stream.set_timeouts(super::receive::IDLE_TIMEOUT);
    let mut s = Link { stream, events };
    let mut logging = false;
    let mut paused_here = false;
    let mut locks_released = false;
    let result = run(
        vm,
        config,
        opts,
        paused,
        &mut s,
        start,
        &mut logging,
        &mut paused_here,
        &mut locks_released,
    );
    if result.is_err() {
        if locks_released {
            if let Err(e) = vm.devices().pci.reacquire_disk_locks() {
                warn!("cannot take the disk locks back after the failed migration: {e}");
            }
        }
        // Best effort: the destination drops what it built.
        let _ = s
            .stream
            .write_all(&Request::new(Command::Abandon, 0).encode());
        if logging {
            if let Err(e) =
                dirty::set_logging(vm.hypervisor_vm(), &vm.memory_slots(), vm.memory(), false)
            {
                warn!("cannot stop dirty logging: {e}");
            }
        }
        if paused_here && !paused {
            if let Err(e) = vm.resume() {
                warn!("cannot resume the VM after the failed migration: {e}");
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &mut Vm,
    config: &VmConfig,
    opts: &SendMigrationConfig,
    paused: bool,
    s: &mut Link,
    start: Instant,
    logging: &mut bool,
    paused_here: &mut bool,
    locks_released: &mut bool,
) -> Result<(), SendError> {
    s.request(Command::Start, &[])?;
    if opts.local {
        send_memory_fds(vm, s)?;
    }
    let cfg = serde_json::to_vec(&MigrationConfig::new(config.clone()))
        .map_err(|e| format!("cannot encode the configuration: {e}"))?;
    s.request(Command::Config, &cfg)?;
    if opts.memory_mode == MigrationMode::Postcopy {
        return postcopy(vm, opts, s, paused, start, paused_here, locks_released);
    }
    // connections=N: memory over N more connections, none over this one.
    let senders = if opts.connections > 1 {
        let tls_dir = opts.tls_dir.as_deref().map(std::path::Path::new);
        Some(Senders::open(
            &opts.destination_url,
            tls_dir,
            opts.connections,
            vm.memory(),
            s.events,
        )?)
    } else {
        None
    };
    let send_pass = |s: &mut Link, vm: &Vm, ranges: &[MemoryRange], before: u64| match &senders {
        Some(senders) => senders.pass(ranges, before),
        None => s.memory(vm, ranges, before),
    };

    let downtime = Duration::from_millis(opts.downtime_ms);
    let timeout = Duration::from_secs(opts.timeout_s);
    let mut total = 0u64;
    let mut pass = 0u32;
    let mut left = Vec::new();
    if !opts.local {
        dirty::set_logging(vm.hypervisor_vm(), &vm.memory_slots(), vm.memory(), true)?;
        *logging = true;
        let mut ranges = dirty::initial(vm.memory(), vm.ram_is_fresh());
        // Bytes per second, as the last pass went.
        let mut rate: f64;
        loop {
            let t = Instant::now();
            let sent = send_pass(s, vm, &ranges, total)?;
            total += sent;
            pass += 1;
            rate = sent as f64 / t.elapsed().as_secs_f64().max(1e-6);
            ranges = dirty::take(
                vm.hypervisor_vm(),
                &vm.memory_slots(),
                vm.memory(),
                &vm.devices().pci.take_dirty_log(),
            )?;
            let dirty_bytes = dirty::bytes(&ranges);
            let _ = s.events.send(Progress::Pass {
                pass,
                bytes: sent,
                total,
                dirty: dirty_bytes,
            });
            let needs = Duration::from_secs_f64(dirty_bytes as f64 / rate.max(1.0));
            if needs <= downtime {
                break;
            }
            if start.elapsed() >= timeout {
                match opts.timeout_strategy {
                    TimeoutStrategy::Cancel => {
                        return Err(format!(
                            "the migration did not converge within timeout_s={} ({} MiB still \
                             dirty after {pass} passes, {:.0} MiB/s)",
                            opts.timeout_s,
                            dirty_bytes >> 20,
                            rate / f64::from(1 << 20)
                        ))
                    }
                    TimeoutStrategy::Ignore => break,
                }
            }
        }
        left = ranges;
    }

    // Downtime from here: vCPUs out, devices quiesced (their last writes land in the log).
    let paused_at = Instant::now();
    let state = pause_and_snapshot(vm, paused_here)?;
    if !opts.local {
        // After the devices' pause: their last writes are in the logs.
        let mut last = dirty::take(
            vm.hypervisor_vm(),
            &vm.memory_slots(),
            vm.memory(),
            &vm.devices().pci.take_dirty_log(),
        )?;
        last.extend(left);
        last.sort_by_key(|r| r.gpa);
        total += send_pass(s, vm, &last, total)?;
        pass += 1;
    }
    // Their connections close: the destination takes State only once they have.
    drop(senders);
    let state = serde_json::to_vec(&state).map_err(|e| format!("cannot encode the state: {e}"))?;
    // The destination opens the disk images when it builds the VM from the state; a source
    // kept (`preserve_source`) keeps its images, as the original's.
    if !opts.preserve_source {
        vm.devices()
            .pci
            .release_disk_locks()
            .map_err(|e| format!("cannot release the disk locks: {e}"))?;
        *locks_released = true;
    }
    s.request(Command::State, &state)?;
    s.request(complete(paused), &[])?;
    let downtime = paused_at.elapsed();
    if *logging {
        let _ = dirty::set_logging(vm.hypervisor_vm(), &vm.memory_slots(), vm.memory(), false);
        *logging = false;
    }
    info!(
        "migration to {} complete: {pass} passes, {} MiB in {:?}, downtime {downtime:?}",
        opts.destination_url,
        total >> 20,
        start.elapsed()
    );
    let _ = s.events.send(Progress::Done {
        passes: pass,
        total,
        downtime,
    });
    Ok(())
}

/// Pauses the VM (unless it is: `paused_here` says whether this did) and takes its state.
fn pause_and_snapshot(
    vm: &mut Vm,
    paused_here: &mut bool,
) -> Result<crate::snapshot::VmSnapshot, SendError> {
    if !vm.is_paused() {
        vm.pause()
            .map_err(|e| format!("cannot pause the VM: {e}"))?;
        *paused_here = true;
    }
    vm.snapshot()
        .map_err(|e| format!("cannot take the VM's state: {e}"))
}

/// The last request: a VM paused at the source stays paused at the destination.
fn complete(paused: bool) -> Command {
    if paused {
        Command::CompletePaused
    } else {
        Command::Complete
    }
}

/// Postcopy, after Config: pause, State and Complete while the destination fetches pages over
/// a fault connection; done when it has them all and closes it. Once Complete is answered the
/// VM is the destination's: a failure after that is logged, the VM stays paused here.
fn postcopy(
    vm: &mut Vm,
    opts: &SendMigrationConfig,
    s: &mut Link,
    paused: bool,
    start: Instant,
    paused_here: &mut bool,
    locks_released: &mut bool,
) -> Result<(), SendError> {
    let paused_at = Instant::now();
    let state = pause_and_snapshot(vm, paused_here)?;
    let state = serde_json::to_vec(&state).map_err(|e| format!("cannot encode the state: {e}"))?;
    vm.devices()
        .pci
        .release_disk_locks()
        .map_err(|e| format!("cannot release the disk locks: {e}"))?;
    *locks_released = true;
    let tls_dir = opts.tls_dir.as_deref().map(std::path::Path::new);
    let mut fault = postcopy::open_fault_connection(&opts.destination_url, tls_dir)?;
    let stopper = fault
        .fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot keep the fault connection: {e}"))?;
    let mem = vm.memory().clone();
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    let events = s.events.clone();
    let server = seccomp::spawn(
        "postcopy-serve".into(),
        crate::seccomp_filters::migration_connection(),
        move || {
            postcopy::serve(&mut fault, &mem, &mut |total| {
                let _ = events.send(Progress::Sending { total });
            })
        },
    )
    .map_err(|e| format!("cannot start the postcopy page server: {e}"))?;
    let handed = s
        .request(Command::State, &state)
        .and_then(|()| s.request(complete(paused), &[]));
    if let Err(e) = handed {
        // The destination never ran the VM: it runs on here.
        // SAFETY: shuts down a socket whose descriptor we own (a duplicate).
        unsafe { libc::shutdown(stopper.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = server.join();
        return Err(e);
    }
    let downtime = paused_at.elapsed();
    info!(
        "postcopy migration to {}: the VM runs there after {downtime:?} paused; serving its \
         memory until it has it all",
        opts.destination_url
    );
    let total = match server.join() {
        // A destination fetches every page at least once before it closes the connection;
        // one that closed sooner is gone, and its VM with it.
        Ok(Ok(bytes)) if bytes >= ram => {
            let _ = s.events.send(Progress::PostcopyDrained);
            bytes
        }
        Ok(Ok(bytes)) => {
            error!(
                "postcopy: the destination closed its fault connection after {} of {} MiB; \
                 the VM there cannot have the rest",
                bytes >> 20,
                ram >> 20
            );
            bytes
        }
        Ok(Err(e)) => {
            error!("postcopy: serving the destination's memory failed ({e}); the VM there is lost");
            0
        }
        Err(_) => {
            error!("postcopy: the page server panicked; the VM at the destination is lost");
            0
        }
    };
    info!(
        "postcopy migration to {} complete: {} MiB served in {:?}",
        opts.destination_url,
        total >> 20,
        start.elapsed()
    );
    let _ = s.events.send(Progress::Done {
        passes: 0,
        total,
        downtime,
    });
    Ok(())
}

/// Local migration: each RAM region's memory file goes over the socket (MemoryFd: the region's
/// index as a u32, the descriptor beside it), so the destination maps the same pages.
fn send_memory_fds(vm: &Vm, s: &mut Link) -> Result<(), SendError> {
    for (slot, region) in vm.memory().iter().enumerate() {
        let fo = region
            .file_offset()
            .filter(|_| crate::restore::region_is_file(region))
            .ok_or("Local migration requires shared memory or hugepages enabled")?;
        let req = Request::new(Command::MemoryFd, 4).encode();
        s.stream
            .write_all(&req)
            .map_err(|e| format!("sending MemoryFd: {e}"))?;
        s.stream
            .send_with_fd(&(slot as u32).to_le_bytes(), fo.file().as_raw_fd())
            .map_err(|e| format!("sending a memory file: {e}"))?;
        s.response(Command::MemoryFd)?;
    }
    Ok(())
}
