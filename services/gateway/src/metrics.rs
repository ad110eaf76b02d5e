//! The gateway's Prometheus metrics and the layer that times every proxied
//! request.
//!
//! A request is timed from its arrival to the last byte of the answer
//! relayed to the client, so a streamed answer counts whole. The proxy
//! tells this layer which model and cluster served the request through a
//! [`Served`] response extension; requests refused before a replica was
//! chosen carry empty labels.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::traffic::{Traffic, TrafficKey};

/// Who served a request; set by the proxy on its response.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub model: String,
    pub cluster: String,
    /// The replica, for the traffic summaries; none when no replica
    /// answered.
    pub traffic: Option<TrafficKey>,
}

/// When the request arrived; set by [`observe`] for the proxy's
/// time-to-first-byte.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub cluster: String,
    /// `2xx`, `4xx`, `5xx`.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub model: String,
    pub cluster: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub model: String,
    pub cluster: String,
    pub replica: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MigrationLabels {
    pub model: String,
    /// `continued` (another replica took the answer over) or `failed`
    /// (none could: the stream was cut).
    pub outcome: String,
}

fn latency() -> Histogram {
    // 0.25 ms to about 16 s: the gateway's own overhead and whole answers.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// The gateway's metric families, registered into the service's registry.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub first_byte: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Family<ReplicaLabels, Gauge>,
    pub retries: Family<ModelLabels, Counter>,
    pub ejections: Family<ReplicaLabels, Counter>,
    pub migrations: Family<MigrationLabels, Counter>,
    /// Blocks of prompt each replica is predicted to hold in its cache.
    pub prefix_blocks: Family<ReplicaLabels, Gauge>,
    /// Leading prompt blocks the serving replica was predicted to hold;
    /// over `prefix_prompt_blocks`, the predicted hit rate.
    pub prefix_matched_blocks: Family<ModelLabels, Counter>,
    pub prefix_prompt_blocks: Family<ModelLabels, Counter>,
    /// Hashing the prompt and ranking the replicas, per request.
    pub routing_decision: Histogram,
    /// This window's traffic per replica, for the bus.
    pub traffic: Arc<Traffic>,
}

impl GatewayMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            requests: Family::new_with_constructor(latency),
            first_byte: Family::new_with_constructor(latency),
            in_flight: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            migrations: Family::default(),
            prefix_blocks: Family::default(),
            prefix_matched_blocks: Family::default(),
            prefix_prompt_blocks: Family::default(),
            // 1 µs to about 16 ms.
            routing_decision: Histogram::new(exponential_buckets(0.000_001, 2.0, 15)),
            traffic: Arc::default(),
        };
        registry.register(
            "gateway_request_duration_seconds",
            "Proxied requests, arrival to last byte relayed, by model, cluster and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "gateway_time_to_first_byte_seconds",
            "Arrival to the first byte of the replica's answer, by model and cluster",
            metrics.first_byte.clone(),
        );
        registry.register(
            "gateway_replica_in_flight",
            "Requests in flight per replica",
            metrics.in_flight.clone(),
        );
        registry.register(
            "gateway_retries",
            "Requests moved to another replica after a connection failure",
            metrics.retries.clone(),
        );
        registry.register(
            "gateway_ejections",
            "Replicas ejected after consecutive connection failures",
            metrics.ejections.clone(),
        );
        registry.register(
            "gateway_migrations",
            "Answers that broke off after their first byte, by whether another replica continued them",
            metrics.migrations.clone(),
        );
        registry.register(
            "gateway_prefix_blocks",
            "Blocks of prompt prefix the gateway predicts each replica holds in its cache",
            metrics.prefix_blocks.clone(),
        );
        registry.register(
            "gateway_prefix_matched_blocks",
            "Leading prompt blocks the serving replica was predicted to hold, by model",
            metrics.prefix_matched_blocks.clone(),
        );
        registry.register(
            "gateway_prefix_prompt_blocks",
            "Prompt blocks of served requests, by model (with matched blocks: the predicted hit rate)",
            metrics.prefix_prompt_blocks.clone(),
        );
        registry.register(
            "gateway_routing_decision_seconds",
            "Time to hash a request's prompt and rank the replicas for it",
            metrics.routing_decision.clone(),
        );
        metrics
    }
}

fn status_class(status: axum::http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Observes one request once: when the relayed body ends, or when it is
/// dropped early (the client went away).
struct Timing {
    metrics: Arc<GatewayMetrics>,
    labels: Option<RequestLabels>,
    traffic: Option<(TrafficKey, u16)>,
    arrived: Instant,
    first_byte_seen: bool,
}

impl Timing {
    fn first_byte(&mut self) {
        if std::mem::replace(&mut self.first_byte_seen, true) {
            return;
        }
        if let Some((key, _)) = &self.traffic {
            self.metrics
                .traffic
                .first_byte(key, self.arrived.elapsed().as_secs_f64());
        }
    }

    fn finish(&mut self) {
        let seconds = self.arrived.elapsed().as_secs_f64();
        if let Some(labels) = self.labels.take() {
            self.metrics
                .requests
                .get_or_create(&labels)
                .observe(seconds);
        }
        if let Some((key, status)) = self.traffic.take() {
            self.metrics.traffic.ended(&key, status, seconds);
        }
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The answer's body, unchanged (size hint included), timed to its end.
struct TimedBody {
    inner: Body,
    timing: Timing,
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.timing.first_byte();
        }
        // Observed before the last bytes go out, so a client that has read
        // the whole answer finds it counted.
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.timing.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The layer: stamps the arrival, then times the answer to its last byte.
pub async fn observe(
    State(metrics): State<Arc<GatewayMetrics>>,
    mut request: Request,
    next: Next,
) -> Response {
    let arrived = Instant::now();
    request.extensions_mut().insert(Arrived(arrived));
    let response = next.run(request).await;
    let served = response
        .extensions()
        .get::<Served>()
        .cloned()
        .unwrap_or_default();
    let timing = Timing {
        metrics,
        labels: Some(RequestLabels {
            model: served.model,
            cluster: served.cluster,
            status: status_class(response.status()).to_string(),
        }),
        traffic: served.traffic.map(|key| (key, response.status().as_u16())),
        arrived,
        first_byte_seen: false,
    };
    response.map(|inner| Body::new(TimedBody { inner, timing }))
}
