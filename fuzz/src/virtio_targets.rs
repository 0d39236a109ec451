//! One target per virtio device: how each is built for an input, and its seeds (requests a
//! driver sends it, well formed).

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use virtio_devices::{
    Balloon, BalloonOptions, Block, BlockConfig, Console, ConsoleSize, Net, NetConfig, NetOffloads,
    Pmem, PmemRange, Rng, VirtioDevice, VirtioMem, VirtioMemOptions, Vsock, Watchdog,
};

use virtio_devices::IommuMapping;

use crate::virtio::{run, Buf, Driver, AGAIN, ALL_FEATURES, EVENT_IDX, HEADER, INDIRECT};

struct NoRequests;

impl devices::VmRequests for NoRequests {
    fn power_off(&self) {}
    fn reset(&self) {}
}

/// This process's scratch directory for the targets' host files (a disk image, a socket).
fn scratch_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("ch-fuzz-{}", std::process::id()))
}

/// `name` in the scratch directory, which is removed when the process exits normally (as
/// libFuzzer does at the end of a run; a crash leaves it, with the crash's files).
fn scratch(name: &str) -> std::path::PathBuf {
    static CLEAN_UP: std::sync::Once = std::sync::Once::new();
    extern "C" fn remove_scratch() {
        let _ = std::fs::remove_dir_all(scratch_dir());
    }
    CLEAN_UP.call_once(|| {
        // SAFETY: registers a plain function with no arguments, as atexit(3) asks.
        unsafe { libc::atexit(remove_scratch) };
    });
    let dir = scratch_dir();
    let _ = std::fs::create_dir_all(&dir);
    dir.join(name)
}

/// A device for a target, and what must live as long as it (its disk file, the TAP's other
/// end).
pub struct Built {
    pub dev: Box<dyn VirtioDevice>,
    _keep: Option<Box<dyn std::any::Any>>,
}

fn built(dev: impl VirtioDevice + 'static) -> Option<Built> {
    Some(Built {
        dev: Box::new(dev),
        _keep: None,
    })
}

/// The virtio targets, by name.
pub const DEVICES: &[&str] = &[
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_vsock",
    "virtio_balloon",
    "virtio_mem",
    "virtio_pmem",
    "virtio_watchdog",
    "virtio_rtc",
    "virtio_iommu",
];

/// The endpoints the `virtio_iommu` target's IOMMU manages.
const IOMMU_ENDPOINTS: [u32; 2] = [8, 0x10];

/// Builds the device of target `name`; `data` is its input (a few of its bytes pick what the
/// host side holds: a read-only disk, a frame waiting on the TAP, console input).
pub fn build(name: &str, data: &[u8]) -> Option<Built> {
    let pick = data.get(HEADER - 1).map_or(0, |&n| usize::from(n));
    match name {
        "virtio_blk" => {
            // A raw image of 64 KiB, fresh for each input.
            let path = scratch("disk.raw");
            let f = File::create(&path).ok()?;
            f.set_len(64 << 10).ok()?;
            let opts = block::OpenOptions {
                readonly: data.get(HEADER).is_some_and(|&b| b == 0xff),
                ..Default::default()
            };
            let disk = block::open_disk(&path, &opts).ok()?;
            // Bit 6 of the same byte: a worker per queue (`queue_affinity`; the workers run
            // inline here, so the CPU set itself plays no part).
            let per_queue = data.get(HEADER).is_some_and(|&b| b & 0x40 != 0);
            let cfg = BlockConfig {
                num_queues: 2,
                queue_size: 16,
                serial: "fuzz-serial".into(),
                io_uring: false,
                queue_affinity: if per_queue {
                    vec![(1, vec![0])]
                } else {
                    Vec::new()
                },
            };
            built(Block::new(disk, cfg).ok()?)
        }
        "virtio_net" => {
            let (tap, peer) = UnixDatagram::pair().ok()?;
            tap.set_nonblocking(true).ok()?;
            // A frame waiting on the "TAP" (virtio-net header, then Ethernet), its length from
            // the input: what the receive path puts in the guest's buffers.
            let mut frame = vec![0u8; 12 + pick * 8];
            for (i, b) in frame.iter_mut().enumerate().skip(12) {
                *b = i as u8;
            }
            let _ = peer.send(&frame);
            let tap = net_util::Tap::fuzz_from_file(File::from(std::os::fd::OwnedFd::from(tap)));
            let cfg = NetConfig {
                mac: "52:54:00:12:34:56".parse().ok()?,
                mtu: 1500,
                queue_size: 16,
                offloads: NetOffloads {
                    csum: true,
                    tso: true,
                    ufo: true,
                },
            };
            Some(Built {
                dev: Box::new(Net::new(vec![tap], cfg).ok()?),
                _keep: Some(Box::new(peer)),
            })
        }
        "virtio_console" => {
            let mut fds = [0i32; 2];
            // SAFETY: pipe2 writes two descriptors into the array we own.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return None;
            }
            // SAFETY: the descriptors pipe2 just made are ours alone.
            let (r, mut w) = unsafe {
                use std::os::fd::FromRawFd;
                (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
            };
            let _ = w.write_all(&b"typed on the host console\n".repeat(4)[..pick.min(104)]);
            drop(w);
            built(Console::new(
                Some(Box::new(std::io::sink())),
                Some(r),
                ConsoleSize::new(80, 24),
            ))
        }
        "virtio_rng" => built(Rng::new(File::open("/dev/zero").ok()?)),
        "virtio_vsock" => {
            let path = scratch("vsock.sock");
            let _ = std::fs::remove_file(&path);
            built(Vsock::new(3, &path).ok()?)
        }
        "virtio_balloon" => {
            let opts = BalloonOptions {
                deflate_on_oom: true,
                free_page_reporting: true,
                stats: true,
            };
            built(Balloon::new(1 << 20, opts).ok()?)
        }
        "virtio_mem" => {
            // The hotpluggable region is the second RAM region, in 4 KiB blocks.
            let opts = VirtioMemOptions {
                unplugged_inaccessible: true,
                node_id: 0,
                acpi_pxm: false,
            };
            let r = crate::mem::REGION as u64;
            let dev = VirtioMem::new(r, r, 4096, opts).ok()?;
            let _ = dev.control().set_requested(r / 2);
            built(dev)
        }
        "virtio_pmem" => {
            let range = Arc::new(PmemRange {
                start: AtomicU64::new(0x10_0000),
                size: 2 << 20,
            });
            built(Pmem::new(None, range))
        }
        "virtio_watchdog" => built(Watchdog::new(Arc::new(NoRequests)).ok()?),
        "virtio_rtc" => built(virtio_devices::Rtc::default()),
        "virtio_iommu" => {
            let m = Arc::new(virtio_devices::IommuMapping::new());
            for ep in IOMMU_ENDPOINTS {
                m.manage(ep);
            }
            Some(Built {
                dev: Box::new(virtio_devices::Iommu::new(m.clone(), 48)),
                _keep: Some(Box::new(m)),
            })
        }
        _ => None,
    }
}

/// Runs virtio target `name` on `data`.
pub fn device(name: &str, data: &[u8]) {
    if let Some(mut b) = build(name, data) {
        run(b.dev.as_mut(), data);
        let mapping = b
            ._keep
            .as_ref()
            .and_then(|k| k.downcast_ref::<Arc<IommuMapping>>());
        if let Some(m) = mapping {
            translate(m, data);
        }
    }
}

/// After the `virtio_iommu` target's requests (and its state saved and restored): accesses
/// from the input's last bytes (16 each: IOVA, length, direction) translated for each
/// endpoint; the pieces must cover the access exactly and never wrap.
fn translate(m: &Arc<IommuMapping>, data: &[u8]) {
    let tail = &data[data.len().saturating_sub(64)..];
    for c in tail.chunks_exact(16) {
        let iova = u64::from_le_bytes(c[..8].try_into().unwrap());
        let len = u64::from(u32::from_le_bytes(c[8..12].try_into().unwrap()));
        let write = c[12] & 1 != 0;
        for ep in IOMMU_ENDPOINTS {
            let mut total = 0u64;
            let r = m.endpoint(ep).translate(iova, len, write, |a, n| {
                let last = a.checked_add(n.saturating_sub(1));
                assert!(last.is_some(), "piece {a:#x}+{n:#x} wraps");
                total += n;
            });
            if r.is_ok() {
                assert_eq!(total, len, "{iova:#x}+{len:#x} translated in part");
            }
        }
    }
}

fn le(v: &[u64], widths: &[usize]) -> Vec<u8> {
    let mut b = Vec::new();
    for (x, w) in v.iter().zip(widths) {
        b.extend_from_slice(&x.to_le_bytes()[..*w]);
    }
    b
}

/// Seeds for the virtio target `name`.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    use Buf::{R, W};
    let f = ALL_FEATURES | EVENT_IDX;
    let mut out = Vec::new();
    let mut one = |d: &mut Driver| out.push(d.input());
    match name {
        "virtio_blk" => {
            let hdr = |t: u64, sector: u64| le(&[t, 0, sector], &[4, 4, 8]);
            let data = vec![0x5a; 512];
            one(Driver::new(f)
                .chain(0, &[R(&hdr(0, 1)), W(512), W(1)])
                .chain(0, &[R(&hdr(1, 2)), R(&data), W(1)])
                .chain(0, &[R(&hdr(4, 0)), W(1)])
                .chain(0, &[R(&hdr(8, 0)), W(20), W(1)]));
            let seg = le(&[3, 4, 0], &[8, 4, 4]);
            one(Driver::new(f)
                .chain(0, &[R(&hdr(11, 0)), R(&seg), W(1)])
                .chain(0, &[R(&hdr(13, 0)), R(&seg), W(1)])
                .chain(1, &[R(&hdr(0, 127)), W(1024), W(1)]));
            one(Driver::new(AGAIN).chain(0, &[R(&hdr(0, 0)), W(4096), W(1)]));
        }
        "virtio_net" => {
            let vnet = vec![0u8; 12];
            let frame: Vec<u8> = (0..60u8).collect();
            let mut tx = vnet.clone();
            tx.extend_from_slice(&frame);
            one(Driver::new(f)
                .chain(0, &[W(1526)])
                .chain(1, &[R(&tx)])
                .chain(1, &[R(&vnet), R(&frame)])
                .chain(2, &[R(&[0, 0]), R(&[1]), W(1)])
                .chain(2, &[R(&[4, 0]), R(&1u16.to_le_bytes()), W(1)])
                .chain(2, &[R(&[5, 0]), R(&1u64.to_le_bytes()), W(1)]));
            let mut csum = vec![1u8, 0, 0, 0, 0, 0, 14, 0, 16, 0, 1, 0];
            csum.extend_from_slice(&frame);
            one(Driver::new(f | INDIRECT)
                .chain(0, &[W(64), W(1500)])
                .chain(1, &[R(&csum)])
                .chain(2, &[R(&[1, 1]), R(&[0x52, 0x54, 0, 1, 2, 3]), W(1)]));
        }
        "virtio_console" => {
            one(Driver::new(f)
                .chain(0, &[W(64)])
                .chain(1, &[R(b"hello from the guest\n")])
                .config(0, &[100, 0, 40, 0]));
            one(Driver::new(AGAIN)
                .chain(0, &[W(8), W(8)])
                .chain(1, &[R(b"a"), R(b"b")]));
        }
        "virtio_rng" => {
            one(Driver::new(f).chain(0, &[W(64)]).chain(0, &[W(16), W(16)]));
            one(Driver::new(AGAIN).chain(0, &[W(4096)]));
        }
        "virtio_vsock" => {
            // src_cid, dst_cid, src_port, dst_port, len, type, op, flags, buf_alloc, fwd_cnt
            let w = [8, 8, 4, 4, 4, 2, 2, 4, 4, 4];
            let pkt = |op: u64, len: u64| le(&[3, 2, 1024, 1234, len, 1, op, 0, 65536, 0], &w);
            one(Driver::new(f)
                .chain(0, &[W(44 + 4096)])
                .chain(1, &[R(&pkt(1, 0))])
                .chain(1, &[R(&pkt(5, 5)), R(b"hello")])
                .chain(1, &[R(&pkt(7, 0))])
                .chain(1, &[R(&pkt(4, 0))]));
            one(Driver::new(f)
                .chain(0, &[W(44), W(64)])
                .chain(1, &[R(&pkt(3, 0))]));
        }
        "virtio_balloon" => {
            let pfns = le(&[0x10, 0x11, 0x1f], &[4, 4, 4]);
            let stats = le(&[0, 4096, 4, 1 << 20], &[2, 8, 2, 8]);
            one(Driver::new(f)
                .chain(0, &[R(&pfns)])
                .chain(1, &[R(&pfns)])
                .chain(2, &[R(&stats)])
                .chain(3, &[W(4096)])
                .config(8, &[0, 1, 0, 0]));
            one(Driver::new(AGAIN).chain(0, &[R(&le(&[0x12], &[4]))]));
        }
        "virtio_mem" => {
            let req = |t: u64, addr: u64, n: u64| le(&[t, 0, addr, n, 0], &[2, 6, 8, 2, 6]);
            let r = crate::mem::REGION as u64;
            one(Driver::new(f)
                .chain(0, &[R(&req(0, r, 2)), W(10)])
                .chain(0, &[R(&req(3, r, 4)), W(10)])
                .chain(0, &[R(&req(1, r, 1)), W(10)])
                .chain(0, &[R(&req(2, 0, 0)), W(10)]));
            one(Driver::new(AGAIN).chain(0, &[R(&req(0, r + 4096, 1)), W(10)]));
        }
        "virtio_pmem" => {
            one(Driver::new(f).chain(0, &[R(&[0, 0, 0, 0]), W(4)]));
            one(Driver::new(AGAIN).chain(0, &[R(&[1, 0, 0, 0]), W(4)]));
        }
        "virtio_iommu" => {
            // head (type), then each request's fields; the tail (4) or PROBE's 512 + 4 back.
            let attach =
                |t: u64, d: u64, ep: u64, fl: u64| le(&[t, d, ep, fl, 0], &[4, 4, 4, 4, 4]);
            let map = |d: u64, s: u64, e: u64, p: u64, fl: u64| {
                le(&[3, d, s, e, p, fl], &[4, 4, 8, 8, 8, 4])
            };
            let unmap = |d: u64, s: u64, e: u64| le(&[4, d, s, e, 0], &[4, 4, 8, 8, 4]);
            let mut probe = le(&[5, 8], &[4, 4]);
            probe.extend_from_slice(&[0; 64]);
            one(Driver::new(f)
                .chain(0, &[R(&attach(1, 1, 8, 0)), W(4)])
                .chain(
                    0,
                    &[R(&map(1, 0x1_0000_0000, 0x1_0000_1fff, 0x1000, 3)), W(4)],
                )
                .chain(
                    0,
                    &[R(&map(1, 0x1_0000_2000, 0x1_0000_2fff, 0x8000, 1)), W(4)],
                )
                .chain(0, &[R(&probe), W(516)])
                .chain(0, &[R(&unmap(1, 0x1_0000_0000, 0x1_0000_0fff)), W(4)])
                .chain(0, &[R(&attach(1, 2, 0x10, 1)), W(4)]));
            one(Driver::new(AGAIN)
                .chain(0, &[R(&attach(1, 7, 8, 0)), W(4)])
                .chain(0, &[R(&map(7, 0, 0xffff, 0x2000, 2)), W(4)])
                .chain(0, &[R(&unmap(7, 0, u64::MAX)), W(4)])
                .chain(0, &[R(&attach(2, 7, 8, 0)), W(4)])
                .chain(0, &[R(&[0x42, 0, 0, 0]), W(4)]));
        }
        "virtio_rtc" => {
            // msg_type, then clock (READ, CLOCK_CAP, CROSS_CAP): each request and its answer.
            let req = |t: u64, clock: u64| le(&[t, 0, clock, 0], &[2, 6, 2, 6]);
            one(Driver::new(f)
                .chain(0, &[R(&req(0x1000, 0)), W(16)])
                .chain(0, &[R(&req(0x1001, 0)), W(16)])
                .chain(0, &[R(&req(0x1002, 0)), W(16)])
                .chain(0, &[R(&req(0x0001, 0)), W(16)]));
            one(Driver::new(AGAIN)
                .chain(0, &[R(&req(0x0001, 1)), W(8)])
                .chain(0, &[R(&req(0x0002, 0)), W(4)])
                .chain(0, &[W(16), R(&req(0x1000, 0))]));
        }
        "virtio_watchdog" => {
            one(Driver::new(f).chain(0, &[W(1)]));
            one(Driver::new(AGAIN).chain(0, &[W(4)]).chain(0, &[W(1)]));
        }
        _ => {}
    }
    out
}
