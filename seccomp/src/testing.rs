//! Proving a thread kind's filter in a unit test: the test runs itself again in child
//! processes (the test binary, filtered to that one test), one per mode; each child confines a
//! thread with the filter, through the spawner as the VMM does, and makes a call the filter
//! does not allow. The parent checks what each mode promises:
//! - `true`: the child dies of SIGSYS after one line naming the thread and the call;
//! - `log`: the call goes through (the kernel logs it);
//! - `errno`: the call fails with EPERM;
//! - `false`: no filter, the call goes through.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use crate::{Filter, Mode, Sysno};

/// The child's mode, passed in the environment.
const CHILD: &str = "CH_SECCOMP_TEST_MODE";

/// Checks that `make()`'s filter, on a thread named `thread`, refuses `forbidden` in every
/// mode. Call it from the test named `test` (its path as `cargo test` lists it, e.g.
/// `seccomp_filters::tests::vcpu`): it is the test's whole body, in parent and children.
/// `forbidden` is called with all-zero arguments, so pick a call that is harmless then
/// (`log` and `false` let it run).
pub fn assert_confined(test: &str, thread: &str, make: fn() -> Filter, forbidden: Sysno) {
    if let Ok(mode) = std::env::var(CHILD) {
        child(&mode, thread, make, forbidden);
        return;
    }
    let filter = make();
    assert!(
        !filter.allows(forbidden),
        "filter '{}' allows {}: pick a call it refuses",
        filter.kind(),
        forbidden.name()
    );
    let exe = std::env::current_exe().expect("the test binary");
    for mode in ["true", "log", "errno", "false"] {
        let out = Command::new(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, mode)
            .output()
            .expect("run the test binary");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ctx = format!(
            "mode {mode}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        let result = stdout
            .lines()
            .find_map(|l| l.split_once("confined-call: "))
            .map(|(_, r)| r.trim().to_string());
        match mode {
            "true" => {
                assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{ctx}");
                let line = format!(
                    "seccomp: thread '{thread}' (filter '{}') made system call {} ({}), which its filter does not allow",
                    filter.kind(),
                    forbidden.id(),
                    forbidden.name()
                );
                assert!(stderr.contains(&line), "no report '{line}'\n{ctx}");
                assert_eq!(result, None, "the call returned\n{ctx}");
            }
            "errno" => {
                assert!(out.status.success(), "{ctx}");
                let eperm = format!("-1 errno {}", libc::EPERM);
                assert_eq!(result.as_deref(), Some(eperm.as_str()), "{ctx}");
            }
            _ => {
                assert!(out.status.success(), "{ctx}");
                let r = result.unwrap_or_else(|| panic!("no result\n{ctx}"));
                assert!(!r.starts_with("-1 "), "the call failed: {r}\n{ctx}");
            }
        }
    }
}

/// Checks that `make()`'s filter, on a thread named `thread`, lets each of `allowed` ioctl
/// requests through and refuses `refused` (a neighbour of them: same type, another number) in
/// every mode, as [`assert_confined`] does for a system call. Every request is made on fd -1,
/// so it does nothing: an allowed one fails with EBADF, where the filter would answer EPERM
/// (`errno`) or stop the process (`true`). Call it from the test named `test`, as its whole
/// body.
pub fn assert_ioctls_confined(
    test: &str,
    thread: &str,
    make: fn() -> Filter,
    allowed: &[u64],
    refused: u64,
) {
    if let Ok(mode) = std::env::var(CHILD) {
        ioctl_child(&mode, thread, make, allowed, refused);
        return;
    }
    let filter = make();
    for &r in allowed {
        assert!(
            filter.allows_ioctl(r),
            "filter '{}' refuses ioctl {r:#x}: pick one it allows",
            filter.kind()
        );
    }
    assert!(
        !filter.allows_ioctl(refused),
        "filter '{}' allows ioctl {refused:#x}: pick one it refuses",
        filter.kind()
    );
    let ebadf = format!("-1 errno {}", libc::EBADF);
    let through = vec![ebadf.clone(); allowed.len()].join(",");
    for mode in ["true", "log", "errno", "false"] {
        let (out, stdout, stderr) = run_child(test, mode);
        let ctx = format!(
            "mode {mode}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        let line = |tag: &str| {
            stdout
                .lines()
                .find_map(|l| l.split_once(tag))
                .map(|(_, r)| r.trim().to_string())
        };
        // Each allowed request reached the kernel, which refused the bad fd.
        assert_eq!(
            line("allowed-ioctls: ").as_deref(),
            Some(through.as_str()),
            "{ctx}"
        );
        let result = line("refused-ioctl: ");
        match mode {
            "true" => {
                assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{ctx}");
                let report = format!(
                    "seccomp: thread '{thread}' (filter '{}') made system call {} (ioctl), which its filter does not allow",
                    filter.kind(),
                    Sysno::ioctl.id()
                );
                assert!(stderr.contains(&report), "no report '{report}'\n{ctx}");
                assert_eq!(result, None, "the call returned\n{ctx}");
            }
            "errno" => {
                assert!(out.status.success(), "{ctx}");
                let eperm = format!("-1 errno {}", libc::EPERM);
                assert_eq!(result.as_deref(), Some(eperm.as_str()), "{ctx}");
            }
            _ => {
                assert!(out.status.success(), "{ctx}");
                assert_eq!(result.as_deref(), Some(ebadf.as_str()), "{ctx}");
            }
        }
    }
}

/// Runs the test binary again, filtered to `test`, as a child in `mode`.
fn run_child(test: &str, mode: &str) -> (std::process::Output, String, String) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// `ioctl(-1, request, 0)`: "r" or "-1 errno N".
fn ioctl_on_nothing(request: u64) -> String {
    // SAFETY: an ioctl on fd -1 never reaches a driver: the kernel fails it with EBADF (or
    // the filter stops it first); the argument is never read.
    let r = unsafe { libc::syscall(libc::SYS_ioctl, -1 as libc::c_long, request, 0) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    if r == -1 {
        format!("-1 errno {errno}")
    } else {
        format!("{r}")
    }
}

fn ioctl_child(mode: &str, thread: &str, make: fn() -> Filter, allowed: &[u64], refused: u64) {
    crate::set_mode(Mode::parse(mode).expect("a --seccomp value"));
    crate::start_spawner(Filter::new("spawner").merge(&make())).expect("start the spawner");
    let allowed = allowed.to_vec();
    let handle = crate::spawn(thread.to_string(), make(), move || {
        let through: Vec<String> = allowed.iter().map(|&r| ioctl_on_nothing(r)).collect();
        println!("\nallowed-ioctls: {}", through.join(","));
        ioctl_on_nothing(refused)
    })
    .expect("spawn the confined thread");
    let result = handle.join().expect("the confined thread");
    println!("\nrefused-ioctl: {result}");
}

fn child(mode: &str, thread: &str, make: fn() -> Filter, forbidden: Sysno) {
    crate::set_mode(Mode::parse(mode).expect("a --seccomp value"));
    crate::start_spawner(Filter::new("spawner").merge(&make())).expect("start the spawner");
    let handle = crate::spawn(thread.to_string(), make(), move || {
        // SAFETY: a raw system call with all-zero arguments; the caller picked a call for
        // which they are harmless.
        let r = unsafe { libc::syscall(libc::c_long::from(forbidden.id()), 0, 0, 0, 0, 0, 0) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if r == -1 {
            format!("-1 errno {errno}")
        } else {
            format!("{r}")
        }
    })
    .expect("spawn the confined thread");
    let result = handle.join().expect("the confined thread");
    println!("\nconfined-call: {result}");
}
