//! virtio-net over a TAP device: `pairs` receive/transmit queue pairs (VIRTIO_NET_F_MQ), one
//! TAP queue fd and one worker thread per pair, and a control queue (VIRTIO_NET_F_CTRL_VQ) for
//! VQ_PAIRS_SET and GUEST_OFFLOADS_SET. The 12-byte `virtio_net_hdr_v1` passes through
//! unchanged (the TAP speaks the same header), so checksum and segmentation offloads only need
//! negotiating: what the guest accepts to receive is mirrored on the TAP (TUNSETOFFLOAD).
//! Frames go straight between guest buffers and the TAP with readv/writev; with
//! VIRTIO_NET_F_MRG_RXBUF a received frame may span several receive buffers.
//!
//! Queue layout (virtio 1.2, 5.1.2): receiveq `2p`, transmitq `2p + 1` for pair `p`, then the
//! control queue at `2 * pairs`.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use log::{debug, warn};
use net_util::{MacAddr, Offloads, Tap, VNET_HDR_LEN};
use virtio_queue::desc::split::Descriptor;

use crate::net_ctrl::{CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET};
pub use crate::net_state::NetState;
use crate::rate_limiter::{LimiterConfig, RateLimiter};
use crate::vring::VirtQueue;
use crate::worker::{process_chains_limited, queue_bit, QueueHandler, Served, WorkerHandle};
use crate::{
    read_config_bytes, ActivateContext, ActivateError, Counters, GuestView, VirtioDevice,
    VirtioDeviceState, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET, VIRTIO_DEVICE_STATE_VERSION,
};

use virtio_bindings::virtio_net as vn;

const fn bit(b: u32) -> u64 {
    1 << b
}
const F_CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
const F_GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
const F_CTRL_GUEST_OFFLOADS: u64 = bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS);
const F_MTU: u64 = bit(vn::VIRTIO_NET_F_MTU);
const F_MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
const F_GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
const F_GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
const F_GUEST_ECN: u64 = bit(vn::VIRTIO_NET_F_GUEST_ECN);
const F_GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
const F_HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
const F_HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
const F_HOST_UFO: u64 = bit(vn::VIRTIO_NET_F_HOST_UFO);
const F_MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
const F_STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
const F_CTRL_VQ: u64 = bit(vn::VIRTIO_NET_F_CTRL_VQ);
const F_MQ: u64 = bit(vn::VIRTIO_NET_F_MQ);
/// The receive offloads the driver may switch with GUEST_OFFLOADS_SET.
const GUEST_OFFLOADS: u64 = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO;
const CTRL_GUEST_OFFLOADS: u8 = vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
const CTRL_GUEST_OFFLOADS_SET: u8 = vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8;

/// Most queue pairs one device may have (the transport has 64 queues, one is control).
pub const MAX_QUEUE_PAIRS: usize = 31;
/// Largest frame with its header (a 64 KiB GSO frame plus its Ethernet header).
const MAX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Frames moved per wake-up of one direction before the other gets a turn.
const BATCH: u32 = 64;
/// Frames after which a batch is signalled to the driver part-way, so it can refill (receive)
/// or reuse (transmit) buffers while the device goes on.
const EARLY_SIGNAL: u32 = 16;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFF: usize = 10;

const RX_BYTES: usize = 0;
const RX_FRAMES: usize = 1;
const TX_BYTES: usize = 2;
const TX_FRAMES: usize = 3;
const COUNTER_NAMES: &[&str] = &["rx_bytes", "rx_frames", "tx_bytes", "tx_frames"];

/// Which offloads `--net offload_*=` allows the device to offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOffloads {
    pub csum: bool,
    pub tso: bool,
    pub ufo: bool,
}

impl Default for NetOffloads {
    fn default() -> Self {
        NetOffloads {
            csum: true,
            tso: true,
            ufo: true,
        }
    }
}

/// The device's settings besides its TAP queues.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub mac: MacAddr,
    pub mtu: u16,
    pub queue_size: u16,
    pub offloads: NetOffloads,
}

/// The TAP's receive offloads for the driver's accepted GUEST_* bits.
fn tap_offloads(guest: u64) -> Offloads {
    Offloads {
        csum: guest & F_GUEST_CSUM != 0,
        tso4: guest & F_GUEST_TSO4 != 0,
        tso6: guest & F_GUEST_TSO6 != 0,
        tso_ecn: guest & F_GUEST_ECN != 0,
        ufo: guest & F_GUEST_UFO != 0,
    }
}

/// State every pair's worker shares.
struct Shared {
    taps: Vec<Tap>,
    counters: Arc<Counters>,
    /// Receive offloads in force (GUEST_* bits), for the receive buffer size.
    guest_offloads: AtomicU64,
    /// Queue pairs in use (VQ_PAIRS_SET; all of them before negotiation).
    active_pairs: AtomicUsize,
    /// Whether each TAP queue is attached (the kernel refuses to attach an attached queue or
    /// detach a detached one); held while a control command runs.
    attached: Mutex<Vec<bool>>,
}

impl Shared {
    /// Attaches the TAP queues of the first `pairs` pairs and detaches the rest, so the kernel
    /// steers frames only to queues the driver uses.
    fn set_active_pairs(&self, pairs: usize) -> bool {
        self.active_pairs.store(pairs, Ordering::Relaxed);
        if self.taps.len() < 2 {
            return true;
        }
        let mut attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let mut ok = true;
        // Attach first, then detach: the TAP always has a queue attached.
        for want in [true, false] {
            for (i, (t, a)) in self.taps.iter().zip(attached.iter_mut()).enumerate() {
                if (i < pairs) == want && *a != want {
                    match t.set_queue_attached(want) {
                        Ok(()) => *a = want,
                        Err(e) => {
                            warn!("virtio-net: {e}");
                            ok = false;
                        }
                    }
                }
            }
        }
        ok
    }

    fn set_guest_offloads(&self, guest: u64) -> bool {
        self.guest_offloads.store(guest, Ordering::Relaxed);
        match self
            .taps
            .first()
            .map(|t| t.set_offloads(tap_offloads(guest)))
        {
            Some(Err(e)) => {
                warn!("virtio-net: {e}");
                false
            }
            _ => true,
        }
    }
}

/// One receive buffer chain taken for the frame being received.
struct RxChain {
    head: u16,
    room: usize,
}

enum Taken {
    Empty,
    /// An unusable chain (readable or unmapped buffers), with its head.
    Bad(u16),
    Good(RxChain),
}

struct NetHandler {
    shared: Arc<Shared>,
    pair: usize,
    pairs: usize,
    acked: u64,
    mtu: u16,
    /// No receive buffer: stop watching the TAP until the driver adds some.
    paused: bool,
    iovecs: Vec<libc::iovec>,
    /// A transmit chain's descriptors (reused: no allocation per frame).
    descs: Vec<Descriptor>,
    chains: Vec<RxChain>,
    tx_dropped: u64,
    /// The TAP failed a read with something other than "nothing to read" (its interface was
    /// deleted: EBADFD): it is no longer watched, receiving stops for good.
    tap_failed: bool,
    /// A transmit error other than a full TAP queue was logged (once).
    tx_error_logged: bool,
    /// For signalling part of a long batch early.
    interrupt: Option<Arc<dyn crate::VirtioInterrupt>>,
    /// Each direction's limiter (the same configuration, separate buckets): a frame takes one
    /// op and its bytes with the virtio-net header. Transmit waits for the budget; receive
    /// reads a frame, charges it and, with the budget gone, stops reading the TAP until the
    /// timer fires.
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

// SAFETY: the iovecs point into guest memory and only live during one call on the worker.
unsafe impl Send for NetHandler {}

impl NetHandler {
    fn new(shared: Arc<Shared>, pair: usize, pairs: usize, acked: u64, mtu: u16) -> Self {
        NetHandler {
            shared,
            pair,
            pairs,
            acked,
            mtu,
            paused: false,
            iovecs: Vec::new(),
            descs: Vec::new(),
            chains: Vec::new(),
            tx_dropped: 0,
            tap_failed: false,
            tx_error_logged: false,
            interrupt: None,
            rx_limiter: None,
            tx_limiter: None,
        }
    }

    fn rx_blocked(&self) -> bool {
        self.rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
    }

    fn rx_index(&self) -> usize {
        2 * self.pair
    }

    fn tx_index(&self) -> usize {
        2 * self.pair + 1
    }

    fn ctrl_index(&self) -> usize {
        2 * self.pairs
    }

    fn tap(&self) -> &Tap {
        &self.shared.taps[self.pair]
    }

    fn transmit(&mut self, q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<u64, String> {
        let index = self.tx_index();
        let shared = &self.shared;
        let tap = &shared.taps[self.pair];
        let (iovecs, dropped) = (&mut self.iovecs, &mut self.tx_dropped);
        let tx_error_logged = &mut self.tx_error_logged;
        let limiter = &mut self.tx_limiter;
        let early = self.interrupt.as_deref().map(|i| (i, EARLY_SIGNAL));
        // Counted here and published once per batch: no atomic per frame.
        let (mut bytes, mut frames) = (0u64, 0u64);
        let mut view = GuestView::new(mem);
        let r = process_chains_limited(index, q, early, |_, descs| {
            iovecs.clear();
            let mut total = 0usize;
            for d in descs {
                if d.is_write_only() {
                    debug!("virtio-net: writable descriptor on a transmit queue; dropped");
                    *dropped += 1;
                    return Served::Used(0);
                }
                total += d.len() as usize;
                match view.iovec(d.addr(), d.len()) {
                    Some(v) if total <= MAX_FRAME => iovecs.push(v),
                    _ => {
                        debug!("virtio-net: bad transmit buffer; dropped");
                        *dropped += 1;
                        return Served::Used(0);
                    }
                }
            }
            if total <= VNET_HDR_LEN {
                *dropped += 1;
                return Served::Used(0);
            }
            if let Some(l) = limiter.as_mut() {
                if !l.consume(total as u64, 1) {
                    return Served::NotNow;
                }
            }
            // SAFETY: each iovec lies inside one mapped region of guest memory (`guest_iovec`),
            // which stays mapped while the worker holds `mem`.
            match unsafe { tap.writev(iovecs) } {
                Ok(_) => {
                    bytes += (total - VNET_HDR_LEN) as u64;
                    frames += 1;
                }
                Err(e) => {
                    // A full TAP queue (or a header the TAP refuses) drops the frame, as a
                    // busy wire would; so does a TAP whose interface is gone (EBADFD, EIO),
                    // as an unplugged cable would: said once.
                    let full = matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS));
                    if !full && !*tx_error_logged {
                        *tx_error_logged = true;
                        warn!("virtio-net: TAP write failed ({e}); frames are dropped");
                    } else {
                        debug!("virtio-net: TAP write: {e}");
                    }
                    *dropped += 1;
                }
            }
            Served::Used(0)
        });
        if frames > 0 {
            shared.counters.add(TX_BYTES, bytes);
            shared.counters.add(TX_FRAMES, frames);
        }
        r
    }

    /// Room a receive needs before it reads the TAP with merged buffers: a whole frame of the
    /// largest size the TAP may hand over with the offloads in force.
    fn rx_need(&self) -> usize {
        let gso = F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_UFO;
        if self.shared.guest_offloads.load(Ordering::Relaxed) & gso != 0 {
            MAX_FRAME
        } else {
            // MTU-sized payload, Ethernet and VLAN headers; the config MTU is at most 65535.
            VNET_HDR_LEN + usize::from(self.mtu) + 18
        }
    }

    /// Takes the next receive chain's writable buffers into `iovecs`.
    fn take_rx_chain(&mut self, q: &mut VirtQueue, view: &mut GuestView) -> Result<Taken, String> {
        let Some(head) = q.pop_one()? else {
            return Ok(Taken::Empty);
        };
        let mut descs = std::mem::take(&mut self.descs);
        q.chain(head, &mut descs);
        let mark = self.iovecs.len();
        let mut room = 0usize;
        let mut ok = true;
        for d in descs.iter() {
            match view.iovec(d.addr(), d.len()) {
                Some(mut v) if d.is_write_only() => {
                    // Room past the largest frame is never written: leave it out.
                    v.iov_len = v.iov_len.min(MAX_FRAME - room);
                    if v.iov_len > 0 {
                        room += v.iov_len;
                        self.iovecs.push(v);
                    }
                }
                _ => ok = false,
            }
        }
        self.descs = descs;
        if !ok || room == 0 {
            self.iovecs.truncate(mark);
            return Ok(Taken::Bad(head));
        }
        Ok(Taken::Good(RxChain { head, room }))
    }

    /// Writes `bytes` at byte `offset` of the frame being received (across its buffers).
    fn write_frame_bytes(&self, mut offset: usize, bytes: &[u8]) {
        let mut rest = bytes;
        for v in &self.iovecs {
            if rest.is_empty() {
                break;
            }
            if offset >= v.iov_len {
                offset -= v.iov_len;
                continue;
            }
            let n = rest.len().min(v.iov_len - offset);
            for (i, &b) in rest[..n].iter().enumerate() {
                // SAFETY: offset + i < iov_len: inside the receive buffer, which lies in a
                // mapped guest memory region (`GuestView::iovec`) while the worker holds the
                // memory; volatile, as the guest shares it.
                unsafe { std::ptr::write_volatile(v.iov_base.cast::<u8>().add(offset + i), b) };
            }
            rest = &rest[n..];
            offset = 0;
        }
    }

    /// Moves frames from the TAP into receive buffers. Returns the used mask.
    fn receive(&mut self, q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<u64, String> {
        if self.tap_failed {
            return Ok(0);
        }
        // Counted per frame, published once per call (also after an error): no atomic per
        // frame.
        let mut count = (0u64, 0u64);
        let r = self.receive_batch(q, mem, &mut count);
        if count.1 > 0 {
            let c = &self.shared.counters;
            c.add(RX_BYTES, count.0);
            c.add(RX_FRAMES, count.1);
        }
        r
    }

    /// `receive`, adding the bytes (without headers) and frames received to `count`.
    fn receive_batch(
        &mut self,
        q: &mut VirtQueue,
        mem: &GuestMemoryMmap,
        count: &mut (u64, u64),
    ) -> Result<u64, String> {
        let index = self.rx_index();
        let mergeable = self.acked & F_MRG_RXBUF != 0;
        let need = if mergeable { self.rx_need() } else { 0 };
        let mut used = 0;
        let mut frames = 0u32;
        let mut rechecks = 0;
        let mut view = GuestView::new(mem);
        while frames < BATCH && !self.rx_blocked() {
            self.iovecs.clear();
            self.chains.clear();
            let mut room = 0;
            let mut empty = false;
            // Without MRG_RXBUF one chain takes a frame; with it, chains until a frame fits.
            loop {
                match self.take_rx_chain(q, &mut view)? {
                    Taken::Empty => {
                        empty = true;
                        break;
                    }
                    Taken::Good(c) => {
                        room += c.room;
                        self.chains.push(c);
                        if !mergeable || room >= need {
                            break;
                        }
                    }
                    Taken::Bad(head) if self.chains.is_empty() => {
                        // Unusable on its own: hand it back empty.
                        debug!("virtio-net: unusable receive buffer");
                        q.add_used(head, 0)?;
                        used = queue_bit(index);
                        frames += 1;
                        break;
                    }
                    Taken::Bad(_) => {
                        // Ends this frame's chains; it is first in line next time.
                        q.unpop();
                        break;
                    }
                }
            }
            if self.chains.is_empty() {
                if empty {
                    // Sleep on the TAP no more until the driver adds buffers (and asks to be
                    // told about them: with EVENT_IDX this moves avail_event). A ring that
                    // claims more buffers but yields none is not re-read forever.
                    if rechecks < 2 && q.enable_notification()? {
                        rechecks += 1;
                        continue;
                    }
                    self.paused = true;
                    break;
                }
                continue;
            }
            if room < VNET_HDR_LEN {
                debug!("virtio-net: receive buffer shorter than the header");
                self.return_chains(q, 0)?;
                used = queue_bit(index);
                frames += 1;
                continue;
            }
            // SAFETY: the iovecs lie inside mapped guest memory (`GuestView`), which stays
            // mapped while the worker holds `mem`.
            match unsafe { self.tap().readv(&self.iovecs) } {
                Ok(n) => {
                    count.0 += n.saturating_sub(VNET_HDR_LEN) as u64;
                    count.1 += 1;
                    if let Some(l) = self.rx_limiter.as_mut() {
                        l.charge(n as u64, 1);
                    }
                    let r = self.return_chains(q, n);
                    // The frame and the header's num_buffers (inside its first n bytes) are in
                    // place.
                    view.written_iovecs(&self.iovecs, n);
                    r?;
                    used = queue_bit(index);
                    frames += 1;
                    if frames.is_multiple_of(EARLY_SIGNAL) {
                        if let Some(irq) = &self.interrupt {
                            if q.needs_notification() {
                                irq.signal_queue(index);
                            }
                        }
                    }
                }
                Err(e) => {
                    for _ in 0..self.chains.len() {
                        q.unpop();
                    }
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) {
                        // The TAP's interface was deleted (EBADFD) or it broke: epoll keeps
                        // reporting the descriptor (EPOLLERR), so watching it further would
                        // spin. Receiving stops for good; the guest's buffers stay posted,
                        // transmit drops its frames, the other devices go on.
                        warn!("virtio-net: TAP read failed ({e}); receiving stops");
                        self.tap_failed = true;
                    }
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Publishes the chains of a frame of `n` bytes: as many as it filled, `num_buffers` set
    /// in its header; the unfilled tail goes back to the ring.
    fn return_chains(&mut self, q: &mut VirtQueue, n: usize) -> Result<(), String> {
        // The common case: one chain whose first buffer holds the whole header.
        if let ([c], Some(v)) = (self.chains.as_slice(), self.iovecs.first()) {
            if n >= VNET_HDR_LEN && v.iov_len >= VNET_HDR_LEN {
                q.add_used(c.head, n.min(c.room) as u32)?;
                // SAFETY: bytes 10 and 11 of a buffer of at least 12 bytes inside mapped
                // guest memory (`GuestView::iovec`), kept mapped while the worker holds the
                // memory; volatile, as the guest shares it. num_buffers is 1.
                unsafe {
                    std::ptr::write_volatile(
                        v.iov_base
                            .cast::<u8>()
                            .add(NUM_BUFFERS_OFF)
                            .cast::<[u8; 2]>(),
                        1u16.to_le_bytes(),
                    )
                };
                return Ok(());
            }
        }
        let mut left = n;
        let mut count = 0usize;
        for (i, c) in self.chains.iter().enumerate() {
            if i > 0 && left == 0 {
                break;
            }
            let len = left.min(c.room);
            q.add_used(c.head, len as u32)?;
            left -= len;
            count += 1;
        }
        for _ in count..self.chains.len() {
            q.unpop();
        }
        if n >= VNET_HDR_LEN {
            let num = u16::try_from(count).unwrap_or(u16::MAX);
            self.write_frame_bytes(NUM_BUFFERS_OFF, &num.to_le_bytes());
        }
        Ok(())
    }

    /// Serves the control queue: VQ_PAIRS_SET and GUEST_OFFLOADS_SET, ERR for the rest.
    fn control(&mut self, q: &mut VirtQueue, mem: &GuestMemoryMmap) -> Result<u64, String> {
        let index = self.ctrl_index();
        let shared = self.shared.clone();
        let (pairs, acked) = (self.pairs, self.acked);
        crate::net_ctrl::serve(index, q, mem, |class, cmd, data| {
            execute_ctrl(&shared, pairs, acked, class, cmd, data)
        })
    }
}

/// Runs one control command; `true` for VIRTIO_NET_OK.
fn execute_ctrl(
    shared: &Shared,
    pairs: usize,
    acked: u64,
    class: u8,
    cmd: u8,
    data: &[u8],
) -> bool {
    match (class, cmd) {
        (CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET) if acked & F_MQ != 0 => {
            let Some(n) = crate::net_ctrl::pairs_set(data, pairs) else {
                return false;
            };
            debug!("virtio-net: {n} queue pairs in use");
            shared.set_active_pairs(n)
        }
        (CTRL_GUEST_OFFLOADS, CTRL_GUEST_OFFLOADS_SET) if acked & F_CTRL_GUEST_OFFLOADS != 0 => {
            let Ok(raw) = <[u8; 8]>::try_from(data) else {
                return false;
            };
            let want = u64::from_le_bytes(raw);
            // Only receive offloads the driver accepted at negotiation can be switched on.
            if want & !(acked & GUEST_OFFLOADS) != 0 {
                return false;
            }
            shared.set_guest_offloads(want)
        }
        _ => {
            debug!("virtio-net: unsupported control command {class}/{cmd}");
            false
        }
    }
}

/// The worker's seccomp filter (see `crate::worker_seccomp`).
pub(crate) static SECCOMP: crate::worker_seccomp::WorkerCalls =
    crate::worker_seccomp::WorkerCalls {
        kind: "virtio-net",
        calls: {
            use ::seccomp::Sysno::*;
            &[
                // Frames to and from the TAP.
                readv,
            ]
        },
        // The control queue: GUEST_OFFLOADS_SET changes the TAP's offloads (TUNSETOFFLOAD),
        // VQ_PAIRS_SET attaches and detaches queues of a multi-queue TAP (TUNSETQUEUE). Frames
        // need none (the TAP is non-blocking from its opening).
        ioctls: net_util::RUNNING_TAP_IOCTLS,
    };

impl QueueHandler for NetHandler {
    fn seccomp(&self) -> &'static crate::worker_seccomp::WorkerCalls {
        &SECCOMP
    }
    fn attach_interrupt(&mut self, interrupt: Arc<dyn crate::VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        if index == self.rx_index() {
            self.paused = false;
            self.receive(q, mem)
        } else if index == self.tx_index() {
            self.transmit(q, mem)
        } else if index == self.ctrl_index() {
            self.control(q, mem)
        } else {
            Ok(0)
        }
    }

    fn extra_fd(&self) -> Option<RawFd> {
        Some(self.tap().as_raw_fd())
    }

    fn extra_wanted(&self) -> bool {
        !self.paused && !self.rx_blocked() && !self.tap_failed
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        [&self.rx_limiter, &self.tx_limiter]
            .into_iter()
            .flatten()
            .map(|l| l.as_raw_fd())
            .collect()
    }

    fn process_timer(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let rx = index == 0 && self.rx_limiter.is_some();
        let (rx_q, tx_q) = (self.rx_index(), self.tx_index());
        let (limiter, q) = if rx {
            (&mut self.rx_limiter, rx_q)
        } else {
            (&mut self.tx_limiter, tx_q)
        };
        if let Some(l) = limiter.as_mut() {
            l.timer_fired();
        }
        match queues.get_mut(q) {
            Some(Some(vq)) if rx => self.receive(vq, mem),
            Some(Some(vq)) => self.transmit(vq, mem),
            _ => Ok(0),
        }
    }

    fn process_extra(
        &mut self,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        match queues.get_mut(self.rx_index()) {
            Some(Some(q)) => self.receive(q, mem),
            _ => {
                self.paused = true;
                Ok(0)
            }
        }
    }
}

pub struct Net {
    shared: Arc<Shared>,
    config: NetConfig,
    workers: Vec<WorkerHandle<NetHandler>>,
    /// A restored state, applied by the next start instead of the defaults.
    restored: Option<NetState>,
    /// Each pair's receive and transmit limiters are made from this when it starts.
    limiter: Option<LimiterConfig>,
    /// `config_generation`: moves on when a restore changed the MAC (see `net_state`).
    generation: u32,
    /// A restore changed the configuration: the next start raises the configuration interrupt.
    config_changed: bool,
}

impl Net {
    /// A device on the TAP queues `taps` (one per queue pair, already configured on the host
    /// side: `Tap::open(name, pairs)`).
    pub fn new(taps: Vec<Tap>, config: NetConfig) -> Result<Self, String> {
        if taps.is_empty() || taps.len() > MAX_QUEUE_PAIRS {
            return Err(format!("{} queue pairs (1-{MAX_QUEUE_PAIRS})", taps.len()));
        }
        let taps_len = taps.len();
        Ok(Net {
            shared: Arc::new(Shared {
                taps,
                counters: Counters::new(COUNTER_NAMES),
                guest_offloads: AtomicU64::new(0),
                active_pairs: AtomicUsize::new(taps_len),
                attached: Mutex::new(vec![true; taps_len]),
            }),
            config,
            workers: Vec::new(),
            restored: None,
            limiter: None,
            generation: 0,
            config_changed: false,
        })
    }

    /// Limits each queue pair's receive and transmit, separately, to `c` (from the next
    /// activation on).
    pub fn set_rate_limiter(&mut self, c: Option<LimiterConfig>) {
        self.limiter = c;
    }

    fn pairs(&self) -> usize {
        self.shared.taps.len()
    }

    fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            if let Some(h) = w.stop() {
                if h.tx_dropped > 0 {
                    debug!("virtio-net: {} transmit frames dropped", h.tx_dropped);
                }
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; 2 * self.pairs() + 1]
    }
    fn features(&self) -> u64 {
        let mut f =
            F_VERSION_1 | F_RING_INDIRECT_DESC | F_MAC | F_STATUS | F_MTU | F_MRG_RXBUF | F_CTRL_VQ;
        if self.pairs() > 1 {
            f |= F_MQ;
        }
        let o = self.config.offloads;
        if o.csum {
            f |= F_CSUM | F_GUEST_CSUM | F_CTRL_GUEST_OFFLOADS;
            if o.tso {
                f |= F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6;
            }
            if o.ufo {
                f |= F_HOST_UFO | F_GUEST_UFO;
            }
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac, status (LINK_UP), max_virtqueue_pairs, mtu
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.config.mac.bytes());
        c[6..8].copy_from_slice(&1u16.to_le_bytes());
        c[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn config_generation(&self) -> u32 {
        self.generation
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.stop_workers();
        let interrupt = ctx.interrupt.clone();
        let pairs = self.pairs();
        let acked = ctx.acked_features & self.features();
        // Receive offloads as accepted; one pair in use until the driver sets more (5.1.6.5.5).
        // A restored device goes on with what its driver had set (within what it accepted).
        let (offloads, active) = match self.restored.take() {
            Some(r) => (
                r.guest_offloads & acked & GUEST_OFFLOADS,
                if acked & F_MQ != 0 {
                    usize::from(r.active_pairs).clamp(1, pairs)
                } else {
                    1
                },
            ),
            None => (acked & GUEST_OFFLOADS, 1),
        };
        self.shared.set_guest_offloads(offloads);
        self.shared.set_active_pairs(active);
        let mut queues = ctx.queues;
        let n = queues.len();
        for p in 0..pairs {
            let mut mine: Vec<Option<_>> = (0..n).map(|_| None).collect();
            for i in [2 * p, 2 * p + 1] {
                if let (Some(slot), Some(q)) = (mine.get_mut(i), queues.get_mut(i)) {
                    *slot = q.take();
                }
            }
            if p == 0 {
                if let (Some(slot), Some(q)) = (mine.get_mut(2 * pairs), queues.get_mut(2 * pairs))
                {
                    *slot = q.take();
                }
            }
            if mine.iter().all(Option::is_none) {
                continue;
            }
            let mut handler =
                NetHandler::new(self.shared.clone(), p, pairs, acked, self.config.mtu);
            if let Some(c) = &self.limiter {
                handler.rx_limiter = RateLimiter::new(c).map_err(ActivateError::Thread)?;
                handler.tx_limiter = RateLimiter::new(c).map_err(ActivateError::Thread)?;
            }
            let sub = ActivateContext {
                mem: ctx.mem.clone(),
                interrupt: ctx.interrupt.clone(),
                queues: mine,
                acked_features: ctx.acked_features,
                status: ctx.status.clone(),
                dma: ctx.dma.clone(),
            };
            match WorkerHandle::spawn(&format!("virtio-net{p}"), handler, sub) {
                Ok(w) => self.workers.push(w),
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
        }
        if self.workers.is_empty() {
            return Err(ActivateError::NoQueues);
        }
        // Restored with another MAC: the running driver hears of it (as of a change by the
        // host), and may read the configuration again.
        if std::mem::take(&mut self.config_changed) {
            interrupt.signal_config();
        }
        Ok(())
    }
    fn counters(&self) -> Option<Arc<Counters>> {
        Some(self.shared.counters.clone())
    }
    fn reset(&mut self) {
        self.stop_workers();
        self.restored = None;
        self.config_changed = false;
        // Back to the state before negotiation: every queue attached, no receive offloads.
        self.shared.set_active_pairs(self.pairs());
        self.shared.set_guest_offloads(0);
    }
    fn queue_positions(&self) -> Option<Vec<Option<(u16, u16)>>> {
        // Each pair's worker runs its own queues (and the first the control queue).
        let mut all: Vec<Option<(u16, u16)>> = vec![None; 2 * self.pairs() + 1];
        for w in &self.workers {
            for (i, p) in w.queue_positions()?.into_iter().enumerate() {
                if let (Some(p), Some(slot)) = (p, all.get_mut(i)) {
                    *slot = Some(p);
                }
            }
        }
        Some(all)
    }
    fn pause(&mut self) -> Result<(), String> {
        let mut r = Ok(());
        for w in &mut self.workers {
            if let Err(e) = w.pause() {
                r = Err(e);
            }
        }
        r
    }
    fn resume(&mut self) -> Result<(), String> {
        let mut r = Ok(());
        for w in &mut self.workers {
            if let Err(e) = w.resume() {
                r = Err(e);
            }
        }
        r
    }
    fn device_state(&self) -> VirtioDeviceState {
        let (active_pairs, guest_offloads) = match &self.restored {
            Some(r) => (r.active_pairs, r.guest_offloads),
            None => (
                self.shared.active_pairs.load(Ordering::Relaxed) as u16,
                self.shared.guest_offloads.load(Ordering::Relaxed),
            ),
        };
        VirtioDeviceState::Net(NetState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            active_pairs,
            guest_offloads,
            mac: Some(self.config.mac.to_string()),
            config_generation: self.generation,
        })
    }
    fn set_device_state(&mut self, state: &VirtioDeviceState) -> Result<(), pci::StateError> {
        const WHAT: &str = "virtio-net";
        let VirtioDeviceState::Net(s) = state else {
            return Err(state.wrong(WHAT));
        };
        pci::StateError::check_version(WHAT, s.version, VIRTIO_DEVICE_STATE_VERSION)?;
        if s.active_pairs == 0 || usize::from(s.active_pairs) > self.pairs() {
            return Err(pci::StateError::invalid(
                WHAT,
                format!(
                    "{} active queue pairs, the device has {}",
                    s.active_pairs,
                    self.pairs()
                ),
            ));
        }
        let offered = self.features() & GUEST_OFFLOADS;
        if s.guest_offloads & !offered != 0 {
            return Err(pci::StateError::invalid(
                WHAT,
                format!(
                    "guest offloads {:#x} beyond those offered ({offered:#x})",
                    s.guest_offloads
                ),
            ));
        }
        let (generation, changed) = crate::net_state::restored_config(s, self.config.mac)
            .map_err(|e| pci::StateError::invalid(WHAT, e))?;
        self.generation = generation;
        self.config_changed = changed;
        self.restored = Some(s.clone());
        Ok(())
    }
}
