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
