//! Example placements, as tables: a fleet, a request and what the
//! placement must say.

use flotilla_proto::v1::{self, PlacementOutcome, TaintEffect};

use super::Expect::{
    Assignments, Clusters, Excluded, First, GpusPerReplicaAtLeast, MissingClusters, On, Outcome,
    Placed, SummaryHas, Unplaced,
};
use super::Reason::{Any, Contains, Is, StartsWith};
use super::{Expect, check, check_with, cluster, holding, request, simple, standard_fleet};
use crate::fleet::{Availability, ClusterView, Commitments, Fleet};
use crate::scheduler::{Settings, same_assignments, tolerates};
use crate::spec::DeploymentRequest;

struct Example {
    what: &'static str,
    fleet: Fleet,
    /// GPUs other deployments hold.
    held: Commitments,
    request: DeploymentRequest,
    expect: Vec<Expect>,
}

fn example(
    what: &'static str,
    fleet: Fleet,
    request: DeploymentRequest,
    expect: Vec<Expect>,
) -> Example {
    Example {
        what,
        fleet,
        held: Commitments::default(),
        request,
        expect,
    }
}

fn run(examples: Vec<Example>) {
    for e in examples {
        let checked = if e.held == Commitments::default() {
            check(&e.fleet, &e.request)
        } else {
            check_with(&e.fleet, &e.request, &e.held, None)
        };
        checked.expect(e.what, &e.expect);
    }
}

fn spot_taint() -> v1::Taint {
    v1::Taint {
        key: "spot".into(),
        value: "true".into(),
        effect: TaintEffect::NoSchedule.into(),
    }
}

/// The standard fleet and one cluster for each way a cluster is left out
/// before its GPUs are looked at.
fn fleet_with_every_filter() -> Fleet {
    let mut clusters = standard_fleet().clusters;
    let h100 = |name: &str| cluster(name, "eu", 8, "H100-80GB", 80, 1.0);
    clusters.push(ClusterView {
        availability: Availability::Unhealthy("no heartbeat for 4.0 s".into()),
        ..h100("x-sick")
    });
    clusters.push(ClusterView {
        availability: Availability::Left,
        ..h100("x-gone")
    });
    clusters.push(ClusterView {
        availability: Availability::Probation {
            remaining_ms: 12_000,
        },
        ..h100("x-flappy")
    });
    clusters.push(ClusterView {
        cordoned: Some("driver upgrade".into()),
        ..h100("x-cordoned")
    });
    let mut tainted = h100("x-spot");
    tainted.taints.push(spot_taint());
    clusters.push(tainted);
    let mut canary = h100("x-canary");
    canary.labels.insert("env".into(), "canary".into());
    clusters.push(canary);
    Fleet::new(clusters)
}

#[test]
fn filters_name_the_plugin_and_the_reason() {
    run(vec![example(
        "health, cordon, taints, affinity and GPU type",
        fleet_with_every_filter(),
        request(
            r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 2,
                    "resources": {"gpu": {"minMemoryGiB": 40, "types": ["H100", "A100"]}},
                    "placement": {"affinity": {"required": [{"labelSelector": {"matchLabels": {"env": "prod"}}}]}}}}"#,
        ),
        vec![
            Excluded(
                "x-sick",
                "ClusterHealth",
                StartsWith("unhealthy: no heartbeat for 4.0 s"),
            ),
            Excluded("x-gone", "ClusterHealth", StartsWith("left the fleet")),
            Excluded(
                "x-flappy",
                "ClusterHealth",
                StartsWith("recovered moments ago; new replicas wait 12 s more"),
            ),
            Excluded(
                "x-cordoned",
                "Cordon",
                StartsWith("cordoned: driver upgrade"),
            ),
            Excluded(
                "x-spot",
                "TaintToleration",
                StartsWith("taint spot=true:NoSchedule is not tolerated"),
            ),
            Excluded(
                "x-canary",
                "RequiredAffinity",
                StartsWith("requires env=prod; cluster has env=canary"),
            ),
            Excluded(
                "ap-a",
                "GpuType",
                StartsWith("needs H100 or A100; cluster has 2xL4-24GB"),
            ),
        ],
    )]);
}

#[test]
fn memory_model_size_and_capacity_filters() {
    run(vec![
        example(
            "GPU memory",
            standard_fleet(),
            request(
                r#"{"metadata": {"name": "d"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1, "resources": {"gpu": {"minMemoryGiB": 40}}}}"#,
            ),
            vec![Excluded(
                "ap-a",
                "GpuMemory",
                Is("needs 40 GiB free per GPU; largest free is 24.0 GiB"),
            )],
        ),
        example(
            "a 70B model needs tensor parallelism on 80 GB GPUs",
            standard_fleet(),
            request(
                r#"{"metadata": {"name": "big"}, "spec": {"model": {"preset": "llama-3.1-70b-instruct"}, "runtime": "vllm", "replicas": 1}}"#,
            ),
            vec![
                Excluded("ap-a", "ModelFit", Contains("llama-3.1-70b")),
                GpusPerReplicaAtLeast(2),
            ],
        ),
        Example {
            what: "capacity held by other deployments",
            fleet: standard_fleet(),
            held: holding(&[("eu-b", "H100-80GB", 4)]),
            request: simple(1, r#"{"policy": "PickFixed", "clusterNames": ["eu-b"]}"#),
            expect: vec![
                Outcome(PlacementOutcome::Unschedulable),
                Excluded(
                    "eu-b",
                    "Capacity",
                    Is("needs 1 free GPUs for one replica; 0 free"),
                ),
                SummaryHas("no cluster fits 1 replicas"),
            ],
        },
    ]);
}

#[test]
fn policies_pick_all_n_and_fixed() {
    run(vec![
        example(
            "PickAll",
            standard_fleet(),
            simple(4, r#"{"policy": "PickAll"}"#),
            vec![Placed(4), Outcome(PlacementOutcome::Placed)],
        ),
        example(
            "PickN 2: by default the most free capacity and the lowest cost win",
            standard_fleet(),
            simple(4, r#"{"policy": "PickN", "numberOfClusters": 2}"#),
            vec![
                On(&[("eu-a", 2), ("us-a", 2)]),
                Excluded("ap-a", "Selection", StartsWith("qualifies but scored")),
            ],
        ),
        example(
            "PickN more than qualify: placed where possible, and said why",
            standard_fleet(),
            simple(2, r#"{"policy": "PickN", "numberOfClusters": 9}"#),
            vec![
                MissingClusters(5),
                Outcome(PlacementOutcome::Partial),
                SummaryHas("PickN wants 9 clusters, only 4 qualify"),
            ],
        ),
        example(
            "PickFixed",
            standard_fleet(),
            simple(
                3,
                r#"{"policy": "PickFixed", "clusterNames": ["ap-a", "eu-b"]}"#,
            ),
            vec![Assignments(2), Excluded("eu-a", "ClusterNames", Any)],
        ),
    ]);
}

#[test]
fn replicas_are_divided_by_free_capacity() {
    let fleet = || {
        Fleet::new(vec![
            cluster("big", "eu", 6, "H100-80GB", 80, 1.0),
            cluster("small", "us", 2, "H100-80GB", 80, 1.0),
        ])
    };
    let all = r#"{"policy": "PickAll"}"#;
    run(vec![
        example(
            "exactly the capacity",
            fleet(),
            simple(8, all),
            vec![On(&[("big", 6), ("small", 2)])],
        ),
        example(
            "half of it, in proportion",
            fleet(),
            simple(4, all),
            vec![On(&[("big", 3), ("small", 1)])],
        ),
        example(
            "more than fits",
            fleet(),
            simple(10, all),
            vec![Unplaced(2), Outcome(PlacementOutcome::Partial)],
        ),
    ]);
}

#[test]
fn topology_spread_keeps_regions_balanced() {
    let fleet = Fleet::new(vec![
        cluster("eu-1", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("eu-2", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("eu-3", "eu", 8, "H100-80GB", 80, 1.0),
        cluster("us-1", "us", 2, "H100-80GB", 80, 3.0),
    ]);
    run(vec![example(
        "PickN 2 over two regions, max skew 1",
        fleet,
        simple(
            2,
            r#"{"policy": "PickN", "numberOfClusters": 2, "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]}"#,
        ),
        vec![
            Clusters(&["eu-1", "us-1"]),
            Excluded("eu-2", "TopologySpread", Contains("region=eu (maxSkew 1)")),
        ],
    )]);
}

#[test]
fn tolerations_and_soft_taints() {
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
        assert_eq!(tolerates(&[t], &spot_taint()), expected, "{toleration}");
    }
    let mut soft = cluster("soft", "eu", 8, "H100-80GB", 80, 1.0);
    soft.taints.push(v1::Taint {
        key: "busy".into(),
        value: String::new(),
        effect: TaintEffect::PreferNoSchedule.into(),
    });
    run(vec![example(
        "PreferNoSchedule only lowers the score",
        Fleet::new(vec![soft, cluster("plain", "eu", 8, "H100-80GB", 80, 1.0)]),
        simple(1, r#"{"policy": "PickN", "numberOfClusters": 1}"#),
        vec![First("plain")],
    )]);
}

#[test]
fn preferred_terms_and_property_requirements() {
    run(vec![
        example(
            "the cheapest",
            standard_fleet(),
            simple(
                1,
                r#"{"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [{"weight": 100, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}"#,
            ),
            vec![First("ap-a")],
        ),
        example(
            "a preferred label",
            standard_fleet(),
            simple(
                1,
                r#"{"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [{"weight": 100, "labelSelector": {"matchLabels": {"region": "us"}}}]}}"#,
            ),
            vec![First("us-a")],
        ),
        example(
            "a required property",
            standard_fleet(),
            simple(
                1,
                r#"{"affinity": {"required": [{"propertySelector": [{"name": "gpu.freeCount", "operator": "Ge", "values": ["8"]}]}]}}"#,
            ),
            vec![Excluded(
                "eu-b",
                "RequiredAffinity",
                Is("requires gpu.freeCount Ge 8; cluster has 4"),
            )],
        ),
    ]);
}

#[test]
fn healthy_replicas_stay_unless_a_cluster_is_clearly_better() {
    let fleet = Fleet::new(vec![
        cluster("a", "eu", 8, "H100-80GB", 80, 2.0),
        cluster("b", "eu", 8, "H100-80GB", 80, 2.0),
    ]);
    let req = simple(2, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let first = check(&fleet, &req);
    first.expect("first placement", &[First("a")]);
    let current = first.record();
    // b becomes a little cheaper: nothing moves.
    let slightly = Fleet::new(vec![
        cluster("a", "eu", 8, "H100-80GB", 80, 2.0),
        cluster("b", "eu", 8, "H100-80GB", 80, 1.9),
    ]);
    let again = check_with(&slightly, &req, &Commitments::default(), Some(&current));
    assert!(
        same_assignments(&again.record(), &current),
        "{current:?} then {:?}",
        again.decision
    );
    // a fails: the replicas move.
    let mut failed = slightly.clusters.clone();
    failed[0].availability = Availability::Unhealthy("no heartbeat".into());
    let failed = Fleet::new(failed);
    check_with(&failed, &req, &Commitments::default(), Some(&current))
        .expect("a failed", &[On(&[("b", 2)])]);
}

#[test]
fn a_fleet_change_moves_no_replica_off_a_cluster_that_still_qualifies() {
    // a is nearly full of others' replicas, b is empty: clearly better.
    let fleet = Fleet::new(vec![
        cluster("a", "eu", 8, "H100-80GB", 80, 2.0),
        cluster("b", "eu", 8, "H100-80GB", 80, 2.0),
    ]);
    let req = simple(1, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let first = check(&fleet, &req);
    first.expect("first placement", &[First("a")]);
    let current = first.record();
    let others = holding(&[("a", "H100-80GB", 6)]);
    let placed_on = |fleet: &Fleet, trigger: &str| {
        let decision = crate::scheduler::place(
            &req,
            fleet,
            &others,
            Some(&current),
            &Settings::default().for_trigger(trigger),
        );
        assert_eq!(decision.assignments.len(), 1, "{trigger}: {decision:?}");
        fleet.get(decision.assignments[0].cluster).name.clone()
    };
    // A new spec is placed by score, with the usual stickiness: it moves.
    assert_eq!(placed_on(&fleet, "apply"), "b");
    // A re-plan for a fleet change keeps it where it runs.
    assert_eq!(placed_on(&fleet, "fleet-change"), "a");
    // Unless its cluster no longer qualifies.
    let mut failed = fleet.clusters.clone();
    failed[0].availability = Availability::Unhealthy("no heartbeat".into());
    assert_eq!(placed_on(&Fleet::new(failed), "fleet-change"), "b");
}

#[test]
fn gpus_other_workloads_hold_are_not_offered_and_own_ones_are_not_counted_twice() {
    // A member of one node of 4 GPUs, two of them requested by pods that
    // are not Flotilla's.
    let member = |allocated: u32| {
        let mut c = cluster("k8s", "eu", 4, "L4-24GB", 24, 1.0);
        c.gpus[0].allocated = allocated;
        Fleet::new(vec![c])
    };
    let req = simple(4, r#"{"policy": "PickAll"}"#);
    let two_taken = member(2);
    let first = check(&two_taken, &req);
    first.expect("two GPUs taken", &[On(&[("k8s", 2)]), Unplaced(2)]);
    // Its own two replicas run: the cluster reports all four allocated,
    // and placement keeps the two, not mistaking them for others' pods.
    let current = first.record();
    let all_taken = member(4);
    check_with(&all_taken, &req, &Commitments::default(), Some(&current))
        .expect("own replicas running", &[On(&[("k8s", 2)]), Unplaced(2)]);
    // The other pods went: room for all four.
    check_with(&two_taken, &req, &Commitments::default(), Some(&current))
        .expect("others gone", &[On(&[("k8s", 4)])]);
}

#[test]
fn a_cluster_whose_gpus_are_all_in_use_could_still_hold_a_deployment_one_day() {
    // Admission asks about an empty fleet: GPUs in use now (by this
    // deployment's own replicas during an undo, or by others) do not make
    // a deployment impossible.
    let mut busy = cluster("k8s", "eu", 2, "H100-80GB", 80, 1.0);
    busy.gpus[0].allocated = 2;
    let fleet = Fleet::new(vec![busy]);
    let req = simple(1, r#"{"policy": "PickAll"}"#);
    assert_eq!(
        crate::admit::validate_against_fleet(&req, &fleet, &crate::scheduler::Settings::default()),
        Ok(())
    );
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
    // One replica: the cheap cluster only (PickAll would otherwise give
    // every cluster one).
    let one = autoscaled(1);
    check(&fleet, &one).expect("one", &[On(&[("cheap", 1)])]);
    // Three: the cheap one fills, then the burst goes to the dear one.
    let three = autoscaled(3);
    let placed = check(&fleet, &three);
    placed.expect("three", &[On(&[("cheap", 2), ("dear", 1)])]);
    let current = placed.record();
    // Down to two: the dear replica goes first.
    let two = autoscaled(2);
    check_with(&fleet, &two, &Commitments::default(), Some(&current))
        .expect("down to two", &[On(&[("cheap", 2)])]);
}

/// `fleet` with one cluster changed.
fn alter(fleet: Fleet, name: &str, change: impl FnOnce(&mut ClusterView)) -> Fleet {
    let mut clusters = fleet.clusters;
    if let Some(c) = clusters.iter_mut().find(|c| c.name == name) {
        change(c);
    }
    Fleet::new(clusters)
}

/// SmolLM2 kept in the EU, with `replicas` and the `placement` object given
/// as JSON.
fn eu_only(replicas: u32, placement: &str) -> DeploymentRequest {
    request(&format!(
        r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas}, "placement": {placement},
            "residency": {{"clusterSelector": {{"matchLabels": {{"region": "eu"}}}}}}}}}}"#
    ))
}

#[test]
fn residency_is_never_relaxed() {
    let outside = Is("outside residency region=eu; cluster has region=us");
    let eu_down = || {
        let fleet = alter(standard_fleet(), "eu-a", |c| {
            c.availability = Availability::Unhealthy("no heartbeat for 4.0 s".into());
        });
        alter(fleet, "eu-b", |c| c.availability = Availability::Left)
    };
    run(vec![
        example(
            "PickAll: only the clusters inside",
            standard_fleet(),
            eu_only(4, r#"{"policy": "PickAll"}"#),
            vec![
                Clusters(&["eu-a", "eu-b"]),
                Placed(4),
                Excluded("us-a", "Residency", outside),
                Excluded(
                    "ap-a",
                    "Residency",
                    Is("outside residency region=eu; cluster has region=ap"),
                ),
            ],
        ),
        example(
            "PickN wants more clusters than the rule allows",
            standard_fleet(),
            eu_only(3, r#"{"policy": "PickN", "numberOfClusters": 3}"#),
            vec![
                Clusters(&["eu-a", "eu-b"]),
                MissingClusters(1),
                Outcome(PlacementOutcome::Partial),
                Excluded("us-a", "Residency", outside),
                SummaryHas("residency allows only clusters with region=eu"),
            ],
        ),
        example(
            "PickFixed naming a cluster outside",
            standard_fleet(),
            eu_only(
                2,
                r#"{"policy": "PickFixed", "clusterNames": ["us-a", "eu-b"]}"#,
            ),
            vec![Clusters(&["eu-b"]), Excluded("us-a", "Residency", outside)],
        ),
        example(
            "a preferred cluster outside is still left out",
            standard_fleet(),
            eu_only(
                1,
                r#"{"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [{"weight": 100, "labelSelector": {"matchLabels": {"region": "us"}}}]}}"#,
            ),
            vec![Excluded("us-a", "Residency", outside)],
        ),
        example(
            "a spread over regions cannot reach outside",
            standard_fleet(),
            eu_only(
                2,
                r#"{"policy": "PickN", "numberOfClusters": 2, "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]}"#,
            ),
            vec![
                Clusters(&["eu-a", "eu-b"]),
                Excluded("us-a", "Residency", outside),
            ],
        ),
        example(
            "every allowed cluster unhealthy or gone: unschedulable, and said why",
            eu_down(),
            eu_only(2, r#"{"policy": "PickAll"}"#),
            vec![
                Outcome(PlacementOutcome::Unschedulable),
                Excluded("eu-a", "ClusterHealth", StartsWith("unhealthy")),
                Excluded("eu-b", "ClusterHealth", Is("left the fleet")),
                Excluded("us-a", "Residency", outside),
                SummaryHas("2 by Residency"),
                SummaryHas("residency allows only clusters with region=eu"),
            ],
        ),
        example(
            "an unhealthy cluster outside is named for the rule",
            alter(standard_fleet(), "us-a", |c| {
                c.availability = Availability::Unhealthy("silent".into());
            }),
            eu_only(1, r#"{"policy": "PickAll"}"#),
            vec![Excluded("us-a", "Residency", outside)],
        ),
    ]);
}

#[test]
fn residency_holds_through_failover_and_relabelling() {
    let req = eu_only(2, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let fleet = standard_fleet();
    let placed = check(&fleet, &req);
    placed.expect("first placement", &[On(&[("eu-a", 2)])]);
    let current = placed.record();

    // eu-a fails: the replicas move to the other EU cluster, not the
    // cheaper US one.
    let one_down = alter(standard_fleet(), "eu-a", |c| {
        c.availability = Availability::Unhealthy("no heartbeat".into());
    });
    let moved = check_with(&one_down, &req, &Commitments::default(), Some(&current));
    moved.expect("eu-a failed", &[On(&[("eu-b", 2)])]);

    // Both EU clusters gone: nothing runs rather than something outside.
    let none_left = alter(one_down.clone(), "eu-b", |c| {
        c.availability = Availability::Left
    });
    check_with(
        &none_left,
        &req,
        &Commitments::default(),
        Some(&moved.record()),
    )
    .expect(
        "both EU clusters gone",
        &[
            Outcome(PlacementOutcome::Unschedulable),
            Assignments(0),
            SummaryHas("residency allows only clusters with region=eu"),
        ],
    );

    // The cluster it runs on is relabelled out of the EU: its replicas
    // leave it, whatever the stickiness.
    let relabelled = alter(standard_fleet(), "eu-a", |c| {
        c.labels.insert("region".into(), "us".into());
    });
    check_with(&relabelled, &req, &Commitments::default(), Some(&current)).expect(
        "eu-a relabelled",
        &[
            On(&[("eu-b", 2)]),
            Excluded(
                "eu-a",
                "Residency",
                Is("outside residency region=eu; cluster has region=us"),
            ),
        ],
    );
}

/// A cluster as its inventory reports it: `nodes` of (node name, GPUs of
/// `model`).
fn cluster_of_nodes(
    name: &str,
    model: &str,
    memory_gib: u64,
    nodes: &[(&str, u32)],
) -> ClusterView {
    let gpus = nodes
        .iter()
        .flat_map(|(node, n)| {
            (0..*n).map(move |index| v1::GpuDevice {
                index,
                model: model.into(),
                memory_total_bytes: memory_gib << 30,
                memory_free_bytes: memory_gib << 30,
                node: (*node).into(),
                ..Default::default()
            })
        })
        .collect();
    let record = v1::ClusterRecord {
        name: name.into(),
        health: v1::ClusterHealth::Healthy.into(),
        inventory: Some(v1::ClusterInventory {
            gpus,
            cost_per_gpu_hour: 1.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    ClusterView::from_record(&record, 0, 0)
}

fn llama_70b(replicas: u32, gpu: &str) -> DeploymentRequest {
    request(&format!(
        r#"{{"metadata": {{"name": "big"}}, "spec": {{"model": {{"preset": "llama-3.1-70b-instruct"}}, "runtime": "vllm", "replicas": {replicas}{gpu}}}}}"#
    ))
}

#[test]
fn gpus_are_grouped_by_node() {
    let c = cluster_of_nodes("gke", "L4-24GB", 24, &[("n1", 4), ("n2", 2), ("n3", 4)]);
    let g = &c.gpus[0];
    assert_eq!((g.count, g.gpus_per_node()), (10, 4));
    assert_eq!(g.per_node, [4, 4, 2]);
    assert_eq!(
        (g.nodes_with(4), g.nodes_with(2), g.nodes_with(5)),
        (2, 3, 0)
    );
    assert_eq!(
        (g.node_slots(4), g.node_slots(2), g.node_slots(1)),
        (2, 5, 10)
    );
    // GPUs that name no node are one node, as before nodes were reported.
    let one_host = cluster_of_nodes("local", "L4-24GB", 24, &[("", 8)]);
    assert_eq!(one_host.gpus[0].per_node, [8]);
    assert_eq!(one_host.gpus[0].gpus_per_node(), 8);
}

#[test]
fn a_replica_larger_than_a_node_spans_nodes_as_pipeline_stages() {
    // Llama 3.1 70B at BF16 needs 166.6 GiB: four L4s (21.6 GiB usable
    // each) are not enough, two nodes of four are (20.8 GiB per GPU).
    let two_nodes = cluster_of_nodes("gke-l4", "L4-24GB", 24, &[("n1", 4), ("n2", 4)]);
    let one_node = cluster_of_nodes("one-l4", "L4-24GB", 24, &[("n1", 4)]);
    let uneven = cluster_of_nodes(
        "uneven-l4",
        "L4-24GB",
        24,
        &[("n1", 4), ("n2", 2), ("n3", 2)],
    );
    let fleet = Fleet::new(vec![two_nodes, one_node, uneven]);
    let request = llama_70b(1, "");
    let checked = check(&fleet, &request);
    checked.expect(
        "70B on L4 nodes",
        &[
            On(&[("gke-l4", 1)]),
            Excluded(
                "one-l4",
                "ModelFit",
                Is(
                    "one replica of llama-3.1-70b-instruct needs 2 nodes with 4 × L4-24GB each \
                    (2 pipeline stages of tensor-parallel 4); 1 node here has that many \
                    (L4-24GB per node: 4)",
                ),
            ),
            Excluded(
                "uneven-l4",
                "ModelFit",
                Contains("1 node here has that many (L4-24GB per node: 4, 2, 2)"),
            ),
        ],
    );
    let record = checked.record();
    let a = &record.assignments[0];
    assert_eq!(
        (a.gpus_per_replica, a.tensor_parallel, a.pipeline_parallel),
        (8, 4, 2)
    );
    assert_eq!(a.gpu_model, "L4-24GB");

    // Three nodes of four hold one replica of two stages; the third node
    // is left over.
    let three = Fleet::new(vec![cluster_of_nodes(
        "gke-l4",
        "L4-24GB",
        24,
        &[("n1", 4), ("n2", 4), ("n3", 4)],
    )]);
    let two = llama_70b(2, "");
    let checked = check(&three, &two);
    checked.expect("three nodes of four", &[On(&[("gke-l4", 1)]), Unplaced(1)]);
}

#[test]
fn a_candle_replica_larger_than_a_node_is_refused_with_that_reason() {
    let fleet = Fleet::new(vec![
        cluster_of_nodes("two-l4", "L4-24GB", 24, &[("n1", 4), ("n2", 4)]),
        cluster_of_nodes("big-l4", "L4-24GB", 24, &[("n1", 8)]),
    ]);
    let eight = request(
        r#"{"metadata": {"name": "small"}, "spec": {"model": {"artifact": {"name": "smollm2", "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "format": "safetensors"}}, "runtime": "candle", "replicas": 1, "resources": {"gpu": {"count": 8}}}}"#,
    );
    check(&fleet, &eight).expect(
        "8 GPUs of candle",
        &[
            On(&[("big-l4", 1)]),
            Excluded(
                "two-l4",
                "ModelFit",
                Is(
                    "one replica of smollm2 needs 8 × L4-24GB, more than any node here has \
                     (4 per node at most), and runtime candle serves from one node only; \
                     runtime vllm spans nodes",
                ),
            ),
        ],
    );
}

#[test]
fn a_replica_that_fits_a_node_stays_on_one() {
    // One 8 × H100 node: the 70B model fits at tensor-parallel 4.
    let fleet = Fleet::new(vec![cluster_of_nodes(
        "h100",
        "H100-80GB",
        80,
        &[("n1", 8), ("n2", 8)],
    )]);
    let three = llama_70b(3, "");
    let checked = check(&fleet, &three);
    checked.expect("70B on H100", &[On(&[("h100", 3)])]);
    let a = &checked.record().assignments[0];
    assert_eq!(
        (a.gpus_per_replica, a.tensor_parallel, a.pipeline_parallel),
        (4, 4, 1)
    );
    // Two replicas per node of 8, though 3 × 4 = 12 of the 16 GPUs are free.
    let small = Fleet::new(vec![cluster_of_nodes(
        "h100",
        "H100-80GB",
        80,
        &[("n1", 6), ("n2", 6)],
    )]);
    check(&small, &three).expect(
        "4-GPU replicas on 6-GPU nodes",
        &[On(&[("h100", 2)]), Unplaced(1)],
    );
}

#[test]
fn a_gpu_count_beyond_a_node_is_split_into_stages() {
    let fleet = Fleet::new(vec![cluster_of_nodes(
        "gke-l4",
        "L4-24GB",
        24,
        &[("n1", 4), ("n2", 4), ("n3", 4)],
    )]);
    let twelve = llama_70b(1, r#", "resources": {"gpu": {"count": 12}}"#);
    let checked = check(&fleet, &twelve);
    checked.expect("12 GPUs asked for", &[On(&[("gke-l4", 1)])]);
    let a = &checked.record().assignments[0];
    assert_eq!(
        (a.gpus_per_replica, a.tensor_parallel, a.pipeline_parallel),
        (12, 4, 3)
    );
    // Fewer than the sizing needs is refused, as before.
    let four = llama_70b(1, r#", "resources": {"gpu": {"count": 4}}"#);
    let checked = check(&fleet, &four);
    checked.expect(
        "4 GPUs asked for",
        &[Excluded(
            "gke-l4",
            "ModelFit",
            StartsWith("the model needs 8 GPUs per replica on L4-24GB"),
        )],
    );
}
