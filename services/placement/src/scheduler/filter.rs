//! Step 1: the filter plugins, in order; the first that fails is the
//! reason a cluster is left out. What passes becomes a [`Candidate`] with
//! its best GPU group and how many replicas fit there.

use flotilla_model_catalog::{GpuType, ServingProfile, size_replica, stage_tensor_parallel};
use flotilla_proto::v1::{self, TaintEffect, TolerationOperator};

use super::{Candidate, Decision, Exclusion, Why};
use crate::fleet::{Availability, ClusterView, Commitments, Fleet, GpuGroup};
use crate::spec::{DeploymentRequest, ModelChoice, Policy, Property};

/// How one replica is laid out on a GPU group: `gpus` in all, in
/// `pipeline_parallel` stages of `gpus / pipeline_parallel` on one node
/// each, tensor-parallel `tensor_parallel` within a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub gpus: u32,
    pub tensor_parallel: u32,
    pub pipeline_parallel: u32,
}

impl Layout {
    /// GPUs of one stage, all on one node.
    pub fn stage_gpus(&self) -> u32 {
        self.gpus / self.pipeline_parallel.max(1)
    }
}

/// (model, GPUs per node, memory per GPU) -> sizing, see
/// [`SizingCache::size`].
type SizedModel = (String, u32, u64, Result<Layout, u32>);

/// A deployment's replica layout on one GPU model, computed once per
/// model and node size per decision.
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

    /// The layout of a replica on `group`, or `Err(needed)` where needed is
    /// 0 when the model cannot fit at all.
    ///
    /// A preset is sized by the catalog for the group's largest node (see
    /// [`size_replica`]: one node if it fits, else pipeline stages). A
    /// count the deployment asks for (`spec.resources.gpu.count`) must be
    /// at least that; within one node it is taken as it is, beyond one
    /// node it is split into stages of the widest tensor-parallel degree
    /// that divides it ([`stage_tensor_parallel`]). An artifact has no
    /// shape to size: its count (1 by default) is the layout.
    fn size(&mut self, group: &GpuGroup) -> Result<Layout, u32> {
        let per_node = group.gpus_per_node();
        if let Some((_, _, _, r)) = self.entries.iter().find(|(m, n, mem, _)| {
            *m == group.model && *n == per_node && *mem == group.memory_bytes
        }) {
            return *r;
        }
        let across_nodes = |shape, gpus: u32| {
            let tp = stage_tensor_parallel(shape, per_node, gpus);
            Layout {
                gpus,
                tensor_parallel: tp,
                pipeline_parallel: gpus / tp,
            }
        };
        let result = match &self.request.model {
            ModelChoice::Artifact { .. } => {
                let n = self.request.gpu_count.unwrap_or(1);
                if n <= per_node {
                    Ok(Layout {
                        gpus: n,
                        tensor_parallel: n,
                        pipeline_parallel: 1,
                    })
                } else {
                    Ok(across_nodes(None, n))
                }
            }
            ModelChoice::Preset { preset, precision } => {
                let mut profile = ServingProfile::default_for(preset);
                profile.precision = *precision;
                let gpu = GpuType {
                    model: group.model.clone(),
                    memory_bytes: group.memory_bytes,
                    gpus_per_node: per_node.max(1),
                };
                match (
                    size_replica(&preset.shape, &profile, &gpu),
                    self.request.gpu_count,
                ) {
                    (Err(_), _) => Err(0),
                    (Ok(s), None) => Ok(Layout {
                        gpus: s.gpus_per_replica,
                        tensor_parallel: s.tensor_parallel,
                        pipeline_parallel: s.pipeline_parallel,
                    }),
                    (Ok(s), Some(n)) if n < s.gpus_per_replica => Err(s.gpus_per_replica),
                    (Ok(s), Some(n)) if s.pipeline_parallel == 1 && n <= per_node => Ok(Layout {
                        gpus: n,
                        tensor_parallel: s.tensor_parallel,
                        pipeline_parallel: 1,
                    }),
                    (Ok(_), Some(n)) => Ok(across_nodes(Some(&preset.shape), n)),
                }
            }
        };
        self.entries
            .push((group.model.clone(), per_node, group.memory_bytes, result));
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

pub(super) fn property_value(
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

/// Runs the filters over every cluster: exclusions go into `decision`,
/// the clusters that pass are returned in name order.
pub(super) fn filter(
    request: &DeploymentRequest,
    fleet: &Fleet,
    held: &Commitments,
    current: Option<&v1::PlacementDecision>,
    decision: &mut Decision,
) -> Vec<Candidate> {
    let own = own_holdings(fleet, current);
    let mut sizing = SizingCache::new(request);
    let mut candidates: Vec<Candidate> = Vec::new();
    let model_name = request.model.cache_name();

    'clusters: for (i, cluster) in fleet.clusters.iter().enumerate() {
        let idx = u32::try_from(i).unwrap_or(u32::MAX);
        let exclude = |why| Exclusion { cluster: idx, why };
        // First, so that a cluster outside the rule is always named so,
        // whatever its state: it could never serve this deployment.
        if let Some(residency) = &request.residency
            && let Some(r) = residency
                .cluster_selector
                .iter()
                .position(|r| !r.matches(&cluster.labels))
        {
            decision.exclusions.push(exclude(Why::Residency {
                requirement: r as u16,
            }));
            continue;
        }
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
            let layout = match sizing.size(group) {
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
            let (own_replicas, own_gpus) = own
                .iter()
                .filter(|(c, m, _, _)| *c == idx && *m == group.model)
                .fold((0u32, 0u32), |(r, g), (_, _, replicas, gpus)| {
                    (r + replicas, g + gpus)
                });
            // One stage per node: a replica of several stages needs that
            // many nodes, each with room for a stage.
            let stage_gpus = layout.stage_gpus();
            let stages = layout.pipeline_parallel.max(1);
            if stages > 1 && request.single_node {
                if stage < 2 {
                    stage = 2;
                    furthest = Some(Why::SingleNodeRuntime {
                        group: g as u16,
                        gpus: layout.gpus,
                    });
                }
                continue;
            }
            if group.nodes_with(stage_gpus) < stages {
                if stage < 2 {
                    stage = 2;
                    furthest = Some(Why::TooFewNodes {
                        group: g as u16,
                        stage_gpus,
                        stages,
                        tensor_parallel: layout.tensor_parallel,
                    });
                }
                continue;
            }
            let gpr = layout.gpus;
            // In use by others: what other deployments hold, or what the
            // cluster reports allocated beyond this deployment's own
            // replicas (pods of other workloads on a Kubernetes member),
            // whichever is more; a replica placed but not yet running
            // shows only in the first, a foreign pod only in the second.
            let taken = held
                .held(&cluster.name, &group.model)
                .max(group.allocated.saturating_sub(own_gpus));
            let free = group.count.saturating_sub(taken);
            // Other deployments' GPUs are counted per cluster, not per
            // node: the slots bound what fits if nothing else ran.
            let capacity = free
                .checked_div(gpr)
                .unwrap_or(0)
                .min(group.node_slots(stage_gpus) / stages);
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
                tensor_parallel: layout.tensor_parallel,
                pipeline_parallel: stages,
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
    candidates
}
