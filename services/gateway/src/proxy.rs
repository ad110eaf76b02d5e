//! The proxy service behind `/v1/chat/completions` and `/v1/completions`:
//! reads the request's `model`, hashes its prompt ([`crate::prefix`]),
//! asks the routing table for replicas and relays the first answer
//! ([`first_answer`]); the replica that answers is recorded as holding
//! the prompt. A replica that fails before
//! any byte of an answer (it refuses the connection, or a streaming
//! request's response headers do not come within the response-headers
//! timeout) is counted as failed and the request goes to the next: the
//! client has received nothing yet, so that is safe. One that fails after
//! that has its answer continued by another replica ([`migrate`]; the
//! pure splice is [`splice`]'s).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde_json::json;

use crate::error;
use crate::metrics::{Arrived, GatewayMetrics, ModelLabels, RouteLabels, Served};
use crate::prefix::PromptHashes;
use crate::routing::{CLUSTER_HEADER, Candidate, InFlight, PIN_HEADER, ReplicaTable};
use crate::tls::HttpClient;

/// Tries per request, each on another replica.
const ATTEMPTS: usize = 3;
/// Largest request body accepted.
const MAX_BODY: usize = 16 << 20;

pub struct Proxy {
    pub table: ReplicaTable,
    pub http: HttpClient,
    /// A cluster edge: requests may name the replica to forward to (the
    /// global gateway's choice, [`PIN_HEADER`]).
    pub honours_pins: bool,
    pub metrics: Arc<GatewayMetrics>,
    /// How long a streaming request's response headers may take.
    pub response_headers_timeout: Duration,
    /// How long a flowing stream may pause before it counts as broken.
    pub stream_stall_timeout: Duration,
}

/// Why a replica gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered {
    #[error("{replica}: {source}")]
    Unreachable {
        replica: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{replica}: no response headers within {after:?}")]
    NoHeaders { replica: String, after: Duration },
}

impl Unanswered {
    /// The replica that gave no answer.
    pub fn replica(&self) -> &str {
        match self {
            Self::Unreachable { replica, .. } | Self::NoHeaders { replica, .. } => replica,
        }
    }
}

/// A replica's answer, headers read, body still to come.
pub struct Answer {
    pub replica: Candidate,
    pub response: reqwest::Response,
    /// Keeps the request counted on the replica until the body is relayed.
    pub in_flight: InFlight,
    /// The replicas tried before it, and why each gave no answer.
    pub failed: Vec<Unanswered>,
}

/// Sends the request to `candidates` in order, at most `ATTEMPTS` (3) of
/// them, and returns the first that answers: with response headers, within
/// `headers_within` when that is set. Each replica that does not is marked
/// failed (see [`crate::routing::Streak`]); `on_retry` runs before every try
/// after the first. `Err`: why each tried replica gave no answer.
pub async fn first_answer(
    http: &reqwest::Client,
    candidates: Vec<Candidate>,
    path: &str,
    body: &Bytes,
    headers_within: Option<Duration>,
    mut on_retry: impl FnMut(),
) -> Result<Answer, Vec<Unanswered>> {
    let mut failed = Vec::new();
    for (attempt, replica) in candidates.into_iter().take(ATTEMPTS).enumerate() {
        if attempt > 0 {
            on_retry();
        }
        let in_flight = InFlight::start(&replica.load);
        // The replica's name goes along: an edge forwards to it, a
        // replica ignores it.
        let send = http
            .post(format!("{}{path}", replica.endpoint))
            .header(header::CONTENT_TYPE, "application/json")
            .header(PIN_HEADER, &replica.replica_id)
            .body(body.clone())
            .send();
        let sent = match headers_within {
            Some(after) => match tokio::time::timeout(after, send).await {
                Ok(sent) => sent.map_err(|source| Unanswered::Unreachable {
                    replica: replica.replica_id.clone(),
                    source,
                }),
                Err(_) => Err(Unanswered::NoHeaders {
                    replica: replica.replica_id.clone(),
                    after,
                }),
            },
            None => send.await.map_err(|source| Unanswered::Unreachable {
                replica: replica.replica_id.clone(),
                source,
            }),
        };
        match sent {
            Ok(response) => {
                replica.load.succeeded();
                return Ok(Answer {
                    replica,
                    response,
                    in_flight,
                    failed,
                });
            }
            Err(e) => {
                // Dropping the request closed its connection; nothing was
                // answered, so the next replica may have it.
                drop(in_flight);
                tracing::warn!(replica = %replica.replica_id, "no answer, trying the next: {e}");
                replica.load.failed();
                failed.push(e);
            }
        }
    }
    Err(failed)
}

/// A successful `answer` to a prompt of `prompt` leaves the prompt in the
/// cache of the replica that answered (through an edge, the one the edge
/// names).
pub(crate) fn record_answer(proxy: &Proxy, answer: &Answer, prompt: &PromptHashes) {
    if !answer.response.status().is_success() {
        return;
    }
    let by = answering(&answer.response, &answer.replica.replica_id);
    if let Ok(by) = by.to_str() {
        proxy.table.record_prefix(by, prompt);
    }
}

/// The request header that names a conversation, so that a rollout's
/// traffic split sends all of it to one version.
pub const SESSION_HEADER: &str = "x-session-id";
/// Every gateway hashes a session alike, so a conversation keeps its
/// version through whichever instance it reaches.
const SESSION_SEED: u64 = 0x5e55_1011;

/// A request's place (0 to 99) in a rollout's traffic split: fixed for a
/// session (`x-session-id`, else the OpenAI `user` field), random
/// otherwise.
pub fn draw(session: Option<&str>, request: &serde_json::Value) -> u32 {
    let session = session.or_else(|| request.get("user").and_then(serde_json::Value::as_str));
    match session {
        Some(s) if !s.is_empty() => {
            (xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), SESSION_SEED) % 100) as u32
        }
        _ => rand::random_range(0..100),
    }
}

/// The replica that answered, for the response's [`PIN_HEADER`]: the one
/// an edge names in its own answer (it may have served from another of
/// its cluster's replicas than the one asked for), else `chosen`.
pub(crate) fn answering(answer: &reqwest::Response, chosen: &str) -> HeaderValue {
    answer
        .headers()
        .get(PIN_HEADER)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        .or_else(|| HeaderValue::from_str(chosen).ok())
        .unwrap_or(HeaderValue::from_static("?"))
}

fn served(mut response: Response, model: &str, cluster: &str) -> Response {
    if !cluster.is_empty()
        && let Ok(value) = HeaderValue::from_str(cluster)
    {
        response.headers_mut().insert(CLUSTER_HEADER, value);
    }
    response.extensions_mut().insert(Served {
        model: model.to_string(),
        cluster: cluster.to_string(),
        traffic: None,
    });
    response
}

/// [`served`] by `replica`, counted in its traffic.
fn served_by(response: Response, model: &str, replica: &Candidate) -> Response {
    let mut response = served(response, model, &replica.cluster);
    if let Some(served) = response.extensions_mut().get_mut::<Served>() {
        served.traffic = Some(crate::traffic::TrafficKey::of(replica, model));
    }
    response
}

pub async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let arrived = request
        .extensions()
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0);
    let path = request.uri().path().to_string();
    let pinned = proxy
        .honours_pins
        .then(|| {
            request
                .headers()
                .get(PIN_HEADER)?
                .to_str()
                .ok()
                .map(str::to_string)
        })
        .flatten();
    let session = request
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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
    // Parsed once: for the model, for the prompt's hashes, and for a
    // migration's continuation.
    let request: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
                "invalid_json",
            );
        }
    };
    let Some(model) = request
        .get("model")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "model is required",
            "missing_model",
        );
    };
    // Only `true` means streaming: a strange value is the replica's to
    // refuse, not the gateway's.
    let streaming = request.get("stream") == Some(&serde_json::Value::Bool(true));
    let deciding = Instant::now();
    let prompt = PromptHashes::of(&model, &path, &request);
    let candidates = proxy.table.candidates(&model, pinned.as_deref(), &prompt);
    let candidates = proxy
        .table
        .weigh(candidates, draw(session.as_deref(), &request));
    proxy
        .metrics
        .routing_decision
        .observe(deciding.elapsed().as_secs_f64());
    if candidates.is_empty() {
        let rules = proxy.table.residency_rules(&model);
        if !rules.is_empty() {
            return served(
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no replica of {model} is ready in a cluster it may be served from ({}); \
                         it is not served elsewhere",
                        rules.join("; ")
                    ),
                    "residency",
                ),
                &model,
                "",
            );
        }
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
    // A replica sends a streaming answer's headers as soon as it has
    // queued the request, so their delay tells a hung replica from a busy
    // one. A non-streaming answer's headers come with the whole completion,
    // however long it takes to generate: not timed.
    let headers_within = streaming.then_some(proxy.response_headers_timeout);
    // A streamed answer that can move is asked for with its token ids, so
    // that another replica can continue it exactly.
    let migrating = streaming && splice::migratable(&request);
    let request = migrate::Request {
        model: model.clone(),
        chat: path.ends_with("/chat/completions"),
        client_wants_ids: request.get("return_token_ids") == Some(&serde_json::Value::Bool(true)),
        path: path.clone(),
        body: request,
        prompt,
    };
    let body = if migrating {
        Bytes::from(splice::with_token_ids(&request.body).to_string())
    } else {
        body
    };
    let retried = || {
        proxy
            .metrics
            .retries
            .get_or_create(&ModelLabels {
                model: model.clone(),
            })
            .inc();
    };
    let answer = match first_answer(
        &proxy.http.get(),
        candidates,
        &path,
        &body,
        headers_within,
        retried,
    )
    .await
    {
        Ok(answer) => {
            record_answer(&proxy, &answer, &request.prompt);
            Ok(answer)
        }
        // Every replica tried failed: others may be starting in their
        // place (a dead cluster's are re-placed within seconds).
        Err(failed) => {
            let mut tried: Vec<String> = failed.iter().map(|f| f.replica().to_string()).collect();
            let last = failed.last().map(ToString::to_string).unwrap_or_default();
            let deadline = tokio::time::Instant::now() + migrate::REPLICA_WAIT;
            migrate::another_answer(
                &proxy,
                &request,
                &body,
                headers_within,
                &mut tried,
                deadline,
            )
            .await
            .map_err(|later| format!("{last}; {later}"))
        }
    };
    match answer {
        Ok(answer) if migrating && answer.response.status().is_success() => {
            migrate::stream(Arc::clone(&proxy), answer, request, arrived)
        }
        Ok(answer) if !streaming => migrate::whole(&proxy, answer, request, &body, arrived).await,
        Ok(answer) => relay(answer, &proxy, &model, arrived),
        Err(last) => served(
            error(
                StatusCode::BAD_GATEWAY,
                format!("no replica of {model} answered (last: {last})"),
                "replicas_unreachable",
            ),
            &model,
            "",
        ),
    }
}

/// Relays a replica's answer as it comes; the request stays in flight on
/// the replica until the last byte has gone.
fn relay(answer: Answer, proxy: &Proxy, model: &str, arrived: Instant) -> Response {
    let Answer {
        replica,
        response: answer,
        in_flight,
        ..
    } = answer;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    // A sized answer stays sized: no chunked framing added on the way.
    let content_length = answer.content_length();
    let answered_by = answering(&answer, &replica.replica_id);
    let first_byte = proxy
        .metrics
        .first_byte
        .get_or_create(&RouteLabels {
            model: model.to_string(),
            cluster: replica.cluster.clone(),
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
    response.headers_mut().insert(PIN_HEADER, answered_by);
    served_by(response, model, &replica)
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

pub mod migrate;
pub mod splice;

#[cfg(test)]
mod tests;
