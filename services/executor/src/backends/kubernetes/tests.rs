//! The backend against a small fake API server behind kube's `tower-test`
//! mock service: it keeps objects by kind, answers gets, lists, creates,
//! replaces and deletes, and streams watch events (replaying from the
//! resource version a watch asks for), so the backend's reflectors see
//! what a test changes as they would see a cluster. Every create, replace
//! and delete the backend sends is handed to the test in order.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use flotilla_proto::v1;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock::Handle;

use super::nodes::NodeInventory;
use super::objects::tests::{config, spec};
use super::*;
use crate::backends::Moved;

type Body = UnsyncBoxBody<Bytes, Infallible>;
type ApiHandle = Handle<http::Request<kube::client::Body>, http::Response<Body>>;

/// A create, replace or delete the backend sent: method, path, body.
type Mutation = (http::Method, String, Value);

#[derive(Default)]
struct State {
    /// kind (`pods`, `deployments`, `nodes`) to `namespace/name` to object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// (resource version, kind, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    version: u64,
    watches: Vec<Watch>,
    /// Kinds whose API this cluster does not have (a CRD not installed):
    /// every request on them is answered 404.
    absent: Vec<String>,
}

struct Watch {
    kind: String,
    namespace: Option<String>,
    labels: Vec<(String, String)>,
    send: mpsc::UnboundedSender<Bytes>,
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn matches(object: &Value, namespace: Option<&str>, labels: &[(String, String)]) -> bool {
    namespace.is_none_or(|ns| object["metadata"]["namespace"] == ns)
        && labels
            .iter()
            .all(|(k, v)| object["metadata"]["labels"][k.as_str()] == v.as_str())
}

impl State {
    fn change(&mut self, kind: &str, ty: &'static str, mut object: Value) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        let key = key_of(&object);
        let objects = self.objects.entry(kind.to_string()).or_default();
        if ty == "DELETED" {
            objects.remove(&key);
        } else {
            objects.insert(key, object.clone());
        }
        self.history
            .push((self.version, kind.to_string(), ty, object.clone()));
        let line = Bytes::from(format!("{}\n", json!({"type": ty, "object": object})));
        self.watches.retain(|w| {
            if w.kind != kind || !matches(&object, w.namespace.as_deref(), &w.labels) {
                return true;
            }
            w.send.send(line.clone()).is_ok()
        });
        object
    }
}

/// The fake API server; dropped with the test.
#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    /// Creates or changes an object as another hand would (a kubelet, the
    /// scheduler, a person with kubectl).
    fn apply(&self, kind: &str, object: Value) {
        let mut state = self.state.lock().unwrap();
        let exists = state
            .objects
            .get(kind)
            .is_some_and(|o| o.contains_key(&key_of(&object)));
        state.change(kind, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    fn remove(&self, kind: &str, namespace: &str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let key = format!("{namespace}/{name}");
        if let Some(object) = state.objects.get(kind).and_then(|o| o.get(&key)).cloned() {
            state.change(kind, "DELETED", object);
        }
    }

    fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(kind)
            .and_then(|o| o.get(&format!("{namespace}/{name}")))
            .cloned()
    }
}

fn respond(status: u16, body: &Value) -> http::Response<Body> {
    http::Response::builder()
        .status(status)
        .body(
            Full::new(Bytes::from(serde_json::to_vec(body).unwrap()))
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

fn success() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
}

/// (kind, namespace, name) of a request path.
fn parse_path(path: &str) -> (String, Option<String>, Option<String>) {
    // `/api/v1/...` or `/apis/<group>/<version>/...`.
    let rest = path
        .strip_prefix("/api/v1/")
        .or_else(|| {
            path.strip_prefix("/apis/")
                .and_then(|p| p.splitn(3, '/').nth(2))
        })
        .unwrap_or(path);
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["namespaces", ns, kind] => (kind.to_string(), Some(ns.to_string()), None),
        ["namespaces", ns, kind, name] => (
            kind.to_string(),
            Some(ns.to_string()),
            Some(name.to_string()),
        ),
        [kind] => (kind.to_string(), None, None),
        [kind, name] => (kind.to_string(), None, Some(name.to_string())),
        _ => panic!("unexpected path {path}"),
    }
}

fn query_of(request: &http::Request<kube::client::Body>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let v = v
                .replace("%2F", "/")
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%21", "!");
            (k.to_string(), v)
        })
        .collect()
}

fn list_kind(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "pods" => ("PodList", "v1"),
        "nodes" => ("NodeList", "v1"),
        "deployments" => ("DeploymentList", "apps/v1"),
        "leaderworkersets" => ("LeaderWorkerSetList", "leaderworkerset.x-k8s.io/v1"),
        other => panic!("no list kind for {other}"),
    }
}

async fn serve(mut handle: ApiHandle, api: FakeApi, mutations: mpsc::UnboundedSender<Mutation>) {
    while let Some((request, reply)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let query = query_of(&request);
        let (kind, namespace, name) = parse_path(&path);
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let labels: Vec<(String, String)> = query
            .get("labelSelector")
            .map(|s| {
                s.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let ns = namespace.clone().unwrap_or_default();
        if api.state.lock().unwrap().absent.contains(&kind) {
            if method != http::Method::GET {
                let _ = mutations.send((method, path, body));
            }
            reply.send_response(respond(404, &not_found()));
            continue;
        }
        let response = match (method.clone(), name) {
            (http::Method::GET, None) if query.get("watch").is_some_and(|w| w == "true") => {
                let since: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (send, receive) = mpsc::unbounded_channel::<Bytes>();
                {
                    let mut state = api.state.lock().unwrap();
                    for (version, k, ty, object) in &state.history {
                        if *version > since
                            && *k == kind
                            && matches(object, namespace.as_deref(), &labels)
                        {
                            let line = format!("{}\n", json!({"type": ty, "object": object}));
                            send.send(Bytes::from(line)).unwrap();
                        }
                    }
                    state.watches.push(Watch {
                        kind: kind.clone(),
                        namespace: namespace.clone(),
                        labels,
                        send,
                    });
                }
                let stream = lines(receive);
                http::Response::builder()
                    .status(200)
                    .body(StreamBody::new(stream).boxed_unsync())
                    .unwrap()
            }
            (http::Method::GET, None) => {
                let state = api.state.lock().unwrap();
                let items: Vec<Value> = state
                    .objects
                    .get(&kind)
                    .map(|o| {
                        o.values()
                            .filter(|v| matches(v, namespace.as_deref(), &labels))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let (list, version) = list_kind(&kind);
                respond(
                    200,
                    &json!({"kind": list, "apiVersion": version,
                            "metadata": {"resourceVersion": state.version.to_string()},
                            "items": items}),
                )
            }
            (http::Method::GET, Some(name)) => match api.get(&kind, &ns, &name) {
                Some(object) => respond(200, &object),
                None => respond(404, &not_found()),
            },
            (http::Method::POST, None) => {
                let _ = mutations.send((method, path, body.clone()));
                let mut object = body;
                object["metadata"]["namespace"] = json!(ns);
                let exists = api.get(
                    &kind,
                    &ns,
                    object["metadata"]["name"].as_str().unwrap_or(""),
                );
                if exists.is_some() {
                    respond(
                        409,
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "AlreadyExists", "code": 409,
                                "message": "already exists"}),
                    )
                } else {
                    let created = api.state.lock().unwrap().change(&kind, "ADDED", object);
                    respond(201, &created)
                }
            }
            (http::Method::PUT, Some(_)) => {
                let _ = mutations.send((method, path, body.clone()));
                let mut object = body;
                object["metadata"]["namespace"] = json!(ns);
                let replaced = api.state.lock().unwrap().change(&kind, "MODIFIED", object);
                respond(200, &replaced)
            }
            (http::Method::DELETE, Some(name)) => {
                let _ = mutations.send((method, path, body));
                match api.get(&kind, &ns, &name) {
                    Some(object) => {
                        api.state.lock().unwrap().change(&kind, "DELETED", object);
                        respond(200, &success())
                    }
                    None => respond(404, &not_found()),
                }
            }
            (method, name) => panic!("unexpected {method} {path} ({name:?})"),
        };
        reply.send_response(response);
    }
}

/// A watch's lines as a body stream.
fn lines(
    receive: mpsc::UnboundedReceiver<Bytes>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    futures::stream::unfold(receive, |mut receive| async move {
        receive
            .recv()
            .await
            .map(|line| (Ok(Frame::data(line)), receive))
    })
}

/// A client talking to a fake API server, the server, and the mutations
/// the client sends.
fn fake_api() -> (kube::Client, FakeApi, mpsc::UnboundedReceiver<Mutation>) {
    let (service, handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<Body>>();
    let client = kube::Client::new(service, "default");
    let api = FakeApi {
        state: Arc::default(),
    };
    let (send, mutations) = mpsc::unbounded_channel();
    tokio::spawn(serve(handle, api.clone(), send));
    (client, api, mutations)
}

fn backend() -> (
    KubernetesBackend,
    FakeApi,
    mpsc::UnboundedReceiver<Mutation>,
) {
    let (client, api, mutations) = fake_api();
    (KubernetesBackend::new(client, config()), api, mutations)
}

fn pod(replica: &str, name: &str, status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "flotilla",
                        "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_REPLICA: replica,
                                   LABEL_CLUSTER: "eu-1"}},
           "spec": {"nodeName": "gpu-1", "containers": [{"name": "replica",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
           "status": status})
}

fn ready_status(ip: &str) -> Value {
    json!({"phase": "Running", "podIP": ip,
           "conditions": [{"type": "PodScheduled", "status": "True"},
                          {"type": "Ready", "status": "True"}]})
}

fn waiting(reason: &str, message: &str) -> Value {
    json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
           "containerStatuses": [{
               "name": "replica", "image": "flotilla-runner:test", "imageID": "",
               "ready": false, "restartCount": 4,
               "state": {"waiting": {"reason": reason, "message": message}}}]})
}

fn unschedulable() -> Value {
    json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."}]})
}

async fn next_mutation(mutations: &mut mpsc::UnboundedReceiver<Mutation>) -> Mutation {
    mutations.recv().await.expect("a request")
}

fn named(replica: &str) -> Value {
    let mut s = spec(v1::Runtime::Candle);
    s.replica_id = replica.into();
    let mut object = serde_json::to_value(deployment_object(&config(), &s)).unwrap();
    object["metadata"]["namespace"] = json!("flotilla");
    object
}

/// Observations until `done` says one is what the test waits for; each
/// waits for a change of the stores first, so none reads the API on a
/// timer.
async fn observe_until(
    backend: &KubernetesBackend,
    mut done: impl FnMut(&Observation) -> bool,
) -> Observation {
    let mut pods = backend.pods.subscribe();
    let mut objects = backend.objects.subscribe();
    let mut groups = backend.lws_objects.get().map(Watched::subscribe);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = backend.observe().await;
        if done(&seen) {
            return seen;
        }
        let group_changed = async {
            match groups.as_mut() {
                Some(changes) => changes.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pods.changed() => {}
            _ = objects.changed() => {}
            _ = group_changed => {}
            () = tokio::time::sleep_until(deadline) => panic!("not seen within 10 s"),
        }
    }
}

#[tokio::test]
async fn start_creates_the_deployment_and_waits_for_a_ready_pod() {
    let (backend, api, mut mutations) = backend();
    let starting = tokio::spawn(async move {
        let url = backend.start(&spec(v1::Runtime::Candle)).await;
        (backend, url)
    });
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::POST);
    assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
    assert_eq!(
        body,
        serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle))).unwrap()
    );
    api.apply("pods", pod("chat-g3-0", "p1", json!({"phase": "Pending"})));
    api.apply("pods", pod("chat-g3-0", "p1", ready_status("10.1.2.3")));
    let (backend, url) = starting.await.unwrap();
    assert_eq!(url.unwrap(), "http://10.1.2.3:8000");
    assert!(backend.runs("chat-g3-0"));
}

/// A pod that cannot start fails the start with Kubernetes' reason and
/// message, and its Deployment goes.
async fn fails_with(reason: &str, message: &str) {
    let (backend, api, mut mutations) = backend();
    let started = Instant::now();
    let starting = tokio::spawn(async move {
        let result = backend.start(&spec(v1::Runtime::Candle)).await;
        (backend, result)
    });
    let (method, _, _) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::POST);
    api.apply("pods", pod("chat-g3-0", "p1", waiting(reason, message)));
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::DELETE);
    assert_eq!(
        path,
        "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
    );
    assert_eq!(body["propagationPolicy"], "Background");
    let (backend, result) = starting.await.unwrap();
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains(reason) && err.contains(message),
        "{reason}: {err}"
    );
    assert!(!backend.runs("chat-g3-0"));
    println!("{reason} reported after {:?}", started.elapsed());
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[tokio::test]
async fn a_crash_looping_pod_fails_the_start_and_its_deployment_is_deleted() {
    fails_with(
        "CrashLoopBackOff",
        "back-off 1m20s restarting failed container=replica",
    )
    .await;
}

#[tokio::test]
async fn an_image_pull_back_off_fails_the_start() {
    fails_with(
        "ImagePullBackOff",
        "Back-off pulling image \"flotilla-runner:test\"",
    )
    .await;
}

#[tokio::test]
async fn a_pod_waiting_for_a_node_reports_progress_once_per_reason() {
    let (backend, api, mut mutations) = backend();
    let backend = Arc::new(backend);
    let starting = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.start(&spec(v1::Runtime::Candle)).await })
    };
    next_mutation(&mut mutations).await;
    let started = Instant::now();
    api.apply("pods", pod("chat-g3-0", "p1", unschedulable()));
    let seen = observe_until(&backend, |o| !o.progress.is_empty()).await;
    println!("Unschedulable reported after {:?}", started.elapsed());
    assert_eq!(
        seen.progress,
        [Progress {
            replica_id: "chat-g3-0".into(),
            reason: "Unschedulable".into(),
            message: "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.".into(),
        }]
    );
    // The same reason again (the scheduler retried): not reported again.
    api.apply("pods", pod("chat-g3-0", "p1", unschedulable()));
    assert!(backend.observe().await.progress.is_empty());
    // The autoscaler added a node: scheduled, its image pulling.
    api.apply(
        "pods",
        pod("chat-g3-0", "p1", waiting("ContainerCreating", "")),
    );
    let seen = observe_until(&backend, |o| !o.progress.is_empty()).await;
    assert_eq!(seen.progress[0].reason, "ContainerCreating");
    assert!(!starting.is_finished(), "still starting");
    api.apply("pods", pod("chat-g3-0", "p1", ready_status("10.1.2.3")));
    assert_eq!(starting.await.unwrap().unwrap(), "http://10.1.2.3:8000");
    assert!(
        backend.observe().await.progress.is_empty(),
        "a started replica reports no progress"
    );
}

#[tokio::test]
async fn two_starts_do_not_wait_for_each_other() {
    let (backend, api, mut mutations) = backend();
    let backend = Arc::new(backend);
    let mut slow = spec(v1::Runtime::Candle);
    slow.replica_id = "slow-0".into();
    let mut quick = spec(v1::Runtime::Candle);
    quick.replica_id = "quick-0".into();
    let (finished, mut finishes) = mpsc::unbounded_channel::<(&'static str, Instant)>();
    let begun = Instant::now();
    for (which, s) in [("slow", slow), ("quick", quick)] {
        let (backend, finished) = (backend.clone(), finished.clone());
        tokio::spawn(async move {
            let result = backend.start(&s).await;
            let _ = finished.send((which, Instant::now()));
            result
        });
    }
    for _ in 0..2 {
        assert_eq!(next_mutation(&mut mutations).await.0, http::Method::POST);
    }
    // The slow one's pod waits for a node that never comes.
    api.apply("pods", pod("slow-0", "slow-pod", unschedulable()));
    api.apply(
        "pods",
        pod("quick-0", "quick-pod", ready_status("10.9.9.9")),
    );
    let (which, at) = finishes.recv().await.unwrap();
    assert_eq!(which, "quick", "the quick start finished first");
    println!(
        "the quick start took {:?} while the slow one waited",
        at - begun
    );
    assert!(backend.runs("quick-0") && !backend.runs("slow-0"));
    assert!(finishes.try_recv().is_err(), "the slow one still waits");
}

#[tokio::test]
async fn stop_deletes_the_deployment_and_a_missing_one_is_not_an_error() {
    let (backend, api, mut mutations) = backend();
    api.apply("deployments", named("chat-g3-0"));
    assert!(backend.stop("chat-g3-0").await.unwrap());
    let (method, path, _) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::DELETE);
    assert_eq!(
        path,
        "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
    );
    assert!(!backend.stop("gone-0").await.unwrap());
}

fn recorded(generation: u64) -> ReplicaStatus {
    ReplicaStatus {
        replica_id: "chat-g3-0".into(),
        cluster: "eu-1".into(),
        deployment: "chat".into(),
        generation,
        model: "smollm2".into(),
        endpoint: "http://10.1.2.3:8000".into(),
        phase: v1::ReplicaPhase::Ready.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_restarted_executor_adopts_its_ready_replica() {
    let (backend, api, _mutations) = backend();
    api.apply("deployments", named("chat-g3-0"));
    api.apply("pods", pod("chat-g3-0", "p1", ready_status("10.1.2.3")));
    let adoption = backend.adopt(&recorded(3)).await;
    assert_eq!(adoption, Adoption::Adopted("http://10.1.2.3:8000".into()));
    assert!(backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn an_adopted_replica_changed_by_hand_is_handled_as_its_policy_annotation_says() {
    for (policy, put_back) in [
        (v1::DriftPolicy::TakeOver, true),
        (v1::DriftPolicy::ReportOnly, false),
    ] {
        let (backend, api, mut mutations) = backend();
        let mut s = spec(v1::Runtime::Candle);
        s.drift_policy = policy;
        let mut object = serde_json::to_value(deployment_object(&config(), &s)).unwrap();
        object["metadata"]["namespace"] = json!("flotilla");
        // What the server and the Deployment controller add.
        object["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("1");
        object["spec"]["progressDeadlineSeconds"] = json!(600);
        api.apply("deployments", object);
        api.apply("pods", pod("chat-g3-0", "p1", ready_status("10.1.2.3")));
        let adoption = backend.adopt(&recorded(3)).await;
        assert_eq!(adoption, Adoption::Adopted("http://10.1.2.3:8000".into()));
        // The controller's own annotation moving on is not drift.
        let mut live = api
            .get("deployments", "flotilla", "flotilla-chat-g3-0")
            .unwrap();
        live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("2");
        api.apply("deployments", live);
        edited_image(&api);
        let seen = observe_until(&backend, |o| !o.drifted.is_empty()).await;
        assert_eq!(
            seen.drifted[0].differences,
            [
                "spec.template.spec.containers[replica].image: set \"flotilla-runner:test\", found \"someone/else:latest\""
            ],
            "{policy:?}"
        );
        assert_eq!(seen.drifted[0].restored, Ok(put_back), "{policy:?}");
        if put_back {
            let (method, _, body) = next_mutation(&mut mutations).await;
            assert_eq!(method, http::Method::PUT);
            let pod = &body["spec"]["template"]["spec"];
            assert_eq!(pod["containers"][0]["image"], "flotilla-runner:test");
            assert_eq!(body["spec"]["progressDeadlineSeconds"], 600);
        } else {
            assert!(mutations.try_recv().is_err(), "nothing sent");
        }
    }
}

#[tokio::test]
async fn a_replica_of_another_generation_is_deleted_not_adopted() {
    let (backend, api, mut mutations) = backend();
    let mut older = spec(v1::Runtime::Candle);
    older.generation = 2;
    let mut object = serde_json::to_value(deployment_object(&config(), &older)).unwrap();
    object["metadata"]["namespace"] = json!("flotilla");
    api.apply("deployments", object);
    let adoption = backend.adopt(&recorded(3)).await;
    assert!(
        matches!(&adoption, Adoption::Refused(why) if why.contains("generation")),
        "{adoption:?}"
    );
    let (method, path, _) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::DELETE);
    assert!(path.ends_with("/flotilla-chat-g3-0"), "{path}");
    assert!(!backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn a_missing_deployment_is_gone() {
    let (backend, _api, _mutations) = backend();
    let adoption = backend.adopt(&recorded(3)).await;
    assert!(matches!(adoption, Adoption::Gone(_)), "{adoption:?}");
}

#[tokio::test]
async fn deployments_no_record_knows_are_deleted() {
    let (backend, api, mut mutations) = backend();
    api.apply("deployments", named("chat-g3-0"));
    api.apply("deployments", named("stray-0"));
    let known = HashSet::from(["chat-g3-0".to_string()]);
    let stopped = backend.stop_unknown(&known).await;
    assert_eq!(stopped, ["stray-0"]);
    let (method, path, _) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::DELETE);
    assert_eq!(
        path,
        "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-stray-0"
    );
}

/// A backend that started `chat-g3-0`, ready at 10.1.2.3.
async fn started(
    policy: v1::DriftPolicy,
) -> (
    Arc<KubernetesBackend>,
    FakeApi,
    mpsc::UnboundedReceiver<Mutation>,
) {
    let (backend, api, mut mutations) = backend();
    let backend = Arc::new(backend);
    let mut s = spec(v1::Runtime::Candle);
    s.drift_policy = policy;
    let starting = {
        let backend = backend.clone();
        tokio::spawn(async move { backend.start(&s).await })
    };
    assert_eq!(next_mutation(&mut mutations).await.0, http::Method::POST);
    api.apply("pods", pod("chat-g3-0", "p1", ready_status("10.1.2.3")));
    starting.await.unwrap().unwrap();
    (backend, api, mutations)
}

#[tokio::test]
async fn a_pod_that_fails_after_ready_is_reported_and_deleted() {
    let (backend, api, mut mutations) = started(v1::DriftPolicy::TakeOver).await;
    api.apply(
        "pods",
        pod(
            "chat-g3-0",
            "p1",
            json!({"phase": "Failed", "message": "The node was low on resource: memory."}),
        ),
    );
    let seen = observe_until(&backend, |o| !o.failed.is_empty()).await;
    assert!(
        seen.failed[0].reason.contains("low on resource"),
        "{seen:?}"
    );
    assert_eq!(next_mutation(&mut mutations).await.0, http::Method::DELETE);
    assert!(!backend.runs("chat-g3-0"));
    // Its Deployment went by the executor's hand: not drift.
    assert!(backend.observe().await.drifted.is_empty());
}

#[tokio::test]
async fn a_pod_re_created_on_another_node_moves_the_replica() {
    let (backend, api, _mutations) = started(v1::DriftPolicy::TakeOver).await;
    assert_eq!(backend.observe().await.moved, []);
    // Its node went: the pod is gone, then re-created elsewhere.
    api.remove("pods", "flotilla", "p1");
    api.apply("pods", pod("chat-g3-0", "p2", json!({"phase": "Pending"})));
    api.apply("pods", pod("chat-g3-0", "p2", ready_status("10.4.5.6")));
    let seen = observe_until(&backend, |o| !o.moved.is_empty()).await;
    assert_eq!(
        seen.moved,
        [Moved {
            replica_id: "chat-g3-0".into(),
            endpoint: "http://10.4.5.6:8000".into(),
        }]
    );
    assert_eq!(lock(&backend.running)["chat-g3-0"], "http://10.4.5.6:8000");
    assert_eq!(backend.observe().await.moved, [], "reported once");
}

fn edited_image(api: &FakeApi) {
    let mut live = api
        .get("deployments", "flotilla", "flotilla-chat-g3-0")
        .unwrap();
    live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("someone/else:latest");
    api.apply("deployments", live);
}

#[tokio::test]
async fn an_image_changed_by_hand_is_reported_and_put_back_under_take_over() {
    let (backend, api, mut mutations) = started(v1::DriftPolicy::TakeOver).await;
    let changed = Instant::now();
    edited_image(&api);
    let seen = observe_until(&backend, |o| !o.drifted.is_empty()).await;
    println!("drift reported after {:?}", changed.elapsed());
    let drift = &seen.drifted[0];
    assert_eq!(drift.replica_id, "chat-g3-0");
    assert_eq!(
        drift.differences,
        [
            "spec.template.spec.containers[replica].image: set \"flotilla-runner:test\", found \"someone/else:latest\""
        ]
    );
    assert_eq!(drift.restored, Ok(true));
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::PUT);
    assert!(path.ends_with("/deployments/flotilla-chat-g3-0"), "{path}");
    assert_eq!(
        body["spec"]["template"]["spec"]["containers"][0]["image"],
        "flotilla-runner:test"
    );
    assert!(body["metadata"]["resourceVersion"].is_string());
    // Put back: nothing more to report.
    assert_eq!(backend.observe().await.drifted, []);
}

#[tokio::test]
async fn an_image_changed_by_hand_is_reported_and_left_under_report_only() {
    let (backend, api, mut mutations) = started(v1::DriftPolicy::ReportOnly).await;
    edited_image(&api);
    let seen = observe_until(&backend, |o| !o.drifted.is_empty()).await;
    assert_eq!(seen.drifted[0].restored, Ok(false));
    assert_eq!(backend.observe().await.drifted, [], "reported once");
    assert!(mutations.try_recv().is_err(), "nothing sent");
    let live = api
        .get("deployments", "flotilla", "flotilla-chat-g3-0")
        .unwrap();
    assert_eq!(
        live["spec"]["template"]["spec"]["containers"][0]["image"],
        "someone/else:latest"
    );
}

#[tokio::test]
async fn a_deployment_deleted_by_hand_is_created_again_under_take_over() {
    let (backend, api, mut mutations) = started(v1::DriftPolicy::TakeOver).await;
    // Seen once before it goes.
    observe_until(&backend, |_| backend.objects.store.state().len() == 1).await;
    api.remove("deployments", "flotilla", "flotilla-chat-g3-0");
    let seen = observe_until(&backend, |o| !o.drifted.is_empty()).await;
    assert_eq!(seen.drifted[0].differences, ["deleted"]);
    assert_eq!(seen.drifted[0].restored, Ok(true));
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::POST);
    assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
    assert_eq!(body["metadata"]["name"], "flotilla-chat-g3-0");
    assert!(
        api.get("deployments", "flotilla", "flotilla-chat-g3-0")
            .is_some()
    );
}

fn gpu_node(name: &str, gpus: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {
               "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
               "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": gpus.to_string()}},
           "spec": {},
           "status": {"allocatable": {"nvidia.com/gpu": gpus.to_string()},
                      "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// The node inventory's devices once `done` holds for them.
async fn devices_until(
    inventory: &NodeInventory,
    mut done: impl FnMut(&[v1::GpuDevice]) -> bool,
) -> Vec<v1::GpuDevice> {
    let (mut nodes, mut pods) = inventory.changes();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(devices) = inventory.devices()
            && done(&devices)
        {
            return devices;
        }
        tokio::select! {
            _ = nodes.changed() => {}
            _ = pods.changed() => {}
            () = tokio::time::sleep_until(deadline) => panic!("not seen within 10 s"),
        }
    }
}

#[tokio::test]
async fn capacity_follows_the_nodes() {
    let (client, api, _mutations) = fake_api();
    api.apply("nodes", gpu_node("gpu-a", 2));
    let mut busy = pod("chat-g3-0", "p1", ready_status("10.1.2.3"));
    busy["spec"]["nodeName"] = json!("gpu-a");
    api.apply("pods", busy);
    let inventory = NodeInventory::spawn(client);
    let gpus = devices_until(&inventory, |d| d.len() == 2).await;
    assert!(
        gpus.iter()
            .all(|g| g.model == "H100-80GB" && g.node == "gpu-a")
    );
    assert_eq!(gpus.iter().filter(|g| g.allocated).count(), 1, "{gpus:?}");
    // The autoscaler added a node.
    api.apply("nodes", gpu_node("gpu-b", 8));
    let gpus = devices_until(&inventory, |d| d.len() == 10).await;
    assert_eq!(gpus.iter().filter(|g| g.node == "gpu-b").count(), 8);
    // Cordoned: nothing new lands there.
    let mut cordoned = gpu_node("gpu-a", 2);
    cordoned["spec"]["unschedulable"] = json!(true);
    api.apply("nodes", cordoned);
    let gpus = devices_until(&inventory, |d| d.len() == 8).await;
    assert!(gpus.iter().all(|g| g.node == "gpu-b" && !g.allocated));
}

#[tokio::test]
async fn a_replica_is_kept_to_nodes_of_the_gpu_type_it_was_sized_for() {
    let (client, api, mut mutations) = fake_api();
    api.apply("nodes", gpu_node("h100-a", 8));
    let mut l4 = gpu_node("l4-a", 4);
    l4["metadata"]["labels"] =
        json!({"nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.memory": "23034"});
    api.apply("nodes", l4);
    let inventory = Arc::new(NodeInventory::spawn(client.clone()));
    devices_until(&inventory, |d| d.len() == 12).await;
    let backend = KubernetesBackend::new(client, config()).with_inventory(inventory);
    let mut s = spec(v1::Runtime::Candle);
    s.gpu_model = "H100-80GB".into();
    tokio::spawn(async move { backend.start(&s).await });
    let (method, _, body) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::POST);
    assert_eq!(
        body["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"],
        json!([{"key": "nvidia.com/gpu.product", "operator": "In",
                "values": ["NVIDIA-H100-80GB-HBM3"]}])
    );
}

mod multinode;
