//! Whose silence is it: the cluster's, or the hub's?
//!
//! A cluster is judged by heartbeats the hub *received*, so anything that
//! stops the hub receiving (the NATS server paused by a GC or a disk stall,
//! the inventory process restarted, its connection lost, its consumer
//! stuck) looks, from the records alone, like every cluster dying at once.
//! Acting on that re-places the whole fleet for nothing. Two rules keep
//! the blame where it belongs, both pure functions of what the hub saw:
//!
//! - **A full window of the hub's own watch.** The hub keeps proving to
//!   itself that the bus answers (a round trip every check); a cluster's
//!   silence counts only from the later of its last heartbeat and the
//!   start of the hub's current unbroken watch ([`HubWatch`]). While the
//!   hub is not watching (a round trip failed or is overdue) nothing is
//!   judged at all.
//! - **The hub's own pulse.** With two or more live clusters, the hub
//!   hears someone all the time; a stretch in which it heard nobody for
//!   half the unhealthy window (the heartbeat stream stalled while the
//!   server still answers round trips, as in a stream leader election
//!   after a server of three is lost) is the hub's gap, not theirs. The
//!   pulse is a second watch fed by heartbeat arrivals: silences count
//!   only from the start of its current unbroken stretch, so clusters
//!   whose next heartbeat is still on its way when the stream resumes are
//!   not blamed for the stall; while it is broken nothing live is judged.
//! - **Mass silence is the hub's.** When every live cluster (two or more)
//!   would turn unhealthy at the same moment, the likelier story is one
//!   failure on the hub's side, not many on theirs: like Kubernetes' node
//!   lifecycle controller in a fully disrupted zone, the detector holds
//!   and says so. One cluster dying, or most of them, is still acted on.
//!
//! The price: a fleet whose every cluster really dies at once is not
//! marked unhealthy (there is nowhere to fail over to anyway, and the
//! gateway stops routing to replicas that do not answer).

use std::collections::HashMap;

use flotilla_proto::v1::{ClusterHealth, ClusterRecord};

use crate::lifecycle::{HealthPolicy, on_tick};

/// Fewest live clusters for "all of them silent at once" to mean the hub.
const MASS_SILENCE_MIN_CLUSTERS: usize = 2;

/// The hub's own view of the bus, from its round trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubWatch {
    since_ms: Option<i64>,
    last_ok_ms: Option<i64>,
    gap_ms: i64,
}

impl HubWatch {
    /// A watch in which two successful round trips further apart than
    /// `gap_ms` (or a failed one between them) break the window.
    pub fn new(gap_ms: i64) -> Self {
        Self {
            since_ms: None,
            last_ok_ms: None,
            gap_ms,
        }
    }

    /// The gap that breaks a watch under `policy`: half the unhealthy
    /// window, so that a stall the hub cannot see yet (it lasts at most
    /// this long before a round trip is overdue) plus a heartbeat period
    /// stays inside the window.
    pub fn gap_for(policy: &HealthPolicy) -> i64 {
        (policy.unhealthy_after_ms / 2).max(1)
    }

    /// A round trip sent at `sent_ms` ended at `at_ms`; `ok` when the
    /// server answered in time. The watch is unbroken when it was sent
    /// within the gap after the last answer: a slow answer on a busy
    /// machine proves the server was there, so only a failed round trip or
    /// a pause in asking breaks it.
    pub fn observe(&mut self, ok: bool, sent_ms: i64, at_ms: i64) {
        if !ok {
            self.since_ms = None;
            return;
        }
        let unbroken = self.since_ms.is_some()
            && self
                .last_ok_ms
                .is_some_and(|last| sent_ms - last <= self.gap_ms);
        if !unbroken {
            self.since_ms = Some(at_ms);
        }
        self.last_ok_ms = Some(at_ms);
    }

    /// Since when the hub has watched without a break, if it is watching
    /// at `now_ms` (its last round trip answered within the gap).
    pub fn watching_since(&self, now_ms: i64) -> Option<i64> {
        match (self.since_ms, self.last_ok_ms) {
            (Some(since), Some(last)) if now_ms - last <= self.gap_ms => Some(since),
            _ => None,
        }
    }
}

/// Why the detector judged nobody this time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The hub's own view of the bus has a gap now.
    NotWatching,
    /// Every one of this many live clusters fell silent together.
    AllSilent { clusters: usize },
    /// No heartbeat from any of this many live clusters for half the
    /// window, while the server answers.
    NoPulse { clusters: usize },
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::NotWatching => write!(
                f,
                "the NATS server does not answer the inventory's round trips: silences are not judged until it does"
            ),
            Hold::AllSilent { clusters } => write!(
                f,
                "all {clusters} live clusters fell silent at once: taken as the hub's trouble, not theirs; nothing is marked unhealthy until heartbeats resume"
            ),
            Hold::NoPulse { clusters } => write!(
                f,
                "no heartbeat from any of {clusters} live clusters for half the unhealthy window while the server answers (the heartbeat stream stalled): nothing live is marked unhealthy until heartbeats flow again"
            ),
        }
    }
}

/// What to do on one check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Judgement {
    /// Clusters whose record changes by [`on_tick`] now.
    pub due: Vec<String>,
    /// Set when silences that would turn clusters unhealthy are held.
    pub held: Option<Hold>,
    /// Since when silences were counted (the later of the two watches;
    /// the round trips' alone for a fleet of one).
    pub since_ms: Option<i64>,
}

/// Judges every record's silence at `now_ms`, given since when the hub has
/// watched by round trips (`None`: it is not watching now) and by the
/// pulse of heartbeats (`None`: broken now), and when this instance last
/// heard each cluster (newer than its record when the write was coalesced).
pub fn judge(
    records: &mut dyn Iterator<Item = (&str, &ClusterRecord)>,
    heard: &HashMap<String, i64>,
    watching_since_ms: Option<i64>,
    pulse_since_ms: Option<i64>,
    now_ms: i64,
    policy: &HealthPolicy,
) -> Judgement {
    let Some(watching_since) = watching_since_ms else {
        return Judgement {
            due: Vec::new(),
            held: Some(Hold::NotWatching),
            since_ms: None,
        };
    };
    let records: Vec<(&str, &ClusterRecord)> = records.collect();
    let is_live = |record: &ClusterRecord| {
        matches!(
            record.health(),
            ClusterHealth::Healthy | ClusterHealth::Degraded
        )
    };
    let live = records.iter().filter(|(_, r)| is_live(r)).count();
    // A fleet of one has no pulse but its own heartbeats.
    let (since, no_pulse) = if live >= MASS_SILENCE_MIN_CLUSTERS {
        match pulse_since_ms {
            Some(pulse) => (watching_since.max(pulse), false),
            None => (watching_since, true),
        }
    } else {
        (watching_since, false)
    };
    let mut failing = Vec::new();
    let mut leaving = Vec::new();
    for (name, record) in records {
        let is_live = is_live(record);
        // Heard since the record was last written: silent only since then.
        let since = heard.get(name).map_or(since, |at| since.max(*at));
        if on_tick(record, now_ms, since, policy).is_some() {
            if is_live {
                failing.push(name.to_string());
            } else {
                leaving.push(name.to_string());
            }
        }
    }
    let mut judgement = Judgement {
        due: leaving,
        held: None,
        since_ms: Some(since),
    };
    if no_pulse {
        judgement.held = Some(Hold::NoPulse { clusters: live });
    } else if !failing.is_empty() && live >= MASS_SILENCE_MIN_CLUSTERS && failing.len() == live {
        judgement.held = Some(Hold::AllSilent { clusters: live });
    } else {
        judgement.due.extend(failing);
    }
    judgement.due.sort();
    judgement
}

#[cfg(test)]
mod tests;
