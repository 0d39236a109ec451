//! The host ends of a VM's character devices (serial port, virtio console, debug console):
//! opened before the VM is built, kept by the control loop across guest reboots, and handed to
//! each VM built from them as its `HostIo`.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use virtio_devices::ConsoleSize;

use super::{Vmm, DEFAULT_CONSOLE_SIZE};
use crate::config::{DebugConsoleConfig, VmConfig};
use crate::device_manager::HostIo;
use crate::pci_setup;
use crate::serial_io::{ConsoleRelay, SerialEndpoint};
use crate::Error;

/// The serial port's sink: `None` for no port, `Some(None)` for a port whose output goes
/// nowhere.
pub(super) fn serial_sink(endpoint: &SerialEndpoint) -> Option<Option<Box<dyn io::Write + Send>>> {
    endpoint.enabled().then(|| endpoint.writer())
}

/// The virtio console's output and input (a duplicate of the endpoint's input fd).
fn console_io(endpoint: &SerialEndpoint, size: &Arc<ConsoleSize>) -> Option<pci_setup::ConsoleIo> {
    endpoint.enabled().then(|| pci_setup::ConsoleIo {
        size: size.clone(),
        out: endpoint.writer(),
        input: endpoint.input_fd().and_then(|fd| {
            // SAFETY: `fd` is open for as long as the endpoint; dup gives us our own copy.
            let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            // SAFETY: `new` is a fresh fd nobody else owns.
            (new >= 0).then(|| File::from(unsafe { OwnedFd::from_raw_fd(new) }))
        }),
    })
}

/// The virtio console's host side: through the relay for a socket, else the endpoint itself.
pub(super) fn console_host(
    endpoint: &SerialEndpoint,
    relay: Option<&ConsoleRelay>,
    size: &Arc<ConsoleSize>,
) -> Option<pci_setup::ConsoleIo> {
    match relay {
        Some(r) => {
            let (out, input) = r.device_io()?;
            Some(pci_setup::ConsoleIo {
                out: Some(out),
                input: Some(input),
                size: size.clone(),
            })
        }
        None => console_io(endpoint, size),
    }
}

/// What a VM built now gets from these host ends.
pub(super) fn host_io(
    serial: Option<&SerialEndpoint>,
    console: Option<(&SerialEndpoint, Option<&ConsoleRelay>, &Arc<ConsoleSize>)>,
    debug: Option<&SerialEndpoint>,
) -> HostIo {
    HostIo {
        serial: serial.and_then(serial_sink),
        console: console.and_then(|(c, relay, size)| console_host(c, relay, size)),
        debug: debug.map(SerialEndpoint::writer),
    }
}

/// The host ends of a VM's serial port, virtio console and debug console, opened before the
/// VM is built.
pub(super) struct Endpoints {
    pub serial: SerialEndpoint,
    pub console: SerialEndpoint,
    /// For `--console socket=`: the device's side, relayed to the client.
    pub relay: Option<ConsoleRelay>,
    /// The terminal-resize watcher's fd, where the console has one.
    pub resize_fd: Option<RawFd>,
    /// The virtio console's size, shared with the device.
    pub size: Arc<ConsoleSize>,
    /// `--debug-console`, when it has somewhere to write (not `off` or `null`).
    pub debug: Option<SerialEndpoint>,
}

impl Endpoints {
    /// Opens what `config` asks for.
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        let serial = SerialEndpoint::open("--serial", &config.serial)?;
        let mut console = SerialEndpoint::open("--console", &config.console)?;
        // Before the VM (and its memory) exists: the watcher is a forked process.
        let resize_fd = console.watch_resizes();
        let relay = if console.is_socket() {
            Some(ConsoleRelay::new().map_err(Error::Setup)?)
        } else {
            None
        };
        let debug = match config.debug_console.enabled() {
            true => Some(SerialEndpoint::open(
                DebugConsoleConfig::OPTION,
                &config.debug_console.as_console(),
            )?),
            false => None,
        };
        let (cols, rows) = console.window_size().unwrap_or(DEFAULT_CONSOLE_SIZE);
        Ok(Endpoints {
            serial,
            console,
            relay,
            resize_fd,
            size: ConsoleSize::new(cols, rows),
            debug,
        })
    }

    /// What a VM built with these endpoints gets.
    pub fn host_io(&self) -> HostIo {
        host_io(
            Some(&self.serial),
            Some((&self.console, self.relay.as_ref(), &self.size)),
            self.debug.as_ref(),
        )
    }

    /// Records the paths of pseudo-terminals in `config`, as the original does (`file`).
    pub fn record_ptys(&self, config: &mut VmConfig) {
        for (file, ep) in [
            (&mut config.serial.file, Some(&self.serial)),
            (&mut config.console.file, Some(&self.console)),
            (&mut config.debug_console.file, self.debug.as_ref()),
        ] {
            if let Some(path) = ep.and_then(SerialEndpoint::pty_path) {
                *file = Some(path.to_path_buf());
            }
        }
    }
}

impl Vmm {
    /// The host ends the running VM was built with, for the VM a guest reboot builds.
    pub(super) fn kept_host_io(&self) -> HostIo {
        host_io(
            self.serial.as_ref(),
            self.console
                .as_ref()
                .map(|c| (c, self.console_relay.as_ref(), &self.console_size)),
            self.debug_console.as_ref(),
        )
    }
}
