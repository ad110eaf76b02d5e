//! The README's first command, end to end: `flotilla up` serves the shipped
//! model through the gateway to the official `openai` Python client; a
//! second deployment arrives as JSON from `nats-py`; one cluster's executor
//! and its runners are killed with SIGKILL while requests keep flowing; the
//! lost replica is re-placed and ready elsewhere; `flotilla watch` tells the
//! story in order; Ctrl-C stops everything.
//!
//! Run with `--nocapture` to see the failover timings.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_integration::{fleet, workspace_root};
use flotilla_kit::{Bus, BusConfig, RecordStore, now_unix_ms};
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus, event::Payload};
use tokio_util::sync::CancellationToken;

use crate::support::{self, free_ports, next_event as next_matching, poll_until, python};

const DEADLINE: Duration = Duration::from_secs(180);
const MODEL: &str = "smollm2-135m-instruct";

/// Waits until `done` holds for the replicas in KV.
async fn replicas_until(
    store: &RecordStore<ReplicaStatus>,
    what: &str,
    done: impl Fn(&[ReplicaStatus]) -> bool,
) -> Vec<ReplicaStatus> {
    let mut changes = store.changes();
    let wait = async {
        loop {
            let all: Vec<ReplicaStatus> = store.cached_all().into_iter().map(|(_, r)| r).collect();
            if done(&all) {
                return all;
            }
            let _ = changes.recv().await;
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
}

fn ready_of<'a>(all: &'a [ReplicaStatus], deployment: &str) -> Vec<&'a ReplicaStatus> {
    all.iter()
        .filter(|r| r.deployment == deployment && r.phase() == ReplicaPhase::Ready)
        .collect()
}

/// Processes whose command line contains every one of `parts`.
fn pids_with(parts: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if parts.iter().all(|p| cmdline.contains(p)) {
            out.push(pid);
        }
    }
    out
}

/// Requests through the gateway, two at a time, until `stop`.
fn load(gateway: String, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>, stop: CancellationToken) {
    for _ in 0..2 {
        let (gateway, ok, failed, stop) =
            (gateway.clone(), ok.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.is_cancelled() {
                let sent = client
                    .post(format!("{gateway}/v1/chat/completions"))
                    .timeout(Duration::from_secs(30))
                    .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            eprintln!("answer broke off: {e}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                    Ok(r) => {
                        eprintln!("request failed: {}", r.status());
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
    }
}

async fn next_event(
    sub: &mut async_nats::Subscriber,
    wanted: impl Fn(&v1::Event) -> bool,
    what: &str,
) -> v1::Event {
    next_matching(sub, DEADLINE, wanted)
        .await
        .unwrap_or_else(|| panic!("no {what} within {DEADLINE:?}"))
}

/// Waits until the load has had four more answers than it has now.
async fn four_more_answers(ok: &AtomicU64, what: &str) {
    let wanted = ok.load(Ordering::SeqCst) + 4;
    poll_until(Duration::from_secs(60), what, || async {
        (ok.load(Ordering::SeqCst) >= wanted).then_some(())
    })
    .await;
}

fn log_of(data: &Path) -> String {
    std::fs::read_to_string(data.join("up.log")).unwrap_or_default()
}

/// Prints the end of `flotilla up`'s log when the test fails, whatever
/// step it failed at: the fleet's own account is what explains it.
struct LogOnFailure<'a>(&'a Path);

impl Drop for LogOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = log_of(self.0);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "flotilla up's log, last {} lines:\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

#[tokio::test]
async fn flotilla_up_serves_and_survives_a_killed_cluster() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_string();
    let [nats_port, gateway_port, grpc_port] = free_ports();
    let log = std::fs::File::create(data.path().join("up.log")).unwrap();
    let _log_on_failure = LogOnFailure(data.path());
    let mut up = tokio::process::Command::new(fleet::target_bin("flotilla"))
        .args(["up", "--data-dir", &data_dir])
        .args(["--nats-port", &nats_port.to_string()])
        .args(["--gateway-port", &gateway_port.to_string()])
        .args(["--grpc-port", &grpc_port.to_string()])
        .current_dir(workspace_root())
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let gateway = format!("http://127.0.0.1:{gateway_port}");

    let bus = tokio::time::timeout(
        Duration::from_secs(60),
        Bus::connect(
            &BusConfig::for_url(&nats_url).unwrap(),
            "test",
            &CancellationToken::new(),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("flotilla up did not start NATS:\n{}", log_of(data.path())))
    .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    let mut events = bus.client.subscribe("flotilla.events.>").await.unwrap();
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, &bus.topology.replicas.name)
        .await
        .unwrap();
    replicas
        .start_watch(CancellationToken::new())
        .await
        .unwrap();
    let first = replicas_until(&replicas, "2 ready smollm2 replicas", |all| {
        ready_of(all, "smollm2").len() == 2
    })
    .await;
    let before: BTreeSet<String> = ready_of(&first, "smollm2")
        .iter()
        .map(|r| r.replica_id.clone())
        .collect();

    // The official OpenAI client, through the gateway.
    let script = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
chat = client.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=16)
stream = client.chat.completions.create(model=sys.argv[2], messages=[{"role": "user", "content": "Name a colour."}], temperature=0, max_tokens=8, stream=True)
streamed = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
print(json.dumps({"models": [m.id for m in client.models.list().data], "text": chat.choices[0].message.content, "streamed": streamed}))
"#;
    let out = support::output_of(&python(), &["-c", script, &gateway, MODEL]).await;
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        answer["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == MODEL),
        "{answer}"
    );
    assert!(
        !answer["text"].as_str().unwrap().trim().is_empty(),
        "{answer}"
    );
    assert!(!answer["streamed"].as_str().unwrap().is_empty(), "{answer}");

    // `flotilla chat`, streamed.
    let chat = support::flotilla(&[
        "chat",
        "--gateway",
        &gateway,
        "--max-tokens",
        "8",
        "Say hello.",
    ])
    .await;
    assert!(!chat.trim().is_empty());

    // A second deployment, as JSON, from nats-py.
    let publish = r#"
import asyncio, json, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    doc = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": "chat-b"},
           "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1,
                    "placement": {"policy": "PickN", "numberOfClusters": 1}}}
    ack = await js.publish("flotilla.control.deployments.apply", json.dumps(doc).encode(),
                           headers={"Nats-Msg-Id": "nats-py-chat-b"})
    print(json.dumps({"stream": ack.stream, "seq": ack.seq}))
    await nc.close()
asyncio.run(main())
"#;
    support::output_of(&python(), &["-c", publish, &nats_url]).await;
    replicas_until(&replicas, "a ready chat-b replica", |all| {
        ready_of(all, "chat-b").len() == 1
    })
    .await;

    // Clients that do not speak NATS see both through the gRPC control API.
    let mut api = flotilla_control_api::api::control_api_client::ControlApiClient::connect(
        format!("http://127.0.0.1:{grpc_port}"),
    )
    .await
    .unwrap();
    let listed = api
        .list_deployments(flotilla_control_api::api::ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<String> = listed
        .deployments
        .iter()
        .map(|d| d.metadata.as_ref().unwrap().name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["chat-b", "smollm2"]);

    // Load through the gateway, then one smollm2 cluster dies whole.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_load = CancellationToken::new();
    load(
        gateway.clone(),
        ok.clone(),
        failed.clone(),
        stop_load.clone(),
    );
    four_more_answers(&ok, "requests before the kill").await;
    let victim = ready_of(&first, "smollm2")[0].cluster.clone();
    let executor = pids_with(&["executor", "--cluster", &victim, &data_dir]);
    assert_eq!(executor.len(), 1, "one executor process for {victim}");
    let cache = format!("{data_dir}/cache/{victim}/");
    let runners = pids_with(&["flotilla-runner", &cache]);
    assert!(!runners.is_empty(), "runners of {victim}");
    let killed_at = now_unix_ms();
    for pid in executor.iter().chain(&runners) {
        assert!(support::signal("KILL", *pid));
    }

    let unhealthy = next_event(
        &mut events,
        |e| e.r#type == EventType::ClusterUnhealthy.to_string() && e.name == victim,
        "cluster.unhealthy",
    )
    .await;
    let placed = next_event(
        &mut events,
        |e| {
            e.name == "smollm2"
                && (e.r#type == EventType::DeploymentRebalanced.to_string()
                    || e.r#type == EventType::DeploymentPlaced.to_string())
        },
        "a new placement of smollm2",
    )
    .await;
    let mut starting_at = None;
    let ready = next_event(
        &mut events,
        |e| {
            let Some(Payload::Replica(r)) = &e.payload else {
                return false;
            };
            if r.deployment != "smollm2" || before.contains(&r.replica_id) {
                return false;
            }
            e.r#type == EventType::ReplicaReady.to_string()
        },
        "the replacement replica ready",
    )
    .await;
    let Some(Payload::Replica(replacement)) = &ready.payload else {
        unreachable!()
    };
    assert_ne!(replacement.cluster, victim);
    four_more_answers(&ok, "requests after the failover").await;
    stop_load.cancel();
    let failures = failed.load(Ordering::SeqCst);

    // The whole story, from `flotilla watch`.
    let watched = support::flotilla(&[
        "--nats-url",
        &nats_url,
        "watch",
        "--since",
        "1h",
        "--no-follow",
        "-o",
        "json",
    ])
    .await;
    let story: Vec<v1::Event> = watched
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for e in &story {
        if e.r#type == EventType::ReplicaStarting.to_string() && e.name == replacement.replica_id {
            starting_at = Some(e.time_unix_ms);
        }
    }
    let expected: [(&str, &str); 8] = [
        ("deployment.accepted", "smollm2"),
        ("deployment.placed", "smollm2"),
        ("replica.ready", ""),
        ("deployment.accepted", "chat-b"),
        ("cluster.unhealthy", &victim),
        (placed.r#type.as_str(), "smollm2"),
        ("replica.starting", &replacement.replica_id),
        ("replica.ready", &replacement.replica_id),
    ];
    let mut at = 0;
    for e in &story {
        if let Some((ty, name)) = expected.get(at)
            && e.r#type == *ty
            && (name.is_empty() || e.name == *name)
        {
            at += 1;
        }
    }
    assert_eq!(
        at,
        expected.len(),
        "flotilla watch lacks {:?} in order:\n{}",
        expected.get(at),
        story
            .iter()
            .map(|e| format!("{} {} {}", e.r#type, e.name, e.message))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let starting_at = starting_at.expect("replica.starting of the replacement");
    let model_load = ready.time_unix_ms - starting_at;
    eprintln!("failover after SIGKILL of {victim}'s executor and runners:");
    eprintln!(
        "  kill -> cluster.unhealthy      {:>6} ms",
        unhealthy.time_unix_ms - killed_at
    );
    eprintln!(
        "  kill -> new placement          {:>6} ms",
        placed.time_unix_ms - killed_at
    );
    eprintln!(
        "  kill -> replacement ready      {:>6} ms",
        ready.time_unix_ms - killed_at
    );
    eprintln!("    of which model load (starting -> ready) {model_load} ms");
    eprintln!(
        "    excluding model load         {:>6} ms",
        ready.time_unix_ms - killed_at - model_load
    );
    eprintln!(
        "  requests: {} succeeded, {failures} failed",
        ok.load(Ordering::SeqCst)
    );
    assert_eq!(
        failures, 0,
        "a healthy replica remained, yet requests failed"
    );

    // Ctrl-C: everything stops, nothing is left behind.
    assert!(support::signal("INT", up.id().unwrap()));
    let exited = tokio::time::timeout(Duration::from_secs(60), up.wait())
        .await
        .expect("flotilla up did not stop within 60 s of Ctrl-C")
        .unwrap();
    assert!(exited.success(), "{exited}\n{}", log_of(data.path()));
    let left = pids_with(&["flotilla-runner", &data_dir]);
    assert!(left.is_empty(), "runners left after Ctrl-C: {left:?}");
    let left = pids_with(&["executor", &data_dir]);
    assert!(left.is_empty(), "executors left after Ctrl-C: {left:?}");
}
