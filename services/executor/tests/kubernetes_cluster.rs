//! The Kubernetes backend against a real API server: `#[ignore]`d with
//! "needs KUBECONFIG", so a run without a cluster counts it as skipped;
//! `cargo test -- --ignored` with `KUBECONFIG` set runs it (scripts/test
//! does).
//!
//! It creates one replica Deployment in `$FLOTILLA_KUBE_TEST_NAMESPACE`
//! (default `default`), checks the API server accepted the object as sent
//! (labels, GPU limits, probe), finds it again the way a restarted
//! executor does, and deletes it. It does not wait for the pod to become
//! ready: that needs the runner image, a model volume and, for GPU
//! replicas, GPU nodes, which a test cluster rarely has.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashSet;
use std::time::Duration;

use flotilla_executor::backends::kubernetes::{
    KubernetesBackend, KubernetesConfig, LABEL_GENERATION, LABEL_REPLICA, ModelDelivery,
    object_name,
};
use flotilla_executor::backends::{ReplicaBackend, ReplicaSpec};
use flotilla_proto::v1;
use k8s_openapi::api::apps::v1::Deployment;

#[tokio::test]
#[ignore = "needs KUBECONFIG"]
async fn replica_deployment_round_trip_on_a_real_cluster_when_kubeconfig_is_set() {
    let namespace =
        std::env::var("FLOTILLA_KUBE_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client = kube::Client::try_default().await.unwrap();
    let replica_id = format!("test-{}", std::process::id());
    let backend = KubernetesBackend::new(
        client.clone(),
        KubernetesConfig {
            cluster: "kube-test".into(),
            namespace: namespace.clone(),
            runner_image: flotilla_executor::DEFAULT_RUNNER_IMAGE.into(),
            vllm_image: flotilla_executor::DEFAULT_VLLM_IMAGE.into(),
            model_delivery: ModelDelivery::Pvc {
                claim: "flotilla-model-cache".into(),
            },
            owner_name: None,
            owner: None,
            ready_timeout: Duration::from_secs(5),
        },
    );
    let spec = ReplicaSpec {
        replica_id: replica_id.clone(),
        deployment: "kube-test".into(),
        generation: 7,
        model_name: "smollm2".into(),
        model_in_cache: "smollm2/model.gguf".into(),
        runtime: v1::Runtime::Candle,
        gpus: 1,
        ..Default::default()
    };
    backend.create(&spec).await.unwrap();
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client, &namespace);
    let stored = deployments.get(&object_name(&replica_id)).await.unwrap();
    let labels = stored.metadata.labels.clone().unwrap();
    assert_eq!(labels[LABEL_REPLICA], replica_id);
    assert_eq!(labels[LABEL_GENERATION], "7");
    let container = &stored.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        container
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["nvidia.com/gpu"]
            .0,
        "1"
    );
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/health")
    );
    // A restarted executor with no record of it deletes it.
    let stopped = backend.stop_unknown(&HashSet::new()).await;
    assert!(stopped.contains(&replica_id), "{stopped:?}");
    let gone = deployments
        .get_opt(&object_name(&replica_id))
        .await
        .unwrap();
    assert!(
        gone.is_none_or(|d| d.metadata.deletion_timestamp.is_some()),
        "the Deployment is still there"
    );
}
