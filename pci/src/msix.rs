//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and delivery of
//! each vector through its own irqfd and an MSI route in the hypervisor's GSI table.

use std::sync::Arc;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::VmInterface;

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// The 12-byte MSI-X capability.
pub struct MsixCap;

impl MsixCap {
    /// `vectors` table entries; table and PBA in BAR `bir` at the given offsets.
    pub fn bytes(vectors: u16, bir: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0] = MSIX_CAP_ID;
        b[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
        b[4..8].copy_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        b[8..12].copy_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

pub struct MsixConfig {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// One GSI and irqfd per entry; empty if the VM could not give us any.
    vectors: Vec<Vector>,
    vm: Arc<dyn VmInterface>,
}

impl MsixConfig {
    /// A table of `count` entries, all masked (as after reset). Each gets a GSI and an irqfd
    /// now, so delivery later is one eventfd write.
    pub fn new(count: u16, vm: Arc<dyn VmInterface>) -> Self {
        let entries = vec![
            Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
            count as usize
        ];
        let mut vectors = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let v = (|| -> Result<Vector, String> {
                let gsi = vm.allocate_gsi()?;
                let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
                vm.set_msi_route(gsi, Some((0, 0)))?;
                vm.register_irqfd(&irqfd, gsi)?;
                Ok(Vector { gsi, irqfd })
            })();
            match v {
                Ok(v) => vectors.push(v),
                Err(e) => {
                    warn!("MSI-X: cannot set up a vector: {e}; interrupts will not be delivered");
                    break;
                }
            }
        }
        MsixConfig {
            entries,
            pba: vec![0; (count as usize).div_ceil(64)],
            enabled: false,
            function_masked: false,
            vectors,
            vm,
        }
    }

    pub fn count(&self) -> usize {
        self.entries.len()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = control & CTRL_ENABLE != 0;
        self.function_masked = control & CTRL_FUNCTION_MASK != 0;
        if self.enabled && !was_active && !self.function_masked {
            for i in 0..self.entries.len() {
                self.update_route(i);
                self.deliver_pending(i);
            }
        }
    }

    /// The message control bits this state implies (enable, function mask).
    pub fn control_bits(&self) -> u16 {
        (if self.enabled { CTRL_ENABLE } else { 0 })
            | (if self.function_masked {
                CTRL_FUNCTION_MASK
            } else {
                0
            })
    }

    fn update_route(&self, i: usize) {
        let (Some(e), Some(v)) = (self.entries.get(i), self.vectors.get(i)) else {
            return;
        };
        let addr = u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo);
        if let Err(err) = self.vm.set_msi_route(v.gsi, Some((addr, e.data))) {
            warn!("MSI-X: cannot route vector {i}: {err}");
        }
    }

    fn deliver_pending(&mut self, i: usize) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.pba[word] & bit != 0 && !self.entries[i].masked() {
            self.pba[word] &= !bit;
            self.fire(i);
        }
    }

    fn fire(&self, i: usize) {
        if let Some(v) = self.vectors.get(i) {
            if let Err(e) = v.irqfd.write(1) {
                warn!("MSI-X: cannot signal vector {i}: {e}");
            }
        }
    }

    /// Raises vector `i`: delivered now, or left pending while masked. Out-of-range vectors
    /// (e.g. VIRTIO_MSI_NO_VECTOR) and a disabled MSI-X are ignored.
    pub fn trigger(&mut self, i: u16) {
        let i = i as usize;
        if !self.enabled || i >= self.entries.len() {
            debug!("MSI-X: vector {i} not deliverable");
            return;
        }
        if self.function_masked || self.entries[i].masked() {
            self.pba[i / 64] |= 1 << (i % 64);
        } else {
            self.fire(i);
        }
    }

    /// A guest read of the table at `offset` (4 or 8 bytes, aligned); anything else reads ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(i) else { return };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        match (data.len(), field % 4) {
            (4, 0) => data.copy_from_slice(&words[field as usize / 4].to_le_bytes()),
            (8, 0) if field % 8 == 0 => {
                let w = field as usize / 4;
                data[..4].copy_from_slice(&words[w].to_le_bytes());
                data[4..].copy_from_slice(&words[w + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// A guest write of the table at `offset` (4 or 8 bytes, aligned); others are dropped.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        if i >= self.entries.len() {
            return;
        }
        let mut words = Vec::with_capacity(2);
        match (data.len(), field % 4) {
            (4, 0) => words.push((field as usize / 4, le32(data))),
            (8, 0) if field % 8 == 0 => {
                words.push((field as usize / 4, le32(&data[..4])));
                words.push((field as usize / 4 + 1, le32(&data[4..])));
            }
            _ => {
                debug!("MSI-X: ignoring a {}-byte table write", data.len());
                return;
            }
        }
        let e = &mut self.entries[i];
        let was_masked = e.masked();
        let mut msg_changed = false;
        for (w, v) in words {
            match w {
                0 => (e.addr_lo, msg_changed) = (v & !3, true),
                1 => (e.addr_hi, msg_changed) = (v, true),
                2 => (e.data, msg_changed) = (v, true),
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        let now_masked = e.masked();
        if msg_changed || (was_masked && !now_masked) {
            self.update_route(i);
        }
        if was_masked && !now_masked && self.enabled && !self.function_masked {
            self.deliver_pending(i);
        }
    }

    /// A guest read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (k, b) in data.iter_mut().enumerate() {
            let byte = offset + k as u64;
            let word = (byte / 8) as usize;
            if let Some(w) = self.pba.get(word) {
                *b = (w >> ((byte % 8) * 8)) as u8;
            }
        }
    }

    /// Masks every vector and disables MSI-X (device reset).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Default::default()
            };
        }
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for v in &self.vectors {
            self.vm.unregister_irqfd(&v.irqfd, v.gsi);
            let _ = self.vm.set_msi_route(v.gsi, None);
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
