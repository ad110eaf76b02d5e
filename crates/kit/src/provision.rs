//! Creates the streams, KV buckets and object stores of the topology.
//!
//! Idempotent and safe to run from many services at once: JetStream
//! accepts a create whose configuration equals the existing one. When the
//! server holds a different configuration, it is reported (log, event,
//! [`ProvisionReport::drifted`]) and left alone: changing retention under a
//! running fleet is an operator's decision.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use flotilla_proto::v1::{self, event::Payload};
use flotilla_proto::{BucketDef, EventType, ObjectStoreDef, Retention, StreamDef};

use crate::{BoxError, Bus, EventDraft, KitError};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProvisionReport {
    /// Everything whose server configuration differs from the contracts.
    pub drifted: Vec<v1::TopologyDrift>,
}

/// Ensures every stream, bucket and object store exists.
pub async fn provision(bus: &Bus) -> Result<ProvisionReport, KitError> {
    let mut report = ProvisionReport::default();
    let topology = &bus.topology;
    for def in topology.streams() {
        if let Some(d) = ensure_stream(&bus.jetstream, def).await? {
            report.drifted.push(d);
        }
    }
    for def in topology.buckets() {
        if let Some(d) = ensure_bucket(&bus.jetstream, def).await? {
            report.drifted.push(d);
        }
    }
    for def in topology.object_stores() {
        if let Some(d) = ensure_object_store(&bus.jetstream, def).await? {
            report.drifted.push(d);
        }
    }
    for drift in &report.drifted {
        let summary = drift
            .fields
            .iter()
            .map(|f| format!("{}: expected {}, found {}", f.field, f.expected, f.actual))
            .collect::<Vec<_>>()
            .join("; ");
        tracing::warn!(kind = %drift.kind, name = %drift.name, "configuration on the server differs from the contracts, left unchanged: {summary}");
        let draft = EventDraft::new(
            EventType::BusTopologyDrifted,
            &drift.name,
            format!(
                "{} {} differs from the contracts: {summary}",
                drift.kind, drift.name
            ),
        )
        .payload(Payload::Drift(drift.clone()));
        bus.publish_event(draft).await?;
    }
    Ok(report)
}

fn stream_config(def: &StreamDef) -> stream::Config {
    stream::Config {
        name: def.name.clone(),
        description: Some(def.description.to_string()),
        subjects: def.subjects.clone(),
        retention: match def.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        max_age: def.max_age,
        max_bytes: def.max_bytes,
        max_messages_per_subject: def.max_messages_per_subject,
        duplicate_window: def.duplicate_window,
        num_replicas: def.replicas,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

fn field(out: &mut Vec<v1::FieldDrift>, name: &str, expected: String, actual: String) {
    if expected != actual {
        out.push(v1::FieldDrift {
            field: name.to_string(),
            expected,
            actual,
        });
    }
}

fn fmt_duration(d: Duration) -> String {
    format!("{d:?}")
}

fn stream_drift(def: &StreamDef, actual: &stream::Config) -> Vec<v1::FieldDrift> {
    let want = stream_config(def);
    let mut out = Vec::new();
    let mut subjects = actual.subjects.clone();
    subjects.sort();
    let mut want_subjects = want.subjects.clone();
    want_subjects.sort();
    field(
        &mut out,
        "subjects",
        format!("{want_subjects:?}"),
        format!("{subjects:?}"),
    );
    field(
        &mut out,
        "retention",
        format!("{:?}", want.retention),
        format!("{:?}", actual.retention),
    );
    field(
        &mut out,
        "max_age",
        fmt_duration(want.max_age),
        fmt_duration(actual.max_age),
    );
    field(
        &mut out,
        "max_bytes",
        want.max_bytes.to_string(),
        actual.max_bytes.to_string(),
    );
    field(
        &mut out,
        "max_messages_per_subject",
        want.max_messages_per_subject.to_string(),
        actual.max_messages_per_subject.to_string(),
    );
    field(
        &mut out,
        "duplicate_window",
        fmt_duration(want.duplicate_window),
        fmt_duration(actual.duplicate_window),
    );
    field(
        &mut out,
        "num_replicas",
        want.num_replicas.to_string(),
        actual.num_replicas.to_string(),
    );
    field(
        &mut out,
        "storage",
        format!("{:?}", want.storage),
        format!("{:?}", actual.storage),
    );
    out
}

async fn existing_config(
    js: &jetstream::Context,
    stream_name: &str,
) -> Result<Option<stream::Config>, jetstream::context::GetStreamError> {
    match js.get_stream(stream_name).await {
        Ok(s) => Ok(Some(s.cached_info().config.clone())),
        Err(e) => {
            let not_found = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if not_found { Ok(None) } else { Err(e) }
        }
    }
}

fn drift_report(kind: &str, name: &str, fields: Vec<v1::FieldDrift>) -> Option<v1::TopologyDrift> {
    (!fields.is_empty()).then(|| v1::TopologyDrift {
        kind: kind.to_string(),
        name: name.to_string(),
        fields,
    })
}

/// Looks first (an existing one is compared, never recreated), creates it
/// when missing, and when another service won the race to create it,
/// compares what that one made.
async fn ensure<Create, Fut, E>(
    js: &jetstream::Context,
    kind: &'static str,
    name: &str,
    stream_name: &str,
    drift: impl Fn(&stream::Config) -> Option<v1::TopologyDrift>,
    create: Create,
) -> Result<Option<v1::TopologyDrift>, KitError>
where
    Create: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let failed = |source: BoxError| KitError::Provision {
        kind,
        name: name.to_string(),
        source,
    };
    let unreadable = |e: jetstream::context::GetStreamError| failed(e.into());
    if let Some(actual) = existing_config(js, stream_name).await.map_err(unreadable)? {
        return Ok(drift(&actual));
    }
    match create().await {
        Ok(()) => Ok(None),
        Err(create_err) => match existing_config(js, stream_name).await.map_err(unreadable)? {
            Some(actual) => Ok(drift(&actual)),
            None => Err(failed(create_err.into())),
        },
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    def: &StreamDef,
) -> Result<Option<v1::TopologyDrift>, KitError> {
    ensure(
        js,
        "stream",
        &def.name,
        &def.name,
        |actual| drift_report("stream", &def.name, stream_drift(def, actual)),
        || async { js.create_stream(stream_config(def)).await.map(|_| ()) },
    )
    .await
}

async fn ensure_bucket(
    js: &jetstream::Context,
    def: &BucketDef,
) -> Result<Option<v1::TopologyDrift>, KitError> {
    let drift = |actual: &stream::Config| {
        let mut out = Vec::new();
        field(
            &mut out,
            "history",
            def.history.to_string(),
            actual.max_messages_per_subject.to_string(),
        );
        field(
            &mut out,
            "max_age",
            fmt_duration(def.max_age),
            fmt_duration(actual.max_age),
        );
        field(
            &mut out,
            "num_replicas",
            def.replicas.to_string(),
            actual.num_replicas.to_string(),
        );
        drift_report("kv", &def.name, out)
    };
    let config = kv::Config {
        bucket: def.name.clone(),
        description: def.description.to_string(),
        history: def.history,
        max_age: def.max_age,
        num_replicas: def.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    ensure(
        js,
        "kv bucket",
        &def.name,
        &format!("KV_{}", def.name),
        drift,
        || async { js.create_key_value(config).await.map(|_| ()) },
    )
    .await
}

async fn ensure_object_store(
    js: &jetstream::Context,
    def: &ObjectStoreDef,
) -> Result<Option<v1::TopologyDrift>, KitError> {
    let drift = |actual: &stream::Config| {
        let mut out = Vec::new();
        field(
            &mut out,
            "num_replicas",
            def.replicas.to_string(),
            actual.num_replicas.to_string(),
        );
        drift_report("object-store", &def.name, out)
    };
    let config = object_store::Config {
        bucket: def.name.clone(),
        description: Some(def.description.to_string()),
        num_replicas: def.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    ensure(
        js,
        "object store",
        &def.name,
        &format!("OBJ_{}", def.name),
        drift,
        || async { js.create_object_store(config).await.map(|_| ()) },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Subjects, Topology};

    #[test]
    fn a_stream_matching_its_definition_has_no_drift() {
        let t = Topology::new(&Subjects::default(), 1);
        for def in t.streams() {
            assert!(stream_drift(def, &stream_config(def)).is_empty());
        }
    }

    #[test]
    fn drift_names_each_differing_field() {
        let t = Topology::new(&Subjects::default(), 1);
        let mut actual = stream_config(&t.events);
        actual.max_age = Duration::from_secs(60);
        actual.subjects = vec!["other.>".into()];
        let fields: Vec<_> = stream_drift(&t.events, &actual)
            .into_iter()
            .map(|f| f.field)
            .collect();
        assert_eq!(fields, vec!["subjects", "max_age"]);
    }
}
