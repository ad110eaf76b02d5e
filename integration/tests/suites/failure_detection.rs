//! Blaming the right side, on a real nats-server with real runners: a
//! paused bus (SIGSTOP of nats-server for 8 s) and restarted hub services
//! fail nothing over, while a cluster that really dies meanwhile is still
//! caught; an executor that restarts as planned, for longer than the
//! unhealthy window, re-places nothing and its replicas serve throughout.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use flotilla_cli::fleet::ControlPlane;
use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::{Bus, RecordStore, now_unix_ms};
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, ClusterHealth, ClusterRecord, ReplicaPhase, event::Payload};
use tokio_util::sync::CancellationToken;

use crate::support::{
    self, KillReplicasOnDrop, apply, ask, next_event, poll_until, wait_for_event,
};

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "smollm2-135m-instruct";
const UNHEALTHY_AFTER: Duration = Duration::from_secs(2);

/// Events that mean the fleet acted on a failure: none may follow a fault
/// that is the hub's.
const FAILOVER: [EventType; 7] = [
    EventType::ClusterUnhealthy,
    EventType::DeploymentPlaced,
    EventType::DeploymentRebalanced,
    EventType::DeploymentUnschedulable,
    EventType::ReplicaStarting,
    EventType::ReplicaStopped,
    EventType::ReplicaFailed,
];

/// The hub: every control service but the gateway and the gRPC API, with
/// the tests' unhealthy window, until `stop`.
fn hub(server: &NatsServer, stop: &CancellationToken) -> tokio::task::JoinSet<anyhow::Result<()>> {
    let bus = support::config(server);
    ControlPlane {
        inventory: Some(fleet::inventory_config(&bus, UNHEALTHY_AFTER)),
        placement: Some(fleet::placement_config(&bus)),
        model_provisioner: Some(fleet::model_provisioner_config(&bus)),
        rollout: Some(flotilla_rollout::Config {
            bus: bus.clone(),
            http_addr: ([127, 0, 0, 1], 0).into(),
            halt_after_failures: 3,
        }),
        ..Default::default()
    }
    .start(stop)
    .services
}

/// Stops the hub services and waits until each has returned.
async fn stop_hub(stop: CancellationToken, mut services: tokio::task::JoinSet<anyhow::Result<()>>) {
    stop.cancel();
    while let Some(done) = services.join_next().await {
        done.unwrap().unwrap();
    }
}

/// The events among [`FAILOVER`] that arrive on `events` within `window`.
async fn failovers_within(
    events: &mut async_nats::Subscriber,
    window: Duration,
) -> Vec<(String, String)> {
    let until = tokio::time::Instant::now() + window;
    let mut seen = Vec::new();
    let failover = |e: &v1::Event| FAILOVER.iter().any(|ty| ty.to_string() == e.r#type);
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        // What already arrived is read even when the window is over.
        match next_event(events, left.max(Duration::from_millis(50)), failover).await {
            Some(event) => seen.push((event.r#type, event.message)),
            None => return seen,
        }
    }
}

/// The ready replicas in KV, by id, with their endpoints.
async fn ready_replicas(bus: &Bus) -> BTreeSet<(String, String, String)> {
    support::replicas(bus)
        .await
        .into_iter()
        .filter(|r| r.phase() == ReplicaPhase::Ready)
        .map(|r| (r.replica_id, r.cluster, r.endpoint))
        .collect()
}

/// Waits until every cluster in `names` has a heartbeat recorded after
/// `after_ms` and is healthy.
async fn heard_from_after(bus: &Bus, names: &[&str], after_ms: i64) {
    let store = RecordStore::<ClusterRecord>::open(bus, &bus.topology.clusters.name)
        .await
        .unwrap();
    poll_until(DEADLINE, "heartbeats of every cluster again", || async {
        for name in names {
            let (record, _) = store.get(name).await.ok()??;
            if record.last_seen_unix_ms <= after_ms || record.health() != ClusterHealth::Healthy {
                return None;
            }
        }
        Some(())
    })
    .await;
}

#[tokio::test]
async fn a_paused_bus_and_a_restarted_hub_fail_nothing_over_but_a_dead_cluster_is_caught() {
    let (mut server, bus, mut events) = support::bus_with_events().await;
    let stop = CancellationToken::new();
    let services = hub(&server, &stop);
    let caches = tempfile::tempdir().unwrap();
    let mut executors = std::collections::BTreeMap::new();
    for (name, region) in [("a", "r1"), ("b", "r2"), ("c", "r3")] {
        let region = format!("region={region}");
        let handle = fleet::executor(&server, name, "2xH100-80GB", &[&region], 1.0, caches.path());
        executors.insert(name, handle);
    }
    let _runners: Vec<_> = ["a", "b", "c"]
        .map(|c| {
            KillReplicasOnDrop(flotilla_executor::backends::local::LocalBackend::owner_for(
                c,
                &caches.path().join(c),
            ))
        })
        .into();
    for _ in 0..3 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }
    apply(&bus, support::TWO_CLUSTERS).await;
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    }
    let serving = ready_replicas(&bus).await;
    assert_eq!(serving.len(), 2, "{serving:?}");
    let used: BTreeSet<&str> = serving.iter().map(|(_, c, _)| c.as_str()).collect();
    let idle = ["a", "b", "c"]
        .into_iter()
        .find(|c| !used.contains(c))
        .unwrap();
    let busy: Vec<&str> = used.iter().copied().collect();

    // The bus pauses for 8 s, four unhealthy windows; meanwhile the idle
    // cluster's executor really dies.
    let pid = server.pid().unwrap();
    assert!(support::signal("STOP", pid));
    let paused = Instant::now();
    executors.remove(idle).unwrap().abort();
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(paused.elapsed())).await;
    assert!(support::signal("CONT", pid));
    let resumed_ms = now_unix_ms();
    let resumed = Instant::now();

    // The dead cluster is caught within the window after the bus is back,
    // and it is the only one.
    let unhealthy = wait_for_event(&mut events, EventType::ClusterUnhealthy, None, DEADLINE).await;
    let caught_after = resumed.elapsed();
    assert_eq!(unhealthy.name, idle, "{}", unhealthy.message);
    println!(
        "the cluster that died during the pause was unhealthy {caught_after:?} after the bus resumed"
    );
    assert!(
        caught_after < UNHEALTHY_AFTER * 3,
        "caught {caught_after:?} after the bus resumed"
    );
    heard_from_after(&bus, &busy, resumed_ms).await;
    let acted = failovers_within(&mut events, UNHEALTHY_AFTER * 3).await;
    assert!(acted.is_empty(), "after the pause: {acted:?}");
    assert_eq!(ready_replicas(&bus).await, serving);

    // The hub's services stop, stay down for two windows and start again
    // from what they stored.
    stop_hub(stop, services).await;
    let down_ms = now_unix_ms();
    tokio::time::sleep(UNHEALTHY_AFTER * 2).await;
    let stop = CancellationToken::new();
    let services = hub(&server, &stop);
    heard_from_after(
        &bus,
        &busy,
        down_ms + 2 * UNHEALTHY_AFTER.as_millis() as i64,
    )
    .await;
    let acted = failovers_within(&mut events, UNHEALTHY_AFTER * 3).await;
    assert!(acted.is_empty(), "after the hub restarted: {acted:?}");

    // The same replicas, at the same addresses, serve.
    assert_eq!(ready_replicas(&bus).await, serving);
    for (_, _, endpoint) in &serving {
        assert!(!ask(endpoint, MODEL, "Hi!", 4).await.is_empty());
    }
    stop_hub(stop, services).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_planned_executor_restart_re_places_nothing_and_its_replica_serves_throughout() {
    let (server, bus, mut events) = support::bus_with_events().await;
    let stop_hub_services = CancellationToken::new();
    let services = hub(&server, &stop_hub_services);
    let caches = tempfile::tempdir().unwrap();
    let upgraded = |grace: Duration| {
        let mut args = fleet::executor_args(
            &server.url(),
            "upgraded",
            "2xH100-80GB",
            &["region=r1"],
            1.0,
            caches.path(),
        );
        args.restart_grace = grace;
        args
    };
    let _runners = KillReplicasOnDrop(flotilla_executor::backends::local::LocalBackend::owner_for(
        "upgraded",
        &caches.path().join("upgraded"),
    ));
    let first_stop = CancellationToken::new();
    let first = fleet::start_executor(upgraded(Duration::from_secs(60)), first_stop.clone());
    let _other = fleet::executor(
        &server,
        "other",
        "2xH100-80GB",
        &["region=r2"],
        5.0,
        caches.path(),
    );
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }
    apply(
        &bus,
        r#"
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
"#,
    )
    .await;
    let ready = wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    let Some(Payload::Replica(replica)) = ready.payload else {
        panic!("no replica in {ready:?}")
    };
    assert_eq!(replica.cluster, "upgraded");

    // The executor exits as an upgrade stops it, and announces it.
    first_stop.cancel();
    first.await.unwrap();
    let restarting = wait_for_event(
        &mut events,
        EventType::ClusterRestarting,
        Some("upgraded"),
        DEADLINE,
    )
    .await;
    assert!(
        restarting.message.contains("back within 60 s"),
        "{}",
        restarting.message
    );

    // Away for three unhealthy windows: its replica answers all along and
    // the fleet does nothing.
    let away = tokio::time::Instant::now() + UNHEALTHY_AFTER * 3;
    let mut answers = 0;
    while tokio::time::Instant::now() < away {
        assert!(
            !ask(&replica.endpoint, MODEL, "Hi!", 2).await.is_empty(),
            "the replica stopped answering while its executor was away"
        );
        answers += 1;
    }
    let acted = failovers_within(&mut events, Duration::ZERO).await;
    assert!(acted.is_empty(), "while the executor was away: {acted:?}");
    assert!(answers > 0);

    // The next instance adopts the replica; still nothing re-placed.
    let second_stop = CancellationToken::new();
    let _second = fleet::start_executor(upgraded(Duration::ZERO), second_stop.clone());
    let clusters = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name)
        .await
        .unwrap();
    let instance_before = restarting_instance(&restarting);
    poll_until(DEADLINE, "the next executor instance", || async {
        let (record, _) = clusters.get("upgraded").await.ok()??;
        (record.executor_instance != instance_before).then_some(record)
    })
    .await;
    let acted = failovers_within(&mut events, UNHEALTHY_AFTER * 2).await;
    assert!(acted.is_empty(), "after the restart: {acted:?}");
    let (record, _) = clusters.get("upgraded").await.unwrap().unwrap();
    assert_eq!(record.health(), ClusterHealth::Healthy);
    assert_eq!(record.restart_expected_by_unix_ms, 0);
    let now_serving: Vec<v1::ReplicaStatus> = support::replicas(&bus).await;
    assert_eq!(now_serving.len(), 1, "{now_serving:?}");
    assert_eq!(now_serving[0].replica_id, replica.replica_id);
    assert_eq!(now_serving[0].endpoint, replica.endpoint);
    assert_eq!(now_serving[0].phase(), ReplicaPhase::Ready);
    assert!(!ask(&replica.endpoint, MODEL, "Hi!", 2).await.is_empty());

    // The second instance was started with no grace: its exit stops the
    // replica, as `flotilla up`'s executors do.
    second_stop.cancel();
    stop_hub(stop_hub_services, services).await;
}

/// The executor instance an announcement of a restart came from.
fn restarting_instance(event: &v1::Event) -> String {
    match &event.payload {
        Some(Payload::Cluster(record)) => record.executor_instance.clone(),
        other => panic!("no cluster record in the restarting event: {other:?}"),
    }
}
