// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Advisory locking so two VMMs cannot write the same image.
//!
//! Uses open-file-description (OFD) locks on the whole file: a writer takes
//! an exclusive lock, a reader a shared one. The lock lives as long as the
//! file descriptor.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// How long a conflicting lock may take to go away before open fails: a
/// lock can outlive its owner briefly (a descriptor inherited by a child
/// between fork and exec, a ring being torn down by the kernel).
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Lock `file` exclusively (`write`) or shared; fail with [`Error::Locked`]
/// if a conflicting lock is still held after a short grace period.
pub fn lock_file(file: &File, path: &Path, write: bool) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        match try_lock(file, path, write) {
            Err(Error::Locked(_)) if start.elapsed() < LOCK_GRACE => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

fn try_lock(file: &File, path: &Path, write: bool) -> Result<()> {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
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
