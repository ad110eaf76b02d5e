//! Fleets whose member clusters are separate networks, for tests: the
//! assembly `flotilla up --isolated` runs ([`flotilla_cli::isolated`]) on a
//! hub of the test's own.
//!
//! ```text
//! let hub = Hub::start().await?;
//! let fleet = IsolatedFleet::builder().members(local_clusters()).start(&hub).await?;
//! fleet.gateway_url()                      // the global gateway, in this process
//! fleet.member("eu-west").netns.namespace() // `ip netns exec NAME ...`
//! fleet.command("eu-west", "curl")          // a local client of the cluster
//! fleet.cut("eu-west")?; fleet.heal("eu-west")?;
//! ```
//!
//! The control services are `flotilla up`'s: inventory, placement, the
//! model-provisioner and rollout.
//!
//! Network namespaces need root ([`permitted`] says whether this machine
//! has it). The hub is a [`NatsServer`] whose leaf node port listens on
//! every address of the host, so that each member reaches it at the hub
//! side of its own link; the control services and the global gateway run
//! in this process, as [`crate::fleet`] starts them; each member's leaf,
//! executor (this workspace's `flotilla-executor`, heartbeats every
//! 200 ms) and edge (`flotilla-gateway`) run in its namespace.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_cli::fleet::SimulatedCluster;
use flotilla_cli::isolated::{Members, MembersSpec, Prepared, Programs, RunningMember};
use flotilla_kit::Bus;

use crate::fleet::{self, target_bin};
use crate::{HarnessError, NatsServer, find_binary};

/// Failures of an isolated fleet's start, worded for the person running
/// the tests.
#[derive(Debug, thiserror::Error)]
pub enum IsolatedError {
    #[error(transparent)]
    Harness(#[from] HarnessError),
    #[error("writing the hub's configuration: {0}")]
    Config(#[source] std::io::Error),
    #[error("no free port for the hub's leaf node port")]
    NoPort,
    #[error("starting the isolated fleet: {0:#}")]
    Start(#[source] anyhow::Error),
    #[error(transparent)]
    Netns(#[from] flotilla_netns::NetnsError),
}

/// Whether this machine may create network namespaces; when not, says why
/// on standard error (the tests that need them then check nothing).
pub fn permitted() -> bool {
    match flotilla_netns::preflight() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIPPED (isolated fleet): {e}");
            false
        }
    }
}

/// The hub's NATS: one nats-server ([`Hub::start`]) or a cluster of them
/// with every stream replicated on each ([`Hub::cluster`]), JetStream, a
/// client port on loopback (the harness's) and leaf node ports on every
/// address of the host.
pub struct Hub {
    nats: HubNats,
    /// Settings of a client of the hub (every server's URL, the stream
    /// replicas the services provision with).
    pub bus_config: flotilla_kit::BusConfig,
    /// The leaf node port of each server.
    pub leaf_ports: Vec<u16>,
    /// The configuration file and the JetStream store of a single server.
    _dir: Option<tempfile::TempDir>,
}

enum HubNats {
    Single(NatsServer),
    Cluster(crate::NatsCluster),
}

impl Hub {
    /// One nats-server.
    pub async fn start() -> Result<Self, IsolatedError> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-hub-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let leaf_port = free_port().ok_or(IsolatedError::NoPort)?;
        let config = dir.path().join("hub.conf");
        let text =
            flotilla_cli::isolated::hub_server_config(leaf_port, Some(&dir.path().join("store")));
        std::fs::write(&config, text).map_err(IsolatedError::Config)?;
        let server = NatsServer::start_with_config(&config).await?;
        Ok(Self {
            bus_config: fleet::config(&server),
            nats: HubNats::Single(server),
            leaf_ports: vec![leaf_port],
            _dir: Some(dir),
        })
    }

    /// `n` routed nats-servers, every stream, bucket and the object store
    /// replicated on all of them; members' leaves connect to every server.
    pub async fn cluster(n: usize) -> Result<Self, IsolatedError> {
        let cluster = crate::NatsCluster::start_for_members(n)
            .await
            .map_err(|e| IsolatedError::Start(anyhow::anyhow!("the hub's NATS cluster: {e}")))?;
        let bus_config = cluster
            .bus_config()
            .map_err(|e| IsolatedError::Start(anyhow::anyhow!("the hub's URLs: {e}")))?;
        Ok(Self {
            bus_config,
            leaf_ports: cluster.leaf_ports(),
            nats: HubNats::Cluster(cluster),
            _dir: None,
        })
    }

    /// The hub's nats-server, when it is a single one.
    pub fn nats_server(&self) -> Option<&NatsServer> {
        match &self.nats {
            HubNats::Single(s) => Some(s),
            HubNats::Cluster(_) => None,
        }
    }

    /// The hub's NATS cluster, when it is one (to kill a server).
    pub fn nats_cluster(&mut self) -> Option<&mut crate::NatsCluster> {
        match &mut self.nats {
            HubNats::Cluster(c) => Some(c),
            HubNats::Single(_) => None,
        }
    }
}

/// A port free on every address, below the kernel's ephemeral range so
/// that no connection opened meanwhile is given it.
fn free_port() -> Option<u16> {
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    let start = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(2);
        u16::try_from(h.finish() % u64::from(span)).unwrap_or(0)
    };
    (0..span)
        .map(|i| LOWEST + (start + i) % span)
        .find(|port| std::net::TcpListener::bind(("0.0.0.0", *port)).is_ok())
}

/// What an [`IsolatedFleet`] starts.
#[derive(Debug, Clone)]
pub struct IsolatedFleetBuilder {
    clusters: Vec<SimulatedCluster>,
    unhealthy_after: Duration,
    ready_within: Duration,
}

impl Default for IsolatedFleetBuilder {
    fn default() -> Self {
        Self {
            clusters: flotilla_cli::fleet::local_clusters().to_vec(),
            unhealthy_after: Duration::from_secs(3),
            ready_within: Duration::from_secs(60),
        }
    }
}

impl IsolatedFleetBuilder {
    /// The member clusters (by default `flotilla up`'s three).
    pub fn members(mut self, clusters: impl IntoIterator<Item = SimulatedCluster>) -> Self {
        self.clusters = clusters.into_iter().collect();
        self
    }

    /// Inventory calls a cluster unhealthy after this long without a
    /// heartbeat (3 s by default).
    pub fn unhealthy_after(mut self, after: Duration) -> Self {
        self.unhealthy_after = after;
        self
    }

    /// How long the members may take to be ready (60 s by default).
    pub fn ready_within(mut self, within: Duration) -> Self {
        self.ready_within = within;
        self
    }

    /// Creates the members' namespaces and certificates, starts the
    /// control services (inventory, placement, the model-provisioner,
    /// rollout) and
    /// the global gateway in this process on `hub`, then the members; returns
    /// once every member is ready.
    pub async fn start(self, hub: &Hub) -> Result<IsolatedFleet, IsolatedError> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-isolated-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let spec = MembersSpec {
            clusters: self.clusters,
            hub_leaf_ports: hub.leaf_ports.clone(),
            dir: dir.path().to_path_buf(),
            programs: Programs {
                nats_server: find_binary()?,
                executor: (target_bin("flotilla-executor"), Vec::new()),
                gateway: target_bin("flotilla-gateway"),
            },
            extra_executor_flags: [
                "--heartbeat-interval".into(),
                "200ms".into(),
                // Executors check the topology the services provisioned.
                "--stream-replicas".into(),
                hub.bus_config.topology.control.replicas.to_string().into(),
                "--runner-bin".into(),
                OsString::from(target_bin("flotilla-runner")),
            ]
            .to_vec(),
            namespace_prefix: None,
            ready_within: self.ready_within,
        };
        let prepared = Prepared::create(spec).await.map_err(IsolatedError::Start)?;
        let bus_config = hub.bus_config.clone();
        let mut gateway = fleet::gateway_config(&bus_config);
        let trust = prepared.edge_trust();
        gateway.edge_tls = Some(flotilla_gateway::EdgeTls {
            ca: trust.ca.clone(),
            client_cert: trust.client_cert.clone(),
            client_key: trust.client_key.clone(),
        });
        let gateway = fleet::gateway(gateway).await;
        fleet::inventory(&bus_config, self.unhealthy_after);
        fleet::placement(&bus_config);
        fleet::model_provisioner(&bus_config);
        fleet::rollout(&bus_config, 3);
        let bus = flotilla_kit::Bus::connect(
            &bus_config,
            "isolated-fleet",
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .map_err(HarnessError::from)?;
        flotilla_kit::provision(&bus)
            .await
            .map_err(HarnessError::from)?;
        let members = prepared.start(&bus).await.map_err(IsolatedError::Start)?;
        Ok(IsolatedFleet {
            members,
            bus,
            gateway,
            _dir: dir,
        })
    }
}

/// A running isolated fleet: its members, the global gateway, a client of
/// the hub. Dropping it kills the members' processes and removes their
/// namespaces.
pub struct IsolatedFleet {
    members: Members,
    bus: Bus,
    gateway: SocketAddr,
    /// Configurations, certificates, logs and model caches (logs under
    /// `<cluster>/{leaf,executor,edge}.log`).
    _dir: tempfile::TempDir,
}

impl IsolatedFleet {
    pub fn builder() -> IsolatedFleetBuilder {
        IsolatedFleetBuilder::default()
    }

    /// The global gateway's base URL (`http://127.0.0.1:PORT`).
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateway)
    }

    /// A client of the hub, with the topology provisioned.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn members(&self) -> &[RunningMember] {
        self.members.members()
    }

    /// Member `name`: its namespace and addresses (`netns`), its edge's
    /// URLs, its processes. Panics when there is none (a test's mistake).
    pub fn member(&self, name: &str) -> &RunningMember {
        self.members
            .member(name)
            .unwrap_or_else(|| panic!("no member {name} in this isolated fleet"))
    }

    /// The process ids of member `name`'s leaf, executor and edge, while
    /// they run (SIGKILL one to fail it).
    pub fn pids(&self, name: &str) -> MemberPids {
        let m = self.member(name);
        MemberPids {
            leaf: m.leaf_pid(),
            executor: m.executor_pid(),
            edge: m.edge_pid(),
        }
    }

    /// `program` run inside member `name`'s namespace, as one of the
    /// cluster's own clients (its own `127.0.0.1`, its pod address, the
    /// edge's local listener).
    pub fn command(&self, name: &str, program: &str) -> tokio::process::Command {
        self.member(name).netns.tokio_command(program)
    }

    /// Cuts member `name`'s link to the hub (nothing passes, no reset).
    pub fn cut(&self, name: &str) -> Result<(), IsolatedError> {
        Ok(self.members.topology().cut(name)?)
    }

    /// Joins member `name` to the hub again.
    pub fn heal(&self, name: &str) -> Result<(), IsolatedError> {
        Ok(self.members.topology().heal(name)?)
    }

    /// Stops the members gracefully and removes their namespaces.
    pub async fn stop(self) -> Result<(), IsolatedError> {
        self.members.stop().await.map_err(IsolatedError::Start)
    }
}

/// A member's process ids; `None` once a process has been reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberPids {
    pub leaf: Option<u32>,
    pub executor: Option<u32>,
    pub edge: Option<u32>,
}
