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

    /// Takes `n` tokens at once for `key` at `now` (nothing when `n` is 0). A request for
    /// more tokens than the bucket holds can never pass: it is refused with the time a full
    /// bucket takes to refill.
    pub fn check_n(&self, key: &K, n: u32, now: UnixMs) -> Result<(), u64> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        self.clock.advance_to(now);
        match self.buckets.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                telemetry::rate_limited(self.name);
                let wait = not_until.wait_time_from(self.clock.now());
                Err(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1))
            }
            Err(_) => {
                telemetry::rate_limited(self.name);
                let per_minute = u64::from(self.limit.per_minute.max(1));
                Err((u64::from(self.limit.burst) * 60_000).div_ceil(per_minute))
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

/// Bytes each user appended in the current UTC day, against `bytes_per_user_per_day`
/// (SPEC.md 11). Kept in memory: a restart forgets the day's counts.
pub struct DailyBytes {
    max: u64,
    counts: std::sync::Mutex<std::collections::HashMap<SystemKey, (u64, u64)>>,
}

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

impl DailyBytes {
    /// A quota of `max` bytes per user per UTC day.
    pub fn new(max: u64) -> Self {
        Self {
            max,
            counts: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Whether `user` may append `bytes` more at `now`; `Err(retry_after_ms)`, the time
    /// to the next UTC day, when that would pass the quota. Nothing is counted.
    pub fn allows(&self, user: &SystemKey, bytes: u64, now: UnixMs) -> Result<(), u64> {
        let day = now.0 / DAY_MS;
        let used = self
            .counts
            .lock()
            .ok()
            .and_then(|c| c.get(user).copied())
            .filter(|(d, _)| *d == day)
            .map_or(0, |(_, b)| b);
        if used.saturating_add(bytes) > self.max {
            telemetry::rate_limited("bytes_per_user_per_day");
            Err(((day + 1) * DAY_MS).saturating_sub(now.0).max(1))
        } else {
            Ok(())
        }
    }

    /// Counts `bytes` appended by `user` at `now`.
    pub fn charge(&self, user: &SystemKey, bytes: u64, now: UnixMs) {
        let day = now.0 / DAY_MS;
        if let Ok(mut counts) = self.counts.lock() {
            let entry = counts.entry(*user).or_insert((day, 0));
            if entry.0 != day {
                *entry = (day, 0);
            }
            entry.1 = entry.1.saturating_add(bytes);
        }
    }

    /// The quota.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Forgets the counts of past days.
    fn forget_past(&self, now: UnixMs) {
        let day = now.0 / DAY_MS;
        if let Ok(mut counts) = self.counts.lock() {
            counts.retain(|_, (d, _)| *d == day);
        }
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
    /// `claims_per_pair`: KeyPackage claims per (claiming user, target user).
    pub claims_per_pair: Limiter<(SystemKey, SystemKey)>,
    /// `sends_per_device`: `Send` frames per device.
    pub sends_per_device: Limiter<DeviceId>,
    /// `creates_per_system`: `CreateConversation` frames per user.
    pub creates_per_system: Limiter<SystemKey>,
    /// `invites_per_user`: users added to conversations, per inviting user.
    pub invites_per_user: Limiter<SystemKey>,
    /// `bytes_per_user_per_day`.
    pub bytes_per_user: DailyBytes,
}

impl RateLimiters {
    /// The limits of `config`.
    pub fn new(config: &crate::handler::GatewayConfig) -> Self {
        Self {
            connects_per_ip: Limiter::new("connects_per_ip", config.connects_per_ip),
            claims_per_claimer: Limiter::new("claims_per_claimer", config.claims_per_claimer),
            claims_per_target: Limiter::new("claims_per_target", config.claims_per_target),
            claims_per_pair: Limiter::new("claims_per_pair", config.claims_per_pair),
            sends_per_device: Limiter::new("sends_per_device", config.sends_per_device),
            creates_per_system: Limiter::new("creates_per_system", config.creates_per_system),
            invites_per_user: Limiter::new("invites_per_user", config.invites_per_user),
            bytes_per_user: DailyBytes::new(config.bytes_per_user_per_day),
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
            self.claims_per_pair.name(): entry(self.claims_per_pair.limit()),
            self.sends_per_device.name(): entry(self.sends_per_device.limit()),
            self.creates_per_system.name(): entry(self.creates_per_system.limit()),
            self.invites_per_user.name(): entry(self.invites_per_user.limit()),
        })
    }

    /// Forgets idle buckets of every limit, and the byte counts of days before `now`'s.
    pub fn forget_idle(&self, now: UnixMs) {
        self.connects_per_ip.forget_idle();
        self.claims_per_claimer.forget_idle();
        self.claims_per_target.forget_idle();
        self.claims_per_pair.forget_idle();
        self.sends_per_device.forget_idle();
        self.creates_per_system.forget_idle();
        self.invites_per_user.forget_idle();
        self.bytes_per_user.forget_past(now);
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

    #[test]
    fn several_tokens_at_once_and_more_than_a_bucket_never() {
        let limiter = Limiter::new(
            "test",
            RateLimit {
                per_minute: 60,
                burst: 5,
            },
        );
        let t = UnixMs(1_000_000);
        assert_eq!(limiter.check_n(&1u8, 0, t), Ok(()));
        assert_eq!(limiter.check_n(&1u8, 3, t), Ok(()));
        // Two left: three more wait for one token (a second).
        assert_eq!(limiter.check_n(&1u8, 3, t), Err(1_000));
        assert_eq!(limiter.check_n(&1u8, 2, t), Ok(()));
        // Six never fit in a bucket of five: the wait named is a full refill.
        assert_eq!(limiter.check_n(&2u8, 6, t), Err(5_000));
    }
}
