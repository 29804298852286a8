//! Rate limits (SPEC.md section 11): keyed `governor` token buckets driven by the clock the
//! caller passes in, not by the machine's, so that the handler stays sans-IO and a
//! simulation replays the same decisions from the same seed.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use confab_spec::ids::{DeviceId, SystemKey, UnixMs};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::telemetry;

/// A token bucket: `burst` requests at once, refilled at `per_minute` per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate, per minute (at least 1).
    pub per_minute: u32,
    /// Bucket size (at least 1).
    pub burst: u32,
}

impl RateLimit {
    fn quota(self) -> Quota {
        let per_minute = NonZeroU32::new(self.per_minute).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::per_minute(per_minute).allow_burst(burst)
    }
}

/// The time the caller last reported, as governor reads it. It never goes back: requests
/// handled concurrently may report times a few milliseconds apart.
#[derive(Debug, Clone, Default)]
struct ReportedClock(Arc<AtomicU64>);

impl ReportedClock {
    fn advance_to(&self, now: UnixMs) {
        self.0.fetch_max(now.0, Ordering::Relaxed);
    }
}

impl Clock for ReportedClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// One named, keyed limit.
pub struct Limiter<K: Hash + Eq + Clone> {
    name: &'static str,
    limit: RateLimit,
    clock: ReportedClock,
    buckets: RateLimiter<K, DefaultKeyedStateStore<K>, ReportedClock, NoOpMiddleware<Duration>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limit called `name` in SPEC.md and in metrics.
    pub fn new(name: &'static str, limit: RateLimit) -> Self {
        let clock = ReportedClock::default();
        let buckets = RateLimiter::new(
            limit.quota(),
            DefaultKeyedStateStore::default(),
            clock.clone(),
        );
        Self {
            name,
            limit,
            clock,
            buckets,
        }
    }

    /// Takes a token for `key` at `now`; `Err(retry_after_ms)` when the bucket is empty,
    /// the time after which the same request would be allowed (REQ-11-1).
    pub fn check(&self, key: &K, now: UnixMs) -> Result<(), u64> {
        self.clock.advance_to(now);
        match self.buckets.check_key(key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                telemetry::rate_limited(self.name);
                let wait = not_until.wait_time_from(self.clock.now());
                Err(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            }
        }
    }

    /// The limit's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The limit's rate and burst.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Forgets buckets that are full again, so that memory follows the active keys.
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

/// Every limit the gateway enforces, shared by all connections.
pub struct RateLimiters {
    /// `connects_per_ip`: WebSocket upgrades per source address.
    pub connects_per_ip: Limiter<IpAddr>,
    /// `claims_per_claimer`: KeyPackage claims per claiming device.
    pub claims_per_claimer: Limiter<DeviceId>,
    /// `claims_per_target`: KeyPackage claims per target user.
    pub claims_per_target: Limiter<SystemKey>,
}

impl RateLimiters {
    /// The limits of `config`.
    pub fn new(config: &crate::handler::GatewayConfig) -> Self {
        Self {
            connects_per_ip: Limiter::new("connects_per_ip", config.connects_per_ip),
            claims_per_claimer: Limiter::new("claims_per_claimer", config.claims_per_claimer),
            claims_per_target: Limiter::new("claims_per_target", config.claims_per_target),
        }
    }

    /// `/v1/info`'s `rate_limits`: every limit enforced, by name.
    pub fn announce(&self) -> serde_json::Value {
        let entry =
            |l: RateLimit| serde_json::json!({"per_minute": l.per_minute, "burst": l.burst});
        serde_json::json!({
            self.connects_per_ip.name(): entry(self.connects_per_ip.limit()),
            self.claims_per_claimer.name(): entry(self.claims_per_claimer.limit()),
            self.claims_per_target.name(): entry(self.claims_per_target.limit()),
        })
    }

    /// Forgets idle buckets of every limit.
    pub fn forget_idle(&self) {
        self.connects_per_ip.forget_idle();
        self.claims_per_claimer.forget_idle();
        self.claims_per_target.forget_idle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_empties_refills_with_reported_time_and_names_the_wait() {
        let limiter = Limiter::new(
            "test",
            RateLimit {
                per_minute: 60,
                burst: 2,
            },
        );
        let t = UnixMs(1_000_000);
        assert_eq!(limiter.check(&1u8, t), Ok(()));
        assert_eq!(limiter.check(&1u8, t), Ok(()));
        // Empty: one token per second comes back.
        assert_eq!(limiter.check(&1u8, t), Err(1_000));
        assert_eq!(limiter.check(&1u8, t.plus_ms(400)), Err(600));
        // Other keys have their own buckets.
        assert_eq!(limiter.check(&2u8, t), Ok(()));
        assert_eq!(limiter.check(&1u8, t.plus_ms(1_000)), Ok(()));
        // A time reported out of order never moves the clock back.
        assert_eq!(limiter.check(&1u8, t), Err(1_000));
    }
}
