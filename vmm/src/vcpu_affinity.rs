//! `--cpus affinity=[<vcpu>@[<host cpus>],...]` (the original's): each listed vCPU's thread
//! runs only on its host CPUs. The sets are checked when the VM is built, against the CPUs this
//! VMM may run on, so a set that could never run fails the boot naming the vCPU; each vCPU
//! thread then pins itself before it first enters the guest (`sched_setaffinity`, which its
//! seccomp filter allows only when it has a set). vCPUs not listed run where the VMM runs.

use std::collections::BTreeMap;
use std::io;

use vm_config::CpuAffinity;

/// A host CPU set, as the kernel takes it.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    fn empty() -> Self {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        CpuSet(unsafe { std::mem::zeroed() })
    }

    fn of(cpus: &[usize]) -> Self {
        let mut set = Self::empty();
        // The configuration allows only CPUs below CPU_SETSIZE (`vm_config::MAX_HOST_CPUS`);
        // any other is left out rather than indexing past the set.
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: CPU_SET writes one bit of the set it is given; `c` is inside it.
            unsafe { libc::CPU_SET(c, &mut set.0) };
        }
        set
    }

    fn has(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET reads one bit of the set it is given.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| self.has(c))
            .collect()
    }

    /// The CPUs the calling thread may run on.
    fn allowed() -> io::Result<Self> {
        let mut set = Self::empty();
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
        let ret = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set.0)
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }

    /// Restricts the calling thread to this set.
    pub fn pin_caller(&self) -> io::Result<()> {
        // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes from `self.0`.
        let ret =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

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
    fn sets_hold_the_given_cpus_and_pin_a_thread() {
        let allowed = CpuSet::allowed().unwrap().cpus();
        let first = allowed[0];
        let a = VcpuAffinity::new(Some(&[entry(1, &[first, 1000])])).unwrap();
        assert!(a.of(0).is_none());
        let set = a.of(1).unwrap();
        assert_eq!(set.cpus(), [first, 1000]);
        // A thread pinned to its set runs only there.
        std::thread::spawn(move || {
            CpuSet::of(&[first]).pin_caller().unwrap();
            assert_eq!(CpuSet::allowed().unwrap().cpus(), [first]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpus_past_the_set_are_left_out() {
        assert_eq!(CpuSet::of(&[0, 1024, usize::MAX]).cpus(), [0]);
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
