//! `--cpus affinity=[<vcpu>@[<host cpus>],...]` (the original's): each listed vCPU's thread
//! runs only on its host CPUs. The sets are checked when the VM is built, against the CPUs this
//! VMM may run on, so a set that could never run fails the boot naming the vCPU; each vCPU
//! thread then pins itself before it first enters the guest (`sched_setaffinity`, which its
//! seccomp filter allows only when it has a set). vCPUs not listed run where the VMM runs.

use std::collections::BTreeMap;

pub use seccomp::CpuSet;
use vm_config::CpuAffinity;

/// The sets of the vCPUs `affinity=` lists, by vCPU id.
#[derive(Clone, Default)]
pub struct VcpuAffinity(BTreeMap<u32, CpuSet>);

impl VcpuAffinity {
    /// The configuration's sets; each must hold a CPU this VMM may run on.
    pub fn new(entries: Option<&[CpuAffinity]>) -> Result<Self, String> {
        let Some(entries) = entries.filter(|e| !e.is_empty()) else {
            return Ok(Self::default());
        };
        let allowed = CpuSet::allowed()
            .map_err(|e| format!("--cpus affinity: cannot read this VMM's CPUs: {e}"))?;
        let mut sets = BTreeMap::new();
        for a in entries {
            if !a.host_cpus.iter().any(|&c| allowed.has(c)) {
                return Err(format!(
                    "--cpus affinity: vCPU {}: none of host CPUs {:?} is one this VMM may run \
                     on ({:?})",
                    a.vcpu,
                    a.host_cpus,
                    allowed.cpus()
                ));
            }
            sets.insert(a.vcpu, CpuSet::of(&a.host_cpus));
        }
        Ok(VcpuAffinity(sets))
    }

    /// vCPU `id`'s set, if it has one.
    pub fn of(&self, id: u32) -> Option<CpuSet> {
        self.0.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vcpu: u32, host_cpus: &[usize]) -> CpuAffinity {
        CpuAffinity {
            vcpu,
            host_cpus: host_cpus.to_vec(),
        }
    }

    #[test]
    fn sets_hold_the_given_cpus() {
        let first = CpuSet::allowed().unwrap().cpus()[0];
        let a = VcpuAffinity::new(Some(&[entry(1, &[first, 1000])])).unwrap();
        assert!(a.of(0).is_none());
        assert_eq!(a.of(1).unwrap().cpus(), [first, 1000]);
    }

    #[test]
    fn a_set_with_no_cpu_the_vmm_may_use_is_refused_naming_the_vcpu() {
        let e = VcpuAffinity::new(Some(&[entry(3, &[1023])])).err().unwrap();
        assert!(
            e.starts_with("--cpus affinity: vCPU 3: none of host CPUs [1023]"),
            "{e}"
        );
        assert!(VcpuAffinity::new(None).unwrap().of(0).is_none());
    }
}
