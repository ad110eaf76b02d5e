//! Latency histograms of [`v1::GatewayTraffic`]: one set of bucket bounds
//! for every gateway, so that histograms from any instance and any window
//! add up, and quantiles read from the sum.

use crate::v1::{GatewayTraffic, LatencyHistogram, ReplicaTraffic};

/// Upper bounds of the buckets, in seconds: 1 ms doubling to about 35
/// minutes (a long completion), then +Inf.
pub const LATENCY_BOUNDS_SECONDS: [f64; 22] = {
    let mut bounds = [0.0; 22];
    let mut i = 0;
    let mut bound = 0.001;
    while i < bounds.len() {
        bounds[i] = bound;
        bound *= 2.0;
        i += 1;
    }
    bounds
};

impl LatencyHistogram {
    /// Counts one observation of `seconds`.
    pub fn observe(&mut self, seconds: f64) {
        if self.counts.len() != LATENCY_BOUNDS_SECONDS.len() + 1 {
            self.counts = vec![0; LATENCY_BOUNDS_SECONDS.len() + 1];
        }
        let bucket = LATENCY_BOUNDS_SECONDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS_SECONDS.len());
        self.counts[bucket] += 1;
        if seconds.is_finite() {
            self.sum_seconds += seconds;
        }
    }

    /// Adds `other` to this one. A histogram with another number of
    /// buckets than the contract's is not added (a malformed message).
    pub fn merge(&mut self, other: &LatencyHistogram) -> bool {
        if other.counts.is_empty() {
            return true;
        }
        if other.counts.len() != LATENCY_BOUNDS_SECONDS.len() + 1 {
            return false;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; other.counts.len()];
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.sum_seconds += other.sum_seconds;
        true
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The `q` quantile (0 to 1), as the upper bound of the bucket it
    /// falls in (what Prometheus' `histogram_quantile` would interpolate
    /// towards); `None` when empty. Past the last bound: +Inf.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_SECONDS
                        .get(i)
                        .copied()
                        .unwrap_or(f64::INFINITY),
                );
            }
        }
        Some(f64::INFINITY)
    }
}

/// One version (replica template) of a deployment: its replicas' traffic
/// summed over gateways and windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionTraffic {
    pub template: String,
    pub requests: u64,
    pub succeeded: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    pub broken: u64,
    pub time_to_first_byte: LatencyHistogram,
    pub duration: LatencyHistogram,
}

impl VersionTraffic {
    pub fn add(&mut self, r: &ReplicaTraffic) {
        self.requests = self.requests.saturating_add(r.requests);
        self.succeeded = self.succeeded.saturating_add(r.succeeded);
        self.client_errors = self.client_errors.saturating_add(r.client_errors);
        self.server_errors = self.server_errors.saturating_add(r.server_errors);
        self.broken = self.broken.saturating_add(r.broken);
        if let Some(h) = &r.time_to_first_byte {
            self.time_to_first_byte.merge(h);
        }
        if let Some(h) = &r.duration {
            self.duration.merge(h);
        }
    }

    /// The share of requests the version failed (5xx, or a stream broken
    /// on it); 4xx are the clients'. `None` before any request.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0)
            .then(|| self.server_errors.saturating_add(self.broken) as f64 / self.requests as f64)
    }
}

/// The traffic of `deployment` in `summaries`, per version, sorted by
/// template.
pub fn by_version(summaries: &[GatewayTraffic], deployment: &str) -> Vec<VersionTraffic> {
    let mut versions: std::collections::BTreeMap<&str, VersionTraffic> = Default::default();
    for r in summaries
        .iter()
        .flat_map(|s| &s.replicas)
        .filter(|r| r.deployment == deployment)
    {
        versions
            .entry(r.template.as_str())
            .or_insert_with(|| VersionTraffic {
                template: r.template.clone(),
                ..Default::default()
            })
            .add(r);
    }
    versions.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_double_from_a_millisecond_to_half_an_hour() {
        let bounds = LATENCY_BOUNDS_SECONDS;
        assert_eq!(bounds[0], 0.001);
        assert_eq!(bounds[10], 1.024);
        assert!(bounds.windows(2).all(|w| w[1] == 2.0 * w[0]));
        assert!(bounds.last().is_some_and(|b| *b > 30.0 * 60.0));
    }

    #[test]
    fn quantiles_read_the_bucket_bounds_and_merge_adds_up() {
        let mut fast = LatencyHistogram::default();
        assert_eq!(fast.quantile(0.5), None);
        for _ in 0..90 {
            fast.observe(0.050);
        }
        let mut slow = LatencyHistogram::default();
        for _ in 0..10 {
            slow.observe(3.0);
        }
        slow.observe(1e9);
        assert!(fast.merge(&slow));
        assert_eq!(fast.count(), 101);
        assert_eq!(fast.quantile(0.5), Some(0.064));
        assert_eq!(fast.quantile(0.95), Some(4.096));
        assert_eq!(fast.quantile(1.0), Some(f64::INFINITY));
        assert!((fast.sum_seconds - (90.0 * 0.05 + 30.0 + 1e9)).abs() < 1e-3);
        let malformed = LatencyHistogram {
            counts: vec![1, 2, 3],
            sum_seconds: 1.0,
        };
        assert!(!fast.merge(&malformed));
        assert_eq!(fast.count(), 101);
    }

    #[test]
    fn versions_sum_their_replicas_over_gateways_and_leave_other_deployments_out() {
        let replica = |deployment: &str, template: &str, requests, server_errors, ttfb: f64| {
            let mut h = LatencyHistogram::default();
            for _ in 0..requests {
                h.observe(ttfb);
            }
            ReplicaTraffic {
                deployment: deployment.into(),
                template: template.into(),
                requests,
                succeeded: requests - server_errors,
                server_errors,
                time_to_first_byte: Some(h),
                ..Default::default()
            }
        };
        let summaries = [
            GatewayTraffic {
                gateway: "g1".into(),
                replicas: vec![
                    replica("chat", "aaaa", 90, 0, 0.05),
                    replica("chat", "bbbb", 10, 2, 0.2),
                    replica("other", "aaaa", 1000, 0, 0.05),
                ],
                ..Default::default()
            },
            GatewayTraffic {
                gateway: "g2".into(),
                replicas: vec![replica("chat", "bbbb", 10, 0, 0.2)],
                ..Default::default()
            },
        ];
        let versions = by_version(&summaries, "chat");
        let [old, new] = versions.as_slice() else {
            panic!("{versions:?}")
        };
        assert_eq!((old.template.as_str(), old.requests), ("aaaa", 90));
        assert_eq!(old.error_rate(), Some(0.0));
        assert_eq!((new.template.as_str(), new.requests), ("bbbb", 20));
        assert_eq!(new.error_rate(), Some(0.1));
        assert_eq!(new.time_to_first_byte.count(), 20);
        assert_eq!(new.time_to_first_byte.quantile(0.5), Some(0.256));
        assert!(by_version(&summaries, "nothing").is_empty());
        assert_eq!(VersionTraffic::default().error_rate(), None);
    }
}
