//! One message's way through the consumer loop: skip it if the ledger
//! says it was finished, decode it, run the handler while telling the server
//! it is in progress, then acknowledge it, send it back with a backoff, or
//! settle it with the event that explains why (refused, dead-lettered).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, kv};
use flotilla_proto::EventType;
use flotilla_proto::codec::{self, CONTENT_TYPE, Contract};
use flotilla_proto::v1::{self, event::Payload};
use tracing::Instrument;

use super::{ConsumerSpec, Delivery, Handler, HandlerError};
use crate::names::Names;
use crate::trace::{TRACEPARENT, TraceContext};
use crate::{Bus, EventDraft};

fn ledger_key(spec: &ConsumerSpec, stream_sequence: u64) -> String {
    format!("{}.{}.{stream_sequence}", spec.stream, spec.durable)
}

/// Records that a message is finished, before it is acknowledged.
async fn remember(ledger: Option<&kv::Store>, spec: &ConsumerSpec, stream_sequence: u64) {
    if let Some(ledger) = ledger
        && let Err(e) = ledger
            .put(ledger_key(spec, stream_sequence), bytes::Bytes::new())
            .await
    {
        tracing::warn!("could not record the message as handled; a crash now could repeat it: {e}");
    }
}

/// The span one message is handled in. What the message is about is empty
/// until it is decoded, then filled by [`Names::record`].
fn message_span(
    spec: &ConsumerSpec,
    subject: &str,
    attempt: u32,
    stream_sequence: u64,
    trace: &TraceContext,
) -> tracing::Span {
    tracing::info_span!(
        "message",
        consumer = %spec.durable,
        %subject,
        attempt,
        stream_sequence,
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        parent_span_id = trace.parent_span_id.as_deref().unwrap_or(""),
        deployment = tracing::field::Empty,
        cluster = tracing::field::Empty,
        replica = tracing::field::Empty,
        model = tracing::field::Empty,
        generation = tracing::field::Empty,
    )
}

pub(super) async fn process<M, H>(
    bus: &Bus,
    spec: &ConsumerSpec,
    ledger: Option<&kv::Store>,
    handler: &H,
    message: jetstream::Message,
) where
    M: Contract,
    H: Handler<M>,
{
    let (attempt, stream_sequence) = match message.info() {
        Ok(info) => (
            u32::try_from(info.delivered).unwrap_or(u32::MAX).max(1),
            info.stream_sequence,
        ),
        Err(_) => (1, 0),
    };
    let subject = message.subject.to_string();
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let ledger = ledger.filter(|_| !spec.unrecorded_subjects.contains(&subject));
    let trace = TraceContext::continue_from(header(TRACEPARENT).as_deref());
    let span = message_span(spec, &subject, attempt, stream_sequence, &trace);
    let names_span = span.clone();
    async {
        if let Some(ledger) = ledger {
            match ledger.get(ledger_key(spec, stream_sequence)).await {
                Ok(Some(_)) => {
                    tracing::info!("already handled before a restart; acknowledging again");
                    bus.metrics.count(&spec.durable, "duplicate");
                    if let Err(e) = message.double_ack().await {
                        tracing::warn!("ack not confirmed: {e}");
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("cannot check whether it was handled; trying later: {e}");
                    let _ = message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await;
                    return;
                }
            }
        }
        let outcome = match codec::decode::<M>(header(CONTENT_TYPE).as_deref(), &message.payload) {
            Err(e) => Err(HandlerError::Invalid {
                field: e.field.clone(),
                reason: e.to_string(),
            })
            .map_err(|err| (err, e.code)),
            Ok(decoded) => {
                Names::of(&decoded).record(&names_span);
                let delivery = Delivery {
                    message: decoded,
                    subject: subject.clone(),
                    msg_id: header("Nats-Msg-Id"),
                    attempt,
                    stream_sequence,
                    trace: trace.clone(),
                };
                run_with_progress(
                    spec,
                    &message,
                    trace.clone().scope(handler.handle(delivery)),
                )
                .await
                .map_err(|err| (err, "invalid_message"))
            }
        };
        match outcome {
            Ok(()) => {
                bus.metrics.count(&spec.durable, "handled");
                remember(ledger, spec, stream_sequence).await;
                let acked = if spec.confirm_acks {
                    message.double_ack().await
                } else {
                    message.ack().await
                };
                if let Err(e) = acked {
                    tracing::warn!("ack not confirmed, the server may redeliver: {e}");
                }
            }
            Err((HandlerError::Invalid { field, reason }, code)) => {
                tracing::warn!(
                    field = field.as_deref().unwrap_or(""),
                    "message rejected: {reason}"
                );
                bus.metrics.count(&spec.durable, "rejected");
                let detail = v1::ErrorDetail {
                    code: code.to_string(),
                    subject: subject.clone(),
                    field: field.unwrap_or_default(),
                    reason: reason.clone(),
                    stream_sequence,
                    consumer: spec.durable.clone(),
                };
                let draft = EventDraft::new(
                    EventType::BusMessageRejected,
                    &spec.durable,
                    format!("message on {subject} rejected: {reason}"),
                )
                .payload(Payload::Error(detail))
                .correlation_id(header("Nats-Msg-Id").unwrap_or_default())
                .id(format!("{}.rejected", ledger_key(spec, stream_sequence)));
                settle_after_event(bus, spec, ledger, stream_sequence, &message, draft).await;
            }
            Err((HandlerError::Retry(reason), _)) if attempt >= spec.max_deliveries => {
                tracing::error!(
                    tries = attempt,
                    "handler failed on the last try; dead-lettering: {reason}"
                );
                bus.metrics.count(&spec.durable, "dead_lettered");
                let headers: BTreeMap<String, String> = message
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .map(|(k, v)| {
                        let joined = v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",");
                        (k.to_string(), joined)
                    })
                    .collect();
                let letter = v1::DeadLetter {
                    subject: subject.clone(),
                    payload: message.payload.to_vec(),
                    headers,
                    deliveries: attempt,
                    last_error: reason.clone(),
                    consumer: spec.durable.clone(),
                    stream_sequence,
                };
                let draft = EventDraft::new(
                    EventType::BusDeadLettered,
                    &spec.durable,
                    format!("message on {subject} failed {attempt} times, last: {reason}"),
                )
                .payload(Payload::DeadLetter(letter))
                .correlation_id(header("Nats-Msg-Id").unwrap_or_default())
                .id(format!(
                    "{}.dead_lettered",
                    ledger_key(spec, stream_sequence)
                ));
                settle_after_event(bus, spec, ledger, stream_sequence, &message, draft).await;
            }
            Err((HandlerError::Retry(reason), _)) => {
                let delay = spec.backoff(attempt);
                tracing::warn!(tries = attempt, retry_in = ?delay, "handler failed: {reason}");
                bus.metrics.count(&spec.durable, "retried");
                if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!("nak failed, the server redelivers after ack-wait: {e}");
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Publishes the event that explains a message's fate, then terminates the
/// message; if the event cannot be published the message is nak'd so it
/// comes back instead of vanishing. The event id is fixed per message, so a
/// repeat after a crash is dropped by the stream.
async fn settle_after_event(
    bus: &Bus,
    spec: &ConsumerSpec,
    ledger: Option<&kv::Store>,
    stream_sequence: u64,
    message: &jetstream::Message,
    draft: EventDraft,
) {
    match bus.publish_event(draft).await {
        Ok(()) => {
            remember(ledger, spec, stream_sequence).await;
            if let Err(e) = message.double_ack_with(AckKind::Term).await {
                tracing::warn!("settling the message not confirmed: {e}");
            }
        }
        Err(e) => {
            tracing::error!(
                "could not publish the event for this message, it will be redelivered: {e}"
            );
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

/// Runs the handler, telling the server every third of `ack_wait` that the
/// message is still being worked on.
async fn run_with_progress<F>(
    spec: &ConsumerSpec,
    message: &jetstream::Message,
    work: F,
) -> Result<(), HandlerError>
where
    F: Future<Output = Result<(), HandlerError>>,
{
    let tick = (spec.ack_wait / 3).max(Duration::from_millis(100));
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return result,
            _ = tokio::time::sleep(tick) => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    /// Keeps every field value recorded on a span after it was created.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<(String, String)>>>);

    impl Visit for Recorded {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            crate::sync::lock(&self.0).push((field.name().to_string(), format!("{value:?}")));
        }
    }

    impl Subscriber for Recorded {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, values: &Record<'_>) {
            values.record(&mut self.clone());
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, _: &Event<'_>) {}
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn the_message_span_takes_every_name_a_contract_carries() {
        let recorded = Recorded::default();
        let command = v1::ExecutorCommand {
            cluster: "gpu-a".into(),
            deployment: "chat".into(),
            generation: 7,
            action: Some(v1::executor_command::Action::Start(v1::StartReplica {
                replica_id: "chat-gpu-a-0".into(),
                model: Some(v1::ModelRef {
                    name: "smollm2".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        tracing::subscriber::with_default(recorded.clone(), || {
            let spec = ConsumerSpec::new("COMMANDS", "executor-gpu-a-replicas", vec![]);
            let span = message_span(
                &spec,
                "flotilla.cmd.gpu-a.start",
                1,
                9,
                &TraceContext::new_root(),
            );
            Names::of(&command).record(&span);
        });
        let mut got = crate::sync::lock(&recorded.0).clone();
        got.sort();
        let want: Vec<(String, String)> = [
            ("cluster", "\"gpu-a\""),
            ("deployment", "\"chat\""),
            ("generation", "7"),
            ("model", "\"smollm2\""),
            ("replica", "\"chat-gpu-a-0\""),
        ]
        .iter()
        .map(|(f, v)| (f.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
    }
}
