//! A replica larger than one node through the backend: one
//! LeaderWorkerSet sent, served by its leader pod alone, stopped, adopted,
//! found as a stray, its drift put back, and a clear refusal where the
//! cluster has no LeaderWorkerSet API.

use super::super::objects::multinode::tests::multi_node;
use super::*;

const LWS_PATH: &str = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/flotilla/leaderworkersets";

/// A pod of the group, as the LWS controller makes it from a template.
fn group_pod(role: &str, name: &str, status: Value) -> Value {
    let mut p = pod("chat-g3-0", name, status);
    p["metadata"]["labels"][LABEL_ROLE] = json!(role);
    p
}

/// The worker of the group, ready (it joined the leader's Ray cluster).
fn ready_worker() -> Value {
    group_pod(
        ROLE_WORKER,
        "flotilla-chat-g3-0-0-1",
        ready_status("10.0.0.2"),
    )
}

/// The leader of the group.
fn leader(status: Value) -> Value {
    group_pod(ROLE_LEADER, "flotilla-chat-g3-0-0", status)
}

/// Starts `multi_node()` on `backend`; the start under way.
fn start_group(
    backend: &Arc<KubernetesBackend>,
) -> tokio::task::JoinHandle<Result<String, crate::backends::BackendError>> {
    let backend = backend.clone();
    tokio::spawn(async move { backend.start(&multi_node()).await })
}

fn stored_lws(spec: &ReplicaSpec) -> Value {
    let mut object = serde_json::to_value(lws_object(&config(), spec).unwrap()).unwrap();
    object["metadata"]["namespace"] = json!("flotilla");
    object
}

/// Starts `multi_node()`, answers with a ready group; the backend, the
/// API and the mutations after the create.
async fn started_group() -> (
    Arc<KubernetesBackend>,
    FakeApi,
    mpsc::UnboundedReceiver<Mutation>,
) {
    let (backend, api, mut mutations) = backend();
    let backend = Arc::new(backend);
    let starting = start_group(&backend);
    let (method, path, _) = next_mutation(&mut mutations).await;
    assert_eq!((method, path.as_str()), (http::Method::POST, LWS_PATH));
    api.apply("pods", ready_worker());
    api.apply("pods", leader(ready_status("10.0.0.1")));
    assert_eq!(starting.await.unwrap().unwrap(), "http://10.0.0.1:8000");
    (backend, api, mutations)
}

#[tokio::test]
async fn a_replica_larger_than_a_node_is_one_leader_worker_set_served_by_its_leader() {
    let (backend, api, mut mutations) = backend();
    let backend = Arc::new(backend);
    let starting = start_group(&backend);
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!((method, path.as_str()), (http::Method::POST, LWS_PATH));
    assert_eq!(
        body,
        serde_json::to_value(lws_object(&config(), &multi_node()).unwrap()).unwrap()
    );
    let template = &body["spec"]["leaderWorkerTemplate"];
    assert_eq!(template["size"], 2, "one pod per pipeline stage");
    let script = template["leaderTemplate"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    for flag in [
        "--tensor-parallel-size 8",
        "--pipeline-parallel-size 2",
        "--distributed-executor-backend ray",
    ] {
        assert!(script.contains(flag), "{flag} in {script}");
    }
    for role in ["leaderTemplate", "workerTemplate"] {
        assert_eq!(
            template[role]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], "8",
            "{role}: one stage's GPUs"
        );
    }
    // The worker joins first: ready, it serves nothing.
    api.apply("pods", ready_worker());
    api.apply("pods", leader(unschedulable()));
    let seen = observe_until(&backend, |o| !o.progress.is_empty()).await;
    assert_eq!(seen.progress[0].reason, "Unschedulable", "{seen:?}");
    api.apply("pods", leader(ready_status("10.0.0.1")));
    assert_eq!(starting.await.unwrap().unwrap(), "http://10.0.0.1:8000");
    assert!(backend.runs("chat-g3-0"));

    assert!(backend.stop("chat-g3-0").await.unwrap());
    let (method, path, _) = next_mutation(&mut mutations).await;
    assert_eq!(method, http::Method::DELETE);
    assert!(
        path.contains("/deployments/"),
        "no Deployment first: {path}"
    );
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(
        (method, path),
        (
            http::Method::DELETE,
            format!("{LWS_PATH}/flotilla-chat-g3-0")
        )
    );
    assert_eq!(body["propagationPolicy"], "Background");
    assert!(
        api.get("leaderworkersets", "flotilla", "flotilla-chat-g3-0")
            .is_none()
    );
}

#[tokio::test]
async fn a_crash_looping_worker_fails_the_whole_replica() {
    let (backend, api, mut mutations) = backend();
    let starting = tokio::spawn(async move { backend.start(&multi_node()).await });
    assert_eq!(next_mutation(&mut mutations).await.0, http::Method::POST);
    api.apply(
        "pods",
        group_pod(
            ROLE_WORKER,
            "flotilla-chat-g3-0-0-1",
            waiting(
                "CrashLoopBackOff",
                "back-off 40s restarting failed container",
            ),
        ),
    );
    let err = starting.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("CrashLoopBackOff"), "{err}");
    // The group goes with it.
    let mut deleted = Vec::new();
    while let Ok((method, path, _)) = mutations.try_recv() {
        assert_eq!(method, http::Method::DELETE);
        deleted.push(path);
    }
    assert!(
        deleted.contains(&format!("{LWS_PATH}/flotilla-chat-g3-0")),
        "{deleted:?}"
    );
}

#[tokio::test]
async fn without_the_leader_worker_set_api_the_start_says_what_to_install() {
    let (backend, api, _mutations) = backend();
    api.state
        .lock()
        .unwrap()
        .absent
        .push("leaderworkersets".into());
    let err = backend.start(&multi_node()).await.unwrap_err().to_string();
    assert!(
        err.contains("spans 2 nodes") && err.contains("install the LeaderWorkerSet controller"),
        "{err}"
    );
    assert!(!backend.runs("chat-g3-0"));
    // Single-node replicas do not need it: stopping one that is gone is
    // still no error.
    assert!(!backend.stop("gone-0").await.unwrap());
}

#[tokio::test]
async fn a_leader_image_changed_by_hand_is_put_back_under_take_over() {
    let (backend, api, mut mutations) = started_group().await;
    let mut live = api
        .get("leaderworkersets", "flotilla", "flotilla-chat-g3-0")
        .unwrap();
    live["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["image"] =
        json!("someone/else:latest");
    api.apply("leaderworkersets", live);
    let seen = observe_until(&backend, |o| !o.drifted.is_empty()).await;
    let drift = &seen.drifted[0];
    assert_eq!(drift.differences.len(), 1, "{drift:?}");
    assert!(
        drift.differences[0].starts_with("spec.leaderWorkerTemplate.leaderTemplate.spec")
            && drift.differences[0].contains("someone/else:latest"),
        "{drift:?}"
    );
    assert_eq!(drift.restored, Ok(true));
    let (method, path, body) = next_mutation(&mut mutations).await;
    assert_eq!(
        (method, path),
        (http::Method::PUT, format!("{LWS_PATH}/flotilla-chat-g3-0"))
    );
    assert_eq!(body, {
        let mut sent = serde_json::to_value(lws_object(&config(), &multi_node()).unwrap()).unwrap();
        sent["metadata"]["resourceVersion"] = body["metadata"]["resourceVersion"].clone();
        sent
    });
}

#[tokio::test]
async fn a_restarted_executor_adopts_a_group_and_deletes_a_stray_one() {
    let (backend, api, mut mutations) = backend();
    api.apply("leaderworkersets", stored_lws(&multi_node()));
    let mut stray = multi_node();
    stray.replica_id = "stray-0".into();
    api.apply("leaderworkersets", stored_lws(&stray));
    api.apply("pods", leader(ready_status("10.0.0.1")));
    let mut recorded = recorded(3);
    recorded.model = multi_node().model_name;
    assert_eq!(
        backend.adopt(&recorded).await,
        Adoption::Adopted("http://10.0.0.1:8000".into())
    );
    let known = HashSet::from(["chat-g3-0".to_string()]);
    assert_eq!(backend.stop_unknown(&known).await, ["stray-0"]);
    let mut deleted = Vec::new();
    while let Ok((method, path, _)) = mutations.try_recv() {
        assert_eq!(method, http::Method::DELETE);
        deleted.push(path);
    }
    assert_eq!(
        deleted.last(),
        Some(&format!("{LWS_PATH}/flotilla-stray-0")),
        "{deleted:?}"
    );
    assert!(
        api.get("leaderworkersets", "flotilla", "flotilla-chat-g3-0")
            .is_some()
    );
}
