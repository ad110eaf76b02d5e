//! NATS security on a real nats-server configured by `flotilla nats-config`:
//! each executor reaches only its own cluster's subjects and keys, every
//! service (the gRPC control API included) works with its own user, and TLS
//! is enforced.

use std::path::Path;
use std::time::Duration;

use flotilla_cli::nats_config::{NatsConfigArgs, run as write_nats_config};
use flotilla_control_api::api::control_api_client::ControlApiClient;
use flotilla_control_api::api::{
    ApplyDeploymentRequest, CordonClusterRequest, GetReplicaLogsRequest, ListDeploymentsRequest,
    ListEventsRequest, PreviewDeploymentRequest, UndoRolloutRequest,
};
use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::{Bus, BusArgs, BusConfig};
use flotilla_proto::v1::{self, ModelDeployment, event::Payload};
use flotilla_proto::{CommandAction, EventType, Subjects, Topology};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{poll_until, wait_for_event};

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

/// A nats-server configured by `flotilla nats-config` for `clusters` (the
/// arguments changed by `tweak`), and the folder with its configuration
/// and the users' env files.
async fn secured_server(
    clusters: &[&str],
    tweak: impl FnOnce(&mut NatsConfigArgs),
) -> (tempfile::TempDir, NatsServer) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = nats_config_args(dir.path(), clusters);
    tweak(&mut args);
    write_nats_config(&BusArgs::default(), &args).unwrap();
    let server = NatsServer::start_with_config(&dir.path().join("nats-server.conf"))
        .await
        .unwrap();
    (dir, server)
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

/// A bus client logged in as the operator (`admin`).
async fn admin(server: &NatsServer, out: &Path) -> Bus {
    Bus::connect(
        &bus_config(server, out, "admin"),
        "test",
        &CancellationToken::new(),
    )
    .await
    .unwrap()
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
    let (dir, server) = secured_server(&["cluster-a", "cluster-b"], |_| {}).await;
    let out = dir.path();
    // The operator provisions and queues one command for each cluster.
    let admin = admin(&server, out).await;
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
    let (dir, server) = secured_server(&["cluster-a"], |_| {}).await;
    let out = dir.path();
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

/// Cluster `cluster`'s executor, logged in as its own user.
fn executor(
    server: &NatsServer,
    out: &Path,
    cluster: &str,
    cost: f64,
    caches: &Path,
) -> JoinHandle<()> {
    let region = format!("region={cluster}");
    let args = flotilla_executor::ExecutorArgs {
        bus: bus_args(server, out, &format!("executor-{cluster}")),
        ..fleet::executor_args(
            &server.url(),
            cluster,
            "2xH100-80GB",
            &[&region],
            cost,
            caches,
        )
    };
    fleet::start_executor(args, CancellationToken::new())
}

#[tokio::test]
async fn every_service_works_with_its_own_user() {
    let (dir, server) = secured_server(&["cheap", "dear"], |_| {}).await;
    let out = dir.path();
    // No operator provisions first: the control services create the
    // topology with their own users.
    fleet::inventory(
        &bus_config(&server, out, "inventory"),
        Duration::from_secs(1),
    );
    let admin = admin(&server, out).await;
    let mut events = admin.client.subscribe("flotilla.events.>").await.unwrap();
    fleet::placement(&bus_config(&server, out, "placement"));
    fleet::model_provisioner(&bus_config(&server, out, "model-provisioner"));
    fleet::rollout(&bus_config(&server, out, "rollout"), 3);
    let addr = fleet::gateway(flotilla_gateway::Config {
        region: "cheap".into(),
        ..fleet::gateway_config(&bus_config(&server, out, "gateway"))
    })
    .await;
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
    for name in &names {
        poll_until(DEADLINE, &format!("{name} created"), || async {
            admin.jetstream.get_stream(name).await.ok().map(|_| ())
        })
        .await;
    }
    let caches = tempfile::tempdir().unwrap();
    let _cheap = executor(&server, out, "cheap", 1.0, caches.path());
    let _dear = executor(&server, out, "dear", 3.0, caches.path());
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }

    // The deployment goes in through the gRPC control API, with its own
    // user: the request to placement and its answer.
    let api_addr = fleet::control_api(&bus_config(&server, out, "control-api")).await;
    let mut api = ControlApiClient::connect(format!("http://{api_addr}"))
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

    // The rest of the API under that user: a log tail from the executor
    // of the replica's cluster, a preview, stored events, a cordon, and a
    // refusal from the rollout service.
    let logs = api
        .get_replica_logs(GetReplicaLogsRequest {
            replica_id: replica.replica_id.clone(),
            tail_lines: 20,
            cluster: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!logs.lines.is_empty());
    let preview = api
        .preview_deployment(PreviewDeploymentRequest {
            deployment: Some(
                serde_json::from_str::<ModelDeployment>(&doc.replace("\"chat\"", "\"chat-2\""))
                    .unwrap(),
            ),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preview.placement.unwrap().assignments[0].cluster, "cheap");
    let stored = api
        .list_events(ListEventsRequest {
            kind: "deployment".into(),
            name: "chat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stored.events.is_empty());
    let cordoned = api
        .cordon_cluster(CordonClusterRequest {
            name: "dear".into(),
            cordon: true,
            reason: "maintenance".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cordoned.cluster.unwrap().cordoned);
    let refused = api
        .undo_rollout(UndoRolloutRequest {
            name: "nothing-here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    // The gateway, with its own user, sees the replica and serves it. Its
    // watch of KV replicas catches up on its own: poll its answer until the
    // deadline.
    let client = reqwest::Client::new();
    let answer = poll_until(DEADLINE, "answer from the gateway", || async {
        let r = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0, "max_tokens": 4}))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        Some(r.text().await.unwrap())
    })
    .await;
    assert!(answer.contains("choices"), "{answer}");
}

#[tokio::test]
async fn tls_with_a_generated_ca_works_and_plain_is_refused() {
    let (dir, server) = secured_server(&["cluster-a"], |args| {
        args.dev_tls = true;
        args.tls_verify = true;
    })
    .await;
    let out = dir.path();
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
