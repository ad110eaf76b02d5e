//! The executor's replica half with the local backend: a start command
//! brings up a real runner on the shipped model; a stale generation is
//! ignored; a stop command stops it.

use std::time::Duration;

use flotilla_integration::fleet;
use flotilla_kit::RecordStore;
use flotilla_proto::v1::{
    self, ReplicaPhase, ReplicaStatus, event::Payload, executor_command::Action,
};
use flotilla_proto::{CommandAction, EventType};

use crate::support::{self, next_event, push, shipped_model};

const DEADLINE: Duration = Duration::from_secs(120);

/// The next `ty` about `name`; a failed replica or a dead letter on the way
/// fails the test at once, with its message.
async fn expect(sub: &mut async_nats::Subscriber, ty: EventType, name: &str) -> v1::Event {
    let want = ty.to_string();
    let fatal = [EventType::ReplicaFailed, EventType::BusDeadLettered].map(|t| t.to_string());
    next_event(sub, DEADLINE, |event| {
        if fatal.contains(&event.r#type) {
            panic!("{}: {}", event.r#type, event.message);
        }
        event.r#type == want && event.name == name
    })
    .await
    .unwrap_or_else(|| panic!("no {want} for {name} within {DEADLINE:?}"))
}

fn command(generation: u64, action: Action) -> v1::ExecutorCommand {
    support::command("eu-1", generation, "", action)
}

fn start(replica: &str) -> Action {
    support::start_replica(replica, v1::Runtime::Candle)
}

/// The next heartbeat of eu-1 in which `wanted` holds.
async fn heartbeat_where(
    sub: &mut async_nats::Subscriber,
    what: &str,
    mut wanted: impl FnMut(&v1::ClusterHeartbeat) -> bool,
) -> v1::ClusterHeartbeat {
    use futures::StreamExt;
    use prost::Message;
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(msg) = sub.next().await {
            if let Ok(hb) = v1::ClusterHeartbeat::decode(msg.payload)
                && wanted(&hb)
            {
                return Some(hb);
            }
        }
        None
    })
    .await;
    found
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no heartbeat with {what} within {DEADLINE:?}"))
}

fn allocated(hb: &v1::ClusterHeartbeat) -> usize {
    hb.inventory
        .as_ref()
        .map_or(0, |i| i.gpus.iter().filter(|g| g.allocated).count())
}

#[tokio::test]
async fn a_start_command_serves_the_model_and_a_stop_command_ends_it() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::model_provisioner(&support::config(&server));
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(
        &server,
        "eu-1",
        "1xH100-80GB",
        &["region=eu-west-1"],
        0.0,
        caches.path(),
    );
    push(&bus, &shipped_model(), "smollm2", None).await;
    let mut heartbeats = bus
        .client
        .subscribe(bus.subjects.telemetry("eu-1").unwrap())
        .await
        .unwrap();

    let subject = |action| bus.subjects.command("eu-1", action).unwrap();
    // One GPU a replica, as a deployment's resources say.
    let Action::Start(mut one_gpu) = start("chat-g2-0") else {
        unreachable!()
    };
    one_gpu.gpu = Some(v1::GpuRequirements {
        count: 1,
        ..Default::default()
    });
    bus.publish(
        subject(CommandAction::Start),
        &command(2, Action::Start(one_gpu)),
        None,
    )
    .await
    .unwrap();
    expect(&mut events, EventType::ReplicaStarting, "chat-g2-0").await;
    let ready = expect(&mut events, EventType::ReplicaReady, "chat-g2-0").await;
    let Some(Payload::Replica(status)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(status.phase(), ReplicaPhase::Ready);
    assert_eq!(status.region, "eu-west-1");
    assert_eq!(status.generation, 2);

    // It serves the model.
    let answer = support::chat(&status.endpoint, "smollm2", "Say hi.", 8).await;
    assert!(!support::text(&answer).is_empty(), "{answer}");
    // Its GPU is taken: `flotilla get clusters` shows 0/1 free.
    let hb = heartbeat_where(&mut heartbeats, "the replica's GPU held", |hb| {
        allocated(hb) == 1
            && hb
                .replicas
                .iter()
                .any(|r| r.replica_id == "chat-g2-0" && r.gpus == 1)
    })
    .await;
    assert_eq!(hb.inventory.unwrap().gpus.len(), 1);

    // A start from an older placement generation is ignored...
    bus.publish(
        subject(CommandAction::Start),
        &command(1, start("chat-g1-0")),
        None,
    )
    .await
    .unwrap();
    // ...which shows once the stop published after it is done.
    bus.publish(
        subject(CommandAction::Stop),
        &command(2, support::stop_replica("chat-g2-0", "scaled down")),
        None,
    )
    .await
    .unwrap();
    expect(&mut events, EventType::ReplicaStopped, "chat-g2-0").await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    assert!(
        replicas.get("eu-1.chat-g1-0").await.unwrap().is_none(),
        "a fenced start ran"
    );
    let stopped = replicas.get("eu-1.chat-g2-0").await.unwrap().unwrap().0;
    assert_eq!(stopped.phase(), ReplicaPhase::Stopped);
    assert_eq!(stopped.message, "scaled down");
    let gone = reqwest::Client::new()
        .get(format!("{}/health", status.endpoint))
        .send()
        .await;
    assert!(gone.is_err(), "the runner still answers after stop");
    heartbeat_where(&mut heartbeats, "the GPU free again", |hb| {
        allocated(hb) == 0 && hb.replicas.is_empty()
    })
    .await;
}

/// A start that fails is tried again by a new start command naming the
/// failed record it replaces (what the rollout sends the moment the
/// failure is recorded, often while the first start has not let go yet);
/// it is not taken for the first one delivered again. A start that
/// names another life than the one recorded (a redelivery after its
/// replica ended, as when a server lost its acknowledgement) starts
/// nothing.
#[tokio::test]
async fn a_retry_of_a_failed_start_starts_it_again_and_a_stale_start_does_not() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::model_provisioner(&support::config(&server));
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(&server, "eu-1", "1xH100-80GB", &[], 0.0, caches.path());
    // Weights no runner can load: every start of them fails.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&[0xff; 4096]);
    std::fs::write(&broken, bytes).unwrap();
    push(&bus, &broken, "broken", Some("gguf")).await;

    let Action::Start(mut first) = start("chat-g1-0") else {
        unreachable!()
    };
    first.model = Some(v1::ModelRef {
        name: "broken".into(),
        ..Default::default()
    });
    let subject = bus.subjects.command("eu-1", CommandAction::Start).unwrap();
    let wanted = [EventType::ReplicaStarting, EventType::ReplicaFailed].map(|t| t.to_string());
    // Each attempt: its starting, then its failure, both carrying its
    // command id; the failed record's time is what the next one replaces.
    let mut replaces = 0;
    let mut sent = Vec::new();
    for attempt in ["-a", "-b", "-c"] {
        let mut start = first.clone();
        start.replaces_updated_at_unix_ms = replaces;
        sent.push((attempt, replaces));
        let c = support::command("eu-1", 1, attempt, Action::Start(start));
        bus.publish(subject.clone(), &c, None).await.unwrap();
        for ty in &wanted {
            let event = next_event(&mut events, DEADLINE, |e| {
                e.name == "chat-g1-0" && wanted.contains(&e.r#type)
            })
            .await
            .unwrap_or_else(|| panic!("no {ty} of start {attempt} within {DEADLINE:?}"));
            assert_eq!(
                (&event.r#type, &event.correlation_id),
                (ty, &c.command_id),
                "each attempt starts once and fails once, in turn"
            );
            if let Some(Payload::Replica(status)) = event.payload {
                replaces = status.updated_at_unix_ms;
            }
        }
    }

    // The first two again, as redeliveries after their replica's life
    // ended: neither starts it.
    for &(attempt, replaces) in &sent[..2] {
        let mut start = first.clone();
        start.replaces_updated_at_unix_ms = replaces;
        let c = support::command("eu-1", 1, attempt, Action::Start(start));
        bus.publish(subject.clone(), &c, None).await.unwrap();
    }
    let stream = bus
        .jetstream
        .get_stream(&bus.topology.commands.name)
        .await
        .unwrap();
    support::poll_until(DEADLINE, "the stale starts acknowledged", || async {
        let info = stream
            .consumer_info("executor-eu-1-replicas")
            .await
            .unwrap();
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    let (record, _) = replicas.get("eu-1.chat-g1-0").await.unwrap().unwrap();
    assert_eq!(
        (record.phase(), record.updated_at_unix_ms),
        (ReplicaPhase::Failed, replaces),
        "a stale start changed the record"
    );
    if let Some(event) = next_event(&mut events, Duration::ZERO, |e| e.name == "chat-g1-0").await {
        panic!(
            "a stale start did something: {} {}",
            event.r#type, event.message
        );
    }
}
