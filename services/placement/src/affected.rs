//! Which deployments a change of the fleet affects: a pure function from
//! (the fleet as last planned against, the fleet now, the placements and
//! deployments) to the clusters that changed and the deployments to
//! re-plan. The shell ([`crate::run`]) reads the caches, calls
//! [`affected_by_fleet_change`], keeps the views it returns and re-plans.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_proto::v1::{ModelDeployment, PlacementDecision, PlacementOutcome};

use crate::fleet::{Availability, ClusterView, Commitments, Fleet};

/// What a fleet change asks of the planner.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FleetChange {
    /// Clusters whose view changed in a way placement cares about, that
    /// joined, or that left.
    pub changed: BTreeSet<String>,
    /// Deployments to re-plan, by name.
    pub affected: BTreeSet<String>,
    /// The fleet to compare the next change against.
    pub views: BTreeMap<String, ClusterView>,
}

/// A cluster view without the parts that change on every heartbeat, to
/// tell a change that matters to placement from one that does not. GPUs
/// in use count only beyond what Flotilla's own placements hold there
/// (`committed`): replicas starting and stopping as planned change
/// nothing a plan depends on, and at fleet scale they would otherwise
/// re-plan every deployment on every cluster they touch.
pub fn relevant(view: &ClusterView, committed: &Commitments) -> ClusterView {
    let mut v = view.clone();
    if let Availability::Probation { .. } = v.availability {
        v.availability = Availability::Probation { remaining_ms: 0 };
    }
    for g in &mut v.gpus {
        g.largest_free_bytes >>= 30;
        g.allocated = g
            .allocated
            .saturating_sub(committed.held(&view.name, &g.model));
    }
    v
}

/// Which clusters changed, before anything is read about deployments.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangedClusters {
    pub changed: BTreeSet<String>,
    /// Whether capacity may have grown (a cluster joined, recovered, was
    /// uncordoned, or its GPUs, labels or taints changed).
    pub more_room: bool,
    pub views: BTreeMap<String, ClusterView>,
}

/// The clusters whose [`relevant`] view differs from `last`, joined or
/// left; `None` when none did and `everything` is false. Cheap: the shell
/// asks this on every burst of heartbeats, and reads the placements and
/// deployments only when it is `Some`.
pub fn changed_clusters(
    last: &BTreeMap<String, ClusterView>,
    fleet: &Fleet,
    committed: &Commitments,
    everything: bool,
) -> Option<ChangedClusters> {
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut more_room = everything;
    let views: BTreeMap<String, ClusterView> = fleet
        .clusters
        .iter()
        .map(|v| (v.name.clone(), relevant(v, committed)))
        .collect();
    for (name, now) in &views {
        match last.get(name) {
            Some(before) if before == now => {}
            before => {
                changed.insert(name.clone());
                more_room |= before.is_none_or(|b| {
                    (b.availability != Availability::Available
                        && now.availability == Availability::Available)
                        || (b.cordoned.is_some() && now.cordoned.is_none())
                        || b.gpus != now.gpus
                        || b.labels != now.labels
                        || b.taints != now.taints
                });
            }
        }
    }
    for gone in last.keys() {
        if fleet.index_of(gone).is_none() {
            changed.insert(gone.clone());
        }
    }
    if !everything && changed.is_empty() {
        return None;
    }
    Some(ChangedClusters {
        changed,
        more_room,
        views,
    })
}

/// The deployments to re-plan after the fleet went from `last` (views as
/// [`relevant`] made them) to `fleet`: those with replicas on a changed
/// cluster; when capacity may have grown (a cluster joined, recovered,
/// was uncordoned, or its GPUs, labels or taints changed), those not fully
/// placed; and those whose spec generation has no placement yet.
/// `everything`: there is no trustworthy `last` (start, or missed
/// notifications), so every placement is re-planned.
///
/// `None` when nothing placement cares about changed and `everything` is
/// false: nothing to do, and `last` stays the fleet to compare against.
pub fn affected_by_fleet_change(
    last: &BTreeMap<String, ClusterView>,
    fleet: &Fleet,
    committed: &Commitments,
    placements: &[(String, PlacementDecision)],
    deployments: &[(String, ModelDeployment)],
    everything: bool,
) -> Option<FleetChange> {
    let clusters = changed_clusters(last, fleet, committed, everything)?;
    Some(affected(clusters, placements, deployments, everything))
}

/// The second half of [`affected_by_fleet_change`], once
/// [`changed_clusters`] found a change.
pub fn affected(
    clusters: ChangedClusters,
    placements: &[(String, PlacementDecision)],
    deployments: &[(String, ModelDeployment)],
    everything: bool,
) -> FleetChange {
    let ChangedClusters {
        changed,
        more_room,
        views,
    } = clusters;
    let mut affected: BTreeSet<String> = BTreeSet::new();
    for (name, p) in placements {
        let touches = p.assignments.iter().any(|a| changed.contains(&a.cluster));
        let waiting = more_room && p.outcome() != PlacementOutcome::Placed;
        if touches || everything || waiting {
            affected.insert(name.clone());
        }
    }
    let planned_generation: BTreeMap<&str, u64> = placements
        .iter()
        .map(|(name, p)| (name.as_str(), p.deployment_generation))
        .collect();
    for (name, d) in deployments {
        let planned = planned_generation
            .get(name.as_str())
            .is_some_and(|g| Some(*g) == d.status.as_ref().map(|s| s.generation));
        if !planned {
            affected.insert(name.clone());
        }
    }
    FleetChange {
        changed,
        affected,
        views,
    }
}

#[cfg(test)]
mod tests {
    use flotilla_proto::v1::{self, ClusterAssignment, ModelDeploymentStatus};

    use super::*;
    use crate::fleet::GpuGroup;

    const GIB: u64 = 1 << 30;

    fn view(name: &str) -> ClusterView {
        ClusterView {
            name: name.into(),
            labels: BTreeMap::from([("region".to_string(), "eu".to_string())]),
            taints: vec![],
            availability: Availability::Available,
            cordoned: None,
            gpus: vec![GpuGroup {
                model: "H100-80GB".into(),
                memory_bytes: 80 * GIB,
                largest_free_bytes: 80 * GIB,
                count: 8,
                allocated: 0,
                per_node: vec![8],
            }],
            cost_per_gpu_hour: 2.0,
            cached_models: vec![],
        }
    }

    /// A placement of `name` at spec generation 1 with replicas on
    /// `clusters`.
    fn placement(
        name: &str,
        clusters: &[&str],
        outcome: PlacementOutcome,
    ) -> (String, PlacementDecision) {
        let record = PlacementDecision {
            deployment: name.into(),
            deployment_generation: 1,
            assignments: clusters
                .iter()
                .map(|c| ClusterAssignment {
                    cluster: (*c).into(),
                    replicas: 1,
                    gpus_per_replica: 1,
                    gpu_model: "H100-80GB".into(),
                    ..Default::default()
                })
                .collect(),
            outcome: outcome.into(),
            ..Default::default()
        };
        (name.into(), record)
    }

    fn deployment(name: &str, generation: u64) -> (String, ModelDeployment) {
        let doc = ModelDeployment {
            status: Some(ModelDeploymentStatus {
                generation,
                ..Default::default()
            }),
            ..Default::default()
        };
        (name.into(), doc)
    }

    type Placements = Vec<(String, PlacementDecision)>;
    type Deployments = Vec<(String, ModelDeployment)>;

    /// Deployments every case starts from: `on-a` runs on a, `on-b` on b,
    /// `partial` has one replica on b and wants more, `waiting` has none,
    /// all planned at their spec generation.
    fn state() -> (Placements, Deployments) {
        let placements = vec![
            placement("on-a", &["a"], PlacementOutcome::Placed),
            placement("on-b", &["b"], PlacementOutcome::Placed),
            placement("partial", &["b"], PlacementOutcome::Partial),
            placement("waiting", &[], PlacementOutcome::Unschedulable),
        ];
        let deployments = ["on-a", "on-b", "partial", "waiting"]
            .into_iter()
            .map(|n| deployment(n, 1))
            .collect();
        (placements, deployments)
    }

    fn views(clusters: &[ClusterView]) -> BTreeMap<String, ClusterView> {
        clusters
            .iter()
            .map(|v| (v.name.clone(), relevant(v, &Commitments::default())))
            .collect()
    }

    fn tainted(mut v: ClusterView) -> ClusterView {
        v.taints.push(v1::Taint {
            key: "spot".into(),
            value: "true".into(),
            effect: v1::TaintEffect::NoSchedule.into(),
        });
        v
    }

    /// (what, fleet before, fleet now, changed clusters, deployments to
    /// re-plan); `None` for "nothing to do".
    type Case = (
        &'static str,
        Vec<ClusterView>,
        Vec<ClusterView>,
        Option<(&'static [&'static str], &'static [&'static str])>,
    );

    #[test]
    fn a_fleet_change_re_plans_exactly_the_deployments_it_affects() {
        let (a, b) = (view("a"), view("b"));
        let with = |f: &dyn Fn(&mut ClusterView)| {
            let mut v = view("a");
            f(&mut v);
            v
        };
        let cases: Vec<Case> = vec![
            (
                "nothing changed",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                None,
            ),
            (
                "a heartbeat: free memory within the same GiB",
                vec![
                    with(&|v| v.gpus[0].largest_free_bytes = 70 * GIB + (100 << 20)),
                    b.clone(),
                ],
                vec![
                    with(&|v| v.gpus[0].largest_free_bytes = 70 * GIB + (900 << 20)),
                    b.clone(),
                ],
                None,
            ),
            (
                "probation counting down",
                vec![
                    with(&|v| {
                        v.availability = Availability::Probation {
                            remaining_ms: 9_000,
                        }
                    }),
                    b.clone(),
                ],
                vec![
                    with(&|v| {
                        v.availability = Availability::Probation {
                            remaining_ms: 8_000,
                        }
                    }),
                    b.clone(),
                ],
                None,
            ),
            (
                "a goes unhealthy: only what runs on a",
                vec![a.clone(), b.clone()],
                vec![
                    with(&|v| v.availability = Availability::Unhealthy("silent".into())),
                    b.clone(),
                ],
                Some((&["a"], &["on-a"])),
            ),
            (
                "a recovers: what runs on a, and everything not fully placed",
                vec![
                    with(&|v| v.availability = Availability::Unhealthy("silent".into())),
                    b.clone(),
                ],
                vec![a.clone(), b.clone()],
                Some((&["a"], &["on-a", "partial", "waiting"])),
            ),
            (
                "a is cordoned: only what runs on a",
                vec![a.clone(), b.clone()],
                vec![
                    with(&|v| v.cordoned = Some("maintenance".into())),
                    b.clone(),
                ],
                Some((&["a"], &["on-a"])),
            ),
            (
                "a is uncordoned: more room",
                vec![
                    with(&|v| v.cordoned = Some("maintenance".into())),
                    b.clone(),
                ],
                vec![a.clone(), b.clone()],
                Some((&["a"], &["on-a", "partial", "waiting"])),
            ),
            (
                "a leaves the fleet",
                vec![a.clone(), b.clone()],
                vec![b.clone()],
                Some((&["a"], &["on-a"])),
            ),
            (
                "c joins: more room",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone(), view("c")],
                Some((&["c"], &["partial", "waiting"])),
            ),
            (
                "b gets a taint: its labels and taints may admit others",
                vec![a.clone(), b.clone()],
                vec![a.clone(), tainted(b.clone())],
                Some((&["b"], &["on-b", "partial", "waiting"])),
            ),
            (
                "b's label changes",
                vec![a.clone(), b.clone()],
                vec![a.clone(), {
                    let mut v = b.clone();
                    v.labels.insert("region".into(), "us".into());
                    v
                }],
                Some((&["b"], &["on-b", "partial", "waiting"])),
            ),
            (
                "a's GPUs fill up (a GiB less free)",
                vec![a.clone(), b.clone()],
                vec![
                    with(&|v| v.gpus[0].largest_free_bytes -= 2 * GIB),
                    b.clone(),
                ],
                Some((&["a"], &["on-a", "partial", "waiting"])),
            ),
            (
                "b's cost changes: no more room",
                vec![a.clone(), b.clone()],
                vec![a.clone(), {
                    let mut v = b.clone();
                    v.cost_per_gpu_hour = 1.0;
                    v
                }],
                Some((&["b"], &["on-b", "partial"])),
            ),
            (
                "b degrades: not more room",
                vec![a.clone(), b.clone()],
                vec![a.clone(), {
                    let mut v = b.clone();
                    v.availability = Availability::Degraded("slow".into());
                    v
                }],
                Some((&["b"], &["on-b", "partial"])),
            ),
        ];
        let (placements, deployments) = state();
        for (what, before, now, expected) in cases {
            let got = affected_by_fleet_change(
                &views(&before),
                &Fleet::new(now.clone()),
                &Commitments::default(),
                &placements,
                &deployments,
                false,
            );
            match expected {
                None => assert_eq!(got, None, "{what}"),
                Some((changed, affected)) => {
                    let got = got.unwrap_or_else(|| panic!("{what}: nothing to do"));
                    let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
                    assert_eq!(names(&got.changed), *changed, "{what}: changed");
                    assert_eq!(names(&got.affected), *affected, "{what}: affected");
                    assert_eq!(got.views, views(&now), "{what}: the next comparison");
                }
            }
        }
    }

    #[test]
    fn at_start_everything_is_re_planned() {
        let (placements, deployments) = state();
        let fleet = Fleet::new(vec![view("a"), view("b")]);
        for last in [BTreeMap::new(), views(&fleet.clusters)] {
            let got = affected_by_fleet_change(
                &last,
                &fleet,
                &Commitments::default(),
                &placements,
                &deployments,
                true,
            )
            .unwrap_or_default();
            let affected: Vec<&str> = got.affected.iter().map(String::as_str).collect();
            assert_eq!(affected, ["on-a", "on-b", "partial", "waiting"]);
            assert_eq!(got.views, views(&fleet.clusters));
        }
    }

    #[test]
    fn a_spec_without_a_placement_of_its_generation_is_planned_on_any_change() {
        let (mut placements, mut deployments) = state();
        // A new generation of on-b, a deployment never placed, and one
        // without status: all unplanned. Placements of deployments that
        // are gone are re-planned only when they touch the change.
        deployments[1] = deployment("on-b", 2);
        deployments.push(deployment("new", 1));
        deployments.push(("bare".into(), ModelDeployment::default()));
        placements.push(placement("orphan", &["b"], PlacementOutcome::Placed));
        let before = vec![view("a"), view("b")];
        let mut now = before.clone();
        now[0].availability = Availability::Unhealthy("silent".into());

        let got = affected_by_fleet_change(
            &views(&before),
            &Fleet::new(now),
            &Commitments::default(),
            &placements,
            &deployments,
            false,
        )
        .unwrap_or_default();
        let affected: Vec<&str> = got.affected.iter().map(String::as_str).collect();
        assert_eq!(affected, ["bare", "new", "on-a", "on-b"]);

        // Without a change, even unplanned specs wait (apply plans them).
        let unchanged = affected_by_fleet_change(
            &views(&before),
            &Fleet::new(before.clone()),
            &Commitments::default(),
            &placements,
            &deployments,
            false,
        );
        assert_eq!(unchanged, None);
    }

    #[test]
    fn gpus_in_use_by_the_fleets_own_placements_change_nothing() {
        let mut committed = Commitments::default();
        committed.add(&PlacementDecision {
            assignments: vec![ClusterAssignment {
                cluster: "a".into(),
                replicas: 2,
                gpus_per_replica: 1,
                gpu_model: "H100-80GB".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let last: BTreeMap<String, ClusterView> = [view("a")]
            .iter()
            .map(|v| (v.name.clone(), relevant(v, &committed)))
            .collect();
        let with_allocated = |n: u32| {
            let mut v = view("a");
            v.gpus[0].allocated = n;
            Fleet::new(vec![v])
        };
        // Its own two replicas started: what placement committed.
        assert_eq!(
            changed_clusters(&last, &with_allocated(2), &committed, false),
            None
        );
        // A third GPU taken by something else is a change.
        let got = changed_clusters(&last, &with_allocated(3), &committed, false).expect("a change");
        assert_eq!(got.changed, BTreeSet::from(["a".to_string()]));
    }
}
