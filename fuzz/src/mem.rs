//! Guest RAM for the device targets: two regions, adjacent in guest-physical space but each
//! between inaccessible guard pages on the host, so a device that reads or writes past a
//! region (or takes two regions for one contiguous host buffer) faults, and the fuzzer reports
//! it. The mappings are made once and zeroed for each input.

use std::sync::OnceLock;

use guest_memory::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::GuestAddress;

/// Size of each region; region `i` is at guest address `i * REGION`.
pub const REGION: usize = 0x10000;
pub const REGIONS: usize = 2;
const GUARD: usize = 0x1000;

struct Arena([usize; REGIONS]);

fn arena() -> &'static Arena {
    static A: OnceLock<Arena> = OnceLock::new();
    A.get_or_init(|| {
        let mut bases = [0usize; REGIONS];
        for b in &mut bases {
            // SAFETY: a fresh anonymous mapping of our own, nothing else refers to it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    REGION + 2 * GUARD,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap of the guest RAM arena");
            let mid = p as usize + GUARD;
            // SAFETY: the middle of the mapping made above; the guards stay PROT_NONE.
            let r = unsafe {
                libc::mprotect(
                    mid as *mut libc::c_void,
                    REGION,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            assert_eq!(r, 0, "mprotect of the guest RAM arena");
            *b = mid;
        }
        Arena(bases)
    })
}

/// Fresh guest RAM whose first bytes are `image` (the rest zero). Regions are views of the
/// arena: the returned memory (and every clone a device keeps) must be gone before the next
/// call, which is the case between fuzz inputs.
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let a = arena();
    let mut regions = Vec::new();
    for (i, &base) in a.0.iter().enumerate() {
        // SAFETY: `base` is REGION writable bytes of the arena, used by nothing else now.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, REGION) };
        bytes.fill(0);
        let from = (i * REGION).min(image.len());
        let to = ((i + 1) * REGION).min(image.len());
        bytes[..to - from].copy_from_slice(&image[from..to]);
        // SAFETY: the pointer is valid for REGION bytes for the life of the process (the
        // arena is never unmapped), and the builder does not unmap a raw pointer.
        let m = unsafe {
            guest_memory::region_builder(REGION)
                .with_raw_mmap_pointer(base as *mut u8)
                .build()
        }
        .expect("a guest RAM region over the arena");
        regions.push(
            GuestRegionMmap::new(m, GuestAddress((i * REGION) as u64)).expect("a guest RAM region"),
        );
    }
    GuestMemoryMmap::from_regions(regions).expect("guest RAM")
}
