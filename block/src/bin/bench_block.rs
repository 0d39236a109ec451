// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Disk benchmark with the same access pattern as `qemu-img bench`:
//! `count` requests of `size` bytes at offsets `i * step % disk_size`,
//! `depth` requests in flight through the io_uring path. `-E` turns eager
//! submission off (one `io_uring_enter` per refill of the queue). Writes
//! carry `--pattern` bytes (default 0), like `qemu-img bench`.
//! `--one-buffer` issues every request from the same buffer, as `qemu-img
//! bench` does (it allocates `depth` buffers but hands the first one to
//! every request), so both tools touch the same amount of memory.
//!
//! Usage: bench-block [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-w] [-E] [--one-buffer] [--pattern BYTE] [-t none] [-f FMT] IMAGE

use std::process::ExitCode;
use std::time::Instant;

use block::storage::AlignedBuf;
use block::{open_disk, AsyncDisk, ImageType, OpenOptions};

struct Args {
    count: u64,
    depth: u32,
    size: usize,
    step: u64,
    write: bool,
    direct: bool,
    eager: bool,
    one_buffer: bool,
    pattern: u8,
    format: Option<ImageType>,
    image: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        count: 75000,
        depth: 64,
        size: 4096,
        step: 0,
        write: false,
        direct: false,
        eager: true,
        one_buffer: false,
        pattern: 0,
        format: None,
        image: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-c" => a.count = val("-c")?.parse().map_err(|e| format!("-c: {e}"))?,
            "-d" => a.depth = val("-d")?.parse().map_err(|e| format!("-d: {e}"))?,
            "-s" => a.size = parse_size(&val("-s")?)? as usize,
            "-S" => a.step = parse_size(&val("-S")?)?,
            "-w" => a.write = true,
            "-E" => a.eager = false,
            "--one-buffer" => a.one_buffer = true,
            "--pattern" => {
                a.pattern = val("--pattern")?
                    .parse()
                    .map_err(|e| format!("--pattern: {e}"))?
            }
            "-t" => a.direct = val("-t")? == "none",
            "-f" => a.format = Some(val("-f")?.parse().map_err(|e| format!("{e}"))?),
            s if !s.starts_with('-') => a.image = s.to_string(),
            s => return Err(format!("unknown option {s}")),
        }
    }
    if a.image.is_empty() {
        return Err("usage: bench-block [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-w] [-E] [--one-buffer] [--pattern BYTE] [-t none] [-f FMT] IMAGE".into());
    }
    if a.step == 0 {
        a.step = a.size as u64;
    }
    Ok(a)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mul) = match s.chars().last() {
        Some('k') | Some('K') => (&s[..s.len() - 1], 1 << 10),
        Some('m') | Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('g') | Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|e| format!("{s}: {e}"))
}

fn run(a: &Args) -> Result<f64, String> {
    let opts = OpenOptions {
        lock_granularity: Default::default(),
        readonly: !a.write,
        direct: a.direct,
        image_type: a.format,
        backing_files: true,
        sparse: false,
    };
    let disk = open_disk(&a.image, &opts).map_err(|e| e.to_string())?;
    let disk_size = disk.size();
    if disk_size < a.size as u64 {
        return Err("image smaller than one request".into());
    }
    let mut q = AsyncDisk::new(disk, a.depth, true).map_err(|e| e.to_string())?;
    if !q.uses_io_uring() {
        eprintln!("warning: io_uring not available, using synchronous I/O");
    }
    let mut bufs: Vec<AlignedBuf> = (0..a.depth).map(|_| AlignedBuf::new(a.size)).collect();
    // Written data: one byte value everywhere, as `qemu-img bench --pattern`.
    for b in bufs.iter_mut() {
        b.as_mut_slice().fill(a.pattern);
    }
    let regions: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_slice().as_mut_ptr() as *mut libc::c_void,
            iov_len: a.size,
        })
        .collect();
    // SAFETY: the buffers outlive the queue (dropped after it, below).
    if !unsafe { q.register_memory(&regions) } {
        eprintln!("note: buffers not registered with io_uring");
    }
    // As qemu-img bench (7.2): the next offset is the last plus the step,
    // modulo the disk size; one that would not leave room for a whole
    // request (a step that is not a multiple of the request size) starts
    // over at 0, where qemu's request would fail.
    let next_offset = |o: u64| match (o + a.step) % disk_size {
        n if n + a.size as u64 > disk_size => 0,
        n => n,
    };
    let mut next = 0u64;
    let mut done = 0u64;
    let mut offset = 0u64;
    let mut free: Vec<usize> = (0..a.depth as usize).collect();
    q.set_eager_submit(a.eager);
    let start = Instant::now();
    while done < a.count {
        while next < a.count {
            let Some(slot) = free.pop() else { break };
            // Raw pointers taken before the loop: no reference to a buffer is
            // made while the kernel may be using it.
            let iov = [regions[if a.one_buffer { 0 } else { slot }]];
            // SAFETY: each buffer serves one request at a time (free list), or
            // with --one-buffer all of them (its contents are never looked at),
            // and lives until the queue is drained below.
            let r = unsafe {
                if a.write {
                    q.write_vectored(offset, &iov, slot as u64)
                } else {
                    q.read_vectored(offset, &iov, slot as u64)
                }
            };
            r.map_err(|e| e.to_string())?;
            offset = next_offset(offset);
            next += 1;
        }
        // One syscall submits the new requests and waits for a batch.
        let want = (q.in_flight() / 4).max(1);
        q.reap(want).map_err(|e| e.to_string())?;
        while let Some((slot, res)) = q.next_completed() {
            if res != a.size as i32 {
                return Err(format!("request failed: {res}"));
            }
            free.push(slot as usize);
            done += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if a.write {
        q.flush(u64::MAX).map_err(|e| e.to_string())?;
    }
    drop(q);
    drop(bufs);
    Ok(a.count as f64 / secs)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(rps) => {
            println!("{rps:.0} requests/s");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench-block: {e}");
            ExitCode::FAILURE
        }
    }
}
