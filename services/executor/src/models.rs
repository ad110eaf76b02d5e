//! Models on this cluster: prefetch commands fill the cache, and every
//! fetch is reported (`model.<name>.fetched` / `model.<name>.fetch_failed`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_kit::{
    Bus, ConsumerSpec, Delivery, EventDraft, HandlerError, KitError, RecordStore, spawn_consumer,
};
use flotilla_model_store::ModelCache;
use flotilla_proto::v1::{self, ModelPhase, ModelRecord, event::Payload, executor_command::Action};
use flotilla_proto::{CommandAction, EventType, model_token};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What a prefetch needs, shared by every command.
#[derive(Clone)]
struct Prefetcher {
    bus: Bus,
    cluster: String,
    store: ObjectStore,
    cache: Arc<ModelCache>,
    models: RecordStore<ModelRecord>,
    shutdown: CancellationToken,
}

/// Consumes `<prefix>.cmd.<cluster>.prefetch` until `shutdown`.
pub fn spawn_prefetch(
    bus: Bus,
    cluster: String,
    store: ObjectStore,
    cache: Arc<ModelCache>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, KitError> {
    let mut spec = ConsumerSpec::new(
        &bus.topology.commands.name,
        &format!("executor-{cluster}-prefetch"),
        vec![bus.subjects.command(&cluster, CommandAction::Prefetch)?],
    );
    // A model still being stored upstream is waited for: 5 to 10 minutes
    // over all tries (each delay is drawn between half its ceiling and it).
    spec.max_deliveries = 25;
    spec.max_backoff = Duration::from_secs(30);
    // A long start or fetch stays claimed by progress acks (every third of
    // this); the command of a killed executor goes to its successor after
    // at most this long.
    spec.ack_wait = crate::COMMAND_ACK_WAIT;
    let stop = shutdown.clone();
    Ok(tokio::spawn(async move {
        let models = match RecordStore::<ModelRecord>::open(&bus, &bus.topology.models.name).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("prefetch disabled: {e}");
                return;
            }
        };
        let prefetcher = Prefetcher {
            bus: bus.clone(),
            cluster,
            store,
            cache,
            models,
            shutdown,
        };
        let consumer = spawn_consumer(
            &bus,
            spec,
            prefetcher,
            |p: Prefetcher, d| async move {
                prefetch(
                    &p.bus,
                    &p.cluster,
                    &p.store,
                    &p.cache,
                    &p.models,
                    &p.shutdown,
                    d,
                )
                .await
            },
            stop,
        );
        if let Ok(Err(e)) = consumer.await {
            tracing::error!("prefetch consumer: {e}");
        }
    }))
}

async fn prefetch(
    bus: &Bus,
    cluster: &str,
    store: &ObjectStore,
    cache: &ModelCache,
    models: &RecordStore<ModelRecord>,
    shutdown: &CancellationToken,
    d: Delivery<v1::ExecutorCommand>,
) -> Result<(), HandlerError> {
    let command = d.message;
    if command.cluster != cluster {
        return Err(HandlerError::invalid(
            "cluster",
            format!("{:?} is not this cluster ({cluster})", command.cluster),
        ));
    }
    let Some(Action::Prefetch(p)) = command.action else {
        return Err(HandlerError::invalid(
            "action",
            "a prefetch command needs action.prefetch",
        ));
    };
    let wanted = p.model.unwrap_or_default();
    let Some((record, _)) = models
        .get(&wanted.name)
        .await
        .map_err(HandlerError::retry)?
    else {
        return Err(HandlerError::invalid(
            "action.prefetch.model.name",
            format!("no model named {:?}", wanted.name),
        ));
    };
    if !wanted.digest.is_empty() && wanted.digest != record.digest {
        return Err(HandlerError::invalid(
            "action.prefetch.model.digest",
            format!(
                "{} is {}, not {}",
                wanted.name, record.digest, wanted.digest
            ),
        ));
    }
    if record.phase() != ModelPhase::Ready {
        return Err(HandlerError::retry(format!(
            "model {} is not ready yet",
            record.name
        )));
    }
    let token = model_token(&record.name);
    match cache.fetch(store, &record, shutdown, |_| {}).await {
        Ok(report) => {
            let how = if report.cache_hit {
                "already cached".to_string()
            } else {
                format!(
                    "{} parts fetched, {} resumed",
                    report.parts_downloaded, report.parts_reused
                )
            };
            let evicted: Vec<String> = report.evicted.iter().map(|m| m.name.clone()).collect();
            let evicted = if evicted.is_empty() {
                String::new()
            } else {
                format!("; evicted {}", evicted.join(", "))
            };
            let draft = EventDraft::new(
                EventType::ModelFetched,
                &token,
                format!(
                    "{} cached on {cluster} ({how}, {}){evicted}",
                    record.name, record.digest
                ),
            )
            .correlation_id(command.command_id.clone())
            .payload(Payload::Model(record.clone()));
            bus.publish_event(draft).await.map_err(HandlerError::retry)
        }
        Err(e) if e.is_transient() => Err(HandlerError::retry(e)),
        Err(e) => {
            let draft = EventDraft::new(
                EventType::ModelFetchFailed,
                &token,
                format!("{cluster} refused {}: {e}", record.name),
            )
            .correlation_id(command.command_id.clone())
            .payload(Payload::Error(v1::ErrorDetail {
                code: "model_corrupt".into(),
                subject: d.subject.clone(),
                field: String::new(),
                reason: e.to_string(),
                stream_sequence: d.stream_sequence,
                consumer: format!("executor-{cluster}-prefetch"),
            }));
            bus.publish_event(draft).await.map_err(HandlerError::retry)
        }
    }
}
