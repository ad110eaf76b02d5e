//! The prefix index kept in step with the replicas' lives: a replica's
//! predicted blocks last as long as the runner process that holds them.
//!
//! A replica's residency is forgotten when its record leaves Ready, is
//! deleted, changes endpoint, or counts another restart (a restarted
//! runner starts with an empty cache). Only ready replicas are recorded
//! into, so the index never holds a replica the table no longer knows.
//!
//! Pure: [`Residency::observe`] is fed each changed record by the
//! routing table's watch of KV `replicas`.

use std::collections::HashMap;

use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::ReplicaLabels;
use crate::prefix::PrefixIndex;

/// What a replica's cache belongs to: one runner process at one address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Incarnation {
    /// Its key in KV `replicas`.
    key: String,
    model: String,
    cluster: String,
    endpoint: String,
    restarts: u32,
}

impl Incarnation {
    /// The incarnation of a ready replica; None for any other.
    fn of(key: &str, replica: &ReplicaStatus) -> Option<Self> {
        (replica.phase() == ReplicaPhase::Ready && !replica.endpoint.is_empty()).then(|| Self {
            key: key.to_string(),
            model: replica.model.clone(),
            cluster: replica.cluster.clone(),
            endpoint: replica.endpoint.clone(),
            restarts: replica.restarts,
        })
    }

    fn labels(&self, replica_id: &str) -> ReplicaLabels {
        ReplicaLabels {
            model: self.model.clone(),
            cluster: self.cluster.clone(),
            replica: replica_id.to_string(),
        }
    }
}

/// What recording a served prompt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The replica's model.
    pub model: String,
    /// Leading blocks of the prompt the replica was predicted to hold
    /// before it served it.
    pub matched: usize,
}

/// The prefix index of the ready replicas, with each one's
/// `gateway_prefix_blocks` gauge.
pub struct Residency {
    index: PrefixIndex,
    /// By replica id.
    ready: HashMap<String, Incarnation>,
    blocks: Family<ReplicaLabels, Gauge>,
}

impl Residency {
    pub fn new(index: PrefixIndex, blocks: Family<ReplicaLabels, Gauge>) -> Self {
        Self {
            index,
            ready: HashMap::new(),
            blocks,
        }
    }

    pub fn index(&self) -> &PrefixIndex {
        &self.index
    }

    /// Blocks `replica` is predicted to hold.
    pub fn blocks(&self, replica: &str) -> usize {
        self.index.blocks(replica)
    }

    /// The record under `key` in KV `replicas` is now `record` (None:
    /// deleted).
    pub fn observe(&mut self, key: &str, record: Option<&ReplicaStatus>) {
        // A record under a key names the same replica for its life; a
        // deleted one is found by its key.
        let id = match record {
            Some(r) => Some(r.replica_id.clone()),
            None => self
                .ready
                .iter()
                .find(|(_, i)| i.key == key)
                .map(|(id, _)| id.clone()),
        };
        let Some(id) = id else {
            return;
        };
        let now = record.and_then(|r| Incarnation::of(key, r));
        if self.ready.get(&id) == now.as_ref() {
            return;
        }
        self.forget(&id);
        if let Some(now) = now {
            self.ready.insert(id, now);
        }
    }

    /// Every record as it is now (after the change feed lagged): replicas
    /// not among them are forgotten.
    pub fn observe_all<'k, 'r>(
        &mut self,
        records: impl IntoIterator<Item = (&'k str, &'r ReplicaStatus)>,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (key, record) in records {
            self.observe(key, Some(record));
            seen.insert(record.replica_id.clone());
        }
        let gone: Vec<String> = self
            .ready
            .keys()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.forget(&id);
        }
    }

    fn forget(&mut self, replica: &str) {
        self.index.forget(replica);
        if let Some(was) = self.ready.remove(replica) {
            self.blocks.remove(&was.labels(replica));
        }
    }

    /// `replica` served a prompt of `hashes`: it is predicted to hold
    /// them now. None when the replica is not a ready one (it is not
    /// recorded).
    pub fn record(&mut self, replica: &str, hashes: &[u64]) -> Option<Recorded> {
        let incarnation = self.ready.get(replica)?;
        let matched = self.index.matched(replica, hashes);
        self.index.record(replica, hashes);
        let held = i64::try_from(self.index.blocks(replica)).unwrap_or(i64::MAX);
        self.blocks
            .get_or_create(&incarnation.labels(replica))
            .set(held);
        Some(Recorded {
            model: incarnation.model.clone(),
            matched,
        })
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::prefix::{BLOCK_BYTES, BYTES_PER_TOKEN};

    fn ready(id: &str) -> ReplicaStatus {
        ReplicaStatus {
            replica_id: id.into(),
            cluster: "eu-1".into(),
            model: "smollm2".into(),
            endpoint: format!("http://{id}:8000"),
            phase: ReplicaPhase::Ready.into(),
            ..Default::default()
        }
    }

    fn residency() -> (Residency, Family<ReplicaLabels, Gauge>) {
        let gauge = Family::<ReplicaLabels, Gauge>::default();
        let index = PrefixIndex::new(100 * BLOCK_BYTES / BYTES_PER_TOKEN);
        (Residency::new(index, gauge.clone()), gauge)
    }

    const CHAIN: [u64; 3] = [11, 12, 13];

    #[test]
    fn a_replica_forgets_its_prefixes_when_its_runner_is_not_the_same() {
        let r = ready("r1");
        type Change = fn(&mut Option<ReplicaStatus>);
        let cases: Vec<(&str, Change, usize)> = vec![
            (
                "an unrelated change",
                |r| r.as_mut().unwrap().message = "x".into(),
                3,
            ),
            ("a restart", |r| r.as_mut().unwrap().restarts += 1, 0),
            (
                "another endpoint",
                |r| r.as_mut().unwrap().endpoint = "http://elsewhere:8000".into(),
                0,
            ),
            (
                "not ready",
                |r| r.as_mut().unwrap().phase = ReplicaPhase::Starting.into(),
                0,
            ),
            ("deleted", |r| *r = None, 0),
        ];
        for (what, change, left) in cases {
            let (mut residency, _) = residency();
            residency.observe("eu-1.r1", Some(&r));
            residency.observe("eu-1.r2", Some(&ready("r2")));
            residency.record("r1", &CHAIN);
            residency.record("r2", &CHAIN);
            let mut now = Some(r.clone());
            change(&mut now);
            residency.observe("eu-1.r1", now.as_ref());
            assert_eq!(residency.blocks("r1"), left, "{what}");
            assert_eq!(residency.blocks("r2"), 3, "{what}: the other replica");
        }
    }

    #[test]
    fn a_restart_empties_the_replicas_blocks_gauge_and_a_new_runner_starts_afresh() {
        let (mut residency, gauge) = residency();
        let mut registry = Registry::default();
        registry.register("prefix_blocks", "", gauge);
        let exposed = |registry: &Registry| {
            let mut text = String::new();
            encode(&mut text, registry).unwrap();
            text
        };
        let mut r = ready("r1");
        residency.observe("eu-1.r1", Some(&r));
        let first = residency.record("r1", &CHAIN).unwrap();
        assert_eq!(first.matched, 0);
        assert_eq!(residency.record("r1", &CHAIN).unwrap().matched, 3);
        assert!(
            exposed(&registry)
                .contains(r#"prefix_blocks{model="smollm2",cluster="eu-1",replica="r1"} 3"#),
            "{}",
            exposed(&registry)
        );
        r.restarts += 1;
        residency.observe("eu-1.r1", Some(&r));
        assert_eq!(residency.blocks("r1"), 0);
        assert!(!exposed(&registry).contains("replica=\"r1\""));
        // Still ready: the new runner is recorded into from empty.
        assert_eq!(residency.record("r1", &CHAIN).unwrap().matched, 0);
    }

    #[test]
    fn only_ready_replicas_are_recorded_and_a_rescan_drops_the_vanished() {
        let (mut residency, _) = residency();
        assert_eq!(residency.record("stranger", &CHAIN), None);
        assert_eq!(residency.blocks("stranger"), 0);
        let (a, b) = (ready("a"), ready("b"));
        residency.observe_all([("c.a", &a), ("c.b", &b)]);
        residency.record("a", &CHAIN);
        residency.record("b", &CHAIN);
        residency.observe_all([("c.b", &b)]);
        assert_eq!(residency.blocks("a"), 0);
        assert_eq!(residency.record("a", &CHAIN), None);
        assert_eq!(residency.blocks("b"), 3);
    }
}
