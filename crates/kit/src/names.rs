//! What a message is about, for the span it is handled in.
//!
//! The consumer loop handles every message inside a span; once the message
//! is decoded it records the deployment, cluster, replica, model and
//! generation the contract names, so every log line of that handling can be
//! found by them (`deployment=chat` finds the apply, the placement, the
//! start command and the replica's status alike).
//!
//! The names are read from the decoded contract here, by its type, rather
//! than asked of each handler: every consumer gets them without writing
//! anything, and [`crate::consumer::run_consumer`] keeps its plain
//! `M: Contract` bound. A contract this module does not know names nothing.

use std::any::Any;

use flotilla_proto::codec::Contract;
use flotilla_proto::v1::{self, executor_command::Action};

/// The span fields [`Names::record`] fills; a span that should carry them
/// declares each as [`tracing::field::Empty`].
pub const FIELDS: [&str; 5] = ["deployment", "cluster", "replica", "model", "generation"];

/// The names one message carries. Empty strings and generation 0 (proto's
/// "not set") are `None`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Names<'a> {
    pub deployment: Option<&'a str>,
    pub cluster: Option<&'a str>,
    pub replica: Option<&'a str>,
    pub model: Option<&'a str>,
    /// Placement's generation where the message has one (commands,
    /// replicas, rollouts); a deployment document's own generation otherwise.
    pub generation: Option<u64>,
}

fn set(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn set_generation(g: u64) -> Option<u64> {
    (g != 0).then_some(g)
}

impl<'a> Names<'a> {
    /// The names `message` carries.
    pub fn of<M: Contract>(message: &'a M) -> Self {
        let any: &'a dyn Any = message;
        if let Some(c) = any.downcast_ref::<v1::ExecutorCommand>() {
            let replica = match &c.action {
                Some(Action::Start(s)) => set(&s.replica_id),
                Some(Action::Stop(s)) => set(&s.replica_id),
                _ => None,
            };
            let model = match &c.action {
                Some(Action::Start(s)) => s.model.as_ref().and_then(|m| set(&m.name)),
                Some(Action::Prefetch(p)) => p.model.as_ref().and_then(|m| set(&m.name)),
                _ => None,
            };
            Self {
                deployment: set(&c.deployment),
                cluster: set(&c.cluster),
                replica,
                model,
                generation: set_generation(c.generation),
            }
        } else if let Some(d) = any.downcast_ref::<v1::ModelDeployment>() {
            Self {
                deployment: d.metadata.as_ref().and_then(|m| set(&m.name)),
                generation: d.status.as_ref().and_then(|s| set_generation(s.generation)),
                ..Self::default()
            }
        } else if let Some(d) = any.downcast_ref::<v1::DeleteDeployment>() {
            Self::deployment(&d.name, 0)
        } else if let Some(a) = any.downcast_ref::<v1::ApproveRollout>() {
            Self::deployment(&a.deployment, a.generation)
        } else if let Some(u) = any.downcast_ref::<v1::UndoRollout>() {
            Self::deployment(&u.deployment, 0)
        } else if let Some(r) = any.downcast_ref::<v1::RolloutState>() {
            Self::deployment(&r.deployment, r.target_generation)
        } else if let Some(p) = any.downcast_ref::<v1::PlacementDecision>() {
            Self::deployment(&p.deployment, p.generation)
        } else if let Some(c) = any.downcast_ref::<v1::CordonCluster>() {
            Self::cluster(&c.cluster)
        } else if let Some(h) = any.downcast_ref::<v1::ClusterHeartbeat>() {
            Self::cluster(&h.cluster)
        } else if let Some(c) = any.downcast_ref::<v1::ClusterRecord>() {
            Self::cluster(&c.name)
        } else if let Some(r) = any.downcast_ref::<v1::ReplicaStatus>() {
            Self {
                deployment: set(&r.deployment),
                cluster: set(&r.cluster),
                replica: set(&r.replica_id),
                model: set(&r.model),
                generation: set_generation(r.generation),
            }
        } else if let Some(m) = any.downcast_ref::<v1::RegisterModel>() {
            Self::model(&m.name)
        } else if let Some(m) = any.downcast_ref::<v1::ModelRecord>() {
            Self::model(&m.name)
        } else if let Some(e) = any.downcast_ref::<v1::Event>() {
            Self::of_event(e)
        } else {
            Self::default()
        }
    }

    fn deployment(name: &'a str, generation: u64) -> Self {
        Self {
            deployment: set(name),
            generation: set_generation(generation),
            ..Self::default()
        }
    }

    fn cluster(name: &'a str) -> Self {
        Self {
            cluster: set(name),
            ..Self::default()
        }
    }

    fn model(name: &'a str) -> Self {
        Self {
            model: set(name),
            ..Self::default()
        }
    }

    /// An event's name is of its kind, the first token of its type.
    fn of_event(e: &'a v1::Event) -> Self {
        let generation = set_generation(e.generation);
        let name = set(&e.name);
        match e.r#type.split('.').next().unwrap_or_default() {
            "deployment" | "rollout" => Self {
                deployment: name,
                generation,
                ..Self::default()
            },
            "cluster" => Self {
                cluster: name,
                generation,
                ..Self::default()
            },
            "replica" => Self {
                replica: name,
                generation,
                ..Self::default()
            },
            "model" => Self {
                model: name,
                generation,
                ..Self::default()
            },
            _ => Self::default(),
        }
    }

    /// Records the names that are set on `span`, which declared the
    /// [`FIELDS`] as empty.
    pub fn record(&self, span: &tracing::Span) {
        for (field, value) in [
            ("deployment", self.deployment),
            ("cluster", self.cluster),
            ("replica", self.replica),
            ("model", self.model),
        ] {
            if let Some(value) = value {
                span.record(field, value);
            }
        }
        if let Some(generation) = self.generation {
            span.record("generation", generation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::executor_command;

    fn start(replica: &str) -> v1::ExecutorCommand {
        v1::ExecutorCommand {
            command_id: "c1".into(),
            cluster: "gpu-a".into(),
            deployment: "chat".into(),
            generation: 3,
            action: Some(executor_command::Action::Start(v1::StartReplica {
                replica_id: replica.into(),
                model: Some(v1::ModelRef {
                    name: "smollm2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn each_contract_names_what_it_is_about() {
        let command = start("chat-gpu-a-0");
        let deployment = v1::ModelDeployment {
            metadata: Some(v1::ObjectMeta {
                name: "chat".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let heartbeat = v1::ClusterHeartbeat {
            cluster: "gpu-b".into(),
            ..Default::default()
        };
        let approve = v1::ApproveRollout {
            deployment: "chat".into(),
            generation: 4,
            ..Default::default()
        };
        let register = v1::RegisterModel {
            name: "smollm2".into(),
            ..Default::default()
        };
        let event = v1::Event {
            r#type: "replica.ready".into(),
            name: "chat-gpu-a-0".into(),
            generation: 3,
            ..Default::default()
        };
        let cases: [(&str, Names<'_>, Names<'_>); 6] = [
            (
                "start command",
                Names::of(&command),
                Names {
                    deployment: Some("chat"),
                    cluster: Some("gpu-a"),
                    replica: Some("chat-gpu-a-0"),
                    model: Some("smollm2"),
                    generation: Some(3),
                },
            ),
            (
                "deployment without status",
                Names::of(&deployment),
                Names {
                    deployment: Some("chat"),
                    ..Names::default()
                },
            ),
            (
                "heartbeat",
                Names::of(&heartbeat),
                Names {
                    cluster: Some("gpu-b"),
                    ..Names::default()
                },
            ),
            (
                "approval",
                Names::of(&approve),
                Names {
                    deployment: Some("chat"),
                    generation: Some(4),
                    ..Names::default()
                },
            ),
            (
                "model registration",
                Names::of(&register),
                Names {
                    model: Some("smollm2"),
                    ..Names::default()
                },
            ),
            (
                "event about a replica",
                Names::of(&event),
                Names {
                    replica: Some("chat-gpu-a-0"),
                    generation: Some(3),
                    ..Names::default()
                },
            ),
        ];
        for (what, got, want) in cases {
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn unset_fields_name_nothing() {
        let mut command = start("");
        command.deployment.clear();
        command.generation = 0;
        let names = Names::of(&command);
        assert_eq!(names.deployment, None);
        assert_eq!(names.replica, None);
        assert_eq!(names.generation, None);
        assert_eq!(names.cluster, Some("gpu-a"));
        assert_eq!(
            Names::of(&v1::Event::default()),
            Names::default(),
            "an event of no kind"
        );
    }
}
