//! The `gateway`: one OpenAI-compatible front door for the whole fleet.
//!
//! It watches KV `replicas` and routes `/v1/chat/completions` and
//! `/v1/completions` by the request's `model` to a ready replica: its own
//! region first, then the one with the fewest requests in flight. A
//! replica that refuses the connection (before any byte of an answer) is
//! skipped and the request goes to the next; a replica that keeps failing
//! is ejected for a while. Responses, streaming ones too, pass through
//! unchanged. `/metrics` has latency histograms per model and cluster.
//!
//! The service is a stack of tower layers, outermost first: API keys
//! ([`auth`]), timing ([`metrics`]), then the proxy ([`proxy`]) over the
//! routing table ([`routing`]).

pub mod auth;
pub mod metrics;
pub mod proxy;
pub mod routing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, KitError, Metrics, RecordStore};
use flotilla_proto::v1::ReplicaStatus;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::metrics::GatewayMetrics;
use crate::proxy::Proxy;
use crate::routing::ReplicaTable;

pub const SERVICE: &str = "gateway";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-gateway",
    version,
    about = "Flotilla gateway: the fleet's OpenAI-compatible front door"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    #[arg(long, env = "FLOTILLA_GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// This gateway's region: its replicas are preferred.
    #[arg(long, env = "FLOTILLA_GATEWAY_REGION", default_value = "")]
    pub region: String,

    /// Accepted API keys (`Authorization: Bearer KEY`); none: open.
    #[arg(long = "api-key", env = "FLOTILLA_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub listen: SocketAddr,
    pub region: String,
    pub api_keys: Vec<String>,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError::new("api-key", "an API key is empty"));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            listen: self.listen,
            region: self.region.clone(),
            api_keys: self.api_keys.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>, code: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication_error"
    } else if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (status, axum::Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}}))).into_response()
}

async fn serve_metrics(State(metrics): State<Arc<Metrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

/// Serves until `shutdown`; `bound` gets the listening address.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), GatewayError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, &bus.topology.replicas.name).await?;
    replicas.start_watch(shutdown.clone()).await?;
    let metrics = match bus.metrics.registry.lock() {
        Ok(mut registry) => Arc::new(GatewayMetrics::register(&mut registry)),
        // A poisoned registry: serve, unmeasured.
        Err(_) => Arc::new(GatewayMetrics::register(&mut Default::default())),
    };
    let proxy = Arc::new(Proxy {
        table: ReplicaTable::new(replicas, config.region.clone(), Arc::clone(&metrics)),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default(),
        metrics: Arc::clone(&metrics),
    });
    let proxied = Router::new()
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .with_state(Arc::clone(&proxy))
        .route_layer(middleware::from_fn_with_state(metrics, metrics::observe));
    let app = Router::new()
        .route("/v1/models", get(proxy::models))
        .with_state(proxy)
        .route("/metrics", get(serve_metrics))
        .with_state(Arc::clone(&bus.metrics))
        .route("/health", get(|| async { "ok\n" }))
        .merge(proxied)
        .layer(middleware::from_fn_with_state(
            Arc::new(ApiKeys(config.api_keys.clone())),
            auth::require_key,
        ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: config.listen,
        source,
    })?;
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    tracing::info!(%local, "gateway serving the OpenAI API");
    // Streamed answers are many small writes (one per token): without
    // TCP_NODELAY each can wait on the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    let _ = bus.client.drain().await;
    Ok(())
}
