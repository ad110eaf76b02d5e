//! The `gateway`: one OpenAI-compatible front door for the whole fleet.
//!
//! It watches KV `replicas` and routes `/v1/chat/completions` and
//! `/v1/completions` by the request's `model` to a ready replica: its own
//! region first, then, by default, the one predicted to hold most of the
//! prompt in its prefix cache unless it is much busier than another
//! ([`routing`], [`prefix`]; `--routing least-in-flight` picks the one
//! with the fewest requests in flight). A
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
pub mod prefix;
pub mod proxy;
pub mod residency;
pub mod routing;
pub mod tls;
pub mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
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
use flotilla_proto::v1::{ClusterRecord, ModelDeployment, ReplicaStatus, RolloutState};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiKeys;
use crate::metrics::GatewayMetrics;
use crate::proxy::Proxy;
pub use crate::routing::{DEFAULT_PREFIX_CACHE_TOKENS, Policy, Scope};
use crate::routing::{FleetView, ReplicaTable};

pub const SERVICE: &str = "gateway";

/// The most `--prefix-cache-tokens`: 1.5M blocks, some 60 MB of index,
/// per replica.
pub const MAX_PREFIX_CACHE_TOKENS: usize = 100_000_000;

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

    /// Run as the edge of this cluster: route only to its ready replicas,
    /// at their own addresses, forwarding a request to the replica the
    /// global gateway named (`x-flotilla-replica`) when it is ready.
    /// Unset: the global gateway, routing to every cluster through each
    /// cluster's edge where it has one.
    #[arg(long, env = "FLOTILLA_GATEWAY_CLUSTER")]
    pub cluster: Option<String>,

    /// Serve HTTPS on --listen with this certificate chain (PEM).
    #[arg(long, env = "FLOTILLA_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FLOTILLA_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) on --listen:
    /// mutual TLS, as an edge takes the global gateway's requests.
    #[arg(long, env = "FLOTILLA_GATEWAY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// A second listener, plain HTTP, for clients inside the cluster's own
    /// network (an edge's local clients, which keep being served when the
    /// cluster is cut off from the hub).
    #[arg(long, env = "FLOTILLA_GATEWAY_LOCAL_ADDR")]
    pub local_listen: Option<SocketAddr>,

    /// The CA that signed the cluster edges' server certificates (PEM):
    /// the global gateway trusts edges signed by it and no one else.
    #[arg(long, env = "FLOTILLA_GATEWAY_EDGE_CA", requires_all = ["edge_client_cert", "edge_client_key"])]
    pub edge_ca: Option<PathBuf>,

    /// The client certificate (PEM) the global gateway presents to edges.
    #[arg(long, env = "FLOTILLA_GATEWAY_EDGE_CLIENT_CERT", requires = "edge_ca")]
    pub edge_client_cert: Option<PathBuf>,

    /// The private key of --edge-client-cert (PEM).
    #[arg(long, env = "FLOTILLA_GATEWAY_EDGE_CLIENT_KEY", requires = "edge_ca")]
    pub edge_client_key: Option<PathBuf>,

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

    /// How long a streamed answer that has begun may pause before it
    /// counts as broken and moves to another replica. A replica behind a
    /// cut link sends neither bytes nor a reset; a healthy one sends a
    /// token at least every second or so, even under load.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_STREAM_STALL_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub stream_stall_timeout: Duration,

    /// How a model's replicas are ordered; those in the gateway's own
    /// region always come first. Cache-aware routing predicts which
    /// replica holds a prompt's prefix from where the gateway sent earlier
    /// prompts.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_ROUTING",
        value_enum,
        default_value_t = Policy::CacheAware
    )]
    pub routing: Policy,

    /// The prompt tokens each replica is assumed to keep in its prefix
    /// cache, for predicting which replica holds a prompt (at 4 bytes of
    /// text a token). The default is about what the runner's default
    /// 1 GiB KV budget holds for SmolLM2-135M; larger models hold fewer.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_PREFIX_CACHE_TOKENS",
        default_value_t = DEFAULT_PREFIX_CACHE_TOKENS
    )]
    pub prefix_cache_tokens: usize,

    /// This instance's name in its traffic summaries
    /// (`<prefix>.traffic.<gateway-id>`), a DNS label; by default
    /// `gateway-` and a random suffix.
    #[arg(long, env = "FLOTILLA_GATEWAY_ID")]
    pub gateway_id: Option<String>,

    /// How often the traffic summary of the requests relayed (per replica:
    /// outcomes, time to first byte, duration) is published.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_TRAFFIC_INTERVAL",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub traffic_interval: Duration,

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
    pub stream_stall_timeout: Duration,
    pub scope: Scope,
    pub routing: Policy,
    /// Prompt tokens each replica is assumed to cache.
    pub prefix_cache_tokens: usize,
    /// HTTPS on `listen`.
    pub serve_tls: Option<ServeTls>,
    pub local_listen: Option<SocketAddr>,
    /// How the global gateway proves itself to edges.
    pub edge_tls: Option<EdgeTls>,
    pub gateway_id: String,
    pub traffic_interval: Duration,
}

/// The certificate files an HTTPS listener serves with.
#[derive(Debug, Clone)]
pub struct ServeTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// The files the global gateway reaches edges with.
#[derive(Debug, Clone)]
pub struct EdgeTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError::new("api-key", "an API key is empty"));
        }
        if self.stream_stall_timeout.is_zero() {
            return Err(ConfigError::new(
                "stream-stall-timeout",
                "must be longer than zero",
            ));
        }
        if self.response_headers_timeout.is_zero() {
            return Err(ConfigError::new(
                "response-headers-timeout",
                "must be longer than zero",
            ));
        }
        let scope = match &self.cluster {
            None => Scope::Fleet,
            Some(cluster) => {
                flotilla_proto::check_name("cluster", cluster)
                    .map_err(|e| ConfigError::new("cluster", e.to_string()))?;
                if self.edge_ca.is_some() {
                    return Err(ConfigError::new(
                        "edge-ca",
                        "an edge (--cluster) reaches only its own replicas, never other edges",
                    ));
                }
                Scope::Cluster(cluster.clone())
            }
        };
        let serve_tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(ServeTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) => None,
            // clap's `requires` refuses the rest.
            (Some(_), None) => {
                return Err(ConfigError::new("tls-key", "is required with --tls-cert"));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new("tls-cert", "is required with --tls-key"));
            }
        };
        let edge_tls = match (&self.edge_ca, &self.edge_client_cert, &self.edge_client_key) {
            (Some(ca), Some(cert), Some(key)) => Some(EdgeTls {
                ca: ca.clone(),
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "edge-ca",
                    "--edge-ca, --edge-client-cert and --edge-client-key go together",
                ));
            }
        };
        if self.prefix_cache_tokens == 0 || self.prefix_cache_tokens > MAX_PREFIX_CACHE_TOKENS {
            return Err(ConfigError::new(
                "prefix-cache-tokens",
                format!(
                    "must be from 1 to {MAX_PREFIX_CACHE_TOKENS} (to route without prefixes, \
                     use --routing least-in-flight)"
                ),
            ));
        }
        let gateway_id = match &self.gateway_id {
            Some(id) => {
                flotilla_proto::check_name("gateway id", id)
                    .map_err(|e| ConfigError::new("gateway-id", e.to_string()))?;
                id.clone()
            }
            None => format!(
                "gateway-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        };
        if self.traffic_interval < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "traffic-interval",
                "must be at least 100ms",
            ));
        }
        if self.local_listen.is_some_and(|local| local == self.listen) {
            return Err(ConfigError::new(
                "local-listen",
                "must differ from --listen",
            ));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            listen: self.listen,
            region: self.region.clone(),
            api_keys: self.api_keys.clone(),
            response_headers_timeout: self.response_headers_timeout,
            stream_stall_timeout: self.stream_stall_timeout,
            scope,
            routing: self.routing,
            prefix_cache_tokens: self.prefix_cache_tokens,
            serve_tls,
            local_listen: self.local_listen,
            edge_tls,
            gateway_id,
            traffic_interval: self.traffic_interval,
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
    #[error(transparent)]
    Tls(#[from] flotilla_tls::TlsError),
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

/// Serves until `shutdown`; `bound` gets the listening address (the
/// `--listen` one when there are two).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), GatewayError> {
    // Certificates first: a gateway that cannot use its files stops before
    // it touches the bus, naming the file.
    let serve_tls = match &config.serve_tls {
        Some(t) => Some(flotilla_tls::server_config(
            &t.cert,
            &t.key,
            t.client_ca.as_deref(),
        )?),
        None => None,
    };
    let edge_tls = match &config.edge_tls {
        Some(t) => Some(flotilla_tls::client_config(
            &t.ca,
            &t.client_cert,
            &t.client_key,
        )?),
        None => None,
    };
    for reloading in serve_tls.iter() {
        reloading.watch(tls::RELOAD_EVERY, shutdown.clone());
    }
    for reloading in edge_tls.iter() {
        reloading.watch(tls::RELOAD_EVERY, shutdown.clone());
    }
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, &bus.topology.replicas.name).await?;
    replicas.start_watch(shutdown.clone()).await?;
    let metrics = Arc::new(GatewayMetrics::register(&mut lock(&bus.metrics.registry)));
    let mut table = ReplicaTable::new(replicas, config.region.clone(), Arc::clone(&metrics))
        .scoped(config.scope.clone())
        .routing(config.routing, config.prefix_cache_tokens);
    if config.scope == Scope::Fleet {
        let clusters =
            RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
        clusters.start_watch(shutdown.clone()).await?;
        let deployments =
            RecordStore::<ModelDeployment>::open(&bus, &bus.topology.deployments.name).await?;
        deployments.start_watch(shutdown.clone()).await?;
        let rollouts = RecordStore::<RolloutState>::open(&bus, &bus.topology.rollouts.name).await?;
        rollouts.start_watch(shutdown.clone()).await?;
        table = table.with_fleet(FleetView {
            clusters,
            deployments,
            rollouts,
        });
    }
    let proxy = Arc::new(Proxy {
        table,
        http: tls::HttpClient::new(edge_tls).map_err(GatewayError::HttpClient)?,
        honours_pins: matches!(config.scope, Scope::Cluster(_)),
        metrics: Arc::clone(&metrics),
        response_headers_timeout: config.response_headers_timeout,
        stream_stall_timeout: config.stream_stall_timeout,
    });
    tokio::spawn(proxy.table.follow_residency(shutdown.clone()));
    tokio::spawn(traffic::publish_every(
        Arc::clone(&metrics.traffic),
        bus.clone(),
        config.gateway_id.clone(),
        config.traffic_interval,
        shutdown.clone(),
    ));
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
    let bind = |addr: SocketAddr| async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| GatewayError::Bind { addr, source })?;
        Ok::<_, GatewayError>((listener, local))
    };
    let (listener, local) = bind(config.listen).await?;
    let local_listener = match config.local_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let what = match &config.scope {
        Scope::Fleet => "gateway".to_string(),
        Scope::Cluster(cluster) => format!("edge of cluster {cluster}"),
    };
    let serving = match (
        &serve_tls,
        config.serve_tls.as_ref().and_then(|t| t.client_ca.as_ref()),
    ) {
        (None, _) => "HTTP",
        (Some(_), None) => "HTTPS",
        (Some(_), Some(_)) => "HTTPS, client certificates required",
    };
    tracing::info!(%local, "{what} serving the OpenAI API ({serving})");
    let main = {
        let app = app.clone();
        let shutdown = shutdown.clone();
        async move {
            let served = match serve_tls {
                Some(config) => {
                    let tls = tls::TlsListener::new(listener, config, shutdown.clone()).map_err(
                        |source| GatewayError::Bind {
                            addr: local,
                            source,
                        },
                    )?;
                    axum::serve(tls, app)
                        .with_graceful_shutdown(shutdown.cancelled_owned())
                        .await
                }
                None => {
                    axum::serve(plain(listener), app)
                        .with_graceful_shutdown(shutdown.cancelled_owned())
                        .await
                }
            };
            served.map_err(|source| GatewayError::Serve {
                addr: local,
                source,
            })
        }
    };
    let second = async {
        let Some((listener, addr)) = local_listener else {
            return Ok(());
        };
        tracing::info!(local = %addr, "{what} serving the OpenAI API (HTTP, for local clients)");
        axum::serve(plain(listener), app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await
            .map_err(|source| GatewayError::Serve { addr, source })
    };
    let served = tokio::try_join!(main, second).map(|_| ());
    if let Err(e) = bus.client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    served
}

/// A plain listener whose connections send each small write at once.
fn plain(listener: tokio::net::TcpListener) -> impl axum::serve::Listener<Addr = SocketAddr> {
    // Streamed answers are many small writes (one per token): without
    // TCP_NODELAY each can wait on the client's delayed ACK.
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    })
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

    #[test]
    fn routing_is_cache_aware_by_default_with_a_bounded_prefix_cache() {
        let config = Args::try_parse_from(["flotilla-gateway"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(config.routing, Policy::CacheAware);
        assert_eq!(config.prefix_cache_tokens, DEFAULT_PREFIX_CACHE_TOKENS);
        for (flag, policy) in [
            ("cache-aware", Policy::CacheAware),
            ("least-in-flight", Policy::LeastInFlight),
            ("random", Policy::Random),
        ] {
            let args = Args::try_parse_from(["flotilla-gateway", "--routing", flag]).unwrap();
            assert_eq!(args.validate().unwrap().routing, policy, "{flag}");
        }
        assert!(Args::try_parse_from(["flotilla-gateway", "--routing", "fastest"]).is_err());
        for bad in ["0", "100000001"] {
            let args =
                Args::try_parse_from(["flotilla-gateway", "--prefix-cache-tokens", bad]).unwrap();
            let e = args.validate().unwrap_err();
            assert!(e.to_string().contains("prefix-cache-tokens"), "{e}");
        }
    }
}
