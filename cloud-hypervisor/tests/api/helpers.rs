//! Starting a VMM with an API socket and talking to it with curl and ch-remote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

/// `ch-remote`, built beside the VMM (its own package, whose tests make cargo build it).
pub fn ch_remote_bin() -> PathBuf {
    let bin = Path::new(common::VMM).with_file_name("ch-remote");
    assert!(
        bin.exists(),
        "{} is not built (cargo test --workspace builds it)",
        bin.display()
    );
    bin
}

/// A VMM started with `--api-socket`; killed on drop if still running.
pub struct Vmm {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub sock: PathBuf,
}

impl Vmm {
    /// Starts the VMM with an API socket in a fresh scratch dir, plus `extra` arguments, and
    /// waits for the socket.
    pub fn start(name: &str, extra: &[&str]) -> Vmm {
        common::require_kvm();
        let dir = common::scratch(name);
        let sock = dir.join("api.sock");
        let api = format!("path={}", sock.display());
        let mut args = vec!["--api-socket", api.as_str()];
        args.extend_from_slice(extra);
        let child = common::spawn(&args);
        let vmm = Vmm {
            child: Some(child),
            dir,
            sock,
        };
        // Ready once a connection is accepted: the file appears at bind(), a moment before
        // listen(), when a connection is still refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&vmm.sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket did not come up");
            std::thread::sleep(Duration::from_millis(5));
        }
        vmm
    }

    /// One request; when no answer comes (status 0), the body says what became of the VMM.
    pub fn curl(&self, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
        let (status, text) = curl(&self.sock, method, endpoint, body);
        if status != 0 {
            return (status, text);
        }
        (
            status,
            format!("{text}(no answer: {})", self.process_state()),
        )
    }

    /// What the VMM wrote to stderr so far (up to 16 KiB), read without blocking.
    fn stderr_now(&self) -> String {
        use std::os::fd::AsRawFd;
        let Some(fd) = self
            .child
            .as_ref()
            .and_then(|c| c.stderr.as_ref())
            .map(|e| e.as_raw_fd())
        else {
            return "(not kept)".into();
        };
        let mut buf = vec![0u8; 16 << 10];
        // SAFETY: a read into our own buffer from the child's stderr pipe, which the child
        // handle keeps open; MSG_DONTWAIT-like behaviour comes from O_NONBLOCK set just before.
        let n = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
        };
        if n <= 0 {
            return "(nothing)".into();
        }
        String::from_utf8_lossy(&buf[..n as usize]).into_owned()
    }

    /// The VMM's state as /proc shows it (gone, a zombie that exited, or each thread's state
    /// and wait channel): what a test prints when the API stops answering.
    pub fn process_state(&self) -> String {
        let pid = self.pid();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return format!("pid {pid} is gone");
        };
        let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
        if state == Some('Z') {
            return format!("pid {pid} exited; its stderr: {}", self.stderr_now());
        }
        let mut threads = Vec::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                let p = t.path();
                let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
                let stat = read("stat");
                let st = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
                threads.push(format!(
                    "{} {:?} {}",
                    read("comm").trim(),
                    st.unwrap_or('?'),
                    read("wchan").trim()
                ));
            }
        }
        format!("pid {pid} alive; threads: {}", threads.join(", "))
    }

    pub fn ok_json(&self, endpoint: &str) -> Value {
        let (status, body) = self.curl("GET", endpoint, None);
        assert_eq!(status, 200, "{endpoint}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{endpoint}: {e}: {body}"))
    }

    pub fn put(&self, endpoint: &str) -> (u16, String) {
        self.curl("PUT", endpoint, None)
    }

    pub fn state(&self) -> String {
        self.ok_json("vm.info")["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn ch_remote(&self, args: &[&str]) -> Output {
        Command::new(ch_remote_bin())
            .arg("--api-socket")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ch-remote")
    }

    /// Waits for the VMM to exit on its own.
    pub fn wait(&mut self) -> common::Run {
        let child = self.child.take().expect("VMM already waited for");
        common::wait_with_timeout(child, Duration::from_secs(20))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn require_curl() {
    let ok = Command::new("curl")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "these tests need curl (Debian package curl)");
}

/// One request with curl; returns the status code and the body.
pub fn curl(sock: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "20", "-w", "\n%{http_code}", "-X", method])
        .arg("--unix-socket")
        .arg(sock)
        .arg(format!("http://localhost/api/v1/{endpoint}"));
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = cmd.output().expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A VmConfig for the test guest in scenario `test`, its serial port into `serial`.
pub fn guest_config(test: &str, serial: &Path) -> String {
    let kernel = common::guest().elf_pvh.display().to_string();
    serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256u64 << 20},
        "payload": {"kernel": kernel, "cmdline": format!("test={test}")},
        "serial": {"mode": "File", "file": serial},
        "console": {"mode": "Off"},
    })
    .to_string()
}

/// Waits until `file` holds `needle` `count` times.
pub fn wait_for(file: &Path, needle: &str, count: usize) -> String {
    // Only a failing test waits this long; a loaded machine can take seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {count}x '{needle}' in {}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The TICK lines printed so far.
pub fn ticks(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("TICK "))
        .count()
}

/// Events in an `--event-monitor` file, as `source:event`.
pub fn events(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(|v| {
            let v = v.expect("event monitor output is JSON");
            assert!(v["timestamp"]["secs"].is_u64() && v["timestamp"]["nanos"].is_u64());
            assert!(v.get("properties").is_some());
            format!(
                "{}:{}",
                v["source"].as_str().unwrap_or("?"),
                v["event"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

/// The lines of an error answer: the original's JSON list of strings.
pub fn error_lines(body: &str) -> Vec<String> {
    serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("an error body is a JSON list of strings ({e}): {body}"))
}

/// One `BUSY` line of the busy scenario.
#[derive(Debug, Clone)]
pub struct Busy {
    pub n: u64,
    pub clock: u64,
    pub gen: String,
    pub mem: String,
    pub disk: String,
}

/// The complete BUSY lines of `text` (a snapshot may have caught a line half printed: its
/// rest opens the restored VM's output, and is not a BUSY line).
pub fn busy_lines(text: &str) -> Vec<Busy> {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("BUSY ")?.split(' ');
            let n = w.next()?.parse().ok()?;
            let mut b = Busy {
                n,
                clock: 0,
                gen: String::new(),
                mem: String::new(),
                disk: String::new(),
            };
            for kv in w {
                match kv.split_once('=')? {
                    ("clock", v) => b.clock = v.parse().ok()?,
                    ("gen", v) => b.gen = v.into(),
                    ("mem", v) => b.mem = v.into(),
                    ("disk", v) => b.disk = v.into(),
                    _ => {}
                }
            }
            Some(b)
        })
        .collect()
}

/// Runs ch-remote, which must succeed; returns its standard output.
pub fn ch_remote_ok(vmm: &Vmm, args: &[&str]) -> String {
    let out = vmm.ch_remote(args);
    assert!(
        out.status.success(),
        "ch-remote {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest's serial output so far.
pub fn serial_text(serial: &Path) -> String {
    std::fs::read_to_string(serial).unwrap_or_default()
}

/// No FAIL line in the guest's serial output so far.
pub fn assert_no_fail(serial: &Path) {
    let text = serial_text(serial);
    assert!(
        !text.lines().any(|l| l.starts_with("FAIL")),
        "the guest failed:\n{text}"
    );
}

/// Waits (up to `timeout`) until `line` is a whole line of the serial output `n` times; fails
/// at once on a FAIL line.
pub fn wait_line(serial: &Path, line: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = serial_text(serial);
        if text.lines().filter(|l| *l == line).count() >= n {
            return;
        }
        assert!(
            !text.lines().any(|l| l.starts_with("FAIL")),
            "the guest failed:\n{text}"
        );
        assert!(Instant::now() < deadline, "no {n}x '{line}' in:\n{text}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A field of /proc/<pid>/status in bytes (`VmRSS`, `RssShmem`, ...).
pub fn status_bytes(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status:\n{text}"));
    kib * 1024
}

/// The configuration interrupts the guest had taken at its last `INFO <device> config_irqs=N`
/// line (the balloon and virtio-mem drivers print one before each report, and when only an
/// interrupt came).
pub fn config_irqs(serial: &Path, device: &str) -> u64 {
    let text = serial_text(serial);
    let prefix = format!("INFO {device} config_irqs=");
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{text}"))
}

/// Waits (60 s at most) for the guest to report more configuration interrupts than `before`:
/// on a loaded host the interrupt may come after the driver found the change by polling.
pub fn wait_config_irqs_above(serial: &Path, device: &str, before: u64) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while config_irqs(serial, device) <= before {
        assert!(
            std::time::Instant::now() < end,
            "no {device} configuration interrupt (still {before})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
