//! Which replica serves a model: the table of ready replicas (a watched
//! copy of KV `replicas`), each one's requests in flight, and ejection of
//! replicas that keep refusing connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_kit::RecordStore;
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{GatewayMetrics, ReplicaLabels};

/// Consecutive connection failures that eject a replica.
const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(30);

/// Per-replica bookkeeping that outlives KV updates.
pub struct ReplicaLoad {
    /// Also the replica's `gateway_replica_in_flight` gauge.
    in_flight: Gauge,
    ejections: Counter,
    /// Consecutive failures, and until when the replica is ejected.
    failures: Mutex<(u32, Option<Instant>)>,
}

impl ReplicaLoad {
    fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    fn ejected(&self, now: Instant) -> bool {
        self.failures
            .lock()
            .map(|f| f.1.is_some_and(|until| until > now))
            .unwrap_or(false)
    }
}

/// A ready replica chosen for a request.
pub struct Candidate {
    pub replica_id: String,
    pub cluster: String,
    pub endpoint: String,
    pub load: Arc<ReplicaLoad>,
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
            load: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn load_of(&self, replica: &ReplicaStatus) -> Arc<ReplicaLoad> {
        let fresh = || {
            let labels = ReplicaLabels {
                model: replica.model.clone(),
                cluster: replica.cluster.clone(),
                replica: replica.replica_id.clone(),
            };
            Arc::new(ReplicaLoad {
                in_flight: self.metrics.in_flight.get_or_create(&labels).clone(),
                ejections: self.metrics.ejections.get_or_create(&labels).clone(),
                failures: Mutex::new((0, None)),
            })
        };
        match self.load.lock() {
            Ok(mut loads) => loads
                .entry(replica.replica_id.clone())
                .or_insert_with(fresh)
                .clone(),
            Err(_) => fresh(),
        }
    }

    /// Ready, not ejected replicas of `model`, best first: own region, then
    /// fewest in flight.
    pub fn candidates(&self, model: &str) -> Vec<Candidate> {
        let now = Instant::now();
        let mut ready: Vec<(bool, i64, Candidate)> = self
            .replicas
            .select(|_, r| {
                r.phase() == ReplicaPhase::Ready && r.model == model && !r.endpoint.is_empty()
            })
            .into_iter()
            .map(|(_, r)| {
                let load = self.load_of(&r);
                let elsewhere = !self.region.is_empty() && r.region != self.region;
                let candidate = Candidate {
                    replica_id: r.replica_id,
                    cluster: r.cluster,
                    endpoint: r.endpoint,
                    load,
                };
                (elsewhere, candidate.load.in_flight(), candidate)
            })
            .filter(|(_, _, c)| !c.load.ejected(now))
            .collect();
        ready.sort_by(|a, b| (a.0, a.1, &a.2.replica_id).cmp(&(b.0, b.1, &b.2.replica_id)));
        ready.into_iter().map(|(_, _, c)| c).collect()
    }

    /// Names of the models with a ready replica, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .replicas
            .select(|_, r| r.phase() == ReplicaPhase::Ready)
            .into_iter()
            .map(|(_, r)| r.model)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The replica answered: its failure streak ends.
    pub fn succeeded(&self, load: &ReplicaLoad) {
        if let Ok(mut f) = load.failures.lock() {
            *f = (0, None);
        }
    }

    /// The replica refused the connection; ejects it after a streak.
    pub fn failed(&self, load: &ReplicaLoad) {
        if let Ok(mut f) = load.failures.lock() {
            f.0 += 1;
            if f.0 >= EJECT_AFTER {
                let now = Instant::now();
                if f.1.is_none_or(|until| until <= now) {
                    load.ejections.inc();
                }
                f.1 = Some(now + EJECT_FOR);
            }
        }
    }
}
