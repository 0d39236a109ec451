//! The seccomp filters of the VMM's own threads: the control loop (the main thread: API,
//! signals, VM creation, hotplug, snapshot, reboot), the vCPUs, the on-demand restore loader
//! and the migration sender. The device workers' filters are in `virtio_devices`.
//!
//! The lists say what each thread does; a call a new feature needs goes into the list of the
//! thread that makes it, in the same change (the test suite runs confined and reports a
//! missing call as `seccomp: thread '...' made system call N (name)`).

use seccomp::{Filter, Sysno};

/// Files: images, kernels, snapshots, sockets' paths, /proc and /sys reads, locks.
const FILES: &[Sysno] = {
    use ::seccomp::Sysno::*;
    &[
        openat,
        close_range,
        readlink,
        unlink,
        rmdir,
        mkdir,
        rename,
        access,
        stat,
        lstat,
        pread64,
        pwrite64,
        readv,
        preadv,
        pwritev,
        lseek,
        fstat,
        newfstatat,
        statx,
        fsync,
        fdatasync,
        ftruncate,
        fallocate,
        flock,
        fcntl,
        unlinkat,
        renameat,
        renameat2,
        mkdirat,
        getdents64,
        readlinkat,
        faccessat,
        faccessat2,
        sendfile,
        copy_file_range,
        dup,
        dup3,
        pipe2,
        getcwd,
        fchmod,
        fstatfs,
        statfs,
    ]
};

/// Event loops and notifications.
const EVENTS: &[Sysno] = {
    use ::seccomp::Sysno::*;
    &[
        epoll_create1,
        epoll_ctl,
        epoll_wait,
        epoll_pwait,
        eventfd2,
        timerfd_create,
        timerfd_settime,
        timerfd_gettime,
        poll,
        ppoll,
    ]
};

/// Unix sockets (API, serial/console sockets, vsock, vhost-user, migration, event monitor)
/// and TCP for migration.
const SOCKETS: &[Sysno] = {
    use ::seccomp::Sysno::*;
    &[
        socket,
        socketpair,
        bind,
        listen,
        accept4,
        connect,
        recvfrom,
        sendto,
        recvmsg,
        sendmsg,
        shutdown,
        getsockopt,
        setsockopt,
        getsockname,
        getpeername,
    ]
};

/// The control loop (the main thread). It builds and rebuilds VMs (KVM, memory, devices:
/// TAPs, images, io_uring), serves the API, snapshots, restores and migrates, and forks the
/// pty resize watcher, whose child runs under this filter too.
pub fn control_loop() -> Filter {
    use ::seccomp::Sysno::*;
    Filter::new("vmm")
        .allow(FILES)
        .allow_ioctl_types(CONTROL_LOOP_IOCTL_TYPES)
        .allow(EVENTS)
        .allow(SOCKETS)
        .allow(&[
            // RAM: memfds, on-demand restore, hugepages, which pages a sparse snapshot skips.
            memfd_create,
            mincore,
            // --memory-zone host_numa_node=
            mbind,
            userfaultfd,
            mlock,
            munlock,
            io_uring_setup,
            io_uring_register,
            io_uring_enter,
            // Threads (the vCPUs, the migration sender) come from the spawner; the
            // pty watcher is forked from here.
            clone,
            clone3,
            wait4,
            kill,
            prctl,
            getppid,
            setsid,
            rt_sigaction,
            rt_sigtimedwait,
            sched_getaffinity,
            sched_setaffinity,
            prlimit64,
            uname,
            getuid,
            geteuid,
            getrandom,
            // --landlock through the API (vm.create, vm.restore, vm.receive-migration):
            // the ruleset is built and applied here (landlock.rs).
            landlock_create_ruleset,
            landlock_add_rule,
            landlock_restrict_self,
        ])
}

/// A vCPU: KVM_RUN, and the port and MMIO exits it dispatches to the devices on its own
/// thread: a driver starting a virtio device (queue eventfds, irqfds, io_uring, the worker
/// through the spawner), BAR moves, hotplug ejections (closing images and TAPs), ACPI reset
/// and sleep.
pub fn vcpu() -> Filter {
    use ::seccomp::Sysno::*;
    Filter::new("vcpu")
        .allow(EVENTS)
        // KVM_RUN, the device wiring its exits do (irqfds, ioeventfds, MSI routes) and saving
        // its vCPU's state when parked: `hypervisor::kvm_requests::VCPU_THREAD` says which
        // path needs each.
        .allow_ioctls(hypervisor::kvm_requests::VCPU_THREAD)
        // A virtio-net driver starting or resetting its device sets the TAP's offloads and
        // attached queues (TUNSETOFFLOAD, TUNSETQUEUE) from the vCPU that wrote the status.
        .allow_ioctls(net_util::RUNNING_TAP_IOCTLS)
        .allow(&[
            dup,
            fcntl,
            pread64,
            pwrite64,
            fsync,
            fdatasync,
            fstat,
            newfstatat,
            statx,
            lseek,
            flock,
            io_uring_setup,
            io_uring_register,
            io_uring_enter,
            // Messages to backends the devices talk to on MMIO accesses: vhost-user on
            // activation and for a generic vhost-user device's configuration space, swtpm for
            // a TPM command.
            sendmsg,
            recvmsg,
            sendto,
            recvfrom,
            // Core scheduling (PR_SCHED_CORE).
            prctl,
        ])
}

/// The on-demand restore loader: userfaultfd events, UFFDIO_COPY from the snapshot file and
/// UFFDIO_WAKE for a page that was there already (`uffd::Loader::serve`). Creating the
/// userfaultfd and registering guest RAM with it (UFFDIO_API, UFFDIO_REGISTER) is the control
/// loop's.
pub fn uffd() -> Filter {
    use ::seccomp::Sysno::*;
    Filter::new("uffd")
        .allow(EVENTS)
        .allow(&[pread64])
        .allow_ioctls(&crate::uffd::loader_ioctls())
}

/// Request types the control loop uses whole. Its requests are many and some are made inside
/// glibc, so it is confined by family rather than by number:
/// - KVM: it creates VMs and vCPUs and sets and reads all of their state (restore, migration,
///   CPUID, memory slots, dirty logs, the clock, the irqchip): most of `linux/kvm.h`'s x86
///   requests;
/// - `T`: terminals and ptys (raw mode, `openpty`'s TIOCGPTN/TIOCSPTLCK, TIOCGWINSZ,
///   TIOCSCTTY in the pty resize watcher, `isatty`), FIONREAD, FIONBIO (std's
///   `set_nonblocking` on sockets), and setting up TAPs (TUNSETIFF, TUNGETIFF,
///   TUNSETVNETHDRSZ, TUNSETOFFLOAD, TUNSETQUEUE);
/// - sockets' 0x89: a TAP's address, netmask, MAC, MTU and flags (SIOCSIF*), and
///   `if_nametoindex` (SIOCGIFINDEX);
/// - userfaultfd's 0xAA: `memory_restore_mode=ondemand` (USERFAULTFD_IOC_NEW, UFFDIO_API,
///   UFFDIO_REGISTER).
const CONTROL_LOOP_IOCTL_TYPES: &[u8] = &[KVMIO, b'T', SOCK_IOC_TYPE, UFFDIO];

/// KVM's ioctl type.
const KVMIO: u8 = 0xae;
/// userfaultfd's ioctl type.
const UFFDIO: u8 = 0xaa;
/// The type of sockets' SIOC* requests (`linux/sockios.h`).
const SOCK_IOC_TYPE: u8 = 0x89;

/// A copy restore's helper readers (`restore_copy`): `pread` from the snapshot's memory file
/// into guest RAM.
pub fn restore_copy() -> Filter {
    Filter::new("restore-copy").allow(&[::seccomp::Sysno::pread64])
}

/// `prefault=on`'s helpers (`memory::populate`): MADV_POPULATE_WRITE on guest RAM, in the base
/// list.
pub fn prefault() -> Filter {
    Filter::new("prefault")
}

/// The migration sender: it owns the VM while it sends it (pause, dirty log, state of every
/// device, memory from the memfd or the file), so it needs most of what the control loop does.
pub fn migration() -> Filter {
    Filter::new("migration").merge(&control_loop())
}

/// A migration's further connections (`migration::connections`): the destination's accepting
/// thread and the threads that receive or send memory over each connection, and the source's
/// postcopy page server. Sockets only (their reads and writes, TLS included, are plain
/// `read`/`write`), and the polls that wait on them.
pub fn migration_connection() -> Filter {
    Filter::new("migration-connection")
        .allow(EVENTS)
        .allow(SOCKETS)
}

/// The destination's postcopy fetcher (`migration::postcopy::Fetcher`): the on-demand loader's
/// userfaultfd requests, and the fault connection to the source.
pub fn postcopy() -> Filter {
    Filter::new("postcopy").merge(&uffd()).allow(SOCKETS)
}

/// The migration progress relay: channels and an eventfd write.
pub fn migration_relay() -> Filter {
    Filter::new("migration-relay")
}

/// The spawner's filter: every kind it starts.
pub fn spawner() -> Filter {
    Filter::new("spawner")
        // --landlock through the API: the spawner joins the control loop's Landlock domain
        // (landlock.rs), so the threads it starts later inherit it.
        .allow(&[::seccomp::Sysno::landlock_restrict_self])
        .merge(&vcpu())
        .merge(&uffd())
        .merge(&restore_copy())
        .merge(&prefault())
        .merge(&migration())
        .merge(&migration_relay())
        .merge(&migration_connection())
        .merge(&postcopy())
        .merge(&virtio_devices::worker_seccomp::all())
}

/// Confines the calling (main) thread as the control loop, after starting the spawner
/// (before the filter, so that threads are created with only their own). Nothing with
/// `--seccomp false`.
pub fn confine_control_loop() -> Result<(), seccomp::Error> {
    if seccomp::mode() == seccomp::Mode::Off {
        return Ok(());
    }
    seccomp::start_spawner(spawner())?;
    control_loop().install()
}

#[cfg(test)]
mod tests {
    use seccomp::testing::assert_confined;
    use seccomp::Sysno;

    #[test]
    fn control_loop_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::control_loop_refuses_what_it_never_needs",
            "vmm",
            super::control_loop,
            Sysno::getpgid,
        );
    }

    #[test]
    fn vcpu_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::vcpu_refuses_what_it_never_needs",
            "vcpu0",
            super::vcpu,
            Sysno::getpgid,
        );
    }

    #[test]
    fn uffd_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::uffd_refuses_what_it_never_needs",
            "uffd",
            super::uffd,
            Sysno::getpgid,
        );
    }

    #[test]
    fn restore_copy_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::restore_copy_refuses_what_it_never_needs",
            "restore-copy1",
            super::restore_copy,
            Sysno::getpgid,
        );
    }

    #[test]
    fn prefault_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::prefault_refuses_what_it_never_needs",
            "prefault1",
            super::prefault,
            Sysno::getpgid,
        );
    }

    #[test]
    fn migration_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::migration_refuses_what_it_never_needs",
            "migration",
            super::migration,
            Sysno::getpgid,
        );
    }

    #[test]
    fn migration_relay_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::migration_relay_refuses_what_it_never_needs",
            "migration-relay",
            super::migration_relay,
            Sysno::getpgid,
        );
    }

    #[test]
    fn migration_connection_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::migration_connection_refuses_what_it_never_needs",
            "mig-recv-0",
            super::migration_connection,
            Sysno::getpgid,
        );
    }

    #[test]
    fn postcopy_refuses_what_it_never_needs() {
        assert_confined(
            "seccomp_filters::tests::postcopy_refuses_what_it_never_needs",
            "postcopy",
            super::postcopy,
            Sysno::getpgid,
        );
    }

    #[test]
    fn vcpu_may_not_create_vms_or_reach_other_devices() {
        let vcpu = super::vcpu();
        // KVM_RUN and KVM_IRQFD yes; a TAP's TUNSETOFFLOAD yes (a NIC's activation).
        for ok in [0xae80, 0x4020_ae76, 0x4004_54d0] {
            assert!(vcpu.allows_ioctl(ok), "{ok:#x}");
        }
        // userfaultfd, block devices' BLKDISCARD, socket ioctls (SIOCSIFADDR): no; nor KVM's
        // KVM_CREATE_VM, KVM_SET_USER_MEMORY_REGION, KVM_SET_REGS, KVM_SET_CPUID2; nor a TAP's
        // TUNSETIFF, a terminal's TIOCSTI.
        for no in [
            0xc020_aa03,
            0x1277,
            0x8916,
            0xae01,
            0x4020_ae46,
            0x4090_ae82,
            0x4008_ae90,
            0x4004_54ca,
            0x5412,
        ] {
            assert!(!vcpu.allows_ioctl(no), "{no:#x}");
        }
        assert_eq!(vcpu.ioctl_types().count(), 0, "no whole type");
        for call in [Sysno::openat, Sysno::socket, Sysno::execve, Sysno::clone3] {
            assert!(!vcpu.allows(call), "{}", call.name());
        }
    }

    #[test]
    fn the_spawner_allows_every_kind_it_starts() {
        let spawner = super::spawner();
        let workers = virtio_devices::worker_seccomp::all();
        for kind in [
            super::vcpu(),
            super::uffd(),
            super::migration(),
            super::migration_connection(),
            super::postcopy(),
            super::control_loop(),
            workers,
        ] {
            for call in kind.allowed() {
                assert!(
                    spawner.allows(call),
                    "{} needs {}",
                    kind.kind(),
                    call.name()
                );
            }
            for t in kind.ioctl_types() {
                assert!(
                    spawner.allows_ioctl(u64::from(t) << 8),
                    "{}: ioctl type {t:#x}",
                    kind.kind()
                );
            }
            for r in kind.ioctls() {
                assert!(spawner.allows_ioctl(r), "{}: ioctl {r:#x}", kind.kind());
            }
        }
    }
}

#[cfg(test)]
#[path = "seccomp_ioctl_tests.rs"]
mod ioctl_tests;
