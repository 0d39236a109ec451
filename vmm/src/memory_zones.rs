//! Where each piece of guest RAM lies and what backs it: `--memory` alone (RAM around the
//! 32-bit hole, then the hotplug region), or `--memory-zone`s laid out in the order given,
//! as the original lays them out: each zone continues where the previous one ended, a zone
//! that reaches the 32-bit hole continues at 4 GiB (two regions, one backing), and each
//! zone's virtio-mem region follows the RAM, one after the other, from the first GiB
//! boundary above RAM and 4 GiB. Also the zones' own backings: a file (`file=`) and a host
//! NUMA node (`host_numa_node=`, bound with `mbind`).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use arch::layout;
use log::info;
use vm_memory::{FileOffset, GuestAddress};

use crate::config::{MemoryConfig, MemoryZoneConfig};
use crate::memory::MemoryError;

/// One region of guest memory to map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    pub start: GuestAddress,
    pub size: u64,
    /// How it is backed: `--memory`'s options, or the zone's as a `MemoryConfig`.
    pub backing: MemoryConfig,
    /// The zone's `file=` and this region's offset in it.
    pub file: Option<(PathBuf, u64)>,
    /// The zone's `host_numa_node`.
    pub numa: Option<u32>,
    /// The zone it belongs to (`None`: `--memory` without zones).
    pub zone: Option<String>,
    /// Whether it is (part of) a hotplug region rather than boot RAM.
    pub hotplug: bool,
}

impl RegionSpec {
    /// What errors call the region: `--memory` or `--memory-zone id=<id>`.
    pub fn option(&self) -> String {
        match &self.zone {
            Some(id) => format!("--memory-zone id={id}"),
            None => "--memory".into(),
        }
    }
}

/// A zone's backing options as a `MemoryConfig` (what `memory::ram_region` reads).
fn zone_backing(cfg: &MemoryConfig, z: &MemoryZoneConfig) -> MemoryConfig {
    MemoryConfig {
        size: z.size,
        mergeable: z.mergeable,
        shared: z.shared,
        hugepages: z.hugepages,
        hugepage_size: z.hugepage_size,
        prefault: z.prefault,
        reserve: z.reserve,
        thp: cfg.thp,
        ..MemoryConfig::default()
    }
}

/// Every region of guest memory `cfg` asks for, in guest-physical order.
pub fn layout(cfg: &MemoryConfig) -> Vec<RegionSpec> {
    let Some(zones) = &cfg.zones else {
        let mut out: Vec<RegionSpec> = layout::ram_regions(cfg.size)
            .into_iter()
            .map(|(start, size)| RegionSpec {
                start,
                size,
                backing: cfg.clone(),
                file: None,
                numa: None,
                zone: None,
                hotplug: false,
            })
            .collect();
        if let Some((start, size)) = layout::hotplug_region(cfg.size, cfg.hotplug_total()) {
            out.push(RegionSpec {
                start,
                size,
                // Nothing is plugged yet: no pages are faulted in up front.
                backing: MemoryConfig {
                    prefault: false,
                    ..cfg.clone()
                },
                file: None,
                numa: None,
                zone: None,
                hotplug: true,
            });
        }
        return out;
    };
    let ram = cfg.ram_size();
    let mut out = Vec::new();
    let mut zone = zones.iter();
    let mut current = zone.next();
    let mut offset = 0u64;
    for (start, len) in layout::ram_regions(ram) {
        let mut at = 0u64;
        while at < len {
            let Some(z) = current else { break };
            let take = (z.size - offset).min(len - at);
            out.push(RegionSpec {
                start: GuestAddress(start.0 + at),
                size: take,
                backing: zone_backing(cfg, z),
                file: z.file.clone().map(|f| (f, offset)),
                numa: z.host_numa_node,
                zone: Some(z.id.clone()),
                hotplug: false,
            });
            at += take;
            offset += take;
            if offset == z.size {
                current = zone.next();
                offset = 0;
            }
        }
    }
    if let Some((mut base, _)) = layout::hotplug_region(ram, cfg.hotplug_total()) {
        for z in zones {
            let Some(size) = z.hotplug_size else { continue };
            out.push(RegionSpec {
                start: base,
                size,
                backing: MemoryConfig {
                    prefault: false,
                    ..zone_backing(cfg, z)
                },
                // The plugged memory is the VMM's own, as the original's (a file holds the
                // zone's boot RAM only).
                file: None,
                numa: z.host_numa_node,
                zone: Some(z.id.clone()),
                hotplug: true,
            });
            base = GuestAddress(base.0 + size);
        }
    }
    out
}

/// The hotplug region of zone `id`: `(start, size)`.
pub fn zone_hotplug_region(cfg: &MemoryConfig, id: &str) -> Option<(GuestAddress, u64)> {
    layout(cfg)
        .into_iter()
        .find(|r| r.hotplug && r.zone.as_deref() == Some(id))
        .map(|r| (r.start, r.size))
}

/// The zone's backing file at the region's offset, opened for what the mapping needs
/// (writing for a shared one), checked to hold the whole region.
pub fn open_file(spec: &RegionSpec) -> Result<Option<FileOffset>, MemoryError> {
    let Some((path, offset)) = &spec.file else {
        return Ok(None);
    };
    let err = |msg: String| MemoryError::ZoneFile {
        option: spec.option(),
        path: path.display().to_string(),
        msg,
    };
    if path.is_dir() {
        return Err(err(
            "is a directory; a memory zone needs a file (the original refuses one too)".into(),
        ));
    }
    let file: File = OpenOptions::new()
        .read(true)
        .write(spec.backing.shared)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len < offset + spec.size {
        return Err(err(format!(
            "holds {len} bytes, the zone needs {} (the file is not grown)",
            offset + spec.size
        )));
    }
    Ok(Some(FileOffset::new(file, *offset)))
}

/// Whether the host has NUMA node `node`.
fn host_has_node(node: u32) -> bool {
    Path::new(&format!("/sys/devices/system/node/node{node}")).exists()
}

const MPOL_BIND: libc::c_long = 2;
const MPOL_MF_STRICT: libc::c_ulong = 1;
const MPOL_MF_MOVE: libc::c_ulong = 1 << 1;

/// Binds `[addr, addr + len)` to host NUMA node `node` (MPOL_BIND), moving any page already
/// there, as the original does.
pub fn bind_to_node(spec: &RegionSpec, addr: *mut u8, node: u32) -> Result<(), MemoryError> {
    let err = |msg: String| MemoryError::Numa {
        option: spec.option(),
        node,
        msg,
    };
    if !host_has_node(node) {
        return Err(err(format!(
            "the host has no NUMA node {node} (see /sys/devices/system/node)"
        )));
    }
    let mut mask = vec![0u64; node as usize / 64 + 1];
    mask[node as usize / 64] |= 1 << (node % 64);
    // The kernel reads one bit less than `maxnode` says.
    let maxnode = u64::from(node) + 2;
    // SAFETY: mbind only changes the memory policy of a mapping we own (`addr`, `len` is the
    // region just mapped); `mask` holds `maxnode - 1` bits and outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            spec.size,
            MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            MPOL_MF_STRICT | MPOL_MF_MOVE,
        )
    };
    if ret != 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    info!(
        "{}: guest {:#x}+{:#x} bound to host NUMA node {node}",
        spec.option(),
        spec.start.0,
        spec.size
    );
    Ok(())
}

/// Binds every zone of `cfg` with a `host_numa_node` in `mem` (guest RAM a restore or a local
/// migration mapped from files, not made by `create_guest_memory`, which binds as it maps).
pub fn bind_all(
    mem: &guest_memory::GuestMemoryMmap,
    cfg: &MemoryConfig,
) -> Result<(), MemoryError> {
    use vm_memory::GuestMemoryBackend;
    for spec in layout(cfg) {
        let Some(node) = spec.numa else { continue };
        let host = mem
            .get_host_address(spec.start)
            .map_err(|e| MemoryError::Regions(format!("{:#x}: {e}", spec.start.0)))?;
        bind_to_node(&spec, host, node)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "memory_zones_tests.rs"]
mod tests;
