//! Tests of the scheduler: example placements as tables ([`examples`]) and
//! property tests of its invariants ([`properties`]). Every example goes through
//! [`check`], which also checks that each cluster is placed or explained
//! exactly once.

mod examples;
mod properties;

use std::collections::BTreeMap;

use flotilla_proto::v1::{self, PlacementOutcome};

use crate::fleet::{Availability, ClusterView, Commitments, Fleet, GpuGroup};
use crate::scheduler::{Decision, Settings, place};
use crate::spec::{self, DeploymentRequest};

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
            allocated: 0,
            per_node: vec![gpus],
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

/// SmolLM2 with `replicas` and the `placement` object given as JSON.
fn simple(replicas: u32, placement: &str) -> DeploymentRequest {
    request(&format!(
        r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas}, "placement": {placement}}}}}"#
    ))
}

fn standard_fleet() -> Fleet {
    Fleet::new(vec![
        cluster("eu-a", "eu", 8, "H100-80GB", 80, 3.0),
        cluster("eu-b", "eu", 4, "H100-80GB", 80, 2.0),
        cluster("us-a", "us", 8, "A100-80GB", 80, 1.5),
        cluster("ap-a", "ap", 2, "L4-24GB", 24, 0.5),
    ])
}

/// GPUs held by other deployments: (cluster, GPU model, GPUs).
fn holding(held: &[(&str, &str, u32)]) -> Commitments {
    let mut c = Commitments::default();
    for (cluster, model, gpus) in held {
        c.add(&v1::PlacementDecision {
            assignments: vec![v1::ClusterAssignment {
                cluster: (*cluster).into(),
                replicas: *gpus,
                gpus_per_replica: 1,
                gpu_model: (*model).into(),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    c
}

/// A placement of one request on one fleet, and what the examples ask of
/// it.
struct Checked<'a> {
    fleet: &'a Fleet,
    request: &'a DeploymentRequest,
    decision: Decision,
}

/// Places `request` on `fleet` with nothing held by others and nothing
/// running yet.
fn check<'a>(fleet: &'a Fleet, request: &'a DeploymentRequest) -> Checked<'a> {
    check_with(fleet, request, &Commitments::default(), None)
}

/// Places `request` on `fleet` with `held` GPUs taken by others and
/// `current` its placement so far.
fn check_with<'a>(
    fleet: &'a Fleet,
    request: &'a DeploymentRequest,
    held: &Commitments,
    current: Option<&v1::PlacementDecision>,
) -> Checked<'a> {
    let decision = place(request, fleet, held, current, &Settings::default());
    let mut seen: Vec<u32> = decision
        .assignments
        .iter()
        .map(|a| a.cluster)
        .chain(decision.exclusions.iter().map(|e| e.cluster))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..fleet.len() as u32).collect::<Vec<_>>(),
        "every cluster placed or explained, once: {decision:?}"
    );
    Checked {
        fleet,
        request,
        decision,
    }
}

/// What an example expects of its placement.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Replicas per cluster, in cluster-name order.
    On(&'static [(&'static str, u32)]),
    /// The clusters with replicas, in cluster-name order.
    Clusters(&'static [&'static str]),
    /// The first cluster with replicas, in cluster-name order.
    First(&'static str),
    /// The cluster is left out by this plugin, for this reason.
    Excluded(&'static str, &'static str, Reason),
    Outcome(PlacementOutcome),
    Placed(u32),
    Unplaced(u32),
    MissingClusters(u32),
    Assignments(usize),
    SummaryHas(&'static str),
    /// Every assignment gets at least this many GPUs per replica.
    GpusPerReplicaAtLeast(u32),
}

#[derive(Debug, Clone, Copy)]
enum Reason {
    Is(&'static str),
    StartsWith(&'static str),
    Contains(&'static str),
    Any,
}

impl Checked<'_> {
    /// Replicas per cluster, in cluster-name order.
    fn on(&self) -> Vec<(String, u32)> {
        self.decision
            .assignments
            .iter()
            .map(|a| (self.fleet.get(a.cluster).name.clone(), a.replicas))
            .collect()
    }

    /// The plugin and the reason in words `cluster` was left out for.
    fn excluded(&self, cluster: &str) -> (String, String) {
        let idx = self.fleet.index_of(cluster).unwrap();
        let d = &self.decision;
        let e = d
            .exclusions
            .iter()
            .find(|e| e.cluster == idx)
            .unwrap_or_else(|| panic!("{cluster} not excluded: {d:?}"));
        (
            e.why.plugin().to_string(),
            d.reason(e, self.request, self.fleet),
        )
    }

    fn summary(&self) -> String {
        self.decision.summary(self.request, self.fleet)
    }

    /// The assignments as the next re-plan sees them.
    fn record(&self) -> v1::PlacementDecision {
        self.decision.assignments_record(self.request, self.fleet)
    }

    fn expect(&self, what: &str, expectations: &[Expect]) {
        let d = &self.decision;
        for e in expectations {
            match *e {
                Expect::On(on) => {
                    let wanted: Vec<(String, u32)> =
                        on.iter().map(|(c, n)| (c.to_string(), *n)).collect();
                    assert_eq!(self.on(), wanted, "{what}");
                }
                Expect::Clusters(clusters) => {
                    let got: Vec<String> = self.on().into_iter().map(|(c, _)| c).collect();
                    assert_eq!(got, clusters, "{what}");
                }
                Expect::First(cluster) => assert_eq!(self.on()[0].0, cluster, "{what}"),
                Expect::Excluded(cluster, plugin, reason) => {
                    let (p, r) = self.excluded(cluster);
                    assert_eq!(p, plugin, "{what}: {cluster}: {r}");
                    let holds = match reason {
                        Reason::Is(text) => r == text,
                        Reason::StartsWith(text) => r.starts_with(text),
                        Reason::Contains(text) => r.contains(text),
                        Reason::Any => true,
                    };
                    assert!(holds, "{what}: {cluster}: {r}, wanted {reason:?}");
                }
                Expect::Outcome(outcome) => {
                    assert_eq!(d.outcome(self.request), outcome, "{what}");
                }
                Expect::Placed(n) => assert_eq!(d.placed_replicas(), n, "{what}"),
                Expect::Unplaced(n) => assert_eq!(d.unplaced_replicas, n, "{what}"),
                Expect::MissingClusters(n) => assert_eq!(d.missing_clusters, n, "{what}"),
                Expect::Assignments(n) => assert_eq!(d.assignments.len(), n, "{what}"),
                Expect::SummaryHas(text) => {
                    let summary = self.summary();
                    assert!(summary.contains(text), "{what}: {summary}");
                }
                Expect::GpusPerReplicaAtLeast(n) => assert!(
                    d.assignments.iter().all(|a| a.gpus_per_replica >= n),
                    "{what}: {d:?}"
                ),
            }
        }
    }
}

#[test]
fn clusters_not_chosen_are_named_in_a_small_fleet_and_summed_up_in_a_large_one() {
    let request = simple(1, r#"{"policy": "PickN", "numberOfClusters": 1}"#);
    let exclusions = |n: usize| {
        let fleet = Fleet::new(
            (0..n)
                .map(|i| cluster(&format!("c{i:02}"), "eu", 8, "H100-80GB", 80, 2.0))
                .collect(),
        );
        let checked = check(&fleet, &request);
        checked.decision.to_record(&request, &fleet).exclusions
    };
    let small = exclusions(crate::scheduler::NOT_CHOSEN_LISTED + 1);
    assert_eq!(small.len(), crate::scheduler::NOT_CHOSEN_LISTED);
    assert!(small.iter().all(|e| !e.cluster.is_empty() && e.count == 0));
    let large = exclusions(100);
    assert_eq!(large.len(), 1, "{large:?}");
    assert_eq!(large[0].count, 99);
    assert!(large[0].cluster.is_empty());
    assert!(
        large[0].reason.starts_with("99 more cluster(s) qualify"),
        "{}",
        large[0].reason
    );
}

#[test]
fn an_apply_older_than_the_stored_spec_changes_nothing() {
    let doc = |replicas: u32| -> v1::ModelDeployment {
        let json = format!(
            r#"{{"metadata": {{"name": "d"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas}}}}}"#
        );
        flotilla_proto::codec::decode_json(json.as_bytes()).unwrap()
    };
    let accept = |current: Option<&v1::ModelDeployment>, replicas: u32, sequence: u64| {
        let d = doc(replicas);
        let request = spec::validate(&d).unwrap();
        crate::planner::accepted_spec(current, &d, sequence, &request, 1_000)
    };
    let first = accept(None, 1, 10).unwrap();
    let status = |d: &v1::ModelDeployment| d.status.clone().unwrap_or_default();
    assert_eq!(
        (status(&first).generation, status(&first).applied_sequence),
        (1, 10)
    );
    let second = accept(Some(&first), 2, 12).unwrap();
    assert_eq!(
        (status(&second).generation, status(&second).applied_sequence),
        (2, 12)
    );
    // Apply 11 overtaken by 12 (handled at once, or redelivered late).
    assert!(accept(Some(&second), 3, 11).is_none());
    // The same spec again is no change; a newer different one is.
    assert!(accept(Some(&second), 2, 13).is_none());
    let third = accept(Some(&second), 3, 14).unwrap();
    assert_eq!(status(&third).generation, 3);
    // An apply whose sequence is unknown is never taken for an old one,
    // and keeps the sequence that is known.
    let fourth = accept(Some(&third), 4, 0).unwrap();
    assert_eq!(
        (status(&fourth).generation, status(&fourth).applied_sequence),
        (4, 14)
    );
}
