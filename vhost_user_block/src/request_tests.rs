//! Requests as a hostile driver may make them: every malformed one completes with a status (or
//! none when it has no status byte), never a panic, and never touches the image.

use super::*;
use std::io::Write;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const W: u16 = 2; // VRING_DESC_F_WRITE
const DISK: u64 = 64 << 10;
/// Guest RAM: [0, 1 MiB) and [2 MiB, 3 MiB), a hole between.
const HOLE: u64 = 1 << 20;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;

struct T {
    mem: GuestMemoryMmap,
    disk: Disk,
    file: tempfile::NamedTempFile,
}

fn setup(readonly: bool) -> T {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(2 << 20), 1 << 20),
    ])
    .unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let content: Vec<u8> = (0..DISK).map(|i| (i / 512) as u8).collect();
    file.write_all(&content).unwrap();
    let opts = block::OpenOptions {
        readonly,
        image_type: Some(block::ImageType::Raw),
        ..Default::default()
    };
    let f = block::open_disk(file.path(), &opts).unwrap();
    T {
        mem,
        disk: Disk::new(f, b"our-serial-number-is-long"),
        file,
    }
}

impl T {
    fn header(&self, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }
    fn serve(&mut self, chain: &[Descriptor]) -> u32 {
        serve(&self.mem, &mut self.disk, chain)
    }
    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
    fn image(&self) -> Vec<u8> {
        std::fs::read(self.file.path()).unwrap()
    }
}

fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

fn hdr() -> Descriptor {
    d(HDR, 16, 0)
}

fn status() -> Descriptor {
    d(STATUS, 1, W)
}

#[test]
fn write_then_read_back_byte_exact() {
    let mut t = setup(false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    t.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    t.header(T_OUT, 3);
    assert_eq!(t.serve(&[hdr(), d(DATA, 1024, 0), status()]), 1);
    assert_eq!(t.status(), S_OK);
    assert_eq!(&t.image()[3 * 512..3 * 512 + 1024], &data[..]);
    // Read it back through two buffers in the two memory regions.
    let second = (2 << 20) + 0x100;
    t.header(T_IN, 3);
    assert_eq!(
        t.serve(&[hdr(), d(DATA + 0x1000, 512, W), d(second, 512, W), status()]),
        1025
    );
    assert_eq!(t.status(), S_OK);
    let mut back = vec![0u8; 1024];
    t.mem
        .read_slice(&mut back[..512], GuestAddress(DATA + 0x1000))
        .unwrap();
    t.mem
        .read_slice(&mut back[512..], GuestAddress(second))
        .unwrap();
    assert_eq!(back, data);
    t.header(T_FLUSH, 0);
    assert_eq!(t.serve(&[hdr(), status()]), 1);
    assert_eq!(t.status(), S_OK);
}

#[test]
fn get_id_fills_at_most_20_bytes() {
    let mut t = setup(false);
    t.header(T_GET_ID, 0);
    assert_eq!(t.serve(&[hdr(), d(DATA, 64, W), status()]), 21);
    let mut id = [0u8; 20];
    t.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"our-serial-number-is");
    t.header(T_GET_ID, 0);
    assert_eq!(t.serve(&[hdr(), d(DATA, 8, W), status()]), 9);
}

#[test]
fn discard_and_write_zeroes() {
    let mut t = setup(false);
    let seg = |start: u64, count: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&start.to_le_bytes());
        s[8..12].copy_from_slice(&count.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    t.mem
        .write_slice(&seg(4, 2, 0), GuestAddress(DATA))
        .unwrap();
    t.header(T_WRITE_ZEROES, 0);
    assert_eq!(t.serve(&[hdr(), d(DATA, 16, 0), status()]), 1);
    assert_eq!(t.status(), S_OK);
    assert!(t.image()[4 * 512..6 * 512].iter().all(|&b| b == 0));
    assert_eq!(t.image()[6 * 512], 6);
    // Beyond the end: IOERR; unknown flags, several segments: UNSUPP.
    for (s, n, want) in [
        (seg(DISK / 512 - 1, 2, 0), 16, S_IOERR),
        (seg(u64::MAX / 2, 1, 0), 16, S_IOERR),
        (seg(0, 1, 2), 16, S_UNSUPP),
        (seg(0, MAX_DISCARD_SECTORS + 1, 0), 16, S_UNSUPP),
        (seg(0, 1, 0), 32, S_UNSUPP),
    ] {
        t.mem.write_slice(&s, GuestAddress(DATA)).unwrap();
        for ty in [T_DISCARD, T_WRITE_ZEROES] {
            t.header(ty, 0);
            assert_eq!(t.serve(&[hdr(), d(DATA, n, 0), status()]), 1);
            assert_eq!(t.status(), want, "{ty} {s:?} {n}");
        }
    }
}

#[test]
fn readonly_refuses_writes_as_the_spec_says() {
    let mut t = setup(true);
    let before = t.image();
    t.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    t.header(T_OUT, 0);
    assert_eq!(t.serve(&[hdr(), d(DATA, 512, 0), status()]), 1);
    assert_eq!(t.status(), S_IOERR);
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        t.header(ty, 0);
        assert_eq!(t.serve(&[hdr(), d(DATA, 16, 0), status()]), 1);
        assert_eq!(t.status(), S_UNSUPP);
    }
    // Reads still work.
    t.header(T_IN, 1);
    assert_eq!(t.serve(&[hdr(), d(DATA, 512, W), status()]), 513);
    assert_eq!(t.status(), S_OK);
    assert_eq!(t.image(), before);
}

/// Each malformed chain completes with IOERR (the image untouched).
#[test]
fn malformed_requests_fail_with_ioerr() {
    let mut t = setup(false);
    let before = t.image();
    let cases: Vec<(&str, u32, u64, Vec<Descriptor>)> = vec![
        (
            "header outside RAM",
            T_IN,
            0,
            vec![d(HOLE + 8, 16, 0), d(DATA, 512, W), status()],
        ),
        (
            "writable header",
            T_IN,
            0,
            vec![d(HDR, 16, W), d(DATA, 512, W), status()],
        ),
        (
            "short header",
            T_IN,
            0,
            vec![d(HDR, 15, 0), d(DATA, 512, W), status()],
        ),
        ("status descriptor only", T_IN, 0, vec![status()]),
        (
            "data in the hole",
            T_IN,
            0,
            vec![hdr(), d(HOLE + 0x1000, 512, W), status()],
        ),
        (
            "data across the hole",
            T_OUT,
            0,
            vec![hdr(), d(HOLE - 256, 512, 0), status()],
        ),
        (
            "data past the end of RAM",
            T_IN,
            0,
            vec![hdr(), d((3 << 20) - 256, 512, W), status()],
        ),
        (
            "address wraps",
            T_IN,
            0,
            vec![hdr(), d(u64::MAX - 255, 512, W), status()],
        ),
        (
            "read-only buffer for IN",
            T_IN,
            0,
            vec![hdr(), d(DATA, 512, 0), status()],
        ),
        (
            "writable buffer for OUT",
            T_OUT,
            0,
            vec![hdr(), d(DATA, 512, W), status()],
        ),
        (
            "not whole sectors",
            T_IN,
            0,
            vec![hdr(), d(DATA, 511, W), status()],
        ),
        (
            "sector beyond the end",
            T_IN,
            DISK / 512,
            vec![hdr(), d(DATA, 512, W), status()],
        ),
        (
            "range beyond the end",
            T_OUT,
            DISK / 512 - 1,
            vec![hdr(), d(DATA, 1024, 0), status()],
        ),
        (
            "sector overflows",
            T_OUT,
            u64::MAX / 256,
            vec![hdr(), d(DATA, 512, 0), status()],
        ),
        (
            "oversized",
            T_IN,
            0,
            vec![hdr(), d(DATA, !511u32, W), d(DATA, !511u32, W), status()],
        ),
        (
            "GET_ID buffer outside RAM",
            T_GET_ID,
            0,
            vec![hdr(), d(HOLE, 20, W), status()],
        ),
    ];
    for (what, ty, sector, chain) in cases {
        t.header(ty, sector);
        assert_eq!(t.serve(&chain), 1, "{what}");
        assert_eq!(t.status(), S_IOERR, "{what}");
    }
    let long: Vec<Descriptor> = std::iter::once(hdr())
        .chain(std::iter::repeat_n(d(DATA, 512, W), MAX_DESCRIPTORS))
        .chain(std::iter::once(status()))
        .collect();
    t.header(T_IN, 0);
    assert_eq!(t.serve(&long), 1, "too many descriptors");
    assert_eq!(t.status(), S_IOERR);
    assert_eq!(t.image(), before);
}

#[test]
fn unknown_type_is_unsupported() {
    let mut t = setup(false);
    for ty in [3, 5, 9, 12, 0xffff_ffff] {
        t.header(ty, 0);
        assert_eq!(t.serve(&[hdr(), status()]), 1);
        assert_eq!(t.status(), S_UNSUPP, "type {ty}");
    }
}

/// No writable status byte, or one outside RAM: nothing is reported (used length 0), nothing
/// done.
#[test]
fn no_status_byte_no_answer() {
    let mut t = setup(false);
    let before = t.image();
    t.mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    t.header(T_OUT, 0);
    for chain in [
        vec![],
        vec![hdr(), d(DATA, 512, 0)],
        vec![hdr(), d(DATA, 512, 0), d(STATUS, 0, W)],
        vec![hdr(), d(DATA, 512, 0), d(HOLE + 4, 1, W)],
        vec![hdr(), d(DATA, 512, 0), d(u64::MAX, 2, W)],
    ] {
        assert_eq!(t.serve(&chain), 0, "{chain:?}");
    }
    assert_eq!(t.image(), before);
}

/// Random chains (addresses near RAM's edges and the hole, random lengths, directions and
/// types): every one completes without a panic, with a valid status when it has one.
#[test]
fn random_chains_never_panic() {
    let mut t = setup(false);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let edges = [
        0,
        HDR,
        DATA,
        HOLE - 512,
        HOLE,
        2 << 20,
        (3 << 20) - 512,
        u64::MAX - 511,
    ];
    for _ in 0..20_000 {
        let ty = [
            T_IN,
            T_OUT,
            T_FLUSH,
            T_GET_ID,
            T_DISCARD,
            T_WRITE_ZEROES,
            77,
        ][rnd() as usize % 7];
        let sector = match rnd() % 4 {
            0 => rnd(),
            1 => DISK / 512 - (rnd() % 4),
            _ => rnd() % (DISK / 512),
        };
        t.header(ty, sector);
        let n = (rnd() % 6) as usize;
        let mut chain = vec![hdr()];
        for _ in 0..n {
            let addr = edges[rnd() as usize % edges.len()].wrapping_add(rnd() % 1024);
            let len = match rnd() % 4 {
                0 => rnd() as u32,
                1 => 16,
                _ => ((rnd() % 8) * 512) as u32,
            };
            chain.push(d(addr, len, if rnd() % 2 == 0 { W } else { 0 }));
        }
        if rnd() % 4 != 0 {
            chain.push(status());
        }
        let last = *chain.last().unwrap();
        let used = t.serve(&chain);
        if used > 0 {
            let at = GuestAddress(last.addr().0 + u64::from(last.len()) - 1);
            let s: u8 = t.mem.read_obj(at).unwrap();
            assert!([S_OK, S_IOERR, S_UNSUPP].contains(&s), "{chain:?}");
        }
    }
}

/// A read marks what the disk wrote into guest RAM in its dirty bitmap (the frontend's log
/// during a live migration), though it went through host pointers: the data's pages and the
/// status byte's, nothing else.
#[test]
fn a_read_marks_the_pages_it_wrote_dirty() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut t = setup(false);
    let mem: vm_memory::GuestMemoryMmap<AtomicBitmap> =
        vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&T_IN.to_le_bytes());
    // The header's page (1) is dirty from this write.
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let page = |p: u64| region.bitmap().dirty_at(p as usize * 4096);
    // 4608 bytes from 0x3100: pages 3 and 4; the status at 0x9000 (page 9).
    serve(&mem, &mut t.disk, &[hdr(), d(0x3100, 4608, W), status()]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert!(page(3) && page(4), "the data's pages");
    assert!(page(9), "the status byte's page");
    for p in [0, 2, 5, 6, 7, 8, 10] {
        assert!(!page(p), "page {p} was not written");
    }
}
