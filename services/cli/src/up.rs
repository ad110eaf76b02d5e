//! `flotilla up`: the embedded local fleet. It installs what is missing
//! (nats-server, the shipped model) with `scripts/install-tools`, starts a
//! nats-server with JetStream on loopback, provisions the bus, runs the
//! control services in this process and one executor process per simulated
//! cluster (declared GPUs), with the same code as production, assembled by
//! [`crate::fleet`] as the integration tests' fleets are. Each executor
//! is its own process so a cluster can fail alone (`kill -9` one and watch
//! its replicas move). Ctrl-C stops everything.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_kit::{Bus, BusArgs, BusConfig, Shutdown, provision};
use tokio::process::{Child, Command};

use crate::fleet::{
    ControlPlane, SHIPPED_MODEL, SimulatedCluster, local_clusters, on_path, stop_gracefully,
};

/// What `flotilla up` serves: the shipped SmolLM2 on two clusters.
pub(crate) const DEFAULT_DEPLOYMENT: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata: {name: smollm2}
spec:
  model: {preset: smollm2-135m-instruct}
  runtime: candle
  replicas: 2
  placement:
    policy: PickN
    numberOfClusters: 2
"#;

/// Prints each replica of the default deployment as it becomes ready.
pub(crate) async fn announce_replicas(
    bus: &flotilla_kit::Bus,
    gateway_port: u16,
    shutdown: flotilla_kit::Shutdown,
) {
    use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};
    let Ok(store) =
        flotilla_kit::RecordStore::<ReplicaStatus>::open(bus, &bus.topology.replicas.name).await
    else {
        return;
    };
    let stop = flotilla_kit::Shutdown::new();
    if store.start_watch(stop.clone()).await.is_err() {
        return;
    }
    let mut changes = store.changes();
    let mut announced = std::collections::BTreeSet::new();
    loop {
        for (_, r) in store.cached_all() {
            if r.deployment == "smollm2"
                && r.phase() == ReplicaPhase::Ready
                && announced.insert(r.replica_id.clone())
            {
                println!(
                    "replica {} on {} serves smollm2-135m-instruct at {}",
                    r.replica_id, r.cluster, r.endpoint
                );
                if announced.len() == 1 {
                    println!("try it through the gateway:");
                    println!(
                        "  curl http://127.0.0.1:{gateway_port}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"smollm2-135m-instruct\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
                    );
                }
            }
        }
        tokio::select! {
            changed = changes.recv() => if changed.is_err() {
                stop.cancel();
                return;
            },
            _ = shutdown.cancelled() => {
                stop.cancel();
                return;
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Where the local fleet keeps its state (the JetStream store).
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = ".flotilla")]
    pub data_dir: PathBuf,

    /// The nats-server binary; by default `.tools/bin/nats-server`
    /// (scripts/install-tools), then PATH.
    #[arg(long, env = "FLOTILLA_NATS_SERVER")]
    pub nats_server: Option<PathBuf>,

    /// Port of the gateway, the fleet's OpenAI-compatible front door.
    #[arg(long, env = "FLOTILLA_GATEWAY_PORT", default_value_t = 8080)]
    pub gateway_port: u16,

    /// Do not deploy the shipped SmolLM2 model.
    #[arg(long)]
    pub no_deploy: bool,

    /// Port of the gRPC control API (`flotilla.v1.ControlApi`).
    #[arg(long, env = "FLOTILLA_GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,

    /// Client port of the local nats-server.
    #[arg(long, env = "FLOTILLA_NATS_PORT", default_value_t = 4222)]
    pub nats_port: u16,

    /// Run each simulated cluster in a network namespace of its own, joined
    /// to this host by one link: a leaf nats-server, the executor, its
    /// replicas (on an address this host has no route to) and the
    /// cluster's edge, which the gateway reaches over mutual TLS. Needs
    /// root (network namespaces).
    #[arg(long)]
    pub isolated: bool,

    /// Leaf node port of the local nats-server, where the clusters' leaf
    /// servers connect (with --isolated).
    #[arg(long, env = "FLOTILLA_LEAF_PORT", default_value_t = crate::isolated::DEFAULT_HUB_LEAF_PORT)]
    pub leaf_port: u16,
}

/// Runs `scripts/install-tools` when nats-server or the shipped model is
/// missing; it prints its own progress.
pub(crate) async fn install_missing(
    explicit_nats: Option<&Path>,
    deploy: bool,
) -> anyhow::Result<()> {
    let nats_missing = find_nats_server(explicit_nats).is_err();
    let model_missing = deploy && !Path::new(SHIPPED_MODEL).is_file();
    if !nats_missing && !model_missing {
        return Ok(());
    }
    let installer = Path::new("scripts/install-tools");
    if !installer.is_file() {
        bail!(
            "{} missing and scripts/install-tools is not here: run flotilla up from a Flotilla checkout, or pass --nats-server (and --no-deploy)",
            if nats_missing {
                "nats-server is"
            } else {
                "the shipped model is"
            }
        );
    }
    eprintln!(
        "installing {} (scripts/install-tools)…",
        match (nats_missing, model_missing) {
            (true, true) => "nats-server and the SmolLM2 model",
            (true, false) => "nats-server",
            _ => "the SmolLM2 model",
        }
    );
    let status = Command::new(installer)
        .status()
        .await
        .context("running scripts/install-tools")?;
    if !status.success() {
        bail!("scripts/install-tools failed ({status})");
    }
    Ok(())
}

/// One simulated cluster's executor, as a child process of `flotilla`.
fn start_executor(
    cluster: &SimulatedCluster,
    nats_url: &str,
    data_dir: &Path,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the flotilla binary")?;
    let log_path = data_dir.join(format!("executor-{}.log", cluster.name));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = Command::new(exe);
    command
        .args(["executor", "--"])
        .args(cluster.executor_flags(nats_url, &data_dir.join("cache")))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    command
        .spawn()
        .with_context(|| format!("starting the executor of {}", cluster.name))
}

pub async fn run(bus_args: &BusArgs, args: UpArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    if args.isolated {
        return crate::isolated::up(bus_args, args, shutdown).await;
    }
    install_missing(args.nats_server.as_deref(), !args.no_deploy).await?;
    let binary = find_nats_server(args.nats_server.as_deref())?;
    let store = args.data_dir.join("nats");
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let url = format!("nats://127.0.0.1:{}", args.nats_port);

    let log = args.data_dir.join("nats-server.log");
    let mut nats = start_nats(&binary, args.nats_port, &store, &log)?;
    let (config, bus) = connect_to_started(
        bus_args,
        &url,
        &mut nats,
        &shutdown,
        &format!("is port {} in use? see {}", args.nats_port, log.display()),
    )
    .await?;
    let report = provision(&bus).await?;
    for drift in &report.drifted {
        eprintln!(
            "warning: {} {} differs from the contracts (left unchanged)",
            drift.kind, drift.name
        );
    }

    let mut services = ControlPlane::local(
        &config,
        ([127, 0, 0, 1], args.gateway_port).into(),
        ([127, 0, 0, 1], args.grpc_port).into(),
    )?
    .start(&shutdown)
    .services;
    let clusters = local_clusters();
    let mut executors = Vec::new();
    for cluster in &clusters {
        executors.push((
            cluster.name.clone(),
            start_executor(cluster, &url, &args.data_dir)?,
        ));
    }
    let mut executor_exits = tokio::task::JoinSet::new();
    for (name, mut child) in executors {
        let stop = shutdown.clone();
        executor_exits.spawn(async move {
            tokio::select! {
                exited = child.wait() => {
                    // One cluster failing is what the fleet is for: say so
                    // and keep serving from the others.
                    match exited {
                        Ok(status) => eprintln!("the executor of {name} exited ({status}); placement moves its replicas"),
                        Err(e) => eprintln!("the executor of {name}: {e}"),
                    }
                }
                _ = stop.cancelled() => stop_gracefully(&mut child).await,
            }
        });
    }

    let prefix = bus.subjects.prefix();
    println!("Flotilla local fleet is up.");
    println!(
        "  NATS (JetStream): {url}   store: {}   log: {}",
        store.display(),
        log.display()
    );
    println!(
        "  streams: {}",
        bus.topology
            .streams()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  buckets: {}",
        bus.topology
            .buckets()
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  services: inventory, placement, model-provisioner, rollout, gateway, control-api; simulated clusters:"
    );
    for c in &clusters {
        let label = |i: usize| c.labels.get(i).map_or("", String::as_str);
        println!(
            "    {:<9} {:<12} {:<14} {:.2}/GPU-h   {}",
            c.name,
            c.gpus,
            label(0),
            c.cost_per_gpu_hour,
            label(1)
        );
    }
    println!(
        "  gateway (OpenAI API): http://127.0.0.1:{}/v1",
        args.gateway_port
    );
    println!(
        "  control API (gRPC, flotilla.v1.ControlApi): 127.0.0.1:{}",
        args.grpc_port
    );
    println!("  list clusters: flotilla get clusters   replicas: flotilla get replicas");
    println!(
        "  deploy:        flotilla apply -f examples/chat-small.yaml   then: flotilla get deployments"
    );
    println!(
        "  watch events:  flotilla watch   (or any NATS client: nats sub '{prefix}.events.>')"
    );
    println!("  chat:          flotilla chat 'What is the capital of France?'");
    println!(
        "  executors:     one process per cluster, logs in {}/executor-<cluster>.log",
        args.data_dir.display()
    );
    if !args.no_deploy {
        // Placed once the simulated clusters have joined, not before.
        let joined = flotilla_kit::RecordStore::<flotilla_proto::v1::ClusterRecord>::open(
            &bus,
            &bus.topology.clusters.name,
        )
        .await?;
        let joined_by = std::time::Instant::now() + Duration::from_secs(20);
        while joined.list().await?.len() < clusters.len() && std::time::Instant::now() < joined_by {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let docs = crate::deployments::parse_documents(DEFAULT_DEPLOYMENT)?;
        crate::deployments::apply(&bus, docs, Default::default(), &mut std::io::stdout()).await?;
        let bus = bus.clone();
        let gateway_port = args.gateway_port;
        let stop = shutdown.clone();
        services.spawn(async move {
            announce_replicas(&bus, gateway_port, stop).await;
            Ok(())
        });
    }
    println!("Press Ctrl-C to stop.");

    tokio::select! {
        _ = shutdown.cancelled() => {}
        exited = nats.wait() => bail!("nats-server exited unexpectedly: {}", exited?),
        Some(done) = services.join_next() => {
            shutdown.cancel();
            match done {
                Ok(Err(e)) => eprintln!("a service stopped: {e:#}"),
                Err(e) => eprintln!("a service crashed: {e}"),
                Ok(Ok(())) => eprintln!("a service stopped"),
            }
        }
    }
    println!("stopping…");
    while services.join_next().await.is_some() {}
    while executor_exits.join_next().await.is_some() {}
    bus.client.drain().await.ok();
    stop_gracefully(&mut nats).await;
    println!("stopped.");
    Ok(())
}

pub(crate) fn find_nats_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let local = PathBuf::from(".tools/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(found) = on_path("nats-server") {
        return Ok(found);
    }
    bail!(
        "nats-server not found in .tools/bin or PATH; run scripts/install-tools (or pass --nats-server)"
    )
}

fn start_nats(binary: &Path, port: u16, store: &Path, log: &Path) -> anyhow::Result<Child> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(binary)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// The bus settings of the nats-server `nats` just started at `url`
/// (`bus_args`' other settings kept) and a client connected with them;
/// when the server exits first, an error ending with `hint` (which ports
/// to check, where its log is).
pub(crate) async fn connect_to_started(
    bus_args: &BusArgs,
    url: &str,
    nats: &mut Child,
    shutdown: &Shutdown,
    hint: &str,
) -> anyhow::Result<(BusConfig, Bus)> {
    let config = BusArgs {
        nats_url: url.to_string(),
        ..bus_args.clone()
    }
    .validate()?;
    let connect = tokio::time::timeout(
        Duration::from_secs(20),
        Bus::connect(&config, "flotilla-up", shutdown),
    );
    let bus = tokio::select! {
        connected = connect => connected.context("nats-server did not accept connections within 20 s")??,
        exited = nats.wait() => bail!("nats-server exited at start ({}); {hint}", exited?),
    };
    Ok((config, bus))
}
