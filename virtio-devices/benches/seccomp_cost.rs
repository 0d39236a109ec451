//! What a seccomp filter adds to each system call a device worker makes: a thread confined as
//! the VMM confines a worker (the spawner's filter, the union of every worker kind, then the
//! worker's own, here the union again, and the quiet-denial filter) against an unconfined
//! one, each making the calls of a virtio-blk request in a loop: an eventfd write and read
//! (the kick and the irqfd) and a 4 KiB `pread` of a cached file. Rounds alternate; the
//! figures are nanoseconds per system call (minimum and median of the rounds) and the
//! difference. `cargo bench -p virtio-devices --bench seccomp_cost` (`SECCOMP_COST_ROUNDS`,
//! default 9). scripts/bench-seccomp runs it beside the device benches.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Loops of 3 system calls per round.
const LOOPS: u32 = 200_000;

/// Nanoseconds per system call over one round, on a fresh thread (confined or not).
fn round(confined: bool, file: &std::fs::File) -> f64 {
    let file = file.try_clone().expect("a second handle on the file");
    // Made here: a worker may not create eventfds (its device hands them over).
    let e = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let work = move || {
        let mut buf = [0u8; 4096];
        let t = Instant::now();
        for i in 0..LOOPS {
            e.write(1).expect("eventfd write");
            e.read().expect("eventfd read");
            file.read_at(&mut buf, u64::from(i % 16) * 4096)
                .expect("pread");
        }
        t.elapsed()
    };
    let took: Duration = if confined {
        let f = virtio_devices::worker_seccomp::all();
        seccomp::spawn("bench-worker".into(), f, work)
            .expect("a confined thread")
            .join()
            .expect("the confined thread")
    } else {
        std::thread::spawn(work).join().expect("the thread")
    };
    took.as_nanos() as f64 / f64::from(LOOPS * 3)
}

fn main() {
    let rounds: usize = std::env::var("SECCOMP_COST_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(9);
    let mut tmp = tempfile::tempfile().expect("a scratch file");
    tmp.write_all(&vec![0x5a; 16 * 4096]).expect("filling it");
    seccomp::set_mode(seccomp::Mode::Trap);
    seccomp::start_spawner(virtio_devices::worker_seccomp::all()).expect("the spawner");
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        off.push(round(false, &tmp));
        on.push(round(true, &tmp));
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let (off_min, off_med) = stats(&mut off);
    let (on_min, on_med) = stats(&mut on);
    println!(
        "seccomp cost per system call (eventfd write, eventfd read, 4 KiB pread), {rounds} rounds of {} calls",
        LOOPS * 3
    );
    println!("  unconfined  min {off_min:7.1} ns  median {off_med:7.1} ns");
    println!("  confined    min {on_min:7.1} ns  median {on_med:7.1} ns");
    println!(
        "  difference  min {:+7.1} ns  median {:+7.1} ns ({:+.1} % of the median call)",
        on_min - off_min,
        on_med - off_med,
        100.0 * (on_med - off_med) / off_med
    );
}
