//! `flotilla model push` and `flotilla get models`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_kit::Bus;
use flotilla_proto::v1;
use flotilla_proto::{ControlSubject, EventType};

use crate::answer::{Answer, ask, error_reason};

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
