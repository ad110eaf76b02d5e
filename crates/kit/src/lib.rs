//! Plumbing every Flotilla service shares: the service shell, written once.
//!
//! A service is a library with `run(config, shutdown)` and a thin `main`.
//! This crate gives it, in the order a service uses them:
//!
//! - [`config`]: the bus flags every service takes (`--nats-url`,
//!   credentials, TLS, subject prefix), each with its `FLOTILLA_*` variable,
//!   validated at start-up with the flag's name in the error;
//! - [`logging`]: tracing set-up, text or JSON;
//! - [`shutdown`]: SIGTERM/SIGINT as a cancellation token every task watches;
//! - [`bus`]: NATS connect with retry and reconnect logging, publishing of
//!   contracts and events with idempotency keys and trace context;
//! - [`provision`]: idempotent creation of the streams, KV buckets and object
//!   stores of `flotilla_proto::Topology`, reporting drift instead of
//!   changing it;
//! - [`consumer`]: the one typed loop over a durable pull consumer that every
//!   service reads the bus with, started by [`spawn_consumer`]: refuse
//!   undecodable messages once, retry failed handlers with backoff,
//!   dead-letter after N tries, one span per message naming what it is
//!   about ([`names`]);
//! - [`records`]: typed KV records written with compare-and-set, with a
//!   watched local copy;
//! - [`health`]: `/healthz`, `/readyz` and `/metrics` over HTTP;
//! - [`trace`]: W3C `traceparent` carried through NATS headers;
//! - [`answer`]: asking with a control request and waiting for the event
//!   that answers it ([`answer::ask`]);
//! - [`backoff`]: the one retry delay, exponential with jitter: every loop
//!   that tries again waits through [`Backoff`];
//! - [`sync`]: std locks taken even when poisoned, so no update is skipped.
//!
//! Errors ([`KitError`]) keep the error they came from as their `source`.
//!
//! This crate never decides anything about clusters, models or placements.

pub mod answer;
pub mod backoff;
pub mod bus;
pub mod config;
pub mod consumer;
pub mod events;
pub mod health;
pub mod names;
pub mod provision;
pub mod records;
pub mod sync;
pub mod trace;

pub use backoff::Backoff;
pub use bus::{Bus, EventDraft};
pub use config::{BusArgs, BusConfig, ConfigError};
pub use consumer::{ConsumerSpec, Delivery, Handler, HandlerError, OwnConsumer, spawn_consumer};
pub use flotilla_process::shutdown::{Shutdown, shutdown_on_signals};
pub use flotilla_process::{logging, shutdown};
pub use health::{Health, Metrics};
pub use provision::{ProvisionReport, provision};
pub use records::RecordStore;
pub use trace::TraceContext;

use std::time::Duration;

/// The error a [`KitError`] wraps when the failing call's own error type is
/// one of many (the NATS client has one per operation).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the plumbing, in words an operator can act on. Each keeps the
/// error it came from as its `source`, so a caller can still tell, say, a
/// timeout from a refusal.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("shut down before {0} finished")]
    ShutDown(&'static str),
    #[error("publishing to {subject} failed: {source}")]
    Publish {
        subject: String,
        #[source]
        source: BoxError,
    },
    #[error("publishing to {subject} failed: no acknowledgement within {waited:?}")]
    PublishUnconfirmed { subject: String, waited: Duration },
    #[error("subscribing to {subject} failed: {source}")]
    Subscribe {
        subject: String,
        #[source]
        source: async_nats::SubscribeError,
    },
    #[error("provisioning {kind} {name} failed: {source}")]
    Provision {
        kind: &'static str,
        name: String,
        #[source]
        source: BoxError,
    },
    #[error("consumer {consumer} on stream {stream}: {source}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        source: BoxError,
    },
    #[error("HTTP endpoint {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KV {bucket} key {key:?}: {source}")]
    Store {
        bucket: String,
        key: String,
        #[source]
        source: BoxError,
    },
    #[error("KV {bucket} key {key:?}: still conflicting after {tries} tries")]
    StoreConflict {
        bucket: String,
        key: String,
        tries: usize,
    },
    #[error(transparent)]
    InvalidName(#[from] flotilla_proto::InvalidName),
    #[error("the NATS server did not answer a round trip within {waited:?}")]
    RoundTrip {
        waited: Duration,
        #[source]
        source: Option<BoxError>,
    },
}

/// Milliseconds since the Unix epoch, the time unit of every contract.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
