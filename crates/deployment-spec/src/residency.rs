//! `spec.residency`: the clusters a deployment's traffic may be served
//! from. Placement filters on it and the gateway routes by it, so both read
//! it through the one set of rules here, straight from the document.

use std::collections::BTreeMap;

use flotilla_proto::v1;

use crate::{FieldError, LabelRequirement, bad, check_label_selector};

const FIELD: &str = "spec.residency.clusterSelector";

/// A validated `spec.residency`: a cluster may serve the deployment when
/// its labels match every requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    pub cluster_selector: Vec<LabelRequirement>,
}

impl Residency {
    /// Reads `spec.residency`; `None` when the document has none. An empty
    /// selector is refused rather than read as "anywhere": a rule meant to
    /// keep traffic in a region must not silently allow every cluster.
    pub fn from_spec(spec: &v1::ModelDeploymentSpec) -> Result<Option<Self>, FieldError> {
        let Some(residency) = &spec.residency else {
            return Ok(None);
        };
        let Some(selector) = &residency.cluster_selector else {
            return bad(
                FIELD,
                "is required when spec.residency is given: the labels of the clusters allowed to serve, such as matchLabels: {region: eu}",
            );
        };
        if selector.match_labels.is_empty() && selector.match_expressions.is_empty() {
            return bad(
                FIELD,
                "is empty: give matchLabels or matchExpressions (an empty selector would allow every cluster)",
            );
        }
        let cluster_selector = check_label_selector(FIELD, selector)?;
        Ok(Some(Self { cluster_selector }))
    }

    /// Whether a cluster with these labels may serve the deployment.
    pub fn allows(&self, cluster_labels: &BTreeMap<String, String>) -> bool {
        self.first_unmet(cluster_labels).is_none()
    }

    /// The first requirement a cluster with these labels fails, if any.
    pub fn first_unmet(
        &self,
        cluster_labels: &BTreeMap<String, String>,
    ) -> Option<&LabelRequirement> {
        self.cluster_selector
            .iter()
            .find(|r| !r.matches(cluster_labels))
    }

    /// The rule as people read it: `region=eu, tier in (gold, silver)`.
    pub fn describe(&self) -> String {
        self.cluster_selector
            .iter()
            .map(LabelRequirement::describe)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether a cluster with `cluster_labels` may serve a deployment with
/// this spec: `Ok(true)` when the spec has no residency rule. An `Err`
/// means the rule itself is malformed; a caller deciding where traffic
/// goes should then serve nowhere rather than anywhere.
pub fn residency_allows(
    spec: &v1::ModelDeploymentSpec,
    cluster_labels: &BTreeMap<String, String>,
) -> Result<bool, FieldError> {
    Ok(Residency::from_spec(spec)?.is_none_or(|r| r.allows(cluster_labels)))
}

/// The rule in words, for a message that refuses a request because of it
/// (`residency: clusters with region=eu`); `None` when the spec has none.
/// A malformed rule is named with what is wrong with it.
pub fn residency_rule_text(spec: &v1::ModelDeploymentSpec) -> Option<String> {
    match Residency::from_spec(spec) {
        Ok(r) => r.map(|r| format!("residency: clusters with {}", r.describe())),
        Err(e) => Some(format!("residency: invalid rule ({e})")),
    }
}
