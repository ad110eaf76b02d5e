//! The fleet-scale scenario: many simulated member clusters
//! ([`flotilla_executor::simulate`], in this process) under the real hub
//! services, each a process of its own so that it can be measured and
//! killed with SIGKILL, on a real nats-server (or a cluster of three).
//!
//! Phases, each timed from the bus's own events:
//! 1. *place*: deployments applied at a steady rate, each PickN over the
//!    fleet; apply → `deployment.placed`, apply → every replica ready;
//! 2. *rollouts*: a new template for many deployments at once, staged in
//!    three waves; `rollout.started` → `rollout.completed`;
//! 3. *hub restart*: another round of rollouts, every hub service killed
//!    with SIGKILL in the middle of it and started again; restart → the
//!    first progress, restart → every rollout complete, and a deployment
//!    applied at the restart placed;
//! 4. with two instances of each service, one of each killed mid-rollout;
//!    with three nats-servers, one killed mid-rollout: the longest pause in
//!    progress after the kill, beside the longest before it.
//!
//! [`Scenario::run`] ends with [`verify`]: every deployment has exactly its
//! replicas ready, all of its newest template, nothing else runs, and no
//! replica was started or stopped twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_kit::{Bus, BusConfig, RecordStore, sync};
use flotilla_proto::v1::{self, ClusterHealth, ReplicaPhase, ReplicaStatus, event::Payload};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::bench::{cpu_seconds, peak_rss};
use crate::fleet::target_bin;
use crate::nats_cluster::NatsCluster;
use crate::{NatsServer, workspace_root};

/// The size and shape of one run.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub clusters: usize,
    pub deployments: usize,
    /// PickN: clusters per deployment, one replica on each.
    pub clusters_per_deployment: usize,
    /// Deployments given a new template at once in each rollout phase.
    pub rollouts: usize,
    /// Deployments applied per second in the *place* phase.
    pub apply_rate: f64,
    /// Once every deployment is placed and ready: this many new
    /// deployments applied one at a time, then this many rolled out one
    /// at a time (KubeFleet's "a new placement" and "one rollout").
    pub singles: usize,
    pub ready_after: Duration,
    pub heartbeat_interval: Duration,
    /// GPUs of each simulated cluster (`--gpus`).
    pub gpus: String,
    /// Instances of each hub service (2: active-active).
    pub instances: usize,
    /// 1, or 3 for a NATS cluster with every stream replicated three times.
    pub nats_servers: usize,
    /// Kill every hub service with SIGKILL in the middle of a rollout
    /// round and start them again.
    pub hub_restart: bool,
    /// How long into a rollout round the kills come.
    pub kill_after: Duration,
    /// The longest any phase may take.
    pub phase_deadline: Duration,
    /// Hub service processes' log level (`RUST_LOG`).
    pub service_log: String,
    /// Where the hub services' logs go (`<service>-<instance>.log`,
    /// appended across restarts); none: discarded.
    pub log_dir: Option<PathBuf>,
    /// Inventory's `--unhealthy-after`. The simulated members share the
    /// hub's CPUs: at a thousand of them on two cores a heartbeat can
    /// queue for seconds behind their own command handling, which real
    /// members on their own machines would not do.
    pub unhealthy_after: Duration,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            clusters: 1000,
            deployments: 1000,
            clusters_per_deployment: 100,
            rollouts: 100,
            apply_rate: 20.0,
            singles: 10,
            ready_after: Duration::from_secs(2),
            heartbeat_interval: Duration::from_secs(1),
            gpus: "128xH100-80GB".into(),
            instances: 1,
            nats_servers: 1,
            hub_restart: true,
            kill_after: Duration::from_secs(3),
            phase_deadline: Duration::from_secs(900),
            service_log: "warn".into(),
            log_dir: None,
            unhealthy_after: Duration::from_secs(10),
        }
    }
}

/// How long after a kill the pause in progress is looked for (at most
/// until the round's rollouts are all complete).
const PAUSE_WINDOW: Duration = Duration::from_secs(10);

/// New deployments applied while the concurrent rollouts run.
const NEW_DURING_ROLLOUTS: usize = 10;

/// The hub services, in the order they start.
pub const HUB_SERVICES: [&str; 4] = ["inventory", "placement", "model-provisioner", "rollout"];

/// One hub service process.
struct ServiceProcess {
    service: &'static str,
    instance: usize,
    child: Option<tokio::process::Child>,
    /// CPU seconds and peak RSS of earlier lives of this instance (killed).
    cpu_before: f64,
    peak_rss: u64,
}

impl ServiceProcess {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    fn cpu(&self) -> f64 {
        self.cpu_before + self.pid().and_then(cpu_seconds).unwrap_or(0.0)
    }

    fn peak(&self) -> u64 {
        self.peak_rss
            .max(self.pid().and_then(peak_rss).unwrap_or(0))
    }

    async fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            self.cpu_before += cpu_seconds(pid).unwrap_or(0.0);
            self.peak_rss = self.peak_rss.max(peak_rss(pid).unwrap_or(0));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// The hub: its nats-server(s) and service processes.
pub struct Hub {
    nats: HubNats,
    services: Vec<ServiceProcess>,
    nats_url: String,
    stream_replicas: usize,
    log: String,
    log_dir: Option<PathBuf>,
    unhealthy_after: Duration,
}

enum HubNats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Hub {
    /// Starts the nats-server(s), provisions the topology and starts
    /// `instances` of every hub service.
    pub async fn start(scenario: &Scenario) -> anyhow::Result<Self> {
        let (nats, nats_url, stream_replicas) = if scenario.nats_servers > 1 {
            let cluster = NatsCluster::start(scenario.nats_servers).await?;
            let url = cluster.urls();
            (HubNats::Cluster(cluster), url, scenario.nats_servers.min(3))
        } else {
            let server = NatsServer::start_monitored().await?;
            let url = server.url();
            (HubNats::Single(server), url, 1)
        };
        let mut hub = Self {
            nats,
            services: Vec::new(),
            nats_url,
            stream_replicas,
            log: scenario.service_log.clone(),
            log_dir: scenario.log_dir.clone(),
            unhealthy_after: scenario
                .unhealthy_after
                .max(scenario.heartbeat_interval * 3),
        };
        // Provisioned once, so service instances do not race to create it.
        let bus = hub.bus("bench").await?;
        flotilla_kit::provision(&bus).await?;
        for service in HUB_SERVICES {
            for instance in 0..scenario.instances.max(1) {
                let child = hub.spawn(service, instance)?;
                hub.services.push(ServiceProcess {
                    service,
                    instance,
                    child: Some(child),
                    cpu_before: 0.0,
                    peak_rss: 0,
                });
            }
        }
        Ok(hub)
    }

    pub fn bus_config(&self) -> anyhow::Result<BusConfig> {
        Ok(flotilla_kit::BusArgs {
            nats_url: self.nats_url.clone(),
            stream_replicas: self.stream_replicas,
            ..flotilla_kit::BusArgs::default()
        }
        .validate()?)
    }

    /// A bus client of the hub.
    pub async fn bus(&self, name: &str) -> anyhow::Result<Bus> {
        Ok(Bus::connect(&self.bus_config()?, name, &CancellationToken::new()).await?)
    }

    fn spawn(&self, service: &str, instance: usize) -> anyhow::Result<tokio::process::Child> {
        let bin = target_bin(&format!("flotilla-{service}"));
        let mut command = tokio::process::Command::new(&bin);
        command
            .args(["--nats-url", &self.nats_url])
            .args(["--stream-replicas", &self.stream_replicas.to_string()])
            .args(["--http-addr", "127.0.0.1:0"])
            .env("RUST_LOG", &self.log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        match &self.log_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{service}-{instance}.log")))?;
                command.stderr(file);
            }
            None => {
                command.stderr(std::process::Stdio::null());
            }
        }
        match service {
            "inventory" => {
                command.args([
                    "--unhealthy-after",
                    &format!("{}ms", self.unhealthy_after.as_millis()),
                ]);
            }
            "model-provisioner" => {
                command
                    .arg("--preset-dir")
                    .arg(workspace_root().join(".tools/models"));
            }
            _ => {}
        }
        command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    /// SIGKILL to every hub service process, then all of them again.
    pub async fn kill_and_restart_all(&mut self) -> anyhow::Result<()> {
        for p in &mut self.services {
            p.kill().await;
        }
        for i in 0..self.services.len() {
            let child = self.spawn(self.services[i].service, self.services[i].instance)?;
            self.services[i].child = Some(child);
        }
        Ok(())
    }

    /// SIGKILL to instance 0 of every service (the others go on).
    pub async fn kill_first_instances(&mut self) {
        for p in self.services.iter_mut().filter(|p| p.instance == 0) {
            p.kill().await;
        }
    }

    /// SIGKILL to one nats-server of a cluster (not the JetStream meta
    /// leader: that one is the harder case for nobody but the test); its
    /// name.
    pub async fn kill_one_nats_server(&mut self) -> anyhow::Result<Option<String>> {
        let HubNats::Cluster(cluster) = &mut self.nats else {
            return Ok(None);
        };
        let leader = cluster.meta_leader().await;
        let victim = (0..cluster.len()).find(|i| Some(*i) != leader).unwrap_or(0);
        let name = cluster.name(victim).to_string();
        cluster.kill(victim).await?;
        Ok(Some(name))
    }

    /// CPU seconds and peak RSS per service (instances summed, peak the
    /// largest), and of the nats-server(s).
    pub fn usage(&self) -> Vec<(String, f64, u64)> {
        let mut by_service: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
        for p in &self.services {
            let entry = by_service.entry(p.service).or_default();
            entry.0 += p.cpu();
            entry.1 = entry.1.max(p.peak());
        }
        let mut out: Vec<(String, f64, u64)> = HUB_SERVICES
            .iter()
            .filter_map(|s| by_service.get(s).map(|(c, m)| (s.to_string(), *c, *m)))
            .collect();
        let pids: Vec<u32> = match &self.nats {
            HubNats::Single(s) => s.pid().into_iter().collect(),
            HubNats::Cluster(c) => (0..c.len()).filter_map(|i| c.pid(i)).collect(),
        };
        let cpu = pids.iter().filter_map(|p| cpu_seconds(*p)).sum();
        let mem = pids.iter().filter_map(|p| peak_rss(*p)).max().unwrap_or(0);
        out.push(("nats-server".into(), cpu, mem));
        out
    }

    /// Messages and bytes into and out of the nats-server(s) so far, from
    /// the servers' own counters (`varz`), summed over servers.
    pub async fn traffic(&self) -> Option<Traffic> {
        let monitors: Vec<String> = match &self.nats {
            HubNats::Single(server) => server.monitor_url().into_iter().collect(),
            HubNats::Cluster(cluster) => {
                (0..cluster.len()).map(|i| cluster.monitor_url(i)).collect()
            }
        };
        let http = reqwest::Client::new();
        let mut total = Traffic::default();
        for monitor in monitors {
            let url = format!("{monitor}/varz");
            let varz: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            total.messages += varz["in_msgs"].as_u64()? + varz["out_msgs"].as_u64()?;
            total.bytes += varz["in_bytes"].as_u64()? + varz["out_bytes"].as_u64()?;
        }
        Some(total)
    }
}

/// Server-side message counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Traffic {
    pub messages: u64,
    pub bytes: u64,
}

/// One event as the bench keeps it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    ty: String,
    name: String,
    /// For replica events: the deployment.
    deployment: String,
}

/// Every event of the run, as it arrived, from an ordered consumer of the
/// events stream (nothing lost to a slow subscriber).
#[derive(Clone, Default)]
pub struct EventLog {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl EventLog {
    pub async fn follow(bus: &Bus, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let log = Self::default();
        let stream = bus
            .jetstream
            .get_stream(&bus.topology.events.name)
            .await
            .context("the events stream")?;
        let first = stream
            .clone()
            .info()
            .await
            .context("the events stream")?
            .state
            .last_sequence
            + 1;
        let seen = log.seen.clone();
        tokio::spawn(async move {
            // Across a server lost under it: consumed again from the
            // sequence after the last one seen.
            let mut next_sequence = first;
            while !shutdown.is_cancelled() {
                let consumer = stream
                    .create_consumer(pull::OrderedConfig {
                        deliver_policy: DeliverPolicy::ByStartSequence {
                            start_sequence: next_sequence,
                        },
                        ..Default::default()
                    })
                    .await;
                let messages = match consumer {
                    Ok(c) => c.messages().await.ok(),
                    Err(_) => None,
                };
                let Some(mut messages) = messages else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                // An ordered consumer whose server went away can hang
                // without an error: when the stream holds more than it
                // delivers for two checks in a row, it is made again.
                let mut check = tokio::time::interval(Duration::from_secs(2));
                let mut stuck_at = None;
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        next = messages.next() => next,
                        _ = check.tick() => {
                            let behind = match stream.get_info().await {
                                Ok(info) => info.state.last_sequence >= next_sequence,
                                Err(_) => false,
                            };
                            if !behind {
                                stuck_at = None;
                            } else if stuck_at == Some(next_sequence) {
                                break;
                            } else {
                                stuck_at = Some(next_sequence);
                            }
                            continue;
                        }
                    };
                    let Some(Ok(msg)) = next else {
                        break;
                    };
                    if let Ok(info) = msg.info() {
                        next_sequence = info.stream_sequence + 1;
                    }
                    let Ok(event) = v1::Event::decode(msg.payload.clone()) else {
                        continue;
                    };
                    let deployment = match &event.payload {
                        Some(Payload::Replica(r)) => r.deployment.clone(),
                        _ => String::new(),
                    };
                    sync::lock(&seen).push(Seen {
                        at: Instant::now(),
                        ty: event.r#type,
                        name: event.name,
                        deployment,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(log)
    }

    fn since(&self, start: Instant, ty: EventType) -> Vec<Seen> {
        let want = ty.to_string();
        sync::lock(&self.seen)
            .iter()
            .filter(|s| s.at >= start && s.ty == want)
            .cloned()
            .collect()
    }

    /// When each named thing first had an event of `ty` at or after `start`.
    fn first(&self, start: Instant, ty: EventType) -> HashMap<String, Instant> {
        self.first_of(start, &[ty])
    }

    /// When each named thing first had an event of any of `types` at or
    /// after `start`.
    fn first_of(&self, start: Instant, types: &[EventType]) -> HashMap<String, Instant> {
        let wanted: Vec<String> = types.iter().map(ToString::to_string).collect();
        let mut out = HashMap::new();
        for s in sync::lock(&self.seen)
            .iter()
            .filter(|s| s.at >= start && wanted.contains(&s.ty))
        {
            out.entry(s.name.clone()).or_insert(s.at);
        }
        out
    }

    /// When each deployment had `want` distinct replicas ready, counting
    /// replicas whose ready event came at or after its own `from` time.
    fn all_ready(&self, from: &HashMap<String, Instant>, want: usize) -> HashMap<String, Instant> {
        let mut ready: HashMap<&str, HashSet<&str>> = HashMap::new();
        let mut done = HashMap::new();
        let seen = sync::lock(&self.seen);
        let want_ty = EventType::ReplicaReady.to_string();
        for s in seen.iter().filter(|s| s.ty == want_ty) {
            let Some(start) = from.get(&s.deployment) else {
                continue;
            };
            if s.at < *start || done.contains_key(&s.deployment) {
                continue;
            }
            let set = ready.entry(&s.deployment).or_default();
            set.insert(&s.name);
            if set.len() >= want {
                done.insert(s.deployment.clone(), s.at);
            }
        }
        done
    }

    /// The longest time without a `replica.ready` event in `[from, to]`.
    fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let want = EventType::ReplicaReady.to_string();
        let seen = sync::lock(&self.seen);
        let mut last = from;
        let mut longest = Duration::ZERO;
        for s in seen
            .iter()
            .filter(|s| s.ty == want && s.at >= from && s.at <= to)
        {
            longest = longest.max(s.at - last);
            last = s.at;
        }
        longest.max(to.saturating_duration_since(last))
    }

    fn first_progress_after(&self, start: Instant) -> Option<Instant> {
        let wanted = [
            EventType::ReplicaReady.to_string(),
            EventType::ReplicaStarting.to_string(),
        ];
        sync::lock(&self.seen)
            .iter()
            .find(|s| s.at >= start && wanted.contains(&s.ty))
            .map(|s| s.at)
    }

    fn halted_since(&self, start: Instant) -> Vec<String> {
        self.since(start, EventType::RolloutHalted)
            .into_iter()
            .map(|s| s.name)
            .collect()
    }
}

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub max: Duration,
}

impl Spread {
    pub fn of(mut values: Vec<Duration>) -> Self {
        values.sort();
        let at = |q: f64| {
            if values.is_empty() {
                return Duration::ZERO;
            }
            let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
            values[i]
        };
        Self {
            count: values.len(),
            p50: at(0.5),
            p90: at(0.9),
            max: values.last().copied().unwrap_or_default(),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub place_placed: Spread,
    pub place_ready: Spread,
    pub place_wall: Duration,
    pub rollout: Spread,
    pub rollout_wall: Duration,
    pub placed_during_rollouts: Spread,
    /// One new deployment at a time into the loaded fleet: apply → placed.
    pub single_placed: Spread,
    /// One rollout at a time on the loaded fleet: start → complete.
    pub single_rollout: Spread,
    /// Hub restart: SIGKILL → the first replica progress, → every rollout
    /// of the round complete, and a deployment applied at the restart
    /// placed.
    pub restart_first_progress: Option<Duration>,
    /// SIGKILL → every rollout of the round not complete at the kill took
    /// its next announced step (stage started or completed, or complete).
    pub restart_progressing: Option<Duration>,
    pub restart_consistent: Option<Duration>,
    pub restart_new_placed: Option<Duration>,
    pub restart_rollout: Spread,
    /// Active-active: longest pause in replica progress after one instance
    /// of every service was killed, and before.
    pub instance_loss_pause: Option<(Duration, Duration)>,
    /// NATS cluster: the same around one server killed.
    pub nats_loss_pause: Option<(Duration, Duration, String)>,
    pub usage: Vec<(String, f64, u64)>,
    pub simulator_cpu: f64,
    pub simulator_rss: u64,
    pub traffic_per_placement: Option<(f64, f64)>,
    pub replicas_ready: usize,
    pub replicas_started: usize,
    pub halted: Vec<String>,
    /// `deployment.rebalanced` events: replicas moved by fleet changes
    /// (none is due in a run where no cluster fails).
    pub rebalanced: usize,
    pub total: Duration,
}

/// A deployment of the scenario, `version` in its engine's environment
/// (a new version is a new template: a rollout).
pub fn deployment_yaml(name: &str, scenario: &Scenario, version: u32) -> String {
    let n = scenario.clusters_per_deployment;
    format!(
        r#"apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: {name}}}
spec:
  model: {{preset: smollm2-135m-instruct}}
  runtime: candle
  replicas: {n}
  resources:
    gpu: {{count: 1}}
  placement:
    policy: PickN
    numberOfClusters: {n}
  engine:
    env: {{VERSION: "{version}"}}
  rollout:
    strategy: Staged
    maxUnavailable: 25%
    maxSurge: 25%
    stages:
      - {{name: wave-1, clusterSelector: {{matchLabels: {{wave: "1"}}}}}}
      - {{name: wave-2, clusterSelector: {{matchLabels: {{wave: "2"}}}}}}
      - {{name: wave-3, clusterSelector: {{matchLabels: {{wave: "3"}}}}}}
"#
    )
}

/// The name of deployment `i`.
pub fn deployment_name(i: usize) -> String {
    format!("d-{i:04}")
}

async fn apply(bus: &Bus, yaml: &str) -> anyhow::Result<()> {
    let docs = flotilla_cli::deployments::parse_documents(yaml)?;
    for doc in docs {
        let id = uuid_like(&doc);
        bus.publish(
            bus.subjects.control(ControlSubject::DeploymentApply),
            &doc,
            Some(&id),
        )
        .await?;
    }
    Ok(())
}

/// An idempotency key per distinct document.
fn uuid_like(doc: &v1::ModelDeployment) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    doc.encode_to_vec().hash(&mut h);
    let name = doc.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
    format!("bench-{name}-{:016x}", h.finish())
}

/// Waits until `done()` or the deadline; what was still missing on timeout.
async fn wait_for(
    what: &str,
    deadline: Duration,
    mut done: impl FnMut() -> Result<(), String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        match done() {
            Ok(()) => return Ok(()),
            Err(missing) if started.elapsed() > deadline => {
                bail!("{what}: not done within {deadline:?}: {missing}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn missing<'a>(
    want: impl Iterator<Item = &'a String>,
    have: &HashMap<String, Instant>,
) -> Result<(), String> {
    let absent: Vec<&String> = want.filter(|d| !have.contains_key(*d)).collect();
    if absent.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} missing, e.g. {:?}",
            absent.len(),
            &absent[..absent.len().min(5)]
        ))
    }
}

impl Scenario {
    /// Runs every phase and checks the end state.
    pub async fn run(&self, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
        let began = Instant::now();
        let shutdown = CancellationToken::new();
        let _stop = shutdown.clone().drop_guard();
        let mut hub = Hub::start(self).await?;
        let bus = hub.bus("bench").await?;
        let log = EventLog::follow(&bus, shutdown.clone()).await?;
        let cache_dir = tempfile::tempdir()?;
        let fleet = flotilla_executor::simulate::SimulatedFleet::start(
            flotilla_executor::simulate::SimulateConfig {
                bus: hub.bus_config()?,
                clusters: self.clusters,
                name_prefix: "sim".into(),
                gpus: flotilla_executor::declared::DeclaredGpus::parse(&self.gpus)
                    .map_err(|e| anyhow::anyhow!("gpus: {e}"))?,
                ready_after: self.ready_after,
                heartbeat_interval: self.heartbeat_interval,
                connections: (self.clusters / 125).clamp(1, 16),
                max_concurrent_starts: 32,
                cache_dir: cache_dir.path().to_path_buf(),
            },
            shutdown.clone(),
        )
        .await?;
        let clusters =
            RecordStore::<v1::ClusterRecord>::open(&bus, &bus.topology.clusters.name).await?;
        clusters.start_watch(shutdown.clone()).await?;
        let healthy = || {
            clusters.scan(|all| {
                all.filter(|(_, c)| c.health() == ClusterHealth::Healthy)
                    .count()
            })
        };
        wait_for("every cluster healthy", self.phase_deadline, || {
            let n = healthy();
            if n >= self.clusters {
                Ok(())
            } else {
                Err(format!("{n} of {} healthy", self.clusters))
            }
        })
        .await?;
        progress(&format!(
            "{} clusters healthy after {:.1?}",
            self.clusters,
            began.elapsed()
        ));
        let mut report = Report::default();
        let names: Vec<String> = (0..self.deployments).map(deployment_name).collect();
        let mut version: HashMap<String, u32> = names.iter().map(|n| (n.clone(), 1)).collect();

        // 1. place
        let traffic_before = hub.traffic().await;
        let phase = Instant::now();
        let mut applied = HashMap::new();
        let gap = Duration::from_secs_f64(1.0 / self.apply_rate.max(0.001));
        for (i, name) in names.iter().enumerate() {
            let due = phase + gap.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            applied.insert(name.clone(), Instant::now());
            apply(&bus, &deployment_yaml(name, self, 1)).await?;
        }
        let want = self.clusters_per_deployment;
        wait_for("every deployment ready", self.phase_deadline, || {
            missing(names.iter(), &log.all_ready(&applied, want))
        })
        .await?;
        report.place_wall = phase.elapsed();
        let placed = log.first(phase, EventType::DeploymentPlaced);
        let ready = log.all_ready(&applied, want);
        report.place_placed = Spread::of(
            names
                .iter()
                .filter_map(|n| Some(*placed.get(n)? - applied[n]))
                .collect(),
        );
        report.place_ready = Spread::of(
            names
                .iter()
                .filter_map(|n| Some(*ready.get(n)? - *applied.get(n)?))
                .collect(),
        );
        if let (Some(before), Some(after)) = (traffic_before, hub.traffic().await) {
            let n = self.deployments.max(1) as f64;
            report.traffic_per_placement = Some((
                (after.messages - before.messages) as f64 / n,
                (after.bytes - before.bytes) as f64 / n,
            ));
        }
        progress(&format!(
            "placed {} deployments in {:.1?}",
            self.deployments, report.place_wall
        ));

        // 1b. one at a time on the loaded fleet
        let singles: Vec<String> = (0..self.singles)
            .map(|i| deployment_name(self.deployments + 1 + NEW_DURING_ROLLOUTS + i))
            .collect();
        let mut placed_alone = Vec::new();
        for name in &singles {
            let at = Instant::now();
            apply(&bus, &deployment_yaml(name, self, 1)).await?;
            let from = HashMap::from([(name.clone(), at)]);
            wait_for("a deployment applied alone", self.phase_deadline, || {
                missing([name].into_iter(), &log.all_ready(&from, want))
            })
            .await?;
            if let Some(t) = log.first(at, EventType::DeploymentPlaced).get(name) {
                placed_alone.push(*t - at);
            }
            version.insert(name.clone(), 1);
        }
        report.single_placed = Spread::of(placed_alone);
        let mut rolled_alone = Vec::new();
        for name in names.iter().rev().take(self.singles) {
            let (_, spread) = self
                .rollout_round(
                    &bus,
                    &log,
                    std::slice::from_ref(name),
                    &mut version,
                    |_| async { Ok(()) },
                )
                .await?;
            rolled_alone.push(spread.max);
        }
        report.single_rollout = Spread::of(rolled_alone);
        if self.singles > 0 {
            progress(&format!(
                "{} placed and {} rolled out one at a time",
                self.singles, self.singles
            ));
        }

        // 2. concurrent staged rollouts, and new placements meanwhile
        let batch: Vec<String> = names.iter().take(self.rollouts).cloned().collect();
        let during: Vec<String> = (0..NEW_DURING_ROLLOUTS)
            .map(|i| deployment_name(self.deployments + 1 + i))
            .collect();
        let applied_during = Arc::new(Mutex::new(HashMap::new()));
        let (wall, spread) = {
            let (during, applied_during, bus) = (&during, applied_during.clone(), &bus);
            self.rollout_round(bus, &log, &batch, &mut version, move |_| async move {
                for name in during {
                    sync::lock(&applied_during).insert(name.clone(), Instant::now());
                    apply(bus, &deployment_yaml(name, self, 1)).await?;
                }
                Ok(())
            })
            .await?
        };
        report.rollout_wall = wall;
        report.rollout = spread;
        let applied_during = sync::lock(&applied_during).clone();
        wait_for(
            "the deployments applied during the rollouts",
            self.phase_deadline,
            || missing(during.iter(), &log.all_ready(&applied_during, want)),
        )
        .await?;
        let placed = log.first(phase, EventType::DeploymentPlaced);
        report.placed_during_rollouts = Spread::of(
            during
                .iter()
                .filter_map(|n| Some(*placed.get(n)? - applied_during[n]))
                .collect(),
        );
        for name in during {
            version.insert(name, 1);
        }
        progress(&format!(
            "{} concurrent rollouts done in {:.1?}",
            batch.len(),
            wall
        ));

        // 3. every hub service killed mid-rollout
        if self.hub_restart {
            let extra = deployment_name(self.deployments);
            let restarted = Arc::new(Mutex::new(None));
            let kill_after = self.kill_after;
            let round = Instant::now();
            let (_, spread) = {
                let restarted = restarted.clone();
                let extra = extra.clone();
                let hub = &mut hub;
                let bus = &bus;
                self.rollout_round(bus, &log, &batch, &mut version, move |_| async move {
                    tokio::time::sleep(kill_after).await;
                    hub.kill_and_restart_all().await?;
                    *sync::lock(&restarted) = Some(Instant::now());
                    apply(bus, &deployment_yaml(&extra, self, 1)).await
                })
                .await?
            };
            report.restart_rollout = spread;
            let at = sync::lock(&restarted).ok_or_else(|| anyhow::anyhow!("no restart"))?;
            // A rollout done before the kill counts as consistent at once.
            let done = log.first(round, EventType::RolloutCompleted);
            report.restart_consistent = batch
                .iter()
                .map(|d| done.get(d).map(|t| t.saturating_duration_since(at)))
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max());
            report.restart_first_progress = log.first_progress_after(at).map(|t| t - at);
            // Progressing again: each rollout not complete at the kill
            // took a step the restarted rollout service announced.
            let steps = log.first_of(
                at,
                &[
                    EventType::RolloutStageStarted,
                    EventType::RolloutStageCompleted,
                    EventType::RolloutCompleted,
                ],
            );
            report.restart_progressing = batch
                .iter()
                .map(|d| match done.get(d) {
                    Some(t) if *t < at => Some(Duration::ZERO),
                    _ => steps.get(d).map(|t| t.saturating_duration_since(at)),
                })
                .collect::<Option<Vec<_>>>()
                .and_then(|v| v.into_iter().max());
            let from = HashMap::from([(extra.clone(), at)]);
            wait_for(
                "the deployment applied at the restart",
                self.phase_deadline,
                || missing([&extra].into_iter(), &log.all_ready(&from, want)),
            )
            .await?;
            report.restart_new_placed = log
                .first(at, EventType::DeploymentPlaced)
                .get(&extra)
                .map(|t| *t - at);
            version.insert(extra, 1);
            progress(&format!(
                "hub restart: consistent {:.1?} after the kill",
                report.restart_consistent.unwrap_or_default()
            ));
        }

        // 4. one instance of every service killed (active-active)
        if self.instances > 1 {
            let hub = &mut hub;
            report.instance_loss_pause = self
                .round_with_kill(&bus, &log, &batch, &mut version, || async move {
                    hub.kill_first_instances().await;
                    Ok(())
                })
                .await?
                .map(|(after, before, ())| (after, before));
            progress("one instance of each service killed: done");
        }

        // 5. one nats-server killed
        if self.nats_servers > 1 {
            let hub = &mut hub;
            report.nats_loss_pause = self
                .round_with_kill(&bus, &log, &batch, &mut version, || async move {
                    Ok(hub.kill_one_nats_server().await?.unwrap_or_default())
                })
                .await?;
            progress("one nats-server killed: done");
        }

        report.usage = hub.usage();
        let me = std::process::id();
        report.simulator_cpu = cpu_seconds(me).unwrap_or(0.0);
        report.simulator_rss = peak_rss(me).unwrap_or(0);
        report.halted = log.halted_since(began);
        report.rebalanced = log.since(began, EventType::DeploymentRebalanced).len();
        let (ready, started) = verify(&bus, &fleet, &version, self).await?;
        report.replicas_ready = ready;
        report.replicas_started = started;
        report.total = began.elapsed();
        shutdown.cancel();
        fleet.wait().await;
        Ok(report)
    }

    /// A rollout round with `kill` `kill_after` into it: the longest pause
    /// in replica progress after the kill (while the round's rollouts run,
    /// at most [`PAUSE_WINDOW`]) and in as long before it, and what `kill`
    /// said.
    async fn round_with_kill<K, Fut, T>(
        &self,
        bus: &Bus,
        log: &EventLog,
        batch: &[String],
        version: &mut HashMap<String, u32>,
        kill: K,
    ) -> anyhow::Result<Option<(Duration, Duration, T)>>
    where
        K: FnOnce() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<T>>,
    {
        let killed = Arc::new(Mutex::new(None));
        let kill_after = self.kill_after;
        let round = Instant::now();
        let (wall, _) = {
            let killed = killed.clone();
            self.rollout_round(bus, log, batch, version, move |_| async move {
                tokio::time::sleep(kill_after).await;
                let at = Instant::now();
                let said = kill().await?;
                *sync::lock(&killed) = Some((at, said));
                Ok(())
            })
            .await?
        };
        let Some((at, said)) = sync::lock(&killed).take() else {
            return Ok(None);
        };
        let end = (at + PAUSE_WINDOW).min(round + wall).max(at);
        let before = at.checked_sub(kill_after).unwrap_or(at);
        Ok(Some((
            log.longest_pause(at, end),
            log.longest_pause(before, at),
            said,
        )))
    }

    /// Gives `batch` the next template at once, runs `meanwhile` beside
    /// it, and waits until every one of those rollouts completed. The
    /// round's wall time and its rollouts' start → complete.
    async fn rollout_round<F, Fut>(
        &self,
        bus: &Bus,
        log: &EventLog,
        batch: &[String],
        version: &mut HashMap<String, u32>,
        meanwhile: F,
    ) -> anyhow::Result<(Duration, Spread)>
    where
        F: FnOnce(()) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let phase = Instant::now();
        for name in batch {
            let v = version.entry(name.clone()).or_insert(1);
            *v += 1;
            apply(bus, &deployment_yaml(name, self, *v)).await?;
        }
        meanwhile(()).await?;
        let waited = wait_for("every rollout complete", self.phase_deadline, || {
            missing(batch.iter(), &log.first(phase, EventType::RolloutCompleted))
        })
        .await;
        if let Err(e) = waited {
            // Tells a rollout that stalled from an event that was missed.
            let stored = stored_rollouts(bus, batch, version).await;
            bail!("{e}; as stored: {stored}");
        }
        let wall = phase.elapsed();
        let started = log.first(phase, EventType::RolloutStarted);
        let done = log.first(phase, EventType::RolloutCompleted);
        let spread = Spread::of(
            batch
                .iter()
                .filter_map(|d| Some(*done.get(d)? - *started.get(d)?))
                .collect(),
        );
        Ok((wall, spread))
    }
}

/// The stored rollout of each deployment in `batch` not at its newest
/// version's completion, in a line each.
async fn stored_rollouts(bus: &Bus, batch: &[String], version: &HashMap<String, u32>) -> String {
    let states = match RecordStore::<v1::RolloutState>::open(bus, &bus.topology.rollouts.name).await
    {
        Ok(store) => store,
        Err(e) => return format!("rollouts unreadable: {e}"),
    };
    let mut out = Vec::new();
    for name in batch {
        let line = match states.get(name).await {
            Ok(Some((s, _))) if s.phase() == v1::RolloutPhase::Complete => continue,
            Ok(Some((s, _))) => format!(
                "{name} (version {}): {:?} spec generation {}: {}",
                version.get(name).copied().unwrap_or_default(),
                s.phase(),
                s.deployment_generation,
                s.message
            ),
            Ok(None) => format!("{name}: no rollout stored"),
            Err(e) => format!("{name}: {e}"),
        };
        out.push(line);
    }
    if out.is_empty() {
        "every one complete (their events were not seen)".into()
    } else {
        out.join("; ")
    }
}

/// The end state: every deployment has exactly its replicas ready, all of
/// its newest version, none starting; the simulated clusters run exactly
/// those; no replica was started or stopped twice. Ready replicas and
/// starts in total.
pub async fn verify(
    bus: &Bus,
    fleet: &flotilla_executor::simulate::SimulatedFleet,
    version: &HashMap<String, u32>,
    scenario: &Scenario,
) -> anyhow::Result<(usize, usize)> {
    let want = scenario.clusters_per_deployment;
    let mut problems = Vec::new();
    // Converged when rollouts are complete, but a stop's record may trail
    // its rollout's last event by a moment. Read right after a nats-server
    // was killed, the bucket's stream may still be electing a leader and
    // leave a read unanswered: that is tried again within the same window.
    let started = Instant::now();
    let window = Duration::from_secs(30);
    let (ready_total, by_deployment) = loop {
        let read = async {
            RecordStore::<ReplicaStatus>::open(bus, &bus.topology.replicas.name)
                .await?
                .list()
                .await
        };
        let all = match read.await {
            Ok(all) => all,
            Err(e) if started.elapsed() < window => {
                tracing::debug!("reading KV replicas: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut by: HashMap<String, (usize, usize)> = HashMap::new();
        for r in &all {
            let entry = by.entry(r.deployment.clone()).or_default();
            match r.phase() {
                ReplicaPhase::Ready => entry.0 += 1,
                ReplicaPhase::Starting => entry.1 += 1,
                _ => {}
            }
        }
        let total: usize = by.values().map(|(r, _)| r).sum();
        let settled = version
            .keys()
            .all(|d| by.get(d).is_some_and(|(r, s)| *r == want && *s == 0))
            && fleet.running() == total;
        if settled || started.elapsed() > window {
            break (total, by);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for d in version.keys() {
        let (ready, starting) = by_deployment.get(d).copied().unwrap_or_default();
        if ready != want || starting != 0 {
            problems.push(format!(
                "{d}: {ready} ready, {starting} starting (want {want} ready)"
            ));
        }
    }
    if fleet.running() != ready_total {
        problems.push(format!(
            "the simulated clusters run {} replicas, KV has {ready_total} ready",
            fleet.running()
        ));
    }
    let tally = fleet.tally();
    let twice: Vec<_> = tally
        .starts
        .iter()
        .filter(|(_, n)| **n > 1)
        .take(5)
        .collect();
    if !twice.is_empty() {
        problems.push(format!("started more than once: {twice:?}"));
    }
    let stopped_twice: Vec<_> = tally
        .stops
        .iter()
        .filter(|(_, n)| **n > 1)
        .take(5)
        .collect();
    if !stopped_twice.is_empty() {
        problems.push(format!("stopped more than once: {stopped_twice:?}"));
    }
    if !problems.is_empty() {
        bail!(
            "the fleet did not end as it should ({} problems): {}",
            problems.len(),
            problems[..problems.len().min(10)].join("; ")
        );
    }
    Ok((ready_total, tally.starts.len()))
}

/// Where the bench's binaries are: built by `cargo build --workspace --bins`.
pub fn hub_binaries() -> Vec<PathBuf> {
    HUB_SERVICES
        .iter()
        .map(|s| target_bin(&format!("flotilla-{s}")))
        .collect()
}
