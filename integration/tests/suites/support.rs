//! What the suites share: a bus of the test's own, the shipped model, an
//! in-process runner, the requests a test sends a replica, and waiting with
//! a deadline for state that announces no event.
//!
//! Harness pieces that benchmarks use too live in `flotilla_integration`
//! (the nats-server, the fleet's services); this module is test code, so
//! a failure here panics with what it was waiting for.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_integration::{NatsServer, workspace_root};
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::codec::Contract;
use flotilla_proto::v1::{self, ReplicaStatus, executor_command::Action};
use tokio_util::sync::CancellationToken;

pub use flotilla_integration::fleet::config;
pub use flotilla_integration::{next_event, wait_for_event};

/// How often [`poll_until`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A nats-server of this test's own and a client on it, with the topology
/// provisioned.
pub async fn bus() -> (NatsServer, Bus) {
    let server = NatsServer::start().await.unwrap();
    let bus = server.provisioned_bus("test").await.unwrap();
    (server, bus)
}

/// [`bus`], and the client's subscription to every event, taken before
/// anything else starts so that none is missed.
pub async fn bus_with_events() -> (NatsServer, Bus, async_nats::Subscriber) {
    let (server, bus) = bus().await;
    let events = bus
        .client
        .subscribe(format!("{}.events.>", bus.subjects.prefix()))
        .await
        .unwrap();
    (server, bus, events)
}

/// `path`, which `scripts/install-tools` installs; panics saying so when it
/// is missing.
fn installed(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-tools",
        path.display()
    );
    path
}

/// The shipped model (SmolLM2-135M-Instruct, Q4_1 GGUF).
pub fn shipped_model() -> PathBuf {
    installed(flotilla_integration::shipped_model())
}

/// The Python of `.tools/venv`, with the chart renderer's and the Python
/// clients' packages.
pub fn python() -> PathBuf {
    installed(workspace_root().join(".tools/venv/bin/python"))
}

/// Polls `probe` until it gives a value, and returns it; panics naming
/// `what` once `deadline` has passed. For state nothing announces (a
/// counter in `/metrics`, a consumer's pending count, a listening port);
/// where an event says it, wait for the event instead.
pub async fn poll_until<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no {what} within {deadline:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Runs a runner in this process on the shipped model, served as
/// `served_model_name`, and waits until its `/health` says it has loaded;
/// its base URL.
pub async fn runner(served_model_name: &str) -> String {
    let (bound, addr) = tokio::sync::oneshot::channel();
    // Parsed as the command line would be, so every other flag keeps its
    // default.
    let model = shipped_model();
    let args = <flotilla_runner::Args as clap::Parser>::try_parse_from([
        "flotilla-runner",
        "--model",
        &model.display().to_string(),
        "--served-model-name",
        served_model_name,
        "--addr",
        "127.0.0.1:0",
        "--max-queue",
        "16",
        "--max-batch",
        "8",
    ])
    .unwrap();
    tokio::spawn(async move {
        flotilla_runner::run(args, CancellationToken::new(), Some(bound))
            .await
            .unwrap()
    });
    let runner = format!("http://{}", addr.await.unwrap());
    let http = reqwest::Client::new();
    poll_until(Duration::from_secs(60), "loaded runner", || async {
        let health = http.get(format!("{runner}/health")).send().await;
        health.is_ok_and(|r| r.status() == 200).then_some(())
    })
    .await;
    runner
}

/// `N` distinct free loopback ports for processes that bind them later,
/// taken below the kernel's ephemeral range so that no connection opened
/// meanwhile (by this process or another) is given one of them.
pub fn free_ports<const N: usize>() -> [u16; N] {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    // A random place to start, so that tests running at once rarely try the
    // same ports; the listeners are held until all N are found.
    let start = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        (h.finish() % u64::from(span)) as u16
    };
    let held: Vec<std::net::TcpListener> = (0..span)
        .map(|i| LOWEST + (start + i) % span)
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .take(N)
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// Applies deployment documents (YAML) as `flotilla apply -f` does.
pub async fn apply(bus: &Bus, yaml: &str) {
    let docs = flotilla_cli::deployments::parse_documents(yaml).unwrap();
    flotilla_cli::deployments::apply(bus, docs, Default::default(), &mut Vec::new())
        .await
        .unwrap();
}

/// Pushes a model file as `flotilla model push` does; its digest.
pub async fn push(bus: &Bus, path: &Path, name: &str, format: Option<&str>) -> String {
    flotilla_cli::models::push(bus, path, name, format, &mut Vec::new(), &mut Vec::new())
        .await
        .unwrap()
}

/// The record under `key` in KV bucket `bucket`; panics when there is
/// none.
pub async fn record<M: Contract + Clone>(bus: &Bus, bucket: &str, key: &str) -> M {
    RecordStore::<M>::open(bus, bucket)
        .await
        .unwrap()
        .get(key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no {key} in KV {bucket}"))
        .0
}

/// Every replica record in KV.
pub async fn replicas(bus: &Bus) -> Vec<ReplicaStatus> {
    RecordStore::<ReplicaStatus>::open(bus, &bus.topology.replicas.name)
        .await
        .unwrap()
        .list()
        .await
        .unwrap()
}

/// Every replica record once none is draining: a rollout completes when
/// its new replicas serve and the old are out of routing; those then
/// finish their requests and stop.
pub async fn replicas_settled(bus: &Bus, deadline: Duration) -> Vec<ReplicaStatus> {
    poll_until(deadline, "no replica draining", || async {
        let all = replicas(bus).await;
        all.iter()
            .all(|r| r.phase() != flotilla_proto::v1::ReplicaPhase::Stopping)
            .then_some(all)
    })
    .await
}

/// Asks `endpoint` (a runner or the gateway) one chat question, greedy;
/// the answer as JSON.
pub async fn chat(endpoint: &str, model: &str, prompt: &str, max_tokens: u32) -> serde_json::Value {
    reqwest::Client::new()
        .post(format!("{endpoint}/v1/chat/completions"))
        .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The text of a chat answer; empty when it has none.
pub fn text(answer: &serde_json::Value) -> &str {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// The text of [`chat`]'s answer.
pub async fn ask(endpoint: &str, model: &str, prompt: &str, max_tokens: u32) -> String {
    text(&chat(endpoint, model, prompt, max_tokens).await).to_string()
}

/// Starting replica `replica` of the pushed model `smollm2` on `runtime`.
pub fn start_replica(replica: &str, runtime: v1::Runtime) -> Action {
    Action::Start(v1::StartReplica {
        replica_id: replica.into(),
        model: Some(v1::ModelRef {
            name: "smollm2".into(),
            ..Default::default()
        }),
        runtime: runtime.into(),
        ..Default::default()
    })
}

/// Stopping replica `replica`, saying why.
pub fn stop_replica(replica: &str, reason: &str) -> Action {
    Action::Stop(v1::StopReplica {
        replica_id: replica.into(),
        reason: reason.into(),
    })
}

/// A command of deployment `chat` at `generation` to `cluster`'s executor;
/// its id is `chat-<generation>-<replica><id_suffix>`.
pub fn command(
    cluster: &str,
    generation: u64,
    id_suffix: &str,
    action: Action,
) -> v1::ExecutorCommand {
    let replica = match &action {
        Action::Start(s) => s.replica_id.as_str(),
        Action::Stop(s) => s.replica_id.as_str(),
        Action::Prefetch(_) => "",
    };
    v1::ExecutorCommand {
        command_id: format!("chat-{generation}-{replica}{id_suffix}"),
        cluster: cluster.into(),
        deployment: "chat".into(),
        generation,
        action: Some(action),
    }
}

/// Live (not zombie) processes whose environment says they are replica
/// `replica` of the executor `owner`.
pub fn replica_processes(owner: &str, replica: &str) -> Vec<u32> {
    let want_owner = format!("FLOTILLA_REPLICA_OWNER={owner}");
    let want_replica = format!("FLOTILLA_REPLICA_ID={replica}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let has = |v: &str| vars.contains(&v.as_bytes());
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(true);
        if has(&want_owner) && has(&want_replica) && !zombie {
            found.push(pid);
        }
    }
    found
}

/// The processes whose environment names `owner` as their executor
/// (`FLOTILLA_REPLICA_OWNER`): the replicas it started.
pub fn processes_of(owner: &str) -> Vec<u32> {
    let want = format!("FLOTILLA_REPLICA_OWNER={owner}");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        {
            found.push(pid);
        }
    }
    found
}

/// `kill -SIGNAL pid` (`KILL`, `STOP`, `CONT`, ...); whether it was sent.
pub fn signal(signal: &str, pid: u32) -> bool {
    std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills, when the test ends however it ends, every replica process the
/// executor `owner` started.
pub struct KillReplicasOnDrop(pub String);

impl Drop for KillReplicasOnDrop {
    fn drop(&mut self) {
        for pid in processes_of(&self.0) {
            signal("KILL", pid);
        }
    }
}

/// Two replicas of the shipped model, one on each of two clusters.
pub const TWO_CLUSTERS: &str = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 2
  placement:
    policy: PickN
    numberOfClusters: 2
"#;

/// Runs `program` to the end; its standard output, after checking it
/// succeeded.
pub async fn output_of(program: &Path, args: &[&str]) -> String {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the `flotilla` command line to the end; its standard output.
pub async fn flotilla(args: &[&str]) -> String {
    output_of(&flotilla_integration::fleet::target_bin("flotilla"), args).await
}
