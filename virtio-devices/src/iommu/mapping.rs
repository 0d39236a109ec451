//! The address spaces a virtio-iommu keeps (virtio 1.2, 5.13): domains of page mappings
//! (I/O virtual address → guest-physical address, with permissions), the endpoints attached
//! to them, and whether an endpoint attached to none may reach guest memory untranslated
//! (bypass). The iommu device's worker changes them; the devices behind the IOMMU translate
//! through them ([`Dma`]): their rings once when the driver starts them, each descriptor as it
//! is read.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::debug;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// The only page size (the granule): 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// Mapping permissions (MAP's `flags`).
pub const MAP_READ: u32 = 1;
pub const MAP_WRITE: u32 = 2;
pub const MAP_MMIO: u32 = 4;
const MAP_FLAGS: u32 = MAP_READ | MAP_WRITE | MAP_MMIO;

/// A request's outcome (the tail's status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    Unsupp = 2,
    Inval = 4,
    Range = 5,
    Noent = 6,
    Nomem = 8,
}

/// Mappings kept at most, all domains together (about 100 bytes each): a guest mapping page
/// after page must not make the VMM grow without bound. Linux keeps a few thousand.
pub const MAX_MAPPINGS: usize = 1 << 18;

/// One mapping of a domain: `[iova, last]` → `gpa..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub iova: u64,
    /// The last I/O virtual address mapped (inclusive, as the protocol's `virt_end`).
    pub last: u64,
    pub gpa: u64,
    pub flags: u32,
}

/// A domain: an identity (bypass) domain, or an address space of mappings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub bypass: bool,
    pub mappings: Vec<Mapping>,
}

/// Everything the IOMMU holds, for a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spaces {
    /// Endpoint → the domain it is attached to.
    pub endpoints: BTreeMap<u32, u32>,
    pub domains: BTreeMap<u32, Domain>,
    /// Whether endpoints attached to no domain reach guest memory untranslated.
    pub bypass: bool,
}

#[derive(Default)]
struct Live {
    endpoints: BTreeMap<u32, u32>,
    /// Domain → (bypass, mappings by first address).
    domains: BTreeMap<u32, (bool, BTreeMap<u64, Mapping>)>,
    /// Mappings in all domains.
    count: usize,
}

/// The IOMMU's address spaces, shared by its worker and the devices behind it.
pub struct IommuMapping {
    live: RwLock<Live>,
    bypass: AtomicBool,
    /// The endpoints this IOMMU manages (the devices behind it, by endpoint id).
    managed: RwLock<BTreeSet<u32>>,
    faults: Faults,
}

/// Fault reasons and flags (`struct virtio_iommu_fault`).
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;
pub const FAULT_F_READ: u32 = 1;
pub const FAULT_F_WRITE: u32 = 2;
pub const FAULT_F_ADDRESS: u32 = 0x100;
/// Faults kept for the event queue at most; more are dropped (a guest making its device fault
/// in a loop must not make the VMM grow).
pub const MAX_PENDING_FAULTS: usize = 64;

/// A fault to report on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    pub reason: u8,
    pub flags: u32,
    pub endpoint: u32,
    pub address: u64,
}

impl FaultRecord {
    /// As the event queue carries it (24 bytes).
    pub fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = self.reason;
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.endpoint.to_le_bytes());
        b[16..24].copy_from_slice(&self.address.to_le_bytes());
        b
    }
}

/// Faults waiting for the event queue, and the eventfd that wakes the IOMMU's worker.
struct Faults {
    pending: Mutex<VecDeque<FaultRecord>>,
    signal: Option<EventFd>,
}

/// Why an access did not translate.
#[derive(Debug, PartialEq, Eq)]
pub struct Fault {
    pub iova: u64,
    pub len: u64,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:#x}+{:#x} is not mapped for this access",
            self.iova, self.len
        )
    }
}

impl Default for IommuMapping {
    fn default() -> Self {
        Self::new()
    }
}

impl IommuMapping {
    /// Empty: no endpoint, no domain, bypass on (as after a reset).
    pub fn new() -> Self {
        IommuMapping {
            live: RwLock::new(Live::default()),
            bypass: AtomicBool::new(true),
            managed: RwLock::new(BTreeSet::new()),
            faults: Faults {
                pending: Mutex::new(VecDeque::new()),
                // Without it (no eventfd to be had), faults wait for the next event buffer.
                signal: EventFd::new(libc::EFD_NONBLOCK).ok(),
            },
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<FaultRecord>> {
        self.faults
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records a fault for the event queue and wakes the worker (dropped past
    /// `MAX_PENDING_FAULTS`).
    fn report(&self, f: FaultRecord) {
        let mut p = self.pending();
        if p.len() >= MAX_PENDING_FAULTS {
            debug!("virtio-iommu: fault dropped (queue full): {f:x?}");
            return;
        }
        p.push_back(f);
        drop(p);
        if let Some(e) = &self.faults.signal {
            let _ = e.write(1);
        }
    }

    /// The eventfd signalled when a fault is recorded.
    pub fn fault_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.faults.signal.as_ref().map(|e| e.as_raw_fd())
    }

    /// Clears the fault eventfd (the worker then takes what is pending).
    pub fn clear_fault_signal(&self) {
        if let Some(e) = &self.faults.signal {
            let _ = e.read();
        }
    }

    /// The oldest fault not yet reported.
    pub fn next_fault(&self) -> Option<FaultRecord> {
        self.pending().front().copied()
    }

    /// The oldest fault was reported.
    pub fn fault_reported(&self) {
        self.pending().pop_front();
    }

    fn read(&self) -> RwLockReadGuard<'_, Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Live> {
        self.live.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts endpoint `id` behind this IOMMU (a device placed behind it).
    pub fn manage(&self, id: u32) {
        self.managed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id);
    }

    /// Whether endpoint `id` is behind this IOMMU.
    pub fn manages(&self, id: u32) -> bool {
        self.managed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&id)
    }

    /// The endpoints behind this IOMMU, in order.
    pub fn managed(&self) -> Vec<u32> {
        self.managed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// A per-endpoint handle for the device with endpoint id `id`.
    pub fn endpoint(self: &Arc<Self>, id: u32) -> Dma {
        Dma {
            mapping: self.clone(),
            endpoint: id,
        }
    }

    pub fn set_bypass(&self, on: bool) {
        self.bypass.store(on, Ordering::Release);
    }

    pub fn bypass(&self) -> bool {
        self.bypass.load(Ordering::Acquire)
    }

    /// A device reset: every endpoint detached, every domain gone, bypass back on, no fault
    /// waiting.
    pub fn reset(&self) {
        *self.write() = Live::default();
        self.set_bypass(true);
        self.pending().clear();
    }

    /// ATTACH: `endpoint` joins `domain` (created when new; an identity domain with
    /// `bypass`), leaving the domain it was in.
    pub fn attach(&self, domain: u32, endpoint: u32, bypass: bool) -> Status {
        if !self.manages(endpoint) {
            return Status::Noent;
        }
        let mut live = self.write();
        if live.domains.get(&domain).is_some_and(|d| d.0 != bypass) {
            return Status::Inval;
        }
        if let Some(old) = live.endpoints.insert(endpoint, domain) {
            if old != domain {
                Self::drop_if_unused(&mut live, old);
            }
        }
        live.domains
            .entry(domain)
            .or_insert_with(|| (bypass, BTreeMap::new()));
        Status::Ok
    }

    /// DETACH: `endpoint` leaves `domain`; a domain left with no endpoint goes, its mappings
    /// with it.
    pub fn detach(&self, domain: u32, endpoint: u32) -> Status {
        if !self.manages(endpoint) {
            return Status::Noent;
        }
        let mut live = self.write();
        if live.endpoints.get(&endpoint) != Some(&domain) {
            return Status::Inval;
        }
        live.endpoints.remove(&endpoint);
        Self::drop_if_unused(&mut live, domain);
        Status::Ok
    }

    fn drop_if_unused(live: &mut Live, domain: u32) {
        if !live.endpoints.values().any(|&d| d == domain) {
            if let Some((_, maps)) = live.domains.remove(&domain) {
                live.count -= maps.len();
            }
        }
    }

    /// The device of `endpoint` went away (unplugged): the endpoint leaves its domain, so a
    /// device placed there later starts unattached.
    pub fn release(&self, endpoint: u32) {
        let mut live = self.write();
        if let Some(d) = live.endpoints.remove(&endpoint) {
            Self::drop_if_unused(&mut live, d);
        }
    }

    /// MAP `[iova, last]` of `domain` to `gpa..` with `flags`. The caller checked the range
    /// against the input range and the page granule.
    pub fn map(&self, domain: u32, iova: u64, last: u64, gpa: u64, flags: u32) -> Status {
        if flags & !MAP_FLAGS != 0 || last < iova || gpa.checked_add(last - iova).is_none() {
            return Status::Inval;
        }
        let mut live = self.write();
        let full = live.count >= MAX_MAPPINGS;
        let Some((bypass, maps)) = live.domains.get_mut(&domain) else {
            return Status::Noent;
        };
        if *bypass {
            return Status::Inval;
        }
        let before = maps.range(..=last).next_back();
        if before.is_some_and(|(_, m)| m.last >= iova) {
            return Status::Inval;
        }
        if full {
            return Status::Nomem;
        }
        maps.insert(
            iova,
            Mapping {
                iova,
                last,
                gpa,
                flags,
            },
        );
        live.count += 1;
        Status::Ok
    }

    /// UNMAP every mapping of `domain` inside `[iova, last]`; one only partly inside fails the
    /// whole request, nothing removed.
    pub fn unmap(&self, domain: u32, iova: u64, last: u64) -> Status {
        if last < iova {
            return Status::Inval;
        }
        let mut live = self.write();
        let Some((bypass, maps)) = live.domains.get_mut(&domain) else {
            return Status::Noent;
        };
        if *bypass {
            return Status::Inval;
        }
        let straddles = |m: &Mapping| m.iova < iova || m.last > last;
        let first = maps
            .range(..iova)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| m.last >= iova);
        let last_one = maps.range(..=last).next_back().map(|(_, m)| m);
        if first.is_some_and(straddles) || last_one.is_some_and(|m| m.last >= iova && straddles(m))
        {
            return Status::Range;
        }
        let gone: Vec<u64> = maps.range(iova..=last).map(|(&k, _)| k).collect();
        for k in &gone {
            maps.remove(k);
        }
        live.count -= gone.len();
        Status::Ok
    }

    /// Translates the access of `len` bytes at `iova` by `endpoint` (`write`: the device
    /// writes) into guest-physical pieces, each given to `out` (address, length; adjacent ones
    /// merged). `Err` when some byte is not mapped with the permission the access needs; the
    /// fault is reported on the event queue.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        write: bool,
        out: impl FnMut(u64, u64),
    ) -> Result<(), Fault> {
        self.translate_quietly(endpoint, iova, len, write, out)
            .map_err(|(reason, fault)| {
                let rw = if write { FAULT_F_WRITE } else { FAULT_F_READ };
                self.report(FaultRecord {
                    reason,
                    flags: rw | FAULT_F_ADDRESS,
                    endpoint,
                    address: iova,
                });
                fault
            })
    }

    /// `translate`, the fault's reason with the error, nothing reported.
    fn translate_quietly(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        write: bool,
        mut out: impl FnMut(u64, u64),
    ) -> Result<(), (u8, Fault)> {
        let fault = (FAULT_R_MAPPING, Fault { iova, len });
        let domain_fault = (FAULT_R_DOMAIN, Fault { iova, len });
        // An access past the last address (it would wrap to 0) is no access.
        if iova.checked_add(len.saturating_sub(1)).is_none() {
            return Err(fault);
        }
        let live = self.read();
        let Some(domain) = live.endpoints.get(&endpoint) else {
            if self.bypass() {
                out(iova, len);
                return Ok(());
            }
            return Err(domain_fault);
        };
        let Some((bypass, maps)) = live.domains.get(domain) else {
            return Err(domain_fault);
        };
        if *bypass || len == 0 {
            out(iova, len);
            return Ok(());
        }
        let need = if write { MAP_WRITE } else { MAP_READ };
        let (mut at, mut left) = (iova, len);
        let mut piece: Option<(u64, u64)> = None;
        while left > 0 {
            let m = maps
                .range(..=at)
                .next_back()
                .map(|(_, m)| m)
                .filter(|m| m.last >= at && m.flags & need != 0)
                .ok_or((FAULT_R_MAPPING, Fault { iova, len }))?;
            // Bytes of this mapping from `at` on (the mapping may end at u64::MAX).
            let avail = (m.last - at).saturating_add(1);
            let n = left.min(avail);
            let gpa = m.gpa + (at - m.iova);
            piece = match piece {
                Some((a, l)) if a + l == gpa => Some((a, l + n)),
                Some((a, l)) => {
                    out(a, l);
                    Some((gpa, n))
                }
                None => Some((gpa, n)),
            };
            left -= n;
            at = at.wrapping_add(n);
        }
        if let Some((a, l)) = piece {
            out(a, l);
        }
        Ok(())
    }

    /// What a snapshot keeps.
    pub fn state(&self) -> Spaces {
        let live = self.read();
        Spaces {
            endpoints: live.endpoints.clone(),
            domains: live
                .domains
                .iter()
                .map(|(&id, (bypass, maps))| {
                    (
                        id,
                        Domain {
                            bypass: *bypass,
                            mappings: maps.values().copied().collect(),
                        },
                    )
                })
                .collect(),
            bypass: self.bypass(),
        }
    }

    /// Takes `s` back (a restore), after checking it as the requests would have: every
    /// endpoint managed and in a listed domain, mappings that do not overlap.
    pub fn restore(&self, s: &Spaces) -> Result<(), String> {
        let scratch = IommuMapping::new();
        *scratch.managed.write().unwrap_or_else(|e| e.into_inner()) = self
            .managed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (&id, d) in &s.domains {
            scratch
                .write()
                .domains
                .insert(id, (d.bypass, BTreeMap::new()));
            for m in &d.mappings {
                if scratch.map(id, m.iova, m.last, m.gpa, m.flags) != Status::Ok {
                    return Err(format!("domain {id}: mapping {m:x?} refused"));
                }
            }
        }
        for (&ep, &d) in &s.endpoints {
            if !scratch.manages(ep) {
                return Err(format!("endpoint {ep:#x} is not behind this IOMMU"));
            }
            if !s.domains.contains_key(&d) {
                return Err(format!("endpoint {ep:#x} attached to a missing domain {d}"));
            }
            scratch.write().endpoints.insert(ep, d);
        }
        let live = std::mem::take(&mut *scratch.write());
        *self.write() = live;
        self.set_bypass(s.bypass);
        Ok(())
    }
}

/// How one device behind the IOMMU reaches guest memory: its endpoint id and the IOMMU's
/// address spaces.
#[derive(Clone)]
pub struct Dma {
    mapping: Arc<IommuMapping>,
    endpoint: u32,
}

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dma(endpoint {:#x})", self.endpoint)
    }
}

impl Dma {
    pub fn endpoint_id(&self) -> u32 {
        self.endpoint
    }

    /// `translate` for this endpoint.
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        write: bool,
        out: impl FnMut(u64, u64),
    ) -> Result<(), Fault> {
        self.mapping.translate(self.endpoint, iova, len, write, out)
    }

    /// The guest-physical address of `[iova, iova + len)` when it translates to one
    /// contiguous range (a ring, an indirect table).
    pub fn contiguous(&self, iova: u64, len: u64, write: bool) -> Result<u64, Fault> {
        let mut pieces = 0;
        let mut start = 0;
        self.translate(iova, len, write, |a, _| {
            pieces += 1;
            start = a;
        })?;
        match pieces {
            0 => Ok(iova),
            1 => Ok(start),
            _ => Err(Fault { iova, len }),
        }
    }
}
