// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Advisory locking so two VMMs cannot write the same image.
//!
//! Uses open-file-description (OFD) locks: a writer takes an exclusive lock, a
//! reader a shared one. The lock lives as long as the file descriptor. As the
//! original's `lock_granularity=`, it covers the image's bytes `[0, size)` by
//! default, or the whole file (to any length) with `Full`: some network
//! filesystems treat a whole-file lock as mandatory and then keep disk
//! management tools from reading the image, while a lock on its byte range
//! stays advisory and still keeps a second VMM out.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// How long a conflicting lock may take to go away before open fails: a
/// lock can outlive its owner briefly (a descriptor inherited by a child
/// between fork and exec, a ring being torn down by the kernel).
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// What a disk image's lock covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LockGranularity {
    /// The image's bytes, `[0, size)` when it is opened.
    #[default]
    ByteRange,
    /// The whole file, whatever its length.
    Full,
}

/// Lock `file` exclusively (`write`) or shared; fail with [`Error::Locked`]
/// if a conflicting lock is still held after a short grace period.
pub fn lock_file(
    file: &File,
    path: &Path,
    write: bool,
    granularity: LockGranularity,
) -> Result<()> {
    let len = match granularity {
        LockGranularity::Full => 0,
        // An empty file has no bytes to cover: lock it whole.
        LockGranularity::ByteRange => file.metadata().map_err(Error::Io)?.len(),
    };
    let start = std::time::Instant::now();
    loop {
        match try_lock(file, path, write, len) {
            Err(Error::Locked(_)) if start.elapsed() < LOCK_GRACE => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

/// The lock on a disk image, held through a duplicate of the image's descriptor (an OFD lock
/// belongs to the open file description, which the duplicate shares): a live migration's
/// source lets go of it before the destination opens the image, and takes it again if the
/// migration fails. Dropping the handle keeps the lock as it is (it goes with the image's own
/// descriptor); keep the handle no longer than the disk.
#[derive(Debug)]
pub struct DiskLock {
    fd: std::os::fd::OwnedFd,
    path: std::path::PathBuf,
    write: bool,
    len: u64,
}

impl DiskLock {
    pub(crate) fn of(
        file: &File,
        path: &Path,
        write: bool,
        granularity: LockGranularity,
    ) -> Result<Self> {
        let len = match granularity {
            LockGranularity::Full => 0,
            LockGranularity::ByteRange => file.metadata().map_err(Error::Io)?.len(),
        };
        Ok(DiskLock {
            fd: file.as_fd().try_clone_to_owned().map_err(Error::Io)?,
            path: path.to_path_buf(),
            write,
            len,
        })
    }

    /// Releases the lock: another process can open the image now.
    pub fn release(&self) -> Result<()> {
        set_lock(self.fd.as_raw_fd(), libc::F_UNLCK, self.len)
    }

    /// Takes the lock again; [`Error::Locked`] if another process holds it meanwhile.
    pub fn reacquire(&self) -> Result<()> {
        let typ = if self.write {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        };
        match set_lock(self.fd.as_raw_fd(), typ, self.len) {
            Err(Error::Io(e)) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Err(Error::Locked(self.path.clone()))
            }
            r => r,
        }
    }
}

fn set_lock(fd: i32, typ: i32, len: u64) -> Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_len = i64::try_from(len).unwrap_or(0) as libc::off_t;
    // SAFETY: fcntl with F_OFD_SETLK reads the flock struct, which lives across the call; `fd`
    // is open (owned by the caller).
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `len` 0: to the end of the file, however long it grows.
fn try_lock(file: &File, path: &Path, write: bool, len: u64) -> Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = i64::try_from(len).unwrap_or(0) as libc::off_t;
    fl.l_pid = 0;
    // SAFETY: fcntl with F_OFD_SETLK reads the flock struct we pass, which
    // lives across the call; the fd is owned by `file`.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(Error::Locked(path.to_path_buf())),
            // Filesystems without lock support: warn and go on.
            Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
                log::warn!("cannot lock {path:?}: {err}; continuing without a lock");
                Ok(())
            }
            _ => Err(Error::Io(err)),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// The OFD lock lines of /proc/locks for the file with inode `ino`: (type, start, end).
    fn locks_of(ino: u64) -> Vec<(String, String, String)> {
        let text = std::fs::read_to_string("/proc/locks").unwrap();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // "1: OFDLCK ADVISORY WRITE -1 00:2a:1234 0 1048575"
                let kind = f.iter().position(|w| *w == "OFDLCK")?;
                let dev_ino = f.get(kind + 4)?;
                let file_ino: u64 = dev_ino.rsplit(':').next()?.parse().ok()?;
                (file_ino == ino).then(|| {
                    (
                        f[kind + 2].to_string(),
                        f[kind + 5].to_string(),
                        f[kind + 6].to_string(),
                    )
                })
            })
            .collect()
    }

    fn image(len: u64) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(len).unwrap();
        (dir, path)
    }

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_released_lock_lets_another_open_and_comes_back_when_free() {
        let dir = std::env::temp_dir().join(format!("blk-lock-rel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let a = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        lock_file(&a, &path, true, LockGranularity::ByteRange).unwrap();
        let handle = DiskLock::of(&a, &path, true, LockGranularity::ByteRange).unwrap();
        let b = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(matches!(
            try_lock(&b, &path, true, 4096),
            Err(Error::Locked(_))
        ));
        handle.release().unwrap();
        try_lock(&b, &path, true, 4096).unwrap();
        assert!(matches!(handle.reacquire(), Err(Error::Locked(_))));
        drop(b);
        handle.reacquire().unwrap();
        let c = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(matches!(
            try_lock(&c, &path, true, 4096),
            Err(Error::Locked(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn byte_range_covers_the_image_and_full_the_whole_file() {
        let (_d, path) = image(1 << 20);
        let ino = std::fs::metadata(&path).unwrap().ino();
        let a = open_rw(&path);
        lock_file(&a, &path, true, LockGranularity::ByteRange).unwrap();
        assert_eq!(
            locks_of(ino),
            [("WRITE".to_string(), "0".to_string(), "1048575".to_string())]
        );
        // A second writer is kept out, whichever granularity it asks for.
        for g in [LockGranularity::ByteRange, LockGranularity::Full] {
            let b = open_rw(&path);
            assert!(matches!(
                lock_file(&b, &path, true, g),
                Err(Error::Locked(_))
            ));
        }
        drop(a);
        assert!(locks_of(ino).is_empty());

        let a = open_rw(&path);
        lock_file(&a, &path, false, LockGranularity::Full).unwrap();
        assert_eq!(
            locks_of(ino),
            [("READ".to_string(), "0".to_string(), "EOF".to_string())]
        );
        // Readers share.
        let b = open_rw(&path);
        lock_file(&b, &path, false, LockGranularity::ByteRange).unwrap();
    }
}
