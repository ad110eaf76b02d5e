//! Request migration: an answer whose replica fails after the first byte
//! goes on from another replica instead of being cut.
//!
//! A streamed answer is relayed event by event through a
//! [`Splice`], which keeps what the client has been
//! sent. When the replica's stream breaks (a body error, a reset
//! connection, an end without `[DONE]`, an error event), the gateway asks
//! another ready replica of the model to continue the same completion
//! (the prompt plus the tokens already sent) and splices its chunks into
//! the client's stream: at most [`MAX_MIGRATIONS`] times per request,
//! waiting up to [`REPLICA_WAIT`] for a replica while the fleet re-places
//! the dead one's. A whole answer is buffered before it is answered, so
//! one whose body fails is asked again of another replica and the client
//! sees a single answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::splice::{Relay, Splice, SseFramer, continuation};
use super::{Answer, Proxy, first_answer, record_answer, served};
use crate::error;
use crate::metrics::{MigrationLabels, ModelLabels, RouteLabels};
use crate::prefix::PromptHashes;

/// Migrations per request at most; past them the stream ends with an
/// error event, as a cut.
pub const MAX_MIGRATIONS: usize = 3;
/// How long a failed request waits for a ready replica it has not tried.
pub const REPLICA_WAIT: Duration = Duration::from_secs(30);

/// What a request needs to be sent again.
pub struct Request {
    pub model: String,
    pub path: String,
    /// The request as the client sent it.
    pub body: Value,
    pub chat: bool,
    /// The client asked for `token_ids` itself.
    pub client_wants_ids: bool,
    /// The prompt's block hashes: a replica that answers it holds them.
    pub prompt: PromptHashes,
}

/// An answer (2xx) from a replica not in `tried`, waiting for one until
/// `deadline`; every replica tried is added to `tried`; the one that
/// answers is recorded as holding the prompt. `Err`: the last reason a
/// replica gave none.
pub async fn another_answer(
    proxy: &Proxy,
    request: &Request,
    body: &Bytes,
    headers_within: Option<Duration>,
    tried: &mut Vec<String>,
    deadline: tokio::time::Instant,
) -> Result<Answer, String> {
    let mut last = String::from("no other replica became ready");
    loop {
        let candidates = proxy
            .table
            .candidates_within(&request.model, &request.prompt, tried, deadline)
            .await;
        if candidates.is_empty() {
            return Err(last);
        }
        match first_answer(
            &proxy.http.get(),
            candidates,
            &request.path,
            body,
            headers_within,
            || {},
        )
        .await
        {
            Ok(answer) => {
                tried.extend(answer.failed.iter().map(|f| f.replica().to_string()));
                tried.push(answer.replica.replica_id.clone());
                if answer.response.status().is_success() {
                    record_answer(proxy, &answer, &request.prompt);
                    return Ok(answer);
                }
                last = format!(
                    "{} answered {}",
                    answer.replica.replica_id,
                    answer.response.status()
                );
            }
            Err(failed) => {
                for f in failed {
                    tried.push(f.replica().to_string());
                    last = f.to_string();
                }
            }
        }
    }
}

fn count(proxy: &Proxy, model: &str, outcome: &str) {
    proxy
        .metrics
        .migrations
        .get_or_create(&MigrationLabels {
            model: model.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

/// How one replica's stream ended.
enum Pumped {
    /// `[DONE]` relayed.
    Ended,
    /// The client went away.
    ClientGone,
    /// The replica's stream broke; why.
    Broken(String),
}

type Chunks = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Relays one replica's events through `splice` until its stream ends.
///
/// Once the first bytes have come, a pause longer than `stall` breaks the
/// stream too: a replica behind a cut link sends neither bytes nor a reset,
/// and its stream would otherwise hang for as long as TCP lets it. Before
/// the first bytes the replica may still be prefilling a long prompt, so
/// no limit applies.
async fn pump(
    response: &mut reqwest::Response,
    splice: &mut Splice,
    out: &Chunks,
    first_byte: &mut Option<(Histogram, Instant)>,
    stall: Duration,
) -> Pumped {
    let mut framer = SseFramer::default();
    let mut flowing = false;
    loop {
        let next = if flowing {
            match tokio::time::timeout(stall, response.chunk()).await {
                Ok(next) => next,
                Err(_) => return Pumped::Broken(format!("nothing for {stall:?}")),
            }
        } else {
            response.chunk().await
        };
        let bytes = match next {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Pumped::Broken("the stream ended before [DONE]".into()),
            Err(e) => return Pumped::Broken(e.to_string()),
        };
        flowing = true;
        for event in framer.push(&bytes) {
            let (send, end) = match splice.on_event(event) {
                Relay::Send(s) => (s, false),
                Relay::Skip => continue,
                Relay::End(s) => (s, true),
                Relay::Failed(why) => return Pumped::Broken(why),
            };
            if let Some((histogram, arrived)) = first_byte.take() {
                histogram.observe(arrived.elapsed().as_secs_f64());
            }
            if out.send(Ok(Bytes::from(send))).await.is_err() {
                return Pumped::ClientGone;
            }
            if end {
                return Pumped::Ended;
            }
        }
    }
}

/// Relays a streamed answer, moving it to another replica when its own
/// fails; the response the client gets at once.
pub fn stream(proxy: Arc<Proxy>, answer: Answer, request: Request, arrived: Instant) -> Response {
    let (out, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let answered_by = super::answering(&answer.response, &answer.replica.replica_id);
    let first = answer.replica.clone();
    let content_type = answer
        .response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
    let first_byte = proxy
        .metrics
        .first_byte
        .get_or_create(&RouteLabels {
            model: request.model.clone(),
            cluster: first.cluster.clone(),
        })
        .clone();
    let model = request.model.clone();
    tokio::spawn(async move {
        let mut splice = Splice::new(request.client_wants_ids);
        let mut tried = vec![answer.replica.replica_id.clone()];
        let mut leg = answer;
        let mut first_byte = Some((first_byte, arrived));
        let mut deadline = None;
        loop {
            let why = match pump(
                &mut leg.response,
                &mut splice,
                &out,
                &mut first_byte,
                proxy.stream_stall_timeout,
            )
            .await
            {
                Pumped::Ended | Pumped::ClientGone => return,
                Pumped::Broken(why) => why,
            };
            leg.replica.load.failed();
            proxy
                .metrics
                .traffic
                .broken(&crate::traffic::TrafficKey::of(
                    &leg.replica,
                    &request.model,
                ));
            let from = leg.replica.replica_id.clone();
            drop(leg);
            if splice.finished {
                // Only the end marker was lost.
                let _ = out.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
                return;
            }
            let answer_id = splice.answer_id().unwrap_or_default();
            if splice.length_reached(&request.body) {
                tracing::info!(request = %answer_id, replica = %from, "stream broke ({why}) after its last token; finishing it here");
                let end = splice.finish_length(request.chat);
                let _ = out.send(Ok(Bytes::from(end))).await;
                return;
            }
            if splice.leg >= MAX_MIGRATIONS {
                tracing::warn!(request = %answer_id, replica = %from, "stream broke ({why}); {MAX_MIGRATIONS} migrations already, giving up");
                count(&proxy, &request.model, "failed");
                cut(
                    &out,
                    &format!("the answer broke off {} times", splice.leg + 1),
                )
                .await;
                return;
            }
            let body = continuation(&request.body, request.chat, &splice);
            let body = Bytes::from(body.to_string());
            let deadline =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + REPLICA_WAIT);
            match another_answer(
                &proxy,
                &request,
                &body,
                Some(proxy.response_headers_timeout),
                &mut tried,
                deadline,
            )
            .await
            {
                Ok(next) => {
                    tracing::info!(
                        request = %answer_id,
                        from = %from,
                        to = %next.replica.replica_id,
                        tokens_sent = splice.tokens_sent(),
                        exact = splice.ids.is_some(),
                        "stream broke ({why}); continuing on another replica"
                    );
                    count(&proxy, &request.model, "continued");
                    splice.next_leg();
                    leg = next;
                }
                Err(last) => {
                    tracing::warn!(request = %answer_id, from = %from, "stream broke ({why}); no replica to continue it: {last}");
                    count(&proxy, &request.model, "failed");
                    cut(
                        &out,
                        &format!("no replica could continue the answer: {last}"),
                    )
                    .await;
                    return;
                }
            }
        }
    });
    let mut rx = rx;
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut response = (StatusCode::OK, body).into_response();
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
        .headers_mut()
        .insert(crate::routing::PIN_HEADER, answered_by);
    super::served_by(response, &model, &first)
}

/// Ends a stream that cannot go on with an error event, as a replica's
/// own failure reads.
async fn cut(out: &Chunks, message: &str) {
    let event =
        json!({"error": {"message": message, "type": "server_error", "code": "migration_failed"}});
    let _ = out
        .send(Ok(Bytes::from(format!("data: {event}\n\n"))))
        .await;
}

/// Reads a whole (non-streaming) answer before answering, asking another
/// replica when its body fails, so that the client sees one answer.
pub async fn whole(
    proxy: &Proxy,
    mut answer: Answer,
    request: Request,
    body: &Bytes,
    arrived: Instant,
) -> Response {
    let mut tried = vec![answer.replica.replica_id.clone()];
    let mut deadline = None;
    loop {
        let status = StatusCode::from_u16(answer.response.status().as_u16())
            .unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = answer
            .response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
        let answered_by = super::answering(&answer.response, &answer.replica.replica_id);
        let Answer {
            replica,
            response,
            in_flight,
            ..
        } = answer;
        let why = match response.bytes().await {
            Ok(bytes) => {
                drop(in_flight);
                // The client's first byte goes out with the whole answer.
                proxy
                    .metrics
                    .first_byte
                    .get_or_create(&RouteLabels {
                        model: request.model.clone(),
                        cluster: replica.cluster.clone(),
                    })
                    .observe(arrived.elapsed().as_secs_f64());
                let mut response = (status, bytes).into_response();
                if let Some(ct) = content_type {
                    response.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                response
                    .headers_mut()
                    .insert(crate::routing::PIN_HEADER, answered_by);
                return super::served_by(response, &request.model, &replica);
            }
            Err(e) => e,
        };
        drop(in_flight);
        replica.load.failed();
        proxy
            .metrics
            .retries
            .get_or_create(&ModelLabels {
                model: request.model.clone(),
            })
            .inc();
        tracing::warn!(replica = %replica.replica_id, "the answer broke off ({why}); asking another replica");
        let deadline = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + REPLICA_WAIT);
        match another_answer(proxy, &request, body, None, &mut tried, deadline).await {
            Ok(next) => answer = next,
            Err(last) => {
                return served(
                    error(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "the answer broke off and no replica answered again (last: {last})"
                        ),
                        "replicas_unreachable",
                    ),
                    &request.model,
                    "",
                );
            }
        }
    }
}
