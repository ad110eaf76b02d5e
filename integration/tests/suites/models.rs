//! Model distribution on a real nats-server with the shipped SmolLM2 GGUF:
//! push, fetch with digest check, tampering refused, resume, one upload by
//! two provisioners, LRU eviction.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_integration::{NatsServer, fleet};
use flotilla_kit::{Bus, RecordStore};
use flotilla_model_store::{FetchError, ModelCache};
use flotilla_proto::v1::{self, ClusterRecord, ModelDeployment, ModelRecord};
use flotilla_proto::{CommandAction, EventType};
use futures::StreamExt;
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::support::{self, poll_until, shipped_model as gguf, wait_for_event};

const DEADLINE: Duration = Duration::from_secs(60);

fn sha256_of(path: &Path) -> String {
    flotilla_model_store::digest_string(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn start_provisioner(server: &NatsServer) {
    fleet::model_provisioner(&support::config(server));
}

/// A cluster of one H100 whose model cache is `caches/<cluster>`.
fn start_executor(server: &NatsServer, cluster: &str, caches: &Path) {
    fleet::executor(server, cluster, "1xH100-80GB", &["region=eu"], 0.0, caches);
}

async fn expect(sub: &mut async_nats::Subscriber, ty: EventType, name: &str) -> v1::Event {
    wait_for_event(sub, ty, Some(name), DEADLINE).await
}

async fn push(bus: &Bus, path: &Path, name: &str) -> String {
    support::push(bus, path, name, Some("gguf")).await
}

async fn prefetch(bus: &Bus, cluster: &str, model: &str) {
    let id = uuid_like();
    let command = v1::ExecutorCommand {
        command_id: id.clone(),
        cluster: cluster.into(),
        action: Some(v1::executor_command::Action::Prefetch(v1::PrefetchModel {
            model: Some(v1::ModelRef {
                name: model.into(),
                ..Default::default()
            }),
        })),
        ..Default::default()
    };
    bus.publish(
        bus.subjects
            .command(cluster, CommandAction::Prefetch)
            .unwrap(),
        &command,
        Some(&id),
    )
    .await
    .unwrap();
}

fn uuid_like() -> String {
    format!("{:x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[tokio::test]
async fn a_pushed_gguf_is_fetched_by_an_executor_and_its_digest_matches() {
    let (server, bus, mut events) = support::bus_with_events().await;
    start_provisioner(&server);
    fleet::inventory(&support::config(&server), Duration::from_secs(3));
    let caches = tempfile::tempdir().unwrap();
    start_executor(&server, "eu-1", caches.path());
    let cache = caches.path().join("eu-1");

    let file = gguf();
    let digest = push(&bus, &file, "smollm2").await;
    assert_eq!(digest, sha256_of(&file));

    prefetch(&bus, "eu-1", "smollm2").await;
    let fetched = expect(&mut events, EventType::ModelFetched, "smollm2").await;
    assert!(
        fetched.message.contains("cached on eu-1"),
        "{}",
        fetched.message
    );
    let hex = digest.trim_start_matches("sha256:");
    let cached = cache
        .join("models")
        .join(hex)
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(sha256_of(&cached), digest);

    // The heartbeat carries it, so placement and `get models` see it.
    let clusters = RecordStore::<ClusterRecord>::open(&bus, "clusters")
        .await
        .unwrap();
    poll_until(DEADLINE, "heartbeat reporting the cached model", || async {
        let record = clusters.get("eu-1").await.unwrap().map(|r| r.0);
        record
            .is_some_and(|r| {
                r.inventory
                    .unwrap_or_default()
                    .cached_models
                    .iter()
                    .any(|m| m.digest == digest)
            })
            .then_some(())
    })
    .await;
    let mut table = Vec::new();
    flotilla_cli::get::get(
        &bus,
        &flotilla_cli::get::GetArgs::of(flotilla_cli::get::Kind::Models),
        &mut table,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.lines().any(|l| l.starts_with("smollm2")
            && l.contains("Ready")
            && l.contains("98.4 MB")
            && l.contains("eu-1")),
        "{table}"
    );
}

#[tokio::test]
async fn a_flipped_byte_is_refused_with_an_event_and_leaves_the_cache_clean() {
    let (server, bus, mut events) = support::bus_with_events().await;
    start_provisioner(&server);
    let caches = tempfile::tempdir().unwrap();
    start_executor(&server, "eu-2", caches.path());
    let cache = caches.path().join("eu-2");
    let digest = push(&bus, &gguf(), "tampered").await;

    // Someone rewrites one stored part with one byte flipped.
    let models = RecordStore::<ModelRecord>::open(&bus, "models")
        .await
        .unwrap();
    let record = models.get("tampered").await.unwrap().unwrap().0;
    let store = bus.jetstream.get_object_store("models").await.unwrap();
    let victim = &record.parts[3];
    let mut bytes = Vec::new();
    store
        .get(&victim.object)
        .await
        .unwrap()
        .read_to_end(&mut bytes)
        .await
        .unwrap();
    bytes[4096] ^= 0x01;
    store
        .put(victim.object.as_str(), &mut bytes.as_slice())
        .await
        .unwrap();

    prefetch(&bus, "eu-2", "tampered").await;
    let failed = expect(&mut events, EventType::ModelFetchFailed, "tampered").await;
    assert!(
        failed.message.contains("corrupt") && failed.message.contains(&victim.object),
        "{}",
        failed.message
    );
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        !cache.join("models").join(hex).exists(),
        "a refused model was kept"
    );
    assert!(
        !cache.join("partial").join(hex).exists(),
        "a refused download was left behind"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes_from_the_parts_it_has() {
    let (server, bus) = support::bus().await;
    start_provisioner(&server);
    let digest = push(&bus, &gguf(), "resumable").await;
    let record = support::record::<ModelRecord>(&bus, "models", "resumable").await;
    let store = bus.jetstream.get_object_store("models").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = ModelCache::open(dir.path(), 1 << 40).unwrap();

    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let first = cache
        .fetch(&store, &record, &cancel, |p| {
            if p.parts_done >= 2 {
                stop.cancel();
            }
        })
        .await;
    assert!(matches!(first, Err(FetchError::Cancelled(_))), "{first:?}");

    let report = cache
        .fetch(&store, &record, &CancellationToken::new(), |_| {})
        .await
        .unwrap();
    assert!(report.parts_reused >= 2, "{report:?}");
    assert_eq!(
        report.parts_reused + report.parts_downloaded,
        record.parts.len(),
        "{report:?}"
    );
    assert!(report.bytes_downloaded < record.size_bytes);
    assert_eq!(
        sha256_of(&report.path.join("SmolLM2-135M-Instruct.Q4_1.gguf")),
        digest
    );
}

#[tokio::test]
async fn two_provisioners_store_a_preset_once() {
    let (server, bus) = support::bus().await;
    let mut events = bus
        .client
        .subscribe("flotilla.events.model.>")
        .await
        .unwrap();
    start_provisioner(&server);
    start_provisioner(&server);
    // What placement writes when a deployment of the preset is accepted.
    let deployments = RecordStore::<ModelDeployment>::open(&bus, "deployments")
        .await
        .unwrap();
    let doc: ModelDeployment = flotilla_proto::codec::decode_json(
        br#"{"metadata": {"name": "chat"}, "spec": {"model": {"preset": "smollm2-135m-instruct"}, "replicas": 1}}"#,
    )
    .unwrap();
    deployments
        .update("chat", |_| Some(doc.clone()))
        .await
        .unwrap();

    let ready = expect(&mut events, EventType::ModelReady, "smollm2-135m-instruct").await;
    assert!(ready.message.contains("ready"), "{}", ready.message);
    // Give a second upload every chance to show, then read what the stream kept.
    tokio::time::timeout(
        Duration::from_secs(6),
        expect(
            &mut events,
            EventType::ModelProvisioning,
            "smollm2-135m-instruct",
        ),
    )
    .await
    .expect_err("a second provisioning started");
    let stream = bus.jetstream.get_stream("FLOTILLA_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: "flotilla.events.model.smollm2-135m-instruct.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Some(Ok(msg)) = batch.next().await {
        kinds.push(v1::Event::decode(msg.payload.clone()).unwrap().r#type);
    }
    kinds.sort();
    assert_eq!(kinds, vec!["model.provisioning", "model.ready"]);
    let record = support::record::<ModelRecord>(&bus, "models", "smollm2-135m-instruct").await;
    assert_eq!(record.digest, sha256_of(&gguf()));
    assert_eq!(record.source, "preset");
}

#[tokio::test]
async fn the_cache_budget_evicts_the_least_recently_used_model() {
    let (server, bus) = support::bus().await;
    start_provisioner(&server);
    let files = tempfile::tempdir().unwrap();
    let mut records = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let path = files.path().join(format!("{name}.gguf"));
        let bytes: Vec<u8> = (0..(1u32 << 20))
            .map(|x| (x.wrapping_mul(2_654_435_761).wrapping_add(i as u32) >> 13) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        push(&bus, &path, name).await;
        records.push(support::record::<ModelRecord>(&bus, "models", name).await);
    }
    let store = bus.jetstream.get_object_store("models").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Room for two of the three.
    let cache = ModelCache::open(dir.path(), (5 << 20) / 2).unwrap();
    let none = CancellationToken::new();
    cache
        .fetch(&store, &records[0], &none, |_| {})
        .await
        .unwrap();
    cache
        .fetch(&store, &records[1], &none, |_| {})
        .await
        .unwrap();
    // a is used again: b is now the least recently used.
    assert!(
        cache
            .fetch(&store, &records[0], &none, |_| {})
            .await
            .unwrap()
            .cache_hit
    );
    let report = cache
        .fetch(&store, &records[2], &none, |_| {})
        .await
        .unwrap();
    assert_eq!(
        report
            .evicted
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        vec!["b"]
    );
    let mut left: Vec<_> = cache.cached().into_iter().map(|m| m.name).collect();
    left.sort();
    assert_eq!(left, vec!["a", "c"]);
    assert!(cache.path_of(&records[1].digest).is_none());
    // A reopened cache remembers.
    let reopened = ModelCache::open(dir.path(), (5 << 20) / 2).unwrap();
    assert_eq!(reopened.cached().len(), 2);
}
