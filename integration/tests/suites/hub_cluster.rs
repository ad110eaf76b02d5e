//! The hub as a NATS cluster of three servers with every stream, bucket
//! and object store replicated on all three: a staged rollout completes
//! while the server leading JetStream and the busiest streams is killed in
//! the middle of it, the services fail over by themselves, nothing stored
//! is lost, and the server catches up when it comes back. A member's leaf
//! node logs in as its executor and is confined as the executor is.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use flotilla_cli::fleet::SimulatedCluster;
use flotilla_integration::nats_cluster::StreamCopy;
use flotilla_integration::{LeafNode, NatsCluster, fleet};
use flotilla_kit::{Bus, BusArgs, BusConfig};
use flotilla_nats_auth::{FleetUsers, Role, User, fleet_roles};
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus};
use flotilla_proto::{EventType, Subjects, Topology};
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::{self, apply, poll_until, replicas};

const DEADLINE: Duration = Duration::from_secs(60);

/// The hub's size: a quorum survives one server.
const HUB: usize = 3;

const STAGED: &str = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 2
  placement: {policy: PickN, numberOfClusters: 2}
  rollout:
    strategy: Staged
    maxSurge: "1"
    stages:
      - name: canary
        clusterSelector: {matchLabels: {stage: canary}}
      - name: main
        clusterSelector: {matchLabels: {stage: main}}
"#;

/// Every JetStream stream of the topology: the streams, one per bucket
/// (`KV_<bucket>`) and one per object store (`OBJ_<store>`).
fn all_streams(topology: &Topology) -> Vec<String> {
    let mut names: Vec<String> = topology.streams().iter().map(|s| s.name.clone()).collect();
    names.extend(topology.buckets().iter().map(|b| format!("KV_{}", b.name)));
    names.extend(
        topology
            .object_stores()
            .iter()
            .map(|o| format!("OBJ_{}", o.name)),
    );
    names
}

/// A simulated cluster's executor on `nats_url` with the hub's replicas,
/// plus `extra` flags.
fn executor(
    nats_url: &str,
    cluster: &str,
    labels: &[&str],
    caches: &std::path::Path,
    extra: &[&str],
) -> tokio::task::JoinHandle<()> {
    let mut flags =
        SimulatedCluster::new(cluster, "2xH100-80GB", labels, 1.0).executor_flags(nats_url, caches);
    flags.extend(
        ["--heartbeat-interval", "200ms", "--stream-replicas", "3"]
            .into_iter()
            .chain(extra.iter().copied())
            .map(OsString::from),
    );
    flags.extend([
        OsString::from("--runner-bin"),
        fleet::target_bin("flotilla-runner").into(),
    ]);
    let args = flotilla_cli::fleet::executor_args(flags).unwrap();
    fleet::start_executor(args, CancellationToken::new())
}

/// Every event stored in the events stream, in stream order, through a
/// durable consumer of its own (replicated like the stream, so it fails
/// over with it): the events, and every one seen with its stream sequence.
type Seen = Arc<Mutex<Vec<(u64, Option<v1::Event>)>>>;

fn follow_events(bus: &Bus) -> (mpsc::UnboundedReceiver<v1::Event>, Seen) {
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let js = bus.jetstream.clone();
    let stream = bus.topology.events.name.clone();
    let sequences = seen.clone();
    tokio::spawn(async move {
        let mut delivered = BTreeSet::new();
        loop {
            // Recreated whenever the server side fails; the durable
            // consumer remembers where it was.
            let Ok(s) = js.get_stream(&stream).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let consumer = s
                .get_or_create_consumer(
                    "hub-cluster-test",
                    pull::Config {
                        durable_name: Some("hub-cluster-test".into()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ..Default::default()
                    },
                )
                .await;
            let Ok(consumer) = consumer else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(mut messages) = consumer
                .stream()
                .heartbeat(Duration::from_secs(1))
                .expires(Duration::from_secs(5))
                .messages()
                .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while let Some(next) = messages.next().await {
                let Ok(msg) = next else { break };
                let Ok(info) = msg.info() else { continue };
                let seq = info.stream_sequence;
                // A redelivery (an ack lost in the failover) is seen once.
                if delivered.insert(seq) {
                    let event = v1::Event::decode(msg.payload.clone()).ok();
                    sequences.lock().unwrap().push((seq, event.clone()));
                    if let Some(event) = event
                        && tx.send(event).is_err()
                    {
                        return;
                    }
                }
                let _ = msg.ack().await;
            }
        }
    });
    (rx, seen)
}

/// The next event of type `ty`, skipping others.
async fn next(events: &mut mpsc::UnboundedReceiver<v1::Event>, ty: EventType) -> v1::Event {
    let want = ty.to_string();
    tokio::time::timeout(DEADLINE, async {
        while let Some(e) = events.recv().await {
            if e.r#type == want {
                return e;
            }
        }
        panic!("the events ended before {want}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {want} within {DEADLINE:?}"))
}

/// Makes server `to` the leader of `stream` (a leader stepdown with a
/// preferred successor) and waits until the stream says so.
async fn lead(hub: &NatsCluster, js: &jetstream::Context, stream: &str, to: usize) {
    let name = hub.name(to).to_string();
    poll_until(DEADLINE, &format!("{name} leading {stream}"), || async {
        let info = js.get_stream(stream).await.ok()?.info().await.ok()?.clone();
        let leader = info.cluster.and_then(|c| c.leader).unwrap_or_default();
        if leader == name {
            return Some(());
        }
        let body = serde_json::json!({"placement": {"preferred": name}});
        let _ = js
            .request::<_, _, serde_json::Value>(format!("STREAM.LEADER.STEPDOWN.{stream}"), &body)
            .await;
        None
    })
    .await;
}

/// The last record under every key of `bucket`, read from the bucket's
/// stream leader (not a direct get, which any replica may answer): by key,
/// its stream sequence and bytes. Read again until every request is
/// answered: right after a leader moves, the first requests can time out.
async fn leader_records(
    js: &jetstream::Context,
    bucket: &str,
) -> BTreeMap<String, (u64, bytes::Bytes)> {
    poll_until(DEADLINE, &format!("the records of {bucket}"), || async {
        let kv = js.get_key_value(bucket).await.ok()?;
        // A key the listing failed on fails the whole reading.
        let keys: Vec<Result<String, _>> = kv.keys().await.ok()?.collect().await;
        let keys: Vec<String> = keys.into_iter().collect::<Result<_, _>>().ok()?;
        let stream = js.get_stream(format!("KV_{bucket}")).await.ok()?;
        let mut out = BTreeMap::new();
        for key in keys {
            let m = stream
                .get_last_raw_message_by_subject(&format!("$KV.{bucket}.{key}"))
                .await
                .ok()?;
            out.insert(key, (m.sequence, m.payload));
        }
        Some(out)
    })
    .await
}

/// Every server's copy of every stream, once all of them hold the same
/// messages (first and last sequence, count, bytes): a server that was
/// away has caught up.
async fn identical_copies(hub: &NatsCluster, streams: &[String]) -> BTreeMap<String, StreamCopy> {
    poll_until(DEADLINE, "every server holding the same copy", || async {
        let mut first: Option<BTreeMap<String, StreamCopy>> = None;
        for i in 0..hub.len() {
            let copies = hub.stream_copies(i).await.ok()?;
            let same_shape = streams.iter().all(|s| copies.contains_key(s));
            let content = |c: &BTreeMap<String, StreamCopy>| -> Vec<(u64, u64, u64, u64)> {
                streams
                    .iter()
                    .map(|s| {
                        let x = &c[s];
                        (x.first_seq, x.last_seq, x.messages, x.bytes)
                    })
                    .collect()
            };
            if !same_shape {
                return None;
            }
            match &first {
                None => first = Some(copies),
                Some(f) if content(f) == content(&copies) => {}
                Some(_) => return None,
            }
        }
        first
    })
    .await
}

#[tokio::test]
async fn a_staged_rollout_completes_while_the_leading_hub_server_is_killed() {
    let started = Instant::now();
    let mut hub = NatsCluster::start(HUB).await.unwrap();
    let config = hub.bus_config().unwrap();
    assert_eq!(config.topology.events.replicas, HUB);
    let bus = Bus::connect(&config, "test", &CancellationToken::new())
        .await
        .unwrap();
    let report = flotilla_kit::provision(&bus).await.unwrap();
    assert!(report.drifted.is_empty(), "{report:?}");

    // Every stream, bucket and object store has a copy on each server.
    let streams = all_streams(&bus.topology);
    assert_eq!(streams.len(), 12, "{streams:?}");
    for name in &streams {
        let mut s = bus.jetstream.get_stream(name).await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, HUB, "{name}");
        let cluster = info.cluster.clone().unwrap();
        assert!(cluster.leader.is_some(), "{name}: {cluster:?}");
        assert_eq!(cluster.replicas.len(), HUB - 1, "{name}: {cluster:?}");
    }
    let copies = identical_copies(&hub, &streams).await;
    assert_eq!(copies.len(), streams.len(), "{copies:?}");

    let (mut events, seen) = follow_events(&bus);
    // Longer than a failover, so no cluster is declared unhealthy while
    // JetStream elects new leaders.
    fleet::inventory(&config, Duration::from_secs(30));
    fleet::placement(&config);
    fleet::model_provisioner(&config);
    fleet::rollout(&config, 2);
    let caches = tempfile::tempdir().unwrap();
    let urls = hub.urls();
    for (cluster, stage) in [("a", "stage=canary"), ("b", "stage=main")] {
        executor(&urls, cluster, &[stage], caches.path(), &[]);
    }
    for _ in 0..2 {
        next(&mut events, EventType::ClusterJoined).await;
    }

    // The first version: no stages to protect.
    apply(&bus, STAGED).await;
    next(&mut events, EventType::RolloutCompleted).await;
    let v1_templates: BTreeSet<String> = replicas(&bus)
        .await
        .iter()
        .map(|r| template(r).to_string())
        .collect();
    assert_eq!(v1_templates.len(), 1, "{v1_templates:?}");

    // The hard case: the server to be killed leads JetStream's metadata
    // and the streams the rollout works through.
    let victim = hub.meta_leader().await.unwrap();
    let led = [
        bus.topology.events.name.clone(),
        bus.topology.commands.name.clone(),
        format!("KV_{}", bus.topology.rollouts.name),
        format!("KV_{}", bus.topology.replicas.name),
        format!("KV_{}", bus.topology.handled.name),
    ];
    for stream in &led {
        lead(&hub, &bus.jetstream, stream, victim).await;
    }

    let v2 = STAGED.replace(
        "  replicas: 2\n",
        "  replicas: 2\n  resources: {gpu: {count: 1, minMemoryGiB: 1}}\n",
    );
    apply(&bus, &v2).await;
    let stage = next(&mut events, EventType::RolloutStageStarted).await;
    assert!(stage.message.contains("canary"), "{}", stage.message);
    // The canary's new replica is ready: the stage is about to complete
    // and the next to start.
    let canary = next(&mut events, EventType::ReplicaReady).await;
    let killed_at = flotilla_kit::now_unix_ms();
    hub.kill(victim).await.unwrap();
    let killed = Instant::now();
    eprintln!(
        "killed {} (JetStream meta leader, leading {led:?}) after {:?}, once {} was ready",
        hub.name(victim),
        started.elapsed(),
        canary.name
    );

    let done = next(&mut events, EventType::RolloutCompleted).await;
    eprintln!("rollout completed {:?} after the kill", killed.elapsed());
    assert!(done.time_unix_ms >= killed_at, "{done:?}");
    let after = support::replicas_settled(&bus, DEADLINE).await;
    let live: Vec<&ReplicaStatus> = after
        .iter()
        .filter(|r| r.phase() != ReplicaPhase::Stopped)
        .collect();
    assert_eq!(live.len(), 2, "{after:?}");
    assert!(
        live.iter().all(|r| r.phase() == ReplicaPhase::Ready
            && !v1_templates.contains(template(r))
            && template(r) == template(live[0])),
        "{after:?}"
    );
    // No service was restarted: they reconnected by themselves. Both
    // executors still report through the remaining servers.
    for cluster in ["a", "b"] {
        poll_until(
            DEADLINE,
            &format!("{cluster} seen after the kill"),
            || async {
                let record: v1::ClusterRecord =
                    support::record(&bus, &bus.topology.clusters.name, cluster).await;
                (record.last_seen_unix_ms > killed_at).then_some(())
            },
        )
        .await;
    }

    // What the rollout wrote, as the surviving leaders hold it.
    let buckets = [
        bus.topology.rollouts.name.clone(),
        bus.topology.deployments.name.clone(),
        bus.topology.placements.name.clone(),
    ];
    let mut written = BTreeMap::new();
    for bucket in &buckets {
        written.insert(bucket.clone(), leader_records(&bus.jetstream, bucket).await);
    }
    assert!(written[&bus.topology.rollouts.name].contains_key("chat"));

    // The killed server comes back on its store and catches up.
    hub.restart(victim).await.unwrap();
    let copies = identical_copies(&hub, &streams).await;

    // Every stored event was seen, with no gap in the sequence.
    let events_last = copies[&bus.topology.events.name].last_seq;
    let seen = poll_until(DEADLINE, "every stored event delivered", || async {
        let s = seen.lock().unwrap().clone();
        s.iter().any(|(seq, _)| *seq >= events_last).then_some(s)
    })
    .await;
    let sequences: BTreeSet<u64> = seen.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        sequences,
        (1..=events_last).collect::<BTreeSet<u64>>(),
        "a gap in the events"
    );
    let story: Vec<v1::Event> = seen.into_iter().filter_map(|(_, e)| e).collect();
    assert_eq!(
        story.len() as u64,
        events_last,
        "an event that does not decode"
    );
    // Every command stored was acknowledged by its executor (the work
    // queue keeps what is not), on every copy, and the executors' record
    // of what they finished names only stored commands. (A record written
    // while the stream's leader is being replaced may fail; the consumer
    // loop then only warns, so the record is not checked for completeness.)
    let commands = &bus.topology.commands.name;
    let commands_last = copies[commands].last_seq;
    assert!(commands_last >= 4, "{:?}", copies[commands]);
    assert_eq!(copies[commands].messages, 0, "a command not consumed");
    let handled = bus
        .jetstream
        .get_key_value(&bus.topology.handled.name)
        .await
        .unwrap();
    let handled: Vec<u64> = handled
        .keys()
        .await
        .unwrap()
        .filter_map(|k| async move {
            let k = k.ok()?;
            let rest = k.strip_prefix(&format!("{commands}."))?;
            rest.rsplit('.').next()?.parse::<u64>().ok()
        })
        .collect()
        .await;
    assert!(
        handled.iter().all(|s| (1..=commands_last).contains(s)),
        "{handled:?}"
    );
    // Nothing was done twice: each replica started once.
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &story {
        if e.r#type == EventType::ReplicaStarting.to_string() {
            *starts.entry(e.name.clone()).or_default() += 1;
        }
    }
    assert_eq!(starts.len(), 4, "{starts:?}");
    assert!(starts.values().all(|n| *n == 1), "{starts:?}");

    // The restarted server's own copy of the rollout's records, read with
    // it as the leader, is what the others held.
    for bucket in &buckets {
        lead(&hub, &bus.jetstream, &format!("KV_{bucket}"), victim).await;
        assert_eq!(
            leader_records(&bus.jetstream, bucket).await,
            written[bucket],
            "{bucket} on {}",
            hub.name(victim)
        );
    }
    eprintln!("the whole test took {:?}", started.elapsed());
}

fn template(r: &ReplicaStatus) -> &str {
    flotilla_rollout::plan::template_of(&r.replica_id).unwrap()
}

/// The fleet's users with readable passwords, for a hub of `HUB` servers.
fn fleet_users(clusters: &[&str]) -> FleetUsers {
    let subjects = Subjects::default();
    let topology = Topology::new(&subjects, HUB);
    let clusters: Vec<String> = clusters.iter().map(|c| c.to_string()).collect();
    let users = fleet_roles(&clusters)
        .unwrap()
        .into_iter()
        .map(User::generated)
        .collect();
    FleetUsers {
        subjects,
        topology,
        users,
    }
}

fn password(fleet: &FleetUsers, role: &Role) -> String {
    fleet
        .users
        .iter()
        .find(|u| u.role == *role)
        .unwrap()
        .password
        .clone()
}

fn user_config(hub: &NatsCluster, fleet: &FleetUsers, role: &Role) -> BusConfig {
    BusArgs {
        nats_url: hub.urls(),
        nats_user: Some(role.user()),
        nats_password: Some(password(fleet, role)),
        stream_replicas: HUB,
        ..Default::default()
    }
    .validate()
    .unwrap()
}

#[tokio::test]
async fn a_member_leaf_node_is_confined_to_its_executor() {
    let fleet = fleet_users(&["a", "b"]);
    let hub = NatsCluster::start_authorized(HUB, fleet.clone())
        .await
        .unwrap();
    let admin = Bus::connect(
        &user_config(&hub, &fleet, &Role::Admin),
        "test",
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    flotilla_kit::provision(&admin).await.unwrap();
    let mut events = admin
        .client
        .subscribe(format!("{}.events.>", admin.subjects.prefix()))
        .await
        .unwrap();

    let executor_a = Role::executor("a").unwrap();
    let leaf = LeafNode::start(
        hub.leaf_config("a", &password(&fleet, &executor_a))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(leaf.inbox_prefix(), "_INBOX.executor-a");

    // A local client: no credentials, the executor's inboxes.
    let local = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(leaf.inbox_prefix())
        .connect(leaf.url().as_str())
        .await
        .unwrap();
    let js = jetstream::new(local);
    let own = admin.subjects.telemetry("a").unwrap();
    let other = admin.subjects.telemetry("b").unwrap();
    js.publish(own.clone(), "a".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Another cluster's subject does not cross the leaf: no stream
    // answers, and nothing is stored.
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        js.publish(other.clone(), "b".into()).await?.await
    })
    .await;
    assert!(!matches!(refused, Ok(Ok(_))), "{refused:?}");
    let telemetry = admin
        .jetstream
        .get_stream(&admin.topology.telemetry.name)
        .await
        .unwrap();
    assert!(
        telemetry
            .get_last_raw_message_by_subject(&own)
            .await
            .is_ok()
    );
    assert!(
        telemetry
            .get_last_raw_message_by_subject(&other)
            .await
            .is_err()
    );
    // Not a heartbeat: gone before inventory starts.
    telemetry.purge().filter(&own).await.unwrap();
    // Nor may it read another cluster's commands.
    let commands = js.get_stream(&admin.topology.commands.name).await.unwrap();
    let [_, prefetch_b] = flotilla_nats_auth::executor_consumers("b");
    let stolen = tokio::time::timeout(
        Duration::from_secs(2),
        commands.create_consumer(pull::Config {
            durable_name: Some(prefetch_b),
            filter_subject: admin
                .subjects
                .command("b", flotilla_proto::CommandAction::Prefetch)
                .unwrap(),
            ..Default::default()
        }),
    )
    .await;
    assert!(!matches!(stolen, Ok(Ok(_))), "another cluster's consumer");

    // A local client with the default inboxes gets no answers.
    let wrong_inbox = jetstream::new(async_nats::connect(leaf.url()).await.unwrap());
    let answer = tokio::time::timeout(Duration::from_secs(2), wrong_inbox.query_account()).await;
    assert!(!matches!(answer, Ok(Ok(_))), "{answer:?}");

    // The member's executor works through its leaf: inventory (on the hub,
    // with its own user) sees it join.
    fleet::inventory(
        &user_config(&hub, &fleet, &Role::Inventory),
        Duration::from_secs(30),
    );
    let caches = tempfile::tempdir().unwrap();
    let inbox = leaf.inbox_prefix();
    executor(
        &leaf.url(),
        "a",
        &[],
        caches.path(),
        &["--nats-inbox-prefix", &inbox],
    );
    let joined =
        support::wait_for_event(&mut events, EventType::ClusterJoined, Some("a"), DEADLINE).await;
    assert_eq!(joined.name, "a");
}
