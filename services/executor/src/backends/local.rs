//! The embedded default: one process per replica on this machine, on a free
//! loopback port, serving the model from the local cache: `flotilla-runner`
//! for `runtime: candle`, `vllm serve` for `runtime: vllm`.
//!
//! Replica processes outlive the executor (a `kill -9` of the executor
//! leaves them serving, and so does a graceful exit that hands over to a
//! next instance; see [`ReplicaBackend::exit`]). Each carries in its environment who started it
//! (`FLOTILLA_REPLICA_OWNER`: cluster and cache folder), which replica and
//! generation it is and where it listens, so a restarted executor finds its
//! own processes in `/proc`, adopts the ones it can vouch for and stops the
//! rest. Adoption needs Linux's `/proc`; elsewhere nothing is adopted and
//! recorded replicas are reported gone.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_kit::sync;
use flotilla_proto::v1::{self, ReplicaStatus};
use tokio::process::{Child, Command};

use super::{Adoption, BackendError, Observation, ReplicaBackend, ReplicaFailure, ReplicaSpec};
use crate::replica_client::ReplicaClient;

/// How long a new candle replica may take to answer `/health`.
const CANDLE_READY_DEADLINE: Duration = Duration::from_secs(120);
/// vLLM compiles and profiles before it serves: minutes, not seconds.
const VLLM_READY_DEADLINE: Duration = Duration::from_secs(900);
/// How long adoption waits for a found process to answer `/health` (it may
/// still be loading its model).
const ADOPT_DEADLINE: Duration = Duration::from_secs(30);

pub const ENV_OWNER: &str = "FLOTILLA_REPLICA_OWNER";
pub const ENV_REPLICA: &str = "FLOTILLA_REPLICA_ID";
pub const ENV_GENERATION: &str = "FLOTILLA_REPLICA_GENERATION";
pub const ENV_ENDPOINT: &str = "FLOTILLA_REPLICA_ENDPOINT";

/// The runner next to this executor's binary, or on PATH.
pub fn find_runner(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("flotilla-runner");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    on_path("flotilla-runner").unwrap_or_else(|| PathBuf::from("flotilla-runner"))
}

/// `explicit`, else `vllm` on PATH; `None` when neither exists.
pub fn find_vllm(explicit: Option<PathBuf>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p),
        None => on_path("vllm"),
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn free_port(host: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// `host:port` as a URL authority (IPv6 in brackets).
fn authority(host: IpAddr, port: u16) -> String {
    std::net::SocketAddr::from((host, port)).to_string()
}

/// The process a replica runs as: its program, arguments and the
/// environment that identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
}

impl LaunchCommand {
    /// The command line as one string, for messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The command that runs `spec` on `host:port`: `flotilla-runner --model
/// PATH --served-model-name NAME --addr HOST:PORT` for candle, `vllm serve
/// PATH --served-model-name NAME --host HOST --port PORT` for vLLM.
pub fn launch_command(
    spec: &ReplicaSpec,
    host: IpAddr,
    port: u16,
    owner: &str,
    runner: &Path,
    vllm: Option<&Path>,
) -> Result<LaunchCommand, BackendError> {
    let endpoint = format!("http://{}", authority(host, port));
    let (program, args): (PathBuf, Vec<OsString>) = match spec.runtime {
        v1::Runtime::Vllm => {
            let Some(vllm) = vllm.filter(|p| p.is_file()) else {
                return Err(BackendError::NoVllm(match vllm {
                    Some(p) => format!("{} does not exist", p.display()),
                    None => "not on PATH".into(),
                }));
            };
            (
                vllm.to_path_buf(),
                vec![
                    "serve".into(),
                    spec.model_path.clone().into_os_string(),
                    "--served-model-name".into(),
                    spec.model_name.clone().into(),
                    "--host".into(),
                    host.to_string().into(),
                    "--port".into(),
                    port.to_string().into(),
                ],
            )
        }
        v1::Runtime::Candle | v1::Runtime::Unspecified => {
            if !runner.is_file() {
                return Err(BackendError::NoRunner(runner.display().to_string()));
            }
            (
                runner.to_path_buf(),
                vec![
                    "--model".into(),
                    spec.model_path.clone().into_os_string(),
                    "--served-model-name".into(),
                    spec.model_name.clone().into(),
                    "--addr".into(),
                    authority(host, port).into(),
                ],
            )
        }
    };
    Ok(LaunchCommand {
        program,
        args,
        env: vec![
            (ENV_OWNER.into(), owner.into()),
            (ENV_REPLICA.into(), spec.replica_id.clone()),
            (ENV_GENERATION.into(), spec.generation.to_string()),
            (ENV_ENDPOINT.into(), endpoint),
            ("FLOTILLA_LOG".into(), "warn".into()),
        ],
    })
}

enum Process {
    /// Started by this instance.
    Child(Child),
    /// Started by an earlier instance of this executor and adopted.
    Adopted(u32),
}

struct LocalReplica {
    process: Process,
}

/// Runs replicas as local processes on free ports.
pub struct LocalBackend {
    runner: PathBuf,
    vllm: Option<PathBuf>,
    owner: String,
    running: Mutex<HashMap<String, LocalReplica>>,
    client: ReplicaClient,
    replica_host: IpAddr,
    log_dir: Option<crate::logs::LogDir>,
}

impl LocalBackend {
    /// `owner` names this executor among others on the machine (cluster and
    /// cache folder); it must stay the same across restarts.
    pub fn new(runner: PathBuf, vllm: Option<PathBuf>, owner: String) -> Self {
        Self {
            runner,
            vllm,
            owner,
            running: Mutex::new(HashMap::new()),
            client: ReplicaClient::default(),
            replica_host: IpAddr::from([127, 0, 0, 1]),
            log_dir: None,
        }
    }

    /// Each replica's output goes to a file of its own there (`flotilla
    /// logs`), rather than to the executor's.
    pub fn with_log_dir(mut self, dir: crate::logs::LogDir) -> Self {
        self.log_dir = Some(dir);
        self
    }

    /// Replicas listen on, and are reached at, `host` (127.0.0.1 unless
    /// set).
    pub fn with_replica_host(mut self, host: IpAddr) -> Self {
        self.replica_host = host;
        self
    }

    /// The owner tag for an executor of `cluster` with its cache at
    /// `cache_dir`.
    pub fn owner_for(cluster: &str, cache_dir: &Path) -> String {
        let dir = std::fs::canonicalize(cache_dir).unwrap_or_else(|_| cache_dir.to_path_buf());
        format!("{cluster}:{}", dir.display())
    }

    fn insert(&self, replica_id: &str, process: Process) {
        sync::lock(&self.running).insert(replica_id.to_string(), LocalReplica { process });
    }

    /// Waits until `endpoint` answers `/health`, failing early when the
    /// process is gone.
    async fn wait_healthy(
        &self,
        endpoint: &str,
        deadline: Duration,
        mut exited: impl FnMut() -> Option<String>,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        loop {
            if let Some(why) = exited() {
                return Err(BackendError::NotReady(started.elapsed(), why));
            }
            let last = match self.client.health(endpoint).await {
                Ok(()) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > deadline {
                return Err(BackendError::NotReady(deadline, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process `found` is the replica `recorded` describes and
    /// serves it; `Err` says why not.
    async fn vouch(&self, found: &RunnerProcess, recorded: &ReplicaStatus) -> Result<(), String> {
        if found.generation != recorded.generation {
            return Err(format!(
                "process {} runs generation {}, the record says {}",
                found.pid, found.generation, recorded.generation
            ));
        }
        if !recorded.endpoint.is_empty() && recorded.endpoint != found.endpoint {
            return Err(format!(
                "process {} listens at {}, the record says {}",
                found.pid, found.endpoint, recorded.endpoint
            ));
        }
        let pid = found.pid;
        self.wait_healthy(&found.endpoint, ADOPT_DEADLINE, || {
            (!procfs::alive(pid)).then(|| format!("process {pid} exited"))
        })
        .await
        .map_err(|e| format!("process {pid}: {e}"))?;
        let models = self
            .client
            .models(&found.endpoint)
            .await
            .map_err(|e| format!("process {pid}: {e}"))?;
        if !models.contains(&recorded.model) {
            return Err(format!(
                "process {pid} serves {models:?}, the record says {}",
                recorded.model
            ));
        }
        Ok(())
    }
}

impl ReplicaBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn start(&self, spec: &ReplicaSpec) -> Result<String, BackendError> {
        let port = free_port(self.replica_host).map_err(BackendError::NoPort)?;
        let launch = launch_command(
            spec,
            self.replica_host,
            port,
            &self.owner,
            &self.runner,
            self.vllm.as_deref(),
        )?;
        let endpoint = format!("http://{}", authority(self.replica_host, port));
        tracing::info!(replica = %spec.replica_id, "starting {}", launch.display());
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(dir) = &self.log_dir {
            let log = dir
                .open_for(&spec.replica_id)
                .and_then(|f| Ok((f.try_clone()?, f)))
                .map_err(|source| BackendError::Spawn {
                    program: format!("the log file of {}", spec.replica_id),
                    source,
                })?;
            // Written to a file, the runner's own progress is worth keeping.
            command
                .env("FLOTILLA_LOG", "info")
                .stdout(log.0)
                .stderr(log.1);
        }
        let mut child = command.spawn().map_err(|source| BackendError::Spawn {
            program: launch.program.display().to_string(),
            source,
        })?;
        let deadline = match spec.runtime {
            v1::Runtime::Vllm => VLLM_READY_DEADLINE,
            _ => CANDLE_READY_DEADLINE,
        };
        let ready = self
            .wait_healthy(&endpoint, deadline, || match child.try_wait() {
                Ok(Some(status)) => Some(format!("the process exited ({status})")),
                _ => None,
            })
            .await;
        if let Err(e) = ready {
            let _ = child.kill().await;
            return Err(e);
        }
        self.insert(&spec.replica_id, Process::Child(child));
        Ok(endpoint)
    }

    async fn stop(&self, replica_id: &str) -> Result<bool, BackendError> {
        let replica = sync::lock(&self.running).remove(replica_id);
        let stopped = match replica {
            Some(LocalReplica {
                process: Process::Child(mut child),
            }) => {
                let _ = child.kill().await;
                true
            }
            Some(LocalReplica {
                process: Process::Adopted(pid),
            }) => {
                procfs::kill(pid);
                true
            }
            None => false,
        };
        // A process of this replica that nobody tracks (an earlier
        // instance's) goes too.
        for found in procfs::runner_processes(&self.owner) {
            if found.replica_id == replica_id {
                procfs::kill(found.pid);
            }
        }
        Ok(stopped)
    }

    async fn drain_and_stop(
        &self,
        replica_id: &str,
        grace: Duration,
    ) -> Result<bool, BackendError> {
        // Out of `running` first: its exit is the end of a drain, not a
        // failure to report.
        let replica = sync::lock(&self.running).remove(replica_id);
        let mut pids: Vec<u32> = procfs::runner_processes(&self.owner)
            .into_iter()
            .filter(|p| p.replica_id == replica_id)
            .map(|p| p.pid)
            .collect();
        let stopped = match replica {
            Some(LocalReplica {
                process: Process::Child(mut child),
            }) => {
                if let Some(pid) = child.id() {
                    procfs::terminate(pid);
                    pids.retain(|p| *p != pid);
                }
                for pid in &pids {
                    procfs::terminate(*pid);
                }
                if tokio::time::timeout(grace, child.wait()).await.is_err() {
                    tracing::warn!(
                        replica = replica_id,
                        ?grace,
                        "still serving after the drain timeout; killed"
                    );
                    let _ = child.kill().await;
                }
                true
            }
            Some(LocalReplica {
                process: Process::Adopted(pid),
            }) => {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
                for pid in &pids {
                    procfs::terminate(*pid);
                }
                true
            }
            None => {
                for pid in &pids {
                    procfs::terminate(*pid);
                }
                false
            }
        };
        // Processes this instance did not start cannot be waited for: their
        // exit is looked for in /proc.
        let deadline = tokio::time::Instant::now() + grace;
        while pids.iter().any(|pid| procfs::alive(*pid)) {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    replica = replica_id,
                    ?grace,
                    "still serving after the drain timeout; killed"
                );
                for pid in &pids {
                    procfs::kill(*pid);
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(stopped)
    }

    fn runs(&self, replica_id: &str) -> bool {
        sync::lock(&self.running).contains_key(replica_id)
    }

    async fn observe(&self) -> Observation {
        let mut running = sync::lock(&self.running);
        let mut gone = Vec::new();
        running.retain(|id, replica| {
            let why = match &mut replica.process {
                Process::Child(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(format!("the replica process exited ({status})")),
                    _ => None,
                },
                Process::Adopted(pid) => {
                    (!procfs::alive(*pid)).then(|| format!("the replica process {pid} exited"))
                }
            };
            match why {
                Some(reason) => {
                    gone.push(ReplicaFailure {
                        replica_id: id.clone(),
                        reason,
                    });
                    false
                }
                None => true,
            }
        });
        // A process keeps its address: nothing moves.
        Observation {
            failed: gone,
            ..Observation::default()
        }
    }

    async fn adopt(&self, recorded: &ReplicaStatus) -> Adoption {
        if self.runs(&recorded.replica_id) {
            return Adoption::Adopted(recorded.endpoint.clone());
        }
        let found: Vec<RunnerProcess> = procfs::runner_processes(&self.owner)
            .into_iter()
            .filter(|p| p.replica_id == recorded.replica_id)
            .collect();
        if found.is_empty() {
            return Adoption::Gone(
                "no process of it was running when the executor restarted".into(),
            );
        }
        let mut adopted = None;
        let mut refusals = Vec::new();
        for process in found {
            if adopted.is_some() {
                // A second process for one replica: never keep two.
                procfs::kill(process.pid);
                continue;
            }
            match self.vouch(&process, recorded).await {
                Ok(()) => adopted = Some(process),
                Err(why) => {
                    procfs::kill(process.pid);
                    refusals.push(why);
                }
            }
        }
        match adopted {
            Some(process) => {
                tracing::info!(replica = %recorded.replica_id, pid = process.pid, endpoint = %process.endpoint, "adopted a running replica");
                self.insert(&recorded.replica_id, Process::Adopted(process.pid));
                Adoption::Adopted(process.endpoint)
            }
            None => Adoption::Refused(format!(
                "found after the executor restarted but not vouched for, so stopped: {}",
                refusals.join("; ")
            )),
        }
    }

    async fn exit(&self, handover: bool) {
        let running: Vec<(String, LocalReplica)> = sync::lock(&self.running).drain().collect();
        if handover {
            tracing::info!(
                replicas = running.len(),
                "leaving the replicas serving for the next executor instance"
            );
            for (_, replica) in running {
                if let Process::Child(child) = replica.process {
                    // A child is killed when dropped (so that a start that
                    // is abandoned, or an executor task that is aborted,
                    // leaves nothing behind); one handed over must not be.
                    std::mem::forget(child);
                }
            }
            return;
        }
        for (replica_id, replica) in running {
            tracing::info!(replica = %replica_id, "stopping the replica with the executor");
            match replica.process {
                Process::Child(mut child) => {
                    let _ = child.kill().await;
                }
                Process::Adopted(pid) => procfs::kill(pid),
            }
        }
    }

    async fn stop_unknown(&self, known: &HashSet<String>) -> Vec<String> {
        let mut stopped = Vec::new();
        for process in procfs::runner_processes(&self.owner) {
            if !known.contains(&process.replica_id) && !self.runs(&process.replica_id) {
                tracing::info!(replica = %process.replica_id, pid = process.pid, "stopping a replica process nobody recorded");
                procfs::kill(process.pid);
                stopped.push(process.replica_id);
            }
        }
        stopped
    }
}

/// A replica process of some executor, as found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerProcess {
    pub pid: u32,
    pub replica_id: String,
    pub generation: u64,
    pub endpoint: String,
}

/// Replica processes found through Linux's `/proc`. Reading other users'
/// environments fails and those processes are skipped: an executor only
/// adopts what it could have started.
pub mod procfs {
    use std::collections::HashMap;

    use super::{ENV_ENDPOINT, ENV_GENERATION, ENV_OWNER, ENV_REPLICA, RunnerProcess};

    /// Whether `pid` exists and is not a zombie.
    pub fn alive(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    }

    /// The environment `pid` started with.
    pub fn environment(pid: u32) -> Option<HashMap<String, String>> {
        let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        Some(
            raw.split(|b| *b == 0)
                .filter_map(|entry| {
                    let text = std::str::from_utf8(entry).ok()?;
                    let (k, v) = text.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect(),
        )
    }

    /// Live replica processes started by the executor `owner`.
    pub fn runner_processes(owner: &str) -> Vec<RunnerProcess> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found: Vec<RunnerProcess> = dir
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| {
                let env = environment(pid)?;
                if env.get(ENV_OWNER).map(String::as_str) != Some(owner) || !alive(pid) {
                    return None;
                }
                Some(RunnerProcess {
                    pid,
                    replica_id: env.get(ENV_REPLICA)?.clone(),
                    generation: env.get(ENV_GENERATION)?.parse().ok()?,
                    endpoint: env.get(ENV_ENDPOINT)?.clone(),
                })
            })
            .collect();
        found.sort_by_key(|p| p.pid);
        found
    }

    /// Sends SIGTERM to `pid`: stop when the work in hand is done. A
    /// process already gone is not an error.
    pub fn terminate(pid: u32) {
        signal(pid, rustix::process::Signal::TERM);
    }

    /// Sends SIGKILL to `pid`; a process already gone is not an error.
    pub fn kill(pid: u32) {
        signal(pid, rustix::process::Signal::KILL);
    }

    fn signal(pid: u32, signal: rustix::process::Signal) {
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        if let Err(e) = rustix::process::kill_process(pid, signal) {
            tracing::debug!("{signal:?} to {pid:?}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec(runtime: v1::Runtime) -> ReplicaSpec {
        ReplicaSpec {
            replica_id: "chat-g3-0".into(),
            deployment: "chat".into(),
            generation: 3,
            model_name: "smollm2".into(),
            model_path: "/cache/smollm2/model.gguf".into(),
            model_in_cache: "smollm2/model.gguf".into(),
            runtime,
            ..Default::default()
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn a_candle_replica_runs_the_runner_with_its_identity_in_the_environment() {
        let runner = std::env::current_exe().unwrap();
        let launch = launch_command(
            &spec(v1::Runtime::Candle),
            IpAddr::from([10, 201, 0, 1]),
            8123,
            "eu-1:/cache",
            &runner,
            None,
        )
        .unwrap();
        assert_eq!(launch.program, runner);
        assert_eq!(
            launch.args,
            [
                "--model",
                "/cache/smollm2/model.gguf",
                "--served-model-name",
                "smollm2",
                "--addr",
                "10.201.0.1:8123"
            ]
            .map(OsString::from)
        );
        let env: HashMap<_, _> = launch.env.into_iter().collect();
        assert_eq!(env[ENV_OWNER], "eu-1:/cache");
        assert_eq!(env[ENV_REPLICA], "chat-g3-0");
        assert_eq!(env[ENV_GENERATION], "3");
        assert_eq!(env[ENV_ENDPOINT], "http://10.201.0.1:8123");
    }

    #[test]
    fn a_vllm_replica_runs_vllm_serve() {
        let vllm = std::env::current_exe().unwrap();
        let launch = launch_command(
            &spec(v1::Runtime::Vllm),
            LOOPBACK,
            9000,
            "eu-1:/cache",
            Path::new("/nonexistent/flotilla-runner"),
            Some(&vllm),
        )
        .unwrap();
        assert_eq!(launch.program, vllm);
        assert_eq!(
            launch.args,
            [
                "serve",
                "/cache/smollm2/model.gguf",
                "--served-model-name",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                "9000"
            ]
            .map(OsString::from)
        );
    }

    #[test]
    fn a_vllm_replica_without_vllm_fails_with_a_clear_reason() {
        let runner = std::env::current_exe().unwrap();
        let err = launch_command(&spec(v1::Runtime::Vllm), LOOPBACK, 9000, "o", &runner, None)
            .unwrap_err();
        assert!(matches!(err, BackendError::NoVllm(_)), "{err}");
        assert!(err.to_string().contains("--vllm-bin"), "{err}");
        let missing = Path::new("/nonexistent/vllm");
        let err = launch_command(
            &spec(v1::Runtime::Vllm),
            LOOPBACK,
            9000,
            "o",
            &runner,
            Some(missing),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vllm"), "{err}");
    }

    #[test]
    fn this_process_is_alive_and_has_an_environment() {
        let me = std::process::id();
        assert!(procfs::alive(me));
        assert!(procfs::environment(me).unwrap().contains_key("PATH"));
        assert!(!procfs::alive(u32::MAX));
        assert!(procfs::runner_processes("nobody-owns-this").is_empty());
    }
}
