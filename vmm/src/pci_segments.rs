//! The VM's PCI segments (`--platform num_pci_segments`, `--pci-segment`), laid out as the
//! original lays them out: each is one bus (bus 0) with its own megabyte of ECAM from
//! `layout::PCI_MMCONFIG_START`, segment 0 also behind ports 0xcf8/0xcfc and with the host
//! bridge in slot 0; the 32-bit and 64-bit MMIO windows are cut into one aperture per segment,
//! in proportion to the segments' weights, and each segment's BARs come from its own.

use std::fmt;
use std::sync::{Arc, Mutex};

use arch::layout;
use pci::{BarWindows, PciRoot, VmInterface};

use crate::config::VmConfig;

/// Where a PCI function sits: its segment and its device number on the segment's bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub segment: u16,
    pub slot: u8,
}

impl fmt::Display for PciAddress {
    /// As the original writes a BDF: `0001:00:05.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:00:{:02x}.0", self.segment, self.slot)
    }
}

/// PCI MMIO windows, `(start, size)`: what a host bridge's `_CRS` describes and what its BARs
/// are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub mmio32: (u64, u64),
    /// `None` when the guest physical address space has no room above RAM for one; 64-bit
    /// BARs then go to the 32-bit window.
    pub mmio64: Option<(u64, u64)>,
}

/// The alignment of the segments' 32-bit apertures, as the original's.
const MMIO32_ALIGN: u64 = 4 << 10;
/// The original aligns the 64-bit apertures to 4 GiB. This VMM's 64-bit window is at most
/// `layout::MEM_64BIT_DEVICES_MAX_SIZE`, so with many segments the alignment shrinks (to a
/// power of two, at least `MMIO32_ALIGN`) until every segment gets room.
const MMIO64_ALIGN: u64 = 4 << 30;

impl PciWindows {
    /// The windows of a VM with `ram_size` bytes of RAM (and `hotplug_size` more that can be
    /// plugged) whose vCPUs report `phys_bits` of physical address space (see
    /// `arch::cpuid::guest_phys_bits`).
    pub fn new(ram_size: u64, hotplug_size: u64, phys_bits: u8) -> Self {
        PciWindows {
            mmio32: (
                layout::MEM_32BIT_DEVICES_START.0,
                layout::MEM_32BIT_DEVICES_SIZE,
            ),
            mmio64: layout::mmio64_window(ram_size, hotplug_size, phys_bits),
        }
    }

    pub(crate) fn allocators(&self) -> BarWindows {
        BarWindows::new(self.mmio32, self.mmio64)
    }

    /// One aperture per segment, by `weights` (32-bit, 64-bit; each at least 1), as the
    /// original cuts them: a unit of `size / total weight` (rounded down to the alignment),
    /// `weight` units per segment in order, and the last segment up to the window's end.
    pub fn split(&self, weights: &[(u32, u32)]) -> Result<Vec<PciWindows>, String> {
        let w32: Vec<u32> = weights.iter().map(|w| w.0).collect();
        let w64: Vec<u32> = weights.iter().map(|w| w.1).collect();
        let m32 = cut(self.mmio32, &w32, MMIO32_ALIGN)
            .ok_or_else(|| too_many(weights.len(), "32-bit", self.mmio32))?;
        let m64 = match self.mmio64 {
            Some(w) => cut(w, &w64, MMIO64_ALIGN)
                .ok_or_else(|| too_many(weights.len(), "64-bit", w))?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; weights.len()],
        };
        Ok(m32
            .into_iter()
            .zip(m64)
            .map(|(mmio32, mmio64)| PciWindows { mmio32, mmio64 })
            .collect())
    }
}

fn too_many(segments: usize, kind: &str, (start, size): (u64, u64)) -> String {
    format!(
        "{segments} PCI segments leave too little of the {kind} MMIO window \
         ({start:#x}+{size:#x}) to each (use fewer segments or other aperture weights)"
    )
}

/// `window` cut by `weights` with apertures aligned to at most `align` (smaller, down to
/// `MMIO32_ALIGN`, when the window is too small for a unit of `align` per weight); `None`
/// when even that leaves a segment nothing.
fn cut((start, size): (u64, u64), weights: &[u32], align: u64) -> Option<Vec<(u64, u64)>> {
    // In u128: up to 96 weights of up to 2^32 - 1, times an alignment of up to 4 GiB.
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if total == 0 {
        return None;
    }
    let mut align = align;
    let units = |align: u64| u128::from(size) / (u128::from(align) * total);
    while units(align) == 0 {
        align /= 2;
        if align < MMIO32_ALIGN {
            return None;
        }
    }
    // unit × total ≤ size, so unit and every `unit × weight` fit in a u64.
    let unit = u64::try_from(units(align)).ok()? * align;
    let end = start + size;
    let mut out = Vec::with_capacity(weights.len());
    let mut at = start;
    for (i, &w) in weights.iter().enumerate() {
        let len = if i + 1 == weights.len() {
            end - at
        } else {
            unit * u64::from(w)
        };
        out.push((at, len));
        at += len;
    }
    Some(out)
}

/// Each segment's apertures, from the VM's whole `windows` and its configuration.
pub fn segment_windows(cfg: &VmConfig, windows: &PciWindows) -> Result<Vec<PciWindows>, String> {
    let weights = vm_config::aperture_weights(
        cfg.num_pci_segments(),
        cfg.pci_segments.as_deref().unwrap_or_default(),
    );
    windows.split(&weights)
}

/// The host bridges ACPI describes, one per segment (`windows`, by segment), each in the
/// NUMA node whose `pci_segments` names it.
pub fn pci_hosts(cfg: &VmConfig, windows: &[PciWindows]) -> Vec<arch::acpi::PciHost> {
    let node_of = |segment: u16| {
        cfg.numa
            .iter()
            .flatten()
            .find(|n| n.pci_segments.iter().flatten().any(|&s| s == segment))
            .map(|n| n.guest_numa_id)
    };
    (0u16..)
        .zip(windows)
        .map(|(segment, w)| arch::acpi::PciHost {
            proximity: node_of(segment).unwrap_or(0),
            ..arch::acpi::PciHost::segment(segment, w.mmio32, w.mmio64)
        })
        .collect()
}

/// One segment: its bus and where its BARs go.
pub(crate) struct PciSegment {
    pub(crate) root: Arc<Mutex<PciRoot>>,
    pub(crate) bars: BarWindows,
}

impl PciSegment {
    pub(crate) fn new(vm: Arc<dyn VmInterface>, id: u16, windows: &PciWindows) -> Self {
        PciSegment {
            root: Arc::new(Mutex::new(PciRoot::for_segment(vm, id))),
            bars: windows.allocators(),
        }
    }

    pub(crate) fn root(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_print_as_the_original_writes_them() {
        let a = PciAddress {
            segment: 0x1f,
            slot: 5,
        };
        assert_eq!(a.to_string(), "001f:00:05.0");
    }

    #[test]
    fn windows_are_cut_by_weight_and_the_last_segment_takes_the_rest() {
        let w = PciWindows {
            mmio32: (0xc000_0000, 0x2800_0000),
            mmio64: Some((64 << 30, 64 << 30)),
        };
        assert_eq!(w.split(&[(1, 1)]).unwrap(), [w]);
        let s = w.split(&[(1, 1), (2, 1), (1, 2)]).unwrap();
        // 32-bit: 640 MiB / 4 = 160 MiB per weight.
        assert_eq!(s[0].mmio32, (0xc000_0000, 0x0a00_0000));
        assert_eq!(s[1].mmio32, (0xca00_0000, 0x1400_0000));
        assert_eq!(s[2].mmio32, (0xde00_0000, 0x0a00_0000));
        // 64-bit: 64 GiB / 4 = 16 GiB per weight (4 GiB aligned).
        assert_eq!(s[0].mmio64, Some((64 << 30, 16 << 30)));
        assert_eq!(s[1].mmio64, Some((80 << 30, 16 << 30)));
        assert_eq!(s[2].mmio64, Some((96 << 30, 32 << 30)));
        // Apertures tile the windows exactly.
        for pair in s.windows(2) {
            assert_eq!(pair[0].mmio32.0 + pair[0].mmio32.1, pair[1].mmio32.0);
        }
        // 96 segments: 64-bit units shrink below 4 GiB rather than leave segments empty.
        let s = w.split(&[(1, 1); 96]).unwrap();
        assert!(s
            .iter()
            .all(|x| x.mmio64.unwrap().1 >= 512 << 20 && x.mmio32.1 > 0));
        let last = s[95].mmio64.unwrap();
        assert_eq!(last.0 + last.1, 128 << 30);
        // Without a 64-bit window, none for any segment.
        let no64 = PciWindows { mmio64: None, ..w };
        assert!(no64
            .split(&[(1, 1); 3])
            .unwrap()
            .iter()
            .all(|x| x.mmio64.is_none()));
        // A window too small to share.
        let tiny = PciWindows {
            mmio32: (0xc000_0000, 0x4000),
            mmio64: None,
        };
        let e = tiny.split(&[(1, 1); 8]).unwrap_err();
        assert!(e.contains("8 PCI segments") && e.contains("32-bit"), "{e}");
        // The largest weights a configuration can give do not overflow: too little room.
        let e = w.split(&[(u32::MAX, u32::MAX); 96]).unwrap_err();
        assert!(e.contains("96 PCI segments"), "{e}");
        let e = w.split(&[(1, 1), (u32::MAX, 1)]).unwrap_err();
        assert!(e.contains("2 PCI segments") && e.contains("32-bit"), "{e}");
    }
}
