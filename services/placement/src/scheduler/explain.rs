//! A decision in words: the one-sentence summary, the reason for each
//! cluster left out, and the records stored in KV `placements`.

use flotilla_model_catalog::{GpuType, ServingProfile};
use flotilla_proto::v1::{self, PlacementOutcome, TaintEffect};

use super::{Decision, Exclusion, Why};
use crate::fleet::{Availability, Fleet};
use crate::spec::{DeploymentRequest, ModelChoice, Policy};

const GIB: f64 = (1u64 << 30) as f64;

/// Clusters that qualified and scored below the chosen are named one by
/// one up to this many; beyond, one summary says how many (at fleet scale
/// they are most of the fleet in every decision).
pub const NOT_CHOSEN_LISTED: usize = 16;

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
        if let Some(residency) = &request.residency
            && self.outcome(request) != PlacementOutcome::Placed
            && self
                .exclusions
                .iter()
                .any(|e| matches!(e.why, Why::Residency { .. }))
        {
            text.push_str(&format!(
                "; residency allows only clusters with {}",
                residency.describe()
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
            Why::Residency { requirement } => {
                let Some(residency) = &request.residency else {
                    return "outside residency".into();
                };
                let r = &residency.cluster_selector[requirement as usize];
                let actual = cluster.labels.get(&r.key).map_or_else(
                    || format!("no label {}", r.key),
                    |v| format!("{}={v}", r.key),
                );
                format!(
                    "outside residency {}; cluster has {actual}",
                    residency.describe()
                )
            }
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
                            gpus_per_node: g.gpus_per_node().max(1),
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
            Why::TooFewNodes {
                group,
                stage_gpus,
                stages,
                tensor_parallel,
            } => {
                let g = &cluster.gpus[group as usize];
                let nodes = g.nodes_with(stage_gpus);
                let per_node: Vec<String> = g.per_node.iter().map(u32::to_string).collect();
                format!(
                    "one replica of {name} needs {stages} nodes with {stage_gpus} × {model} each \
                     ({stages} pipeline stages of tensor-parallel {tensor_parallel}); \
                     {nodes} node{s} here {have} that many ({model} per node: {per_node})",
                    name = request.model.cache_name(),
                    model = g.model,
                    s = if nodes == 1 { "" } else { "s" },
                    have = if nodes == 1 { "has" } else { "have" },
                    per_node = per_node.join(", "),
                )
            }
            Why::SingleNodeRuntime { group, gpus } => {
                let g = &cluster.gpus[group as usize];
                format!(
                    "one replica of {name} needs {gpus} × {model}, more than any node here has \
                     ({largest} per node at most), and runtime candle serves from one node \
                     only; runtime vllm spans nodes",
                    name = request.model.cache_name(),
                    model = g.model,
                    largest = g.gpus_per_node(),
                )
            }
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
                    pipeline_parallel: a.pipeline_parallel.max(1),
                }
            })
            .collect()
    }

    /// Every cluster left out with its reason; when more than
    /// [`NOT_CHOSEN_LISTED`] qualified and scored below the chosen, one
    /// summary for all of those.
    fn exclusion_list(
        &self,
        request: &DeploymentRequest,
        fleet: &Fleet,
    ) -> Vec<v1::ClusterExclusion> {
        let mut list = Vec::new();
        let mut not_chosen = 0u32;
        let mut best_left = f64::NEG_INFINITY;
        let mut lowest_chosen = f64::INFINITY;
        let summarise = self
            .exclusions
            .iter()
            .filter(|e| matches!(e.why, Why::NotChosen { .. }))
            .count()
            > NOT_CHOSEN_LISTED;
        for e in &self.exclusions {
            if let Why::NotChosen { score, cutoff } = e.why
                && summarise
            {
                not_chosen += 1;
                best_left = best_left.max(score);
                lowest_chosen = lowest_chosen.min(cutoff);
                continue;
            }
            list.push(v1::ClusterExclusion {
                cluster: fleet.get(e.cluster).name.clone(),
                plugin: e.why.plugin().to_string(),
                reason: self.reason(e, request, fleet),
                count: 0,
            });
        }
        if not_chosen > 0 {
            let plugin = Why::NotChosen {
                score: 0.0,
                cutoff: 0.0,
            }
            .plugin();
            list.push(v1::ClusterExclusion {
                cluster: String::new(),
                plugin: plugin.to_string(),
                reason: format!(
                    "{not_chosen} more cluster(s) qualify but scored at most {best_left:.1}, below the {lowest_chosen:.1} of the clusters chosen"
                ),
                count: not_chosen,
            });
        }
        list
    }

    /// The decision as stored in KV `placements`.
    pub fn to_record(&self, request: &DeploymentRequest, fleet: &Fleet) -> v1::PlacementDecision {
        v1::PlacementDecision {
            deployment: request.name.clone(),
            assignments: self.assignment_list(fleet),
            exclusions: self.exclusion_list(request, fleet),
            outcome: self.outcome(request).into(),
            message: self.summary(request, fleet),
            ..Default::default()
        }
    }
}
