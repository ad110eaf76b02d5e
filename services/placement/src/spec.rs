//! A `ModelDeployment` checked field by field and turned into what the
//! scheduler works with. Every error names the field, in the document's
//! own spelling (`spec.placement.numberOfClusters`).

use flotilla_model_catalog::{Precision, Preset};
use flotilla_proto::json::name_of;
use flotilla_proto::v1::{
    self, LabelOperator, PlacementPolicy, PropertyOperator, SortOrder, TolerationOperator,
    WhenUnsatisfiable,
};
use std::time::Duration;

/// Which field is wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
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

fn check_autoscaling(spec: &v1::AutoscalingSpec, replicas: i32) -> Result<Autoscaling, FieldError> {
    let f = "spec.autoscaling";
    if spec.min_replicas < 1 {
        return bad(
            format!("{f}.minReplicas"),
            format!(
                "{} is below 1 (scaling to zero is not supported)",
                spec.min_replicas
            ),
        );
    }
    if spec.max_replicas < spec.min_replicas {
        return bad(
            format!("{f}.maxReplicas"),
            format!(
                "{} is below minReplicas {}",
                spec.max_replicas, spec.min_replicas
            ),
        );
    }
    if spec.max_replicas > MAX_REPLICAS {
        return bad(
            format!("{f}.maxReplicas"),
            format!("{} is over the limit of {MAX_REPLICAS}", spec.max_replicas),
        );
    }
    if replicas != 0 && !(spec.min_replicas..=spec.max_replicas).contains(&replicas) {
        return bad(
            "spec.replicas",
            format!(
                "{replicas} is outside autoscaling's {}..={}",
                spec.min_replicas, spec.max_replicas
            ),
        );
    }
    if spec.targets.is_empty() {
        return bad(
            format!("{f}.targets"),
            "needs at least one target: InFlightPerReplica, QueueDepthPerReplica, TtftP95Ms or TokensPerSecondPerReplica",
        );
    }
    let mut targets = Vec::new();
    for (i, t) in spec.targets.iter().enumerate() {
        let tf = format!("{f}.targets[{i}]");
        if t.metric() == v1::AutoscalingMetric::Unspecified {
            return bad(
                format!("{tf}.metric"),
                "is required: InFlightPerReplica, QueueDepthPerReplica, TtftP95Ms or TokensPerSecondPerReplica",
            );
        }
        if !(t.value.is_finite() && t.value > 0.0) {
            return bad(
                format!("{tf}.value"),
                format!("{} is not a positive number", t.value),
            );
        }
        targets.push((t.metric(), t.value));
    }
    let behavior = spec.behavior.clone().unwrap_or_default();
    let rules = |field: &str, r: Option<&v1::ScalingRules>, default_window: Duration| {
        let r = r.cloned().unwrap_or_default();
        Ok::<_, FieldError>(ScalingRules {
            window: parse_duration(
                &format!("{f}.behavior.{field}.stabilizationWindow"),
                &r.stabilization_window,
            )?
            .unwrap_or(default_window),
            max_step: r.max_step,
        })
    };
    Ok(Autoscaling {
        min_replicas: spec.min_replicas.unsigned_abs(),
        max_replicas: spec.max_replicas.unsigned_abs(),
        targets,
        // Kubernetes' HPA defaults: up at once, down after 5 minutes.
        up: rules("scaleUp", behavior.scale_up.as_ref(), Duration::ZERO)?,
        down: rules(
            "scaleDown",
            behavior.scale_down.as_ref(),
            Duration::from_secs(300),
        )?,
    })
}

const MAX_REPLICAS: i32 = 10_000;

/// Reads a label selector; the errors name the field under `field`.
pub fn check_label_selector(
    field: &str,
    selector: &v1::LabelSelector,
) -> Result<Vec<LabelRequirement>, FieldError> {
    let mut out: Vec<LabelRequirement> = selector
        .match_labels
        .iter()
        .map(|(k, v)| LabelRequirement {
            key: k.clone(),
            op: LabelOp::In,
            values: vec![v.clone()],
        })
        .collect();
    for k in selector.match_labels.keys() {
        if k.is_empty() {
            return bad(format!("{field}.matchLabels"), "a label key is empty");
        }
    }
    for (i, expr) in selector.match_expressions.iter().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if expr.key.is_empty() {
            return bad(format!("{f}.key"), "is empty");
        }
        let op = match expr.operator() {
            LabelOperator::In => LabelOp::In,
            LabelOperator::NotIn => LabelOp::NotIn,
            LabelOperator::Exists => LabelOp::Exists,
            LabelOperator::DoesNotExist => LabelOp::DoesNotExist,
            LabelOperator::Unspecified => {
                return bad(
                    format!("{f}.operator"),
                    "is required: In, NotIn, Exists or DoesNotExist",
                );
            }
        };
        match op {
            LabelOp::In | LabelOp::NotIn if expr.values.is_empty() => {
                return bad(
                    format!("{f}.values"),
                    "In and NotIn need at least one value",
                );
            }
            LabelOp::Exists | LabelOp::DoesNotExist if !expr.values.is_empty() => {
                return bad(
                    format!("{f}.values"),
                    "Exists and DoesNotExist take no values",
                );
            }
            _ => {}
        }
        out.push(LabelRequirement {
            key: expr.key.clone(),
            op,
            values: expr.values.clone(),
        });
    }
    Ok(out)
}

/// `1` or `25%` of `total`, as written in rollout fields; empty is none.
/// Percentages round up for a surge and down for unavailability, as
/// Kubernetes does.
pub fn resolve_int_or_percent(
    field: &str,
    value: &str,
    total: u32,
    round_up: bool,
) -> Result<Option<u32>, FieldError> {
    check_int_or_percent(field, value)?;
    if value.is_empty() {
        return Ok(None);
    }
    let number: u32 = value.trim_end_matches('%').parse().unwrap_or(0);
    if !value.ends_with('%') {
        return Ok(Some(number));
    }
    let scaled = u64::from(total) * u64::from(number);
    let n = if round_up {
        scaled.div_ceil(100)
    } else {
        scaled / 100
    };
    Ok(Some(u32::try_from(n).unwrap_or(u32::MAX)))
}

/// `1` or `25%` as written in rollout fields.
pub fn check_int_or_percent(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Ok(());
    }
    let number = value.strip_suffix('%').unwrap_or(value);
    match number.parse::<u32>() {
        Ok(n) if value.ends_with('%') && n > 100 => bad(field, format!("{value:?} is over 100%")),
        Ok(_) => Ok(()),
        Err(_) => bad(
            field,
            format!("{value:?} is neither a count nor a percentage such as 25%"),
        ),
    }
}

fn check_duration(field: &str, value: &str) -> Result<(), FieldError> {
    parse_duration(field, value).map(|_| ())
}

/// `60s`, `5m`, `1h` or `250ms` as written in rollout fields; empty is none.
pub fn parse_duration(field: &str, value: &str) -> Result<Option<Duration>, FieldError> {
    if value.is_empty() {
        return Ok(None);
    }
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let scale = |n: u64, ms: u64| Ok(Some(Duration::from_millis(n.saturating_mul(ms))));
    match (number.parse::<u64>(), unit) {
        (Ok(n), "ms") => scale(n, 1),
        (Ok(n), "s") => scale(n, 1_000),
        (Ok(n), "m") => scale(n, 60_000),
        (Ok(n), "h") => scale(n, 3_600_000),
        _ => bad(
            field,
            format!("{value:?} is not a duration such as 60s, 5m or 1h"),
        ),
    }
}

/// Checks everything that does not depend on the fleet.
pub fn validate(doc: &v1::ModelDeployment) -> Result<DeploymentRequest, FieldError> {
    if !doc.api_version.is_empty() && doc.api_version != flotilla_proto::API_VERSION {
        return bad(
            "apiVersion",
            format!(
                "{:?} is not supported; use {}",
                doc.api_version,
                flotilla_proto::API_VERSION
            ),
        );
    }
    if !doc.kind.is_empty() && doc.kind != "ModelDeployment" {
        return bad("kind", format!("{:?} is not ModelDeployment", doc.kind));
    }
    let Some(meta) = &doc.metadata else {
        return bad("metadata", "is required");
    };
    flotilla_proto::check_name("deployment", &meta.name).map_err(|e| FieldError {
        field: "metadata.name".into(),
        reason: e.to_string(),
    })?;
    let Some(spec) = &doc.spec else {
        return bad("spec", "is required");
    };

    let model = match &spec.model {
        None => return bad("spec.model", "is required: a preset or an artifact"),
        Some(m) => match (&m.preset, &m.artifact) {
            (p, Some(_)) if !p.is_empty() => {
                return bad("spec.model", "give a preset or an artifact, not both");
            }
            (p, None) if p.is_empty() => {
                return bad("spec.model", "is required: a preset or an artifact");
            }
            (p, None) => {
                let Some(preset) = flotilla_model_catalog::preset(p) else {
                    let known: Vec<_> = flotilla_model_catalog::presets()
                        .iter()
                        .map(|p| p.name)
                        .collect();
                    return bad(
                        "spec.model.preset",
                        format!(
                            "{p:?} is not in the catalog; known presets: {}",
                            known.join(", ")
                        ),
                    );
                };
                ModelChoice::Preset {
                    preset,
                    precision: preset.default_precision,
                }
            }
            (_, Some(a)) => {
                if a.name.is_empty() {
                    return bad("spec.model.artifact.name", "is empty");
                }
                let hex = a.digest.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return bad(
                        "spec.model.artifact.digest",
                        format!("{:?} is not sha256:<64 hex digits>", a.digest),
                    );
                }
                if !matches!(a.format.as_str(), "gguf" | "safetensors") {
                    return bad(
                        "spec.model.artifact.format",
                        format!("{:?} must be gguf or safetensors", a.format),
                    );
                }
                ModelChoice::Artifact {
                    name: a.name.clone(),
                    digest: a.digest.clone(),
                    format: a.format.clone(),
                }
            }
        },
    };
    if let (ModelChoice::Preset { preset, .. }, runtime) = (&model, spec.runtime()) {
        use flotilla_model_catalog::Runtime as R;
        let wanted = match runtime {
            v1::Runtime::Vllm => Some(R::Vllm),
            v1::Runtime::Candle | v1::Runtime::Unspecified => Some(R::Candle),
        };
        if let Some(w) = wanted
            && !preset.runtimes.contains(&w)
        {
            return bad(
                "spec.runtime",
                format!(
                    "preset {} cannot be served by {}",
                    preset.name,
                    name_of::<v1::Runtime>(spec.runtime.max(1))
                ),
            );
        }
    }

    if spec.replicas < 0 {
        return bad("spec.replicas", format!("{} is negative", spec.replicas));
    }
    if spec.replicas > MAX_REPLICAS {
        return bad(
            "spec.replicas",
            format!("{} is over the limit of {MAX_REPLICAS}", spec.replicas),
        );
    }

    let gpu = spec
        .resources
        .as_ref()
        .and_then(|r| r.gpu.clone())
        .unwrap_or_default();
    if gpu.count > 64 {
        return bad(
            "spec.resources.gpu.count",
            format!("{} GPUs per replica is over 64", gpu.count),
        );
    }
    for (i, t) in gpu.types.iter().enumerate() {
        if t.trim().is_empty() {
            return bad(format!("spec.resources.gpu.types[{i}]"), "is empty");
        }
    }

    let placement = spec.placement.clone().unwrap_or_default();
    let policy = match placement.policy() {
        PlacementPolicy::Unspecified | PlacementPolicy::PickAll => Policy::All,
        PlacementPolicy::PickN => {
            if placement.number_of_clusters == 0 {
                return bad("spec.placement.numberOfClusters", "PickN needs at least 1");
            }
            Policy::N(placement.number_of_clusters)
        }
        PlacementPolicy::PickFixed => {
            if placement.cluster_names.is_empty() {
                return bad(
                    "spec.placement.clusterNames",
                    "PickFixed needs at least one cluster",
                );
            }
            let mut seen = std::collections::HashSet::new();
            for (i, c) in placement.cluster_names.iter().enumerate() {
                flotilla_proto::check_name("cluster", c).map_err(|e| FieldError {
                    field: format!("spec.placement.clusterNames[{i}]"),
                    reason: e.to_string(),
                })?;
                if !seen.insert(c) {
                    return bad(
                        format!("spec.placement.clusterNames[{i}]"),
                        format!("{c} is named twice"),
                    );
                }
            }
            Policy::Fixed(placement.cluster_names.clone())
        }
    };
    if placement.number_of_clusters != 0 && !matches!(policy, Policy::N(_)) {
        return bad(
            "spec.placement.numberOfClusters",
            "is only for policy PickN",
        );
    }
    if !placement.cluster_names.is_empty() && !matches!(policy, Policy::Fixed(_)) {
        return bad(
            "spec.placement.clusterNames",
            "is only for policy PickFixed",
        );
    }

    let affinity = placement.affinity.clone().unwrap_or_default();
    let mut required = Vec::new();
    for (i, term) in affinity.required.iter().enumerate() {
        let f = format!("spec.placement.affinity.required[{i}]");
        let labels = match &term.label_selector {
            Some(s) => check_label_selector(&format!("{f}.labelSelector"), s)?,
            None => Vec::new(),
        };
        let mut properties = Vec::new();
        for (j, p) in term.property_selector.iter().enumerate() {
            let pf = format!("{f}.propertySelector[{j}]");
            let Some(property) = Property::parse(&p.name) else {
                return bad(
                    format!("{pf}.name"),
                    format!(
                        "{:?} is not a property; known: {}",
                        p.name,
                        Property::known()
                    ),
                );
            };
            if p.operator() == PropertyOperator::Unspecified {
                return bad(
                    format!("{pf}.operator"),
                    "is required: Eq, Ne, Gt, Ge, Lt or Le",
                );
            }
            let [value] = p.values.as_slice() else {
                return bad(format!("{pf}.values"), "needs exactly one number");
            };
            let Ok(value) = value.parse::<f64>() else {
                return bad(
                    format!("{pf}.values[0]"),
                    format!("{value:?} is not a number"),
                );
            };
            properties.push(PropertyRequirement {
                property,
                op: p.operator(),
                value,
            });
        }
        if labels.is_empty() && properties.is_empty() {
            return bad(f, "needs a labelSelector or a propertySelector");
        }
        required.push(RequiredTerm { labels, properties });
    }
    let mut preferred = Vec::new();
    for (i, term) in affinity.preferred.iter().enumerate() {
        let f = format!("spec.placement.affinity.preferred[{i}]");
        if !(1..=100).contains(&term.weight) {
            return bad(
                format!("{f}.weight"),
                format!("{} must be 1 to 100", term.weight),
            );
        }
        let weight = f64::from(term.weight);
        match (&term.label_selector, &term.property_sorter) {
            (Some(_), Some(_)) => {
                return bad(f, "give a labelSelector or a propertySorter, not both");
            }
            (None, None) => return bad(f, "needs a labelSelector or a propertySorter"),
            (Some(s), None) => preferred.push(Preference::Labels {
                weight,
                labels: check_label_selector(&format!("{f}.labelSelector"), s)?,
            }),
            (None, Some(sorter)) => {
                let Some(property) = Property::parse(&sorter.name) else {
                    return bad(
                        format!("{f}.propertySorter.name"),
                        format!(
                            "{:?} is not a property; known: {}",
                            sorter.name,
                            Property::known()
                        ),
                    );
                };
                let descending = match sorter.order() {
                    SortOrder::Descending => true,
                    SortOrder::Ascending => false,
                    SortOrder::Unspecified => {
                        return bad(
                            format!("{f}.propertySorter.order"),
                            "is required: Ascending or Descending",
                        );
                    }
                };
                preferred.push(Preference::Sorter {
                    weight,
                    property,
                    descending,
                });
            }
        }
    }
    let mut spread = Vec::new();
    for (i, s) in placement.topology_spread.iter().enumerate() {
        let f = format!("spec.placement.topologySpread[{i}]");
        if s.topology_key.is_empty() {
            return bad(format!("{f}.topologyKey"), "is empty");
        }
        if s.max_skew < 1 {
            return bad(
                format!("{f}.maxSkew"),
                format!("{} must be at least 1", s.max_skew),
            );
        }
        spread.push(Spread {
            key: s.topology_key.clone(),
            max_skew: s.max_skew.unsigned_abs(),
            hard: s.when_unsatisfiable() != WhenUnsatisfiable::ScheduleAnyway,
        });
    }
    for (i, t) in placement.tolerations.iter().enumerate() {
        let f = format!("spec.placement.tolerations[{i}]");
        match t.operator() {
            TolerationOperator::Exists if !t.value.is_empty() => {
                return bad(format!("{f}.value"), "Exists takes no value");
            }
            TolerationOperator::Equal | TolerationOperator::Unspecified if t.key.is_empty() => {
                return bad(
                    format!("{f}.key"),
                    "is empty (only operator Exists may leave it empty)",
                );
            }
            _ => {}
        }
    }

    if let Some(rollout) = &spec.rollout {
        check_int_or_percent("spec.rollout.maxUnavailable", &rollout.max_unavailable)?;
        check_int_or_percent("spec.rollout.maxSurge", &rollout.max_surge)?;
        let mut names = std::collections::HashSet::new();
        for (i, stage) in rollout.stages.iter().enumerate() {
            let f = format!("spec.rollout.stages[{i}]");
            if stage.name.is_empty() {
                return bad(format!("{f}.name"), "is empty");
            }
            if !names.insert(&stage.name) {
                return bad(format!("{f}.name"), format!("{} is used twice", stage.name));
            }
            if let Some(sel) = &stage.cluster_selector {
                check_label_selector(&format!("{f}.clusterSelector"), sel)?;
            }
            if let Some(gate) = &stage.after_stage {
                check_duration(&format!("{f}.afterStage.wait"), &gate.wait)?;
            }
        }
        if rollout.strategy() == v1::RolloutStrategy::Staged && rollout.stages.is_empty() {
            return bad("spec.rollout.stages", "Staged needs at least one stage");
        }
    }

    let autoscaling = spec
        .autoscaling
        .as_ref()
        .map(|a| check_autoscaling(a, spec.replicas))
        .transpose()?;
    let replicas = match &autoscaling {
        Some(a) if spec.replicas == 0 => a.min_replicas,
        _ => spec.replicas.unsigned_abs(),
    };
    Ok(DeploymentRequest {
        name: meta.name.clone(),
        replicas,
        model,
        gpu_count: (gpu.count > 0).then_some(gpu.count),
        min_gpu_memory_bytes: u64::from(gpu.min_memory_gib) << 30,
        gpu_types: gpu.types.clone(),
        policy,
        required,
        preferred,
        spread,
        tolerations: placement.tolerations.clone(),
        autoscaling,
    })
}
