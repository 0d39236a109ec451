//! Linux core scheduling for vCPU threads (`--cpus core_scheduling=vm|vcpu|off`, as the
//! original's): threads with the same cookie are the only ones the kernel runs at once on the
//! SMT siblings of a core, so a VM's vCPUs never share a core with another VM's (`vm`) or with
//! each other (`vcpu`). Each vCPU thread calls `CoreGroup::join` before it first enters the
//! guest. A kernel without core scheduling gets one warning, and the VM runs without it, as
//! with the original.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use log::warn;
use vm_config::CoreScheduling;

const PR_SCHED_CORE: libc::c_int = 62;
const PR_SCHED_CORE_GET: libc::c_ulong = 0;
const PR_SCHED_CORE_CREATE: libc::c_ulong = 1;
const PR_SCHED_CORE_SHARE_FROM: libc::c_ulong = 3;
/// The operation applies to one thread.
const PIDTYPE_PID: libc::c_ulong = 0;

/// How long a vCPU waits for the group's first vCPU to make the cookie before it goes on
/// without it (the first vCPU makes it as soon as its thread starts).
const LEADER_WAIT: Duration = Duration::from_secs(2);

fn sched_core(op: libc::c_ulong, tid: libc::pid_t, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: PR_SCHED_CORE takes the operation, a thread id (0: the caller), the scope and,
    // for GET, a pointer to a u64 the kernel writes (`arg`, valid for the call; 0 otherwise).
    let ret = unsafe { libc::prctl(PR_SCHED_CORE, op, tid as libc::c_ulong, PIDTYPE_PID, arg) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The core scheduling cookie of thread `tid` (0: the caller); 0 when it has none.
pub fn cookie_of(tid: libc::pid_t) -> io::Result<u64> {
    let mut cookie = 0u64;
    sched_core(
        PR_SCHED_CORE_GET,
        tid,
        std::ptr::addr_of_mut!(cookie) as libc::c_ulong,
    )?;
    Ok(cookie)
}

/// Reports a failure once per VMM: EINVAL is a kernel without core scheduling (the original's
/// words), ENODEV a machine without SMT, where it does not matter.
fn report(e: &io::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if e.raw_os_error() == Some(libc::ENODEV) || WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    if e.raw_os_error() == Some(libc::EINVAL) {
        warn!("Kernel lacks CONFIG_SCHED_CORE support - no SMT isolation");
    } else {
        warn!("core scheduling for the vCPUs failed, running without it: {e}");
    }
}

/// The vCPU threads of one VM, as one core scheduling group.
pub struct CoreGroup {
    mode: CoreScheduling,
    /// The first vCPU's thread id, once it has made the VM's cookie (or failed to).
    leader: Mutex<Option<libc::pid_t>>,
    made: Condvar,
}

impl CoreGroup {
    pub fn new(mode: CoreScheduling) -> Self {
        CoreGroup {
            mode,
            leader: Mutex::new(None),
            made: Condvar::new(),
        }
    }

    /// Puts the calling vCPU thread (vCPU `index`) in its group.
    pub fn join(&self, index: u32) {
        match self.mode {
            CoreScheduling::Off => {}
            CoreScheduling::Vcpu => {
                if let Err(e) = sched_core(PR_SCHED_CORE_CREATE, 0, 0) {
                    report(&e);
                }
            }
            CoreScheduling::Vm if index == 0 => {
                if let Err(e) = sched_core(PR_SCHED_CORE_CREATE, 0, 0) {
                    report(&e);
                }
                // SAFETY: the gettid system call has no preconditions. (Not glibc's wrapper:
                // linked statically, its weak symbol can be left unresolved.)
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
                *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some(tid);
                self.made.notify_all();
            }
            CoreScheduling::Vm => {
                let guard = self.leader.lock().unwrap_or_else(|e| e.into_inner());
                let (guard, _) = self
                    .made
                    .wait_timeout_while(guard, LEADER_WAIT, |l| l.is_none())
                    .unwrap_or_else(|e| e.into_inner());
                match *guard {
                    Some(tid) => {
                        if let Err(e) = sched_core(PR_SCHED_CORE_SHARE_FROM, tid, 0) {
                            report(&e);
                        }
                    }
                    None => warn!("vcpu{index}: the VM's core scheduling cookie never came"),
                }
            }
        }
    }
}
