//! The reading of a copy restore (`memory_restore_mode=copy`): the memory file's data read into
//! fresh guest RAM by several threads at once.
//!
//! Reading into fresh RAM is more than a read: the kernel allocates and zeroes each page as the
//! read first touches it, which costs about as much as the copy itself. One thread reads a
//! 256 MiB snapshot from the page cache at about a third of `dd`'s rate into a buffer it reuses;
//! the allocation and zeroing run per page and in parallel as well as the copy does, so the
//! data is cut into pieces that threads take in turn, one per host CPU the VMM may run on (up
//! to [`MAX_THREADS`]). The control loop reads too; the others are started through the spawner
//! and confined to `pread` (`seccomp_filters::restore_copy`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory;
use crate::snapshot::Cause;

/// Bytes of data a thread takes at a time: large enough that taking one costs nothing beside
/// reading it, small enough that the threads finish together.
const PIECE: u64 = 64 << 20;

/// Readers at most, the control loop included: memory bandwidth, not CPUs, bounds the rate
/// beyond a few.
pub const MAX_THREADS: usize = 8;

/// Data of the memory file to put in guest RAM: `len` bytes at file offset `offset` go to guest
/// address `gpa` (inside one region).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

/// `extents` cut where the guest address crosses a multiple of `piece` bytes, so a piece never
/// shares a huge page with another thread's.
fn pieces(extents: &[Extent], piece: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for e in extents {
        let mut done = 0;
        while done < e.len {
            let gpa = e.gpa + done;
            let len = (piece - gpa % piece).min(e.len - done);
            out.push(Extent {
                gpa,
                offset: e.offset + done,
                len,
            });
            done += len;
        }
    }
    out
}

/// How many threads read `pieces` pieces: one per CPU this process may run on, at most
/// [`MAX_THREADS`] and never more than there are pieces.
fn thread_count(pieces: usize) -> usize {
    if pieces < 2 {
        return pieces;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(MAX_THREADS).min(pieces)
}

/// A file read at a position that moves with each read (`pread`), so threads sharing the
/// descriptor do not share an offset.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(std::io::Error::from_raw_os_error(libc::EOVERFLOW))
        })?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the slice is `buf.len()` bytes of mapped guest RAM, valid while `guard`
        // lives; pread writes at most that many bytes there and touches nothing else.
        let n = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(std::io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

fn read_piece(mem: &GuestMemoryMmap, file: &File, p: &Extent) -> Result<(), Cause> {
    let mut at = FileAt {
        file,
        offset: p.offset,
    };
    memory::read_range(mem, p.gpa, p.len, &mut at, p.len).map_err(|e| {
        Cause::io(format!(
            "Error reading memory snapshot region at {:#x}",
            p.gpa
        ))(std::io::Error::other(e))
    })
}

/// The pieces and where the readers stand: the next piece to take, and the first failure
/// (which stops the others at their next piece).
struct Work {
    pieces: Vec<Extent>,
    next: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<Cause>>,
}

impl Work {
    fn run(&self, mem: &GuestMemoryMmap, file: &File) {
        while !self.failed.load(Ordering::Relaxed) {
            let Some(p) = self.pieces.get(self.next.fetch_add(1, Ordering::Relaxed)) else {
                return;
            };
            if let Err(e) = read_piece(mem, file, p) {
                self.failed.store(true, Ordering::Relaxed);
                self.error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .get_or_insert(e);
                return;
            }
        }
    }
}

/// Reads `extents` of `file` into `mem`, with up to [`thread_count`] threads; returns how many
/// read. The first error any reader meets, once all have stopped.
pub fn read_extents(
    mem: &GuestMemoryMmap,
    file: &File,
    extents: &[Extent],
) -> Result<usize, Cause> {
    let work = Arc::new(Work {
        pieces: pieces(extents, PIECE),
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    let mut helpers = Vec::new();
    for i in 1..thread_count(work.pieces.len()) {
        let (work, mem) = (work.clone(), mem.clone());
        let file = file
            .try_clone()
            .map_err(Cause::io("cannot duplicate the memory snapshot file"))?;
        // A helper that cannot start leaves its share to the others.
        match seccomp::spawn(
            format!("restore-copy{i}"),
            crate::seccomp_filters::restore_copy(),
            move || work.run(&mem, &file),
        ) {
            Ok(h) => helpers.push(h),
            Err(e) => log::warn!("copy restore: reading with fewer threads: {e}"),
        }
    }
    work.run(mem, file);
    let threads = 1 + helpers.len();
    for h in helpers {
        if h.join().is_err() {
            work.failed.store(true, Ordering::Relaxed);
            let mut error = work.error.lock().unwrap_or_else(|p| p.into_inner());
            error.get_or_insert(Cause::new("a copy restore thread panicked"));
        }
    }
    let error = work.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match error {
        Some(e) => Err(e),
        None => Ok(threads),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn pieces_are_cut_at_piece_boundaries_of_the_guest_address() {
        let e = [
            Extent {
                gpa: 0x1000,
                offset: 0,
                len: 0x2800,
            },
            Extent {
                gpa: 0x8000,
                offset: 0x10000,
                len: 0x1000,
            },
        ];
        assert_eq!(
            pieces(&e, 0x1000),
            vec![
                Extent {
                    gpa: 0x1000,
                    offset: 0,
                    len: 0x1000
                },
                Extent {
                    gpa: 0x2000,
                    offset: 0x1000,
                    len: 0x1000
                },
                Extent {
                    gpa: 0x3000,
                    offset: 0x2000,
                    len: 0x800
                },
                Extent {
                    gpa: 0x8000,
                    offset: 0x10000,
                    len: 0x1000
                },
            ]
        );
        assert_eq!(
            pieces(&e, 0x4000),
            vec![
                Extent {
                    gpa: 0x1000,
                    offset: 0,
                    len: 0x2800
                },
                e[1]
            ]
        );
        assert!(pieces(&[], PIECE).is_empty());
    }

    #[test]
    fn threads_follow_the_pieces_and_the_cap() {
        assert_eq!(thread_count(0), 0);
        assert_eq!(thread_count(1), 1);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(thread_count(1000), cpus.min(MAX_THREADS));
        assert_eq!(thread_count(2), cpus.min(2));
    }

    fn temp_file(len: u64) -> File {
        let path = std::env::temp_dir().join(format!("restore-copy-{}-{len}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(len).unwrap();
        f
    }

    /// Every byte lands at its own guest address, across regions and whatever thread read it,
    /// and the pages read are marked dirty.
    #[test]
    fn extents_land_where_they_belong() {
        let len = 3 * PIECE + 0x3000;
        let file = temp_file(len);
        let data: Vec<u8> = (0..len).map(|i| (i / 4096 % 251) as u8 ^ i as u8).collect();
        file.write_all_at(&data, 0).unwrap();
        // Two regions: the file's first 2 pieces go to the first, the rest to the second.
        let second = 4 * PIECE;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 2 * PIECE as usize),
            (GuestAddress(second), 2 * PIECE as usize),
        ])
        .unwrap();
        let extents = [
            Extent {
                gpa: 0,
                offset: 0,
                len: 2 * PIECE,
            },
            Extent {
                gpa: second + 0x1000,
                offset: 2 * PIECE,
                len: len - 2 * PIECE,
            },
        ];
        let threads = read_extents(&mem, &file, &extents).unwrap();
        assert_eq!(threads, thread_count(5));
        for e in extents {
            let mut got = vec![0u8; e.len as usize];
            mem.read_slice(&mut got, GuestAddress(e.gpa)).unwrap();
            let want = &data[e.offset as usize..(e.offset + e.len) as usize];
            assert!(got == want, "extent {e:x?} differs");
        }
        // Guest RAM outside the extents stays zero.
        let mut page = [1u8; 4096];
        mem.read_slice(&mut page, GuestAddress(second)).unwrap();
        assert_eq!(page, [0u8; 4096]);
    }

    /// A file shorter than the extents: a clear error naming the region, from whichever thread
    /// met it, and no hang.
    #[test]
    fn a_short_file_fails_the_copy() {
        let file = temp_file(2 * PIECE);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * PIECE as usize)]).unwrap();
        let e = read_extents(
            &mem,
            &file,
            &[Extent {
                gpa: 0,
                offset: 0,
                len: 4 * PIECE,
            }],
        )
        .unwrap_err();
        let text = format!("{e}: {:?}", std::error::Error::source(&e));
        assert!(
            text.contains("Error reading memory snapshot region at 0x"),
            "{text}"
        );
        assert!(text.contains("short"), "{text}");
    }
}
