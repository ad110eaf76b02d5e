//! The `ModelDeployment` document's rules: a contract shared by placement,
//! rollout and the control API. [`validate`] checks a document field by
//! field and turns it into the [`DeploymentRequest`] the scheduler works
//! with. Every error names the field, in the document's own spelling
//! (`spec.placement.numberOfClusters`). [`residency_allows`] and
//! [`residency_rule_text`] read `spec.residency` straight from a document
//! for the gateway, which routes by it without a [`DeploymentRequest`].
//! `spec.engine` and `spec.driftPolicy` are checked here too (Kubernetes
//! quantities, names and variables) though placement never reads them: they
//! travel to the executor in the start command.
//!
//! Invariant: pure functions over `flotilla_proto` types; no I/O, no bus.

use flotilla_model_catalog::{Precision, Preset};
use flotilla_proto::json::name_of;
use flotilla_proto::v1::{self, PropertyOperator};
use std::time::Duration;

/// Which field is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        reason: reason.into(),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    Preset {
        preset: &'static Preset,
        precision: Precision,
    },
    Artifact {
        name: String,
        digest: String,
        format: String,
    },
}

impl ModelChoice {
    /// The name a cluster's model cache reports it under.
    pub fn cache_name(&self) -> &str {
        match self {
            Self::Preset { preset, .. } => preset.name,
            Self::Artifact { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    All,
    N(u32),
    Fixed(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub op: LabelOp,
    pub values: Vec<String>,
}

impl LabelRequirement {
    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.op {
            LabelOp::In => value.is_some_and(|v| self.values.iter().any(|x| x == v)),
            LabelOp::NotIn => value.is_none_or(|v| !self.values.iter().any(|x| x == v)),
            LabelOp::Exists => value.is_some(),
            LabelOp::DoesNotExist => value.is_none(),
        }
    }

    /// `env in (prod)`, as people read it.
    pub fn describe(&self) -> String {
        match self.op {
            LabelOp::In if self.values.len() == 1 => format!("{}={}", self.key, self.values[0]),
            LabelOp::In => format!("{} in ({})", self.key, self.values.join(", ")),
            LabelOp::NotIn => format!("{} not in ({})", self.key, self.values.join(", ")),
            LabelOp::Exists => format!("label {} present", self.key),
            LabelOp::DoesNotExist => format!("no label {}", self.key),
        }
    }
}

/// A cluster property placement can filter and sort on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    GpuFreeCount,
    GpuTotalCount,
    GpuFreeMemoryGiB,
    GpuMemoryGiB,
    CostPerGpuHour,
    ModelCached,
}

impl Property {
    pub const ALL: [Property; 6] = [
        Self::GpuFreeCount,
        Self::GpuTotalCount,
        Self::GpuFreeMemoryGiB,
        Self::GpuMemoryGiB,
        Self::CostPerGpuHour,
        Self::ModelCached,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::GpuFreeCount => "gpu.freeCount",
            Self::GpuTotalCount => "gpu.totalCount",
            Self::GpuFreeMemoryGiB => "gpu.freeMemoryGiB",
            Self::GpuMemoryGiB => "gpu.memoryGiB",
            Self::CostPerGpuHour => "cost.perGpuHour",
            Self::ModelCached => "model.cached",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    fn known() -> String {
        Self::ALL
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PropertyRequirement {
    pub property: Property,
    pub op: PropertyOperator,
    pub value: f64,
}

impl PropertyRequirement {
    pub fn holds(&self, actual: f64) -> bool {
        match self.op {
            PropertyOperator::Eq => (actual - self.value).abs() < 1e-9,
            PropertyOperator::Ne => (actual - self.value).abs() >= 1e-9,
            PropertyOperator::Gt => actual > self.value,
            PropertyOperator::Ge => actual >= self.value,
            PropertyOperator::Lt => actual < self.value,
            PropertyOperator::Le => actual <= self.value,
            PropertyOperator::Unspecified => false,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} {} {}",
            self.property.name(),
            name_of::<PropertyOperator>(self.op.into()),
            self.value
        )
    }
}

/// One required term: a cluster must match all of it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequiredTerm {
    pub labels: Vec<LabelRequirement>,
    pub properties: Vec<PropertyRequirement>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Preference {
    Labels {
        weight: f64,
        labels: Vec<LabelRequirement>,
    },
    Sorter {
        weight: f64,
        property: Property,
        descending: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spread {
    pub key: String,
    pub max_skew: u32,
    pub hard: bool,
}

/// A validated deployment, ready to schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentRequest {
    pub name: String,
    pub replicas: u32,
    pub model: ModelChoice,
    /// GPUs per replica the user asked for; `None`: sized from the catalog.
    pub gpu_count: Option<u32>,
    pub min_gpu_memory_bytes: u64,
    /// Accepted GPU type prefixes (`H100` accepts `H100-80GB`); empty: any.
    pub gpu_types: Vec<String>,
    /// The runtime serves a replica from one node only (candle): a
    /// replica larger than any node cannot be split into stages.
    pub single_node: bool,
    pub policy: Policy,
    pub required: Vec<RequiredTerm>,
    pub preferred: Vec<Preference>,
    pub spread: Vec<Spread>,
    pub tolerations: Vec<v1::Toleration>,
    /// Set: `replicas` moves between its bounds, and replicas are packed
    /// onto the best clusters in turn (bursting to the next when one is
    /// full) so that added ones go where it is cheapest and removed ones
    /// come off the worst first.
    pub autoscaling: Option<Autoscaling>,
    /// Set: the only clusters that may hold a replica, whatever the
    /// policy, spread or failover would otherwise choose.
    pub residency: Option<Residency>,
}

/// A validated `spec.autoscaling`.
#[derive(Debug, Clone, PartialEq)]
pub struct Autoscaling {
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub targets: Vec<(v1::AutoscalingMetric, f64)>,
    pub up: ScalingRules,
    pub down: ScalingRules,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingRules {
    pub window: Duration,
    /// 0: no limit.
    pub max_step: u32,
}

impl Autoscaling {
    pub fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas, self.max_replicas)
    }
}

mod engine;
mod fields;
mod residency;
mod validate;

pub use engine::parse_quantity;
pub use fields::{
    check_int_or_percent, check_label_selector, parse_duration, resolve_int_or_percent,
};
pub use residency::{Residency, residency_allows, residency_rule_text};
pub use validate::validate;

#[cfg(test)]
mod tests;
