// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! VHDX BAT updates go through the log: power lost after the log entry is
//! durable but before the BAT sector reaches its place must be repaired by
//! a replay, by us and by QEMU.

mod common;

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block::storage::{FileStorage, Storage};
use block::vhdx::header::{VhdxHeader, HEADER1_OFFSET, HEADER2_OFFSET};
use block::vhdx::VhdxDisk;
use block::{DiskFile, DiskFileExt, OpenOptions};
use common::*;

/// Fails the first write into `[dead_from, dead_to)` and every write after
/// it, like a machine losing power just before that write.
struct PowerCut {
    inner: FileStorage,
    dead_from: u64,
    dead_to: u64,
    dead: Arc<AtomicBool>,
}

impl PowerCut {
    fn check(&self, off: u64) -> io::Result<()> {
        if off >= self.dead_from && off < self.dead_to {
            self.dead.store(true, Ordering::SeqCst);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl Storage for PowerCut {
    fn read_exact_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, off)
    }
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(off)?;
        self.inner.write_all_at(buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.check(u64::MAX)?;
        self.inner.set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.check(u64::MAX)?;
        self.inner.sync()
    }
    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.check(off)?;
        self.inner.punch_hole(off, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

fn current_header(img: &std::path::Path) -> VhdxHeader {
    let all = std::fs::read(img).unwrap();
    let at = |o: u64| VhdxHeader::parse(&all[o as usize..o as usize + 4096]);
    VhdxHeader::current(at(HEADER1_OFFSET), at(HEADER2_OFFSET))
        .unwrap()
        .1
}

#[test]
fn bat_update_interrupted_after_log_is_replayed() {
    let d = tmpdir();
    let img = p(d.path(), "d.vhdx");
    let raw = p(d.path(), "d.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=1M",
        img.to_str().unwrap(),
        "16M",
    ]);
    let bat = {
        let f = std::fs::File::open(&img).unwrap();
        let ro = OpenOptions {
            readonly: true,
            ..Default::default()
        };
        let disk = VhdxDisk::open_storage(Box::new(FileStorage::new(f, false)), &ro).unwrap();
        disk.bat_region()
    };
    let mut model = vec![0u8; 16 << 20];
    let mut r = Rng::new(5);
    let dead = Arc::new(AtomicBool::new(false));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let st = PowerCut {
        inner: FileStorage::new(file, false),
        dead_from: bat.0,
        dead_to: bat.0 + bat.1,
        dead: dead.clone(),
    };
    let opts = OpenOptions::default();
    let mut disk = VhdxDisk::open_storage(Box::new(st), &opts).unwrap();
    // Three blocks of data: new payload blocks, BAT entries dirty in memory.
    for &(off, len) in &[(0usize, 70_000usize), (5 << 20, 1 << 20), (9 << 20, 4096)] {
        let mut buf = vec![0u8; len];
        r.fill(&mut buf);
        disk.write_all_at(off as u64, &buf).unwrap();
        model[off..off + len].copy_from_slice(&buf);
    }
    // The flush logs the BAT sector, then dies writing it in place.
    assert!(disk.flush().is_err());
    assert!(dead.load(Ordering::SeqCst), "the BAT write was reached");
    drop(disk);
    // The BAT on disk still says "not present", the log says otherwise.
    assert_ne!(current_header(&img).log_guid, [0u8; 16]);
    write_raw(&raw, &model);
    // QEMU replays it (check -r opens read-write) and sees the data.
    let qimg = p(d.path(), "q.vhdx");
    std::fs::copy(&img, &qimg).unwrap();
    qemu_img(&[
        "check",
        "-q",
        "-r",
        "all",
        "-f",
        "vhdx",
        qimg.to_str().unwrap(),
    ]);
    qemu_compare("vhdx", &qimg, &raw);
    // So do we; a clean close then leaves an empty log behind.
    let mut disk = open(&img, false);
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    assert_eq!(current_header(&img).log_guid, [0u8; 16]);
    qemu_compare("vhdx", &img, &raw);
}
