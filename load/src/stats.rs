//! Latency summaries.

use serde::Serialize;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// Summarises `samples` (sorted in place). Percentile `q` is the smallest sample with
    /// at least `q` of all samples at or below it.
    pub fn of(samples: &mut [u32]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            u64::from(samples[rank - 1])
        };
        Self {
            count: samples.len(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: u64::from(samples[samples.len() - 1]),
        }
    }
}

/// Milliseconds with two decimals, for tables.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn percentiles_are_samples_in_order(mut v in proptest::collection::vec(0u32..1_000_000, 1..500)) {
            let l = Latency::of(&mut v);
            prop_assert!(v.contains(&(l.p50_us as u32)));
            prop_assert!(l.p50_us <= l.p99_us && l.p99_us <= l.p999_us && l.p999_us <= l.max_us);
            let below = v.iter().filter(|&&x| u64::from(x) <= l.p99_us).count();
            prop_assert!(below as f64 >= 0.99 * v.len() as f64);
            let strictly_below = v.iter().filter(|&&x| u64::from(x) < l.p99_us).count();
            prop_assert!((strictly_below as f64) < 0.99 * v.len() as f64);
        }
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Latency::of(&mut []), Latency::default());
    }
}
