// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Hostile images: targeted corruptions must give clear errors, and a
//! bounded mutation run over valid images (the fuzz targets, run as a
//! normal test) must never panic.

mod common;

use block::fuzz::{
    fuzz_qcow2, fuzz_vhd, fuzz_vhdx, vhdx_fuzz_input, vhdx_image, VHDX_FIX_HEADERS, VHDX_FIX_LOG,
    VHDX_FIX_REGIONS,
};
use block::qcow2::{create, CreateOptions};
use block::vhdx::header::{
    parse_regions, VhdxHeader, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE, REGION1_OFFSET,
    REGION_SIZE,
};
use block::vhdx::log::{build_entry, Descriptor};
use block::{open_disk, DiskFileExt, Error, OpenOptions};
use common::*;

type Seeds = Vec<Vec<u8>>;

const VHDX_FIX_ALL: u8 = VHDX_FIX_HEADERS | VHDX_FIX_REGIONS | VHDX_FIX_LOG;

fn seeds(dir: &std::path::Path) -> (Seeds, Seeds, Seeds) {
    let raw = p(dir, "r.raw");
    write_raw(&raw, &pattern(256 << 10, 1));
    let mut q = Vec::new();
    for (i, o) in [
        "compat=1.1,cluster_size=512",
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=4096,compression_type=zstd",
    ]
    .iter()
    .enumerate()
    {
        let img = p(dir, &format!("s{i}.qcow2"));
        let mut args = vec!["convert", "-O", "qcow2", "-o", o];
        if i == 2 {
            args.push("-c");
        }
        args.push(raw.to_str().unwrap());
        args.push(img.to_str().unwrap());
        qemu_img(&args);
        q.push(std::fs::read(&img).unwrap());
    }
    // Committed corpus too (fuzz/corpus/qcow2, at the workspace root).
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2");
    if let Ok(rd) = std::fs::read_dir(corpus) {
        for e in rd.flatten() {
            q.push(std::fs::read(e.path()).unwrap());
        }
    }
    // vhdx fuzz inputs: sparse encodings of images (block::fuzz::fuzz_vhdx).
    let mut x = Vec::new();
    for o in [
        "subformat=dynamic,block_size=1M,log_size=1M",
        "subformat=fixed,block_size=1M,log_size=1M",
    ] {
        let img = p(dir, "s.vhdx");
        let _ = std::fs::remove_file(&img);
        qemu_img(&[
            "convert",
            "-O",
            "vhdx",
            "-o",
            o,
            raw.to_str().unwrap(),
            img.to_str().unwrap(),
        ]);
        let image = std::fs::read(&img).unwrap();
        x.push(vhdx_fuzz_input(&image, VHDX_FIX_ALL));
    }
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vhdx");
    if let Ok(rd) = std::fs::read_dir(corpus) {
        for e in rd.flatten() {
            x.push(std::fs::read(e.path()).unwrap());
        }
    }
    let img = p(dir, "s.vhd");
    qemu_img(&[
        "convert",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let v = vec![std::fs::read(&img).unwrap()];
    (q, x, v)
}

const HOT: [usize; 8] = [
    0,
    64 << 10,
    128 << 10,
    192 << 10,
    256 << 10,
    1 << 20,
    2 << 20,
    3 << 20,
];

fn mutate(r: &mut Rng, src: &[u8]) -> Vec<u8> {
    let mut d = src.to_vec();
    for _ in 0..1 + r.below(6) {
        if d.is_empty() {
            break;
        }
        let pos = match r.below(4) {
            0 | 1 => r.below(512.min(d.len() as u64)) as usize,
            2 => (HOT[r.below(8) as usize] + r.below(4096) as usize).min(d.len() - 1),
            _ => r.below(d.len() as u64) as usize,
        };
        match r.below(5) {
            0 => d[pos] = r.next() as u8,
            1 => d[pos] ^= 1 << r.below(8),
            2 => {
                let vals = [
                    0u64,
                    1,
                    u64::MAX,
                    u32::MAX as u64,
                    1 << 63,
                    d.len() as u64,
                    r.next(),
                    0x200,
                    0x10000,
                ];
                let v = vals[r.below(vals.len() as u64) as usize];
                let bytes = if r.below(2) == 0 {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                };
                let end = (pos + 8).min(d.len());
                d[pos..end].copy_from_slice(&bytes[..end - pos]);
            }
            3 => d.truncate(pos),
            _ => {
                // Copy 8 bytes from elsewhere (tables pointing at each other).
                let from = r.below(d.len() as u64) as usize;
                for k in 0..8 {
                    if pos + k < d.len() && from + k < d.len() {
                        d[pos + k] = d[from + k];
                    }
                }
            }
        }
    }
    d
}

#[test]
fn mutated_images_never_panic() {
    let d = tmpdir();
    let (q, x, v) = seeds(d.path());
    let mut r = Rng::new(2024);
    for s in &q {
        fuzz_qcow2(s);
    }
    for s in &x {
        fuzz_vhdx(s);
    }
    for i in 0..3000 {
        let s = &q[i % q.len()];
        fuzz_qcow2(&mutate(&mut r, s));
    }
    for i in 0..400 {
        let s = &x[i % x.len()];
        fuzz_vhdx(&mutate(&mut r, s));
    }
    for _ in 0..1000 {
        fuzz_vhd(&mutate(&mut r, &v[0]));
    }
}

fn patch(path: &std::path::Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(path: &std::path::Path) -> Error {
    open_disk(
        path,
        &OpenOptions {
            readonly: true,
            ..Default::default()
        },
    )
    .err()
    .expect("hostile image must be rejected")
}

#[test]
fn targeted_qcow2_corruptions() {
    let d = tmpdir();
    let base = p(d.path(), "base.qcow2");
    create(&base, &CreateOptions::new(16 << 20)).unwrap();
    {
        let mut disk = open(&base, false);
        disk.write_all_at(0, &[1u8; 70000]).unwrap();
    }
    let case = |name: &str, off: u64, bytes: &[u8]| {
        let img = p(d.path(), name);
        std::fs::copy(&base, &img).unwrap();
        patch(&img, off, bytes);
        img
    };
    // Huge L1 (l1_size at 36).
    let e = open_err(&case("l1.qcow2", 36, &u32::MAX.to_be_bytes()));
    assert!(e.to_string().contains("L1"), "{e}");
    // Absurd virtual size (size at 24).
    let e = open_err(&case("size.qcow2", 24, &(1u64 << 62).to_be_bytes()));
    assert!(e.to_string().contains("size"), "{e}");
    // Refcount table beyond the end of the file.
    let e = open_err(&case("rt.qcow2", 48, &(1u64 << 40).to_be_bytes()));
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    // Bad cluster bits.
    let e = open_err(&case("cb.qcow2", 20, &40u32.to_be_bytes()));
    assert!(e.to_string().contains("cluster_bits"), "{e}");
    // Truncated file.
    let img = p(d.path(), "trunc.qcow2");
    std::fs::copy(&base, &img).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(
        open_err(&img),
        Error::Invalid { .. } | Error::Io(_)
    ));

    // L1 entry pointing beyond the file: open works, the request fails.
    let l1_off = u64::from_be_bytes(std::fs::read(&base).unwrap()[40..48].try_into().unwrap());
    let img = case(
        "l1far.qcow2",
        l1_off,
        &((1u64 << 63) | (1 << 40)).to_be_bytes(),
    );
    let mut disk = open(&img, true);
    let mut buf = [0u8; 512];
    assert!(disk.read_exact_at(0, &mut buf).is_err());
    drop(disk);
    // L1 entry pointing at the header cluster (table pointing at metadata):
    // a write through it must fail rather than corrupt the header.
    let img = case(
        "l1hdr.qcow2",
        l1_off,
        &((1u64 << 63) | l1_off).to_be_bytes(),
    );
    let mut disk = open(&img, false);
    let e = disk.write_all_at(0, &[9u8; 512]);
    assert!(
        e.is_err(),
        "write through an L2 table that is the L1 table must fail"
    );
    drop(disk);
    let hdr = std::fs::read(&img).unwrap();
    assert_eq!(&hdr[..4], b"QFI\xfb");
}

#[test]
fn targeted_vhd_and_vhdx_corruptions() {
    let d = tmpdir();
    let vhd = p(d.path(), "f.vhd");
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        vhd.to_str().unwrap(),
        "1M",
    ]);
    let len = std::fs::metadata(&vhd).unwrap().len();
    // Size larger than the data area (checksum recomputed so it is "valid").
    let mut f = std::fs::read(&vhd).unwrap();
    let foot = (len - 512) as usize;
    f[foot + 48..foot + 56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let mut arr = [0u8; 512];
    arr.copy_from_slice(&f[foot..]);
    let c = block::vhd::checksum(&arr);
    f[foot + 64..foot + 68].copy_from_slice(&c.to_be_bytes());
    std::fs::write(&vhd, &f).unwrap();
    let e = open_disk(
        &vhd,
        &OpenOptions {
            readonly: true,
            image_type: Some(block::ImageType::Vhd),
            ..Default::default()
        },
    )
    .err()
    .expect("must fail");
    assert!(e.to_string().contains("exceeds"), "{e}");

    let vhdx = p(d.path(), "d.vhdx");
    qemu_img(&["create", "-f", "vhdx", vhdx.to_str().unwrap(), "8M"]);
    // Both headers broken.
    patch(&vhdx, 64 << 10, b"XXXX");
    patch(&vhdx, 128 << 10, b"XXXX");
    let e = open_err(&vhdx);
    assert!(e.to_string().contains("header"), "{e}");
}

#[test]
fn vhdx_fuzz_input_describes_the_image() {
    let d = tmpdir();
    let img = p(d.path(), "e.vhdx");
    qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=1M,log_size=1M",
        img.to_str().unwrap(),
        "4M",
    ]);
    // Non-zero runs longer than one record can hold (64 KiB), and an odd tail.
    qemu_io(
        "vhdx",
        &img,
        &[
            "write -P 0x5a 1M 200k".into(),
            "write -P 0xa5 3584k 512".into(),
        ],
    );
    let mut image = std::fs::read(&img).unwrap();
    image.extend_from_slice(&[7u8; 100]);
    let enc = vhdx_fuzz_input(&image, 0);
    assert!(
        enc.len() < image.len() / 8,
        "{} of {}",
        enc.len(),
        image.len()
    );
    assert_eq!(vhdx_image(&enc), image);

    // A header changed without its checksum: kept broken unless the input
    // asks for the checksum to be recomputed.
    let h1 = HEADER1_OFFSET as usize;
    image[h1 + 8] ^= 0x40;
    let header = |flags| {
        let im = vhdx_image(&vhdx_fuzz_input(&image, flags));
        VhdxHeader::parse(&im[h1..h1 + HEADER_SIZE])
    };
    assert!(header(0).is_none());
    let fixed = header(VHDX_FIX_HEADERS).expect("checksum recomputed");
    assert_eq!(fixed.sequence.to_le_bytes()[0], image[h1 + 8]);
}

/// A dynamic vhdx (1 MiB blocks) whose first block holds 0x5a bytes.
fn vhdx_with_data(dir: &std::path::Path, name: &str, log_size: &str) -> std::path::PathBuf {
    let img = p(dir, name);
    qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        &format!("subformat=dynamic,block_size=1M,log_size={log_size}"),
        img.to_str().unwrap(),
        "4M",
    ]);
    qemu_io("vhdx", &img, &["write -P 0x5a 0 1M".into()]);
    img
}

/// Change both vhdx headers (checksums recomputed).
fn vhdx_edit_headers(img: &std::path::Path, f: impl Fn(&mut VhdxHeader)) -> VhdxHeader {
    let all = std::fs::read(img).unwrap();
    let mut last = None;
    for off in [HEADER1_OFFSET, HEADER2_OFFSET] {
        let o = off as usize;
        let mut h = VhdxHeader::parse(&all[o..o + HEADER_SIZE]).expect("valid header");
        f(&mut h);
        patch(img, off, &h.serialize());
        last = Some(h);
    }
    last.unwrap()
}

/// Host offset of the BAT.
fn vhdx_bat_offset(img: &std::path::Path) -> u64 {
    let all = std::fs::read(img).unwrap();
    let r = REGION1_OFFSET as usize;
    parse_regions(&all[r..r + REGION_SIZE]).unwrap().bat_offset
}

fn open_rw_vhdx(img: &std::path::Path) -> block::Result<Box<dyn block::DiskFile>> {
    open_disk(img, &OpenOptions::default())
}

// Found by the vhdx fuzz target: a log region at the end of the address
// space (unused when the log is clean) made the overlap check of every
// payload block overflow.
#[test]
fn vhdx_log_region_at_the_end_of_the_address_space() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "l.vhdx", "1M");
    vhdx_edit_headers(&img, |h| h.log_offset = !((1u64 << 20) - 1));
    let mut disk = open(&img, true);
    let mut buf = vec![0u8; 4096];
    disk.read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

// A BAT entry pointing at the end of the address space: an error for the
// requests through it, never an overflow.
#[test]
fn vhdx_bat_entry_at_the_end_of_the_address_space() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "b.vhdx", "1M");
    let bat = vhdx_bat_offset(&img);
    let entry = (!((1u64 << 20) - 1)) | block::vhdx::PAYLOAD_FULLY_PRESENT;
    patch(&img, bat, &entry.to_le_bytes());
    let mut disk = open_rw_vhdx(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(disk.read_exact_at(0, &mut buf).is_err());
    assert!(disk.read_exact_at((1 << 20) - 4096, &mut buf).is_err());
    assert!(disk.write_all_at(0, &buf).is_err());
    assert!(disk.discard(0, 1 << 20).is_err());
}

// A BAT entry pointing at the file's header section: discarding that block
// must not punch a hole into the headers and region tables.
#[test]
fn vhdx_discard_through_bat_entry_pointing_at_metadata() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "m.vhdx", "1M");
    let bat = vhdx_bat_offset(&img);
    for (i, target) in [0, bat].into_iter().enumerate() {
        let img2 = p(d.path(), &format!("m{i}.vhdx"));
        std::fs::copy(&img, &img2).unwrap();
        let entry = target | block::vhdx::PAYLOAD_FULLY_PRESENT;
        patch(&img2, bat, &entry.to_le_bytes());
        let mut disk = open_rw_vhdx(&img2).unwrap();
        let e = disk.discard(0, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("overlaps metadata"), "{e}");
        drop(disk);
        // Still a valid image, the entry unchanged.
        let mut disk = open(&img2, true);
        let mut buf = [0u8; 512];
        assert!(disk.read_exact_at(0, &mut buf).is_err());
        drop(disk);
        let all = std::fs::read(&img2).unwrap();
        let b = bat as usize;
        assert_eq!(all[b..b + 8], entry.to_le_bytes());
    }
}

/// Put a log entry at the image's log offset and make the log dirty.
fn vhdx_dirty_log(img: &std::path::Path, entry: &[u8], guid: [u8; 16]) {
    let h = vhdx_edit_headers(img, |h| h.log_guid = guid);
    patch(img, h.log_offset, entry);
}

// A log descriptor writing at the end of the address space: a clear error
// at open, no overflow.
#[test]
fn vhdx_log_descriptor_at_the_end_of_the_address_space() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "ld.vhdx", "1M");
    let guid = [0x77; 16];
    let len = std::fs::metadata(&img).unwrap().len();
    let entry = build_entry(
        &guid,
        1,
        0,
        len,
        &[Descriptor::Data {
            file_offset: !4095u64,
            data: Box::new([1u8; 4096]),
        }],
    );
    vhdx_dirty_log(&img, &entry, guid);
    let e = open_rw_vhdx(&img).err().expect("must be rejected");
    assert!(e.to_string().contains("beyond the file"), "{e}");
}

// Two entries with the largest sequence number, the second (the head)
// naming the first as its tail: the check that they are consecutive must
// not overflow.
#[test]
fn vhdx_log_sequence_number_at_its_maximum() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "ls.vhdx", "1M");
    let guid = [0x78; 16];
    let len = std::fs::metadata(&img).unwrap().len();
    let mut log = build_entry(&guid, u64::MAX, 0, len, &[]);
    log.extend(build_entry(&guid, u64::MAX, 0, len, &[]));
    vhdx_dirty_log(&img, &log, guid);
    let e = open_rw_vhdx(&img).err().expect("must be rejected");
    assert!(e.to_string().contains("not consecutive"), "{e}");
}

// A log with an entry header in every sector, each claiming the whole log
// (checksums wrong): rejected after checksumming a bounded amount, not
// after (log length / 4 KiB) x log length bytes (4 GiB here).
#[test]
fn vhdx_log_of_overlapping_entries_is_rejected_quickly() {
    let d = tmpdir();
    let img = vhdx_with_data(d.path(), "lo.vhdx", "4M");
    let guid = [0x79; 16];
    let log_len = 4usize << 20;
    let mut log = vec![0u8; log_len];
    for s in log.chunks_exact_mut(4096) {
        s[0..4].copy_from_slice(b"loge");
        s[8..12].copy_from_slice(&(log_len as u32).to_le_bytes());
        s[32..48].copy_from_slice(&guid);
    }
    vhdx_dirty_log(&img, &log, guid);
    let t = std::time::Instant::now();
    let e = open_rw_vhdx(&img).err().expect("must be rejected");
    assert!(e.to_string().contains("overlap"), "{e}");
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
}

// An L2 entry pointing at the L1 table: discarding that guest cluster must
// neither punch a hole into the L1 table nor drop its refcount.
#[test]
fn qcow2_discard_through_l2_entry_pointing_at_l1() {
    let d = tmpdir();
    let img = p(d.path(), "d.qcow2");
    create(&img, &CreateOptions::new(16 << 20)).unwrap();
    {
        let mut disk = open(&img, false);
        disk.write_all_at(0, &[1u8; 4096]).unwrap();
    }
    let all = std::fs::read(&img).unwrap();
    let be = |o: usize| u64::from_be_bytes(all[o..o + 8].try_into().unwrap());
    let l1_off = be(40);
    let l2_off = be(l1_off as usize) & 0x00ff_ffff_ffff_fe00;
    // Guest cluster 2 -> the L1 table's cluster.
    patch(&img, l2_off + 16, &((1u64 << 63) | l1_off).to_be_bytes());
    let cs = 1u64 << u32::from_be_bytes(all[20..24].try_into().unwrap());
    {
        let mut disk = open(&img, false);
        disk.discard(2 * cs, cs).unwrap();
        disk.flush().unwrap();
    }
    let mut disk = open(&img, true);
    let mut buf = vec![0u8; 4096];
    disk.read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "data lost: L1 table punched");
    drop(disk);
    qemu_check("qcow2", &img);
}
