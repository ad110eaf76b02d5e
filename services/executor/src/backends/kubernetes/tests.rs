//! The backend against kube's `tower-test` mock API server: every
//! request it sends is checked.

use flotilla_proto::v1;
use serde_json::{Value, json};
use tower_test::mock::{Handle, SendResponse};

use super::objects::tests::{config, spec};
use super::*;
use crate::backends::Moved;

type ApiHandle = Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>;
type Reply = SendResponse<http::Response<kube::client::Body>>;

fn backend() -> (KubernetesBackend, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let client = kube::Client::new(service, "default");
    (KubernetesBackend::new(client, config()), handle)
}

/// The next request: method, path, query, JSON body (or null).
async fn next(handle: &mut ApiHandle) -> (http::Method, String, String, Value, Reply) {
    let (request, reply) = handle.next_request().await.expect("a request");
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (method, path, query, body, reply)
}

fn answer(reply: Reply, status: u16, body: &Value) {
    reply.send_response(
        http::Response::builder()
            .status(status)
            .body(kube::client::Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

fn pod(replica: &str, status: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("flotilla-{replica}-abc"), "labels": {LABEL_REPLICA: replica, LABEL_CLUSTER: "eu-1"}},
           "status": status})
}

fn pod_list(pods: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
}

fn ready_status(ip: &str) -> Value {
    json!({"phase": "Running", "podIP": ip,
           "conditions": [{"type": "Ready", "status": "True"}]})
}

const REPLICA_PODS_QUERY: &str =
    "labelSelector=flotilla.dev%2Fcluster%3Deu-1%2Cflotilla.dev%2Freplica%3Dchat-g3-0";

#[tokio::test]
async fn start_creates_the_deployment_and_waits_for_a_ready_pod() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (method, path, _, body, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::POST);
        assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
        assert_eq!(
            body,
            serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle))).unwrap()
        );
        answer(reply, 201, &body);
        // Scheduled but not ready, then ready.
        let (method, path, query, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::GET);
        assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
        assert!(query.contains(REPLICA_PODS_QUERY), "{query}");
        answer(
            reply,
            200,
            &pod_list(vec![pod("chat-g3-0", json!({"phase": "Pending"}))]),
        );
        let (_, path, _, _, reply) = next(&mut api).await;
        assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
        answer(
            reply,
            200,
            &pod_list(vec![pod("chat-g3-0", ready_status("10.1.2.3"))]),
        );
    });
    let url = backend.start(&spec(v1::Runtime::Candle)).await.unwrap();
    server.await.unwrap();
    assert_eq!(url, "http://10.1.2.3:8000");
    assert!(backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn a_crash_looping_pod_fails_the_start_and_its_deployment_is_deleted() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (method, _, _, body, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::POST);
        answer(reply, 201, &body);
        let (_, _, _, _, reply) = next(&mut api).await;
        answer(
            reply,
            200,
            &pod_list(vec![pod(
                "chat-g3-0",
                json!({"phase": "Running", "containerStatuses": [{
                    "name": "replica", "image": "flotilla-runner:test", "imageID": "",
                    "ready": false, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 1m0s"}}}]}),
            )]),
        );
        let (method, path, _, body, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
        );
        assert_eq!(body["propagationPolicy"], "Background");
        answer(
            reply,
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
    });
    let err = backend.start(&spec(v1::Runtime::Candle)).await.unwrap_err();
    server.await.unwrap();
    assert!(err.to_string().contains("CrashLoopBackOff"), "{err}");
    assert!(!backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn stop_deletes_the_deployment_and_a_missing_one_is_not_an_error() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (method, path, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
        );
        answer(
            reply,
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
        let (method, path, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-gone-0"
        );
        answer(reply, 404, &not_found());
    });
    assert!(backend.stop("chat-g3-0").await.unwrap());
    assert!(!backend.stop("gone-0").await.unwrap());
    server.await.unwrap();
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
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (method, path, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::GET);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
        );
        let existing =
            serde_json::to_value(deployment_object(&config(), &spec(v1::Runtime::Candle))).unwrap();
        answer(reply, 200, &existing);
        let (_, path, query, _, reply) = next(&mut api).await;
        assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
        assert!(query.contains(REPLICA_PODS_QUERY), "{query}");
        answer(
            reply,
            200,
            &pod_list(vec![pod("chat-g3-0", ready_status("10.1.2.3"))]),
        );
    });
    let adoption = backend.adopt(&recorded(3)).await;
    server.await.unwrap();
    assert_eq!(adoption, Adoption::Adopted("http://10.1.2.3:8000".into()));
    assert!(backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn a_replica_of_another_generation_is_deleted_not_adopted() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (_, _, _, _, reply) = next(&mut api).await;
        let mut older = spec(v1::Runtime::Candle);
        older.generation = 2;
        answer(
            reply,
            200,
            &serde_json::to_value(deployment_object(&config(), &older)).unwrap(),
        );
        let (method, path, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-chat-g3-0"
        );
        answer(
            reply,
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
    });
    let adoption = backend.adopt(&recorded(3)).await;
    server.await.unwrap();
    assert!(
        matches!(&adoption, Adoption::Refused(why) if why.contains("generation")),
        "{adoption:?}"
    );
    assert!(!backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn a_missing_deployment_is_gone() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (_, _, _, _, reply) = next(&mut api).await;
        answer(reply, 404, &not_found());
    });
    let adoption = backend.adopt(&recorded(3)).await;
    server.await.unwrap();
    assert!(matches!(adoption, Adoption::Gone(_)), "{adoption:?}");
}

#[tokio::test]
async fn deployments_no_record_knows_are_deleted() {
    let (backend, mut api) = backend();
    let server = tokio::spawn(async move {
        let (method, path, query, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::GET);
        assert_eq!(path, "/apis/apps/v1/namespaces/flotilla/deployments");
        assert!(
            query.contains(
                "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dflotilla-executor%2Cflotilla.dev%2Fcluster%3Deu-1"
            ),
            "{query}"
        );
        let known = deployment_object(&config(), &spec(v1::Runtime::Candle));
        let mut stray_spec = spec(v1::Runtime::Candle);
        stray_spec.replica_id = "stray-0".into();
        let stray = deployment_object(&config(), &stray_spec);
        answer(
            reply,
            200,
            &json!({"apiVersion": "apps/v1", "kind": "DeploymentList", "metadata": {},
                    "items": [known, stray]}),
        );
        let (method, path, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            path,
            "/apis/apps/v1/namespaces/flotilla/deployments/flotilla-stray-0"
        );
        answer(
            reply,
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
    });
    let known = HashSet::from(["chat-g3-0".to_string()]);
    let stopped = backend.stop_unknown(&known).await;
    server.await.unwrap();
    assert_eq!(stopped, ["stray-0"]);
}

#[tokio::test]
async fn a_pod_that_fails_after_ready_is_reported_and_deleted() {
    let (backend, mut api) = backend();
    lock(&backend.running).insert("chat-g3-0".into(), "http://10.1.2.3:8000".into());
    let server = tokio::spawn(async move {
        let (_, path, query, _, reply) = next(&mut api).await;
        assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
        assert!(query.contains("flotilla.dev%2Fcluster%3Deu-1"), "{query}");
        answer(
            reply,
            200,
            &pod_list(vec![pod(
                "chat-g3-0",
                json!({"phase": "Failed", "message": "The node was low on resource: memory."}),
            )]),
        );
        let (method, _, _, _, reply) = next(&mut api).await;
        assert_eq!(method, http::Method::DELETE);
        answer(
            reply,
            200,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
        );
    });
    let seen = backend.observe().await;
    server.await.unwrap();
    let failures = &seen.failed;
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].reason.contains("low on resource"),
        "{failures:?}"
    );
    assert!(seen.moved.is_empty());
    assert!(!backend.runs("chat-g3-0"));
}

#[tokio::test]
async fn a_pod_re_created_on_another_node_moves_the_replica() {
    let (backend, mut api) = backend();
    lock(&backend.running).insert("chat-g3-0".into(), "http://10.1.2.3:8000".into());
    let server = tokio::spawn(async move {
        for ip in ["10.1.2.3", "10.4.5.6", "10.4.5.6"] {
            let (_, path, _, _, reply) = next(&mut api).await;
            assert_eq!(path, "/api/v1/namespaces/flotilla/pods");
            answer(
                reply,
                200,
                &pod_list(vec![pod("chat-g3-0", ready_status(ip))]),
            );
        }
    });
    // Where it started: nothing moved.
    assert_eq!(backend.observe().await, Observation::default());
    // Its pod came back elsewhere: one move, reported once.
    *lock(&backend.last_observed) = None;
    assert_eq!(
        backend.observe().await,
        Observation {
            failed: vec![],
            moved: vec![Moved {
                replica_id: "chat-g3-0".into(),
                endpoint: "http://10.4.5.6:8000".into(),
            }],
        }
    );
    assert_eq!(lock(&backend.running)["chat-g3-0"], "http://10.4.5.6:8000");
    *lock(&backend.last_observed) = None;
    assert_eq!(
        backend.observe().await,
        Observation::default(),
        "already there"
    );
    server.await.unwrap();
    assert!(backend.runs("chat-g3-0"));
}
