//! A generation's events as an OpenAI answer: SSE chunks while streaming,
//! one JSON body otherwise. With `return_token_ids` (vLLM's name) each
//! streamed choice carries the ids of the tokens chosen since the previous
//! chunk, and a whole answer's choice all of them.

use std::convert::Infallible;

use axum::Json;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::error;
use crate::engine::GenEvent;

/// What every chunk or answer of one request repeats.
pub(super) struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
    pub return_token_ids: bool,
}

/// OpenAI's usage object; `cached_tokens` (prompt tokens served from the
/// prefix cache) under `prompt_tokens_details`, as OpenAI reports it.
fn usage(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens,
           "prompt_tokens_details": {"cached_tokens": cached_tokens}})
}

/// SSE chunks as OpenAI sends them, ending with `[DONE]`. Dropping the
/// stream (client gone) drops the receiver, which stops generation.
pub(super) fn stream(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    envelope: Envelope,
    in_flight: crate::metrics::InFlight,
) -> Response {
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let Envelope {
            id,
            created,
            model,
            chat,
            return_token_ids,
        } = envelope;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |delta: Value,
                     ids: Option<Vec<u32>>,
                     finish: Option<&str>,
                     usage: Option<Value>| {
            let mut choice = if chat {
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            } else {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(Value::String(String::new())), "finish_reason": finish, "logprobs": null})
            };
            if let Some(ids) = ids.filter(|_| return_token_ids) {
                choice["token_ids"] = json!(ids);
            }
            let mut body = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
            if let Some(u) = usage {
                body["usage"] = u;
            }
            Ok(Event::default().data(body.to_string()))
        };
        if chat
            && out_tx
                .send(chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                    None,
                    None,
                ))
                .is_err()
        {
            return;
        }
        while let Some(event) = rx.recv().await {
            let sent = match event {
                GenEvent::Text { text, token_ids } => {
                    out_tx.send(chunk(json!({"content": text}), Some(token_ids), None, None))
                }
                GenEvent::Failed(e) => {
                    let _ = out_tx.send(Ok(Event::default().data(
                        json!({"error": {"message": e, "type": "server_error"}}).to_string(),
                    )));
                    break;
                }
                GenEvent::Done {
                    reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    token_ids,
                } => {
                    let _ = out_tx.send(chunk(
                        json!({}),
                        Some(token_ids),
                        Some(reason.as_str()),
                        Some(usage(prompt_tokens, cached_tokens, completion_tokens)),
                    ));
                    let _ = out_tx.send(Ok(Event::default().data("[DONE]")));
                    break;
                }
            };
            if sent.is_err() {
                // The client left: dropping rx stops the engine's job.
                break;
            }
        }
    });
    let mut out_rx = out_rx;
    Sse::new(futures::stream::poll_fn(move |cx| out_rx.poll_recv(cx)))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The whole answer once generation is done.
pub(super) async fn whole(
    mut rx: mpsc::UnboundedReceiver<GenEvent>,
    envelope: Envelope,
) -> Response {
    let mut text = String::new();
    let mut ids = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenEvent::Text { text: t, token_ids } => {
                text.push_str(&t);
                ids.extend(token_ids);
            }
            GenEvent::Failed(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e,
                    None,
                    "generation_failed",
                );
            }
            GenEvent::Done {
                reason,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                token_ids,
            } => {
                ids.extend(token_ids);
                let Envelope {
                    id,
                    created,
                    model,
                    chat,
                    return_token_ids,
                } = envelope;
                let mut choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason.as_str(), "logprobs": null})
                } else {
                    json!({"index": 0, "text": text, "finish_reason": reason.as_str(), "logprobs": null})
                };
                if return_token_ids {
                    choice["token_ids"] = json!(ids);
                }
                let object = if chat {
                    "chat.completion"
                } else {
                    "text_completion"
                };
                return Json(
                    json!({"id": id, "object": object, "created": created, "model": model,
                           "choices": [choice], "usage": usage(prompt_tokens, cached_tokens, completion_tokens)}),
                )
                .into_response();
            }
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine stopped",
        None,
        "unavailable",
    )
}
