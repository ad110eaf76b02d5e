//! The pure part of a rollout: from a placement and the replicas that
//! exist, the commands to send now.
//!
//! Replicas of a placement generation get stable ids; a replacement starts
//! before the replica it replaces stops (surge first), and replicas of a
//! superseded generation stop only once the new generation's replicas are
//! all ready, or at once when their cluster is gone (failover skips the
//! wait).

use std::collections::BTreeSet;

use flotilla_proto::v1::{PlacementDecision, ReplicaPhase, ReplicaStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Start {
        cluster: String,
        replica_id: String,
    },
    Stop {
        cluster: String,
        replica_id: String,
        reason: String,
    },
}

/// A DNS-label replica id, stable for (deployment, generation, cluster, k).
pub fn replica_id(deployment: &str, generation: u64, cluster: &str, k: u32) -> String {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{deployment}/{generation}/{cluster}/{k}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let head: String = deployment.chars().take(40).collect();
    format!(
        "{}-g{generation}-{:08x}",
        head.trim_end_matches('-'),
        h as u32
    )
}

/// `live_clusters`: clusters that can still run replicas (not unhealthy,
/// not left).
pub fn plan(
    placement: &PlacementDecision,
    replicas: &[ReplicaStatus],
    live_clusters: &BTreeSet<String>,
) -> Vec<Step> {
    let g = placement.generation;
    let mut steps = Vec::new();
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    let mut new_ready = true;
    for a in &placement.assignments {
        for k in 0..a.replicas {
            let id = replica_id(&placement.deployment, g, &a.cluster, k);
            wanted.insert(id.clone());
            match replicas.iter().find(|r| r.replica_id == id) {
                None => {
                    new_ready = false;
                    steps.push(Step::Start {
                        cluster: a.cluster.clone(),
                        replica_id: id,
                    });
                }
                Some(r) if r.phase() == ReplicaPhase::Ready => {}
                // Failed or stopped: try again.
                Some(r) if matches!(r.phase(), ReplicaPhase::Failed | ReplicaPhase::Stopped) => {
                    new_ready = false;
                    steps.push(Step::Start {
                        cluster: a.cluster.clone(),
                        replica_id: id,
                    });
                }
                Some(_) => new_ready = false,
            }
        }
    }
    for r in replicas {
        if wanted.contains(&r.replica_id) || matches!(r.phase(), ReplicaPhase::Stopped) {
            continue;
        }
        let cluster_gone = !live_clusters.contains(&r.cluster);
        if cluster_gone {
            // Nothing to wait for: its cluster cannot serve it.
            steps.push(Step::Stop {
                cluster: r.cluster.clone(),
                replica_id: r.replica_id.clone(),
                reason: "its cluster is gone".into(),
            });
        } else if new_ready {
            steps.push(Step::Stop {
                cluster: r.cluster.clone(),
                replica_id: r.replica_id.clone(),
                reason: format!("replaced by placement generation {g}"),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::ClusterAssignment;

    fn placement(generation: u64, assignments: &[(&str, u32)]) -> PlacementDecision {
        PlacementDecision {
            deployment: "chat".into(),
            generation,
            assignments: assignments
                .iter()
                .map(|(c, n)| ClusterAssignment {
                    cluster: c.to_string(),
                    replicas: *n,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn replica(id: &str, cluster: &str, phase: ReplicaPhase) -> ReplicaStatus {
        ReplicaStatus {
            replica_id: id.into(),
            cluster: cluster.into(),
            deployment: "chat".into(),
            phase: phase.into(),
            ..Default::default()
        }
    }

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ids_are_stable_dns_labels() {
        let id = replica_id("chat", 3, "eu-west", 1);
        assert_eq!(id, replica_id("chat", 3, "eu-west", 1));
        assert_ne!(id, replica_id("chat", 3, "eu-west", 2));
        assert!(flotilla_proto::check_name("replica", &id).is_ok(), "{id}");
        assert!(
            flotilla_proto::check_name("replica", &replica_id(&"x".repeat(63), 99, "c", 0)).is_ok()
        );
    }

    #[test]
    fn a_new_generation_starts_first_and_stops_the_old_once_ready() {
        let p1 = placement(1, &[("a", 1)]);
        let old = replica(&replica_id("chat", 1, "a", 0), "a", ReplicaPhase::Ready);
        let p2 = placement(2, &[("b", 1)]);
        let new_id = replica_id("chat", 2, "b", 0);
        // Nothing of generation 2 yet: start it, keep the old one.
        assert_eq!(
            plan(&p2, std::slice::from_ref(&old), &live(&["a", "b"])),
            vec![Step::Start {
                cluster: "b".into(),
                replica_id: new_id.clone()
            }]
        );
        // Starting: wait.
        let starting = replica(&new_id, "b", ReplicaPhase::Starting);
        assert!(plan(&p2, &[old.clone(), starting], &live(&["a", "b"])).is_empty());
        // Ready: the old one goes.
        let ready = replica(&new_id, "b", ReplicaPhase::Ready);
        let steps = plan(&p2, &[old.clone(), ready.clone()], &live(&["a", "b"]));
        assert!(
            matches!(&steps[..], [Step::Stop { replica_id, .. }] if *replica_id == old.replica_id)
        );
        // Steady state: nothing to do.
        assert!(plan(&p1, std::slice::from_ref(&old), &live(&["a"])).is_empty());
    }

    #[test]
    fn failover_stops_at_once_and_failed_replicas_are_retried() {
        let p2 = placement(2, &[("b", 1)]);
        let old = replica(&replica_id("chat", 1, "a", 0), "a", ReplicaPhase::Ready);
        let steps = plan(&p2, std::slice::from_ref(&old), &live(&["b"]));
        assert_eq!(steps.len(), 2, "{steps:?}");
        let failed = replica(&replica_id("chat", 2, "b", 0), "b", ReplicaPhase::Failed);
        assert!(matches!(
            &plan(&p2, &[failed], &live(&["b"]))[..],
            [Step::Start { .. }]
        ));
    }
}
