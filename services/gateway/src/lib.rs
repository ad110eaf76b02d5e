//! The `gateway`: one OpenAI-compatible front door for the whole fleet.
//!
//! It watches KV `replicas` and routes `/v1/chat/completions` and
//! `/v1/completions` by the request's `model` to a ready replica: its own
//! region first, then the one with the fewest requests in flight. A
//! replica that refuses the connection (before any byte of an answer) is
//! skipped and the request goes to the next; a replica that keeps failing
//! is ejected for a while. Responses, streaming ones too, pass through
//! unchanged. API keys are checked by a layer in front of every route.
//!
//! Not built yet: the gRPC control API, per-cluster latency histograms.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, KitError, RecordStore};
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
use futures::TryStreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "gateway";

/// Tries per request, each on another replica.
const ATTEMPTS: usize = 3;
/// Consecutive connection failures that eject a replica.
const EJECT_AFTER: u32 = 3;
const EJECT_FOR: Duration = Duration::from_secs(30);

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

/// Per-replica bookkeeping that outlives KV updates.
#[derive(Default)]
struct ReplicaLoad {
    in_flight: AtomicUsize,
    failures: Mutex<(u32, Option<Instant>)>,
}

struct Gateway {
    replicas: RecordStore<ReplicaStatus>,
    region: String,
    api_keys: Vec<String>,
    load: Mutex<HashMap<String, Arc<ReplicaLoad>>>,
    http: reqwest::Client,
}

fn error(status: StatusCode, message: impl Into<String>, code: &str) -> Response {
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication_error"
    } else if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (status, axum::Json(json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}}))).into_response()
}

impl Gateway {
    fn load_of(&self, replica: &str) -> Arc<ReplicaLoad> {
        self.load
            .lock()
            .map(|mut m| m.entry(replica.to_string()).or_default().clone())
            .unwrap_or_default()
    }

    /// Ready replicas of `model`, best first: own region, fewest in flight.
    fn candidates(&self, model: &str) -> Vec<(ReplicaStatus, Arc<ReplicaLoad>)> {
        let now = Instant::now();
        let mut ready: Vec<(ReplicaStatus, Arc<ReplicaLoad>)> = self
            .replicas
            .select(|_, r| {
                r.phase() == ReplicaPhase::Ready && r.model == model && !r.endpoint.is_empty()
            })
            .into_iter()
            .map(|(_, r)| {
                let load = self.load_of(&r.replica_id);
                (r, load)
            })
            .filter(|(_, load)| {
                load.failures
                    .lock()
                    .map(|f| f.1.is_none_or(|until| until <= now))
                    .unwrap_or(true)
            })
            .collect();
        ready.sort_by_key(|(r, load)| {
            (
                !self.region.is_empty() && r.region != self.region,
                load.in_flight.load(Ordering::SeqCst),
                r.replica_id.clone(),
            )
        });
        ready
    }

    fn models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .replicas
            .select(|_, r| r.phase() == ReplicaPhase::Ready)
            .into_iter()
            .map(|(_, r)| r.model)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Checks `Authorization: Bearer KEY` when keys are configured.
async fn require_key(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    if gw.api_keys.is_empty() || request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(key) if gw.api_keys.iter().any(|k| k == key) => next.run(request).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "the API key is not valid",
            "invalid_api_key",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "an API key is required: Authorization: Bearer KEY",
            "missing_api_key",
        ),
    }
}

async fn forward(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let body = match axum::body::to_bytes(request.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
                "invalid_body",
            );
        }
    };
    let model = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) => match v.get("model").and_then(|m| m.as_str()) {
            Some(m) => m.to_string(),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "model is required",
                    "missing_model",
                );
            }
        },
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
                "invalid_json",
            );
        }
    };
    let candidates = gw.candidates(&model);
    if candidates.is_empty() {
        let known = gw.models();
        return if known.contains(&model) {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no replica of {model} is ready; try again shortly"),
                "no_replica",
            )
        } else {
            error(
                StatusCode::NOT_FOUND,
                format!(
                    "model {model:?} is not served; served: {}",
                    known.join(", ")
                ),
                "model_not_found",
            )
        };
    }
    let mut last = String::new();
    for (replica, load) in candidates.into_iter().take(ATTEMPTS) {
        load.in_flight.fetch_add(1, Ordering::SeqCst);
        let sent = gw
            .http
            .post(format!("{}{path}", replica.endpoint))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(answer) => {
                if let Ok(mut f) = load.failures.lock() {
                    *f = (0, None);
                }
                let status = answer.status();
                let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
                // The in-flight count drops when the body has been relayed.
                let guard = InFlight(load);
                let stream = answer.bytes_stream().map_ok(move |chunk| {
                    let _keep = &guard;
                    chunk
                });
                let mut response = Response::new(Body::from_stream(stream));
                *response.status_mut() =
                    StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                if let Some(ct) =
                    content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
                {
                    response.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                response.headers_mut().insert(
                    "x-flotilla-replica",
                    HeaderValue::from_str(&replica.replica_id)
                        .unwrap_or(HeaderValue::from_static("?")),
                );
                return response;
            }
            Err(e) => {
                load.in_flight.fetch_sub(1, Ordering::SeqCst);
                // Nothing was answered: safe to try the next replica.
                tracing::warn!(replica = %replica.replica_id, "unreachable, trying the next: {e}");
                if let Ok(mut f) = load.failures.lock() {
                    f.0 += 1;
                    if f.0 >= EJECT_AFTER {
                        f.1 = Some(Instant::now() + EJECT_FOR);
                    }
                }
                last = format!("{}: {e}", replica.replica_id);
            }
        }
    }
    error(
        StatusCode::BAD_GATEWAY,
        format!("no replica of {model} answered (last: {last})"),
        "replicas_unreachable",
    )
}

/// Decrements a replica's in-flight count when dropped.
struct InFlight(Arc<ReplicaLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn models(State(gw): State<Arc<Gateway>>) -> Response {
    let data: Vec<_> = gw
        .models()
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "flotilla"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
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
    let gw = Arc::new(Gateway {
        replicas,
        region: config.region.clone(),
        api_keys: config.api_keys.clone(),
        load: Mutex::new(HashMap::new()),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default(),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(forward))
        .route("/v1/completions", post(forward))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok\n" }))
        .layer(middleware::from_fn_with_state(gw.clone(), require_key))
        .with_state(gw);
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
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    let _ = bus.client.drain().await;
    Ok(())
}
