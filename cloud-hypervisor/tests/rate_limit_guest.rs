//! Disk rate limits as the guest sees them: the test guest (`test=blk-rate`) reads a
//! rate-limited disk (`--disk ...,bw_size=,bw_refill_time=` or `ops_*`) one request at a time
//! for 3 s after a 0.5 s warm-up, timing itself with kvmclock, and reports its rate; it must be
//! within 20 % of the configured one (a test, not a benchmark: the guest shares two cores with
//! the other tests). `bench_guest_rate_limit_figures` (ignored; `scripts/bench-rate-limit-guest`)
//! measures the accuracy over longer runs.

mod common;

use std::time::Duration;

use common::{guest, scratch, spawn, wait_with_timeout};

/// What the guest measured: (bytes per second, requests per second).
#[derive(Clone, Copy, Debug)]
struct Rate {
    bytes: f64,
    requests: f64,
}

/// Boots `test=blk-rate` on a fresh 64 MiB raw disk with the rate-limit keys `limits`, reading
/// `size`-byte requests for `ms` after `warm_ms`; the guest's rates.
fn guest_rate(name: &str, limits: &str, size: u32, warm_ms: u32, ms: u32) -> Rate {
    let dir = scratch(name);
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let disk = format!("path={},{limits}", img.display());
    let cmdline =
        format!("test=blk-rate blk_rate_size={size} blk_rate_warm_ms={warm_ms} blk_rate_ms={ms}");
    let k = guest().elf_pvh.to_str().unwrap().to_string();
    let child = spawn(&[
        "--kernel",
        &k,
        "--cmdline",
        &cmdline,
        "--cpus",
        "boot=1",
        "--memory",
        "size=256M",
        "--serial",
        "tty",
        "--console",
        "off",
        "--disk",
        &disk,
    ]);
    let timeout = Duration::from_millis(u64::from(warm_ms + ms) + 30_000);
    let r = wait_with_timeout(child, timeout);
    r.assert_guest_passed();
    r.assert_passed("blk-rate");
    parse(&r.stdout).unwrap_or_else(|| panic!("no BLK-RATE line:\n{}", r.stdout))
}

fn parse(out: &str) -> Option<Rate> {
    let line = out.lines().find(|l| l.starts_with("BLK-RATE bytes="))?;
    let field = |k: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    // From the counts and the guest's nanoseconds (its own rates are whole numbers).
    let secs = field("ns")? / 1e9;
    Some(Rate {
        bytes: field("bytes")? / secs,
        requests: field("requests")? / secs,
    })
}

fn assert_within(what: &str, got: f64, want: f64, percent: f64) {
    let err = (got - want) / want * 100.0;
    eprintln!("{what}: {got:.0}/s of {want:.0}/s ({err:+.2} %)");
    assert!(
        err.abs() <= percent,
        "{what}: the guest got {got:.0}/s, configured {want:.0}/s ({err:+.1} %)"
    );
}

/// 1 MiB per 100 ms (10 MiB/s) in 64 KiB reads: the guest reads at that rate.
#[test]
fn the_guest_reads_at_the_configured_bandwidth() {
    let r = guest_rate(
        "rate-guest-bw",
        "bw_size=1048576,bw_refill_time=100",
        65536,
        500,
        3000,
    );
    assert_within("bandwidth", r.bytes, 10.0 * 1048576.0, 20.0);
}

/// 50 requests per 100 ms (500/s) of 4 KiB: the guest makes that many.
#[test]
fn the_guest_reads_at_the_configured_request_rate() {
    let r = guest_rate(
        "rate-guest-ops",
        "ops_size=50,ops_refill_time=100",
        4096,
        500,
        3000,
    );
    assert_within("requests", r.requests, 500.0, 20.0);
}

/// Figures for docs/pci.md (`scripts/bench-rate-limit-guest`): each limit for 5 s after 0.5 s,
/// `BENCH_ROUNDS` times (default 3); prints every round and the median's error.
#[test]
#[ignore]
fn bench_guest_rate_limit_figures() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let cases: [(&str, &str, u32, f64, bool); 6] = [
        (
            "5 MiB/s, 64 KiB reads",
            "bw_size=524288,bw_refill_time=100",
            65536,
            5.0 * 1048576.0,
            true,
        ),
        (
            "10 MiB/s, 64 KiB reads",
            "bw_size=1048576,bw_refill_time=100",
            65536,
            10.0 * 1048576.0,
            true,
        ),
        (
            "50 MiB/s, 64 KiB reads",
            "bw_size=5242880,bw_refill_time=100",
            65536,
            50.0 * 1048576.0,
            true,
        ),
        (
            "200 ops/s, 4 KiB reads",
            "ops_size=20,ops_refill_time=100",
            4096,
            200.0,
            false,
        ),
        (
            "500 ops/s, 4 KiB reads",
            "ops_size=50,ops_refill_time=100",
            4096,
            500.0,
            false,
        ),
        (
            "1000 ops/s, 4 KiB reads",
            "ops_size=100,ops_refill_time=100",
            4096,
            1000.0,
            false,
        ),
    ];
    for (what, limits, size, want, bw) in cases {
        let mut got: Vec<f64> = (0..rounds)
            .map(|i| {
                let r = guest_rate(&format!("rate-bench-{i}"), limits, size, 500, 5000);
                if bw {
                    r.bytes
                } else {
                    r.requests
                }
            })
            .collect();
        got.sort_by(f64::total_cmp);
        let median = got[got.len() / 2];
        let errs: Vec<String> = got
            .iter()
            .map(|g| format!("{:+.3}", (g - want) / want * 100.0))
            .collect();
        println!(
            "guest rate {what}: median {median:.1}/s of {want:.0}/s ({:+.3} %), rounds {} %",
            (median - want) / want * 100.0,
            errs.join(" ")
        );
    }
}
