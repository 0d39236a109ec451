//! virtio-console (single port, no multiport): the transmit queue goes to a host sink and
//! host input (the `--console` endpoint's terminal, pty or socket) fills the receive queue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use log::{debug, warn};
use vm_memory::Bytes;

use crate::config_signal::{ConfigInterrupt, ConfigSignal};
use crate::device_worker::DeviceWorker;
use crate::vring::VirtQueue;
use crate::worker::{process_chains, queue_bit, QueueHandler};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    F_VERSION_1, TYPE_CONSOLE, VIRTIO_DEVICE_STATE_VERSION,
};

/// VIRTIO_CONSOLE_F_SIZE: `cols` and `rows` of the configuration are valid.
pub const F_CONSOLE_SIZE: u64 = 1 << 0;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// At most this many bytes per transmit descriptor.
const MAX_CHUNK: u32 = 64 * 1024;

struct ConsoleHandler {
    out: Option<Box<dyn Write + Send>>,
    input: Option<File>,
    /// No receive buffer was available: wait for the driver to add some before reading more.
    paused: bool,
    buf: Vec<u8>,
}

impl ConsoleHandler {
    /// Moves what the input has into one receive chain. Returns whether a buffer was used.
    fn receive(&mut self, q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let Some(head) = q.pop_one()? else {
            self.paused = true;
            return Ok(false);
        };
        let mut descs = Vec::new();
        q.chain(head, &mut descs);
        descs.retain(|d| d.is_write_only());
        let room: usize = descs
            .iter()
            .map(|d| d.len() as usize)
            .sum::<usize>()
            .min(MAX_CHUNK as usize);
        let Some(input) = self.input.as_mut() else {
            q.unpop();
            return Ok(false);
        };
        self.buf.resize(room.max(1), 0);
        let n = if room == 0 {
            0
        } else {
            match input.read(&mut self.buf[..room]) {
                Ok(0) => {
                    debug!("virtio-console: end of input");
                    self.input = None;
                    q.unpop();
                    return Ok(false);
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    q.unpop();
                    return Ok(false);
                }
                Err(e) => {
                    warn!("virtio-console: input failed ({e}); closing it");
                    self.input = None;
                    q.unpop();
                    return Ok(false);
                }
            }
        };
        let mut done = 0;
        for d in descs {
            if done == n {
                break;
            }
            let k = (d.len() as usize).min(n - done);
            if mem
                .write_slice(&self.buf[done..done + k], d.addr())
                .is_err()
            {
                debug!("virtio-console: receive buffer outside guest memory");
                break;
            }
            done += k;
        }
        q.add_used(head, done as u32)?;
        Ok(true)
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-console",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Input and output: a pty, a file, a terminal or a socket.
                fcntl, poll, accept4, sendto, recvfrom,
            ]
        },
        // None: it reads and writes descriptors the control loop set up (a terminal already
        // in raw mode, a pty master, a file, or the socket relay's end); the terminal's size
        // is read by the control loop (TIOCGWINSZ on SIGWINCH), which updates `ConsoleSize`.
        ioctls: &[],
    };

impl QueueHandler for ConsoleHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if index == RX_QUEUE {
            // New receive buffers: read input again (they stay queued until there is some).
            self.paused = false;
            return Ok(0);
        }
        if index != TX_QUEUE {
            return Ok(0);
        }
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        let (out, buf) = (&mut self.out, &mut self.buf);
        process_chains(index, q, |_, chain| {
            for desc in chain {
                if desc.is_write_only() {
                    debug!("virtio-console: write-only descriptor on the transmit queue");
                    continue;
                }
                let len = desc.len().min(MAX_CHUNK) as usize;
                buf.resize(len, 0);
                if mem.read_slice(buf, desc.addr()).is_err() {
                    debug!("virtio-console: buffer outside guest memory");
                    continue;
                }
                if let Some(w) = out {
                    if let Err(e) = w.write_all(buf).and_then(|_| w.flush()) {
                        warn!("virtio-console: output failed ({e}); dropping further output");
                        *out = None;
                    }
                }
            }
            Some(0)
        })
    }

    fn extra_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(|f| f.as_raw_fd())
    }

    fn extra_wanted(&self) -> bool {
        !self.paused
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(RX_QUEUE) else {
            // The driver has no receive queue: input is never read.
            self.paused = true;
            return Ok(0);
        };
        Ok(if self.receive(q, mem)? {
            queue_bit(RX_QUEUE)
        } else {
            0
        })
    }
}

/// The console's size (columns and rows) as its configuration shows it. The VMM's control
/// loop sets it (terminal size at start, then on SIGWINCH); a change bumps the configuration
/// generation and raises the configuration interrupt of the running device.
pub struct ConsoleSize {
    /// `cols | rows << 16`.
    size: AtomicU32,
    signal: ConfigSignal,
}

impl ConsoleSize {
    pub fn new(cols: u16, rows: u16) -> Arc<Self> {
        Arc::new(ConsoleSize {
            size: AtomicU32::new(u32::from(cols) | u32::from(rows) << 16),
            signal: ConfigSignal::default(),
        })
    }

    /// (columns, rows).
    pub fn get(&self) -> (u16, u16) {
        let v = self.size.load(Ordering::Acquire);
        (v as u16, (v >> 16) as u16)
    }

    pub fn generation(&self) -> u32 {
        self.signal.generation()
    }

    /// Sets the size; if it changed, bumps the generation and interrupts the driver. Returns
    /// whether it changed.
    pub fn set(&self, cols: u16, rows: u16) -> bool {
        let v = u32::from(cols) | u32::from(rows) << 16;
        self.signal
            .change(|| self.size.swap(v, Ordering::AcqRel) != v)
    }

    /// Sets size and generation as a snapshot had them, without an interrupt.
    fn restore(&self, cols: u16, rows: u16, generation: u32) {
        self.signal.restore(generation, || {
            self.size
                .store(u32::from(cols) | u32::from(rows) << 16, Ordering::Release)
        });
    }
}

/// virtio-console's own state: the size its configuration shows and the configuration
/// generation (the transport saves the generation too, but leaves it to the device). Input
/// not yet read stays in the host endpoint, output already went to the sink: neither is
/// state. Requests are served synchronously, so a paused console has none in flight.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    pub version: u32,
    pub cols: u16,
    pub rows: u16,
    pub config_generation: u32,
}

pub struct Console {
    worker: DeviceWorker<ConsoleHandler>,
    size: Arc<ConsoleSize>,
    /// The configuration interrupt (a size change while paused is signalled on resume).
    config_irq: ConfigInterrupt,
}

impl Console {
    /// `out`: where the guest's output goes (`None` discards it); `input`: what it reads;
    /// `size`: the size the configuration reports (shared with whoever tracks the terminal).
    pub fn new(
        out: Option<Box<dyn Write + Send>>,
        input: Option<File>,
        size: Arc<ConsoleSize>,
    ) -> Self {
        Console {
            worker: DeviceWorker::new(
                "virtio-console",
                ConsoleHandler {
                    out,
                    input,
                    paused: false,
                    buf: Vec::new(),
                },
            ),
            size,
            config_irq: ConfigInterrupt::default(),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.config_irq.reset(&self.size.signal);
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_CONSOLE_SIZE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr
        let (cols, rows) = self.size.get();
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn config_generation(&self) -> u32 {
        self.size.generation()
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let interrupt = ctx.interrupt.clone();
        self.worker.activate(ctx)?;
        self.config_irq.activate(&self.size.signal, interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.config_irq.reset(&self.size.signal);
        if let Some(h) = self.worker.reset() {
            h.paused = false;
        }
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.worker.queue_positions()
    }
    fn pause(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.config_irq.pause(&self.size.signal);
        self.worker.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.worker.resume()?;
        self.config_irq.resume(&self.size.signal);
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        let (cols, rows) = self.size.get();
        VirtioDeviceState::Console(ConsoleState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            cols,
            rows,
            config_generation: self.size.generation(),
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-console";
        let VirtioDeviceState::Console(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        self.size.restore(s.cols, s.rows, s.config_generation);
        Ok(())
    }
}
