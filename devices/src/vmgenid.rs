//! The VM generation ID (Microsoft's "Virtual Machine Generation ID", read by Linux's
//! `drivers/virt/vmgenid.c`): a 16-byte value in guest memory that changes whenever the VM may
//! have been duplicated, so that the guest reseeds its random number generators instead of
//! repeating the values another copy of the same snapshot also produces.
//!
//! The protocol:
//! - The DSDT describes a device `\_SB_.VGEN` (`_HID` `VMGENCTR`, `_CID` `VM_GEN_COUNTER`) whose
//!   `ADDR` gives the guest physical address of the 16 bytes (`arch::layout::VMGENID_START`, in
//!   the legacy reserved range, backed by guest RAM).
//! - The VMM writes a fresh ID there ([`new_generation_id`], [`write_generation_id`]) before
//!   the guest first runs, and again after every restore from a snapshot (each restored clone
//!   gets its own), before its vCPUs resume.
//! - After a restore it then raises the GED's event bit 1 ([`crate::GED_VMGENID`] with
//!   [`crate::Ged::notify`]); the DSDT's `_EVT` sees the bit and runs
//!   `Notify(\_SB_.VGEN, 0x80)`.
//! - The guest's driver, notified, re-reads the 16 bytes, and if they differ from the ID it
//!   last saw, reseeds its RNG with them (Linux: `add_vmfork_randomness`) and tells user space
//!   (a `NEW_VMGENID=1` uevent). At probe it reads the ID written at boot.
//!
//! The ID is not device state to save: a restore must not bring back the saved one, it writes a
//! new one over the snapshot's guest memory.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Size of the generation ID in bytes.
pub const GENERATION_ID_LEN: usize = 16;

/// A new generation ID: 16 random bytes from the kernel's CSPRNG (`getrandom(2)`, which blocks
/// only until the kernel's pool is first initialised). Retries on `EINTR` and short reads.
pub fn new_generation_id() -> std::io::Result<[u8; GENERATION_ID_LEN]> {
    let mut id = [0u8; GENERATION_ID_LEN];
    let mut filled = 0;
    while filled < id.len() {
        let rest = &mut id[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which is valid,
        // writable memory of that length for the whole call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(id)
}

/// Writes `id` at `addr` (the address the DSDT's `\_SB_.VGEN.ADDR` gives) in guest memory, as one
/// 16-byte copy. Do it while the vCPUs are stopped (before the first boot, or during a restore
/// before the vCPUs resume), then, after a restore, raise [`crate::GED_VMGENID`]: the guest reads
/// the ID at its driver's probe and whenever notified, so it never sees a half-written one.
pub fn write_generation_id<M: GuestMemory>(
    mem: &M,
    addr: GuestAddress,
    id: &[u8; GENERATION_ID_LEN],
) -> Result<(), GuestMemoryError> {
    mem.write_slice(id, addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn generation_ids_are_random_and_differ() {
        let ids: Vec<_> = (0..8).map(|_| new_generation_id().unwrap()).collect();
        for (i, a) in ids.iter().enumerate() {
            assert_ne!(*a, [0u8; GENERATION_ID_LEN], "an all-zero ID");
            for b in &ids[i + 1..] {
                assert_ne!(a, b, "two IDs are equal");
            }
        }
    }

    #[test]
    fn generation_id_is_written_at_the_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let addr = GuestAddress(0xe_f000);
        // Marker bytes around the ID must stay as they are.
        mem.write_slice(&[0xaa; 48], GuestAddress(addr.0 - 16))
            .unwrap();
        for _ in 0..2 {
            let id = new_generation_id().unwrap();
            write_generation_id(&mem, addr, &id).unwrap();
            let mut back = [0u8; 48];
            mem.read_slice(&mut back, GuestAddress(addr.0 - 16))
                .unwrap();
            assert_eq!(back[..16], [0xaa; 16]);
            assert_eq!(back[16..32], id);
            assert_eq!(back[32..], [0xaa; 16]);
        }
    }

    #[test]
    fn writing_outside_guest_memory_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let id = [0x5a; GENERATION_ID_LEN];
        assert!(write_generation_id(&mem, GuestAddress(0x2000), &id).is_err());
        // Partly outside: refused too (vm-memory writes what fits, then reports the rest).
        assert!(write_generation_id(&mem, GuestAddress(0x1000 - 8), &id).is_err());
    }
}
