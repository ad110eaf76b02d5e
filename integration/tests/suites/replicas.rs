//! The executor's replica half with the local backend: a start command
//! brings up a real runner on the shipped model; a stale generation is
//! ignored; a stop command stops it.

use std::time::Duration;

use flotilla_integration::NatsServer;
use flotilla_kit::{Bus, BusConfig, RecordStore};
use flotilla_proto::v1::{
    self, ReplicaPhase, ReplicaStatus, event::Payload, executor_command::Action,
};
use flotilla_proto::{CommandAction, EventType};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(120);

async fn expect(sub: &mut async_nats::Subscriber, ty: EventType, name: &str) -> v1::Event {
    let want = ty.to_string();
    tokio::time::timeout(DEADLINE, async {
        while let Some(msg) = sub.next().await {
            let event = v1::Event::decode(msg.payload).unwrap();
            if event.r#type == want && event.name == name {
                return event;
            }
            if event.r#type == EventType::ReplicaFailed.to_string()
                || event.r#type == EventType::BusDeadLettered.to_string()
            {
                panic!("{}: {}", event.r#type, event.message);
            }
        }
        panic!("subscription ended");
    })
    .await
    .unwrap_or_else(|_| panic!("no {want} for {name} within {DEADLINE:?}"))
}

fn command(deployment: &str, generation: u64, action: Action) -> v1::ExecutorCommand {
    v1::ExecutorCommand {
        command_id: format!(
            "{deployment}-{generation}-{}",
            match &action {
                Action::Start(s) => s.replica_id.clone(),
                Action::Stop(s) => s.replica_id.clone(),
                Action::Prefetch(_) => String::new(),
            }
        ),
        cluster: "eu-1".into(),
        deployment: deployment.into(),
        generation,
        action: Some(action),
    }
}

fn start(replica: &str) -> Action {
    Action::Start(v1::StartReplica {
        replica_id: replica.into(),
        model: Some(v1::ModelRef {
            name: "smollm2".into(),
            ..Default::default()
        }),
        runtime: v1::Runtime::Candle.into(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_start_command_serves_the_model_and_a_stop_command_ends_it() {
    let server = NatsServer::start().await.unwrap();
    let bus = Bus::connect(
        &BusConfig::for_url(server.url()).unwrap(),
        "test",
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    flotilla_kit::provision(&bus).await.unwrap();
    let mut events = bus.client.subscribe("flotilla.events.>").await.unwrap();
    flotilla_integration::fleet::model_provisioner(&server);
    let cache = tempfile::tempdir().unwrap();
    let runner = flotilla_integration::fleet::target_bin("flotilla-runner");
    let executor = flotilla_executor::ExecutorArgs {
        bus: flotilla_kit::BusArgs {
            nats_url: server.url(),
            ..Default::default()
        },
        cluster: Some("eu-1".into()),
        labels: vec!["region=eu-west-1".into()],
        gpus: "1xH100-80GB".into(),
        gpu_source: flotilla_executor::GpuSource::Declared,
        model_cache_dir: Some(cache.path().to_path_buf()),
        runner_bin: Some(runner),
        ..Default::default()
    }
    .validate()
    .unwrap();
    tokio::spawn(async move {
        flotilla_executor::run(executor, CancellationToken::new())
            .await
            .unwrap()
    });

    let model = flotilla_integration::workspace_root()
        .join(".tools/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    flotilla_cli::models::push(
        &bus,
        &model,
        "smollm2",
        None,
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .await
    .unwrap();

    let subject = |action| bus.subjects.command("eu-1", action).unwrap();
    bus.publish(
        subject(CommandAction::Start),
        &command("chat", 2, start("chat-g2-0")),
        None,
    )
    .await
    .unwrap();
    expect(&mut events, EventType::ReplicaStarting, "chat-g2-0").await;
    let ready = expect(&mut events, EventType::ReplicaReady, "chat-g2-0").await;
    let Some(Payload::Replica(status)) = ready.payload else {
        panic!("no status")
    };
    assert_eq!(status.phase(), ReplicaPhase::Ready);
    assert_eq!(status.region, "eu-west-1");
    assert_eq!(status.generation, 2);

    // It serves the model.
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", status.endpoint))
        .json(&serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 8}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{answer}"
    );

    // A start from an older placement generation is ignored...
    bus.publish(
        subject(CommandAction::Start),
        &command("chat", 1, start("chat-g1-0")),
        None,
    )
    .await
    .unwrap();
    // ...which shows once the stop published after it is done.
    bus.publish(
        subject(CommandAction::Stop),
        &command(
            "chat",
            2,
            Action::Stop(v1::StopReplica {
                replica_id: "chat-g2-0".into(),
                reason: "scaled down".into(),
            }),
        ),
        None,
    )
    .await
    .unwrap();
    expect(&mut events, EventType::ReplicaStopped, "chat-g2-0").await;
    let replicas = RecordStore::<ReplicaStatus>::open(&bus, "replicas")
        .await
        .unwrap();
    assert!(
        replicas.get("eu-1.chat-g1-0").await.unwrap().is_none(),
        "a fenced start ran"
    );
    let stopped = replicas.get("eu-1.chat-g2-0").await.unwrap().unwrap().0;
    assert_eq!(stopped.phase(), ReplicaPhase::Stopped);
    assert_eq!(stopped.message, "scaled down");
    let gone = reqwest::Client::new()
        .get(format!("{}/health", status.endpoint))
        .send()
        .await;
    assert!(gone.is_err(), "the runner still answers after stop");
}
