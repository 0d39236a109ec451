//! `test=virtiomem`: a virtio-mem driver (virtio 1.2, 5.15) on `virtio-drivers`' PCI transport
//! and its `VirtQueue` (the crate has no virtio-mem driver). The device's region lies above RAM
//! and 4 GiB and is not in the memory map; the guest maps it (write-back, `paging::map_ram`)
//! and follows the host's `requested_size` for ever: it plugs the lowest unplugged blocks or
//! unplugs the highest plugged ones, a few MiB per request, so the plugged blocks are always
//! the region's first `n`. Memory it plugged it fills (every word of every 4 KiB page, a pattern
//! of the address and of the request that plugged it) and reads back; memory it has not plugged
//! it never writes.
//!
//! Once a change settles it checks what the device says: `plugged_size`, STATE of the plugged
//! blocks (PLUGGED), of the unplugged ones (UNPLUGGED) and across the boundary (MIXED), and a
//! PLUG of one block beyond the requested size (NACK); and that the plugged memory still holds
//! its pattern. At the start, memory a previous boot left plugged goes first (UNPLUG_ALL, as
//! Linux does).

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};

use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess, DeviceFunction};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::bootinfo::BootInfo;
use crate::rawq::{r16, w16, w32, Layout, VERSION_1};
use crate::virtio::{dma_pages, ecam, find, root, transport, GuestHal};
use crate::{fail, parse_u64, pass, println, smp, svc};

/// The vector configuration changes (a new requested size) are sent on.
const CONFIG_VECTOR: u32 = svc::IRQ_VECTOR + 3;
const PAGE: u64 = 4096;
/// Bytes plugged or unplugged per request (at least one block).
const REQ_BYTES: u64 = 4 << 20;
const QSIZE: usize = 8;
const NO_VECTOR: u16 = 0xffff;
/// VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: taken when offered (the guest never touches unplugged
/// memory anyway).
const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// The response lies this far into the request page.
const RESP_OFF: u64 = 64;
const REQ_SIZE: usize = 24;
const RESP_SIZE: usize = 10;

/// The device configuration (5.15.4).
#[derive(Clone, Copy, Debug)]
struct Config {
    block: u64,
    addr: u64,
    region: u64,
    usable: u64,
    plugged: u64,
    requested: u64,
}

/// The 8-byte word at guest physical `a` of a block plugged by request `epoch`.
fn pattern(a: u64, epoch: u32) -> u64 {
    a.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (u64::from(epoch) << 40) ^ 0x7669_7274
}

struct Mem {
    t: PciTransport,
    q: VirtQueue<GuestHal, QSIZE>,
    /// DMA page: the request at 0, the response at `RESP_OFF`.
    buf: u64,
    cfg: Config,
    /// Blocks the guest may plug (`usable_region_size`).
    blocks: u64,
    /// The first `n` blocks are plugged.
    n: u64,
    /// The request that plugged each plugged block (its pattern's seed).
    epoch: Vec<u32>,
    requests: u32,
    /// Checks that failed since the last settled line.
    bad: u64,
    /// Whether configuration changes interrupt (on `CONFIG_VECTOR`).
    irq: bool,
}

/// What a request got back: the response type and the state (for STATE).
type Resp = (u16, u16);

impl Mem {
    fn read_config(&self) -> Config {
        let t = &self.t;
        let r64 = |off: usize| -> u64 {
            let lo: u32 = t.read_config_space(off).unwrap_or(0);
            let hi: u32 = t.read_config_space(off + 4).unwrap_or(0);
            u64::from(lo) | u64::from(hi) << 32
        };
        t.read_consistent(|| {
            Ok(Config {
                block: r64(0),
                addr: r64(16),
                region: r64(24),
                usable: r64(32),
                plugged: r64(40),
                requested: r64(48),
            })
        })
        .unwrap_or(self.cfg)
    }

    fn block_addr(&self, b: u64) -> u64 {
        self.cfg.addr + b * self.cfg.block
    }

    /// Sends one request and waits (5 s at most) for the device's response.
    fn request(&mut self, kind: u16, addr: u64, nb: u64) -> Result<Resp, String> {
        let nb = u16::try_from(nb).map_err(|_| alloc::format!("{nb} blocks in one request"))?;
        let mut req = [0u8; REQ_SIZE];
        req[0..2].copy_from_slice(&kind.to_le_bytes());
        req[8..16].copy_from_slice(&addr.to_le_bytes());
        req[16..18].copy_from_slice(&nb.to_le_bytes());
        // SAFETY: the request page is our DMA memory; nothing else uses it.
        let (out, inp) = unsafe {
            let out = core::slice::from_raw_parts_mut(self.buf as *mut u8, REQ_SIZE);
            out.copy_from_slice(&req);
            let inp = core::slice::from_raw_parts_mut((self.buf + RESP_OFF) as *mut u8, RESP_SIZE);
            inp.fill(0xff);
            (out, inp)
        };
        // SAFETY: both buffers stay valid and untouched until `pop_used` below.
        let token =
            unsafe { self.q.add(&[out], &mut [inp]) }.map_err(|e| alloc::format!("add: {e}"))?;
        if self.q.should_notify() {
            self.t.notify(0);
        }
        let deadline = svc::rdtsc() + 5_000_000 * smp::TSC_PER_US;
        while !self.q.can_pop() {
            if svc::rdtsc() > deadline {
                return Err(alloc::format!(
                    "request {kind} for {nb} blocks at {addr:#x}: no response after 5 s"
                ));
            }
            core::hint::spin_loop();
        }
        // SAFETY: the buffers added with `token`.
        let len = unsafe { self.q.pop_used(token, &[out], &mut [inp]) }
            .map_err(|e| alloc::format!("pop: {e}"))?;
        if (len as usize) < RESP_SIZE {
            return Err(alloc::format!(
                "request {kind} at {addr:#x}: a response of {len} bytes"
            ));
        }
        self.requests += 1;
        Ok((
            u16::from_le_bytes([inp[0], inp[1]]),
            u16::from_le_bytes([inp[8], inp[9]]),
        ))
    }

    /// Fills blocks `[first, first + nb)`, just plugged by request `epoch`, and reads them back.
    fn fill_and_check(&mut self, first: u64, nb: u64, epoch: u32) {
        let (start, end) = (self.block_addr(first), self.block_addr(first + nb));
        for b in first..first + nb {
            self.epoch[b as usize] = epoch;
        }
        for w in (start..end).step_by(8) {
            // SAFETY: plugged memory of the region, mapped by `map_ram`; only this driver uses it.
            unsafe { write_volatile(w as *mut u64, pattern(w, epoch)) };
        }
        for w in (start..end).step_by(8) {
            // SAFETY: as above.
            let v = unsafe { read_volatile(w as *const u64) };
            if v != pattern(w, epoch) {
                self.bad += 1;
                fail(
                    "virtiomem-memory",
                    format_args!(
                        "{w:#x} reads {v:#x} after writing {:#x} (plugged {start:#x}..{end:#x})",
                        pattern(w, epoch)
                    ),
                );
                return;
            }
        }
    }

    /// Three words of every plugged page still hold their pattern.
    fn check_plugged(&mut self) {
        for b in 0..self.n {
            let epoch = self.epoch[b as usize];
            let start = self.block_addr(b);
            for p in (start..start + self.cfg.block).step_by(PAGE as usize) {
                for w in [p, p + PAGE / 2, p + PAGE - 8] {
                    // SAFETY: as in `fill_and_check`.
                    let v = unsafe { read_volatile(w as *const u64) };
                    if v != pattern(w, epoch) {
                        self.bad += 1;
                        fail(
                            "virtiomem-memory",
                            format_args!(
                                "plugged {w:#x} holds {v:#x}, not {:#x}",
                                pattern(w, epoch)
                            ),
                        );
                        return;
                    }
                }
            }
        }
    }

    /// Plugs the next blocks (at most `REQ_BYTES`, at most up to `want` blocks). Returns false
    /// when the device refused (NACK: the requested size fell meanwhile).
    fn plug(&mut self, want: u64) -> Result<bool, String> {
        let nb = (want - self.n).min(self.per_request());
        let (kind, _) = self.request(REQ_PLUG, self.block_addr(self.n), nb)?;
        match kind {
            RESP_ACK => {
                let epoch = self.requests;
                self.fill_and_check(self.n, nb, epoch);
                self.n += nb;
                Ok(true)
            }
            RESP_NACK => {
                // Only a requested size that fell meanwhile explains it.
                self.cfg = self.read_config();
                if (self.n + nb) * self.cfg.block <= self.cfg.requested {
                    return Err(alloc::format!(
                        "PLUG of {nb} blocks at {:#x} within the requested size {:#x}: NACK",
                        self.block_addr(self.n),
                        self.cfg.requested
                    ));
                }
                Ok(false)
            }
            k => Err(alloc::format!(
                "PLUG of {nb} blocks at {:#x}: response {k}",
                self.block_addr(self.n)
            )),
        }
    }

    /// Unplugs the highest plugged blocks (at most `REQ_BYTES`, down to `want` blocks).
    fn unplug(&mut self, want: u64) -> Result<(), String> {
        let nb = (self.n - want).min(self.per_request());
        let first = self.n - nb;
        match self.request(REQ_UNPLUG, self.block_addr(first), nb)? {
            (RESP_ACK, _) => {
                self.n = first;
                Ok(())
            }
            (k, _) => Err(alloc::format!(
                "UNPLUG of {nb} blocks at {:#x}: response {k}",
                self.block_addr(first)
            )),
        }
    }

    fn per_request(&self) -> u64 {
        (REQ_BYTES / self.cfg.block).clamp(1, u64::from(u16::MAX))
    }

    /// STATE of `[first, first + nb)` (in requests of at most 65535 blocks) must be `want`.
    fn expect_state(&mut self, first: u64, nb: u64, want: u16) -> Result<bool, String> {
        let mut b = first;
        while b < first + nb {
            let k = (first + nb - b).min(u64::from(u16::MAX));
            let (kind, state) = self.request(REQ_STATE, self.block_addr(b), k)?;
            if kind != RESP_ACK || state != want {
                self.bad += 1;
                fail(
                    "virtiomem-state",
                    format_args!(
                        "STATE of {k} blocks at {:#x} ({} plugged): response {kind} state \
                         {state}, expected state {want}",
                        self.block_addr(b),
                        self.n
                    ),
                );
                return Ok(false);
            }
            b += k;
        }
        Ok(true)
    }

    /// The checks once `n` matches the requested size. Returns false when a PLUG beyond the
    /// requested size was taken because the requested size grew meanwhile (not settled yet).
    fn settle_checks(&mut self, nack_shown: &mut bool) -> Result<bool, String> {
        let mut ok = true;
        if self.n > 0 {
            ok &= self.expect_state(0, self.n, STATE_PLUGGED)?;
        }
        if self.n < self.blocks {
            ok &= self.expect_state(self.n, self.blocks - self.n, STATE_UNPLUGGED)?;
        }
        if self.n > 0 && self.n < self.blocks {
            ok &= self.expect_state(self.n - 1, 2, STATE_MIXED)?;
        }
        if ok {
            println!(
                "INFO virtiomem state ok blocks={} plugged={}",
                self.blocks, self.n
            );
        }
        if self.n < self.blocks {
            let at = self.block_addr(self.n);
            match self.request(REQ_PLUG, at, 1)? {
                (RESP_NACK, _) => {
                    if !*nack_shown {
                        println!("INFO virtiomem nack ok");
                        *nack_shown = true;
                    }
                }
                (RESP_ACK, _) => {
                    // Fine only if the host asked for more meanwhile: then it is plugged.
                    let epoch = self.requests;
                    self.fill_and_check(self.n, 1, epoch);
                    self.n += 1;
                    self.cfg = self.read_config();
                    if self.n * self.cfg.block > self.cfg.requested {
                        self.bad += 1;
                        fail(
                            "virtiomem-nack",
                            format_args!(
                                "PLUG at {at:#x} beyond the requested size {:#x} was acknowledged",
                                self.cfg.requested
                            ),
                        );
                    }
                    return Ok(false);
                }
                (k, _) => {
                    self.bad += 1;
                    fail(
                        "virtiomem-nack",
                        format_args!("PLUG at {at:#x} beyond the requested size: response {k}"),
                    );
                }
            }
        }
        self.check_plugged();
        let plugged = self.read_config().plugged;
        if plugged != self.n * self.cfg.block {
            self.bad += 1;
            fail(
                "virtiomem-plugged-size",
                format_args!(
                    "plugged_size {plugged:#x}, but {} blocks are plugged",
                    self.n
                ),
            );
        }
        Ok(true)
    }
}

/// Sets up MSI-X entry 0 for configuration changes (the queue: no vector) and enables MSI-X.
/// Returns whether the device took the vector.
fn config_interrupt(df: DeviceFunction, l: &Layout) -> bool {
    let Some(cap) = root()
        .capabilities(df)
        .find(|c| c.id == 0x11)
        .map(|c| c.offset)
    else {
        return false;
    };
    let mut cam = ecam();
    let table = l.bar + u64::from(cam.read_word(df, cap + 4) & !7);
    let apic = svc::lapic_enable();
    w32(table, 0xfee0_0000 | apic << 12);
    w32(table + 4, 0);
    w32(table + 8, CONFIG_VECTOR);
    w32(table + 12, 0);
    w16(l.common + 0x16, 0);
    w16(l.common + 0x1a, NO_VECTOR);
    w16(l.common + 0x10, 0);
    cam.write_word(df, cap, 0x8000 << 16);
    r16(l.common + 0x10) == 0
}

/// Brings the device up: VERSION_1 (and UNPLUGGED_INACCESSIBLE when offered), its queue, the
/// configuration interrupt.
fn start(df: DeviceFunction) -> Result<Mem, String> {
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let l = Layout::find(df).ok_or("no virtio structures")?;
    let mut t = transport(df).ok_or("no PCI transport")?;
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = t.read_device_features();
    if offered & VERSION_1 == 0 {
        return Err(alloc::format!("VERSION_1 not offered ({offered:#x})"));
    }
    let features = offered & (VERSION_1 | F_UNPLUGGED_INACCESSIBLE);
    t.write_driver_features(features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
        return Err("FEATURES_OK refused".into());
    }
    let q = VirtQueue::new(&mut t, 0, false, false).map_err(|e| alloc::format!("queue: {e}"))?;
    let irq = config_interrupt(df, &l);
    t.finish_init();
    println!("INFO virtiomem {df} offered={offered:#x} negotiated={features:#x} config_irq={irq}");
    let zero = Config {
        block: 0,
        addr: 0,
        region: 0,
        usable: 0,
        plugged: 0,
        requested: 0,
    };
    let mut m = Mem {
        t,
        q,
        buf: dma_pages(1),
        cfg: zero,
        blocks: 0,
        n: 0,
        epoch: Vec::new(),
        requests: 0,
        bad: 0,
        irq,
    };
    m.cfg = m.read_config();
    let c = m.cfg;
    if !c.block.is_power_of_two() || c.block < PAGE || !c.addr.is_multiple_of(c.block) {
        return Err(alloc::format!(
            "block size {:#x}, region at {:#x}",
            c.block,
            c.addr
        ));
    }
    if !c.region.is_multiple_of(c.block) || c.usable > c.region {
        return Err(alloc::format!(
            "region {:#x}, usable {:#x}, block {:#x}",
            c.region,
            c.usable,
            c.block
        ));
    }
    m.blocks = c.usable / c.block;
    m.epoch = vec![0; m.blocks as usize];
    Ok(m)
}

/// Brings the driver up (again after `restart_at`): the configuration, the region mapped, and
/// memory left plugged (by an earlier boot or driver) unplugged with UNPLUG_ALL.
fn bring_up(df: DeviceFunction) -> Option<Mem> {
    let mut m = match start(df) {
        Ok(m) => m,
        Err(e) => {
            fail("virtiomem-init", format_args!("{e}"));
            return None;
        }
    };
    let c = m.cfg;
    println!(
        "INFO virtiomem addr={:#x} region={:#x} usable={:#x} block={:#x} requested={:#x} \
         plugged={:#x}",
        c.addr, c.region, c.usable, c.block, c.requested, c.plugged
    );
    if let Err(e) = crate::paging::map_ram(c.addr, c.region) {
        fail(
            "virtiomem-map",
            format_args!("{:#x}+{:#x}: {e:?}", c.addr, c.region),
        );
        return None;
    }
    if c.plugged > 0 {
        match m.request(REQ_UNPLUG_ALL, 0, 0) {
            Ok((RESP_ACK, _)) => {
                let after = m.read_config().plugged;
                println!(
                    "INFO virtiomem unplug-all plugged={:#x} after={after:#x}",
                    c.plugged
                );
                if after != 0 {
                    fail(
                        "virtiomem-unplug-all",
                        format_args!("plugged_size {after:#x} after UNPLUG_ALL"),
                    );
                }
            }
            Ok((k, _)) => fail("virtiomem-unplug-all", format_args!("response {k}")),
            Err(e) => {
                fail("virtiomem-unplug-all", format_args!("{e}"));
                return None;
            }
        }
    }
    Some(m)
}

/// Follows the requested size for ever; returns (for a restart) once `restart_at` bytes are
/// plugged and settled, or when a request fails (None).
fn follow(m: &mut Mem, restart_at: Option<u64>) -> Option<()> {
    let mut seen = svc::irq_count(CONFIG_VECTOR);
    let mut shown: Option<(u64, u64)> = None;
    let mut nack_shown = false;
    let mut shown_irqs = seen;
    loop {
        m.cfg = m.read_config();
        let requested = m.cfg.requested;
        let want = (requested / m.cfg.block).min(m.blocks);
        let step = if m.n < want {
            m.plug(want).map(|_| false)
        } else if m.n > want {
            m.unplug(want).map(|_| false)
        } else if shown != Some((m.n, requested)) {
            m.settle_checks(&mut nack_shown)
        } else {
            Ok(true)
        };
        match step {
            Err(e) => {
                fail("virtiomem-queue", format_args!("{e}"));
                return None;
            }
            Ok(false) => continue,
            Ok(true) => {}
        }
        let changed = shown != Some((m.n, requested));
        // Also when only an interrupt came (on a loaded host it may come after the guest
        // found the new size by polling and reached it).
        let irqs = svc::irq_count(CONFIG_VECTOR);
        if changed || irqs != shown_irqs {
            println!("INFO virtiomem config_irqs={irqs}");
            shown_irqs = irqs;
        }
        if changed {
            let plugged = m.n * m.cfg.block;
            println!(
                "VIRTIOMEM plugged={plugged} requested={requested} {}",
                if m.bad == 0 { "ok" } else { "bad" }
            );
            m.bad = 0;
            shown = Some((m.n, requested));
            if restart_at == Some(plugged) {
                return Some(());
            }
        }
        // A new requested size interrupts (and is polled for every 20 ms anyway).
        seen = if m.irq {
            svc::wait_vector(CONFIG_VECTOR, seen + 1, 20)
        } else {
            smp::delay_us(20_000);
            seen
        };
    }
}

/// `test=virtiomem`: see the module's documentation and docs/test-guest.md. With
/// `virtiomem_restart=<MiB>`, the first time that much is plugged the driver resets the device
/// and starts again (as a new driver would after kexec): the device keeps its blocks across the
/// reset, so the new driver unplugs them all first, then plugs the requested size anew.
pub fn scenario_virtiomem(boot: &BootInfo) {
    let Some(&df) = find(DeviceType::Memory).first() else {
        fail("virtiomem-present", format_args!("no virtio-mem function"));
        return;
    };
    let mut restart_at = boot
        .arg("virtiomem_restart")
        .and_then(parse_u64)
        .map(|mib| mib << 20);
    let Some(mut m) = bring_up(df) else {
        return;
    };
    pass("virtiomem-init");
    println!("READY");
    while follow(&mut m, restart_at.take()).is_some() {
        println!("VIRTIOMEM restart");
        // Dropping the transport resets the device.
        drop(m);
        let Some(again) = bring_up(df) else {
            return;
        };
        m = again;
    }
}
