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

/// Why a request/reply on the bus got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("no answer on {subject} within {waited:?}")]
    TimedOut { subject: String, waited: Duration },
    #[error("nothing subscribes to {subject}")]
    NoResponders { subject: String },
    #[error("asking on {subject}: {reason}")]
    Failed { subject: String, reason: String },
    #[error("the answer on {subject} could not be read: {reason}")]
    Unreadable { subject: String, reason: String },
}

/// Sends `message` (protobuf) to whoever serves `subject` and decodes its
/// protobuf reply: previews from placement, log tails from an executor.
pub async fn request<M: Contract, R: Contract>(
    bus: &Bus,
    subject: String,
    message: &M,
    wait: Duration,
) -> Result<R, ReplyError> {
    use flotilla_proto::codec::{CONTENT_TYPE, Encoding, encode};
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, Encoding::Protobuf.content_type());
    let asked = bus.client.request_with_headers(
        subject.clone(),
        headers,
        encode(message, Encoding::Protobuf),
    );
    let reply = match tokio::time::timeout(wait, asked).await {
        Err(_) => {
            return Err(ReplyError::TimedOut {
                subject,
                waited: wait,
            });
        }
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            return Err(ReplyError::NoResponders { subject });
        }
        Ok(Err(e)) => {
            return Err(ReplyError::Failed {
                subject,
                reason: e.to_string(),
            });
        }
        Ok(Ok(reply)) => reply,
    };
    decode_protobuf(&reply.payload).map_err(|e| ReplyError::Unreadable {
        subject,
        reason: e.to_string(),
    })
}

/// How a cordon or uncordon ended: inventory answers by writing the
/// cluster's record, and only a refusal is an event.
#[derive(Debug)]
pub enum CordonAnswer {
    /// The record as written, with `cordoned` as asked.
    Applied(Box<v1::ClusterRecord>),
    /// Inventory's reason.
    Refused(String),
    Lost,
    TimedOut,
}

/// Publishes `request` and waits until inventory has written the cluster's
/// record with `cordoned` as asked, or refused it.
pub async fn cordon(
    bus: &Bus,
    request: &v1::CordonCluster,
    deadline: Duration,
) -> Result<CordonAnswer, KitError> {
    let kv = bus
        .jetstream
        .get_key_value(&bus.topology.clusters.name)
        .await
        .map_err(|e| KitError::Store {
            bucket: bus.topology.clusters.name.clone(),
            key: request.cluster.clone(),
            source: Box::new(e),
        })?;
    // Watched before the request goes out, so the write cannot slip past.
    let mut watch = kv
        .watch_with_history(&request.cluster)
        .await
        .map_err(|e| KitError::Store {
            bucket: bus.topology.clusters.name.clone(),
            key: request.cluster.clone(),
            source: Box::new(e),
        })?;
    let mut pending = Pending::send(
        bus,
        ControlSubject::ClusterCordon,
        request,
        &request.request_id,
    )
    .await?;
    let refused = EventType::BusMessageRejected.to_string();
    let wait = async {
        loop {
            tokio::select! {
                entry = watch.next() => match entry {
                    Some(Ok(entry)) => {
                        if let Ok(record) = decode_protobuf::<v1::ClusterRecord>(&entry.value)
                            && record.cordoned == request.cordon
                        {
                            return CordonAnswer::Applied(Box::new(record));
                        }
                    }
                    Some(Err(_)) => {}
                    None => return CordonAnswer::Lost,
                },
                event = pending.next_event(|e| e.r#type == refused && e.correlation_id == request.request_id) => match event {
                    Some(event) => return CordonAnswer::Refused(error_reason(&event)),
                    None => return CordonAnswer::Lost,
                },
            }
        }
    };
    Ok(tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or(CordonAnswer::TimedOut))
}
