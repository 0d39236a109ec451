use super::*;

#[test]
fn mode_takes_the_originals_values() {
    assert_eq!(Mode::parse("true"), Some(Mode::Trap));
    assert_eq!(Mode::parse("false"), Some(Mode::Off));
    assert_eq!(Mode::parse("log"), Some(Mode::Log));
    assert_eq!(Mode::parse("errno"), Some(Mode::Errno));
    assert_eq!(Mode::parse("on"), None);
    assert_eq!(Mode::parse(""), None);
}

#[test]
fn report_names_thread_kind_and_call() {
    let line = report::format_for_test("vcpu3", "vcpu", Sysno::socket.id());
    assert_eq!(
        line,
        "cloud-hypervisor: seccomp: thread 'vcpu3' (filter 'vcpu') made system call 41 (socket), which its filter does not allow: stopping the VMM\n"
    );
    // Names longer than the kept bytes are cut, never overflow.
    let long = "x".repeat(100);
    let line = report::format_for_test(&long, &long, -5);
    assert!(line.contains("system call 0 (unknown)"), "{line}");
}

#[test]
fn filters_compile_and_merge() {
    let a = Filter::new("a").allow(&[Sysno::ioctl]);
    let b = Filter::new("b").allow(&[Sysno::epoll_wait]);
    let u = Filter::new("u").merge(&a).merge(&b);
    assert!(u.allows(Sysno::ioctl) && u.allows(Sysno::epoll_wait) && u.allows(Sysno::futex));
    assert!(!a.allows(Sysno::epoll_wait));
    for mode in [
        SeccompAction::Trap,
        SeccompAction::Log,
        SeccompAction::Errno(1),
    ] {
        u.compile(mode).expect("compiles");
    }
}

/// A thread confined with only the base list cannot open a socket.
fn base_only() -> Filter {
    Filter::new("base-only")
}

#[test]
fn base_filter_refuses_socket() {
    testing::assert_confined(
        "tests::base_filter_refuses_socket",
        "confined",
        base_only,
        Sysno::getpgid,
    );
}

/// Whether this process is the child of `stray_open_fails_quietly`.
const QUIET_CHILD: &str = "CH_SECCOMP_TEST_QUIET";

#[test]
fn stray_open_fails_quietly() {
    if std::env::var(QUIET_CHILD).is_ok() {
        set_mode(Mode::Trap);
        let h = spawn("confined".into(), base_only(), || {
            std::fs::File::open("/proc/sys/vm/overcommit_memory")
                .err()
                .and_then(|e| e.raw_os_error())
        })
        .unwrap();
        println!("\nopen-errno: {:?}", h.join().unwrap());
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["tests::stray_open_fails_quietly", "--exact", "--nocapture"])
        .env(QUIET_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("open-errno: Some({})", libc::EACCES)),
        "{stdout}"
    );
    assert!(!base_only().allows(Sysno::openat));
}

/// Whether this process is the child of `ioctls_are_allowed_by_type`.
const IOCTL_CHILD: &str = "CH_SECCOMP_TEST_IOCTL";

/// A terminal-type request (FIONREAD on a pipe) goes through a filter allowing type `T`; a KVM
/// one (KVM_GET_API_VERSION) stops the process with the report.
#[test]
fn ioctls_are_allowed_by_type() {
    fn terminal_only() -> Filter {
        Filter::new("terminal-only")
            .allow(&[Sysno::pipe2, Sysno::pipe])
            .allow_ioctl_types(b"T")
    }
    if let Ok(which) = std::env::var(IOCTL_CHILD) {
        set_mode(Mode::Trap);
        let h = spawn("confined".into(), terminal_only(), move || {
            let mut fds = [0; 2];
            // SAFETY: a pipe into a valid array; ioctls on its read end with a valid pointer.
            unsafe {
                libc::pipe(fds.as_mut_ptr());
                let mut n: libc::c_int = 0;
                let request = if which == "kvm" {
                    0xae00
                } else {
                    libc::FIONREAD
                };
                libc::ioctl(fds[0], request, &mut n)
            }
        })
        .unwrap();
        println!("\nioctl: {}", h.join().unwrap());
        return;
    }
    let run = |which: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "tests::ioctls_are_allowed_by_type",
                "--exact",
                "--nocapture",
            ])
            .env(IOCTL_CHILD, which)
            .output()
            .unwrap()
    };
    let out = run("terminal");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ioctl: 0"),
        "{out:?}"
    );
    let out = run("kvm");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("system call 16 (ioctl)"),
        "{out:?}"
    );
    let f = terminal_only();
    assert!(f.allows_ioctl(libc::FIONREAD) && !f.allows_ioctl(0xae80) && !f.allows(Sysno::ioctl));
}

/// A filter allowing FIONREAD alone, by number.
fn fionread_only() -> Filter {
    Filter::new("fionread-only").allow_ioctls(&[libc::FIONREAD])
}

/// An exact request goes through; its neighbour of the same type (`T`: FIONBIO) does not, in
/// every mode.
#[test]
fn ioctls_are_allowed_by_number() {
    testing::assert_ioctls_confined(
        "tests::ioctls_are_allowed_by_number",
        "confined",
        fionread_only,
        &[libc::FIONREAD, libc::FIONREAD | 0xdead_beef_0000_0000],
        libc::FIONBIO,
    );
}

#[test]
fn exact_ioctls_merge_and_compare_like_the_kernel() {
    let exact = fionread_only();
    // The kernel takes the request as an unsigned int: only the low 32 bits count.
    assert!(exact.allows_ioctl(libc::FIONREAD));
    assert!(exact.allows_ioctl(libc::FIONREAD | 0xffff_ffff_0000_0000));
    assert!(!exact.allows_ioctl(libc::FIONBIO));
    assert!(!exact.allows_ioctl(libc::FIONREAD + 1));
    assert!(!exact.allows(Sysno::ioctl));
    assert_eq!(exact.ioctls().collect::<Vec<_>>(), vec![libc::FIONREAD]);

    let kvm = Filter::new("kvm").allow_ioctl_types(&[0xae]);
    let u = Filter::new("u").merge(&exact).merge(&kvm);
    assert!(u.allows_ioctl(libc::FIONREAD) && u.allows_ioctl(0xae80));
    assert!(!u.allows_ioctl(libc::FIONBIO));
    assert_eq!(u.ioctl_types().collect::<Vec<_>>(), vec![0xae]);
    // Any ioctl at all wins over both.
    assert!(u.clone().allow(&[Sysno::ioctl]).allows_ioctl(libc::FIONBIO));
    for mode in [SeccompAction::Trap, SeccompAction::Errno(1)] {
        u.compile(mode).expect("compiles");
    }
}
