//! The gRPC control API on a real nats-server with the real placement
//! service: Apply goes the bus path (accepted, then visible through Get and
//! List; a bad field refused as INVALID_ARGUMENT naming it, whether the API
//! or placement catches it), Delete too, and Watch streams the events of
//! that deployment in stream order, resumable by sequence or time.

use std::time::Duration;

use flotilla_control_api::api::control_api_client::ControlApiClient;
use flotilla_control_api::api::{
    ApplyDeploymentRequest, DeleteDeploymentRequest, GetDeploymentRequest, ListDeploymentsRequest,
    WatchEvent, WatchRequest,
};
use flotilla_integration::{NatsServer, fleet};
use flotilla_proto::EventType;
use flotilla_proto::v1::ModelDeployment;
use futures::StreamExt;
use tonic::Code;

use crate::support;

const DEADLINE: Duration = Duration::from_secs(20);

fn doc(json: &str) -> ApplyDeploymentRequest {
    ApplyDeploymentRequest {
        deployment: Some(serde_json::from_str::<ModelDeployment>(json).unwrap()),
    }
}

async fn next_event(stream: &mut tonic::Streaming<WatchEvent>) -> WatchEvent {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("no event within the deadline")
        .expect("the watch ended")
        .expect("the watch failed")
}

#[tokio::test]
async fn deployments_over_grpc_take_the_bus_path() {
    let server = NatsServer::start().await.unwrap();
    let config = support::config(&server);
    fleet::placement(&config);
    let addr = fleet::control_api(&config).await;
    let mut api = ControlApiClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // Following `chat` from now, before anything happens to it.
    let mut watch = api
        .watch(WatchRequest {
            kind: "deployment".into(),
            name: "chat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let chat = r#"{"metadata": {"name": "chat"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1}}"#;
    let applied = api.apply_deployment(doc(chat)).await.unwrap().into_inner();
    assert_eq!(applied.name, "chat");
    assert_eq!(applied.generation, 1);
    assert!(!applied.unchanged);
    let again = api.apply_deployment(doc(chat)).await.unwrap().into_inner();
    assert!(again.unchanged, "{again:?}");
    assert_eq!(again.generation, 1);

    let got = api
        .get_deployment(GetDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let deployment = got.deployment.unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, 1);
    assert_eq!(deployment.status.as_ref().unwrap().generation, 1);
    let listed = api
        .list_deployments(ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = listed
        .deployments
        .iter()
        .map(|d| d.metadata.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["chat"]);

    // Refused by the API's own check, before the bus...
    let negative = api
        .apply_deployment(doc(
            r#"{"metadata": {"name": "neg"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": -2}}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument, "{negative:?}");
    assert!(
        negative.message().starts_with("spec.replicas: "),
        "{negative:?}"
    );
    // ...and by placement, which knows the fleet: the same shape of error.
    let ghost = api
        .apply_deployment(doc(
            r#"{"metadata": {"name": "ghost"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "placement": {"policy": "PickFixed", "clusterNames": ["nowhere"]}}}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(ghost.code(), Code::InvalidArgument, "{ghost:?}");
    assert!(
        ghost
            .message()
            .starts_with("spec.placement.clusterNames[0]: "),
        "{ghost:?}"
    );
    let missing = api
        .get_deployment(GetDeploymentRequest {
            name: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let deleted = api
        .delete_deployment(DeleteDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.name, "chat");
    let gone = api
        .get_deployment(GetDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let twice = api
        .delete_deployment(DeleteDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::NotFound);

    // The watch saw chat's life in order: accepted first, deleted last.
    let mut seen = vec![next_event(&mut watch).await];
    while seen.last().unwrap().event.as_ref().unwrap().r#type
        != EventType::DeploymentDeleted.to_string()
    {
        seen.push(next_event(&mut watch).await);
    }
    let first = seen[0].event.clone().unwrap();
    assert_eq!(first.r#type, EventType::DeploymentAccepted.to_string());
    assert_eq!(first.generation, 1);
    assert!(
        seen.iter()
            .all(|e| e.event.as_ref().unwrap().name == "chat")
    );
    assert!(
        seen.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "out of order: {seen:?}"
    );

    // Resumed from a sequence or a time, the watch starts at that event.
    for start in [
        WatchRequest {
            from_sequence: seen[0].sequence,
            ..Default::default()
        },
        WatchRequest {
            since_unix_ms: first.time_unix_ms,
            kind: "deployment".into(),
            name: "chat".into(),
            ..Default::default()
        },
    ] {
        let mut replay = api.watch(start).await.unwrap().into_inner();
        let again = next_event(&mut replay).await;
        assert_eq!(again.sequence, seen[0].sequence);
        assert_eq!(again.event.unwrap().id, first.id);
    }

    let bogus = api
        .watch(WatchRequest {
            kind: "weather".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bogus.code(), Code::InvalidArgument);
    assert!(bogus.message().starts_with("kind: "), "{bogus:?}");
}

/// What `grpcurl list` and `grpcurl describe` do, through the reflection
/// API, and what Kubernetes' gRPC probe asks, through grpc.health.v1.
#[tokio::test]
async fn reflection_lists_and_describes_the_services_and_health_says_serving() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let server = NatsServer::start().await.unwrap();
    let config = support::config(&server);
    let addr = fleet::control_api(&config).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = futures::stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "flotilla.v1.ControlApi".into(),
        )),
    ]);
    let mut answers = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let listed = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("not a service list: {listed:?}")
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "flotilla.v1.ControlApi",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not in {names:?}"
        );
    }
    let described = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response else {
        panic!("no file for the service: {described:?}")
    };
    let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
        files.file_descriptor_proto[0].as_slice(),
    )
    .unwrap();
    let methods: Vec<&str> = file
        .service
        .iter()
        .flat_map(|s| &s.method)
        .map(|m| m.name())
        .collect();
    assert!(
        methods.contains(&"ApplyDeployment") && methods.contains(&"Watch"),
        "{methods:?}"
    );

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "flotilla.v1.ControlApi"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
}

/// Everything the command line does, over gRPC, on a fleet with a cluster
/// whose executor starts a real runner: clusters (and cordon), replicas
/// (and their logs from the executor), rollouts (and a refused approve),
/// models, stored events, previews and scale.
#[tokio::test]
async fn the_fleet_over_grpc_clusters_replicas_logs_rollouts_models_events_previews_scale() {
    use flotilla_control_api::api::*;
    use flotilla_proto::v1::{PlacementOutcome, ReplicaPhase, RolloutPhase};

    let (server, _bus, mut events) = support::bus_with_events().await;
    fleet::control_services(&server, Duration::from_secs(5));
    let config = support::config(&server);
    fleet::rollout(&config, 3);
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(
        &server,
        "eu-1",
        "2xH100-80GB",
        &["region=eu-west"],
        1.0,
        caches.path(),
    );
    support::wait_for_event(&mut events, EventType::ClusterJoined, None, DEADLINE * 3).await;
    let addr = fleet::control_api(&config).await;
    let mut api = ControlApiClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let long = Duration::from_secs(120);

    let chat = r#"{"metadata": {"name": "chat"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1}}"#;
    api.apply_deployment(doc(chat)).await.unwrap();
    support::wait_for_event(&mut events, EventType::RolloutCompleted, Some("chat"), long).await;

    // Clusters, and a cordon answered once inventory wrote it.
    let clusters = api
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap()
        .into_inner()
        .clusters;
    assert_eq!(
        clusters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["eu-1"]
    );
    let missing = api
        .get_cluster(GetClusterRequest {
            name: "mars-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let cordoned = api
        .cordon_cluster(CordonClusterRequest {
            name: "eu-1".into(),
            cordon: true,
            reason: "driver upgrade".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert!(cordoned.cordoned);
    assert_eq!(cordoned.cordon_reason, "driver upgrade");
    let got = api
        .get_cluster(GetClusterRequest {
            name: "eu-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert!(got.cordoned);
    // A preview while the only cluster is cordoned: nowhere to go.
    let preview = api
        .preview_deployment(PreviewDeploymentRequest {
            deployment: doc(&chat.replace("\"chat\"", "\"chat-2\"")).deployment,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        preview.placement.unwrap().outcome(),
        PlacementOutcome::Unschedulable,
        "{}",
        preview.message
    );
    let uncordoned = api
        .cordon_cluster(CordonClusterRequest {
            name: "eu-1".into(),
            cordon: false,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert!(!uncordoned.cordoned);
    let preview = api
        .preview_deployment(PreviewDeploymentRequest {
            deployment: doc(&chat.replace("\"chat\"", "\"chat-2\"")).deployment,
        })
        .await
        .unwrap()
        .into_inner()
        .placement
        .unwrap();
    assert_ne!(preview.outcome(), PlacementOutcome::Unschedulable);
    assert_eq!(preview.assignments[0].cluster, "eu-1");
    // Nothing stored by a preview.
    let not_stored = api
        .get_deployment(GetDeploymentRequest {
            name: "chat-2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_stored.code(), Code::NotFound);

    // Replicas, and the last lines one wrote, from its executor.
    let replicas = api
        .list_replicas(ListReplicasRequest {
            deployment: "chat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    assert_eq!(replicas[0].phase(), ReplicaPhase::Ready);
    let id = replicas[0].replica_id.clone();
    let one = api
        .get_replica(GetReplicaRequest {
            replica_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .replica
        .unwrap();
    assert_eq!(one.cluster, "eu-1");
    let none_elsewhere = api
        .list_replicas(ListReplicasRequest {
            cluster: "us-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .replicas;
    assert!(none_elsewhere.is_empty());
    let logs = api
        .get_replica_logs(GetReplicaLogsRequest {
            replica_id: id.clone(),
            tail_lines: 50,
            cluster: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.cluster, "eu-1");
    assert!(
        logs.lines
            .iter()
            .any(|l| l.contains("model loaded; serving")),
        "{:?}",
        logs.lines
    );
    let too_many = api
        .get_replica_logs(GetReplicaLogsRequest {
            replica_id: id.clone(),
            tail_lines: 9999,
            cluster: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(
        too_many.message().starts_with("tail_lines: "),
        "{too_many:?}"
    );
    let unknown = api
        .get_replica_logs(GetReplicaLogsRequest {
            replica_id: "no-such-replica".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Rollouts, and an approve the rollout service refuses with its reason.
    let rollouts = api
        .list_rollouts(ListRolloutsRequest {})
        .await
        .unwrap()
        .into_inner()
        .rollouts;
    assert_eq!(rollouts.len(), 1);
    assert_eq!(rollouts[0].phase(), RolloutPhase::Complete);
    let refused = api
        .approve_rollout(ApproveRolloutRequest {
            name: "chat".into(),
            stage: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("not awaiting approval"),
        "{refused:?}"
    );

    // Models.
    let models = api
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert!(
        models.iter().any(|m| m.name == "smollm2-135m-instruct"),
        "{models:?}"
    );
    let model = api
        .get_model(GetModelRequest {
            name: "smollm2-135m-instruct".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    assert_eq!(
        model.phase(),
        flotilla_proto::v1::ModelPhase::Ready,
        "{model:?}"
    );

    // Scale: the stored document again with a new replica count.
    let scaled = api
        .scale_deployment(ScaleDeploymentRequest {
            name: "chat".into(),
            replicas: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scaled.generation, 2, "{scaled:?}");
    let stored = api
        .get_deployment(GetDeploymentRequest {
            name: "chat".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .deployment
        .unwrap();
    assert_eq!(stored.spec.unwrap().replicas, 2);

    // Stored events: the last few about chat, oldest first, and the same
    // sequences a Watch from the first of them gives.
    let last = api
        .list_events(ListEventsRequest {
            kind: "deployment".into(),
            name: "chat".into(),
            limit: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(last.len(), 3, "{last:?}");
    assert!(last.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert!(
        last.iter()
            .all(|e| e.event.as_ref().unwrap().name == "chat")
    );
    let all = api
        .list_events(ListEventsRequest {
            kind: "deployment".into(),
            name: "chat".into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(all.len() >= last.len());
    assert_eq!(
        all[0].event.as_ref().unwrap().r#type,
        EventType::DeploymentAccepted.to_string()
    );
    let mut watch = api
        .watch(WatchRequest {
            from_sequence: last[0].sequence,
            kind: "deployment".into(),
            name: "chat".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for expected in &last {
        assert_eq!(next_event(&mut watch).await.sequence, expected.sequence);
    }
    let too_many = api
        .list_events(ListEventsRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().starts_with("limit: "), "{too_many:?}");
}
