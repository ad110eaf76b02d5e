//! The `model-provisioner`: every model a deployment needs becomes a
//! verified artifact in object store `models` and a record in KV `models`.
//!
//! It is the only writer of KV `models` and publishes `model.provisioning`,
//! `model.ready` and `model.failed`. For a preset it stores the weights
//! found in its preset folder; for a pushed model (`flotilla model push`
//! uploads the parts, then sends `RegisterModel`) it re-reads every part and
//! checks its digest before calling the model ready. Several instances may
//! run: an upload is claimed by creating the model's record
//! (compare-and-set), so only one instance uploads; a claim not refreshed
//! for `--takeover-after` is taken over.
//!
//! Start reading at [`run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_kit::{
    Bus, BusArgs, BusConfig, ConfigError, ConsumerSpec, Delivery, EventDraft, HandlerError, Health,
    KitError, RecordStore, now_unix_ms, spawn_consumer,
};
use flotilla_proto::v1::{self, ModelDeployment, ModelPhase, ModelRecord, event::Payload};
use flotilla_proto::{ControlSubject, EventType, model_token};
use tokio_util::sync::CancellationToken;

pub const SERVICE: &str = "model-provisioner";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-model-provisioner",
    version,
    about = "Flotilla model-provisioner: model artifacts over the bus"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9103")]
    pub http_addr: SocketAddr,

    /// Where preset weights are found: `<preset>.gguf`, a `<preset>/`
    /// folder, or the file names of the shipped models.
    #[arg(long, env = "FLOTILLA_PRESET_DIR", default_value = ".tools/models")]
    pub preset_dir: PathBuf,

    /// An upload claim not refreshed for this long is taken over.
    #[arg(long, env = "FLOTILLA_TAKEOVER_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    pub takeover_after: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub http_addr: SocketAddr,
    pub preset_dir: PathBuf,
    pub takeover_after_ms: i64,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        Ok(Config {
            bus: self.bus.validate()?,
            http_addr: self.http_addr,
            preset_dir: self.preset_dir.clone(),
            takeover_after_ms: i64::try_from(self.takeover_after.as_millis())
                .map_err(|_| ConfigError::new("takeover-after", "is too long"))?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionerError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("object store {bucket}: {source}")]
    ObjectStore {
        bucket: String,
        #[source]
        source: async_nats::jetstream::context::ObjectStoreError,
    },
}

/// The weights the project ships, by preset.
const SHIPPED: &[(&str, &str)] = &[("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")];

/// Where the weights of `preset` are, if anywhere.
pub fn preset_source(dir: &Path, preset: &str) -> Option<PathBuf> {
    let shipped = SHIPPED
        .iter()
        .find(|(p, _)| *p == preset)
        .map(|(_, f)| dir.join(f));
    [
        shipped,
        Some(dir.join(format!("{preset}.gguf"))),
        Some(dir.join(preset)),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.exists())
}

/// Model names: lowercase letters, digits, `-` and `.`; up to 63.
fn check_model_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-63 lowercase letters, digits, '-' or '.', starting and ending alphanumeric"
        ))
    }
}

#[derive(Clone)]
struct Provisioner {
    bus: Bus,
    store: ObjectStore,
    models: RecordStore<ModelRecord>,
    deployments: RecordStore<ModelDeployment>,
    preset_dir: PathBuf,
    takeover_after_ms: i64,
    instance: String,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ProvisionerError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let bucket = bus.topology.model_artifacts.name.clone();
    let store = bus
        .jetstream
        .get_object_store(&bucket)
        .await
        .map_err(|source| ProvisionerError::ObjectStore {
            bucket: bucket.clone(),
            source,
        })?;
    let models = RecordStore::<ModelRecord>::open(&bus, &bus.topology.models.name).await?;
    let deployments =
        RecordStore::<ModelDeployment>::open(&bus, &bus.topology.deployments.name).await?;
    models.start_watch(shutdown.clone()).await?;
    deployments.start_watch(shutdown.clone()).await?;
    let p = Provisioner {
        bus: bus.clone(),
        store,
        models,
        deployments,
        preset_dir: config.preset_dir.clone(),
        takeover_after_ms: config.takeover_after_ms,
        instance: uuid::Uuid::new_v4().to_string(),
    };

    let register = spawn_consumer(
        &bus,
        ConsumerSpec::control(
            &bus,
            "model-provisioner-register",
            ControlSubject::ModelRegister,
        ),
        p.clone(),
        |p: Provisioner, d| async move { p.register(d).await },
        shutdown.clone(),
    );

    health.set_ready(true);
    tracing::info!(preset_dir = %config.preset_dir.display(), "model-provisioner running");
    let mut changes = p.deployments.changes();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        // Every deployment's model, on any change and periodically (to take
        // over stale claims).
        for (_, d) in p.deployments.cached_all() {
            p.ensure_for(&d).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = changes.recv() => {}
            _ = tick.tick() => {}
        }
    }
    if let Ok(Err(e)) = register.await {
        tracing::error!("register consumer: {e}");
    }
    health.set_ready(false);
    let _ = bus.client.drain().await;
    Ok(())
}

impl Provisioner {
    async fn event(
        &self,
        ty: EventType,
        record: &ModelRecord,
        message: String,
        id: Option<String>,
        correlation: &str,
    ) -> Result<(), KitError> {
        let mut draft = EventDraft::new(ty, &model_token(&record.name), message)
            .payload(Payload::Model(record.clone()))
            .correlation_id(correlation);
        if let Some(id) = id {
            draft = draft.id(id);
        }
        self.bus.publish_event(draft).await
    }

    async fn ensure_for(&self, deployment: &ModelDeployment) {
        let Some(model) = deployment.spec.as_ref().and_then(|s| s.model.clone()) else {
            return;
        };
        if !model.preset.is_empty() {
            if let Err(e) = self.ensure_preset(&model.preset).await {
                tracing::warn!(preset = %model.preset, "provisioning: {e}");
            }
        } else if let Some(artifact) = model.artifact {
            let known = self.models.cached(&artifact.name);
            let ok = known
                .as_ref()
                .is_some_and(|r| r.digest == artifact.digest && r.phase() == ModelPhase::Ready);
            if !ok
                && known
                    .as_ref()
                    .is_none_or(|r| r.phase() != ModelPhase::Provisioning)
            {
                let record = ModelRecord {
                    name: artifact.name.clone(),
                    digest: artifact.digest.clone(),
                    phase: ModelPhase::Failed.into(),
                    ..Default::default()
                };
                let deployment_name = deployment
                    .metadata
                    .as_ref()
                    .map(|m| m.name.as_str())
                    .unwrap_or_default();
                let message = format!(
                    "deployment {deployment_name} needs {}@{}, which was never pushed (push it with `flotilla model push`)",
                    artifact.name, artifact.digest
                );
                let id = format!(
                    "model-{}-missing-{}",
                    model_token(&artifact.name),
                    digest_tail(&artifact.digest)
                );
                let _ = self
                    .event(EventType::ModelFailed, &record, message, Some(id), "")
                    .await;
            }
        }
    }

    async fn ensure_preset(&self, preset_name: &str) -> Result<(), KitError> {
        let Some(preset) = flotilla_model_catalog::preset(preset_name) else {
            return Ok(());
        };
        let source = preset_source(&self.preset_dir, preset_name);
        let now = now_unix_ms();
        let me = self.instance.clone();
        let takeover = self.takeover_after_ms;
        let claimed = self
            .models
            .update(preset_name, |current| {
                let fresh = || ModelRecord {
                    name: preset_name.to_string(),
                    family: preset.family.to_string(),
                    architecture: preset.architecture.to_string(),
                    parameters: preset.shape.parameters,
                    context_length: preset.shape.context_length,
                    quantization: preset.default_precision.name().to_string(),
                    runtimes: preset
                        .runtimes
                        .iter()
                        .map(|r| r.name().to_string())
                        .collect(),
                    phase: ModelPhase::Provisioning.into(),
                    provisioned_by: me.clone(),
                    updated_at_unix_ms: now,
                    source: "preset".into(),
                    ..Default::default()
                };
                match current {
                    None => Some(fresh()),
                    Some(r)
                        if r.phase() == ModelPhase::Provisioning
                            && now - r.updated_at_unix_ms > takeover =>
                    {
                        Some(fresh())
                    }
                    // A failed preset is tried again once its weights appear.
                    Some(r)
                        if r.phase() == ModelPhase::Failed
                            && source.is_some()
                            && r.source == "preset" =>
                    {
                        Some(fresh())
                    }
                    _ => None,
                }
            })
            .await?;
        let Some(record) = claimed else { return Ok(()) };
        let Some(path) = source else {
            let mut failed = record.clone();
            failed.phase = ModelPhase::Failed.into();
            failed.message = format!(
                "no weights for preset {preset_name}: put them at {dir}/{preset_name}.gguf or {dir}/{preset_name}/, or push them with `flotilla model push`",
                dir = self.preset_dir.display()
            );
            self.models
                .update(preset_name, |_| Some(failed.clone()))
                .await?;
            let id = format!("model-{}-noweights", model_token(preset_name));
            return self
                .event(
                    EventType::ModelFailed,
                    &failed,
                    failed.message.clone(),
                    Some(id),
                    "",
                )
                .await;
        };
        self.event(
            EventType::ModelProvisioning,
            &record,
            format!("storing preset {preset_name} from {}", path.display()),
            None,
            "",
        )
        .await?;
        let p = self.clone();
        let name = preset_name.to_string();
        tokio::spawn(async move {
            if let Err(e) = p.upload_preset(&name, &path).await {
                tracing::error!(model = %name, "upload failed: {e}");
            }
        });
        Ok(())
    }

    async fn upload_preset(&self, name: &str, path: &Path) -> Result<(), KitError> {
        tracing::info!(model = name, path = %path.display(), "uploading");
        let started = std::time::Instant::now();
        let mut last_refresh = std::time::Instant::now();
        let (refresh_tx, mut refresh_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let models = self.models.clone();
        let me = self.instance.clone();
        let key = name.to_string();
        // Keeps the claim fresh while parts go up.
        let refresher = tokio::spawn(async move {
            while refresh_rx.recv().await.is_some() {
                let _ = models
                    .update(&key, |cur| {
                        let c = cur?;
                        (c.provisioned_by == me && c.phase() == ModelPhase::Provisioning).then(
                            || {
                                let mut n = c.clone();
                                n.updated_at_unix_ms = now_unix_ms();
                                n
                            },
                        )
                    })
                    .await;
            }
        });
        let uploaded = flotilla_model_store::upload(&self.store, name, path, |_, _| {
            if last_refresh.elapsed() > Duration::from_secs(5) {
                last_refresh = std::time::Instant::now();
                let _ = refresh_tx.send(());
            }
        })
        .await;
        drop(refresh_tx);
        let _ = refresher.await;
        let me = self.instance.clone();
        let (ty, message, record) = match uploaded {
            Ok(up) => {
                let format = if path.is_dir() { "safetensors" } else { "gguf" };
                let written = self
                    .models
                    .update(name, |cur| {
                        let c = cur?;
                        (c.provisioned_by == me).then(|| {
                            let mut n = c.clone();
                            n.phase = ModelPhase::Ready.into();
                            n.digest.clone_from(&up.digest);
                            n.size_bytes = up.size_bytes;
                            n.parts.clone_from(&up.parts);
                            n.format = format.into();
                            n.object_name = format!("{name}/{}", digest_tail(&up.digest));
                            n.message = format!("stored from {}", path.display());
                            n.updated_at_unix_ms = now_unix_ms();
                            n
                        })
                    })
                    .await?;
                let Some(record) = written else {
                    tracing::warn!(
                        model = name,
                        "another provisioner took the upload over; leaving it"
                    );
                    return Ok(());
                };
                let secs = started.elapsed().as_secs_f64();
                let message = format!(
                    "{name} ready: {:.1} MB in {} parts, {} ({secs:.1} s, {:.0} MB/s)",
                    up.size_bytes as f64 / 1e6,
                    up.parts.len(),
                    up.digest,
                    up.size_bytes as f64 / 1e6 / secs.max(1e-3)
                );
                (EventType::ModelReady, message, record)
            }
            Err(e) => {
                let message = format!("storing {name} failed: {e}");
                let failed = self
                    .models
                    .update(name, |cur| {
                        let mut n = cur?.clone();
                        n.phase = ModelPhase::Failed.into();
                        n.message.clone_from(&message);
                        Some(n)
                    })
                    .await?
                    .unwrap_or_default();
                (EventType::ModelFailed, message, failed)
            }
        };
        tracing::info!(model = name, "{message}");
        let id = format!(
            "model-{}-{}-{}",
            model_token(name),
            digest_tail(&record.digest),
            ty.what()
        );
        self.event(ty, &record, message, Some(id), "").await
    }

    async fn register(&self, d: Delivery<v1::RegisterModel>) -> Result<(), HandlerError> {
        let request = d.message;
        check_model_name(&request.name).map_err(|e| HandlerError::invalid("name", e))?;
        if flotilla_model_store::digest_hex(&request.digest).is_none() {
            return Err(HandlerError::invalid(
                "digest",
                format!("{:?} is not sha256:<64 hex digits>", request.digest),
            ));
        }
        if !matches!(request.format.as_str(), "gguf" | "safetensors") {
            return Err(HandlerError::invalid(
                "format",
                format!("{:?} must be gguf or safetensors", request.format),
            ));
        }
        if request.parts.is_empty() {
            return Err(HandlerError::invalid("parts", "lists no parts"));
        }
        let correlation = if request.request_id.is_empty() {
            d.msg_id.clone().unwrap_or_default()
        } else {
            request.request_id.clone()
        };
        if self
            .models
            .cached(&request.name)
            .is_some_and(|r| r.digest == request.digest && r.phase() == ModelPhase::Ready)
        {
            let record = self.models.cached(&request.name).unwrap_or_default();
            return self
                .event(
                    EventType::ModelReady,
                    &record,
                    format!("{} is already ready", request.name),
                    None,
                    &correlation,
                )
                .await
                .map_err(HandlerError::retry);
        }
        let size: u64 = request.parts.iter().map(|p| p.size_bytes).sum();
        let (phase, message) =
            match flotilla_model_store::verify_stored(&self.store, &request.parts, &request.digest)
                .await
            {
                Ok(()) if size == request.size_bytes => (
                    ModelPhase::Ready,
                    format!(
                        "{} ready: pushed, {:.1} MB in {} parts, every digest checked",
                        request.name,
                        size as f64 / 1e6,
                        request.parts.len()
                    ),
                ),
                Ok(()) => (
                    ModelPhase::Failed,
                    format!(
                        "{}: parts hold {size} bytes, the request says {}",
                        request.name, request.size_bytes
                    ),
                ),
                Err(e) => (ModelPhase::Failed, format!("{} refused: {e}", request.name)),
            };
        let record = ModelRecord {
            name: request.name.clone(),
            format: request.format.clone(),
            digest: request.digest.clone(),
            size_bytes: size,
            object_name: format!("{}/{}", request.name, digest_tail(&request.digest)),
            phase: phase.into(),
            message: message.clone(),
            parts: request.parts.clone(),
            provisioned_by: self.instance.clone(),
            updated_at_unix_ms: now_unix_ms(),
            source: "push".into(),
            runtimes: vec!["candle".into(), "vllm".into()],
            ..Default::default()
        };
        if phase == ModelPhase::Failed {
            // A refused upload is not kept around.
            for part in &request.parts {
                let _ = self.store.delete(&part.object).await;
            }
        }
        self.models
            .update(&request.name, |_| Some(record.clone()))
            .await
            .map_err(HandlerError::retry)?;
        let ty = if phase == ModelPhase::Ready {
            EventType::ModelReady
        } else {
            EventType::ModelFailed
        };
        tracing::info!(model = %request.name, "{message}");
        self.event(ty, &record, message, None, &correlation)
            .await
            .map_err(HandlerError::retry)
    }
}

fn digest_tail(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names() {
        assert!(check_model_name("qwen2.5-7b-instruct").is_ok());
        assert!(check_model_name("my-model").is_ok());
        for bad in ["", "My", "-a", "a-", "a/b", "a b"] {
            assert!(check_model_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_shipped_and_dropped_in_weights() {
        let dir = std::env::temp_dir().join(format!("flotilla-presets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(preset_source(&dir, "smollm2-135m-instruct").is_none());
        std::fs::write(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"x").unwrap();
        assert!(preset_source(&dir, "smollm2-135m-instruct").is_some());
        std::fs::write(dir.join("qwen2.5-0.5b-instruct.gguf"), b"x").unwrap();
        assert!(preset_source(&dir, "qwen2.5-0.5b-instruct").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
