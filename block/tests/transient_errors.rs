//! Transient write errors (a filesystem that fills up and gets room again, a device that fails
//! for a while): a storage interposer fails every mutating call in a window of the workload
//! with ENOSPC or EIO, then lets them through again. Whatever failed in between, once a flush
//! succeeds every write that was acknowledged must be in the image (read through the same disk
//! and after opening it again), and `qemu-img check` must find no corruption. This is what a
//! guest relies on: an acknowledged write followed by a successful FLUSH is durable, however
//! many requests failed around it.

mod common;

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use block::qcow2::{create, CreateOptions, Qcow2Disk};
use block::storage::{FileStorage, Storage};
use block::vhdx::VhdxDisk;
use block::{DiskFile, DiskFileExt, OpenOptions};
use common::*;

/// Fails mutating calls number `from .. from + len` (counted from 0) with `errno`.
struct FlakyStorage {
    inner: FileStorage,
    count: Arc<AtomicUsize>,
    from: usize,
    len: usize,
    errno: i32,
}

impl FlakyStorage {
    fn allow(&self) -> io::Result<()> {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        if n >= self.from && n - self.from < self.len {
            return Err(io::Error::from_raw_os_error(self.errno));
        }
        Ok(())
    }
}

impl Storage for FlakyStorage {
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
        self.inner.sync()
    }
    fn punch_hole(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.allow()?;
        self.inner.punch_hole(off, len)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// The bytes the disk must hold: `None` where a failed request may have left anything.
struct Model(Vec<Option<u8>>);

impl Model {
    fn set(&mut self, off: u64, data: &[u8]) {
        for (m, &b) in self.0[off as usize..].iter_mut().zip(data) {
            *m = Some(b);
        }
    }
    fn unknown(&mut self, off: u64, len: u64) {
        for m in &mut self.0[off as usize..(off + len) as usize] {
            *m = None;
        }
    }
    fn check(&self, got: &[u8], what: &str) {
        for (i, (m, &g)) in self.0.iter().zip(got).enumerate() {
            if let Some(m) = m {
                assert_eq!(*m, g, "{what}: byte {i:#x} differs");
            }
        }
    }
}

/// Writes, write-zeroes, discards and flushes (failures allowed), then flushes until it
/// succeeds; returns the model of what the disk must hold and how many mutating calls it made.
fn workload(disk: &mut dyn DiskFile, size: u64, model: &mut Model) -> usize {
    let mut r = Rng::new(7);
    let mut failures = 0;
    for i in 0..80 {
        let off = r.below(size - 70_000);
        let res = match i % 9 {
            4 => disk.write_zeroes(off, 20_000).map(|_| {
                model.set(off, &vec![0u8; 20_000]);
            }),
            6 => {
                let off = off / 4096 * 4096;
                // A discard reads as zeroes or as the old data.
                model.unknown(off, 16_384);
                disk.discard(off, 16_384)
            }
            7 => disk.flush(),
            _ => {
                let mut buf = vec![0u8; 1 + r.below(65_536) as usize];
                r.fill(&mut buf);
                disk.write_all_at(off, &buf).map(|_| model.set(off, &buf))
            }
        };
        if res.is_err() {
            failures += 1;
            if i % 9 != 7 {
                // A failed write leaves its range undefined: old, new or a mix.
                let len = match i % 9 {
                    4 => 20_000,
                    6 => 16_384,
                    _ => 65_536,
                };
                model.unknown(off, len.min(size - off));
            }
        }
    }
    // The error window may cover the end: a flush succeeds once it has passed.
    let mut tries = 0;
    while let Err(e) = disk.flush() {
        tries += 1;
        assert!(tries < 100, "flush still fails: {e}");
    }
    failures
}

/// The image formats with tables of their own to keep right across errors.
#[derive(Clone, Copy)]
enum Format {
    /// qcow2 with clusters of 2^bits bytes.
    Qcow2(u32),
    /// A dynamic vhdx (qemu-img's default 32 MiB blocks, so one block holds the whole disk;
    /// 1 MiB blocks with `true`).
    Vhdx(bool),
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Qcow2(_) => "qcow2",
            Format::Vhdx(_) => "vhdx",
        }
    }

    fn create(self, path: &std::path::Path, size: u64) {
        match self {
            Format::Qcow2(bits) => {
                let mut o = CreateOptions::new(size);
                o.cluster_bits = bits;
                create(path, &o).unwrap();
            }
            Format::Vhdx(small) => {
                let opts = if small {
                    "block_size=1M"
                } else {
                    "subformat=dynamic"
                };
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "vhdx",
                    "-o",
                    opts,
                    path.to_str().unwrap(),
                    &size.to_string(),
                ]);
            }
        }
    }
}

fn open_flaky(
    img: &std::path::Path,
    format: Format,
    from: usize,
    len: usize,
    errno: i32,
) -> (Box<dyn DiskFile>, Arc<AtomicUsize>) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let st = Box::new(FlakyStorage {
        inner: FileStorage::new(file, false),
        count: count.clone(),
        from,
        len,
        errno,
    });
    let opts = OpenOptions::default();
    let disk: Box<dyn DiskFile> = match format {
        Format::Qcow2(_) => {
            Box::new(Qcow2Disk::open_storage(st, &opts, |_| Ok(None)).expect("open"))
        }
        Format::Vhdx(_) => Box::new(VhdxDisk::open_storage(st, &opts).expect("open")),
    };
    (disk, count)
}

fn matrix(format: Format, errno: i32) {
    let size = 2u64 << 20;
    // On tmpfs where there is one: hundreds of flushes, each several fdatasyncs.
    let d = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tmpdir());
    let base = p(d.path(), "base.img");
    let work = p(d.path(), "work.img");
    format.create(&base, size);
    // The number of mutating calls of an undisturbed run.
    std::fs::copy(&base, &work).unwrap();
    let (mut disk, count) = open_flaky(&work, format, usize::MAX, 0, errno);
    let mut model = Model(vec![Some(0); size as usize]);
    workload(disk.as_mut(), size, &mut model);
    drop(disk);
    let total = count.load(Ordering::SeqCst);
    assert!(total > 50, "workload too small: {total} calls");
    let step = (total / 10).max(1);
    let mut runs = 0;
    let mut failed_somewhere = 0;
    for from in (0..total).step_by(step) {
        for len in [2, 40] {
            std::fs::copy(&base, &work).unwrap();
            let (mut disk, _) = open_flaky(&work, format, from, len, errno);
            let mut model = Model(vec![Some(0); size as usize]);
            let failures = workload(disk.as_mut(), size, &mut model);
            failed_somewhere += usize::from(failures > 0);
            let what = format!("errors in calls {from}..{}", from + len);
            model.check(&read_all(disk.as_mut()), &format!("{what}, same disk"));
            drop(disk);
            // Read-write: the errors may have hit the close, and a vhdx whose log GUID
            // stayed set is replayed first (which a read-only open refuses).
            let mut again = open(&work, false);
            model.check(&read_all(again.as_mut()), &format!("{what}, reopened"));
            drop(again);
            // qemu-img takes half a second to start: every third run.
            if runs % 3 == 0 {
                qemu_check(format.name(), &work);
            }
            runs += 1;
        }
    }
    assert!(
        failed_somewhere > runs / 2,
        "{failed_somewhere} of {runs} runs saw an error"
    );
}

#[test]
fn enospc_64k_clusters() {
    matrix(Format::Qcow2(16), libc::ENOSPC);
}

#[test]
fn eio_512_byte_clusters() {
    matrix(Format::Qcow2(9), libc::EIO);
}

#[test]
fn vhdx_enospc() {
    matrix(Format::Vhdx(false), libc::ENOSPC);
}

#[test]
fn vhdx_eio_1m_blocks() {
    matrix(Format::Vhdx(true), libc::EIO);
}
