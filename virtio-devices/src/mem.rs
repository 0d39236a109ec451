//! virtio-mem (virtio 1.2, 5.15): a region of guest-physical memory whose blocks the guest
//! plugs and unplugs on request. The host sets `requested_size` (`vm.resize`'s `desired_ram`);
//! the driver plugs blocks up to it, or unplugs down to it, and tells the device on its one
//! queue. The region is guest RAM the VMM mapped whole from the start: plugging a block only
//! marks it (its pages fault in when the guest touches them); unplugging gives its host memory
//! back (`discard.rs`), so it reads as zero afterwards.
//!
//! The guest is not trusted: a request outside the region or not on block boundaries gets
//! ERROR, a chain without room for the response is not executed, and nothing outside the
//! region is ever released.

use std::sync::{Arc, Mutex, MutexGuard};

use guest_memory::GuestMemoryMmap;
use log::debug;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::config_signal::{ConfigInterrupt, ConfigSignal};
use crate::device_worker::DeviceWorker;
use crate::discard::release_guest_range;
use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    F_VERSION_1, VIRTIO_DEVICE_STATE_VERSION,
};

/// The virtio-mem device type.
pub const TYPE_MEM: u16 = 24;
/// VIRTIO_MEM_F_ACPI_PXM: `node_id` is an ACPI proximity domain (offered with `--numa`).
pub const F_MEM_ACPI_PXM: u64 = 1 << 0;
/// VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: the driver must not touch unplugged memory.
pub const F_MEM_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
/// The block size when the VMM names none (the original's and Linux's usual one).
pub const VIRTIO_MEM_DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// The smallest block size accepted: one 4 KiB page.
const MIN_BLOCK_SIZE: u64 = 4096;

const QUEUE_SIZE: u16 = 128;
/// Bytes of the device configuration.
const CONFIG_SIZE: usize = 56;

/// Request types (`virtio_mem_req.type`).
pub(crate) const REQ_PLUG: u16 = 0;
pub(crate) const REQ_UNPLUG: u16 = 1;
pub(crate) const REQ_UNPLUG_ALL: u16 = 2;
pub(crate) const REQ_STATE: u16 = 3;
/// Response types (`virtio_mem_resp.type`).
pub(crate) const RESP_ACK: u16 = 0;
pub(crate) const RESP_NACK: u16 = 1;
pub(crate) const RESP_ERROR: u16 = 3;
/// Block states (`virtio_mem_resp_state.state`).
pub(crate) const STATE_PLUGGED: u16 = 0;
pub(crate) const STATE_UNPLUGGED: u16 = 1;
pub(crate) const STATE_MIXED: u16 = 2;
/// le16 type, le16 padding[3], le64 addr, le16 nb_blocks, le16 padding[3].
pub(crate) const REQ_SIZE: usize = 24;
/// le16 type, le16 padding[3], le16 state.
pub(crate) const RESP_SIZE: usize = 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioMemError {
    #[error("virtio-mem block size {0:#x} is not a power of two of at least 4 KiB")]
    BlockSize(u64),
    #[error(
        "virtio-mem region size {size:#x} is not a non-zero multiple of the block size {block:#x}"
    )]
    RegionSize { size: u64, block: u64 },
    #[error("virtio-mem region address {addr:#x} is not aligned to the block size {block:#x}")]
    Misaligned { addr: u64, block: u64 },
    #[error("virtio-mem region {addr:#x} + {size:#x} runs past the end of the address space")]
    Overflow { addr: u64, size: u64 },
    #[error(
        "virtio-mem requested size {requested:#x} is not a multiple of the block size {block:#x}"
    )]
    RequestedUnaligned { requested: u64, block: u64 },
    #[error("virtio-mem requested size {requested:#x} is larger than the region ({region:#x})")]
    RequestedTooLarge { requested: u64, region: u64 },
}

/// What the device offers, from `--memory`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioMemOptions {
    /// Offer VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (off: the driver may still read unplugged
    /// memory, which reads as zero).
    pub unplugged_inaccessible: bool,
    /// `node_id` in the configuration: with `acpi_pxm`, the ACPI proximity domain (the guest
    /// NUMA node, `--numa`) the device's memory belongs to.
    pub node_id: u16,
    /// Offer VIRTIO_MEM_F_ACPI_PXM: `node_id` is a proximity domain of the SRAT.
    pub acpi_pxm: bool,
}

impl VirtioMemOptions {
    pub fn features(&self) -> u64 {
        let mut f = F_VERSION_1;
        if self.unplugged_inaccessible {
            f |= F_MEM_UNPLUGGED_INACCESSIBLE;
        }
        if self.acpi_pxm {
            f |= F_MEM_ACPI_PXM;
        }
        f
    }
}

/// Where the region lies and how it is cut into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    addr: u64,
    size: u64,
    block: u64,
}

impl Geometry {
    fn blocks(&self) -> u64 {
        self.size / self.block
    }

    fn words(&self) -> usize {
        self.blocks().div_ceil(64) as usize
    }

    /// The first block and the count of `[addr, addr + nb * block)` when it is a non-empty,
    /// block-aligned range inside the region (none of it past the end, no overflow).
    fn range(&self, addr: u64, nb: u16) -> Option<(u64, u64)> {
        let nb = u64::from(nb);
        if nb == 0 || !addr.is_multiple_of(self.block) {
            return None;
        }
        let off = addr.checked_sub(self.addr)?;
        let len = nb.checked_mul(self.block)?;
        if off >= self.size || len > self.size - off {
            return None;
        }
        Some((off / self.block, nb))
    }
}

/// The plug state of the region: a bit per block.
struct Blocks {
    requested: u64,
    bits: Vec<u64>,
    /// Blocks plugged (bits set).
    plugged: u64,
}

impl Blocks {
    fn get(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn set(&mut self, first: u64, n: u64, on: bool) {
        for b in first..first + n {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if (self.bits[w] & m != 0) != on {
                self.bits[w] ^= m;
                if on {
                    self.plugged += 1;
                } else {
                    self.plugged -= 1;
                }
            }
        }
    }

    /// How many of `[first, first + n)` are plugged.
    fn count(&self, first: u64, n: u64) -> u64 {
        (first..first + n).filter(|&b| self.get(b)).count() as u64
    }

    /// Runs of plugged blocks: (first block, blocks).
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &bits) in self.bits.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            for i in 0..64 {
                if bits & (1 << i) == 0 {
                    continue;
                }
                let b = w as u64 * 64 + i;
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == b => *n += 1,
                    _ => runs.push((b, 1)),
                }
            }
        }
        runs
    }
}

/// The VMM's handle on the device: the size it asks the guest to plug (`desired_ram` beyond
/// boot RAM), and what the guest has plugged. A new request bumps the configuration generation
/// and raises the configuration interrupt of the running device (after a pause, on resume).
pub struct VirtioMemControl {
    geometry: Geometry,
    blocks: Mutex<Blocks>,
    signal: ConfigSignal,
}

impl VirtioMemControl {
    fn blocks(&self) -> MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the guest to have `bytes` of the region plugged: a multiple of the block size, at
    /// most the region's size. If it changed, bumps the generation and interrupts the driver
    /// (the device's, when it runs and is not paused).
    pub fn set_requested(&self, bytes: u64) -> Result<(), VirtioMemError> {
        let g = self.geometry;
        if !bytes.is_multiple_of(g.block) {
            return Err(VirtioMemError::RequestedUnaligned {
                requested: bytes,
                block: g.block,
            });
        }
        if bytes > g.size {
            return Err(VirtioMemError::RequestedTooLarge {
                requested: bytes,
                region: g.size,
            });
        }
        self.signal.change(|| {
            let mut b = self.blocks();
            let changed = b.requested != bytes;
            b.requested = bytes;
            changed
        });
        Ok(())
    }

    /// The size the host asks the guest to plug, in bytes.
    pub fn requested(&self) -> u64 {
        self.blocks().requested
    }

    /// The size the guest has plugged now, in bytes.
    pub fn plugged(&self) -> u64 {
        self.blocks().plugged * self.geometry.block
    }

    /// The plugged parts of the region: (guest-physical address, bytes), in order. What a
    /// snapshot of the region needs to save (the rest reads as zero).
    pub fn plugged_ranges(&self) -> Vec<(u64, u64)> {
        let g = self.geometry;
        self.blocks()
            .runs()
            .into_iter()
            .map(|(b, n)| (g.addr + b * g.block, n * g.block))
            .collect()
    }

    /// The region: (guest-physical address, bytes).
    pub fn region(&self) -> (u64, u64) {
        (self.geometry.addr, self.geometry.size)
    }

    pub fn block_size(&self) -> u64 {
        self.geometry.block
    }

    pub fn generation(&self) -> u32 {
        self.signal.generation()
    }
}

/// A request as the driver sent it.
#[derive(Clone, Copy, Debug)]
struct Request {
    kind: u16,
    addr: u64,
    nb_blocks: u16,
}

impl Request {
    fn parse(b: &[u8; REQ_SIZE]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        Request {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes(a),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        }
    }
}

fn response(kind: u16, state: u16) -> [u8; RESP_SIZE] {
    let mut r = [0u8; RESP_SIZE];
    r[0..2].copy_from_slice(&kind.to_le_bytes());
    r[8..10].copy_from_slice(&state.to_le_bytes());
    r
}

struct MemHandler {
    control: Arc<VirtioMemControl>,
}

impl MemHandler {
    /// Serves one chain; returns the bytes written (0: no response could be written, and the
    /// request was not executed).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> u32 {
        // The response must have somewhere to go before anything is done: a request executed
        // without the driver learning of it would leave the two disagreeing.
        let Some(out) = writable_prefix(mem, chain, RESP_SIZE) else {
            debug!(
                "virtio-mem: no room for a response ({} descriptors)",
                chain.len()
            );
            return 0;
        };
        let resp = match read_request(mem, chain) {
            Some(req) => self.execute(mem, req),
            None => {
                debug!("virtio-mem: short or unreadable request");
                response(RESP_ERROR, 0)
            }
        };
        let mut done = 0;
        for (addr, n) in out {
            if mem.write_slice(&resp[done..done + n], addr).is_err() {
                // Checked above; guest memory does not shrink under a running device.
                debug!("virtio-mem: response buffer at {:#x} unwritable", addr.0);
                return 0;
            }
            done += n;
        }
        RESP_SIZE as u32
    }

    fn execute(&mut self, mem: &GuestMemoryMmap, req: Request) -> [u8; RESP_SIZE] {
        let g = self.control.geometry;
        if req.kind == REQ_UNPLUG_ALL {
            // The whole region, plugged or not: a driver that wrote unplugged memory (it must
            // not) gets that memory taken back too.
            release_guest_range(mem, g.addr, g.size);
            let mut b = self.control.blocks();
            b.bits.fill(0);
            b.plugged = 0;
            return response(RESP_ACK, 0);
        }
        if !matches!(req.kind, REQ_PLUG | REQ_UNPLUG | REQ_STATE) {
            debug!("virtio-mem: unknown request type {}", req.kind);
            return response(RESP_ERROR, 0);
        }
        let Some((first, n)) = g.range(req.addr, req.nb_blocks) else {
            debug!(
                "virtio-mem: request {} for {} blocks at {:#x}: not a range of the region",
                req.kind, req.nb_blocks, req.addr
            );
            return response(RESP_ERROR, 0);
        };
        match req.kind {
            REQ_PLUG => {
                let mut b = self.control.blocks();
                if b.count(first, n) != 0 {
                    debug!(
                        "virtio-mem: plug of {:#x}: blocks already plugged",
                        req.addr
                    );
                    return response(RESP_ERROR, 0);
                }
                let after = (b.plugged + n).checked_mul(g.block);
                if after.is_none_or(|a| a > b.requested) {
                    return response(RESP_NACK, 0);
                }
                b.set(first, n, true);
                response(RESP_ACK, 0)
            }
            REQ_UNPLUG => {
                if self.control.blocks().count(first, n) != n {
                    debug!("virtio-mem: unplug of {:#x}: blocks not plugged", req.addr);
                    return response(RESP_ERROR, 0);
                }
                // Only this thread changes the blocks: they are still plugged here. The memory
                // goes first, so a block marked unplugged never still holds the guest's data.
                release_guest_range(mem, req.addr, n * g.block);
                self.control.blocks().set(first, n, false);
                response(RESP_ACK, 0)
            }
            _ => {
                let plugged = self.control.blocks().count(first, n);
                let state = if plugged == n {
                    STATE_PLUGGED
                } else if plugged == 0 {
                    STATE_UNPLUGGED
                } else {
                    STATE_MIXED
                };
                response(RESP_ACK, state)
            }
        }
    }
}

/// The request: the first `REQ_SIZE` bytes of the chain's device-readable descriptors, if they
/// have that many and they lie in guest memory.
fn read_request(mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Option<Request> {
    let mut buf = [0u8; REQ_SIZE];
    let mut got = 0;
    for d in chain.iter().filter(|d| !d.is_write_only()) {
        if got == REQ_SIZE {
            break;
        }
        let n = (d.len() as usize).min(REQ_SIZE - got);
        mem.read_slice(&mut buf[got..got + n], d.addr()).ok()?;
        got += n;
    }
    (got == REQ_SIZE).then(|| Request::parse(&buf))
}

/// Where the first `len` bytes of the chain's device-writable descriptors lie (address,
/// bytes), if the chain has that many and they lie in guest memory.
fn writable_prefix(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    len: usize,
) -> Option<Vec<(GuestAddress, usize)>> {
    let mut out = Vec::new();
    let mut got = 0;
    for d in chain.iter().filter(|d| d.is_write_only()) {
        if got == len {
            break;
        }
        let n = (d.len() as usize).min(len - got);
        if n == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), n) {
            return None;
        }
        out.push((d.addr(), n));
        got += n;
    }
    (got == len).then_some(out)
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-mem",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Unplugged blocks: discarded or punched out of a shared file.
                fallocate,
            ]
        },
        ioctls: &[],
    };

impl QueueHandler for MemHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        process_chains(index, q, |_, chain| Some(self.serve(mem, chain)))
    }
}

/// virtio-mem's own state: the region's geometry (checked on restore), the requested size, the
/// plugged blocks (bit `i % 64` of word `i / 64` for block `i`) and the configuration
/// generation. Unplugged blocks read as zero in the saved memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMemState {
    pub version: u32,
    pub addr: u64,
    pub region_size: u64,
    pub block_size: u64,
    pub requested: u64,
    pub plugged: Vec<u64>,
    pub config_generation: u32,
}

pub struct VirtioMem {
    options: VirtioMemOptions,
    control: Arc<VirtioMemControl>,
    worker: DeviceWorker<MemHandler>,
    /// The configuration interrupt (a request changed while paused is signalled on resume).
    config_irq: ConfigInterrupt,
}

impl VirtioMem {
    /// A device for the region `[addr, addr + region_size)` of guest-physical memory, in
    /// blocks of `block_size` bytes (a power of two of at least 4 KiB;
    /// `VIRTIO_MEM_DEFAULT_BLOCK_SIZE` usually), with nothing plugged or requested.
    pub fn new(
        addr: u64,
        region_size: u64,
        block_size: u64,
        options: VirtioMemOptions,
    ) -> Result<Self, VirtioMemError> {
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(VirtioMemError::BlockSize(block_size));
        }
        if region_size == 0 || !region_size.is_multiple_of(block_size) {
            return Err(VirtioMemError::RegionSize {
                size: region_size,
                block: block_size,
            });
        }
        if !addr.is_multiple_of(block_size) {
            return Err(VirtioMemError::Misaligned {
                addr,
                block: block_size,
            });
        }
        if addr.checked_add(region_size).is_none() {
            return Err(VirtioMemError::Overflow {
                addr,
                size: region_size,
            });
        }
        let geometry = Geometry {
            addr,
            size: region_size,
            block: block_size,
        };
        let control = Arc::new(VirtioMemControl {
            geometry,
            blocks: Mutex::new(Blocks {
                requested: 0,
                bits: vec![0; geometry.words()],
                plugged: 0,
            }),
            signal: ConfigSignal::default(),
        });
        Ok(VirtioMem {
            options,
            control,
            worker: DeviceWorker::fresh("virtio-mem"),
            config_irq: ConfigInterrupt::default(),
        })
    }

    /// The VMM's handle: set the requested size, read what is plugged.
    pub fn control(&self) -> Arc<VirtioMemControl> {
        self.control.clone()
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let g = self.control.geometry;
        let (requested, plugged) = {
            let b = self.control.blocks();
            (b.requested, b.plugged * g.block)
        };
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&g.block.to_le_bytes());
        c[8..10].copy_from_slice(&self.options.node_id.to_le_bytes());
        c[16..24].copy_from_slice(&g.addr.to_le_bytes());
        c[24..32].copy_from_slice(&g.size.to_le_bytes());
        // usable_region_size: the whole region is usable at all times.
        c[32..40].copy_from_slice(&g.size.to_le_bytes());
        c[40..48].copy_from_slice(&plugged.to_le_bytes());
        c[48..56].copy_from_slice(&requested.to_le_bytes());
        c
    }
}

impl Drop for VirtioMem {
    fn drop(&mut self) {
        self.config_irq.reset(&self.control.signal);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u16 {
        TYPE_MEM
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        self.options.features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio-mem: driver write of {} bytes to read-only config at {offset:#x}",
            data.len()
        );
    }
    fn config_generation(&self) -> u32 {
        self.control.generation()
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let handler = MemHandler {
            control: self.control.clone(),
        };
        let interrupt = ctx.interrupt.clone();
        self.worker.activate_with(handler, ctx)?;
        self.config_irq.activate(&self.control.signal, interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.config_irq.reset(&self.control.signal);
        self.worker.reset();
        // The blocks keep their state across a device reset (5.15.5.1): a new driver sees
        // plugged_size and unplugs all before it plugs anew.
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        self.worker.queue_positions()
    }
    fn pause(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.config_irq.pause(&self.control.signal);
        self.worker.pause()
    }
    fn resume(&mut self) -> Result<(), String> {
        if !self.worker.is_active() {
            return Ok(());
        }
        self.worker.resume()?;
        self.config_irq.resume(&self.control.signal);
        Ok(())
    }
    fn device_state(&self) -> VirtioDeviceState {
        let g = self.control.geometry;
        let b = self.control.blocks();
        VirtioDeviceState::Mem(VirtioMemState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            addr: g.addr,
            region_size: g.size,
            block_size: g.block,
            requested: b.requested,
            plugged: b.bits.clone(),
            config_generation: self.control.generation(),
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-mem";
        let VirtioDeviceState::Mem(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        let g = self.control.geometry;
        let saved = Geometry {
            addr: s.addr,
            size: s.region_size,
            block: s.block_size,
        };
        if saved != g {
            return Err(pci::StateError::invalid(
                WHAT,
                format!(
                    "a region of {:#x} bytes at {:#x} in blocks of {:#x}; this one has {:#x} at \
                     {:#x} in blocks of {:#x}",
                    s.region_size, s.addr, s.block_size, g.size, g.addr, g.block
                ),
            ));
        }
        if !s.requested.is_multiple_of(g.block) || s.requested > g.size {
            return Err(pci::StateError::invalid(
                WHAT,
                format!("requested size {:#x} does not fit the region", s.requested),
            ));
        }
        if s.plugged.len() != g.words() {
            return Err(pci::StateError::invalid(
                WHAT,
                format!("{} bitmap words for {} blocks", s.plugged.len(), g.blocks()),
            ));
        }
        let tail = g.blocks() % 64;
        if tail != 0 && s.plugged[g.words() - 1] >> tail != 0 {
            return Err(pci::StateError::invalid(
                WHAT,
                "blocks plugged past the end of the region",
            ));
        }
        let plugged = s.plugged.iter().map(|w| u64::from(w.count_ones())).sum();
        self.control.signal.restore(s.config_generation, || {
            *self.control.blocks() = Blocks {
                requested: s.requested,
                bits: s.plugged.clone(),
                plugged,
            };
        });
        Ok(())
    }
}
