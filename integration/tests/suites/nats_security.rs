//! NATS security on a real nats-server configured by `flotilla nats-config`:
//! each executor reaches only its own cluster's subjects and keys, every
//! service (the gRPC control API included) works with its own user, and TLS
//! is enforced.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_cli::nats_config::{NatsConfigArgs, run as write_nats_config};
use flotilla_control_api::api::control_api_client::ControlApiClient;
use flotilla_control_api::api::{ApplyDeploymentRequest, ListDeploymentsRequest};
use flotilla_integration::{NatsServer, wait_for_event, workspace_root};
use flotilla_kit::{Bus, BusArgs, BusConfig};
use flotilla_proto::v1::{self, ModelDeployment, event::Payload};
use flotilla_proto::{CommandAction, EventType, Subjects, Topology};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(120);
/// How long a request refused by permissions waits for an answer that
/// never comes (the server drops it and reports the violation instead).
const REFUSED_REQUEST_WAIT: Duration = Duration::from_secs(2);

fn nats_config_args(out: &Path, clusters: &[&str]) -> NatsConfigArgs {
    NatsConfigArgs {
        clusters: clusters.iter().map(|c| c.to_string()).collect(),
        out: out.to_path_buf(),
        listen: "127.0.0.1:4222".into(),
        store_dir: out.join("store").display().to_string(),
        http_port: 0,
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        tls_verify: false,
        dev_tls: false,
        dev_tls_names: vec!["localhost".into(), "127.0.0.1".into()],
        dev_tls_server_dir: None,
    }
}

/// The bus flags a service gets from its env file.
fn bus_args(server: &NatsServer, out: &Path, user: &str) -> BusArgs {
    let env = std::fs::read_to_string(out.join("users").join(format!("{user}.env"))).unwrap();
    let value = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing for {user}"))
            .to_string()
    };
    BusArgs {
        nats_url: server.url(),
        nats_user: Some(value("FLOTILLA_NATS_USER")),
        nats_password: Some(value("FLOTILLA_NATS_PASSWORD")),
        nats_inbox_prefix: Some(value("FLOTILLA_NATS_INBOX_PREFIX")),
        ..Default::default()
    }
}

fn bus_config(server: &NatsServer, out: &Path, user: &str) -> BusConfig {
    bus_args(server, out, user).validate().unwrap()
}

/// A raw client logged in as `user` that reports the server's errors
/// (permission violations) on a channel.
async fn client_as(
    server: &NatsServer,
    out: &Path,
    user: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let config = bus_config(server, out, user);
    let (user, password) = config.user_password.clone().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(user, password)
        .custom_inbox_prefix(config.inbox_prefix.clone().unwrap())
        .request_timeout(Some(REFUSED_REQUEST_WAIT))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(server.url())
        .await
        .unwrap();
    (client, rx)
}

/// Waits for the server to report a permissions violation on `subject`.
async fn violation(errors: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = errors.recv().await {
            let e = e.to_lowercase();
            if e.contains("permissions violation") && e.contains(&subject.to_lowercase()) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "no permissions violation reported for {subject}"
    );
}

async fn command(bus: &Bus, cluster: &str, replica: &str) {
    let subject = bus.subjects.command(cluster, CommandAction::Stop).unwrap();
    let cmd = v1::ExecutorCommand {
        command_id: format!("{cluster}-{replica}-stop"),
        ..Default::default()
    };
    bus.publish(subject, &cmd, Some(&cmd.command_id))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_executor_cannot_read_or_write_another_clusters_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    write_nats_config(
        &BusArgs::default(),
        &nats_config_args(out, &["cluster-a", "cluster-b"]),
    )
    .unwrap();
    let server = NatsServer::start_with_config(&out.join("nats-server.conf"))
        .await
        .unwrap();
    // The operator provisions and queues one command for each cluster.
    let admin = Bus::connect(
        &bus_config(&server, out, "admin"),
        "test",
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    flotilla_kit::provision(&admin).await.unwrap();
    command(&admin, "cluster-a", "r1").await;
    command(&admin, "cluster-b", "r2").await;

    let (a, mut errors) = client_as(&server, out, "executor-cluster-a").await;
    let js = async_nats::jetstream::new(a.clone());
    let subjects = Subjects::default();
    let topology = Topology::new(&subjects, 1);
    let cmd_stream = js.get_stream(&topology.commands.name).await.unwrap();

    // Its own commands: a consumer with its own filter works.
    let own = cmd_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("executor-cluster-a-prefetch".into()),
            filter_subject: subjects
                .command("cluster-a", CommandAction::Prefetch)
                .unwrap(),
            ..Default::default()
        })
        .await;
    assert!(own.is_ok(), "{own:?}");

    // Cluster b's commands: any consumer selecting them is refused.
    let b_filter = subjects.command("cluster-b", CommandAction::Stop).unwrap();
    let single = cmd_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("executor-cluster-a-prefetch".into()),
            filter_subject: b_filter.clone(),
            ..Default::default()
        })
        .await;
    assert!(single.is_err());
    violation(
        &mut errors,
        &format!("$JS.API.CONSUMER.CREATE.FLOTILLA_CMD.executor-cluster-a-prefetch.{b_filter}"),
    )
    .await;
    let other_name = cmd_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("spy".into()),
            filter_subjects: vec![
                b_filter.clone(),
                subjects.commands_for("cluster-b").unwrap(),
            ],
            ..Default::default()
        })
        .await;
    assert!(other_name.is_err());
    violation(&mut errors, "$JS.API.CONSUMER.CREATE.FLOTILLA_CMD.spy").await;
    // Its own replicas consumer may be created by name only (two filters
    // cannot be checked by the server); once cluster b's executor has its
    // consumer, the work-queue stream refuses any overlapping one.
    let b_start = subjects.command("cluster-b", CommandAction::Start).unwrap();
    admin
        .jetstream
        .get_stream(&topology.commands.name)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("executor-cluster-b-replicas".into()),
            filter_subjects: vec![b_start.clone(), b_filter.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let overlapping = cmd_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("executor-cluster-a-replicas".into()),
            filter_subjects: vec![b_start, b_filter.clone()],
            ..Default::default()
        })
        .await;
    let refusal = overlapping.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refusal.contains("not unique"), "{refusal:?}");
    // Neither pulling from cluster b's consumer nor reading the stream
    // directly nor a core subscription gets anything.
    let next = a
        .request(
            "$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_CMD.executor-cluster-b-replicas",
            "1".into(),
        )
        .await;
    assert!(next.is_err());
    violation(
        &mut errors,
        "$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_CMD.executor-cluster-b-replicas",
    )
    .await;
    let get = cmd_stream.get_raw_message(2).await;
    assert!(get.is_err());
    violation(&mut errors, "$JS.API.STREAM.MSG.GET.FLOTILLA_CMD").await;
    let _sub = a.subscribe(b_filter.clone()).await.unwrap();
    violation(&mut errors, &b_filter).await;

    // Writes: its own heartbeats and replica keys work; cluster b's are
    // refused.
    let heartbeat = v1::ClusterHeartbeat {
        cluster: "cluster-a".into(),
        ..Default::default()
    };
    let payload = flotilla_proto::codec::encode(&heartbeat, flotilla_proto::Encoding::Protobuf);
    js.publish(subjects.telemetry("cluster-a").unwrap(), payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let forged = js
        .publish(subjects.telemetry("cluster-b").unwrap(), payload)
        .await
        .unwrap()
        .await;
    assert!(forged.is_err());
    violation(&mut errors, "flotilla.telemetry.cluster-b").await;
    let replicas = js.get_key_value(&topology.replicas.name).await.unwrap();
    replicas.put("cluster-a.r1", "x".into()).await.unwrap();
    assert!(replicas.put("cluster-b.r2", "x".into()).await.is_err());
    violation(&mut errors, "$KV.replicas.cluster-b.r2").await;
    let clusters = js.get_key_value(&topology.clusters.name).await.unwrap();
    assert!(clusters.put("cluster-b", "x".into()).await.is_err());
    violation(&mut errors, "$KV.clusters.cluster-b").await;
    // Nor can it speak for the control plane.
    let forged_event = js
        .publish(
            subjects
                .event(EventType::ClusterUnhealthy, "cluster-b")
                .unwrap(),
            "x".into(),
        )
        .await
        .unwrap()
        .await;
    assert!(forged_event.is_err());
    violation(&mut errors, "flotilla.events.cluster.cluster-b.unhealthy").await;

    // What the server holds afterwards: cluster b's command still queued,
    // no heartbeat or replica of cluster b.
    let admin_js = &admin.jetstream;
    let mut cmd = admin_js.get_stream(&topology.commands.name).await.unwrap();
    let queued = cmd
        .get_last_raw_message_by_subject(&b_filter)
        .await
        .unwrap();
    assert_eq!(queued.subject.as_str(), b_filter);
    assert_eq!(cmd.info().await.unwrap().state.messages, 2);
    let mut telemetry = admin_js.get_stream(&topology.telemetry.name).await.unwrap();
    let subjects_held = telemetry.info().await.unwrap().state.subjects_count;
    assert_eq!(subjects_held, 1, "only cluster-a's heartbeat is stored");
    let kv = admin_js
        .get_key_value(&topology.replicas.name)
        .await
        .unwrap();
    assert!(kv.get("cluster-b.r2").await.unwrap().is_none());
    assert!(kv.get("cluster-a.r1").await.unwrap().is_some());
}

#[tokio::test]
async fn a_refused_password_stops_a_service_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    write_nats_config(&BusArgs::default(), &nats_config_args(out, &["cluster-a"])).unwrap();
    let server = NatsServer::start_with_config(&out.join("nats-server.conf"))
        .await
        .unwrap();
    let mut args = bus_args(&server, out, "inventory");
    args.nats_password = Some("wrong".into());
    // A connection that kept retrying would never return: the deadline
    // makes that a failure.
    let connected = tokio::time::timeout(
        Duration::from_secs(20),
        Bus::connect(
            &args.validate().unwrap(),
            "inventory",
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("a refused password is retried instead of reported");
    let e = connected.unwrap_err().to_string();
    assert!(e.contains("--nats-user"), "{e}");
    // Anonymous connections are refused too.
    assert!(async_nats::connect(server.url()).await.is_err());
}

fn runner_bin() -> PathBuf {
    flotilla_integration::fleet::target_bin("flotilla-runner")
}

fn executor(
    server: &NatsServer,
    out: &Path,
    cluster: &str,
    cost: f64,
    cache: &Path,
) -> JoinHandle<()> {
    let c = flotilla_executor::ExecutorArgs {
        bus: bus_args(server, out, &format!("executor-{cluster}")),
        cluster: Some(cluster.into()),
        labels: vec![format!("region={cluster}")],
        gpus: "2xH100-80GB".into(),
        gpu_source: flotilla_executor::GpuSource::Declared,
        cost_per_gpu_hour: cost,
        heartbeat_interval: Duration::from_millis(200),
        model_cache_dir: Some(cache.join(cluster)),
        runner_bin: Some(runner_bin()),
        ..Default::default()
    }
    .validate()
    .unwrap();
    tokio::spawn(async move {
        flotilla_executor::run(c, CancellationToken::new())
            .await
            .unwrap()
    })
}

#[tokio::test]
async fn every_service_works_with_its_own_user() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    write_nats_config(
        &BusArgs::default(),
        &nats_config_args(out, &["cheap", "dear"]),
    )
    .unwrap();
    let server = NatsServer::start_with_config(&out.join("nats-server.conf"))
        .await
        .unwrap();
    let never = CancellationToken::new;
    // No operator provisions first: the control services create the
    // topology with their own users.
    let inventory = flotilla_inventory::Config {
        bus: bus_config(&server, out, "inventory"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        policy: flotilla_inventory::HealthPolicy {
            unhealthy_after_ms: 1_000,
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        },
        check_interval: Duration::from_millis(100),
    };
    tokio::spawn(async move { flotilla_inventory::run(inventory, never()).await.unwrap() });
    let admin = Bus::connect(&bus_config(&server, out, "admin"), "test", &never())
        .await
        .unwrap();
    let mut events = admin.client.subscribe("flotilla.events.>").await.unwrap();
    let placement = flotilla_placement::Config {
        bus: bus_config(&server, out, "placement"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        settings: Default::default(),
        flap_probation_ms: 30_000,
    };
    tokio::spawn(async move { flotilla_placement::run(placement, never()).await.unwrap() });
    let provisioner = flotilla_model_provisioner::Config {
        bus: bus_config(&server, out, "model-provisioner"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        preset_dir: workspace_root().join(".tools/models"),
        takeover_after_ms: 60_000,
    };
    tokio::spawn(async move {
        flotilla_model_provisioner::run(provisioner, never())
            .await
            .unwrap()
    });
    let rollout = flotilla_rollout::Config {
        bus: bus_config(&server, out, "rollout"),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        halt_after_failures: 3,
    };
    tokio::spawn(async move { flotilla_rollout::run(rollout, never()).await.unwrap() });
    let gateway = flotilla_gateway::Config {
        bus: bus_config(&server, out, "gateway"),
        listen: "127.0.0.1:0".parse().unwrap(),
        region: "cheap".into(),
        api_keys: vec![],
    };
    let (gateway_addr, addr_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        flotilla_gateway::run(gateway, never(), Some(gateway_addr))
            .await
            .unwrap()
    });
    // Executors may only check the topology, not create it: they start
    // once the control services have created every stream, bucket and
    // object store.
    let topology = &admin.topology;
    let mut names: Vec<String> = topology.streams().iter().map(|s| s.name.clone()).collect();
    names.extend(topology.buckets().iter().map(|b| format!("KV_{}", b.name)));
    names.extend(
        topology
            .object_stores()
            .iter()
            .map(|o| format!("OBJ_{}", o.name)),
    );
    let started = tokio::time::Instant::now();
    for name in &names {
        while admin.jetstream.get_stream(name).await.is_err() {
            assert!(started.elapsed() < DEADLINE, "{name} was never created");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let caches = tempfile::tempdir().unwrap();
    let _cheap = executor(&server, out, "cheap", 1.0, caches.path());
    let _dear = executor(&server, out, "dear", 3.0, caches.path());
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }

    // The deployment goes in through the gRPC control API, with its own
    // user: the request to placement and its answer.
    let control_api = flotilla_control_api::Config {
        bus: bus_config(&server, out, "control-api"),
        listen: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        answer_timeout: Duration::from_secs(10),
    };
    let (api_addr, api_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        flotilla_control_api::run(control_api, never(), Some(api_addr))
            .await
            .unwrap()
    });
    let mut api = ControlApiClient::connect(format!("http://{}", api_rx.await.unwrap()))
        .await
        .unwrap();
    let doc = r#"{"metadata": {"name": "chat"}, "spec": {
        "model": {"preset": "smollm2-135m-instruct"}, "replicas": 1,
        "placement": {"policy": "PickN", "numberOfClusters": 1, "affinity": {"preferred": [
            {"weight": 100, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}]}}}}"#;
    api.apply_deployment(ApplyDeploymentRequest {
        deployment: Some(serde_json::from_str::<ModelDeployment>(doc).unwrap()),
    })
    .await
    .unwrap();
    let listed = api
        .list_deployments(ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.deployments.len(), 1, "{listed:?}");
    let ready = wait_for_event(&mut events, EventType::ReplicaReady, None, DEADLINE).await;
    let Some(Payload::Replica(replica)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(replica.cluster, "cheap");

    // The gateway, with its own user, sees the replica and serves it.
    let addr = addr_rx.await.unwrap();
    let client = reqwest::Client::new();
    let started = tokio::time::Instant::now();
    let answer = loop {
        let r = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "max_tokens": 4}))
            .send()
            .await;
        if let Ok(r) = r
            && r.status().is_success()
        {
            break r.text().await.unwrap();
        }
        // The gateway's watch of KV replicas catches up on its own; poll
        // its answer until the deadline.
        assert!(
            started.elapsed() < DEADLINE,
            "the gateway never served the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(answer.contains("choices"), "{answer}");
}

#[tokio::test]
async fn tls_with_a_generated_ca_works_and_plain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut args = nats_config_args(out, &["cluster-a"]);
    args.dev_tls = true;
    args.tls_verify = true;
    write_nats_config(&BusArgs::default(), &args).unwrap();
    let server = NatsServer::start_with_config(&out.join("nats-server.conf"))
        .await
        .unwrap();
    let tls = out.join("tls");

    // Mutual TLS with the generated CA, as a service connects.
    let mut inventory = bus_args(&server, out, "inventory");
    inventory.nats_tls_ca = Some(tls.join("ca.pem"));
    inventory.nats_tls_cert = Some(tls.join("client.pem"));
    inventory.nats_tls_key = Some(tls.join("client-key.pem"));
    inventory.nats_require_tls = true;
    let bus = Bus::connect(
        &inventory.validate().unwrap(),
        "inventory",
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let report = flotilla_kit::provision(&bus).await.unwrap();
    assert!(report.drifted.is_empty(), "{report:?}");

    // The same user in plain text: the server says TLS is required and
    // never answers a PING.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut info = vec![0u8; 4096];
    let n = plain.read(&mut info).await.unwrap();
    let info = String::from_utf8_lossy(&info[..n]).to_string();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    let (user, password) = inventory.validate().unwrap().user_password.unwrap();
    let connect = format!(
        "CONNECT {{\"user\":\"{user}\",\"pass\":\"{password}\",\"verbose\":false}}\r\nPING\r\n"
    );
    let _ = plain.write_all(connect.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("PONG"),
        "a plain connection was served: {rest}"
    );

    // A plain client library connection fails too.
    let refused = async_nats::ConnectOptions::new()
        .user_and_password(user.clone(), password.clone())
        .connect(server.url())
        .await;
    assert!(refused.is_err());
    // And TLS without a client certificate is refused under verify.
    let no_cert = async_nats::ConnectOptions::new()
        .user_and_password(user, password)
        .add_root_certificates(tls.join("ca.pem"))
        .require_tls(true)
        .connect(server.url())
        .await;
    assert!(no_cert.is_err());
}
