//! The scheduler: a pure function from (deployment, fleet, GPUs held by
//! others, current placement) to a placement.
//!
//! 1. **Filter** plugins, in order; the first that fails names the reason a
//!    cluster is left out: ClusterHealth, Cordon, ClusterNames,
//!    TaintToleration, RequiredAffinity, GpuType, GpuMemory, ModelFit,
//!    Capacity.
//! 2. **Score** the rest, 0–100: the deployment's preferred terms
//!    (label matches, property sorters normalised over the candidates), or
//!    by default free capacity, cost and a cached model; plus a stickiness
//!    bonus for clusters it already runs on (hysteresis) and a penalty for
//!    an untolerated PreferNoSchedule taint.
//! 3. **Select** by policy (PickAll, PickN under topology spread, PickFixed).
//! 4. **Divide** the replicas over the selected clusters by free capacity,
//!    keeping current replicas where they still fit.
//!
//! Reasons are kept compact ([`Why`]) and put into words only when a
//! decision is written ([`Decision::to_record`]).

use flotilla_model_catalog::{GpuType, ServingProfile, size_replica};
use flotilla_proto::v1::{self, PlacementOutcome, TaintEffect, TolerationOperator};

use crate::fleet::{Availability, ClusterView, Commitments, Fleet, GpuGroup};
use crate::spec::{DeploymentRequest, ModelChoice, Policy, Preference, Property};

/// Tunables of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// Score points added to clusters a deployment already runs on, so it
    /// moves only when another cluster is better by more than this.
    pub stickiness: f64,
    /// Score points taken from a cluster with a PreferNoSchedule taint the
    /// deployment does not tolerate.
    pub prefer_no_schedule_penalty: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            stickiness: 20.0,
            prefer_no_schedule_penalty: 10.0,
        }
    }
}

/// Why a cluster is left out, compactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Why {
    Unavailable,
    Cordoned,
    NotNamed,
    Taint {
        taint: u16,
    },
    Label {
        term: u16,
        requirement: u16,
    },
    Property {
        term: u16,
        requirement: u16,
        actual: f64,
    },
    NoGpuType,
    GpuMemory {
        largest_free: u64,
    },
    ModelTooBig {
        group: u16,
    },
    GpuCountTooSmall {
        group: u16,
        needed: u32,
    },
    Capacity {
        free: u32,
        need: u32,
    },
    MissingTopologyKey {
        spread: u16,
    },
    Spread {
        spread: u16,
    },
    NotChosen {
        score: f64,
        cutoff: f64,
    },
    NoReplicaLeft,
}

impl Why {
    pub fn plugin(&self) -> &'static str {
        match self {
            Self::Unavailable => "ClusterHealth",
            Self::Cordoned => "Cordon",
            Self::NotNamed => "ClusterNames",
            Self::Taint { .. } => "TaintToleration",
            Self::Label { .. } | Self::Property { .. } => "RequiredAffinity",
            Self::NoGpuType => "GpuType",
            Self::GpuMemory { .. } => "GpuMemory",
            Self::ModelTooBig { .. } | Self::GpuCountTooSmall { .. } => "ModelFit",
            Self::Capacity { .. } => "Capacity",
            Self::MissingTopologyKey { .. } | Self::Spread { .. } => "TopologySpread",
            Self::NotChosen { .. } => "Selection",
            Self::NoReplicaLeft => "ReplicaDivision",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exclusion {
    pub cluster: u32,
    pub why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chosen {
    pub cluster: u32,
    pub group: u16,
    pub replicas: u32,
    pub gpus_per_replica: u32,
    pub tensor_parallel: u32,
    pub score: f64,
}

/// A placement, before it is put into words.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decision {
    /// In cluster-name order.
    pub assignments: Vec<Chosen>,
    /// In cluster-name order.
    pub exclusions: Vec<Exclusion>,
    pub unplaced_replicas: u32,
    /// PickN: how many clusters were wanted and not found.
    pub missing_clusters: u32,
}

/// A feasible cluster with what it offers this deployment.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    cluster: u32,
    group: u16,
    gpus_per_replica: u32,
    tensor_parallel: u32,
    /// Replicas that fit, counting what this deployment holds there.
    capacity: u32,
    free_gpus: u32,
    current: u32,
    score: f64,
}

/// (model, GPUs in the group, memory per GPU) -> sizing, see
/// [`SizingCache::size`].
type SizedModel = (String, u32, u64, Result<(u32, u32), u32>);

/// GPUs per replica and tensor parallelism of a deployment on one GPU
/// model, computed once per model per decision.
struct SizingCache<'a> {
    request: &'a DeploymentRequest,
    entries: Vec<SizedModel>,
}

impl<'a> SizingCache<'a> {
    fn new(request: &'a DeploymentRequest) -> Self {
        Self {
            request,
            entries: Vec::new(),
        }
    }

    /// `Ok((gpus per replica, tensor parallel))`, or `Err(needed)` where
    /// needed is 0 when the model cannot fit at all.
    fn size(&mut self, group: &GpuGroup) -> Result<(u32, u32), u32> {
        if let Some((_, _, _, r)) = self.entries.iter().find(|(m, n, mem, _)| {
            *m == group.model && *n == group.count && *mem == group.memory_bytes
        }) {
            return *r;
        }
        let result = match &self.request.model {
            ModelChoice::Artifact { .. } => {
                let n = self.request.gpu_count.unwrap_or(1);
                Ok((n, n))
            }
            ModelChoice::Preset { preset, precision } => {
                let mut profile = ServingProfile::default_for(preset);
                profile.precision = *precision;
                let gpu = GpuType {
                    model: group.model.clone(),
                    memory_bytes: group.memory_bytes,
                    gpus_per_node: group.count.max(1),
                };
                match (
                    size_replica(&preset.shape, &profile, &gpu),
                    self.request.gpu_count,
                ) {
                    (Err(_), _) => Err(0),
                    (Ok(s), None) => Ok((s.gpus_per_replica, s.tensor_parallel)),
                    (Ok(s), Some(n)) if n >= s.gpus_per_replica => Ok((n, s.tensor_parallel)),
                    (Ok(s), Some(_)) => Err(s.gpus_per_replica),
                }
            }
        };
        self.entries
            .push((group.model.clone(), group.count, group.memory_bytes, result));
        result
    }
}

pub fn tolerates(tolerations: &[v1::Toleration], taint: &v1::Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t.effect == 0 || t.effect == taint.effect;
        let key_ok = match t.operator() {
            TolerationOperator::Exists => t.key.is_empty() || t.key == taint.key,
            _ => t.key == taint.key && t.value == taint.value,
        };
        effect_ok && key_ok
    })
}

fn type_accepted(types: &[String], model: &str) -> bool {
    types.is_empty()
        || types.iter().any(|t| {
            model.len() >= t.len()
                && model[..t.len()].eq_ignore_ascii_case(t)
                && (model.len() == t.len() || model.as_bytes()[t.len()] == b'-')
        })
}

fn property_value(
    p: Property,
    cluster: &ClusterView,
    group: Option<&GpuGroup>,
    free_gpus: u32,
    model: &str,
) -> f64 {
    match p {
        Property::GpuFreeCount => f64::from(free_gpus),
        Property::GpuTotalCount => f64::from(group.map_or(0, |g| g.count)),
        Property::GpuFreeMemoryGiB => {
            group.map_or(0.0, |g| g.largest_free_bytes as f64 / (1u64 << 30) as f64)
        }
        Property::GpuMemoryGiB => {
            group.map_or(0.0, |g| g.memory_bytes as f64 / (1u64 << 30) as f64)
        }
        Property::CostPerGpuHour => cluster.cost_per_gpu_hour,
        Property::ModelCached => {
            f64::from(u8::from(cluster.cached_models.iter().any(|m| m == model)))
        }
    }
}

/// Replicas this deployment holds on each cluster now, and the GPUs.
fn own_holdings(
    fleet: &Fleet,
    current: Option<&v1::PlacementDecision>,
) -> Vec<(u32, String, u32, u32)> {
    current
        .map(|c| {
            c.assignments
                .iter()
                .filter_map(|a| {
                    let idx = fleet.index_of(&a.cluster)?;
                    Some((
                        idx,
                        a.gpu_model.clone(),
                        a.replicas,
                        a.replicas.saturating_mul(a.gpus_per_replica),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Places one deployment. `held` counts the GPUs of every other
/// deployment, never this one's: its current replicas are in `current`.
pub fn place(
    request: &DeploymentRequest,
    fleet: &Fleet,
    held: &Commitments,
    current: Option<&v1::PlacementDecision>,
    settings: &Settings,
) -> Decision {
    let mut decision = Decision::default();
    let own = own_holdings(fleet, current);
    let mut sizing = SizingCache::new(request);
    let mut candidates: Vec<Candidate> = Vec::new();
    let model_name = request.model.cache_name();

    'clusters: for (i, cluster) in fleet.clusters.iter().enumerate() {
        let idx = u32::try_from(i).unwrap_or(u32::MAX);
        let exclude = |why| Exclusion { cluster: idx, why };
        if cluster.availability != Availability::Available {
            decision.exclusions.push(exclude(Why::Unavailable));
            continue;
        }
        if cluster.cordoned.is_some() {
            decision.exclusions.push(exclude(Why::Cordoned));
            continue;
        }
        if let Policy::Fixed(names) = &request.policy
            && !names.contains(&cluster.name)
        {
            decision.exclusions.push(exclude(Why::NotNamed));
            continue;
        }
        for (t, taint) in cluster.taints.iter().enumerate() {
            let hard = taint.effect() != TaintEffect::PreferNoSchedule;
            if hard && !tolerates(&request.tolerations, taint) {
                decision
                    .exclusions
                    .push(exclude(Why::Taint { taint: t as u16 }));
                continue 'clusters;
            }
        }
        for (ti, term) in request.required.iter().enumerate() {
            for (ri, req) in term.labels.iter().enumerate() {
                if !req.matches(&cluster.labels) {
                    decision.exclusions.push(exclude(Why::Label {
                        term: ti as u16,
                        requirement: ri as u16,
                    }));
                    continue 'clusters;
                }
            }
        }

        // The best GPU group of the cluster for this deployment, and how
        // far the others got, for the reason when none fits.
        let mut best: Option<Candidate> = None;
        let mut furthest: Option<Why> = None;
        let mut stage = 0u8;
        for (g, group) in cluster.gpus.iter().enumerate() {
            if !type_accepted(&request.gpu_types, &group.model) {
                continue;
            }
            if group.largest_free_bytes < request.min_gpu_memory_bytes {
                if stage < 1 {
                    stage = 1;
                    furthest = Some(Why::GpuMemory {
                        largest_free: group.largest_free_bytes,
                    });
                } else if let Some(Why::GpuMemory { largest_free }) = &mut furthest {
                    *largest_free = (*largest_free).max(group.largest_free_bytes);
                }
                continue;
            }
            let (gpr, tp) = match sizing.size(group) {
                Ok(s) => s,
                Err(needed) => {
                    if stage < 2 {
                        stage = 2;
                        furthest = Some(if needed == 0 {
                            Why::ModelTooBig { group: g as u16 }
                        } else {
                            Why::GpuCountTooSmall {
                                group: g as u16,
                                needed,
                            }
                        });
                    }
                    continue;
                }
            };
            let own_replicas: u32 = own
                .iter()
                .filter(|(c, m, _, _)| *c == idx && *m == group.model)
                .map(|(_, _, replicas, _)| replicas)
                .sum();
            let free = group
                .count
                .saturating_sub(held.held(&cluster.name, &group.model));
            let capacity = free.checked_div(gpr).unwrap_or(0);
            if capacity == 0 {
                if stage < 3 {
                    stage = 3;
                    furthest = Some(Why::Capacity { free, need: gpr });
                }
                continue;
            }
            let candidate = Candidate {
                cluster: idx,
                group: g as u16,
                gpus_per_replica: gpr,
                tensor_parallel: tp,
                capacity,
                free_gpus: free,
                current: own_replicas,
                score: 0.0,
            };
            if best
                .is_none_or(|b| (candidate.current, candidate.capacity) > (b.current, b.capacity))
            {
                best = Some(candidate);
            }
        }
        let Some(candidate) = best else {
            decision
                .exclusions
                .push(exclude(furthest.unwrap_or(Why::NoGpuType)));
            continue;
        };

        // Property requirements need the chosen group.
        let group = cluster.gpus.get(candidate.group as usize);
        for (ti, term) in request.required.iter().enumerate() {
            for (ri, req) in term.properties.iter().enumerate() {
                let actual = property_value(
                    req.property,
                    cluster,
                    group,
                    candidate.free_gpus,
                    model_name,
                );
                if !req.holds(actual) {
                    decision.exclusions.push(exclude(Why::Property {
                        term: ti as u16,
                        requirement: ri as u16,
                        actual,
                    }));
                    continue 'clusters;
                }
            }
        }
        candidates.push(candidate);
    }

    score(request, fleet, &mut candidates, settings, model_name);
    let chosen = select(request, fleet, &mut candidates, &mut decision);
    divide(request, chosen, &mut decision);
    decision.exclusions.sort_by_key(|e| e.cluster);
    decision.assignments.sort_by_key(|a| a.cluster);
    decision
}

fn score(
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

fn select(
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
fn divide(request: &DeploymentRequest, chosen: Vec<Candidate>, decision: &mut Decision) {
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
            score: c.score,
        });
    }
}

const GIB: f64 = (1u64 << 30) as f64;

impl Decision {
    pub fn placed_replicas(&self) -> u32 {
        self.assignments.iter().map(|a| a.replicas).sum()
    }

    pub fn outcome(&self, request: &DeploymentRequest) -> PlacementOutcome {
        if request.replicas > 0 && self.assignments.is_empty() {
            PlacementOutcome::Unschedulable
        } else if self.unplaced_replicas > 0 || self.missing_clusters > 0 {
            PlacementOutcome::Partial
        } else {
            PlacementOutcome::Placed
        }
    }

    /// One sentence on the outcome.
    pub fn summary(&self, request: &DeploymentRequest, fleet: &Fleet) -> String {
        let placed = self.placed_replicas();
        let clusters: Vec<String> = self
            .assignments
            .iter()
            .map(|a| format!("{} on {}", a.replicas, fleet.get(a.cluster).name))
            .collect();
        let mut text = match self.outcome(request) {
            PlacementOutcome::Unschedulable if fleet.is_empty() => {
                "no cluster has joined the fleet yet".to_string()
            }
            PlacementOutcome::Unschedulable => {
                let mut by_plugin: Vec<(&str, usize)> = Vec::new();
                for e in &self.exclusions {
                    match by_plugin.iter_mut().find(|(p, _)| *p == e.why.plugin()) {
                        Some((_, n)) => *n += 1,
                        None => by_plugin.push((e.why.plugin(), 1)),
                    }
                }
                let parts: Vec<String> = by_plugin
                    .iter()
                    .map(|(p, n)| format!("{n} by {p}"))
                    .collect();
                format!(
                    "no cluster fits {} replicas: all {} clusters left out ({})",
                    request.replicas,
                    fleet.len(),
                    parts.join(", ")
                )
            }
            _ if request.replicas == 0 => "scaled to zero".to_string(),
            _ => format!(
                "{placed} of {} replicas placed: {}",
                request.replicas,
                clusters.join(", ")
            ),
        };
        if self.unplaced_replicas > 0 && placed > 0 {
            text.push_str(&format!(
                "; {} replicas do not fit anywhere",
                self.unplaced_replicas
            ));
        }
        if self.missing_clusters > 0
            && let Policy::N(n) = request.policy
        {
            text.push_str(&format!(
                "; PickN wants {n} clusters, only {} qualify",
                n - self.missing_clusters
            ));
        }
        text
    }

    /// The reason for one exclusion, in plain words.
    pub fn reason(&self, e: &Exclusion, request: &DeploymentRequest, fleet: &Fleet) -> String {
        let cluster = fleet.get(e.cluster);
        let groups = || {
            if cluster.gpus.is_empty() {
                "no GPUs".to_string()
            } else {
                cluster
                    .gpus
                    .iter()
                    .map(|g| format!("{}x{}", g.count, g.model))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        match e.why {
            Why::Unavailable => match &cluster.availability {
                Availability::Unhealthy(r) => format!("unhealthy: {r}"),
                Availability::Degraded(r) => format!("degraded: {r}"),
                Availability::Left => "left the fleet".into(),
                Availability::Probation { remaining_ms } => format!(
                    "recovered moments ago; new replicas wait {:.0} s more so a flapping cluster is not used",
                    *remaining_ms as f64 / 1000.0
                ),
                Availability::Available => "available".into(),
            },
            Why::Cordoned => match cluster.cordoned.as_deref() {
                Some(r) if !r.is_empty() => format!("cordoned: {r}"),
                _ => "cordoned".into(),
            },
            Why::NotNamed => "not in spec.placement.clusterNames".into(),
            Why::Taint { taint } => {
                let t = &cluster.taints[taint as usize];
                let effect = flotilla_proto::json::name_of::<TaintEffect>(t.effect);
                let value = if t.value.is_empty() {
                    String::new()
                } else {
                    format!("={}", t.value)
                };
                format!("taint {}{value}:{effect} is not tolerated", t.key)
            }
            Why::Label { term, requirement } => {
                let r = &request.required[term as usize].labels[requirement as usize];
                let actual = cluster.labels.get(&r.key).map_or_else(
                    || format!("no label {}", r.key),
                    |v| format!("{}={v}", r.key),
                );
                format!("requires {}; cluster has {actual}", r.describe())
            }
            Why::Property {
                term,
                requirement,
                actual,
            } => {
                let r = &request.required[term as usize].properties[requirement as usize];
                format!("requires {}; cluster has {actual}", r.describe())
            }
            Why::NoGpuType => {
                let wanted = if request.gpu_types.is_empty() {
                    "a GPU".to_string()
                } else {
                    request.gpu_types.join(" or ")
                };
                format!("needs {wanted}; cluster has {}", groups())
            }
            Why::GpuMemory { largest_free } => format!(
                "needs {:.0} GiB free per GPU; largest free is {:.1} GiB",
                request.min_gpu_memory_bytes as f64 / GIB,
                largest_free as f64 / GIB
            ),
            Why::ModelTooBig { group } => {
                let g = &cluster.gpus[group as usize];
                match &request.model {
                    ModelChoice::Preset { preset, precision } => {
                        let mut profile = ServingProfile::default_for(preset);
                        profile.precision = *precision;
                        let gpu = GpuType {
                            model: g.model.clone(),
                            memory_bytes: g.memory_bytes,
                            gpus_per_node: g.count.max(1),
                        };
                        match flotilla_model_catalog::size_preset(preset, &profile, &gpu) {
                            Err(e) => e.to_string(),
                            Ok(_) => format!("does not fit on {}", g.model),
                        }
                    }
                    ModelChoice::Artifact { .. } => format!("does not fit on {}", g.model),
                }
            }
            Why::GpuCountTooSmall { group, needed } => format!(
                "the model needs {needed} GPUs per replica on {}; spec.resources.gpu.count allows {}",
                cluster.gpus[group as usize].model,
                request.gpu_count.unwrap_or(1)
            ),
            Why::Capacity { free, need } => {
                format!("needs {need} free GPUs for one replica; {free} free")
            }
            Why::MissingTopologyKey { spread } => {
                format!(
                    "has no label {} for the topology spread",
                    request.spread[spread as usize].key
                )
            }
            Why::Spread { spread } => {
                let s = &request.spread[spread as usize];
                format!(
                    "would put one cluster too many in {}={} (maxSkew {})",
                    s.key,
                    cluster.labels.get(&s.key).map_or("", String::as_str),
                    s.max_skew
                )
            }
            Why::NotChosen { score, cutoff } => {
                format!(
                    "qualifies but scored {score:.1}, below the {cutoff:.1} of the clusters chosen"
                )
            }
            Why::NoReplicaLeft => {
                "chosen, but the replicas all fit on higher-scored clusters".into()
            }
        }
    }

    /// The assignments alone, without reasons in words: what capacity
    /// accounting and the next re-plan need.
    pub fn assignments_record(
        &self,
        request: &DeploymentRequest,
        fleet: &Fleet,
    ) -> v1::PlacementDecision {
        v1::PlacementDecision {
            deployment: request.name.clone(),
            assignments: self.assignment_list(fleet),
            outcome: self.outcome(request).into(),
            ..Default::default()
        }
    }

    fn assignment_list(&self, fleet: &Fleet) -> Vec<v1::ClusterAssignment> {
        self.assignments
            .iter()
            .map(|a| {
                let cluster = fleet.get(a.cluster);
                v1::ClusterAssignment {
                    cluster: cluster.name.clone(),
                    replicas: a.replicas,
                    score: (a.score * 10.0).round() / 10.0,
                    gpus_per_replica: a.gpus_per_replica,
                    gpu_model: cluster
                        .gpus
                        .get(a.group as usize)
                        .map(|g| g.model.clone())
                        .unwrap_or_default(),
                    tensor_parallel: a.tensor_parallel,
                }
            })
            .collect()
    }

    /// The decision as stored in KV `placements`.
    pub fn to_record(&self, request: &DeploymentRequest, fleet: &Fleet) -> v1::PlacementDecision {
        v1::PlacementDecision {
            deployment: request.name.clone(),
            assignments: self.assignment_list(fleet),
            exclusions: self
                .exclusions
                .iter()
                .map(|e| v1::ClusterExclusion {
                    cluster: fleet.get(e.cluster).name.clone(),
                    plugin: e.why.plugin().to_string(),
                    reason: self.reason(e, request, fleet),
                })
                .collect(),
            outcome: self.outcome(request).into(),
            message: self.summary(request, fleet),
            ..Default::default()
        }
    }
}

/// Whether two placements put the same replicas in the same places.
pub fn same_assignments(a: &v1::PlacementDecision, b: &v1::PlacementDecision) -> bool {
    a.assignments.len() == b.assignments.len()
        && a.assignments.iter().zip(&b.assignments).all(|(x, y)| {
            x.cluster == y.cluster
                && x.replicas == y.replicas
                && x.gpus_per_replica == y.gpus_per_replica
                && x.gpu_model == y.gpu_model
        })
}
