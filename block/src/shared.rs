//! One disk served by several threads (a virtio-blk queue per thread, `queue_affinity`): each
//! thread's [`crate::AsyncDisk`] holds a [`SharedDisk`], every call of which takes the image's
//! lock. Reads and in-place writes of allocated ranges still go to the file without it
//! (`map_host` hands out the host range under the lock, the I/O runs outside). Allocating
//! writes take the synchronous path under the lock: a reservation (`alloc_host`, `alloc_cow`)
//! committed by one thread would undo another thread's write to the same cluster, so a
//! shared image never reserves.

use std::io::{IoSlice, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{CompressedRead, DiskFile, HostMapping, ImageType, Result};

/// One image behind a lock; each clone is one thread's handle to it.
#[derive(Clone)]
pub struct SharedDisk {
    disk: Arc<Mutex<Box<dyn DiskFile>>>,
    /// The inflated bytes `inflate` last returned (the image's own buffer is behind the lock).
    inflated: Vec<u8>,
}

impl SharedDisk {
    /// Shares `disk`: clone the result for each thread.
    pub fn new(disk: Box<dyn DiskFile>) -> Self {
        SharedDisk {
            disk: Arc::new(Mutex::new(disk)),
            inflated: Vec::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn DiskFile>> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl DiskFile for SharedDisk {
    fn size(&self) -> u64 {
        self.lock().size()
    }
    fn read_at(&mut self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        self.lock().read_at(offset, bufs)
    }
    fn write_at(&mut self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.lock().write_at(offset, bufs)
    }
    fn flush(&mut self) -> Result<()> {
        self.lock().flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.lock().discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.lock().write_zeroes(offset, len)
    }
    fn resize(&mut self, size: u64) -> Result<()> {
        self.lock().resize(size)
    }
    fn readonly(&self) -> bool {
        self.lock().readonly()
    }
    fn image_type(&self) -> ImageType {
        self.lock().image_type()
    }
    fn map_host(&mut self, offset: u64, len: u64, write: bool) -> Result<Option<HostMapping>> {
        self.lock().map_host(offset, len, write)
    }
    fn map_compressed(&mut self, offset: u64, len: u64) -> Result<Option<CompressedRead>> {
        self.lock().map_compressed(offset, len)
    }
    fn inflate(&mut self, plan: &CompressedRead, raw: &[u8]) -> Result<&[u8]> {
        let bytes = self.lock().inflate(plan, raw)?.to_vec();
        self.inflated = bytes;
        Ok(&self.inflated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskFileExt;

    #[test]
    fn threads_share_one_image_and_never_reserve() {
        let dir = std::env::temp_dir().join(format!("shared-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.raw");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let raw = crate::raw::RawDisk::new(file, &crate::OpenOptions::default()).unwrap();
        let shared = SharedDisk::new(Box::new(raw));
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let mut d = shared.clone();
                std::thread::spawn(move || {
                    let buf = [t + 1; 4096];
                    d.write_all_at(u64::from(t) * 4096, &buf).unwrap();
                    assert!(d.alloc_host(0, 4096).unwrap().is_none());
                    assert!(d.alloc_cow(0, 512).unwrap().is_none());
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut d = shared.clone();
        assert_eq!(d.size(), 1 << 20);
        for t in 0..4u8 {
            let mut buf = [0u8; 4096];
            d.read_exact_at(u64::from(t) * 4096, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == t + 1));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
