//! What the virtio benchmarks share: the simulated guest's interrupt and its view of guest
//! memory, and CPU-time accounting per thread.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use guest_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use virtio_devices::VirtioInterrupt;

/// The simulated guest's interrupt. The device signals it with an eventfd write, as it signals
/// an irqfd in the VMM; `pending` stands for the request bit KVM then sets in the vCPU's
/// local APIC, which a halted vCPU that KVM is still polling sees without being woken.
#[repr(align(128))] // Its own cache lines: the halted "vCPU" polls `pending`.
pub struct Irq {
    fd: EventFd,
    pending: AtomicBool,
    /// The most a halted "vCPU" polls for its interrupt before its thread sleeps (KVM's
    /// `halt_poll_ns`), and the current window, adapted as KVM adapts it.
    halt_poll: Duration,
    window: std::sync::Mutex<Duration>,
}

impl VirtioInterrupt for Irq {
    fn signal_queue(&self, _i: usize) {
        self.pending.store(true, Ordering::Release);
        let _ = self.fd.write(1);
    }
    fn signal_config(&self) {}
}

/// How a `wait` ended.
#[derive(PartialEq, Eq)]
pub enum Wake {
    /// The interrupt came while the "vCPU" was polling.
    Polled,
    /// It came (or the timeout passed) after the thread went to sleep.
    Slept,
}

impl Irq {
    /// An interrupt whose waiter polls as KVM polls a halted vCPU: `halt_poll` is KVM's
    /// `halt_poll_ns`, 200 µs by default on x86 (BENCH_HALT_POLL_US overrides it; 0 makes the
    /// waiter sleep at once, so that every interrupt wakes a sleeping thread).
    pub fn new() -> Self {
        let us = std::env::var("BENCH_HALT_POLL_US")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        Irq {
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            pending: AtomicBool::new(false),
            halt_poll: Duration::from_micros(us),
            window: std::sync::Mutex::new(Duration::ZERO),
        }
    }

    pub fn halt_poll(&self) -> Duration {
        self.halt_poll
    }

    /// The guest has nothing to do until its next interrupt: it halts. KVM polls a halted vCPU
    /// for a while before it puts the thread to sleep, so a signal that comes in that window
    /// costs the device no wake-up of a sleeping thread on another CPU. The window adapts as in
    /// KVM's `kvm_vcpu_halt` with its defaults: it grows (10 µs, then doubling, up to
    /// `halt_poll`) after a halt shorter than `halt_poll` that outlasted it, and drops to 0
    /// after a halt longer than `halt_poll`. Past the window the thread sleeps in poll(2) until
    /// the eventfd is signalled or `timeout_ms` passes (an idle receive queue must not hang the
    /// bench).
    pub fn wait(&self, timeout_ms: i32) -> Wake {
        let start = Instant::now();
        let mut window = self.window.lock().unwrap();
        let mut wake = Wake::Slept;
        loop {
            // Polled with loads (as KVM reads the vCPU's pending interrupts), not with the
            // swap, which would take the cache line from the device at every turn.
            if self.pending.load(Ordering::Relaxed) && self.pending.swap(false, Ordering::Acquire) {
                wake = Wake::Polled;
                break;
            }
            if start.elapsed() >= *window {
                break;
            }
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
        if wake == Wake::Slept {
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, timeout_ms) };
            let _ = self.fd.read();
            self.pending.store(false, Ordering::Release);
        }
        let halted = start.elapsed();
        if halted > self.halt_poll {
            *window = Duration::ZERO;
        } else if halted > *window {
            *window = (*window * 2)
                .max(Duration::from_micros(10))
                .min(self.halt_poll);
        }
        wake
    }
}

/// The virtio EVENT_IDX test (vring_need_event): whether moving an index from `old` to `new`
/// passes `event`, the other side's "tell me when you get past this".
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The "guest's" side of its memory: volatile loads and stores at guest addresses (one region
/// at 0), as a driver on a vCPU touches its rings, instead of a region lookup and a copy per
/// access. The guest's work is not the device path's, but on a machine with few CPUs it
/// competes with the device thread for them: it is kept as lean as a real driver's.
pub struct GuestRam {
    base: *mut u8,
    len: u64,
}

impl GuestRam {
    pub fn new(mem: &GuestMemoryMmap, len: u64) -> Self {
        let base = mem
            .get_slice(GuestAddress(0), len as usize)
            .unwrap()
            .ptr_guard_mut()
            .as_ptr();
        GuestRam { base, len }
    }

    fn check<T>(&self, a: u64) {
        let n = std::mem::size_of::<T>() as u64;
        assert!(
            a.is_multiple_of(n) && a + n <= self.len,
            "guest access {a:#x}"
        );
    }

    pub fn rd<T: Copy>(&self, a: u64) -> T {
        self.check::<T>(a);
        // SAFETY: aligned and inside the mapping (checked), which the bench's GuestMemoryMmap
        // keeps alive; volatile: the device thread accesses the same memory.
        unsafe { std::ptr::read_volatile(self.base.add(a as usize).cast::<T>()) }
    }

    pub fn wr<T: Copy>(&self, a: u64, v: T) {
        self.check::<T>(a);
        // SAFETY: as in `rd`.
        unsafe { std::ptr::write_volatile(self.base.add(a as usize).cast::<T>(), v) }
    }
}

/// CPU seconds used so far by this process's threads named `name` (their run time in
/// nanoseconds from /proc/self/task/*/schedstat, not the stat file's 10 ms ticks).
pub fn thread_cpu(name: &str) -> f64 {
    let mut total = 0.0;
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat"))
            .expect("no /proc/self/task/*/schedstat: cannot measure a thread's CPU time");
        total += stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1e9;
    }
    total
}

/// CPU seconds used so far by the calling thread.
pub fn own_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Requests (frames), bytes (without headers), seconds and CPU seconds of one side of a
/// comparison.
#[derive(Default, Clone, Copy)]
pub struct Side {
    pub n: u64,
    pub bytes: u64,
    pub secs: f64,
    pub cpu: f64,
}

impl Side {
    pub fn rate(&self) -> f64 {
        self.n as f64 / self.secs
    }
    /// CPU seconds per request.
    pub fn per(&self) -> f64 {
        self.cpu / self.n.max(1) as f64
    }
    pub fn add(&mut self, o: &Side) {
        self.n += o.n;
        self.bytes += o.bytes;
        self.secs += o.secs;
        self.cpu += o.cpu;
    }
}

/// Device / plain: (wall clock, CPU per request).
pub fn ratio(dev: &Side, base: &Side) -> (f64, f64) {
    (dev.rate() / base.rate(), base.per() / dev.per())
}

/// Prints device / plain in wall clock and CPU per `unit` (request, frame): over the totals, as
/// the range and median of the per-round ratios, and between the best rounds of each side (the
/// least disturbed by the rest of the machine: noise only ever adds time). `rounds` holds each
/// round's (device, plain).
pub fn compare(dev: &Side, base: &Side, rounds: &[(Side, Side)], unit: &str) {
    let each: Vec<(f64, f64)> = rounds.iter().map(|(d, b)| ratio(d, b)).collect();
    let stats = |f: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = each.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let median = match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        format!(
            "rounds {:.0}-{:.0} %, median {:.0} %",
            100.0 * v.first().copied().unwrap_or(0.0),
            100.0 * v.last().copied().unwrap_or(0.0),
            100.0 * median
        )
    };
    let (wall, cpu) = ratio(dev, base);
    println!(
        "{:<34} {:>9.0} %   ({})",
        "  device / plain (wall clock)",
        100.0 * wall,
        stats(|r| r.0)
    );
    println!(
        "{:<34} {:>9.0} %   ({:.2} vs {:.2} us CPU per {unit}; {})",
        format!("  device / plain (CPU per {unit})"),
        100.0 * cpu,
        dev.per() * 1e6,
        base.per() * 1e6,
        stats(|r| r.1)
    );
    let best = |f: fn(&Side) -> f64| rounds.iter().map(move |(d, b)| (f(d), f(b)));
    let (dev_rate, base_rate) = best(Side::rate).fold((0.0, 0.0), |(a, b), (d, p)| {
        (f64::max(a, d), f64::max(b, p))
    });
    let (dev_per, base_per) = best(Side::per).fold((f64::MAX, f64::MAX), |(a, b), (d, p)| {
        (f64::min(a, d), f64::min(b, p))
    });
    println!(
        "{:<34} {:>9.0} %   (CPU {:.0} %: {:.2} vs {:.2} us per {unit})",
        "  best rounds (wall clock)",
        100.0 * dev_rate / base_rate,
        100.0 * base_per / dev_per,
        dev_per * 1e6,
        base_per * 1e6
    );
}

/// Prints one side's rate (`unit`: "req/s", "pkt/s") and throughput.
pub fn report(what: &str, s: &Side, unit: &str) {
    println!(
        "{what:<34} {:>10.0} {unit} {:>9.1} MiB/s",
        s.rate(),
        s.bytes as f64 / s.secs / (1 << 20) as f64
    );
}

/// The CPU the thread named `name` of this process last ran on (field 39 of its stat file).
pub fn thread_last_cpu(name: &str) -> Option<usize> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // Fields after "(comm)" start at field 3.
        return stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(39 - 3)?
            .parse()
            .ok();
    }
    None
}

/// Restricts the calling thread to `cpu`, or (None) lets it run anywhere again. A thread
/// moved off its CPU this way moves at once.
pub fn run_on(cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut s: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // Not available_parallelism: that is the current affinity, which this narrows.
    // SAFETY: sysconf has no memory arguments.
    let n = usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap_or(1);
    for c in 0..n {
        if cpu.is_none_or(|want| want == c) {
            // SAFETY: c is below the number of CPUs, far below CPU_SETSIZE.
            unsafe { libc::CPU_SET(c, &mut s) };
        }
    }
    // SAFETY: `s` and its size are valid for the call; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &s) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity({cpu:?} of {n}): {}",
        std::io::Error::last_os_error()
    );
}
