//! Tests of [`AsyncDisk`]'s eager submission over a raw image on io_uring: scattered
//! requests leave in growing batches, sequential runs are not split (a write does not
//! continue a read run), and with eager submission off everything waits for `submit`.

use super::*;
use crate::storage::AlignedBuf;
use crate::{open_disk, OpenOptions};

const FILE: usize = 4 << 20;

fn byte_at(off: usize) -> u8 {
    (off / 4096 * 7 + off % 251) as u8
}

// A raw image whose every byte is `byte_at(offset)`, behind a queue.
fn queue(dir: &tempfile::TempDir) -> AsyncDisk {
    let path = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..FILE).map(byte_at).collect();
    std::fs::write(&path, data).unwrap();
    let disk = open_disk(&path, &OpenOptions::default()).unwrap();
    let q = AsyncDisk::new(disk, 64, true).unwrap();
    assert!(q.uses_io_uring(), "io_uring is expected on the test kernel");
    q
}

// Entries in the submission queue the kernel has not taken yet.
fn pending(q: &mut AsyncDisk) -> usize {
    q.ring.as_mut().unwrap().submission().len()
}

fn read(q: &mut AsyncDisk, buf: &mut AlignedBuf, off: u64, id: u64) {
    let v = [libc::iovec {
        iov_base: buf.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.as_slice().len(),
    }];
    // SAFETY: the buffer outlives the request (checked complete below).
    unsafe { q.read_vectored(off, &v, id).unwrap() };
}

// Submit, wait for every request and check each buffer's contents.
fn finish(q: &mut AsyncDisk, reqs: &[(u64, AlignedBuf)]) {
    q.submit().unwrap();
    let mut seen = vec![false; reqs.len()];
    while seen.iter().any(|s| !s) {
        q.reap(1).unwrap();
        while let Some((id, res)) = q.next_completed() {
            let (off, buf) = &reqs[id as usize];
            assert_eq!(res as usize, buf.as_slice().len(), "request {id}");
            let want: Vec<u8> = (0..buf.as_slice().len())
                .map(|i| byte_at(*off as usize + i))
                .collect();
            assert!(buf.as_slice() == want, "request {id} data");
            seen[id as usize] = true;
        }
    }
}

#[test]
fn scattered_requests_leave_in_growing_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = queue(&dir);
    let mut reqs = Vec::new();
    let mut left = Vec::new();
    for i in 0..8u64 {
        let mut b = AlignedBuf::new(4096);
        // Every other 64 KiB: no request continues the previous one.
        let off = i * 65536;
        read(&mut q, &mut b, off, i);
        left.push(pending(&mut q));
        reqs.push((off, b));
    }
    // Complete before asserting: a panic must not free buffers in flight.
    finish(&mut q, &reqs);
    // Batches of 1, 1, 2, 4, each sent as soon as it is full.
    assert_eq!(left, [0, 0, 1, 0, 1, 2, 3, 0]);
}

#[test]
fn sequential_runs_are_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = queue(&dir);
    let mut reqs = Vec::new();
    let go = |q: &mut AsyncDisk, reqs: &mut Vec<(u64, AlignedBuf)>, off, len| {
        let mut b = AlignedBuf::new(len);
        read(q, &mut b, off, reqs.len() as u64);
        reqs.push((off, b));
        pending(q)
    };
    // One elsewhere, four in a row from 0, one elsewhere: the batch due
    // at the third is held back while the run goes on, and leaves with
    // the request outside it.
    let mut first = Vec::new();
    for off in [3 << 20, 0, 4096, 8192, 12288, (3 << 20) + 65536] {
        first.push(go(&mut q, &mut reqs, off, 4096));
    }
    q.submit().unwrap();
    // 20 contiguous 64 KiB requests: the first goes alone (it does not
    // continue the previous request), the next 16 when they make 1 MiB.
    let mut second = Vec::new();
    for i in 0..20 {
        second.push(go(&mut q, &mut reqs, (1 << 20) + i * 65536, 65536));
    }
    finish(&mut q, &reqs);
    assert_eq!(first, [0, 0, 1, 2, 3, 0]);
    let want: Vec<usize> = [0].into_iter().chain(1..=15).chain(0..=3).collect();
    assert_eq!(second, want);
}

#[test]
fn a_write_does_not_continue_a_read_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = queue(&dir);
    let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::new(4096)).collect();
    // The write stores what the file holds, so all check the same way.
    bufs[3]
        .as_mut_slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = byte_at(8192 + i));
    let mut left = Vec::new();
    for (i, (off, b)) in [3u64 << 20, 0, 4096, 8192]
        .iter()
        .zip(&mut bufs)
        .enumerate()
    {
        let v = [libc::iovec {
            iov_base: b.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
            iov_len: 4096,
        }];
        // SAFETY: the buffers outlive the requests (waited for below).
        unsafe {
            if i == 3 {
                q.write_vectored(*off, &v, i as u64).unwrap();
            } else {
                q.read_vectored(*off, &v, i as u64).unwrap();
            }
        }
        left.push(pending(&mut q));
    }
    let reqs: Vec<(u64, AlignedBuf)> = [3u64 << 20, 0, 4096, 8192].into_iter().zip(bufs).collect();
    finish(&mut q, &reqs);
    // The read at 4096 is held (it continues the one at 0); the write at
    // 8192 is adjacent but goes the other way, so the batch of two leaves.
    assert_eq!(left, [0, 0, 1, 0]);
}

#[test]
fn without_eager_submission_everything_waits_for_submit() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = queue(&dir);
    q.set_eager_submit(false);
    let mut reqs = Vec::new();
    for i in 0..6u64 {
        let mut b = AlignedBuf::new(4096);
        read(&mut q, &mut b, i * 65536, i);
        reqs.push((i * 65536, b));
    }
    let left = pending(&mut q);
    finish(&mut q, &reqs);
    assert_eq!(left, 6);
}
