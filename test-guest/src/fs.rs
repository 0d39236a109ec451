//! `test=fs`: finds the virtio-fs function (device type 26, PCI device 0x105a), which
//! `virtio-drivers` does not know, reads its configuration (tag, request queues) and speaks
//! FUSE to the backend (virtiofsd) over the first request queue (queue 1; queue 0 is the
//! high-priority one) with `rawq`: each request is a device-readable buffer (`fuse_in_header`
//! and the body) followed by a device-writable one (`fuse_out_header` and the reply).
//!
//! INIT, LOOKUP of `fs_file=<name>` (default `data.bin`) in the root, OPEN read-write, READ of
//! the whole file, which must hold `fs_size=<n>` bytes of the pattern `(31 i + 7) mod 256`,
//! WRITE of `written by guest!` at offset 4096, READ of it back, RELEASE. The host checks the
//! file afterwards. `fs_crash`: then the host kills the backend (the device must need a reset);
//! `fs_reconnect`: that, then a reset and a new session with the backend the host starts again
//! (`fs_reconnect.rs`).

use virtio_drivers::transport::pci::bus::{Command, DeviceFunction};

use crate::bootinfo::BootInfo;
use crate::rawq::{r8, w8, Layout, RawQueue, F_NEXT, F_WRITE, VERSION_1};
use crate::virtio::{dma_pages, root};
use crate::{fail, parse_u64, pass, println};

pub(crate) const FUSE_LOOKUP: u32 = 1;
pub(crate) const FUSE_OPEN: u32 = 14;
pub(crate) const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
pub(crate) const FUSE_RELEASE: u32 = 18;
pub(crate) const FUSE_INIT: u32 = 26;
pub(crate) const ROOT_ID: u64 = 1;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// What the guest writes, at `WRITE_AT`.
pub const WRITTEN: &[u8] = b"written by guest!";
pub(crate) const WRITE_AT: u64 = 4096;
/// Pages for a request and for a reply (the whole file is read in one request).
const REQ_PAGES: usize = 2;
/// A benchmark READ's size (the reply buffer holds it and the header).
const BENCH_CHUNK: u32 = 128 << 10;
const REPLY_PAGES: usize = BENCH_CHUNK as usize / 4096 + 1;

fn find_fs() -> Option<DeviceFunction> {
    root()
        .enumerate_bus(0)
        .find(|(_, info)| info.vendor_id == 0x1af4 && info.device_id == 0x105a)
        .map(|(df, _)| df)
}

pub(crate) fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31).wrapping_add(7) % 256) as u8
}

fn read_bytes(a: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = r8(a + i as u64);
    }
}

fn write_bytes(a: u64, data: &[u8]) {
    for (i, b) in data.iter().enumerate() {
        w8(a + i as u64, *b);
    }
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// The FUSE session over one request queue: a request page and a reply page of DMA memory.
pub(crate) struct Fuse {
    q: RawQueue,
    req: u64,
    reply: u64,
    unique: u64,
    /// How long a request waits for its reply (ms; not for the benchmark's).
    pub(crate) wait_ms: u32,
}

impl Fuse {
    /// A session over request queue `q`.
    pub(crate) fn new(q: RawQueue) -> Fuse {
        Fuse {
            q,
            req: dma_pages(REQ_PAGES),
            reply: dma_pages(REPLY_PAGES),
            unique: 0,
            wait_ms: 5000,
        }
    }

    /// Sends `opcode` for `nodeid` with `body`; the reply's body (after the header), of at most
    /// `reply_len` bytes, or the error (a negative errno, or `i32::MIN` when nothing came).
    pub(crate) fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: usize,
    ) -> Result<alloc::vec::Vec<u8>, i32> {
        let n = self.send(opcode, nodeid, body, reply_len, false)?;
        let mut b = alloc::vec![0u8; n];
        read_bytes(self.reply + OUT_HEADER as u64, &mut b);
        Ok(b)
    }

    /// `call` without copying the reply out: its body's length. `spin`: polls the used ring
    /// without pausing (for the benchmark), 5 s at most.
    fn send(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: usize,
        spin: bool,
    ) -> Result<usize, i32> {
        self.unique += 1;
        let len = IN_HEADER + body.len();
        let mut h = [0u8; IN_HEADER];
        h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&self.unique.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        write_bytes(self.req, &h);
        write_bytes(self.req + IN_HEADER as u64, body);
        let out_len = OUT_HEADER + reply_len;
        write_bytes(self.reply, &[0u8; OUT_HEADER]);
        self.q.set_desc(0, self.req, len as u32, F_NEXT, 1);
        self.q.set_desc(1, self.reply, out_len as u32, F_WRITE, 0);
        self.q.publish(0);
        let used = if spin {
            let t0 = crate::svc::rdtsc();
            loop {
                if let Some(u) = self.q.poll_used() {
                    break Some(u);
                }
                if crate::svc::rdtsc() - t0 > 5_000_000 * crate::smp::TSC_PER_US {
                    break None;
                }
            }
        } else {
            self.q.wait_used(self.wait_ms)
        };
        let Some((_, written)) = used else {
            return Err(i32::MIN);
        };
        let mut oh = [0u8; OUT_HEADER];
        read_bytes(self.reply, &mut oh);
        let (olen, error, unique) = (le32(&oh, 0) as usize, le32(&oh, 4) as i32, le64(&oh, 8));
        if unique != self.unique || olen < OUT_HEADER || olen > written as usize {
            println!("INFO fs opcode {opcode}: reply len={olen} unique={unique} written={written}");
            return Err(i32::MIN);
        }
        if error != 0 {
            return Err(error);
        }
        Ok(olen - OUT_HEADER)
    }
}

/// `Ok` or a FAIL line named `name`.
pub(crate) fn ok<T>(name: &str, r: Result<T, i32>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(i32::MIN) => {
            fail(name, format_args!("no (valid) reply"));
            None
        }
        Err(e) => {
            fail(name, format_args!("error {e}"));
            None
        }
    }
}

pub fn scenario_fs(boot: &BootInfo) {
    let Some(df) = find_fs() else {
        fail("fs-present", format_args!("no virtio-fs function"));
        return;
    };
    let mut r = root();
    let (_, cmd) = r.get_status_command(df);
    r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
    let Some(layout) = Layout::find(df) else {
        return;
    };
    let mut tag = [0u8; 36];
    read_bytes(layout.device, &mut tag);
    let tag_len = tag.iter().position(|&b| b == 0).unwrap_or(tag.len());
    let tag = core::str::from_utf8(&tag[..tag_len]).unwrap_or("?");
    let mut nq = [0u8; 4];
    read_bytes(layout.device + 36, &mut nq);
    let queues = u32::from_le_bytes(nq);
    println!("FS tag={tag} num_request_queues={queues}");
    let want = boot.arg("fs_tag").unwrap_or("myfs");
    crate::check!(
        "fs-config",
        tag == want && queues >= 1,
        "tag {tag:?} (want {want:?}), {queues} request queues"
    );
    let Some(mut qs) = layout.start("fs", VERSION_1, &[0, 1]) else {
        return;
    };
    let Some(q) = qs.pop() else { return };
    let mut fuse = Fuse::new(q);

    // INIT: protocol 7.31, no flags asked for.
    let mut init = [0u8; 16];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&31u32.to_le_bytes());
    let Some(b) = ok("fs-init", fuse.call(FUSE_INIT, 0, &init, 64)) else {
        return;
    };
    if b.len() < 8 {
        fail("fs-init", format_args!("a {}-byte reply", b.len()));
        return;
    }
    let (major, minor) = (le32(&b, 0), le32(&b, 4));
    println!("FS init major={major} minor={minor}");
    crate::check!("fs-init", major == 7, "major {major}");
    if let Some(name) = boot.arg("fs_bench") {
        bench(&mut fuse, name);
        return;
    }

    let name = boot.arg("fs_file").unwrap_or("data.bin");
    let mut lookup = alloc::vec::Vec::from(name.as_bytes());
    lookup.push(0);
    let Some(b) = ok("fs-lookup", fuse.call(FUSE_LOOKUP, ROOT_ID, &lookup, 128)) else {
        return;
    };
    if b.len() < 128 {
        fail("fs-lookup", format_args!("a {}-byte entry", b.len()));
        return;
    }
    // fuse_entry_out: nodeid, ..., then fuse_attr at 40 (ino, size, ...).
    let (node, size) = (le64(&b, 0), le64(&b, 48));
    let want_size = boot.arg("fs_size").and_then(parse_u64).unwrap_or(0);
    println!("FS lookup {name} node={node} size={size}");
    crate::check!(
        "fs-lookup",
        node != 0 && size == want_size,
        "node {node}, size {size} (want {want_size})"
    );

    // OPEN O_RDWR.
    let mut open = [0u8; 8];
    open[0..4].copy_from_slice(&2u32.to_le_bytes());
    let Some(b) = ok("fs-open", fuse.call(FUSE_OPEN, node, &open, 16)) else {
        return;
    };
    let fh = if b.len() >= 8 { le64(&b, 0) } else { 0 };
    crate::check!("fs-open", b.len() >= 16, "a {}-byte reply", b.len());

    let read = |fuse: &mut Fuse, offset: u64, len: u32| {
        let mut r = [0u8; 40];
        r[0..8].copy_from_slice(&fh.to_le_bytes());
        r[8..16].copy_from_slice(&offset.to_le_bytes());
        r[16..20].copy_from_slice(&len.to_le_bytes());
        fuse.call(FUSE_READ, node, &r, len as usize)
    };
    let len = (size as usize).min(REPLY_PAGES * 4096 - OUT_HEADER);
    let Some(data) = ok("fs-read", read(&mut fuse, 0, len as u32)) else {
        return;
    };
    let bad = data.iter().enumerate().position(|(i, &b)| b != pattern(i));
    println!("FS read {} bytes", data.len());
    crate::check!(
        "fs-read",
        data.len() == size as usize && bad.is_none(),
        "{} bytes (want {size}), first difference at {bad:?}",
        data.len()
    );

    let mut w = alloc::vec![0u8; 40];
    w[0..8].copy_from_slice(&fh.to_le_bytes());
    w[8..16].copy_from_slice(&WRITE_AT.to_le_bytes());
    w[16..20].copy_from_slice(&(WRITTEN.len() as u32).to_le_bytes());
    w.extend_from_slice(WRITTEN);
    let Some(b) = ok("fs-write", fuse.call(FUSE_WRITE, node, &w, 8)) else {
        return;
    };
    let n = if b.len() >= 4 { le32(&b, 0) } else { 0 };
    crate::check!(
        "fs-write",
        n as usize == WRITTEN.len(),
        "{n} bytes written of {}",
        WRITTEN.len()
    );
    let Some(back) = ok(
        "fs-read-back",
        read(&mut fuse, WRITE_AT, WRITTEN.len() as u32),
    ) else {
        return;
    };
    crate::check!(
        "fs-read-back",
        back == WRITTEN,
        "read back {:?}",
        core::str::from_utf8(&back)
    );

    let mut rel = [0u8; 24];
    rel[0..8].copy_from_slice(&fh.to_le_bytes());
    rel[8..12].copy_from_slice(&2u32.to_le_bytes());
    if ok("fs-release", fuse.call(FUSE_RELEASE, node, &rel, 0)).is_some() {
        pass("fs-release");
    }
    if boot.has_token("fs_crash") || boot.has_token("fs_reconnect") {
        backend_gone(&layout, &mut fuse);
    }
    if boot.has_token("fs_reconnect") {
        crate::fs_reconnect::new_session(boot, &layout);
    }
}

/// `fs_bench=<name>`: reads the file from start to end in `BENCH_CHUNK` READs through one
/// request queue, one request at a time, printing `FS-BENCH start` and `FS-BENCH done <bytes>
/// <requests>` (the host times the two lines; scripts/bench-fs).
fn bench(fuse: &mut Fuse, name: &str) {
    let mut lookup = alloc::vec::Vec::from(name.as_bytes());
    lookup.push(0);
    let Some(b) = ok("fs-bench", fuse.call(FUSE_LOOKUP, ROOT_ID, &lookup, 128)) else {
        return;
    };
    let node = le64(&b, 0);
    let Some(b) = ok("fs-bench", fuse.call(FUSE_OPEN, node, &[0u8; 8], 16)) else {
        return;
    };
    let fh = le64(&b, 0);
    println!("FS-BENCH start");
    let (mut offset, mut requests) = (0u64, 0u64);
    loop {
        let mut r = [0u8; 40];
        r[0..8].copy_from_slice(&fh.to_le_bytes());
        r[8..16].copy_from_slice(&offset.to_le_bytes());
        r[16..20].copy_from_slice(&BENCH_CHUNK.to_le_bytes());
        let Some(n) = ok(
            "fs-bench",
            fuse.send(FUSE_READ, node, &r, BENCH_CHUNK as usize, true),
        ) else {
            return;
        };
        requests += 1;
        offset += n as u64;
        if n < BENCH_CHUNK as usize {
            break;
        }
    }
    println!("FS-BENCH done {offset} {requests}");
    pass("fs-bench");
}

/// `fs_crash`: the host kills the backend now; the device must say it needs a reset (status
/// bit 0x40), and a request after that gets no reply, while the guest goes on.
fn backend_gone(layout: &Layout, fuse: &mut Fuse) {
    println!("FS waiting for the backend to go");
    let mut waited = 0;
    while layout.status() & 0x40 == 0 && waited < 30_000 {
        crate::smp::delay_us(10_000);
        waited += 10;
    }
    let status = layout.status();
    crate::check!(
        "fs-needs-reset",
        status & 0x40 != 0,
        "status {status:#x} after {waited} ms"
    );
    let mut init = [0u8; 16];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&31u32.to_le_bytes());
    let r = fuse.call(FUSE_INIT, 0, &init, 64);
    crate::check!(
        "fs-no-backend",
        r == Err(i32::MIN),
        "a request answered without a backend: {r:?}"
    );
}
