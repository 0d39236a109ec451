//! Host CPU sets, for pinning threads (`--cpus affinity`, a disk's `queue_affinity`).

use std::io;

/// A host CPU set, as the kernel takes it.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    fn empty() -> Self {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        CpuSet(unsafe { std::mem::zeroed() })
    }

    /// The set of `cpus`. A configuration allows only CPUs below CPU_SETSIZE
    /// (`vm_config::MAX_HOST_CPUS`); any other is left out rather than indexing past the set.
    pub fn of(cpus: &[usize]) -> Self {
        let mut set = Self::empty();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: CPU_SET writes one bit of the set it is given; `c` is inside it.
            unsafe { libc::CPU_SET(c, &mut set.0) };
        }
        set
    }

    pub fn has(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET reads one bit of the set it is given.
        cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    pub fn cpus(&self) -> Vec<usize> {
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| self.has(c))
            .collect()
    }

    /// The CPUs the calling thread may run on.
    pub fn allowed() -> io::Result<Self> {
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

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.cpus())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_only_on_its_set() {
        let first = CpuSet::allowed().unwrap().cpus()[0];
        assert_eq!(CpuSet::of(&[first, 1000]).cpus(), [first, 1000]);
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
}
