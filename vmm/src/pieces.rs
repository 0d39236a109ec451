//! Work on guest RAM cut into pieces that a few threads take in turn: populating it
//! (`prefault=on`) and reading a snapshot into it (a copy restore).
//!
//! Both are bound by the kernel's work per page (allocating, zeroing, copying), which runs in
//! parallel as well as the copy does; so the calling thread (the control loop) takes pieces and
//! so do helpers, one per CPU the VMM may run on and at most [`MAX_THREADS`] in all. Helpers
//! start through the spawner, each confined by the filter the caller names.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Threads at most, the caller included: memory bandwidth, not CPUs, bounds the rate beyond a
/// few.
pub const MAX_THREADS: usize = 8;

/// How many threads take `pieces` pieces: one per CPU this process may run on, at most
/// [`MAX_THREADS`] and never more than there are pieces.
pub fn thread_count(pieces: usize) -> usize {
    if pieces < 2 {
        return pieces;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus.min(MAX_THREADS).min(pieces)
}

/// `[start, start + len)` cut where an address crosses a multiple of `piece`, as
/// (start, length): a piece never shares a huge page with another's.
pub fn cut(start: u64, len: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start + len;
    let mut at = start;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let n = (piece - at % piece).min(end - at);
            let p = (at, n);
            at += n;
            p
        })
    })
}

/// Where the threads stand: the next piece to take, and the first failure (which stops the
/// others before their next piece).
struct Board<E> {
    next: AtomicUsize,
    failed: AtomicBool,
    error: Mutex<Option<E>>,
}

impl<E> Board<E> {
    fn take(&self, count: usize, work: &impl Fn(usize) -> Result<(), E>) {
        while !self.failed.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return;
            }
            if let Err(e) = work(i) {
                self.fail(e);
                return;
            }
        }
    }

    fn fail(&self, e: E) {
        self.failed.store(true, Ordering::Relaxed);
        self.error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get_or_insert(e);
    }
}

/// Runs `work(0..count)`, each index once, on up to [`thread_count`] threads: the caller and
/// helpers named `{name}1`, `{name}2`, ... confined by `filter()` (a helper that cannot start
/// leaves its share to the others). Returns how many threads took part, or the first error
/// once every thread has stopped; a helper that panics fails the run with `panicked`.
pub fn run<E, W>(
    name: &str,
    filter: fn() -> seccomp::Filter,
    count: usize,
    work: W,
    panicked: fn() -> E,
) -> Result<usize, E>
where
    E: Send + 'static,
    W: Fn(usize) -> Result<(), E> + Send + Sync + 'static,
{
    let shared = Arc::new((
        Board {
            next: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
        },
        work,
    ));
    let mut helpers = Vec::new();
    for i in 1..thread_count(count) {
        let shared = shared.clone();
        match seccomp::spawn(format!("{name}{i}"), filter(), move || {
            shared.0.take(count, &shared.1)
        }) {
            Ok(h) => helpers.push(h),
            Err(e) => log::warn!("{name}: working with fewer threads: {e}"),
        }
    }
    shared.0.take(count, &shared.1);
    let threads = 1 + helpers.len();
    for h in helpers {
        if h.join().is_err() {
            shared.0.fail(panicked());
        }
    }
    let error = shared
        .0
        .error
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    match error {
        Some(e) => Err(e),
        None => Ok(threads),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn pieces_are_cut_at_multiples_of_the_piece() {
        assert_eq!(
            cut(0x1000, 0x2800, 0x1000).collect::<Vec<_>>(),
            [(0x1000, 0x1000), (0x2000, 0x1000), (0x3000, 0x800)]
        );
        assert_eq!(
            cut(0x1800, 0x100, 0x1000).collect::<Vec<_>>(),
            [(0x1800, 0x100)]
        );
        assert_eq!(
            cut(0xf00, 0x200, 0x1000).collect::<Vec<_>>(),
            [(0xf00, 0x100), (0x1000, 0x100)]
        );
        assert_eq!(cut(0x1000, 0, 0x1000).count(), 0);
    }

    #[test]
    fn threads_follow_the_pieces_and_the_cap() {
        assert_eq!(thread_count(0), 0);
        assert_eq!(thread_count(1), 1);
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(thread_count(1000), cpus.min(MAX_THREADS));
        assert_eq!(thread_count(2), cpus.min(2));
    }

    fn no_filter() -> seccomp::Filter {
        seccomp::Filter::new("pieces-test")
    }

    /// Every index runs exactly once, whichever thread takes it.
    #[test]
    fn every_piece_runs_once() {
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..100).map(|_| AtomicU64::new(0)).collect());
        let c = counts.clone();
        let threads = run(
            "pieces-test",
            no_filter,
            100,
            move |i| {
                c[i].fetch_add(1, Ordering::Relaxed);
                Ok::<(), String>(())
            },
            || "panicked".to_string(),
        )
        .unwrap();
        assert_eq!(threads, thread_count(100));
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    /// The first error comes back once all have stopped; pieces after it are not all taken.
    #[test]
    fn an_error_stops_the_run() {
        let taken = Arc::new(AtomicU64::new(0));
        let t = taken.clone();
        let e = run(
            "pieces-test",
            no_filter,
            1000,
            move |i| {
                t.fetch_add(1, Ordering::Relaxed);
                if i == 3 {
                    return Err(format!("piece {i}"));
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(())
            },
            || "panicked".to_string(),
        )
        .unwrap_err();
        assert_eq!(e, "piece 3");
        assert!(taken.load(Ordering::Relaxed) < 1000);
    }

    /// A helper that panics fails the run instead of losing its pieces.
    #[test]
    fn a_panicking_helper_fails_the_run() {
        // Our machines have two CPUs or more; with one there would be no helper to test.
        assert_eq!(thread_count(2), 2, "this test needs two CPUs for the VMM");
        let caller = std::thread::current().id();
        let helper_ran = Arc::new(AtomicBool::new(false));
        let ran = helper_ran.clone();
        let e = run(
            "pieces-test",
            no_filter,
            2,
            move |_| {
                if std::thread::current().id() != caller {
                    ran.store(true, Ordering::SeqCst);
                    panic!("a helper's piece");
                }
                // Leave the other piece to the helper, however late it starts.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while !ran.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Ok(())
            },
            || "panicked".to_string(),
        );
        assert!(
            helper_ran.load(Ordering::SeqCst),
            "the helper never took a piece"
        );
        assert_eq!(e, Err("panicked".to_string()));
    }
}
