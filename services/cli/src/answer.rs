//! Waiting for the event that answers a request the CLI published: events
//! carry the request id as their correlation id.

use std::time::Duration;

use flotilla_proto::EventType;
use flotilla_proto::v1::{self, event::Payload};
use futures::StreamExt;
use prost::Message;

/// How a request ended.
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
            let Ok(event) = v1::Event::decode(msg.payload) else {
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

/// Why an event refused something: the field and reason when it says so.
pub fn error_reason(event: &v1::Event) -> String {
    match &event.payload {
        Some(Payload::Error(e)) if !e.field.is_empty() => format!("{}: {}", e.field, e.reason),
        Some(Payload::Error(e)) => e.reason.clone(),
        _ => event.message.clone(),
    }
}
