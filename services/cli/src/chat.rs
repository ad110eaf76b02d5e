//! `flotilla chat`: one prompt through the gateway, the answer streamed.

use std::io::Write;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// What to ask.
    pub prompt: String,
    /// The gateway's base URL.
    #[arg(
        long,
        env = "FLOTILLA_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway: String,
    /// The model (a deployment's model name); by default the gateway's
    /// first.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "FLOTILLA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

fn with_key(request: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => request.bearer_auth(k),
        None => request,
    }
}

async fn error_of(response: reqwest::Response) -> anyhow::Error {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| body.to_string(), str::to_string);
    anyhow::anyhow!("the gateway answered {status}: {message}")
}

/// Streams the answer to `out` as it arrives; returns the whole text.
pub async fn chat(args: &ChatArgs, out: &mut impl Write) -> anyhow::Result<String> {
    let base = args.gateway.trim_end_matches('/');
    let client = reqwest::Client::new();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let response = with_key(
                client.get(format!("{base}/v1/models")),
                args.api_key.as_deref(),
            )
            .send()
            .await
            .with_context(|| {
                format!("cannot reach the gateway at {base} (is the fleet up? try `flotilla up`)")
            })?;
            if !response.status().is_success() {
                return Err(error_of(response).await);
            }
            let models: Value = response.json().await.context("reading /v1/models")?;
            match models["data"][0]["id"].as_str() {
                Some(id) => id.to_string(),
                None => bail!(
                    "the gateway serves no model yet (`flotilla get replicas` shows what is starting)"
                ),
            }
        }
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": args.prompt}));
    let response = with_key(
        client.post(format!("{base}/v1/chat/completions")),
        args.api_key.as_deref(),
    )
    .json(&json!({
        "model": model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": true,
    }))
    .send()
    .await
    .with_context(|| format!("cannot reach the gateway at {base}"))?;
    if !response.status().is_success() {
        return Err(error_of(response).await);
    }
    let mut body = response.bytes_stream();
    let mut pending = String::new();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the answer stream broke off")?;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let frame: String = pending.drain(..end + 2).collect();
            for data in frame.lines().filter_map(|l| l.strip_prefix("data:")) {
                let data = data.trim();
                if data == "[DONE]" {
                    writeln!(out)?;
                    return Ok(text);
                }
                let value: Value = serde_json::from_str(data).with_context(|| {
                    format!("the gateway sent an event that is not JSON: {data}")
                })?;
                if let Some(message) = value["error"]["message"].as_str() {
                    bail!("the model failed mid-answer: {message}");
                }
                if let Some(delta) = value["choices"][0]["delta"]["content"].as_str() {
                    write!(out, "{delta}")?;
                    out.flush()?;
                    text.push_str(delta);
                }
            }
        }
    }
    bail!("the answer stream ended without [DONE]")
}
