//! Property tests of the scheduler's invariants over random fleets and
//! requests.

use flotilla_proto::v1::{self, TaintEffect};
use proptest::prelude::*;

use super::{cluster, request};
use crate::fleet::{Availability, ClusterView, Commitments, Fleet};
use crate::scheduler::{Settings, Why, place, same_assignments, tolerates};
use crate::spec::{DeploymentRequest, Policy};

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
    (0u32..12, 0u8..3, 1u32..5, any::<bool>(), any::<bool>(), 0u32..3, any::<bool>()).prop_map(|(replicas, policy, n, tolerate, spread, count, resident)| {
        let policy = match policy {
            0 => r#""policy": "PickAll""#.to_string(),
            1 => format!(r#""policy": "PickN", "numberOfClusters": {n}"#),
            _ => r#""policy": "PickFixed", "clusterNames": ["c00", "c02"]"#.to_string(),
        };
        let tolerations = if tolerate { r#", "tolerations": [{"key": "spot", "operator": "Exists"}]"# } else { "" };
        let spread = if spread { r#", "topologySpread": [{"topologyKey": "region", "maxSkew": 1}]"# } else { "" };
        let residency = if resident { r#", "residency": {"clusterSelector": {"matchExpressions": [{"key": "region", "operator": "In", "values": ["a", "b"]}]}}"# } else { "" };
        request(&format!(
            r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas},
                "resources": {{"gpu": {{"count": {count}}}}}, "placement": {{{policy}{tolerations}{spread}}}{residency}}}}}"#
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
            prop_assert!(req.residency.as_ref().is_none_or(|r| r.allows(&c.labels)), "{} is outside residency", c.name);
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
