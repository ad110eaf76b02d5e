//! Plumbing every Flotilla service shares.
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
//!   service reads the bus with: refuse undecodable messages once, retry
//!   failed handlers with backoff, dead-letter after N tries;
//! - [`records`]: typed KV records written with compare-and-set, with a
//!   watched local copy;
//! - [`health`]: `/healthz`, `/readyz` and `/metrics` over HTTP;
//! - [`trace`]: W3C `traceparent` carried through NATS headers;
//! - [`answer`]: waiting for the event that answers a control request.
//!
//! This crate never decides anything about clusters, models or placements.

pub mod answer;
pub mod bus;
pub mod config;
pub mod consumer;
pub mod health;
pub mod logging;
pub mod provision;
pub mod records;
pub mod shutdown;
pub mod trace;

pub use bus::{Bus, EventDraft};
pub use config::{BusArgs, BusConfig, ConfigError};
pub use consumer::{ConsumerSpec, Delivery, Handler, HandlerError};
pub use health::{Health, Metrics};
pub use provision::{ProvisionReport, provision};
pub use records::RecordStore;
pub use shutdown::{Shutdown, shutdown_on_signals};
pub use trace::TraceContext;

/// Errors of the plumbing, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("shut down before {0} finished")]
    ShutDown(&'static str),
    #[error("publishing to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
    #[error("provisioning {kind} {name} failed: {reason}")]
    Provision {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("consumer {consumer} on stream {stream}: {reason}")]
    Consumer {
        stream: String,
        consumer: String,
        reason: String,
    },
    #[error("HTTP endpoint {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KV {bucket} key {key:?}: {reason}")]
    Store {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error(transparent)]
    InvalidName(#[from] flotilla_proto::InvalidName),
}

/// Milliseconds since the Unix epoch, the time unit of every contract.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
