//! Inventory and executor heartbeats on a real nats-server: join, silence,
//! recovery, two inventory instances, cordon, bad heartbeats.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_cli::clusters::{self, ClusterAction};
use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::{Bus, RecordStore, now_unix_ms};
use flotilla_proto::v1::{self, ClusterHealth, ClusterRecord, event::Payload};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;
use prost::Message;
use tokio::task::JoinHandle;

use crate::support::{self, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(20);
const UNHEALTHY_AFTER: Duration = Duration::from_secs(1);

fn start_inventory(server: &NatsServer) {
    fleet::inventory(&support::config(server), UNHEALTHY_AFTER);
}

/// A server, a client and its subscription to `events`, then inventory.
async fn inventory_running(events: &str) -> (NatsServer, Bus, async_nats::Subscriber) {
    let (server, bus) = support::bus().await;
    let events = bus.client.subscribe(events.to_string()).await.unwrap();
    start_inventory(&server);
    (server, bus, events)
}

/// A cluster of two H100s in `region`, its model cache under `caches`.
fn start_executor(
    server: &NatsServer,
    cluster: &str,
    region: &str,
    caches: &std::path::Path,
) -> JoinHandle<()> {
    let region = format!("region={region}");
    fleet::executor(
        server,
        cluster,
        "2xH100-80GB",
        &[&region, "env=prod"],
        2.5,
        caches,
    )
}

/// Waits for the next event of `ty` about `name` on a core subscription.
async fn expect_event(sub: &mut async_nats::Subscriber, ty: EventType, name: &str) -> v1::Event {
    wait_for_event(sub, ty, Some(name), DEADLINE).await
}

/// Every event stored in the events stream about `cluster`, by type.
async fn stored_events(bus: &Bus, cluster: &str) -> BTreeMap<String, usize> {
    let stream = bus
        .jetstream
        .get_stream(&bus.topology.events.name)
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("flotilla.events.cluster.{cluster}.>"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut counts = BTreeMap::new();
    let mut batch = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(msg)) = batch.next().await {
        let event = v1::Event::decode(msg.payload.clone()).unwrap();
        *counts.entry(event.r#type).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_cluster_joins_goes_unhealthy_when_its_executor_dies_and_recovers() {
    let (server, bus, mut events) = inventory_running("flotilla.events.cluster.>").await;
    let caches = tempfile::tempdir().unwrap();
    let executor = start_executor(&server, "eu-1", "eu-west-1", caches.path());

    let joined = expect_event(&mut events, EventType::ClusterJoined, "eu-1").await;
    let Some(Payload::Cluster(record)) = joined.payload else {
        panic!("no record in {joined:?}")
    };
    assert_eq!(record.health(), ClusterHealth::Healthy);
    let inventory = record.inventory.unwrap();
    assert_eq!(inventory.source(), v1::InventorySource::Declared);
    assert_eq!(inventory.gpus.len(), 2);
    assert_eq!(inventory.gpus[0].model, "H100-80GB");
    assert_eq!(inventory.labels["region"], "eu-west-1");
    assert_eq!(inventory.cost_per_gpu_hour, 2.5);

    let store = RecordStore::<ClusterRecord>::open(&bus, "clusters")
        .await
        .unwrap();
    let (in_kv, _) = store.get("eu-1").await.unwrap().unwrap();
    assert_eq!(in_kv.health(), ClusterHealth::Healthy);

    // The executor dies: no more heartbeats.
    executor.abort();
    let died = Instant::now();
    let unhealthy = expect_event(&mut events, EventType::ClusterUnhealthy, "eu-1").await;
    let took = died.elapsed();
    assert!(
        took <= UNHEALTHY_AFTER + Duration::from_secs(1),
        "unhealthy after {took:?}, allowed {:?}",
        UNHEALTHY_AFTER + Duration::from_secs(1)
    );
    assert!(
        unhealthy.message.contains("no heartbeat"),
        "{}",
        unhealthy.message
    );
    assert_eq!(
        store.get("eu-1").await.unwrap().unwrap().0.health(),
        ClusterHealth::Unhealthy
    );

    // It comes back.
    let _executor = start_executor(&server, "eu-1", "eu-west-1", caches.path());
    expect_event(&mut events, EventType::ClusterHealthy, "eu-1").await;
    assert_eq!(
        store.get("eu-1").await.unwrap().unwrap().0.health(),
        ClusterHealth::Healthy
    );
}

#[tokio::test]
async fn two_inventory_instances_publish_each_transition_once() {
    let (server, bus, mut events) = inventory_running("flotilla.events.cluster.>").await;
    let caches = tempfile::tempdir().unwrap();
    start_inventory(&server);

    let executor = start_executor(&server, "us-1", "us-east-1", caches.path());
    expect_event(&mut events, EventType::ClusterJoined, "us-1").await;
    executor.abort();
    expect_event(&mut events, EventType::ClusterUnhealthy, "us-1").await;
    let _executor = start_executor(&server, "us-1", "us-east-1", caches.path());
    expect_event(&mut events, EventType::ClusterHealthy, "us-1").await;

    // Both instances watch every record; give them the time of several
    // scans to make a duplicate, then read what the stream kept.
    let settle = tokio::time::timeout(
        Duration::from_millis(1500),
        expect_event(&mut events, EventType::ClusterUnhealthy, "us-1"),
    )
    .await;
    assert!(settle.is_err(), "a healthy cluster turned unhealthy again");
    let counts = stored_events(&bus, "us-1").await;
    assert_eq!(counts.get("cluster.joined"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("cluster.unhealthy"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("cluster.healthy"), Some(&1), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 3, "{counts:?}");
}

#[tokio::test]
async fn cordon_shows_in_kv_in_events_and_in_get_clusters() {
    let (server, bus, mut events) = inventory_running("flotilla.events.cluster.>").await;
    let caches = tempfile::tempdir().unwrap();
    let _executor = start_executor(&server, "ap-1", "ap-south-1", caches.path());
    expect_event(&mut events, EventType::ClusterJoined, "ap-1").await;

    let mut out = Vec::new();
    clusters::cordon(
        &bus,
        ClusterAction::Cordon {
            name: "ap-1".into(),
            reason: "driver upgrade".into(),
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "cluster/ap-1 cordoned\n");
    let event = expect_event(&mut events, EventType::ClusterCordoned, "ap-1").await;
    assert!(event.message.contains("driver upgrade"));
    let store = RecordStore::<ClusterRecord>::open(&bus, "clusters")
        .await
        .unwrap();
    let (record, _) = store.get("ap-1").await.unwrap().unwrap();
    assert!(record.cordoned);
    assert_eq!(record.cordon_reason, "driver upgrade");

    let mut table = Vec::new();
    flotilla_cli::get::get(
        &bus,
        &flotilla_cli::get::GetArgs::of(flotilla_cli::get::Kind::Clusters),
        &mut table,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let table = String::from_utf8(table).unwrap();
    let line = table
        .lines()
        .find(|l| l.starts_with("ap-1"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("Healthy,Cordoned"), "{table}");
    assert!(
        line.contains("ap-south-1")
            && line.contains("2/2")
            && line.contains("H100-80GB (declared)")
            && line.contains("2.50"),
        "{table}"
    );

    let mut json = Vec::new();
    flotilla_cli::get::get(
        &bus,
        &flotilla_cli::get::GetArgs {
            output: flotilla_cli::get::Format::Json,
            ..flotilla_cli::get::GetArgs::of(flotilla_cli::get::Kind::Clusters)
        },
        &mut json,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(parsed["kind"], "List");
    assert_eq!(parsed["items"][0]["name"], "ap-1");
    assert_eq!(parsed["items"][0]["cordoned"], true);
    assert_eq!(parsed["items"][0]["health"], "Healthy");

    // The command line takes the bus flags after the subcommand too, as
    // kubectl takes its global flags anywhere on the line.
    let listed =
        support::flotilla(&["get", "clusters", "-o", "json", "--nats-url", &server.url()]).await;
    let parsed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(parsed["items"][0]["name"], "ap-1");

    let mut out = Vec::new();
    clusters::cordon(
        &bus,
        ClusterAction::Uncordon {
            name: "ap-1".into(),
        },
        &mut out,
    )
    .await
    .unwrap();
    expect_event(&mut events, EventType::ClusterUncordoned, "ap-1").await;

    // An unknown cluster is refused with the reason.
    let err = clusters::cordon(
        &bus,
        ClusterAction::Cordon {
            name: "nowhere".into(),
            reason: String::new(),
        },
        &mut Vec::new(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("no cluster named \"nowhere\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_heartbeat_gets_an_error_event_and_leaves_kv_alone() {
    let (_server, bus, mut events) = inventory_running("flotilla.events.>").await;

    let gpu = v1::GpuDevice {
        index: 0,
        uuid: "GPU-0".into(),
        model: "H100-80GB".into(),
        memory_total_bytes: 80 << 30,
        memory_free_bytes: 90 << 30,
        ..Default::default()
    };
    let hb = v1::ClusterHeartbeat {
        cluster: "eu-2".into(),
        sequence: 1,
        sent_at_unix_ms: now_unix_ms(),
        executor_instance: "x".into(),
        inventory: Some(v1::ClusterInventory {
            gpus: vec![gpu],
            source: v1::InventorySource::Declared.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    bus.publish(bus.subjects.telemetry("eu-2").unwrap(), &hb, None)
        .await
        .unwrap();
    let event = expect_event(&mut events, EventType::ClusterHeartbeatRejected, "eu-2").await;
    let Some(Payload::Error(detail)) = event.payload else {
        panic!("no detail")
    };
    assert_eq!(detail.field, "inventory.gpus[0].memory_free_bytes");
    assert!(detail.reason.contains("exceeds"), "{}", detail.reason);

    // A heartbeat from far in the future.
    let mut skewed = hb.clone();
    skewed.inventory.as_mut().unwrap().gpus[0].memory_free_bytes = 1;
    skewed.sent_at_unix_ms += 3_600_000;
    bus.publish(bus.subjects.telemetry("eu-2").unwrap(), &skewed, None)
        .await
        .unwrap();
    let event = expect_event(&mut events, EventType::ClusterHeartbeatRejected, "eu-2").await;
    assert!(
        event.message.contains("sent_at_unix_ms"),
        "{}",
        event.message
    );

    // A cluster name that is no DNS label: refused by the consumer loop.
    bus.publish("flotilla.telemetry.Bad_Name".into(), &hb, None)
        .await
        .unwrap();
    let event = expect_event(
        &mut events,
        EventType::BusMessageRejected,
        "inventory-telemetry",
    )
    .await;
    let Some(Payload::Error(detail)) = event.payload else {
        panic!("no detail")
    };
    assert_eq!(detail.field, "cluster");

    let store = RecordStore::<ClusterRecord>::open(&bus, "clusters")
        .await
        .unwrap();
    assert!(store.get("eu-2").await.unwrap().is_none());
    assert!(store.list().await.unwrap().is_empty());
    let _ = ControlSubject::ClusterCordon;
}

#[tokio::test]
async fn heartbeats_that_change_only_gauges_are_not_written_each_time() {
    let (_server, bus, mut events) = inventory_running("flotilla.events.>").await;
    let store = RecordStore::<ClusterRecord>::open(&bus, &bus.topology.clusters.name)
        .await
        .unwrap();
    let beat = |sequence: u64, utilization: u32, env: &str| v1::ClusterHeartbeat {
        cluster: "eu-3".into(),
        sequence,
        sent_at_unix_ms: now_unix_ms(),
        executor_instance: "x".into(),
        inventory: Some(v1::ClusterInventory {
            labels: [("env".to_string(), env.to_string())].into(),
            gpus: vec![v1::GpuDevice {
                uuid: "GPU-0".into(),
                model: "H100-80GB".into(),
                memory_total_bytes: 80 << 30,
                memory_free_bytes: 80 << 30,
                utilization_percent: utilization,
                ..Default::default()
            }],
            source: v1::InventorySource::Declared.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let subject = bus.subjects.telemetry("eu-3").unwrap();
    bus.publish(subject.clone(), &beat(1, 0, "prod"), None)
        .await
        .unwrap();
    expect_event(&mut events, EventType::ClusterJoined, "eu-3").await;
    // The joined record, once its event is marked published.
    let (joined, joined_at) =
        support::poll_until(DEADLINE, "the join recorded as announced", || async {
            let (record, revision) = store.get("eu-3").await.ok()??;
            (record.announced_generation == record.generation)
                .then_some((revision, record.last_seen_unix_ms))
        })
        .await;
    for sequence in 2..=6 {
        bus.publish(
            subject.clone(),
            &beat(sequence, sequence as u32 * 10, "prod"),
            None,
        )
        .await
        .unwrap();
    }
    // A label change is written at once, and it is the only write since
    // the join: the gauges' changes before it were not.
    bus.publish(subject.clone(), &beat(7, 70, "staging"), None)
        .await
        .unwrap();
    let (record, revision) = support::poll_until(DEADLINE, "the label change", || async {
        let (record, revision) = store.get("eu-3").await.ok()??;
        (record.last_heartbeat_sequence == 7).then_some((record, revision))
    })
    .await;
    // Inside one refresh period of the join (a machine slow enough to
    // take longer legitimately refreshes the record on the way).
    let refresh_ms = flotilla_inventory::RECORD_REFRESH.as_millis() as i64;
    if record.last_seen_unix_ms - joined_at < refresh_ms {
        assert_eq!(revision, joined + 1, "{record:?}");
    }
    assert_eq!(record.inventory.unwrap().labels["env"], "staging");
}
