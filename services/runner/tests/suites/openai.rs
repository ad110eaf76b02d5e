//! The runner with the real SmolLM2 GGUF, driven over HTTP like any
//! OpenAI client would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use flotilla_runner::{engine, template::ChatMessage};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{Runner, shipped_gguf};

async fn start(max_queue: usize) -> Runner {
    start_with(max_queue, 8).await
}

async fn start_with(max_queue: usize, max_batch: usize) -> Runner {
    Runner::shipped(max_queue, max_batch).await
}

impl Runner {
    async fn chat(&self, body: Value) -> Value {
        let (status, v) = self.post("/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn the_models_own_chat_template_places_the_turns() {
    let model = engine::load_gguf(&shipped_gguf(), &candle_core::Device::Cpu).unwrap();
    let with_system = model
        .template
        .render(&[
            ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ])
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without one, SmolLM2's template adds its own system turn.
    let without = model
        .template
        .render(&[ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }])
        .unwrap();
    assert!(
        without.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{without}"
    );
    // The tokenizer keeps the turn markers whole.
    let ids = model.tokenizer.encode(&with_system);
    let im_start = model.tokenizer.encode("<|im_start|>");
    assert_eq!(im_start.len(), 1);
    assert_eq!(ids[0], im_start[0]);
    assert_eq!(model.tokenizer.decode(&ids, false), with_system);
}

#[tokio::test]
async fn greedy_chat_is_deterministic_english_and_streams_the_same_text() {
    let r = start(16).await;
    let body = json!({"model": "smollm2", "messages": user("What is the capital of France? Answer in one sentence."), "temperature": 0, "max_tokens": 24});
    let a = r.chat(body.clone()).await;
    let b = r.chat(body).await;
    assert_eq!(text_of(&a), text_of(&b));
    let text = text_of(&a);
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(
        letters * 10 >= text.chars().count() * 8,
        "not English prose: {text:?}"
    );
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(a["object"], "chat.completion");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    assert!(["stop", "length"].contains(&a["choices"][0]["finish_reason"].as_str().unwrap()));

    // Sampled with a seed: streamed deltas add up to the same text.
    let sampled = json!({"model": "smollm2", "messages": user("Write two words about the sea."), "temperature": 0.8, "seed": 42, "max_tokens": 20});
    let whole = text_of(&r.chat(sampled.clone()).await);
    let mut streaming = sampled.clone();
    streaming["stream"] = json!(true);
    let resp = r
        .client
        .post(format!("{}/v1/chat/completions", r.base))
        .json(&streaming)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let mut deltas = String::new();
    let mut finished = false;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            finished = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            deltas.push_str(t);
        }
    }
    assert!(finished, "no [DONE]: {body}");
    assert_eq!(deltas, whole);

    // Stop sequences end the text and say so.
    let stopped = r
        .chat(json!({"messages": user("Count: 1, 2, 3, 4, 5, 6"), "temperature": 0, "max_tokens": 40, "stop": [","]}))
        .await;
    assert!(!text_of(&stopped).contains(','), "{stopped}");

    // Plain completions and the model list.
    let (status, c) = r
        .post(
            "/v1/completions",
            json!({"prompt": "The sky is", "max_tokens": 5, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    assert_eq!(c["usage"]["completion_tokens"], 5);
    let models: Value = r
        .client
        .get(format!("{}/v1/models", r.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "smollm2");
}

#[tokio::test]
async fn bad_requests_get_their_4xx() {
    let r = start(16).await;
    let cases = [
        (json!({"messages": []}), 400, "messages"),
        (
            json!({"messages": user("hi"), "temperature": 3}),
            400,
            "temperature",
        ),
        (json!({"messages": user("hi"), "top_p": 0}), 400, "top_p"),
        (
            json!({"messages": user("hi"), "max_tokens": 0}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": user("hi"), "max_tokens": 100000}),
            400,
            "max_tokens",
        ),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"messages": user("hi"), "model": "gpt-9"}),
            404,
            "model",
        ),
        (json!({"messages": user("hi"), "n": 3}), 400, "n"),
        (json!({"messages": user("hi"), "top_k": -5}), 400, "top_k"),
        (
            json!({"messages": user("hi"), "presence_penalty": 3}),
            400,
            "presence_penalty",
        ),
        (
            json!({"messages": user("hi"), "frequency_penalty": -2.5}),
            400,
            "frequency_penalty",
        ),
        (
            json!({"messages": user("hi"), "repetition_penalty": 0}),
            400,
            "repetition_penalty",
        ),
        (
            json!({"messages": user("hi"), "temperature": "hot"}),
            400,
            "temperature",
        ),
        // Longer than SmolLM2's 8,192-token context.
        (
            json!({"messages": user(&"hello ".repeat(9000))}),
            400,
            "messages",
        ),
        (json!({"messages": "hi"}), 400, "messages"),
    ];
    for (body, status, param) in cases {
        let (got, v) = r.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let resp = r
        .client
        .post(format!("{}/v1/chat/completions", r.base))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn eight_concurrent_requests_batch_and_each_equals_its_answer_alone() {
    let r = start(16).await;
    let body = |i: usize| json!({"messages": user(&format!("Say hello number {i}.")), "temperature": 0, "max_tokens": 16});
    let mut alone = Vec::new();
    for i in 0..8 {
        alone.push(text_of(&r.chat(body(i)).await));
    }
    let mut jobs = Vec::new();
    for i in 0..8 {
        let (client, base, body) = (r.client.clone(), r.base.clone(), body(i));
        jobs.push(tokio::spawn(async move {
            let resp = client
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }));
    }
    // While they run, the batch holds several sequences at once.
    let mut most_running = 0.0f64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !jobs.iter().all(|j| j.is_finished()) && Instant::now() < deadline {
        most_running = most_running.max(r.metric("flotilla_runner_running").await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, j) in jobs.into_iter().enumerate() {
        let v = j.await.unwrap();
        assert_eq!(text_of(&v), alone[i], "request {i} batched vs alone");
    }
    assert!(
        most_running >= 2.0,
        "the requests never shared a step (most running: {most_running})"
    );
    assert!(r.metric("flotilla_runner_kv_cache_capacity_tokens").await > 0.0);
}

#[tokio::test]
async fn a_cancelled_request_frees_its_slot_for_a_queued_one() {
    // One slot: the second request waits until the first leaves.
    let r = start_with(16, 1).await;
    let before = r.metric("flotilla_runner_completion_tokens_total").await;
    let body = json!({"messages": user("Tell me a long story about a dragon."), "temperature": 0, "max_tokens": 400, "stream": true});
    let resp = r
        .client
        .post(format!("{}/v1/chat/completions", r.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.metric("flotilla_runner_kv_cache_tokens").await == 0.0 {
        assert!(Instant::now() < deadline, "the KV cache never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (client, base) = (r.client.clone(), r.base.clone());
    let queued = tokio::spawn(async move {
        let body = json!({"messages": user("Hi"), "temperature": 0, "max_tokens": 4});
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.metric("flotilla_runner_queue_depth").await < 1.0 {
        assert!(Instant::now() < deadline, "second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    let next = tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .expect("the queued request never ran")
        .unwrap();
    let after = r.metric("flotilla_runner_completion_tokens_total").await;
    let abandoned = after - before - next["usage"]["completion_tokens"].as_f64().unwrap();
    assert!(
        abandoned < 100.0,
        "the abandoned request kept generating: {abandoned} tokens"
    );
}

#[tokio::test]
async fn a_full_queue_answers_429() {
    let r = start_with(1, 1).await;
    // One running (streaming, held open), one waiting, the next refused.
    let body = json!({"messages": user("Tell me a long story."), "temperature": 0, "max_tokens": 300, "stream": true});
    let running = r
        .client
        .post(format!("{}/v1/chat/completions", r.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut running = running.bytes_stream();
    running.next().await.unwrap().unwrap();
    let (client, base) = (r.client.clone(), r.base.clone());
    let waiting = tokio::spawn(async move {
        client
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"messages": user("Hi"), "max_tokens": 2}))
            .send()
            .await
            .unwrap()
            .status()
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.metric("flotilla_runner_queue_depth").await < 1.0 {
        assert!(Instant::now() < deadline, "second request never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = r
        .post(
            "/v1/chat/completions",
            json!({"messages": user("Hi"), "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 429, "{v}");
    drop(running);
    assert_eq!(waiting.await.unwrap(), 200);
}

/// The official `openai` Python client (installed by scripts/install-tools)
/// against the runner: chat, streaming, model list.
#[tokio::test]
async fn the_official_openai_python_client_works() {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-tools",
        python.display()
    );
    let r = start(16).await;
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
models = [m.id for m in client.models.list().data]
chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=12)
stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=12, stream=True)
streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
print(json.dumps({"models": models, "text": chat.choices[0].message.content, "finish": chat.choices[0].finish_reason,
                  "usage": chat.usage.completion_tokens, "streamed": streamed}))
"#;
    let out = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&r.base)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!(["smollm2"]));
    let text = v["text"].as_str().unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(
        v["streamed"].as_str().unwrap(),
        text,
        "greedy stream equals the whole answer"
    );
    assert!(v["usage"].as_u64().unwrap() >= 1);
}
