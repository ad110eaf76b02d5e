//! A replica leaving does not cut what it serves: asked to stop (scaled
//! away here; a rollout's retired replicas and a delete take the same
//! path), it is first recorded `Stopping`, so the gateway routes nothing
//! new to it, then finishes its requests, then stops. The test leaves the
//! gateway no other replica, so a stream that completes was finished by
//! the replica itself, not migrated.

use std::time::{Duration, Instant};

use flotilla_integration::fleet;
use flotilla_proto::EventType;
use flotilla_proto::v1::{ReplicaPhase, event::Payload};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{self, apply, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "smollm2-135m-instruct";
/// Long enough that the scale-down lands while the stream runs.
const TOKENS: u64 = 320;

fn chat(replicas: u32) -> String {
    format!(
        "metadata: {{name: chat}}\nspec:\n  model: {{preset: {MODEL}}}\n  replicas: {replicas}\n"
    )
}

#[tokio::test]
async fn a_replica_scaled_away_mid_stream_finishes_the_stream_before_it_stops() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(5));
    let config = fleet::config(&server);
    fleet::rollout(&config, 3);
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(&server, "eu-1", "2xH100-80GB", &[], 1.0, caches.path());
    let gateway = format!(
        "http://{}",
        fleet::gateway(fleet::gateway_config(&config)).await
    );
    apply(&bus, &chat(1)).await;
    let ready = wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    let Some(Payload::Replica(replica)) = ready.payload else {
        panic!("no status: {ready:?}")
    };

    // A greedy stream that runs for seconds.
    let response = support::poll_until(DEADLINE, "the gateway routes to the replica", || {
        let gateway = gateway.clone();
        async move {
            let r = reqwest::Client::new()
                .post(format!("{gateway}/v1/chat/completions"))
                .json(&json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the sea."}],
                              "temperature": 0, "max_tokens": TOKENS, "ignore_eos": true, "stream": true,
                              "stream_options": {"include_usage": true}}))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(r)
        }
    })
    .await;
    assert_eq!(
        response.headers()["x-flotilla-replica"].to_str().unwrap(),
        replica.replica_id
    );
    let mut body = response.bytes_stream();
    let mut pending = String::new();
    let mut text = String::new();
    let mut usage = None;
    let mut done = false;
    let mut errors = Vec::new();
    let mut scaled = None;
    let started = Instant::now();
    while let Some(bytes) = tokio::time::timeout(DEADLINE, body.next())
        .await
        .expect("the stream stalled")
    {
        let Ok(bytes) = bytes else {
            errors.push("the stream broke".to_string());
            break;
        };
        pending.push_str(std::str::from_utf8(&bytes).unwrap());
        while let Some(at) = pending.find("\n\n") {
            let event: String = pending.drain(..at + 2).collect();
            let Some(data) = event.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            if chunk.get("error").is_some() {
                errors.push(chunk.to_string());
                continue;
            }
            if chunk["usage"].is_object() {
                usage = Some(chunk["usage"].clone());
            }
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                text.push_str(t);
            }
        }
        // A few tokens in, the deployment is scaled to nothing.
        if scaled.is_none() && text.len() > 20 {
            apply(&bus, &chat(0)).await;
            scaled = Some(started.elapsed());
        }
    }
    let ended = started.elapsed();
    assert!(scaled.is_some(), "the stream ended before the scale-down");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(done, "no [DONE]: the stream was cut after {text:?}");
    let usage = usage.expect("no usage chunk");
    assert_eq!(usage["completion_tokens"], TOKENS, "{usage}");

    // The replica drained, then stopped: out of routing first, and not
    // stopped before the stream it served had ended.
    let draining = wait_for_event(
        &mut events,
        EventType::ReplicaDraining,
        Some(&replica.replica_id),
        DEADLINE,
    )
    .await;
    let Some(Payload::Replica(status)) = draining.payload else {
        panic!("no status: {draining:?}")
    };
    assert_eq!(status.phase(), ReplicaPhase::Stopping);
    let stopped = wait_for_event(
        &mut events,
        EventType::ReplicaStopped,
        Some(&replica.replica_id),
        DEADLINE,
    )
    .await;
    assert!(
        stopped.time_unix_ms >= draining.time_unix_ms,
        "stopped before it drained"
    );
    let record = support::replicas(&bus)
        .await
        .into_iter()
        .find(|r| r.replica_id == replica.replica_id)
        .unwrap();
    assert_eq!(record.phase(), ReplicaPhase::Stopped);
    eprintln!(
        "scaled to 0 at {:.1?}, stream of {TOKENS} tokens ended at {ended:.1?}, drained and stopped",
        scaled.unwrap_or_default()
    );
}
