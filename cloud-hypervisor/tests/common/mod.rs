//! Helpers for tests that run the real `cloud-hypervisor` binary on the test guest.
#![allow(dead_code)]

pub mod net;
pub mod qsd;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_cloud-hypervisor");

/// Every machine we test on has KVM; a test that finds none must fail, not skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM"
    );
}

pub fn guest() -> &'static guest_image::Artifacts {
    static ARTIFACTS: OnceLock<guest_image::Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(|| {
        require_kvm();
        guest_image::build().expect("building the test guest")
    })
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The guest's checks all passed and it powered off cleanly.
    pub fn assert_guest_passed(&self) {
        assert_eq!(
            self.code(),
            Some(0),
            "VMM exit status {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stdout.lines().any(|l| l.starts_with("FAIL")),
            "guest reported failures:\n{}",
            self.stdout
        );
        let summary = self
            .stdout
            .lines()
            .rfind(|l| l.starts_with("SUMMARY "))
            .unwrap_or_else(|| panic!("no SUMMARY line:\n{}\n{}", self.stdout, self.stderr));
        assert!(summary.ends_with(" failed=0"), "{summary}");
        assert!(!summary.contains("passed=0 "), "{summary}");
    }

    pub fn assert_passed(&self, check: &str) {
        assert!(
            self.stdout
                .lines()
                .any(|l| l == format!("PASS {check}") || l.starts_with(&format!("PASS {check} "))),
            "no 'PASS {check}' in:\n{}",
            self.stdout
        );
    }
}

/// Waits for `child` up to `timeout`; kills it and panics if it takes longer.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the VMM") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_thread.join().unwrap_or_default();
            let stderr = err_thread.join().unwrap_or_default();
            panic!(
                "the VMM did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

pub fn spawn(args: &[&str]) -> Child {
    Command::new(VMM)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cloud-hypervisor")
}

pub fn run(args: &[&str]) -> Run {
    wait_with_timeout(spawn(args), Duration::from_secs(60))
}

/// Boots `kernel` with the serial port on stdout and no virtio console.
pub fn boot(kernel: &Path, cmdline: &str, extra: &[&str]) -> Run {
    let kernel = kernel.to_str().unwrap();
    let mut args = vec![
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
        "--serial",
        "tty",
        "--console",
        "off",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// A scratch directory unique to this test process and `name`. They stay after the tests (to
/// look into a failure); the first call of a test process removes those of processes that have
/// ended, so that runs do not fill the disk.
pub fn scratch(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_scratch);
    let dir = std::env::temp_dir().join(format!("ch-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `ch-test-<pid>-*` directories whose process is gone.
fn sweep_scratch() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ch-test-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Reads `f` (whose fd is `fd`) until `needle` appears; panics after `timeout`.
pub fn read_until(f: &mut dyn Read, fd: i32, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "'{needle}' did not arrive; got:\n{}",
            String::from_utf8_lossy(&got)
        );
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
        let mut buf = [0u8; 4096];
        match f.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(5)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Opens the pty the VMM announced on its standard error as `<what> PTY: <path>`
/// (`what` is "serial" or "console"). Takes the child's stderr pipe.
pub fn open_announced_pty(child: &mut std::process::Child, what: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let mut stderr = child.stderr.take().expect("the VMM's stderr is piped");
    let fd = stderr.as_raw_fd();
    // Lines until the one with the path is whole; a read may bring log lines before or after
    // it (a vCPU's warning): the path ends its own line.
    let marker = format!("{what} PTY: ");
    let mut text = String::new();
    while !text
        .split(&marker)
        .nth(1)
        .is_some_and(|rest| rest.contains('\n'))
    {
        text.push_str(&read_until(&mut stderr, fd, "\n", Duration::from_secs(10)));
    }
    let path = text
        .split(&marker)
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap_or_else(|| panic!("no {what} pty path in '{text}'"))
        .trim()
        .to_string();
    // Not as our controlling terminal: the VMM's resize watcher makes it its own.
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        std::fs::OpenOptions::new().read(true).write(true),
        libc::O_NOCTTY,
    )
    .open(&path)
    .unwrap_or_else(|e| panic!("cannot open {path}: {e}"))
}

/// Connects to the Unix socket the VMM listens on at `sock` (retrying for up to 10 s while it
/// comes up) and makes the stream non-blocking. `what` names the socket in the panic message.
pub fn connect_when_listening(sock: &Path, what: &str) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("cannot connect to the {what} socket: {e}"),
        }
    };
    stream.set_nonblocking(true).unwrap();
    stream
}

/// A pty pair (master, slave); the slave can become the VMM's terminal.
pub fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty fills the two ints; the other arguments may be null.
    let ret = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: both fds were just opened and are owned here alone.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

/// The binary `name` of the workspace package of the same name (our vhost-user backends),
/// built with cargo (debug or release, as the calling test): another package's binaries are
/// not built for this one's tests. Callers keep the path (the build runs once per test binary).
pub fn build_workspace_bin(name: &str) -> PathBuf {
    // target/<triple>/<profile>/deps/<this test>
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", name, "--bin", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running cargo build -p {name}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join(name);
    assert!(bin.exists(), "no {}", bin.display());
    bin
}

/// `GET /api/v1/vmm.ping` on the API socket at `sock`: the response's status line.
pub fn ping(sock: &Path) -> String {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("the API socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

/// Polls `done` every 20 ms until it holds; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Until `needle` is in the file `serial` (`timeout` at most); the file's text.
pub fn wait_serial(serial: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {needle:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A test's scratch directory (`scratch(name)`) and the files its VMM and vhost-user backend
/// use there: the backend's socket `sock`, the VMM's API socket and its serial output.
pub struct Fixture {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub api: PathBuf,
    pub serial: PathBuf,
}

impl Fixture {
    /// The directory `scratch(name)`, the backend's socket named `sock` in it.
    pub fn new(name: &str, sock: &str) -> Self {
        let dir = scratch(name);
        Fixture {
            sock: dir.join(sock),
            api: dir.join("api.sock"),
            serial: dir.join("serial.out"),
            dir,
        }
    }

    /// `--serial`'s argument: the serial output into `serial`.
    pub fn serial_arg(&self) -> String {
        format!("file={}", self.serial.display())
    }

    /// `--api-socket`'s argument: the API on `api`.
    pub fn api_arg(&self) -> String {
        format!("path={}", self.api.display())
    }

    /// What the guest wrote to its serial port so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Until `needle` is in the serial output (`timeout` at most); the text.
    pub fn wait_serial(&self, needle: &str, timeout: Duration) -> String {
        wait_serial(&self.serial, needle, timeout)
    }

    /// The VMM booting the test guest's `test=hotplug` (which drives every function it is told
    /// of) with shared guest RAM and two vCPUs, its serial output and API here.
    pub fn spawn_hotplug_guest(&self) -> Child {
        spawn(&[
            "--kernel",
            guest().elf_pvh.to_str().unwrap(),
            "--cmdline",
            "test=hotplug",
            "--memory",
            "size=256M,shared=on",
            "--cpus",
            "boot=2",
            "--console",
            "off",
            "--serial",
            &self.serial_arg(),
            "--api-socket",
            &self.api_arg(),
        ])
    }

    /// Waits for `vmm` (`timeout` at most): its run, with the serial output as its stdout.
    pub fn wait(&self, vmm: Child, timeout: Duration) -> Run {
        let r = wait_with_timeout(vmm, timeout);
        Run {
            stdout: self.serial_text(),
            ..r
        }
    }
}

/// The slot of the first PCI address (`0000:00:<slot>.<f>`) in an add-device answer's `body`.
pub fn pci_slot(body: &str) -> u8 {
    body.split("0000:00:")
        .nth(1)
        .and_then(|b| u8::from_str_radix(&b[..2], 16).ok())
        .unwrap_or_else(|| panic!("no bdf in {body}"))
}

/// The test guest's `test=blk` scenario over one vhost-user disk, the backend at `sock` serving
/// it through `queues` queues (shared guest RAM, two vCPUs); `sectors` and `id` (GET_ID's
/// answer) are what the guest expects.
pub fn boot_vhost_user_blk(sock: &Path, queues: u16, sectors: u64, id: &str) -> Run {
    let disk = format!(
        "vhost_user=on,socket={},num_queues={queues}",
        sock.display()
    );
    let cmdline = format!("test=blk blk_disks=1 blk_sectors={sectors} blk_id={id}");
    boot(
        &guest().elf_pvh,
        &cmdline,
        &[
            "--memory",
            "size=256M,shared=on",
            "--cpus",
            "boot=2",
            "--disk",
            &disk,
        ],
    )
}

/// A fake migration destination's start: takes the first connection on `listener` and answers
/// the source's Start and Config requests with OK (16-byte response header, status 1), reading
/// their payloads; returns the connection, where the first Memory request comes next.
pub fn fake_destination_start(
    listener: &std::os::unix::net::UnixListener,
) -> std::os::unix::net::UnixStream {
    use std::io::Write;
    let (mut s, _) = listener.accept().unwrap();
    let mut ok = [0u8; 16];
    ok[0] = 1;
    for _ in 0..2 {
        let mut req = [0u8; 16];
        s.read_exact(&mut req).unwrap();
        let len = u64::from_le_bytes(req[8..].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        s.read_exact(&mut payload).unwrap();
        s.write_all(&ok).unwrap();
    }
    s
}

/// What `test=blk-resize` leaves once its 1 MiB disk grew to 4 MiB under it: its checks passed
/// (`serial`: its output), it saw 8192 sectors, and its new last sector (0x6b) is in `img`.
pub fn assert_blk_grew_to_4m(serial: &str, img: &Path) {
    for check in [
        "blkresize-capacity",
        "blkresize-generation",
        "blkresize-new-sector",
    ] {
        assert!(serial.contains(&format!("PASS {check}\n")), "{serial}");
    }
    assert!(serial.contains("BLKRESIZE capacity=8192\n"), "{serial}");
    let content = std::fs::read(img).unwrap();
    assert_eq!(content.len(), 4 << 20);
    assert!(content[(4 << 20) - 512..].iter().all(|&b| b == 0x6b));
}
