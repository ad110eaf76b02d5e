//! Placement on a real nats-server with inventory and executors: a JSON
//! deployment from a plain NATS client is placed; a failing cluster's
//! replicas move within a second while other deployments stay put.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::RecordStore;
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, PlacementDecision, PlacementOutcome, event::Payload};
use tokio::task::JoinHandle;

use crate::support::{self, next_event, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(20);

/// A cluster of `gpus` in `region` at `cost` per GPU-hour, its model cache
/// under `caches`.
fn start_executor(
    server: &NatsServer,
    cluster: &str,
    region: &str,
    gpus: &str,
    cost: f64,
    caches: &Path,
) -> JoinHandle<()> {
    let region = format!("region={region}");
    fleet::executor(server, cluster, gpus, &[&region, "env=prod"], cost, caches)
}

async fn expect(
    sub: &mut async_nats::Subscriber,
    ty: EventType,
    name: &str,
) -> (v1::Event, Instant) {
    let event = wait_for_event(sub, ty, Some(name), DEADLINE).await;
    (event, Instant::now())
}

async fn expect_joined(sub: &mut async_nats::Subscriber, clusters: &[&str]) {
    let mut waiting: std::collections::BTreeSet<&str> = clusters.iter().copied().collect();
    let joined = EventType::ClusterJoined.to_string();
    let all = next_event(sub, DEADLINE, |event| {
        if event.r#type == joined {
            waiting.remove(event.name.as_str());
        }
        waiting.is_empty()
    })
    .await;
    assert!(all.is_some(), "clusters never joined: {waiting:?}");
}

#[tokio::test]
async fn a_json_deployment_is_placed_and_moves_off_a_failed_cluster_within_a_second() {
    let (server, bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::inventory(&config, Duration::from_secs(1));
    let caches = tempfile::tempdir().unwrap();
    let doomed = start_executor(&server, "eu-cheap", "eu", "4xH100-80GB", 1.0, caches.path());
    let _b = start_executor(&server, "us-mid", "us", "4xH100-80GB", 2.0, caches.path());
    let _c = start_executor(&server, "ap-dear", "ap", "4xH100-80GB", 4.0, caches.path());
    expect_joined(&mut events, &["eu-cheap", "us-mid", "ap-dear"]).await;
    fleet::placement(&config);

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
    let (server, bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::inventory(&config, Duration::from_secs(1));
    let caches = tempfile::tempdir().unwrap();
    let _a = start_executor(&server, "small", "eu", "1xL4-24GB", 1.0, caches.path());
    expect(&mut events, EventType::ClusterJoined, "small").await;
    fleet::placement(&config);

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
    flotilla_cli::get::get(
        &bus,
        &flotilla_cli::get::GetArgs::of(flotilla_cli::get::Kind::Deployments),
        &mut table,
        tokio_util::sync::CancellationToken::new(),
    )
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

#[tokio::test]
async fn a_resident_deployment_stays_inside_its_rule_even_when_its_clusters_fail() {
    let (server, bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::inventory(&config, Duration::from_secs(1));
    let caches = tempfile::tempdir().unwrap();
    let doomed = start_executor(&server, "eu-dear", "eu", "2xH100-80GB", 4.0, caches.path());
    let _cheap = start_executor(&server, "us-cheap", "us", "2xH100-80GB", 1.0, caches.path());
    expect_joined(&mut events, &["eu-dear", "us-cheap"]).await;
    fleet::placement(&config);

    // Cheapest first would pick us-cheap; the residency rule forbids it.
    let resident = r#"{"metadata": {"name": "resident"},
        "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1,
                 "placement": {"policy": "PickN", "numberOfClusters": 1,
                               "affinity": {"preferred": [{"weight": 100, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}},
                 "residency": {"clusterSelector": {"matchLabels": {"region": "eu"}}}}}"#;
    bus.client
        .publish("flotilla.control.deployments.apply", resident.into())
        .await
        .unwrap();
    let (placed, _) = expect(&mut events, EventType::DeploymentPlaced, "resident").await;
    let Some(Payload::Placement(decision)) = placed.payload else {
        panic!("no decision in {placed:?}")
    };
    assert_eq!(decision.assignments.len(), 1, "{decision:?}");
    assert_eq!(decision.assignments[0].cluster, "eu-dear");
    let outside = &decision.exclusions[0];
    assert_eq!(
        (outside.cluster.as_str(), outside.plugin.as_str()),
        ("us-cheap", "Residency")
    );
    assert_eq!(
        outside.reason,
        "outside residency region=eu; cluster has region=us"
    );

    // Its only allowed cluster fails: it waits rather than moving out.
    doomed.abort();
    expect(&mut events, EventType::ClusterUnhealthy, "eu-dear").await;
    let (waiting, _) = expect(&mut events, EventType::DeploymentUnschedulable, "resident").await;
    let Some(Payload::Placement(decision)) = waiting.payload else {
        panic!("no decision in {waiting:?}")
    };
    assert!(decision.assignments.is_empty(), "{decision:?}");
    assert!(
        decision
            .message
            .contains("residency allows only clusters with region=eu"),
        "{}",
        decision.message
    );
}

/// Applies queued while placement is busy are handled many at a time: a
/// burst of 30 deployments, with one deployment applied again eight times
/// among them, ends with every deployment placed once and the twice-applied
/// one on its last spec (an overtaken apply never undoes a newer one).
#[tokio::test]
async fn a_burst_of_applies_is_placed_whole_and_the_last_spec_of_each_deployment_wins() {
    let (server, bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::inventory(&config, Duration::from_secs(1));
    let caches = tempfile::tempdir().unwrap();
    let _a = start_executor(&server, "big", "eu", "64xH100-80GB", 1.0, caches.path());
    expect(&mut events, EventType::ClusterJoined, "big").await;

    let doc = |name: &str, replicas: u32| {
        format!(
            r#"{{"metadata": {{"name": "{name}"}}, "spec": {{"model": {{"preset": "smollm2-135m-instruct"}}, "replicas": {replicas}}}}}"#
        )
    };
    // Published before placement runs, so they wait in the stream together.
    let mut others = std::collections::BTreeSet::new();
    for i in 0..30u32 {
        let name = format!("burst-{i:02}");
        bus.client
            .publish("flotilla.control.deployments.apply", doc(&name, 1).into())
            .await
            .unwrap();
        others.insert(name);
        if i % 4 == 0 {
            let replicas = i / 4 + 1;
            bus.client
                .publish(
                    "flotilla.control.deployments.apply",
                    doc("moving", replicas).into(),
                )
                .await
                .unwrap();
        }
    }
    bus.client.flush().await.unwrap();
    fleet::placement(&config);

    let placed = EventType::DeploymentPlaced.to_string();
    let accepted = EventType::DeploymentAccepted.to_string();
    let mut moving_generations = Vec::new();
    let mut moving_at_8 = false;
    let done = next_event(&mut events, DEADLINE, |e| {
        if e.r#type == accepted && e.name == "moving" {
            moving_generations.push(e.generation);
        }
        if e.r#type == placed {
            others.remove(&e.name);
        }
        moving_at_8 |= e.r#type == placed
            && e.name == "moving"
            && matches!(&e.payload, Some(Payload::Placement(p))
                if p.assignments.iter().map(|a| a.replicas).sum::<u32>() == 8);
        others.is_empty() && moving_at_8
    })
    .await;
    assert!(
        done.is_some(),
        "not placed: {others:?}; moving accepted at generations {moving_generations:?}"
    );
    let stored: v1::ModelDeployment =
        support::record(&bus, &bus.topology.deployments.name, "moving").await;
    assert_eq!(stored.spec.as_ref().map(|s| s.replicas), Some(8));
    let status = stored.status.unwrap_or_default();
    assert!(
        moving_generations.windows(2).all(|w| w[0] < w[1])
            && moving_generations.last() == Some(&status.generation),
        "accepted generations {moving_generations:?}, stored {}",
        status.generation
    );
    let placement: PlacementDecision =
        support::record(&bus, &bus.topology.placements.name, "moving").await;
    assert_eq!(placement.deployment_generation, status.generation);
}

/// Clients nobody here wrote: Python's protobuf runtime builds deployments
/// from the checked-in descriptors and writes them with `json_format`
/// (canonical proto3 JSON, with JSON names and with proto field names) and
/// as binary protobuf; `nats-py` publishes them and a document-form JSON.
/// Placement places all four.
#[tokio::test]
async fn deployments_from_python_json_format_protobuf_and_nats_py_documents_are_placed() {
    let (server, _bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::inventory(&config, Duration::from_secs(1));
    let caches = tempfile::tempdir().unwrap();
    let _a = start_executor(&server, "eu-1", "eu", "4xH100-80GB", 1.0, caches.path());
    let _b = start_executor(&server, "us-1", "us", "4xH100-80GB", 2.0, caches.path());
    expect_joined(&mut events, &["eu-1", "us-1"]).await;
    fleet::placement(&config);

    let publish = r#"
import asyncio, json, sys
import nats
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

url, descriptors = sys.argv[1], sys.argv[2]
files = descriptor_pb2.FileDescriptorSet.FromString(open(descriptors, "rb").read())
pool = descriptor_pool.DescriptorPool()
for f in files.file:
    pool.Add(f)
Deployment = message_factory.GetMessageClass(pool.FindMessageTypeByName("flotilla.v1.ModelDeployment"))
def enum(name, value):
    return pool.FindEnumTypeByName("flotilla.v1." + name).values_by_name[value].number

def deployment(name):
    d = Deployment()
    d.api_version = "flotilla.dev/v1alpha1"
    d.kind = "ModelDeployment"
    d.metadata.name = name
    d.metadata.labels["team"] = "python"
    d.spec.model.preset = "smollm2-135m-instruct"
    d.spec.runtime = enum("Runtime", "RUNTIME_CANDLE")
    d.spec.replicas = 1
    d.spec.resources.gpu.count = 1
    d.spec.resources.gpu.min_memory_gib = 16
    d.spec.placement.policy = enum("PlacementPolicy", "PLACEMENT_POLICY_PICK_N")
    d.spec.placement.number_of_clusters = 1
    preferred = d.spec.placement.affinity.preferred.add()
    preferred.weight = 100
    preferred.property_sorter.name = "cost.perGpuHour"
    preferred.property_sorter.order = enum("SortOrder", "SORT_ORDER_DESCENDING")
    return d

canonical = json_format.MessageToJson(deployment("canonical-json"))
proto_names = json_format.MessageToJson(deployment("proto-names"), preserving_proto_field_name=True)
assert '"PLACEMENT_POLICY_PICK_N"' in canonical and '"minMemoryGiB"' in canonical, canonical
assert '"number_of_clusters"' in proto_names, proto_names
document = {"apiVersion": "flotilla.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "document"},
            "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1,
                     "placement": {"policy": "PickN", "numberOfClusters": 1}}}

async def main():
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = "flotilla.control.deployments.apply"
    json_headers = {"Content-Type": "application/json"}
    await js.publish(subject, canonical.encode(), headers=json_headers)
    await js.publish(subject, proto_names.encode(), headers=json_headers)
    await js.publish(subject, deployment("binary").SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"})
    await js.publish(subject, json.dumps(document).encode())
    await nc.close()
asyncio.run(main())
"#;
    let descriptors =
        flotilla_integration::workspace_root().join("proto/src/gen/flotilla.v1.binpb");
    support::output_of(
        &support::python(),
        &["-c", publish, &server.url(), &descriptors.to_string_lossy()],
    )
    .await;

    for name in ["canonical-json", "proto-names", "binary"] {
        let (placed, _) = expect(&mut events, EventType::DeploymentPlaced, name).await;
        let Some(Payload::Placement(decision)) = placed.payload else {
            panic!("no decision in {placed:?}")
        };
        // The descending cost sorter survived the trip: the dearer cluster.
        assert_eq!(
            decision.assignments[0].cluster, "us-1",
            "{name}: {decision:?}"
        );
    }
    expect(&mut events, EventType::DeploymentPlaced, "document").await;
}
