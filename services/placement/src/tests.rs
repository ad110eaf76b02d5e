//! Table-driven tests of the scheduler's policies and plugins, and
//! property tests of its invariants.

use std::collections::BTreeMap;

use flotilla_proto::v1::{self, PlacementOutcome, TaintEffect};
use proptest::prelude::*;

use crate::fleet::{Availability, ClusterView, Commitments, Fleet, GpuGroup};
use crate::scheduler::{Settings, Why, place, same_assignments, tolerates};
use crate::spec::{self, DeploymentRequest, Policy};

const GIB: u64 = 1 << 30;

fn cluster(
    name: &str,
    region: &str,
    gpus: u32,
    model: &str,
    memory_gib: u64,
    cost: f64,
) -> ClusterView {
    ClusterView {
        name: name.into(),
        labels: BTreeMap::from([
            ("region".to_string(), region.to_string()),
            ("env".to_string(), "prod".to_string()),
        ]),
        taints: vec![],
        availability: Availability::Available,
        cordoned: None,
        gpus: vec![GpuGroup {
            model: model.into(),
            memory_bytes: memory_gib * GIB,
            largest_free_bytes: memory_gib * GIB,
            count: gpus,
        }],
        cost_per_gpu_hour: cost,
        cached_models: vec![],
    }
}

/// A deployment document in the document's own JSON.
fn request(json: &str) -> DeploymentRequest {
    let doc: v1::ModelDeployment = flotilla_proto::codec::decode_json(json.as_bytes()).unwrap();
    spec::validate(&doc).unwrap()
}

fn simple(replicas: u32, placement: &str) -> DeploymentRequest {
    request(&format!(
        r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas}, "placement": {placement}}}}}"#
    ))
}

fn names(fleet: &Fleet, d: &crate::scheduler::Decision) -> Vec<(String, u32)> {
    d.assignments
        .iter()
        .map(|a| (fleet.get(a.cluster).name.clone(), a.replicas))
        .collect()
}

fn reason_for(
    fleet: &Fleet,
    req: &DeploymentRequest,
    d: &crate::scheduler::Decision,
    cluster: &str,
) -> (String, String) {
    let idx = fleet.index_of(cluster).unwrap();
    let e = d
        .exclusions
        .iter()
        .find(|e| e.cluster == idx)
        .unwrap_or_else(|| panic!("{cluster} not excluded: {d:?}"));
    (e.why.plugin().to_string(), d.reason(e, req, fleet))
}

fn standard_fleet() -> Fleet {
    Fleet::new(vec![
        cluster("eu-a", "eu", 8, "H100-80GB", 80, 3.0),
        cluster("eu-b", "eu", 4, "H100-80GB", 80, 2.0),
        cluster("us-a", "us", 8, "A100-80GB", 80, 1.5),
        cluster("ap-a", "ap", 2, "L4-24GB", 24, 0.5),
    ])
}

#[test]
fn filters_name_the_plugin_and_the_reason() {
    let mut clusters = standard_fleet().clusters;
    clusters.push(ClusterView {
        availability: Availability::Unhealthy("no heartbeat for 4.0 s".into()),
        ..cluster("x-sick", "eu", 8, "H100-80GB", 80, 1.0)
    });
    clusters.push(ClusterView {
        availability: Availability::Left,
        ..cluster("x-gone", "eu", 8, "H100-80GB", 80, 1.0)
    });
    clusters.push(ClusterView {
        availability: Availability::Probation {
            remaining_ms: 12_000,
        },
        ..cluster("x-flappy", "eu", 8, "H100-80GB", 80, 1.0)
    });
    clusters.push(ClusterView {
        cordoned: Some("driver upgrade".into()),
        ..cluster("x-cordoned", "eu", 8, "H100-80GB", 80, 1.0)
    });
    let mut tainted = cluster("x-spot", "eu", 8, "H100-80GB", 80, 1.0);
    tainted.taints.push(v1::Taint {
        key: "spot".into(),
        value: "true".into(),
        effect: TaintEffect::NoSchedule.into(),
    });
    clusters.push(tainted);
    let mut canary = cluster("x-canary", "eu", 8, "H100-80GB", 80, 1.0);
    canary.labels.insert("env".into(), "canary".into());
    clusters.push(canary);
    let fleet = Fleet::new(clusters);

    let req = request(
        r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 2,
            "resources": {"gpu": {"minMemoryGiB": 40, "types": ["H100", "A100"]}},
            "placement": {"affinity": {"required": [{"labelSelector": {"matchLabels": {"env": "prod"}}}]}}}}"#,
    );
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    let cases = [
        (
            "x-sick",
            "ClusterHealth",
            "unhealthy: no heartbeat for 4.0 s",
        ),
        ("x-gone", "ClusterHealth", "left the fleet"),
        (
            "x-flappy",
            "ClusterHealth",
            "recovered moments ago; new replicas wait 12 s more",
        ),
        ("x-cordoned", "Cordon", "cordoned: driver upgrade"),
        (
            "x-spot",
            "TaintToleration",
            "taint spot=true:NoSchedule is not tolerated",
        ),
        (
            "x-canary",
            "RequiredAffinity",
            "requires env=prod; cluster has env=canary",
        ),
        (
            "ap-a",
            "GpuType",
            "needs H100 or A100; cluster has 2xL4-24GB",
        ),
    ];
    for (name, plugin, reason) in cases {
        let (p, r) = reason_for(&fleet, &req, &d, name);
        assert_eq!(p, plugin, "{name}: {r}");
        assert!(r.starts_with(reason), "{name}: {r}");
    }
    // Every cluster is either placed or explained, once.
    assert_eq!(d.assignments.len() + d.exclusions.len(), fleet.len());
}

#[test]
fn memory_model_size_and_capacity_filters() {
    let fleet = standard_fleet();
    let req = request(
        r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1, "resources": {"gpu": {"minMemoryGiB": 40}}}}"#,
    );
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(
        reason_for(&fleet, &req, &d, "ap-a"),
        (
            "GpuMemory".into(),
            "needs 40 GiB free per GPU; largest free is 24.0 GiB".into()
        )
    );

    let big = request(
        r#"{"metadata": {"name": "big"}, "spec": {"model": {"preset": "llama-3.1-70b-instruct"}, "runtime": "vllm", "replicas": 1}}"#,
    );
    let d = place(
        &big,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    let (plugin, reason) = reason_for(&fleet, &big, &d, "ap-a");
    assert_eq!(plugin, "ModelFit");
    assert!(reason.contains("llama-3.1-70b"), "{reason}");
    assert!(
        d.assignments.iter().all(|a| a.gpus_per_replica >= 2),
        "70B needs tensor parallelism on 80 GB GPUs: {d:?}"
    );

    // Capacity held by other deployments.
    let mut held = Commitments::default();
    held.add(&v1::PlacementDecision {
        assignments: vec![v1::ClusterAssignment {
            cluster: "eu-b".into(),
            replicas: 4,
            gpus_per_replica: 1,
            gpu_model: "H100-80GB".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    let req = simple(1, r#"{"policy": "PickFixed", "clusterNames": ["eu-b"]}"#);
    let d = place(&req, &fleet, &held, None, &Settings::default());
    assert_eq!(d.outcome(&req), PlacementOutcome::Unschedulable);
    assert_eq!(
        reason_for(&fleet, &req, &d, "eu-b"),
        (
            "Capacity".into(),
            "needs 1 free GPUs for one replica; 0 free".into()
        )
    );
    assert!(
        d.summary(&req, &fleet)
            .contains("no cluster fits 1 replicas"),
        "{}",
        d.summary(&req, &fleet)
    );
}

#[test]
fn policies_pick_all_n_and_fixed() {
    let fleet = standard_fleet();
    let all = simple(4, r#"{"policy": "PickAll"}"#);
    let d = place(
        &all,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(d.placed_replicas(), 4);
    assert_eq!(d.outcome(&all), PlacementOutcome::Placed);

    // PickN 2: by default the most free capacity and the lowest cost win.
    let n = simple(4, r#"{"policy": "PickN", "numberOfClusters": 2}"#);
    let d = place(
        &n,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(
        names(&fleet, &d),
        vec![("eu-a".to_string(), 2), ("us-a".to_string(), 2)]
    );
    let (plugin, reason) = reason_for(&fleet, &n, &d, "ap-a");
    assert_eq!(plugin, "Selection");
    assert!(reason.starts_with("qualifies but scored"), "{reason}");

    // PickN more than qualify: placed where possible, and said why.
    let n9 = simple(2, r#"{"policy": "PickN", "numberOfClusters": 9}"#);
    let d = place(
        &n9,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(d.missing_clusters, 5);
    assert_eq!(d.outcome(&n9), PlacementOutcome::Partial);
    assert!(
        d.summary(&n9, &fleet)
            .contains("PickN wants 9 clusters, only 4 qualify"),
        "{}",
        d.summary(&n9, &fleet)
    );

    let fixed = simple(
        3,
        r#"{"policy": "PickFixed", "clusterNames": ["ap-a", "eu-b"]}"#,
    );
    let d = place(
        &fixed,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(d.assignments.len(), 2);
    assert_eq!(reason_for(&fleet, &fixed, &d, "eu-a").0, "ClusterNames");
}

#[test]
fn replicas_are_divided_by_free_capacity() {
    let fleet = Fleet::new(vec![
        cluster("big", "eu", 6, "H100-80GB", 80, 1.0),
        cluster("small", "us", 2, "H100-80GB", 80, 1.0),
    ]);
    let req = simple(8, r#"{"policy": "PickAll"}"#);
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(
        names(&fleet, &d),
        vec![("big".to_string(), 6), ("small".to_string(), 2)]
    );
    let req = simple(4, r#"{"policy": "PickAll"}"#);
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(
        names(&fleet, &d),
        vec![("big".to_string(), 3), ("small".to_string(), 1)]
    );
    let req = simple(10, r#"{"policy": "PickAll"}"#);
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(d.unplaced_replicas, 2);
    assert_eq!(d.outcome(&req), PlacementOutcome::Partial);
}

#[test]
fn topology_spread_keeps_regions_balanced() {
    let fleet = Fleet::new(vec![
        cluster("eu-1", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("eu-2", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("eu-3", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("us-1", "us", 2, "H100-80GB", 80, 3.0),
    ]);
    let req = simple(
        2,
        r#"{"policy": "PickN", "numberOfClusters": 2, "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]}"#,
    );
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    let chosen: Vec<_> = names(&fleet, &d).into_iter().map(|(n, _)| n).collect();
    assert_eq!(chosen, vec!["eu-1", "us-1"]);
    let (plugin, reason) = reason_for(&fleet, &req, &d, "eu-2");
    assert_eq!(plugin, "TopologySpread");
    assert!(reason.contains("region=eu (maxSkew 1)"), "{reason}");
}

#[test]
fn tolerations_and_soft_taints() {
    let spot = v1::Taint {
        key: "spot".into(),
        value: "true".into(),
        effect: TaintEffect::NoSchedule.into(),
    };
    let cases = [
        (r#"{"key": "spot", "operator": "Exists"}"#, true),
        (
            r#"{"key": "spot", "operator": "Equal", "value": "true"}"#,
            true,
        ),
        (
            r#"{"key": "spot", "operator": "Equal", "value": "false"}"#,
            false,
        ),
        (
            r#"{"key": "spot", "operator": "Exists", "effect": "NoExecute"}"#,
            false,
        ),
        (r#"{"operator": "Exists"}"#, true),
        (r#"{"key": "gpu", "operator": "Exists"}"#, false),
    ];
    for (toleration, expected) in cases {
        let t: v1::Toleration = serde_json::from_str(toleration).unwrap();
        assert_eq!(tolerates(&[t], &spot), expected, "{toleration}");
    }
    // PreferNoSchedule only lowers the score.
    let mut soft = cluster("soft", "eu", 8, "H100-80GB", 80, 1.0);
    soft.taints.push(v1::Taint {
        key: "busy".into(),
        value: String::new(),
        effect: TaintEffect::PreferNoSchedule.into(),
    });
    let fleet = Fleet::new(vec![soft, cluster("plain", "eu", 8, "H100-80GB", 80, 1.0)]);
    let req = simple(1, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let d = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(names(&fleet, &d)[0].0, "plain");
}

#[test]
fn preferred_terms_and_property_requirements() {
    let fleet = standard_fleet();
    let cheapest = simple(
        1,
        r#"{"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [{"weight": 100, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}"#,
    );
    let d = place(
        &cheapest,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(names(&fleet, &d)[0].0, "ap-a");
    let us = simple(
        1,
        r#"{"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [{"weight": 100, "labelSelector": {"matchLabels": {"region": "us"}}}]}}"#,
    );
    let d = place(
        &us,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(names(&fleet, &d)[0].0, "us-a");
    let roomy = simple(
        1,
        r#"{"affinity": {"required": [{"propertySelector": [{"name": "gpu.freeCount", "operator": "Ge", "values": ["8"]}]}]}}"#,
    );
    let d = place(
        &roomy,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    let (plugin, reason) = reason_for(&fleet, &roomy, &d, "eu-b");
    assert_eq!(plugin, "RequiredAffinity");
    assert_eq!(reason, "requires gpu.freeCount Ge 8; cluster has 4");
}

#[test]
fn healthy_replicas_stay_unless_a_cluster_is_clearly_better() {
    let fleet = Fleet::new(vec![
        cluster("a", "eu", 8, "H100-80GB", 80, 2.0),
        cluster("b", "eu", 8, "H100-80GB", 80, 2.0),
    ]);
    let req = simple(2, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let first = place(
        &req,
        &fleet,
        &Commitments::default(),
        None,
        &Settings::default(),
    );
    assert_eq!(names(&fleet, &first)[0].0, "a");
    let current = first.assignments_record(&req, &fleet);
    // b becomes a little cheaper: nothing moves.
    let slightly = Fleet::new(vec![
        cluster("a", "eu", 8, "H100-80GB", 80, 2.0),
        cluster("b", "eu", 8, "H100-80GB", 80, 1.9),
    ]);
    let again = place(
        &req,
        &slightly,
        &Commitments::default(),
        Some(&current),
        &Settings::default(),
    );
    assert!(
        same_assignments(&again.assignments_record(&req, &slightly), &current),
        "{current:?} then {again:?}"
    );
    // a fails: the replicas move.
    let mut failed = slightly.clusters.clone();
    failed[0].availability = Availability::Unhealthy("no heartbeat".into());
    let failed = Fleet::new(failed);
    let moved = place(
        &req,
        &failed,
        &Commitments::default(),
        Some(&current),
        &Settings::default(),
    );
    assert_eq!(names(&failed, &moved), vec![("b".to_string(), 2)]);
}

#[test]
fn autoscaled_replicas_pack_onto_the_best_cluster_first() {
    let fleet = Fleet::new(vec![
        cluster("cheap", "eu", 2, "H100-80GB", 80, 1.0),
        cluster("dear", "us", 2, "H100-80GB", 80, 3.0),
    ]);
    let autoscaled = |replicas: u32| {
        request(&format!(
            r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas},
                "resources": {{"gpu": {{"count": 1}}}},
                "placement": {{"policy": "PickAll", "affinity": {{"preferred": [{{"weight": 100, "propertySorter": {{"name": "cost.perGpuHour", "order": "Ascending"}}}}]}}}},
                "autoscaling": {{"minReplicas": 1, "maxReplicas": 4, "targets": [{{"metric": "InFlightPerReplica", "value": 1}}]}}}}}}"#
        ))
    };
    let place_now = |replicas: u32, current: Option<&v1::PlacementDecision>| {
        let req = autoscaled(replicas);
        let d = place(
            &req,
            &fleet,
            &Commitments::default(),
            current,
            &Settings::default(),
        );
        let record = d.assignments_record(&req, &fleet);
        (names(&fleet, &d), record)
    };
    // One replica: the cheap cluster only (PickAll would otherwise give
    // every cluster one).
    let (one, _) = place_now(1, None);
    assert_eq!(one, vec![("cheap".to_string(), 1)]);
    // Three: the cheap one fills, then the burst goes to the dear one.
    let (three, current) = place_now(3, None);
    assert_eq!(
        three,
        vec![("cheap".to_string(), 2), ("dear".to_string(), 1)]
    );
    // Down to two: the dear replica goes first.
    let (two, _) = place_now(2, Some(&current));
    assert_eq!(two, vec![("cheap".to_string(), 2)]);
}

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
        let e = spec::validate(&doc).unwrap_err();
        assert_eq!(e.field, field, "{json}: {e}");
    }
}

// ---- properties ----

fn arb_cluster(i: usize) -> impl Strategy<Value = ClusterView> {
    (
        prop_oneof!["a", "b", "c"],
        0u32..9,
        prop_oneof![Just(("H100-80GB", 80u64)), Just(("L4-24GB", 24u64))],
        0.1f64..5.0,
        prop_oneof![4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
        any::<bool>(),
    )
        .prop_map(move |(region, gpus, (model, mem), cost, state, spot)| {
            let mut c = cluster(&format!("c{i:02}"), &region, gpus, model, mem, cost);
            match state {
                1 => c.availability = Availability::Unhealthy("silent".into()),
                2 => c.cordoned = Some(String::new()),
                3 => c.availability = Availability::Left,
                _ => {}
            }
            if spot {
                c.taints.push(v1::Taint {
                    key: "spot".into(),
                    value: "true".into(),
                    effect: TaintEffect::NoSchedule.into(),
                });
            }
            c
        })
}

fn arb_fleet() -> impl Strategy<Value = Fleet> {
    (1usize..10)
        .prop_flat_map(|n| (0..n).map(arb_cluster).collect::<Vec<_>>())
        .prop_map(Fleet::new)
}

fn arb_request() -> impl Strategy<Value = DeploymentRequest> {
    (0u32..12, 0u8..3, 1u32..5, any::<bool>(), any::<bool>(), 0u32..3).prop_map(|(replicas, policy, n, tolerate, spread, count)| {
        let policy = match policy {
            0 => r#""policy": "PickAll""#.to_string(),
            1 => format!(r#""policy": "PickN", "numberOfClusters": {n}"#),
            _ => r#""policy": "PickFixed", "clusterNames": ["c00", "c02"]"#.to_string(),
        };
        let tolerations = if tolerate { r#", "tolerations": [{"key": "spot", "operator": "Exists"}]"# } else { "" };
        let spread = if spread { r#", "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]"# } else { "" };
        request(&format!(
            r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas},
                "resources": {{"gpu": {{"count": {count}}}}}, "placement": {{{policy}{tolerations}{spread}}}}}}}"#
        ))
    })
}

fn arb_held() -> impl Strategy<Value = Vec<(usize, u32)>> {
    proptest::collection::vec((0usize..10, 0u32..4), 0..4)
}

fn commitments(fleet: &Fleet, held: &[(usize, u32)]) -> Commitments {
    let mut c = Commitments::default();
    for (i, n) in held {
        if let Some(cluster) = fleet.clusters.get(*i) {
            c.add(&v1::PlacementDecision {
                assignments: vec![v1::ClusterAssignment {
                    cluster: cluster.name.clone(),
                    replicas: *n,
                    gpus_per_replica: 1,
                    gpu_model: cluster.gpus[0].model.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_on_a_cluster_it_must_avoid_and_never_over_capacity(fleet in arb_fleet(), req in arb_request(), held in arb_held()) {
        let held = commitments(&fleet, &held);
        let d = place(&req, &fleet, &held, None, &Settings::default());
        for a in &d.assignments {
            let c = fleet.get(a.cluster);
            prop_assert_eq!(&c.availability, &Availability::Available);
            prop_assert!(c.cordoned.is_none());
            prop_assert!(c.taints.iter().all(|t| tolerates(&req.tolerations, t)));
            let group = &c.gpus[a.group as usize];
            prop_assert!(a.replicas * a.gpus_per_replica + held.held(&c.name, &group.model) <= group.count,
                "{} holds {} x {} plus {} held of {}", c.name, a.replicas, a.gpus_per_replica, held.held(&c.name, &group.model), group.count);
        }
        // Every cluster placed or explained, exactly once.
        let mut seen: Vec<u32> = d.assignments.iter().map(|a| a.cluster).chain(d.exclusions.iter().map(|e| e.cluster)).collect();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..fleet.len() as u32).collect::<Vec<_>>());
        prop_assert!(d.placed_replicas() + d.unplaced_replicas == req.replicas);
    }

    #[test]
    fn pick_n_gives_n_clusters_or_says_why(fleet in arb_fleet(), req in arb_request()) {
        let d = place(&req, &fleet, &Commitments::default(), None, &Settings::default());
        if let Policy::N(n) = req.policy {
            let chosen = d.assignments.len() as u32 + d.exclusions.iter().filter(|e| e.why == Why::NoReplicaLeft).count() as u32;
            prop_assert_eq!(chosen + d.missing_clusters, n);
            if d.missing_clusters > 0 {
                let summary = d.summary(&req, &fleet);
                prop_assert!(summary.contains("PickN wants") || d.assignments.is_empty(), "{}", summary);
            }
        }
    }

    #[test]
    fn spread_constraints_hold(fleet in arb_fleet(), req in arb_request()) {
        let d = place(&req, &fleet, &Commitments::default(), None, &Settings::default());
        if let (Policy::N(_), Some(spread)) = (&req.policy, req.spread.first()) {
            let chosen: Vec<u32> = d.assignments.iter().map(|a| a.cluster)
                .chain(d.exclusions.iter().filter(|e| e.why == Why::NoReplicaLeft).map(|e| e.cluster)).collect();
            // Domains: regions among clusters that passed the filters.
            let eligible: std::collections::BTreeSet<String> = chosen.iter().copied()
                .chain(d.exclusions.iter().filter(|e| matches!(e.why, Why::NotChosen { .. } | Why::Spread { .. })).map(|e| e.cluster))
                .map(|c| fleet.get(c).labels["region"].clone()).collect();
            let counts: Vec<u32> = eligible.iter().map(|r| chosen.iter().filter(|c| fleet.get(**c).labels["region"] == *r).count() as u32).collect();
            if let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) {
                prop_assert!(max - min <= spread.max_skew, "counts {:?}", counts);
            }
        }
    }

    #[test]
    fn replanning_with_nothing_changed_changes_nothing(fleet in arb_fleet(), req in arb_request(), held in arb_held()) {
        let held = commitments(&fleet, &held);
        let first = place(&req, &fleet, &held, None, &Settings::default());
        let record = first.assignments_record(&req, &fleet);
        let second = place(&req, &fleet, &held, Some(&record), &Settings::default());
        prop_assert!(same_assignments(&second.assignments_record(&req, &fleet), &record), "{:?} then {:?}", first.assignments, second.assignments);
    }
}
