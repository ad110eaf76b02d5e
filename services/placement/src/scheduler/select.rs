//! Steps 3 and 4: which candidates are chosen (PickAll, PickN under the
//! topology spread, PickFixed) and how the replicas are divided over them.

use super::{Candidate, Chosen, Decision, Exclusion, Why};
use crate::fleet::{ClusterView, Fleet};
use crate::spec::{DeploymentRequest, Policy};

/// Whether adding `cluster` keeps every hard (or, for `soft`, every)
/// spread constraint within its skew. `counts[s]` are per-domain counts.
fn spread_ok(
    request: &DeploymentRequest,
    cluster: &ClusterView,
    counts: &[Vec<(String, u32)>],
    include_soft: bool,
) -> Result<(), u16> {
    for (s, spread) in request.spread.iter().enumerate() {
        if !spread.hard && !include_soft {
            continue;
        }
        let Some(domain) = cluster.labels.get(&spread.key) else {
            continue;
        };
        let domains = &counts[s];
        let mut max = 0u32;
        let mut min = u32::MAX;
        for (d, n) in domains {
            let n = if d == domain { n + 1 } else { *n };
            max = max.max(n);
            min = min.min(n);
        }
        if max.saturating_sub(min) > spread.max_skew {
            return Err(s as u16);
        }
    }
    Ok(())
}

pub(super) fn select(
    request: &DeploymentRequest,
    fleet: &Fleet,
    candidates: &mut Vec<Candidate>,
    decision: &mut Decision,
) -> Vec<Candidate> {
    let Policy::N(n) = request.policy else {
        return std::mem::take(candidates);
    };
    let n = n as usize;
    // Clusters without a hard spread key cannot be counted: left out.
    candidates.retain(|c| {
        let cluster = fleet.get(c.cluster);
        match request
            .spread
            .iter()
            .position(|s| s.hard && !cluster.labels.contains_key(&s.key))
        {
            Some(s) => {
                decision.exclusions.push(Exclusion {
                    cluster: c.cluster,
                    why: Why::MissingTopologyKey { spread: s as u16 },
                });
                false
            }
            None => true,
        }
    });
    // Domains are the values seen among the candidates.
    let mut counts: Vec<Vec<(String, u32)>> = request
        .spread
        .iter()
        .map(|s| {
            let mut d: Vec<(String, u32)> = Vec::new();
            for c in candidates.iter() {
                if let Some(v) = fleet.get(c.cluster).labels.get(&s.key)
                    && !d.iter().any(|(x, _)| x == v)
                {
                    d.push((v.clone(), 0));
                }
            }
            d
        })
        .collect();
    // Each step takes the best-scored candidate that keeps every spread
    // constraint; only when none does are soft constraints let go. Taking
    // the best feasible at every step (not the first in a single pass)
    // makes the chosen set independent of ties in the order, so a re-plan
    // of an unchanged fleet chooses the same clusters.
    let mut pool: Vec<Option<Candidate>> =
        std::mem::take(candidates).into_iter().map(Some).collect();
    let mut chosen = Vec::with_capacity(n);
    let mut skipped_for: Vec<Option<u16>> = vec![None; pool.len()];
    while chosen.len() < n {
        let pick = [true, false].into_iter().find_map(|strict| {
            pool.iter().position(|c| {
                c.is_some_and(|c| spread_ok(request, fleet.get(c.cluster), &counts, strict).is_ok())
            })
        });
        let Some(i) = pick else { break };
        // Better-scored candidates passed over here were passed over for
        // the spread: that is their reason if they stay out.
        for j in 0..i {
            if let Some(other) = pool[j]
                && skipped_for[j].is_none()
            {
                skipped_for[j] = spread_ok(request, fleet.get(other.cluster), &counts, true).err();
            }
        }
        let Some(c) = pool[i].take() else { break };
        let cluster = fleet.get(c.cluster);
        for (s, spread) in request.spread.iter().enumerate() {
            if let Some(v) = cluster.labels.get(&spread.key)
                && let Some(entry) = counts[s].iter_mut().find(|(d, _)| d == v)
            {
                entry.1 += 1;
            }
        }
        chosen.push(c);
    }
    let cutoff = chosen.iter().map(|c| c.score).fold(f64::INFINITY, f64::min);
    let mut deferred = Vec::new();
    let mut blocked: Vec<(u32, u16)> = Vec::new();
    for (c, skipped) in pool.into_iter().zip(skipped_for) {
        let Some(c) = c else { continue };
        match (
            skipped,
            spread_ok(request, fleet.get(c.cluster), &counts, true),
        ) {
            (Some(s), _) => blocked.push((c.cluster, s)),
            (None, Err(s)) if chosen.len() < n => blocked.push((c.cluster, s)),
            _ => deferred.push(c),
        }
    }
    for c in deferred {
        decision.exclusions.push(Exclusion {
            cluster: c.cluster,
            why: Why::NotChosen {
                score: c.score,
                cutoff,
            },
        });
    }
    for (cluster, spread) in blocked {
        decision.exclusions.push(Exclusion {
            cluster,
            why: Why::Spread { spread },
        });
    }
    decision.missing_clusters = u32::try_from(n.saturating_sub(chosen.len())).unwrap_or(0);
    chosen
}

/// Divides the replicas: keep what runs where it still fits; every chosen
/// cluster gets one (best first) while replicas last, since that is why it
/// was chosen; the rest in proportion to the capacity left (largest
/// remainder); any excess comes off the lowest-scored clusters.
pub(super) fn divide(request: &DeploymentRequest, chosen: Vec<Candidate>, decision: &mut Decision) {
    let wanted = request.replicas;
    let mut assigned: Vec<u32> = chosen.iter().map(|c| c.current.min(c.capacity)).collect();
    let mut total: u32 = assigned.iter().sum();
    // chosen is best-first.
    for i in (0..chosen.len()).rev() {
        if total <= wanted {
            break;
        }
        let cut = (total - wanted).min(assigned[i]);
        assigned[i] -= cut;
        total -= cut;
    }
    if request.autoscaling.is_some() {
        // Autoscaled: pack best-first, so added replicas go to the best
        // cluster with room and burst to the next only when it is full;
        // the cut above took replicas off the worst first.
        for (a, c) in assigned.iter_mut().zip(&chosen) {
            let add = (wanted - total).min(c.capacity - *a);
            *a += add;
            total += add;
        }
        finish(chosen, assigned, wanted, decision);
        return;
    }
    for a in assigned.iter_mut() {
        if total >= wanted {
            break;
        }
        if *a == 0 {
            *a = 1;
            total += 1;
        }
    }
    let room: Vec<u32> = chosen
        .iter()
        .zip(&assigned)
        .map(|(c, a)| c.capacity - a)
        .collect();
    let room_total: u64 = room.iter().map(|r| u64::from(*r)).sum();
    let remaining = u64::from(wanted - total).min(room_total);
    if remaining > 0 {
        let mut extra: Vec<u64> = room
            .iter()
            .map(|r| remaining * u64::from(*r) / room_total)
            .collect();
        let mut given: u64 = extra.iter().sum();
        // Largest remainder first; ties to the better score (earlier).
        let mut order: Vec<usize> = (0..chosen.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse((remaining * u64::from(room[i])) % room_total));
        for &i in order.iter().cycle().take(chosen.len() * 2) {
            if given >= remaining {
                break;
            }
            if extra[i] < u64::from(room[i]) {
                extra[i] += 1;
                given += 1;
            }
        }
        for (a, e) in assigned.iter_mut().zip(extra) {
            *a += u32::try_from(e).unwrap_or(0);
        }
    }
    finish(chosen, assigned, wanted, decision);
}

fn finish(chosen: Vec<Candidate>, assigned: Vec<u32>, wanted: u32, decision: &mut Decision) {
    let total: u32 = assigned.iter().sum();
    decision.unplaced_replicas = wanted.saturating_sub(total);
    for (c, replicas) in chosen.iter().zip(assigned) {
        if replicas == 0 {
            decision.exclusions.push(Exclusion {
                cluster: c.cluster,
                why: Why::NoReplicaLeft,
            });
            continue;
        }
        decision.assignments.push(Chosen {
            cluster: c.cluster,
            group: c.group,
            replicas,
            gpus_per_replica: c.gpus_per_replica,
            tensor_parallel: c.tensor_parallel,
            pipeline_parallel: c.pipeline_parallel,
            score: c.score,
        });
    }
}
