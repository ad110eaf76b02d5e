//! Asking the fleet something and waiting for its answer: a request is
//! published on a control subject with a request id, and the service that
//! handles it answers with an event whose correlation id is that request
//! id. Shared by every client of the bus path (the CLI, the gRPC control
//! API).
//!
//! [`ask`] does the whole round trip. [`Pending`] is the request in flight,
//! for a client that waits for more than one answer or matches answers its
//! own way.

use std::time::Duration;

use flotilla_proto::codec::{Contract, decode_protobuf};
use flotilla_proto::v1::{self, event::Payload};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;

use crate::{Bus, KitError};

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

/// A request published on the bus, with the subscription its answers come
/// on.
#[derive(Debug)]
pub struct Pending {
    pub request_id: String,
    events: async_nats::Subscriber,
}

impl Pending {
    /// Publishes `request` on control subject `which`, with `request_id` as
    /// its idempotency key. Every event is subscribed to before the request
    /// goes out, so an answer cannot slip past.
    pub async fn send<M: Contract>(
        bus: &Bus,
        which: ControlSubject,
        request: &M,
        request_id: &str,
    ) -> Result<Self, KitError> {
        let subject = bus.subjects.events_all();
        let events = bus
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|source| KitError::Subscribe { subject, source })?;
        bus.publish(bus.subjects.control(which), request, Some(request_id))
            .await?;
        Ok(Self {
            request_id: request_id.to_string(),
            events,
        })
    }

    /// Waits for the first `done` or `failed` event correlated with the
    /// request; a `bus.message_rejected` for it counts as refused.
    pub async fn answer(
        &mut self,
        done: &[EventType],
        failed: &[EventType],
        deadline: Duration,
    ) -> Answer {
        wait_for_answer(&mut self.events, &self.request_id, done, failed, deadline).await
    }

    /// The next event `wanted` picks, or `None` when the subscription ends.
    /// No deadline: wrap it in one.
    pub async fn next_event(
        &mut self,
        wanted: impl FnMut(&v1::Event) -> bool,
    ) -> Option<v1::Event> {
        next_event(&mut self.events, wanted).await
    }
}

/// Publishes `request` on control subject `which` and waits up to
/// `deadline` for its answer: [`Pending::send`], then [`Pending::answer`].
/// An error means the request could not be sent; every way it can end
/// once sent is an [`Answer`].
pub async fn ask<M: Contract>(
    bus: &Bus,
    which: ControlSubject,
    request: &M,
    request_id: &str,
    done: &[EventType],
    failed: &[EventType],
    deadline: Duration,
) -> Result<Answer, KitError> {
    let mut pending = Pending::send(bus, which, request, request_id).await?;
    Ok(pending.answer(done, failed, deadline).await)
}

async fn next_event(
    events: &mut async_nats::Subscriber,
    mut wanted: impl FnMut(&v1::Event) -> bool,
) -> Option<v1::Event> {
    while let Some(msg) = events.next().await {
        let Ok(event) = decode_protobuf::<v1::Event>(&msg.payload) else {
            continue;
        };
        if wanted(&event) {
            return Some(event);
        }
    }
    None
}

fn is(event: &v1::Event, types: &[EventType]) -> bool {
    types.iter().any(|t| event.r#type == t.to_string())
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
    let answers = |event: &v1::Event| {
        event.correlation_id == request_id
            && (is(event, done) || is(event, failed) || is(event, &[EventType::BusMessageRejected]))
    };
    let wait = async {
        match next_event(events, answers).await {
            Some(event) if is(&event, done) => Answer::Done(event),
            Some(event) => Answer::Refused(event),
            None => Answer::Lost,
        }
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
