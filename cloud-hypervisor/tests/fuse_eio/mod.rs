//! A FUSE filesystem that serves one file, `disk.img`, whose reads fail with EIO in chosen
//! byte ranges: the read errors that a loop device over tmpfs cannot make and that
//! device-mapper's `error` target would (this machine's kernel has no device-mapper). Reads
//! outside the ranges, and every write, pass through to a backing file; FSYNC syncs it. The
//! ranges can be changed (or cleared) while a VMM has the file open.
//!
//! Built on the `fuser` crate: it is maintained, pure Rust, and as root it mounts with
//! mount(2) itself, so it needs neither libfuse nor `fusermount3` (no Debian package for CI to
//! install; only `/dev/fuse` and the kernel's `fuse`). It brings about 25 crates into
//! Cargo.lock (nix, parking_lot, num_enum and theirs), built for the tests only.
//! `fuse-backend-rs` (0.14) was the other candidate: it is built around virtio-fs servers and
//! pins `vm-memory` 0.17.1, a second copy beside the workspace's 0.18.

use std::ffi::OsStr;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The file's name in the mount.
pub const NAME: &str = "disk.img";
const FILE: INodeNo = INodeNo(2);
/// The kernel may keep attributes: only its own writes and truncates change them.
const TTL: Duration = Duration::from_secs(60);

/// What the test sets and reads while the filesystem runs.
#[derive(Default)]
pub struct Control {
    /// Reads that overlap one of these byte ranges fail with EIO.
    failing: Mutex<Vec<Range<u64>>>,
    /// READ requests served, and those failed.
    reads: AtomicU64,
    failed: AtomicU64,
    /// WRITE requests served, and FSYNC requests.
    writes: AtomicU64,
    fsyncs: AtomicU64,
}

impl Control {
    /// Reads overlapping one of `ranges` fail from now on (none: no read fails).
    pub fn set_failing(&self, ranges: Vec<Range<u64>>) {
        *self.failing.lock().unwrap() = ranges;
    }

    /// (READ requests, of them failed with EIO, WRITE requests, FSYNC requests) so far.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.reads.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.writes.load(Ordering::SeqCst),
            self.fsyncs.load(Ordering::SeqCst),
        )
    }
}

struct EioFs {
    backing: File,
    /// The file's size: writes past it extend it (an O_DIRECT read-modify-write of the last,
    /// partial page of an image does, then truncates back).
    size: Mutex<u64>,
    control: Arc<Control>,
}

impl EioFs {
    fn size(&self) -> u64 {
        *self.size.lock().unwrap()
    }
}

fn attr(ino: INodeNo, size: u64) -> FileAttr {
    let dir = ino == INodeNo::ROOT;
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for EioFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == NAME {
            reply.entry(&TTL, &attr(FILE, self.size()), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &attr(ino, 0)),
            FILE => reply.attr(&TTL, &attr(ino, self.size())),
            _ => reply.error(Errno::ENOENT),
        }
    }

    /// Only the size changes (truncate); the rest is fixed.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE {
            reply.error(Errno::EPERM);
            return;
        }
        let mut cur = self.size.lock().unwrap();
        if let Some(len) = size {
            if let Err(e) = self.backing.set_len(len) {
                reply.error(Errno::from(e));
                return;
            }
            *cur = len;
        }
        reply.attr(&TTL, &attr(FILE, *cur));
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == FILE {
            // No FOPEN_DIRECT_IO: an open without O_DIRECT goes through the page cache, as a
            // disk image on any other filesystem does; one with O_DIRECT sends each read here
            // as it was asked.
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::EACCES);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.control.reads.fetch_add(1, Ordering::SeqCst);
        let end = offset.saturating_add(u64::from(size));
        let fails = self
            .control
            .failing
            .lock()
            .unwrap()
            .iter()
            .any(|r| offset < r.end && r.start < end);
        if fails {
            self.control.failed.fetch_add(1, Ordering::SeqCst);
            reply.error(Errno::EIO);
            return;
        }
        let len = end.min(self.size()).saturating_sub(offset) as usize;
        let mut buf = vec![0u8; len];
        match self.backing.read_exact_at(&mut buf, offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.control.writes.fetch_add(1, Ordering::SeqCst);
        let mut size = self.size.lock().unwrap();
        match self.backing.write_all_at(data, offset) {
            Ok(()) => {
                *size = (*size).max(offset + data.len() as u64);
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.control.fsyncs.fetch_add(1, Ordering::SeqCst);
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Errno::from(e)),
        }
    }
}

/// The filesystem mounted at a directory; unmounted when dropped.
pub struct Mounted {
    session: Option<BackgroundSession>,
    /// The image as the VMM opens it: `<mount>/disk.img`.
    pub image: PathBuf,
    pub control: Arc<Control>,
}

impl Mounted {
    /// Mounts at `dir` (an empty directory) a filesystem whose `disk.img` is `backing`. The mount lies in the calling thread's mount namespace.
    pub fn new(dir: &Path, backing: &Path) -> Mounted {
        let file = File::options()
            .read(true)
            .write(true)
            .open(backing)
            .unwrap_or_else(|e| panic!("{}: {e}", backing.display()));
        let size = file.metadata().unwrap().len();
        let control = Arc::new(Control::default());
        let fs = EioFs {
            backing: file,
            size: Mutex::new(size),
            control: control.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("eio".into()), MountOption::RW];
        let session = fuser::spawn_mount(fs, dir, &config)
            .unwrap_or_else(|e| panic!("mounting the FUSE filesystem at {}: {e}", dir.display()));
        Mounted {
            session: Some(session),
            image: dir.join(NAME),
            control,
        }
    }
}

impl Drop for Mounted {
    /// Unmounts and waits for the serving thread, which ends when nothing has the file open
    /// any more. A test that panicked may have left a VMM running with it open: then the
    /// thread is left to serve it (the test's failure is reported now, not when that ends).
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if std::thread::panicking() {
                drop(s);
            } else {
                let _ = s.umount_and_join();
            }
        }
    }
}
