//! The whole path on a real nats-server: apply a deployment, placement
//! places it, rollout starts replicas, executors run real runners with the
//! shipped SmolLM2; a cluster dies and its replica is replaced elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::time::Duration;

use flotilla_integration::{NatsServer, workspace_root};
use flotilla_kit::{Bus, BusConfig};
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, event::Payload};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(120);

fn config(server: &NatsServer) -> BusConfig {
    BusConfig::for_url(server.url()).unwrap()
}

fn executor(
    server: &NatsServer,
    cluster: &str,
    cost: f64,
    cache: &std::path::Path,
) -> JoinHandle<()> {
    let runner = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("flotilla-runner");
    assert!(
        runner.is_file(),
        "{} is missing: cargo test --workspace builds it",
        runner.display()
    );
    let c = flotilla_executor::ExecutorArgs {
        bus: flotilla_kit::BusArgs {
            nats_url: server.url(),
            ..Default::default()
        },
        cluster: Some(cluster.into()),
        labels: vec![format!("region={cluster}")],
        gpus: "2xH100-80GB".into(),
        gpu_source: flotilla_executor::GpuSource::Declared,
        cost_per_gpu_hour: cost,
        heartbeat_interval: Duration::from_millis(200),
        model_cache_dir: Some(cache.join(cluster)),
        runner_bin: Some(runner),
        ..Default::default()
    }
    .validate()
    .unwrap();
    tokio::spawn(async move {
        flotilla_executor::run(c, CancellationToken::new())
            .await
            .unwrap()
    })
}

async fn next_of(sub: &mut async_nats::Subscriber, ty: EventType) -> v1::Event {
    flotilla_integration::wait_for_event(sub, ty, None, DEADLINE).await
}

async fn chat(endpoint: &str) -> String {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{endpoint}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "max_tokens": 6}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn apply_serves_the_model_and_a_dead_cluster_is_replaced() {
    let server = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&config(&server), "test", &CancellationToken::new())
        .await
        .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    let mut events = bus.client.subscribe("flotilla.events.>").await.unwrap();
    let never = CancellationToken::new;
    let inventory = flotilla_inventory::Config {
        bus: config(&server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        policy: flotilla_inventory::HealthPolicy {
            unhealthy_after_ms: 1_000,
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        },
        check_interval: Duration::from_millis(100),
    };
    tokio::spawn(async move { flotilla_inventory::run(inventory, never()).await.unwrap() });
    let placement = flotilla_placement::Config {
        bus: config(&server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    };
    tokio::spawn(async move { flotilla_placement::run(placement, never()).await.unwrap() });
    let provisioner = flotilla_model_provisioner::Config {
        bus: config(&server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        preset_dir: workspace_root().join(".tools/models"),
        takeover_after_ms: 60_000,
    };
    tokio::spawn(async move {
        flotilla_model_provisioner::run(provisioner, never())
            .await
            .unwrap()
    });
    let rollout = flotilla_rollout::Config {
        bus: config(&server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        halt_after_failures: 3,
    };
    tokio::spawn(async move { flotilla_rollout::run(rollout, never()).await.unwrap() });
    let caches = tempfile::tempdir().unwrap();
    let cheap = executor(&server, "cheap", 1.0, caches.path());
    let _dear = executor(&server, "dear", 3.0, caches.path());
    for _ in 0..2 {
        next_of(&mut events, EventType::ClusterJoined).await;
    }

    let doc = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 1
  placement:
    policy: PickN
    numberOfClusters: 1
    affinity:
      preferred:
        - {weight: 100, propertySorter: {name: cost.perGpuHour, order: Ascending}}
"#;
    let docs = flotilla_cli::deployments::parse_documents(doc).unwrap();
    flotilla_cli::deployments::apply(&bus, docs, &mut Vec::new())
        .await
        .unwrap();

    let ready = next_of(&mut events, EventType::ReplicaReady).await;
    let Some(Payload::Replica(first)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(first.cluster, "cheap");
    assert!(!chat(&first.endpoint).await.is_empty());

    // The cheap cluster's executor dies: its replica is replaced on the
    // other cluster without any gate.
    cheap.abort();
    next_of(&mut events, EventType::ClusterUnhealthy).await;
    let ready = next_of(&mut events, EventType::ReplicaReady).await;
    let Some(Payload::Replica(second)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(second.cluster, "dear");
    assert_ne!(second.replica_id, first.replica_id);
    assert!(second.generation > first.generation);
    assert!(!chat(&second.endpoint).await.is_empty());

    let mut table = Vec::new();
    flotilla_cli::replicas::get(&bus, Some("chat"), flotilla_cli::Output::Table, &mut table)
        .await
        .unwrap();
    let table = String::from_utf8(table).unwrap();
    let line = table
        .lines()
        .find(|l| l.starts_with(&second.replica_id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("dear") && line.contains("Ready") && line.contains(&second.endpoint),
        "{table}"
    );
}
