//! A hub of several nats-servers for one test, and member leaf nodes.
//!
//! [`NatsCluster::start`] runs `n` servers on free loopback ports (client,
//! cluster, leaf node and monitoring ports), each with its own temporary
//! JetStream store, routed to each other, with configurations written by
//! `flotilla-nats-auth` ([`render_hub_server_config`]) as a real hub's are.
//! It returns once every server is ready and JetStream has a meta leader
//! that every server knows and that answers requests. A server can be
//! killed as a crash would ([`NatsCluster::kill`]) and started again on the
//! same ports and store ([`NatsCluster::restart`]), and each server's own
//! copy of the streams can be read from its monitoring port
//! ([`NatsCluster::stream_copies`]).
//!
//! [`LeafNode`] runs a member cluster's leaf server
//! ([`render_leaf_server_config`]), directly or under a command prefix
//! (`ip netns exec NS`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_kit::{BusArgs, BusConfig};
use flotilla_nats_auth::{
    AuthError, FleetUsers, HubCluster, HubServerConfig, LeafServerConfig, LeafnodeListen, Role,
    render_hub_server_config, render_leaf_server_config,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::{HarnessError, find_binary};

/// How long a server may take to start, and a cluster to elect its
/// JetStream meta leader.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// How often a condition nothing announces (a meta leader, a caught-up
/// copy) is looked at again.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// The name the hub's servers share as a NATS cluster.
pub const HUB_CLUSTER_NAME: &str = "flotilla-hub";

/// Failures of the cluster harness, worded for the person running the
/// tests.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("the server configuration: {0}")]
    Config(#[from] AuthError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not happen within {waited:?}; {detail}")]
    NotReady {
        what: String,
        waited: Duration,
        detail: String,
    },
    #[error("no server {0} in this cluster")]
    NoServer(usize),
    #[error("the monitoring endpoint {url}: {source}")]
    Monitor {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// `n` distinct free loopback ports for servers that bind them later,
/// taken below the kernel's ephemeral range so that no connection opened
/// meanwhile is given one of them.
pub fn free_loopback_ports(n: usize) -> Vec<u16> {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    // A random place to start, so that tests running at once rarely try
    // the same ports; the listeners are held until all are found.
    let start = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(1);
        u16::try_from(h.finish() % u64::from(span)).unwrap_or(0)
    };
    let held: Vec<std::net::TcpListener> = (0..span)
        .map(|i| LOWEST + (start + i) % span)
        .filter_map(|port| std::net::TcpListener::bind(("127.0.0.1", port)).ok())
        .take(n)
        .collect();
    held.iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect()
}

/// The log of a running nats-server, read as it writes it.
#[derive(Clone)]
struct ServerLog {
    lines: Arc<Mutex<Vec<String>>>,
    /// Bumped on each line; closed when the server's stderr ends.
    changed: watch::Receiver<usize>,
}

impl ServerLog {
    /// Reads `child`'s stderr until it ends.
    fn follow(child: &mut Child, name: &str) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0usize);
        if let Some(stderr) = child.stderr.take() {
            let lines = lines.clone();
            let name = name.to_string();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    tracing::debug!(target: "nats-server", server = %name, "{line}");
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                    tx.send_modify(|n| *n += 1);
                }
            });
        }
        Self { lines, changed }
    }

    fn contains(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .map(|l| l.iter().any(|line| line.contains(needle)))
            .unwrap_or(false)
    }

    fn tail(&self) -> String {
        self.lines
            .lock()
            .map(|l| {
                let from = l.len().saturating_sub(8);
                l[from..].join("\n")
            })
            .unwrap_or_default()
    }

    /// Waits until the log has a line containing `needle`.
    async fn wait_for(&mut self, needle: &str, what: &str) -> Result<(), ClusterError> {
        let found = tokio::time::timeout(READY_DEADLINE, async {
            loop {
                if self.contains(needle) {
                    return true;
                }
                if self.changed.changed().await.is_err() {
                    // The server exited; a last line may still have come.
                    return self.contains(needle);
                }
            }
        })
        .await;
        match found {
            Ok(true) => Ok(()),
            _ => Err(ClusterError::NotReady {
                what: what.to_string(),
                waited: READY_DEADLINE,
                detail: format!("its last output:\n{}", self.tail()),
            }),
        }
    }
}

/// Runs `prefix... binary -c config` with its log followed.
fn spawn_server(
    prefix: &[String],
    binary: &Path,
    config: &Path,
    name: &str,
) -> Result<(Child, ServerLog), ClusterError> {
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = command
        .arg("-c")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
    let log = ServerLog::follow(&mut child, name);
    Ok((child, log))
}

fn write_file(path: &Path, text: &str) -> Result<(), ClusterError> {
    std::fs::write(path, text).map_err(|source| ClusterError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// One server of the hub and its fixed ports.
struct HubProcess {
    name: String,
    client_port: u16,
    leaf_port: u16,
    http_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// One server's own copy of a stream, as its monitoring endpoint says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCopy {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The stream's leader as this server knows it.
    pub leader: String,
}

/// A NATS cluster with JetStream, owned by one test: the hub of a
/// multi-cluster fleet.
pub struct NatsCluster {
    binary: PathBuf,
    /// Configurations and stores, kept across restarts.
    dir: tempfile::TempDir,
    servers: Vec<HubProcess>,
    /// The operator's login, when the servers have the fleet's users.
    admin: Option<(String, String)>,
    http: reqwest::Client,
}

impl NatsCluster {
    /// Starts `n` routed servers with JetStream and no authorization, and
    /// waits until JetStream has a meta leader.
    pub async fn start(n: usize) -> Result<Self, ClusterError> {
        Self::start_inner(n, None, "127.0.0.1").await
    }

    /// Like [`start`](Self::start), with the leaf node ports on every
    /// address of the host, so that member clusters in network namespaces
    /// reach them at the hub side of their own links.
    pub async fn start_for_members(n: usize) -> Result<Self, ClusterError> {
        Self::start_inner(n, None, "0.0.0.0").await
    }

    /// Like [`start`](Self::start), with the fleet's users and permissions
    /// on every server (clients and leaf connections log in with them).
    /// The readiness check logs in as the operator ([`Role::Admin`]) when
    /// `fleet` has one.
    pub async fn start_authorized(n: usize, fleet: FleetUsers) -> Result<Self, ClusterError> {
        Self::start_inner(n, Some(fleet), "127.0.0.1").await
    }

    async fn start_inner(
        n: usize,
        fleet: Option<FleetUsers>,
        leaf_host: &str,
    ) -> Result<Self, ClusterError> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("flotilla-hub-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let ports = free_loopback_ports(4 * n);
        if ports.len() < 4 * n {
            return Err(ClusterError::NotReady {
                what: format!("{} free loopback ports", 4 * n),
                waited: Duration::ZERO,
                detail: format!("found {}", ports.len()),
            });
        }
        let port = |i: usize, k: usize| ports[4 * i + k];
        let routes: Vec<String> = (0..n)
            .map(|i| format!("127.0.0.1:{}", port(i, 1)))
            .collect();
        let admin = fleet.as_ref().and_then(|f| {
            f.users
                .iter()
                .find(|u| u.role == Role::Admin)
                .map(|u| (u.role.user(), u.password.clone()))
        });
        let mut servers = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("hub-{}", i + 1);
            let store = dir.path().join(&name);
            let config = HubServerConfig {
                server_name: name.clone(),
                listen: format!("127.0.0.1:{}", port(i, 0)),
                http_port: Some(port(i, 3)),
                store_dir: store.display().to_string(),
                tls: None,
                cluster: HubCluster {
                    name: HUB_CLUSTER_NAME.into(),
                    listen: format!("127.0.0.1:{}", port(i, 1)),
                    routes: routes.clone(),
                    credentials: None,
                },
                leafnodes: LeafnodeListen {
                    listen: format!("{leaf_host}:{}", port(i, 2)),
                    tls: None,
                },
                authorization: fleet.clone(),
            };
            let path = dir.path().join(format!("{name}.conf"));
            write_file(&path, &render_hub_server_config(&config)?)?;
            servers.push(HubProcess {
                name,
                client_port: port(i, 0),
                leaf_port: port(i, 2),
                http_port: port(i, 3),
                config: path,
                child: None,
            });
        }
        let mut cluster = Self {
            binary,
            dir,
            servers,
            admin,
            http: reqwest::Client::new(),
        };
        // All at once: each waits for the others' routes.
        let mut logs = Vec::with_capacity(n);
        for i in 0..n {
            logs.push(cluster.spawn(i)?);
        }
        for (i, mut log) in logs.into_iter().enumerate() {
            let what = format!("{} to start", cluster.servers[i].name);
            log.wait_for("Server is ready", &what).await?;
        }
        for i in 0..n {
            cluster.wait_until_served(i).await?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<ServerLog, ClusterError> {
        let server = self.servers.get_mut(i).ok_or(ClusterError::NoServer(i))?;
        let (child, log) = spawn_server(&[], &self.binary, &server.config, &server.name)?;
        server.child = Some(child);
        Ok(log)
    }

    /// Waits until server `i` knows a meta leader of the whole cluster and
    /// answers a JetStream request.
    async fn wait_until_served(&self, i: usize) -> Result<(), ClusterError> {
        let n = self.servers.len();
        let started = tokio::time::Instant::now();
        let mut last = String::from("nothing yet");
        while started.elapsed() < READY_DEADLINE {
            match self.jsz(i, false).await {
                Ok(jsz) => {
                    let meta = &jsz["meta_cluster"];
                    let leader = meta["leader"].as_str().unwrap_or_default();
                    let size = meta["cluster_size"].as_u64().unwrap_or(0);
                    if !leader.is_empty() && size == n as u64 && self.answers(i).await {
                        return Ok(());
                    }
                    last = format!("meta leader {leader:?}, cluster size {size}");
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Err(ClusterError::NotReady {
            what: format!("{} to see a JetStream meta leader", self.servers[i].name),
            waited: READY_DEADLINE,
            detail: last,
        })
    }

    /// Whether server `i` answers `$JS.API.INFO` (the meta leader's
    /// answer, through this server).
    async fn answers(&self, i: usize) -> bool {
        let Ok(client) = self.connect(i).await else {
            return false;
        };
        let js = async_nats::jetstream::new(client);
        js.query_account().await.is_ok()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Every server's client URL, comma-separated, as `--nats-url` takes
    /// them. They stay the same across restarts.
    pub fn urls(&self) -> String {
        (0..self.servers.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Server `i`'s client URL.
    pub fn url(&self, i: usize) -> String {
        self.servers
            .get(i)
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .unwrap_or_default()
    }

    /// Bus settings for a client of the whole cluster, with every stream
    /// and bucket replicated on all its servers.
    pub fn bus_config(&self) -> Result<BusConfig, flotilla_kit::ConfigError> {
        BusArgs {
            nats_url: self.urls(),
            stream_replicas: self.servers.len(),
            ..BusArgs::default()
        }
        .validate()
    }

    /// The leaf node ports, in server order.
    pub fn leaf_ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.leaf_port).collect()
    }

    /// `host:port` of every leaf node port, as [`LeafServerConfig::hub_urls`]
    /// takes them.
    pub fn leaf_urls(&self) -> Vec<String> {
        self.leaf_ports()
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// The leaf server of member `cluster` on a free loopback port,
    /// logging in as its executor with `password`.
    pub fn leaf_config(
        &self,
        cluster: &str,
        password: &str,
    ) -> Result<LeafServerConfig, ClusterError> {
        let port =
            free_loopback_ports(1)
                .first()
                .copied()
                .ok_or_else(|| ClusterError::NotReady {
                    what: "a free loopback port".into(),
                    waited: Duration::ZERO,
                    detail: String::new(),
                })?;
        Ok(LeafServerConfig::member(
            cluster,
            password,
            format!("127.0.0.1:{port}"),
            self.leaf_urls(),
        )?)
    }

    /// Server `i`'s name (`hub-1`, ...), as JetStream names its peers.
    pub fn name(&self, i: usize) -> &str {
        self.servers.get(i).map_or("", |s| s.name.as_str())
    }

    /// The index of the server named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// Server `i`'s monitoring endpoint (`/jsz`, `/routez`, `/leafz`).
    pub fn monitor_url(&self, i: usize) -> String {
        self.servers
            .get(i)
            .map(|s| format!("http://127.0.0.1:{}", s.http_port))
            .unwrap_or_default()
    }

    /// Server `i`'s process id while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers.get(i)?.child.as_ref()?.id()
    }

    /// The folder of this cluster's configurations and stores.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A plain client of server `i` alone (as the operator when the
    /// servers have users).
    pub async fn connect(&self, i: usize) -> Result<async_nats::Client, ClusterError> {
        let url = self.url(i);
        let mut options = async_nats::ConnectOptions::new();
        if let Some((user, password)) = &self.admin {
            options = options.user_and_password(user.clone(), password.clone());
        }
        options.connect(url.as_str()).await.map_err(|e| {
            ClusterError::Harness(HarnessError::Connect {
                url,
                reason: e.to_string(),
            })
        })
    }

    /// Server `i`'s JetStream report (`/jsz`), with its streams when
    /// `streams`.
    pub async fn jsz(&self, i: usize, streams: bool) -> Result<serde_json::Value, ClusterError> {
        let url = format!(
            "{}/jsz?accounts=true&streams={streams}",
            self.monitor_url(i)
        );
        let failed = |source| ClusterError::Monitor {
            url: url.clone(),
            source,
        };
        self.http
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)
    }

    /// The JetStream meta leader, as the first running server that knows
    /// one says.
    pub async fn meta_leader(&self) -> Option<usize> {
        for i in 0..self.servers.len() {
            if self.pid(i).is_none() {
                continue;
            }
            if let Ok(jsz) = self.jsz(i, false).await
                && let Some(name) = jsz["meta_cluster"]["leader"].as_str()
                && let Some(index) = self.index_of(name)
            {
                return Some(index);
            }
        }
        None
    }

    /// Server `i`'s own copy of every stream it holds, by stream name.
    pub async fn stream_copies(
        &self,
        i: usize,
    ) -> Result<BTreeMap<String, StreamCopy>, ClusterError> {
        let jsz = self.jsz(i, true).await?;
        let mut out = BTreeMap::new();
        let accounts = jsz["account_details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for account in accounts {
            let streams = account["stream_detail"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for s in streams {
                let state = &s["state"];
                let n = |k: &str| state[k].as_u64().unwrap_or(0);
                out.insert(
                    s["name"].as_str().unwrap_or_default().to_string(),
                    StreamCopy {
                        messages: n("messages"),
                        bytes: n("bytes"),
                        first_seq: n("first_seq"),
                        last_seq: n("last_seq"),
                        leader: s["cluster"]["leader"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Kills server `i` with SIGKILL, as a crash would: nothing is flushed
    /// beyond what it already wrote.
    pub async fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        let server = self.servers.get_mut(i).ok_or(ClusterError::NoServer(i))?;
        if let Some(mut child) = server.child.take() {
            child.kill().await.map_err(HarnessError::Stop)?;
        }
        Ok(())
    }

    /// Starts server `i` again on its ports and store (killing it first if
    /// it still runs), and waits until it has rejoined: it sees the meta
    /// leader and answers JetStream requests. Its streams may still be
    /// catching up.
    pub async fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill(i).await?;
        let mut log = self.spawn(i)?;
        let what = format!("{} to restart", self.servers[i].name);
        log.wait_for("Server is ready", &what).await?;
        self.wait_until_served(i).await
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(child) = server.child.as_mut() {
                let _ = child.start_kill();
            }
        }
    }
}

/// A member cluster's leaf node server, owned by one test.
pub struct LeafNode {
    config: LeafServerConfig,
    /// Its configuration file (which holds the leaf user's password).
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl LeafNode {
    /// Runs the leaf server `config` describes and waits until it serves
    /// its clients: the hub has accepted its login and answers a local
    /// client's JetStream request ([`wait_until_served`](Self::wait_until_served)).
    pub async fn start(config: LeafServerConfig) -> Result<Self, ClusterError> {
        let leaf = Self::start_with_prefix(config, &[]).await?;
        leaf.wait_until_served().await?;
        Ok(leaf)
    }

    /// Runs the leaf server as `prefix... nats-server -c FILE`
    /// (`["ip", "netns", "exec", "member-a"]` runs it in a network
    /// namespace) and waits until its log says it is ready and has
    /// connected to a hub server. It does not wait for a JetStream answer,
    /// since this process may not reach the leaf's address; call
    /// [`wait_until_served`](Self::wait_until_served) where it does.
    pub async fn start_with_prefix(
        config: LeafServerConfig,
        prefix: &[&str],
    ) -> Result<Self, ClusterError> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("flotilla-leaf-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let path = dir.path().join("leaf.conf");
        write_file(&path, &render_leaf_server_config(&config)?)?;
        let prefix: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        let (child, mut log) = spawn_server(&prefix, &binary, &path, &config.server_name)?;
        let mut leaf = Self {
            config,
            dir,
            child: Some(child),
        };
        let name = leaf.config.server_name.clone();
        log.wait_for("Server is ready", &format!("{name} to start"))
            .await?;
        log.wait_for(
            "Leafnode connection created",
            &format!("{name} to connect to the hub"),
        )
        .await?;
        if let Some(child) = leaf.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(ClusterError::NotReady {
                what: format!("{name} to keep running"),
                waited: Duration::ZERO,
                detail: format!("it exited with {status}"),
            });
        }
        Ok(leaf)
    }

    /// Waits until a local client of this leaf (no credentials, the leaf
    /// user's inboxes) gets an answer from the hub's JetStream: the hub
    /// has accepted the leaf's login and sends the answers back over it.
    pub async fn wait_until_served(&self) -> Result<(), ClusterError> {
        let started = tokio::time::Instant::now();
        let mut last = String::from("nothing yet");
        while started.elapsed() < READY_DEADLINE {
            let client = async_nats::ConnectOptions::new()
                .custom_inbox_prefix(self.inbox_prefix())
                .connect(self.url().as_str())
                .await;
            match client {
                Ok(client) => {
                    let js = async_nats::jetstream::new(client);
                    match tokio::time::timeout(Duration::from_secs(1), js.query_account()).await {
                        Ok(Ok(_)) => return Ok(()),
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 1 s".into(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Err(ClusterError::NotReady {
            what: format!("a JetStream answer through {}", self.config.server_name),
            waited: READY_DEADLINE,
            detail: last,
        })
    }

    /// The URL the member's local clients connect to.
    pub fn url(&self) -> String {
        self.config.local_url()
    }

    /// The reply inbox prefix the local clients must use.
    pub fn inbox_prefix(&self) -> String {
        self.config.local_inbox_prefix()
    }

    /// The bus flags of a local client: this leaf's URL, no credentials,
    /// the leaf user's inboxes.
    pub fn bus_args(&self) -> BusArgs {
        BusArgs {
            nats_url: self.url(),
            nats_inbox_prefix: Some(self.inbox_prefix()),
            ..BusArgs::default()
        }
    }

    pub fn config(&self) -> &LeafServerConfig {
        &self.config
    }

    /// The configuration file's path.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("leaf.conf")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// Kills the leaf server with SIGKILL.
    pub async fn kill(&mut self) -> Result<(), ClusterError> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.map_err(HarnessError::Stop)?;
        }
        Ok(())
    }
}

impl Drop for LeafNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}
