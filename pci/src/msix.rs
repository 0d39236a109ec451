//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and delivery of
//! each vector through its own irqfd and an MSI route in the hypervisor's GSI table.

use std::sync::Arc;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::{StateError, VmInterface};

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

/// The `MsixState` layout this build writes and the only one it restores.
pub const MSIX_STATE_VERSION: u32 = 1;

/// One table entry as the guest reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low dword (bits 1:0 are always 0).
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    /// Vector control: bit 0 masks the vector; the other bits are always 0.
    pub control: u32,
}

/// An MSI-X table, its pending bits and its message control bits.
///
/// GSIs and irqfds are host resources, not state: the fresh `MsixConfig` a state is restored
/// into has its own, and the restore routes each of its GSIs to the restored entry's message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// [`MSIX_STATE_VERSION`] when written.
    pub version: u32,
    /// Message control: MSI-X enable.
    pub enabled: bool,
    /// Message control: function mask.
    pub function_masked: bool,
    /// One entry per vector; as many as the table the state is restored into has.
    pub table: Vec<MsixEntry>,
    /// Pending bits, 64 vectors per word (bit `i % 64` of word `i / 64`); bits past the last
    /// vector are 0.
    pub pba: Vec<u64>,
}

type Entry = MsixEntry;

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
            let v = vm.allocate_gsi().and_then(|gsi| {
                let wired = (|| -> Result<EventFd, String> {
                    let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
                    vm.set_msi_route(gsi, Some((0, 0)))?;
                    vm.register_irqfd(&irqfd, gsi)?;
                    Ok(irqfd)
                })();
                match wired {
                    Ok(irqfd) => Ok(Vector { gsi, irqfd }),
                    Err(e) => {
                        let _ = vm.set_msi_route(gsi, None);
                        vm.free_gsi(gsi);
                        Err(e)
                    }
                }
            });
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
        if let Err(err) = self.route(i) {
            warn!("MSI-X: cannot route vector {i}: {err}");
        }
    }

    /// Routes vector `i`'s GSI to its entry's message (nothing to do without a GSI).
    fn route(&self, i: usize) -> Result<(), String> {
        let (Some(e), Some(v)) = (self.entries.get(i), self.vectors.get(i)) else {
            return Ok(());
        };
        let addr = u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo);
        self.vm.set_msi_route(v.gsi, Some((addr, e.data)))
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

    /// The table, pending bits and control bits as they are now.
    pub fn state(&self) -> MsixState {
        MsixState {
            version: MSIX_STATE_VERSION,
            enabled: self.enabled,
            function_masked: self.function_masked,
            table: self.entries.clone(),
            pba: self.pba.clone(),
        }
    }

    /// Whether `state` can be restored here: its version, a table of this size, and only
    /// values the guest could have written.
    pub fn check_state(&self, state: &MsixState) -> Result<(), StateError> {
        const WHAT: &str = "MSI-X";
        let invalid = |reason: String| Err(StateError::invalid(WHAT, reason));
        StateError::check_version(WHAT, state.version, MSIX_STATE_VERSION)?;
        let n = self.entries.len();
        if state.table.len() != n {
            return invalid(format!(
                "{} table entries, this device has {n}",
                state.table.len()
            ));
        }
        if state.pba.len() != self.pba.len() {
            return invalid(format!(
                "{} pending-bit words, this device has {}",
                state.pba.len(),
                self.pba.len()
            ));
        }
        if !n.is_multiple_of(64) {
            if let Some(&last) = state.pba.last() {
                if last >> (n % 64) != 0 {
                    return invalid(format!("pending bits set past the last vector ({n})"));
                }
            }
        }
        for (i, e) in state.table.iter().enumerate() {
            if e.control & !VECTOR_MASKED != 0 || e.addr_lo & 3 != 0 {
                return invalid(format!(
                    "entry {i} holds bits the table does not keep (address {:#x}, control {:#x})",
                    e.addr_lo, e.control
                ));
            }
        }
        Ok(())
    }

    /// Makes the table what `state` describes (nothing changes if it is refused) and routes
    /// every vector's GSI to its entry's message, as the guest's writes had routed it. Pending
    /// bits stay pending until the guest unmasks, as before the save.
    pub fn set_state(&mut self, state: &MsixState) -> Result<(), StateError> {
        self.check_state(state)?;
        self.entries.copy_from_slice(&state.table);
        self.pba.copy_from_slice(&state.pba);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        let mut failed = None;
        for i in 0..self.entries.len() {
            if let Err(e) = self.route(i) {
                failed.get_or_insert(format!("cannot route vector {i}: {e}"));
            }
        }
        match failed {
            Some(reason) => Err(StateError::Host {
                what: "MSI-X".into(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Each vector's GSI and the message it is routed to now (the entry's address and data).
    /// Vectors the VM gave no GSI are left out.
    pub fn routes(&self) -> Vec<(u32, (u64, u32))> {
        self.vectors
            .iter()
            .zip(&self.entries)
            .map(|(v, e)| {
                (
                    v.gsi,
                    (u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), e.data),
                )
            })
            .collect()
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
            self.vm.free_gsi(v.gsi);
        }
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
