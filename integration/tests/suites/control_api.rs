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
