//! The one consumer loop every service reads the bus with.
//!
//! Over a durable pull consumer, for each message:
//!
//! 1. decode it as `M` (protobuf, or JSON by `Content-Type`); if it cannot
//!    be decoded, publish `bus.message_rejected` naming the subject, the
//!    field when known and the reason, and terminate it: no redelivery loop;
//! 2. run the handler inside a span that continues the message's
//!    `traceparent` and names what the message is about (deployment,
//!    cluster, replica, model, generation), telling the server the message
//!    is in progress while it runs long;
//! 3. `Ok` → acknowledge and wait for the server to confirm;
//!    [`HandlerError::Invalid`] → rejected as in 1;
//!    [`HandlerError::Retry`] → redelivered after a jittered backoff
//!    ([`ConsumerSpec::retry_backoff`]), and after
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
//!
//! A service starts each consumer with [`spawn_consumer`]; [`run_consumer`]
//! is the loop itself, for a task that does more than consume.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv};
use flotilla_proto::codec::Contract;
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::trace::TraceContext;
use crate::{Backoff, Bus, KitError};

mod message;

/// Waits before opening a consumer again after the server refused or lost it.
const REOPEN_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// How long a message handed to a consumer that died stays with it before
/// the server redelivers it (to a restarted or a second instance). A
/// handler that runs longer keeps its message with progress acks, so this
/// bounds recovery from a crash, not how long work may take.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(10);

/// Where a consumer reads and how it retries.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    /// Durable name; also `<name>` in the consumer's `bus.*` events.
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// Tries before a failing message is dead-lettered.
    pub max_deliveries: u32,
    /// Shortest delay before the first retry. Try `n` waits at least
    /// `initial_backoff * 2^(n-1)` and at most twice that, drawn at random
    /// in between so failing messages do not come back in step; no delay
    /// is longer than `max_backoff`. See [`Self::retry_backoff`].
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
    /// Subjects among `filter_subjects` whose messages the ledger leaves
    /// out although `remember_handled`: their handler makes a repeat
    /// harmless itself (a compare-and-set on what it changes), so the two
    /// KV round trips would buy nothing. Exact subjects.
    pub unrecorded_subjects: Vec<String>,
    /// A consumer of this process's own (`<durable>-<process id>` on the
    /// server; events still say `<durable>`) rather than one shared by
    /// every instance. For state every instance keeps in memory (who was
    /// heard from when).
    pub own_instance: Option<OwnConsumer>,
}

/// How a consumer of one process's own starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnConsumer {
    /// It first delivers what was published this long before it was
    /// created, not the whole stream.
    pub replay: Duration,
    /// The server removes it this long after the process stopped asking.
    pub idle: Duration,
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
            ack_wait: DEFAULT_ACK_WAIT,
            remember_handled: true,
            unrecorded_subjects: Vec::new(),
            max_in_flight: 1,
            confirm_acks: true,
            own_instance: None,
        }
    }

    /// A consumer of one control subject (`<prefix>.control.<which>`) on
    /// the control stream: how every service reads the requests it answers.
    pub fn control(bus: &Bus, durable: &str, which: ControlSubject) -> Self {
        Self::new(
            &bus.topology.control.name,
            durable,
            vec![bus.subjects.control(which)],
        )
    }

    /// How long a failed message waits before it is redelivered: a
    /// [`Backoff`] whose first ceiling is twice `initial_backoff`, so a retry
    /// never comes before `initial_backoff` (doubled per try) while below
    /// the cap.
    pub fn retry_backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff.saturating_mul(2), self.max_backoff)
    }

    /// The delay before redelivery after failed try number `attempt`
    /// (1-based), with jitter: see [`Self::retry_backoff`].
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.retry_backoff().delay(attempt)
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

/// Runs [`run_consumer`] on a task of its own: the one way a service starts
/// a consumer.
///
/// `state` is what the handler works with (the service's shared struct, a
/// channel sender, a tuple of both); it is cloned for each message and
/// handed to `handle` with the delivery, so `handle` can be a method:
///
/// ```no_run
/// # use flotilla_kit::{Bus, ConsumerSpec, Delivery, HandlerError, spawn_consumer};
/// # use flotilla_proto::{ControlSubject, v1};
/// # async fn start(bus: Bus, shutdown: tokio_util::sync::CancellationToken) {
/// #[derive(Clone)]
/// struct Inventory;
///
/// impl Inventory {
///     async fn on_cordon(&self, _d: Delivery<v1::CordonCluster>) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
///
/// let cordon = spawn_consumer(
///     &bus,
///     ConsumerSpec::control(&bus, "inventory-cordon", ControlSubject::ClusterCordon),
///     Inventory,
///     |inv: Inventory, d| async move { inv.on_cordon(d).await },
///     shutdown.clone(),
/// );
/// # }
/// ```
///
/// The task ends when `shutdown` is cancelled; its result is the loop's.
pub fn spawn_consumer<M, S, F, Fut>(
    bus: &Bus,
    spec: ConsumerSpec,
    state: S,
    handle: F,
    shutdown: CancellationToken,
) -> JoinHandle<Result<(), KitError>>
where
    M: Contract,
    S: Clone + Send + Sync + 'static,
    F: Fn(S, Delivery<M>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send,
{
    let bus = bus.clone();
    tokio::spawn(async move {
        let handler = move |d: Delivery<M>| handle(state.clone(), d);
        run_consumer(&bus, spec, handler, shutdown).await
    })
}

/// Reads `spec` until `shutdown`, handing each message to `handler`. Each
/// message is handled inside a span named `message` carrying the consumer,
/// subject, stream sequence, try, trace ids and what the message is about
/// (its deployment, cluster, replica, model and generation: see
/// [`crate::names`]).
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
        .map_err(|e| consumer_error(&spec, e))?;
    let mut failed_opens = 0u32;
    while !shutdown.is_cancelled() {
        let opened = match open(bus, &spec).await {
            Ok(m) => {
                failed_opens = 0;
                m
            }
            Err(e) => {
                failed_opens = failed_opens.saturating_add(1);
                let retry_in = REOPEN_BACKOFF.delay(failed_opens);
                tracing::warn!(consumer = %spec.durable, stream = %spec.stream, ?retry_in, "cannot open consumer: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(retry_in) => {}
                }
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
                    Some(Ok(message)) => in_flight.push(message::process(bus, &spec, ledger.as_ref(), &handler, message)),
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

/// This process's id among the instances of its service.
fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string())
}

fn consumer_error(spec: &ConsumerSpec, e: impl Into<crate::BoxError>) -> KitError {
    KitError::Consumer {
        stream: spec.stream.clone(),
        consumer: spec.durable.clone(),
        source: e.into(),
    }
}

async fn open(
    bus: &Bus,
    spec: &ConsumerSpec,
) -> Result<(pull::Stream, Option<kv::Store>), KitError> {
    let ledger = if spec.remember_handled {
        let name = &bus.topology.handled.name;
        Some(
            bus.jetstream
                .get_key_value(name)
                .await
                .map_err(|e| KitError::Store {
                    bucket: name.clone(),
                    key: String::new(),
                    source: e.into(),
                })?,
        )
    } else {
        None
    };
    let stream = bus
        .jetstream
        .get_stream(&spec.stream)
        .await
        .map_err(|e| consumer_error(spec, e))?;
    let name = match spec.own_instance {
        Some(_) => format!("{}-{}", spec.durable, process_id()),
        None => spec.durable.clone(),
    };
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subjects: spec.filter_subjects.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // Unlimited on the server: the loop dead-letters after
        // max_deliveries itself, with an event, so the server never drops a
        // message on its own.
        max_deliver: -1,
        ..Default::default()
    };
    let config = match spec.own_instance {
        Some(own) => pull::Config {
            inactive_threshold: own.idle,
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::now_utc() - own.replay,
            },
            ..config
        },
        None => config,
    };
    let consumer = stream
        .get_or_create_consumer(&name, config)
        .await
        .map_err(|e| consumer_error(spec, e))?;
    let messages = consumer
        .stream()
        // Only what the loop will handle now: a message waiting here gets
        // no progress acks, and would be redelivered to another instance
        // after the ack wait while still queued in this one.
        .max_messages_per_batch(spec.max_in_flight.max(1))
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| consumer_error(spec, e))?;
    Ok((messages, ledger))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut spec = ConsumerSpec::new("S", "c", vec![]);
        spec.initial_backoff = Duration::from_millis(100);
        spec.max_backoff = Duration::from_millis(500);
        let ceilings: Vec<_> = (1..=5)
            .map(|a| spec.retry_backoff().ceiling(a).as_millis())
            .collect();
        assert_eq!(ceilings, vec![200, 400, 500, 500, 500]);
        assert_eq!(
            spec.retry_backoff().ceiling(u32::MAX),
            Duration::from_millis(500)
        );
        // Each delay is drawn below its ceiling, never under half of it:
        // below the cap, never before initial_backoff doubled per try.
        for (attempt, ceiling) in (1..=5).zip(ceilings) {
            let delay = spec.backoff(attempt).as_millis();
            assert!(
                (ceiling / 2..=ceiling).contains(&delay),
                "try {attempt}: {delay} ms"
            );
        }
        assert!(spec.backoff(1) >= Duration::from_millis(100));
        assert!(spec.backoff(2) >= Duration::from_millis(200));
        assert!(spec.backoff(u32::MAX) <= Duration::from_millis(500));
    }

    #[test]
    fn handler_errors_read_well() {
        assert_eq!(
            HandlerError::invalid("spec.replicas", "must not be negative").to_string(),
            "invalid field spec.replicas: must not be negative"
        );
    }
}
