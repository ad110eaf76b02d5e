//! The connection to NATS and everything a service publishes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use flotilla_proto::codec::{self, CONTENT_TYPE, Contract, Encoding};
use flotilla_proto::v1::{self, event::Payload};
use flotilla_proto::{EventType, Subjects, Topology};
use tokio_util::sync::CancellationToken;

use crate::trace::{TRACEPARENT, TraceContext};
use crate::{Backoff, BusConfig, ConfigError, KitError, Metrics, now_unix_ms};

/// How long a publish waits for JetStream to store the message.
const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits between tries to reach the server at start-up. Jittered, so a
/// fleet started (or restarted) together does not knock in step.
const CONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Waits between the client's tries to reach a server it lost.
const RECONNECT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(4));

/// The client's wait before reconnect try number `attempts` (1-based). The
/// first try goes at once: the server may only have dropped this one
/// connection. Later ones are jittered, so the many clients of a restarted
/// server do not all arrive in the same instant it comes back.
fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => RECONNECT_BACKOFF.delay(u32::try_from(n - 1).unwrap_or(u32::MAX)),
    }
}

/// One service's connection to the bus.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub subjects: Subjects,
    pub topology: Topology,
    /// The service name, written as `source` on every event.
    pub service: String,
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("service", &self.service)
            .field("prefix", &self.subjects.prefix())
            .finish()
    }
}

impl Bus {
    /// Connects, retrying with backoff until the server answers or
    /// `shutdown` is cancelled. Later disconnects are retried forever by the
    /// client and logged.
    pub async fn connect(
        config: &BusConfig,
        service: &str,
        shutdown: &CancellationToken,
    ) -> Result<Self, KitError> {
        let mut attempt = 1u32;
        let client = loop {
            match connect_once(config, service).await {
                Ok(client) => break client,
                Err(ConnectFailure::Config(e)) => return Err(e.into()),
                Err(ConnectFailure::Unreachable(reason)) => {
                    let delay = CONNECT_BACKOFF.delay(attempt);
                    tracing::warn!(
                        url = %config.nats_url, attempt, retry_in = ?delay,
                        "NATS not reachable: {reason}"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(KitError::ShutDown("connecting to NATS")),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        };
        tracing::info!(url = %config.nats_url, service, "connected to NATS");
        let jetstream = jetstream::new(client.clone());
        Ok(Self {
            client,
            jetstream,
            subjects: config.subjects.clone(),
            topology: config.topology.clone(),
            service: service.to_string(),
            metrics: Arc::new(Metrics::new(service)),
        })
    }

    /// Publishes `message` as protobuf to a JetStream subject and waits for
    /// the stream to store it. `msg_id` becomes `Nats-Msg-Id`, so a repeat
    /// within the stream's dedup window is dropped by the server.
    pub async fn publish<M: Contract>(
        &self,
        subject: String,
        message: &M,
        msg_id: Option<&str>,
    ) -> Result<(), KitError> {
        self.publish_encoded(
            subject,
            message,
            Encoding::Protobuf,
            msg_id,
            HeaderMap::new(),
        )
        .await
    }

    /// Like [`publish`](Self::publish), with a chosen encoding and extra headers.
    pub async fn publish_encoded<M: Contract>(
        &self,
        subject: String,
        message: &M,
        encoding: Encoding,
        msg_id: Option<&str>,
        extra_headers: HeaderMap,
    ) -> Result<(), KitError> {
        let mut headers = extra_headers;
        headers.insert(CONTENT_TYPE, encoding.content_type());
        if let Some(ctx) = TraceContext::current() {
            headers.insert(TRACEPARENT, ctx.to_string().as_str());
        }
        let mut publish = PublishMessage::build()
            .payload(codec::encode(message, encoding))
            .headers(headers);
        if let Some(id) = msg_id {
            publish = publish.message_id(id);
        }
        let failed = |source: async_nats::jetstream::context::PublishError| KitError::Publish {
            subject: subject.clone(),
            source: source.into(),
        };
        let ack = self
            .jetstream
            .send_publish(subject.clone(), publish)
            .await
            .map_err(failed)?;
        tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack)
            .await
            .map_err(|_| KitError::PublishUnconfirmed {
                subject: subject.clone(),
                waited: PUBLISH_ACK_TIMEOUT,
            })?
            .map_err(failed)?;
        Ok(())
    }

    /// One request to the server and its answer (JetStream's account
    /// information, which every role may ask for): whether this service's
    /// own view of the bus is live right now. A stalled or unreachable
    /// server fails it after `timeout`.
    pub async fn round_trip(&self, timeout: Duration) -> Result<Duration, KitError> {
        let started = std::time::Instant::now();
        match tokio::time::timeout(timeout, self.jetstream.query_account()).await {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => Err(KitError::RoundTrip {
                waited: started.elapsed(),
                source: Some(e.into()),
            }),
            Err(_) => Err(KitError::RoundTrip {
                waited: timeout,
                source: None,
            }),
        }
    }

    /// Publishes an event on `<prefix>.events.<kind>.<name>.<what>`; its id
    /// is the `Nats-Msg-Id`.
    pub async fn publish_event(&self, draft: EventDraft) -> Result<(), KitError> {
        let EventDraft { ty, mut event } = draft;
        let subject = self.subjects.event(ty, &event.name)?;
        event.source.clone_from(&self.service);
        let id = event.id.clone();
        self.publish(subject, &event, Some(&id)).await
    }
}

/// An event being put together; [`Bus::publish_event`] sends it.
#[derive(Debug, Clone)]
pub struct EventDraft {
    pub ty: EventType,
    pub event: v1::Event,
}

impl EventDraft {
    pub fn new(ty: EventType, name: &str, message: impl Into<String>) -> Self {
        let severity = match ty {
            EventType::BusMessageRejected
            | EventType::BusDeadLettered
            | EventType::DeploymentRejected
            | EventType::ClusterHeartbeatRejected
            | EventType::ModelFailed
            | EventType::ReplicaFailed
            | EventType::RolloutHalted => v1::Severity::Error,
            EventType::BusTopologyDrifted
            | EventType::ClusterUnhealthy
            | EventType::ClusterDegraded
            | EventType::DeploymentUnschedulable => v1::Severity::Warning,
            _ => v1::Severity::Info,
        };
        Self {
            ty,
            event: v1::Event {
                id: uuid::Uuid::new_v4().to_string(),
                time_unix_ms: now_unix_ms(),
                r#type: ty.to_string(),
                name: name.to_string(),
                severity: severity.into(),
                message: message.into(),
                ..Default::default()
            },
        }
    }

    pub fn payload(mut self, payload: Payload) -> Self {
        self.event.payload = Some(payload);
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.event.correlation_id = id.into();
        self
    }

    pub fn generation(mut self, generation: u64) -> Self {
        self.event.generation = generation;
        self
    }

    /// A fixed id, so the same event published twice (after a crash, by two
    /// instances) is stored once.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = id.into();
        self
    }
}

enum ConnectFailure {
    Config(ConfigError),
    Unreachable(String),
}

async fn connect_once(
    config: &BusConfig,
    service: &str,
) -> Result<async_nats::Client, ConnectFailure> {
    let servers = crate::config::server_addrs(&config.nats_url).map_err(ConnectFailure::Config)?;
    let url = config.nats_url.clone();
    let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut options = async_nats::ConnectOptions::new()
        .name(service)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let url = url.clone();
            let lost = lost.clone();
            async move {
                use std::sync::atomic::Ordering;
                match event {
                    async_nats::Event::Connected => {
                        if lost.swap(false, Ordering::SeqCst) {
                            tracing::info!(%url, "NATS connection re-established");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        lost.store(true, Ordering::SeqCst);
                        tracing::warn!(%url, "NATS connection lost; reconnecting")
                    }
                    async_nats::Event::LameDuckMode => {
                        tracing::warn!(%url, "NATS server entering lame duck mode")
                    }
                    async_nats::Event::Draining | async_nats::Event::Closed => {
                        tracing::debug!(%url, "NATS connection {event}")
                    }
                    other => tracing::warn!(%url, "NATS: {other}"),
                }
            }
        });
    if let Some(creds) = &config.creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            ConnectFailure::Config(ConfigError::new(
                "nats-creds",
                format!("{}: {e}", creds.display()),
            ))
        })?;
    }
    if let Some((user, password)) = &config.user_password {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(prefix) = &config.inbox_prefix {
        options = options.custom_inbox_prefix(prefix.clone());
    }
    if config.require_tls {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    options
        // Every listed server: the client starts on one of them and, when it
        // is lost, reconnects to the others (and to servers the cluster
        // announces) by itself.
        .connect(servers)
        .await
        .map_err(|e| match e.kind() {
            // Wrong credentials do not fix themselves: fail at once,
            // naming the flag to look at.
            async_nats::ConnectErrorKind::AuthorizationViolation => {
                let flag = if config.creds.is_some() {
                    "nats-creds"
                } else {
                    "nats-user"
                };
                ConnectFailure::Config(ConfigError::new(
                    flag,
                    format!("the server refused these credentials: {e}"),
                ))
            }
            _ => ConnectFailure::Unreachable(e.to_string()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_start_at_once_then_spread_up_to_the_cap() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        for (attempts, low, high) in [(2, 50, 100), (3, 100, 200), (50, 2_000, 4_000)] {
            let d = reconnect_delay(attempts).as_millis();
            assert!((low..=high).contains(&d), "try {attempts}: {d} ms");
        }
    }
}
