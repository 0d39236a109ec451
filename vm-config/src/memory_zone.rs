//! `--memory-zone`: guest RAM in zones of their own (`--memory size=0`), each with its own
//! backing (anonymous, shared memfd, a file, huge pages), host NUMA node and virtio-mem
//! hotplug region, as the original's. The zones are the RAM, laid out in the order given
//! (see docs/hotplug.md, "Memory zones").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{
    ConfigError, Extra, HotplugMethod, MemoryConfig, OptionParser, PAGE_SIZE, VIRTIO_MEM_BLOCK_SIZE,
};

/// The id of the memory a configuration without zones has (the original's default zone): its
/// virtio-mem device, with `--memory hotplug_method=virtio-mem,hotplug_size=`, is named so.
pub const DEFAULT_ZONE_ID: &str = "mem0";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryZoneConfig {
    pub id: String,
    pub size: u64,
    /// An existing file that backs the zone (the original's `file=`: shared=on maps it
    /// shared, so the guest's writes reach it; off maps it private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub hugepages: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepage_size: Option<u64>,
    /// The host NUMA node the zone's memory is bound to (mbind, MPOL_BIND).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_numa_node: Option<u32>,
    /// Bytes of a virtio-mem region of the zone's own (`vm.resize-zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<u64>,
    /// Bytes of `hotplug_size` plugged now (what a reboot asks the guest to plug again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplugged_size: Option<u64>,
    #[serde(default)]
    pub prefault: bool,
    #[serde(default)]
    pub reserve: bool,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

impl MemoryZoneConfig {
    pub const OPTION: &'static str = "--memory-zone";
    pub const KEYS: &'static [&'static str] = &[
        "id",
        "size",
        "file",
        "shared",
        "hugepages",
        "hugepage_size",
        "host_numa_node",
        "hotplug_size",
        "hotplugged_size",
        "prefault",
        "reserve",
        "mergeable",
    ];

    /// One `--memory-zone` value; `mergeable` is `--memory`'s, the default of the zone's own
    /// (as the original's).
    pub fn parse(raw: &str, mergeable: bool) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        let id = p.get("id").ok_or_else(|| p.error("id is missing"))?;
        let zone = MemoryZoneConfig {
            id,
            size: p.size("size")?.unwrap_or(512 << 20),
            file: p.get("file").map(PathBuf::from),
            mergeable: p.toggle("mergeable", mergeable)?,
            shared: p.toggle("shared", false)?,
            hugepages: p.toggle("hugepages", false)?,
            hugepage_size: p.size("hugepage_size")?,
            host_numa_node: p.number("host_numa_node")?,
            hotplug_size: p.size("hotplug_size")?,
            hotplugged_size: p.size("hotplugged_size")?,
            prefault: p.toggle("prefault", false)?,
            reserve: p.toggle("reserve", false)?,
            extra: Default::default(),
        };
        zone.validate().map_err(|m| p.error(m))?;
        Ok(zone)
    }

    /// The zone's own rules (those between zones and with `--memory` are
    /// `MemoryConfig::validate_zones`').
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("id is missing".into());
        }
        if self.size == 0 {
            return Err("size must not be zero".into());
        }
        let align = match (self.hugepages, self.hugepage_size) {
            (_, Some(hp)) if !self.hugepages => {
                return Err(format!("hugepage_size={hp} needs hugepages=on"))
            }
            (true, Some(hp)) if !hp.is_power_of_two() || hp < PAGE_SIZE => {
                return Err(format!("hugepage_size {hp} is not a power of two"))
            }
            (true, Some(hp)) => hp,
            (true, None) => 2 << 20,
            (false, _) => PAGE_SIZE,
        };
        if !self.size.is_multiple_of(align) {
            return Err(format!(
                "size {} is not a multiple of the zone's page size ({align} bytes)",
                self.size
            ));
        }
        if self.shared && self.mergeable {
            return Err("shared=on and mergeable=on do not go together".into());
        }
        if self.file.is_some() && self.hugepages {
            return Err(
                "file= and hugepages=on do not go together (a file on hugetlbfs \
                        backs the zone with huge pages)"
                    .into(),
            );
        }
        if self.shared && self.file.is_some() && self.host_numa_node.is_some() {
            // As the original: the policy cannot bind a shared file's page cache.
            return Err("host_numa_node with a shared file= is not supported".into());
        }
        crate::check_hotplug(
            self.hotplug_size,
            self.hotplugged_size,
            (VIRTIO_MEM_BLOCK_SIZE, "2 MiB"),
            self.hugepages,
        )?;
        Ok(())
    }

    /// The zone as its `--memory-zone` value names it in errors.
    pub fn shown(&self) -> String {
        format!("id={},size={}", self.id, self.size)
    }
}

/// The `zone_updates` of a restore or a received migration (`[{"id", "host_numa_node"}]`):
/// the new host NUMA node of each zone named, checked as the original checks them (ids
/// given, each once).
pub fn zone_updates(values: &[serde_json::Value]) -> Result<Vec<(String, u32)>, String> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for v in values {
        let id = v.get("id").and_then(|i| i.as_str()).unwrap_or_default();
        if id.is_empty() {
            return Err(
                "zone_updates: at least one memory zone update with an empty ID was defined".into(),
            );
        }
        let node = v
            .get("host_numa_node")
            .and_then(|n| n.as_u64())
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("zone_updates: {id}: host_numa_node is not a node number"))?;
        if out.iter().any(|(i, _)| i == id) {
            return Err(format!(
                "zone_updates: multiple updates for the same zone defined ({id})"
            ));
        }
        out.push((id.to_string(), node));
    }
    Ok(out)
}

/// `memory.zones` as the JSON gives it, an empty list (or null) as none.
pub(crate) fn none_if_empty<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<MemoryZoneConfig>>, D::Error> {
    let zones: Option<Vec<MemoryZoneConfig>> = Deserialize::deserialize(d)?;
    Ok(zones.filter(|z| !z.is_empty()))
}

impl MemoryConfig {
    /// Bytes of RAM the guest boots with: the zones' sizes, or `size` without zones.
    pub fn ram_size(&self) -> u64 {
        match &self.zones {
            Some(z) => z.iter().map(|z| z.size).sum(),
            None => self.size,
        }
    }

    /// Bytes that can be hot-plugged: the zones' `hotplug_size`s, or `hotplug_size`.
    pub fn hotplug_total(&self) -> u64 {
        match &self.zones {
            Some(z) => z.iter().filter_map(|z| z.hotplug_size).sum(),
            None => self.hotplug_size.unwrap_or(0),
        }
    }

    /// Bytes plugged now, in every zone (or of `hotplug_size`).
    pub fn hotplugged_total(&self) -> u64 {
        match &self.zones {
            Some(z) => z.iter().filter_map(|z| z.hotplugged_size).sum(),
            None => self.hotplugged_size.unwrap_or(0),
        }
    }

    /// Whether every byte of guest RAM is a shared mapping of a file another process can map
    /// (vhost-user backends, local migration): `shared=on` or `hugepages=on` everywhere.
    pub fn all_shared(&self) -> bool {
        match &self.zones {
            Some(z) => z.iter().all(|z| z.shared || z.hugepages),
            None => self.shared || self.hugepages,
        }
    }

    /// Moves the zones `updates` names to their new host NUMA node (a restore's or a
    /// received migration's `zone_updates`); a zone the VM lacks is an error.
    pub fn apply_zone_updates(&mut self, updates: &[(String, u32)]) -> Result<(), String> {
        for (id, node) in updates {
            let zone = self
                .zones
                .iter_mut()
                .flatten()
                .find(|z| z.id == *id)
                .ok_or_else(|| format!("zone_updates: the VM has no memory zone {id}"))?;
            zone.host_numa_node = Some(*node);
        }
        Ok(())
    }

    /// Whether any guest RAM is `shared=on`.
    pub fn any_shared(&self) -> bool {
        match &self.zones {
            Some(z) => z.iter().any(|z| z.shared),
            None => self.shared,
        }
    }

    /// Whether any guest RAM is `hugepages=on`.
    /// Whether any of the RAM is populated when it is mapped (`prefault=on`, here or in a
    /// zone).
    pub fn any_prefault(&self) -> bool {
        self.prefault || self.zones.iter().flatten().any(|z| z.prefault)
    }

    pub fn any_hugepages(&self) -> bool {
        match &self.zones {
            Some(z) => z.iter().any(|z| z.hugepages),
            None => self.hugepages,
        }
    }

    /// The zones against each other and `--memory`, as the original: zones and a non-zero
    /// `size` exclude each other, ids are unique, and a zone's `hotplug_size` needs
    /// `hotplug_method=virtio-mem`. Without zones nothing is checked here. A zone's error
    /// names it as `id=<id>,size=<bytes>`.
    pub fn validate_zones(&self) -> Result<(), ConfigError> {
        self.zone_problem(|i| {
            self.zones
                .as_deref()
                .and_then(|z| z.get(i))
                .map(MemoryZoneConfig::shown)
                .unwrap_or_default()
        })
    }

    /// `validate_zones`, for the command line: a zone's error names the value given for it.
    pub(crate) fn validate_zones_as_given(&self, given: &[&str]) -> Result<(), ConfigError> {
        self.zone_problem(|i| given.get(i).map(|s| s.to_string()).unwrap_or_default())
    }

    /// The first problem of the zones, a zone's named by `shown(its index)`.
    fn zone_problem(&self, shown: impl Fn(usize) -> String) -> Result<(), ConfigError> {
        let Some(zones) = &self.zones else {
            return Ok(());
        };
        let memory = |msg: &str| ConfigError::new(MemoryConfig::OPTION, "", msg.into());
        if zones.is_empty() {
            return Err(memory(
                "size=0 needs at least one --memory-zone (zones are the RAM then)",
            ));
        }
        if self.size != 0 {
            return Err(ConfigError::new(
                MemoryZoneConfig::OPTION,
                &shown(0),
                format!(
                    "needs --memory size=0 (the zones are the RAM), not size={}",
                    self.size
                ),
            ));
        }
        for (key, set) in [
            ("hotplug_size", self.hotplug_size.is_some()),
            ("hotplugged_size", self.hotplugged_size.is_some()),
            ("shared", self.shared),
            ("hugepages", self.hugepages),
            ("hugepage_size", self.hugepage_size.is_some()),
            ("prefault", self.prefault),
            ("reserve", self.reserve),
        ] {
            if set {
                return Err(memory(&format!(
                    "{key} does not apply with --memory-zone: give it to each zone"
                )));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        let mut end = 0u64;
        for (i, z) in zones.iter().enumerate() {
            let err = |msg: String| ConfigError::new(MemoryZoneConfig::OPTION, &shown(i), msg);
            z.validate().map_err(err)?;
            z.extra.check("memory.zones")?;
            if !ids.insert(z.id.as_str()) {
                return Err(err(format!("the zone id {} is used twice", z.id)));
            }
            if z.hotplug_size.is_some() && self.hotplug_method != HotplugMethod::VirtioMem {
                return Err(err(
                    "hotplug_size needs --memory hotplug_method=virtio-mem \
                                (zones are resized by virtio-mem)"
                        .into(),
                ));
            }
            end = end
                .saturating_add(z.size)
                .saturating_add(z.hotplug_size.unwrap_or(0));
        }
        if end > (1u64 << 46) {
            return Err(memory(
                "the zones (with their hotplug_size) are larger than the guest address space",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "memory_zone_tests.rs"]
mod tests;
