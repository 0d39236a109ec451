//! Log lines in the original's format, to standard error or `--log-file`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::LevelFilter;

use crate::log_format;

pub const DEFAULT_FORMAT: &str =
    "cloud-hypervisor: {boottime}s: <{thread}> {level}:{location} -- {msg}";

/// `-v` count → level, as the original maps it.
pub fn level(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Lines one call site may log per second; the rest are counted and dropped.
const LINES_PER_SITE: u32 = 20;
const WINDOW: Duration = Duration::from_secs(1);

/// A per-call-site limit on log lines. Many lines are a guest's doing (a ring outside its
/// memory, a device it broke, a port it wrote), and a guest can repeat them thousands of times
/// a second: without a limit it could fill the host's disk or journal through our log. Each
/// call site (file and line) gets `LINES_PER_SITE` lines a second; the first line after a
/// window in which some were dropped says how many.
#[derive(Default)]
struct Limiter {
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

struct Site {
    window: Instant,
    lines: u32,
    dropped: u64,
}

impl Limiter {
    /// Whether the line of `site` logged at `now` goes out (`Some(lines dropped before it)`).
    fn admit(&self, site: (&'static str, u32), now: Instant) -> Option<u64> {
        let mut sites = self.sites.lock().unwrap_or_else(|e| e.into_inner());
        let s = sites.entry(site).or_insert(Site {
            window: now,
            lines: 0,
            dropped: 0,
        });
        if now.duration_since(s.window) >= WINDOW {
            s.window = now;
            s.lines = 0;
        }
        if s.lines >= LINES_PER_SITE {
            s.dropped += 1;
            return None;
        }
        s.lines += 1;
        Some(std::mem::take(&mut s.dropped))
    }
}

/// Sets up logging; refuses a `--log-format` template it cannot read, saying why.
pub fn init(verbosity: u8, file: Option<std::fs::File>, format: &str) -> Result<(), String> {
    let tokens = log_format::parse(format)?;
    if log_format::wants_local_time(&tokens) {
        log_format::load_local_zone();
    }
    let start = Instant::now();
    let limiter = Limiter::default();
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level(verbosity))
        .format(move |buf, record| {
            let site = (
                record.file_static().unwrap_or("?"),
                record.line().unwrap_or(0),
            );
            match limiter.admit(site, Instant::now()) {
                None => Ok(()),
                Some(0) => writeln!(buf, "{}", log_format::render(&tokens, start, record)),
                Some(n) => writeln!(
                    buf,
                    "{} ({n} more lines from here dropped: at most {LINES_PER_SITE} a second)",
                    log_format::render(&tokens, start, record)
                ),
            }
        });
    if let Some(f) = file {
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    let _ = builder.try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest repeating a logged condition 10 000 times in a second gets 20 lines from that
    /// call site; another site is not held back; the next second's first line counts the rest.
    #[test]
    fn a_flood_from_one_call_site_is_capped() {
        let l = Limiter::default();
        let t0 = Instant::now();
        let site = ("virtio-devices/src/transport.rs", 657);
        let out = (0..10_000)
            .filter(|i| l.admit(site, t0 + Duration::from_micros(*i)).is_some())
            .count();
        assert_eq!(out, LINES_PER_SITE as usize);
        assert_eq!(l.admit(("devices/src/ged.rs", 95), t0), Some(0));
        let later = t0 + WINDOW + Duration::from_millis(20);
        assert_eq!(
            l.admit(site, later),
            Some(10_000 - u64::from(LINES_PER_SITE))
        );
        assert_eq!(l.admit(site, later), Some(0));
    }
}
