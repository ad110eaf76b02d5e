//! `flotilla model push` and `flotilla get models`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::v1::{self, ClusterRecord, ModelPhase, ModelRecord};
use flotilla_proto::{ControlSubject, EventType};

use crate::Output;
use crate::answer::{Answer, ask, error_reason};
use crate::table;

/// Uploads a GGUF file or a safetensors folder, then asks the provisioner
/// to check it and make it ready. Progress goes to `progress` (stderr).
pub async fn push(
    bus: &Bus,
    path: &Path,
    name: &str,
    format: Option<&str>,
    out: &mut impl Write,
    progress: &mut impl Write,
) -> anyhow::Result<String> {
    let format = match format {
        Some(f) => f.to_string(),
        None if path.is_dir() => "safetensors".into(),
        None if path.extension().is_some_and(|e| e == "gguf") => "gguf".into(),
        None if path.extension().is_some_and(|e| e == "safetensors") => "safetensors".into(),
        None => bail!(
            "{}: cannot tell the format; pass --format gguf|safetensors",
            path.display()
        ),
    };
    let store = bus
        .jetstream
        .get_object_store(&bus.topology.model_artifacts.name)
        .await
        .context("the fleet has no model store yet (is it provisioned? try `flotilla up`)")?;
    let started = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(1);
    let uploaded = flotilla_model_store::upload(&store, name, path, |done, total| {
        if last.elapsed() >= Duration::from_millis(200) || done == total {
            last = Instant::now();
            let pct = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            let rate = done as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-3);
            let _ = write!(
                progress,
                "\rpushing {name}: {pct:5.1} %  {:.1}/{:.1} MB  {rate:.0} MB/s",
                done as f64 / 1e6,
                total as f64 / 1e6
            );
            let _ = progress.flush();
        }
    })
    .await?;
    let _ = writeln!(progress);

    let request_id = uuid::Uuid::new_v4().to_string();
    let request = v1::RegisterModel {
        name: name.to_string(),
        digest: uploaded.digest.clone(),
        format,
        size_bytes: uploaded.size_bytes,
        parts: uploaded.parts.clone(),
        request_id: request_id.clone(),
    };
    let answer = ask(
        bus,
        ControlSubject::ModelRegister,
        &request,
        &request_id,
        &[EventType::ModelReady],
        &[EventType::ModelFailed],
        Duration::from_secs(120),
    )
    .await?;
    match answer {
        Answer::Done(_) => {
            writeln!(
                out,
                "model/{name} ready: {} ({:.1} MB, {} parts)",
                uploaded.digest,
                uploaded.size_bytes as f64 / 1e6,
                uploaded.parts.len()
            )?;
            Ok(uploaded.digest)
        }
        Answer::Refused(event) if event.r#type == EventType::ModelFailed.to_string() => {
            bail!("{}", event.message)
        }
        Answer::Refused(event) => bail!("refused: {}", error_reason(&event)),
        Answer::Lost => bail!("lost the connection to NATS"),
        Answer::TimedOut => {
            bail!("uploaded, but no model-provisioner confirmed it within 120 s (is it running?)")
        }
    }
}

pub async fn get(bus: &Bus, output: Output, out: &mut impl Write) -> anyhow::Result<()> {
    let models = RecordStore::<ModelRecord>::open(bus, &bus.topology.models.name)
        .await
        .context("the fleet has no models bucket yet (is it provisioned? try `flotilla up`)")?
        .list()
        .await?;
    let clusters = RecordStore::<ClusterRecord>::open(bus, &bus.topology.clusters.name)
        .await?
        .list()
        .await?;
    let cached_on = |m: &ModelRecord| -> Vec<String> {
        clusters
            .iter()
            .filter(|c| {
                c.inventory.as_ref().is_some_and(|i| {
                    i.cached_models
                        .iter()
                        .any(|x| x.name == m.name && x.digest == m.digest)
                })
            })
            .map(|c| c.name.clone())
            .collect()
    };
    if output == Output::Json {
        let all: Vec<_> = models
            .iter()
            .map(|m| serde_json::json!({ "model": m, "cachedOn": cached_on(m) }))
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            let on = cached_on(m);
            vec![
                m.name.clone(),
                flotilla_proto::json::name_of::<ModelPhase>(m.phase).to_string(),
                if m.format.is_empty() {
                    "-".into()
                } else {
                    m.format.clone()
                },
                if m.size_bytes == 0 {
                    "-".into()
                } else {
                    format!("{:.1} MB", m.size_bytes as f64 / 1e6)
                },
                if m.digest.is_empty() {
                    "-".into()
                } else {
                    m.digest.chars().take(19).collect::<String>() + "…"
                },
                if on.is_empty() {
                    "-".into()
                } else {
                    on.join(",")
                },
                if m.phase() == ModelPhase::Failed {
                    m.message.clone()
                } else {
                    m.source.clone()
                },
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table::render(
            &[
                "NAME",
                "PHASE",
                "FORMAT",
                "SIZE",
                "DIGEST",
                "CACHED ON",
                "SOURCE / REASON"
            ],
            &rows
        )
    )?;
    if models.is_empty() {
        writeln!(out, "(no models yet)")?;
    }
    Ok(())
}
