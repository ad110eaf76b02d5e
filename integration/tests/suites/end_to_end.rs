//! The whole path on a real nats-server: apply a deployment, placement
//! places it, rollout starts replicas, executors run real runners with the
//! shipped SmolLM2; a cluster dies and its replica is replaced elsewhere.

use std::time::Duration;

use flotilla_integration::fleet;
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, event::Payload};

use crate::support::{self, apply, ask, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "smollm2-135m-instruct";

async fn next_of(sub: &mut async_nats::Subscriber, ty: EventType) -> v1::Event {
    wait_for_event(sub, ty, None, DEADLINE).await
}

#[tokio::test]
async fn apply_serves_the_model_and_a_dead_cluster_is_replaced() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(1));
    fleet::rollout(&support::config(&server), 3);
    let caches = tempfile::tempdir().unwrap();
    let cheap = fleet::executor(
        &server,
        "cheap",
        "2xH100-80GB",
        &["region=cheap"],
        1.0,
        caches.path(),
    );
    let _dear = fleet::executor(
        &server,
        "dear",
        "2xH100-80GB",
        &["region=dear"],
        3.0,
        caches.path(),
    );
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
    apply(&bus, doc).await;

    let ready = next_of(&mut events, EventType::ReplicaReady).await;
    let Some(Payload::Replica(first)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(first.cluster, "cheap");
    assert!(!ask(&first.endpoint, MODEL, "Hi!", 6).await.is_empty());

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
    assert!(!ask(&second.endpoint, MODEL, "Hi!", 6).await.is_empty());

    let mut table = Vec::new();
    flotilla_cli::get::get(
        &bus,
        &flotilla_cli::get::GetArgs {
            deployment: Some("chat".into()),
            ..flotilla_cli::get::GetArgs::of(flotilla_cli::get::Kind::Replicas)
        },
        &mut table,
        tokio_util::sync::CancellationToken::new(),
    )
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
