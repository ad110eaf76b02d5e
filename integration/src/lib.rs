//! The real-NATS test harness.
//!
//! Every Flotilla test that needs the bus starts its own `nats-server` with
//! JetStream through [`NatsServer`]: a free port, a temporary store folder,
//! and cleanup on `Drop`. Nothing here mocks NATS; tests run in parallel
//! because each one owns its server.
//!
//! The binary is found, in order, at `$FLOTILLA_NATS_SERVER`, at
//! `.tools/bin/nats-server` of this checkout (what `scripts/install-tools`
//! installs) and on `PATH`.
//!
//! Start reading at [`NatsServer::start`].

pub mod bench;
pub mod fleet;
pub mod fleet_scale;
pub mod isolated;
pub mod nats_cluster;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use nats_cluster::{LeafNode, NatsCluster};

/// How long a server may take to say it is ready.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// Failures of the harness, worded for the person running the tests.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "nats-server not found (looked at $FLOTILLA_NATS_SERVER, {0} and PATH); run scripts/install-tools"
    )]
    BinaryMissing(String),
    #[error("could not create the store folder: {0}")]
    StoreDir(#[source] std::io::Error),
    #[error("no free port for the monitoring endpoint: {0}")]
    NoMonitorPort(#[source] std::io::Error),
    #[error("could not start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not become ready within {READY_DEADLINE:?}; its last output: {0}")]
    NotReady(String),
    #[error("could not stop nats-server: {0}")]
    Stop(#[source] std::io::Error),
    #[error("could not connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the bus: {0}")]
    Bus(#[from] flotilla_kit::KitError),
}

/// A running nats-server with JetStream, owned by one test.
pub struct NatsServer {
    binary: PathBuf,
    store: tempfile::TempDir,
    port: u16,
    /// A nats-server configuration file (users, TLS) under the harness's
    /// own flags.
    config: Option<PathBuf>,
    /// The HTTP monitoring port (`/varz`), when asked for.
    monitor_port: Option<u16>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream on a free loopback port and an empty
    /// temporary store.
    pub async fn start() -> Result<Self, HarnessError> {
        Self::start_inner(None).await
    }

    /// Like [`start`](Self::start), with HTTP monitoring on a free
    /// loopback port ([`monitor_url`](Self::monitor_url)).
    pub async fn start_monitored() -> Result<Self, HarnessError> {
        let binary = find_binary()?;
        let store = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let monitor = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(HarnessError::NoMonitorPort)?
            .port();
        let mut server = Self {
            binary,
            store,
            port: 0,
            config: None,
            monitor_port: Some(monitor),
            child: None,
        };
        server.spawn(None).await?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoints, when started
    /// with them.
    pub fn monitor_url(&self) -> Option<String> {
        self.monitor_port.map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// Like [`start`](Self::start), with a configuration file (users and
    /// permissions, TLS). The harness's address and port flags override
    /// the file's; the JetStream store is the one the file names (nats-server
    /// refuses a store given twice), so [`store_dir`](Self::store_dir) is
    /// not used.
    pub async fn start_with_config(config: &Path) -> Result<Self, HarnessError> {
        Self::start_inner(Some(config.to_path_buf())).await
    }

    async fn start_inner(config: Option<PathBuf>) -> Result<Self, HarnessError> {
        let binary = find_binary()?;
        let store = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()
            .map_err(HarnessError::StoreDir)?;
        let mut server = Self {
            binary,
            store,
            port: 0,
            config,
            monitor_port: None,
            child: None,
        };
        server.spawn(None).await?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:PORT`. It stays the same across
    /// [`restart`](Self::restart) so clients reconnect by themselves.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store folder, kept across restarts.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// A plain client connection to this server.
    pub async fn connect(&self) -> Result<async_nats::Client, HarnessError> {
        async_nats::connect(self.url())
            .await
            .map_err(|e| HarnessError::Connect {
                url: self.url(),
                reason: e.to_string(),
            })
    }

    /// A bus client named `service` on this server, with the topology
    /// provisioned as every service provisions it at start.
    pub async fn provisioned_bus(&self, service: &str) -> Result<flotilla_kit::Bus, HarnessError> {
        let config =
            flotilla_kit::BusConfig::for_url(self.url()).map_err(flotilla_kit::KitError::from)?;
        let bus = flotilla_kit::Bus::connect(
            &config,
            service,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await?;
        flotilla_kit::provision(&bus).await?;
        Ok(bus)
    }

    /// Stops the server gracefully, as `flotilla up` stops its own: SIGTERM
    /// (nats-server flushes its store), SIGKILL after 10 s.
    pub async fn stop(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            flotilla_cli::fleet::stop_gracefully(&mut child).await;
        }
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash would: nothing is flushed
    /// beyond what the server already wrote.
    pub async fn kill(&mut self) -> Result<(), HarnessError> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.map_err(HarnessError::Stop)?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and the same store. Stops it
    /// first if it is still running.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop().await?;
        self.spawn(Some(self.port)).await
    }

    async fn spawn(&mut self, port: Option<u16>) -> Result<(), HarnessError> {
        let port_arg = port.map_or_else(|| "-1".to_string(), |p| p.to_string());
        let mut command = Command::new(&self.binary);
        match &self.config {
            Some(config) => command.arg("-c").arg(config),
            None => command.arg("-sd").arg(self.store.path()),
        };
        let mut child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg])
            .args(
                self.monitor_port
                    .map(|p| vec!["-m".to_string(), p.to_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                binary: self.binary.display().to_string(),
                source,
            })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| HarnessError::NotReady("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let mut listening = None;
        let ready = tokio::time::timeout(READY_DEADLINE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.split("Listening for client connections on ").nth(1) {
                    listening = addr
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                let is_ready = line.contains("Server is ready");
                seen.push(line);
                if is_ready {
                    return true;
                }
            }
            false
        })
        .await;
        let tail = seen
            .iter()
            .rev()
            .take(8)
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n");
        match (ready, listening) {
            (Ok(true), Some(p)) => {
                // Keep draining the server's log so it never blocks on a
                // full pipe; show it when a test asks for debug output.
                tokio::spawn(async move {
                    while let Ok(Some(line)) = lines.next_line().await {
                        tracing::debug!(target: "nats-server", "{line}");
                    }
                });
                self.port = p;
                self.child = Some(child);
                Ok(())
            }
            _ => {
                let _ = child.kill().await;
                Err(HarnessError::NotReady(tail))
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn find_binary() -> Result<PathBuf, HarnessError> {
    if let Some(p) = std::env::var_os("FLOTILLA_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join(".tools/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(found) = flotilla_cli::fleet::on_path("nats-server") {
        return Ok(found);
    }
    Err(HarnessError::BinaryMissing(local.display().to_string()))
}

/// The root of this checkout, where `.tools/` lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The shipped model, SmolLM2-135M-Instruct as a Q4_1 GGUF, where
/// `scripts/install-tools` puts it.
pub fn shipped_model() -> PathBuf {
    workspace_root().join(flotilla_cli::fleet::SHIPPED_MODEL)
}

/// The next event on `sub` (a subscription to `<prefix>.events.>` or part
/// of it) that `wanted` accepts, skipping the others and anything that does
/// not decode; `None` when `deadline` passes or the subscription ends first.
pub async fn next_event(
    sub: &mut async_nats::Subscriber,
    deadline: Duration,
    mut wanted: impl FnMut(&flotilla_proto::v1::Event) -> bool,
) -> Option<flotilla_proto::v1::Event> {
    use futures::StreamExt;
    use prost::Message;
    let found = tokio::time::timeout(deadline, async {
        while let Some(msg) = sub.next().await {
            if let Ok(event) = flotilla_proto::v1::Event::decode(msg.payload)
                && wanted(&event)
            {
                return Some(event);
            }
        }
        None
    })
    .await;
    found.ok().flatten()
}

/// Waits for the next event of type `ty` (about `name`, when given), as
/// [`next_event`]; panics with what it waited for after `deadline`. Test
/// code: a panic is the failure.
pub async fn wait_for_event(
    sub: &mut async_nats::Subscriber,
    ty: flotilla_proto::EventType,
    name: Option<&str>,
    deadline: Duration,
) -> flotilla_proto::v1::Event {
    let want = ty.to_string();
    next_event(sub, deadline, |e| {
        e.r#type == want && name.is_none_or(|n| e.name == n)
    })
    .await
    .unwrap_or_else(|| panic!("no {want} {name:?} within {deadline:?} (or the subscription ended)"))
}
