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
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "rollout": {"strategy": "Staged", "stages": [{"name": "canary", "trafficPercent": 120}]}}}"#,
            "spec.rollout.stages[0].trafficPercent",
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

/// A vLLM deployment with every engine field, as a user writes it.
const VLLM_ENGINE: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata: {name: llama-70b}
spec:
  model: {preset: llama-3.1-70b-instruct}
  runtime: vllm
  replicas: 2
  driftPolicy: ReportOnly
  engine:
    image: vllm/vllm-openai:v0.8.5
    maxModelLen: 8192
    gpuMemoryUtilization: 0.9
    quantization: fp8
    extraArgs: [--enable-prefix-caching, --max-num-seqs=64]
    env: {VLLM_LOGGING_LEVEL: INFO, NCCL_DEBUG: WARN}
    secretEnv:
      - {name: HF_TOKEN, secret: hf, key: token}
    resources: {cpuRequest: "4", cpuLimit: 8000m, memoryRequest: 32Gi, memoryLimit: 64Gi}
    shmSize: 16Gi
    nodeSelector: {cloud.google.com/gke-accelerator: nvidia-l4, pool: gpu}
    tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
    priorityClassName: inference-high
"#;

fn yaml(text: &str) -> v1::ModelDeployment {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn an_engine_and_a_drift_policy_are_read_from_yaml_and_accepted() {
    let doc = yaml(VLLM_ENGINE);
    crate::validate(&doc).unwrap();
    let spec = doc.spec.as_ref().unwrap();
    assert_eq!(spec.drift_policy(), v1::DriftPolicy::ReportOnly);
    let engine = spec.engine.as_ref().unwrap();
    assert_eq!(engine.max_model_len, 8192);
    assert_eq!(engine.secret_env[0].secret, "hf");
    assert_eq!(
        engine.resources.as_ref().unwrap().memory_limit,
        "64Gi".to_string()
    );
    assert_eq!(
        engine.tolerations[0].operator(),
        v1::TolerationOperator::Exists
    );
}

#[test]
fn a_document_with_an_engine_round_trips_through_yaml_json_and_protobuf() {
    use flotilla_proto::codec::{Encoding, decode, encode};
    let doc = yaml(VLLM_ENGINE);
    let text = serde_yaml::to_string(&doc).unwrap();
    assert!(text.contains("driftPolicy: ReportOnly"), "{text}");
    assert!(text.contains("secretEnv:"), "{text}");
    assert_eq!(yaml(&text), doc);
    let via_json: v1::ModelDeployment = decode(None, &encode(&doc, Encoding::Json)).unwrap();
    let via_proto: v1::ModelDeployment = decode(None, &encode(&doc, Encoding::Protobuf)).unwrap();
    assert_eq!(via_json, doc);
    assert_eq!(via_proto, doc);
}

#[test]
fn engine_fields_are_refused_with_the_field_and_why() {
    // (runtime, engine as YAML, field, words the reason must hold)
    let cases = [
        (
            "vllm",
            "{gpuMemoryUtilization: 1.5}",
            "spec.engine.gpuMemoryUtilization",
            "above 0 and at most 1",
        ),
        (
            "vllm",
            "{gpuMemoryUtilization: -0.5}",
            "spec.engine.gpuMemoryUtilization",
            "above 0 and at most 1",
        ),
        (
            "candle",
            "{gpuMemoryUtilization: 0.8}",
            "spec.engine.gpuMemoryUtilization",
            "vLLM setting",
        ),
        (
            "vllm",
            "{image: 'vllm/vllm-openai: latest'}",
            "spec.engine.image",
            "whitespace",
        ),
        (
            "vllm",
            "{quantization: 'a w q'}",
            "spec.engine.quantization",
            "quantization name",
        ),
        (
            "candle",
            "{extraArgs: [--enforce-eager]}",
            "spec.engine.extraArgs[0]",
            "for vLLM",
        ),
        (
            "vllm",
            "{extraArgs: ['']}",
            "spec.engine.extraArgs[0]",
            "is empty",
        ),
        (
            "vllm",
            "{extraArgs: [--enforce-eager, --tensor-parallel-size=4]}",
            "spec.engine.extraArgs[1]",
            "placement's sizing",
        ),
        (
            "vllm",
            "{extraArgs: [-tp, '2']}",
            "spec.engine.extraArgs[0]",
            "placement's sizing",
        ),
        (
            "vllm",
            "{extraArgs: [--max-model-len, '4096']}",
            "spec.engine.extraArgs[0]",
            "spec.engine.maxModelLen",
        ),
        (
            "vllm",
            "{env: {HF-TOKEN: x}}",
            "spec.engine.env",
            "not a variable name",
        ),
        (
            "vllm",
            "{env: {1X: x}}",
            "spec.engine.env",
            "not starting with a digit",
        ),
        (
            "vllm",
            "{secretEnv: [{name: HF_TOKEN, key: token}]}",
            "spec.engine.secretEnv[0].secret",
            "is empty",
        ),
        (
            "vllm",
            "{secretEnv: [{name: HF_TOKEN, secret: Hf_Secret, key: token}]}",
            "spec.engine.secretEnv[0].secret",
            "not a Secret name",
        ),
        (
            "vllm",
            "{secretEnv: [{name: HF_TOKEN, secret: hf}]}",
            "spec.engine.secretEnv[0].key",
            "is empty",
        ),
        (
            "vllm",
            "{secretEnv: [{name: HF_TOKEN, secret: hf, key: 'a/b'}]}",
            "spec.engine.secretEnv[0].key",
            "not a Secret key",
        ),
        (
            "vllm",
            "{secretEnv: [{name: 'HF TOKEN', secret: hf, key: token}]}",
            "spec.engine.secretEnv[0].name",
            "not a variable name",
        ),
        (
            "vllm",
            "{env: {HF_TOKEN: x}, secretEnv: [{name: HF_TOKEN, secret: hf, key: token}]}",
            "spec.engine.secretEnv[0].name",
            "also in spec.engine.env",
        ),
        (
            "vllm",
            "{secretEnv: [{name: A, secret: s, key: k}, {name: A, secret: t, key: k}]}",
            "spec.engine.secretEnv[1].name",
            "twice",
        ),
        (
            "vllm",
            "{resources: {cpuRequest: four}}",
            "spec.engine.resources.cpuRequest",
            "Kubernetes quantity",
        ),
        (
            "vllm",
            "{resources: {cpuLimit: '-1'}}",
            "spec.engine.resources.cpuLimit",
            "Kubernetes quantity",
        ),
        (
            "vllm",
            "{resources: {memoryRequest: 32GB}}",
            "spec.engine.resources.memoryRequest",
            "Kubernetes quantity",
        ),
        (
            "vllm",
            "{resources: {memoryLimit: 1.2.3Gi}}",
            "spec.engine.resources.memoryLimit",
            "Kubernetes quantity",
        ),
        (
            "vllm",
            "{resources: {cpuRequest: '8', cpuLimit: 4000m}}",
            "spec.engine.resources.cpuRequest",
            "above cpuLimit 4000m",
        ),
        (
            "vllm",
            "{resources: {memoryRequest: 64Gi, memoryLimit: 32Gi}}",
            "spec.engine.resources.memoryRequest",
            "above memoryLimit",
        ),
        (
            "vllm",
            "{shmSize: 16 Gi}",
            "spec.engine.shmSize",
            "Kubernetes quantity",
        ),
        ("vllm", "{shmSize: '0'}", "spec.engine.shmSize", "is zero"),
        (
            "vllm",
            "{nodeSelector: {'pool/': gpu}}",
            "spec.engine.nodeSelector",
            "not a label key",
        ),
        (
            "vllm",
            "{nodeSelector: {pool: 'has space'}}",
            "spec.engine.nodeSelector.pool",
            "not a label value",
        ),
        (
            "vllm",
            "{tolerations: [{operator: Equal, value: x}]}",
            "spec.engine.tolerations[0].key",
            "only operator Exists",
        ),
        (
            "vllm",
            "{tolerations: [{key: k, operator: Exists, value: x}]}",
            "spec.engine.tolerations[0].value",
            "Exists takes no value",
        ),
        (
            "vllm",
            "{priorityClassName: High_Priority}",
            "spec.engine.priorityClassName",
            "not a PriorityClass name",
        ),
    ];
    for (runtime, engine, field, words) in cases {
        let text = format!(
            "metadata: {{name: d}}\nspec: {{model: {{preset: llama-3.1-8b-instruct}}, runtime: {runtime}, engine: {engine}}}\n"
        );
        let e = crate::validate(&yaml(&text)).unwrap_err();
        assert_eq!(e.field, field, "{engine}: {e}");
        assert!(e.reason.contains(words), "{engine}: {e}");
    }
}

#[test]
fn an_unknown_drift_policy_is_refused() {
    let mut doc = yaml(VLLM_ENGINE);
    doc.spec.as_mut().unwrap().drift_policy = 7;
    let e = crate::validate(&doc).unwrap_err();
    assert_eq!(e.field, "spec.driftPolicy");
    assert!(e.reason.contains("TakeOver or ReportOnly"), "{e}");
    // In YAML the name itself is checked as the document is read.
    let refused = serde_yaml::from_str::<v1::ModelDeployment>(
        "spec: {model: {preset: llama-3.1-8b-instruct}, driftPolicy: Ignore}",
    );
    assert!(refused.is_err());
}

#[test]
fn kubernetes_quantities_are_read_in_base_units() {
    let cases = [
        ("", None),
        ("4", Some(4.0)),
        ("500m", Some(0.5)),
        ("1.5", Some(1.5)),
        (".5", Some(0.5)),
        ("32Gi", Some(32.0 * 1024.0 * 1024.0 * 1024.0)),
        ("128M", Some(128e6)),
        ("1e3", Some(1e3)),
        ("2E-2", Some(0.02)),
        ("16Ki", Some(16384.0)),
    ];
    for (text, expected) in cases {
        assert_eq!(crate::parse_quantity("f", text), Ok(expected), "{text}");
    }
    for text in [
        "Gi", "4 Gi", "4gi", "-1", "+1", "1.2.3", "1e", "1e+", "0x10", ".",
    ] {
        assert!(crate::parse_quantity("f", text).is_err(), "{text}");
    }
}

#[test]
fn the_examples_are_valid_documents() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: v1::ModelDeployment =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(e) = crate::validate(&doc) {
            panic!("{}: {e}", path.display());
        }
        assert_eq!(yaml(&serde_yaml::to_string(&doc).unwrap()), doc);
        seen += 1;
    }
    assert!(seen >= 2, "no examples found in {}", dir.display());
}
