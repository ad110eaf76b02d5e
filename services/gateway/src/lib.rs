//! The `gateway`: one OpenAI-compatible front door for the whole fleet.
//!
//! It watches KV `replicas` and routes `/v1/chat/completions` and
//! `/v1/completions` by the request's `model` to a ready replica: its own
//! region first, then the one with the fewest requests in flight. A
//! replica that fails before any byte of an answer (it refuses the
//! connection, or a streaming request's response headers do not come
//! within `--response-headers-timeout`) is skipped and the request goes to
//! the next; a replica that keeps failing is ejected for a while. A
//! replica that fails after the first byte has its answer continued by
//! another (request migration, [`proxy::migrate`]): the client's stream
//! goes on with the same id and, for greedy and seeded requests, the same
//! text. `/metrics` has latency histograms per model and cluster.
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
use flotilla_kit::sync::lock;
use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, KitError, Metrics, RecordStore};
use flotilla_proto::v1::ReplicaStatus;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::metrics::GatewayMetrics;
use crate::proxy::Proxy;
use crate::routing::ReplicaTable;

pub const SERVICE: &str = "gateway";

/// The default of `--response-headers-timeout`.
pub const DEFAULT_RESPONSE_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// How long a replica may take to send the response headers of a
    /// streaming request before the request goes to another replica. A
    /// replica sends them once it has queued the request, well before its
    /// first token; a few seconds more than a normal time to first byte
    /// tells a hung replica from a busy one. Non-streaming answers send
    /// their headers with the whole completion and are not timed.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_RESPONSE_HEADERS_TIMEOUT",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub response_headers_timeout: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub listen: SocketAddr,
    pub region: String,
    pub api_keys: Vec<String>,
    pub response_headers_timeout: Duration,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError::new("api-key", "an API key is empty"));
        }
        if self.response_headers_timeout.is_zero() {
            return Err(ConfigError::new(
                "response-headers-timeout",
                "must be longer than zero",
            ));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            listen: self.listen,
            region: self.region.clone(),
            api_keys: self.api_keys.clone(),
            response_headers_timeout: self.response_headers_timeout,
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
    #[error("making the HTTP client for replicas: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error("serving on {addr}: {source}")]
    Serve {
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
    let metrics = Arc::new(GatewayMetrics::register(&mut lock(&bus.metrics.registry)));
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(GatewayError::HttpClient)?;
    let proxy = Arc::new(Proxy {
        table: ReplicaTable::new(replicas, config.region.clone(), Arc::clone(&metrics)),
        http,
        metrics: Arc::clone(&metrics),
        response_headers_timeout: config.response_headers_timeout,
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
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| GatewayError::Serve {
            addr: local,
            source,
        });
    if let Err(e) = bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    served
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn the_response_headers_timeout_defaults_to_ten_seconds_and_is_never_zero() {
        let config = Args::try_parse_from(["flotilla-gateway"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(
            config.response_headers_timeout,
            DEFAULT_RESPONSE_HEADERS_TIMEOUT
        );
        let args =
            Args::try_parse_from(["flotilla-gateway", "--response-headers-timeout", "2500ms"])
                .unwrap();
        assert_eq!(
            args.validate().unwrap().response_headers_timeout,
            Duration::from_millis(2500)
        );
        let zero =
            Args::try_parse_from(["flotilla-gateway", "--response-headers-timeout", "0s"]).unwrap();
        let e = zero.validate().unwrap_err();
        assert!(e.to_string().contains("response-headers-timeout"), "{e}");
    }
}
