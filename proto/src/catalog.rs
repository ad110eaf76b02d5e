//! The public bus API as data: every subject, event and bucket with its
//! message type, publisher and readers. `docs/subjects.md` is rendered from
//! here and a test keeps the two equal, so the document cannot drift.

use crate::{CommandAction, ControlSubject, EventType, Retention, Subjects, Topology};

/// One subject family of the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectEntry {
    pub subject: String,
    pub message: &'static str,
    pub stream: String,
    pub publishers: &'static str,
    pub consumers: &'static str,
}

/// Every subject family, in the default prefix's spelling when
/// `subjects` is the default.
pub fn subject_entries(subjects: &Subjects, topology: &Topology) -> Vec<SubjectEntry> {
    let mut out = Vec::new();
    for which in ControlSubject::ALL {
        let (message, consumers) = match which {
            ControlSubject::DeploymentApply => ("ModelDeployment", "placement"),
            ControlSubject::DeploymentDelete => ("DeleteDeployment", "placement"),
            ControlSubject::RolloutApprove => ("ApproveRollout", "rollout"),
            ControlSubject::RolloutUndo => ("UndoRollout", "rollout"),
            ControlSubject::ClusterCordon => ("CordonCluster", "inventory"),
            ControlSubject::ModelRegister => ("RegisterModel", "model-provisioner"),
        };
        out.push(SubjectEntry {
            subject: subjects.control(which),
            message,
            stream: topology.control.name.clone(),
            publishers: "users, `flotilla`, the gRPC API",
            consumers,
        });
    }
    out.push(SubjectEntry {
        subject: subjects.preview_deployments(),
        message: "ModelDeployment",
        stream: "none (request/reply)".into(),
        publishers: "`flotilla apply --dry-run=server`, the gRPC API, `nats req`",
        consumers: "placement: replies with an `Event` (the preview or the rejection), stores nothing",
    });
    out.push(SubjectEntry {
        subject: format!("{}.logs.<cluster>", subjects.prefix()),
        message: "ReplicaLogsRequest",
        stream: "none (request/reply)".into(),
        publishers: "`flotilla logs`, the gRPC API",
        consumers: "the executor of `<cluster>`: replies with `ReplicaLogs`",
    });
    out.push(SubjectEntry {
        subject: format!("{}.events.<kind>.<name>.<what>", subjects.prefix()),
        message: "Event",
        stream: topology.events.name.clone(),
        publishers: "the service that owns `<kind>` (see the event table)",
        consumers: "every observer, `flotilla watch`",
    });
    for action in [
        CommandAction::Start,
        CommandAction::Stop,
        CommandAction::Prefetch,
    ] {
        out.push(SubjectEntry {
            subject: format!("{}.cmd.<cluster>.{}", subjects.prefix(), action.as_str()),
            message: "ExecutorCommand",
            stream: topology.commands.name.clone(),
            publishers: "rollout",
            consumers: "the executor of `<cluster>`",
        });
    }
    out.push(SubjectEntry {
        subject: format!("{}.telemetry.<cluster>", subjects.prefix()),
        message: "ClusterHeartbeat",
        stream: topology.telemetry.name.clone(),
        publishers: "the executor of `<cluster>`",
        consumers: "inventory",
    });
    out.push(SubjectEntry {
        subject: format!("{}.traffic.<gateway>", subjects.prefix()),
        message: "GatewayTraffic",
        stream: "none (core NATS)".into(),
        publishers: "each gateway instance, every `--traffic-interval`",
        consumers: "anyone (`nats sub`): per replica and version, requests, errors and latency histograms",
    });
    out
}

/// The service that publishes each kind of event.
pub fn event_publisher(ty: EventType) -> &'static str {
    use crate::EventKind::*;
    if matches!(ty, EventType::ModelFetched | EventType::ModelFetchFailed) {
        return "executor";
    }
    match ty.kind() {
        Cluster => "inventory",
        Deployment => "placement",
        Rollout => "rollout",
        Replica => "executor",
        Model => "model-provisioner",
        Bus => "any service (kit)",
    }
}

fn duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "none".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn bytes(b: i64) -> String {
    if b < 0 {
        "none".into()
    } else if b % (1 << 30) == 0 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{b} B")
    }
}

/// The generated part of `docs/subjects.md`.
pub fn render_markdown() -> String {
    let subjects = Subjects::default();
    let topology = Topology::new(&subjects, 1);
    let mut md = String::new();

    md.push_str("### Subjects\n\n| subject | message (`flotilla.v1`) | stream | published by | consumed by |\n| --- | --- | --- | --- | --- |\n");
    for e in subject_entries(&subjects, &topology) {
        md.push_str(&format!(
            "| `{}` | `{}` | `{}` | {} | {} |\n",
            e.subject, e.message, e.stream, e.publishers, e.consumers
        ));
    }

    md.push_str("\n### Events\n\nEvery event is an `Event` on `flotilla.events.<kind>.<name>.<what>`; `<name>` is the cluster, deployment, replica, model, or for `bus` events the consumer or stream.\n\n| type | published by | when |\n| --- | --- | --- |\n");
    for ty in EventType::ALL {
        md.push_str(&format!(
            "| `{ty}` | {} | {} |\n",
            event_publisher(*ty),
            ty.doc()
        ));
    }

    md.push_str("\n### Streams\n\n| stream | subjects | retention | max age | max bytes | per subject | dedup window |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    for s in topology.streams() {
        let retention = match s.retention {
            Retention::Limits => "limits",
            Retention::WorkQueue => "work queue",
        };
        let per_subject = if s.max_messages_per_subject < 0 {
            "all".to_string()
        } else {
            format!("last {}", s.max_messages_per_subject)
        };
        md.push_str(&format!(
            "| `{}` | `{}` | {retention} | {} | {} | {per_subject} | {} |\n",
            s.name,
            s.subjects.join("`, `"),
            duration(s.max_age),
            bytes(s.max_bytes),
            duration(s.duplicate_window),
        ));
    }

    md.push_str("\n### Key-value buckets and object stores\n\n| name | key | value (`flotilla.v1`) | written only by | history | expiry |\n| --- | --- | --- | --- | --- | --- |\n");
    for b in topology.buckets() {
        md.push_str(&format!(
            "| KV `{}` | `{}` | `{}` | {} | {} | {} |\n",
            b.name,
            b.key,
            b.value_type,
            b.writer,
            b.history,
            duration(b.max_age)
        ));
    }
    for o in topology.object_stores() {
        md.push_str(&format!(
            "| object store `{}` | `<model>/parts/<part sha256 hex>` | artifact parts of up to 8 MiB (`ModelRecord.parts` lists them) | {} and `flotilla model push` | n/a | none |\n",
            o.name, o.writer
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEGIN: &str = "<!-- BEGIN GENERATED: proto/src/catalog.rs -->\n";
    const END: &str = "<!-- END GENERATED -->";

    /// `docs/subjects.md` must show exactly what the contracts define. Run
    /// with `FLOTILLA_BLESS=1` to rewrite its generated part.
    #[test]
    fn docs_subjects_md_matches_the_contracts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/subjects.md");
        let doc = std::fs::read_to_string(&path).unwrap();
        let start = doc.find(BEGIN).expect("BEGIN marker") + BEGIN.len();
        let end = doc.find(END).expect("END marker");
        let fresh = render_markdown();
        if std::env::var_os("FLOTILLA_BLESS").is_some() {
            let new = format!("{}{fresh}{}", &doc[..start], &doc[end..]);
            std::fs::write(&path, new).unwrap();
            return;
        }
        assert!(
            doc[start..end] == fresh,
            "docs/subjects.md is out of date; run FLOTILLA_BLESS=1 cargo test -p flotilla-proto"
        );
    }

    #[test]
    fn every_control_subject_is_documented_with_its_message() {
        let s = Subjects::default();
        let t = Topology::new(&s, 1);
        let entries = subject_entries(&s, &t);
        for which in ControlSubject::ALL {
            assert!(entries.iter().any(|e| e.subject == s.control(which)));
        }
        // Every message named is a real contract type.
        let known = [
            "ModelDeployment",
            "DeleteDeployment",
            "ApproveRollout",
            "UndoRollout",
            "CordonCluster",
            "RegisterModel",
            "Event",
            "ExecutorCommand",
            "ClusterHeartbeat",
            "ReplicaLogsRequest",
            "GatewayTraffic",
        ];
        assert!(entries.iter().all(|e| known.contains(&e.message)));
    }
}
