//! Which replica serves a model: the table of ready replicas (a watched
//! copy of KV `replicas`), each one's requests in flight, and ejection of
//! replicas that keep failing before they answer.
//!
//! The decisions are pure: [`serves`] says whether a replica record can
//! take a model's requests, [`rank`] orders the candidates, and [`Streak`]
//! counts failures into ejections. [`ReplicaTable`] only gathers what they
//! need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_kit::RecordStore;
use flotilla_kit::sync::lock;
use flotilla_proto::v1::{
    ClusterHealth, ClusterRecord, ModelDeployment, ReplicaPhase, ReplicaStatus,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{GatewayMetrics, ReplicaLabels};

/// Consecutive failures that eject a replica.
const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(30);

/// Whether `replica` can take requests for `model`: ready, serving that
/// model, with an address to send them to.
pub fn serves(replica: &ReplicaStatus, model: &str) -> bool {
    replica.phase() == ReplicaPhase::Ready && replica.model == model && !replica.endpoint.is_empty()
}

/// A replica that [`serves`] the model, as [`rank`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing<'a> {
    pub replica_id: &'a str,
    pub region: &'a str,
    pub in_flight: i64,
    pub ejected: bool,
}

/// The order to try `replicas` in, as indices into it: ejected replicas
/// left out; then replicas of `own_region` first (when the gateway has a
/// region), fewest requests in flight, and the replica id so that equal
/// replicas are tried in a stable order.
pub fn rank(own_region: &str, replicas: &[Standing<'_>]) -> Vec<usize> {
    let elsewhere = |s: &Standing<'_>| !own_region.is_empty() && s.region != own_region;
    let mut order: Vec<usize> = (0..replicas.len())
        .filter(|&i| !replicas[i].ejected)
        .collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&replicas[a], &replicas[b]);
        let key = |s: &Standing<'_>| (elsewhere(s), s.in_flight);
        key(a)
            .cmp(&key(b))
            .then_with(|| a.replica_id.cmp(b.replica_id))
    });
    order
}

/// One replica's consecutive failures and ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streak {
    failures: u32,
    ejected_until: Option<Instant>,
}

impl Streak {
    pub fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// The replica answered: its streak ends.
    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// The replica failed before answering; from its `EJECT_AFTER`th
    /// failure in a row on, each failure ejects it for `EJECT_FOR` from
    /// `now`. True when this failure ejected a replica that was not
    /// ejected (an ejection to count).
    pub fn failed(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.failures < EJECT_AFTER {
            return false;
        }
        let newly = !self.ejected(now);
        self.ejected_until = Some(now + EJECT_FOR);
        newly
    }
}

/// Per-replica bookkeeping that outlives KV updates.
pub struct ReplicaLoad {
    /// Also the replica's `gateway_replica_in_flight` gauge.
    in_flight: Gauge,
    ejections: Counter,
    streak: Mutex<Streak>,
}

impl ReplicaLoad {
    pub fn new(in_flight: Gauge, ejections: Counter) -> Self {
        Self {
            in_flight,
            ejections,
            streak: Mutex::new(Streak::default()),
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    pub fn ejected(&self, now: Instant) -> bool {
        lock(&self.streak).ejected(now)
    }

    /// The replica answered: its failure streak ends.
    pub fn succeeded(&self) {
        lock(&self.streak).succeeded();
    }

    /// The replica failed before answering; ejects it after a streak.
    pub fn failed(&self) {
        if lock(&self.streak).failed(Instant::now()) {
            self.ejections.inc();
        }
    }
}

/// A ready replica chosen for a request.
pub struct Candidate {
    pub replica_id: String,
    pub cluster: String,
    /// Where the request is sent: the replica's own address, or its
    /// cluster's edge (which forwards to the replica named in
    /// [`PIN_HEADER`]).
    pub endpoint: String,
    pub load: Arc<ReplicaLoad>,
}

/// The request header naming the replica a cluster edge should forward
/// to, and the response header naming the replica that answered.
pub const PIN_HEADER: &str = "x-flotilla-replica";
/// The response header naming the cluster that answered.
pub const CLUSTER_HEADER: &str = "x-flotilla-cluster";

/// Which replicas this gateway routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The global gateway: every cluster's, through the cluster's edge
    /// when it has one.
    Fleet,
    /// A cluster edge: only this cluster's, at their own addresses.
    Cluster(String),
}

/// What the global gateway knows of the fleet beyond the replicas: each
/// cluster's health, labels and edge, and each deployment's residency
/// rule.
pub struct FleetView {
    pub clusters: RecordStore<ClusterRecord>,
    pub deployments: RecordStore<ModelDeployment>,
}

/// Why a cluster's replicas are not routed to, or where to send to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// At the replica's own address.
    Direct,
    /// Through the cluster's edge at this base URL.
    Edge(String),
    /// The cluster is known dead (unhealthy or gone): nothing is sent.
    ClusterDown,
    /// The replica's deployment may not be served there; the rule.
    OutsideResidency(String),
}

/// How the global gateway reaches a replica of `deployment` in `cluster`
/// (`None`: no record of it). A dead cluster is skipped without a try, so
/// a cut one costs no connect timeout; a residency rule is a hard limit,
/// even on failover; a cluster with an edge is reached only through it.
pub fn route(cluster: Option<&ClusterRecord>, deployment: Option<&ModelDeployment>) -> Route {
    let labels = cluster
        .and_then(|c| c.inventory.as_ref())
        .map(|i| i.labels.clone())
        .unwrap_or_default();
    if let Some(spec) = deployment.and_then(|d| d.spec.as_ref())
        && let Some(rule) = flotilla_deployment_spec::residency_rule_text(spec)
        && (cluster.is_none()
            || !flotilla_deployment_spec::residency_allows(spec, &labels).unwrap_or(false))
    {
        return Route::OutsideResidency(rule);
    }
    let Some(cluster) = cluster else {
        return Route::Direct;
    };
    if matches!(
        cluster.health(),
        ClusterHealth::Unhealthy | ClusterHealth::Left
    ) {
        return Route::ClusterDown;
    }
    match cluster.inventory.as_ref().map(|i| i.edge_url.as_str()) {
        Some(edge) if !edge.is_empty() => Route::Edge(edge.to_string()),
        _ => Route::Direct,
    }
}

/// Counts a request in flight on a replica until dropped.
pub struct InFlight(Arc<ReplicaLoad>);

impl InFlight {
    pub fn start(load: &Arc<ReplicaLoad>) -> Self {
        load.in_flight.inc();
        Self(Arc::clone(load))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

pub struct ReplicaTable {
    replicas: RecordStore<ReplicaStatus>,
    region: String,
    scope: Scope,
    /// The global gateway's; an edge has none (and no permission to read
    /// the buckets it comes from).
    fleet: Option<FleetView>,
    load: Mutex<HashMap<String, Arc<ReplicaLoad>>>,
    metrics: Arc<GatewayMetrics>,
}

impl ReplicaTable {
    pub fn new(
        replicas: RecordStore<ReplicaStatus>,
        region: String,
        metrics: Arc<GatewayMetrics>,
    ) -> Self {
        Self {
            replicas,
            region,
            scope: Scope::Fleet,
            fleet: None,
            load: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Routes only to `scope`'s replicas.
    pub fn scoped(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// Routes with the fleet's clusters and deployments in view.
    pub fn with_fleet(mut self, fleet: FleetView) -> Self {
        self.fleet = Some(fleet);
        self
    }

    fn in_scope(&self, replica: &ReplicaStatus) -> bool {
        match &self.scope {
            Scope::Fleet => true,
            Scope::Cluster(cluster) => &replica.cluster == cluster,
        }
    }

    fn route_of(&self, replica: &ReplicaStatus) -> Route {
        let Some(fleet) = &self.fleet else {
            return Route::Direct;
        };
        route(
            fleet.clusters.cached(&replica.cluster).as_ref(),
            fleet.deployments.cached(&replica.deployment).as_ref(),
        )
    }

    /// The residency rules that kept ready replicas of `model` from being
    /// candidates, and the rules of the deployments that serve it; for an
    /// answer that says why nothing could serve.
    pub fn residency_rules(&self, model: &str) -> Vec<String> {
        let Some(fleet) = &self.fleet else {
            return Vec::new();
        };
        let mut rules: Vec<String> = self
            .replicas
            .select(|_, r| r.model == model)
            .into_iter()
            .filter_map(|(_, r)| {
                let deployment = fleet.deployments.cached(&r.deployment)?;
                let rule =
                    flotilla_deployment_spec::residency_rule_text(deployment.spec.as_ref()?)?;
                Some(format!("deployment {}: {rule}", r.deployment))
            })
            .collect();
        rules.sort();
        rules.dedup();
        rules
    }

    fn load_of(&self, replica: &ReplicaStatus) -> Arc<ReplicaLoad> {
        let mut loads = lock(&self.load);
        let load = loads.entry(replica.replica_id.clone()).or_insert_with(|| {
            let labels = ReplicaLabels {
                model: replica.model.clone(),
                cluster: replica.cluster.clone(),
                replica: replica.replica_id.clone(),
            };
            Arc::new(ReplicaLoad::new(
                self.metrics.in_flight.get_or_create(&labels).clone(),
                self.metrics.ejections.get_or_create(&labels).clone(),
            ))
        });
        Arc::clone(load)
    }

    /// Ready, not ejected replicas of `model` in scope, best first (see
    /// [`rank`]), the `pinned` replica first when it is one of them (an
    /// edge forwarding the global gateway's choice).
    pub fn candidates(&self, model: &str, pinned: Option<&str>) -> Vec<Candidate> {
        let now = Instant::now();
        let ready: Vec<(ReplicaStatus, Arc<ReplicaLoad>)> = self
            .replicas
            .select(|_, r| serves(r, model) && self.in_scope(r))
            .into_iter()
            .filter_map(|(_, mut r)| {
                match self.route_of(&r) {
                    Route::Direct => {}
                    Route::Edge(edge) => r.endpoint = edge,
                    Route::ClusterDown | Route::OutsideResidency(_) => return None,
                }
                let load = self.load_of(&r);
                Some((r, load))
            })
            .collect();
        let standings: Vec<Standing<'_>> = ready
            .iter()
            .map(|(r, load)| Standing {
                replica_id: &r.replica_id,
                region: &r.region,
                in_flight: load.in_flight(),
                ejected: load.ejected(now),
            })
            .collect();
        let mut order = rank(&self.region, &standings);
        if let Some(pinned) = pinned
            && let Some(at) = order
                .iter()
                .position(|&i| standings[i].replica_id == pinned)
        {
            let first = order.remove(at);
            order.insert(0, first);
        }
        let mut ready: Vec<Option<(ReplicaStatus, Arc<ReplicaLoad>)>> =
            ready.into_iter().map(Some).collect();
        order
            .into_iter()
            .filter_map(|i| ready.get_mut(i).and_then(Option::take))
            .map(|(r, load)| Candidate {
                replica_id: r.replica_id,
                cluster: r.cluster,
                endpoint: r.endpoint,
                load,
            })
            .collect()
    }

    /// [`Self::candidates`] other than the replicas in `tried`; when there
    /// are none, waits for one to become ready (the fleet re-places a dead
    /// cluster's replicas within seconds) until `deadline`.
    pub async fn candidates_within(
        &self,
        model: &str,
        tried: &[String],
        deadline: tokio::time::Instant,
    ) -> Vec<Candidate> {
        // An ejection runs out without a record changing: look again now
        // and then as well as on every change.
        const RECHECK: Duration = Duration::from_millis(500);
        let mut changes = self.replicas.changes();
        loop {
            let found: Vec<Candidate> = self
                .candidates(model, None)
                .into_iter()
                .filter(|c| !tried.contains(&c.replica_id))
                .collect();
            if !found.is_empty() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            let next = deadline.min(tokio::time::Instant::now() + RECHECK);
            tokio::select! {
                changed = changes.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = changed {
                        tokio::time::sleep_until(next).await;
                    }
                }
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// Names of the models with a ready replica in scope, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .replicas
            .select(|_, r| r.phase() == ReplicaPhase::Ready && self.in_scope(r))
            .into_iter()
            .map(|(_, r)| r.model)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing<'a>(replica_id: &'a str, region: &'a str, in_flight: i64) -> Standing<'a> {
        Standing {
            replica_id,
            region,
            in_flight,
            ejected: false,
        }
    }

    #[test]
    fn replicas_are_tried_own_region_first_then_least_busy() {
        let ejected = |s: Standing<'static>| Standing { ejected: true, ..s };
        // (what, gateway region, replicas, expected order of ids)
        let cases: Vec<(&str, &str, Vec<Standing<'static>>, Vec<&str>)> = vec![
            ("none", "eu", vec![], vec![]),
            (
                "fewest in flight first",
                "",
                vec![
                    standing("a", "eu", 3),
                    standing("b", "eu", 1),
                    standing("c", "us", 2),
                ],
                vec!["b", "c", "a"],
            ),
            (
                "own region first, however busy",
                "eu",
                vec![
                    standing("a", "us", 0),
                    standing("b", "eu", 9),
                    standing("c", "eu", 4),
                ],
                vec!["c", "b", "a"],
            ),
            (
                "without a region, regions do not matter",
                "",
                vec![standing("a", "us", 0), standing("b", "eu", 9)],
                vec!["a", "b"],
            ),
            (
                "a replica without a region is elsewhere",
                "eu",
                vec![standing("a", "", 0), standing("b", "eu", 1)],
                vec!["b", "a"],
            ),
            (
                "ties go by replica id",
                "eu",
                vec![
                    standing("c", "eu", 1),
                    standing("a", "eu", 1),
                    standing("b", "eu", 1),
                ],
                vec!["a", "b", "c"],
            ),
            (
                "ejected replicas are left out",
                "eu",
                vec![ejected(standing("a", "eu", 0)), standing("b", "us", 5)],
                vec!["b"],
            ),
            (
                "all ejected",
                "eu",
                vec![
                    ejected(standing("a", "eu", 0)),
                    ejected(standing("b", "eu", 0)),
                ],
                vec![],
            ),
        ];
        for (what, region, replicas, expected) in cases {
            let order: Vec<&str> = rank(region, &replicas)
                .into_iter()
                .map(|i| replicas[i].replica_id)
                .collect();
            assert_eq!(order, expected, "{what}");
        }
    }

    #[test]
    fn the_global_gateway_reaches_a_replica_through_its_clusters_edge_and_never_outside_residency()
    {
        use flotilla_proto::v1::{
            ClusterInventory, LabelSelector, ModelDeploymentSpec, ResidencySpec,
        };
        let cluster = |region: &str, health: ClusterHealth, edge: &str| ClusterRecord {
            name: "c".into(),
            health: health.into(),
            inventory: Some(ClusterInventory {
                labels: [("region".to_string(), region.to_string())].into(),
                edge_url: edge.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let eu_only = ModelDeployment {
            spec: Some(ModelDeploymentSpec {
                residency: Some(ResidencySpec {
                    cluster_selector: Some(LabelSelector {
                        match_labels: [("region".to_string(), "eu".to_string())].into(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let anywhere = ModelDeployment {
            spec: Some(ModelDeploymentSpec::default()),
            ..Default::default()
        };
        let healthy = ClusterHealth::Healthy;
        let rule = "residency: clusters with region=eu".to_string();
        let edge = "https://10.0.0.2:8443";
        let cases: Vec<(&str, Option<ClusterRecord>, Option<&ModelDeployment>, Route)> = vec![
            (
                "no edge",
                Some(cluster("eu", healthy, "")),
                Some(&anywhere),
                Route::Direct,
            ),
            (
                "an edge",
                Some(cluster("us", healthy, edge)),
                Some(&anywhere),
                Route::Edge(edge.into()),
            ),
            (
                "no record of the cluster",
                None,
                Some(&anywhere),
                Route::Direct,
            ),
            (
                "no record of the deployment",
                Some(cluster("us", healthy, "")),
                None,
                Route::Direct,
            ),
            (
                "an unhealthy cluster",
                Some(cluster("us", ClusterHealth::Unhealthy, edge)),
                Some(&anywhere),
                Route::ClusterDown,
            ),
            (
                "a cluster that left",
                Some(cluster("us", ClusterHealth::Left, edge)),
                Some(&anywhere),
                Route::ClusterDown,
            ),
            (
                "degraded still serves",
                Some(cluster("us", ClusterHealth::Degraded, edge)),
                Some(&anywhere),
                Route::Edge(edge.into()),
            ),
            (
                "inside the residency rule",
                Some(cluster("eu", healthy, edge)),
                Some(&eu_only),
                Route::Edge(edge.into()),
            ),
            (
                "outside it",
                Some(cluster("us", healthy, edge)),
                Some(&eu_only),
                Route::OutsideResidency(rule.clone()),
            ),
            (
                "a cluster of unknown labels is outside it",
                None,
                Some(&eu_only),
                Route::OutsideResidency(rule.clone()),
            ),
        ];
        for (what, cluster, deployment, expected) in cases {
            assert_eq!(route(cluster.as_ref(), deployment), expected, "{what}");
        }
    }

    #[test]
    fn only_ready_replicas_of_the_model_with_an_address_serve_it() {
        let ready = ReplicaStatus {
            replica_id: "r".into(),
            model: "smollm2".into(),
            endpoint: "http://10.0.0.1:8000".into(),
            phase: ReplicaPhase::Ready.into(),
            ..Default::default()
        };
        let cases = [
            ("ready", ready.clone(), true),
            (
                "starting",
                ReplicaStatus {
                    phase: ReplicaPhase::Starting.into(),
                    ..ready.clone()
                },
                false,
            ),
            (
                "another model",
                ReplicaStatus {
                    model: "llama".into(),
                    ..ready.clone()
                },
                false,
            ),
            (
                "no address",
                ReplicaStatus {
                    endpoint: String::new(),
                    ..ready.clone()
                },
                false,
            ),
        ];
        for (what, replica, expected) in cases {
            assert_eq!(serves(&replica, "smollm2"), expected, "{what}");
        }
    }

    /// What happens to a streak, at a time after the start.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Fail,
        Succeed,
    }

    /// (what, steps at seconds after the start, ejections counted,
    /// (ejected, at seconds)).
    type StreakCase = (&'static str, Vec<(u64, Step)>, u32, (bool, u64));

    #[test]
    fn three_failures_in_a_row_eject_a_replica_for_a_while() {
        use Step::{Fail, Succeed};
        let s = Duration::from_secs;
        let cases: Vec<StreakCase> = vec![
            ("two failures", vec![(0, Fail), (1, Fail)], 0, (false, 1)),
            ("three", vec![(0, Fail), (1, Fail), (2, Fail)], 1, (true, 2)),
            (
                "ejected for 30 s from the last failure",
                vec![(0, Fail), (1, Fail), (2, Fail)],
                1,
                (false, 32),
            ),
            (
                "a success ends the streak",
                vec![(0, Fail), (1, Fail), (2, Succeed), (3, Fail)],
                0,
                (false, 3),
            ),
            (
                "more failures while ejected extend it, counted once",
                vec![(0, Fail), (1, Fail), (2, Fail), (20, Fail)],
                1,
                (true, 45),
            ),
            (
                "a failure after the ejection ran out ejects again at once",
                vec![(0, Fail), (1, Fail), (2, Fail), (40, Fail)],
                2,
                (true, 41),
            ),
        ];
        let start = Instant::now();
        for (what, steps, ejections, (ejected, at)) in cases {
            let mut streak = Streak::default();
            let mut counted = 0;
            for (t, step) in steps {
                match step {
                    Step::Fail => counted += u32::from(streak.failed(start + s(t))),
                    Step::Succeed => streak.succeeded(),
                }
            }
            assert_eq!(counted, ejections, "{what}: ejections");
            assert_eq!(
                streak.ejected(start + s(at)),
                ejected,
                "{what}: ejected at {at} s"
            );
        }
    }
}
