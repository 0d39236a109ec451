//! Guest RAM for the migration unit tests: two regions, one at 0 and one at 4 GiB, and a
//! pattern that tells every 8 bytes apart.

use guest_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// `low` bytes at 0 and `high` at 4 GiB, zeros.
pub fn ram(low: usize, high: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), low), (GuestAddress(1 << 32), high)]).unwrap()
}

/// What [`fill`] puts at `gpa`: its address, scrambled (never 0).
pub fn word(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// Every 8 bytes of `mem`'s RAM: [`word`] of their address.
pub fn fill(mem: &GuestMemoryMmap) {
    for r in mem.iter() {
        let base = r.start_addr().0;
        let words: Vec<u8> = (0..r.len() / 8)
            .flat_map(|i| word(base + i * 8).to_le_bytes())
            .collect();
        mem.write_slice(&words, GuestAddress(base)).unwrap();
    }
}
