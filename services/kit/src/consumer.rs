//! The one consumer loop every service reads the bus with.
//!
//! Over a durable pull consumer, for each message:
//!
//! 1. decode it as `M` (protobuf, or JSON by `Content-Type`); if it cannot
//!    be decoded, publish `bus.message_rejected` naming the subject, the
//!    field when known and the reason, and terminate it: no redelivery loop;
//! 2. run the handler inside a span that continues the message's
//!    `traceparent`, telling the server the message is in progress while it
//!    runs long;
//! 3. `Ok` → acknowledge and wait for the server to confirm;
//!    [`HandlerError::Invalid`] → rejected as in 1;
//!    [`HandlerError::Retry`] → redelivered after a backoff, and after
//!    `max_deliveries` tries published whole as `bus.dead_lettered` and
//!    terminated.
//!
//! Nothing is dropped silently: a message whose event cannot be published
//! is not acknowledged, so it comes back. Nothing finished is handled twice:
//! a server that crashes may forget an acknowledgement it confirmed, so the
//! loop records each finished message in KV `handled` before acknowledging
//! it and skips a redelivery it finds there. The loop survives a server restart
//! by recreating its subscription. On shutdown it finishes the message in
//! hand, acknowledges or naks it, and returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull, kv};
use flotilla_proto::EventType;
use flotilla_proto::codec::{self, CONTENT_TYPE, Contract};
use flotilla_proto::v1::{self, event::Payload};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::trace::{TRACEPARENT, TraceContext};
use crate::{Bus, EventDraft, KitError};

/// Where a consumer reads and how it retries.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    /// Durable name; also `<name>` in the consumer's `bus.*` events.
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// Tries before a failing message is dead-lettered.
    pub max_deliveries: u32,
    /// Delay before the first retry; doubles per try up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long the server waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Wait for the server to confirm each acknowledgement. Off only for
    /// frequent idempotent messages: an unconfirmed ack that is lost means
    /// one redelivery, which such a handler ignores.
    pub confirm_acks: bool,
    /// Messages handled at once. 1 keeps the stream's order; more is for
    /// messages whose handler tolerates reordering (heartbeats carry a
    /// sequence) and where round trips would otherwise limit throughput.
    pub max_in_flight: usize,
    /// Record finished messages in KV `handled` and skip their
    /// redeliveries. Off only for messages whose handling is idempotent and
    /// frequent (heartbeats), to save two KV round trips each.
    pub remember_handled: bool,
}

impl ConsumerSpec {
    pub fn new(stream: &str, durable: &str, filter_subjects: Vec<String>) -> Self {
        Self {
            stream: stream.to_string(),
            durable: durable.to_string(),
            filter_subjects,
            max_deliveries: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            ack_wait: Duration::from_secs(30),
            remember_handled: true,
            max_in_flight: 1,
            confirm_acks: true,
        }
    }

    /// The delay before redelivery after failed try number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// One message handed to a handler.
#[derive(Debug, Clone)]
pub struct Delivery<M> {
    pub message: M,
    pub subject: String,
    /// The `Nats-Msg-Id` header: the idempotency key, when the publisher set one.
    pub msg_id: Option<String>,
    /// 1 on first delivery.
    pub attempt: u32,
    pub stream_sequence: u64,
    pub trace: TraceContext,
}

/// Why a handler did not finish a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The message is wrong and always will be: rejected, never retried.
    #[error("invalid{}: {reason}", field.as_ref().map(|f| format!(" field {f}")).unwrap_or_default())]
    Invalid {
        field: Option<String>,
        reason: String,
    },
    /// Something else failed (a store, a peer): try again later.
    #[error("{0}")]
    Retry(String),
}

impl HandlerError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.into()),
            reason: reason.into(),
        }
    }

    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Self::Retry(reason.to_string())
    }
}

/// What a service does with each message of one type.
pub trait Handler<M>: Send + Sync + 'static {
    fn handle(
        &self,
        delivery: Delivery<M>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

impl<M, F, Fut> Handler<M> for F
where
    M: Send + 'static,
    F: Fn(Delivery<M>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    fn handle(
        &self,
        delivery: Delivery<M>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self(delivery)
    }
}

/// Reads `spec` until `shutdown`, handing each message to `handler`.
pub async fn run_consumer<M, H>(
    bus: &Bus,
    spec: ConsumerSpec,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), KitError>
where
    M: Contract,
    H: Handler<M>,
{
    flotilla_proto::Subjects::default()
        .event(EventType::BusMessageRejected, &spec.durable)
        .map_err(|e| KitError::Consumer {
            stream: spec.stream.clone(),
            consumer: spec.durable.clone(),
            reason: e.to_string(),
        })?;
    let mut retry_delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let opened = match open(bus, &spec).await {
            Ok(m) => {
                retry_delay = Duration::from_millis(100);
                m
            }
            Err(reason) => {
                tracing::warn!(consumer = %spec.durable, stream = %spec.stream, retry_in = ?retry_delay, "cannot open consumer: {reason}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(retry_delay) => {}
                }
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (messages, ledger) = opened;
        tokio::pin!(messages);
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let limit = spec.max_in_flight.max(1);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                next = messages.next(), if in_flight.len() < limit => match next {
                    Some(Ok(message)) => in_flight.push(process(bus, &spec, ledger.as_ref(), &handler, message)),
                    Some(Err(e)) => {
                        // Missed heartbeats and the like: the server went
                        // away or the consumer is gone. Open it again.
                        tracing::warn!(consumer = %spec.durable, "consumer stream interrupted: {e}; reopening");
                        break;
                    }
                    None => break,
                },
            }
        }
        // Messages in hand are finished and settled before anything else.
        while in_flight.next().await.is_some() {}
    }
    tracing::info!(consumer = %spec.durable, "consumer stopped");
    Ok(())
}

async fn open(bus: &Bus, spec: &ConsumerSpec) -> Result<(pull::Stream, Option<kv::Store>), String> {
    let ledger = if spec.remember_handled {
        let name = &bus.topology.handled.name;
        Some(
            bus.jetstream
                .get_key_value(name)
                .await
                .map_err(|e| format!("KV {name}: {e}"))?,
        )
    } else {
        None
    };
    let stream = bus
        .jetstream
        .get_stream(&spec.stream)
        .await
        .map_err(|e| e.to_string())?;
    let config = pull::Config {
        durable_name: Some(spec.durable.clone()),
        filter_subjects: spec.filter_subjects.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // Unlimited on the server: the loop dead-letters after
        // max_deliveries itself, with an event, so the server never drops a
        // message on its own.
        max_deliver: -1,
        ..Default::default()
    };
    let consumer = stream
        .get_or_create_consumer(&spec.durable, config)
        .await
        .map_err(|e| e.to_string())?;
    let messages = consumer
        .stream()
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    Ok((messages, ledger))
}

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

async fn process<M, H>(
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
    let trace = TraceContext::continue_from(header(TRACEPARENT).as_deref());
    let span = tracing::info_span!(
        "message",
        consumer = %spec.durable,
        %subject,
        attempt,
        stream_sequence,
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        parent_span_id = trace.parent_span_id.as_deref().unwrap_or(""),
    );
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
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut spec = ConsumerSpec::new("S", "c", vec![]);
        spec.initial_backoff = Duration::from_millis(100);
        spec.max_backoff = Duration::from_millis(500);
        let delays: Vec<_> = (1..=5).map(|a| spec.backoff(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
        assert_eq!(spec.backoff(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn handler_errors_read_well() {
        assert_eq!(
            HandlerError::invalid("spec.replicas", "must not be negative").to_string(),
            "invalid field spec.replicas: must not be negative"
        );
    }
}
