//! Boots a real Linux guest (Debian's cloud kernel with a busybox initramfs, built by
//! `scripts/build-linux-guest`) with the `cloud-hypervisor` binary and checks that it sees both
//! vCPUs and powers the VM off through ACPI.
//!
//! Needs hardware virtualization (`vmx`/`svm`) and `/dev/kvm`; on hosts without it the boot test
//! says loudly that it was skipped. The asset build runs everywhere (Debian/Ubuntu host with apt).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const MARKER: &str = "REAL-LINUX-OK cpus=";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether a `/proc/cpuinfo` text lists the `vmx` or `svm` CPU flag.
fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Builds (or reuses) the guest kernel and initramfs, once per test run; returns
/// (vmlinuz, initramfs).
fn build_guest() -> (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(run_build_script).clone()
}

fn run_build_script() -> (PathBuf, PathBuf) {
    let out = repo_root().join("target").join("linux-guest");
    let status = Command::new(repo_root().join("scripts").join("build-linux-guest"))
        .arg(&out)
        .status()
        .expect("cannot run scripts/build-linux-guest");
    assert!(
        status.success(),
        "scripts/build-linux-guest failed: {status}"
    );
    (out.join("vmlinuz"), out.join("initramfs.cpio.gz"))
}

enum Outcome {
    Exited(ExitStatus, String),
    TimedOut(String),
}

/// Runs `cmd` with stdout and stderr captured (merged, stdout first); kills it after `timeout`.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Outcome {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "{}\n--- stderr ---\n{}",
        stdout.join().unwrap(),
        stderr.join().unwrap()
    );
    match status {
        Some(status) => Outcome::Exited(status, output),
        None => Outcome::TimedOut(output),
    }
}

#[test]
fn real_linux_boots_with_two_vcpus_and_powers_off() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo_has_hw_virt(&cpuinfo) {
        eprintln!("==========================================================================");
        eprintln!("==========================================================================");
        eprintln!("SKIPPED real-Linux boot test: this CPU has no vmx/svm (PVM host); run on real hardware");
        eprintln!("==========================================================================");
        eprintln!("==========================================================================");
        return;
    }

    let (vmlinuz, initramfs) = build_guest();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
    cmd.arg("--kernel")
        .arg(&vmlinuz)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--cmdline", "console=ttyS0 panic=-1 reboot=acpi"])
        .args(["--cpus", "boot=2"])
        .args(["--memory", "size=512M"])
        .args(["--serial", "tty", "--console", "off"]);
    match run_with_timeout(&mut cmd, BOOT_TIMEOUT) {
        Outcome::TimedOut(output) => {
            panic!("the guest did not power off within {BOOT_TIMEOUT:?}; output:\n{output}")
        }
        Outcome::Exited(status, output) => {
            let marker = output
                .lines()
                .find_map(|l| l.find(MARKER).map(|i| l[i..].trim_end()))
                .unwrap_or_else(|| panic!("no `{MARKER}` line ({status}); output:\n{output}"));
            assert_eq!(marker, format!("{MARKER}2"), "output:\n{output}");
            assert_eq!(status.code(), Some(0), "VMM exit status; output:\n{output}");
        }
    }
}

#[test]
fn cpuinfo_flags_are_parsed() {
    let intel = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae vmx smx est\n";
    let amd = "processor\t: 0\nflags\t\t: fpu svm extapic\n";
    let pvm = "processor\t: 0\nflags\t\t: fpu vme hypervisor vmxx nosvm\nvmx flags\t: ept\n";
    assert!(cpuinfo_has_hw_virt(intel));
    assert!(cpuinfo_has_hw_virt(amd));
    assert!(!cpuinfo_has_hw_virt(pvm));
    assert!(!cpuinfo_has_hw_virt(""));
}

#[test]
fn run_with_timeout_kills_a_hung_child() {
    let start = Instant::now();
    let outcome = run_with_timeout(
        Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
        Duration::from_millis(500),
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    match outcome {
        Outcome::TimedOut(output) => assert!(output.contains("started"), "{output}"),
        Outcome::Exited(status, _) => panic!("sleep 30 exited early: {status}"),
    }
    match run_with_timeout(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        Duration::from_secs(10),
    ) {
        Outcome::Exited(status, output) => {
            assert_eq!(status.code(), Some(3));
            assert!(output.contains("out") && output.contains("err"), "{output}");
        }
        Outcome::TimedOut(output) => panic!("timed out: {output}"),
    }
}

/// The guest assets are real: a bzImage and a gzip'd newc cpio whose /init prints the marker.
#[test]
fn guest_assets_are_built() {
    let (vmlinuz, initramfs) = build_guest();
    let kernel = std::fs::read(&vmlinuz).unwrap();
    assert!(kernel.len() > 1 << 20, "{} is too small", vmlinuz.display());
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "not a bzImage");
    assert_eq!(&kernel[0x1fe..0x200], &[0x55, 0xaa]);

    let output = Command::new("gzip")
        .arg("-dc")
        .arg(&initramfs)
        .output()
        .expect("cannot run gzip");
    assert!(
        output.status.success(),
        "{} is not gzip",
        initramfs.display()
    );
    let cpio = output.stdout;
    assert_eq!(&cpio[..6], b"070701", "not a newc cpio archive");
    let has = |needle: &[u8]| cpio.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"init\0"));
    assert!(has(b"bin/busybox\0"));
    assert!(has(b"dev/console\0"));
    assert!(has(b"echo \"REAL-LINUX-OK cpus=$(nproc)\""));
    assert!(has(b"poweroff -f"));
    assert!(has(b"TRAILER!!!\0"));
}
