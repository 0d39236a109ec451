//! `blkfault` and `netfault`: the disk and the NIC while the host fails under them (a full or
//! failing filesystem, a VMM killed mid-write, a TAP deleted). The guest reports what it saw
//! acknowledged, so the host can check that none of it was lost. See docs/test-guest.md.

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::DeviceType;

use crate::bootinfo::BootInfo;
use crate::net::{setup as net_setup, udp_frame, Setup};
use crate::virtio::{find, transport, GuestHal};
use crate::{check, fail, parse_u64, pass, println, smp};

/// Word `w` (0-63) of sector `s` as write `n` leaves it. The host computes the same
/// (cloud-hypervisor/tests/faults.rs): `n + 1` in the top half, so a sector never written
/// (all zeroes) differs from every write.
pub fn word(n: u64, s: u64, w: u64) -> u64 {
    (n + 1) << 32 | (s & 0xff_ffff) << 8 | w
}

fn fill(buf: &mut [u8], n: u64, first_sector: u64) {
    for (k, c) in buf.chunks_exact_mut(8).enumerate() {
        let (s, w) = (first_sector + k as u64 / 64, k as u64 % 64);
        c.copy_from_slice(&word(n, s, w).to_le_bytes());
    }
}

/// `test=blkfault`: write `n` (0, 1, 2, ...) goes to block `n % blocks` (`chunk` sectors), a
/// FLUSH after every `flush` writes. Lines:
/// - `BLKFAULT write-error <n> <why>`: write n failed (its status was not OK);
/// - `BLKFAULT flush-error <n>`: the flush after write n-1 failed;
/// - `BLKFAULT flushed <n>`: the flush after write n-1 succeeded: every write below n that
///   did not fail must be on the disk (also those an earlier failed flush covered: a FLUSH
///   covers every write completed before it).
///
/// Without `blkfault_loop=1` it stops after `blocks` writes or `blkfault_errors` errors; with
/// `blkfault_pause_ms=<ms>` it then prints `BLKFAULT pause`, waits that long (the host makes
/// room meanwhile) and does `blkfault_more` more writes (default 32). Then it reads back every
/// block whose last write was flushed (`blkfault-readback`), prints
/// `BLKFAULT done writes=<n> errors=<e>` and powers off. With `blkfault_loop=1` it writes for
/// ever.
pub fn scenario_blkfault(boot: &BootInfo) {
    let arg = |k: &str, d: u64| boot.arg(k).and_then(parse_u64).unwrap_or(d);
    let chunk = arg("blkfault_chunk", 8).clamp(1, 128);
    let flush_every = arg("blkfault_flush", 1).max(1);
    let forever = arg("blkfault_loop", 0) != 0;
    let max_errors = arg("blkfault_errors", 16);
    let pause_ms = arg("blkfault_pause_ms", 0);
    let more = arg("blkfault_more", 32);
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("blkfault-present", format_args!("no virtio-blk function"));
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("blkfault-init", format_args!("{e}"));
            return;
        }
    };
    let blocks = arg("blkfault_blocks", blk.capacity() / chunk).clamp(1, blk.capacity() / chunk);
    if arg("blkfault_read", 0) != 0 {
        read_faults(&mut blk, chunk, blocks, pause_ms);
        return;
    }
    println!(
        "INFO blkfault capacity={} blocks={blocks} chunk={chunk} flush={flush_every} loop={forever}",
        blk.capacity()
    );
    println!("READY");
    let mut w = Writer {
        blk: &mut blk,
        buf: alloc::vec![0u8; 512 * chunk as usize],
        chunk,
        blocks,
        durable: alloc::vec![None; blocks as usize],
        unflushed: alloc::vec::Vec::new(),
        n: 0,
        errors: 0,
    };
    while forever || (w.n < blocks && w.errors < max_errors) {
        w.step(flush_every);
    }
    if pause_ms > 0 {
        println!("BLKFAULT pause");
        smp::delay_us(pause_ms * 1000);
        let end = (w.n + more).min(blocks);
        while w.n < end {
            w.step(flush_every);
        }
    }
    let (mut good, mut bad) = (0u64, 0u64);
    let mut back = alloc::vec![0u8; w.buf.len()];
    for b in 0..blocks {
        let Some(m) = w.durable[b as usize] else {
            continue;
        };
        fill(&mut w.buf, m, b * chunk);
        match w.blk.read_blocks((b * chunk) as usize, &mut back) {
            Ok(()) if back == w.buf => good += 1,
            r => {
                bad += 1;
                println!("BLKFAULT read-back-bad block={b} write={m} {r:?}");
            }
        }
    }
    check!(
        "blkfault-readback",
        bad == 0,
        "{bad} of {} flushed blocks differ",
        good + bad
    );
    println!(
        "BLKFAULT done writes={} errors={} readback={good}",
        w.n, w.errors
    );
}

/// What one read of block `b` (`chunk` sectors) found: `ok` (it holds `expect`'s write),
/// `error` (IOERR), `bad` (other data, or another failure).
fn read_block(
    blk: &mut VirtIOBlk<GuestHal, virtio_drivers::transport::pci::PciTransport>,
    b: u64,
    chunk: u64,
    expect: u64,
    want: &mut [u8],
    back: &mut [u8],
) -> &'static str {
    fill(want, expect, b * chunk);
    back.fill(0xee);
    match blk.read_blocks((b * chunk) as usize, back) {
        Ok(()) if back == want => "ok",
        Ok(()) => "bad",
        Err(virtio_drivers::Error::IoError) => "error",
        Err(e) => {
            println!("BLKFAULT read-failed block={b} {e}");
            "bad"
        }
    }
}

/// `blkfault_read=1`: reads while the host fails some of them. Block b (`chunk` sectors)
/// starts out holding write b's pattern (the host wrote it). Round 1 reads every block; then
/// every block that read back right is written again (write `blocks + b`) and flushed; round 2
/// reads every block again (those rewritten hold their new write); with
/// `blkfault_pause_ms` it prints `BLKFAULT pause`, waits (the host stops failing reads) and
/// reads every block once more (round 3). Lines: `BLKFAULT read <round> <b> ok|error|bad`
/// (`unknown`, not read, after a failed write of it),
/// `BLKFAULT write-error <n> <why>`, `BLKFAULT flushed <writes>` or
/// `BLKFAULT flush-error <writes>`, then `BLKFAULT done reads=<r> read-errors=<e>
/// writes=<w> errors=<write and flush errors>`; it checks nothing itself (the host knows which
/// reads must fail).
fn read_faults(
    blk: &mut VirtIOBlk<GuestHal, virtio_drivers::transport::pci::PciTransport>,
    chunk: u64,
    blocks: u64,
    pause_ms: u64,
) {
    let len = 512 * chunk as usize;
    let mut r = Reads {
        want: alloc::vec![0u8; len],
        back: alloc::vec![0u8; len],
        reads: 0,
        errors: 0,
    };
    // Per block, the write it holds (unknown after a failed write).
    let mut holds: alloc::vec::Vec<Option<u64>> = (0..blocks).map(Some).collect();
    let read_ok = r.round(blk, chunk, 1, &holds);
    // Some reads failed; the device must go on serving everything else.
    let (mut writes, mut errors) = (0u64, 0u64);
    let mut buf = alloc::vec![0u8; len];
    for b in (0..blocks).filter(|&b| read_ok[b as usize]) {
        let n = blocks + b;
        fill(&mut buf, n, b * chunk);
        writes += 1;
        match blk.write_blocks((b * chunk) as usize, &buf) {
            Ok(()) => holds[b as usize] = Some(n),
            Err(e) => {
                errors += 1;
                holds[b as usize] = None;
                println!("BLKFAULT write-error {n} {e}");
            }
        }
    }
    match blk.flush() {
        Ok(()) => println!("BLKFAULT flushed {writes}"),
        Err(e) => {
            errors += 1;
            println!("BLKFAULT flush-error {writes} {e}");
        }
    }
    r.round(blk, chunk, 2, &holds);
    if pause_ms > 0 {
        println!("BLKFAULT pause");
        smp::delay_us(pause_ms * 1000);
        r.round(blk, chunk, 3, &holds);
    }
    println!(
        "BLKFAULT done reads={} read-errors={} writes={writes} errors={errors}",
        r.reads, r.errors
    );
}

/// The reads of `blkfault_read=1`.
struct Reads {
    want: alloc::vec::Vec<u8>,
    back: alloc::vec::Vec<u8>,
    reads: u64,
    /// Reads that ended with IOERR.
    errors: u64,
}

impl Reads {
    /// Reads every block once, expecting the write `holds` says; prints a line per block and
    /// returns which read back right.
    fn round(
        &mut self,
        blk: &mut VirtIOBlk<GuestHal, virtio_drivers::transport::pci::PciTransport>,
        chunk: u64,
        round: u64,
        holds: &[Option<u64>],
    ) -> alloc::vec::Vec<bool> {
        let mut ok = alloc::vec::Vec::with_capacity(holds.len());
        for (b, &h) in holds.iter().enumerate() {
            let b = b as u64;
            let r = match h {
                Some(n) => {
                    self.reads += 1;
                    read_block(blk, b, chunk, n, &mut self.want, &mut self.back)
                }
                // A failed write left it unknown: not read.
                None => "unknown",
            };
            if r == "error" {
                self.errors += 1;
            }
            ok.push(r == "ok");
            println!("BLKFAULT read {round} {b} {r}");
        }
        ok
    }
}

/// The writes of `blkfault` and what the guest knows of them.
struct Writer<'a> {
    blk: &'a mut VirtIOBlk<GuestHal, virtio_drivers::transport::pci::PciTransport>,
    buf: alloc::vec::Vec<u8>,
    chunk: u64,
    blocks: u64,
    /// Per block, its last write if a flush succeeded after it (and no later write failed).
    durable: alloc::vec::Vec<Option<u64>>,
    /// Writes completed since the last successful flush.
    unflushed: alloc::vec::Vec<u64>,
    n: u64,
    errors: u64,
}

impl Writer<'_> {
    /// Write `n`, and a flush when `n + 1` is a multiple of `flush_every`.
    fn step(&mut self, flush_every: u64) {
        let (n, b) = (self.n, self.n % self.blocks);
        fill(&mut self.buf, n, b * self.chunk);
        match self.blk.write_blocks((b * self.chunk) as usize, &self.buf) {
            Ok(()) => self.unflushed.push(n),
            Err(e) => {
                self.errors += 1;
                println!("BLKFAULT write-error {n} {e}");
                // What the block held before may be gone in part: nothing known about it.
                self.durable[b as usize] = None;
                self.unflushed.retain(|&m| m % self.blocks != b);
            }
        }
        self.n += 1;
        if !self.n.is_multiple_of(flush_every) {
            return;
        }
        match self.blk.flush() {
            Ok(()) => {
                for &m in &self.unflushed {
                    self.durable[(m % self.blocks) as usize] = Some(m);
                }
                self.unflushed.clear();
                println!("BLKFAULT flushed {}", self.n);
            }
            Err(e) => {
                self.errors += 1;
                println!("BLKFAULT flush-error {} {e}", self.n);
            }
        }
    }
}

/// `test=netfault`: a NIC and a disk in use together, for ever. Round n (about every
/// 50 ms): one UDP datagram to the host (`net_host_ip`:5001), every received frame
/// dropped, sector `n % 16` written and read back, then
/// `NETFAULT round=<n> tx=<ok|err> rx=<frames so far> disk=<ok|bad>`. A device that stops
/// completing requests stops the rounds (the host watches them go on).
pub fn scenario_netfault(boot: &BootInfo) {
    let Some(Setup {
        ip,
        host_ip,
        host_mac,
        mut net,
    }) = net_setup(boot)
    else {
        return;
    };
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("netfault-disk", format_args!("no virtio-blk function"));
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("netfault-disk", format_args!("{e}"));
            return;
        }
    };
    let frame = udp_frame(net.mac_address(), host_mac, ip, host_ip, b"netfault");
    println!("READY");
    let (mut buf, mut back) = ([0u8; 512], [0u8; 512]);
    let mut rx = 0u64;
    for n in 0u64.. {
        let mut tx = net.new_tx_buffer(frame.len());
        tx.packet_mut().copy_from_slice(&frame);
        let tx_ok = net.send(tx).is_ok();
        while let Ok(b) = net.receive() {
            rx += 1;
            if net.recycle_rx_buffer(b).is_err() {
                break;
            }
        }
        let s = n % 16;
        fill(&mut buf, n, s);
        let disk_ok = blk.write_blocks(s as usize, &buf).is_ok()
            && blk.read_blocks(s as usize, &mut back).is_ok()
            && back == buf;
        println!(
            "NETFAULT round={n} tx={} rx={rx} disk={}",
            if tx_ok { "ok" } else { "err" },
            if disk_ok { "ok" } else { "bad" }
        );
        smp::delay_us(50_000);
    }
}
