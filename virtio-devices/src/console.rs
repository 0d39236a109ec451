//! virtio-console (single port, no multiport): the transmit queue goes to a host sink (the
//! `--console` endpoint). The receive queue is accepted but no host input is fed to it yet.

use std::io::Write;

use log::{debug, warn};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::worker::{process_chains, QueueHandler, WorkerHandle};
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
    buf: Vec<u8>,
}

impl QueueHandler for ConsoleHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<Queue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if index != TX_QUEUE {
            // Receive buffers stay queued until there is input.
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
}

pub struct Console {
    handler: Option<ConsoleHandler>,
    worker: Option<WorkerHandle<ConsoleHandler>>,
}

impl Console {
    /// `out`: where the guest's output goes (`None` discards it).
    pub fn new(out: Option<Box<dyn Write + Send>>) -> Self {
        Console {
            handler: Some(ConsoleHandler {
                out,
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
        let _ = RX_QUEUE;
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
        }
    }
}
