//! `busy`: a guest that keeps memory and devices busy for ever, for the VMM's snapshot/restore
//! and live-migration tests. Each round (about every 20 ms of kvmclock) it checks and rewrites a
//! pattern area of RAM, writes and reads back a disk sector, writes to the virtio console, reads
//! the VM Generation ID and prints one `BUSY` line. See docs/test-guest.md.

use core::fmt::{self, Write};
use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::DeviceType;

use crate::acpi_sys::AcpiInfo;
use crate::bootinfo::BootInfo;
use crate::busy_net::NetWatch;
use crate::virtio::{find, transport, GuestHal};
use crate::{fail, kvmclock, paging, parse_u64, println, smp, svc};

/// The pattern area starts above the virtio DMA arena (16-32 MiB).
const MEM_BASE: u64 = 32 << 20;
const MEM_DEFAULT_MIB: u64 = 8;
/// Up to the end of the identity map; the memory map decides how much of that is RAM.
const MEM_MAX_MIB: u64 = (MAPPED - MEM_BASE) >> 20;
/// Rounds are this far apart (kvmclock), unless a round takes longer.
const ROUND_NS: u64 = 20_000_000;
/// Sectors the disk rounds cycle through.
const DISK_SECTORS: u64 = 64;
/// The monitor identity-maps the first 4 GiB.
const MAPPED: u64 = 1 << 32;

/// The value of the 8-byte word at `addr` in round `n`.
#[inline(always)]
pub fn mem_value(addr: u64, n: u64) -> u64 {
    addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n
}

/// Word `i` (0-63, little-endian) of the sector written in round `n`.
pub fn disk_word(n: u64, i: u64) -> u64 {
    n << 8 | i
}

/// A line built on the stack (no heap: the rounds run for ever on a bump allocator).
struct StackBuf {
    buf: [u8; 64],
    len: usize,
}

impl Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let b = s.as_bytes();
        let dst = self
            .buf
            .get_mut(self.len..self.len + b.len())
            .ok_or(fmt::Error)?;
        dst.copy_from_slice(b);
        self.len += b.len();
        Ok(())
    }
}

/// 16 bytes as 32 lowercase hex digits, byte 0 first.
struct Hex<'a>(&'a [u8; 16]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Round `n` over the pattern area: checks each word still holds round `n - 1`'s value (not
/// in round 0), then writes round `n`'s. Returns the first mismatch (address, found, expected)
/// and how many words mismatched.
fn mem_round(base: u64, size: u64, n: u64) -> (Option<(u64, u64, u64)>, u64) {
    let mut first = None;
    let mut bad = 0u64;
    let mut addr = base;
    while addr < base + size {
        let p = addr as *mut u64;
        if n > 0 {
            // SAFETY: the pattern area is RAM (checked against the memory map), identity
            // mapped and used by nothing else.
            let found = unsafe { read_volatile(p) };
            let expected = mem_value(addr, n - 1);
            if found != expected {
                bad += 1;
                first.get_or_insert((addr, found, expected));
            }
        }
        // SAFETY: as above.
        unsafe { write_volatile(p, mem_value(addr, n)) };
        addr += 8;
    }
    (first, bad)
}

struct Disk {
    blk: VirtIOBlk<GuestHal, PciTransport>,
    sectors: u64,
}

impl Disk {
    /// Round `n`: writes sector `n % sectors` with round `n`'s pattern and reads it back, then
    /// reads the previous round's sector, which must still hold round `n - 1`'s pattern.
    /// False (after its FAIL line) on a failure.
    fn round(&mut self, n: u64) -> bool {
        let sector = n % self.sectors;
        let mut buf = [0u8; 512];
        fill(&mut buf, n);
        if let Err(e) = self.blk.write_blocks(sector as usize, &buf) {
            fail(
                "busy-disk",
                format_args!("round {n}: write of sector {sector}: {e}"),
            );
            return false;
        }
        self.check(n, sector, n, "read back")
            && (n == 0 || self.check(n, (n - 1) % self.sectors, n - 1, "previous round's sector"))
    }

    /// Reads `sector`, which must hold round `of`'s pattern; prints the FAIL line if not.
    fn check(&mut self, n: u64, sector: u64, of: u64, what: &str) -> bool {
        let mut buf = [0u8; 512];
        if let Err(e) = self.blk.read_blocks(sector as usize, &mut buf) {
            fail(
                "busy-disk",
                format_args!("round {n}: {what}: read of sector {sector}: {e}"),
            );
            return false;
        }
        for (i, w) in buf.chunks_exact(8).enumerate() {
            let found = u64::from_le_bytes(w.try_into().unwrap());
            let expected = disk_word(of, i as u64);
            if found != expected {
                fail(
                    "busy-disk",
                    format_args!(
                        "round {n}: {what}: sector {sector} word {i} found {found:#x} expected \
                         {expected:#x} (round {of}'s pattern)"
                    ),
                );
                return false;
            }
        }
        true
    }
}

fn fill(buf: &mut [u8; 512], n: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&disk_word(n, i as u64).to_le_bytes());
    }
}

/// Reads the 16-byte VM Generation ID at `addr`.
fn read_gen(addr: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        // SAFETY: `addr` is the ID's guest-physical address from the DSDT, identity mapped
        // (the first 4 GiB by the monitor, higher by `paging::map_uncached`).
        *b = unsafe { read_volatile((addr + i as u64) as *const u8) };
    }
    id
}

/// Sets everything up, prints `READY` and runs the rounds for ever. Returns only on a set-up
/// failure (after its FAIL line), and the guest then powers off.
pub fn scenario_busy(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    // The pattern area.
    let mib = match boot.arg("busy_mem") {
        None => MEM_DEFAULT_MIB,
        Some(s) => match parse_u64(s) {
            Some(v) if (1..=MEM_MAX_MIB).contains(&v) => v,
            _ => {
                fail(
                    "busy-mem",
                    format_args!("busy_mem={s}: expected 1 to {MEM_MAX_MIB} (MiB)"),
                );
                return;
            }
        },
    };
    let (base, size) = (MEM_BASE, mib << 20);
    let have = boot.ram_between(base, base + size);
    if have != size {
        fail(
            "busy-mem",
            format_args!(
                "busy_mem={mib} needs RAM at {base:#x}-{:#x} (a VM of at least {} MiB), the \
                 memory map has {have:#x} bytes of it",
                base + size,
                (base + size) >> 20
            ),
        );
        return;
    }
    if let Some((a, s)) = boot.initrd {
        if a < base + size && base < a + s {
            fail(
                "busy-mem",
                format_args!(
                    "the initramfs at {a:#x}+{s:#x} overlaps the pattern area {base:#x}+{size:#x}"
                ),
            );
            return;
        }
    }

    // The clock.
    if let Err(eax) = kvmclock::available() {
        fail(
            "busy-kvmclock",
            format_args!("CPUID 0x40000001 eax={eax:#x}: no CLOCKSOURCE2"),
        );
        return;
    }
    if !kvmclock::enable() {
        fail("busy-kvmclock", format_args!("KVM never wrote the page"));
        return;
    }

    // The VM Generation ID.
    let gen_addr = match acpi.and_then(|a| a.vgen) {
        None => None,
        Some(Err(why)) => {
            fail("busy-gen", format_args!("\\_SB_.VGEN.ADDR: {why}"));
            return;
        }
        Some(Ok(addr)) => {
            if addr.checked_add(16).is_none_or(|end| end > MAPPED) {
                if let Err(e) = paging::map_uncached(addr, 16) {
                    fail(
                        "busy-gen",
                        format_args!("mapping the ID at {addr:#x}: {e:?}"),
                    );
                    return;
                }
            }
            Some(addr)
        }
    };

    // The devices: the first virtio-blk and virtio-console functions, if any (on segment 0,
    // or `busy_segment=<s>`'s).
    let segment = boot.arg("busy_segment").and_then(parse_u64).unwrap_or(0) as u16;
    let find_one = |kind: DeviceType| -> Result<Option<PciTransport>, ()> {
        if segment == 0 {
            return match find(kind).into_iter().next() {
                Some(df) => transport(df).map(Some).ok_or(()),
                None => Ok(None),
            };
        }
        crate::segments::transport_on(acpi, segment, kind)
            .map_err(|e| fail("busy-segment", format_args!("{e}")))
    };
    let mut disk = None;
    let Ok(found) = find_one(DeviceType::Block) else {
        return;
    };
    if let Some(t) = found {
        let df = "the disk";
        let blk = match VirtIOBlk::<GuestHal, _>::new(t) {
            Ok(b) => b,
            Err(e) => {
                fail("busy-disk", format_args!("{df}: {e}"));
                return;
            }
        };
        if blk.readonly() || blk.capacity() == 0 {
            fail(
                "busy-disk",
                format_args!(
                    "{df}: read-only={} with {} sectors: the disk must be writable",
                    blk.readonly(),
                    blk.capacity()
                ),
            );
            return;
        }
        let sectors = blk.capacity().min(DISK_SECTORS);
        disk = Some(Disk { blk, sectors });
    }
    let mut console = None;
    let Ok(found) = find_one(DeviceType::Console) else {
        return;
    };
    if let Some(t) = found {
        let df = "the console";
        match VirtIOConsole::<GuestHal, _>::new(t) {
            Ok(c) => console = Some(c),
            Err(e) => {
                fail("busy-console", format_args!("{df}: {e}"));
                return;
            }
        }
    }

    // `busy_net=1`: the first virtio-net function, started and watched for a new MAC.
    let mut net = None;
    if boot.arg("busy_net") == Some("1") {
        match NetWatch::start() {
            Ok(Some(w)) => net = Some(w),
            Ok(None) => {
                fail(
                    "busy-net",
                    format_args!("busy_net=1 and no virtio-net function"),
                );
                return;
            }
            Err(e) => {
                fail("busy-net", format_args!("{e}"));
                return;
            }
        }
    }

    println!(
        "INFO busy mem={base:#x}+{size:#x} disk_sectors={} console={} vmgenid={}",
        disk.as_ref().map_or(0, |d| d.sectors),
        console.is_some(),
        gen_addr.map_or(alloc::string::String::from("none"), |a| alloc::format!(
            "{a:#x}"
        )),
    );
    println!("READY");

    let mut prev_gen: Option<[u8; 16]> = None;
    let mut n: u64 = 0;
    loop {
        let start = kvmclock::read_ns();
        let t0 = svc::rdtsc();

        let id = gen_addr.map(read_gen);
        let mut gen_changed = false;
        if let (Some(old), Some(new)) = (&prev_gen, &id) {
            if old != new {
                println!("VMGENID-CHANGED {} {}", Hex(old), Hex(new));
                gen_changed = true;
            }
        }
        prev_gen = id;
        if let Some(w) = net.as_mut() {
            w.poll(gen_changed);
        }

        let (first, bad) = mem_round(base, size, n);
        if let Some((addr, found, expected)) = first {
            fail(
                "busy-mem",
                format_args!(
                    "round {n} addr {addr:#x} found {found:#x} expected {expected:#x} ({bad} \
                     words bad)"
                ),
            );
        }

        let disk_state = match disk.as_mut().map(|d| d.round(n)) {
            None => "none",
            Some(true) => "ok",
            Some(false) => "bad",
        };

        if let Some(c) = console.as_mut() {
            let mut line = StackBuf {
                buf: [0; 64],
                len: 0,
            };
            let _ = writeln!(line, "BUSY {n}");
            if let Err(e) = c.send_bytes(&line.buf[..line.len]) {
                fail("busy-console", format_args!("round {n}: {e}"));
            }
        }

        let mut gen = StackBuf {
            buf: [0; 64],
            len: 0,
        };
        match &id {
            Some(id) => write!(gen, "{}", Hex(id)),
            None => gen.write_str("none"),
        }
        .ok();
        println!(
            "BUSY {n} clock={start} gen={} mem={} disk={disk_state}",
            core::str::from_utf8(&gen.buf[..gen.len]).unwrap_or("?"),
            if first.is_some() { "bad" } else { "ok" },
        );

        // Pace by kvmclock (a clock that went back ends the wait); the TSC bound (about 100 ms
        // or more) keeps a stalled clock from stopping the rounds.
        while kvmclock::read_ns().wrapping_sub(start) < ROUND_NS
            && svc::rdtsc().wrapping_sub(t0) < 100_000 * smp::TSC_PER_US
        {
            match &net {
                // Interrupts are taken only while waiting in the monitor.
                Some(w) => w.wait(),
                None => core::hint::spin_loop(),
            }
        }
        n += 1;
    }
}
