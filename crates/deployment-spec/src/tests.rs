//! The deployment document's field checks, each naming the field.

use std::collections::BTreeMap;

use flotilla_proto::v1;

#[test]
fn validation_names_the_field() {
    let cases = [
        (
            r#"{"metadata": {"name": "Bad"}, "spec": {}}"#,
            "metadata.name",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"replicas": 1}}"#,
            "spec.model",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "gpt-9"}}}"#,
            "spec.model.preset",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": -1}}"#,
            "spec.replicas",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"policy": "PickN"}}}"#,
            "spec.placement.numberOfClusters",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"policy": "PickFixed", "clusterNames": ["a", "a"]}}}"#,
            "spec.placement.clusterNames[1]",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"affinity": {"preferred": [{"weight": 0, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}}}"#,
            "spec.placement.affinity.preferred[0].weight",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"affinity": {"preferred": [{"weight": 5, "propertySorter": {"name": "gpu.speed", "order": "Ascending"}}]}}}}"#,
            "spec.placement.affinity.preferred[0].propertySorter.name",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"topologySpread": [{"topologyKey": "region", "maxSkew": 0}]}}}"#,
            "spec.placement.topologySpread[0].maxSkew",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "rollout": {"maxUnavailable": "125%"}}}"#,
            "spec.rollout.maxUnavailable",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"artifact": {"name": "m", "digest": "md5:x", "format": "gguf"}}}}"#,
            "spec.model.artifact.digest",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "targets": [{"metric": "InFlightPerReplica", "value": 1}]}}}"#,
            "spec.autoscaling.minReplicas",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 3, "maxReplicas": 2, "targets": [{"metric": "InFlightPerReplica", "value": 1}]}}}"#,
            "spec.autoscaling.maxReplicas",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 5, "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targets": [{"metric": "InFlightPerReplica", "value": 1}]}}}"#,
            "spec.replicas",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2}}}"#,
            "spec.autoscaling.targets",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targets": [{"metric": "InFlightPerReplica", "value": -1}]}}}"#,
            "spec.autoscaling.targets[0].value",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targets": [{"value": 1}]}}}"#,
            "spec.autoscaling.targets[0].metric",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targets": [{"metric": "InFlightPerReplica", "value": 1}], "behavior": {"scaleDown": {"stabilizationWindow": "soon"}}}}}"#,
            "spec.autoscaling.behavior.scaleDown.stabilizationWindow",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {}}}"#,
            "spec.residency.clusterSelector",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {}}}}"#,
            "spec.residency.clusterSelector",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {"matchLabels": {"": "eu"}}}}}"#,
            "spec.residency.clusterSelector.matchLabels",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {"matchExpressions": [{"key": "region", "values": ["eu"]}]}}}}"#,
            "spec.residency.clusterSelector.matchExpressions[0].operator",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {"matchExpressions": [{"key": "region", "operator": "In"}]}}}}"#,
            "spec.residency.clusterSelector.matchExpressions[0].values",
        ),
        (
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {"matchExpressions": [{"key": "", "operator": "Exists"}]}}}}"#,
            "spec.residency.clusterSelector.matchExpressions[0].key",
        ),
    ];
    for (json, field) in cases {
        let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).unwrap();
        let e = crate::validate(&doc).unwrap_err();
        assert_eq!(e.field, field, "{json}: {e}");
    }
}

fn spec_of(json: &str) -> v1::ModelDeploymentSpec {
    let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).unwrap();
    doc.spec.unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn residency_is_read_from_the_document_for_placement_and_the_gateway() {
    let eu = r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"},
        "residency": {"clusterSelector": {"matchLabels": {"region": "eu"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["spot", "test"]}]}}}}"#;
    let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(eu.as_bytes()).unwrap();
    let request = crate::validate(&doc).unwrap();
    let residency = request.residency.as_ref().unwrap();
    assert_eq!(residency.describe(), "region=eu, tier not in (spot, test)");

    let spec = spec_of(eu);
    let cases: [(&[(&str, &str)], bool); 5] = [
        (&[("region", "eu")], true),
        (&[("region", "eu"), ("tier", "gold")], true),
        (&[("region", "eu"), ("tier", "spot")], false),
        (&[("region", "us")], false),
        (&[], false),
    ];
    for (cluster, allowed) in cases {
        let cluster = labels(cluster);
        assert_eq!(
            crate::residency_allows(&spec, &cluster),
            Ok(allowed),
            "{cluster:?}"
        );
        assert_eq!(residency.allows(&cluster), allowed, "{cluster:?}");
    }
    assert_eq!(
        crate::residency_rule_text(&spec).as_deref(),
        Some("residency: clusters with region=eu, tier not in (spot, test)")
    );
    assert_eq!(
        residency
            .first_unmet(&labels(&[("region", "us")]))
            .map(|r| r.describe()),
        Some("region=eu".to_string())
    );
}

#[test]
fn without_residency_every_cluster_may_serve() {
    let spec = spec_of(
        r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}}}"#,
    );
    assert_eq!(
        crate::residency_allows(&spec, &labels(&[("region", "us")])),
        Ok(true)
    );
    assert_eq!(crate::residency_rule_text(&spec), None);
}

#[test]
fn a_malformed_residency_rule_allows_nothing_and_says_why() {
    let spec = spec_of(
        r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "residency": {"clusterSelector": {}}}}"#,
    );
    let e = crate::residency_allows(&spec, &labels(&[("region", "eu")])).unwrap_err();
    assert_eq!(e.field, "spec.residency.clusterSelector");
    let text = crate::residency_rule_text(&spec).unwrap();
    assert!(
        text.starts_with("residency: invalid rule (spec.residency.clusterSelector: is empty"),
        "{text}"
    );
}
