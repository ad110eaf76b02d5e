//! The API-key layer in front of every route but `/health`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::error;

/// Accepted keys; empty: the gateway is open.
#[derive(Debug, Default)]
pub struct ApiKeys(pub Vec<String>);

/// Checks `Authorization: Bearer KEY` when keys are configured.
pub async fn require_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Response {
    if keys.0.is_empty() || request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(key) if keys.0.iter().any(|k| k == key) => next.run(request).await,
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
