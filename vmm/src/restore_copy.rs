//! The reading of a copy restore (`memory_restore_mode=copy`): the memory file's data read into
//! fresh guest RAM by several threads at once.
//!
//! Reading into fresh RAM is more than a read: the kernel allocates and zeroes each page as the
//! read first touches it, which costs about as much as the copy itself. One thread reads a
//! 256 MiB snapshot from the page cache at about two thirds of `dd`'s rate into a buffer it
//! reuses, so the data is cut into 64 MiB pieces that several threads read (`pieces`), the
//! helpers confined to `pread` (`seccomp_filters::restore_copy`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::memory;
use crate::pieces;
use crate::snapshot::Cause;

/// Bytes of data a thread takes at a time: large enough that taking one costs nothing beside
/// reading it, small enough that the threads finish together.
const PIECE: u64 = 64 << 20;

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
    extents
        .iter()
        .flat_map(|e| {
            pieces::cut(e.gpa, e.len, piece).map(|(gpa, len)| Extent {
                gpa,
                offset: e.offset + (gpa - e.gpa),
                len,
            })
        })
        .collect()
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

/// Reads `extents` of `file` into `mem`, several threads at once (`pieces::run`); returns how
/// many read. The first error any reader meets, once all have stopped.
pub fn read_extents(
    mem: &GuestMemoryMmap,
    file: &File,
    extents: &[Extent],
) -> Result<usize, Cause> {
    let parts = pieces(extents, PIECE);
    let (mem, file) = (
        mem.clone(),
        Arc::new(
            file.try_clone()
                .map_err(Cause::io("cannot duplicate the memory snapshot file"))?,
        ),
    );
    pieces::run(
        "restore-copy",
        crate::seccomp_filters::restore_copy,
        parts.len(),
        move |i| read_piece(&mem, &file, &parts[i]),
        || Cause::new("a copy restore thread panicked"),
    )
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// An unnamed file of `len` bytes (holes) in the temporary directory.
    pub(crate) fn temp_file(len: u64) -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("restore-test-{}-{n}", std::process::id()));
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
        assert_eq!(threads, pieces::thread_count(5));
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
