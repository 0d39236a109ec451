//! The device workers' seccomp filters. Every worker waits on its eventfds with epoll, raises
//! interrupts through irqfds and arms its rate limiters' timers ([`WORKER`]); each device adds
//! the calls its own handler makes, declared beside the handler as a [`WorkerCalls`] and
//! returned by `QueueHandler::seccomp`.

use ::seccomp::{Filter, Sysno};

/// One device kind's worker: its filter's name and the calls it adds to [`WORKER`].
pub struct WorkerCalls {
    pub kind: &'static str,
    pub calls: &'static [Sysno],
    /// The ioctl requests it may make, by number (see each device's list for why).
    pub ioctls: &'static [u64],
}

impl WorkerCalls {
    /// The worker's filter.
    pub fn filter(&self) -> Filter {
        Filter::new(self.kind)
            .allow(WORKER)
            .allow(self.calls)
            .allow_ioctls(self.ioctls)
    }
}

/// What every worker does: its epoll loop, eventfd reads and irqfd writes (in the base list),
/// its timers.
pub const WORKER: &[Sysno] = &[
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
    Sysno::timerfd_settime,
    Sysno::timerfd_gettime,
];

/// A handler that declares nothing of its own.
pub static GENERIC: WorkerCalls = WorkerCalls {
    kind: "virtio-worker",
    calls: &[],
    ioctls: &[],
};

/// Every worker kind of this crate (the spawner's filter must allow all of them).
pub fn all() -> Filter {
    let kinds: [&WorkerCalls; 10] = [
        &GENERIC,
        &crate::block::SECCOMP,
        &crate::net::SECCOMP,
        &crate::console::SECCOMP,
        &crate::rng::SECCOMP,
        &crate::vsock::SECCOMP,
        &crate::balloon::SECCOMP,
        &crate::mem::SECCOMP,
        &crate::pmem::SECCOMP,
        &crate::watchdog::SECCOMP,
    ];
    kinds
        .iter()
        .fold(Filter::new("virtio-workers"), |f, k| f.merge(&k.filter()))
        .merge(&crate::vhost_user::relay_filter())
}

#[cfg(test)]
mod tests {
    use ::seccomp::testing::{assert_confined, assert_ioctls_confined};
    use ::seccomp::{Filter, Sysno};

    /// One test per worker kind: a call outside its list stops the process in mode `true`
    /// (with the report), is logged in `log`, fails with EPERM in `errno`.
    macro_rules! confined {
        ($test:ident, $thread:literal, $calls:path) => {
            #[test]
            fn $test() {
                fn make() -> Filter {
                    $calls.filter()
                }
                assert_confined(
                    concat!("worker_seccomp::tests::", stringify!($test)),
                    $thread,
                    make,
                    Sysno::getpgid,
                );
            }
        };
    }

    confined!(blk, "virtio-blk", crate::block::SECCOMP);
    confined!(net, "virtio-net0", crate::net::SECCOMP);
    confined!(console, "virtio-console", crate::console::SECCOMP);
    confined!(rng, "virtio-rng", crate::rng::SECCOMP);
    confined!(vsock, "virtio-vsock", crate::vsock::SECCOMP);
    confined!(balloon, "virtio-balloon", crate::balloon::SECCOMP);
    confined!(mem, "virtio-mem", crate::mem::SECCOMP);
    confined!(pmem, "virtio-pmem", crate::pmem::SECCOMP);
    confined!(watchdog, "virtio-watchdog", crate::watchdog::SECCOMP);

    /// The vhost-user relays (vhost-user-blk, virtio-fs) share one filter.
    #[test]
    fn vhost_user_relay() {
        assert_confined(
            "worker_seccomp::tests::vhost_user_relay",
            "vhost-user-fs-relay",
            crate::vhost_user::relay_filter,
            Sysno::getpgid,
        );
    }

    /// One test per worker kind that makes ioctls: the requests its list names go through,
    /// a neighbour of the same type does not (in every mode).
    macro_rules! ioctls_confined {
        ($test:ident, $thread:literal, $calls:path, $refused:expr) => {
            #[test]
            fn $test() {
                fn make() -> Filter {
                    $calls.filter()
                }
                assert_ioctls_confined(
                    concat!("worker_seccomp::tests::", stringify!($test)),
                    $thread,
                    make,
                    $calls.ioctls,
                    $refused,
                );
            }
        };
    }

    // A net worker changes its TAP's offloads and queues, but cannot make the TAP another
    // interface (TUNSETIFF) or take it over (TUNSETOWNER).
    ioctls_confined!(
        net_ioctls,
        "virtio-net0",
        crate::net::SECCOMP,
        libc::TUNSETIFF
    );
    // FIONBIO yes; FIONREAD, TIOCSTI (typing into a terminal) no.
    ioctls_confined!(
        vsock_ioctls,
        "virtio-vsock",
        crate::vsock::SECCOMP,
        libc::TIOCSTI
    );
    // None at all, not even a terminal's.
    ioctls_confined!(
        console_ioctls,
        "virtio-console",
        crate::console::SECCOMP,
        libc::TIOCGWINSZ
    );

    #[test]
    fn each_worker_kind_makes_only_its_own_ioctls() {
        use libc::{FIONBIO, FIONREAD, TIOCSTI, TUNSETIFF, TUNSETOFFLOAD, TUNSETQUEUE};
        let net = crate::net::SECCOMP.filter();
        assert!(net.allows_ioctl(TUNSETOFFLOAD) && net.allows_ioctl(TUNSETQUEUE));
        for no in [TUNSETIFF, FIONBIO, FIONREAD, TIOCSTI] {
            assert!(!net.allows_ioctl(no), "virtio-net: {no:#x}");
        }
        let vsock = crate::vsock::SECCOMP.filter();
        assert!(vsock.allows_ioctl(FIONBIO));
        for no in [FIONREAD, TIOCSTI, TUNSETOFFLOAD] {
            assert!(!vsock.allows_ioctl(no), "virtio-vsock: {no:#x}");
        }
        // No worker allows a whole type of requests, nor any ioctl.
        let all = super::all();
        assert_eq!(all.ioctl_types().count(), 0);
        assert!(!all.allows(Sysno::ioctl));
        let mut every: Vec<u64> = all.ioctls().collect();
        every.sort_unstable();
        let mut want = vec![FIONBIO, TUNSETOFFLOAD, TUNSETQUEUE];
        want.sort_unstable();
        assert_eq!(every, want);
    }

    #[test]
    fn no_worker_may_open_files_or_start_processes() {
        let all = super::all();
        for call in [
            Sysno::openat,
            Sysno::execve,
            Sysno::fork,
            Sysno::ptrace,
            Sysno::mount,
        ] {
            assert!(!all.allows(call), "a worker may call {}", call.name());
        }
        // No worker talks to KVM (KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION, ...).
        assert!(!all.allows_ioctl(0xae01) && !all.allows_ioctl(0xae46));
    }
}
