//! `--numa`: the guest's NUMA nodes as the ACPI tables describe them (each node's vCPUs, the
//! regions of its memory zones and their virtio-mem regions, its distances), and the node a
//! zone's virtio-mem device names.

use arch::acpi::NumaNode;

use crate::config::VmConfig;
use crate::memory_zones;

/// The nodes of `cfg`, by id (the SLIT's order, as the original's); none without `--numa`.
///
/// `device`: where the device with a given id is (for generic initiators, `device_id`).
pub fn acpi_nodes(
    cfg: &VmConfig,
    device: impl Fn(&str) -> Option<(u16, u16)>,
) -> Result<Vec<NumaNode>, String> {
    let Some(nodes) = &cfg.numa else {
        return Ok(Vec::new());
    };
    let layout = memory_zones::layout(&cfg.memory);
    let mut out: Vec<NumaNode> = nodes
        .iter()
        .map(|n| {
            let initiators = match &n.device_id {
                Some(id) => vec![device(id).ok_or_else(|| {
                    format!(
                        "--numa guest_numa_id={}: device_id={id}: no PCI device of the VM has \
                         this id",
                        n.guest_numa_id
                    )
                })?],
                None => Vec::new(),
            };
            let zones = n.memory_zones.as_deref().unwrap_or_default();
            let of = |hotplug: bool| {
                layout
                    .iter()
                    .filter(|r| r.hotplug == hotplug)
                    .filter(|r| r.zone.as_ref().is_some_and(|z| zones.contains(z)))
                    .map(|r| (r.start.0, r.size))
                    .collect()
            };
            Ok(NumaNode {
                id: n.guest_numa_id,
                // APIC ID i is vCPU i (the MADT's numbering).
                cpus: n.cpus.clone().unwrap_or_default(),
                memory: of(false),
                hotplug: of(true),
                distances: n
                    .distances
                    .iter()
                    .flatten()
                    .map(|d| (d.destination, d.distance))
                    .collect(),
                initiators,
            })
        })
        .collect::<Result<_, String>>()?;
    out.sort_by_key(|n| n.id);
    Ok(out)
}

/// The guest NUMA node memory zone `zone` belongs to.
pub fn zone_node(cfg: &VmConfig, zone: &str) -> Option<u32> {
    cfg.numa.iter().flatten().find_map(|n| {
        n.memory_zones
            .iter()
            .flatten()
            .any(|z| z == zone)
            .then_some(n.guest_numa_id)
    })
}
