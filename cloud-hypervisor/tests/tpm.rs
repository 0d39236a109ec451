//! `--tpm socket=<swtpm control socket>`: the test guest (`test=tpm`) finds the TPM2 table,
//! drives the CRB interface, and runs TPM2_Startup and TPM2_GetRandom through swtpm (the
//! Debian package `swtpm`, which scripts/test installs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{boot, guest};

/// A swtpm in `dir`, listening on `dir/ctrl.sock`; killed on drop.
struct Swtpm {
    child: Child,
    ctrl: PathBuf,
}

impl Swtpm {
    fn start(dir: &Path) -> Self {
        let ctrl = dir.join("ctrl.sock");
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--tpm2")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run swtpm ({e}): install the Debian package `swtpm` \
                     (scripts/test installs it)"
                )
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ctrl.exists() {
            assert!(Instant::now() < deadline, "swtpm made no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Swtpm { child, ctrl }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the guest's TPM scenario against a fresh swtpm; its random bytes.
fn tpm_run(name: &str) -> String {
    let dir = common::scratch(name);
    let swtpm = Swtpm::start(&dir);
    let socket = format!("socket={}", swtpm.ctrl.display());
    let r = boot(&guest().elf_pvh, "test=tpm", &["--tpm", &socket]);
    r.assert_guest_passed();
    for check in ["tpm-start-method", "tpm-startup", "tpm-getrandom"] {
        r.assert_passed(check);
    }
    assert!(r.stdout.lines().any(|l| l == "TPM ok"), "{}", r.stdout);
    let random = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("TPM random="))
        .unwrap_or_else(|| panic!("no TPM random= line:\n{}", r.stdout))
        .to_string();
    assert_eq!(random.len(), 32, "{random}");
    assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{random}");
    random
}

#[test]
fn startup_and_get_random_through_swtpm() {
    common::require_kvm();
    let a = tpm_run("tpm-a");
    let b = tpm_run("tpm-b");
    assert_ne!(a, b, "two runs gave the same random bytes");
}

#[test]
fn tpm_without_swtpm_is_refused_clearly() {
    let dir = common::scratch("tpm-none");
    let sock = dir.join("nothing.sock");
    let socket = format!("socket={}", sock.display());
    let r = boot(&guest().elf_pvh, "test=tpm", &["--tpm", &socket]);
    assert_ne!(r.code(), Some(0));
    let want = format!("--tpm socket={}: cannot connect: ", sock.display());
    assert!(r.stderr.contains(&want), "{want} in:\n{}", r.stderr);
}
