//! The calls every thread of ours makes, whatever its job: the Rust runtime, the allocator,
//! logging, channels and locks, and dying.

use syscalls::Sysno::{self, *};

/// Calls a thread may make without meaning to, which fail quietly (EACCES) unless its list
/// allows them: glibc's allocator opens `/proc/sys/vm/overcommit_memory` the first time a
/// thread's arena could shrink (and does without it when the open fails).
pub(crate) static QUIET: &[Sysno] = &[openat];

pub(crate) static BASE: &[Sysno] = &[
    // Memory: the allocator and thread stacks.
    brk,
    madvise,
    mmap,
    mprotect,
    mremap,
    munmap,
    // Locks, channels, parking; the kernel's view of a thread's locks and restartable sequences.
    futex,
    rseq,
    set_robust_list,
    sched_yield,
    // Logging (stderr, --log-file) and reading/closing the thread's own fds.
    close,
    read,
    write,
    writev,
    // Duplicating and flagging fds (`try_clone`, non-blocking mode).
    fcntl,
    // Seeds: std's HashMap keys.
    getrandom,
    // Time (the vDSO answers most clock reads; these are its fallbacks) and sleeping.
    clock_gettime,
    clock_nanosleep,
    nanosleep,
    // Signals: the VMM's kick and SIGSYS handlers return through rt_sigreturn; std's guard
    // pages and alternate signal stacks; a panic under `panic = "abort"` raises SIGABRT.
    rt_sigprocmask,
    rt_sigreturn,
    sigaltstack,
    getpid,
    gettid,
    tgkill,
    // Ending the thread or the process.
    exit,
    exit_group,
];
