//! `--numa guest_numa_id=<n>,cpus=<list>,distances=[<node>@<distance>,...],memory_zones=<list>`:
//! the guest's NUMA nodes, as the original's, described to it in the ACPI SRAT and SLIT (a
//! zone's virtio-mem device names its node; `pci_segments` give its host bridges a `_PXM`).
//! `device_id=<id>`: a node of one PCI device and nothing else (an ACPI generic initiator, a GPU
//! or accelerator that starts memory requests of its own), named by its id; the VMM finds its
//! address once the devices are placed (docs/platform.md).

use serde::{Deserialize, Serialize};

use crate::parser::int_list;
use crate::{ConfigError, Extra, OptionParser};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaDistance {
    #[serde(default)]
    pub destination: u32,
    #[serde(default)]
    pub distance: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaConfig {
    pub guest_numa_id: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distances: Option<Vec<NumaDistance>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_zones: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_segments: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

/// `[a,b]` (or without brackets) as strings.
fn string_list(raw: &str) -> Vec<String> {
    let body = raw.trim();
    let body = body
        .strip_prefix('[')
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(body);
    body.split(',').map(|s| s.trim().to_string()).collect()
}

impl NumaConfig {
    pub const OPTION: &'static str = "--numa";
    pub const KEYS: &'static [&'static str] = &[
        "guest_numa_id",
        "cpus",
        "distances",
        "device_id",
        "memory_zones",
        "pci_segments",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        let guest_numa_id = p
            .number("guest_numa_id")?
            .ok_or_else(|| p.error("guest_numa_id is required for all NUMA nodes"))?;
        let list = |key: &str, max: u32| -> Result<Option<Vec<u32>>, ConfigError> {
            p.get(key)
                .map(|v| int_list(&v, max).map_err(|m| p.error(format!("{key}: {m}"))))
                .transpose()
        };
        // CPU numbers below the most vCPUs a VM can have; segment numbers are 16-bit.
        let cpus = list("cpus", crate::MAX_VCPUS - 1)?;
        let pci_segments = list("pci_segments", u16::MAX.into())?
            .map(|s| s.into_iter().map(|n| n as u16).collect());
        let distances = p
            .get("distances")
            .map(|v| {
                string_list(&v)
                    .into_iter()
                    .map(|t| {
                        let bad = || {
                            p.error(format!(
                                "distances: '{t}' is not <node>@<distance> (a distance of \
                                 0-255)"
                            ))
                        };
                        let (d, n) = t.split_once('@').ok_or_else(bad)?;
                        Ok(NumaDistance {
                            destination: d.parse().map_err(|_| bad())?,
                            distance: n.parse().map_err(|_| bad())?,
                        })
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()
            })
            .transpose()?;
        let cfg = NumaConfig {
            guest_numa_id,
            cpus,
            distances,
            memory_zones: p.get("memory_zones").map(|v| string_list(&v)),
            pci_segments,
            device_id: p.get("device_id"),
            extra: Default::default(),
        };
        cfg.validate().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// The node's own rules (the original's).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = &self.device_id {
            if self.cpus.is_some() || self.memory_zones.is_some() {
                return Err(
                    "device_id in numa config is mutually exclusive with cpus and memory_zones"
                        .into(),
                );
            }
            if d.is_empty() {
                return Err("device_id in numa config cannot be empty".into());
            }
            return Ok(());
        }
        match (&self.cpus, &self.memory_zones) {
            (None, None) => {
                Err("numa config must specify either device_id or cpus/memory_zones".into())
            }
            (Some(c), _) if c.is_empty() => Err("cpus list in numa config cannot be empty".into()),
            (_, Some(z)) if z.is_empty() || z.iter().any(String::is_empty) => {
                Err("memory_zones in numa config cannot be empty".into())
            }
            _ => Ok(()),
        }
    }

    /// The node as errors name it.
    pub fn shown(&self) -> String {
        format!("guest_numa_id={}", self.guest_numa_id)
    }
}

/// The nodes against each other and the rest of the VM, as the original: ids once, each zone
/// in one node and known, each vCPU below `max_vcpus` and in one node, distances to nodes
/// that exist, once each, each PCI segment one of the VM's `num_segments` and in one node
/// (segment 0 only in node 0).
pub fn validate_nodes(
    nodes: &[NumaConfig],
    zones: &[&str],
    max_vcpus: u32,
    num_segments: u16,
) -> Result<(), ConfigError> {
    let mut segment_node = std::collections::BTreeMap::new();
    let mut ids = std::collections::BTreeSet::new();
    let mut zone_node = std::collections::BTreeMap::new();
    let mut cpu_node = std::collections::BTreeMap::new();
    for n in nodes {
        let err = |msg: String| ConfigError::new(NumaConfig::OPTION, &n.shown(), msg);
        n.validate().map_err(err)?;
        n.extra.check("numa")?;
        if !ids.insert(n.guest_numa_id) {
            return Err(err("this NUMA node is defined twice".into()));
        }
        for z in n.memory_zones.iter().flatten() {
            if !zones.contains(&z.as_str()) {
                return Err(err(format!(
                    "memory_zones: no --memory-zone has the id {z}"
                )));
            }
            if let Some(other) = zone_node.insert(z.clone(), n.guest_numa_id) {
                return Err(err(format!(
                    "memory zone {z} belongs to multiple NUMA nodes: {other} and {}",
                    n.guest_numa_id
                )));
            }
        }
        for &c in n.cpus.iter().flatten() {
            if c >= max_vcpus {
                return Err(err(format!(
                    "cpus: vCPU {c} is not below max_vcpus ({max_vcpus})"
                )));
            }
            if let Some(other) = cpu_node.insert(c, n.guest_numa_id) {
                return Err(err(format!(
                    "vCPU {c} belongs to multiple NUMA nodes: {other} and {}",
                    n.guest_numa_id
                )));
            }
        }
        for &s in n.pci_segments.iter().flatten() {
            if s >= num_segments {
                return Err(err(format!(
                    "pci_segments: segment {s}: {}",
                    crate::devices::segment_error(num_segments)
                )));
            }
            if s == 0 && n.guest_numa_id != 0 {
                return Err(err(
                    "pci_segments: segment 0 can only belong to NUMA node 0".into(),
                ));
            }
            if let Some(other) = segment_node.insert(s, n.guest_numa_id) {
                return Err(err(format!(
                    "PCI segment {s} belongs to multiple NUMA nodes: {other} and {}",
                    n.guest_numa_id
                )));
            }
        }
        let mut dests = std::collections::BTreeSet::new();
        for d in n.distances.iter().flatten() {
            if !nodes.iter().any(|o| o.guest_numa_id == d.destination) {
                return Err(err(format!(
                    "distances: unknown destination NUMA node {}",
                    d.destination
                )));
            }
            if !dests.insert(d.destination) {
                return Err(err(format!(
                    "distances: destination NUMA node {} has been already set",
                    d.destination
                )));
            }
            if d.destination == n.guest_numa_id && d.distance != 10 {
                return Err(err(format!(
                    "distances: a node's distance to itself is 10 (ACPI), not {}",
                    d.distance
                )));
            }
            if d.destination != n.guest_numa_id && d.distance <= 10 {
                return Err(err(format!(
                    "distances: {}@{}: a distance to another node is above 10 (ACPI)",
                    d.destination, d.distance
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "numa_tests.rs"]
mod tests;
