//! `test=blk-rate`: the first virtio-blk disk read as fast as the guest can, one request at a
//! time (virtio-drivers), timed by kvmclock, as a Linux guest's clock_gettime would time it: a
//! rate-limited disk (`--disk ...,bw_size=,bw_refill_time=`, `ops_*`) must give the configured
//! rate inside the guest. First `blk_rate_warm_ms=` (default 500) of reads that are not counted
//! (they spend the bucket's first fill, which a limiter hands out at once), then
//! `blk_rate_ms=` (default 3000) measured, in requests of `blk_rate_size=` bytes (default
//! 65536, a multiple of 512, at most 64 KiB), sequential over the disk. Prints `BLK-RATE
//! bytes=<n> requests=<n> ns=<n> bytes_per_sec=<n> requests_per_sec=<n>` and passes
//! `blk-rate`; the host compares the rates with the configuration.

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::virtio::{find, transport, GuestHal};
use crate::{fail, kvmclock, parse_u64, pass, println};

pub fn scenario_blk_rate(boot: &BootInfo) {
    let arg = |k: &str, d: u64| boot.arg(k).and_then(parse_u64).unwrap_or(d);
    let (warm_ms, ms, size) = (
        arg("blk_rate_warm_ms", 500),
        arg("blk_rate_ms", 3000),
        arg("blk_rate_size", 65536) as usize,
    );
    if size == 0 || size % 512 != 0 || size > 65536 || ms == 0 {
        fail(
            "blk-rate",
            format_args!("blk_rate_size={size} blk_rate_ms={ms}"),
        );
        return;
    }
    if kvmclock::available().is_err() || !kvmclock::enable() {
        fail("blk-rate", format_args!("no kvmclock to time the reads"));
        return;
    }
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("blk-rate", format_args!("no virtio-blk function"));
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("blk-rate", format_args!("{e}"));
            return;
        }
    };
    let per = size / 512;
    let sectors = blk.capacity() as usize;
    if sectors < per {
        fail("blk-rate", format_args!("disk too small"));
        return;
    }
    let mut buf = alloc::vec![0u8; size];
    let mut sector = 0usize;
    // Reads until `until` (kvmclock ns): (bytes, requests), or None after a FAIL.
    let mut read_until = |until: u64| -> Option<(u64, u64)> {
        let (mut bytes, mut requests) = (0u64, 0u64);
        while kvmclock::read_ns() < until {
            if let Err(e) = blk.read_blocks(sector, &mut buf) {
                fail("blk-rate", format_args!("read at sector {sector}: {e}"));
                return None;
            }
            bytes += size as u64;
            requests += 1;
            sector = (sector + per) % (sectors - per + 1);
        }
        Some((bytes, requests))
    };
    println!("BLK-RATE start size={size} warm_ms={warm_ms} ms={ms}");
    let start = kvmclock::read_ns();
    if read_until(start + warm_ms * 1_000_000).is_none() {
        return;
    }
    let t0 = kvmclock::read_ns();
    let Some((bytes, requests)) = read_until(t0 + ms * 1_000_000) else {
        return;
    };
    let ns = kvmclock::read_ns() - t0;
    kvmclock::disable();
    let rate = |n: u64| (u128::from(n) * 1_000_000_000 / u128::from(ns.max(1))) as u64;
    println!(
        "BLK-RATE bytes={bytes} requests={requests} ns={ns} bytes_per_sec={} requests_per_sec={}",
        rate(bytes),
        rate(requests)
    );
    pass("blk-rate");
}
