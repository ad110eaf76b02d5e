//! A backend that runs nothing: a replica is "ready" a fixed delay after
//! its start, at an address that serves nothing. It stands in for a
//! member cluster's data plane when the subject of a measurement is the
//! control plane (thousands of clusters in one process, see
//! [`crate::simulate`]); everything above it (commands, KV records,
//! events, fencing, adoption) is the executor's own code.
//!
//! It counts what it was asked to do per replica, so a bench can tell
//! that nothing was started or stopped twice.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_kit::sync;
use flotilla_proto::v1::ReplicaStatus;

use super::{Adoption, BackendError, Observation, ReplicaBackend, ReplicaSpec};

/// Starts and stops asked of one simulated cluster, per replica.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub starts: HashMap<String, u32>,
    pub stops: HashMap<String, u32>,
}

pub struct SimulatedBackend {
    cluster: String,
    ready_after: Duration,
    running: Mutex<HashSet<String>>,
    tally: Mutex<Tally>,
}

impl SimulatedBackend {
    pub fn new(cluster: &str, ready_after: Duration) -> Self {
        Self {
            cluster: cluster.to_string(),
            ready_after,
            running: Mutex::default(),
            tally: Mutex::default(),
        }
    }

    fn endpoint(&self, replica_id: &str) -> String {
        // `.invalid` can never resolve: nothing mistakes it for a server.
        format!("http://{replica_id}.{}.simulated.invalid", self.cluster)
    }

    /// What was started and stopped so far.
    pub fn tally(&self) -> Tally {
        sync::lock(&self.tally).clone()
    }

    /// Replicas running now.
    pub fn running(&self) -> usize {
        sync::lock(&self.running).len()
    }
}

impl ReplicaBackend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<String, BackendError> {
        *sync::lock(&self.tally)
            .starts
            .entry(spec.replica_id.clone())
            .or_default() += 1;
        tokio::time::sleep(self.ready_after).await;
        sync::lock(&self.running).insert(spec.replica_id.clone());
        Ok(self.endpoint(&spec.replica_id))
    }

    async fn stop(&self, replica_id: &str) -> Result<bool, BackendError> {
        let ran = sync::lock(&self.running).remove(replica_id);
        if ran {
            *sync::lock(&self.tally)
                .stops
                .entry(replica_id.to_string())
                .or_default() += 1;
        }
        Ok(ran)
    }

    /// Nothing to fetch: no process will read the model.
    fn fetches_models(&self) -> bool {
        true
    }

    fn serves_http(&self) -> bool {
        false
    }

    fn runs(&self, replica_id: &str) -> bool {
        sync::lock(&self.running).contains(replica_id)
    }

    async fn observe(&self) -> Observation {
        Observation::default()
    }

    async fn adopt(&self, recorded: &ReplicaStatus) -> Adoption {
        if self.runs(&recorded.replica_id) {
            Adoption::Adopted(self.endpoint(&recorded.replica_id))
        } else {
            Adoption::Gone("not running in this simulated cluster".into())
        }
    }

    async fn stop_unknown(&self, known: &HashSet<String>) -> Vec<String> {
        let mut running = sync::lock(&self.running);
        let stray: Vec<String> = running.difference(known).cloned().collect();
        for id in &stray {
            running.remove(id);
        }
        stray
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_replica_is_ready_after_the_delay_and_counted_once_per_start_and_stop() {
        let backend = SimulatedBackend::new("c1", Duration::from_millis(20));
        let spec = ReplicaSpec {
            replica_id: "r1".into(),
            ..Default::default()
        };
        let begun = std::time::Instant::now();
        let endpoint = backend.start(&spec).await.unwrap();
        assert!(begun.elapsed() >= Duration::from_millis(20));
        assert_eq!(endpoint, "http://r1.c1.simulated.invalid");
        assert!(backend.runs("r1"));
        assert!(backend.stop("r1").await.unwrap());
        assert!(
            !backend.stop("r1").await.unwrap(),
            "a second stop stops nothing"
        );
        let tally = backend.tally();
        assert_eq!(tally.starts.get("r1"), Some(&1));
        assert_eq!(tally.stops.get("r1"), Some(&1));
    }

    #[tokio::test]
    async fn adoption_and_strays_follow_what_runs() {
        let backend = SimulatedBackend::new("c1", Duration::ZERO);
        for id in ["a", "b"] {
            let spec = ReplicaSpec {
                replica_id: id.into(),
                ..Default::default()
            };
            backend.start(&spec).await.unwrap();
        }
        let recorded = ReplicaStatus {
            replica_id: "a".into(),
            ..Default::default()
        };
        assert!(matches!(
            backend.adopt(&recorded).await,
            Adoption::Adopted(_)
        ));
        let stray = backend
            .stop_unknown(&HashSet::from(["a".to_string()]))
            .await;
        assert_eq!(stray, vec!["b".to_string()]);
        assert_eq!(backend.running(), 1);
    }
}
