// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Shared helpers for the block integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use block::{open_disk, DiskFile, DiskFileExt, ImageType, OpenOptions};

/// Run a qemu tool; the test FAILS (not skips) when it is missing.
pub fn qemu(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for this test (install the qemu-utils package): {e}")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn qemu_img(args: &[&str]) -> String {
    qemu("qemu-img", args)
}

pub fn qemu_io(fmt: &str, img: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(img.to_str().unwrap().to_string());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    qemu("qemu-io", &a);
}

/// `qemu-img create` of a qcow2 `img` over `backing` (format `backing_fmt`),
/// of the backing file's size or `size`.
pub fn qemu_overlay(img: &Path, backing: &Path, backing_fmt: &str, size: Option<&str>) {
    let (img, backing) = (img.to_str().unwrap(), backing.to_str().unwrap());
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        img,
    ];
    args.extend(size);
    qemu_img(&args);
}

/// `size` bytes of compressible data that differs everywhere: 64-byte lines,
/// each naming its own offset (so a piece read from the wrong place differs).
pub fn numbered_lines(size: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(size);
    for off in (0..size).step_by(64) {
        data.extend_from_slice(format!("{off:>62}\n\n").as_bytes());
    }
    data
}

/// `qemu-img convert -c` of the raw file `raw` into the qcow2 `img`, with
/// creation options `opts` (e.g. `compression_type=zstd`).
pub fn qemu_compress(raw: &Path, img: &Path, opts: &str) {
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
}

/// `qemu-img check` must report no errors (leaks allowed). A lock refused ("Failed to lock")
/// is tried again for up to 5 s: the tests of a binary run in threads, and a `qemu-img` another
/// thread forks holds every open file of the process, this test's image included, until its
/// exec closes them, so the image's OFD lock can outlive the disk's close by a moment (seen once
/// in CI's loaded run). An io_uring ring's teardown after a close does the same.
pub fn qemu_check(fmt: &str, img: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let out = loop {
        let out = Command::new("qemu-img")
            .args(["check", "-f", fmt, img.to_str().unwrap()])
            .output()
            .expect("qemu-img is required (qemu-utils)");
        if !String::from_utf8_lossy(&out.stderr).contains("Failed to lock")
            || std::time::Instant::now() > deadline
        {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let code = out.status.code().unwrap_or(-1);
    // 0: clean, 3: leaked clusters only. 1/2 mean corruption or check errors.
    assert!(
        code == 0 || code == 3,
        "qemu-img check {img:?} exit {code}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of an image against a raw reference.
pub fn qemu_compare(fmt: &str, img: &Path, raw: &Path) {
    qemu_img(&[
        "compare",
        "-f",
        fmt,
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A sparse-ish pattern: random 64 KiB chunks, some zero, some compressible.
pub fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let mut v = vec![0u8; size];
    for chunk in v.chunks_mut(64 << 10) {
        match r.below(4) {
            0 => {}
            1 => chunk.fill((r.next() & 0xff) as u8),
            _ => r.fill(chunk),
        }
    }
    v
}

pub fn write_raw(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

pub fn read_all(disk: &mut dyn DiskFile) -> Vec<u8> {
    let mut v = vec![0u8; disk.size() as usize];
    for (i, c) in v.chunks_mut(1 << 20).enumerate() {
        disk.read_exact_at((i as u64) << 20, c).unwrap();
    }
    v
}

pub fn open(path: &Path, readonly: bool) -> Box<dyn DiskFile> {
    open_disk(
        path,
        &OpenOptions {
            readonly,
            backing_files: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {path:?}: {e}"))
}

pub fn open_as(path: &Path, t: ImageType, readonly: bool) -> Box<dyn DiskFile> {
    open_disk(
        path,
        &OpenOptions {
            readonly,
            image_type: Some(t),
            backing_files: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {path:?}: {e}"))
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Apply random writes / zeroes / discards to `disk` and mirror them in `model`.
/// Discards are only mirrored as zero when `discard_zeroes`.
pub fn random_ops(
    disk: &mut dyn DiskFile,
    model: &mut [u8],
    seed: u64,
    n: usize,
    discard_zeroes: bool,
) {
    let mut r = Rng::new(seed);
    let size = model.len() as u64;
    for _ in 0..n {
        let kind = r.below(10);
        let align = if r.below(2) == 0 { 512 } else { 1 };
        let off = r.below(size) / align * align;
        let len = (1 + r.below(200_000)).min(size - off);
        match kind {
            0 => {
                disk.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            1 if discard_zeroes => {
                disk.discard(off, len).unwrap();
                // Whole clusters become zero/unallocated; partial parts keep data,
                // so re-read the range to learn what the disk returns and check
                // it is either the old data or zero, per byte.
                let mut got = vec![0u8; len as usize];
                disk.read_exact_at(off, &mut got).unwrap();
                let old = &mut model[off as usize..(off + len) as usize];
                for (o, g) in old.iter_mut().zip(got) {
                    assert!(
                        g == *o || g == 0,
                        "discard produced data that was never written"
                    );
                    *o = g;
                }
            }
            2 => {
                disk.flush().unwrap();
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                r.fill(&mut buf);
                disk.write_all_at(off, &buf).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
    }
}
