//! The deployment files checked against the code: the Helm chart is linted
//! and installed with Helm's own library (helm-sdkpy) against a recording
//! fake API server, `compose.yaml` is parsed, the Dockerfiles are read;
//! every binary they start must be a workspace binary the image holds, and
//! every `FLOTILLA_*` variable they set must be one that binary's flags
//! accept, with a value its parser takes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command as Process;
use std::time::Duration;

use clap::{ArgAction, Args as _, CommandFactory};
use flotilla_integration::workspace_root;
use serde_yaml::Value;

use crate::support;

/// The hub's services: one Deployment each in the chart, one container
/// each in `compose.yaml`.
const CONTROL_SERVICES: [&str; 6] = [
    "flotilla-inventory",
    "flotilla-placement",
    "flotilla-rollout",
    "flotilla-model-provisioner",
    "flotilla-gateway",
    "flotilla-control-api",
];

/// The flags of a service binary, as its library defines them.
fn service_command(bin: &str) -> clap::Command {
    match bin {
        "flotilla-inventory" => flotilla_inventory::Args::command(),
        "flotilla-placement" => flotilla_placement::Args::command(),
        "flotilla-rollout" => flotilla_rollout::Args::command(),
        "flotilla-model-provisioner" => flotilla_model_provisioner::Args::command(),
        "flotilla-gateway" => flotilla_gateway::Args::command(),
        "flotilla-control-api" => flotilla_control_api::Args::command(),
        "flotilla-runner" => flotilla_runner::Args::command(),
        // The executor's binary wraps its library's flags with the log
        // format (services/executor/src/main.rs).
        "flotilla-executor" => flotilla_executor::ExecutorArgs::augment_args(
            clap::Command::new("flotilla-executor").arg(
                clap::Arg::new("log_format")
                    .long("log-format")
                    .env("FLOTILLA_LOG_FORMAT")
                    .value_parser(clap::value_parser!(flotilla_kit::logging::LogFormat)),
            ),
        ),
        other => panic!("{other} is not a Flotilla service binary"),
    }
}

/// Checks that `bin` takes every variable of `env` and parses every given
/// value (`None`: set from a secret, only the name is checked).
fn check_env(context: &str, bin: &str, env: &BTreeMap<String, Option<String>>) {
    let command = service_command(bin);
    let mut argv = vec![bin.to_string()];
    for (name, value) in env {
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("{context}: {bin} has no flag for {name}"));
        let long = arg.get_long().unwrap();
        match (value, arg.get_action()) {
            (Some(v), ArgAction::SetTrue) => {
                if v == "true" {
                    argv.push(format!("--{long}"));
                }
            }
            (Some(v), _) => argv.push(format!("--{long}={v}")),
            (None, _) => {}
        }
    }
    if let Err(e) = command.clone().try_get_matches_from(&argv) {
        panic!("{context}: {bin} refuses {argv:?}: {e}");
    }
}

/// The variables a workspace binary reads, as the built binary's own
/// `--help` lists them (`[env: NAME=...]`): what it really accepts,
/// whatever a library's flag definitions say. `cargo build --workspace
/// --bins` builds them.
fn env_of_binary(bin: &str) -> BTreeSet<String> {
    static SEEN: std::sync::Mutex<BTreeMap<String, BTreeSet<String>>> =
        std::sync::Mutex::new(BTreeMap::new());
    if let Some(known) = SEEN.lock().unwrap().get(bin) {
        return known.clone();
    }
    // No environment: help would show the values of variables set here.
    let out = Process::new(flotilla_integration::fleet::target_bin(bin))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "{bin} --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<String> = help
        .match_indices("[env: ")
        .map(|(i, m)| {
            help[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(names.len() > 3, "{bin} --help names no variables:\n{help}");
    SEEN.lock().unwrap().insert(bin.to_string(), names.clone());
    names
}

/// Every variable of `env` is one `bin --help` names.
fn check_env_with_binary(context: &str, bin: &str, env: &BTreeMap<String, Option<String>>) {
    let accepted = env_of_binary(bin);
    for name in env.keys() {
        assert!(
            accepted.contains(name),
            "{context}: `{bin} --help` names no flag read from {name}"
        );
    }
}

fn workspace_bins() -> BTreeSet<String> {
    let mut bins = BTreeSet::new();
    for dir in std::fs::read_dir(workspace_root().join("services")).unwrap() {
        let manifest = dir.unwrap().path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let mut in_bin = false;
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
                bins.insert(name.trim_matches('"').to_string());
            }
        }
    }
    bins
}

struct Dockerfile {
    stages: Vec<String>,
    /// `USER` of the last stage.
    final_user: Option<String>,
    /// Binaries copied out of `target/release/`.
    built: BTreeSet<String>,
    /// Packages passed to `cargo build -p`.
    packages: BTreeSet<String>,
    text: String,
}

fn read_dockerfile(name: &str) -> Dockerfile {
    let text = std::fs::read_to_string(workspace_root().join("docker").join(name)).unwrap();
    let mut stages = Vec::new();
    let mut final_user = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"FROM") => {
                stages.push(words.get(3).copied().unwrap_or("").to_string());
                final_user = None;
            }
            Some(&"USER") => final_user = words.get(1).map(|u| u.to_string()),
            _ => {}
        }
    }
    let built = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("target/release/"))
        .map(|b| b.trim_end_matches(['/', '\\']).to_string())
        .collect();
    // `-p` of the `cargo build` commands only (not `mkdir -p`).
    let packages = text
        .replace("\\\n", " ")
        .split("&&")
        .filter(|command| command.contains("cargo build"))
        .flat_map(|command| {
            let words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
            words
                .windows(2)
                .filter(|w| w[0] == "-p")
                .map(|w| w[1].clone())
                .collect::<Vec<_>>()
        })
        .collect();
    Dockerfile {
        stages,
        final_user,
        built,
        packages,
        text,
    }
}

fn workspace_packages() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in ["services", "proto", "integration"] {
        let root = workspace_root().join(dir);
        let candidates: Vec<std::path::PathBuf> = if dir == "services" {
            std::fs::read_dir(&root)
                .unwrap()
                .map(|d| d.unwrap().path())
                .collect()
        } else {
            vec![root]
        };
        for c in candidates {
            if let Ok(text) = std::fs::read_to_string(c.join("Cargo.toml"))
                && let Some(name) = text.lines().find_map(|l| l.strip_prefix("name = "))
            {
                out.insert(name.trim_matches('"').to_string());
            }
        }
    }
    out
}

#[test]
fn dockerfiles_are_multi_stage_non_root_and_build_workspace_binaries() {
    let bins = workspace_bins();
    let packages = workspace_packages();
    for name in ["Dockerfile", "runner.Dockerfile", "runner-cuda.Dockerfile"] {
        let d = read_dockerfile(name);
        assert_eq!(d.stages, ["build", "runtime"], "{name}: stages");
        let user = d
            .final_user
            .clone()
            .unwrap_or_else(|| panic!("{name}: no USER"));
        assert!(
            !user.starts_with("root") && !user.starts_with("0"),
            "{name}: runs as {user}"
        );
        assert!(!d.built.is_empty(), "{name}: copies no binary");
        assert!(!d.packages.is_empty(), "{name}: builds no package");
        for bin in &d.built {
            assert!(
                bins.contains(bin),
                "{name}: {bin} is not a workspace binary"
            );
        }
        for p in &d.packages {
            assert!(packages.contains(p), "{name}: no package {p}");
        }
        assert!(d.text.contains("--locked"), "{name}: build is not --locked");
    }
    let cuda = read_dockerfile("runner-cuda.Dockerfile");
    assert!(cuda.text.contains("--features cuda"));
    assert!(cuda.text.contains("-devel-") && cuda.text.contains("-runtime-"));
    // The services' image holds every binary the chart and compose start.
    let all = read_dockerfile("Dockerfile");
    for bin in &bins {
        assert!(all.built.contains(bin), "docker/Dockerfile lacks {bin}");
    }
}

fn yaml_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[test]
fn compose_starts_every_service_with_flags_it_accepts_on_ports_that_do_not_clash() {
    let text = std::fs::read_to_string(workspace_root().join("compose.yaml")).unwrap();
    let mut doc: Value = serde_yaml::from_str(&text).unwrap();
    doc.apply_merge().unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let image_bins = read_dockerfile("Dockerfile").built;
    let mut started = BTreeMap::<String, usize>::new();
    let mut ports = BTreeMap::<u16, String>::new();
    let mut clusters = BTreeSet::new();
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if name == "nats" {
            let cmd: Vec<String> = service["command"]
                .as_sequence()
                .unwrap()
                .iter()
                .filter_map(yaml_str)
                .collect();
            assert!(cmd.contains(&"-js".to_string()), "nats without JetStream");
            for flag in ["-p", "-m"] {
                let i = cmd.iter().position(|c| c == flag).unwrap();
                let port: u16 = cmd[i + 1].parse().unwrap();
                assert!(ports.insert(port, name.into()).is_none());
            }
            continue;
        }
        assert_eq!(service["network_mode"].as_str(), Some("host"), "{name}");
        assert_eq!(service["read_only"].as_bool(), Some(true), "{name}");
        let entry = service["entrypoint"][0].as_str().unwrap();
        let bin = entry.strip_prefix("/usr/local/bin/").unwrap();
        assert!(image_bins.contains(bin), "{name}: the image has no {bin}");
        *started.entry(bin.to_string()).or_default() += 1;
        let env: BTreeMap<String, Option<String>> = service["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str().unwrap().to_string(), yaml_str(v)))
            .collect();
        check_env(&format!("compose {name}"), bin, &env);
        check_env_with_binary(&format!("compose {name}"), bin, &env);
        assert_eq!(
            env.get("FLOTILLA_NATS_URL").cloned().flatten().as_deref(),
            Some("nats://127.0.0.1:4222"),
            "{name}"
        );
        for var in ["FLOTILLA_HTTP_ADDR", "FLOTILLA_GATEWAY_ADDR"] {
            if let Some(Some(addr)) = env.get(var) {
                let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
                if let Some(other) = ports.insert(port, name.into()) {
                    panic!("{name} and {other} both use port {port}");
                }
            }
        }
        if let Some(Some(c)) = env.get("FLOTILLA_CLUSTER") {
            assert!(clusters.insert(c.clone()), "two executors of {c}");
        }
    }
    for bin in CONTROL_SERVICES {
        assert_eq!(started.get(bin), Some(&1), "{bin}");
    }
    assert_eq!(started.get("flotilla-executor"), Some(&2));
}

/// Runs `helm/tests/render.py` (Helm's own library, helm-sdkpy) with
/// `args` before the chart and `values` after it.
fn render_py(args: &[&str], values: Option<&Value>) -> std::process::Output {
    let root = workspace_root();
    let mut command = Process::new(support::python());
    command.arg(root.join("helm/tests/render.py")).args(args);
    if let Some(values) = values {
        command
            .arg(root.join("helm/flotilla"))
            .arg(serde_json::to_string(&serde_json::to_value(values).unwrap()).unwrap());
    }
    command.output().unwrap()
}

/// Lints the chart with `values` and installs it, as release `flotilla` of
/// namespace `flotilla`, into the recording fake API server.
fn helm(values: &Value) -> std::process::Output {
    helm_in("flotilla", values)
}

fn helm_in(namespace: &str, values: &Value) -> std::process::Output {
    render_py(&["--namespace", namespace], Some(values))
}

/// Helm's severities: 1 info, 2 warning, 3 error. Panics on a warning or
/// worse, naming it.
fn assert_lint_clean(context: &str, lint: &serde_json::Value) {
    assert_eq!(lint["TotalChartsLinted"], 1, "{context}: {lint}");
    for m in lint["Messages"].as_array().into_iter().flatten() {
        assert!(
            m["Severity"].as_i64().unwrap_or(0) < 2,
            "{context}: helm lint: {m} in {lint}"
        );
    }
    assert!(lint["Errors"].is_null(), "{context}: {lint}");
}

/// Lints and installs the chart with `values`; returns the objects Helm
/// sent to the API server.
fn render_chart(values: &Value) -> Vec<serde_json::Value> {
    render_chart_in("flotilla", values)
}

fn render_chart_in(namespace: &str, values: &Value) -> Vec<serde_json::Value> {
    let out = helm_in(namespace, values);
    assert!(
        out.status.success(),
        "helm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_lint_clean(namespace, &result["lint"]);
    let manifest = result["manifest"].as_str().unwrap();
    let applied = result["applied"].as_array().unwrap().clone();
    // What Helm applied is what it rendered.
    let rendered = serde_yaml::Deserializer::from_str(manifest)
        .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .count();
    assert_eq!(rendered, applied.len(), "{manifest}");
    applied
}

use serde::Deserialize as _;

fn of_kind<'a>(objects: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

/// Probes, resources, a restrictive security context, flags the binary
/// accepts: for every Deployment.
fn check_workloads(objects: &[serde_json::Value]) {
    let image_bins = read_dockerfile("Dockerfile").built;
    for d in of_kind(objects, "Deployment") {
        let name = d["metadata"]["name"].as_str().unwrap();
        let spec = &d["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        let selector = &d["spec"]["selector"]["matchLabels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&d["spec"]["template"]["metadata"]["labels"][k], v, "{name}");
        }
        let volumes: BTreeSet<&str> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}");
            for probe in ["livenessProbe", "readinessProbe"] {
                let path = c[probe]["httpGet"]["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: no {probe}"));
                assert!(
                    ["/healthz", "/readyz", "/health"].contains(&path),
                    "{name}: {probe} on {path}"
                );
            }
            assert!(
                c["resources"]["requests"].is_object(),
                "{name}: no requests"
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{name}: no memory limit"
            );
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(volumes.contains(m["name"].as_str().unwrap()), "{name}: {m}");
            }
            // A member's NATS leaf node runs the NATS image, not ours.
            if c["command"][0] == "nats-server" {
                let image = c["image"].as_str().unwrap();
                assert!(image.starts_with("nats:"), "{name}: {image}");
                continue;
            }
            let bin = c["command"][0]
                .as_str()
                .unwrap()
                .strip_prefix("/usr/local/bin/")
                .unwrap();
            assert!(image_bins.contains(bin), "{name}: the image has no {bin}");
            let env: BTreeMap<String, Option<String>> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().map(str::to_string),
                    )
                })
                .collect();
            check_env(&format!("chart {name}"), bin, &env);
            check_env_with_binary(&format!("chart {name}"), bin, &env);
            // Readiness probes reach the service only if it listens beyond
            // loopback.
            let addr = env
                .get("FLOTILLA_HTTP_ADDR")
                .or(env.get("FLOTILLA_GATEWAY_ADDR"))
                .cloned()
                .flatten()
                .unwrap_or_else(|| panic!("{name}: no listen address"));
            assert!(addr.starts_with("0.0.0.0:"), "{name}: {addr}");
            let port: u64 = addr.rsplit(':').next().unwrap().parse().unwrap();
            assert_eq!(c["ports"][0]["containerPort"], port, "{name}");
        }
    }
    // Each Deployment has a PodDisruptionBudget selecting it.
    for d in of_kind(objects, "Deployment") {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        assert!(
            of_kind(objects, "PodDisruptionBudget").iter().any(|p| {
                p["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &labels[k] == v)
            }),
            "{} has no PodDisruptionBudget",
            d["metadata"]["name"]
        );
    }
}

fn values_file(name: &str) -> Value {
    let text = std::fs::read_to_string(workspace_root().join("helm/flotilla").join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

#[test]
fn the_chart_installs_the_hub_with_defaults() {
    let objects = render_chart(&Value::Mapping(Default::default()));
    let deployments: BTreeSet<&str> = of_kind(&objects, "Deployment")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(deployments, BTreeSet::from(CONTROL_SERVICES));
    check_workloads(&objects);
    // The control API's Service carries gRPC to the port the binary listens on.
    let api = of_kind(&objects, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "flotilla-control-api")
        .expect("a Service for the control API");
    let grpc = api["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a grpc port");
    assert_eq!(grpc["port"], 50051);
    let container = &of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-control-api")
        .unwrap()["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "FLOTILLA_CONTROL_API_ADDR" && e["value"] == "0.0.0.0:50051")
    );
    // The control services need no Kubernetes API at all.
    assert!(of_kind(&objects, "Role").is_empty());
    assert!(of_kind(&objects, "ClusterRole").is_empty());
    for d in of_kind(&objects, "Deployment") {
        assert_eq!(
            d["spec"]["template"]["spec"]["automountServiceAccountToken"],
            false
        );
    }
    assert!(of_kind(&objects, "ServiceMonitor").is_empty());
}

/// `values-member.yaml` with the edge URL it leaves to the installer.
fn member_values() -> Value {
    let mut values = values_file("values-member.yaml");
    values["edge"]["url"] = Value::from(EDGE_URL);
    values
}

const EDGE_URL: &str = "https://edge.member-1.example.com:8443";

/// The container of the Deployment `name`, and its env as name -> value
/// (`None`: from a Secret or the downward API).
fn container<'a>(objects: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    &of_kind(objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Deployment {name}"))["spec"]["template"]["spec"]["containers"]
        [0]
}

fn env_of(container: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// A rule's (API group, resource) and its verbs.
type Rules = BTreeMap<(String, String), BTreeSet<String>>;

fn rules_of(role: &serde_json::Value) -> Rules {
    let mut out = Rules::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let verbs = out
                    .entry((
                        group.as_str().unwrap().to_string(),
                        resource.as_str().unwrap().to_string(),
                    ))
                    .or_default();
                for v in rule["verbs"].as_array().unwrap() {
                    verbs.insert(v.as_str().unwrap().to_string());
                }
            }
        }
    }
    out
}

fn rules(expected: &[(&str, &str, &[&str])]) -> Rules {
    expected
        .iter()
        .map(|(group, resource, verbs)| {
            (
                (group.to_string(), resource.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

/// The one object of `kind`.
fn only<'a>(objects: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let all = of_kind(objects, kind);
    assert_eq!(all.len(), 1, "{kind}: {all:?}");
    all[0]
}

/// The executor's variables that hold a value (not from a Secret or the
/// downward API).
fn executor_values(objects: &[serde_json::Value]) -> BTreeMap<String, String> {
    env_of(container(objects, "flotilla-executor"))
        .into_iter()
        .filter_map(|(k, v)| Some((k, v["value"].as_str()?.to_string())))
        .collect()
}

/// A member, installed into a namespace of its own name: the executor runs
/// replicas as pods there (the Kubernetes backend), owned by its own
/// Deployment, and may do exactly what that needs.
#[test]
fn the_chart_installs_a_member_executor_with_the_kubernetes_backend_and_its_rbac() {
    let mut values = member_values();
    values["serviceMonitor"] = serde_yaml::from_str("{enabled: true}").unwrap();
    let namespace = "gpu-team";
    let objects = render_chart_in(namespace, &values);
    let names: BTreeSet<&str> = of_kind(&objects, "Deployment")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["flotilla-executor", "flotilla-edge", "flotilla-leaf"])
    );
    check_workloads(&objects);
    // The executor reaches the hub through the cluster's leaf node, with
    // no credentials of its own and the leaf user's reply inboxes.
    let executor = container(&objects, "flotilla-executor");
    let env = env_of(executor);
    let value = executor_values(&objects);
    assert_eq!(value["FLOTILLA_NATS_URL"], "nats://flotilla-leaf:4222");
    assert_eq!(
        value["FLOTILLA_NATS_INBOX_PREFIX"],
        "_INBOX.executor-member-1"
    );
    for absent in [
        "FLOTILLA_NATS_USER",
        "FLOTILLA_NATS_PASSWORD",
        "FLOTILLA_NATS_REQUIRE_TLS",
        // Local-backend settings: replicas are pods with their own address.
        "FLOTILLA_REPLICA_HOST",
        "FLOTILLA_RUNNER_BIN",
        "FLOTILLA_KUBE_MODEL_PVC",
    ] {
        assert!(!env.contains_key(absent), "executor has {absent}");
    }
    // The nodes report the GPUs; declared ones would override them.
    assert_eq!(value["FLOTILLA_GPUS"], "");
    assert_eq!(value["FLOTILLA_GPU_SOURCE"], "auto");
    assert_eq!(value["FLOTILLA_EDGE_URL"], EDGE_URL);

    // The Kubernetes backend, in the release's namespace, owned by the
    // executor's own Deployment; models cached on each node.
    assert_eq!(value["FLOTILLA_BACKEND"], "kubernetes");
    assert_eq!(value["FLOTILLA_KUBE_NAMESPACE"], namespace);
    let own = of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-executor")
        .unwrap();
    assert_eq!(own["metadata"]["namespace"], namespace);
    assert_eq!(value["FLOTILLA_KUBE_OWNER"], "deployment/flotilla-executor");
    assert_eq!(value["FLOTILLA_MODEL_DELIVERY"], "node-cache");
    assert_eq!(
        value["FLOTILLA_KUBE_NODE_CACHE_DIR"],
        "/var/lib/flotilla/models"
    );
    assert_eq!(
        value["FLOTILLA_RUNNER_IMAGE"],
        "ghcr.io/flotilla-dev/flotilla-runner:0.1.0"
    );
    assert_eq!(value["FLOTILLA_VLLM_IMAGE"], "vllm/vllm-openai:v0.11.0");
    // The fetch init container runs `flotilla-executor fetch-model`: the
    // chart's own image holds it.
    assert_eq!(
        value["FLOTILLA_FETCH_IMAGE"],
        executor["image"].as_str().unwrap()
    );
    assert_eq!(value["FLOTILLA_MAX_CONCURRENT_STARTS"], "8");
    assert_eq!(value["FLOTILLA_KUBE_READY_TIMEOUT"], "15m");
    // Replica pods outlive an executor pod being replaced: an upgrade is
    // not a failed cluster.
    assert_eq!(value["FLOTILLA_RESTART_GRACE"], "60s");
    let pod = &own["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], true);

    // RBAC: a Role in the release's namespace with exactly the verbs the
    // backend uses, and cluster-wide only reading what the GPU inventory
    // needs (nodes, and the pods bound to them); all for the executor's
    // own service account.
    let role = only(&objects, "Role");
    let manage: &[&str] = &[
        "create", "get", "list", "watch", "update", "patch", "delete",
    ];
    assert_eq!(
        rules_of(role),
        rules(&[
            ("apps", "deployments", manage),
            ("leaderworkerset.x-k8s.io", "leaderworkersets", manage),
            ("", "pods", &["get", "list", "watch"]),
            ("", "pods/log", &["get"]),
            ("", "events", &["get", "list", "watch"]),
        ])
    );
    assert_eq!(role["metadata"]["namespace"], namespace);
    let cluster_role = only(&objects, "ClusterRole");
    assert_eq!(
        rules_of(cluster_role),
        rules(&[
            ("", "nodes", &["get", "list", "watch"]),
            ("", "pods", &["list", "watch"]),
        ])
    );
    let account = pod["serviceAccountName"].as_str().unwrap();
    for (binding, bound) in [("RoleBinding", role), ("ClusterRoleBinding", cluster_role)] {
        let binding = only(&objects, binding);
        assert_eq!(binding["roleRef"]["kind"], bound["kind"]);
        assert_eq!(binding["roleRef"]["name"], bound["metadata"]["name"]);
        assert_eq!(
            binding["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": account, "namespace": namespace}])
        );
    }
    // Two members in two namespaces of one cluster do not share a
    // ClusterRole.
    assert!(
        cluster_role["metadata"]["name"]
            .as_str()
            .unwrap()
            .contains(namespace)
    );
    assert_eq!(of_kind(&objects, "ServiceMonitor").len(), 1);
}

/// `executor.backend: local` keeps replicas as processes in the executor's
/// pod: the settings `flotilla up` uses, and no Kubernetes API access.
#[test]
fn a_member_executor_with_the_local_backend_has_no_api_access() {
    let mut values = member_values();
    values["executor"]["backend"] = Value::from("local");
    let objects = render_chart(&values);
    check_workloads(&objects);
    let env = env_of(container(&objects, "flotilla-executor"));
    let value = executor_values(&objects);
    assert_eq!(value["FLOTILLA_BACKEND"], "local");
    assert_eq!(
        value["FLOTILLA_RUNNER_BIN"],
        "/usr/local/bin/flotilla-runner"
    );
    assert_eq!(value["FLOTILLA_RESTART_GRACE"], "0s");
    assert_eq!(
        env["FLOTILLA_REPLICA_HOST"]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert!(
        !env.keys().any(|k| k.starts_with("FLOTILLA_KUBE_")),
        "{env:?}"
    );
    for kind in ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"] {
        assert!(
            of_kind(&objects, kind).is_empty(),
            "{kind} with the local backend"
        );
    }
    let own = of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-executor")
        .unwrap();
    assert_eq!(
        own["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
}

/// Models from an existing ReadWriteMany claim instead of the nodes'
/// caches: the executor fills it, replica pods mount it; without a claim
/// the chart refuses, naming the value.
#[test]
fn a_member_can_deliver_models_from_an_existing_claim() {
    let mut values = member_values();
    values["executor"]["modelDelivery"] = Value::from("pvc");
    let out = helm(&values);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("executor.modelCache.claimName is required with executor.modelDelivery=pvc"),
        "{stderr}"
    );

    values["executor"]["modelCache"] = serde_yaml::from_str("{claimName: models-rwx}").unwrap();
    let objects = render_chart(&values);
    check_workloads(&objects);
    let value = executor_values(&objects);
    assert_eq!(value["FLOTILLA_MODEL_DELIVERY"], "pvc");
    assert_eq!(value["FLOTILLA_KUBE_MODEL_PVC"], "models-rwx");
    assert!(!value.contains_key("FLOTILLA_KUBE_NODE_CACHE_DIR"));
    let executor = container(&objects, "flotilla-executor");
    let cache_dir = &value["FLOTILLA_MODEL_CACHE_DIR"];
    let mount = executor["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| &m["mountPath"] == cache_dir)
        .expect("the model cache mounted");
    let pod = &of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-executor")
        .unwrap()["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["persistentVolumeClaim"]["claimName"], "models-rwx");

    for (key, bad, says) in [
        ("backend", "nomad", "executor.backend \"nomad\""),
        ("modelDelivery", "s3", "executor.modelDelivery \"s3\""),
    ] {
        let mut values = member_values();
        values["executor"][key] = Value::from(bad);
        let out = helm(&values);
        assert!(!out.status.success(), "{key}={bad} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// Every variable the chart sets on a Flotilla container, under each
/// values file and backend, is one the built binary it starts names in its
/// `--help`; the executor's Kubernetes settings are among those checked.
#[test]
fn every_variable_the_chart_sets_is_one_its_binary_accepts() {
    let mut local = member_values();
    local["executor"]["backend"] = Value::from("local");
    let mut pvc = member_values();
    pvc["executor"]["modelDelivery"] = Value::from("pvc");
    pvc["executor"]["modelCache"] = serde_yaml::from_str("{claimName: models}").unwrap();
    let mut checked = BTreeSet::new();
    for (context, values) in [
        ("defaults", Value::Mapping(Default::default())),
        ("values-hub.yaml", values_file("values-hub.yaml")),
        ("values-member.yaml", member_values()),
        ("member, local backend", local),
        ("member, pvc", pvc),
    ] {
        for d in of_kind(&render_chart(&values), "Deployment") {
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
            {
                let Some(bin) = c["command"][0]
                    .as_str()
                    .and_then(|c| c.strip_prefix("/usr/local/bin/"))
                else {
                    continue;
                };
                let env: BTreeMap<String, Option<String>> = c["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (e["name"].as_str().unwrap().to_string(), None))
                    .collect();
                check_env_with_binary(&format!("{context}: {}", d["metadata"]["name"]), bin, &env);
                checked.extend(env.into_keys().map(|k| (bin.to_string(), k)));
            }
        }
    }
    for var in [
        "FLOTILLA_BACKEND",
        "FLOTILLA_KUBE_NAMESPACE",
        "FLOTILLA_KUBE_OWNER",
        "FLOTILLA_RUNNER_IMAGE",
        "FLOTILLA_VLLM_IMAGE",
        "FLOTILLA_FETCH_IMAGE",
        "FLOTILLA_MAX_CONCURRENT_STARTS",
        "FLOTILLA_KUBE_READY_TIMEOUT",
        "FLOTILLA_MODEL_DELIVERY",
        "FLOTILLA_KUBE_NODE_CACHE_DIR",
        "FLOTILLA_KUBE_MODEL_PVC",
        "FLOTILLA_REPLICA_HOST",
        "FLOTILLA_RUNNER_BIN",
    ] {
        assert!(
            checked.contains(&("flotilla-executor".to_string(), var.to_string())),
            "{var} was not checked"
        );
    }
    for bin in CONTROL_SERVICES {
        assert!(checked.iter().any(|(b, _)| b == bin), "{bin} not checked");
    }
}

/// `helm lint` (Helm's own, through helm-sdkpy) reports nothing above
/// info for the chart's defaults and both values files.
#[test]
fn the_chart_lints_clean_with_its_values_files() {
    for (context, values) in [
        ("defaults", Value::Mapping(Default::default())),
        ("values-hub.yaml", values_file("values-hub.yaml")),
        ("values-member.yaml", member_values()),
    ] {
        let out = helm(&values);
        assert!(
            out.status.success(),
            "{context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_lint_clean(context, &result["lint"]);
    }
}

#[test]
fn the_chart_refuses_an_executor_without_a_cluster_name() {
    let values: Value =
        serde_yaml::from_str("{hub: {enabled: false}, executor: {enabled: true}}").unwrap();
    let out = helm(&values);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("executor.cluster is required"), "{stderr}");
}

/// `kubectl` on the cluster `kubeconfig` names, with `input` on its
/// standard input; its output. Panics with kubectl's own words on failure.
fn kubectl(kubeconfig: &str, args: &[&str], input: Option<&str>) -> String {
    use std::io::Write as _;
    let mut child = Process::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl on PATH (the real-cluster test drives the cluster with it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.unwrap_or("").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl port-forward` of `service`'s `port` to a free local port,
/// stopped when dropped; the local port once it accepts connections.
async fn port_forward(
    kubeconfig: &str,
    namespace: &str,
    service: &str,
    port: u16,
) -> (KillOnDrop, u16) {
    let [local] = support::free_ports::<1>();
    let child = KillOnDrop(
        Process::new("kubectl")
            .env("KUBECONFIG", kubeconfig)
            .args(["-n", namespace, "port-forward"])
            .arg(format!("svc/{service}"))
            .arg(format!("{local}:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    support::poll_until(
        Duration::from_secs(60),
        &format!("a port-forward to {service}:{port}"),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", local))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    (child, local)
}

/// Helm installs `release` of the chart with `values` into the real
/// cluster; panics with Helm's words, or on a lint warning.
fn install_real(kubeconfig: &str, namespace: &str, release: &str, values: &Value) {
    let out = render_py(&["--install", kubeconfig, namespace, release], Some(values));
    assert!(
        out.status.success(),
        "{release}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_lint_clean(release, &result["lint"]);
}

/// Removes what a real-cluster test left, however it ends.
struct RealCleanup {
    kubeconfig: String,
    namespace: String,
}

impl Drop for RealCleanup {
    fn drop(&mut self) {
        for release in ["flotilla-member", "flotilla"] {
            let _ = render_py(
                &["--uninstall", &self.kubeconfig, &self.namespace, release],
                None,
            );
        }
        let _ = Process::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["delete", "namespace", &self.namespace, "--wait=false"])
            .output();
    }
}

/// A NATS server with JetStream, the users of `flotilla nats-config` and a
/// leaf node port (7422), as Deployment and Service `nats`.
const TEST_NATS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: nats}
spec:
  replicas: 1
  selector: {matchLabels: {app: nats}}
  template:
    metadata: {labels: {app: nats}}
    spec:
      containers:
        - name: nats
          image: nats:2.11-alpine
          args: [-c, /etc/nats/nats-server.conf]
          ports: [{containerPort: 4222}, {containerPort: 7422}]
          volumeMounts:
            - {name: conf, mountPath: /etc/nats}
            - {name: data, mountPath: /data}
      volumes:
        - {name: conf, configMap: {name: nats-conf}}
        - {name: data, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: nats}
spec:
  selector: {app: nats}
  ports:
    - {name: client, port: 4222}
    - {name: leafnodes, port: 7422}
"#;

/// The whole path on the cluster `KUBECONFIG` names: a hub (a NATS server
/// with the users `flotilla nats-config` writes, and the chart's control
/// services) and a member installed with `values-member.yaml` (the
/// Kubernetes backend, the leaf node, the edge over mutual TLS), all in a
/// namespace of the test's own. One candle replica of the shipped model is
/// placed on the member and answers a chat through the global gateway;
/// uninstalling the member leaves none of its replica pods (they are owned
/// by the executor's Deployment).
///
/// Needs: `KUBECONFIG`; `kubectl` on PATH; `FLOTILLA_TEST_IMAGE`, the image
/// of `docker/Dockerfile` as `repository:tag`, pullable by the cluster
/// (it also runs the candle replica unless `FLOTILLA_TEST_RUNNER_IMAGE`
/// names another); a node with an allocatable `nvidia.com/gpu` (every
/// replica asks for one) whose pods may use hostPath volumes; the cluster
/// may pull `nats:2.11-alpine`. Run with `--ignored` (scripts/test does
/// where `KUBECONFIG` is set).
#[tokio::test]
#[ignore = "needs KUBECONFIG"]
async fn the_chart_installs_on_a_real_cluster_when_kubeconfig_is_set() {
    use sha2::Digest as _;

    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG names a cluster to install on");
    let image = std::env::var("FLOTILLA_TEST_IMAGE").expect(
        "FLOTILLA_TEST_IMAGE names the image of docker/Dockerfile (repository:tag), pullable by the cluster",
    );
    let runner_image = std::env::var("FLOTILLA_TEST_RUNNER_IMAGE").unwrap_or(image.clone());
    let split = |image: &str| -> Value {
        let (repository, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{image} has no :tag"));
        serde_yaml::from_str(&format!("{{repository: {repository:?}, tag: {tag:?}}}")).unwrap()
    };
    let namespace = format!("flotilla-chart-test-{}", std::process::id());
    let k = |args: &[&str]| kubectl(&kubeconfig, args, None);
    k(&["create", "namespace", &namespace]);
    let _cleanup = RealCleanup {
        kubeconfig: kubeconfig.clone(),
        namespace: namespace.clone(),
    };
    // Replica pods cache models in a hostPath folder (node-cache delivery).
    k(&[
        "label",
        "namespace",
        &namespace,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    let n = |args: &[&str]| {
        let mut all = vec!["-n", namespace.as_str()];
        all.extend_from_slice(args);
        kubectl(&kubeconfig, &all, None)
    };

    // The hub's NATS: the users `flotilla nats-config` writes, one Secret
    // key per user, and a leaf node port for the member.
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("nats-config");
    let made = Process::new(flotilla_integration::fleet::target_bin("flotilla"))
        .arg("nats-config")
        .arg("--out")
        .arg(&config_dir)
        .args(["--cluster", "e2e"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let conf = config_dir.join("nats-server.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nleafnodes { listen: \"0.0.0.0:7422\" }\n");
    std::fs::write(&conf, text).unwrap();
    n(&[
        "create",
        "configmap",
        "nats-conf",
        &format!("--from-file=nats-server.conf={}", conf.display()),
    ]);
    kubectl(
        &kubeconfig,
        &["-n", &namespace, "apply", "-f", "-"],
        Some(TEST_NATS),
    );
    let mut passwords = BTreeMap::new();
    for entry in std::fs::read_dir(config_dir.join("users")).unwrap() {
        let path = entry.unwrap().path();
        let user = path.file_stem().unwrap().to_str().unwrap().to_string();
        let password = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("FLOTILLA_NATS_PASSWORD=")
                    .map(str::to_string)
            })
            .unwrap();
        passwords.insert(user, password);
    }
    let literals: Vec<String> = passwords
        .iter()
        .map(|(user, password)| format!("--from-literal={user}={password}"))
        .collect();
    let mut args = vec!["create", "secret", "generic", "flotilla-nats-users"];
    args.extend(literals.iter().map(String::as_str));
    n(&args);

    // The edge's server certificate and the global gateway's client
    // certificate, from one CA.
    let edge_host = format!("flotilla-member-edge.{namespace}.svc");
    let ca = flotilla_tls::Authority::generate("Flotilla chart test edge CA").unwrap();
    let ca_file = dir.path().join("edge-ca.crt");
    ca.write_cert(&ca_file).unwrap();
    let (edge_cert, edge_key) = ca
        .issue_server(std::slice::from_ref(&edge_host))
        .unwrap()
        .write(dir.path(), "edge")
        .unwrap();
    let (gateway_cert, gateway_key) = ca
        .issue_client("flotilla-gateway")
        .unwrap()
        .write(dir.path(), "gateway")
        .unwrap();
    for (secret, cert, key) in [
        ("flotilla-edge-tls", &edge_cert, &edge_key),
        ("flotilla-gateway-edge-tls", &gateway_cert, &gateway_key),
    ] {
        n(&[
            "create",
            "secret",
            "generic",
            secret,
            &format!("--from-file=ca.crt={}", ca_file.display()),
            &format!("--from-file=tls.crt={}", cert.display()),
            &format!("--from-file=tls.key={}", key.display()),
        ]);
    }

    // The hub's control services, then the member with its values file.
    let mut hub: Value = serde_yaml::from_str(
        "{nats: {url: 'nats://nats:4222', credentialsSecret: flotilla-nats-users},
          hub: {gateway: {replicas: 1, edges: {tls: {secretName: flotilla-gateway-edge-tls}}}}}",
    )
    .unwrap();
    hub["image"] = split(&image);
    install_real(&kubeconfig, &namespace, "flotilla", &hub);
    let mut member = values_file("values-member.yaml");
    member["image"] = split(&image);
    member["executor"]["cluster"] = Value::from("e2e");
    member["executor"]["images"] = serde_yaml::from_str("{runner: {}}").unwrap();
    member["executor"]["images"]["runner"] = split(&runner_image);
    member["nats"]["streamReplicas"] = Value::from(1);
    member["nats"]["tls"]["enabled"] = Value::from(false);
    member["leaf"]["hubUrls"] = serde_yaml::from_str("[nats:7422]").unwrap();
    member["edge"]["url"] = Value::from(format!("https://{edge_host}:8443"));
    member["edge"]["replicas"] = Value::from(1);
    member["edge"]["service"]["type"] = Value::from("ClusterIP");
    install_real(&kubeconfig, &namespace, "flotilla-member", &member);
    for deployment in ["nats", "flotilla-placement", "flotilla-member-executor"] {
        n(&[
            "rollout",
            "status",
            &format!("deploy/{deployment}"),
            "--timeout=10m",
        ]);
    }

    // The shipped model, pushed through the hub's NATS as the operator,
    // and one candle replica of it placed on the member.
    let (_nats, nats_port) = port_forward(&kubeconfig, &namespace, "nats", 4222).await;
    let cli = |args: &[&str]| {
        let out = Process::new(flotilla_integration::fleet::target_bin("flotilla"))
            .args(args)
            .env("FLOTILLA_NATS_URL", format!("nats://127.0.0.1:{nats_port}"))
            .env("FLOTILLA_NATS_USER", "admin")
            .env("FLOTILLA_NATS_PASSWORD", &passwords["admin"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    support::poll_until(
        Duration::from_secs(300),
        "cluster e2e in `flotilla get clusters`",
        || {
            let listed = cli(&["get", "clusters"]);
            async move { (listed.0 && listed.1.contains("e2e")).then_some(()) }
        },
    )
    .await;
    let model = support::shipped_model();
    let digest = format!(
        "sha256:{:x}",
        sha2::Sha256::digest(std::fs::read(&model).unwrap())
    );
    let pushed = cli(&[
        "model",
        "push",
        "--name",
        "chart-test-smollm2",
        &model.display().to_string(),
    ]);
    assert!(pushed.0, "flotilla model push: {}", pushed.1);
    let deployment = dir.path().join("deployment.yaml");
    std::fs::write(
        &deployment,
        format!(
            "apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata: {{name: chart-test}}
spec:
  model: {{artifact: {{name: chart-test-smollm2, digest: '{digest}', format: gguf}}}}
  runtime: candle
  replicas: 1
  resources: {{gpu: {{count: 1}}}}
  placement: {{policy: PickFixed, clusterNames: [e2e]}}
"
        ),
    )
    .unwrap();
    let applied = cli(&["apply", "-f", &deployment.display().to_string()]);
    assert!(applied.0, "flotilla apply: {}", applied.1);

    // A chat through the hub's global gateway, which reaches the replica
    // through the member's edge.
    let (_gateway, gateway_port) =
        port_forward(&kubeconfig, &namespace, "flotilla-gateway", 8080).await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gateway_port}/v1");
    let answer: serde_json::Value = support::poll_until(
        Duration::from_secs(20 * 60),
        "a chat answered through the gateway (the replica needs a node with an allocatable \
         nvidia.com/gpu; `flotilla describe deployment chart-test` says why not)",
        || {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let models: serde_json::Value = http
                    .get(format!("{base}/models"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let model = models["data"][0]["id"].as_str()?.to_string();
                let answer = http
                    .post(format!("{base}/chat/completions"))
                    .json(&serde_json::json!({
                        "model": model,
                        "messages": [{"role": "user", "content": "Say hello."}],
                        "max_tokens": 8,
                    }))
                    .send()
                    .await
                    .ok()?;
                if !answer.status().is_success() {
                    return None;
                }
                answer.json().await.ok()
            }
        },
    )
    .await;
    assert!(!support::text(&answer).is_empty(), "{answer}");

    // The replica is a Deployment owned by the executor's.
    let replicas: serde_json::Value = serde_json::from_str(&n(&[
        "get",
        "deployments",
        "-l",
        "flotilla.dev/deployment=chart-test",
        "-o",
        "json",
    ]))
    .unwrap();
    let items = replicas["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{replicas}");
    let owners = &items[0]["metadata"]["ownerReferences"];
    assert_eq!(owners[0]["kind"], "Deployment", "{owners}");
    assert_eq!(owners[0]["name"], "flotilla-member-executor", "{owners}");

    // Uninstalling the member garbage-collects its replicas' pods.
    let out = render_py(
        &["--uninstall", &kubeconfig, &namespace, "flotilla-member"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::poll_until(
        Duration::from_secs(300),
        "no replica pod left after uninstalling the member",
        || {
            let left = n(&[
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/managed-by=flotilla-executor",
                "-o",
                "name",
            ]);
            async move { left.trim().is_empty().then_some(()) }
        },
    )
    .await;
}

#[test]
fn compose_and_chart_name_only_existing_paths() {
    let root = workspace_root();
    for p in [
        "docker/Dockerfile",
        "docker/runner.Dockerfile",
        "docker/runner-cuda.Dockerfile",
        "helm/flotilla/values-member.yaml",
        "docs/deploy-kubernetes.md",
        "docs/security.md",
    ] {
        assert!(Path::new(&root.join(p)).is_file(), "{p} is missing");
    }
}

#[test]
fn a_member_edge_serves_the_hub_over_mutual_tls_and_local_clients_in_plain() {
    let objects = render_chart(&member_values());
    let edge = container(&objects, "flotilla-edge");
    assert_eq!(edge["command"][0], "/usr/local/bin/flotilla-gateway");
    let env = env_of(edge);
    let value = |n: &str| {
        env.get(n)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("the edge has no {n}"))
            .to_string()
    };
    assert_eq!(value("FLOTILLA_GATEWAY_CLUSTER"), "member-1");
    assert_eq!(value("FLOTILLA_GATEWAY_ADDR"), "0.0.0.0:8443");
    assert_eq!(value("FLOTILLA_GATEWAY_LOCAL_ADDR"), "0.0.0.0:8081");
    assert_eq!(value("FLOTILLA_NATS_URL"), "nats://flotilla-leaf:4222");
    assert_eq!(
        value("FLOTILLA_NATS_INBOX_PREFIX"),
        "_INBOX.executor-member-1"
    );
    // The TLS files come from the edge's Secret, mounted whole so that an
    // updated Secret reaches them (no subPath).
    let mount = edge["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "edge-tls")
        .expect("the edge's TLS Secret mounted");
    assert!(mount["subPath"].is_null(), "{mount}");
    let dir = mount["mountPath"].as_str().unwrap();
    for (var, file) in [
        ("FLOTILLA_GATEWAY_TLS_CERT", "tls.crt"),
        ("FLOTILLA_GATEWAY_TLS_KEY", "tls.key"),
        ("FLOTILLA_GATEWAY_TLS_CLIENT_CA", "ca.crt"),
    ] {
        assert_eq!(value(var), format!("{dir}/{file}"));
    }
    let pod = &of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-edge")
        .unwrap()["spec"]["template"]["spec"];
    let secret = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "edge-tls")
        .unwrap();
    assert_eq!(secret["secret"]["secretName"], "flotilla-edge-tls");
    // The kubelet has no client certificate: probes use the plain port.
    assert_eq!(edge["readinessProbe"]["httpGet"]["port"], "local");

    let service = |name: &str| {
        of_kind(&objects, "Service")
            .into_iter()
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    let mtls = service("flotilla-edge");
    assert_eq!(mtls["spec"]["type"], "LoadBalancer");
    assert_eq!(mtls["spec"]["ports"][0]["port"], 8443);
    assert_eq!(mtls["spec"]["ports"][0]["targetPort"], "https");
    let local = service("flotilla-edge-local");
    assert_eq!(local["spec"]["type"], "ClusterIP");
    assert_eq!(local["spec"]["ports"][0]["port"], 8081);
    assert_eq!(local["spec"]["ports"][0]["targetPort"], "local");
}

#[test]
fn the_chart_refuses_an_edge_without_an_https_url() {
    for (url, message) in [
        ("", "edge.url is required with edge.enabled"),
        (
            "http://edge.member-1.example.com:8443",
            "must start with https://",
        ),
    ] {
        let mut values = member_values();
        values["edge"]["url"] = Value::from(url);
        let out = helm(&values);
        assert!(!out.status.success(), "{url:?} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{url:?}: {stderr}");
    }
    let mut values = member_values();
    values["leaf"]["hubUrls"] = Value::Sequence(vec![]);
    let out = helm(&values);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("leaf.hubUrls is required"), "{stderr}");
}

/// The rendered leaf configuration and the leaf Deployment's environment,
/// with `$(VAR)` references to the password expanded as the kubelet does.
fn leaf_config_and_env(
    objects: &[serde_json::Value],
    password: &str,
) -> (String, Vec<(String, String)>) {
    let config = of_kind(objects, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "flotilla-leaf")
        .expect("a ConfigMap for the leaf")["data"]["leaf.conf"]
        .as_str()
        .unwrap()
        .to_string();
    let env = container(objects, "flotilla-leaf")["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let value = e["value"].as_str()?;
            Some((
                e["name"].as_str().unwrap().to_string(),
                value.replace("$(FLOTILLA_LEAF_PASSWORD)", password),
            ))
        })
        .collect();
    (config, env)
}

#[test]
fn a_member_leaf_logs_in_to_the_hub_as_its_executor_without_jetstream() {
    let objects = render_chart(&member_values());
    let (config, _) = leaf_config_and_env(&objects, "p");
    assert!(
        !config.to_lowercase().contains("jetstream {") && !config.contains("store_dir"),
        "{config}"
    );
    assert!(config.contains("listen: \"0.0.0.0:4222\""), "{config}");
    for i in 0..3 {
        assert!(
            config.contains(&format!("$FLOTILLA_HUB_LEAF_URL_{i}")),
            "{config}"
        );
    }
    assert!(
        config.contains("ca_file: \"/etc/nats-tls/ca.crt\""),
        "{config}"
    );
    let leaf = container(&objects, "flotilla-leaf");
    let env = env_of(leaf);
    assert_eq!(
        env["FLOTILLA_LEAF_PASSWORD"]["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "flotilla-nats-users", "key": "executor-member-1"})
    );
    for (i, host) in ["nats-0", "nats-1", "nats-2"].iter().enumerate() {
        assert_eq!(
            env[&format!("FLOTILLA_HUB_LEAF_URL_{i}")]["value"],
            format!(
                "nats-leaf://executor-member-1:$(FLOTILLA_LEAF_PASSWORD)@{host}.hub.example.com:7422"
            )
        );
    }
    let service = of_kind(&objects, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "flotilla-leaf")
        .expect("a Service for the leaf");
    assert_eq!(service["spec"]["ports"][0]["port"], 4222);
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The leaf configuration the chart renders, run by the real nats-server:
/// it logs in to a hub's leaf node port with the executor's password from
/// the environment, and a request from a client of the leaf (with the
/// executor's reply inboxes) is answered on the hub.
#[tokio::test]
async fn the_rendered_leaf_configuration_connects_to_a_hub() {
    let [leaf_port, hub_leaf_port, monitor_port] = support::free_ports::<3>();
    let password = "Z9leafPassw0rd";
    let dir = tempfile::tempdir().unwrap();
    let hub_conf = dir.path().join("hub.conf");
    std::fs::write(
        &hub_conf,
        format!(
            "jetstream {{ store_dir: {:?} }}\n\
             leafnodes {{ listen: \"127.0.0.1:{hub_leaf_port}\" }}\n\
             authorization {{ users: [\n\
               {{user: \"executor-member-1\", password: \"{password}\"}}\n\
               {{user: \"hub\", password: \"hubside\"}}\n\
             ] }}\n",
            dir.path().join("store").display().to_string()
        ),
    )
    .unwrap();
    let hub = flotilla_integration::NatsServer::start_with_config(&hub_conf)
        .await
        .unwrap();

    let mut values = member_values();
    values["leaf"]["hubUrls"] =
        serde_yaml::from_str(&format!("[127.0.0.1:{hub_leaf_port}]")).unwrap();
    values["nats"]["tls"]["enabled"] = Value::from(false);
    let (config, env) = leaf_config_and_env(&render_chart(&values), password);
    let leaf_conf = dir.path().join("leaf.conf");
    std::fs::write(&leaf_conf, &config).unwrap();
    // The command line moves the rendered 0.0.0.0:4222 and 8222 to free
    // loopback ports; the rest is the file as rendered.
    let _leaf = KillOnDrop(
        Process::new(workspace_root().join(".tools/bin/nats-server"))
            .arg("-c")
            .arg(&leaf_conf)
            .args(["-a", "127.0.0.1", "-p", &leaf_port.to_string()])
            .args(["-m", &monitor_port.to_string()])
            .envs(env)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );

    let hub_client =
        async_nats::ConnectOptions::with_user_and_password("hub".into(), "hubside".into())
            .connect(hub.url())
            .await
            .unwrap();
    let mut echo = hub_client.subscribe("flotilla.test.leaf").await.unwrap();
    let responder = tokio::spawn({
        let hub_client = hub_client.clone();
        async move {
            use futures::StreamExt;
            while let Some(msg) = echo.next().await {
                if let Some(reply) = msg.reply {
                    hub_client.publish(reply, msg.payload).await.unwrap();
                }
            }
        }
    });
    let leaf_url = format!("nats://127.0.0.1:{leaf_port}");
    let answer = support::poll_until(
        Duration::from_secs(20),
        "a request from the leaf answered on the hub",
        || {
            let leaf_url = leaf_url.clone();
            async move {
                let client = async_nats::ConnectOptions::new()
                    .custom_inbox_prefix("_INBOX.executor-member-1")
                    .connect(leaf_url)
                    .await
                    .ok()?;
                let reply = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request("flotilla.test.leaf", "ping".into()),
                )
                .await
                .ok()?
                .ok()?;
                Some(reply.payload)
            }
        },
    )
    .await;
    assert_eq!(&answer[..], b"ping");
    responder.abort();
}

#[test]
fn the_hub_gateway_reaches_edges_over_mutual_tls_and_streams_have_three_replicas() {
    let objects = render_chart(&values_file("values-hub.yaml"));
    let deployments: BTreeSet<&str> = of_kind(&objects, "Deployment")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(deployments, BTreeSet::from(CONTROL_SERVICES));
    check_workloads(&objects);
    for d in of_kind(&objects, "Deployment") {
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let env = env_of(c);
        assert_eq!(
            env["FLOTILLA_STREAM_REPLICAS"]["value"], "3",
            "{}",
            d["metadata"]["name"]
        );
        let url = env["FLOTILLA_NATS_URL"]["value"].as_str().unwrap();
        assert_eq!(url.split(',').count(), 3, "{url}");
    }
    let gateway = container(&objects, "flotilla-gateway");
    let env = env_of(gateway);
    let mount = gateway["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "edge-client-tls")
        .expect("the gateway's edge client Secret mounted");
    assert!(mount["subPath"].is_null(), "{mount}");
    let dir = mount["mountPath"].as_str().unwrap();
    for (var, file) in [
        ("FLOTILLA_GATEWAY_EDGE_CA", "ca.crt"),
        ("FLOTILLA_GATEWAY_EDGE_CLIENT_CERT", "tls.crt"),
        ("FLOTILLA_GATEWAY_EDGE_CLIENT_KEY", "tls.key"),
    ] {
        assert_eq!(env[var]["value"], format!("{dir}/{file}"), "{var}");
    }
    let pod = &of_kind(&objects, "Deployment")
        .into_iter()
        .find(|d| d["metadata"]["name"] == "flotilla-gateway")
        .unwrap()["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "edge-client-tls"
                && v["secret"]["secretName"] == "flotilla-gateway-edge-tls"),
        "{pod}"
    );
    // No leaf and no edge on the hub.
    assert!(of_kind(&objects, "ConfigMap").is_empty());
}
