//! `kill -9` of an executor process with the local backend: its runners
//! keep serving, and the restarted executor adopts them instead of starting
//! duplicates, applies once a command that arrived while it was down,
//! stops a runner nobody recorded, and still ignores a command from an
//! older placement generation (the generations come back from KV). Killed
//! while a replica starts, it adopts that runner too. A runner that stops
//! answering `/health` is stopped and reported failed.
//!
//! The executor runs as its own binary (`target/<profile>/flotilla-executor`,
//! built with the workspace), the runners are real `flotilla-runner`
//! processes serving the shipped SmolLM2, the bus a real nats-server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use flotilla_cli::fleet::SimulatedCluster;
use flotilla_integration::NatsServer;
use flotilla_integration::fleet::target_bin;
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus, executor_command::Action};
use flotilla_proto::{CommandAction, EventType};
use tokio::process::{Child, Command};

use crate::support::{
    self, KillReplicasOnDrop, ask, free_ports, next_event, poll_until, push, replica_processes,
    shipped_model,
};

const DEADLINE: Duration = Duration::from_secs(120);
const CLUSTER: &str = "eu-1";

/// The executor binary with a simulated cluster's flags, as `flotilla up`
/// starts one.
struct Executor {
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
}

impl Executor {
    async fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Command::new(&self.bin)
            .args(&self.args)
            .env("FLOTILLA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }
}

/// Every event seen, in order, while waiting for particular ones.
struct Events {
    sub: async_nats::Subscriber,
    seen: Vec<v1::Event>,
}

impl Events {
    async fn until(&mut self, ty: EventType, name: &str, log: &Path) -> v1::Event {
        let want = ty.to_string();
        let seen = &mut self.seen;
        next_event(&mut self.sub, DEADLINE, |event| {
            seen.push(event.clone());
            event.r#type == want && event.name == name
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no {want} for {name} within {DEADLINE:?}; executor log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
    }

    /// Distinct events (by id, as the events stream keeps them: a start
    /// delivered again for a running replica announces its ready record
    /// again under the same id, in case that event was lost).
    fn count(&self, ty: EventType, name: &str) -> usize {
        let want = ty.to_string();
        self.seen
            .iter()
            .filter(|e| e.r#type == want && e.name == name)
            .map(|e| e.id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

fn command(generation: u64, id_suffix: &str, action: Action) -> v1::ExecutorCommand {
    support::command(CLUSTER, generation, &format!("-{id_suffix}"), action)
}

fn start(replica: &str) -> Action {
    support::start_replica(replica, v1::Runtime::Candle)
}

/// A start of one GPU, as a deployment's resources say.
fn start_on_one_gpu(replica: &str) -> Action {
    let Action::Start(mut s) = start(replica) else {
        unreachable!("a start")
    };
    s.gpu = Some(v1::GpuRequirements {
        count: 1,
        ..Default::default()
    });
    Action::Start(s)
}

fn stop(replica: &str) -> Action {
    support::stop_replica(replica, "scaled down")
}

async fn chat(endpoint: &str) -> String {
    ask(endpoint, "smollm2", "Say hi.", 6).await
}

/// A nats-server with the model pushed, and an executor binary ready to
/// spawn (and spawn again) for cluster eu-1.
struct Fleet {
    _server: NatsServer,
    bus: Bus,
    events: Events,
    _work: tempfile::TempDir,
    owner: String,
    runner: PathBuf,
    model: PathBuf,
    executor: Executor,
    replicas: RecordStore<ReplicaStatus>,
    _cleanup: KillReplicasOnDrop,
}

impl Fleet {
    async fn start() -> Self {
        let (server, bus, sub) = support::bus_with_events().await;
        let events = Events {
            sub,
            seen: Vec::new(),
        };
        flotilla_integration::fleet::model_provisioner(&support::config(&server));
        let model = shipped_model();
        push(&bus, &model, "smollm2", None).await;
        let work = tempfile::tempdir().unwrap();
        let cluster = SimulatedCluster::new(CLUSTER, "1xH100-80GB", &["region=eu-west-1"], 0.0);
        let caches = work.path().join("cache");
        // The executor's cache folder; the owner of its runners names it.
        let cache = caches.join(CLUSTER);
        std::fs::create_dir_all(&cache).unwrap();
        let owner = format!(
            "{CLUSTER}:{}",
            std::fs::canonicalize(&cache).unwrap().display()
        );
        let runner = target_bin("flotilla-runner");
        let mut args = cluster.executor_flags(&server.url(), &caches);
        args.extend(["--runner-bin".into(), runner.clone().into()]);
        let executor = Executor {
            bin: target_bin("flotilla-executor"),
            args,
            log: work.path().join("executor.log"),
        };
        let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
            .await
            .unwrap();
        Self {
            _server: server,
            bus,
            events,
            _work: work,
            owner: owner.clone(),
            runner,
            model,
            executor,
            replicas,
            _cleanup: KillReplicasOnDrop(owner),
        }
    }

    async fn publish(&self, action: CommandAction, command: v1::ExecutorCommand) {
        let subject = self.bus.subjects.command(CLUSTER, action).unwrap();
        self.bus.publish(subject, &command, None).await.unwrap();
    }

    async fn until(&mut self, ty: EventType, name: &str) -> v1::Event {
        self.events.until(ty, name, &self.executor.log).await
    }

    /// Waits until the executor's command consumer has nothing left to
    /// deliver or to be acknowledged.
    async fn commands_done(&self) {
        let stream = self
            .bus
            .jetstream
            .get_stream(&self.bus.topology.commands.name)
            .await
            .unwrap();
        let consumer = format!("executor-{CLUSTER}-replicas");
        poll_until(DEADLINE, "empty executor command queue", || async {
            let info = stream.consumer_info(&consumer).await.unwrap();
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn a_killed_executor_adopts_its_runners_and_starts_no_duplicate() {
    let mut f = Fleet::start().await;
    let owner = f.owner.clone();
    let (runner, model) = (f.runner.clone(), f.model.clone());

    // One replica, started by the first executor.
    let mut first = f.executor.spawn().await;
    f.publish(
        CommandAction::Start,
        command(2, "a", start_on_one_gpu("chat-g2-0")),
    )
    .await;
    f.until(EventType::ReplicaReady, "chat-g2-0").await;
    let before = f.replicas.get("eu-1.chat-g2-0").await.unwrap().unwrap().0;
    let runner_pids = replica_processes(&owner, "chat-g2-0");
    assert_eq!(runner_pids.len(), 1, "one runner for chat-g2-0");

    // kill -9: nothing runs the executor's shutdown.
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    assert_eq!(
        replica_processes(&owner, "chat-g2-0"),
        runner_pids,
        "the runner outlives the executor"
    );
    assert!(!chat(&before.endpoint).await.is_empty());

    // While it is down: a duplicate start (another command id, so the
    // stream keeps it), a new start, and a runner process nobody recorded.
    f.publish(
        CommandAction::Start,
        command(2, "again", start("chat-g2-0")),
    )
    .await;
    f.publish(CommandAction::Start, command(2, "a", start("chat-g2-1")))
        .await;
    let [stray_port] = free_ports();
    let mut stray = Command::new(&runner)
        .args(["--model", model.to_str().unwrap()])
        .args(["--served-model-name", "smollm2"])
        .args(["--addr", &format!("127.0.0.1:{stray_port}")])
        .env("FLOTILLA_REPLICA_OWNER", &owner)
        .env("FLOTILLA_REPLICA_ID", "stray-0")
        .env("FLOTILLA_REPLICA_GENERATION", "2")
        .env(
            "FLOTILLA_REPLICA_ENDPOINT",
            format!("http://127.0.0.1:{stray_port}"),
        )
        .env("FLOTILLA_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut heartbeats = f
        .bus
        .client
        .subscribe(f.bus.subjects.telemetry(CLUSTER).unwrap())
        .await
        .unwrap();
    let _second = f.executor.spawn().await;
    let ready = f.until(EventType::ReplicaReady, "chat-g2-1").await;
    // The adopted replica still holds its GPU: the restarted executor's
    // heartbeats say so, and mark the GPU allocated.
    let held = tokio::time::timeout(DEADLINE, async {
        use futures::StreamExt;
        use prost::Message;
        while let Some(msg) = heartbeats.next().await {
            let Ok(hb) = v1::ClusterHeartbeat::decode(msg.payload) else {
                continue;
            };
            let allocated = hb
                .inventory
                .as_ref()
                .map_or(0, |i| i.gpus.iter().filter(|g| g.allocated).count());
            if allocated == 1
                && hb
                    .replicas
                    .iter()
                    .any(|r| r.replica_id == "chat-g2-0" && r.gpus == 1)
            {
                return;
            }
        }
    })
    .await;
    assert!(
        held.is_ok(),
        "no heartbeat with the adopted replica's GPU held"
    );
    assert_eq!(ready.generation, 2);
    let stray_exit = tokio::time::timeout(DEADLINE, stray.wait())
        .await
        .expect("the restarted executor stops a runner nobody recorded")
        .unwrap();
    assert!(!stray_exit.success(), "stray runner: {stray_exit}");

    // The first replica was adopted, not restarted: same process, same
    // endpoint, still ready, still serving.
    assert_eq!(replica_processes(&owner, "chat-g2-0"), runner_pids);
    assert_eq!(replica_processes(&owner, "chat-g2-1").len(), 1);
    let after = f.replicas.get("eu-1.chat-g2-0").await.unwrap().unwrap().0;
    assert_eq!(after.phase(), ReplicaPhase::Ready);
    assert_eq!(after.endpoint, before.endpoint);
    assert!(!chat(&after.endpoint).await.is_empty());

    // A stale generation after the restart is still ignored; the stop
    // published after it shows it was handled.
    f.publish(CommandAction::Start, command(1, "a", start("chat-g1-5")))
        .await;
    f.publish(CommandAction::Stop, command(2, "a", stop("chat-g2-0")))
        .await;
    f.until(EventType::ReplicaStopped, "chat-g2-0").await;
    assert!(
        f.replicas.get("eu-1.chat-g1-5").await.unwrap().is_none(),
        "a fenced start ran after the restart"
    );
    assert!(replica_processes(&owner, "chat-g1-5").is_empty());
    assert!(
        replica_processes(&owner, "chat-g2-0").is_empty(),
        "the adopted runner still runs after stop"
    );
    assert_eq!(replica_processes(&owner, "chat-g2-1").len(), 1);

    // Each start was applied once: one starting and one ready event per
    // replica, and nothing failed.
    for replica in ["chat-g2-0", "chat-g2-1"] {
        assert_eq!(
            f.events.count(EventType::ReplicaStarting, replica),
            1,
            "{replica}"
        );
        assert_eq!(
            f.events.count(EventType::ReplicaReady, replica),
            1,
            "{replica}"
        );
        assert_eq!(
            f.events.count(EventType::ReplicaFailed, replica),
            0,
            "{replica}"
        );
    }
}

#[tokio::test]
async fn an_executor_killed_while_starting_a_replica_adopts_it_after_restart() {
    let mut f = Fleet::start().await;
    let owner = f.owner.clone();
    let mut first = f.executor.spawn().await;
    f.publish(CommandAction::Start, command(4, "a", start("chat-g4-0")))
        .await;
    // kill -9 once the runner process exists, before its start command is
    // acknowledged.
    poll_until(DEADLINE, "runner for chat-g4-0", || async {
        (!replica_processes(&owner, "chat-g4-0").is_empty()).then_some(())
    })
    .await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    let runner_pids = replica_processes(&owner, "chat-g4-0");
    assert_eq!(runner_pids.len(), 1);

    let _second = f.executor.spawn().await;
    f.until(EventType::ReplicaReady, "chat-g4-0").await;
    // The unacknowledged start comes again (after the consumer's 10 s ack
    // wait) and finds the replica running.
    f.commands_done().await;
    assert_eq!(
        replica_processes(&owner, "chat-g4-0"),
        runner_pids,
        "the runner started before the kill is the one that serves"
    );
    let record = f.replicas.get("eu-1.chat-g4-0").await.unwrap().unwrap().0;
    assert_eq!(record.phase(), ReplicaPhase::Ready);
    assert!(!chat(&record.endpoint).await.is_empty());
    assert_eq!(f.events.count(EventType::ReplicaFailed, "chat-g4-0"), 0);
}

#[tokio::test]
async fn a_runner_that_stops_answering_is_stopped_and_reported_failed() {
    let mut f = Fleet::start().await;
    let owner = f.owner.clone();
    let _executor = f.executor.spawn().await;
    f.publish(CommandAction::Start, command(5, "a", start("chat-g5-0")))
        .await;
    f.until(EventType::ReplicaReady, "chat-g5-0").await;
    let pids = replica_processes(&owner, "chat-g5-0");
    assert_eq!(pids.len(), 1);
    // Frozen, not dead: only the health probe can tell.
    assert!(support::signal("STOP", pids[0]));
    let failed = f.until(EventType::ReplicaFailed, "chat-g5-0").await;
    assert!(
        failed.message.contains("health probes"),
        "{}",
        failed.message
    );
    assert!(
        replica_processes(&owner, "chat-g5-0").is_empty(),
        "the unresponsive runner is still there"
    );
    let record = f.replicas.get("eu-1.chat-g5-0").await.unwrap().unwrap().0;
    assert_eq!(record.phase(), ReplicaPhase::Failed);
    assert!(record.endpoint.is_empty());
}
