//! Faults under a running VM, nothing lost: a disk image on a filesystem that fills up
//! (ENOSPC), fails its writes (EIO) or fails its reads (EIO), the VMM killed with SIGKILL in
//! the middle of guest writes. The guest (`test=blkfault`, see docs/test-guest.md) reports
//! which writes it saw acknowledged and flushed (and which reads failed); every one of them
//! must be in the image afterwards, the guest must get error statuses (never a hang), and the
//! VMM must go on. The TAP case is in `faults_net.rs`.
//!
//! The small filesystems are tmpfs mounts made in a private mount namespace (a thread of its
//! own, `unshare(CLONE_NEWNS)`), so nothing outlives the test; EIO comes from a loop device
//! whose backing file lies on a full tmpfs (the loop driver fails the writes it cannot store):
//! device-mapper's `error`/`flakey` targets would do too where the kernel has them (this
//! machine's has not). Read errors come from a FUSE filesystem of the test's own
//! (`fuse_eio`), mounted in such a namespace too.

mod common;
mod fuse_eio;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest, ping, scratch, spawn, wait_with_timeout, Run};

/// Sectors per guest write (4 KiB).
const CHUNK: u64 = 8;

/// Word `w` of sector `s` as guest write `n` leaves it (test-guest/src/faults.rs).
fn word(n: u64, s: u64, w: u64) -> u64 {
    n.wrapping_add(1) << 32 | (s & 0xff_ffff) << 8 | w
}

/// Runs `f` on a thread in a mount namespace of its own (private propagation), so that what
/// it mounts, and the VMMs it starts see, vanishes with it.
fn in_private_mounts(f: impl FnOnce() + Send + 'static) {
    let r = std::thread::spawn(move || {
        // SAFETY: unshare moves only the calling thread into a new mount namespace.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNS) };
        assert_eq!(
            ret,
            0,
            "unshare(CLONE_NEWNS) (these tests run as root): {}",
            std::io::Error::last_os_error()
        );
        sh(&["mount", "--make-rprivate", "/"]);
        f()
    })
    .join();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}

/// Runs a command; panics with its output if it fails.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tmpfs of `size` bytes at a new directory `name` under the test's scratch directory.
fn small_tmpfs(name: &str, size: u64) -> PathBuf {
    let dir = scratch(name);
    sh(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        &format!("size={size}"),
        "tmpfs",
        dir.to_str().unwrap(),
    ]);
    dir
}

/// A roomy tmpfs for a test's serial log and copies: the shared machine's disk fills up at
/// times, and a serial log that cannot be written loses the guest's lines.
fn out_tmpfs(name: &str) -> PathBuf {
    small_tmpfs(name, 128 << 20)
}

/// Unmounts `dir` (after a test that passed: a failed one leaves its files for a look while
/// the thread lives) and removes the directory.
fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
    let _ = std::fs::remove_dir_all(dir);
}

/// A loop device over `file`; detached when dropped.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop(
            sh(&["losetup", "-f", "--show", file.to_str().unwrap()])
                .trim()
                .to_string(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// What the guest's `BLKFAULT` lines say.
#[derive(Debug, Default)]
struct Report {
    /// Per block, the last write the guest saw acknowledged and then covered by a successful
    /// flush (and none of that block failed since).
    durable: HashMap<u64, u64>,
    write_errors: usize,
    flush_errors: usize,
    /// The highest write index reached by a flush line.
    last: u64,
    /// Flushes that succeeded after `BLKFAULT pause`.
    flushed_after_pause: usize,
}

/// Replays the complete `BLKFAULT` lines of `serial` as the guest counted them: a successful
/// FLUSH covers every write completed before it (a failed one in between changes nothing).
fn report(serial: &str, blocks: u64) -> Report {
    let mut r = Report::default();
    let (mut next, mut pending, mut paused) = (0u64, Vec::new(), false);
    // Only whole lines: a killed VMM may leave half of one.
    let complete = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    for l in complete.lines() {
        let mut w = l.split_whitespace();
        if w.next() != Some("BLKFAULT") {
            continue;
        }
        let kind = w.next().unwrap_or("");
        if kind == "pause" {
            paused = true;
            continue;
        }
        let Some(n) = w.next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        // Writes up to this line that no error line named completed.
        let upto = if kind == "write-error" {
            n
        } else {
            n.max(next)
        };
        pending.extend(next..upto);
        next = next.max(upto);
        match kind {
            "write-error" => {
                r.write_errors += 1;
                r.durable.remove(&(n % blocks));
                pending.retain(|&m| m % blocks != n % blocks);
                next = n + 1;
            }
            "flushed" => {
                for m in pending.drain(..) {
                    r.durable.insert(m % blocks, m);
                }
                r.last = n;
                if paused {
                    r.flushed_after_pause += 1;
                }
            }
            "flush-error" => {
                r.flush_errors += 1;
                r.last = n;
            }
            _ => {}
        }
    }
    r
}

/// Checks that every block the guest saw flushed holds that write, or a later write of the
/// same block issued before the end (`max_write`), whole in every sector.
fn check_image(data: &[u8], r: &Report, blocks: u64, max_write: u64) {
    assert!(!r.durable.is_empty(), "no write was acknowledged: {r:?}");
    eprintln!(
        "{} blocks flushed, {} write errors, {} flush errors, last flush after write {}",
        r.durable.len(),
        r.write_errors,
        r.flush_errors,
        r.last
    );
    for (&b, &m) in &r.durable {
        for k in 0..CHUNK {
            let s = b * CHUNK + k;
            let sector = &data[(s * 512) as usize..][..512];
            let w0 = u64::from_le_bytes(sector[..8].try_into().unwrap());
            let v = (w0 >> 32).wrapping_sub(1);
            let whole = (0..64).all(|w| {
                u64::from_le_bytes(sector[w as usize * 8..][..8].try_into().unwrap())
                    == word(v, s, w)
            });
            assert!(
                whole && v >= m && v % blocks == b && v <= max_write,
                "sector {s} (block {b}) lost acknowledged write {m}: it holds {:02x?}...",
                &sector[..16]
            );
        }
    }
}

/// The image's guest-visible bytes (qcow2 through `qemu-img convert`).
fn image_bytes(img: &Path, qcow2: bool, out_dir: &Path) -> Vec<u8> {
    if !qcow2 {
        return std::fs::read(img).unwrap();
    }
    let raw = out_dir.join("converted.raw");
    sh(&[
        "qemu-img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    std::fs::read(raw).unwrap()
}

/// `qemu-img check`: no corruption (leaked clusters, which a crash may leave, are allowed:
/// exit status 3). A VMM killed with its image registered with an io_uring ring holds the
/// image's lock a moment longer: the kernel tears the ring down after the process is gone.
fn qemu_img_check(img: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", img.to_str().unwrap()])
            .output()
            .expect("qemu-img (Debian package qemu-utils)");
        if !String::from_utf8_lossy(&out.stderr).contains("Failed to lock")
            || Instant::now() > deadline
        {
            break out;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check {}: {}\n{}{}",
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_img_create(img: &Path, size: u64) {
    qemu_img_create_clusters(img, size, 65536);
}

fn qemu_img_create_clusters(img: &Path, size: u64, cluster: u64) {
    sh(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        img.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// Starts the VMM on `test=blkfault <args>` with `disk` (a `--disk` value), the serial port
/// in `serial`.
fn start_blkfault(disk: &str, args: &str, serial: &Path) -> std::process::Child {
    start_blkfault_with(disk, args, serial, &[])
}

/// `start_blkfault` with `extra` VMM arguments.
fn start_blkfault_with(
    disk: &str,
    args: &str,
    serial: &Path,
    extra: &[&str],
) -> std::process::Child {
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let cmdline = format!("test=blkfault {args}");
    let serial = format!("file={}", serial.display());
    let mut all = vec![
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--memory",
        "size=128M",
        "--serial",
        &serial,
        "--console",
        "off",
        "--disk",
        disk,
    ];
    all.extend_from_slice(extra);
    spawn(&all)
}

/// Runs `test=blkfault` to its end; the guest must finish and power off (no hang, no VMM
/// death) and its own read-back of what it saw flushed must pass. `on_pause` runs when the
/// guest says `BLKFAULT pause`.
fn run_blkfault(disk: &str, args: &str, serial: &Path, on_pause: impl FnOnce()) -> (Run, String) {
    let mut child = start_blkfault(disk, args, serial);
    if args.contains("blkfault_pause_ms") {
        wait_serial(serial, "BLKFAULT pause", &mut child);
        on_pause();
    }
    let run = wait_with_timeout(child, Duration::from_secs(300));
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let all = format!("{text}\nstderr:\n{}", run.stderr);
    assert_eq!(run.code(), Some(0), "VMM {:?}\n{all}", run.status);
    assert!(!run.stderr.contains("panicked"), "{all}");
    assert!(text.contains("PASS blkfault-readback"), "{all}");
    assert!(text.contains("BLKFAULT done"), "{all}");
    (run, text)
}

/// Waits until the serial log holds `needle`.
fn wait_serial(serial: &Path, needle: &str, child: &mut std::process::Child) {
    // Generous: on a loaded machine the loop driver's worker (every write of the EIO tests
    // goes through it, a FLUSH after each) waits for a CPU.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the VMM exited ({s}) before '{needle}':\n{text}\nstderr:\n{err}");
        }
        assert!(Instant::now() < deadline, "no '{needle}':\n{text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Guest arguments for the fault runs: stop at 16 errors, pause 1.5 s (the host frees space),
/// 32 more writes.
const FAULT_ARGS: &str = "blkfault_errors=16 blkfault_pause_ms=1500 blkfault_more=32";

/// Fills 512 KiB of the filesystem at `dir`; the guest's pause frees it.
fn ballast(dir: &Path) -> PathBuf {
    let f = dir.join("ballast");
    std::fs::write(&f, vec![0x55u8; 512 << 10]).unwrap();
    f
}

/// A disk on a 2 MiB tmpfs, 8 MiB big: the guest writes 4 KiB blocks, each flushed, until 16
/// have failed. The writes past the space fail with IOERR (the guest sees them fail, and
/// goes on), and every write it saw flushed is in the image.
fn enospc(qcow2: bool, direct: bool) {
    enospc_clusters(qcow2, direct, 65536);
}

/// `enospc` with qcow2 clusters of `cluster` bytes (small ones: an L2 table and a refcount
/// block every few writes, so the space runs out in the middle of metadata updates too).
fn enospc_clusters(qcow2: bool, direct: bool, cluster: u64) {
    in_private_mounts(move || {
        let tag = format!(
            "enospc-{}-{direct}-{cluster}",
            if qcow2 { "qcow2" } else { "raw" }
        );
        let fs = small_tmpfs(&tag, 2 << 20);
        let out = out_tmpfs(&format!("{tag}-out"));
        let img = fs.join("disk.img");
        if qcow2 {
            qemu_img_create_clusters(&img, 8 << 20, cluster);
        } else {
            std::fs::File::create(&img)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
        }
        let blocks = (8 << 20) / (CHUNK * 512);
        let disk = format!(
            "path={},image_type={},direct={}",
            img.display(),
            if qcow2 { "qcow2" } else { "raw" },
            if direct { "on" } else { "off" }
        );
        let serial = out.join("serial.log");
        let ballast = ballast(&fs);
        let (run, text) = run_blkfault(&disk, FAULT_ARGS, &serial, || {
            std::fs::remove_file(&ballast).unwrap()
        });
        let r = report(&text, blocks);
        assert!(
            r.write_errors + r.flush_errors > 0,
            "the filesystem never filled up: {r:?}\n{text}\n{}",
            run.stderr
        );
        assert!(r.durable.len() > 100, "{r:?}\n{text}");
        // With room again, the disk works again.
        assert!(r.flushed_after_pause > 0, "{r:?}\n{text}");
        if qcow2 {
            qemu_img_check(&img);
        }
        let data = image_bytes(&img, qcow2, &out);
        check_image(&data, &r, blocks, r.last);
        unmount(&out);
        unmount(&fs);
    });
}

#[test]
fn enospc_raw() {
    enospc(false, false);
}

#[test]
fn enospc_raw_io_uring() {
    enospc(false, true);
}

#[test]
fn enospc_qcow2() {
    enospc(true, false);
}

#[test]
fn enospc_qcow2_io_uring() {
    enospc(true, true);
}

#[test]
fn enospc_qcow2_small_clusters() {
    enospc_clusters(true, false, 512);
    enospc_clusters(true, false, 4096);
}

#[test]
fn enospc_qcow2_small_clusters_io_uring() {
    enospc_clusters(true, true, 512);
    enospc_clusters(true, true, 4096);
}

/// A raw disk on a loop device over a 16 MiB sparse file on a 2 MiB tmpfs: once the tmpfs is
/// full the loop device fails every write it cannot store (EIO, seen by the VMM at FLUSH with
/// the page cache, at the write with O_DIRECT). The guest gets error statuses, and every write
/// it saw flushed is in the backing file (read after the loop device is gone, not through its
/// page cache).
fn eio(direct: bool) {
    in_private_mounts(move || {
        let tag = format!("eio-raw-{direct}");
        let fs = small_tmpfs(&tag, 2 << 20);
        let out = out_tmpfs(&format!("{tag}-out"));
        let back = fs.join("backing");
        std::fs::File::create(&back)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let dev = Loop::new(&back);
        let blocks = (16 << 20) / (CHUNK * 512);
        let disk = format!(
            "path={},image_type=raw,direct={}",
            dev.0,
            if direct { "on" } else { "off" }
        );
        let serial = out.join("serial.log");
        let ballast = ballast(&fs);
        let (run, text) = run_blkfault(&disk, FAULT_ARGS, &serial, || {
            std::fs::remove_file(&ballast).unwrap()
        });
        drop(dev);
        let r = report(&text, blocks);
        assert!(
            r.write_errors + r.flush_errors > 0,
            "no write failed: {r:?}\n{text}\n{}",
            run.stderr
        );
        let data = std::fs::read(&back).unwrap();
        check_image(&data, &r, blocks, r.last);
        unmount(&out);
        unmount(&fs);
    });
}

#[test]
fn eio_raw_loop_device() {
    eio(false);
}

#[test]
fn eio_raw_loop_device_direct() {
    eio(true);
}

/// A qcow2 image on ext4 (4 KiB blocks, as the tmpfs pages: see below; no journal, which
/// would double the writes, each a round trip through the loop driver's worker) on a loop
/// device over a 24 MiB sparse file on a 6 MiB tmpfs: the image's writes land in the page
/// cache and fail at writeback (EIO at FLUSH). Flushes keep failing after the pause (the
/// first failed `fdatasync` is kept), so no recovery is asked for.
///
/// The loop driver completes a write that its backing file took only in part (the tmpfs
/// filled up in the middle) as a success, so a write must never straddle a tmpfs page that
/// exists and one that does not: with ext4's 1 KiB blocks (its default at this size) the
/// tail of a guest write silently vanished although `fdatasync` succeeded.
#[test]
fn eio_qcow2_on_failing_ext4() {
    in_private_mounts(|| {
        let fs = small_tmpfs("eio-qcow2", 6 << 20);
        let out = out_tmpfs("eio-qcow2-out");
        let back = fs.join("backing");
        std::fs::File::create(&back)
            .unwrap()
            .set_len(24 << 20)
            .unwrap();
        let dev = Loop::new(&back);
        sh(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            "^has_journal",
            "-E",
            "nodiscard,lazy_itable_init=1",
            &dev.0,
        ]);
        let mnt = scratch("eio-qcow2-mnt");
        sh(&[
            "mount",
            "-o",
            "errors=continue",
            &dev.0,
            mnt.to_str().unwrap(),
        ]);
        let img = mnt.join("disk.qcow2");
        qemu_img_create(&img, 16 << 20);
        let blocks = (16 << 20) / (CHUNK * 512);
        let disk = format!("path={},image_type=qcow2", img.display());
        let serial = out.join("serial.log");
        let ballast = ballast(&fs);
        let (run, text) = run_blkfault(&disk, FAULT_ARGS, &serial, || {
            std::fs::remove_file(&ballast).unwrap()
        });
        let r = report(&text, blocks);
        // The image as the disk holds it: unmounted (what did not reach the device is gone),
        // the loop device detached, the backing file mounted again read-only.
        let _ = Command::new("umount").arg(&mnt).status();
        drop(dev);
        assert!(
            r.write_errors + r.flush_errors > 0,
            "no write failed: {r:?}\n{text}\n{}",
            run.stderr
        );
        sh(&[
            "mount",
            "-o",
            "ro,loop",
            back.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        let copy = out.join("disk.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let _ = Command::new("umount").arg(&mnt).status();
        qemu_img_check(&copy);
        let data = image_bytes(&copy, true, &out);
        check_image(&data, &r, blocks, r.last);
        unmount(&out);
        unmount(&fs);
        unmount(&mnt);
    });
}

/// Waits until the serial log holds a `BLKFAULT flushed <n>` line with `n >= at_least`.
fn wait_flushed(serial: &Path, at_least: u64, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("BLKFAULT flushed "))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        if last >= at_least {
            return;
        }
        if let Ok(Some(s)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the VMM exited ({s}) before write {at_least}:\n{text}\nstderr:\n{err}");
        }
        assert!(Instant::now() < deadline, "no write {at_least}:\n{text}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// SIGKILL in the middle of guest writes (64 blocks of 4 KiB rewritten round and round, a
/// FLUSH every 4 writes), at several points: the image passes `qemu-img check`, every write
/// the guest saw flushed is there, and the image opens again for a guest that writes it.
fn sigkill(qcow2: bool, direct: bool) {
    let tag = format!("kill-{}-{direct}", if qcow2 { "qcow2" } else { "raw" });
    let dir = scratch(&tag);
    let blocks = 64;
    let flush = 4;
    for (i, at) in [40u64, 150, 333].into_iter().enumerate() {
        let img = dir.join(format!("disk{i}.img"));
        if qcow2 {
            qemu_img_create(&img, 1 << 20);
        } else {
            std::fs::File::create(&img)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        let disk = format!(
            "path={},image_type={},direct={}",
            img.display(),
            if qcow2 { "qcow2" } else { "raw" },
            if direct { "on" } else { "off" }
        );
        let serial = dir.join(format!("serial{i}.log"));
        let args = format!("blkfault_loop=1 blkfault_blocks={blocks} blkfault_flush={flush}");
        let mut child = start_blkfault(&disk, &args, &serial);
        wait_flushed(&serial, at, &mut child);
        // A little later still, so the kill lands among writes, not right after a flush.
        std::thread::sleep(Duration::from_millis(3 * i as u64 + 1));
        child.kill().unwrap();
        let run = wait_with_timeout(child, Duration::from_secs(10));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&run.status),
            Some(libc::SIGKILL)
        );
        let text = std::fs::read_to_string(&serial).unwrap();
        let r = report(&text, blocks);
        assert!(r.last >= at, "{r:?}");
        if qcow2 {
            qemu_img_check(&img);
        }
        let data = image_bytes(&img, qcow2, &dir);
        // Writes after the last flush line may have landed too (up to the next flush).
        check_image(&data, &r, blocks, r.last + flush);
        // The killed VMM's lock and state are gone: the image opens read-write again.
        let again = dir.join(format!("again{i}.log"));
        run_blkfault(&disk, "blkfault_blocks=8", &again, || {});
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigkill_raw() {
    sigkill(false, false);
}

#[test]
fn sigkill_raw_io_uring() {
    sigkill(false, true);
}

#[test]
fn sigkill_qcow2() {
    sigkill(true, false);
}

#[test]
fn sigkill_qcow2_io_uring() {
    sigkill(true, true);
}

/// Blocks (of `CHUNK` sectors, 4 KiB) of the read-error image: 1 MiB.
const READ_BLOCKS: u64 = 256;

/// The bytes of the raw image whose reads fail: from sector 3 of block 100 to sector 0 of
/// block 104, so the blocks around them (99, 105) and the first sectors of block 100 are good.
const FAILING: std::ops::Range<u64> = (100 * 8 + 3) * 512..(104 * 8 + 1) * 512;

/// The guest's disk as the host writes it: block b holds guest write b's pattern.
fn read_eio_image() -> Vec<u8> {
    let sectors = READ_BLOCKS * CHUNK;
    let mut data = Vec::with_capacity((sectors * 512) as usize);
    for s in 0..sectors {
        for w in 0..64 {
            data.extend_from_slice(&word(s / CHUNK, s, w).to_le_bytes());
        }
    }
    data
}

/// Where a qcow2 image (512-byte clusters, all allocated) keeps guest sector `s`: (its
/// cluster's host offset, its L2 table's host offset), read from the image's own tables.
fn qcow2_sector_map(img: &[u8]) -> Vec<(u64, u64)> {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap());
    let be64 = |at: u64| u64::from_be_bytes(img[at as usize..at as usize + 8].try_into().unwrap());
    const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    assert_eq!(be32(20), 9, "cluster_bits");
    let l1 = be64(40);
    (0..READ_BLOCKS * CHUNK)
        .map(|s| {
            // 64 entries of 8 bytes per 512-byte L2 table.
            let l2 = be64(l1 + s / 64 * 8) & OFFSET;
            assert_ne!(l2, 0, "sector {s}: no L2 table");
            let data = be64(l2 + s % 64 * 8) & OFFSET;
            assert_ne!(data, 0, "sector {s}: not allocated");
            (data, l2)
        })
        .collect()
}

/// The guest's disk on a FUSE filesystem (`fuse_eio`) that fails reads as a disk with bad
/// sectors does (EIO; the tmpfs and loop device of the write faults never fail a read). The
/// guest (`blkfault_read=1`) reads every 4 KiB block: exactly those that need a failing byte
/// must end with IOERR, every other one read back the host's data. It then rewrites the
/// blocks that read, flushes, and reads everything again (the same reads fail, the others see
/// the new data: a read error breaks nothing beyond its request); `vmm.ping` answers; the host
/// stops failing reads and a third round must read every block. The VMM exits 0 at power-off,
/// and the image holds every write the guest saw flushed.
///
/// Raw: the bytes `FAILING` fail. qcow2 (512-byte clusters, so a 4 KiB block spans 8 clusters
/// and an L2 table maps 8 blocks): the 4 KiB host page holding block 100's sector 3, and the
/// one holding the L2 table of blocks 200-207 (a metadata read that fails: those blocks cannot
/// be read, nor, by the qcow2 layer, taken as unallocated).
///
/// `direct`: O_DIRECT with io_uring (each read reaches the filesystem as the VMM asked it);
/// otherwise the page cache, read by the VMM's worker thread (the kernel reads whole 4 KiB
/// pages from the filesystem, and its readahead fails along with reads near the failing bytes
/// before the page asked for is read alone).
fn read_eio(qcow2: bool, direct: bool) {
    in_private_mounts(move || {
        let tag = format!("read-eio-{}-{direct}", if qcow2 { "qcow2" } else { "raw" });
        let out = out_tmpfs(&format!("{tag}-out"));
        let back = out.join("backing.img");
        let guest_data = read_eio_image();
        if qcow2 {
            let raw = out.join("pattern.raw");
            std::fs::write(&raw, &guest_data).unwrap();
            sh(&[
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                raw.to_str().unwrap(),
                back.to_str().unwrap(),
            ]);
            std::fs::remove_file(&raw).unwrap();
        } else {
            std::fs::write(&back, &guest_data).unwrap();
        }
        // The failing host bytes, and per guest block whether its read needs one of them.
        let (failing, bad): (Vec<std::ops::Range<u64>>, Vec<u64>) = if qcow2 {
            let map = qcow2_sector_map(&std::fs::read(&back).unwrap());
            let page = |at: u64| at & !4095..(at & !4095) + 4096;
            let failing = vec![page(map[100 * 8 + 3].0), page(map[200 * 8].1)];
            let hit = |at: u64, len: u64| failing.iter().any(|r| at < r.end && r.start < at + len);
            let bad = (0..READ_BLOCKS)
                .filter(|b| {
                    (b * CHUNK..(b + 1) * CHUNK).any(|s| {
                        let (data, l2) = map[s as usize];
                        hit(data, 512) || hit(l2, 512)
                    })
                })
                .collect();
            (failing, bad)
        } else {
            let bad = (0..READ_BLOCKS)
                .filter(|b| {
                    let start = b * CHUNK * 512;
                    start < FAILING.end && FAILING.start < start + CHUNK * 512
                })
                .collect();
            (vec![FAILING], bad)
        };
        eprintln!("failing host bytes {failing:x?}; the guest blocks that need them: {bad:?}");
        assert!(bad.contains(&100) && bad.len() < 32, "{bad:?}");
        if qcow2 {
            assert!((200..208).all(|b| bad.contains(&b)), "{bad:?}");
        } else {
            assert_eq!(bad, [100, 101, 102, 103, 104]);
        }
        let mnt = scratch(&format!("{tag}-mnt"));
        let fs = fuse_eio::Mounted::new(&mnt, &back);
        fs.control.set_failing(failing.clone());
        // The filesystem fails a read of the ranges, and serves one outside them.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(&fs.image).unwrap();
            let mut buf = vec![0u8; 512];
            let e = f.read_exact_at(&mut buf, failing[0].start).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
            f.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(buf, std::fs::read(&back).unwrap()[..512]);
        }
        let (_, failed_before, _, _) = fs.control.counts();
        let disk = format!(
            "path={},image_type={},direct={}",
            fs.image.display(),
            if qcow2 { "qcow2" } else { "raw" },
            if direct { "on" } else { "off" }
        );
        let serial = out.join("serial.log");
        let sock = out.join("api.sock");
        let mut child = start_blkfault_with(
            &disk,
            "blkfault_read=1 blkfault_pause_ms=2000",
            &serial,
            &["--api-socket", sock.to_str().unwrap()],
        );
        wait_serial(&serial, "BLKFAULT pause", &mut child);
        // Failed reads behind it, the VMM answers its API.
        let answer = ping(&sock);
        let ring = has_io_uring(child.id());
        fs.control.set_failing(Vec::new());
        assert!(answer.contains("200"), "vmm.ping: {answer}");
        assert_eq!(ring, direct, "an io_uring instance in the VMM");
        let run = wait_with_timeout(child, Duration::from_secs(120));
        let text = std::fs::read_to_string(&serial).unwrap_or_default();
        let all = format!("{text}\nstderr:\n{}", run.stderr);
        assert_eq!(run.code(), Some(0), "VMM {:?}\n{all}", run.status);
        assert!(!run.stderr.contains("panicked"), "{all}");
        let rounds = read_rounds(&text);
        for round in [1, 2, 3] {
            let got = rounds
                .get(&round)
                .unwrap_or_else(|| panic!("no round {round}:\n{all}"));
            assert_eq!(got.len() as u64, READ_BLOCKS, "round {round}:\n{all}");
            for (b, r) in got.iter().enumerate() {
                // Round 3 comes after the host stopped failing reads.
                let want = if round < 3 && bad.contains(&(b as u64)) {
                    "error"
                } else {
                    "ok"
                };
                assert_eq!(r, want, "round {round}, block {b}:\n{all}");
            }
        }
        let writes = READ_BLOCKS - bad.len() as u64;
        assert!(
            text.contains(&format!("BLKFAULT flushed {writes}\n")),
            "the writes after the read errors were not all flushed:\n{all}"
        );
        assert!(!text.contains("write-error"), "{all}");
        let reads = 3 * READ_BLOCKS;
        assert!(
            text.contains(&format!(
                "BLKFAULT done reads={reads} read-errors={} writes={writes} errors=0\n",
                2 * bad.len()
            )),
            "{all}"
        );
        // The reads the guest saw fail failed in the filesystem, and the FLUSH reached it.
        let (reads_seen, failed, writes_seen, fsyncs) = fs.control.counts();
        let failed = failed - failed_before;
        eprintln!(
            "FUSE: {reads_seen} reads ({failed} failed), {writes_seen} writes, {fsyncs} fsyncs"
        );
        if direct && !qcow2 {
            // O_DIRECT on raw: the guest's reads as they were, one each.
            assert_eq!(failed, 2 * bad.len() as u64);
        } else {
            // The page cache fails readahead too; a qcow2 read is one per cluster run.
            assert!(failed >= 2 * failing.len() as u64, "{failed}");
        }
        assert!(fsyncs >= 1 && writes_seen >= 1);
        drop(fs);
        let _ = std::fs::remove_dir(&mnt);
        // Every write the guest saw flushed is in the image; the blocks it did not write
        // still hold the host's data.
        if qcow2 {
            qemu_img_check(&back);
        }
        let data = image_bytes(&back, qcow2, &out);
        let mut want = guest_data;
        for b in (0..READ_BLOCKS).filter(|b| !bad.contains(b)) {
            let n = READ_BLOCKS + b;
            for s in b * CHUNK..(b + 1) * CHUNK {
                for w in 0..64 {
                    let at = (s * 512 + w * 8) as usize;
                    want[at..at + 8].copy_from_slice(&word(n, s, w).to_le_bytes());
                }
            }
        }
        assert_eq!(data.len(), want.len());
        for b in 0..READ_BLOCKS as usize {
            let r = b * 4096..(b + 1) * 4096;
            assert!(
                data[r.clone()] == want[r],
                "block {b} of the image is not what the guest wrote (or the host did)"
            );
        }
        unmount(&out);
    });
}

/// The guest's `BLKFAULT read <round> <block> <result>` lines: per round, the results by block.
fn read_rounds(serial: &str) -> HashMap<u64, Vec<String>> {
    let mut rounds: HashMap<u64, Vec<String>> = HashMap::new();
    for l in serial.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let ["BLKFAULT", "read", round, b, result] = w[..] {
            let (round, b) = (round.parse::<u64>().unwrap(), b.parse::<u64>().unwrap());
            let r = rounds.entry(round).or_default();
            assert_eq!(r.len() as u64, b, "{l}: blocks out of order\n{serial}");
            r.push(result.to_string());
        }
    }
    rounds
}

/// Whether process `pid` holds an io_uring instance (a descriptor `anon_inode:[io_uring]`).
fn has_io_uring(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|l| l.to_string_lossy().contains("io_uring"))
}

#[test]
fn read_eio_raw() {
    read_eio(false, false);
}

#[test]
fn read_eio_raw_io_uring() {
    read_eio(false, true);
}

#[test]
fn read_eio_qcow2() {
    read_eio(true, false);
}

#[test]
fn read_eio_qcow2_io_uring() {
    read_eio(true, true);
}
