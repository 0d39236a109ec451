//! The VMM: turns a `VmConfig` into a running VM and runs the control loop that reacts to the
//! guest (power-off, reset), to signals, to serial input and to API requests.

mod control;
pub mod core_sched;
mod coredump;
mod cpu;
mod device_events;
mod device_manager;
pub mod event_monitor;
#[doc(hidden)]
pub mod fuzz;
mod hotplug;
mod landlock;
mod memory;
mod memory_hotplug;
mod memory_zones;
mod migration;
mod numa;
mod pci_segments;
mod pci_setup;
mod pieces;
mod platform;
mod pmem;
mod poll;
mod pty_resize;
pub mod restore;
mod restore_copy;
mod restore_nets;
mod seccomp_filters;
mod serial_io;
pub mod snapshot;
mod uffd;
mod vcpu_affinity;
mod vcpu_hotplug;
mod virtio_build;
mod virtio_build_vhost;
mod vm;

use std::io;
use std::os::unix::net::UnixStream;

use log::info;
use thiserror::Error;

pub use api::ApiError;
use control::Vmm;
use cpu::VmEvents;
pub use event_monitor::EventMonitor;
pub use serial_io::restore_terminal;
use serial_io::SerialIoError;
use vm::VmError;
/// The VM configuration (its own crate, shared with the API and `ch-remote`).
pub use vm_config as config;
pub use vm_config::{ConfigError, VmConfig};

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
    #[error(transparent)]
    Api(ApiError),
    #[error("VMM set-up failed: {0}")]
    Setup(#[source] io::Error),
    #[error("--seccomp: {0}")]
    Seccomp(#[source] seccomp::Error),
    #[error("the guest stopped with an error (see the log above)")]
    GuestFailed,
    #[error("--restore source_url={value}: {why}")]
    Restore { value: String, why: String },
}

/// How the VMM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PowerOff,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// `vmm.shutdown` through the API.
    ApiShutdown,
    /// The VM was migrated away.
    Migrated,
}

/// What the VMM starts with.
pub struct VmmOptions {
    /// A VM to create and boot at once (from the command line).
    pub config: Option<VmConfig>,
    /// The API server, served from the control loop, if there is an API socket.
    pub api: Option<api::ApiServer>,
    pub event_monitor: EventMonitor,
    /// Keep the VMM running when the guest powers off.
    pub no_shutdown: bool,
    /// A snapshot to restore at once (`--restore`), instead of `config`.
    pub restore: Option<vm_config::RestoreConfig>,
}

/// Runs the VMM: boots the VM given on the command line, if any, and serves the API, until
/// the guest powers off (unless `no_shutdown`), the VM fails, the API asks the VMM to shut
/// down, or a signal tells it to stop.
pub fn run(mut opts: VmmOptions) -> Result<Outcome, Error> {
    if let Some(config) = &mut opts.config {
        config.validate()?;
    }
    // A VM on the command line is confined now, while the VMM has one thread (landlock.rs).
    // So is a `--restore` of a snapshot whose configuration asks for it (read here first; its
    // errors are the restore's to report).
    let early = |c: &VmConfig, source| {
        landlock::confine(c, opts.api.as_ref().and_then(|a| a.path()), source)
            .map_err(|e| Error::Api(ApiError::BadRequest(e.to_string())))
    };
    let landlocked = match (&opts.config, &opts.restore) {
        (Some(c), _) if c.landlock_enable => early(c, None)?,
        (None, Some(rc)) => match restore::open(&rc.source_url) {
            Ok(src) if src.config.landlock_enable => early(&src.config, Some(&src.dir))?,
            _ => false,
        },
        _ => false,
    };
    seccomp_filters::confine_control_loop().map_err(Error::Seccomp)?;
    cpu::init_kick_signal().map_err(Error::Setup)?;
    let events = VmEvents::new().map_err(Error::Setup)?;

    let (signal_rx, signal_tx) = UnixStream::pair().map_err(Error::Setup)?;
    signal_rx.set_nonblocking(true).map_err(Error::Setup)?;
    let mut signal_ids = Vec::new();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let tx = signal_tx.try_clone().map_err(Error::Setup)?;
        signal_ids.push(signal_hook::low_level::pipe::register(sig, tx).map_err(Error::Setup)?);
    }

    // SIGWINCH (the terminal was resized) through a pipe of its own.
    let (winch_rx, winch_tx) = UnixStream::pair().map_err(Error::Setup)?;
    winch_rx.set_nonblocking(true).map_err(Error::Setup)?;
    signal_ids.push(
        signal_hook::low_level::pipe::register(libc::SIGWINCH, winch_tx).map_err(Error::Setup)?,
    );

    let mut vmm = Vmm::new(
        events,
        signal_rx,
        winch_rx,
        opts.api,
        opts.event_monitor,
        opts.no_shutdown,
    )?;
    vmm.landlocked = landlocked;
    vmm.monitor().emit("vmm", "starting");
    let result = (|| {
        if let Some(config) = opts.config {
            vmm.create(config).map_err(|e| match e {
                ApiError::Config(e) => Error::Config(e),
                e => Error::Api(e),
            })?;
            vmm.boot()?;
        }
        if let Some(rc) = opts.restore {
            let value = rc.source_url.clone();
            vmm.restore(rc).map_err(|e| Error::Restore {
                value,
                why: match e {
                    ApiError::Chain(lines) => lines.join(": "),
                    e => e.to_string(),
                },
            })?;
        }
        vmm.run()
    })();
    vmm.stop();
    info!("VMM stopped: {result:?}");
    for id in signal_ids {
        signal_hook::low_level::unregister(id);
    }
    result
}

#[cfg(test)]
mod tests {
    /// The configuration checks `image_type=` against its own list of names (it does not link
    /// the block layer); each must be a name the block layer opens.
    #[test]
    fn config_image_types_are_the_block_layers() {
        for name in vm_config::IMAGE_TYPES {
            assert!(name.parse::<block::ImageType>().is_ok(), "{name}");
        }
        assert!("qcow3".parse::<block::ImageType>().is_err());
    }
}
