//! Faults in a fleet whose member clusters are separate networks (see
//! `isolated_fleet`): a whole cluster killed under streaming load, with a
//! residency rule that must hold through the failover; and a cluster cut
//! off from the hub for 20 s, then joined again.
//!
//! Needs root (network namespaces), as CI has; elsewhere it says so and
//! checks nothing. Run with `--nocapture` to see the measured times.

use std::collections::BTreeSet;
use std::time::Duration;

use flotilla_cli::fleet::local_clusters;
use flotilla_integration::isolated::{self, Hub, IsolatedFleet};
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::v1::{ClusterHealth, ClusterRecord, ReplicaPhase, ReplicaStatus};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{self, poll_until};

const MODEL: &str = "smollm2-135m-instruct";
/// The residency-bound deployment serves the shipped weights under a name
/// of its own, so a request for it can only be its.
const EU_MODEL: &str = "smollm2-eu";
const DEADLINE: Duration = Duration::from_secs(180);
const TOKENS: u32 = 24;

/// POSTs JSON `argv[2]` to `argv[1]` and prints the answer.
const LOCAL_CLIENT: &str = r#"
import sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"content-type": "application/json"})
print(urllib.request.urlopen(request, timeout=60).read().decode())
"#;

/// The topology users run: a hub of three NATS servers (every stream
/// replicated on each), three member clusters in their own networks.
async fn start_fleet() -> (Hub, IsolatedFleet) {
    let hub = Hub::cluster(3).await.unwrap();
    let fleet = IsolatedFleet::builder()
        .members(local_clusters())
        .start(&hub)
        .await
        .unwrap();
    (hub, fleet)
}

/// Alive (not failed, stopping or stopped) replicas of `deployment`.
async fn alive(bus: &Bus, deployment: &str) -> Vec<ReplicaStatus> {
    support::replicas(bus)
        .await
        .into_iter()
        .filter(|r| {
            r.deployment == deployment
                && !matches!(
                    r.phase(),
                    ReplicaPhase::Failed | ReplicaPhase::Stopping | ReplicaPhase::Stopped
                )
        })
        .collect()
}

/// Ready replicas of `deployment`, once there are `n`.
async fn ready(bus: &Bus, deployment: &str, n: usize) -> Vec<ReplicaStatus> {
    poll_until(
        DEADLINE,
        &format!("{n} ready replicas of {deployment}"),
        || async {
            let ready: Vec<ReplicaStatus> = alive(bus, deployment)
                .await
                .into_iter()
                .filter(|r| r.phase() == ReplicaPhase::Ready)
                .collect();
            (ready.len() == n).then_some(ready)
        },
    )
    .await
}

async fn cluster_health(bus: &Bus, cluster: &str) -> ClusterHealth {
    RecordStore::<ClusterRecord>::open(bus, &bus.topology.clusters.name)
        .await
        .unwrap()
        .get(cluster)
        .await
        .unwrap()
        .map_or(ClusterHealth::Unspecified, |(r, _)| r.health())
}

/// A streamed answer as the client saw it.
#[derive(Debug)]
struct Streamed {
    cluster: String,
    replica: String,
    /// When its response headers came.
    answered_at: Instant,
    text: String,
    done: bool,
    errors: Vec<String>,
}

/// One streamed chat through the gateway; `flowing` hears the cluster of
/// every answer that has sent a few chunks.
async fn stream(
    gateway: &str,
    prompt: String,
    flowing: &mpsc::UnboundedSender<String>,
) -> Streamed {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(
            &json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                      "temperature": 0, "max_tokens": TOKENS, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut out = Streamed {
        cluster: header("x-flotilla-cluster"),
        replica: header("x-flotilla-replica"),
        answered_at: Instant::now(),
        text: String::new(),
        done: false,
        errors: Vec::new(),
    };
    if response.status() != 200 {
        out.errors.push(format!(
            "{}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ));
        return out;
    }
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
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                out.text.push_str(t);
                chunks += 1;
                if chunks == 4 {
                    let _ = flowing.send(out.cluster.clone());
                }
            }
        }
    }
    out
}

/// Streamed answers as they finish.
type Finished = std::sync::Arc<std::sync::Mutex<Vec<Streamed>>>;

/// `workers` clients streaming one answer after another until `stop`;
/// each finished answer goes into the list returned.
fn load(
    gateway: String,
    workers: usize,
    stop: CancellationToken,
) -> (
    tokio::task::JoinSet<()>,
    Finished,
    mpsc::UnboundedReceiver<String>,
) {
    let (flowing, heard) = mpsc::unbounded_channel();
    let finished = Finished::default();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (gateway, stop, flowing) = (gateway.clone(), stop.clone(), flowing.clone());
        let finished = finished.clone();
        set.spawn(async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let prompt = format!("Client {w}, question {n}: name a river.");
                let done = stream(&gateway, prompt, &flowing).await;
                finished.lock().unwrap().push(done);
            }
        });
    }
    (set, finished, heard)
}

/// A whole chat for `model` through `gateway`: status, answering cluster,
/// the body.
async fn ask(gateway: &str, model: &str) -> (u16, String, Value) {
    let response = reqwest::Client::new()
        .post(format!("{gateway}/v1/chat/completions"))
        .json(
            &json!({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                      "temperature": 0, "max_tokens": 4}),
        )
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let cluster = response
        .headers()
        .get("x-flotilla-cluster")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, cluster, response.json().await.unwrap_or_default())
}

/// The clusters the gateway's `/metrics` counts answers of `model` from.
async fn clusters_that_answered(gateway: &str, model: &str) -> BTreeSet<String> {
    let text = reqwest::get(format!("{gateway}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("flotilla_gateway_request_duration_seconds_count{"))
        .filter(|l| l.contains(&format!("model=\"{model}\"")) && l.contains("status=\"2xx\""))
        .filter_map(|l| {
            let at = l.find("cluster=\"")? + "cluster=\"".len();
            Some(l[at..].split('"').next()?.to_string())
        })
        .collect()
}

#[tokio::test]
async fn a_killed_cluster_loses_no_stream_and_its_resident_deployment_is_served_nowhere_else() {
    if !isolated::permitted() {
        return;
    }
    let (_hub, fleet) = start_fleet().await;
    let bus = fleet.bus();
    let gateway = fleet.gateway_url();
    let digest = support::push(bus, &support::shipped_model(), EU_MODEL, Some("gguf")).await;
    support::apply(
        bus,
        &format!(
            r#"
metadata: {{name: chat}}
spec:
  model: {{preset: {MODEL}}}
  replicas: 3
  placement: {{policy: PickN, numberOfClusters: 3}}
---
metadata: {{name: chat-eu}}
spec:
  model: {{artifact: {{name: {EU_MODEL}, digest: "{digest}", format: gguf}}}}
  replicas: 1
  residency:
    clusterSelector: {{matchLabels: {{region: eu-west-1}}}}
"#
        ),
    )
    .await;
    let before: BTreeSet<String> = ready(bus, "chat", 3)
        .await
        .into_iter()
        .map(|r| r.replica_id)
        .collect();
    let eu = ready(bus, "chat-eu", 1).await;
    assert_eq!(eu[0].cluster, "eu-west", "{eu:?}");
    let (status, cluster, body) = ask(&gateway, EU_MODEL).await;
    assert_eq!((status, cluster.as_str()), (200, "eu-west"), "{body}");

    // Streams through the global gateway, one after another on three
    // clients; eu-west is killed (its edge, executor, replicas and leaf,
    // all at once) while one of its answers is flowing.
    let stop = CancellationToken::new();
    let (mut clients, finished, mut flowing) = load(gateway.clone(), 3, stop.clone());
    tokio::time::timeout(DEADLINE, async {
        while let Some(cluster) = flowing.recv().await {
            if cluster == "eu-west" {
                return;
            }
        }
    })
    .await
    .expect("an answer flowing from eu-west");
    let killed_at = Instant::now();
    let pids = fleet.member("eu-west").netns.pids().unwrap();
    assert!(
        pids.len() >= 4,
        "leaf, executor, edge and replicas: {pids:?}"
    );
    for pid in &pids {
        support::signal("KILL", *pid);
    }

    // The lost replica is replaced on another cluster and serves.
    let replacement = poll_until(DEADLINE, "a replacement replica of chat", || async {
        alive(bus, "chat")
            .await
            .into_iter()
            .find(|r| r.phase() == ReplicaPhase::Ready && !before.contains(&r.replica_id))
    })
    .await;
    let ready_after = killed_at.elapsed();
    assert_ne!(replacement.cluster, "eu-west");

    // The resident deployment: never served outside its rule, and once
    // eu-west is known dead, refused naming the rule.
    let refused = poll_until(DEADLINE, "a 503 naming the residency rule", || async {
        let (status, cluster, body) = ask(&gateway, EU_MODEL).await;
        assert!(
            status != 200 || cluster == "eu-west",
            "{EU_MODEL} served by {cluster}: {body}"
        );
        (status == 503 && body["error"]["code"] == "residency").then_some(body)
    })
    .await;
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("region=eu-west-1"), "{message}");
    assert!(message.contains("chat-eu"), "{message}");

    // Streams keep coming until one is answered by the replacement.
    let served_after = poll_until(DEADLINE, "a stream answered by the replacement", || async {
        finished
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.replica == replacement.replica_id)
            .map(|s| s.answered_at.duration_since(killed_at))
            .min()
    })
    .await;
    stop.cancel();
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }
    let finished = std::mem::take(&mut *finished.lock().unwrap());
    let failed: Vec<&Streamed> = finished
        .iter()
        .filter(|s| !s.done || !s.errors.is_empty() || s.text.is_empty())
        .collect();
    assert!(failed.is_empty(), "streams that failed: {failed:#?}");
    let on_killed = finished
        .iter()
        .filter(|s| s.cluster == "eu-west" && s.answered_at < killed_at)
        .count();
    assert!(on_killed >= 1, "no stream was on eu-west when it died");
    // Placement kept the resident deployment inside its rule, and the
    // gateway's metrics count its answers from eu-west only.
    for r in support::replicas(bus).await {
        if r.deployment == "chat-eu" {
            assert_eq!(r.cluster, "eu-west", "{r:?}");
        }
    }
    assert_eq!(
        clusters_that_answered(&gateway, EU_MODEL).await,
        BTreeSet::from(["eu-west".to_string()])
    );
    eprintln!(
        "killed eu-west: {} streams, 0 failed ({on_killed} were on eu-west); replacement {} on {} \
         ready {ready_after:?} after the kill, first stream through the global gateway \
         answered by it {served_after:?} after the kill",
        finished.len(),
        replacement.replica_id,
        replacement.cluster
    );
}

#[tokio::test]
async fn a_cluster_cut_off_keeps_serving_its_own_clients_and_rejoins_without_duplicates() {
    if !isolated::permitted() {
        return;
    }
    let (_hub, fleet) = start_fleet().await;
    let bus = fleet.bus();
    support::apply(
        bus,
        &format!(
            r#"
metadata: {{name: chat}}
spec:
  model: {{preset: {MODEL}}}
  replicas: 3
  placement: {{policy: PickN, numberOfClusters: 3}}
"#
        ),
    )
    .await;
    let before = ready(bus, "chat", 3).await;
    let cut_off = "ap-south";
    let stranded = before
        .iter()
        .find(|r| r.cluster == cut_off)
        .unwrap_or_else(|| panic!("no replica on {cut_off}: {before:?}"))
        .replica_id
        .clone();
    let edge_local = fleet.member(cut_off).edge_local_url.clone();
    // A client inside the cluster's own network, asking its edge.
    let local_answer = || async {
        let out = fleet
            .command(cut_off, support::python().to_str().unwrap())
            .args(["-c", LOCAL_CLIENT])
            .arg(format!("{edge_local}/v1/chat/completions"))
            .arg(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}],
                       "temperature": 0, "max_tokens": 4})
                .to_string(),
            )
            .output()
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let text = support::text(&body).to_string();
        if text.is_empty() {
            // What the client saw, for the failure message.
            eprintln!(
                "local client at {edge_local}: {}; stdout {:?}; stderr {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        text
    };
    assert!(
        !local_answer().await.is_empty(),
        "no local answer before the cut"
    );

    fleet.cut(cut_off).unwrap();
    let cut_at = Instant::now();
    poll_until(DEADLINE, "the cut cluster judged unhealthy", || async {
        (cluster_health(bus, cut_off).await == ClusterHealth::Unhealthy).then_some(())
    })
    .await;
    let unhealthy_after = cut_at.elapsed();
    let replacement = poll_until(DEADLINE, "a replacement replica", || async {
        alive(bus, "chat").await.into_iter().find(|r| {
            r.phase() == ReplicaPhase::Ready && !before.iter().any(|b| b.replica_id == r.replica_id)
        })
    })
    .await;
    let replaced_after = cut_at.elapsed();
    assert_ne!(replacement.cluster, cut_off);

    // While cut off, the cluster's own clients are answered by its edge
    // from the replica table it last knew.
    let mut local_answers = 0;
    while cut_at.elapsed() < Duration::from_secs(20) {
        let text = local_answer().await;
        assert!(
            !text.is_empty(),
            "the edge of {cut_off} did not answer during the cut"
        );
        local_answers += 1;
        // The cut lasts 20 s whatever happens meanwhile: the scenario's
        // length, not a wait for something to happen.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    fleet.heal(cut_off).unwrap();
    let healed_at = Instant::now();

    // The stranded replica's stop command waited in its cluster's queue
    // and is carried out now; the fleet converges to the desired count,
    // each wanted replica once.
    let converged = poll_until(DEADLINE, "3 alive replicas after the heal", || async {
        let alive = alive(bus, "chat").await;
        let healthy = cluster_health(bus, cut_off).await == ClusterHealth::Healthy;
        let stranded_gone = !alive.iter().any(|r| r.replica_id == stranded);
        (healthy && stranded_gone && alive.len() == 3).then_some(alive)
    })
    .await;
    let converged_after = healed_at.elapsed();
    let ids: BTreeSet<&str> = converged.iter().map(|r| r.replica_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "a replica twice: {converged:?}");
    // Out of routing at once; stopped once it has finished its requests.
    let stranded_record = poll_until(DEADLINE, "the stranded replica drained", || async {
        let record = support::replicas(bus)
            .await
            .into_iter()
            .find(|r| r.replica_id == stranded);
        record
            .as_ref()
            .is_none_or(|r| r.phase() != ReplicaPhase::Stopping)
            .then_some(record)
    })
    .await;
    assert!(
        stranded_record
            .as_ref()
            .is_none_or(|r| r.phase() == ReplicaPhase::Stopped),
        "{stranded_record:?}"
    );
    let ask_gateway = support::ask(&fleet.gateway_url(), MODEL, "Hello", 4).await;
    assert!(!ask_gateway.is_empty());
    eprintln!(
        "cut {cut_off} for 20 s: unhealthy at the hub after {unhealthy_after:?}, replacement {} \
         on {} ready after {replaced_after:?}; {local_answers} local answers from its edge during \
         the cut; after the heal, {} alive replicas ({}) after {converged_after:?}",
        replacement.replica_id,
        replacement.cluster,
        converged.len(),
        ids.into_iter().collect::<Vec<_>>().join(", ")
    );
}
