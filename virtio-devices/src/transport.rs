//! The virtio-pci (modern, virtio 1.x) transport: one 64 KiB memory BAR holding the common,
//! ISR, device and notify structures and the MSI-X table and PBA, described by vendor
//! capabilities (plus the pci-cfg access window). Queue notifications arrive on ioeventfds.
//! Saving and restoring the transport ([`VirtioPciState`]) is in `transport/state.rs`.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use log::{debug, info, warn};
use pci::{BarKind, MsixCap, MsixConfig, PciConfiguration, PciDevice, PciIds, VmInterface};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

mod state;

pub use state::{VirtioPciState, VirtqueueState, VIRTIO_PCI_STATE_VERSION};

use crate::{
    ActivateContext, ActivateError, DeviceStatus, Dma, VirtioDevice, VirtioInterrupt,
    F_ACCESS_PLATFORM, F_RING_EVENT_IDX, F_VERSION_1, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, TYPE_BLOCK, TYPE_CONSOLE, TYPE_NET,
};

pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x1_0000;
/// BAR 0 is a 64-bit memory BAR (but a disk present at boot gets a 32-bit one: see
/// `vmm::pci_setup`), not prefetchable: reading the ISR status clears it, and the MSI-X table
/// and PBA share the BAR, so reads have side effects.
pub const VIRTIO_PCI_BAR_KIND: BarKind = BarKind::Mem64;
const COMMON_OFF: u64 = 0x0;
const COMMON_LEN: u64 = 0x38;
const ISR_OFF: u64 = 0x1000;
const ISR_LEN: u64 = 4;
const DEVICE_OFF: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFF: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFF: u64 = 0x8000;
const MSIX_PBA_OFF: u64 = 0xc000;
/// Queues one device may have (the notify region and the MSI-X table hold this many).
pub const MAX_QUEUES: usize = 64;
const NO_VECTOR: u16 = 0xffff;
const VIRTIO_VENDOR: u16 = 0x1af4;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// The queue registers of the common configuration.
#[derive(Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

struct PciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    isr: Arc<AtomicU8>,
    /// The driver may change vectors while the device runs.
    queue_vectors: Arc<[AtomicU16]>,
    config_vector: Arc<AtomicU16>,
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, index: usize) {
        self.isr.fetch_or(1, Ordering::AcqRel);
        if let Some(v) = self.queue_vectors.get(index) {
            let v = v.load(Ordering::Acquire);
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(v);
        }
    }
    fn signal_config(&self) {
        self.isr.fetch_or(2, Ordering::AcqRel);
        let v = self.config_vector.load(Ordering::Acquire);
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger(v);
    }
}

pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    vm: Arc<dyn VmInterface>,
    msix: Arc<Mutex<MsixConfig>>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    isr: Arc<AtomicU8>,
    status: Arc<DeviceStatus>,
    config_vector: Arc<AtomicU16>,
    queue_vectors: Arc<[AtomicU16]>,
    offered: u64,
    acked: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    notify: Vec<EventFd>,
    /// Where BAR 0 decodes now (ioeventfds are registered there).
    bar_addr: Option<u64>,
    activated: bool,
    /// Queues to notify when the device next resumes: a restore started them, and their rings
    /// may hold requests the driver published without a notification the device saw.
    kick_at_resume: Vec<usize>,
    name: String,
    /// Behind a virtual IOMMU (`set_dma`): what the device's addresses go through once its
    /// driver accepts ACCESS_PLATFORM.
    dma: Option<Dma>,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![0x09, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

impl VirtioPciDevice {
    /// Wraps `device`; its BAR 0 (VIRTIO_PCI_BAR_SIZE bytes) is at `bar_addr`. `name` is the
    /// `id=` of the device, for logs.
    /// A transport for `device` with its BAR 0 (64-bit) at `bar_addr`.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        vm: Arc<dyn VmInterface>,
        bar_addr: u64,
    ) -> Result<Self, String> {
        Self::with_bar(name, device, mem, vm, (bar_addr, VIRTIO_PCI_BAR_KIND))
    }

    /// A transport for `device` with its BAR 0 of `kind` at `addr`.
    pub fn with_bar(
        name: String,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        vm: Arc<dyn VmInterface>,
        (bar_addr, bar_kind): (u64, BarKind),
    ) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() || sizes.len() > MAX_QUEUES {
            return Err(format!("{name}: {} queues (1-{MAX_QUEUES})", sizes.len()));
        }
        let dtype = device.device_type();
        let (class, subclass) = match dtype {
            TYPE_NET => (0x02, 0x00),
            TYPE_BLOCK => (0x01, 0x80),
            TYPE_CONSOLE => (0x07, 0x80),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(PciIds {
            vendor: VIRTIO_VENDOR,
            device: 0x1040 + dtype,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: 0x1100,
        });
        config.add_bar(0, VIRTIO_PCI_BAR_SIZE, bar_kind, bar_addr);
        let caps = [
            vendor_cap(CAP_COMMON, COMMON_OFF, COMMON_LEN, None),
            vendor_cap(CAP_ISR, ISR_OFF, ISR_LEN, None),
            vendor_cap(CAP_DEVICE, DEVICE_OFF, DEVICE_LEN, None),
            vendor_cap(CAP_NOTIFY, NOTIFY_OFF, NOTIFY_LEN, Some(NOTIFY_MULTIPLIER)),
        ];
        for c in caps {
            config
                .add_capability(&c)
                .ok_or("no room for capabilities")?;
        }
        let vectors = sizes.len() as u16 + 1;
        let msix_cap = config
            .add_capability(&MsixCap::bytes(
                vectors,
                0,
                MSIX_TABLE_OFF as u32,
                MSIX_PBA_OFF as u32,
            ))
            .ok_or("no room for MSI-X")?;
        // Enable and function-mask bits of message control.
        config.set_write_mask(msix_cap / 4, 0xc000_0000);
        let pci_cfg_cap = config
            .add_capability(&vendor_cap(CAP_PCI_CFG, 0, 0, Some(0)))
            .ok_or("no room for the pci-cfg capability")?;
        config.set_write_mask(pci_cfg_cap / 4 + 1, 0xff);
        config.set_write_mask(pci_cfg_cap / 4 + 2, u32::MAX);
        config.set_write_mask(pci_cfg_cap / 4 + 3, u32::MAX);
        let msix = Arc::new(Mutex::new(MsixConfig::new(vectors, vm.clone())));
        let mut notify = Vec::with_capacity(sizes.len());
        for _ in &sizes {
            notify.push(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
        }
        // Every device's queues go through virtio-queue, which handles used/avail events.
        let offered = device.features() | F_VERSION_1 | F_RING_EVENT_IDX;
        Ok(VirtioPciDevice {
            config,
            queues: sizes.iter().map(|&s| QueueRegs::new(s)).collect(),
            device,
            mem,
            vm,
            msix,
            msix_cap,
            pci_cfg_cap,
            isr: Arc::new(AtomicU8::new(0)),
            status: Arc::new(DeviceStatus::default()),
            config_vector: Arc::new(AtomicU16::new(NO_VECTOR)),
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            offered,
            acked: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            notify,
            bar_addr: None,
            activated: false,
            kick_at_resume: Vec::new(),
            name,
            dma: None,
        })
    }

    /// Puts the device behind a virtual IOMMU, before its driver starts: it offers
    /// ACCESS_PLATFORM, and when its driver accepts it, the rings and buffers it is given are
    /// I/O virtual addresses translated through `dma`.
    pub fn set_dma(&mut self, dma: Dma) {
        self.offered |= F_ACCESS_PLATFORM;
        self.dma = Some(dma);
    }

    /// The endpoint id of the device behind a virtual IOMMU.
    pub fn dma_endpoint(&self) -> Option<u32> {
        self.dma.as_ref().map(Dma::endpoint_id)
    }

    /// What the device's addresses go through with driver features `acked`.
    fn dma_for(&self, acked: u64) -> Option<&Dma> {
        self.dma.as_ref().filter(|_| acked & F_ACCESS_PLATFORM != 0)
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u8 {
        self.status.get()
    }

    /// Pauses the device's worker(s) for a snapshot (see [`VirtioDevice::pause`]): afterwards
    /// [`Self::state`] has each queue's exact positions.
    pub fn pause(&mut self) -> Result<(), String> {
        self.device
            .pause()
            .map_err(|e| format!("{}: {e}", self.name))
    }

    /// Restarts the paused worker(s) where they stopped; after a restore, each queue it started
    /// is notified once, so the device takes what the rings hold (only now: the VM comes up
    /// paused, and nothing moves before its resume).
    pub fn resume(&mut self) -> Result<(), String> {
        self.device
            .resume()
            .map_err(|e| format!("{}: {e}", self.name))?;
        for i in std::mem::take(&mut self.kick_at_resume) {
            let _ = self.notify[i].write(1);
        }
        Ok(())
    }

    /// `vm.resize-disk`: [`VirtioDevice::resize`].
    pub fn resize(&mut self, size: u64) -> Result<(), String> {
        self.device.resize(size)
    }

    /// Live migration: [`VirtioDevice::start_dirty_log`] (the error names the device),
    /// `stop_dirty_log` and `take_dirty_log`.
    pub fn start_dirty_log(&mut self, last_addr: u64) -> Result<(), String> {
        let r = self.device.start_dirty_log(last_addr);
        r.map_err(|e| format!("{}: {e}", self.name))
    }
    pub fn stop_dirty_log(&mut self) {
        self.device.stop_dirty_log()
    }
    pub fn take_dirty_log(&mut self) -> Option<Vec<u64>> {
        self.device.take_dirty_log()
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.acked = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.isr.store(0, Ordering::Release);
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.status.set(0);
        self.activated = false;
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            debug!("{}: reset", self.name);
            // As the original: an event for the reset of a device its driver had started.
            if self.activated {
                self.vm.device_event(&self.name, "reset");
            }
            self.reset();
            return;
        }
        let cur = self.status.get();
        let mut new = value & !STATUS_NEEDS_RESET | (cur & STATUS_NEEDS_RESET);
        if new & STATUS_FEATURES_OK != 0
            && cur & STATUS_FEATURES_OK == 0
            && (self.acked & !self.offered != 0 || self.acked & F_VERSION_1 == 0)
        {
            warn!("{}: driver features {:#x} refused", self.name, self.acked);
            new &= !STATUS_FEATURES_OK;
        }
        self.status.set(new);
        if new & STATUS_DRIVER_OK != 0 && new & STATUS_FEATURES_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.activated = true;
        let started = build_queues(
            &self.queues,
            &vec![(0, 0); self.queues.len()],
            self.acked,
            &self.mem,
            &self.notify,
            self.dma_for(self.acked),
        )
        .and_then(|queues| {
            self.start_device(queues)
                .map_err(|e| format!("cannot activate: {e}"))
        });
        match started {
            Ok(()) => {
                info!("{}: activated, features {:#x}", self.name, self.acked);
                self.vm.device_event(&self.name, "activated");
            }
            Err(e) => {
                warn!("{}: {e}; device needs reset", self.name);
                self.status.mark_needs_reset();
            }
        }
    }

    /// Hands the queues to the device, which starts its worker.
    fn start_device(&mut self, queues: Vec<Option<(Queue, EventFd)>>) -> Result<(), ActivateError> {
        let interrupt = Arc::new(PciInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            queue_vectors: self.queue_vectors.clone(),
            config_vector: self.config_vector.clone(),
        });
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt,
            queues,
            acked_features: self.acked,
            status: self.status.clone(),
            dma: self.dma_for(self.acked).cloned(),
        };
        self.device.activate(ctx)
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize).copied();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.acked & 0xffff_ffff,
                1 => self.acked >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector.load(Ordering::Acquire)),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status.get()),
            0x15 => u64::from(self.device.config_generation() as u8),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => self
                .queue_vectors
                .get(self.queue_select as usize)
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::Acquire))
                }),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let live = self.activated;
        let vectors = self.msix.lock().unwrap_or_else(|e| e.into_inner()).count();
        let vector = |v: u64| {
            if (v as usize) < vectors {
                v as u16
            } else {
                NO_VECTOR
            }
        };
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if !live => {
                let v = v & 0xffff_ffff;
                match self.driver_feature_select {
                    0 => self.acked = (self.acked & !0xffff_ffff) | (v & self.offered),
                    1 => self.acked = (self.acked & 0xffff_ffff) | ((v << 32) & self.offered),
                    _ => {}
                }
            }
            0x10 => self.config_vector.store(vector(v), Ordering::Release),
            0x14 => self.set_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !live => {
                if let Some(q) = self.selected() {
                    // Validity (power of two, <= max) is checked when the device starts.
                    q.size = v as u16;
                }
            }
            0x1a => {
                if let Some(q) = self.queue_vectors.get(self.queue_select as usize) {
                    q.store(vector(v), Ordering::Release);
                }
            }
            0x1c if !live => {
                if let Some(q) = self.selected() {
                    q.ready = v & 1 == 1;
                }
            }
            0x20..=0x37 if !live => {
                let lo = offset.is_multiple_of(8);
                let v32 = v & 0xffff_ffff;
                if let Some(q) = self.selected() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if data.len() == 8 {
                        *field = v;
                    } else if lo {
                        *field = (*field & !0xffff_ffff) | v32;
                    } else {
                        *field = (*field & 0xffff_ffff) | (v32 << 32);
                    }
                }
            }
            _ => debug!("{}: ignored common-config write at {offset:#x}", self.name),
        }
    }

    /// Reads or writes `len` (1, 2 or 4) bytes of BAR 0 through the pci-cfg window.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let reg = self.pci_cfg_cap / 4;
        let bar = self.config.read_reg(reg + 1) & 0xff;
        let off = u64::from(self.config.read_reg(reg + 2));
        let len = self.config.read_reg(reg + 3) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && off + len as u64 <= VIRTIO_PCI_BAR_SIZE)
            .then_some((off, len))
    }
}

/// The queues a device gets when it starts: each ready queue as the driver programmed it, at
/// `positions` (`(next_avail, next_used)`), checked as `virtio-queue` checks a restored state
/// (size a power of two no larger than the maximum, aligned rings) and against guest memory.
/// Behind a virtual IOMMU (`dma`), the rings' addresses are I/O virtual addresses: each ring
/// must be mapped (the used ring writable) to one guest-physical range, which the queue gets.
fn build_queues(
    regs: &[QueueRegs],
    positions: &[(u16, u16)],
    acked: u64,
    mem: &GuestMemoryMmap,
    notify: &[EventFd],
    dma: Option<&Dma>,
) -> Result<Vec<Option<(Queue, EventFd)>>, String> {
    let event_idx = acked & F_RING_EVENT_IDX != 0;
    let mut queues = Vec::with_capacity(regs.len());
    for (i, (s, &(next_avail, next_used))) in regs.iter().zip(positions).enumerate() {
        if !s.ready {
            queues.push(None);
            continue;
        }
        let n = u64::from(s.size);
        let ring = |addr: u64, len: u64, write: bool| match dma {
            None => Ok(addr),
            Some(d) => d.contiguous(addr, len, write).map_err(|e| {
                format!("queue {i}: ring at {addr:#x} not mapped by the IOMMU to one range: {e}")
            }),
        };
        let state = VirtqueueState {
            max_size: s.max_size,
            size: s.size,
            ready: true,
            desc_table: ring(s.desc, 16 * n, false)?,
            avail_ring: ring(s.avail, 6 + 2 * n, false)?,
            used_ring: ring(s.used, 6 + 8 * n, true)?,
            msix_vector: NO_VECTOR,
            next_avail,
            next_used,
        }
        .queue_state(event_idx);
        let invalid = |why: String| {
            format!(
                "queue {i} invalid (size {}, desc {:#x}, avail {:#x}, used {:#x}): {why}",
                s.size, s.desc, s.avail, s.used
            )
        };
        let q = Queue::try_from(state).map_err(|e| invalid(e.to_string()))?;
        if !q.is_valid(mem) {
            return Err(invalid("rings outside guest memory".into()));
        }
        let evt = notify
            .get(i)
            .ok_or_else(|| invalid("no notify eventfd".into()))?
            .try_clone()
            .map_err(|e| e.to_string())?;
        queues.push(Some((q, evt)));
    }
    Ok(queues)
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_cap / 4 + 4 {
            let mut b = [0u8; 4];
            if let Some((off, len)) = self.pci_cfg_window() {
                self.read_bar(0, off, &mut b[..len]);
            }
            return u32::from_le_bytes(b);
        }
        if reg == self.msix_cap / 4 {
            let ctl = self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .control_bits();
            return (self.config.read_reg(reg) & 0x3fff_ffff) | u32::from(ctl) << 16;
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let reg = offset / 4;
        if reg == self.pci_cfg_cap / 4 + 4 {
            if let Some((off, len)) = self.pci_cfg_window() {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                self.write_bar(0, off, &b[..len]);
            }
            return;
        }
        if self.config.write(offset, data) == Some(self.msix_cap / 4) {
            let ctl = (self.config.read_reg(reg) >> 16) as u16;
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(ctl);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        // Accesses are 1 to 8 bytes (an empty one reads nothing, and acknowledges no ISR).
        if bar != 0 || data.is_empty() || data.len() > 8 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => self.read_common(o, data),
            o if (ISR_OFF..ISR_OFF + ISR_LEN).contains(&o) => {
                data.fill(0);
                // Reading the ISR acknowledges it.
                data[0] = self.isr.swap(0, Ordering::AcqRel);
            }
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFF, data)
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE_OFF, data),
            o if o >= MSIX_PBA_OFF => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o - MSIX_PBA_OFF, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.is_empty() || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_OFF + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFF, data)
            }
            o if (NOTIFY_OFF..NOTIFY_OFF + NOTIFY_LEN).contains(&o) => {
                // Only reached when the ioeventfd is not in place.
                let q = ((o - NOTIFY_OFF) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.notify.get(q) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE_OFF..MSIX_PBA_OFF).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o - MSIX_TABLE_OFF, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != 0 {
            return;
        }
        for (i, e) in self.notify.iter().enumerate() {
            let off = NOTIFY_OFF + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            if let Some(old) = old {
                self.vm.unregister_ioevent(e, old + off);
            }
            if let Some(new) = new {
                if let Err(err) = self.vm.register_ioevent(e, new + off) {
                    warn!(
                        "{}: queue {i} ioeventfd: {err}; notifications exit to the VMM",
                        self.name
                    );
                }
            }
        }
        self.bar_addr = new;
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        if let Some(addr) = self.bar_addr {
            for (i, e) in self.notify.iter().enumerate() {
                let off = NOTIFY_OFF + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                self.vm.unregister_ioevent(e, addr + off);
            }
        }
    }
}
