//! The dirty log a vhost-user backend writes during a live migration
//! (VHOST_USER_PROTOCOL_F_LOG_SHMFD): a bitmap in a sealed memfd, one bit per 4 KiB page of
//! guest physical memory from address 0, which the backend maps (SET_LOG_BASE) and sets a bit
//! in for every page it writes once VHOST_F_LOG_ALL is among the features. The VMM reads and
//! clears it word by word (an atomic swap: a bit the backend sets meanwhile is either in this
//! read or the next), and merges it into the migration's dirty pages.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::VhostUserDirtyLogRegion;

/// VHOST_F_LOG_ALL: the backend logs its writes to guest RAM (a vhost feature bit, never the
/// guest's).
pub(crate) const F_LOG_ALL: u64 = 1 << 26;
/// The size of a page of the log.
pub const LOG_PAGE: u64 = 4096;

/// The bitmap, mapped here and shared with the backend.
pub(crate) struct DirtyLog {
    file: File,
    ptr: NonNull<AtomicU64>,
    /// 64-bit words in the map.
    words: usize,
}

// SAFETY: the mapping belongs to this object for its whole life and is only accessed through
// atomics, from any thread.
unsafe impl Send for DirtyLog {}
// SAFETY: as above.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// A log for guest physical addresses up to `last_addr` (included), all clear.
    pub(crate) fn new(last_addr: u64) -> io::Result<Self> {
        let pages = last_addr / LOG_PAGE + 1;
        let words = usize::try_from(pages.div_ceil(64)).map_err(io::Error::other)?;
        let len = words * 8;
        let name: &CStr = c"vhost-user-dirty-log";
        // SAFETY: memfd_create reads the NUL-terminated name and returns a new descriptor.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: fcntl on our own descriptor; the backend cannot resize what it maps.
        let r = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole file (len bytes), owned by the result and
        // unmapped by its Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<AtomicU64>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(DirtyLog { file, ptr, words })
    }

    /// What SET_LOG_BASE hands the backend (the descriptor stays ours).
    pub(crate) fn region(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: (self.words * 8) as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The pages logged since the last call (bit i of word w: the page at (64 w + i) × 4 KiB),
    /// cleared as read.
    pub(crate) fn take(&self) -> Vec<u64> {
        (0..self.words)
            .map(|i| {
                // SAFETY: i < words: inside the mapping, which is 8-byte aligned (page
                // aligned). The backend sets bits in it with atomic byte ORs; on x86 the swap
                // (a locked exchange) and those are both atomic on the same coherent memory.
                let w = unsafe { &*self.ptr.as_ptr().add(i) };
                w.swap(0, Ordering::AcqRel)
            })
            .collect()
    }

    /// Sets the bit of each page in `[addr, addr + len)` (the backend's way; for tests).
    #[cfg(test)]
    pub(crate) fn mark(&self, addr: u64, len: u64) {
        for page in addr / LOG_PAGE..(addr + len).div_ceil(LOG_PAGE) {
            let (w, b) = ((page / 64) as usize, page % 64);
            if w < self.words {
                // SAFETY: w < words, as in `take`.
                unsafe { &*self.ptr.as_ptr().add(w) }.fetch_or(1 << b, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of this length, not used after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_marked_are_taken_once_and_the_map_is_shared_through_the_file() {
        // 1 MiB + 1 byte: 257 pages, 5 words.
        let log = DirtyLog::new(1 << 20).unwrap();
        let r = log.region();
        assert_eq!(r.mmap_size, 5 * 8);
        assert!(log.take().iter().all(|&w| w == 0));
        log.mark(0, 1);
        log.mark(65 * LOG_PAGE + 100, LOG_PAGE);
        log.mark(256 * LOG_PAGE, 1);
        log.mark(1 << 30, 1);
        assert_eq!(log.take(), vec![1, 0b110, 0, 0, 1]);
        assert!(log.take().iter().all(|&w| w == 0));
        // Another process's writes (here: through the file) are seen.
        use std::os::unix::fs::FileExt;
        let f = log.file.try_clone().unwrap();
        f.write_at(&[0x80], 8).unwrap();
        assert_eq!(log.take()[1], 1 << 7);
        // Sealed: the backend cannot grow or shrink it.
        assert!(f.set_len(4096).is_err());
    }
}
