//! Request migration through the gateway, on a real fleet: greedy streams
//! and whole answers in flight when one cluster's executor and all its
//! replica processes are SIGKILLed complete on the other cluster with the
//! text they would have had, none failed and none cut. The time from the
//! kill to a replacement replica serving is printed, not asserted.
//!
//! The executors run as their own binaries (`flotilla-executor`, built with
//! the workspace) with real `flotilla-runner` replicas of the shipped
//! SmolLM2; the hub's services and the gateway run in this process.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use flotilla_cli::fleet::SimulatedCluster;
use flotilla_integration::fleet::{self, target_bin};
use flotilla_proto::EventType;
use flotilla_proto::v1::{ReplicaPhase, event::Payload};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::{self, apply, ask, next_event, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "smollm2-135m-instruct";
/// Tokens per answer: long enough that every stream is still running
/// when the cluster dies.
const TOKENS: u64 = 96;
/// Content chunks every stream has had before the kill.
const BEFORE_KILL: usize = 4;

const PROMPTS: [&str; 6] = [
    "Tell me about the Moon.",
    "Describe a day at the beach.",
    "Why is the sky blue?",
    "Write a short story about a cat.",
    "Explain how bread is made.",
    "What do bees do all day?",
];

/// One simulated cluster's executor binary, its replica processes
/// killed with it when the test ends however it ends.
struct Cluster {
    name: &'static str,
    owner: String,
    executor: Child,
}

impl Cluster {
    async fn spawn(nats_url: &str, name: &'static str, region: &str, work: &Path) -> Self {
        let caches = work.join("cache");
        let cache = caches.join(name);
        std::fs::create_dir_all(&cache).unwrap();
        let owner = flotilla_executor::backends::local::LocalBackend::owner_for(name, &cache);
        let region = format!("region={region}");
        let mut args = SimulatedCluster::new(name, "2xH100-80GB", &[&region], 1.0)
            .executor_flags(nats_url, &caches);
        args.extend(["--heartbeat-interval".into(), "200ms".into()]);
        args.extend(["--runner-bin".into(), target_bin("flotilla-runner").into()]);
        let log = std::fs::File::create(work.join(format!("{name}.log"))).unwrap();
        let executor = Command::new(target_bin("flotilla-executor"))
            .args(&args)
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Self {
            name,
            owner,
            executor,
        }
    }

    /// SIGKILL of the executor, then of every replica process it started.
    async fn kill(&mut self) {
        self.executor.start_kill().unwrap();
        self.executor.wait().await.unwrap();
        for pid in support::processes_of(&self.owner) {
            support::signal("KILL", pid);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.executor.start_kill();
        for pid in support::processes_of(&self.owner) {
            support::signal("KILL", pid);
        }
    }
}

fn request(prompt: &str, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
           "max_tokens": TOKENS, "ignore_eos": true, "stream": stream})
}

/// A streamed answer as the client saw it.
#[derive(Debug)]
struct Streamed {
    replica: String,
    ids: Vec<String>,
    text: String,
    done: bool,
    errors: Vec<String>,
}

/// Streams `prompt` through the gateway; `progress` hears once when
/// [`BEFORE_KILL`] content chunks have come.
async fn stream(gateway: String, prompt: &'static str, progress: mpsc::Sender<()>) -> Streamed {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&request(prompt, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let replica = response.headers()["x-flotilla-replica"]
        .to_str()
        .unwrap()
        .to_string();
    let mut out = Streamed {
        replica,
        ids: Vec::new(),
        text: String::new(),
        done: false,
        errors: Vec::new(),
    };
    let mut body = response.bytes_stream();
    let mut pending = String::new();
    let mut chunks = 0;
    while let Some(bytes) = body.next().await {
        let Ok(bytes) = bytes else {
            out.errors.push("the stream broke".into());
            break;
        };
        pending.push_str(std::str::from_utf8(&bytes).unwrap());
        while let Some(at) = pending.find("\n\n") {
            let event: String = pending.drain(..at + 2).collect();
            let Some(data) = event.trim_end().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                out.done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            if chunk.get("error").is_some() {
                out.errors.push(chunk.to_string());
                continue;
            }
            out.ids
                .push(chunk["id"].as_str().unwrap_or_default().to_string());
            assert!(
                chunk["choices"][0].get("token_ids").is_none(),
                "token ids the client did not ask for: {chunk}"
            );
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                out.text.push_str(t);
                chunks += 1;
                if chunks == BEFORE_KILL {
                    let _ = progress.send(()).await;
                }
            }
        }
    }
    out
}

/// A whole answer through the gateway: status, serving replica, text.
async fn whole(gateway: String, prompt: &'static str) -> (u16, String, String) {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&request(prompt, false))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replica = response
        .headers()
        .get("x-flotilla-replica")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = response.json().await.unwrap_or_default();
    (status, replica, support::text(&body).to_string())
}

/// One value of a counter in the gateway's `/metrics`.
async fn counter(gateway: &str, name: &str, labels: &str) -> f64 {
    let text = reqwest::get(format!("{gateway}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn streams_and_whole_answers_survive_a_cluster_killed_mid_answer() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(2));
    fleet::rollout(&support::config(&server), 3);
    let work = tempfile::tempdir().unwrap();
    let mut clusters = Vec::new();
    for (name, region) in [("a", "r1"), ("b", "r2"), ("c", "r3")] {
        clusters.push(Cluster::spawn(&server.url(), name, region, work.path()).await);
    }
    for _ in 0..3 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }
    apply(&bus, support::TWO_CLUSTERS).await;
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    }
    let ready: Vec<_> = support::replicas(&bus)
        .await
        .into_iter()
        .filter(|r| r.phase() == ReplicaPhase::Ready)
        .collect();
    assert_eq!(ready.len(), 2, "{ready:?}");
    let gateway = format!(
        "http://{}",
        fleet::gateway(fleet::gateway_config(&support::config(&server))).await
    );

    // The answers as they are uninterrupted, straight from one replica
    // (greedy: every replica gives the same).
    let references: Vec<String> = futures::future::join_all(PROMPTS.map(|p| {
        let endpoint = ready[0].endpoint.clone();
        async move {
            let body = reqwest::Client::new()
                .post(format!("{endpoint}/v1/chat/completions"))
                .json(&request(p, false))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap();
            support::text(&body).to_string()
        }
    }))
    .await;
    assert!(references.iter().all(|r| !r.is_empty()), "{references:?}");

    // Streams, spread over both replicas (fewest in flight first), then a
    // whole answer on each.
    let (progress, mut progressed) = mpsc::channel(PROMPTS.len());
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| tokio::spawn(stream(gateway.clone(), p, progress.clone())))
        .collect();
    for _ in 0..PROMPTS.len() {
        tokio::time::timeout(DEADLINE, progressed.recv())
            .await
            .expect("every stream under way")
            .unwrap();
    }
    let wholes: Vec<_> = PROMPTS[..2]
        .iter()
        .map(|p| tokio::spawn(whole(gateway.clone(), p)))
        .collect();
    // Both whole answers are in flight on their replicas.
    support::poll_until(DEADLINE, "whole answers in flight", || async {
        let text = reqwest::get(format!("{gateway}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let in_flight: f64 = text
            .lines()
            .filter(|l| l.starts_with("flotilla_gateway_replica_in_flight{"))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum();
        (in_flight >= (PROMPTS.len() + 2) as f64 || streams.iter().any(|s| s.is_finished()))
            .then_some(())
    })
    .await;

    // One serving cluster dies: its executor and every replica process.
    let victim_cluster = ready[1].cluster.clone();
    let victim = clusters
        .iter_mut()
        .find(|c| c.name == victim_cluster)
        .unwrap();
    let killed_ms = flotilla_kit::now_unix_ms();
    victim.kill().await;
    println!(
        "killed cluster {victim_cluster} (replica {}) mid-answer",
        ready[1].replica_id
    );

    // New requests keep coming while the fleet re-places.
    let late: Vec<_> = PROMPTS[2..4]
        .iter()
        .map(|p| tokio::spawn(stream(gateway.clone(), p, mpsc::channel(1).0)))
        .collect();

    let mut moved = 0;
    for (i, s) in streams.into_iter().enumerate() {
        let s = tokio::time::timeout(DEADLINE, s).await.unwrap().unwrap();
        assert!(s.errors.is_empty(), "stream {i} failed: {:?}", s.errors);
        assert!(s.done, "stream {i} was cut: {s:?}");
        assert_eq!(s.text, references[i], "stream {i} (from {})", s.replica);
        assert!(
            s.ids.windows(2).all(|w| w[0] == w[1]),
            "stream {i} changed its id: {:?}",
            s.ids
        );
        moved += usize::from(s.replica == ready[1].replica_id);
    }
    for (i, s) in late.into_iter().enumerate() {
        let s = tokio::time::timeout(DEADLINE, s).await.unwrap().unwrap();
        assert!(s.errors.is_empty() && s.done, "late stream {i}: {s:?}");
        assert_eq!(s.text, references[i + 2], "late stream {i}");
    }
    for (i, w) in wholes.into_iter().enumerate() {
        let (status, replica, text) = tokio::time::timeout(DEADLINE, w).await.unwrap().unwrap();
        assert_eq!(status, 200, "whole answer {i}");
        assert_eq!(text, references[i], "whole answer {i} (from {replica})");
        assert_ne!(replica, ready[1].replica_id, "whole answer {i}");
    }
    let continued = counter(
        &gateway,
        "flotilla_gateway_migrations_total",
        "outcome=\"continued\"",
    )
    .await;
    let failed = counter(
        &gateway,
        "flotilla_gateway_migrations_total",
        "outcome=\"failed\"",
    )
    .await;
    let retried = counter(&gateway, "flotilla_gateway_retries_total", MODEL).await;
    println!(
        "{moved} streams began on the killed replica; migrations: {continued} continued, {failed} failed; requests sent again whole: {retried}"
    );
    assert!(moved >= 1, "no stream was on the killed replica");
    assert!(
        continued >= moved as f64,
        "{continued} migrations for {moved} streams"
    );
    assert_eq!(failed, 0.0);

    // Measured, not asserted: the kill to a replacement replica serving.
    let ready_type = EventType::ReplicaReady.to_string();
    let (survivor, dead) = (ready[0].cluster.clone(), victim_cluster.clone());
    let replacement = next_event(&mut events, Duration::from_secs(60), |e| {
        e.r#type == ready_type
            && matches!(&e.payload, Some(Payload::Replica(r)) if r.cluster != survivor && r.cluster != dead)
    })
    .await;
    // The ready event is published once the replica answers its health
    // check: its time is when the replacement could serve.
    match replacement {
        Some(event) => {
            let Some(Payload::Replica(r)) = event.payload else {
                unreachable!("matched above")
            };
            assert!(!ask(&r.endpoint, MODEL, "Hi!", 4).await.is_empty());
            println!(
                "replacement {} on {} ready {} ms after the kill",
                r.replica_id,
                r.cluster,
                event.time_unix_ms - killed_ms
            );
        }
        None => println!("no replacement replica within 60 s of the kill"),
    }
}
