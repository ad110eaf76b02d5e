//! The whole document checked, section by section.

use crate::engine::{check_drift_policy, check_engine, check_tolerations};
use crate::{
    Autoscaling, DeploymentRequest, FieldError, ModelChoice, Policy, Preference, Property,
    PropertyRequirement, RequiredTerm, Residency, ScalingRules, Spread, bad, check_int_or_percent,
    check_label_selector, fields::check_duration, parse_duration,
};
use flotilla_proto::json::name_of;
use flotilla_proto::v1::{self, PlacementPolicy, PropertyOperator, SortOrder, WhenUnsatisfiable};
use std::time::Duration;

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
    check_tolerations("spec.placement.tolerations", &placement.tolerations)?;
    if let Some(engine) = &spec.engine {
        check_engine(engine, spec.runtime())?;
    }
    check_drift_policy(spec.drift_policy)?;

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
            if stage.traffic_percent > 100 {
                return bad(
                    format!("{f}.trafficPercent"),
                    format!("{} is more than 100", stage.traffic_percent),
                );
            }
        }
        if rollout.strategy() == v1::RolloutStrategy::Staged && rollout.stages.is_empty() {
            return bad("spec.rollout.stages", "Staged needs at least one stage");
        }
    }

    let residency = Residency::from_spec(spec)?;
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
        single_node: spec.runtime() != v1::Runtime::Vllm,
        policy,
        required,
        preferred,
        spread,
        tolerations: placement.tolerations.clone(),
        autoscaling,
        residency,
    })
}
