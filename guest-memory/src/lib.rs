//! Guest RAM as the VMM and its devices hold it: vm-memory's mmap backend with a dirty-page
//! bitmap in every region (`AtomicBitmap`, one bit per 4 KiB page).
//!
//! KVM's dirty log sees only the guest's own writes (its vCPUs' stores). What the VMM and its
//! devices write into guest RAM from user space — used ring entries, the data of a block read,
//! a received frame, boot tables, the copy of a restored snapshot — reaches the mapping without
//! KVM: a live migration that read only the dirty log would miss it. With these types every
//! write through vm-memory marks the pages it touched in its region's bitmap, after the write:
//! `Bytes` (`write_slice`, `write_obj`, `store`, `read_volatile_from`...) on the memory or a
//! region, and `VolatileSlice`/`VolatileRef` writes. Reads mark nothing. `take_dirty_pages`
//! hands the marks over (and clears them), in the layout of KVM's dirty log, so the two are
//! ORed word by word.
//!
//! What vm-memory cannot see: writes through host pointers taken from it (`ptr_guard_mut`,
//! `as_ptr`, iovecs handed to the kernel). Code that writes that way marks the range itself,
//! once the data is in place (`Bitmap::mark_dirty` on `bitmap(region)`; virtio-devices'
//! `GuestView::written` and its used ring do).
//!
//! Build regions with `region_builder`, never `MmapRegionBuilder::new`: that one gives the
//! region `AtomicBitmap::default()`, a bitmap of no pages, which records nothing.
//!
//! Generic code (`M: GuestMemory`) stays generic; standalone tests may keep vm-memory's
//! `GuestMemoryMmap<()>`.

use std::num::NonZeroUsize;

pub use vm_memory::bitmap::{AtomicBitmap, Bitmap};

/// All of guest RAM: its regions, each with its dirty-page bitmap.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of guest RAM (a mapping placed at a guest address) and its bitmap.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
/// A mapping with its bitmap, before it is placed at a guest address.
pub type GuestMmapRegion = vm_memory::MmapRegion<AtomicBitmap>;
/// The builder of a `GuestMmapRegion`; start it with `region_builder`.
pub type MmapRegionBuilder = vm_memory::mmap::MmapRegionBuilder<AtomicBitmap>;

/// Bytes a bit of the bitmap stands for: x86's base page, as in KVM's dirty log.
pub const DIRTY_PAGE_SIZE: usize = 4096;

/// A bitmap for `len` bytes of guest RAM, all clean.
pub fn new_bitmap(len: usize) -> AtomicBitmap {
    AtomicBitmap::new(len, const { NonZeroUsize::new(DIRTY_PAGE_SIZE).unwrap() })
}

/// A builder for a mapping of `size` bytes that tracks its writes (a bitmap of `size` bytes).
pub fn region_builder(size: usize) -> MmapRegionBuilder {
    MmapRegionBuilder::new_with_bitmap(size, new_bitmap(size))
}

/// The dirty-page bitmap of `region` (offsets from the region's start).
pub fn bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    // The mapping's own bitmap (`GuestMemoryRegion::bitmap` would give a slice of it).
    vm_memory::MmapRegion::bitmap(region)
}

/// The pages of `region` written through vm-memory (or marked) since the last call, and clears
/// them as it reads them (`AtomicBitmap::get_and_reset`, word by word): bit `i` of word `w` is
/// page `64 * w + i` of the region (4 KiB pages from its start), as in KVM's dirty log for the
/// memory slot of the region, so the two combine with `|`. A page written while the words are
/// read is either in this result or in the next one.
pub fn take_dirty_pages(region: &GuestRegionMmap) -> Vec<u64> {
    bitmap(region).get_and_reset()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::atomic::Ordering;

    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemory};

    const PAGE: u64 = DIRTY_PAGE_SIZE as u64;
    /// Two regions of 16 pages: at 0 and at 1 MiB.
    const R0: u64 = 0;
    const R1: u64 = 1 << 20;
    const LEN: usize = 16 * DIRTY_PAGE_SIZE;
    const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
    const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;

    fn mem() -> GuestMemoryMmap {
        let region = |at| {
            let m = region_builder(LEN)
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .build()
                .unwrap();
            GuestRegionMmap::new(m, GuestAddress(at)).unwrap()
        };
        GuestMemoryMmap::from_regions(vec![region(R0), region(R1)]).unwrap()
    }

    /// The dirty pages of each region, as page numbers, cleared as read.
    fn take(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
        mem.iter()
            .map(|r| {
                let words = take_dirty_pages(r);
                assert_eq!(words.len(), 1, "16 pages: one word");
                (0..64).filter(|i| words[0] & (1 << i) != 0).collect()
            })
            .collect()
    }

    fn clean() -> Vec<Vec<u64>> {
        vec![vec![], vec![]]
    }

    #[test]
    fn regions_track_every_page() {
        let m = mem();
        for r in m.iter() {
            assert_eq!(bitmap(r).len(), LEN / DIRTY_PAGE_SIZE);
            assert_eq!(bitmap(r).byte_size(), LEN);
        }
        // The pitfall `region_builder` avoids: the default bitmap has no pages.
        let untracked = MmapRegionBuilder::new(LEN)
            .with_mmap_prot(PROT)
            .with_mmap_flags(FLAGS)
            .build()
            .unwrap();
        assert_eq!(untracked.bitmap().len(), 0);
    }

    #[test]
    fn writes_mark_exactly_the_pages_they_touch() {
        let m = mem();
        assert_eq!(take(&m), clean(), "a fresh region is clean");

        // A u32 across the boundary of pages 1 and 2 of the first region.
        m.write_obj(0xdead_beef_u32, GuestAddress(R0 + 2 * PAGE - 2))
            .unwrap();
        // 0x3000 bytes from 0x800 into the second region: pages 0 to 3.
        m.write_slice(&[0x5a; 0x3000], GuestAddress(R1 + 0x800))
            .unwrap();
        assert_eq!(take(&m), vec![vec![1, 2], vec![0, 1, 2, 3]]);
        // `get_and_reset` cleared them.
        assert_eq!(take(&m), clean());

        // One byte at the last byte of the first region; an atomic store.
        m.write_obj(1u8, GuestAddress(R0 + LEN as u64 - 1)).unwrap();
        m.store(7u64, GuestAddress(R1 + 9 * PAGE), Ordering::Release)
            .unwrap();
        assert_eq!(take(&m), vec![vec![15], vec![9]]);

        // Through a region's own `Bytes` (offsets from its start).
        let r1 = m.find_region(GuestAddress(R1)).unwrap();
        r1.write_slice(&[1; 8], vm_memory::MemoryRegionAddress(5 * PAGE))
            .unwrap();
        assert_eq!(take(&m), vec![vec![], vec![5]]);
    }

    #[test]
    fn volatile_slice_writes_mark_their_pages() {
        let m = mem();
        // A slice of pages 3-5 of the first region; writes at its offsets.
        let s = m
            .get_slice(GuestAddress(R0 + 3 * PAGE), 3 * PAGE as usize)
            .unwrap();
        s.write_obj(1u16, PAGE as usize + 4).unwrap(); // page 4
        s.copy_from(&[9u8; 10]); // page 3
        assert_eq!(take(&m), vec![vec![3, 4], vec![]]);
        // A sub-slice, and a reference into it.
        let sub = s.get_slice(2 * PAGE as usize, 16).unwrap(); // page 5
        sub.get_ref::<u64>(8).unwrap().store(3);
        assert_eq!(take(&m), vec![vec![5], vec![]]);
        // A raw pointer taken from the slice is not seen: its writer marks.
        let p = s.ptr_guard_mut().as_ptr();
        // SAFETY: inside the 3-page slice, which `m` keeps mapped.
        unsafe { std::ptr::write_volatile(p, 1) };
        assert_eq!(take(&m), clean());
        Bitmap::mark_dirty(
            bitmap(m.find_region(GuestAddress(R0)).unwrap()),
            (3 * PAGE) as usize,
            1,
        );
        assert_eq!(take(&m), vec![vec![3], vec![]]);
    }

    #[test]
    fn a_file_read_into_memory_marks_what_it_read() {
        // As the restore's copy: `read_exact_volatile_from` a file.
        let m = mem();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0xa5; 2 * PAGE as usize + 1]).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        m.read_exact_volatile_from(GuestAddress(R1 + 6 * PAGE), &mut f, 2 * PAGE as usize + 1)
            .unwrap();
        assert_eq!(take(&m), vec![vec![], vec![6, 7, 8]]);
        // A short read marks what was read.
        f.seek(SeekFrom::Start(2 * PAGE)).unwrap();
        let mut s = m
            .get_slice(GuestAddress(R0 + 10 * PAGE), 2 * PAGE as usize)
            .unwrap();
        assert_eq!(f.read_volatile(&mut s).unwrap(), 1);
        assert_eq!(take(&m), vec![vec![10], vec![]]);
    }

    #[test]
    fn a_virtio_queue_used_ring_update_marks_the_ring() {
        let m = mem();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(R0 as u32), Some(0));
        q.set_avail_ring_address(Some((R0 + PAGE) as u32), Some(0));
        // The used ring's header ends page 4, its first element straddles pages 4 and 5.
        let used = R0 + 5 * PAGE - 8;
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&m));
        q.add_used(&m, 3, 0x100).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(used + 4)).unwrap(), 3);
        assert_eq!(m.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(take(&m), vec![vec![4, 5], vec![]]);
        // The next element lies in page 5; the index it moves stays in page 4.
        q.add_used(&m, 4, 0x100).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(used + 12)).unwrap(), 4);
        assert_eq!(take(&m), vec![vec![4, 5], vec![]]);
        // The driver's side, read by the device, marks nothing.
        let _ = q.avail_idx(&m, Ordering::Acquire).unwrap();
        let _ = q.used_idx(&m, Ordering::Acquire).unwrap();
        assert_eq!(take(&m), clean());
    }

    #[test]
    fn reads_mark_nothing() {
        let m = mem();
        let mut buf = [0u8; 0x2000];
        m.read_slice(&mut buf, GuestAddress(R0 + 0x800)).unwrap();
        let _: u64 = m.read_obj(GuestAddress(R1)).unwrap();
        let _: u32 = m
            .load(GuestAddress(R1 + 4 * PAGE), Ordering::Acquire)
            .unwrap();
        let s = m.get_slice(GuestAddress(R1 + 8 * PAGE), 0x1000).unwrap();
        s.copy_to(&mut buf[..]);
        let _: u16 = s.read_obj(2).unwrap();
        let mut out = Vec::new();
        m.write_all_volatile_to(GuestAddress(R0), &mut out, 3 * PAGE as usize)
            .unwrap();
        assert_eq!(take(&m), clean());
    }

    #[test]
    fn clones_of_the_memory_share_the_bitmaps() {
        // A device's clone of guest memory marks the bitmap the VMM reads.
        let m = mem();
        let device = m.clone();
        device.write_obj(1u8, GuestAddress(R1 + 12 * PAGE)).unwrap();
        assert_eq!(take(&m), vec![vec![], vec![12]]);
        assert_eq!(take(&device), clean());
    }
}
