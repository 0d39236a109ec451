// Copyright 2026 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Flat VMDKs as qemu-img makes them (`monolithicFlat`, `twoGbMaxExtentFlat`): opened only
//! when asked (`image_type=vmdk`), read and written across extents, checked by qemu-img and
//! qemu-io afterwards; descriptors that would reach outside their folder refused.

mod common;

use block::{open_disk, DiskFileExt, ImageType, OpenOptions};
use common::*;

const SIZE: usize = 8 << 20;

/// A monolithicFlat image converted from raw data: the same bytes through ours; random writes
/// and zeroes, then qemu-img compare against the model.
#[test]
fn monolithic_flat_round_trip() {
    let d = tmpdir();
    let raw = p(d.path(), "ref.raw");
    let img = p(d.path(), "d.vmdk");
    let data = pattern(SIZE, 7);
    write_raw(&raw, &data);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // Never probed: a guest could write a descriptor into its raw disk.
    let e = open_disk(&img, &OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("give image_type=vmdk"), "{e}");
    let mut disk = open_as(&img, ImageType::Vmdk, true);
    assert_eq!(disk.image_type(), ImageType::Vmdk);
    assert_eq!(disk.size(), SIZE as u64);
    assert!(read_all(disk.as_mut()) == data);
    assert!(disk.write_all_at(0, &[1]).is_err(), "read-only");
    drop(disk);
    let mut model = data;
    let mut disk = open_as(&img, ImageType::Vmdk, false);
    random_ops(disk.as_mut(), &mut model, 3, 80, false);
    disk.flush().unwrap();
    drop(disk);
    write_raw(&raw, &model);
    qemu_compare("vmdk", &img, &raw);
}

/// twoGbMaxExtentFlat of 5 GiB: three extent files; writes straddling each boundary land in
/// both files, as qemu-io reads them back.
#[test]
fn two_gb_extents_are_one_disk() {
    let d = tmpdir();
    let img = p(d.path(), "big.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        img.to_str().unwrap(),
        "5G",
    ]);
    let mut disk = open_as(&img, ImageType::Vmdk, false);
    assert_eq!(disk.size(), 5 << 30);
    let mut cmds = Vec::new();
    for (i, at) in [(2u64 << 30) - 4096, (4 << 30) - 512, (5 << 30) - 8192]
        .iter()
        .enumerate()
    {
        let v = 0x41 + i as u8;
        disk.write_all_at(*at, &vec![v; 8192.min(((5 << 30) - at) as usize)])
            .unwrap();
        let mut back = vec![0u8; 8192.min(((5 << 30) - at) as usize)];
        disk.read_exact_at(*at, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == v));
        cmds.push(format!("read -P {v} {at} {}", back.len()));
    }
    // Zeroes across the first boundary, inside the first write.
    disk.write_zeroes((2 << 30) - 1024, 2048).unwrap();
    cmds[0] = format!("read -P 65 {} 3072", (2u64 << 30) - 4096);
    cmds.push(format!("read -P 0 {} 2048", (2u64 << 30) - 1024));
    cmds.push(format!("read -P 65 {} 3072", (2u64 << 30) + 1024));
    assert!(
        disk.read_exact_at((5 << 30) - 1, &mut [0u8; 2]).is_err(),
        "past the end"
    );
    disk.flush().unwrap();
    drop(disk);
    qemu_io("vmdk", &img, &cmds);
}

/// Descriptors that name files outside their folder, extents shorter than they say, ZERO and
/// read-only extents.
#[test]
fn hostile_descriptors() {
    let d = tmpdir();
    let data = p(d.path(), "data.bin");
    write_raw(&data, &vec![0x77; 4096]);
    let desc = |name: &str, body: &str| {
        let path = p(d.path(), name);
        std::fs::write(&path, format!("# Disk DescriptorFile\nversion=1\n{body}")).unwrap();
        path
    };
    let open_vmdk = |path: &std::path::Path, readonly: bool| {
        open_disk(
            path,
            &OpenOptions {
                readonly,
                image_type: Some(ImageType::Vmdk),
                ..Default::default()
            },
        )
    };
    for (name, body, why) in [
        (
            "abs.vmdk",
            "RW 8 FLAT \"/etc/hostname\" 0\n",
            "not a file name",
        ),
        (
            "up.vmdk",
            "RW 8 FLAT \"../data.bin\" 0\n",
            "not a file name",
        ),
        ("short.vmdk", "RW 16 FLAT \"data.bin\" 0\n", "shorter than"),
        ("off.vmdk", "RW 8 FLAT \"data.bin\" 1\n", "shorter than"),
        ("none.vmdk", "RW 8 FLAT \"missing.bin\" 0\n", "missing.bin"),
    ] {
        let e = open_vmdk(&desc(name, body), false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(why), "{name}: {e}");
    }
    let mixed = desc(
        "mixed.vmdk",
        "RW 4 ZERO\nRDONLY 4 FLAT \"data.bin\" 0\nNOACCESS 4 FLAT \"data.bin\" 4\n",
    );
    let mut disk = open_vmdk(&mixed, false).unwrap();
    assert_eq!(disk.size(), 12 * 512);
    let mut b = vec![1u8; 4096];
    disk.read_exact_at(0, &mut b).unwrap();
    assert!(b[..2048].iter().all(|&x| x == 0) && b[2048..].iter().all(|&x| x == 0x77));
    assert!(disk.write_all_at(0, &[1]).is_err(), "a ZERO extent");
    assert!(disk.write_all_at(2048, &[1]).is_err(), "a read-only extent");
    assert!(
        disk.read_exact_at(4096, &mut [0u8; 16]).is_err(),
        "a NOACCESS extent"
    );
    disk.write_zeroes(0, 1024).unwrap();
    // A sparse VMDK (qemu-img's default) is refused by name.
    let sparse = p(d.path(), "sparse.vmdk");
    qemu_img(&["create", "-f", "vmdk", sparse.to_str().unwrap(), "1M"]);
    let e = open_vmdk(&sparse, true).err().unwrap().to_string();
    assert!(e.contains("sparse"), "{e}");
}

/// Two extents of one file at growing offsets (a file split into extents, as VMware writes a
/// large one): one disk, one lock, both extents served.
#[test]
fn extents_sharing_a_file() {
    let d = tmpdir();
    let data = p(d.path(), "one.bin");
    write_raw(&data, &pattern(16 * 512, 9));
    let desc = p(d.path(), "shared.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\ncreateType=\"vmfs\"\nRW 8 FLAT \"one.bin\" 8\nRW 8 FLAT \"one.bin\" 0\n",
    )
    .unwrap();
    let mut disk = open_as(&desc, ImageType::Vmdk, false);
    assert_eq!(disk.size(), 16 * 512);
    let src = pattern(16 * 512, 9);
    let got = read_all(disk.as_mut());
    assert!(got[..4096] == src[4096..] && got[4096..] == src[..4096]);
    disk.write_all_at(4096, &[0xab; 512]).unwrap();
    disk.flush().unwrap();
    drop(disk);
    assert!(std::fs::read(&data).unwrap()[..512]
        .iter()
        .all(|&b| b == 0xab));
}
