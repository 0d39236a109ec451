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
