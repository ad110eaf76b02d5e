//! The `flotilla` command line as a user runs it, against a real fleet
//! (nats-server, inventory, placement, model-provisioner, rollout, two
//! clusters whose executors start real runners): `get` in every form and
//! output, the YAML round trip through `apply -f`, `apply --wait` and
//! `--dry-run=server`, `diff`, `scale`, `delete -f`, `get -w`, `kv`, `logs`, contexts, exit codes.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use flotilla_integration::{NatsServer, fleet};
use flotilla_proto::EventType;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{self, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(120);

/// Runs the binary to the end: exit status, stdout, stderr.
async fn run(server: &NatsServer, args: &[&str]) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::process::Command::new(fleet::target_bin("flotilla"))
        .args(args)
        .args(["--nats-url", &server.url()])
        .output()
        .await
        .unwrap();
    (
        status.success(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// Runs the binary with `config` as its configuration file and no bus
/// flags but those in `args`.
async fn run_in_context(config: &Path, args: &[&str]) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = tokio::process::Command::new(fleet::target_bin("flotilla"))
        .args(args)
        .env("FLOTILLA_CONFIG", config)
        .env_remove("FLOTILLA_NATS_URL")
        .env_remove("FLOTILLA_CONTEXT")
        .output()
        .await
        .unwrap();
    (
        status.success(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// Runs it and expects success; its stdout.
async fn ok(server: &NatsServer, args: &[&str]) -> String {
    let (success, out, err) = run(server, args).await;
    assert!(success, "flotilla {args:?} failed:\n{out}\n{err}");
    out
}

/// Runs it and expects failure; stdout and stderr together.
async fn fails(server: &NatsServer, args: &[&str]) -> String {
    let (success, out, err) = run(server, args).await;
    assert!(!success, "flotilla {args:?} succeeded:\n{out}\n{err}");
    out + &err
}

fn write(dir: &Path, file: &str, text: &str) -> String {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const CHAT: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: chat
  labels: {team: search}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 1
  placement: {policy: PickN, numberOfClusters: 1}
"#;

/// Placeable in principle (the fleet has the GPUs), but no cluster has
/// the label it requires: accepted, then unschedulable.
const ON_MARS: &str = r#"
metadata: {name: on-mars}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 1
  placement:
    affinity:
      required:
        - labelSelector: {matchLabels: {region: mars}}
"#;

#[tokio::test]
async fn the_command_line_lists_applies_waits_previews_diffs_scales_and_deletes() {
    let (server, _bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(5));
    fleet::rollout(&fleet::config(&server), 3);
    let caches = tempfile::tempdir().unwrap();
    for (cluster, region) in [("eu-1", "region=eu-west"), ("us-1", "region=us-east")] {
        fleet::executor(
            &server,
            cluster,
            "2xH100-80GB",
            &[region],
            1.0,
            caches.path(),
        );
    }
    for _ in 0..2 {
        wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE).await;
    }
    let dir = tempfile::tempdir().unwrap();

    // A watcher started first sees the deployment appear.
    let mut watcher = tokio::process::Command::new(fleet::target_bin("flotilla"))
        .args(["get", "md", "-w", "-o", "name", "--nats-url", &server.url()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut watched = BufReader::new(watcher.stdout.take().unwrap()).lines();

    // apply --wait returns once the replica is Ready.
    let chat = write(dir.path(), "chat.yaml", CHAT);
    let out = ok(
        &server,
        &["apply", "-f", &chat, "--wait", "--timeout", "120s"],
    )
    .await;
    assert!(out.contains("deployment/chat accepted"), "{out}");
    assert!(
        out.contains("deployment/chat ready: 1/1 replicas Ready"),
        "{out}"
    );
    let seen = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = watched.next_line().await.unwrap() {
            if line == "deployment/chat" {
                return line;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("`get -w` printed deployment/chat");
    assert_eq!(seen, "deployment/chat");
    drop(watcher);

    // get: names, short names, formats, selectors.
    let table = ok(&server, &["get", "deployments"]).await;
    assert!(
        table.starts_with("NAME") && table.contains("1/1/1"),
        "{table}"
    );
    assert_eq!(
        ok(&server, &["get", "deploy", "-o", "name"]).await,
        "deployment/chat\n"
    );
    assert_eq!(
        ok(
            &server,
            &["get", "md", "-o", "jsonpath={.items[*].metadata.name}"]
        )
        .await,
        "chat"
    );
    assert_eq!(
        ok(
            &server,
            &["get", "cl", "-l", "region=eu-west", "-o", "name"]
        )
        .await,
        "cluster/eu-1\n"
    );
    let wide = ok(&server, &["get", "clusters", "-o", "wide"]).await;
    assert!(
        wide.contains("LABELS") && wide.contains("region=us-east"),
        "{wide}"
    );
    let rollouts = ok(&server, &["get", "ro"]).await;
    assert!(
        rollouts.contains("chat") && rollouts.contains("Complete"),
        "{rollouts}"
    );
    let replica: serde_json::Value = serde_json::from_str(
        &ok(
            &server,
            &["get", "replicas", "--deployment", "chat", "-o", "json"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(replica["items"][0]["phase"], "Ready", "{replica}");
    // Its log, from the executor of its cluster: the runner said it loaded
    // the model.
    let replica_id = replica["items"][0]["replicaId"]
        .as_str()
        .unwrap()
        .to_string();
    let log = ok(&server, &["logs", &replica_id, "--tail", "50"]).await;
    assert!(log.contains("model loaded; serving"), "{log}");
    let last = ok(&server, &["logs", &replica_id, "--tail", "1"]).await;
    assert_eq!(last.lines().count(), 1, "{last}");
    let said = fails(&server, &["logs", "no-such-replica"]).await;
    assert!(
        said.contains("no replica \"no-such-replica\"") && said.contains("get replicas"),
        "{said}"
    );
    let events_json: serde_json::Value = serde_json::from_str(
        &ok(
            &server,
            &["get", "events", "--for", "deployment/chat", "-o", "json"],
        )
        .await,
    )
    .unwrap();
    let types: Vec<&str> = events_json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(types.contains(&"deployment.accepted"), "{types:?}");
    assert!(types.contains(&"rollout.completed"), "{types:?}");
    let missing = fails(&server, &["get", "deployment", "nope"]).await;
    assert!(
        missing.contains("deployment \"nope\" not found"),
        "{missing}"
    );
    let bad = fails(&server, &["get", "pods"]).await;
    assert!(bad.contains("pods"), "{bad}");

    // The YAML round trip: what get prints, apply takes back unchanged.
    let yaml = ok(&server, &["get", "deployment", "chat", "-o", "yaml"]).await;
    assert!(
        yaml.contains("kind: ModelDeployment") && yaml.contains("team: search"),
        "{yaml}"
    );
    let exported = write(dir.path(), "exported.yaml", &yaml);
    let again = ok(&server, &["apply", "-f", &exported]).await;
    assert_eq!(again, "deployment/chat unchanged\n");
    let (same, out, _) = run(&server, &["diff", "-f", &exported]).await;
    assert!(same && out.is_empty(), "{out}");
    // diff shows a change and exits 1.
    let edited = write(
        dir.path(),
        "edited.yaml",
        &yaml.replace("replicas: 1", "replicas: 2"),
    );
    let (same, out, _) = run(&server, &["diff", "-f", &edited]).await;
    assert!(!same, "diff exits 1 on a change");
    assert!(
        out.contains("-  replicas: 1") && out.contains("+  replicas: 2"),
        "{out}"
    );

    // --dry-run=server: placement's answer, nothing stored.
    let preview_doc = write(
        dir.path(),
        "preview.yaml",
        &CHAT.replace("name: chat", "name: preview"),
    );
    let out = ok(&server, &["apply", "-f", &preview_doc, "--dry-run=server"]).await;
    assert!(out.contains("deployment/preview would be placed"), "{out}");
    assert!(out.contains("H100-80GB"), "{out}");
    let mars = write(dir.path(), "mars.yaml", ON_MARS);
    let said = fails(&server, &["apply", "-f", &mars, "--dry-run=server"]).await;
    assert!(said.contains("would be unschedulable"), "{said}");
    let bad_field = write(
        dir.path(),
        "bad.yaml",
        &CHAT.replace("replicas: 1", "replicas: -3"),
    );
    let said = fails(&server, &["apply", "-f", &bad_field, "--dry-run=server"]).await;
    assert!(
        said.contains("would be rejected") && said.contains("spec.replicas"),
        "{said}"
    );
    assert_eq!(
        ok(&server, &["get", "md", "-o", "name"]).await,
        "deployment/chat\n"
    );
    // --dry-run (client) needs no fleet at all.
    let (valid, out, _) = run(&server, &["apply", "-f", &bad_field, "--dry-run"]).await;
    assert!(!valid && out.contains("spec.replicas"), "{out}");

    // apply --wait fails, with the reason, when the deployment cannot be placed.
    let said = fails(
        &server,
        &["apply", "-f", &mars, "--wait", "--timeout", "60s"],
    )
    .await;
    assert!(
        said.contains("on-mars") && said.contains("unschedulable"),
        "{said}"
    );

    // KV values are protobuf; `flotilla kv` reads them as documents.
    assert_eq!(
        ok(&server, &["kv", "keys", "deployments"]).await,
        "chat\non-mars\n"
    );
    let stored: serde_json::Value = serde_json::from_str(
        &ok(&server, &["kv", "get", "deployments", "chat", "-o", "json"]).await,
    )
    .unwrap();
    assert_eq!(stored["spec"]["placement"]["policy"], "PickN", "{stored}");
    assert!(
        stored["status"]["generation"].as_u64() >= Some(1),
        "{stored}"
    );
    let said = fails(&server, &["kv", "get", "deployments", "nope"]).await;
    assert!(
        said.contains("no key \"nope\"") && said.contains("kv keys"),
        "{said}"
    );
    let said = fails(&server, &["kv", "keys", "deploymints"]).await;
    assert!(
        said.contains("no bucket") && said.contains("deployments"),
        "{said}"
    );
    // The schema the CLI prints is the published one.
    let printed: serde_json::Value = serde_json::from_str(&ok(&server, &["schema"]).await).unwrap();
    let published: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            flotilla_integration::workspace_root().join("schemas/modeldeployment.schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(printed, published);

    // Contexts: the fleet's address kept in a file, used without flags.
    let config = dir.path().join("flotilla-config");
    let (made, out, err) = run_in_context(
        &config,
        &[
            "config",
            "set-context",
            "local",
            "--nats-url",
            &server.url(),
        ],
    )
    .await;
    assert!(
        made && out.contains("Context \"local\" created"),
        "{out}{err}"
    );
    let (listed, out, err) = run_in_context(&config, &["get", "md", "-o", "name"]).await;
    assert!(
        listed && out == "deployment/chat\ndeployment/on-mars\n",
        "{out}{err}"
    );
    let (_, contexts, _) = run_in_context(&config, &["config", "get-contexts"]).await;
    assert!(
        contexts.contains("*") && contexts.contains(&server.url()),
        "{contexts}"
    );
    let (refused, _, err) = run_in_context(
        &config,
        &[
            "config",
            "set-context",
            "leaky",
            "--nats-user",
            "u",
            "--nats-password",
            "p",
        ],
    )
    .await;
    assert!(!refused && err.contains("--nats-password-file"), "{err}");
    let (unknown, _, err) = run_in_context(&config, &["get", "md", "--context", "prod"]).await;
    assert!(
        !unknown && err.contains("no context \"prod\"") && err.contains("local"),
        "{err}"
    );

    // scale, then delete by file.
    let out = ok(&server, &["scale", "deployment", "chat", "--replicas", "2"]).await;
    assert!(out.contains("scaled from 1 to 2"), "{out}");
    assert_eq!(
        ok(
            &server,
            &["get", "deploy", "chat", "-o", "jsonpath={.spec.replicas}"]
        )
        .await,
        "2"
    );
    let out = ok(&server, &["delete", "-f", &chat]).await;
    assert_eq!(out, "deployment/chat deleted\n");
    let out = ok(&server, &["delete", "deployment", "on-mars"]).await;
    assert_eq!(out, "deployment/on-mars deleted\n");
    let empty = ok(&server, &["get", "deployments"]).await;
    assert!(empty.contains("(no deployments)"), "{empty}");
}
