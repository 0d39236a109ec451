//! `--pmem`: the backing file mapped into the VMM (shared, or private with `discard_writes`),
//! and that mapping placed in the guest-physical address space as a KVM memory slot of its
//! own, at a range of the 64-bit PCI window. The range is not guest RAM: snapshots do not save
//! it (the file is its state) and live migration does not track it (the file must be shared
//! between the hosts).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{info, warn};
use virtio_devices::{Pmem, PmemRange};

use crate::config::{PmemConfig, PMEM_ALIGNMENT};
use crate::pci_setup::PciSetupError;
use crate::virtio_build::NewDevice;

/// KVM memory slots of pmem ranges are numbered from here, far above the RAM regions' and the
/// DIMMs' (`memory::memory_slots`) and below KVM's limit of 32764 user slots.
const PMEM_SLOT_BASE: u32 = 0x4000;

/// The file mapped into the VMM.
pub struct PmemMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory, not tied to a thread; only its address is shared.
unsafe impl Send for PmemMapping {}
// SAFETY: as above: the VMM never reads or writes through it, the guest does.
unsafe impl Sync for PmemMapping {}

impl Drop for PmemMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping `map` made, unmapped once, here.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// What a pmem device brings to its placement: the mapping and the range the device reports.
pub struct PmemBacking {
    pub mapping: PmemMapping,
    pub range: Arc<PmemRange>,
}

/// A placed range: the KVM slot, removed (before the mapping goes) when it is dropped.
pub struct PmemMemory {
    vm: Arc<dyn hypervisor::Vm>,
    pub(crate) slot: u32,
    pub(crate) gpa: u64,
    pub(crate) len: u64,
    mapping: PmemMapping,
}

impl PmemMemory {
    /// Registers `b`'s mapping at `gpa` as KVM slot `slot`.
    pub(crate) fn register(
        vm: &Arc<dyn hypervisor::Vm>,
        b: PmemBacking,
        slot: u32,
        gpa: u64,
    ) -> Result<Self, String> {
        let len = b.mapping.len as u64;
        // SAFETY: the mapping lives in the `PmemMemory` returned, whose drop removes the slot
        // before the mapping is unmapped (field order: `mapping` is dropped after `drop`).
        unsafe { vm.set_user_memory_region(slot, gpa, len, b.mapping.ptr as u64, false) }
            .map_err(|e| format!("cannot map {len:#x} bytes at {gpa:#x}: {e}"))?;
        b.range.start.store(gpa, Ordering::Release);
        Ok(PmemMemory {
            vm: vm.clone(),
            slot,
            gpa,
            len,
            mapping: b.mapping,
        })
    }
}

impl Drop for PmemMemory {
    fn drop(&mut self) {
        // SAFETY: a size of 0 deletes the slot; nothing is mapped from then on.
        let r = unsafe {
            self.vm
                .set_user_memory_region(self.slot, self.gpa, 0, self.mapping.ptr as u64, false)
        };
        if let Err(e) = r {
            warn!("pmem: cannot remove memory slot {}: {e}", self.slot);
        }
    }
}

/// The lowest pmem slot number none of `used` has.
pub(crate) fn free_slot(used: impl Iterator<Item = u32>) -> u32 {
    let used: std::collections::BTreeSet<u32> = used.collect();
    (PMEM_SLOT_BASE..)
        .find(|s| !used.contains(s))
        .unwrap_or(PMEM_SLOT_BASE)
}

/// The range's alignment in the guest-physical address space (huge pages in the guest).
pub(crate) const PMEM_RANGE_ALIGN: u64 = PMEM_ALIGNMENT;

/// The `--pmem` device `cfg` (named `id`): the file opened (read-only with `discard_writes`)
/// and mapped; the range is placed with the device.
pub fn pmem(cfg: &PmemConfig, id: String) -> Result<NewDevice, PciSetupError> {
    let err = |msg: String| PciSetupError::Device {
        option: "--pmem",
        value: cfg.file.display().to_string(),
        msg,
    };
    let size = cfg.mapped_size(&cfg.file).map_err(|e| err(e.msg))?;
    let dir = cfg.file.is_dir();
    let file = OpenOptions::new()
        .read(true)
        .write(!cfg.discard_writes || dir)
        .custom_flags(if dir { libc::O_TMPFILE } else { 0 })
        .open(&cfg.file)
        .map_err(|e| err(format!("cannot open: {e}")))?;
    if dir {
        file.set_len(size)
            .map_err(|e| err(format!("cannot size the temporary file: {e}")))?;
    }
    let mapping = map(&file, size, cfg.discard_writes).map_err(err)?;
    let range = Arc::new(PmemRange {
        start: Default::default(),
        size,
    });
    let flushed: Option<File> = (!cfg.discard_writes).then_some(file);
    info!(
        "--pmem: {} ({size:#x} bytes{})",
        cfg.file.display(),
        if cfg.discard_writes {
            ", writes discarded"
        } else {
            ""
        }
    );
    Ok(NewDevice {
        option: "--pmem",
        id,
        slot: cfg.pci_common.pci_device_id,
        segment: cfg.pci_common.pci_segment,
        dev: Box::new(Pmem::new(flushed, range.clone())),
        lock: None,
        image_type: None,
        pmem: Some(PmemBacking { mapping, range }),
        iommu: cfg.pci_common.iommu,
    })
}

/// Maps `size` bytes of `file`: shared (the guest's stores reach the file's pages), or private
/// (copy on write: the file never changes).
fn map(file: &File, size: u64, private: bool) -> Result<PmemMapping, String> {
    use std::os::fd::AsRawFd;
    let len = usize::try_from(size).map_err(|_| format!("{size} bytes: too large"))?;
    let flags = libc::MAP_NORESERVE
        | if private {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
    // SAFETY: a new mapping of the file, owned by the `PmemMapping` returned.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(format!("cannot map: {}", std::io::Error::last_os_error()));
    }
    Ok(PmemMapping { ptr, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_above_the_ram_ones() {
        assert_eq!(free_slot([].into_iter()), PMEM_SLOT_BASE);
        assert_eq!(
            free_slot([PMEM_SLOT_BASE, PMEM_SLOT_BASE + 2].into_iter()),
            PMEM_SLOT_BASE + 1
        );
    }

    #[test]
    fn private_mapping_leaves_the_file_alone() {
        let dir = std::env::temp_dir().join(format!("vmm-pmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p");
        std::fs::write(&path, vec![7u8; 2 << 20]).unwrap();
        for private in [true, false] {
            let f = OpenOptions::new()
                .read(true)
                .write(!private)
                .open(&path)
                .unwrap();
            let m = map(&f, 2 << 20, private).unwrap();
            // SAFETY: inside the 2 MiB mapping.
            unsafe { *(m.ptr as *mut u8).add(4096) = 9 };
            drop(m);
            let want = if private { 7 } else { 9 };
            assert_eq!(
                std::fs::read(&path).unwrap()[4096],
                want,
                "private={private}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
