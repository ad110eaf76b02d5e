//! The deployment document's field checks, each naming the field.

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
    ];
    for (json, field) in cases {
        let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).unwrap();
        let e = crate::validate(&doc).unwrap_err();
        assert_eq!(e.field, field, "{json}: {e}");
    }
}
