// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Crash consistency: a write interposer lets only the first N writes of a
//! qcow2 workload reach the file (every N), then `qemu-img check` must find
//! no corruption (leaks are allowed) and the image must still open.

mod common;

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use block::qcow2::{create, CreateOptions, Qcow2Disk};
use block::storage::{FileStorage, Storage};
use block::{DiskFile, DiskFileExt, OpenOptions};
use common::*;

/// Passes through the first `limit` mutating calls, then fails them all,
/// like a machine that lost power after that point.
struct CrashStorage {
    inner: FileStorage,
    count: Arc<AtomicUsize>,
    limit: usize,
}

impl CrashStorage {
    fn allow(&self) -> io::Result<()> {
        if self.count.fetch_add(1, Ordering::SeqCst) >= self.limit {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, off)
    }
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.allow()?;
        self.inner.write_all_at(buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.allow()?;
        self.inner.set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        if self.count.load(Ordering::SeqCst) >= self.limit {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.allow()?;
        self.inner.punch_hole(off, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

fn workload(disk: &mut dyn DiskFile, size: u64) -> block::Result<()> {
    let mut r = Rng::new(42);
    for i in 0..60 {
        let off = r.below(size - 70_000);
        match i % 7 {
            3 => disk.write_zeroes(off, 20_000)?,
            5 => disk.discard(off / 4096 * 4096, 16_384)?,
            6 => disk.flush()?,
            _ => {
                let mut buf = vec![0u8; 1 + r.below(65_536) as usize];
                r.fill(&mut buf);
                disk.write_all_at(off, &buf)?;
            }
        }
    }
    disk.flush()
}

fn run(
    limit: usize,
    base: &std::path::Path,
    work: &std::path::Path,
    cluster_bits: u32,
    size: u64,
) -> usize {
    std::fs::copy(base, work).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(work)
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let st = CrashStorage {
        inner: FileStorage::new(file, false),
        count: count.clone(),
        limit,
    };
    let opts = OpenOptions::default();
    let mut disk = Qcow2Disk::open_storage(Box::new(st), &opts, |_| Ok(None)).unwrap();
    let res = workload(&mut disk, size);
    drop(disk);
    let n = count.load(Ordering::SeqCst);
    if limit == usize::MAX {
        res.unwrap();
    }
    let _ = cluster_bits;
    n
}

fn crash_matrix(version: u32, cluster_bits: u32) {
    let size = 4u64 << 20;
    let d = tmpdir();
    let base = p(d.path(), "base.qcow2");
    let work = p(d.path(), "work.qcow2");
    let mut o = CreateOptions::new(size);
    o.version = version;
    o.cluster_bits = cluster_bits;
    create(&base, &o).unwrap();
    let total = run(usize::MAX, &base, &work, cluster_bits, size);
    assert!(total > 50, "workload too small: {total} writes");
    qemu_check("qcow2", &work);
    // Every crash point for the first writes, then a stride over the rest.
    let step = (total / 120).max(1);
    let mut n = 0;
    let mut points = 0;
    while n <= total {
        run(n, &base, &work, cluster_bits, size);
        qemu_check("qcow2", &work);
        let mut disk = open(&work, true);
        let _ = read_all(disk.as_mut());
        drop(disk);
        if points % 4 == 0 {
            // Carry on from the crashed image: allocation may now reuse
            // clusters the crash left unreferenced (refcount zero), which
            // must not corrupt anything either.
            let mut disk = open(&work, false);
            workload(disk.as_mut(), size).unwrap();
            drop(disk);
            qemu_check("qcow2", &work);
        }
        points += 1;
        n += if n < 40 { 1 } else { step };
    }
    assert!(points > 40);
}

#[test]
fn crash_v3_64k() {
    crash_matrix(3, 16);
}

#[test]
fn crash_v2_small_clusters() {
    crash_matrix(2, 9);
}

/// The io_uring paths under a real crash: `bench-block` writes to a qcow2
/// through `AsyncDisk` (64 requests in flight: copy-on-write of 4 KiB pieces
/// over a backing file, whole-cluster allocations of 64 KiB, in-place
/// writes), and is killed (SIGKILL) at a different moment each time. The
/// image must pass `qemu-img check` (leaks allowed), open, and read.
#[test]
fn crash_kill_async_writer() {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    let img = p(d.path(), "ovl.qcow2");
    write_raw(&base, &pattern(16 << 20, 4));
    let q = |p: &std::path::Path| p.to_str().unwrap().to_string();
    for round in 0..8u64 {
        if round % 4 == 0 {
            // A fresh overlay now and then; otherwise the crashed one goes on.
            let _ = std::fs::remove_file(&img);
            qemu_overlay(&img, &base, "raw", None);
        }
        let size = if round % 2 == 0 { "4k" } else { "64k" };
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bench-block"))
            .args([
                "-f",
                "qcow2",
                "-d",
                "64",
                "-c",
                "100000000",
                "-s",
                size,
                "-w",
            ])
            .args(["-S", &(4096 * 1021 + 4096 * round).to_string(), &q(&img)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(40 + 37 * round));
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "round {round}: the writer ended before it was killed: {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        wait_unlocked(&img);
        qemu_check("qcow2", &img);
        let mut disk = open_as(&img, block::ImageType::Qcow2, true);
        let _ = read_all(disk.as_mut());
    }
}

/// Waits (5 s at most) until qemu can lock `img` and its backing file again
/// after a writer was killed: the kernel tears the writer's io_uring down
/// asynchronously after the process has exited, and with it the file the
/// ring holds registered (the image's or the backing file's) and its lock.
fn wait_unlocked(img: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("qemu-img")
            .args(["check", img.to_str().unwrap()])
            .output()
            .expect("qemu-img is required (qemu-utils)");
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if !locked || std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
