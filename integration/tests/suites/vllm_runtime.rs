//! `runtime: vllm` on the local backend, on a machine without vLLM or a GPU.
//!
//! - Without a `vllm` executable the replica fails, and the event and the
//!   KV record say why.
//! - With one, the executor runs `vllm serve MODEL --served-model-name NAME
//!   --host 127.0.0.1 --port P` and reads its `/health`. The `vllm` here is
//!   a stand-in script that checks that command line and runs the candle
//!   runner in its place (same OpenAI paths), so the shared replica client
//!   is exercised for real on `/health`, `/v1/models` and `/metrics`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_executor::replica_client::{ReplicaClient, metric_sum};
use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::RecordStore;
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus, event::Payload};
use flotilla_proto::{CommandAction, EventType};
use tokio_util::sync::CancellationToken;

use crate::support::{self, push, shipped_model, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);

/// A `vllm` that accepts only `vllm serve MODEL --served-model-name NAME
/// --host HOST --port PORT` and serves with the candle runner.
fn vllm_stand_in(dir: &Path, runner: &Path) -> PathBuf {
    let script = dir.join("vllm");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
[ "$1" = serve ] || {{ echo "expected vllm serve, got: $*" >&2; exit 2; }}
model=$2; shift 2
while [ $# -gt 0 ]; do
  case $1 in
    --served-model-name) name=$2 ;;
    --host) host=$2 ;;
    --port) port=$2 ;;
    *) echo "unexpected argument $1" >&2; exit 2 ;;
  esac
  shift 2
done
exec "{runner}" --model "$model" --served-model-name "$name" --addr "$host:$port"
"#,
            runner = runner.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A cluster of one H100 whose executor runs `vllm` replicas with `vllm`.
fn executor(
    server: &NatsServer,
    cluster: &str,
    caches: &Path,
    vllm: PathBuf,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let args = flotilla_executor::ExecutorArgs {
        vllm_bin: Some(vllm),
        ..fleet::executor_args(&server.url(), cluster, "1xH100-80GB", &[], 0.0, caches)
    };
    fleet::start_executor(args, stop)
}

fn start_vllm(cluster: &str, replica: &str) -> v1::ExecutorCommand {
    support::command(
        cluster,
        1,
        "",
        support::start_replica(replica, v1::Runtime::Vllm),
    )
}

#[tokio::test]
async fn vllm_replicas_fail_clearly_without_vllm_and_serve_through_vllm_serve_with_it() {
    let (server, bus, mut events) = support::bus_with_events().await;
    fleet::model_provisioner(&support::config(&server));
    push(&bus, &shipped_model(), "smollm2", None).await;
    let work = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let missing = work.path().join("no-such-dir/vllm");
    let without = executor(&server, "eu-1", work.path(), missing.clone(), stop.clone());
    let with = executor(
        &server,
        "eu-2",
        work.path(),
        vllm_stand_in(work.path(), &fleet::target_bin("flotilla-runner")),
        stop.clone(),
    );
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();

    // No vllm: failed, with the reason in the event and in KV.
    bus.publish(
        bus.subjects.command("eu-1", CommandAction::Start).unwrap(),
        &start_vllm("eu-1", "chat-g1-0"),
        None,
    )
    .await
    .unwrap();
    let failed = wait_for_event(
        &mut events,
        EventType::ReplicaFailed,
        Some("chat-g1-0"),
        DEADLINE,
    )
    .await;
    assert!(failed.message.contains("vllm"), "{}", failed.message);
    assert!(
        failed.message.contains(&missing.display().to_string()),
        "{}",
        failed.message
    );
    let record = replicas.get("eu-1.chat-g1-0").await.unwrap().unwrap().0;
    assert_eq!(record.phase(), ReplicaPhase::Failed);
    assert!(record.message.contains("--vllm-bin"), "{}", record.message);

    // With vllm: `vllm serve` runs and serves; the shared client reads it.
    bus.publish(
        bus.subjects.command("eu-2", CommandAction::Start).unwrap(),
        &start_vllm("eu-2", "chat-g1-1"),
        None,
    )
    .await
    .unwrap();
    let ready = wait_for_event(
        &mut events,
        EventType::ReplicaReady,
        Some("chat-g1-1"),
        DEADLINE,
    )
    .await;
    let Some(Payload::Replica(status)) = ready.payload else {
        panic!("no status in {ready:?}")
    };
    assert_eq!(status.runtime(), v1::Runtime::Vllm);
    let client = ReplicaClient::default();
    client.health(&status.endpoint).await.unwrap();
    assert_eq!(client.models(&status.endpoint).await.unwrap(), ["smollm2"]);
    let answer = support::chat(&status.endpoint, "smollm2", "Hi", 4).await;
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    let metrics = client.metrics(&status.endpoint).await.unwrap();
    assert!(
        metric_sum(&metrics, "flotilla_runner_requests").unwrap_or(0.0) >= 1.0,
        "{metrics}"
    );

    // A wrong path is an error, not a panic or an empty list.
    assert!(client.models("http://127.0.0.1:1").await.is_err());

    bus.publish(
        bus.subjects.command("eu-2", CommandAction::Stop).unwrap(),
        &support::command(
            "eu-2",
            1,
            "-stop",
            support::stop_replica("chat-g1-1", "test over"),
        ),
        None,
    )
    .await
    .unwrap();
    wait_for_event(
        &mut events,
        EventType::ReplicaStopped,
        Some("chat-g1-1"),
        DEADLINE,
    )
    .await;
    assert!(client.health(&status.endpoint).await.is_err());
    stop.cancel();
    let _ = without.await;
    let _ = with.await;
}
