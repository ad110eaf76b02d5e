//! A local fleet whose member clusters are separate networks: what
//! `flotilla up --isolated` runs and what the integration tests' isolated
//! fleets run, assembled here once (as [`crate::fleet`] assembles the
//! plain local fleet).
//!
//! The **hub** stays in this host's network: its nats-server (JetStream,
//! plus a leaf node port on every address of the host, `0.0.0.0`, so that
//! each member reaches it at the hub side of its own link), the control
//! services and the global gateway, which users reach at `127.0.0.1`.
//!
//! Each **member** is a network namespace of its own ([`flotilla_netns`]),
//! joined to the hub by one link. In it run, as child processes:
//!
//! - a leaf nats-server (no JetStream) on the namespace's own
//!   `127.0.0.1:4222`, connected to the hub's leaf node port over the link;
//! - the cluster's executor, on that leaf; its replicas listen on the
//!   member's pod address, which the hub has no route to, like a pod IP;
//! - the cluster edge, `flotilla-gateway --cluster NAME`: HTTPS with
//!   mutual TLS on the member's link address (the only thing of the member
//!   the hub reaches; the global gateway presents a client certificate of
//!   the fleet's CA) and plain HTTP on the pod address for the cluster's
//!   own clients.
//!
//! Every port inside a member is fixed ([`LEAF_PORT`], [`EDGE_PORT`], ...):
//! each namespace has addresses of its own, so members never collide.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use flotilla_kit::{Bus, BusArgs, BusConfig, RecordStore, Shutdown};
use flotilla_netns::{Member, Topology, TopologySpec};
use flotilla_proto::v1::{ClusterHealth, ClusterRecord};
use tokio::process::{Child, Command};

use crate::fleet::{ControlPlane, SimulatedCluster, local_clusters, stop_gracefully};

/// The leaf nats-server's client port, on each member's own loopback.
pub const LEAF_PORT: u16 = 4222;
/// The leaf's monitoring port (`/leafz`), on each member's own loopback.
pub const LEAF_MONITOR_PORT: u16 = 8222;
/// The edge's HTTPS port, on each member's link address.
pub const EDGE_PORT: u16 = 8443;
/// The edge's plain HTTP port for the cluster's own clients, on each
/// member's pod address.
pub const EDGE_LOCAL_PORT: u16 = 8080;
/// The hub's leaf node port in `flotilla up --isolated` (nats-server's
/// usual one).
pub const DEFAULT_HUB_LEAF_PORT: u16 = 7422;
/// How often readiness is looked at again.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// What the hub's nats-server needs beyond a plain JetStream server: a leaf
/// node port on every address of the host (each member reaches it at the
/// hub side of its own link), and JetStream for the leaves' clients.
///
/// `store_dir`: the JetStream store, for a server started with `-c` alone
/// (the harness's); `None` when the command line gives it (`-sd`).
pub fn hub_server_config(leaf_port: u16, store_dir: Option<&Path>) -> String {
    let mut out = String::from(
        "# The hub of an isolated local fleet: member clusters' leaf servers\n\
         # connect to the leaf node port over their own links.\n",
    );
    if let Some(dir) = store_dir {
        out.push_str(&format!(
            "jetstream {{\n  store_dir: {:?}\n}}\n",
            dir.display().to_string()
        ));
    }
    out.push_str(&format!(
        "leafnodes {{\n  listen: \"0.0.0.0:{leaf_port}\"\n}}\n"
    ));
    out.push_str(JS_ACROSS_LEAVES);
    out
}

/// nats-server denies the JetStream API, `$KV.>` and `$OBJ.>` across a leaf
/// connection of an ordinary account unless the two sides share their
/// system account (JetStream is then *extended*). The leaves here have no
/// JetStream and share nothing; this option, on both sides, lets the
/// global account's JetStream traffic cross to the hub's JetStream.
const JS_ACROSS_LEAVES: &str = "# The leaves' clients use the hub's JetStream (the global account's\n\
# traffic crosses the leaf connections).\n\
default_js_domain: {\"$G\": \"\"}\n";

/// The configuration of member `cluster`'s leaf nats-server: no JetStream,
/// clients on its own `127.0.0.1:LEAF_PORT`, monitoring on
/// `127.0.0.1:LEAF_MONITOR_PORT`, connected to every URL of `hub_urls`
/// (`host:port` of the hub's leaf node ports as the member reaches them).
pub fn leaf_server_config(cluster: &str, hub_urls: Vec<String>) -> anyhow::Result<String> {
    // The hub of a local fleet has no users: the leaf's login is sent and
    // not checked. The executor's user keeps the file the same as for a
    // hub that has them.
    let leaf = flotilla_nats_auth::LeafServerConfig::member(
        cluster,
        "unused",
        format!("127.0.0.1:{LEAF_PORT}"),
        hub_urls,
    )?;
    let mut out = flotilla_nats_auth::render_leaf_server_config(&leaf)?;
    // Monitoring on the member's loopback only (`http_port` would listen on
    // every address, the link's too).
    out.push_str(&format!("http: \"127.0.0.1:{LEAF_MONITOR_PORT}\"\n"));
    Ok(out)
}

/// The programs a member runs.
#[derive(Debug, Clone)]
pub struct Programs {
    pub nats_server: PathBuf,
    /// The executor: a program and the arguments before its flags
    /// (`flotilla executor --`, or `flotilla-executor` and none).
    pub executor: (PathBuf, Vec<OsString>),
    /// `flotilla-gateway`, run as each cluster's edge.
    pub gateway: PathBuf,
}

impl Programs {
    /// The executor as `flotilla executor --` of this very binary, the edge
    /// as the `flotilla-gateway` built next to it.
    pub fn beside_this_binary(nats_server: PathBuf) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the flotilla binary")?;
        let gateway = exe.with_file_name("flotilla-gateway");
        if !gateway.is_file() {
            bail!(
                "{} is missing: each cluster's edge runs flotilla-gateway; build it with `cargo build -p flotilla-gateway`",
                gateway.display()
            );
        }
        Ok(Self {
            nats_server,
            executor: (exe, vec!["executor".into(), "--".into()]),
            gateway,
        })
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct MembersSpec {
    pub clusters: Vec<SimulatedCluster>,
    /// The hub's leaf node ports (one per hub server); each member reaches
    /// them at the hub side of its link.
    pub hub_leaf_ports: Vec<u16>,
    /// Where configurations, certificates, logs and model caches go.
    pub dir: PathBuf,
    pub programs: Programs,
    /// Executor flags after the simulated cluster's own (tests: a shorter
    /// heartbeat, this workspace's runner).
    pub extra_executor_flags: Vec<OsString>,
    /// Names the namespaces `<prefix>-<cluster>` (`flotilla up` uses
    /// `flotilla`); `None`: a prefix unique on the host (tests).
    pub namespace_prefix: Option<String>,
    /// How long each member may take to be ready.
    pub ready_within: Duration,
}

/// The files the global gateway reaches the edges with: the CA the edges'
/// certificates are signed by, and its own client certificate.
#[derive(Debug, Clone)]
pub struct EdgeTrust {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// One running member cluster.
#[derive(Debug)]
pub struct RunningMember {
    pub cluster: SimulatedCluster,
    pub netns: Member,
    /// `https://<link address>:EDGE_PORT`, the edge as the hub reaches it.
    pub edge_url: String,
    /// `http://<pod address>:EDGE_LOCAL_PORT`, the edge as the cluster's own
    /// clients reach it (inside the namespace only).
    pub edge_local_url: String,
    /// `nats://127.0.0.1:LEAF_PORT`, inside the namespace.
    pub leaf_url: String,
    /// This member's configuration and logs (`leaf.log`, `executor.log`,
    /// `edge.log`).
    pub dir: PathBuf,
    pub leaf: Child,
    pub executor: Child,
    pub edge: Child,
}

impl RunningMember {
    pub fn name(&self) -> &str {
        &self.cluster.name
    }

    /// The process ids of the leaf, the executor and the edge (while they
    /// run), for fault injection.
    pub fn leaf_pid(&self) -> Option<u32> {
        self.leaf.id()
    }

    pub fn executor_pid(&self) -> Option<u32> {
        self.executor.id()
    }

    pub fn edge_pid(&self) -> Option<u32> {
        self.edge.id()
    }
}

/// An isolated fleet's namespaces and certificates, before its processes
/// start: the global gateway is configured with [`edge_trust`](Self::edge_trust)
/// before [`start`](Self::start). Dropping it removes the namespaces.
#[derive(Debug)]
pub struct Prepared {
    spec: MembersSpec,
    edge_trust: EdgeTrust,
    /// Each cluster's edge certificate and key, in the order of the spec.
    edge_certs: Vec<(PathBuf, PathBuf)>,
    topology: Topology,
}

impl Prepared {
    /// Creates a namespace per cluster of `spec` ([`flotilla_netns`]) and
    /// the fleet's certificates: a CA, a server certificate per edge for its
    /// link address, and the global gateway's client certificate, under
    /// `<dir>/tls`.
    pub async fn create(spec: MembersSpec) -> anyhow::Result<Self> {
        if spec.hub_leaf_ports.is_empty() {
            bail!("an isolated fleet needs the hub's leaf node port");
        }
        let names: Vec<String> = spec.clusters.iter().map(|c| c.name.clone()).collect();
        let mut topology = TopologySpec::new(names);
        if let Some(prefix) = &spec.namespace_prefix {
            topology = topology.namespace_prefix(prefix);
        }
        let topology = tokio::task::spawn_blocking(move || Topology::create(&topology))
            .await
            .context("creating the network namespaces")??;
        std::fs::create_dir_all(&spec.dir)
            .with_context(|| format!("creating {}", spec.dir.display()))?;
        let (edge_trust, edge_certs) = certificates(&spec, &topology)?;
        Ok(Self {
            spec,
            edge_trust,
            edge_certs,
            topology,
        })
    }

    /// What the global gateway reaches the edges with.
    pub fn edge_trust(&self) -> &EdgeTrust {
        &self.edge_trust
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Starts each member's leaf, executor and edge; returns once every
    /// leaf is connected to the hub, every edge answers `/health` on its
    /// local listener and every cluster is healthy in KV `clusters` (read
    /// through `bus`, a client of the hub; inventory must be running).
    pub async fn start(self, bus: &Bus) -> anyhow::Result<Members> {
        let Self {
            spec,
            edge_trust,
            edge_certs,
            topology,
        } = self;
        let mut members = Members {
            members: Vec::new(),
            edge_trust,
            topology,
        };
        let deadline = Instant::now() + spec.ready_within;
        let mut starting = Vec::new();
        for cluster in &spec.clusters {
            let netns = members.topology.member(&cluster.name)?.clone();
            let (dir, leaf) = start_leaf(&spec, cluster, &netns)?;
            starting.push(Starting {
                cluster: cluster.clone(),
                netns,
                dir,
                leaf,
            });
        }
        for s in &mut starting {
            let mut ready =
                Readiness::new(&s.cluster.name, &s.netns, &s.dir, bus, deadline).await?;
            ready.wait(Process::Leaf, &mut s.leaf).await?;
        }
        for (s, (cert, key)) in starting.into_iter().zip(&edge_certs) {
            let started = s.start_rest(&spec, &members.edge_trust, cert, key)?;
            members.members.push(started);
        }
        for m in &mut members.members {
            let mut ready =
                Readiness::new(&m.cluster.name, &m.netns, &m.dir, bus, deadline).await?;
            ready.wait(Process::Edge, &mut m.edge).await?;
            ready.wait(Process::Executor, &mut m.executor).await?;
            tracing::info!(cluster = %m.cluster.name, namespace = m.netns.namespace(), "member cluster ready");
        }
        Ok(members)
    }
}

/// The member clusters of an isolated fleet, running. Dropping it kills
/// their processes and removes their namespaces; [`stop`](Self::stop) stops
/// them gracefully first.
#[derive(Debug)]
pub struct Members {
    members: Vec<RunningMember>,
    pub edge_trust: EdgeTrust,
    // Last: dropped after the children, so the namespaces are removed once
    // their processes are killed.
    topology: Topology,
}

impl Members {
    pub fn members(&self) -> &[RunningMember] {
        &self.members
    }

    pub fn members_mut(&mut self) -> &mut [RunningMember] {
        &mut self.members
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> Option<&RunningMember> {
        self.members.iter().find(|m| m.name() == name)
    }

    pub fn member_mut(&mut self, name: &str) -> Option<&mut RunningMember> {
        self.members.iter_mut().find(|m| m.name() == name)
    }

    /// The namespaces and links ([`Topology::cut`], [`Topology::heal`]).
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// The processes that have exited since the last call, as
    /// `(cluster, process, status)`; each is told once.
    pub fn exited(&mut self) -> Vec<(String, &'static str, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for member in &mut self.members {
            for (what, child) in [
                ("leaf", &mut member.leaf),
                ("executor", &mut member.executor),
                ("edge", &mut member.edge),
            ] {
                // A reaped child has no id: told already.
                if child.id().is_some()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    out.push((member.cluster.name.clone(), what, status));
                }
            }
        }
        out
    }

    /// Stops every member: edges and executors first (an executor's exit
    /// stops its replicas), then the leaves; then removes the namespaces
    /// with whatever is left in them.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let mut stopping = tokio::task::JoinSet::new();
        for mut member in std::mem::take(&mut self.members) {
            stopping.spawn(async move {
                tokio::join!(
                    stop_gracefully(&mut member.edge),
                    stop_gracefully(&mut member.executor)
                );
                stop_gracefully(&mut member.leaf).await;
            });
        }
        while stopping.join_next().await.is_some() {}
        let topology = self.topology;
        tokio::task::spawn_blocking(move || topology.remove())
            .await
            .context("removing the network namespaces")??;
        Ok(())
    }
}

/// A CA for the fleet, a server certificate per edge (for its link
/// address) and the global gateway's client certificate, written under
/// `<dir>/tls`.
fn certificates(
    spec: &MembersSpec,
    topology: &Topology,
) -> anyhow::Result<(EdgeTrust, Vec<(PathBuf, PathBuf)>)> {
    let dir = spec.dir.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let authority = flotilla_tls::Authority::generate("Flotilla local fleet CA")?;
    let ca = dir.join("ca.crt");
    authority.write_cert(&ca)?;
    let (client_cert, client_key) = authority
        .issue_client("flotilla-gateway")?
        .write(&dir, "gateway-client")?;
    let mut edges = Vec::new();
    for cluster in &spec.clusters {
        let member = topology.member(&cluster.name)?;
        let issued = authority.issue_server(&[
            member.link_address().to_string(),
            format!("edge.{}", cluster.name),
        ])?;
        edges.push(issued.write(&dir, &format!("edge-{}", cluster.name))?);
    }
    Ok((
        EdgeTrust {
            ca,
            client_cert,
            client_key,
        },
        edges,
    ))
}

/// Writes `cluster`'s leaf configuration and starts its leaf nats-server
/// in its namespace; the member's folder and the leaf.
fn start_leaf(
    spec: &MembersSpec,
    cluster: &SimulatedCluster,
    netns: &Member,
) -> anyhow::Result<(PathBuf, Child)> {
    let dir = spec.dir.join(&cluster.name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hub = netns.hub_address();
    let hub_urls = spec
        .hub_leaf_ports
        .iter()
        .map(|port| format!("{hub}:{port}"))
        .collect();
    let leaf_conf = dir.join("leaf.conf");
    std::fs::write(&leaf_conf, leaf_server_config(&cluster.name, hub_urls)?)
        .with_context(|| format!("writing {}", leaf_conf.display()))?;
    let mut leaf = netns.tokio_command(&spec.programs.nats_server);
    leaf.arg("-c").arg(&leaf_conf);
    let leaf = spawn(
        leaf,
        &dir.join("leaf.log"),
        &cluster.name,
        "leaf nats-server",
    )?;
    Ok((dir, leaf))
}

/// A member's processes as they start: the leaf first, then the rest
/// once the leaf reaches the hub's JetStream (an executor provisions the
/// bus as it starts).
struct Starting {
    cluster: SimulatedCluster,
    netns: Member,
    dir: PathBuf,
    leaf: Child,
}

impl Starting {
    /// Starts the executor and the edge on the leaf.
    fn start_rest(
        self,
        spec: &MembersSpec,
        trust: &EdgeTrust,
        edge_cert: &Path,
        edge_key: &Path,
    ) -> anyhow::Result<RunningMember> {
        let Self {
            cluster,
            netns,
            dir,
            leaf,
        } = self;
        let leaf_url = format!("nats://127.0.0.1:{LEAF_PORT}");
        let inbox = flotilla_nats_auth::Role::executor(&cluster.name)?.inbox_prefix();
        let edge_url = format!("https://{}:{EDGE_PORT}", netns.link_address());
        let edge_local_url = format!("http://{}:{EDGE_LOCAL_PORT}", netns.pod_address());

        let (program, leading) = &spec.programs.executor;
        let mut executor = netns.tokio_command(program);
        executor
            .args(leading)
            .args(cluster.executor_flags(&leaf_url, &spec.dir.join("cache")))
            .arg("--replica-host")
            .arg(netns.pod_address().to_string())
            .args(["--edge-url", &edge_url])
            .args(&spec.extra_executor_flags)
            .env("FLOTILLA_NATS_INBOX_PREFIX", &inbox);
        let executor = spawn(
            executor,
            &dir.join("executor.log"),
            &cluster.name,
            "executor",
        )?;

        let mut edge = netns.tokio_command(&spec.programs.gateway);
        edge.args(["--cluster", &cluster.name])
            .args(["--nats-url", &leaf_url])
            .arg("--listen")
            .arg(format!("{}:{EDGE_PORT}", netns.link_address()))
            .arg("--tls-cert")
            .arg(edge_cert)
            .arg("--tls-key")
            .arg(edge_key)
            .arg("--tls-client-ca")
            .arg(&trust.ca)
            .arg("--local-listen")
            .arg(format!("{}:{EDGE_LOCAL_PORT}", netns.pod_address()))
            // An edge serves whatever region it is in, with no API keys of
            // its own: the global gateway checks those.
            .arg("--region=")
            .env_remove("FLOTILLA_API_KEYS")
            .env("FLOTILLA_NATS_INBOX_PREFIX", &inbox);
        let edge = spawn(edge, &dir.join("edge.log"), &cluster.name, "edge")?;

        Ok(RunningMember {
            cluster,
            netns,
            edge_url,
            edge_local_url,
            leaf_url,
            dir,
            leaf,
            executor,
            edge,
        })
    }
}

fn spawn(mut command: Command, log: &Path, cluster: &str, what: &str) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {what} of {cluster}"))
}

/// A process of a member, in the order they become ready.
#[derive(Debug, Clone, Copy)]
enum Process {
    Leaf,
    Edge,
    Executor,
}

impl Process {
    fn name(self) -> &'static str {
        match self {
            Self::Leaf => "leaf",
            Self::Edge => "edge",
            Self::Executor => "executor",
        }
    }

    fn readiness(self) -> &'static str {
        match self {
            Self::Leaf => "leaf nats-server connected to the hub's JetStream",
            Self::Edge => "edge answering /health on its local listener",
            Self::Executor => "healthy cluster in KV clusters",
        }
    }
}

/// Waiting for a member's processes to be ready, each with the same
/// deadline; a process that exits first fails the wait with the end of its
/// log.
struct Readiness<'a> {
    cluster: &'a str,
    netns: &'a Member,
    dir: &'a Path,
    clusters: RecordStore<ClusterRecord>,
    deadline: Instant,
}

impl<'a> Readiness<'a> {
    async fn new(
        cluster: &'a str,
        netns: &'a Member,
        dir: &'a Path,
        bus: &Bus,
        deadline: Instant,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            cluster,
            netns,
            dir,
            clusters: RecordStore::open(bus, &bus.topology.clusters.name).await?,
            deadline,
        })
    }

    /// Whether `process` is ready now: the leaf is connected to the hub and
    /// has its JetStream API, the edge answers `/health` on its local
    /// listener, the cluster is healthy in KV.
    async fn ready(&self, process: Process) -> anyhow::Result<bool> {
        Ok(match process {
            Process::Leaf => {
                let monitor = SocketAddr::from(([127, 0, 0, 1], LEAF_MONITOR_PORT));
                in_member(self.netns, move || {
                    http_get(monitor, "/leafz?subs=1", POLL_EVERY * 5)
                        .is_ok_and(|(status, body)| status == 200 && reaches_hub_jetstream(&body))
                })
                .await?
            }
            Process::Edge => {
                let local = SocketAddr::new(IpAddr::V4(self.netns.pod_address()), EDGE_LOCAL_PORT);
                in_member(self.netns, move || {
                    http_get(local, "/health", POLL_EVERY * 5)
                        .is_ok_and(|(status, _)| status == 200)
                })
                .await?
            }
            Process::Executor => self
                .clusters
                .get(self.cluster)
                .await?
                .is_some_and(|(r, _)| r.health() == ClusterHealth::Healthy),
        })
    }

    async fn wait(&mut self, process: Process, child: &mut Child) -> anyhow::Result<()> {
        let name = self.cluster;
        loop {
            if self.ready(process).await? {
                return Ok(());
            }
            let log = self.dir.join(format!("{}.log", process.name()));
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the {} of {name} exited ({status}) before it was ready; {}:\n{}",
                    process.name(),
                    log.display(),
                    log_tail(&log)
                );
            }
            if Instant::now() >= self.deadline {
                bail!(
                    "{name}: no {} in time; {}:\n{}",
                    process.readiness(),
                    log.display(),
                    log_tail(&log)
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

/// Whether a leaf's `/leafz?subs=1` shows a connection to the hub over
/// which the hub's JetStream API is reachable.
fn reaches_hub_jetstream(leafz: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(leafz) else {
        return false;
    };
    v["leafs"].as_array().is_some_and(|leafs| {
        leafs.iter().any(|leaf| {
            leaf["subscriptions_list"]
                .as_array()
                .is_some_and(|subs| subs.iter().any(|s| s == "$JS.API.>"))
        })
    })
}

/// Runs blocking `work` on a thread in `member`'s namespace.
async fn in_member<T, F>(member: &Member, work: F) -> anyhow::Result<T>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let member = member.clone();
    let done = tokio::task::spawn_blocking(move || member.within(work)).await??;
    Ok(done)
}

/// A plain HTTP/1.0 GET of `path` at `addr`, made from the calling thread's
/// network namespace (inside [`Member::within`] for a member's): the status
/// and the body. For readiness checks of processes that listen only inside
/// a member; not a general HTTP client.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {answer:.80}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// The start and the end of a log, for an error: what a process said
/// first (an error at start) and last.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= 16 {
        return lines.join("\n");
    }
    format!(
        "{}\n…\n{}",
        lines[..4].join("\n"),
        lines[lines.len() - 12..].join("\n")
    )
}

/// The global gateway of an isolated fleet, in this process on `listen`:
/// the local fleet's settings (every region, no API keys), reaching every
/// cluster through its edge with `trust`.
pub fn global_gateway_config(
    bus: &BusConfig,
    listen: SocketAddr,
    trust: &EdgeTrust,
) -> anyhow::Result<flotilla_gateway::Config> {
    let mut args: Vec<OsString> = vec!["flotilla-gateway".into(), "--listen".into()];
    args.push(listen.to_string().into());
    args.extend([
        "--edge-ca".into(),
        trust.ca.clone().into(),
        "--edge-client-cert".into(),
        trust.client_cert.clone().into(),
        "--edge-client-key".into(),
        trust.client_key.clone().into(),
    ]);
    let mut config = <flotilla_gateway::Args as clap::Parser>::try_parse_from(args)
        .context("the global gateway's edge flags")?
        .validate()?;
    config.bus = bus.clone();
    config.region = String::new();
    config.api_keys = Vec::new();
    Ok(config)
}

/// `flotilla up --isolated`: `flotilla up` with each simulated cluster in
/// a network namespace of its own (see the module documentation).
pub(crate) async fn up(
    bus_args: &BusArgs,
    args: crate::up::UpArgs,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    flotilla_netns::preflight()
        .map_err(|e| anyhow!("{e}, or use `flotilla up` without --isolated"))?;
    crate::up::install_missing(args.nats_server.as_deref(), !args.no_deploy).await?;
    let binary = crate::up::find_nats_server(args.nats_server.as_deref())?;
    let programs = Programs::beside_this_binary(binary.clone())?;
    let data = &args.data_dir;
    let store = data.join("nats");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let hub_conf = data.join("hub.conf");
    std::fs::write(&hub_conf, hub_server_config(args.leaf_port, None))
        .with_context(|| format!("writing {}", hub_conf.display()))?;
    let url = format!("nats://127.0.0.1:{}", args.nats_port);
    let log = data.join("nats-server.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut nats = Command::new(&binary)
        .arg("-c")
        .arg(&hub_conf)
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &args.nats_port.to_string(),
            "-sd",
        ])
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let (config, bus) = crate::up::connect_to_started(
        bus_args,
        &url,
        &mut nats,
        &shutdown,
        &format!(
            "are ports {} and {} free? see {}",
            args.nats_port,
            args.leaf_port,
            log.display()
        ),
    )
    .await?;
    flotilla_kit::provision(&bus).await?;

    let clusters = local_clusters();
    let prepared = Prepared::create(MembersSpec {
        clusters: clusters.to_vec(),
        hub_leaf_ports: vec![args.leaf_port],
        dir: data.join("clusters"),
        programs,
        extra_executor_flags: Vec::new(),
        namespace_prefix: Some("flotilla".into()),
        ready_within: Duration::from_secs(60),
    })
    .await?;
    let gateway: SocketAddr = ([127, 0, 0, 1], args.gateway_port).into();
    let mut plane = ControlPlane::local(&config, gateway, ([127, 0, 0, 1], args.grpc_port).into())?;
    plane.gateway = Some(global_gateway_config(
        &config,
        gateway,
        prepared.edge_trust(),
    )?);
    let mut services = plane.start(&shutdown).services;
    eprintln!("starting the clusters in their namespaces…");
    let mut members = tokio::select! {
        started = prepared.start(&bus) => started?,
        Some(done) = services.join_next() => {
            shutdown.cancel();
            bail!("a service stopped while the clusters started: {}", match done {
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
                Ok(Ok(())) => "without an error".into(),
            });
        }
        _ = shutdown.cancelled() => return Ok(()),
    };

    println!("Flotilla local fleet is up, each cluster in its own network.");
    println!(
        "  hub (this host's network): NATS {url} (leaf node port {} on every address), control services, gateway",
        args.leaf_port
    );
    println!(
        "  clusters (namespace, link address the hub reaches, pod address only the cluster reaches):"
    );
    for m in members.members() {
        println!(
            "    {:<9} {:<17} link {:<15} pods {:<15} edge {}",
            m.name(),
            m.netns.namespace(),
            m.netns.link_address(),
            m.netns.pod_address(),
            m.edge_url
        );
    }
    println!(
        "  gateway (OpenAI API): http://{gateway}/v1   (reaches each cluster through its edge, mutual TLS)"
    );
    println!(
        "  control API (gRPC, flotilla.v1.ControlApi): 127.0.0.1:{}",
        args.grpc_port
    );
    if let Some(m) = members.members().first() {
        println!(
            "  inside a cluster:  ip netns exec {} curl {}/v1/models   (its own clients use the edge's local listener)",
            m.netns.namespace(),
            m.edge_local_url
        );
        println!(
            "  cut a cluster off: ip link set {} down   (and up again)",
            m.netns.hub_device()
        );
    }
    println!(
        "  logs: {}/nats-server.log, {}/clusters/<cluster>/{{leaf,executor,edge}}.log",
        data.display(),
        data.display()
    );
    println!("  list clusters: flotilla get clusters   replicas: flotilla get replicas");
    if !args.no_deploy {
        let docs = crate::deployments::parse_documents(crate::up::DEFAULT_DEPLOYMENT)?;
        crate::deployments::apply(&bus, docs, Default::default(), &mut std::io::stdout()).await?;
        let bus = bus.clone();
        let stop = shutdown.clone();
        let gateway_port = args.gateway_port;
        services.spawn(async move {
            crate::up::announce_replicas(&bus, gateway_port, stop).await;
            Ok(())
        });
    }
    println!("Press Ctrl-C to stop.");

    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            exited = nats.wait() => bail!("nats-server exited unexpectedly: {}", exited?),
            Some(done) = services.join_next() => {
                shutdown.cancel();
                match done {
                    Ok(Err(e)) => eprintln!("a service stopped: {e:#}"),
                    Err(e) => eprintln!("a service crashed: {e}"),
                    Ok(Ok(())) => eprintln!("a service stopped"),
                }
                break;
            }
            _ = check.tick() => {
                // One cluster failing is what the fleet is for: say so and
                // keep serving from the others.
                for (cluster, process, status) in members.exited() {
                    eprintln!("the {process} of {cluster} exited ({status})");
                }
            }
        }
    }
    println!("stopping…");
    while services.join_next().await.is_some() {}
    let stopped = members.stop().await;
    bus.client.drain().await.ok();
    stop_gracefully(&mut nats).await;
    stopped?;
    println!("stopped.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_listens_for_leaves_on_every_address_and_shares_its_jetstream() {
        let conf = hub_server_config(7422, Some(Path::new("/data/hub")));
        assert!(
            conf.contains("leafnodes {\n  listen: \"0.0.0.0:7422\"\n}"),
            "{conf}"
        );
        assert!(conf.contains("store_dir: \"/data/hub\""), "{conf}");
        assert!(conf.contains("default_js_domain: {\"$G\": \"\"}"), "{conf}");
        assert!(!hub_server_config(7422, None).contains("jetstream"));
    }

    #[test]
    fn a_leaf_is_ready_once_the_hub_s_jetstream_api_crossed_its_connection() {
        let connected = r#"{"leafnodes": 1, "leafs": [{"account": "$G",
            "subscriptions_list": ["$LDS.x", "$JS.API.\u003e"]}]}"#;
        assert!(reaches_hub_jetstream(connected));
        let early = r#"{"leafnodes": 1, "leafs": [{"subscriptions_list": ["$LDS.x"]}]}"#;
        assert!(!reaches_hub_jetstream(early));
        assert!(!reaches_hub_jetstream(r#"{"leafnodes": 0, "leafs": []}"#));
        assert!(!reaches_hub_jetstream("not json"));
    }

    #[test]
    fn a_leaf_has_no_jetstream_and_connects_to_each_hub_url() {
        let conf = leaf_server_config(
            "eu-west",
            vec!["10.213.0.1:7422".into(), "10.213.0.1:7423".into()],
        )
        .unwrap();
        assert!(conf.contains("listen: \"127.0.0.1:4222\""), "{conf}");
        assert!(conf.contains("@10.213.0.1:7422\""), "{conf}");
        assert!(conf.contains("@10.213.0.1:7423\""), "{conf}");
        assert!(conf.contains("http: \"127.0.0.1:8222\""), "{conf}");
        assert_eq!(conf.matches("default_js_domain:").count(), 1, "{conf}");
        assert!(!conf.contains("jetstream {"), "{conf}");
        assert!(!conf.contains("http_port"), "{conf}");
    }
}
