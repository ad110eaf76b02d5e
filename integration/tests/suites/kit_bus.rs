//! The service kit against a real nats-server: provisioning, the consumer
//! loop's error policy, deduplication, trace context, and surviving a
//! `kill -9` of the server.

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use flotilla_integration::NatsServer;
use flotilla_kit::consumer::run_consumer;
use flotilla_kit::{
    Bus, ConsumerSpec, Delivery, EventDraft, HandlerError, TraceContext, provision,
};
use flotilla_proto::codec::{CONTENT_TYPE, JSON, PROTOBUF};
use flotilla_proto::v1::{self, event::Payload};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{config, poll_until};

const DEADLINE: Duration = Duration::from_secs(30);

/// A client named `service`, without provisioning.
async fn bus(server: &NatsServer, service: &str) -> Bus {
    Bus::connect(&config(server), service, &CancellationToken::new())
        .await
        .unwrap()
}

/// A server and a client named `service`, provisioned.
async fn provisioned(service: &str) -> (NatsServer, Bus) {
    let server = NatsServer::start().await.unwrap();
    let bus = server.provisioned_bus(service).await.unwrap();
    (server, bus)
}

/// The state of the deployment-apply consumer the tests run.
async fn apply_consumer(bus: &Bus) -> async_nats::jetstream::consumer::Info {
    bus.jetstream
        .get_stream(&bus.topology.control.name)
        .await
        .unwrap()
        .consumer_info("placement-apply")
        .await
        .unwrap()
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|| panic!("channel closed waiting for {what}"))
}

async fn next_event(
    sub: &mut async_nats::Subscriber,
    what: &str,
) -> (v1::Event, async_nats::Message) {
    let msg = tokio::time::timeout(DEADLINE, sub.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("subscription ended");
    (v1::Event::decode(msg.payload.clone()).unwrap(), msg)
}

fn deployment(name: &str) -> v1::ModelDeployment {
    v1::ModelDeployment {
        api_version: flotilla_proto::API_VERSION.into(),
        kind: "ModelDeployment".into(),
        metadata: Some(v1::ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn publish_raw(
    bus: &Bus,
    subject: String,
    payload: Bytes,
    content_type: Option<&str>,
    msg_id: Option<&str>,
) {
    let mut p = PublishMessage::build().payload(payload);
    if let Some(ct) = content_type {
        p = p.header(CONTENT_TYPE, ct);
    }
    if let Some(id) = msg_id {
        p = p.message_id(id);
    }
    bus.jetstream
        .send_publish(subject, p)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Starts a consumer of deployment applies that forwards every delivery to
/// the returned channel, answering with `decide`.
fn spawn_apply_consumer<F>(
    bus: &Bus,
    durable: &str,
    spec_tweak: impl FnOnce(&mut ConsumerSpec),
    decide: F,
) -> (
    mpsc::UnboundedReceiver<Delivery<v1::ModelDeployment>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
)
where
    F: Fn(&Delivery<v1::ModelDeployment>) -> Result<(), HandlerError> + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let mut spec = ConsumerSpec::new(
        &bus.topology.control.name,
        durable,
        vec![bus.subjects.control(ControlSubject::DeploymentApply)],
    );
    spec_tweak(&mut spec);
    let shutdown = CancellationToken::new();
    let handler = move |d: Delivery<v1::ModelDeployment>| {
        let result = decide(&d);
        let _ = tx.send(d);
        async move { result }
    };
    let bus = bus.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        run_consumer(&bus, spec, handler, stop).await.unwrap();
    });
    (rx, shutdown, task)
}

#[tokio::test]
async fn two_services_provisioning_at_once_both_start() {
    let server = NatsServer::start().await.unwrap();
    let (a, b) = (
        bus(&server, "placement").await,
        bus(&server, "rollout").await,
    );
    let (ra, rb) = tokio::join!(provision(&a), provision(&b));
    assert!(ra.unwrap().drifted.is_empty());
    assert!(rb.unwrap().drifted.is_empty());
    for def in a.topology.streams() {
        a.jetstream.get_stream(&def.name).await.unwrap();
    }
    for def in a.topology.buckets() {
        a.jetstream.get_key_value(&def.name).await.unwrap();
    }
    a.jetstream
        .get_object_store(&a.topology.model_artifacts.name)
        .await
        .unwrap();
    // And again, now that everything exists.
    assert!(provision(&a).await.unwrap().drifted.is_empty());
}

#[tokio::test]
async fn a_drifted_stream_is_reported_and_left_alone() {
    let server = NatsServer::start().await.unwrap();
    let bus = bus(&server, "inventory").await;
    // Someone created the telemetry stream by hand, with other limits.
    bus.jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: bus.topology.telemetry.name.clone(),
            subjects: bus.topology.telemetry.subjects.clone(),
            max_age: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut events = bus.client.subscribe("flotilla.events.bus.>").await.unwrap();

    let report = provision(&bus).await.unwrap();

    assert_eq!(report.drifted.len(), 1, "{report:?}");
    let drift = &report.drifted[0];
    assert_eq!(drift.name, "FLOTILLA_TELEMETRY");
    let fields: Vec<_> = drift.fields.iter().map(|f| f.field.as_str()).collect();
    assert!(
        fields.contains(&"max_age") && fields.contains(&"max_messages_per_subject"),
        "{fields:?}"
    );
    let (event, msg) = next_event(&mut events, "topology_drifted").await;
    assert_eq!(
        msg.subject.as_str(),
        "flotilla.events.bus.FLOTILLA_TELEMETRY.topology_drifted"
    );
    assert_eq!(event.r#type, "bus.topology_drifted");
    assert!(event.message.contains("max_age"), "{}", event.message);
    // Not silently changed.
    let mut stream = bus
        .jetstream
        .get_stream("FLOTILLA_TELEMETRY")
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_age,
        Duration::from_secs(60)
    );
}

#[tokio::test]
async fn malformed_protobuf_and_json_are_rejected_with_an_event_and_not_redelivered() {
    let (_server, bus) = provisioned("placement").await;
    let mut events = bus.client.subscribe("flotilla.events.bus.>").await.unwrap();
    let (mut handled, stop, task) =
        spawn_apply_consumer(&bus, "placement-apply", |_| {}, |_| Ok(()));
    let subject = bus.subjects.control(ControlSubject::DeploymentApply);

    // A truncated protobuf: field 3 (metadata) claims 5 bytes, has 1.
    publish_raw(
        &bus,
        subject.clone(),
        Bytes::from_static(&[0x1a, 0x05, 0x0a]),
        Some(PROTOBUF),
        Some("bad-proto"),
    )
    .await;
    let (event, msg) = next_event(&mut events, "rejection of the protobuf").await;
    assert_eq!(
        msg.subject.as_str(),
        "flotilla.events.bus.placement-apply.message_rejected"
    );
    let Some(Payload::Error(detail)) = event.payload else {
        panic!("no error detail: {event:?}")
    };
    assert_eq!(detail.code, "invalid_protobuf");
    assert_eq!(detail.subject, subject);
    assert_eq!(detail.field, "metadata");
    assert_eq!(event.correlation_id, "bad-proto");

    // JSON with a field of the wrong type, as `nats pub` sends it (no headers).
    let doc = r#"{"apiVersion":"flotilla.dev/v1alpha1","kind":"ModelDeployment","metadata":{"name":"x"},"spec":{"replicas":"four"}}"#;
    publish_raw(
        &bus,
        subject.clone(),
        Bytes::from_static(doc.as_bytes()),
        None,
        None,
    )
    .await;
    let (event, _) = next_event(&mut events, "rejection of the JSON").await;
    let Some(Payload::Error(detail)) = event.payload else {
        panic!("no error detail")
    };
    assert_eq!(detail.code, "invalid_json");
    assert_eq!(detail.field, "spec.replicas");
    assert!(detail.reason.contains("invalid type"), "{}", detail.reason);

    // Syntactically broken JSON, labelled as JSON.
    publish_raw(
        &bus,
        subject.clone(),
        Bytes::from_static(b"{\"metadata\": "),
        Some(JSON),
        None,
    )
    .await;
    let (event, _) = next_event(&mut events, "rejection of broken JSON").await;
    let Some(Payload::Error(detail)) = event.payload else {
        panic!("no error detail")
    };
    assert_eq!(detail.code, "invalid_json");
    assert!(detail.reason.contains("EOF"), "{}", detail.reason);

    // A good one after them is the first and only thing the handler sees.
    let good = serde_json::to_vec(&deployment("good")).unwrap();
    publish_raw(&bus, subject.clone(), Bytes::from(good), Some(JSON), None).await;
    let d = next(&mut handled, "the good message").await;
    assert_eq!(d.message.metadata.unwrap().name, "good");
    assert_eq!(d.attempt, 1);

    // The handler saw the good message before the loop acknowledged it:
    // wait (with a deadline) for that acknowledgement to land.
    let info = poll_until(
        Duration::from_secs(10),
        "acknowledgement of the good message",
        || async {
            let info = apply_consumer(&bus).await;
            (info.num_ack_pending == 0).then_some(info)
        },
    )
    .await;
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    assert_eq!(
        info.num_redelivered, 0,
        "rejected messages must not come back: {info:?}"
    );
    assert!(handled.try_recv().is_err());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_failing_handler_is_retried_with_backoff_then_dead_lettered() {
    let (_server, bus) = provisioned("placement").await;
    let mut events = bus.client.subscribe("flotilla.events.bus.>").await.unwrap();
    let (mut handled, stop, task) = spawn_apply_consumer(
        &bus,
        "placement-apply",
        |spec| {
            spec.max_deliveries = 3;
            spec.initial_backoff = Duration::from_millis(200);
        },
        |d| match d.message.metadata.as_ref().map(|m| m.name.as_str()) {
            Some("poison") => Err(HandlerError::retry("the store is unavailable")),
            _ => Ok(()),
        },
    );
    let subject = bus.subjects.control(ControlSubject::DeploymentApply);
    let poison = deployment("poison").encode_to_vec();
    publish_raw(
        &bus,
        subject.clone(),
        Bytes::from(poison.clone()),
        Some(PROTOBUF),
        Some("req-7"),
    )
    .await;

    let mut seen = Vec::new();
    for _ in 0..3 {
        let d = next(&mut handled, "a try").await;
        seen.push((d.attempt, Instant::now()));
    }
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let gaps: Vec<_> = seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(
        gaps[0] >= Duration::from_millis(200),
        "first retry too early: {gaps:?}"
    );
    assert!(
        gaps[1] >= Duration::from_millis(400),
        "backoff did not grow: {gaps:?}"
    );

    let (event, msg) = next_event(&mut events, "dead letter").await;
    assert_eq!(
        msg.subject.as_str(),
        "flotilla.events.bus.placement-apply.dead_lettered"
    );
    assert_eq!(event.correlation_id, "req-7");
    let Some(Payload::DeadLetter(letter)) = event.payload else {
        panic!("no dead letter")
    };
    assert_eq!(letter.deliveries, 3);
    assert_eq!(
        letter.payload, poison,
        "the dead letter carries the message whole"
    );
    assert_eq!(letter.subject, subject);
    assert_eq!(letter.last_error, "the store is unavailable");
    assert_eq!(
        letter.headers.get("Nats-Msg-Id").map(String::as_str),
        Some("req-7")
    );

    // It never comes back: the next message is the next thing handled.
    publish_raw(
        &bus,
        subject,
        Bytes::from(deployment("fine").encode_to_vec()),
        None,
        None,
    )
    .await;
    let d = next(&mut handled, "the next message").await;
    assert_eq!(d.message.metadata.unwrap().name, "fine");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_message_published_twice_with_one_msg_id_is_handled_once() {
    let (_server, bus) = provisioned("placement").await;
    let subject = bus.subjects.control(ControlSubject::DeploymentApply);
    let once = Bytes::from(deployment("once").encode_to_vec());
    publish_raw(
        &bus,
        subject.clone(),
        once.clone(),
        None,
        Some("apply-once-1"),
    )
    .await;
    publish_raw(&bus, subject.clone(), once, None, Some("apply-once-1")).await;
    publish_raw(
        &bus,
        subject,
        Bytes::from(deployment("marker").encode_to_vec()),
        None,
        Some("marker-1"),
    )
    .await;

    let (mut handled, stop, task) =
        spawn_apply_consumer(&bus, "placement-apply", |_| {}, |_| Ok(()));
    let first = next(&mut handled, "first message").await;
    assert_eq!(first.message.metadata.unwrap().name, "once");
    assert_eq!(first.msg_id.as_deref(), Some("apply-once-1"));
    // The stream is ordered: once the marker arrives, a duplicate would have too.
    let second = next(&mut handled, "marker").await;
    assert_eq!(second.message.metadata.unwrap().name, "marker");
    stop.cancel();
    task.await.unwrap();
    assert!(handled.try_recv().is_err());
}

/// A subject whose handler makes repeats harmless itself is left out of
/// the ledger; every other subject of the same consumer is recorded.
#[tokio::test]
async fn the_ledger_records_handled_messages_except_on_unrecorded_subjects() {
    let (_server, bus) = provisioned("placement").await;
    let recorded = bus.subjects.control(ControlSubject::DeploymentApply);
    let unrecorded = bus.subjects.control(ControlSubject::DeploymentDelete);
    let (mut handled, stop, task) = spawn_apply_consumer(
        &bus,
        "placement-apply",
        |spec| {
            spec.filter_subjects.push(unrecorded.clone());
            spec.unrecorded_subjects = vec![unrecorded.clone()];
        },
        |_| Ok(()),
    );
    for (subject, name) in [(&recorded, "recorded"), (&unrecorded, "unrecorded")] {
        publish_raw(
            &bus,
            subject.clone(),
            Bytes::from(deployment(name).encode_to_vec()),
            None,
            None,
        )
        .await;
    }
    let mut sequences = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let d = next(&mut handled, "a message").await;
        sequences.insert(d.message.metadata.unwrap().name, d.stream_sequence);
    }
    // Both acknowledged: whatever the ledger gets, it got before the ack.
    poll_until(DEADLINE, "both messages acknowledged", || async {
        let info = apply_consumer(&bus).await;
        (info.ack_floor.stream_sequence >= sequences["unrecorded"].max(sequences["recorded"]))
            .then_some(())
    })
    .await;
    let ledger = bus
        .jetstream
        .get_key_value(&bus.topology.handled.name)
        .await
        .unwrap();
    let key = |seq: u64| format!("{}.placement-apply.{seq}", bus.topology.control.name);
    assert!(
        ledger
            .get(key(sequences["recorded"]))
            .await
            .unwrap()
            .is_some(),
        "the recorded subject's message is in the ledger"
    );
    assert!(
        ledger
            .get(key(sequences["unrecorded"]))
            .await
            .unwrap()
            .is_none(),
        "the unrecorded subject's message is not"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn trace_context_continues_into_the_handler_and_onto_what_it_publishes() {
    let (_server, bus) = provisioned("placement").await;
    let mut events = bus
        .client
        .subscribe("flotilla.events.deployment.>")
        .await
        .unwrap();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let (tx, mut seen) = mpsc::unbounded_channel();
    let publisher = bus.clone();
    let handler = move |d: Delivery<v1::ModelDeployment>| {
        let tx = tx.clone();
        let publisher = publisher.clone();
        async move {
            let _ = tx.send((d.trace.clone(), TraceContext::current()));
            let name = d.message.metadata.map(|m| m.name).unwrap_or_default();
            publisher
                .publish_event(EventDraft::new(
                    EventType::DeploymentAccepted,
                    &name,
                    "accepted",
                ))
                .await
                .map_err(HandlerError::retry)
        }
    };
    let spec = ConsumerSpec::new(
        "FLOTILLA_CONTROL",
        "placement-apply",
        vec![bus.subjects.control(ControlSubject::DeploymentApply)],
    );
    let stop = CancellationToken::new();
    let task = {
        let (bus, stop) = (bus.clone(), stop.clone());
        tokio::spawn(async move { run_consumer(&bus, spec, handler, stop).await.unwrap() })
    };

    let p = PublishMessage::build()
        .payload(Bytes::from(deployment("traced").encode_to_vec()))
        .header("traceparent", incoming);
    bus.jetstream
        .send_publish(bus.subjects.control(ControlSubject::DeploymentApply), p)
        .await
        .unwrap()
        .await
        .unwrap();

    let (trace, current) = next(&mut seen, "handler").await;
    assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(trace.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
    assert_eq!(current.as_ref(), Some(&trace));
    let (_, msg) = next_event(&mut events, "accepted event").await;
    let header = msg
        .headers
        .unwrap()
        .get("traceparent")
        .unwrap()
        .as_str()
        .to_string();
    let published = TraceContext::parse(&header).unwrap();
    assert_eq!(published.trace_id, trace.trace_id);
    assert_eq!(published.span_id, trace.span_id);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_consumer_keeps_working_across_kill_9_and_restart_of_the_server() {
    let (mut server, bus) = provisioned("placement").await;
    let (mut handled, stop, task) =
        spawn_apply_consumer(&bus, "placement-apply", |_| {}, |_| Ok(()));
    let subject = bus.subjects.control(ControlSubject::DeploymentApply);

    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..20 {
        let id = format!("before-{i}");
        publish_raw(
            &bus,
            subject.clone(),
            Bytes::from(deployment(&id).encode_to_vec()),
            None,
            Some(&id),
        )
        .await;
    }
    for _ in 0..20 {
        let d = next(&mut handled, "messages before the kill").await;
        *counts.entry(d.message.metadata.unwrap().name).or_default() += 1;
    }

    // Wait until the server has recorded every ack (the handler reports a
    // message before the loop acks it), so "acked" is known for each.
    poll_until(DEADLINE, "record of every ack", || async {
        let info = apply_consumer(&bus).await;
        (info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= 20).then_some(())
    })
    .await;

    server.kill().await.unwrap();
    server.restart().await.unwrap();

    // The client reconnects by itself; publish as soon as the stream answers.
    let deadline = Instant::now() + DEADLINE;
    for i in 0..20 {
        let id = format!("after-{i}");
        let left = deadline.saturating_duration_since(Instant::now());
        poll_until(left, "publish stored after the restart", || async {
            let p = PublishMessage::build()
                .payload(Bytes::from(deployment(&id).encode_to_vec()))
                .message_id(&id);
            match bus.jetstream.send_publish(subject.clone(), p).await {
                Ok(ack) => ack.await.ok().map(|_| ()),
                Err(_) => None,
            }
        })
        .await;
    }
    while counts.len() < 40 {
        let d = next(&mut handled, "messages after the restart").await;
        *counts.entry(d.message.metadata.unwrap().name).or_default() += 1;
    }
    stop.cancel();
    task.await.unwrap();
    while let Ok(d) = handled.try_recv() {
        *counts.entry(d.message.metadata.unwrap().name).or_default() += 1;
    }
    assert_eq!(counts.len(), 40);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "acked messages handled twice: {twice:?}");
}

#[tokio::test]
async fn listing_records_while_one_is_rewritten_names_each_once() {
    let (_server, bus) = provisioned("test").await;
    let store: flotilla_kit::RecordStore<v1::ModelDeployment> =
        flotilla_kit::RecordStore::open(&bus, &bus.topology.deployments.name)
            .await
            .unwrap();
    let named = |name: &str, replicas: i32| {
        let mut d: v1::ModelDeployment = serde_json::from_str(&format!(
            r#"{{"metadata": {{"name": "{name}"}}, "spec": {{"model": {{"preset": "p"}}}}}}"#
        ))
        .unwrap();
        if let Some(spec) = d.spec.as_mut() {
            spec.replicas = replicas;
        }
        d
    };
    for name in ["a", "b", "c"] {
        store.update(name, |_| Some(named(name, 1))).await.unwrap();
    }
    // A writer rewriting `b` as fast as it can, as placement does with a
    // deployment's status right after accepting it.
    let writer = store.clone();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let rewrites = tokio::spawn(async move {
        let mut n = 1;
        while !stopped.is_cancelled() {
            n += 1;
            writer.update("b", |_| Some(named("b", n))).await.unwrap();
        }
        n
    });
    for _ in 0..200 {
        let names: Vec<String> = store
            .list()
            .await
            .unwrap()
            .iter()
            .filter_map(|d| d.metadata.as_ref().map(|m| m.name.clone()))
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
    stop.cancel();
    assert!(
        rewrites.await.unwrap() > 10,
        "b was rewritten during the listings"
    );
}
