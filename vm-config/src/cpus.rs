//! `--cpus boot=,max=,topology=,max_phys_bits=,affinity=,nested=,core_scheduling=,...`: how
//! many vCPUs, how the guest sees them, and where their threads may run.

use serde::{Deserialize, Serialize};

use crate::{default_true, ConfigError, Extra, OptionParser, MAX_VCPUS};

const DEFAULT_MAX_PHYS_BITS: u8 = 46;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    pub threads_per_core: u8,
    pub cores_per_die: u8,
    pub dies_per_package: u8,
    pub packages: u8,
}

/// One vCPU's host CPUs, as the original's `CpuAffinity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuAffinity {
    pub vcpu: u32,
    pub host_cpus: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<CpuTopology>,
    #[serde(default)]
    pub kvm_hyperv: bool,
    #[serde(default = "default_max_phys_bits")]
    pub max_phys_bits: u8,
    /// The host CPUs each listed vCPU's thread may run on (`affinity=[<vcpu>@[<cpus>],...]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<CpuAffinity>>,
    /// Only the default (no AMX for the guest).
    #[serde(default)]
    pub features: CpuFeatures,
    /// The guest sees virtualisation extensions (VMX, SVM) as the host offers them; false hides them.
    #[serde(default = "default_true")]
    pub nested: bool,
    #[serde(default)]
    pub profile: CpuProfile,
    /// Which vCPU threads may share a physical core's SMT siblings (Linux core scheduling).
    #[serde(default)]
    pub core_scheduling: CoreScheduling,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: Extra,
}

fn default_max_phys_bits() -> u8 {
    DEFAULT_MAX_PHYS_BITS
}

/// The original's optional CPU features (`features=`); none is supported yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    #[serde(default)]
    pub amx: bool,
}

/// Linux core scheduling for the vCPU threads, as the original's `core_scheduling=`: `Vm`
/// (the default) gives all of a VM's vCPUs one cookie, so only they share a core's SMT
/// siblings; `Vcpu` gives each its own; `Off` sets none. Where the kernel has no core
/// scheduling the VMM warns and runs without it, as the original does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CoreScheduling {
    #[default]
    Vm,
    Vcpu,
    Off,
}

/// The original's CPU profiles: `Host` (the host's CPUID as KVM offers it) is its only one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuProfile {
    #[default]
    Host,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            extra: Default::default(),
            boot_vcpus: 1,
            max_vcpus: 1,
            topology: None,
            kvm_hyperv: false,
            max_phys_bits: DEFAULT_MAX_PHYS_BITS,
            affinity: None,
            features: CpuFeatures::default(),
            nested: true,
            profile: CpuProfile::Host,
            core_scheduling: CoreScheduling::Vm,
        }
    }
}

impl CpusConfig {
    pub const OPTION: &'static str = "--cpus";
    pub const KEYS: &'static [&'static str] = &[
        "boot",
        "max",
        "topology",
        "kvm_hyperv",
        "max_phys_bits",
        "affinity",
        "features",
        "nested",
        "core_scheduling",
        "profile",
    ];

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, Self::KEYS, &[])?;
        p.refuse(&["features"])?;
        let core_scheduling = match p.get("core_scheduling").map(|m| m.to_ascii_lowercase()) {
            None => CoreScheduling::Vm,
            Some(m) if m == "vm" => CoreScheduling::Vm,
            Some(m) if m == "vcpu" => CoreScheduling::Vcpu,
            Some(m) if m == "off" => CoreScheduling::Off,
            Some(m) => return Err(p.error(format!("core_scheduling={m}: must be vm, vcpu or off"))),
        };
        // `profile=Host` (the host's CPUID as KVM offers it) is the original's only profile.
        if let Some(profile) = p.get("profile") {
            if profile != "Host" {
                return Err(p.error(format!("profile={profile}: the only profile is Host")));
            }
        }
        let boot_vcpus: u32 = p.number("boot")?.unwrap_or(1);
        let max_vcpus: u32 = p.number("max")?.unwrap_or(boot_vcpus);
        let topology = p
            .get("topology")
            .map(|t| {
                let parts: Vec<Option<u8>> = t.split(':').map(|n| n.parse().ok()).collect();
                match parts[..] {
                    [Some(a), Some(b), Some(c), Some(d)] if a > 0 && b > 0 && c > 0 && d > 0 => {
                        Ok(CpuTopology {
                            threads_per_core: a,
                            cores_per_die: b,
                            dies_per_package: c,
                            packages: d,
                        })
                    }
                    _ => Err(p.error(format!(
                        "topology '{t}' must be threads:cores:dies:packages, each at least 1"
                    ))),
                }
            })
            .transpose()?;
        let cfg = CpusConfig {
            extra: Default::default(),
            boot_vcpus,
            max_vcpus,
            topology,
            kvm_hyperv: p.toggle("kvm_hyperv", false)?,
            max_phys_bits: p.number("max_phys_bits")?.unwrap_or(DEFAULT_MAX_PHYS_BITS),
            affinity: affinity(&p)?,
            features: CpuFeatures::default(),
            nested: p.toggle("nested", true)?,
            profile: CpuProfile::Host,
            core_scheduling,
        };
        cfg.validate().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.boot_vcpus == 0 {
            return Err("boot must be at least 1".into());
        }
        if self.boot_vcpus > self.max_vcpus {
            return Err(format!(
                "boot ({}) must not exceed max ({})",
                self.boot_vcpus, self.max_vcpus
            ));
        }
        if self.max_vcpus > MAX_VCPUS {
            return Err(format!("max must be at most {MAX_VCPUS}"));
        }
        if let Some(t) = self.topology {
            if t.threads_per_core > 2 {
                return Err("topology: at most 2 threads per core".into());
            }
            let total = u32::from(t.threads_per_core)
                * u32::from(t.cores_per_die)
                * u32::from(t.dies_per_package)
                * u32::from(t.packages);
            if total != self.max_vcpus {
                return Err(format!(
                    "topology describes {total} vCPUs but max is {}",
                    self.max_vcpus
                ));
            }
        }
        if !(32..=64).contains(&self.max_phys_bits) {
            return Err("max_phys_bits must be between 32 and 64".into());
        }
        if self.kvm_hyperv {
            return Err("kvm_hyperv=on is not supported yet".into());
        }
        let entries = self
            .affinity
            .iter()
            .flatten()
            .map(|a| (a.vcpu, a.host_cpus.as_slice()));
        crate::affinity::check("affinity", "vCPU", entries, (self.max_vcpus, "max"))?;
        if self.features.amx {
            return Err("features=amx is not supported yet".into());
        }
        Ok(())
    }
}

/// `affinity=[<vcpu>@[<host cpus>],...]`.
fn affinity(p: &OptionParser) -> Result<Option<Vec<CpuAffinity>>, ConfigError> {
    Ok(crate::affinity::parse(p, "affinity", "vCPU")?.map(|list| {
        list.into_iter()
            .map(|(vcpu, host_cpus)| CpuAffinity { vcpu, host_cpus })
            .collect()
    }))
}
