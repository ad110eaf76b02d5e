//! The autoscaler's pure core: from the load summaries of a deployment's
//! ready replicas, the replica count its targets ask for
//! ([`recommend`]), and from the recent recommendations, the count to move
//! to now ([`stabilize`]), in the manner of Kubernetes' HPA.
//!
//! Placement runs it every second for each deployment with
//! `spec.autoscaling`; the load summaries arrive in the executors'
//! heartbeats (sampled from each runner's own `/metrics`) and sit in KV
//! `clusters`.

use std::time::Duration;

use flotilla_proto::v1::AutoscalingMetric;

use crate::spec::Autoscaling;

/// One ready replica's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub in_flight: f64,
    pub queued: f64,
    pub ttft_p95_ms: f64,
    pub tokens_per_second: f64,
}

/// Within this fraction of a target, nothing changes (HPA's tolerance).
const TOLERANCE: f64 = 0.1;

pub fn metric_name(metric: AutoscalingMetric) -> &'static str {
    match metric {
        AutoscalingMetric::InFlightPerReplica => "in-flight requests per replica",
        AutoscalingMetric::QueueDepthPerReplica => "queued requests per replica",
        AutoscalingMetric::TtftP95Ms => "time-to-first-token p95 (ms)",
        AutoscalingMetric::TokensPerSecondPerReplica => "tokens/s per replica",
        AutoscalingMetric::Unspecified => "unspecified",
    }
}

/// The count the targets ask for (the largest), with the numbers behind
/// it; `None` without any load summary.
pub fn recommend(a: &Autoscaling, loads: &[Load]) -> Option<(u32, String)> {
    if loads.is_empty() {
        return None;
    }
    let ready = loads.len() as f64;
    let mean = |f: fn(&Load) -> f64| loads.iter().map(f).sum::<f64>() / ready;
    let mut best: Option<(u32, String)> = None;
    for &(metric, target) in &a.targets {
        let observed = match metric {
            AutoscalingMetric::InFlightPerReplica => mean(|l| l.in_flight),
            AutoscalingMetric::QueueDepthPerReplica => mean(|l| l.queued),
            AutoscalingMetric::TtftP95Ms => loads.iter().map(|l| l.ttft_p95_ms).fold(0.0, f64::max),
            AutoscalingMetric::TokensPerSecondPerReplica => mean(|l| l.tokens_per_second),
            AutoscalingMetric::Unspecified => continue,
        };
        let ratio = observed / target;
        let wanted = if (ratio - 1.0).abs() <= TOLERANCE {
            loads.len() as u32
        } else {
            (ready * ratio).ceil().min(f64::from(u32::MAX)) as u32
        };
        let wanted = a.clamp(wanted);
        let why = format!(
            "{} {observed:.2} against a target of {target} over {} ready replicas",
            metric_name(metric),
            loads.len()
        );
        if best.as_ref().is_none_or(|(w, _)| wanted > *w) {
            best = Some((wanted, why));
        }
    }
    best
}

/// The count to move to from `current`, given recent recommendations
/// `(at_unix_ms, count)` oldest first (the newest included): up only to
/// the lowest recommendation within the scale-up window, down only to the
/// highest within the scale-down window, and only once the history covers
/// that window; at most `max_step` at a time.
pub fn stabilize(a: &Autoscaling, history: &[(i64, u32)], current: u32, now_ms: i64) -> u32 {
    let within = |window: Duration| {
        let since = now_ms - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let covered = history.first().is_some_and(|(at, _)| *at <= since);
        let recent: Vec<u32> = history
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, c)| *c)
            .collect();
        (covered || window.is_zero(), recent)
    };
    let step = |limit: u32, by: u32| if limit == 0 { by } else { by.min(limit) };
    let (up_covered, up) = within(a.up.window);
    if up_covered
        && let Some(lowest) = up.iter().copied().min()
        && lowest > current
    {
        return a.clamp(current + step(a.up.max_step, lowest - current));
    }
    let (down_covered, down) = within(a.down.window);
    if down_covered
        && let Some(highest) = down.iter().copied().max()
        && highest < current
    {
        return a.clamp(current - step(a.down.max_step, current - highest));
    }
    a.clamp(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ScalingRules;

    fn scaler(up_window_s: u64, down_window_s: u64) -> Autoscaling {
        Autoscaling {
            min_replicas: 1,
            max_replicas: 5,
            targets: vec![(AutoscalingMetric::InFlightPerReplica, 2.0)],
            up: ScalingRules {
                window: Duration::from_secs(up_window_s),
                max_step: 2,
            },
            down: ScalingRules {
                window: Duration::from_secs(down_window_s),
                max_step: 1,
            },
        }
    }

    fn in_flight(values: &[f64]) -> Vec<Load> {
        values
            .iter()
            .map(|&in_flight| Load {
                in_flight,
                ..Load::default()
            })
            .collect()
    }

    #[test]
    fn the_largest_target_wins_and_the_bounds_hold() {
        let mut a = scaler(0, 0);
        // 2 replicas with 6 and 4 in flight: mean 5 against 2 -> 5.
        let (n, why) = recommend(&a, &in_flight(&[6.0, 4.0])).unwrap();
        assert_eq!(n, 5);
        assert!(why.contains("5.00 against a target of 2"), "{why}");
        // Within 10 % of the target: stay.
        assert_eq!(recommend(&a, &in_flight(&[2.1, 1.9])).unwrap().0, 2);
        // Idle: the floor.
        assert_eq!(recommend(&a, &in_flight(&[0.0, 0.0])).unwrap().0, 1);
        // Far over: the ceiling.
        assert_eq!(recommend(&a, &in_flight(&[100.0])).unwrap().0, 5);
        // A TTFT SLO asks for more than in-flight does: it wins.
        a.targets.push((AutoscalingMetric::TtftP95Ms, 500.0));
        let loads = [Load {
            in_flight: 2.0,
            ttft_p95_ms: 1500.0,
            ..Load::default()
        }];
        let (n, why) = recommend(&a, &loads).unwrap();
        assert_eq!(n, 3);
        assert!(why.starts_with("time-to-first-token"), "{why}");
        assert!(recommend(&a, &[]).is_none());
    }

    #[test]
    fn up_is_prompt_and_stepped_down_waits_for_its_window() {
        let a = scaler(0, 10);
        // Up at once, two at a time.
        assert_eq!(stabilize(&a, &[(0, 5)], 1, 0), 3);
        // Down: not before the window is covered, then one at a time, and
        // only to the highest recommendation within it.
        let history = [(0, 1), (5_000, 1)];
        assert_eq!(stabilize(&a, &history, 3, 5_000), 3);
        let history = [(0, 1), (5_000, 2), (10_000, 1)];
        assert_eq!(stabilize(&a, &history, 3, 10_000), 2);
        assert_eq!(stabilize(&a, &history, 2, 10_000), 2);
    }

    #[test]
    fn a_flapping_load_does_not_flap_the_count() {
        let a = scaler(0, 10);
        let mut current = 1;
        let mut changes = 0;
        let mut history = Vec::new();
        // Load on and off every second for a minute.
        for second in 0..60i64 {
            let rec = if second % 2 == 0 { 4 } else { 1 };
            history.push((second * 1000, rec));
            let next = stabilize(&a, &history, current, second * 1000);
            if next != current {
                changes += 1;
                current = next;
            }
        }
        // Up to 4 in two steps; never down while the load keeps coming back.
        assert_eq!(current, 4);
        assert_eq!(changes, 2);
    }
}
