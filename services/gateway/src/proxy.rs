//! The proxy service behind `/v1/chat/completions` and `/v1/completions`:
//! reads the request's `model`, asks the routing table for replicas and
//! relays the first answer, moving to the next replica when one refuses the
//! connection before any byte of an answer.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde_json::json;

use crate::error;
use crate::metrics::{Arrived, GatewayMetrics, ModelLabels, RouteLabels, Served};
use crate::routing::{InFlight, ReplicaTable};

/// Tries per request, each on another replica.
const ATTEMPTS: usize = 3;
/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

pub struct Proxy {
    pub table: ReplicaTable,
    pub http: reqwest::Client,
    pub metrics: Arc<GatewayMetrics>,
}

/// Just the `model` of an OpenAI request body.
#[derive(serde::Deserialize)]
struct ModelOnly {
    model: Option<String>,
}

fn served(mut response: Response, model: &str, cluster: &str) -> Response {
    response.extensions_mut().insert(Served {
        model: model.to_string(),
        cluster: cluster.to_string(),
    });
    response
}

pub async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let arrived = request
        .extensions()
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0);
    let path = request.uri().path().to_string();
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
                "invalid_body",
            );
        }
    };
    let model = match serde_json::from_slice::<ModelOnly>(&body) {
        Ok(ModelOnly { model: Some(m) }) => m,
        _ => {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                // JSON, but no string `model`.
                Ok(_) => error(
                    StatusCode::BAD_REQUEST,
                    "model is required",
                    "missing_model",
                ),
                Err(e) => error(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not JSON: {e}"),
                    "invalid_json",
                ),
            };
        }
    };
    let candidates = proxy.table.candidates(&model);
    if candidates.is_empty() {
        let known = proxy.table.models();
        return if known.contains(&model) {
            served(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no replica of {model} is ready; try again shortly"),
                    "no_replica",
                ),
                &model,
                "",
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
    for (attempt, replica) in candidates.into_iter().take(ATTEMPTS).enumerate() {
        if attempt > 0 {
            proxy
                .metrics
                .retries
                .get_or_create(&ModelLabels {
                    model: model.clone(),
                })
                .inc();
        }
        let in_flight = InFlight::start(&replica.load);
        let sent = proxy
            .http
            .post(format!("{}{path}", replica.endpoint))
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(answer) => {
                proxy.table.succeeded(&replica.load);
                return relay(
                    answer,
                    &proxy,
                    &model,
                    &replica.cluster,
                    &replica.replica_id,
                    arrived,
                    in_flight,
                );
            }
            Err(e) => {
                drop(in_flight);
                // Nothing was answered: safe to try the next replica.
                tracing::warn!(replica = %replica.replica_id, "unreachable, trying the next: {e}");
                proxy.table.failed(&replica.load);
                last = format!("{}: {e}", replica.replica_id);
            }
        }
    }
    served(
        error(
            StatusCode::BAD_GATEWAY,
            format!("no replica of {model} answered (last: {last})"),
            "replicas_unreachable",
        ),
        &model,
        "",
    )
}

/// Relays a replica's answer as it comes; the request stays in flight on
/// the replica until the last byte has gone.
fn relay(
    answer: reqwest::Response,
    proxy: &Proxy,
    model: &str,
    cluster: &str,
    replica_id: &str,
    arrived: Instant,
    in_flight: InFlight,
) -> Response {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    // A sized answer stays sized: no chunked framing added on the way.
    let content_length = answer.content_length();
    let first_byte = proxy
        .metrics
        .first_byte
        .get_or_create(&RouteLabels {
            model: model.to_string(),
            cluster: cluster.to_string(),
        })
        .clone();
    let mut waiting_first = true;
    let stream = answer.bytes_stream().map_ok(move |chunk| {
        let _until_relayed = &in_flight;
        if waiting_first {
            waiting_first = false;
            first_byte.observe(arrived.elapsed().as_secs_f64());
        }
        chunk
    });
    let mut response = (status, Body::from_stream(stream)).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some(length) = content_length {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response.headers_mut().insert(
        "x-flotilla-replica",
        HeaderValue::from_str(replica_id).unwrap_or(HeaderValue::from_static("?")),
    );
    served(response, model, cluster)
}

pub async fn models(State(proxy): State<Arc<Proxy>>) -> Response {
    let data: Vec<_> = proxy
        .table
        .models()
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "owned_by": "flotilla"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
