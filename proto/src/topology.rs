//! The streams, KV buckets and object stores of the bus, as data. The kit
//! provisions them from here; `docs/subjects.md` is checked against here.

use std::time::Duration;

use crate::Subjects;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Kept until the age, size or per-subject limits drop it.
    Limits,
    /// Removed once a consumer acknowledges it.
    WorkQueue,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamDef {
    pub name: String,
    pub description: &'static str,
    pub subjects: Vec<String>,
    pub retention: Retention,
    /// Zero: no age limit.
    pub max_age: Duration,
    /// -1: no size limit.
    pub max_bytes: i64,
    /// -1: no limit; 1 keeps only the last message of each subject.
    pub max_messages_per_subject: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    pub replicas: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BucketDef {
    pub name: String,
    /// The logical name, as in the architecture (`clusters`).
    pub role: &'static str,
    pub description: &'static str,
    /// The only service that writes it.
    pub writer: &'static str,
    pub key: &'static str,
    pub value_type: &'static str,
    pub history: i64,
    /// Zero: entries never expire.
    pub max_age: Duration,
    pub replicas: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStoreDef {
    pub name: String,
    pub role: &'static str,
    pub description: &'static str,
    pub writer: &'static str,
    pub replicas: usize,
}

/// Everything a Flotilla fleet needs on its NATS server.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub control: StreamDef,
    pub events: StreamDef,
    pub commands: StreamDef,
    pub telemetry: StreamDef,
    pub clusters: BucketDef,
    pub deployments: BucketDef,
    pub placements: BucketDef,
    pub rollouts: BucketDef,
    pub replicas: BucketDef,
    pub models: BucketDef,
    /// Which messages each durable consumer has finished, so a redelivery
    /// of one whose ack the server lost (a crash) is not handled again.
    pub handled: BucketDef,
    pub model_artifacts: ObjectStoreDef,
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
const GIB: i64 = 1 << 30;

impl Topology {
    /// Streams are named `<PREFIX>_<ROLE>` (`FLOTILLA_CONTROL`). Buckets
    /// and object stores keep their plain names (`clusters`) under the
    /// default prefix and become `<prefix>_<name>` under any other, so two
    /// fleets can share one NATS account.
    pub fn new(subjects: &Subjects, replicas: usize) -> Self {
        let prefix = subjects.prefix();
        let stream = |role: &str| format!("{}_{role}", prefix.to_uppercase().replace('-', "_"));
        let bucket = |name: &str| {
            if prefix == crate::DEFAULT_PREFIX {
                name.to_string()
            } else {
                format!("{prefix}_{name}")
            }
        };
        let kv = |role: &'static str, writer, key, value_type, description| BucketDef {
            name: bucket(role),
            role,
            description,
            writer,
            key,
            value_type,
            history: 5,
            max_age: Duration::ZERO,
            replicas,
        };
        Self {
            control: StreamDef {
                name: stream("CONTROL"),
                description: "Requests from users: deployment apply and delete, rollout approve and undo, cluster cordon",
                subjects: vec![subjects.control_all()],
                retention: Retention::Limits,
                max_age: 7 * DAY,
                max_bytes: GIB,
                max_messages_per_subject: -1,
                duplicate_window: Duration::from_secs(10 * 60),
                replicas,
            },
            events: StreamDef {
                name: stream("EVENTS"),
                description: "Everything that happened in the fleet, replayable from any point",
                subjects: vec![subjects.events_all()],
                retention: Retention::Limits,
                max_age: 7 * DAY,
                max_bytes: 2 * GIB,
                max_messages_per_subject: -1,
                duplicate_window: Duration::from_secs(2 * 60),
                replicas,
            },
            commands: StreamDef {
                name: stream("CMD"),
                description: "Commands for executors, one work queue per cluster",
                subjects: vec![subjects.commands_all()],
                retention: Retention::WorkQueue,
                max_age: DAY,
                max_bytes: GIB,
                max_messages_per_subject: -1,
                duplicate_window: Duration::from_secs(10 * 60),
                replicas,
            },
            telemetry: StreamDef {
                name: stream("TELEMETRY"),
                description: "Executor heartbeats, the last one per cluster",
                subjects: vec![subjects.telemetry_all()],
                retention: Retention::Limits,
                max_age: HOUR,
                max_bytes: GIB,
                max_messages_per_subject: 1,
                duplicate_window: Duration::from_secs(2 * 60),
                replicas,
            },
            clusters: kv(
                "clusters",
                "inventory",
                "<cluster>",
                "ClusterRecord",
                "Every cluster: health, cordon, inventory",
            ),
            deployments: kv(
                "deployments",
                "placement",
                "<deployment>",
                "ModelDeployment",
                "Every accepted deployment with its status",
            ),
            placements: kv(
                "placements",
                "placement",
                "<deployment>",
                "PlacementDecision",
                "Where each deployment's replicas go, and why",
            ),
            rollouts: kv(
                "rollouts",
                "rollout",
                "<deployment>",
                "RolloutState",
                "Progress of each deployment's rollout",
            ),
            replicas: kv(
                "replicas",
                "executor",
                "<cluster>.<replica>",
                "ReplicaStatus",
                "Every replica; each executor writes its own cluster's keys",
            ),
            models: kv(
                "models",
                "model-provisioner",
                "<model>",
                "ModelRecord",
                "Every model: sizing, digest, state",
            ),
            handled: BucketDef {
                history: 1,
                max_age: DAY,
                ..kv(
                    "handled",
                    "every consumer, its own keys",
                    "<stream>.<consumer>.<sequence>",
                    "empty",
                    "Messages each durable consumer has finished, for a day",
                )
            },
            model_artifacts: ObjectStoreDef {
                name: bucket("models"),
                role: "models",
                description: "Model artifacts, chunked and digest-checked",
                writer: "model-provisioner",
                replicas,
            },
        }
    }

    pub fn streams(&self) -> [&StreamDef; 4] {
        [&self.control, &self.events, &self.commands, &self.telemetry]
    }

    pub fn buckets(&self) -> [&BucketDef; 7] {
        [
            &self.clusters,
            &self.deployments,
            &self.placements,
            &self.rollouts,
            &self.replicas,
            &self.models,
            &self.handled,
        ]
    }

    pub fn object_stores(&self) -> [&ObjectStoreDef; 1] {
        [&self.model_artifacts]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prefix_keeps_the_architecture_names() {
        let t = Topology::new(&Subjects::default(), 1);
        assert_eq!(t.control.name, "FLOTILLA_CONTROL");
        assert_eq!(t.control.subjects, vec!["flotilla.control.>"]);
        assert_eq!(t.clusters.name, "clusters");
        assert_eq!(t.model_artifacts.name, "models");
    }

    #[test]
    fn another_prefix_renames_everything() {
        let t = Topology::new(&Subjects::new("team-a").unwrap(), 3);
        assert_eq!(t.events.name, "TEAM_A_EVENTS");
        assert_eq!(t.replicas.name, "team-a_replicas");
        assert!(t.streams().iter().all(|s| s.replicas == 3));
    }

    #[test]
    fn stream_subjects_do_not_overlap() {
        let t = Topology::new(&Subjects::default(), 1);
        let roots: Vec<_> = t
            .streams()
            .iter()
            .flat_map(|s| {
                s.subjects
                    .iter()
                    .map(|x| x.split('.').nth(1).unwrap_or_default().to_string())
            })
            .collect();
        let mut unique = roots.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), roots.len());
    }
}
