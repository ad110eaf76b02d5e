//! The OpenAI-compatible HTTP API, on the same paths as vLLM:
//! `POST /v1/chat/completions`, `POST /v1/completions` (streaming SSE and
//! not), `GET /v1/models`, `GET /health` (503 until the model is loaded),
//! `GET /metrics`.

mod continuation;
mod respond;

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use continuation::{ChatPlan, ContinueFields, Invalid};

use crate::engine::{Engine, EngineError, Job, Resume};
use crate::metrics::RunnerMetrics;
use crate::sampling::SamplingParams;
use crate::template::ChatMessage;

pub struct AppState {
    pub model_name: String,
    pub engine: OnceLock<Engine>,
    pub metrics: Arc<RunnerMetrics>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// An OpenAI-style error body.
fn error(
    status: StatusCode,
    message: impl Into<String>,
    param: Option<&str>,
    code: &str,
) -> Response {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_error"
    } else if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    (status, Json(json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}}))).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CommonParams {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    /// vLLM's extension: generate past the end-of-sequence token.
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's extension: the chosen tokens' ids with each choice.
    #[serde(default)]
    return_token_ids: bool,
}

struct Checked {
    params: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    stream: bool,
    ignore_eos: bool,
    return_token_ids: bool,
}

fn check(p: &CommonParams, served: &str) -> Result<Checked, Box<Response>> {
    let bad = |param: &str, message: String| {
        Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            message,
            Some(param),
            "invalid_value",
        )))
    };
    if let Some(m) = &p.model
        && m != served
    {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            format!("model {m:?} is not served here; this runner serves {served:?}"),
            Some("model"),
            "model_not_found",
        )));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return bad(
            "temperature",
            format!("{temperature} must be between 0 and 2"),
        );
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return bad("top_p", format!("{top_p} must be in (0, 1]"));
    }
    let top_k = p.top_k.unwrap_or(0);
    if top_k < -1 {
        return bad("top_k", format!("{top_k} must be -1, 0 (off) or positive"));
    }
    for (name, v) in [
        ("frequency_penalty", p.frequency_penalty),
        ("presence_penalty", p.presence_penalty),
    ] {
        if let Some(v) = v
            && !(-2.0..=2.0).contains(&v)
        {
            return bad(name, format!("{v} must be between -2 and 2"));
        }
    }
    let repetition_penalty = p.repetition_penalty.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return bad(
            "repetition_penalty",
            format!("{repetition_penalty} must be positive"),
        );
    }
    if p.n.is_some_and(|n| n != 1) {
        return bad("n", "only n = 1 is supported".into());
    }
    let max = p.max_completion_tokens.or(p.max_tokens);
    if let Some(m) = max
        && m < 1
    {
        return bad("max_tokens", format!("{m} must be at least 1"));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) if v.len() > 4 => {
            return bad("stop", "at most 4 stop sequences".into());
        }
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.iter().any(String::is_empty) {
        return bad("stop", "stop sequences must not be empty".into());
    }
    Ok(Checked {
        params: SamplingParams {
            temperature,
            top_p,
            top_k: usize::try_from(top_k.max(0)).unwrap_or(0),
            repetition_penalty,
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            seed: p.seed,
        },
        max_tokens: max.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        stop,
        stream: p.stream,
        ignore_eos: p.ignore_eos,
        return_token_ids: p.return_token_ids,
    })
}

#[derive(Debug, Deserialize)]
struct ChatFields {
    messages: Vec<Value>,
}

struct ChatRequest {
    messages: Vec<Value>,
    common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: Value,
}

struct CompletionRequest {
    prompt: Value,
    common: CommonParams,
}

/// The body as JSON, then the request's own fields and the common ones,
/// each read separately so that an error names the parameter exactly.
fn parse_json<F: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<(F, CommonParams, ContinueFields), Box<Response>> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
            None,
            "invalid_json",
        ))
    })?;
    Ok((
        from_value(&value)?,
        from_value(&value)?,
        from_value(&value)?,
    ))
}

fn from_value<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, Box<Response>> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("{}: {}", path, e.into_inner()),
            Some(&path),
            "invalid_request",
        ))
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let Some(engine) = state.engine.get() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
            None,
            "loading",
        );
    };
    let (request, continuing) = match parse_json::<ChatFields>(&body) {
        Ok((fields, common, continuing)) => (
            ChatRequest {
                messages: fields.messages,
                common,
            },
            continuing,
        ),
        Err(e) => return *e,
    };
    if request.messages.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "messages must not be empty",
            Some("messages"),
            "invalid_value",
        );
    }
    let mut messages = Vec::new();
    for (i, m) in request.messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "system" | "user" | "assistant" | "developer") {
            return error(
                StatusCode::BAD_REQUEST,
                format!("messages[{i}].role {role:?} must be system, user or assistant"),
                Some(&format!("messages[{i}].role")),
                "invalid_value",
            );
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("messages[{i}].content must be text"),
                    Some(&format!("messages[{i}].content")),
                    "invalid_value",
                );
            }
        };
        messages.push(ChatMessage {
            role: if role == "developer" {
                "system".into()
            } else {
                role.into()
            },
            content,
        });
    }
    let checked = match check(&request.common, &state.model_name) {
        Ok(c) => c,
        Err(e) => return *e,
    };
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    let plan = match continuation::chat_plan(continuing, &roles) {
        Ok(plan) => plan,
        Err(e) => return invalid(e),
    };
    let template = &engine.template;
    let (rendered, resume) = match plan {
        ChatPlan::Answer {
            add_generation_prompt,
        } => (template.render_with(&messages, add_generation_prompt), None),
        ChatPlan::ContinueText => (template.render_continuing(&messages), None),
        ChatPlan::ContinueTokens(ids) => {
            let Some((partial, before)) = messages.split_last() else {
                return invalid(Invalid {
                    param: "messages".into(),
                    message: "nothing to continue".into(),
                });
            };
            let param = format!("messages[{}].content", messages.len() - 1);
            match continuation::resume(&engine.tokenizer, ids, Some(&partial.content), &param) {
                Ok(resume) => (template.render(before), Some(resume)),
                Err(e) => return invalid(e),
            }
        }
    };
    let prompt = match rendered {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                e.to_string(),
                Some("messages"),
                "template",
            );
        }
    };
    let ids = engine.tokenizer.encode(&prompt);
    run(state.clone(), engine, ids, resume, checked, true).await
}

async fn completions(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let Some(engine) = state.engine.get() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading",
            None,
            "loading",
        );
    };
    let (request, continuing) = match parse_json::<CompletionFields>(&body) {
        Ok((fields, common, continuing)) => (
            CompletionRequest {
                prompt: fields.prompt,
                common,
            },
            continuing,
        ),
        Err(e) => return *e,
    };
    let prompt = match request.prompt {
        Value::String(s) if !s.is_empty() => s,
        Value::Array(v) if v.len() == 1 && v[0].is_string() => {
            v[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "prompt must be one non-empty string",
                Some("prompt"),
                "invalid_value",
            );
        }
    };
    let checked = match check(&request.common, &state.model_name) {
        Ok(c) => c,
        Err(e) => return *e,
    };
    if continuing.continue_final_message || continuing.add_generation_prompt.is_some() {
        let param = if continuing.continue_final_message {
            "continue_final_message"
        } else {
            "add_generation_prompt"
        };
        return invalid(Invalid {
            param: param.into(),
            message: format!("{param} is for chat; continue a completion with continue_token_ids"),
        });
    }
    let resume = match continuing.continue_token_ids {
        Some(generated) => match continuation::resume(
            &engine.tokenizer,
            generated,
            continuing.continue_text.as_deref(),
            "continue_text",
        ) {
            Ok(resume) => Some(resume),
            Err(e) => return invalid(e),
        },
        None if continuing.continue_text.is_some() => {
            return invalid(Invalid {
                param: "continue_text".into(),
                message: "continue_text needs continue_token_ids".into(),
            });
        }
        None => None,
    };
    let mut ids = engine.tokenizer.encode(&prompt);
    // A chat template writes the bos token itself; a bare completion
    // prompt gets it when the model asks for it.
    if engine.tokenizer.add_bos
        && let Some(bos) = engine.tokenizer.bos
        && ids.first() != Some(&bos)
    {
        ids.insert(0, bos);
    }
    run(state.clone(), engine, ids, resume, checked, false).await
}

fn invalid(e: Invalid) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("{}: {}", e.param, e.message),
        Some(&e.param),
        "invalid_value",
    )
}

/// Generates from the prompt `ids`; a continuation (`resume`) has the
/// tokens already generated appended to them here.
async fn run(
    state: Arc<AppState>,
    engine: &Engine,
    mut ids: Vec<u32>,
    resume: Option<Resume>,
    checked: Checked,
    chat: bool,
) -> Response {
    // The room and default length are the original request's, so that a
    // continuation stops where the uninterrupted answer would have.
    let original_prompt = ids.len();
    let generated = resume.as_ref().map_or(0, |r| r.generated.len());
    if let Some(r) = &resume {
        ids.extend_from_slice(&r.generated);
    }
    let room = engine.context_length.saturating_sub(ids.len());
    let default_max = engine
        .context_length
        .saturating_sub(original_prompt)
        .min(1024)
        .saturating_sub(generated);
    if room == 0 || (checked.max_tokens.is_none() && default_max == 0) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "the prompt has {} tokens; the context holds {}",
                ids.len(),
                engine.context_length
            ),
            Some("messages"),
            "context_length_exceeded",
        );
    }
    let max_tokens = match checked.max_tokens {
        Some(m) if m > room => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "max_tokens {m} plus the prompt's {} tokens exceed the context of {}",
                    ids.len(),
                    engine.context_length
                ),
                Some("max_tokens"),
                "context_length_exceeded",
            );
        }
        Some(m) => m,
        None => default_max,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: ids,
        max_tokens,
        params: checked.params,
        stop: checked.stop,
        ignore_eos: checked.ignore_eos,
        resume,
        events: tx,
        queued_at: Instant::now(),
    };
    if let Err(e) = engine.submit(job) {
        state.metrics.rejected.inc();
        return match e {
            EngineError::QueueFull(_) => error(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{e}; retry later"),
                None,
                "queue_full",
            ),
            other => error(
                StatusCode::SERVICE_UNAVAILABLE,
                other.to_string(),
                None,
                "unavailable",
            ),
        };
    }
    state.metrics.requests.inc();
    let in_flight = crate::metrics::InFlight::new(&state.metrics.in_flight);
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        uuid::Uuid::new_v4().simple()
    );
    let envelope = respond::Envelope {
        id,
        created: now_secs(),
        model: state.model_name.clone(),
        chat,
        return_token_ids: checked.return_token_ids,
    };
    if checked.stream {
        return respond::stream(rx, envelope, in_flight);
    }
    let answer = respond::whole(rx, envelope).await;
    drop(in_flight);
    answer
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now_secs(), "owned_by": "flotilla", "max_model_len": state.engine.get().map(|e| e.context_length)}]})).into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.get() {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(engine) = state.engine.get() {
        state.metrics.queue_depth.set(engine.queue_depth() as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
