//! `--disk vhost_user=on` against our own backend, `vhost_user_block` (the workspace's
//! vhost_user_block crate, built here on first use): the test guest's virtio-blk driver reads
//! and writes raw and qcow2 images through it, byte for byte; the backend killed under a guest
//! writing and started again: the frontend reconnects, the guest's writes complete and read
//! back, and the VMM answers its API throughout; the backend's command line.

mod common;

use std::io::{Read, Write};
use std::ops::Deref;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{boot_vhost_user_blk, guest, spawn, wait_until, wait_with_timeout, Fixture, Run};

/// The same backend behind `--generic-vhost-user device_type=block`.
#[path = "vhost_user_blk/generic.rs"]
mod generic;

const SECTORS: u64 = 16;
const MIB: u64 = 1 << 20;

/// The backend binary, built on first use (`common::build_workspace_bin`).
fn backend_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| common::build_workspace_bin("vhost_user_block"))
}

/// Our backend serving `img` on `sock`; killed when dropped.
struct Backend {
    child: Child,
    args: String,
}

impl Backend {
    fn start(img: &Path, sock: &Path, extra: &str) -> Self {
        let args = format!("path={},socket={}{extra}", img.display(), sock.display());
        let _ = std::fs::remove_file(sock);
        let b = Backend {
            child: Self::spawn(&args),
            args,
        };
        b.wait_listening(sock);
        b
    }

    fn spawn(args: &str) -> Child {
        Command::new(backend_bin())
            .args(["--block-backend", args])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting vhost_user_block")
    }

    /// Until the backend's socket file appears (it serves one connection: a probe would use
    /// it up).
    fn wait_listening(&self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no {}", sock.display());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, as a crash.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self, sock: &Path) {
        self.kill();
        self.child = Self::spawn(&self.args);
        self.wait_listening(sock);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn host_pattern(s: u64) -> u8 {
    (s as u8).wrapping_mul(3).wrapping_add(1)
}
fn guest_pattern(s: u64) -> u8 {
    (s as u8).wrapping_mul(5).wrapping_add(0x80)
}
fn mq_pattern() -> u8 {
    0x40
}

/// What the guest's `blk` scenario expects of disk 0 at the start.
fn host_image() -> Vec<u8> {
    let mut img = vec![0u8; MIB as usize];
    for s in 0..SECTORS {
        img[s as usize * 512..][..512].fill(host_pattern(s));
    }
    img
}

/// The image's content after the guest's `blk` scenario (through `queues` queues).
fn check_written(content: &[u8], queues: u16) {
    assert_eq!(content.len() as u64, MIB, "size changed");
    for s in 0..SECTORS {
        let sector = &content[s as usize * 512..][..512];
        assert!(
            sector.iter().all(|&b| b == guest_pattern(s)),
            "sector {s}: {:x?}",
            &sector[..8]
        );
    }
    let mut rest = &content[(SECTORS * 512) as usize..];
    if queues > 1 {
        let (sector, after) = rest.split_at(512);
        assert!(sector.iter().all(|&b| b == mq_pattern()), "mq sector");
        rest = after;
    }
    assert!(rest.iter().all(|&b| b == 0), "beyond the written sectors");
}

/// A qcow2 image holding `content` (qemu-img from qemu-utils).
fn make_qcow2(path: &Path, content: &[u8]) {
    let raw = path.with_extension("src.raw");
    std::fs::write(&raw, content).unwrap();
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .args([&raw, path])
        .output()
        .expect("qemu-img is required (qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image's guest-visible content (qemu-img's reading, not ours).
fn qcow2_content(path: &Path) -> Vec<u8> {
    let raw = path.with_extension("out.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .args([path, &raw])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    std::fs::read(raw).unwrap()
}

/// GET_ID's answer: the image's device, rdev and inode numbers (as the original backend's).
fn serial_of(img: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(img).unwrap();
    let mut s = format!("{}{}{}", m.dev(), m.rdev(), m.ino());
    s.truncate(20);
    s
}

fn assert_blk_passed(r: &Run, queues: u16) {
    r.assert_guest_passed();
    for c in [
        "get-id",
        "read",
        "write",
        "flush",
        "read-back",
        "read-beyond-end",
    ] {
        r.assert_passed(&format!("blk0-{c}"));
    }
    if queues > 1 {
        for c in ["mq-read", "mq-write", "mq-flush"] {
            r.assert_passed(&format!("blk0-{c}"));
        }
    }
}

/// A test's files: its scratch directory `name` (`common::Fixture`, the backend's socket
/// `vub.sock`) and the image the backend serves.
struct BlkFixture {
    files: Fixture,
    img: PathBuf,
}

impl Deref for BlkFixture {
    type Target = Fixture;

    fn deref(&self) -> &Fixture {
        &self.files
    }
}

impl BlkFixture {
    /// The image is named `img` (not made yet).
    fn new(name: &str, img: &str) -> Self {
        let files = Fixture::new(name, "vub.sock");
        let img = files.dir.join(img);
        BlkFixture { files, img }
    }

    /// For the `blkfault` scenario: an 8 MiB raw image of zeroes.
    fn zeroed(name: &str) -> Self {
        let fx = Self::new(name, "disk.raw");
        std::fs::write(&fx.img, vec![0u8; 8 * MIB as usize]).unwrap();
        fx
    }

    /// Our backend serving the image on `sock`, with `extra` options (`,key=value...`).
    fn backend(&self, extra: &str) -> Backend {
        Backend::start(&self.img, &self.sock, extra)
    }

    /// The VMM booting `cmdline` with shared guest RAM and `device` (`["--disk", <disk>]`), its
    /// serial output here, with `-v` first if `verbose` and the API socket here if `api`.
    fn spawn_vmm(&self, verbose: bool, cmdline: &str, device: [&str; 2], api: bool) -> Child {
        let (serial, api_arg) = (self.serial_arg(), self.api_arg());
        let mut args = vec![
            "--kernel",
            guest().elf_pvh.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            "size=256M,shared=on",
            device[0],
            device[1],
            "--serial",
            &serial,
            "--console",
            "off",
        ];
        if verbose {
            args.insert(0, "-v");
        }
        if api {
            args.extend(["--api-socket", &api_arg]);
        }
        spawn(&args)
    }

    /// The VMM of a `blkfault` guest writing `blocks` blocks through the backend (`-v` first
    /// if `verbose`), with its API here.
    fn spawn_blkfault(&self, verbose: bool, blocks: u64) -> Child {
        let cmdline = format!("test=blkfault blkfault_chunk=8 blkfault_blocks={blocks}");
        let disk = format!("vhost_user=on,socket={}", self.sock.display());
        self.spawn_vmm(verbose, &cmdline, ["--disk", &disk], true)
    }
}

/// A raw image through one queue and through the last of two: the guest reads the host's
/// bytes, writes its own, reads them back, and they are in the file byte for byte.
#[test]
fn raw_image_through_our_backend() {
    for queues in [1u16, 2] {
        let fx = BlkFixture::new(&format!("vub-raw{queues}"), "disk.raw");
        std::fs::write(&fx.img, host_image()).unwrap();
        let _b = fx.backend(&format!(",num_queues={queues}"));
        let r = boot_vhost_user_blk(&fx.sock, queues, SECTORS, &serial_of(&fx.img));
        assert_blk_passed(&r, queues);
        check_written(&std::fs::read(&fx.img).unwrap(), queues);
    }
}

/// A qcow2 image (detected, as --disk does): the same, checked through qemu-img's reading of
/// the file, which must also pass `qemu-img check`.
#[test]
fn qcow2_image_through_our_backend() {
    let fx = BlkFixture::new("vub-qcow2", "disk.qcow2");
    make_qcow2(&fx.img, &host_image());
    let b = fx.backend(",num_queues=2,poll_queue=off");
    let r = boot_vhost_user_blk(&fx.sock, 2, SECTORS, &serial_of(&fx.img));
    assert_blk_passed(&r, 2);
    drop(b);
    check_written(&qcow2_content(&fx.img), 2);
}

/// One request on the API socket (`Connection: close`; a PUT carries the JSON `body`), its
/// answer awaited `timeout` at most: the status line and the body.
fn api_call(sock: &Path, method: &str, what: &str, body: &str, timeout: u64) -> (String, String) {
    let mut s = UnixStream::connect(sock).expect("the API socket");
    s.set_read_timeout(Some(Duration::from_secs(timeout)))
        .unwrap();
    let content = if method == "PUT" {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    } else {
        String::new()
    };
    let req = format!(
        "{method} /api/v1/{what} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         {content}\r\n{body}"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

/// `GET /api/v1/<what>` on the API socket: the status line.
fn api_get(sock: &Path, what: &str) -> String {
    api_call(sock, "GET", what, "", 5).0
}

/// The body of a GET on the API.
fn api_get_body(sock: &Path, what: &str) -> String {
    api_call(sock, "GET", what, "", 5).1
}

/// `PUT /api/v1/<what>` on the API socket with a JSON `body`: the status line and the body.
fn api_put(sock: &Path, what: &str, body: &str) -> (String, String) {
    api_call(sock, "PUT", what, body, 30)
}

/// The highest `BLKFAULT flushed <n>` the guest printed so far.
fn flushed(serial: &Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("BLKFAULT flushed "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits (60 s at most) until the guest flushed write `n`.
fn wait_flushed(serial: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while flushed(serial) < n {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        assert!(
            Instant::now() < deadline && !text.contains("SUMMARY"),
            "the guest did not reach write {n}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Word `w` of sector `s` as the guest's write `n` leaves it (test-guest/src/faults.rs).
fn word(n: u64, s: u64, w: u64) -> u64 {
    (n + 1) << 32 | (s & 0xff_ffff) << 8 | w
}

/// The guest finished `blocks` writes without an error and read them back.
fn check_blkfault_guest(r: &Run, blocks: u64) {
    r.assert_guest_passed();
    r.assert_passed("blkfault-readback");
    assert!(
        r.stdout.contains(&format!(
            "BLKFAULT done writes={blocks} errors=0 readback={blocks}"
        )),
        "{}",
        r.stdout
    );
}

/// The image holds each of the guest's `blocks` writes byte for byte, and zeroes after them.
fn check_blkfault_image(img: &Path, blocks: u64) {
    let content = std::fs::read(img).unwrap();
    for n in 0..blocks {
        for s in n * 8..n * 8 + 8 {
            for w in 0..64 {
                let at = (s * 512 + w * 8) as usize;
                let got = u64::from_le_bytes(content[at..at + 8].try_into().unwrap());
                assert_eq!(got, word(n, s, w), "write {n} sector {s} word {w}");
            }
        }
    }
    assert!(content[(blocks * 8 * 512) as usize..]
        .iter()
        .all(|&x| x == 0));
}

/// The guest finished `blocks` writes without an error, read them back, and the image holds
/// each byte for byte.
fn check_blkfault_done(r: &Run, img: &Path, blocks: u64) {
    check_blkfault_guest(r, blocks);
    check_blkfault_image(img, blocks);
}

/// The backend SIGKILLed twice while the guest writes and flushes (`blkfault`: write n to
/// block n, 8 sectors, a FLUSH after each), started again after a while each time: meanwhile
/// the guest's request waits (its writes make no progress) and the VMM answers its API; then
/// the frontend reconnects, replays the set-up from the used index, and the guest's writes go
/// on: every one completes without an error, reads back (`blkfault-readback`), and is in the
/// image byte for byte.
#[test]
fn backend_killed_and_restarted_under_guest_io() {
    const BLOCKS: u64 = 1500;
    let fx = BlkFixture::zeroed("vub-reconnect");
    let mut b = fx.backend("");
    let child = fx.spawn_blkfault(false, BLOCKS);
    let mut outages = Vec::new();
    for at in [100, 600] {
        wait_flushed(&fx.serial, at);
        b.kill();
        let before = flushed(&fx.serial);
        let t = Instant::now();
        // The backend is gone for 500 ms: the guest's writes wait, the VMM answers.
        while t.elapsed() < Duration::from_millis(500) {
            assert_eq!(api_get(&fx.api, "vmm.ping"), "HTTP/1.1 200 ");
            assert_eq!(api_get(&fx.api, "vm.info"), "HTTP/1.1 200 ");
            std::thread::sleep(Duration::from_millis(50));
        }
        let stalled = flushed(&fx.serial);
        assert!(
            stalled <= before + 1,
            "the guest went on without a backend: write {before} then {stalled}"
        );
        b.restart(&fx.sock);
        outages.push((before, stalled));
    }
    let r = fx.wait(child, Duration::from_secs(120));
    check_blkfault_guest(&r, BLOCKS);
    // Each time the guest's next request was waiting (its driver has one in flight): the new
    // backend ran it.
    let replays: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("vhost-user-blk: backend reconnected after"))
        .collect();
    assert_eq!(replays.len(), 2, "{}", r.stderr);
    assert!(
        replays.iter().all(|l| l.ends_with("(1 to run again)")),
        "{replays:?}"
    );
    eprintln!("outages (flushed before, after 500 ms): {outages:?}");
    for l in r.stderr.lines().filter(|l| l.contains("vhost-user-blk")) {
        eprintln!("{l}");
    }
    check_blkfault_image(&fx.img, BLOCKS);
}

/// `vhost_reconnect_timeout=1`: the backend SIGKILLed and not back within a second, so the
/// device gives up on it and needs a reset (the guest, `test=blk-reset`, sees NEEDS_RESET; its
/// read waiting in the ring is never run); the backend is started again, the guest resets the
/// device and initialises it again, the device connects to the new backend, and the guest's
/// reads and a write are served (sector 8 is in the image).
#[test]
fn backend_gone_past_the_timeout_then_the_reset_device_connects_again() {
    let fx = BlkFixture::new("vub-give-up", "disk.raw");
    std::fs::write(&fx.img, host_image()).unwrap();
    let mut b = fx.backend("");
    let disk = format!(
        "vhost_user=on,socket={},vhost_reconnect_timeout=1",
        fx.sock.display()
    );
    let child = fx.spawn_vmm(false, "test=blk-reset", ["--disk", &disk], false);
    let secs30 = Duration::from_secs(30);
    fx.wait_serial("BLKRESET waiting for the backend to go", secs30);
    b.kill();
    let t = Instant::now();
    let text = fx.wait_serial("blkreset-needs-reset", secs30);
    let gave_up = t.elapsed();
    assert!(text.contains("PASS blkreset-needs-reset"), "{text}");
    assert!(
        gave_up >= Duration::from_millis(900) && gave_up < Duration::from_secs(10),
        "NEEDS_RESET after {gave_up:?}"
    );
    b.restart(&fx.sock);
    let r = fx.wait(child, Duration::from_secs(60));
    r.assert_guest_passed();
    for c in [
        "blkreset-read",
        "blkreset-needs-reset",
        "blkreset-reread",
        "blkreset-write",
    ] {
        r.assert_passed(c);
    }
    assert!(
        r.stderr.contains("for 1 s") && r.stderr.contains("the device needs a reset"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("vhost-user-blk: backend connected after"),
        "{}",
        r.stderr
    );
    eprintln!("NEEDS_RESET {} ms after the kill", gave_up.as_millis());
    let content = std::fs::read(&fx.img).unwrap();
    assert!(content[8 * 512..9 * 512].iter().all(|&x| x == 0xa5));
    assert!(content[..8 * 512]
        .chunks(512)
        .enumerate()
        .all(|(s, c)| c.iter().all(|&x| x == host_pattern(s as u64))));
}

/// Pauses the VM and snapshots it into `snap` (created): its devices are paused too (the
/// backend stops each ring: GET_VRING_BASE). Returns the snapshot's vhost-user-blk transport
/// state (JSON).
fn pause_and_snapshot(api: &Path, snap: &Path) -> serde_json::Value {
    pause_and_snapshot_device(api, snap, "_disk0", "vhost-user-blk")
}

/// `pause_and_snapshot` for the vhost-user device `id` of kind `device` (`vhost-user-blk`,
/// `generic-vhost-user`): its transport state.
fn pause_and_snapshot_device(api: &Path, snap: &Path, id: &str, device: &str) -> serde_json::Value {
    assert_eq!(api_put(api, "vm.pause", "").0, "HTTP/1.1 204 ");
    std::fs::create_dir_all(snap).unwrap();
    let body = format!(r#"{{"destination_url": "file://{}"}}"#, snap.display());
    let (status, text) = api_put(api, "vm.snapshot", &body);
    assert_eq!(status, "HTTP/1.1 204 ", "{text}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("state.json")).unwrap()).unwrap();
    let dev = state["pci"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no {id} in the snapshot"));
    assert_eq!(
        dev["device"],
        serde_json::json!({"vhost_user": {"version": 1, "device": device}}),
        "{dev}"
    );
    dev["transport"].clone()
}

/// Pause and resume under guest I/O: the guest writes and flushes (`blkfault`), the VM is
/// paused and snapshotted at about write 200 (the backend stops the ring: GET_VRING_BASE; the
/// snapshot holds the queue's base), nothing moves for 500 ms (neither the guest's writes nor
/// the image: the backend serves nothing), and after the resume (the rings handed back at the
/// saved base) every write completes and is in the image byte for byte.
#[test]
fn paused_and_snapshotted_under_guest_io_then_resumed() {
    const BLOCKS: u64 = 1500;
    let fx = BlkFixture::zeroed("vub-pause");
    let _b = fx.backend("");
    let child = fx.spawn_blkfault(true, BLOCKS);
    wait_flushed(&fx.serial, 200);
    let t = pause_and_snapshot(&fx.api, &fx.dir.join("snap"));
    let q = &t["queues"][0];
    assert_eq!(t["activated"], true, "{t}");
    // The backend serves in ring order and stopped between two batches: nothing in flight.
    assert_eq!(q["next_avail"], q["next_used"], "{q}");
    assert!(q["next_avail"].as_u64().unwrap() > 0, "{q}");
    let (before, image) = (flushed(&fx.serial), std::fs::read(&fx.img).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        flushed(&fx.serial),
        before,
        "the guest went on while paused"
    );
    assert!(
        std::fs::read(&fx.img).unwrap() == image,
        "the image changed while paused"
    );
    assert_eq!(api_put(&fx.api, "vm.resume", "").0, "HTTP/1.1 204 ");
    let r = fx.wait(child, Duration::from_secs(120));
    let paused = format!(
        "vhost-user-blk: paused: queue 0 at {} (used {})",
        q["next_avail"], q["next_used"]
    );
    assert!(r.stderr.contains(&paused), "{paused:?}:\n{}", r.stderr);
    assert!(r.stderr.contains("vhost-user-blk: resumed"), "{}", r.stderr);
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// Snapshot under guest I/O, then the VMM and its backend gone; a fresh backend on the same
/// socket and a new VMM restoring the snapshot (`--restore`): the device connects to it and
/// hands it the rings at the saved bases; after the resume the guest's writes go on from where
/// they were, every one completes and is in the image byte for byte.
#[test]
fn snapshot_restored_in_a_new_vmm_with_a_fresh_backend() {
    const BLOCKS: u64 = 1000;
    let fx = BlkFixture::zeroed("vub-restore");
    let snap = fx.dir.join("snap");
    let mut b = fx.backend("");
    let mut child = fx.spawn_blkfault(true, BLOCKS);
    wait_flushed(&fx.serial, 300);
    let t = pause_and_snapshot(&fx.api, &snap);
    let base = t["queues"][0]["next_avail"].clone();
    let _ = child.kill();
    let _ = child.wait();
    b.restart(&fx.sock);
    let r = restore_and_resume(&fx, &snap);
    // The restore started the device at the saved base and paused it until the resume.
    let paused = format!("vhost-user-blk: paused: queue 0 at {base} (used {base})");
    assert!(r.stderr.contains(&paused), "{paused:?}:\n{}", r.stderr);
    assert!(r.stderr.contains("vhost-user-blk: resumed"), "{}", r.stderr);
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// A new VMM (`-v`) restoring the snapshot in `snap` with its API here; once it answers, the
/// VM is resumed and the VMM waited for (120 s at most).
fn restore_and_resume(fx: &BlkFixture, snap: &Path) -> Run {
    let _ = std::fs::remove_file(&fx.api);
    let restored = spawn(&[
        "-v",
        "--restore",
        &format!("source_url=file://{}", snap.display()),
        "--api-socket",
        &fx.api_arg(),
    ]);
    wait_until(
        Duration::from_secs(30),
        "the restored VMM does not answer",
        || UnixStream::connect(&fx.api).is_ok() && api_get(&fx.api, "vm.info") == "HTTP/1.1 200 ",
    );
    assert_eq!(api_put(&fx.api, "vm.resume", "").0, "HTTP/1.1 204 ");
    fx.wait(restored, Duration::from_secs(120))
}

/// The backend killed while the VM is paused (its rings stopped by the snapshot) and started
/// again: the resume finds the old connection dead, so the device reconnects (as after a crash
/// under a running guest) and hands the new backend the rings at the bases the pause saved;
/// every write completes and is in the image.
#[test]
fn backend_killed_while_paused_then_resumed() {
    const BLOCKS: u64 = 800;
    let fx = BlkFixture::zeroed("vub-pause-kill");
    let mut b = fx.backend("");
    let child = fx.spawn_blkfault(true, BLOCKS);
    wait_flushed(&fx.serial, 150);
    let t = pause_and_snapshot(&fx.api, &fx.dir.join("snap"));
    let base = t["queues"][0]["next_avail"].clone();
    b.kill();
    std::thread::sleep(Duration::from_millis(200));
    b.restart(&fx.sock);
    assert_eq!(api_put(&fx.api, "vm.resume", "").0, "HTTP/1.1 204 ");
    let r = fx.wait(child, Duration::from_secs(120));
    assert!(
        r.stderr.contains("resume: vhost-user") && r.stderr.contains("taken as gone"),
        "{}",
        r.stderr
    );
    let line = reconnection(&r);
    assert!(line.contains(&format!("queue 0 at {base}")), "{line}");
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// The VMM's log line of the device's reconnection to a backend.
fn reconnection(r: &Run) -> &str {
    r.stderr
        .lines()
        .find(|l| l.contains("backend connected after"))
        .unwrap_or_else(|| panic!("no reconnection:\n{}", r.stderr))
}

/// A migration over the network under guest I/O, to a destination that takes Start and Config
/// and dies in the first memory pass: the backend is asked to log its writes to guest RAM
/// (LOG_SHMFD: SET_LOG_BASE, VHOST_F_LOG_ALL, the used ring logged; the relay stopped and
/// started again around it), the migration fails, the logging stops the same way, and the
/// guest's writes go on throughout: all of them complete and are in the image byte for byte.
#[test]
fn a_failed_migration_starts_and_stops_the_backends_dirty_log_under_guest_io() {
    use std::os::unix::net::UnixListener;
    const BLOCKS: u64 = 1500;
    let fx = BlkFixture::zeroed("vub-migrate");
    let _b = fx.backend("");
    let child = fx.spawn_blkfault(true, BLOCKS);
    wait_flushed(&fx.serial, 100);
    let dest = fx.dir.join("dest.sock");
    let listener = UnixListener::bind(&dest).unwrap();
    let fake = std::thread::spawn(move || {
        let mut s = common::fake_destination_start(&listener);
        let mut some = vec![0u8; 4 << 20];
        s.read_exact(&mut some).unwrap();
    });
    let body = format!(r#"{{"destination_url": "unix:{}"}}"#, dest.display());
    let (status, text) = api_put(&fx.api, "vm.send-migration", &body);
    assert!(status.starts_with("HTTP/1.1 2"), "{status} {text}");
    fake.join().unwrap();
    let r = fx.wait(child, Duration::from_secs(120));
    for l in r
        .stderr
        .lines()
        .filter(|l| l.contains("migrat") || l.contains("vhost-user"))
    {
        eprintln!("{l}");
    }
    assert!(
        r.stderr
            .contains("vhost-user-blk: dirty logging on (LOG_SHMFD"),
        "{}",
        r.stderr
    );
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// A backend that stops answering (SIGSTOP) when the VM is snapshotted: GET_VRING_BASE times out
/// (the socket's 10 s), the snapshot is taken anyway (the queue's base the used index, where a
/// reconnection starts), the stuck backend's socket is shut; it is killed and another started,
/// and after the resume the device reconnects to it and every write completes byte for byte.
#[test]
fn a_backend_frozen_at_the_pause_is_dropped_and_replaced() {
    const BLOCKS: u64 = 600;
    let fx = BlkFixture::zeroed("vub-frozen");
    let mut b = fx.backend("");
    let child = fx.spawn_blkfault(true, BLOCKS);
    wait_flushed(&fx.serial, 100);
    let pid = b.child.id() as libc::pid_t;
    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    let snap = pause_and_snapshot(&fx.api, &fx.dir.join("snap"));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(60),
        "the snapshot took {took:?}"
    );
    let q = &snap["queues"][0];
    b.restart(&fx.sock);
    assert_eq!(api_put(&fx.api, "vm.resume", "").0, "HTTP/1.1 204 ");
    let r = fx.wait(child, Duration::from_secs(120));
    assert!(
        r.stderr.contains("GET_VRING_BASE 0") && r.stderr.contains("taken as gone"),
        "{}",
        r.stderr
    );
    let line = reconnection(&r);
    assert!(
        line.contains(&format!("queue 0 at {}", q["next_used"])),
        "{line} {q}"
    );
    eprintln!("snapshot with a frozen backend: {took:?}; {line}");
    check_blkfault_done(&r, &fx.img, BLOCKS);
}

/// The image of a hot-plug test: 1 MiB, `tag` in its first bytes (sector 0, which the guest
/// prints when it brings the disk up).
fn hotplug_image(fx: &BlkFixture, tag: &[u8; 16]) -> Vec<u8> {
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..16].copy_from_slice(tag);
    std::fs::write(&fx.img, &bytes).unwrap();
    bytes
}

/// With the `test=hotplug` guest READY: `PUT endpoint` with `body` adds a disk named `id`
/// served by our backend; the guest reads its sector 0 and writes sector 1 through it, which
/// reaches the image. Returns the disk's slot.
fn hot_add_and_use(fx: &BlkFixture, bytes: &[u8], endpoint: &str, body: &str, id: &str) -> u8 {
    let secs30 = Duration::from_secs(30);
    fx.wait_serial("READY", secs30);
    let (status, answer) = api_put(&fx.api, endpoint, body);
    assert!(status.contains(" 200 "), "{status}: {answer}");
    assert!(answer.contains(&format!(r#""id":"{id}""#)), "{answer}");
    let slot = common::pci_slot(&answer);
    let hex0: String = bytes[..16].iter().map(|b| format!("{b:02x}")).collect();
    fx.wait_serial(
        &format!("HOTPLUG ADDED slot={slot} type=blk sectors=2048 sector0={hex0}\n"),
        secs30,
    );
    fx.wait_serial(&format!("HOTPLUG IO slot={slot} ok\n"), secs30);
    let want = format!("hotplug-slot-{slot}");
    let now = std::fs::read(&fx.img).unwrap();
    assert_eq!(&now[512..512 + want.len()], want.as_bytes());
    slot
}

/// `vm.remove-device` of disk `id` in `slot`: the guest ejects it, the backend (its only
/// client gone) ends, and the guest saw no failure.
fn hot_remove(fx: &BlkFixture, backend: &mut Backend, id: &str, slot: u8) {
    let (status, body) = api_put(&fx.api, "vm.remove-device", &format!(r#"{{"id":"{id}"}}"#));
    assert!(status.contains(" 204 "), "{status}: {body}");
    fx.wait_serial(
        &format!("HOTPLUG GONE slot={slot}\n"),
        Duration::from_secs(30),
    );
    wait_until(Duration::from_secs(10), "the backend still runs", || {
        backend.child.try_wait().unwrap().is_some()
    });
    let text = fx.serial_text();
    assert!(!text.contains("FAIL"), "{text}");
    assert!(api_get(&fx.api, "vm.info").contains(" 200 "));
}

/// `vmm.shutdown`: the VMM ends cleanly.
fn shut_down(fx: &BlkFixture, vmm: Child) {
    let (status, _) = api_put(&fx.api, "vmm.shutdown", "");
    assert!(
        status.contains(" 200 ") || status.contains(" 204 "),
        "{status}"
    );
    let r = wait_with_timeout(vmm, Duration::from_secs(20));
    assert!(r.status.success(), "{}", r.stderr);
}

/// `vm.add-disk` with `vhost_user` on a running guest (`test=hotplug`, which drives every
/// function it is told of): the disk is served by our backend, the guest reads the image's
/// sector 0 and writes sector 1 through it, which reaches the image; `vm.info` records the
/// socket; `vm.remove-device` takes it away (the guest ejects it) and the backend, its only
/// client gone, ends.
#[test]
fn vhost_user_blk_hotplug_added_used_and_removed() {
    let fx = BlkFixture::new("vub-hotplug", "disk.img");
    let bytes = hotplug_image(&fx, b"vhost-user hot!\n");
    let mut backend = fx.backend("");
    let vmm = fx.spawn_hotplug_guest();
    let add = format!(
        r#"{{"vhost_user":true,"vhost_socket":"{}","id":"vdisk1"}}"#,
        fx.sock.display()
    );
    let slot = hot_add_and_use(&fx, &bytes, "vm.add-disk", &add, "vdisk1");
    let info = api_get_body(&fx.api, "vm.info");
    assert!(
        info.contains(&format!(r#""vhost_socket":"{}""#, fx.sock.display())),
        "{info}"
    );
    hot_remove(&fx, &mut backend, "vdisk1", slot);
    shut_down(&fx, vmm);
}
