//! The guest's NUMA nodes (`--numa`) as the original describes them: the SRAT (System
//! Resource Affinity Table: each node's vCPUs as x2APIC affinity structures, its RAM and its
//! hot-pluggable memory as memory affinity structures) and the SLIT (System Locality
//! Information Table: the distances between nodes, 10 to itself).

use super::sdt;

/// One guest NUMA node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NumaNode {
    /// Its proximity domain (`guest_numa_id`).
    pub id: u32,
    /// The APIC IDs of its vCPUs.
    pub cpus: Vec<u32>,
    /// Its RAM, `(guest address, bytes)`.
    pub memory: Vec<(u64, u64)>,
    /// Its memory that can be hot-plugged (virtio-mem regions), `(guest address, bytes)`.
    pub hotplug: Vec<(u64, u64)>,
    /// Distances to other nodes, `(node, distance)`.
    pub distances: Vec<(u32, u8)>,
    /// PCI functions that are generic initiators of this node (`--numa device_id=`):
    /// `(segment, requester id)`.
    pub initiators: Vec<(u16, u16)>,
}

const MEM_ENABLED: u32 = 1;
const MEM_HOT_PLUGGABLE: u32 = 1 << 1;
const CPU_ENABLED: u32 = 1;
const GI_ENABLED: u32 = 1;
/// The distance of a node to itself, and of an unstated pair (ACPI: 10 is local).
const LOCAL: u8 = 10;
const REMOTE: u8 = 20;

/// A Memory Affinity Structure (type 1, 40 bytes).
fn memory_affinity(out: &mut Vec<u8>, node: u32, (base, len): (u64, u64), flags: u32) {
    out.extend_from_slice(&[1, 40]);
    out.extend_from_slice(&node.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// A Processor Local x2APIC Affinity Structure (type 2, 24 bytes).
fn x2apic_affinity(out: &mut Vec<u8>, node: u32, apic_id: u32) {
    out.extend_from_slice(&[2, 24, 0, 0]);
    out.extend_from_slice(&node.to_le_bytes());
    out.extend_from_slice(&apic_id.to_le_bytes());
    out.extend_from_slice(&CPU_ENABLED.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // clock domain
    out.extend_from_slice(&[0; 4]);
}

/// A Generic Initiator Affinity Structure (type 5, 32 bytes) for a PCI function: device
/// handle type 1, the handle its segment (2 bytes), bus (byte 2) and device and function
/// (byte 3), as ACPI 6.3 lays it out; enabled.
fn generic_initiator(out: &mut Vec<u8>, node: u32, (segment, rid): (u16, u16)) {
    out.extend_from_slice(&[5, 32, 0, 1]);
    out.extend_from_slice(&node.to_le_bytes());
    out.extend_from_slice(&segment.to_le_bytes());
    out.extend_from_slice(&[(rid >> 8) as u8, rid as u8]);
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&GI_ENABLED.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
}

pub(super) fn build_srat(nodes: &[NumaNode]) -> Vec<u8> {
    // Reserved: 4 bytes "1" (for backward compatibility), 8 bytes 0.
    let mut body = 1u32.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 8]);
    for n in nodes {
        for &r in &n.memory {
            memory_affinity(&mut body, n.id, r, MEM_ENABLED);
        }
        for &r in &n.hotplug {
            memory_affinity(&mut body, n.id, r, MEM_ENABLED | MEM_HOT_PLUGGABLE);
        }
        for &c in &n.cpus {
            x2apic_affinity(&mut body, n.id, c);
        }
        for &f in &n.initiators {
            generic_initiator(&mut body, n.id, f);
        }
    }
    sdt(*b"SRAT", 3, &body)
}

/// The distance from `a` to `b`: stated by `a`, else by `b` (distances are symmetric unless
/// said otherwise), else 20.
fn distance(nodes: &[NumaNode], a: &NumaNode, b: &NumaNode) -> u8 {
    if a.id == b.id {
        return LOCAL;
    }
    let stated = |from: &NumaNode, to: u32| {
        from.distances
            .iter()
            .find(|(d, _)| *d == to)
            .map(|&(_, v)| v)
    };
    stated(a, b.id)
        .or_else(|| {
            nodes
                .iter()
                .find(|n| n.id == b.id)
                .and_then(|b| stated(b, a.id))
        })
        .unwrap_or(REMOTE)
}

/// The SLIT, localities in the order of `nodes` (by node id, as the original).
pub(super) fn build_slit(nodes: &[NumaNode]) -> Vec<u8> {
    let mut body = (nodes.len() as u64).to_le_bytes().to_vec();
    for a in nodes {
        for b in nodes {
            body.push(distance(nodes, a, b));
        }
    }
    sdt(*b"SLIT", 1, &body)
}
