//! Step 2: scores of the candidates, 0–100, from the deployment's
//! preferred terms (or the default preferences), plus stickiness and the
//! PreferNoSchedule penalty; sorted best first.

use flotilla_proto::v1::TaintEffect;

use super::filter::{property_value, tolerates};
use super::{Candidate, Settings};
use crate::fleet::Fleet;
use crate::spec::{DeploymentRequest, Preference, Property};

pub(super) fn score(
    request: &DeploymentRequest,
    fleet: &Fleet,
    candidates: &mut [Candidate],
    settings: &Settings,
    model: &str,
) {
    if candidates.is_empty() {
        return;
    }
    let defaults = [
        Preference::Sorter {
            weight: 50.0,
            property: Property::GpuFreeCount,
            descending: true,
        },
        Preference::Sorter {
            weight: 30.0,
            property: Property::CostPerGpuHour,
            descending: false,
        },
        Preference::Sorter {
            weight: 20.0,
            property: Property::ModelCached,
            descending: true,
        },
    ];
    let preferences: &[Preference] = if request.preferred.is_empty() {
        &defaults
    } else {
        &request.preferred
    };
    let total_weight: f64 = preferences
        .iter()
        .map(|p| match p {
            Preference::Labels { weight, .. } | Preference::Sorter { weight, .. } => *weight,
        })
        .sum::<f64>()
        .max(1.0);
    let mut values = vec![0.0f64; candidates.len()];
    for preference in preferences {
        match preference {
            Preference::Labels { weight, labels } => {
                for c in candidates.iter_mut() {
                    let cluster = fleet.get(c.cluster);
                    if labels.iter().all(|l| l.matches(&cluster.labels)) {
                        c.score += weight / total_weight * 100.0;
                    }
                }
            }
            Preference::Sorter {
                weight,
                property,
                descending,
            } => {
                let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                for (v, c) in values.iter_mut().zip(candidates.iter()) {
                    let cluster = fleet.get(c.cluster);
                    *v = property_value(
                        *property,
                        cluster,
                        cluster.gpus.get(c.group as usize),
                        c.free_gpus,
                        model,
                    );
                    lo = lo.min(*v);
                    hi = hi.max(*v);
                }
                // Ratios to the best value, not min-max: 1.9 against 2.0 is
                // a 5 % difference, not the whole range, so small changes
                // stay small next to the stickiness bonus.
                for (v, c) in values.iter().zip(candidates.iter_mut()) {
                    let share = if *descending {
                        if hi <= 0.0 {
                            1.0
                        } else {
                            (v / hi).clamp(0.0, 1.0)
                        }
                    } else if *v <= 0.0 {
                        1.0
                    } else {
                        (lo.max(0.0) / v).clamp(0.0, 1.0)
                    };
                    c.score += weight / total_weight * 100.0 * share;
                }
            }
        }
    }
    for c in candidates.iter_mut() {
        if c.current > 0 {
            c.score += settings.stickiness;
        }
        let cluster = fleet.get(c.cluster);
        if cluster.taints.iter().any(|t| {
            t.effect() == TaintEffect::PreferNoSchedule && !tolerates(&request.tolerations, t)
        }) {
            c.score -= settings.prefer_no_schedule_penalty;
        }
    }
    // Best first; ties by name (index order is name order).
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.cluster.cmp(&b.cluster)));
}
