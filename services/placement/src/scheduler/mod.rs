//! The scheduler: a pure function from (deployment, fleet, GPUs held by
//! others, current placement) to a placement.
//!
//! 1. **Filter** plugins, in order; the first that fails names the reason a
//!    cluster is left out: Residency, ClusterHealth, Cordon, ClusterNames,
//!    TaintToleration, RequiredAffinity, GpuType, GpuMemory, ModelFit,
//!    Capacity. ModelFit sizes a replica for the group's largest node and,
//!    when it spans nodes (pipeline stages), wants a node per stage. Residency is first and, like every filter, never relaxed
//!    by the steps after it, so no policy, spread or re-plan after a
//!    failure puts a replica outside the deployment's residency.
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

//!
//! One file per step: [`filter`] (1, with the model sizing), [`score`]
//! (2), [`select`] (3 and 4), and [`explain`], which puts a decision
//! into words and records.

mod explain;
pub use explain::NOT_CHOSEN_LISTED;
mod filter;
mod score;
mod select;

use flotilla_proto::v1;

use crate::fleet::{Commitments, Fleet};
use crate::spec::DeploymentRequest;

pub use filter::tolerates;

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

/// The stickiness of a re-plan that no new spec asked for (a cluster
/// changed, capacity was freed): more than any score difference, so a
/// running replica moves only when its cluster no longer qualifies. Moving
/// replicas for a better score on every fleet change does not settle at
/// fleet scale: the signals lag (a replica moving shows on both clusters
/// until the old one stops, a rollout's surge fills clusters for a while),
/// so each round of moves makes the next look worthwhile.
pub const FLEET_CHANGE_STICKINESS: f64 = 101.0;

impl Settings {
    /// These settings for a re-plan with `trigger` (`apply`, `autoscale`,
    /// `fleet-change`, `capacity-freed`): re-plans no spec asked for keep
    /// what runs wherever it still qualifies.
    pub fn for_trigger(&self, trigger: &str) -> Self {
        match trigger {
            "fleet-change" | "capacity-freed" => Self {
                stickiness: self.stickiness.max(FLEET_CHANGE_STICKINESS),
                ..*self
            },
            _ => *self,
        }
    }
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
    /// Outside `spec.residency`: the first requirement the cluster fails.
    Residency {
        requirement: u16,
    },
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
    /// A replica spans `stages` nodes of `stage_gpus` GPUs each (pipeline
    /// stages of tensor-parallel `tensor_parallel`); fewer nodes have that
    /// many.
    TooFewNodes {
        group: u16,
        stage_gpus: u32,
        stages: u32,
        tensor_parallel: u32,
    },
    /// A replica needs `gpus`, more than one node of the group holds, and
    /// the runtime cannot span nodes.
    SingleNodeRuntime {
        group: u16,
        gpus: u32,
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
            Self::Residency { .. } => "Residency",
            Self::Unavailable => "ClusterHealth",
            Self::Cordoned => "Cordon",
            Self::NotNamed => "ClusterNames",
            Self::Taint { .. } => "TaintToleration",
            Self::Label { .. } | Self::Property { .. } => "RequiredAffinity",
            Self::NoGpuType => "GpuType",
            Self::GpuMemory { .. } => "GpuMemory",
            Self::ModelTooBig { .. }
            | Self::GpuCountTooSmall { .. }
            | Self::TooFewNodes { .. }
            | Self::SingleNodeRuntime { .. } => "ModelFit",
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
    /// Pipeline stages (nodes) of one replica; 1 on one node.
    pub pipeline_parallel: u32,
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
pub(crate) struct Candidate {
    cluster: u32,
    group: u16,
    gpus_per_replica: u32,
    tensor_parallel: u32,
    pipeline_parallel: u32,
    /// Replicas that fit, counting what this deployment holds there.
    capacity: u32,
    free_gpus: u32,
    current: u32,
    score: f64,
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
    let mut candidates = filter::filter(request, fleet, held, current, &mut decision);
    score::score(
        request,
        fleet,
        &mut candidates,
        settings,
        request.model.cache_name(),
    );
    let chosen = select::select(request, fleet, &mut candidates, &mut decision);
    select::divide(request, chosen, &mut decision);
    decision.exclusions.sort_by_key(|e| e.cluster);
    decision.assignments.sort_by_key(|a| a.cluster);
    decision
}

/// Whether two placements put the same replicas in the same places.
pub fn same_assignments(a: &v1::PlacementDecision, b: &v1::PlacementDecision) -> bool {
    a.assignments.len() == b.assignments.len()
        && a.assignments.iter().zip(&b.assignments).all(|(x, y)| {
            x.cluster == y.cluster
                && x.replicas == y.replicas
                && x.gpus_per_replica == y.gpus_per_replica
                && x.gpu_model == y.gpu_model
                && x.tensor_parallel == y.tensor_parallel
                // Written before pipeline stages existed: 0 is one node.
                && x.pipeline_parallel.max(1) == y.pipeline_parallel.max(1)
        })
}
