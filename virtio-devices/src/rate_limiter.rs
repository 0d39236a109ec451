//! Token-bucket rate limiting with the original's semantics: a bucket holds at most `size`
//! tokens and refills in proportion to the time passed (`size` tokens per `refill_time` ms);
//! a one-time burst is spent first; a request larger than the bucket passes when the bucket
//! is full and leaves it in debt (over-consumption: later requests wait until it is paid);
//! a device that finds no budget arms its `timerfd` for when there will be enough and stops
//! serving until it fires. A limiter has two buckets, bytes (`bandwidth`) and operations
//! (`ops`); a request passes only when both have room, and then takes from both.
//!
//! Time is injected (`*_at` take nanoseconds since the limiter's epoch), so the arithmetic is
//! tested with a fake clock.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

const NS_PER_MS: u128 = 1_000_000;

/// One bucket's configuration, as the API's `TokenBucket`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketConfig {
    pub size: u64,
    pub one_time_burst: u64,
    pub refill_time_ms: u64,
}

/// A token bucket. `budget` may go below zero after an over-consumption (a debt).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    refill_ns: u128,
    budget: i128,
    /// `elapsed_ns * size` not yet turned into whole tokens (below `refill_ns`).
    carry: u128,
    last_ns: u64,
}

impl TokenBucket {
    /// `None` when `size` or `refill_time_ms` is 0: as in the original, no limit.
    pub fn new(c: BucketConfig) -> Option<Self> {
        if c.size == 0 || c.refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size: c.size,
            one_time_burst: c.one_time_burst,
            refill_ns: u128::from(c.refill_time_ms) * NS_PER_MS,
            budget: i128::from(c.size),
            carry: 0,
            last_ns: 0,
        })
    }

    /// Adds the tokens earned since the last refill (at most up to `size`).
    fn refill(&mut self, now_ns: u64) {
        let elapsed = u128::from(now_ns.saturating_sub(self.last_ns));
        self.last_ns = self.last_ns.max(now_ns);
        let size = i128::from(self.size);
        if self.budget >= size {
            self.carry = 0;
            return;
        }
        self.carry += elapsed * u128::from(self.size);
        let add = self.carry / self.refill_ns;
        self.carry %= self.refill_ns;
        self.budget = (self.budget + add.min(u128::from(u64::MAX)) as i128).min(size);
        if self.budget >= size {
            self.carry = 0;
        }
    }

    /// Whether `tokens` can be taken now; if not, how long until they can.
    fn check(&mut self, tokens: u64, now_ns: u64) -> Result<(), Duration> {
        self.refill(now_ns);
        let from_budget = tokens.saturating_sub(self.one_time_burst);
        if from_budget == 0 {
            return Ok(());
        }
        // Larger than the bucket: it passes on a full bucket (and leaves a debt).
        let need = i128::from(from_budget.min(self.size));
        if self.budget >= need {
            return Ok(());
        }
        let missing = (need - self.budget) as u128;
        let ns = (missing * self.refill_ns)
            .saturating_sub(self.carry)
            .div_ceil(u128::from(self.size));
        Err(Duration::from_nanos(
            ns.clamp(1, u128::from(u64::MAX)) as u64
        ))
    }

    /// Takes `tokens` (after `check` said yes): the burst first, then the budget.
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// Tokens available now (the budget; negative while in debt), without the burst.
    pub fn budget_at(&mut self, now_ns: u64) -> i128 {
        self.refill(now_ns);
        self.budget
    }

    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }
}

/// A limiter's configuration, as the API's `RateLimiterConfig`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimiterConfig {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

/// The buckets of one limiter; shared by the devices of a rate-limit group.
#[derive(Debug)]
pub struct Buckets {
    epoch: Instant,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl Buckets {
    /// `None` when neither bucket limits anything.
    pub fn new(c: &LimiterConfig) -> Option<Self> {
        let bandwidth = c.bandwidth.and_then(TokenBucket::new);
        let ops = c.ops.and_then(TokenBucket::new);
        (bandwidth.is_some() || ops.is_some()).then(|| Buckets {
            epoch: Instant::now(),
            bandwidth,
            ops,
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    /// Whether both buckets have `bytes` and `ops` tokens now; if not, how long until they
    /// will (the longer wait of the two).
    pub fn ready_at(&mut self, bytes: u64, ops: u64, now_ns: u64) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let (Some(b), true) = (b.as_mut(), n > 0) {
                if let Err(w) = b.check(n, now_ns) {
                    wait = wait.max(w);
                }
            }
        }
        if wait > Duration::ZERO {
            return Err(wait);
        }
        Ok(())
    }

    /// Takes `bytes` and `ops` tokens whatever the budget (it may go into debt): for what
    /// has already happened (a frame read from the TAP).
    pub fn charge_at(&mut self, bytes: u64, ops: u64, now_ns: u64) {
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = b.as_mut() {
                b.refill(now_ns);
                b.take(n);
            }
        }
    }

    /// Takes `bytes` and `ops` tokens when both buckets have them; else takes nothing and
    /// says how long until they will.
    pub fn consume_at(&mut self, bytes: u64, ops: u64, now_ns: u64) -> Result<(), Duration> {
        self.ready_at(bytes, ops, now_ns)?;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = b.as_mut() {
                b.take(n);
            }
        }
        Ok(())
    }

    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Duration> {
        let now = self.now_ns();
        self.consume_at(bytes, ops, now)
    }

    pub fn bandwidth(&mut self) -> Option<&mut TokenBucket> {
        self.bandwidth.as_mut()
    }

    pub fn ops(&mut self) -> Option<&mut TokenBucket> {
        self.ops.as_mut()
    }
}

/// A rate limit group: one set of buckets that several devices draw from.
pub type SharedBuckets = Arc<Mutex<Buckets>>;

/// One device's (or one direction's) view of a limiter: the buckets (its own or a group's)
/// and a timer it arms when blocked. While blocked it refuses every request without looking
/// at the buckets, until `timer_fired` (its fd became readable).
#[derive(Debug)]
pub struct RateLimiter {
    buckets: SharedBuckets,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    /// A limiter of its own; `None` when `c` limits nothing.
    pub fn new(c: &LimiterConfig) -> std::io::Result<Option<Self>> {
        match Buckets::new(c) {
            None => Ok(None),
            Some(b) => Self::shared(Arc::new(Mutex::new(b))).map(Some),
        }
    }

    /// A view of the group `buckets`, with a timer of its own.
    pub fn shared(buckets: SharedBuckets) -> std::io::Result<Self> {
        Ok(RateLimiter {
            buckets,
            timer: TimerFd::new()?,
            blocked: false,
        })
    }

    /// Takes one request of `bytes`; `false` (and the timer armed) when there is no budget.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.blocked {
            return false;
        }
        let r = match self.buckets.lock() {
            Ok(mut b) => b.consume(bytes, ops),
            Err(_) => Ok(()),
        };
        match r {
            Ok(()) => true,
            Err(wait) => {
                // Should the timer fail, the device is not left asleep for ever.
                self.blocked = self.timer.reset(wait, None).is_ok();
                !self.blocked
            }
        }
    }

    /// Takes what a request that already happened used (it may leave a debt); when the
    /// budget is gone, blocks and arms the timer for when one more request of a byte could
    /// pass.
    pub fn charge(&mut self, bytes: u64, ops: u64) {
        let wait = match self.buckets.lock() {
            Ok(mut b) => {
                let now = b.now_ns();
                b.charge_at(bytes, ops, now);
                b.ready_at(1, 1, now).err()
            }
            Err(_) => None,
        };
        if let (Some(w), false) = (wait, self.blocked) {
            self.blocked = self.timer.reset(w, None).is_ok();
        }
    }

    /// Whether requests are refused until the timer fires.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fd became readable: reads it and unblocks.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    pub fn buckets(&self) -> &SharedBuckets {
        &self.buckets
    }
}

impl AsRawFd for RateLimiter {
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
        TokenBucket::new(BucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: refill_ms,
        })
        .unwrap()
    }

    fn take(b: &mut TokenBucket, n: u64, now: u64) -> Result<(), Duration> {
        b.check(n, now)?;
        b.take(n);
        Ok(())
    }

    #[test]
    fn zero_size_or_refill_is_no_limit() {
        for (s, r) in [(0, 100), (100, 0)] {
            let c = BucketConfig {
                size: s,
                one_time_burst: 5,
                refill_time_ms: r,
            };
            assert!(TokenBucket::new(c).is_none());
        }
        assert!(Buckets::new(&LimiterConfig::default()).is_none());
    }

    #[test]
    fn consume_until_empty_then_refill_in_proportion() {
        let mut b = bucket(1000, 0, 100);
        take(&mut b, 600, 0).unwrap();
        take(&mut b, 400, 0).unwrap();
        assert_eq!(b.budget_at(0), 0);
        // 1000 tokens per 100 ms: 10 per ms.
        assert_eq!(b.check(1, 0), Err(Duration::from_micros(100)));
        assert_eq!(b.budget_at(25 * MS), 250);
        // Fractions of a token are kept, not lost.
        let mut b2 = bucket(1000, 0, 100);
        take(&mut b2, 1000, 0).unwrap();
        for i in 1..=100 {
            b2.budget_at(i * 50_000);
        }
        assert_eq!(b2.budget_at(5 * MS), 50);
        // Never above the size.
        assert_eq!(b.budget_at(10_000 * MS), 1000);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_once() {
        let mut b = bucket(100, 250, 1000);
        take(&mut b, 200, 0).unwrap();
        assert_eq!((b.one_time_burst(), b.budget_at(0)), (50, 100));
        take(&mut b, 120, 0).unwrap();
        assert_eq!((b.one_time_burst(), b.budget_at(0)), (0, 30));
        assert!(b.check(31, 0).is_err());
        take(&mut b, 30, 0).unwrap();
        // Refilled: the burst does not come back.
        assert_eq!(b.budget_at(5000 * MS), 100);
        assert_eq!(b.one_time_burst(), 0);
    }

    #[test]
    fn larger_than_the_bucket_passes_when_full_and_leaves_a_debt() {
        let mut b = bucket(1000, 0, 1000);
        take(&mut b, 1, 0).unwrap();
        // Not full: it waits until the bucket is full (1 token: 1 ms).
        assert_eq!(b.check(3000, 0), Err(Duration::from_millis(1)));
        take(&mut b, 3000, MS).unwrap();
        assert_eq!(b.budget_at(MS), -2000);
        // The next request waits for the debt and its own tokens: 2100 tokens, 2.1 s.
        assert_eq!(b.check(100, MS), Err(Duration::from_millis(2100)));
        assert!(b.check(100, 2101 * MS).is_ok());
    }

    #[test]
    fn both_buckets_must_agree_and_nothing_is_taken_on_refusal() {
        let c = LimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            ops: Some(BucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
        };
        let mut l = Buckets::new(&c).unwrap();
        l.consume_at(100, 1, 0).unwrap();
        l.consume_at(100, 1, 0).unwrap();
        // Ops empty (500 ms to one more); bytes would do.
        assert_eq!(l.consume_at(100, 1, 0), Err(Duration::from_millis(500)));
        assert_eq!(l.bandwidth().unwrap().budget_at(0), 800);
        // Bytes short too (200 missing: 200 ms): the longer wait counts.
        assert_eq!(l.consume_at(1000, 1, 0), Err(Duration::from_millis(500)));
        assert_eq!(l.ops().unwrap().budget_at(0), 0);
        assert!(l.consume_at(1000, 1, 499 * MS).is_err());
        l.consume_at(1000, 1, 500 * MS).unwrap();
        assert_eq!(l.bandwidth().unwrap().budget_at(500 * MS), 0);
    }

    #[test]
    fn blocked_limiter_arms_its_timer_and_unblocks_when_it_fires() {
        let c = LimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                size: 100,
                one_time_burst: 0,
                refill_time_ms: 100,
            }),
        };
        let mut l = RateLimiter::new(&c).unwrap().unwrap();
        let t0 = Instant::now();
        let mut n = 0;
        while l.consume(0, 1) {
            n += 1;
        }
        assert!((100..110).contains(&n), "{n}");
        assert!(l.is_blocked());
        assert!(!l.consume(0, 1));
        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 1000) }, 1);
        assert!(t0.elapsed() < Duration::from_millis(100));
        l.timer_fired();
        assert!(l.consume(0, 1));
    }

    #[test]
    fn charge_goes_into_debt_and_waits_it_out() {
        let c = LimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 1000,
            }),
            ops: None,
        };
        let mut l = Buckets::new(&c).unwrap();
        l.charge_at(1500, 1, 0);
        assert_eq!(l.bandwidth().unwrap().budget_at(0), -500);
        assert_eq!(l.ready_at(1, 1, 0), Err(Duration::from_millis(501)));
        assert!(l.ready_at(1, 1, 501 * MS).is_ok());
    }

    #[test]
    fn a_group_shares_one_budget() {
        let c = LimiterConfig {
            bandwidth: Some(BucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time_ms: 10_000,
            }),
            ops: None,
        };
        let b = Arc::new(Mutex::new(Buckets::new(&c).unwrap()));
        let mut x = RateLimiter::shared(b.clone()).unwrap();
        let mut y = RateLimiter::shared(b).unwrap();
        assert!(x.consume(600, 1));
        assert!(!y.consume(600, 1));
        assert!(y.is_blocked() && !x.is_blocked());
        assert!(!y.consume(0, 0));
        assert!(x.consume(300, 1));
    }
}
