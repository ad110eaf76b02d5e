//! Member clusters as separate networks: the hub (NATS, the control
//! services, the global gateway) in this host's network, each of three
//! clusters in a network namespace of its own with a leaf nats-server, its
//! executor and replicas, and its edge. The shipped model is served on all
//! three; the hub cannot reach a replica's address, yet the official
//! `openai` client chats through the global gateway, each answer naming its
//! cluster, and the gateway's `/metrics` counts the answers per cluster.
//!
//! Needs root (network namespaces), as CI has; elsewhere it says so and
//! checks nothing. Run with `--nocapture` to see the timings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flotilla_cli::fleet::local_clusters;
use flotilla_integration::isolated::{self, Hub, IsolatedFleet};
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};

use crate::support::{self, poll_until, python};

const MODEL: &str = "smollm2-135m-instruct";
const DEADLINE: Duration = Duration::from_secs(180);
/// How long a connection the hub must not be able to open is tried.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);

/// The answers through the gateway: their text and the cluster each names.
const CHATS: &str = r#"
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
answers = []
for i in range(int(sys.argv[3])):
    raw = client.chat.completions.with_raw_response.create(model=sys.argv[2], messages=[{"role": "user", "content": f"Name a city, number {i}."}], temperature=0, max_tokens=12)
    chat = raw.parse()
    answers.append({"cluster": raw.headers.get("x-flotilla-cluster"), "text": chat.choices[0].message.content})
print(json.dumps(answers))
"#;

/// The number of answers the gateway's `/metrics` counts per cluster
/// (successful ones, of `MODEL`).
async fn answered_per_cluster(gateway: &str) -> BTreeMap<String, u64> {
    let text = reqwest::get(format!("{gateway}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("flotilla_gateway_request_duration_seconds_count{")
        else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").unwrap();
        if !labels.contains(&format!("model=\"{MODEL}\"")) || !labels.contains("status=\"2xx\"") {
            continue;
        }
        let cluster = labels
            .split(',')
            .find_map(|l| l.strip_prefix("cluster=\""))
            .map(|c| c.trim_end_matches('"').to_string())
            .unwrap();
        *counts.entry(cluster).or_insert(0) += value.trim().parse::<u64>().unwrap();
    }
    counts
}

/// The ready replicas of `deployment`, once there are `n` on `n` clusters.
async fn ready_on_distinct_clusters(bus: &flotilla_kit::Bus, n: usize) -> Vec<ReplicaStatus> {
    poll_until(
        DEADLINE,
        &format!("{n} ready replicas on {n} clusters"),
        || async {
            let ready: Vec<ReplicaStatus> = support::replicas(bus)
                .await
                .into_iter()
                .filter(|r| r.deployment == "chat" && r.phase() == ReplicaPhase::Ready)
                .collect();
            let clusters: BTreeSet<&str> = ready.iter().map(|r| r.cluster.as_str()).collect();
            (ready.len() == n && clusters.len() == n).then_some(ready.clone())
        },
    )
    .await
}

#[tokio::test]
async fn clusters_in_their_own_networks_serve_through_their_edges() {
    if !isolated::permitted() {
        return;
    }
    let started = Instant::now();
    let hub = Hub::start().await.unwrap();
    let fleet = IsolatedFleet::builder()
        .members(local_clusters())
        .start(&hub)
        .await
        .unwrap();
    eprintln!("3 member clusters ready in {:?}", started.elapsed());
    let bus = fleet.bus();

    support::apply(
        bus,
        r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 3
  placement:
    policy: PickN
    numberOfClusters: 3
"#,
    )
    .await;
    let ready = ready_on_distinct_clusters(bus, 3).await;
    eprintln!("3 replicas ready in {:?}", started.elapsed());

    // Each replica listens on its cluster's pod address, which only its
    // own cluster reaches: the hub's connection fails.
    for replica in &ready {
        let member = fleet.member(&replica.cluster);
        let endpoint: reqwest::Url = replica.endpoint.parse().unwrap();
        let addr = std::net::SocketAddr::new(
            endpoint.host_str().unwrap().parse().unwrap(),
            endpoint.port().unwrap(),
        );
        assert_eq!(
            addr.ip(),
            std::net::IpAddr::V4(member.netns.pod_address()),
            "{replica:?}"
        );
        let reached =
            tokio::time::timeout(UNREACHABLE_AFTER, tokio::net::TcpStream::connect(addr)).await;
        assert!(
            !matches!(reached, Ok(Ok(_))),
            "the hub reached replica {} of {} at {addr}",
            replica.replica_id,
            replica.cluster
        );
    }

    // The cluster's own clients reach its replicas through the edge's
    // local listener, from inside the cluster's network.
    let eu = fleet.member("eu-west");
    let out = fleet
        .command("eu-west", "curl")
        .args(["-sS", "--max-time", "30"])
        .arg(format!("{}/v1/models", eu.edge_local_url))
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(MODEL),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The official OpenAI client, through the global gateway in the hub.
    let gateway = fleet.gateway_url();
    let before = answered_per_cluster(&gateway).await;
    let out = tokio::process::Command::new(python())
        .args(["-c", CHATS, &gateway, MODEL, "6"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers.len(), 6);
    let names: BTreeSet<String> = local_clusters().iter().map(|c| c.name.clone()).collect();
    let mut named = BTreeMap::<String, u64>::new();
    for answer in &answers {
        assert!(
            !answer["text"]
                .as_str()
                .unwrap_or_default()
                .trim()
                .is_empty(),
            "{answer}"
        );
        let cluster = answer["cluster"].as_str().unwrap_or_default().to_string();
        assert!(
            names.contains(&cluster),
            "an answer names {cluster:?}: {answer}"
        );
        *named.entry(cluster).or_insert(0) += 1;
    }
    let after = answered_per_cluster(&gateway).await;
    let counted: BTreeMap<String, u64> = after
        .iter()
        .map(|(c, n)| (c.clone(), n - before.get(c).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        counted, named,
        "/metrics per cluster against the answers' headers"
    );
    eprintln!(
        "answers per cluster {named:?}; whole test {:?}",
        started.elapsed()
    );

    fleet.stop().await.unwrap();
}
