//! Rate limiter configuration, as the original's `RateLimiterConfig` (`bandwidth` and `ops`
//! token buckets) and `RateLimiterGroupConfig`, and the option keys that fill them
//! (`bw_size=`, `bw_one_time_burst=`, `bw_refill_time=`, `ops_...`).

use serde::{Deserialize, Serialize};

use crate::{ConfigError, OptionParser};

/// A token bucket: `size` tokens (bytes or operations) refilled every `refill_time` ms, plus
/// `one_time_burst` tokens spent once at first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether a bucket limits anything (as the original: size and refill time non-zero).
    pub fn limits(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .flatten()
            .any(|b| b.size != 0 && b.refill_time != 0)
    }
}

/// The keys a rate limiter is given by (`--disk`, `--net`, `--rate-limit-group`).
pub(crate) const RATE_LIMITER_KEYS: &[&str] = &[
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

/// The rate limiter the keys give, as the original reads them: a bucket exists only when its
/// size and refill time are both non-zero (missing keys are 0); `None` when neither does.
pub(crate) fn parse_rate_limiter(
    p: &OptionParser,
) -> Result<Option<RateLimiterConfig>, ConfigError> {
    let bucket = |prefix: &str| -> Result<Option<TokenBucketConfig>, ConfigError> {
        let size: u64 = p.number(&format!("{prefix}_size"))?.unwrap_or(0);
        let burst: u64 = p.number(&format!("{prefix}_one_time_burst"))?.unwrap_or(0);
        let refill: u64 = p.number(&format!("{prefix}_refill_time"))?.unwrap_or(0);
        Ok((size != 0 && refill != 0).then_some(TokenBucketConfig {
            size,
            one_time_burst: Some(burst),
            refill_time: refill,
        }))
    };
    let bandwidth = bucket("bw")?;
    let ops = bucket("ops")?;
    Ok((bandwidth.is_some() || ops.is_some()).then_some(RateLimiterConfig { bandwidth, ops }))
}

/// `--rate-limit-group`: one limiter that several disks share (`rate_limit_group=<id>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitGroupConfig {
    pub id: String,
    pub rate_limiter_config: RateLimiterConfig,
}

impl RateLimitGroupConfig {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse_sets(
            "--rate-limit-group",
            raw,
            &[&["id"], RATE_LIMITER_KEYS],
            &[],
        )?;
        let cfg = RateLimitGroupConfig {
            id: p.get("id").unwrap_or_default(),
            rate_limiter_config: parse_rate_limiter(&p)?.unwrap_or_default(),
        };
        cfg.check().map_err(|m| p.error(m))?;
        Ok(cfg)
    }

    /// The original's rules: an id, and a bucket that limits.
    pub fn check(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("id=<group id> is required".into());
        }
        if !self.rate_limiter_config.limits() {
            return Err("a group needs bw_size and bw_refill_time, or ops_size and ops_refill_time (non-zero)".into());
        }
        Ok(())
    }
}
