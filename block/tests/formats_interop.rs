// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! vhdx, vhd and raw interoperability with qemu-img, format detection,
//! vhdx log replay and the asynchronous path.

mod common;

use block::vhdx::header::{VhdxHeader, HEADER1_OFFSET, HEADER2_OFFSET};
use block::vhdx::log::{build_entry, Descriptor};
use block::{open_disk, AsyncDisk, DiskFileExt, ImageType, OpenOptions};
use common::*;
use std::os::unix::fs::FileExt;

const SIZE: usize = 8 << 20;

fn round_trip(fmt: &str, opts: &str, t: ImageType) {
    let d = tmpdir();
    let raw = p(d.path(), "ref.raw");
    let img = p(d.path(), "img");
    let data = pattern(SIZE, 21);
    write_raw(&raw, &data);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        fmt,
        "-o",
        opts,
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let mut disk = open(&img, true);
    assert_eq!(disk.image_type(), t, "detection of {fmt} {opts}");
    assert!(disk.size() >= SIZE as u64);
    let size = disk.size() as usize;
    let mut expect = data.clone();
    expect.resize(size, 0);
    assert!(read_all(disk.as_mut()) == expect, "{fmt} {opts} content");
    drop(disk);
    let mut model = expect;
    let mut disk = open_as(&img, t, false);
    random_ops(disk.as_mut(), &mut model, 5, 80, true);
    disk.flush().unwrap();
    drop(disk);
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == model);
    drop(disk);
    write_raw(&raw, &model);
    if fmt != "vpc" && fmt != "raw" {
        qemu_check(fmt, &img);
    }
    qemu_compare(fmt, &img, &raw);
}

#[test]
fn vhdx_dynamic() {
    round_trip("vhdx", "subformat=dynamic,block_size=1M", ImageType::Vhdx);
}

#[test]
fn vhdx_dynamic_default_block_size() {
    round_trip("vhdx", "subformat=dynamic", ImageType::Vhdx);
}

#[test]
fn vhdx_fixed() {
    round_trip("vhdx", "subformat=fixed", ImageType::Vhdx);
}

#[test]
fn vhd_fixed() {
    round_trip("vpc", "subformat=fixed", ImageType::Vhd);
}

#[test]
fn raw_plain() {
    round_trip("raw", "preallocation=off", ImageType::Raw);
}

#[test]
fn vhdx_qemu_io_writes() {
    let d = tmpdir();
    let img = p(d.path(), "w.vhdx");
    let flat = p(d.path(), "flat.raw");
    qemu_img(&["create", "-f", "vhdx", img.to_str().unwrap(), "6M"]);
    qemu_io(
        "vhdx",
        &img,
        &[
            "write -P 0x5a 1000k 300k".into(),
            "write -P 0x7 5M 4k".into(),
        ],
    );
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let expect = std::fs::read(&flat).unwrap();
    assert_eq!(expect[1000 * 1024], 0x5a);
    let mut disk = open(&img, true);
    assert!(read_all(disk.as_mut()) == expect);
}

#[test]
fn vhdx_dirty_log_is_replayed() {
    let d = tmpdir();
    let img = p(d.path(), "log.vhdx");
    qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed,log_size=1M",
        img.to_str().unwrap(),
        "4M",
    ]);
    qemu_io("vhdx", &img, &["write -P 0xEE 0 4k".into()]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut hb = vec![0u8; 4096];
    f.read_exact_at(&mut hb, HEADER1_OFFSET).unwrap();
    let h1 = VhdxHeader::parse(&hb);
    f.read_exact_at(&mut hb, HEADER2_OFFSET).unwrap();
    let h2 = VhdxHeader::parse(&hb);
    let (slot, mut h) = VhdxHeader::current(h1, h2).unwrap();
    // Locate the payload of block 0: find the marker qemu-io wrote there.
    let all = std::fs::read(&img).unwrap();
    let host = (0..all.len() / (1 << 20))
        .map(|i| (i as u64) << 20)
        .find(|&o| {
            all[o as usize..o as usize + 4096]
                .iter()
                .all(|&b| b == 0xEE)
        })
        .expect("marker block");
    // Log: sector 4096 of guest data gets 0xC3, guest sector 2 zeroed.
    let guid = [0x42u8; 16];
    let mut sector = Box::new([0xC3u8; 4096]);
    sector[0] = 1;
    sector[4095] = 2;
    let entry = build_entry(
        &guid,
        7,
        0,
        f.metadata().unwrap().len(),
        &[
            Descriptor::Data {
                file_offset: host + 4096,
                data: sector.clone(),
            },
            Descriptor::Zero {
                file_offset: host + 8192,
                length: 4096,
            },
        ],
    );
    f.write_all_at(&entry, h.log_offset).unwrap();
    f.write_all_at(&[0x99u8; 4096], host + 8192).unwrap();
    h.log_guid = guid;
    h.sequence += 1;
    let off = if slot == 0 {
        HEADER2_OFFSET
    } else {
        HEADER1_OFFSET
    };
    f.write_all_at(&h.serialize(), off).unwrap();
    drop(f);
    // Read-only open refuses (replay needs write access).
    assert!(open_disk(
        &img,
        &OpenOptions {
            readonly: true,
            ..Default::default()
        }
    )
    .is_err());
    let mut disk = open(&img, false);
    let mut buf = vec![0u8; 12288];
    disk.read_exact_at(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xEE));
    assert_eq!(&buf[4096..8192], &sector[..]);
    assert!(buf[8192..].iter().all(|&b| b == 0));
    drop(disk);
    qemu_check("vhdx", &img);
    // qemu sees the replayed data too.
    let flat = p(d.path(), "flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    assert_eq!(&std::fs::read(&flat).unwrap()[4096..8192], &sector[..]);
}

#[test]
fn explicit_type_overrides_detection() {
    let d = tmpdir();
    let img = p(d.path(), "x.qcow2");
    qemu_img(&["create", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let disk = open_as(&img, ImageType::Raw, true);
    assert_eq!(disk.image_type(), ImageType::Raw);
    assert_eq!(disk.size(), std::fs::metadata(&img).unwrap().len());
    assert_eq!("vpc".parse::<ImageType>().unwrap(), ImageType::Vhd);
    assert!("qed".parse::<ImageType>().is_err());
}

fn async_case(fmt: &str, direct: bool) {
    let d = tmpdir();
    let raw = p(d.path(), "ref.raw");
    let img = p(d.path(), "a.img");
    let data = pattern(SIZE, 77);
    write_raw(&raw, &data);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        fmt,
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let disk = open_disk(
        &img,
        &OpenOptions {
            direct,
            ..Default::default()
        },
    )
    .unwrap();
    let mut a = AsyncDisk::new(disk, 16, true).unwrap();
    assert!(a.uses_io_uring(), "io_uring is expected on the test kernel");
    let mut model = data.clone();
    let mut r = Rng::new(3);
    let mut bufs: Vec<block::storage::AlignedBuf> = (0..16)
        .map(|_| block::storage::AlignedBuf::new(8192))
        .collect();
    for round in 0..40 {
        let mut reqs = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            let off = r.below(SIZE as u64 / 4096 - 2) * 4096;
            let write = r.below(2) == 0;
            if write {
                r.fill(b.as_mut_slice());
            }
            let iov = [libc::iovec {
                iov_base: b.as_mut_slice().as_mut_ptr() as *mut _,
                iov_len: 8192,
            }];
            // SAFETY: buffers outlive the round; each is used by one request.
            unsafe {
                if write {
                    a.write_vectored(off, &iov, i as u64).unwrap();
                } else {
                    a.read_vectored(off, &iov, i as u64).unwrap();
                }
            }
            reqs.push((off, write));
        }
        a.submit().unwrap();
        let mut done = 0;
        while done < reqs.len() {
            while let Some((ud, res)) = a.next_completed() {
                assert_eq!(res, 8192, "request {ud} round {round}");
                done += 1;
            }
            if done < reqs.len() {
                a.reap(1).unwrap();
            }
        }
        // Offsets may collide within a round; apply in submission order only
        // for non-overlapping requests, and verify reads against the model.
        let mut touched: Vec<(u64, bool)> = Vec::new();
        for (i, &(off, write)) in reqs.iter().enumerate() {
            let overlaps = touched
                .iter()
                .any(|&(o, w)| (w || write) && o < off + 8192 && off < o + 8192);
            let range = off as usize..off as usize + 8192;
            if !overlaps {
                if write {
                    model[range].copy_from_slice(bufs[i].as_slice());
                } else {
                    assert!(
                        bufs[i].as_slice() == &model[range],
                        "read mismatch round {round}"
                    );
                }
            } else if write {
                // Unknown order: learn the final content from the disk.
                let mut got = vec![0u8; 8192];
                a.disk().read_exact_at(off, &mut got).unwrap();
                model[range].copy_from_slice(&got);
            }
            touched.push((off, write));
        }
    }
    a.flush(999).unwrap();
    assert_eq!(a.next_completed(), Some((999, 0)));
    assert!(read_all(a.disk()) == model);
    drop(a);
    write_raw(&raw, &model);
    if fmt == "qcow2" {
        qemu_check(fmt, &img);
    }
    qemu_compare(fmt, &img, &raw);
}

#[test]
fn async_raw_io_uring() {
    async_case("raw", false);
}

#[test]
fn async_raw_direct() {
    async_case("raw", true);
}

#[test]
fn async_qcow2_io_uring() {
    async_case("qcow2", false);
}

#[test]
fn async_qcow2_direct() {
    async_case("qcow2", true);
}

#[test]
fn async_vhdx() {
    async_case("vhdx", false);
}
