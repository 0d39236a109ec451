//! virtio-console (single port, no multiport): the transmit queue goes to a host sink and
//! host input (the `--console` endpoint's terminal, pty or socket) fills the receive queue.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use log::{debug, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::worker::{process_chains, queue_bit, QueueHandler, WorkerHandle};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, F_VERSION_1, TYPE_CONSOLE,
};

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
    fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let chain = match q.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Err(format!("avail ring: {e}")),
        };
        let Some(chain) = chain else {
            self.paused = true;
            return Ok(false);
        };
        let head = chain.head_index();
        let descs: Vec<_> = chain.filter(|d| d.is_write_only()).collect();
        let room: usize = descs
            .iter()
            .map(|d| d.len() as usize)
            .sum::<usize>()
            .min(MAX_CHUNK as usize);
        let Some(input) = self.input.as_mut() else {
            q.go_to_previous_position();
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
                    q.go_to_previous_position();
                    return Ok(false);
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    q.go_to_previous_position();
                    return Ok(false);
                }
                Err(e) => {
                    warn!("virtio-console: input failed ({e}); closing it");
                    self.input = None;
                    q.go_to_previous_position();
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
        q.add_used(mem, head, done as u32)
            .map_err(|e| format!("used ring: {e}"))?;
        Ok(true)
    }
}

impl QueueHandler for ConsoleHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<Queue>],
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
        process_chains(index, q, mem, |chain| {
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
        queues: &mut [Option<Queue>],
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

pub struct Console {
    handler: Option<ConsoleHandler>,
    worker: Option<WorkerHandle<ConsoleHandler>>,
}

impl Console {
    /// `out`: where the guest's output goes (`None` discards it); `input`: what it reads.
    pub fn new(out: Option<Box<dyn Write + Send>>, input: Option<File>) -> Self {
        Console {
            handler: Some(ConsoleHandler {
                out,
                input,
                paused: false,
                buf: Vec::new(),
            }),
            worker: None,
        }
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
        F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&80u16.to_le_bytes());
        c[2..4].copy_from_slice(&25u16.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let h = self
            .handler
            .take()
            .ok_or_else(|| ActivateError::Other("virtio-console: worker lost".into()))?;
        self.worker = Some(WorkerHandle::spawn("virtio-console", h, ctx)?);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.handler = w.stop();
            if let Some(h) = &mut self.handler {
                h.paused = false;
            }
        }
    }
}
