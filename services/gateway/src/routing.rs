//! Which replica serves a model: the table of ready replicas (a watched
//! copy of KV `replicas`), each one's requests in flight, the prefixes
//! each is predicted to hold ([`crate::prefix`]), and ejection of replicas
//! that keep failing before they answer.
//!
//! The decisions are pure: [`serves`] says whether a replica record can
//! take a model's requests, [`decide`] orders the candidates under a
//! [`Policy`] (with [`score`] for cache-aware routing, [`rank`] for
//! least-in-flight), and [`Streak`] counts failures into ejections.
//! [`ReplicaTable`] only gathers what they need.
//!
//! Cache-aware routing scores each replica
//!
//! ```text
//! score = W_PREFIX × matched_fraction − W_LOAD × load − W_REMOTE × elsewhere
//! load  = in_flight + queued + KV_FULL_AS_REQUESTS × kv_cache_usage
//! ```
//!
//! and tries the highest first. `matched_fraction` is the share of the
//! prompt's blocks the replica is predicted to hold (0 to 1); `in_flight`
//! the gateway's own count of requests on it; `queued` and
//! `kv_cache_usage` what the replica last reported through its cluster's
//! heartbeat (the global gateway's fleet view; 0 where unknown);
//! `elsewhere` 1 for a replica outside the gateway's region. With
//! [`W_PREFIX`] 1 and [`W_LOAD`] 0.25, a whole prompt in cache is worth 4
//! requests of load: at equal load the replica holding the prefix wins,
//! and a hot prefix spills over to an idler replica once its holder has
//! more than 4 requests beyond it. [`W_REMOTE`] is larger than any load,
//! so the own region always comes first, as it always has. Ties (a
//! prompt held nowhere, at equal load) go by rendezvous hashing on the
//! prompt's first block ([`rendezvous`]), so new prefixes spread evenly
//! and deterministically over the replicas, and every gateway of the fleet
//! sends the same new prefix to the same replica; prompts too short for a
//! block go by replica id.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use flotilla_kit::RecordStore;
use flotilla_kit::sync::{lock, read, write};
use flotilla_proto::v1::{
    self, ClusterHealth, ClusterRecord, ModelDeployment, ReplicaPhase, ReplicaStatus, RolloutState,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rand::seq::SliceRandom;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::metrics::{GatewayMetrics, ModelLabels, ReplicaLabels};
use crate::prefix::{PrefixIndex, PromptHashes};
use crate::residency::Residency;

/// Weight of the predicted cached share of the prompt (0 to 1).
pub const W_PREFIX: f64 = 1.0;
/// Weight of a request of load: a whole prompt in cache is worth
/// `W_PREFIX / W_LOAD` = 4 requests.
pub const W_LOAD: f64 = 0.25;
/// A replica whose KV cache is full of running requests counts as this
/// many requests more: it will queue or preempt.
pub const KV_FULL_AS_REQUESTS: f64 = 2.0;
/// Penalty of a replica outside the gateway's region: more than any load
/// a gateway sees, so the own region always comes first.
pub const W_REMOTE: f64 = 1.0e6;

/// The default of `--prefix-cache-tokens`: about what the runner's default
/// 1 GiB KV budget holds for SmolLM2-135M.
pub const DEFAULT_PREFIX_CACHE_TOKENS: usize = 20_000;

/// How the gateway orders a model's replicas (`--routing`); see
/// [`decide`]. The variants' docs are the flag's help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    /// Highest score first, score = 1.0 × the share of the prompt the
    /// replica is predicted to hold in its prefix cache − 0.25 × its load
    /// in requests (this gateway's in flight on it, plus the queue it last
    /// reported, plus 2 × its reported KV cache usage): a whole prompt in
    /// cache is worth 4 requests, so a busy holder of a hot prefix spills
    /// over to idler replicas
    #[default]
    CacheAware,
    /// Fewest of this gateway's requests in flight first
    LeastInFlight,
    /// A uniformly random order
    Random,
}

/// Consecutive failures that eject a replica.
const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(30);

/// Whether `replica` can take requests for `model`: ready, serving that
/// model, with an address to send them to.
pub fn serves(replica: &ReplicaStatus, model: &str) -> bool {
    replica.phase() == ReplicaPhase::Ready && replica.model == model && !replica.endpoint.is_empty()
}

/// A replica that [`serves`] the model, as [`decide`] sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing<'a> {
    pub replica_id: &'a str,
    pub region: &'a str,
    /// The gateway's own count of requests on the replica.
    pub in_flight: i64,
    pub ejected: bool,
    /// Requests waiting for the replica's engine, as it last reported; 0
    /// when unknown.
    pub queued: f64,
    /// Share of the replica's KV cache held by running requests (0 to 1),
    /// as it last reported; 0 when unknown.
    pub kv_cache_usage: f64,
}

impl<'a> Standing<'a> {
    /// A replica known only by the gateway's own count.
    pub fn new(replica_id: &'a str, region: &'a str, in_flight: i64) -> Self {
        Self {
            replica_id,
            region,
            in_flight,
            ejected: false,
            queued: 0.0,
            kv_cache_usage: 0.0,
        }
    }
}

fn elsewhere(own_region: &str, s: &Standing<'_>) -> bool {
    !own_region.is_empty() && s.region != own_region
}

/// The order to try `replicas` in, as indices into it: ejected replicas
/// left out; then replicas of `own_region` first (when the gateway has a
/// region), fewest requests in flight, and the replica id so that equal
/// replicas are tried in a stable order. The least-in-flight policy.
pub fn rank(own_region: &str, replicas: &[Standing<'_>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..replicas.len())
        .filter(|&i| !replicas[i].ejected)
        .collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&replicas[a], &replicas[b]);
        let key = |s: &Standing<'_>| (elsewhere(own_region, s), s.in_flight);
        key(a)
            .cmp(&key(b))
            .then_with(|| a.replica_id.cmp(b.replica_id))
    });
    order
}

/// A replica's load in requests (see the module doc). A report that
/// makes no sense (negative, not a number) counts as none.
pub fn load(s: &Standing<'_>) -> f64 {
    let reported = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
    s.in_flight.max(0) as f64
        + reported(s.queued)
        + KV_FULL_AS_REQUESTS * reported(s.kv_cache_usage).min(1.0)
}

/// A replica's cache-aware score: it holds `matched` of the prompt's
/// `prompt_blocks` leading blocks (see the module doc).
pub fn score(own_region: &str, s: &Standing<'_>, matched: usize, prompt_blocks: usize) -> f64 {
    let matched_fraction = if prompt_blocks == 0 {
        0.0
    } else {
        matched.min(prompt_blocks) as f64 / prompt_blocks as f64
    };
    let elsewhere = if elsewhere(own_region, s) { 1.0 } else { 0.0 };
    W_PREFIX * matched_fraction - W_LOAD * load(s) - W_REMOTE * elsewhere
}

/// A replica's weight for a prompt whose first block hashes to `seed`
/// (highest random weight): the highest one wins a tie.
pub fn rendezvous(replica_id: &str, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(replica_id.as_bytes(), seed)
}

/// The order to try `replicas` in for a prompt of `prompt` under
/// `policy`, as indices into it; ejected replicas left out. `index` says
/// which prefixes each replica holds (cache-aware only). The `pinned`
/// replica goes first whatever the policy when it is one of them (an edge
/// forwarding the global gateway's choice).
pub fn decide(
    policy: Policy,
    own_region: &str,
    replicas: &[Standing<'_>],
    prompt: &PromptHashes,
    index: &PrefixIndex,
    pinned: Option<&str>,
) -> Vec<usize> {
    let mut order = match policy {
        Policy::LeastInFlight => rank(own_region, replicas),
        Policy::CacheAware => {
            let mut scored: Vec<(usize, f64)> = replicas
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.ejected)
                .map(|(i, s)| {
                    let matched = index.matched(s.replica_id, prompt.blocks());
                    (i, score(own_region, s, matched, prompt.len()))
                })
                .collect();
            // Scores are finite (see `load`). Equal ones (a prompt held
            // nowhere, equal load) go by rendezvous hashing on the prompt's
            // first block: new prefixes spread over the replicas, the same
            // prefix goes to the same one, and every gateway agrees.
            let first = prompt.blocks().first().copied();
            let tie = |i: usize| first.map_or(0, |seed| rendezvous(replicas[i].replica_id, seed));
            scored.sort_by(|(a, score_a), (b, score_b)| {
                score_b
                    .partial_cmp(score_a)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then_with(|| tie(*b).cmp(&tie(*a)))
                    .then_with(|| replicas[*a].replica_id.cmp(replicas[*b].replica_id))
            });
            scored.into_iter().map(|(i, _)| i).collect()
        }
        Policy::Random => {
            let mut order: Vec<usize> = (0..replicas.len())
                .filter(|&i| !replicas[i].ejected)
                .collect();
            order.shuffle(&mut rand::rng());
            // Stable: the shuffle stands within each side.
            order.sort_by_key(|&i| elsewhere(own_region, &replicas[i]));
            order
        }
    };
    if let Some(pinned) = pinned
        && let Some(at) = order.iter().position(|&i| replicas[i].replica_id == pinned)
    {
        let first = order.remove(at);
        order.insert(0, first);
    }
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
#[derive(Clone)]
pub struct Candidate {
    pub replica_id: String,
    pub deployment: String,
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
    /// Their traffic splits between versions.
    pub rollouts: RecordStore<RolloutState>,
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
    policy: Policy,
    residency: Arc<RwLock<Residency>>,
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
            residency: Arc::new(RwLock::new(Residency::new(
                PrefixIndex::new(DEFAULT_PREFIX_CACHE_TOKENS),
                metrics.prefix_blocks.clone(),
            ))),
            metrics,
            policy: Policy::default(),
        }
    }

    /// Orders replicas by `policy`, assuming each caches
    /// `prefix_cache_tokens` tokens of prompt.
    pub fn routing(mut self, policy: Policy, prefix_cache_tokens: usize) -> Self {
        self.policy = policy;
        self.residency = Arc::new(RwLock::new(Residency::new(
            PrefixIndex::new(prefix_cache_tokens),
            self.metrics.prefix_blocks.clone(),
        )));
        self
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

    /// Orders `candidates` so that a request goes to the version its
    /// deployment's rollout gives it (see `RolloutState.traffic`): the
    /// new template when `draw` (the request's place from 0 to 99, fixed
    /// per session) is below the new version's share, the others
    /// otherwise. The other side's replicas follow, in their order, for
    /// when the chosen side has none that answers. Deployments without a
    /// split keep the order they had.
    pub fn weigh(&self, candidates: Vec<Candidate>, draw: u32) -> Vec<Candidate> {
        let Some(fleet) = &self.fleet else {
            return candidates;
        };
        let mut splits: HashMap<String, Option<v1::TrafficSplit>> = HashMap::new();
        let (mut chosen, mut other) = (Vec::new(), Vec::new());
        for c in candidates {
            let split = splits.entry(c.deployment.clone()).or_insert_with(|| {
                fleet
                    .rollouts
                    .peek(&c.deployment, |s| s.traffic.clone())
                    .flatten()
            });
            let on_chosen_side = split.as_ref().is_none_or(|split| {
                let is_new = flotilla_proto::template_of_replica(&c.replica_id)
                    == Some(split.new_template.as_str());
                is_new == (draw < split.new_percent)
            });
            if on_chosen_side {
                chosen.push(c);
            } else {
                other.push(c);
            }
        }
        chosen.extend(other);
        chosen
    }

    fn in_scope(&self, replica: &ReplicaStatus) -> bool {
        match &self.scope {
            Scope::Fleet => true,
            Scope::Cluster(cluster) => &replica.cluster == cluster,
        }
    }

    /// How to reach `replica`, and what it last reported of its queue
    /// and KV cache (`(queued, kv_cache_usage)`; zeros without the fleet
    /// view).
    fn route_of(&self, replica: &ReplicaStatus) -> (Route, (f64, f64)) {
        let Some(fleet) = &self.fleet else {
            return (Route::Direct, (0.0, 0.0));
        };
        let cluster = fleet.clusters.cached(&replica.cluster);
        let usage = cluster
            .as_ref()
            .and_then(|c| {
                c.replicas
                    .iter()
                    .find(|u| u.replica_id == replica.replica_id)
            })
            .map_or((0.0, 0.0), |u| (u.queued, u.kv_cache_usage));
        let route = route(
            cluster.as_ref(),
            fleet.deployments.cached(&replica.deployment).as_ref(),
        );
        (route, usage)
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

    /// Ready, not ejected replicas of `model` in scope, best first for a
    /// prompt of `prompt` (see [`decide`]), the `pinned` replica first
    /// when it is one of them (an edge forwarding the global gateway's
    /// choice).
    pub fn candidates(
        &self,
        model: &str,
        pinned: Option<&str>,
        prompt: &PromptHashes,
    ) -> Vec<Candidate> {
        let now = Instant::now();
        let ready: Vec<(ReplicaStatus, Arc<ReplicaLoad>, (f64, f64))> = self
            .replicas
            .select(|_, r| serves(r, model) && self.in_scope(r))
            .into_iter()
            .filter_map(|(_, mut r)| {
                let (route, usage) = self.route_of(&r);
                match route {
                    Route::Direct => {}
                    Route::Edge(edge) => r.endpoint = edge,
                    Route::ClusterDown | Route::OutsideResidency(_) => return None,
                }
                let load = self.load_of(&r);
                Some((r, load, usage))
            })
            .collect();
        let standings: Vec<Standing<'_>> = ready
            .iter()
            .map(|(r, load, (queued, kv_cache_usage))| Standing {
                replica_id: &r.replica_id,
                region: &r.region,
                in_flight: load.in_flight(),
                ejected: load.ejected(now),
                queued: *queued,
                kv_cache_usage: *kv_cache_usage,
            })
            .collect();
        let order = decide(
            self.policy,
            &self.region,
            &standings,
            prompt,
            read(&self.residency).index(),
            pinned,
        );
        let mut ready: Vec<Option<(ReplicaStatus, Arc<ReplicaLoad>)>> = ready
            .into_iter()
            .map(|(r, load, _)| Some((r, load)))
            .collect();
        order
            .into_iter()
            .filter_map(|i| ready.get_mut(i).and_then(Option::take))
            .map(|(r, load)| Candidate {
                replica_id: r.replica_id,
                deployment: r.deployment,
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
        prompt: &PromptHashes,
        tried: &[String],
        deadline: tokio::time::Instant,
    ) -> Vec<Candidate> {
        // An ejection runs out without a record changing: look again now
        // and then as well as on every change.
        const RECHECK: Duration = Duration::from_millis(500);
        let mut changes = self.replicas.changes();
        loop {
            let found: Vec<Candidate> = self
                .candidates(model, None, prompt)
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

    /// `replica` (the one that answered) served a prompt of `prompt`: it
    /// is predicted to hold its blocks now, and the model's predicted hit
    /// rate counts what it held before.
    pub fn record_prefix(&self, replica: &str, prompt: &PromptHashes) {
        if prompt.is_empty() {
            return;
        }
        let Some(recorded) = write(&self.residency).record(replica, prompt.blocks()) else {
            return;
        };
        let labels = ModelLabels {
            model: recorded.model,
        };
        self.metrics
            .prefix_matched_blocks
            .get_or_create(&labels)
            .inc_by(recorded.matched as u64);
        self.metrics
            .prefix_prompt_blocks
            .get_or_create(&labels)
            .inc_by(prompt.len() as u64);
    }

    /// Blocks `replica` is predicted to hold.
    pub fn prefix_blocks(&self, replica: &str) -> usize {
        read(&self.residency).blocks(replica)
    }

    /// Keeps the predicted prefixes in step with the replicas' records
    /// until `shutdown`: a replica that restarts, moves or stops being
    /// ready forgets its own. The current records are taken in before
    /// this returns; the future follows their changes.
    pub fn follow_residency(
        &self,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let replicas = self.replicas.clone();
        let residency = Arc::clone(&self.residency);
        // Subscribed before the scan: no change falls between them.
        let mut changes = replicas.changes();
        replicas.scan(|all| write(&residency).observe_all(all));
        async move {
            loop {
                let changed = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = changes.recv() => changed,
                };
                match changed {
                    Ok(key) => {
                        let record = replicas.cached(&key);
                        write(&residency).observe(&key, record.as_ref());
                    }
                    Err(RecvError::Lagged(_)) => {
                        replicas.scan(|all| write(&residency).observe_all(all));
                    }
                    Err(RecvError::Closed) => return,
                }
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
        Standing::new(replica_id, region, in_flight)
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

    /// A prompt of `blocks` whole blocks.
    fn prompt(blocks: usize) -> PromptHashes {
        let text: String = (0..blocks * crate::prefix::BLOCK_BYTES)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        PromptHashes::of(
            "smollm2",
            "/v1/completions",
            &serde_json::json!({"prompt": text}),
        )
    }

    /// An index where each named replica holds that many leading blocks
    /// of `prompt`.
    fn holding(prompt: &PromptHashes, held: &[(&str, usize)]) -> PrefixIndex {
        let mut index = PrefixIndex::new(1_000_000);
        for (replica, blocks) in held {
            index.record(replica, &prompt.blocks()[..*blocks]);
        }
        index
    }

    /// (what, gateway region, replicas, blocks each holds of an 8-block
    /// prompt, pinned, expected order of ids)
    type DecisionCase = (
        &'static str,
        &'static str,
        Vec<Standing<'static>>,
        Vec<(&'static str, usize)>,
        Option<&'static str>,
        Vec<&'static str>,
    );

    #[test]
    fn cache_aware_routing_prefers_the_prefix_holder_unless_it_is_much_busier() {
        let queued = |s: Standing<'static>, queued: f64| Standing { queued, ..s };
        let kv = |s: Standing<'static>, kv_cache_usage: f64| Standing {
            kv_cache_usage,
            ..s
        };
        let ejected = |s: Standing<'static>| Standing { ejected: true, ..s };
        let cases: Vec<DecisionCase> = vec![
            (
                "the prefix wins at equal load",
                "",
                vec![standing("a", "eu", 1), standing("b", "eu", 1)],
                vec![("b", 8)],
                None,
                vec!["b", "a"],
            ),
            (
                "more of the prompt wins",
                "",
                vec![
                    standing("a", "eu", 0),
                    standing("b", "eu", 0),
                    standing("c", "eu", 0),
                ],
                vec![("b", 2), ("c", 6)],
                None,
                vec!["c", "b", "a"],
            ),
            (
                "a holder a few requests busier still wins",
                "",
                vec![standing("a", "eu", 0), standing("b", "eu", 3)],
                vec![("b", 8)],
                None,
                vec!["b", "a"],
            ),
            (
                "a much busier holder loses to an idle replica (spill-over)",
                "",
                vec![standing("a", "eu", 0), standing("b", "eu", 6)],
                vec![("b", 8)],
                None,
                vec!["a", "b"],
            ),
            (
                "the queue a replica reports counts as load",
                "",
                vec![standing("a", "eu", 0), queued(standing("b", "eu", 0), 8.0)],
                vec![("b", 8)],
                None,
                vec!["a", "b"],
            ),
            (
                "a fuller KV cache counts as load",
                "",
                vec![
                    kv(standing("a", "eu", 1), 0.9),
                    kv(standing("b", "eu", 1), 0.1),
                ],
                vec![],
                None,
                vec!["b", "a"],
            ),
            (
                "without a prefix anywhere, fewest in flight",
                "",
                vec![
                    standing("a", "eu", 3),
                    standing("b", "eu", 1),
                    standing("c", "us", 2),
                ],
                vec![],
                None,
                vec!["b", "c", "a"],
            ),
            (
                "own region first, even over an idle holder elsewhere",
                "eu",
                vec![standing("a", "us", 0), standing("b", "eu", 9)],
                vec![("a", 8)],
                None,
                vec!["b", "a"],
            ),
            (
                "elsewhere, the holder first",
                "eu",
                vec![
                    standing("a", "us", 1),
                    standing("b", "us", 1),
                    standing("c", "eu", 40),
                ],
                vec![("b", 8)],
                None,
                vec!["c", "b", "a"],
            ),
            (
                "the pinned replica still first",
                "",
                vec![standing("a", "eu", 5), standing("b", "eu", 0)],
                vec![("b", 8)],
                Some("a"),
                vec!["a", "b"],
            ),
            (
                "a pinned replica that is not a candidate changes nothing",
                "",
                vec![standing("a", "eu", 0), standing("b", "eu", 0)],
                vec![("b", 8)],
                Some("z"),
                vec!["b", "a"],
            ),
            (
                "equal scores in the same order, whatever the input order",
                "",
                vec![
                    standing("c", "eu", 1),
                    standing("a", "eu", 1),
                    standing("b", "eu", 1),
                ],
                vec![("a", 4), ("b", 4), ("c", 4)],
                None,
                vec!["a", "b", "c"],
            ),
            (
                "an equal score is a tie: half the prompt against two requests",
                "",
                vec![standing("b", "eu", 2), standing("a", "eu", 0)],
                vec![("b", 4)],
                None,
                vec!["a", "b"],
            ),
            (
                "an ejected holder is left out",
                "",
                vec![ejected(standing("a", "eu", 0)), standing("b", "eu", 5)],
                vec![("a", 8)],
                None,
                vec!["b"],
            ),
        ];
        let prompt = prompt(8);
        for (what, region, replicas, held, pinned, expected) in cases {
            let index = holding(&prompt, &held);
            let order: Vec<&str> = decide(
                Policy::CacheAware,
                region,
                &replicas,
                &prompt,
                &index,
                pinned,
            )
            .into_iter()
            .map(|i| replicas[i].replica_id)
            .collect();
            assert_eq!(order, expected, "{what}");
        }
    }

    #[test]
    fn new_prefixes_spread_over_idle_replicas_and_each_stays_on_one() {
        let forward = vec![
            standing("a", "eu", 0),
            standing("b", "eu", 0),
            standing("c", "eu", 0),
        ];
        let backward: Vec<Standing<'_>> = forward.iter().rev().copied().collect();
        let index = PrefixIndex::new(1_000_000);
        let first = |replicas: &[Standing<'_>], prompt: &PromptHashes| {
            let order = decide(Policy::CacheAware, "eu", replicas, prompt, &index, None);
            replicas[order[0]].replica_id.to_string()
        };
        let mut wins: HashMap<String, usize> = HashMap::new();
        for n in 0..300 {
            let text = format!("customer {n}: {}", "x".repeat(crate::prefix::BLOCK_BYTES));
            let prompt = PromptHashes::of(
                "smollm2",
                "/v1/completions",
                &serde_json::json!({"prompt": text}),
            );
            let chosen = first(&forward, &prompt);
            assert_eq!(chosen, first(&backward, &prompt), "prompt {n}");
            *wins.entry(chosen).or_default() += 1;
        }
        for id in ["a", "b", "c"] {
            let share = wins.get(id).copied().unwrap_or(0);
            assert!(
                (60..=140).contains(&share),
                "{id} won {share} of 300: {wins:?}"
            );
        }
        // A prompt shorter than a block has no first block: by id.
        let short = PromptHashes::of(
            "smollm2",
            "/v1/completions",
            &serde_json::json!({"prompt": "hi"}),
        );
        assert_eq!(first(&backward, &short), "a");
    }

    #[test]
    fn least_in_flight_ignores_prefixes_and_random_keeps_the_region_first() {
        let prompt = prompt(8);
        let index = holding(&prompt, &[("b", 8)]);
        let replicas = vec![
            standing("a", "eu", 0),
            standing("b", "eu", 1),
            standing("c", "eu", 2),
            standing("d", "us", 0),
            Standing {
                ejected: true,
                ..standing("e", "eu", 0)
            },
        ];
        let ids = |order: Vec<usize>| -> Vec<&str> {
            order.into_iter().map(|i| replicas[i].replica_id).collect()
        };
        let least = decide(
            Policy::LeastInFlight,
            "eu",
            &replicas,
            &prompt,
            &index,
            None,
        );
        assert_eq!(least, rank("eu", &replicas), "today's order exactly");
        assert_eq!(ids(least), ["a", "b", "c", "d"]);
        let pinned = decide(
            Policy::LeastInFlight,
            "eu",
            &replicas,
            &prompt,
            &index,
            Some("c"),
        );
        assert_eq!(ids(pinned), ["c", "a", "b", "d"]);

        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let order = ids(decide(
                Policy::Random,
                "eu",
                &replicas,
                &prompt,
                &index,
                None,
            ));
            assert_eq!(order.len(), 4, "{order:?}");
            assert_eq!(order[3], "d", "own region first: {order:?}");
            let mut own = order[..3].to_vec();
            own.sort_unstable();
            assert_eq!(own, ["a", "b", "c"]);
            firsts.insert(order[0]);
        }
        assert_eq!(
            firsts.len(),
            3,
            "every own-region replica comes first now and then"
        );
    }

    #[test]
    fn two_requests_sharing_a_long_prefix_meet_on_one_replica_unless_routing_ignores_prefixes() {
        use prometheus_client::metrics::family::Family;

        let ready = |id: &str| ReplicaStatus {
            replica_id: id.into(),
            cluster: "eu-1".into(),
            model: "smollm2".into(),
            endpoint: format!("http://{id}:8000"),
            phase: ReplicaPhase::Ready.into(),
            ..Default::default()
        };
        let system: String = (0..4000)
            .map(|i| char::from(b'a' + (i % 23) as u8))
            .collect();
        let ask = |question: &str| {
            PromptHashes::of(
                "smollm2",
                "/v1/chat/completions",
                &serde_json::json!({"messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]}),
            )
        };
        let (first, second) = (ask("What is the refund policy?"), ask("Where is my order?"));
        for (policy, same) in [(Policy::CacheAware, true), (Policy::LeastInFlight, false)] {
            let mut residency = Residency::new(PrefixIndex::new(100_000), Family::default());
            let (a, b) = (ready("a"), ready("b"));
            residency.observe_all([("eu-1.a", &a), ("eu-1.b", &b)]);
            let mut in_flight = [0, 0];
            let mut route = |prompt: &PromptHashes, residency: &mut Residency| {
                let standings = [
                    standing("a", "eu", in_flight[0]),
                    standing("b", "eu", in_flight[1]),
                ];
                let chosen = decide(policy, "eu", &standings, prompt, residency.index(), None)[0];
                // Still in flight when the next request comes.
                in_flight[chosen] += 1;
                residency.record(standings[chosen].replica_id, prompt.blocks());
                standings[chosen].replica_id
            };
            let to_first = route(&first, &mut residency);
            let to_second = route(&second, &mut residency);
            assert_eq!(
                to_first == to_second,
                same,
                "{policy:?}: {to_first}, {to_second}"
            );
        }
    }

    #[test]
    fn a_score_is_the_weighted_prefix_share_less_load_and_distance() {
        let s = Standing {
            queued: 2.0,
            kv_cache_usage: 0.5,
            ..standing("a", "eu", 1)
        };
        // load = 1 + 2 + 2 × 0.5 = 4 requests.
        assert_eq!(load(&s), 4.0);
        assert_eq!(score("eu", &s, 8, 8), W_PREFIX - 4.0 * W_LOAD);
        assert_eq!(score("eu", &s, 2, 8), 0.25 * W_PREFIX - 4.0 * W_LOAD);
        assert_eq!(score("us", &s, 0, 0), -4.0 * W_LOAD - W_REMOTE);
        let nonsense = Standing {
            queued: f64::NAN,
            kv_cache_usage: -3.0,
            ..standing("a", "eu", -2)
        };
        assert_eq!(load(&nonsense), 0.0);
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
