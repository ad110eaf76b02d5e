//! `/healthz` (the process runs), `/readyz` (started and connected to NATS)
//! and `/metrics` (Prometheus text) on one small HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::KitError;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    pub consumer: String,
    /// `handled`, `rejected`, `retried`, `dead_lettered`.
    pub outcome: String,
}

/// Metrics every service exposes; services register their own into
/// [`Metrics::registry`] before serving.
#[derive(Debug)]
pub struct Metrics {
    pub registry: std::sync::Mutex<Registry>,
    pub messages: Family<MessageLabels, Counter>,
}

impl Metrics {
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "flotilla",
            [(
                std::borrow::Cow::Borrowed("service"),
                std::borrow::Cow::Owned(service.to_string()),
            )]
            .into_iter(),
        );
        let messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "messages",
            "Bus messages by consumer and outcome",
            messages.clone(),
        );
        Self {
            registry: std::sync::Mutex::new(registry),
            messages,
        }
    }

    pub fn count(&self, consumer: &str, outcome: &str) {
        self.messages
            .get_or_create(&MessageLabels {
                consumer: consumer.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = crate::sync::lock(&self.registry);
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// What `/readyz` reports.
#[derive(Debug)]
pub struct Health {
    ready: AtomicBool,
    nats: std::sync::Mutex<Option<async_nats::Client>>,
    pub metrics: Arc<Metrics>,
}

impl Health {
    /// Health of a service connected through `bus`, sharing its metrics.
    pub fn for_bus(bus: &crate::Bus) -> Arc<Self> {
        let health = Self::new(Arc::clone(&bus.metrics));
        health.watch_nats(bus.client.clone());
        health
    }

    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            ready: AtomicBool::new(false),
            nats: std::sync::Mutex::new(None),
            metrics,
        })
    }

    /// Ready once the service has started and while its NATS connection is up.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn watch_nats(&self, client: async_nats::Client) {
        *crate::sync::lock(&self.nats) = Some(client);
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("starting");
        }
        let connected = crate::sync::lock(&self.nats)
            .as_ref()
            .map(|c| c.connection_state())
            .is_none_or(|s| s == async_nats::connection::State::Connected);
        (!connected).then_some("NATS disconnected")
    }

    /// Serves the endpoints on `addr` until `shutdown`; returns the bound
    /// address (useful with port 0).
    pub async fn serve(
        self: &Arc<Self>,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<SocketAddr, KitError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| KitError::Http {
                addr: addr.to_string(),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| KitError::Http {
            addr: addr.to_string(),
            source,
        })?;
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(self));
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!("health endpoint stopped: {e}");
            }
        });
        tracing::info!(%bound, "serving /healthz, /readyz, /metrics");
        Ok(bound)
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    match health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        health.metrics.render(),
    )
}
