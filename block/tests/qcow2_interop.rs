// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! qcow2 interoperability with qemu-img / qemu-io, both ways.

mod common;

use block::qcow2::{create, CreateOptions};
use block::{open_disk, DiskFileExt, Error, ImageType, OpenOptions};
use common::*;

const SIZE: usize = 8 << 20;

fn qemu_made(opts: &str, extra: &[&str]) {
    let d = tmpdir();
    let raw = p(d.path(), "ref.raw");
    let img = p(d.path(), "img.qcow2");
    let data = pattern(SIZE, 7);
    write_raw(&raw, &data);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
    args.extend_from_slice(extra);
    args.push(raw.to_str().unwrap());
    args.push(img.to_str().unwrap());
    qemu_img(&args);
    let mut disk = open(&img, true);
    assert_eq!(disk.image_type(), ImageType::Qcow2);
    assert_eq!(disk.size(), SIZE as u64);
    assert!(
        read_all(disk.as_mut()) == data,
        "content differs for {opts} {extra:?}"
    );
    drop(disk);
    // Write through our code on top of qemu's layout (COW of compressed
    // clusters included), then let qemu judge.
    let mut model = data.clone();
    let mut disk = open(&img, false);
    random_ops(disk.as_mut(), &mut model, 11, 60, true);
    disk.flush().unwrap();
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    write_raw(&raw, &model);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &raw);
}

#[test]
fn reads_qemu_v3() {
    qemu_made("compat=1.1", &[]);
}

#[test]
fn reads_qemu_v2() {
    qemu_made("compat=0.10", &[]);
}

#[test]
fn reads_qemu_small_clusters() {
    qemu_made("compat=1.1,cluster_size=4096", &[]);
}

#[test]
fn reads_qemu_compressed_zlib() {
    qemu_made("compat=1.1", &["-c"]);
}

#[test]
fn reads_qemu_compressed_zstd() {
    qemu_made("compat=1.1,compression_type=zstd", &["-c"]);
}

#[test]
fn reads_qemu_compressed_v2() {
    qemu_made("compat=0.10,cluster_size=65536", &["-c"]);
}

#[test]
fn reads_qemu_io_writes_and_zero_clusters() {
    let d = tmpdir();
    let img = p(d.path(), "img.qcow2");
    let raw = p(d.path(), "ref.raw");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xab 0 1M".into(),
            "write -P 0x11 300000 5000".into(),
            "write -z 65536 131072".into(),
            "write -P 0x22 3M 64k".into(),
            "discard 3M 64k".into(),
        ],
    );
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let expect = std::fs::read(&raw).unwrap();
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == expect);
    assert_eq!(expect[0], 0xab);
    assert_eq!(expect[65536], 0);
    assert_eq!(expect[300000 + 4999], 0x11);
}

fn ours(version: u32, cluster_bits: u32, size: usize, ops: usize) {
    let d = tmpdir();
    let img = p(d.path(), "ours.qcow2");
    let raw = p(d.path(), "ref.raw");
    let mut o = CreateOptions::new(size as u64);
    o.version = version;
    o.cluster_bits = cluster_bits;
    create(&img, &o).unwrap();
    qemu_check("qcow2", &img);
    let mut model = vec![0u8; size];
    let mut disk = open(&img, false);
    random_ops(
        disk.as_mut(),
        &mut model,
        version as u64 * 100 + cluster_bits as u64,
        ops,
        true,
    );
    drop(disk);
    // Reopen: metadata written at close must read back.
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    write_raw(&raw, &model);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &raw);
    let info = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(
        info.contains(if version == 3 {
            "compat: 1.1"
        } else {
            "compat: 0.10"
        }),
        "{info}"
    );
}

#[test]
fn ours_v3_pass_qemu_check() {
    ours(3, 16, SIZE, 150);
}

#[test]
fn ours_v2_pass_qemu_check() {
    ours(2, 16, SIZE, 150);
}

#[test]
fn ours_small_clusters_grow_refcount_table() {
    // 512-byte clusters: one refcount block covers 128 KiB and one refcount
    // table cluster 8 MiB, so writing 16 MiB forces table growth.
    let size = 16 << 20;
    let d = tmpdir();
    let img = p(d.path(), "small.qcow2");
    let raw = p(d.path(), "ref.raw");
    let mut o = CreateOptions::new(size as u64);
    o.cluster_bits = 9;
    create(&img, &o).unwrap();
    let data = pattern(size, 3);
    let mut disk = open(&img, false);
    for (i, c) in data.chunks(1 << 20).enumerate() {
        disk.write_all_at((i as u64) << 20, c).unwrap();
    }
    disk.flush().unwrap();
    assert!(read_all(disk.as_mut()) == data);
    drop(disk);
    write_raw(&raw, &data);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &raw);
}

#[test]
fn backing_chain_relative_paths() {
    let d = tmpdir();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let base = p(d.path(), "base.raw");
    let mid = p(d.path(), "sub/mid.qcow2");
    let top = p(d.path(), "sub/top.qcow2");
    let flat = p(d.path(), "flat.raw");
    let data = pattern(SIZE, 5);
    write_raw(&base, &data);
    // mid names "../base.raw", relative to sub/ (its own directory).
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    qemu_io("qcow2", &mid, &["write -P 0x33 1M 100k".into()]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x44 1500k 3k".into(), "write -z 4M 128k".into()],
    );
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let expect = std::fs::read(&flat).unwrap();
    let mut disk = open(&top, true);
    assert!(read_all(disk.as_mut()) == expect);
    drop(disk);

    // Partial-cluster writes copy the rest of the cluster up from the chain.
    let mut model = expect.clone();
    let mut disk = open(&top, false);
    random_ops(disk.as_mut(), &mut model, 99, 60, true);
    drop(disk);
    write_raw(&flat, &model);
    qemu_check("qcow2", &top);
    qemu_compare("qcow2", &top, &flat);
    // The base must be untouched.
    assert!(std::fs::read(&base).unwrap() == data);

    // Our own image on top of a qcow2 backing file.
    let ours = p(d.path(), "ours.qcow2");
    let mut o = CreateOptions::new(SIZE as u64);
    o.backing_file = Some("sub/top.qcow2".into());
    o.backing_format = Some(ImageType::Qcow2);
    create(&ours, &o).unwrap();
    let mut disk = open(&ours, false);
    assert!(read_all(disk.as_mut()) == model);
    disk.write_all_at(12345, b"hello").unwrap();
    drop(disk);
    model[12345..12350].copy_from_slice(b"hello");
    write_raw(&flat, &model);
    qemu_check("qcow2", &ours);
    qemu_compare("qcow2", &ours, &flat);
}

#[test]
fn backing_files_disabled_by_default_and_loops_rejected() {
    let d = tmpdir();
    let a = p(d.path(), "a.qcow2");
    let b = p(d.path(), "b.qcow2");
    let mut o = CreateOptions::new(1 << 20);
    o.backing_file = Some("b.qcow2".into());
    create(&a, &o).unwrap();
    o.backing_file = Some("a.qcow2".into());
    create(&b, &o).unwrap();
    let err = open_disk(&a, &OpenOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::BackingDisabled { .. }), "{err}");
    let err = open_disk(
        &a,
        &OpenOptions {
            readonly: true,
            backing_files: true,
            ..Default::default()
        },
    )
    .err()
    .expect("must fail");
    assert!(matches!(err, Error::BackingChain(_)), "{err}");
}

#[test]
fn second_writer_is_locked_out() {
    let d = tmpdir();
    let img = p(d.path(), "l.qcow2");
    create(&img, &CreateOptions::new(1 << 20)).unwrap();
    let _first = open(&img, false);
    let err = open_disk(&img, &OpenOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Locked(_)), "{err}");
    let err = open_disk(
        &img,
        &OpenOptions {
            readonly: true,
            ..Default::default()
        },
    )
    .err()
    .expect("reader must fail while a writer holds it");
    assert!(matches!(err, Error::Locked(_)), "{err}");
}

#[test]
fn readers_share() {
    let d = tmpdir();
    let img = p(d.path(), "r.qcow2");
    create(&img, &CreateOptions::new(1 << 20)).unwrap();
    let _a = open(&img, true);
    let _b = open(&img, true);
    let err = open_disk(&img, &OpenOptions::default())
        .err()
        .expect("writer must fail");
    assert!(matches!(err, Error::Locked(_)), "{err}");
}

#[test]
fn freed_clusters_are_reused() {
    let d = tmpdir();
    let img = p(d.path(), "reuse.qcow2");
    let raw = p(d.path(), "reuse.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    let mut model = vec![0u8; SIZE];
    let mut disk = open(&img, false);
    let mut r = Rng::new(11);
    // 1 MiB of data at 0, made durable, then discarded and released.
    let mut buf = vec![0u8; 1 << 20];
    r.fill(&mut buf);
    disk.write_all_at(0, &buf).unwrap();
    disk.flush().unwrap();
    let grown = std::fs::metadata(&img).unwrap().len();
    disk.discard(0, 1 << 20).unwrap();
    disk.flush().unwrap();
    // New data elsewhere (whole and partial clusters) fits in the freed
    // space: the file does not grow.
    r.fill(&mut buf);
    disk.write_all_at(4 << 20, &buf[..512 << 10]).unwrap();
    // 448 KiB at an unaligned offset touches 8 clusters: 16 in all.
    let part = &buf[512 << 10..(960 << 10)];
    disk.write_all_at((6 << 20) + 1000, part).unwrap();
    model[4 << 20..(4 << 20) + (512 << 10)].copy_from_slice(&buf[..512 << 10]);
    model[(6 << 20) + 1000..(6 << 20) + 1000 + part.len()].copy_from_slice(part);
    disk.flush().unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), grown);
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    qemu_check("qcow2", &img);
    write_raw(&raw, &model);
    qemu_compare("qcow2", &img, &raw);
}

#[test]
fn clusters_free_at_open_are_reused() {
    let d = tmpdir();
    let img = p(d.path(), "holes.qcow2");
    let raw = p(d.path(), "holes.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "8M"]);
    // qemu writes 2 MiB, then discards the first one: 16 clusters with a
    // refcount of zero in the middle of the file.
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x21 0 2M".into(), "discard 0 1M".into()],
    );
    let len = std::fs::metadata(&img).unwrap().len();
    let mut model = vec![0u8; SIZE];
    model[1 << 20..2 << 20].fill(0x21);
    let mut disk = open(&img, false);
    // Whole and partial clusters, plus a range that needs a new L2 entry
    // only: all fit in the freed space.
    let mut buf = vec![0u8; 1 << 20];
    Rng::new(3).fill(&mut buf);
    disk.write_all_at(5 << 20, &buf[..640 << 10]).unwrap();
    disk.write_all_at((7 << 20) + 512, &buf[640 << 10..(1000 << 10)])
        .unwrap();
    model[5 << 20..(5 << 20) + (640 << 10)].copy_from_slice(&buf[..640 << 10]);
    model[(7 << 20) + 512..(7 << 20) + 512 + (360 << 10)]
        .copy_from_slice(&buf[640 << 10..(1000 << 10)]);
    disk.flush().unwrap();
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len);
    qemu_check("qcow2", &img);
    write_raw(&raw, &model);
    qemu_compare("qcow2", &img, &raw);
}

/// Compressed clusters read in small pieces, in an order that makes the
/// decoder stop early and then go further in the same cluster: every piece
/// must be the right one (each 64-byte line of the data names its own offset,
/// so a piece from elsewhere in the cluster differs), with zlib and zstd.
#[test]
fn compressed_clusters_read_in_pieces() {
    for opts in ["compat=1.1", "compat=1.1,compression_type=zstd"] {
        let d = tmpdir();
        let raw = p(d.path(), "lines.raw");
        let img = p(d.path(), "lines.qcow2");
        let size = 1usize << 20;
        let data = numbered_lines(size);
        write_raw(&raw, &data);
        qemu_compress(&raw, &img, opts);
        assert!(
            std::fs::metadata(&img).unwrap().len() < size as u64 / 2,
            "{opts}: the clusters were not stored compressed"
        );
        let mut disk = open(&img, true);
        const CS: usize = 65536;
        for cluster in (0..size).step_by(CS) {
            for (at, len) in [
                (32768, 4096),
                (0, 4096),
                (61440, 4096),
                (4096, 512),
                (65024, 512),
            ] {
                let off = cluster + at;
                let mut got = vec![0u8; len];
                disk.read_exact_at(off as u64, &mut got).unwrap();
                assert!(
                    got == data[off..off + len],
                    "{opts}: {len} bytes at {off:#x}"
                );
            }
        }
    }
}

/// A qcow2 image qemu-img made grows (`DiskFile::resize`): the old data stays, the new range
/// reads zero and takes writes, and qemu-img sees the new virtual size, a clean image and the
/// same bytes. Shrinking, a size past qcow2's limit and a read-only image are refused.
#[test]
fn grows_as_qemu_sees_it() {
    let d = tmpdir();
    let (raw, img) = (p(d.path(), "ref.raw"), p(d.path(), "img.qcow2"));
    let data = pattern(1 << 20, 5);
    write_raw(&raw, &data);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let mut disk = open(&img, false);
    for (bad, why) in [(512 << 10, "only grows"), (1 << 57, "at most")] {
        let e = disk.resize(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    disk.resize(4 << 20).unwrap();
    assert_eq!(disk.size(), 4 << 20);
    let mut model = data.clone();
    model.resize(4 << 20, 0);
    assert!(read_all(disk.as_mut()) == model);
    let tail = pattern(4096, 9);
    disk.write_all_at((4 << 20) - 4096, &tail).unwrap();
    model[(4 << 20) - 4096..].copy_from_slice(&tail);
    disk.flush().unwrap();
    drop(disk);
    let info = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    write_raw(&raw, &model);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &raw);
    let mut ro = open(&img, true);
    assert!(ro
        .resize(8 << 20)
        .unwrap_err()
        .to_string()
        .contains("read-only"));
}

/// Growing past what the L1 table maps moves the table: with 512-byte clusters a 1 MiB image's
/// L1 has 32 entries in one cluster, and 4 MiB needs 128 in two. The table moves to new
/// clusters, the header points to it, the old cluster is freed; data written before and after
/// (in the new entries' range too) reads back, and qemu-img finds the image clean and the same.
#[test]
fn grows_its_l1_table_as_qemu_does() {
    let d = tmpdir();
    let (raw, img) = (p(d.path(), "ref.raw"), p(d.path(), "img.qcow2"));
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        img.to_str().unwrap(),
        "1M",
    ]);
    let mut disk = open(&img, false);
    let mut model = vec![0u8; 1 << 20];
    let head = pattern(64 << 10, 3);
    disk.write_all_at(4096, &head).unwrap();
    model[4096..4096 + head.len()].copy_from_slice(&head);
    // Unflushed when the table moves: its entries must come along.
    let last = pattern(4096, 4);
    disk.write_all_at((1 << 20) - 4096, &last).unwrap();
    model[(1 << 20) - 4096..].copy_from_slice(&last);
    let l1_before = l1_offset(&img);
    disk.resize(4 << 20).unwrap();
    assert_eq!(disk.size(), 4 << 20);
    model.resize(4 << 20, 0);
    assert!(read_all(disk.as_mut()) == model);
    for (at, seed) in [(2 << 20, 6), ((4 << 20) - 512, 7)] {
        let data = pattern(512, seed);
        disk.write_all_at(at, &data).unwrap();
        model[at as usize..at as usize + 512].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    drop(disk);
    assert_ne!(l1_offset(&img), l1_before, "the L1 table moved");
    let info = qemu_img(&["info", img.to_str().unwrap()]);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    // Clean, with no leaked cluster either (the old table's was freed): qemu-img check exits 0.
    let check = qemu_img(&["check", "-f", "qcow2", img.to_str().unwrap()]);
    assert!(check.contains("No errors were found"), "{check}");
    write_raw(&raw, &model);
    qemu_compare("qcow2", &img, &raw);
    // Reopened, it reads the same.
    let mut disk = open(&img, false);
    assert!(read_all(disk.as_mut()) == model);
}

/// The L1 table's offset in the header (bytes 40-47, big-endian).
fn l1_offset(img: &std::path::Path) -> u64 {
    let mut h = [0u8; 48];
    std::io::Read::read_exact(&mut std::fs::File::open(img).unwrap(), &mut h).unwrap();
    u64::from_be_bytes(h[40..48].try_into().unwrap())
}
