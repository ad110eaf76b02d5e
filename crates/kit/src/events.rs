//! Reading the events stream as its clients do (the CLI's `watch` and
//! `get events`, `describe`, the gRPC API's `ListEvents` and `Watch`):
//! what is stored, or what comes from a start on.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_proto::codec::{DecodeError, decode_protobuf};
use flotilla_proto::v1;
use futures::{Stream, StreamExt};

use crate::{Bus, KitError};

/// One message of the events stream.
#[derive(Debug)]
pub struct EventMessage {
    /// Its sequence in the stream.
    pub sequence: u64,
    pub subject: String,
    /// The event, or why the payload is not one.
    pub event: Result<v1::Event, DecodeError>,
}

fn consumer_error(bus: &Bus, e: impl std::error::Error + Send + Sync + 'static) -> KitError {
    KitError::Consumer {
        stream: bus.topology.events.name.clone(),
        consumer: "(reader)".into(),
        source: Box::new(e),
    }
}

fn message(msg: &async_nats::jetstream::Message) -> EventMessage {
    EventMessage {
        sequence: msg.info().map_or(0, |i| i.stream_sequence),
        subject: msg.subject.to_string(),
        event: decode_protobuf(&msg.payload),
    }
}

/// The events on `filter_subjects` stored from `start` on, oldest first;
/// with `keep_last`, only the last that many.
pub async fn stored(
    bus: &Bus,
    filter_subjects: Vec<String>,
    start: DeliverPolicy,
    keep_last: Option<usize>,
) -> Result<Vec<EventMessage>, KitError> {
    let stream = bus
        .jetstream
        .get_stream(&bus.topology.events.name)
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subjects,
            deliver_policy: start,
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let pending = consumer
        .info()
        .await
        .map_err(|e| consumer_error(bus, e))?
        .num_pending;
    let cap = keep_last.unwrap_or(usize::MAX);
    let mut kept = VecDeque::new();
    if pending == 0 || cap == 0 {
        return Ok(Vec::new());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let mut read = 0;
    while read < pending {
        let Some(msg) = messages.next().await else {
            break;
        };
        let msg = msg.map_err(|e| consumer_error(bus, e))?;
        read += 1;
        if kept.len() == cap {
            kept.pop_front();
        }
        kept.push_back(message(&msg));
    }
    Ok(kept.into())
}

/// The events on `filter_subjects` from `start` on, as they come. An
/// ordered consumer: the server keeps nothing for it, and it recreates
/// itself after a reconnect without a gap.
pub async fn follow(
    bus: &Bus,
    filter_subjects: Vec<String>,
    start: DeliverPolicy,
) -> Result<impl Stream<Item = Result<EventMessage, KitError>> + Send + 'static, KitError> {
    let stream = bus
        .jetstream
        .get_stream(&bus.topology.events.name)
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects,
            deliver_policy: start,
            ..Default::default()
        })
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| consumer_error(bus, e))?;
    let stream_name = bus.topology.events.name.clone();
    Ok(messages.map(move |msg| match msg {
        Ok(msg) => Ok(message(&msg)),
        Err(e) => Err(KitError::Consumer {
            stream: stream_name.clone(),
            consumer: "(ordered reader)".into(),
            source: Box::new(e),
        }),
    }))
}
