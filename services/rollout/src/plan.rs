//! The pure part of a rollout: from a placement, the replicas that exist and
//! how far the rollout has got, the commands to send now.
//!
//! A replica's id names its deployment, its *template* (a digest of the
//! spec's model, runtime and resources), its cluster and its index there.
//! A new placement generation that only moves or adds replicas (failover,
//! scaling, rebalancing) keeps every replica whose id it still wants; only
//! a new template replaces replicas, within the strategy's limits:
//!
//! - at most `desired + max_surge` replicas alive at once, and
//! - at least `desired - max_unavailable` ready before an old one stops,
//!
//! and only on the clusters of the stages reached so far (`active`). Lost
//! capacity (a dead cluster, a missing replica) is replaced at once on any
//! cluster: failover skips the gates.

use std::collections::{BTreeSet, HashMap};

use flotilla_proto::v1::{PlacementDecision, ReplicaPhase, ReplicaStatus};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Start {
        cluster: String,
        replica_id: String,
        /// Fixed per attempt, so repeated reconciles send it once.
        command_id: String,
        /// When the ended record this start replaces was written (0: none);
        /// the executor refuses the start once the replica has ended since.
        replaces_updated_at_unix_ms: i64,
    },
    Stop {
        cluster: String,
        replica_id: String,
        command_id: String,
        reason: String,
    },
}

/// How far a template change may go at once; never both zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_surge: u32,
    pub max_unavailable: u32,
}

impl Limits {
    pub fn new(max_surge: u32, max_unavailable: u32) -> Self {
        // Both zero could never make progress; Kubernetes refuses it, a
        // rollout surges by one instead.
        Self {
            max_surge: if max_surge == 0 && max_unavailable == 0 {
                1
            } else {
                max_surge
            },
            max_unavailable,
        }
    }
}

pub struct Inputs<'a> {
    pub deployment: &'a str,
    pub template: &'a str,
    pub placement: &'a PlacementDecision,
    pub replicas: &'a [ReplicaStatus],
    /// Clusters that can still run replicas (not unhealthy, not left).
    pub live: &'a BTreeSet<String>,
    pub limits: Limits,
    /// Clusters of the stages reached so far; `None`: every cluster.
    pub active: Option<&'a BTreeSet<String>>,
    /// A halted rollout starts nothing and retries nothing; it only stops
    /// replicas whose cluster is gone.
    pub halted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Every wanted replica on the active clusters is ready and no other
    /// replica is left there.
    pub active_done: bool,
    /// Wanted replicas that are failed now, as `<replica-id>@<failed-at>`.
    pub failures: Vec<String>,
    pub desired: u32,
    pub ready: u32,
}

fn fnv(bytes: impl IntoIterator<Item = u8>) -> u64 {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The template digest of encoded spec parts (8 hex digits).
pub fn template_digest(parts: &[&[u8]]) -> String {
    let mut bytes = Vec::new();
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    format!("{:08x}", fnv(bytes) as u32)
}

/// A DNS-label replica id, stable for (deployment, template, cluster, k):
/// `<deployment>-<template>-<hash>`.
pub fn replica_id(deployment: &str, template: &str, cluster: &str, k: u32) -> String {
    let h = fnv(format!("{deployment}/{template}/{cluster}/{k}").bytes());
    let head: String = deployment.chars().take(40).collect();
    format!(
        "{}-{}-{:08x}",
        head.trim_end_matches('-'),
        template.chars().take(8).collect::<String>(),
        h as u32
    )
}

/// The template part of an id [`replica_id`] made.
pub fn template_of(replica_id: &str) -> Option<&str> {
    flotilla_proto::template_of_replica(replica_id)
}

fn alive(phase: ReplicaPhase) -> bool {
    !matches!(
        phase,
        ReplicaPhase::Failed | ReplicaPhase::Stopping | ReplicaPhase::Stopped
    )
}

pub fn plan(input: &Inputs<'_>) -> Plan {
    let p = input.placement;
    let is_active = |cluster: &str| input.active.is_none_or(|a| a.contains(cluster));
    let by_id: HashMap<&str, &ReplicaStatus> = input
        .replicas
        .iter()
        .map(|r| (r.replica_id.as_str(), r))
        .collect();

    let mut wanted: Vec<(String, String)> = Vec::new();
    for a in &p.assignments {
        for k in 0..a.replicas {
            let id = replica_id(input.deployment, input.template, &a.cluster, k);
            wanted.push((a.cluster.clone(), id));
        }
    }
    let wanted_ids: BTreeSet<&str> = wanted.iter().map(|(_, id)| id.as_str()).collect();
    let desired = wanted.len() as u32;

    let mut out = Plan {
        desired,
        ..Plan::default()
    };
    let (mut new_alive, mut new_ready) = (0u32, 0u32);
    let mut to_start: Vec<(&str, &str, String, i64)> = Vec::new();
    for (cluster, id) in &wanted {
        match by_id.get(id.as_str()) {
            None => {
                if input.live.contains(cluster) {
                    to_start.push((cluster, id, format!("{id}-start-p{}", p.generation), 0));
                }
            }
            Some(r) => {
                let phase = r.phase();
                if phase == ReplicaPhase::Failed {
                    out.failures.push(format!("{id}@{}", r.updated_at_unix_ms));
                }
                if alive(phase) {
                    new_alive += 1;
                    new_ready += u32::from(phase == ReplicaPhase::Ready);
                } else if input.live.contains(cluster) {
                    to_start.push((
                        cluster,
                        id,
                        format!("{id}-start-{}", r.updated_at_unix_ms),
                        r.updated_at_unix_ms,
                    ));
                }
            }
        }
    }

    let obsolete: Vec<&ReplicaStatus> = input
        .replicas
        .iter()
        .filter(|r| {
            !wanted_ids.contains(r.replica_id.as_str())
                && !matches!(r.phase(), ReplicaPhase::Stopped | ReplicaPhase::Stopping)
        })
        .collect();
    let serving = |r: &&&ReplicaStatus| input.live.contains(&r.cluster) && alive(r.phase());
    let old_alive = obsolete.iter().filter(serving).count() as u32;
    let old_ready = obsolete
        .iter()
        .filter(serving)
        .filter(|r| r.phase() == ReplicaPhase::Ready)
        .count() as u32;

    let stop = |r: &ReplicaStatus, reason: String| Step::Stop {
        cluster: r.cluster.clone(),
        replica_id: r.replica_id.clone(),
        command_id: format!("{}-stop-{}", r.replica_id, r.updated_at_unix_ms),
        reason,
    };

    // Starts: within the surge limit on the active clusters; capacity that
    // was lost is replaced at once wherever placement put it.
    if !input.halted {
        let limit = desired + input.limits.max_surge;
        let mut surge = limit.saturating_sub(new_alive + old_alive);
        let mut deficit = desired.saturating_sub(new_alive + old_alive);
        for (cluster, id, command_id, replaces) in to_start {
            let now = if is_active(cluster) {
                surge > 0
            } else {
                deficit > 0
            };
            if now {
                surge = surge.saturating_sub(1);
                deficit = deficit.saturating_sub(1);
                out.steps.push(Step::Start {
                    cluster: cluster.to_string(),
                    replica_id: id.to_string(),
                    command_id,
                    replaces_updated_at_unix_ms: replaces,
                });
            }
        }
    }

    // Stops: at once when the cluster is gone or the replica is not
    // serving anyway; ready ones only while enough stay available.
    let min_available = desired.saturating_sub(input.limits.max_unavailable);
    let mut spare = (new_ready + old_ready).saturating_sub(min_available);
    let mut old_left_on_active = false;
    for r in &obsolete {
        if !input.live.contains(&r.cluster) {
            out.steps.push(stop(r, "its cluster is gone".into()));
            continue;
        }
        if !is_active(&r.cluster) {
            continue;
        }
        let reason = format!("replaced by placement generation {}", p.generation);
        if r.phase() != ReplicaPhase::Ready {
            out.steps.push(stop(r, reason));
        } else if !input.halted && spare > 0 {
            spare -= 1;
            out.steps.push(stop(r, reason));
        }
        old_left_on_active = true;
    }

    let active_wanted_ready = wanted.iter().filter(|(c, _)| is_active(c)).all(|(_, id)| {
        by_id
            .get(id.as_str())
            .is_some_and(|r| r.phase() == ReplicaPhase::Ready)
    });
    out.active_done = active_wanted_ready && !old_left_on_active;
    out.ready = new_ready;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::ClusterAssignment;

    const T1: &str = "aaaaaaaa";
    const T2: &str = "bbbbbbbb";

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

    fn replica(template: &str, cluster: &str, k: u32, phase: ReplicaPhase) -> ReplicaStatus {
        ReplicaStatus {
            replica_id: replica_id("chat", template, cluster, k),
            cluster: cluster.into(),
            deployment: "chat".into(),
            phase: phase.into(),
            updated_at_unix_ms: 7,
            ..Default::default()
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn run(
        template: &str,
        p: &PlacementDecision,
        replicas: &[ReplicaStatus],
        live: &[&str],
        limits: Limits,
        active: Option<&BTreeSet<String>>,
    ) -> Plan {
        plan(&Inputs {
            deployment: "chat",
            template,
            placement: p,
            replicas,
            live: &set(live),
            limits,
            active,
            halted: false,
        })
    }

    fn starts(plan: &Plan) -> Vec<&str> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Start { replica_id, .. } => Some(replica_id.as_str()),
                Step::Stop { .. } => None,
            })
            .collect()
    }

    fn stops(plan: &Plan) -> Vec<&str> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Stop { replica_id, .. } => Some(replica_id.as_str()),
                Step::Start { .. } => None,
            })
            .collect()
    }

    #[test]
    fn ids_are_stable_dns_labels_that_carry_their_template() {
        let id = replica_id("chat", T1, "eu-west", 1);
        assert_eq!(id, replica_id("chat", T1, "eu-west", 1));
        assert_ne!(id, replica_id("chat", T1, "eu-west", 2));
        assert_eq!(template_of(&id), Some(T1));
        assert!(flotilla_proto::check_name("replica", &id).is_ok(), "{id}");
        let long = replica_id(&"x".repeat(63), T2, "c", 0);
        assert!(flotilla_proto::check_name("replica", &long).is_ok());
        assert_eq!(template_of(&long), Some(T2));
        assert_ne!(
            template_digest(&[b"a", b"bc"]),
            template_digest(&[b"ab", b"c"])
        );
    }

    #[test]
    fn a_new_placement_of_the_same_template_keeps_its_replicas() {
        // Failover: a moved to c; b's replica is untouched.
        let before = [
            replica(T1, "a", 0, ReplicaPhase::Ready),
            replica(T1, "b", 0, ReplicaPhase::Ready),
        ];
        let p2 = placement(2, &[("b", 1), ("c", 1)]);
        let plan = run(T1, &p2, &before, &["b", "c"], Limits::new(1, 0), None);
        assert_eq!(starts(&plan), vec![replica_id("chat", T1, "c", 0)]);
        assert_eq!(stops(&plan), vec![before[0].replica_id.as_str()]);
        assert!(!plan.active_done);
    }

    #[test]
    fn rolling_update_respects_surge_and_availability() {
        let p = placement(2, &[("a", 2)]);
        let old = vec![
            replica(T1, "a", 0, ReplicaPhase::Ready),
            replica(T1, "a", 1, ReplicaPhase::Ready),
        ];
        let limits = Limits::new(1, 0);
        // One new at a time, nothing old stops before it is ready.
        let plan = run(T2, &p, &old, &["a"], limits, None);
        assert_eq!(starts(&plan), vec![replica_id("chat", T2, "a", 0)]);
        assert!(stops(&plan).is_empty());
        let mut now = old.clone();
        now.push(replica(T2, "a", 0, ReplicaPhase::Starting));
        let plan = run(T2, &p, &now, &["a"], limits, None);
        assert!(plan.steps.is_empty(), "{plan:?}");
        // Ready: one old may go; the surge is used up until it has.
        now[2] = replica(T2, "a", 0, ReplicaPhase::Ready);
        let plan = run(T2, &p, &now, &["a"], limits, None);
        assert_eq!(stops(&plan).len(), 1);
        assert!(starts(&plan).is_empty());
        // maxUnavailable 1, no surge: stop one first.
        let plan = run(T2, &p, &old, &["a"], Limits::new(0, 1), None);
        assert_eq!((starts(&plan).len(), stops(&plan).len()), (0, 1));
        // Both zero would stall; it surges by one.
        let plan = run(T2, &p, &old, &["a"], Limits::new(0, 0), None);
        assert_eq!(starts(&plan).len(), 1);
    }

    #[test]
    fn stages_hold_later_clusters_back_but_lost_capacity_is_replaced() {
        let p = placement(2, &[("a", 1), ("b", 1)]);
        let old = vec![
            replica(T1, "a", 0, ReplicaPhase::Ready),
            replica(T1, "b", 0, ReplicaPhase::Ready),
        ];
        let first = set(&["a"]);
        let plan = run(T2, &p, &old, &["a", "b"], Limits::new(2, 0), Some(&first));
        assert_eq!(starts(&plan), vec![replica_id("chat", T2, "a", 0)]);
        // Stage a done: new ready there, old stopped there; b untouched.
        let now = vec![
            ReplicaStatus {
                phase: ReplicaPhase::Stopped.into(),
                ..old[0].clone()
            },
            old[1].clone(),
            replica(T2, "a", 0, ReplicaPhase::Ready),
        ];
        let plan = run(T2, &p, &now, &["a", "b"], Limits::new(2, 0), Some(&first));
        assert!(plan.steps.is_empty(), "{plan:?}");
        assert!(plan.active_done);
        // b's cluster dies: its replica stops and the new one on b... is on
        // a dead cluster, so nothing starts there; lost capacity on a live
        // later-stage cluster starts at once.
        let p3 = placement(3, &[("a", 1), ("c", 1)]);
        let plan = run(T2, &p3, &now, &["a", "c"], Limits::new(2, 0), Some(&first));
        assert_eq!(starts(&plan), vec![replica_id("chat", T2, "c", 0)]);
        assert_eq!(stops(&plan), vec![old[1].replica_id.as_str()]);
    }

    #[test]
    fn failures_are_reported_and_retried_unless_halted() {
        let p = placement(2, &[("a", 1)]);
        let failed = vec![replica(T2, "a", 0, ReplicaPhase::Failed)];
        let plan = run(T2, &p, &failed, &["a"], Limits::new(1, 0), None);
        assert_eq!(plan.failures, vec![format!("{}@7", failed[0].replica_id)]);
        assert!(matches!(
            &plan.steps[..],
            [Step::Start { command_id, replaces_updated_at_unix_ms: 7, .. }]
                if command_id.ends_with("-start-7")
        ));
        let halted = plan_halted(&p, &failed);
        assert!(halted.steps.is_empty());
    }

    fn plan_halted(p: &PlacementDecision, replicas: &[ReplicaStatus]) -> Plan {
        plan(&Inputs {
            deployment: "chat",
            template: T2,
            placement: p,
            replicas,
            live: &set(&["a"]),
            limits: Limits::new(1, 0),
            active: None,
            halted: true,
        })
    }

    #[test]
    fn a_halted_rollout_keeps_the_old_replicas() {
        let p = placement(2, &[("a", 1)]);
        let replicas = vec![
            replica(T1, "a", 0, ReplicaPhase::Ready),
            replica(T2, "a", 0, ReplicaPhase::Failed),
        ];
        assert!(plan_halted(&p, &replicas).steps.is_empty());
    }
}
