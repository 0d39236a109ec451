// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! The io_uring path beyond in-place I/O: allocating qcow2 writes sent to
//! the ring and committed on completion, multi-buffer requests, and the
//! image lock being released as soon as the queue is dropped.

mod common;

use block::storage::AlignedBuf;
use block::{open_disk, AsyncDisk, DiskFileExt, Error, OpenOptions};
use common::*;

const CS: usize = 65536;
const SIZE: usize = 64 * CS;

fn rw(direct: bool) -> OpenOptions {
    OpenOptions {
        direct,
        ..Default::default()
    }
}

fn iov(b: &mut AlignedBuf, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: b.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
        iov_len: len,
    }
}

fn alloc_case(direct: bool) {
    let d = tmpdir();
    let img = p(d.path(), "a.qcow2");
    let raw = p(d.path(), "a.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    // Some clusters already allocated (in place), some compressed-free
    // zero clusters, the rest unallocated.
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x11 0 128k".into(), "write -z 512k 128k".into()],
    );
    let mut model = vec![0u8; SIZE];
    model[..2 * CS].fill(0x11);
    let mut a = AsyncDisk::new(open_disk(&img, &rw(direct)).unwrap(), 16, true).unwrap();
    assert!(a.uses_io_uring(), "io_uring is expected on the test kernel");
    let end_before = std::fs::metadata(&img).unwrap().len();
    let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(2 * CS)).collect();
    let mut r = Rng::new(9);
    for round in 0..6u64 {
        let mut reqs = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            // Distinct within a round: odd requests write a pair of
            // clusters (2p, 2p+1) in the first half, always as a pair, even
            // ones a single cluster in the second half.
            let (c, n) = if i % 2 == 1 {
                (2 * ((round as usize * 3 + i) % 16), 2)
            } else {
                (32 + (round as usize * 5 + i) % 32, 1)
            };
            r.fill(&mut b.as_mut_slice()[..n * CS]);
            let v = [iov(b, n * CS)];
            // SAFETY: each buffer serves one request until it completes below.
            unsafe { a.write_vectored((c * CS) as u64, &v, i as u64).unwrap() };
            reqs.push((c, n));
        }
        a.submit().unwrap();
        let lens: Vec<i32> = reqs.iter().map(|&(_, n)| (n * CS) as i32).collect();
        wait_lens(&mut a, &lens);
        for (i, &(c, n)) in reqs.iter().enumerate() {
            model[c * CS..(c + n) * CS].copy_from_slice(&bufs[i].as_slice()[..n * CS]);
        }
        // Completed allocating writes are visible to reads at once.
        for &(c, n) in &reqs {
            let mut got = vec![0u8; n * CS];
            a.disk().read_exact_at((c * CS) as u64, &mut got).unwrap();
            assert!(
                got == model[c * CS..(c + n) * CS],
                "round {round} cluster {c}"
            );
        }
    }
    // Every write went through the ring, none fell back to the sync path.
    assert_eq!(a.request_counts(), (6 * 16, 0));
    a.flush(77).unwrap();
    assert_eq!(a.next_completed(), Some((77, 0)));
    // A copy taken now is what a crash would leave: consistent, with the
    // preallocated tail beyond the last cluster in use.
    let snap = p(d.path(), "snap.qcow2");
    std::fs::copy(&img, &snap).unwrap();
    drop(a);
    assert!(std::fs::metadata(&snap).unwrap().len() > std::fs::metadata(&img).unwrap().len());
    qemu_check("qcow2", &snap);
    assert!(std::fs::metadata(&img).unwrap().len() > end_before);
    write_raw(&raw, &model);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &raw);
    qemu_compare("qcow2", &snap, &raw);
}

/// Drain one completion per request; request `i` must report `lens[i]` bytes.
fn wait_lens(a: &mut AsyncDisk, lens: &[i32]) {
    let mut seen = vec![false; lens.len()];
    let mut n = 0;
    while n < lens.len() {
        while let Some((ud, res)) = a.next_completed() {
            assert_eq!(res, lens[ud as usize], "request {ud}");
            assert!(!seen[ud as usize]);
            seen[ud as usize] = true;
            n += 1;
        }
        if n < lens.len() {
            a.reap(1).unwrap();
        }
    }
}

#[test]
fn qcow2_allocating_writes_through_ring() {
    alloc_case(false);
}

#[test]
fn qcow2_allocating_writes_through_ring_direct() {
    alloc_case(true);
}

#[test]
fn commit_and_abort_check_their_reservation() {
    let d = tmpdir();
    let img = p(d.path(), "c.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "4M"]);
    let mut disk = open_disk(&img, &rw(false)).unwrap();
    // Partial clusters, unaligned ranges and in-place clusters are refused.
    assert!(disk.alloc_host(4096, CS as u64).unwrap().is_none());
    assert!(disk.alloc_host(0, 4096).unwrap().is_none());
    assert!(disk.alloc_host(4 << 20, CS as u64).is_err());
    let m = disk.alloc_host(CS as u64, CS as u64).unwrap().unwrap();
    // A commit that does not match the reservation changes nothing.
    assert!(matches!(
        disk.commit_alloc(0, CS as u64, m.offset),
        Err(Error::InvalidArgument(_))
    ));
    assert!(disk
        .commit_alloc(CS as u64, CS as u64, m.offset + 1)
        .is_err());
    // Data written to the reservation, then aborted: the range stays zero.
    let data = vec![0x5au8; CS];
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &data, m.offset))
        .unwrap();
    disk.abort_alloc(CS as u64, CS as u64, m.offset);
    assert!(disk.commit_alloc(CS as u64, CS as u64, m.offset).is_err());
    let mut got = vec![1u8; CS];
    disk.read_exact_at(CS as u64, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    // A proper reservation, written and committed, reads back.
    let m = disk.alloc_host(2 * CS as u64, CS as u64).unwrap().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &data, m.offset))
        .unwrap();
    disk.commit_alloc(2 * CS as u64, CS as u64, m.offset)
        .unwrap();
    disk.read_exact_at(2 * CS as u64, &mut got).unwrap();
    assert!(got == data);
    // Now in place: no further reservation for it.
    assert!(disk.alloc_host(2 * CS as u64, CS as u64).unwrap().is_none());
    disk.flush().unwrap();
    drop(disk);
    qemu_check("qcow2", &img);
}

#[test]
fn multi_buffer_requests_and_lock_release() {
    let d = tmpdir();
    let img = p(d.path(), "m.raw");
    let data = pattern(SIZE, 5);
    write_raw(&img, &data);
    let mut model = data.clone();
    for round in 0..3u64 {
        let mut a = AsyncDisk::new(open_disk(&img, &rw(true)).unwrap(), 8, true).unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..24).map(|_| AlignedBuf::new(4096)).collect();
        let mut lens = Vec::new();
        // 8 requests of 3 buffers each: even ones write, odd ones read.
        for (k, chunk) in bufs.chunks_mut(3).enumerate() {
            let off = ((round * 8 + k as u64) * 5 * 4096) % (SIZE as u64 - 3 * 4096);
            let write = k % 2 == 0;
            let mut v = Vec::new();
            for b in chunk.iter_mut() {
                if write {
                    b.as_mut_slice().fill(k as u8 + round as u8 * 16);
                }
                v.push(iov(b, 4096));
            }
            // SAFETY: the buffers live until the completions are drained.
            unsafe {
                if write {
                    a.write_vectored(off, &v, k as u64).unwrap();
                } else {
                    a.read_vectored(off, &v, k as u64).unwrap();
                }
            }
            drop(v); // the queue keeps its own copy of the iovec array
            lens.push(3 * 4096);
        }
        a.submit().unwrap();
        wait_lens(&mut a, &lens);
        for (k, chunk) in bufs.chunks(3).enumerate() {
            let off = (((round * 8 + k as u64) * 5 * 4096) % (SIZE as u64 - 3 * 4096)) as usize;
            let got: Vec<u8> = chunk.iter().flat_map(|b| b.as_slice().to_vec()).collect();
            if k % 2 == 0 {
                model[off..off + got.len()].copy_from_slice(&got);
            } else {
                assert!(got == model[off..off + got.len()], "round {round} read {k}");
            }
        }
        drop(a);
        // The lock goes with the queue: a writer can reopen at once.
        let mut disk = open_disk(&img, &rw(false)).unwrap();
        assert!(read_all(disk.as_mut()) == model, "round {round}");
    }
}

/// Reads of clusters an overlay never wrote go to the ring too, on the file of
/// the layer that has them (`map_host` resolves the chain layer by layer);
/// past the end of a smaller backing file, and for requests mixing layers, the
/// synchronous path serves them. The data is checked against a model.
fn backing_reads_case(direct: bool) {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    let mid = p(d.path(), "mid.qcow2");
    let top = p(d.path(), "top.qcow2");
    let data = pattern(SIZE, 7);
    write_raw(&base, &data);
    qemu_overlay(&mid, &base, "raw", None);
    qemu_io("qcow2", &mid, &["write -P 0x22 1M 128k".into()]);
    // The top layer is larger than its backing chain: 6 MiB over 4 MiB.
    qemu_overlay(&top, &mid, "qcow2", Some("6M"));
    qemu_io("qcow2", &top, &["write -P 0x33 2M 64k".into()]);
    let mut model = data.clone();
    model.resize(SIZE + SIZE / 2, 0);
    model[1 << 20..(1 << 20) + 2 * CS].fill(0x22);
    model[2 << 20..(2 << 20) + CS].fill(0x33);
    let opts = OpenOptions {
        direct,
        backing_files: true,
        readonly: true,
        ..Default::default()
    };
    let mut a = AsyncDisk::new(open_disk(&top, &opts).unwrap(), 16, true).unwrap();
    // (offset, length, served by the ring)
    let reads: [(usize, usize, bool); 7] = [
        (4096, 4096, true),              // base, through two layers
        ((1 << 20) + 8192, 8192, true),  // mid
        ((2 << 20) + 4096, 4096, true),  // top
        (3 * CS, 2 * CS, true),          // two clusters, base
        ((2 << 20) - 4096, 8192, false), // mid's last cluster and base: mixed
        (SIZE + 4096, 4096, false),      // past the backing chain: zeroes
        (SIZE - 4096, 8192, false),      // across the chain's end
    ];
    let mut bufs: Vec<AlignedBuf> = reads.iter().map(|r| AlignedBuf::new(r.1)).collect();
    let before = a.request_counts();
    for (i, (&(off, len, _), b)) in reads.iter().zip(bufs.iter_mut()).enumerate() {
        b.as_mut_slice().fill(0xee);
        let v = [iov(b, len)];
        // SAFETY: each buffer serves one request until the completions are drained.
        unsafe { a.read_vectored(off as u64, &v, i as u64).unwrap() };
    }
    a.submit().unwrap();
    let lens: Vec<i32> = reads.iter().map(|r| r.1 as i32).collect();
    wait_lens(&mut a, &lens);
    for (&(off, len, _), b) in reads.iter().zip(&bufs) {
        assert!(
            b.as_slice()[..len] == model[off..off + len],
            "read of {len} at {off:#x}"
        );
    }
    let after = a.request_counts();
    let ring = reads.iter().filter(|r| r.2).count() as u64;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (ring, reads.len() as u64 - ring),
        "(ring, synchronous) requests"
    );
}

#[test]
fn backing_chain_reads_through_ring() {
    backing_reads_case(false);
}

#[test]
fn backing_chain_reads_through_ring_direct() {
    backing_reads_case(true);
}

/// Writes covering clusters in part, on an overlay whose unwritten clusters
/// come from a raw backing file and on an image without one (zeroes): copied
/// on write through the ring (`alloc_cow`), several of them in flight at once
/// and some into the same cluster (which must wait for each other: the later
/// commit would undo the earlier write), one into a cluster read as zeroes
/// (`write -z`). Each round's data is checked against a model through the
/// queue, and at the end the image with qemu-img check and compare.
fn cow_case(direct: bool, backing: bool) {
    let d = tmpdir();
    let base = p(d.path(), "base.raw");
    let img = p(d.path(), "cow.qcow2");
    let model_path = p(d.path(), "model.raw");
    let mut model = if backing {
        let data = pattern(SIZE, 11);
        write_raw(&base, &data);
        qemu_overlay(&img, &base, "raw", None);
        data
    } else {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            img.to_str().unwrap(),
            &SIZE.to_string(),
        ]);
        vec![0u8; SIZE]
    };
    qemu_io("qcow2", &img, &["write -z 128k 64k".into()]);
    model[2 * CS..3 * CS].fill(0);
    let opts = OpenOptions {
        direct,
        backing_files: true,
        ..Default::default()
    };
    let mut a = AsyncDisk::new(open_disk(&img, &opts).unwrap(), 16, true).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(CS)).collect();
    let mut r = Rng::new(3);
    for round in 0..4usize {
        let before = a.request_counts();
        let mut reqs = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            // Sixteen 4 KiB-aligned pieces of 4-12 KiB in eight clusters (two
            // per cluster, not overlapping), one of them the zero cluster.
            let c = [2, 5, 9, 17, 23, 40, 41, 63][(i / 2 + round) % 8];
            let len = 4096 * (1 + (i + round) % 3);
            let off = c * CS + (i % 2) * CS / 2 + 4096 * round;
            r.fill(&mut b.as_mut_slice()[..len]);
            let v = [iov(b, len)];
            // SAFETY: each buffer serves one request until it completes below.
            unsafe { a.write_vectored(off as u64, &v, i as u64).unwrap() };
            reqs.push((off, len));
        }
        a.submit().unwrap();
        let lens: Vec<i32> = reqs.iter().map(|&(_, len)| len as i32).collect();
        wait_lens(&mut a, &lens);
        for (i, &(off, len)) in reqs.iter().enumerate() {
            model[off..off + len].copy_from_slice(&bufs[i].as_slice()[..len]);
        }
        let (ring, sync) = (
            a.request_counts().0 - before.0,
            a.request_counts().1 - before.1,
        );
        assert!(
            read_all(a.disk()) == model,
            "round {round}: content differs from the model"
        );
        assert_eq!((ring, sync), (16, 0), "round {round}: (ring, synchronous)");
    }
    drop(a);
    write_raw(&model_path, &model);
    qemu_check("qcow2", &img);
    qemu_compare("qcow2", &img, &model_path);
}

#[test]
fn cow_writes_over_backing_through_ring() {
    cow_case(false, true);
}

#[test]
fn cow_writes_over_backing_through_ring_direct() {
    cow_case(true, true);
}

#[test]
fn cow_writes_over_zeroes_through_ring() {
    cow_case(false, false);
}

/// Reads of compressed clusters, in the image itself and through an overlay:
/// the compressed bytes come through the ring (aligned for O_DIRECT) and are
/// inflated on completion. 4 KiB and 512-byte pieces, 16 in flight, in an
/// order that goes back and forth within clusters; every 64-byte line of the
/// data names its own offset, so a piece from elsewhere differs.
fn compressed_reads_case(direct: bool) {
    let d = tmpdir();
    let raw = p(d.path(), "lines.raw");
    let comp = p(d.path(), "comp.qcow2");
    let top = p(d.path(), "top.qcow2");
    let data = numbered_lines(SIZE);
    write_raw(&raw, &data);
    qemu_compress(&raw, &comp, "compat=1.1");
    qemu_overlay(&top, &comp, "qcow2", None);
    let opts = OpenOptions {
        direct,
        backing_files: true,
        readonly: true,
        ..Default::default()
    };
    for img in [&comp, &top] {
        let mut a = AsyncDisk::new(open_disk(img, &opts).unwrap(), 16, true).unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::new(4096)).collect();
        let before = a.request_counts();
        for round in 0..8usize {
            let mut reads = Vec::new();
            for (i, b) in bufs.iter_mut().enumerate() {
                let cluster = (round * 16 + i) * 5 % (SIZE / CS);
                let at = [61440, 0, 32768, 4096][(i + round) % 4];
                let len = if i % 3 == 0 { 512 } else { 4096 };
                let off = cluster * CS + at;
                let v = [iov(b, len)];
                // SAFETY: each buffer serves one request until it completes below.
                unsafe { a.read_vectored(off as u64, &v, i as u64).unwrap() };
                reads.push((off, len));
            }
            a.submit().unwrap();
            let lens: Vec<i32> = reads.iter().map(|r| r.1 as i32).collect();
            wait_lens(&mut a, &lens);
            for (&(off, len), b) in reads.iter().zip(&bufs) {
                assert!(
                    b.as_slice()[..len] == data[off..off + len],
                    "{img:?}: {len} bytes at {off:#x}"
                );
            }
        }
        let ring = a.request_counts().0 - before.0;
        assert!(
            ring >= 64,
            "{img:?}: only {ring} of 128 reads went through the ring"
        );
    }
}

#[test]
fn compressed_reads_through_ring() {
    compressed_reads_case(false);
}

#[test]
fn compressed_reads_through_ring_direct() {
    compressed_reads_case(true);
}
