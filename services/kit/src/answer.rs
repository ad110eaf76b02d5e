//! Waiting for the event that answers a request published on a control
//! subject: events carry the request id as their correlation id. Shared by
//! every client of the bus path (the CLI, the gRPC control API).

use std::time::Duration;

use flotilla_proto::EventType;
use flotilla_proto::codec::decode_protobuf;
use flotilla_proto::v1::{self, event::Payload};
use futures::StreamExt;

/// How a request ended.
#[derive(Debug)]
pub enum Answer {
    /// One of the `done` events.
    Done(v1::Event),
    /// One of the `failed` events, or the consumer loop's rejection.
    Refused(v1::Event),
    /// The subscription ended.
    Lost,
    /// Nothing answered within the deadline.
    TimedOut,
}

/// Waits on `events` (subscribed before the request was published) for the
/// first `done` or `failed` event correlated with `request_id`; a
/// `bus.message_rejected` for it counts as refused.
pub async fn wait_for_answer(
    events: &mut async_nats::Subscriber,
    request_id: &str,
    done: &[EventType],
    failed: &[EventType],
    deadline: Duration,
) -> Answer {
    let is = |event: &v1::Event, types: &[EventType]| {
        types.iter().any(|t| event.r#type == t.to_string())
    };
    let wait = async {
        while let Some(msg) = events.next().await {
            let Ok(event) = decode_protobuf::<v1::Event>(&msg.payload) else {
                continue;
            };
            if event.correlation_id != request_id {
                continue;
            }
            if is(&event, done) {
                return Answer::Done(event);
            }
            if is(&event, failed) || is(&event, &[EventType::BusMessageRejected]) {
                return Answer::Refused(event);
            }
        }
        Answer::Lost
    };
    tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or(Answer::TimedOut)
}

/// The field an event refused, when it names one, and why.
pub fn refusal(event: &v1::Event) -> (Option<String>, String) {
    match &event.payload {
        Some(Payload::Error(e)) if !e.field.is_empty() => (Some(e.field.clone()), e.reason.clone()),
        Some(Payload::Error(e)) => (None, e.reason.clone()),
        _ => (None, event.message.clone()),
    }
}

/// Why an event refused something: `field: reason` when it names a field.
pub fn error_reason(event: &v1::Event) -> String {
    match refusal(event) {
        (Some(field), reason) => format!("{field}: {reason}"),
        (None, reason) => reason,
    }
}
