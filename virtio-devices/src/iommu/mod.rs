//! virtio-iommu (virtio 1.2, 5.13; device type 23), the original's `__iommu`: the driver
//! attaches the devices behind it (endpoints, by PCI requester id) to domains and maps pages of
//! each domain's I/O virtual address space to guest memory; the devices then reach guest
//! memory only through those mappings ([`Dma`], used by the transport for the rings and by
//! `VirtQueue` for each descriptor).
//!
//! Features: INPUT_RANGE, DOMAIN_RANGE, MAP_UNMAP, PROBE (one reserved region: the MSI
//! window, which the IOMMU does not translate) and BYPASS_CONFIG (the `bypass` field: 1 after
//! a reset, so firmware and a guest without the driver keep working; the driver may write 0).
//! A driver that does not accept BYPASS_CONFIG gets no bypass, as the specification asks.
//! An access a device behind it makes that does not translate is reported on the event queue
//! (a `virtio_iommu_fault`: reason, read or write, endpoint, address), as Linux logs them.

mod mapping;
#[cfg(test)]
mod tests;

pub use mapping::{Dma, Domain, Fault, IommuMapping, Mapping, Spaces};

use std::os::fd::RawFd;
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use log::{debug, info};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::device_worker::{worker_pausing, DeviceWorker};
use crate::vring::VirtQueue;
use crate::worker::{process_chains, queue_bit, QueueHandler};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, VirtioDevice, VirtioDeviceState,
    F_VERSION_1, VIRTIO_DEVICE_STATE_VERSION,
};
use mapping::{Status, PAGE_SIZE};

pub const TYPE_IOMMU: u16 = 23;
const QUEUE_SIZE: u16 = 256;
const REQUEST_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;

pub const F_INPUT_RANGE: u64 = 1 << 0;
pub const F_DOMAIN_RANGE: u64 = 1 << 1;
pub const F_MAP_UNMAP: u64 = 1 << 2;
pub const F_PROBE: u64 = 1 << 4;
pub const F_BYPASS_CONFIG: u64 = 1 << 6;

const T_ATTACH: u8 = 1;
const T_DETACH: u8 = 2;
const T_MAP: u8 = 3;
const T_UNMAP: u8 = 4;
const T_PROBE: u8 = 5;
const ATTACH_F_BYPASS: u32 = 1;

/// Bytes of the probe buffer the driver gives (`probe_size`).
const PROBE_SIZE: u32 = 512;
const PROBE_T_RESV_MEM: u16 = 1;
const RESV_MEM_T_MSI: u8 = 1;
/// The x86 MSI window, reported as a reserved region of every endpoint.
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// Offset of `bypass` in the configuration.
const BYPASS_OFFSET: u64 = 36;
/// The largest request the device reads (PROBE: head, endpoint, 64 reserved bytes).
const MAX_REQUEST: usize = 72;

/// virtio-iommu's own state: its address spaces (the transport keeps its queues).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuState {
    pub version: u32,
    pub spaces: Spaces,
    /// The `bypass` field as the driver left it.
    pub bypass_field: u8,
}

struct IommuHandler {
    mapping: Arc<IommuMapping>,
    /// Last address of the input range (the first is 0).
    input_end: u64,
}

impl QueueHandler for IommuHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        if index == EVENT_QUEUE {
            // New event buffers: the faults waiting for them.
            return self.report_faults(queues, mem);
        }
        if index != REQUEST_QUEUE {
            return Ok(0);
        }
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        process_chains(index, q, |_, chain| Some(self.serve(mem, chain)))
    }

    /// Faults recorded by the devices behind the IOMMU (any thread) wake the worker here.
    fn extra_fd(&self) -> Option<RawFd> {
        self.mapping.fault_fd()
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        self.mapping.clear_fault_signal();
        self.report_faults(queues, mem)
    }
}

impl IommuHandler {
    /// Puts each waiting fault in an event buffer while there are buffers (the rest wait for
    /// the driver's next ones).
    fn report_faults(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(EVENT_QUEUE) else {
            return Ok(0);
        };
        let mut used = 0;
        let mut descs = Vec::new();
        while let Some(f) = self.mapping.next_fault() {
            let Some(head) = q.pop_one()? else {
                break;
            };
            q.chain(head, &mut descs);
            let out: Writable = descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr().0, d.len()))
                .collect();
            let n = if write_out(mem, &out, &f.bytes()) {
                24
            } else {
                debug!("virtio-iommu: event buffer too small or outside memory");
                0
            };
            q.add_used(head, n)?;
            self.mapping.fault_reported();
            used = queue_bit(EVENT_QUEUE);
        }
        Ok(used)
    }
}

/// The device-writable buffers of a request, `(address, length)`: where the answer goes.
type Writable = Vec<(u64, u32)>;

/// A request's bytes (what the driver gave, at most `MAX_REQUEST`) and where the answer goes.
fn split_chain(mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Option<(Vec<u8>, Writable)> {
    let mut req = Vec::new();
    let mut out = Vec::new();
    for d in chain {
        if d.is_write_only() {
            out.push((d.addr().0, d.len()));
        } else if out.is_empty() {
            let n = (d.len() as usize).min(MAX_REQUEST - req.len());
            let at = req.len();
            req.resize(at + n, 0);
            mem.read_slice(&mut req[at..], d.addr()).ok()?;
        } else {
            // A readable descriptor after a writable one.
            return None;
        }
    }
    Some((req, out))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Writes `data` across the writable buffers `out` from their start; false when it does not
/// fit or a buffer is outside guest memory.
fn write_out(mem: &GuestMemoryMmap, out: &[(u64, u32)], mut data: &[u8]) -> bool {
    for &(addr, len) in out {
        if data.is_empty() {
            break;
        }
        let n = data.len().min(len as usize);
        if mem.write_slice(&data[..n], GuestAddress(addr)).is_err() {
            return false;
        }
        data = &data[n..];
    }
    data.is_empty()
}

impl IommuHandler {
    /// Serves one request; returns the bytes written (0 when the answer could not be written).
    fn serve(&mut self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> u32 {
        let Some((req, out)) = split_chain(mem, chain) else {
            debug!("virtio-iommu: malformed request chain");
            return 0;
        };
        let room: u64 = out.iter().map(|&(_, l)| u64::from(l)).sum();
        let ty = req.first().copied().unwrap_or(0);
        if ty == T_PROBE {
            let mut answer = vec![0u8; PROBE_SIZE as usize + 4];
            let status = match u32_at(&req, 4) {
                Some(ep) if !self.mapping.manages(ep) => Status::Noent,
                Some(_) if room < answer.len() as u64 => Status::Inval,
                Some(_) => {
                    // One RESV_MEM property: the MSI window.
                    answer[0..2].copy_from_slice(&PROBE_T_RESV_MEM.to_le_bytes());
                    answer[2..4].copy_from_slice(&20u16.to_le_bytes());
                    answer[4] = RESV_MEM_T_MSI;
                    answer[8..16].copy_from_slice(&MSI_WINDOW.0.to_le_bytes());
                    answer[16..24].copy_from_slice(&MSI_WINDOW.1.to_le_bytes());
                    Status::Ok
                }
                None => Status::Inval,
            };
            if room >= answer.len() as u64 {
                answer[PROBE_SIZE as usize] = status as u8;
                return if write_out(mem, &out, &answer) {
                    answer.len() as u32
                } else {
                    0
                };
            }
            return self.tail(mem, &out, status);
        }
        let status = self.request(ty, &req);
        self.tail(mem, &out, status)
    }

    fn tail(&self, mem: &GuestMemoryMmap, out: &[(u64, u32)], status: Status) -> u32 {
        if write_out(mem, out, &[status as u8, 0, 0, 0]) {
            4
        } else {
            0
        }
    }

    fn request(&mut self, ty: u8, req: &[u8]) -> Status {
        let m = &self.mapping;
        let field = |at| u32_at(req, at);
        let wide = |at| u64_at(req, at);
        let status = match ty {
            T_ATTACH | T_DETACH => match (field(4), field(8), field(12)) {
                (Some(domain), Some(ep), Some(flags)) => {
                    // DETACH's third word is reserved.
                    if ty == T_ATTACH && flags & !ATTACH_F_BYPASS != 0 {
                        Status::Inval
                    } else if ty == T_ATTACH {
                        m.attach(domain, ep, flags & ATTACH_F_BYPASS != 0)
                    } else {
                        m.detach(domain, ep)
                    }
                }
                _ => Status::Inval,
            },
            T_MAP => match (field(4), wide(8), wide(16), wide(24), field(32)) {
                (Some(domain), Some(start), Some(end), Some(gpa), Some(flags)) => {
                    match self.check_range(start, end) {
                        Status::Ok if !gpa.is_multiple_of(PAGE_SIZE) => Status::Range,
                        Status::Ok => m.map(domain, start, end, gpa, flags),
                        s => s,
                    }
                }
                _ => Status::Inval,
            },
            T_UNMAP => match (field(4), wide(8), wide(16)) {
                // An UNMAP reaching past the input range unmaps what it covers.
                (Some(domain), Some(start), Some(end)) => {
                    match self.check_range(start, end.min(self.input_end)) {
                        Status::Ok => m.unmap(domain, start, end.min(self.input_end)),
                        s => s,
                    }
                }
                _ => Status::Inval,
            },
            _ => Status::Unsupp,
        };
        debug!("virtio-iommu: request {ty}: {status:?}");
        status
    }

    /// A MAP/UNMAP range: page-aligned (else RANGE, as the specification asks), not empty,
    /// inside the input range.
    fn check_range(&self, start: u64, end: u64) -> Status {
        let aligned =
            start.is_multiple_of(PAGE_SIZE) && end.wrapping_add(1).is_multiple_of(PAGE_SIZE);
        if end < start {
            Status::Inval
        } else if !aligned || end > self.input_end {
            Status::Range
        } else {
            Status::Ok
        }
    }
}

/// The virtio-iommu device.
pub struct Iommu {
    worker: DeviceWorker<IommuHandler>,
    mapping: Arc<IommuMapping>,
    input_end: u64,
    /// The `bypass` field.
    bypass_field: u8,
}

impl Iommu {
    /// An IOMMU translating `address_width` bits of I/O virtual addresses (the original's
    /// `iommu_address_width`, 64 at most) for the devices put behind `mapping`.
    pub fn new(mapping: Arc<IommuMapping>, address_width: u8) -> Self {
        let input_end = match address_width {
            64.. => u64::MAX,
            w => (1u64 << w) - 1,
        };
        mapping.reset();
        Iommu {
            worker: DeviceWorker::new(
                "virtio-iommu",
                IommuHandler {
                    mapping: mapping.clone(),
                    input_end,
                },
            ),
            mapping,
            input_end,
            bypass_field: 1,
        }
    }

    fn config(&self) -> [u8; 40] {
        let mut c = [0u8; 40];
        // Every power of two from 4 KiB.
        c[0..8].copy_from_slice(&(!(PAGE_SIZE - 1)).to_le_bytes());
        c[16..24].copy_from_slice(&self.input_end.to_le_bytes());
        c[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        c[32..36].copy_from_slice(&PROBE_SIZE.to_le_bytes());
        c[36] = self.bypass_field;
        c
    }
}

impl VirtioDevice for Iommu {
    fn device_type(&self) -> u16 {
        TYPE_IOMMU
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_INPUT_RANGE | F_DOMAIN_RANGE | F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `bypass` is the driver's.
        if offset == BYPASS_OFFSET && !data.is_empty() {
            self.bypass_field = u8::from(data[0] != 0);
            info!("virtio-iommu: bypass {}", self.bypass_field);
            self.mapping.set_bypass(self.bypass_field == 1);
        } else {
            debug!("virtio-iommu: driver write to read-only config byte {offset:#x}");
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.acked_features & F_BYPASS_CONFIG == 0 {
            // A driver that does not know the field: endpoints it did not attach are shut out.
            self.mapping.set_bypass(false);
        }
        self.worker.activate(ctx)
    }
    fn reset(&mut self) {
        self.worker.reset();
        self.bypass_field = 1;
        self.mapping.reset();
    }
    worker_pausing!(worker);
    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Iommu(IommuState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            spaces: self.mapping.state(),
            bypass_field: self.bypass_field,
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        let VirtioDeviceState::Iommu(s) = state else {
            return Err(state.wrong("virtio-iommu"));
        };
        pci::StateError::check_version("virtio-iommu", s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        self.mapping
            .restore(&s.spaces)
            .map_err(|e| pci::StateError::invalid("virtio-iommu", e))?;
        self.bypass_field = u8::from(s.bypass_field != 0);
        Ok(())
    }
}
