//! Device pause/resume and the devices' own state: a driver publishes requests, the device is
//! paused mid-stream, its state and the transport's are saved (JSON), restored into a fresh
//! device over a copy of guest memory, and every request is completed exactly once, in order,
//! with the right data; a paused device writes nothing to guest memory; pause/resume in a loop
//! with traffic loses and repeats nothing.

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::BusDevice;
use guest_memory::GuestMemoryMmap;
use pci::{PciDevice, StateError, VmInterface};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{S_OK, T_IN, T_OUT};
use crate::{
    Block, BlockConfig, Console, ConsoleSize, Rng, VirtioDevice, VirtioDeviceState,
    VirtioPciDevice, VirtioPciState, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_DEVICE_STATE_VERSION,
};

const MEM_SIZE: usize = 2 << 20;
const QSIZE: u16 = 64;
/// Descriptors per request slot: at most 16 requests outstanding per queue.
const SLOT_DESCS: u16 = 4;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const BAR: u64 = 0x1_0000_0000;
/// Data buffers: 4 KiB per request number (mod 256).
const DATA: u64 = 0x10_0000;

fn ring(q: usize) -> (u64, u64, u64) {
    let base = 0x1_0000 + 0x4000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}

fn data(k: u32) -> u64 {
    DATA + 0x1000 * u64::from(k % 256)
}

struct FakeVm(AtomicU32);

impl VmInterface for FakeVm {
    fn map_mmio(&self, _d: Arc<Mutex<dyn BusDevice>>, _b: u64, _l: u64) -> Result<(), String> {
        Ok(())
    }
    fn unmap_mmio(&self, _base: u64) {}
    fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> Result<(), String> {
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) {}
    fn allocate_gsi(&self) -> Result<u32, String> {
        Ok(24 + self.0.fetch_add(1, Ordering::SeqCst))
    }
    fn free_gsi(&self, _gsi: u32) {}
    fn set_msi_route(&self, _gsi: u32, _msi: Option<(u64, u32)>) -> Result<(), String> {
        Ok(())
    }
    fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> Result<(), String> {
        Ok(())
    }
    fn unregister_irqfd(&self, _fd: &EventFd, _gsi: u32) {}
}

/// A driver of one virtio-pci device: the queues in `queues` set up, requests published in
/// slots of `SLOT_DESCS` descriptors.
struct Drv {
    mem: GuestMemoryMmap,
    dev: VirtioPciDevice,
    /// Per queue: requests published.
    avail: Vec<u16>,
}

fn new_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn transport(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap) -> VirtioPciDevice {
    let vm = Arc::new(FakeVm(AtomicU32::new(0)));
    VirtioPciDevice::new("dev".into(), device, mem.clone(), vm, BAR).unwrap()
}

impl Drv {
    fn start(device: Box<dyn VirtioDevice>, queues: &[usize]) -> Drv {
        let mem = new_mem();
        let n = device.queue_max_sizes().len();
        let mut d = Drv {
            dev: transport(device, &mem),
            mem,
            avail: vec![0; n],
        };
        d.bar_write(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        for sel in 0..2u32 {
            d.bar_write(0x00, &sel.to_le_bytes());
            let offered = d.bar_read(0x04, 4) as u32;
            d.bar_write(0x08, &sel.to_le_bytes());
            // Everything offered but EVENT_IDX (bit 29): every used buffer interrupts.
            let want = if sel == 0 {
                offered & !(1 << 29)
            } else {
                offered
            };
            d.bar_write(0x0c, &want.to_le_bytes());
        }
        d.bar_write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        for &q in queues {
            let (desc, avail, used) = ring(q);
            d.bar_write(0x16, &(q as u16).to_le_bytes());
            d.bar_write(0x18, &QSIZE.to_le_bytes());
            d.bar_write(0x20, &desc.to_le_bytes());
            d.bar_write(0x28, &avail.to_le_bytes());
            d.bar_write(0x30, &used.to_le_bytes());
            d.bar_write(0x1c, &1u16.to_le_bytes());
        }
        d.bar_write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK],
        );
        assert_eq!(d.bar_read(0x14, 1), 0xf, "device status");
        d
    }

    fn bar_write(&mut self, off: u64, data: &[u8]) {
        self.dev.write_bar(0, off, data);
    }

    fn bar_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// Publishes a request of `bufs` (address, length, flags) on queue `q`; returns its number.
    fn post(&mut self, q: usize, bufs: &[(u64, u32, u16)]) -> u16 {
        assert!(bufs.len() <= SLOT_DESCS as usize);
        let (desc, avail, _) = ring(q);
        let k = self.avail[q];
        let head = (k % (QSIZE / SLOT_DESCS)) * SLOT_DESCS;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let id = head + i as u16;
            let last = i + 1 == bufs.len();
            let at = desc + 16 * u64::from(id);
            let m = &self.mem;
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(
                if last { flags } else { flags | NEXT },
                GuestAddress(at + 12),
            )
            .unwrap();
            m.write_obj(id + 1, GuestAddress(at + 14)).unwrap();
        }
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(k % QSIZE)))
            .unwrap();
        self.avail[q] = k.wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
        k
    }

    fn kick(&mut self, q: usize) {
        self.bar_write(0x3000 + 4 * q as u64, &(q as u16).to_le_bytes());
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    /// Used element `i` of queue `q`: (request number, length).
    fn used(&self, q: usize, i: u16) -> (u16, u32) {
        let at = ring(q).2 + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        ((id / u32::from(SLOT_DESCS)) as u16, len)
    }

    fn used_ring_bytes(&self, q: usize) -> Vec<u8> {
        let mut b = vec![0u8; 6 + 8 * QSIZE as usize];
        self.mem
            .read_slice(&mut b, GuestAddress(ring(q).2))
            .unwrap();
        b
    }

    /// Waits until at least `n` requests of `q` are used.
    fn wait_used(&self, q: usize, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        // At least `n` (the index wraps).
        while self.used_idx(q).wrapping_sub(n) >= 0x8000 {
            assert!(
                Instant::now() < deadline,
                "queue {q}: used index {} (want {n})",
                self.used_idx(q)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pauses the device and checks what it says of its queues: nothing in flight, the
    /// positions those guest memory shows.
    fn pause(&mut self, queues: &[usize]) {
        self.dev.pause().unwrap();
        self.dev.pause().unwrap();
        let s = self.dev.state();
        for &q in queues {
            let used = self.used_idx(q);
            assert_eq!(
                (s.queues[q].next_avail, s.queues[q].next_used),
                (used, used),
                "queue {q}: positions after the pause"
            );
        }
    }

    /// While paused: a request published and notified is not served, and nothing is written.
    fn check_paused(&mut self, q: usize, bufs: &[(u64, u32, u16)]) {
        let before = self.used_ring_bytes(q);
        let data_before: Vec<Vec<u8>> = bufs
            .iter()
            .map(|&(a, l, _)| {
                let mut v = vec![0u8; l as usize];
                self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
                v
            })
            .collect();
        self.post(q, bufs);
        self.kick(q);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            self.used_ring_bytes(q),
            before,
            "used ring moved while paused"
        );
        for (&(a, l, _), d) in bufs.iter().zip(&data_before) {
            let mut v = vec![0u8; l as usize];
            self.mem.read_slice(&mut v, GuestAddress(a)).unwrap();
            assert_eq!(&v, d, "buffer written while paused");
        }
    }

    /// The saved states, through JSON.
    fn save(&mut self) -> String {
        serde_json::to_string(&(self.dev.device_state(), self.dev.state())).unwrap()
    }

    /// A fresh `device` over a copy of this guest memory, restored from `json` as the VMM
    /// does it (the device's own state, then the transport's, which starts it; paused at once,
    /// as the VM comes up) and resumed as the VM's resume does.
    fn restore(&self, json: &str, device: Box<dyn VirtioDevice>) -> Drv {
        let (ds, ts): (VirtioDeviceState, VirtioPciState) = serde_json::from_str(json).unwrap();
        let mem = new_mem();
        let mut buf = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        mem.write_slice(&buf, GuestAddress(0)).unwrap();
        let mut dev = transport(device, &mem);
        dev.set_device_state(&ds).unwrap();
        dev.set_state(&ts).unwrap();
        dev.pause().unwrap();
        dev.resume().unwrap();
        Drv {
            mem,
            dev,
            avail: self.avail.clone(),
        }
    }
}

fn rng() -> Box<dyn VirtioDevice> {
    Box::new(Rng::new(std::fs::File::open("/dev/urandom").unwrap()))
}

/// One writable buffer of `len` bytes for request number `k`, filled with 0xee.
fn rng_buf(mem: &GuestMemoryMmap, k: u32, len: u32) -> [(u64, u32, u16); 1] {
    mem.write_slice(&vec![0xee; len as usize], GuestAddress(data(k)))
        .unwrap();
    [(data(k), len, WRITE)]
}

/// Each used element of `q` from `from` to `to` is request `i` with length `len(i)`.
fn check_used(d: &Drv, q: usize, from: u16, to: u16, len: impl Fn(u16) -> u32) {
    for i in from..to {
        assert_eq!(d.used(q, i), (i % 16, len(i)), "used element {i}");
    }
}

#[test]
fn rng_paused_saved_and_restored_mid_stream() {
    let mut a = Drv::start(rng(), &[0]);
    let len = |i: u16| 16 + u32::from(i);
    for k in 0..4 {
        let b = rng_buf(&a.mem, k, len(k as u16));
        a.post(0, &b);
    }
    a.kick(0);
    a.wait_used(0, 4);
    // Published, not notified: not taken.
    for k in 4..7 {
        let b = rng_buf(&a.mem, k, len(k as u16));
        a.post(0, &b);
    }
    a.pause(&[0]);
    let b = rng_buf(&a.mem, 7, len(7));
    a.check_paused(0, &b);
    let json = a.save();
    assert!(json.contains(r#""rng":{"version":1}"#), "{json}");
    let b = a.restore(&json, rng());
    b.wait_used(0, 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.used_idx(0), 8);
    check_used(&b, 0, 0, 8, len);
    for k in 4..8u32 {
        let mut v = vec![0u8; len(k as u16) as usize];
        b.mem.read_slice(&mut v, GuestAddress(data(k))).unwrap();
        assert!(v.iter().any(|&x| x != 0xee), "request {k} not filled");
    }
    // The original, resumed instead, serves the same requests once too.
    a.dev.resume().unwrap();
    a.wait_used(0, 8);
    check_used(&a, 0, 0, 8, len);
}

#[test]
fn rng_pause_resume_loop_with_traffic() {
    let mut d = Drv::start(rng(), &[0]);
    let mut done = 0u16;
    let mut k = 0u32;
    for round in 0..60 {
        for _ in 0..3 {
            let b = rng_buf(&d.mem, k, 8);
            d.post(0, &b);
            k += 1;
        }
        d.kick(0);
        if round % 3 == 0 {
            std::thread::yield_now();
        }
        d.pause(&[0]);
        let u = d.used_idx(0);
        assert!(u >= done && u <= k as u16);
        done = u;
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(d.used_idx(0), u, "used index moved while paused");
        d.dev.resume().unwrap();
        // At most 16 outstanding.
        d.wait_used(0, (k as u16).saturating_sub(12).max(u));
    }
    d.wait_used(0, k as u16);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(0), k as u16);
    check_used(&d, 0, 0, k as u16, |_| 8);
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn console(sink: &Sink, size: &Arc<ConsoleSize>) -> Box<dyn VirtioDevice> {
    Box::new(Console::new(
        Some(Box::new(sink.clone())),
        None,
        size.clone(),
    ))
}

fn msg(k: u32) -> String {
    format!("line {k}\n")
}

/// Message `k` on the transmit queue.
fn tx(d: &mut Drv, k: u32) {
    let m = msg(k);
    d.mem
        .write_slice(m.as_bytes(), GuestAddress(data(k)))
        .unwrap();
    d.post(1, &[(data(k), m.len() as u32, 0)]);
}

#[test]
fn console_paused_saved_and_restored_mid_stream() {
    let (sink_a, size_a) = (Sink::default(), ConsoleSize::new(80, 24));
    let mut a = Drv::start(console(&sink_a, &size_a), &[0, 1]);
    size_a.set(100, 40);
    size_a.set(132, 43);
    for k in 0..5 {
        tx(&mut a, k);
    }
    a.kick(1);
    a.wait_used(1, 5);
    for k in 5..8 {
        tx(&mut a, k);
    }
    a.pause(&[0, 1]);
    // No configuration interrupt while paused: signalled on resume.
    let _ = a.bar_read(0x1000, 1);
    assert!(size_a.set(120, 50));
    assert_eq!(
        a.bar_read(0x1000, 1),
        0,
        "configuration interrupt while paused"
    );
    assert!(size_a.set(132, 43));
    let before = a.used_ring_bytes(1);
    tx(&mut a, 8);
    a.kick(1);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(a.used_ring_bytes(1), before, "used ring moved while paused");
    let json = a.save();
    let expected: String = (0..5).map(msg).collect();
    assert_eq!(
        String::from_utf8(sink_a.0.lock().unwrap().clone()).unwrap(),
        expected
    );

    let (sink_b, size_b) = (Sink::default(), ConsoleSize::new(80, 24));
    let mut b = a.restore(&json, console(&sink_b, &size_b));
    assert_eq!(size_b.get(), (132, 43));
    assert_eq!(size_b.generation(), 4);
    assert_eq!(b.bar_read(0x15, 1), 4, "config_generation");
    assert_eq!(b.bar_read(0x2000, 4), 132 | 43 << 16);
    b.wait_used(1, 9);
    check_used(&b, 1, 0, 9, |_| 0);
    std::thread::sleep(Duration::from_millis(20));
    let expected: String = (5..9).map(msg).collect();
    assert_eq!(
        String::from_utf8(sink_b.0.lock().unwrap().clone()).unwrap(),
        expected
    );

    // The original resumed: the size change while paused is signalled now.
    a.dev.resume().unwrap();
    assert_eq!(
        a.bar_read(0x1000, 1) & 2,
        2,
        "configuration interrupt on resume"
    );
    a.wait_used(1, 9);
}

#[test]
fn device_states_refuse_other_versions_and_devices() {
    let mut r = rng();
    let (sink, size) = (Sink::default(), ConsoleSize::new(1, 2));
    let mut c = console(&sink, &size);
    let bad = VirtioDeviceState::Rng(crate::RngState {
        version: VIRTIO_DEVICE_STATE_VERSION + 1,
    });
    assert!(matches!(
        r.set_device_state(&bad),
        Err(StateError::Version { .. })
    ));
    assert!(matches!(
        c.set_device_state(&r.device_state()),
        Err(StateError::Invalid { .. })
    ));
    let mut cs = c.device_state();
    if let VirtioDeviceState::Console(s) = &mut cs {
        s.version = 0;
        s.cols = 9;
    }
    assert!(c.set_device_state(&cs).is_err());
    assert_eq!(size.get(), (1, 2), "unchanged after a refusal");
    for bad in [
        r#"{"rng":{"version":1,"x":1}}"#,
        r#"{"console":{"version":1,"cols":70000,"rows":1,"config_generation":0}}"#,
        r#"{"net":{"version":1}}"#,
        r#"{"disk":{"version":1}}"#,
        r#"[]"#,
    ] {
        assert!(
            serde_json::from_str::<VirtioDeviceState>(bad).is_err(),
            "{bad}"
        );
    }
    // Pausing and resuming a device that never started does nothing.
    r.pause().unwrap();
    r.resume().unwrap();
    assert_eq!(r.queue_positions(), None);
}

fn disk_file(sectors: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file()
        .write_all(&vec![0u8; (sectors * 512) as usize])
        .unwrap();
    f
}

fn blk(f: &tempfile::NamedTempFile, io_uring: bool) -> Box<dyn VirtioDevice> {
    let d = block::open_disk(f.path(), &block::OpenOptions::default()).unwrap();
    Box::new(
        Block::new(
            d,
            BlockConfig {
                num_queues: 1,
                queue_size: QSIZE,
                serial: "s".into(),
                io_uring,
                queue_affinity: Vec::new(),
            },
        )
        .unwrap(),
    )
}

const HDR: u64 = 0x8_0000;
const STATUS: u64 = 0x9_0000;

/// Request number `k`: a write of 4 KiB of byte `k` at 4 KiB block `block` (`write`), or a read
/// of that block into the request's buffer.
fn blk_req(d: &mut Drv, k: u32, write: bool, block: u32) {
    let (h, s) = (HDR + 16 * u64::from(k % 256), STATUS + u64::from(k % 256));
    let m = &d.mem;
    m.write_obj(if write { T_OUT } else { T_IN }, GuestAddress(h))
        .unwrap();
    m.write_obj(0u32, GuestAddress(h + 4)).unwrap();
    m.write_obj(8 * u64::from(block), GuestAddress(h + 8))
        .unwrap();
    m.write_obj(0xeeu8, GuestAddress(s)).unwrap();
    let fill = if write { k as u8 } else { 0xee };
    m.write_slice(&[fill; 4096], GuestAddress(data(k))).unwrap();
    let dir = if write { 0 } else { WRITE };
    d.post(0, &[(h, 16, 0), (data(k), 4096, dir), (s, 1, WRITE)]);
}

fn blk_mid_stream(io_uring: bool) {
    let f = disk_file(1024);
    let mut a = Drv::start(blk(&f, io_uring), &[0]);
    // Writes 0..12: 0..4 completed, 4..8 notified just before the pause (in flight with
    // io_uring), 8..12 published without a notification.
    for k in 0..4 {
        blk_req(&mut a, k, true, k);
    }
    a.kick(0);
    a.wait_used(0, 4);
    for k in 4..8 {
        blk_req(&mut a, k, true, k);
    }
    a.kick(0);
    for k in 8..12 {
        blk_req(&mut a, k, true, k);
    }
    a.pause(&[0]);
    let taken = a.used_idx(0);
    assert!(taken >= 4);
    let before = a.used_ring_bytes(0);
    blk_req(&mut a, 12, true, 12);
    a.kick(0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(a.used_ring_bytes(0), before, "used ring moved while paused");
    let json = a.save();
    assert!(json.contains(r#""block":{"version":1}"#), "{json}");
    drop(a.dev);
    a.dev = transport(rng(), &a.mem);

    let mut b = a.restore(&json, blk(&f, io_uring));
    b.wait_used(0, 13);
    // Read everything back (requests 13..26 read what 0..13 wrote).
    for k in 13..26 {
        blk_req(&mut b, k, false, k - 13);
    }
    b.kick(0);
    b.wait_used(0, 26);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.used_idx(0), 26);
    check_used(&b, 0, 0, 26, |i| if i < 13 { 1 } else { 4097 });
    for k in 0..26u32 {
        let s: u8 = b.mem.read_obj(GuestAddress(STATUS + u64::from(k))).unwrap();
        assert_eq!(s, S_OK, "request {k}");
    }
    for k in 13..26u32 {
        let mut v = vec![0u8; 4096];
        b.mem.read_slice(&mut v, GuestAddress(data(k))).unwrap();
        assert!(v.iter().all(|&x| x == (k - 13) as u8), "read {k}");
    }
    let file = std::fs::read(f.path()).unwrap();
    for k in 0..13usize {
        assert!(file[k * 4096..(k + 1) * 4096].iter().all(|&x| x == k as u8));
    }
}

#[test]
fn blk_paused_saved_and_restored_mid_stream() {
    blk_mid_stream(false);
}

#[test]
fn blk_paused_saved_and_restored_mid_stream_io_uring() {
    blk_mid_stream(true);
}

#[test]
fn blk_pause_resume_loop_with_traffic_io_uring() {
    let f = disk_file(1024);
    let mut d = Drv::start(blk(&f, true), &[0]);
    let mut k = 0u32;
    for _ in 0..40 {
        for _ in 0..3 {
            blk_req(&mut d, k, true, k % 64);
            k += 1;
        }
        d.kick(0);
        d.pause(&[0]);
        let u = d.used_idx(0);
        std::thread::sleep(Duration::from_millis(1));
        assert_eq!(d.used_idx(0), u, "used index moved while paused");
        d.dev.resume().unwrap();
        d.wait_used(0, (k as u16).saturating_sub(12).max(u));
    }
    d.wait_used(0, k as u16);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(0), k as u16);
    check_used(&d, 0, 0, k as u16, |_| 1);
    let file = std::fs::read(f.path()).unwrap();
    // The last 64 requests' sectors hold their bytes.
    for j in (k - 64)..k {
        let s = (j % 64) as usize * 4096;
        assert!(
            file[s..s + 4096].iter().all(|&x| x == j as u8),
            "request {j}"
        );
    }
}

/// Two queue pairs and the control queue on a TAP in a private network namespace: the driver
/// sets 2 pairs and the checksum offload only, transmits; paused mid-stream, saved, restored
/// into a fresh device on a new TAP: the same pairs and offloads, every frame sent once.
#[test]
fn net_paused_saved_and_restored_mid_stream() {
    std::thread::spawn(net_mid_stream_in_private_netns)
        .join()
        .unwrap();
}

fn net_device(mac: net_util::MacAddr) -> Box<dyn VirtioDevice> {
    let taps = net_util::Tap::open("vps0", 2).expect("creating a multi-queue TAP");
    taps[0].enable().unwrap();
    Box::new(
        crate::Net::new(
            taps,
            crate::NetConfig {
                mac,
                mtu: 1500,
                queue_size: QSIZE,
                offloads: Default::default(),
            },
        )
        .unwrap(),
    )
}

/// Control command `k` (class, command, data) on queue 4; returns its number.
fn ctrl(d: &mut Drv, k: u32, class: u8, cmd: u8, arg: &[u8]) {
    let mut b = vec![class, cmd];
    b.extend_from_slice(arg);
    d.mem.write_slice(&b, GuestAddress(data(k))).unwrap();
    d.mem
        .write_obj(0xeeu8, GuestAddress(STATUS + u64::from(k)))
        .unwrap();
    d.post(
        4,
        &[
            (data(k), 2, 0),
            (data(k) + 2, arg.len() as u32, 0),
            (STATUS + u64::from(k), 1, WRITE),
        ],
    );
}

/// Frame `k` on the transmit queue of pair 1 (queue 3).
fn net_tx(d: &mut Drv, k: u32) {
    let mut f = vec![0u8; 12 + 60];
    f[12..18].fill(0xff);
    f[18..24].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
    f[26] = k as u8;
    d.mem.write_slice(&f, GuestAddress(data(k))).unwrap();
    d.post(3, &[(data(k), f.len() as u32, 0)]);
}

fn net_mid_stream_in_private_netns() {
    use virtio_bindings::virtio_net as vn;
    // SAFETY: unshare only moves the calling thread into a new network namespace.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
    let queues = [0, 1, 2, 3, 4];
    let mac = net_util::MacAddr::random_local();
    let mut a = Drv::start(net_device(mac), &queues);
    let csum = 1u64 << vn::VIRTIO_NET_F_GUEST_CSUM;
    ctrl(
        &mut a,
        100,
        vn::VIRTIO_NET_CTRL_MQ as u8,
        vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        &2u16.to_le_bytes(),
    );
    ctrl(
        &mut a,
        101,
        vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8,
        vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8,
        &csum.to_le_bytes(),
    );
    a.kick(4);
    a.wait_used(4, 2);
    for k in [100u64, 101] {
        let s: u8 = a.mem.read_obj(GuestAddress(STATUS + k)).unwrap();
        assert_eq!(s, vn::VIRTIO_NET_OK as u8);
    }
    for k in 0..4 {
        net_tx(&mut a, k);
    }
    a.kick(3);
    a.wait_used(3, 4);
    for k in 4..7 {
        net_tx(&mut a, k);
    }
    a.pause(&queues);
    let before = a.used_ring_bytes(3);
    net_tx(&mut a, 7);
    a.kick(3);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(a.used_ring_bytes(3), before, "used ring moved while paused");
    let want = crate::NetState {
        version: VIRTIO_DEVICE_STATE_VERSION,
        active_pairs: 2,
        guest_offloads: csum,
        mac: Some(mac.to_string()),
        config_generation: 0,
    };
    assert_eq!(a.dev.device_state(), VirtioDeviceState::Net(want.clone()));
    let json = a.save();
    // The TAP goes with the old device.
    drop(a.dev);
    a.dev = transport(rng(), &a.mem);

    let b = a.restore(&json, net_device(mac));
    b.wait_used(3, 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(b.used_idx(3), 8);
    check_used(&b, 3, 0, 8, |_| 0);
    assert_eq!(b.dev.device_state(), VirtioDeviceState::Net(want));
    // A state the device could not hold is refused.
    let mut bad = net_device(mac);
    for s in [(0u16, 0u64), (3, 0), (1, 1 << vn::VIRTIO_NET_F_MRG_RXBUF)] {
        let st = VirtioDeviceState::Net(crate::NetState {
            version: VIRTIO_DEVICE_STATE_VERSION,
            active_pairs: s.0,
            guest_offloads: s.1,
            mac: None,
            config_generation: 0,
        });
        assert!(matches!(
            bad.set_device_state(&st),
            Err(StateError::Invalid { .. })
        ));
    }
}
