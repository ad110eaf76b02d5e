//! Rollouts on a real nats-server with real executors and runners: a
//! staged rollout over three clusters that waits for an approval and
//! survives a `kill -9` of the rollout service; a version that never
//! becomes ready halts, and undo returns to the previous one.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::Bus;
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus, RolloutPhase, RolloutState};
use tokio_util::sync::CancellationToken;

use crate::support::{self, apply, push, replicas, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);

/// The rollout service as its own process, so it can be killed.
fn rollout_process(server: &NatsServer) -> tokio::process::Child {
    tokio::process::Command::new(fleet::target_bin("flotilla-rollout"))
        .args(["--nats-url", &server.url(), "--http-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn next(sub: &mut async_nats::Subscriber, ty: EventType) -> v1::Event {
    wait_for_event(sub, ty, Some("chat"), DEADLINE).await
}

async fn rollout_state(bus: &Bus) -> RolloutState {
    support::record(bus, &bus.topology.rollouts.name, "chat").await
}

/// The replicas that run or are on their way to running.
fn not_stopped(all: &[ReplicaStatus]) -> Vec<&ReplicaStatus> {
    all.iter()
        .filter(|r| r.phase() != ReplicaPhase::Stopped)
        .collect()
}

fn template(r: &ReplicaStatus) -> &str {
    flotilla_rollout::plan::template_of(&r.replica_id).unwrap()
}

/// Every stored event as `flotilla watch --since 1h --no-follow -o json` prints it.
async fn story(bus: &Bus) -> Vec<serde_json::Value> {
    let args = flotilla_cli::watch::WatchArgs {
        since: Some("1h".into()),
        kind: None,
        name: None,
        no_follow: true,
        output: flotilla_cli::Output::Json,
    };
    let mut out = Vec::new();
    flotilla_cli::watch::watch(bus, &args, &mut out, CancellationToken::new())
        .await
        .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const STAGED: &str = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 3
  placement: {policy: PickN, numberOfClusters: 3}
  rollout:
    strategy: Staged
    maxSurge: "1"
    stages:
      - name: canary
        clusterSelector: {matchLabels: {stage: canary}}
        afterStage: {approval: true}
      - name: main
        clusterSelector: {matchLabels: {stage: main}}
"#;

#[tokio::test]
async fn a_staged_rollout_waits_for_approval_and_survives_a_killed_rollout_service() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(3));
    let mut rollout = rollout_process(&server);
    let caches = tempfile::tempdir().unwrap();
    for (cluster, stage) in [
        ("a", "stage=canary"),
        ("b", "stage=main"),
        ("c", "stage=main"),
    ] {
        fleet::executor(
            &server,
            cluster,
            "2xH100-80GB",
            &[stage],
            1.0,
            caches.path(),
        );
    }
    for _ in 0..3 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }

    // The first version: nothing to protect, no gates.
    apply(&bus, STAGED).await;
    next(&mut events, EventType::RolloutCompleted).await;
    let v1: Vec<ReplicaStatus> = replicas(&bus).await;
    assert_eq!(v1.len(), 3, "{v1:?}");
    assert!(v1.iter().all(|r| r.phase() == ReplicaPhase::Ready));
    let old_template = template(&v1[0]).to_string();

    // A new version: the canary stage first.
    let v2_doc = STAGED.replace(
        "  replicas: 3\n",
        "  replicas: 3\n  resources: {gpu: {count: 1, minMemoryGiB: 1}}\n",
    );
    apply(&bus, &v2_doc).await;
    let started = next(&mut events, EventType::RolloutStageStarted).await;
    assert!(started.message.contains("canary"), "{}", started.message);

    // The rollout service dies mid-stage and comes back.
    rollout.kill().await.unwrap();
    rollout.wait().await.unwrap();
    let mut rollout = rollout_process(&server);

    let waiting = next(&mut events, EventType::RolloutAwaitingApproval).await;
    assert!(waiting.message.contains("main"), "{}", waiting.message);
    let state = rollout_state(&bus).await;
    assert_eq!(state.phase(), RolloutPhase::AwaitingApproval);
    let now = replicas(&bus).await;
    let serving: Vec<&ReplicaStatus> = now
        .iter()
        .filter(|r| r.phase() == ReplicaPhase::Ready)
        .collect();
    assert_eq!(serving.len(), 3, "{now:?}");
    for r in &serving {
        let expected = if r.cluster == "a" {
            state.template.as_str()
        } else {
            old_template.as_str()
        };
        assert_eq!(template(r), expected, "{r:?}");
    }

    let mut said = Vec::new();
    flotilla_cli::rollouts::approve(&bus, "chat", None, &mut said)
        .await
        .unwrap();
    assert!(String::from_utf8(said).unwrap().contains("canary"));
    // `flotilla rollout status --watch` follows it to the end.
    let mut followed = Vec::new();
    let phase = tokio::time::timeout(
        DEADLINE,
        flotilla_cli::rollouts::follow(&bus, "chat", &mut followed, CancellationToken::new()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(phase, RolloutPhase::Complete);
    let followed = String::from_utf8(followed).unwrap();
    assert!(
        followed.lines().last().unwrap().starts_with("Complete"),
        "{followed}"
    );

    let after = support::replicas_settled(&bus, DEADLINE).await;
    let serving = not_stopped(&after);
    assert_eq!(serving.len(), 3, "no duplicate, no orphan: {after:?}");
    assert!(
        serving
            .iter()
            .all(|r| r.phase() == ReplicaPhase::Ready && template(r) == state.template)
    );
    let mut status = Vec::new();
    flotilla_cli::rollouts::status(&bus, "chat", flotilla_cli::Output::Table, None, &mut status)
        .await
        .unwrap();
    let status = String::from_utf8(status).unwrap();
    assert!(status.contains("Complete"), "{status}");

    // `flotilla watch` tells it in order, each step once.
    let events = story(&bus).await;
    let of_v2: Vec<String> = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap_or("").starts_with("rollout."))
        .filter(|e| e["generation"].as_u64() == Some(state.deployment_generation))
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        of_v2,
        [
            "rollout.started",
            "rollout.stage_started",
            "rollout.stage_completed",
            "rollout.awaiting_approval",
            "rollout.approved",
            "rollout.stage_started",
            "rollout.stage_completed",
            "rollout.completed",
        ],
        "{events:#?}"
    );
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &events {
        if e["type"] == "replica.starting" {
            *starts
                .entry(e["name"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    for r in &serving {
        assert_eq!(starts.get(&r.replica_id), Some(&1), "{starts:?}");
    }
    rollout.kill().await.unwrap();
}

#[tokio::test]
async fn a_version_that_never_gets_ready_halts_and_undo_restores_the_previous() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(3));
    fleet::rollout(&support::config(&server), 2);
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(&server, "a", "2xH100-80GB", &[], 1.0, caches.path());
    wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;

    let v1_doc = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 1
"#;
    apply(&bus, v1_doc).await;
    next(&mut events, EventType::RolloutCompleted).await;
    let v1 = replicas(&bus).await;
    assert_eq!(v1.len(), 1);
    let first = v1[0].clone();

    // Weights no runner can load: a GGUF header and nothing sensible.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.gguf");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&[0xff; 4096]);
    std::fs::write(&broken, bytes).unwrap();
    let digest = push(&bus, &broken, "broken", Some("gguf")).await;
    let v2_doc = format!(
        r#"
metadata: {{name: chat}}
spec:
  model: {{artifact: {{name: broken, digest: "{digest}", format: gguf}}}}
  replicas: 1
"#
    );
    apply(&bus, &v2_doc).await;
    let halted = next(&mut events, EventType::RolloutHalted).await;
    assert!(
        halted.message.contains("2 replica failures"),
        "{}",
        halted.message
    );

    // The old replica kept serving throughout.
    let now = replicas(&bus).await;
    let old = now
        .iter()
        .find(|r| r.replica_id == first.replica_id)
        .unwrap();
    assert_eq!(old.phase(), ReplicaPhase::Ready, "{now:?}");

    let mut said = Vec::new();
    flotilla_cli::rollouts::undo(&bus, "chat", &mut said)
        .await
        .unwrap();
    next(&mut events, EventType::RolloutCompleted).await;
    let after = replicas(&bus).await;
    let live = not_stopped(&after);
    assert_eq!(live.len(), 1, "{after:?}");
    // The same replica, never restarted: undo found it still wanted.
    assert_eq!(live[0].replica_id, first.replica_id);
    assert_eq!(live[0].endpoint, first.endpoint);
    assert_eq!(live[0].phase(), ReplicaPhase::Ready);
    let deployment: v1::ModelDeployment =
        support::record(&bus, &bus.topology.deployments.name, "chat").await;
    let model = deployment.spec.unwrap().model.unwrap();
    assert_eq!(model.preset, "smollm2-135m-instruct");
    assert!(model.artifact.is_none());

    // Deleted and applied again under the same name: a new deployment at
    // generation 1, and the executor serves it (not fenced off by the
    // generations it saw before).
    flotilla_cli::deployments::delete(&bus, "chat", &mut Vec::new())
        .await
        .unwrap();
    wait_for_event(
        &mut events,
        EventType::ReplicaStopped,
        Some(&first.replica_id),
        DEADLINE,
    )
    .await;
    apply(&bus, v1_doc).await;
    // Told anew, though the first life's events with the same generations
    // are still within the stream's dedup window.
    let accepted = next(&mut events, EventType::DeploymentAccepted).await;
    assert_eq!(accepted.generation, 1, "{accepted:?}");
    let started = next(&mut events, EventType::RolloutStarted).await;
    assert_eq!(started.generation, 1, "{started:?}");
    let again = wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    next(&mut events, EventType::RolloutCompleted).await;
    // The first decision may find the deleted replicas' GPUs still held
    // (the executor's next heartbeat frees them): the replica serves the
    // decision that placed it.
    let placement: v1::PlacementDecision =
        support::record(&bus, &bus.topology.placements.name, "chat").await;
    assert_eq!(placement.deployment_generation, 1, "{placement:?}");
    assert_eq!(again.generation, placement.generation, "{again:?}");
    // A new history: nothing of the first life to undo to.
    let state = rollout_state(&bus).await;
    assert_eq!(
        (state.deployment_generation, state.previous_generation),
        (1, 0),
        "{state:?}"
    );
}
