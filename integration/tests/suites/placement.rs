//! Placement on a real nats-server with inventory and executors: a JSON
//! deployment from a plain NATS client is placed; a failing cluster's
//! replicas move within a second while other deployments stay put.

use std::time::{Duration, Instant};

use flotilla_integration::NatsServer;
use flotilla_kit::{Bus, BusConfig, RecordStore};
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, PlacementDecision, PlacementOutcome, event::Payload};
use futures::StreamExt;
use prost::Message;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

fn bus_config(server: &NatsServer) -> BusConfig {
    BusConfig::for_url(server.url()).unwrap()
}

fn start_inventory(server: &NatsServer) {
    let config = flotilla_inventory::Config {
        bus: bus_config(server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        policy: flotilla_inventory::HealthPolicy {
            unhealthy_after_ms: 1_000,
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        },
        check_interval: Duration::from_millis(100),
    };
    tokio::spawn(async move {
        flotilla_inventory::run(config, CancellationToken::new())
            .await
            .unwrap()
    });
}

fn start_placement(server: &NatsServer) {
    let config = flotilla_placement::Config {
        bus: bus_config(server),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    };
    tokio::spawn(async move {
        flotilla_placement::run(config, CancellationToken::new())
            .await
            .unwrap()
    });
}

fn start_executor(
    server: &NatsServer,
    cluster: &str,
    region: &str,
    gpus: &str,
    cost: f64,
) -> JoinHandle<()> {
    let args = flotilla_executor::ExecutorArgs {
        bus: flotilla_kit::BusArgs {
            nats_url: server.url(),
            ..Default::default()
        },
        cluster: Some(cluster.into()),
        labels: vec![format!("region={region}"), "env=prod".into()],
        taints: vec![],
        gpus: gpus.into(),
        gpu_source: flotilla_executor::GpuSource::Declared,
        cost_per_gpu_hour: cost,
        heartbeat_interval: Duration::from_millis(200),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        model_cache_dir: Some(std::env::temp_dir().join(format!(
            "flotilla-test-cache-{}-{cluster}",
            std::process::id()
        ))),
        ..Default::default()
    };
    let config = args.validate().unwrap();
    tokio::spawn(async move {
        flotilla_executor::run(config, CancellationToken::new())
            .await
            .unwrap()
    })
}

async fn expect(
    sub: &mut async_nats::Subscriber,
    ty: EventType,
    name: &str,
) -> (v1::Event, Instant) {
    let want = ty.to_string();
    tokio::time::timeout(DEADLINE, async {
        while let Some(msg) = sub.next().await {
            let event = v1::Event::decode(msg.payload).unwrap();
            if event.r#type == want && event.name == name {
                return (event, Instant::now());
            }
        }
        panic!("subscription ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no {want} for {name} within {DEADLINE:?}"))
}

async fn expect_joined(sub: &mut async_nats::Subscriber, clusters: &[&str]) {
    let mut waiting: std::collections::BTreeSet<&str> = clusters.iter().copied().collect();
    tokio::time::timeout(DEADLINE, async {
        while let Some(msg) = sub.next().await {
            let event = v1::Event::decode(msg.payload).unwrap();
            if event.r#type == EventType::ClusterJoined.to_string() {
                waiting.remove(event.name.as_str());
                if waiting.is_empty() {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("clusters never joined: {waiting:?}"));
}

#[tokio::test]
async fn a_json_deployment_is_placed_and_moves_off_a_failed_cluster_within_a_second() {
    let server = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&bus_config(&server), "test", &CancellationToken::new())
        .await
        .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    let mut events = bus.client.subscribe("flotilla.events.>").await.unwrap();
    start_inventory(&server);
    let doomed = start_executor(&server, "eu-cheap", "eu", "4xH100-80GB", 1.0);
    let _b = start_executor(&server, "us-mid", "us", "4xH100-80GB", 2.0);
    let _c = start_executor(&server, "ap-dear", "ap", "4xH100-80GB", 4.0);
    expect_joined(&mut events, &["eu-cheap", "us-mid", "ap-dear"]).await;
    start_placement(&server);

    // Published as JSON by a plain NATS client: no headers at all.
    let chat = r#"{"apiVersion": "flotilla.dev/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": "chat"},
        "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 2,
                 "placement": {"policy": "PickN", "numberOfClusters": 1,
                               "affinity": {"preferred": [{"weight": 100, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}}}"#;
    bus.client
        .publish("flotilla.control.deployments.apply", chat.into())
        .await
        .unwrap();
    let pinned = r#"{"metadata": {"name": "pinned"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1,
                 "placement": {"policy": "PickFixed", "clusterNames": ["us-mid"]}}}"#;
    bus.client
        .publish("flotilla.control.deployments.apply", pinned.into())
        .await
        .unwrap();

    let (placed, _) = expect(&mut events, EventType::DeploymentPlaced, "chat").await;
    let Some(Payload::Placement(decision)) = placed.payload else {
        panic!("no decision in {placed:?}")
    };
    assert_eq!(decision.outcome(), PlacementOutcome::Placed);
    assert_eq!(decision.assignments.len(), 1);
    assert_eq!(decision.assignments[0].cluster, "eu-cheap");
    assert_eq!(decision.assignments[0].replicas, 2);
    assert_eq!(decision.exclusions.len(), 2, "{decision:?}");
    assert!(
        decision
            .exclusions
            .iter()
            .all(|e| e.plugin == "Selection" && e.reason.contains("scored")),
        "{decision:?}"
    );
    expect(&mut events, EventType::DeploymentPlaced, "pinned").await;

    let placements = RecordStore::<PlacementDecision>::open(&bus, "placements")
        .await
        .unwrap();
    let pinned_before = placements.get("pinned").await.unwrap().unwrap().0;

    // eu-cheap's executor dies.
    doomed.abort();
    let (_, unhealthy_at) = expect(&mut events, EventType::ClusterUnhealthy, "eu-cheap").await;
    let (moved, moved_at) = expect(&mut events, EventType::DeploymentRebalanced, "chat").await;
    let took = moved_at - unhealthy_at;
    eprintln!("re-placed {took:?} after cluster.unhealthy");
    assert!(
        took < Duration::from_secs(1),
        "re-placed {took:?} after cluster.unhealthy"
    );
    let Some(Payload::Placement(decision)) = moved.payload else {
        panic!("no decision")
    };
    assert_eq!(decision.assignments[0].cluster, "us-mid", "{decision:?}");
    assert_eq!(decision.assignments[0].replicas, 2);
    let gone = decision
        .exclusions
        .iter()
        .find(|e| e.cluster == "eu-cheap")
        .unwrap();
    assert_eq!(gone.plugin, "ClusterHealth");
    assert!(
        gone.reason.starts_with("unhealthy: no heartbeat"),
        "{}",
        gone.reason
    );

    // The other deployment kept its generation.
    let pinned_after = placements.get("pinned").await.unwrap().unwrap().0;
    assert_eq!(pinned_after.generation, pinned_before.generation);
    assert_eq!(pinned_after.assignments, pinned_before.assignments);
}

#[tokio::test]
async fn invalid_deployments_are_rejected_naming_the_field_and_deletes_release_capacity() {
    let server = NatsServer::start().await.unwrap();
    let bus = Bus::connect(&bus_config(&server), "test", &CancellationToken::new())
        .await
        .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    let mut events = bus.client.subscribe("flotilla.events.>").await.unwrap();
    start_inventory(&server);
    let _a = start_executor(&server, "small", "eu", "1xL4-24GB", 1.0);
    expect(&mut events, EventType::ClusterJoined, "small").await;
    start_placement(&server);

    let cases = [
        (
            r#"{"metadata": {"name": "neg"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": -2}}"#,
            "neg",
            "spec.replicas",
        ),
        (
            r#"{"metadata": {"name": "ghost"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"policy": "PickFixed", "clusterNames": ["nowhere"]}}}"#,
            "ghost",
            "spec.placement.clusterNames[0]",
        ),
        (
            r#"{"metadata": {"name": "huge"}, "spec": {"model": {"preset": "llama-3.1-70b-instruct"}, "runtime": "vllm", "replicas": 1}}"#,
            "huge",
            "spec.resources.gpu",
        ),
        (
            r#"{"metadata": {"name": "typo"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"policy": "PickAny"}}}"#,
            "",
            "spec.placement.policy",
        ),
    ];
    for (doc, name, field) in cases {
        bus.client
            .publish("flotilla.control.deployments.apply", doc.to_string().into())
            .await
            .unwrap();
        let event = if name.is_empty() {
            expect(
                &mut events,
                EventType::BusMessageRejected,
                "placement-apply",
            )
            .await
            .0
        } else {
            expect(&mut events, EventType::DeploymentRejected, name)
                .await
                .0
        };
        let Some(Payload::Error(detail)) = event.payload else {
            panic!("no detail: {event:?}")
        };
        assert_eq!(detail.field, field, "{doc}: {detail:?}");
    }

    // One L4: the first deployment takes it, the second waits, a delete frees it.
    let one = |n: &str| {
        format!(
            r#"{{"metadata": {{"name": "{n}"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": 1}}}}"#
        )
    };
    bus.client
        .publish("flotilla.control.deployments.apply", one("first").into())
        .await
        .unwrap();
    expect(&mut events, EventType::DeploymentPlaced, "first").await;
    bus.client
        .publish("flotilla.control.deployments.apply", one("second").into())
        .await
        .unwrap();
    let (waiting, _) = expect(&mut events, EventType::DeploymentUnschedulable, "second").await;
    let Some(Payload::Placement(d)) = waiting.payload else {
        panic!()
    };
    assert_eq!(d.exclusions[0].plugin, "Capacity");
    assert_eq!(
        d.exclusions[0].reason,
        "needs 1 free GPUs for one replica; 0 free"
    );

    let mut out = Vec::new();
    flotilla_cli::deployments::delete(&bus, "first", &mut out)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "deployment/first deleted\n"
    );
    expect(&mut events, EventType::DeploymentPlaced, "second").await;

    let mut table = Vec::new();
    flotilla_cli::deployments::get(&bus, flotilla_cli::Output::Table, &mut table)
        .await
        .unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.lines().any(|l| l.starts_with("second")
            && l.contains("1/1")
            && l.contains("Placed")
            && l.contains("small:1")),
        "{table}"
    );
    let mut described = Vec::new();
    flotilla_cli::deployments::describe(&bus, "second", &mut described)
        .await
        .unwrap();
    let described = String::from_utf8(described).unwrap();
    assert!(
        described.contains("deployment.unschedulable") && described.contains("deployment.placed"),
        "{described}"
    );
}
