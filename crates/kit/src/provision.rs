//! Creates the streams, KV buckets and object stores of the topology.
//!
//! Idempotent and safe to run from many services at once: JetStream
//! accepts a create whose configuration equals the existing one. When the
//! server holds a different configuration, it is reported (log, event,
//! [`ProvisionReport::drifted`]) and left alone: changing retention under a
//! running fleet is an operator's decision.
//!
//! A JetStream cluster that is still forming (servers starting together,
//! a restarted peer not yet current) refuses to place a replicated stream
//! for a while; a service started with it waits for the cluster, up to
//! [`CLUSTER_PATIENCE`], instead of failing its start.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use flotilla_proto::v1::{self, event::Payload};
use flotilla_proto::{BucketDef, EventType, ObjectStoreDef, Retention, StreamDef};

use crate::{Backoff, BoxError, Bus, EventDraft, KitError};

/// How long provisioning waits for a JetStream cluster that cannot place
/// streams yet.
pub const CLUSTER_PATIENCE: Duration = Duration::from_secs(90);
const CLUSTER_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Whether `error` (or what caused it) is the answer of a JetStream
/// cluster that is forming or electing a leader: it passes by itself.
/// The server says so only in its error text and codes (10005 no suitable
/// peers, 10008 temporarily unavailable), whatever the request was.
fn cluster_not_ready(error: &(dyn std::error::Error + 'static)) -> bool {
    const MARKERS: &[&str] = &[
        "no suitable peers",
        "10005",
        "temporarily unavailable",
        "10008",
        "no responders",
        "timed out",
        "request timeout",
    ];
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string().to_ascii_lowercase();
        if MARKERS.iter().any(|m| text.contains(m)) {
            return true;
        }
        cause = e.source();
    }
    false
}

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
/// [`ensure_once`], again while the JetStream cluster is not ready, up to
/// [`CLUSTER_PATIENCE`].
async fn ensure<Create, Fut, E>(
    js: &jetstream::Context,
    kind: &'static str,
    name: &str,
    stream_name: &str,
    drift: impl Fn(&stream::Config) -> Option<v1::TopologyDrift>,
    create: Create,
) -> Result<Option<v1::TopologyDrift>, KitError>
where
    Create: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match ensure_once(js, kind, name, stream_name, &drift, &create).await {
            Err(KitError::Provision { source, .. })
                if cluster_not_ready(source.as_ref()) && started.elapsed() < CLUSTER_PATIENCE =>
            {
                if attempt == 0 {
                    tracing::warn!(
                        %kind, %name,
                        "the JetStream cluster cannot take it yet ({source}); waiting up to {CLUSTER_PATIENCE:?}"
                    );
                }
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(CLUSTER_BACKOFF.delay(attempt)).await;
            }
            Ok(found) => {
                if attempt > 0 {
                    tracing::info!(%kind, %name, waited = ?started.elapsed(), "the JetStream cluster took it");
                }
                return Ok(found);
            }
            Err(e) => return Err(e),
        }
    }
}

async fn ensure_once<Create, Fut, E>(
    js: &jetstream::Context,
    kind: &'static str,
    name: &str,
    stream_name: &str,
    drift: &impl Fn(&stream::Config) -> Option<v1::TopologyDrift>,
    create: &Create,
) -> Result<Option<v1::TopologyDrift>, KitError>
where
    Create: Fn() -> Fut,
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
        || async { js.create_key_value(config.clone()).await.map(|_| ()) },
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
        || async { js.create_object_store(config.clone()).await.map(|_| ()) },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::{Subjects, Topology};

    #[test]
    fn a_forming_cluster_is_waited_for_and_other_refusals_are_not() {
        #[derive(Debug, thiserror::Error)]
        #[error("provisioning failed: {0}")]
        struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);
        let forming = [
            "jetstream error: no suitable peers for placement, peer offline (code 400, error code 10005)",
            "JetStream system temporarily unavailable (code 503, error code 10008)",
            "no responders",
        ];
        for text in forming {
            let wrapped = Outer(text.into());
            assert!(cluster_not_ready(&wrapped), "{text}");
        }
        for text in [
            "stream name already in use with a different configuration (error code 10058)",
            "subjects overlap with an existing stream (error code 10065)",
            "authorization violation",
        ] {
            let wrapped = Outer(text.into());
            assert!(!cluster_not_ready(&wrapped), "{text}");
        }
    }

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
