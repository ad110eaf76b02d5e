//! `flotilla-executor fetch-model`: the init container of Kubernetes
//! replica pods under `--model-delivery node-cache`. It reads the model's
//! record from KV `models`, refuses it unless its digest is the one the
//! replica was started with, and fetches it into the node's cache folder
//! with the executor's own [`ModelCache`] (parts checked against their
//! digests, resumed after an interruption, least recently used models
//! evicted beyond the budget), printing its progress for
//! `kubectl logs -c fetch-model`.
//!
//! Several pods on one node may start at once, each with its own process:
//! [`ModelCache`] keeps one download at a time only within a process, so
//! the cache folder is locked (`.fetch.lock`, an advisory lock the kernel
//! drops with the process) from opening the cache to the end of the
//! fetch. The second pod waits, then finds the model complete.

use std::io::Write;
use std::path::{Path, PathBuf};

use flotilla_kit::{Bus, BusArgs, ConfigError, KitError, RecordStore};
use flotilla_model_store::{FetchError, FetchProgress, FetchReport, ModelCache, digest_hex};
use flotilla_proto::v1::{ModelPhase, ModelRecord};
use tokio_util::sync::CancellationToken;

/// The lock file in the cache folder.
pub const LOCK_FILE: &str = ".fetch.lock";

#[derive(Debug, Clone, clap::Args)]
pub struct FetchModelArgs {
    #[command(flatten)]
    pub bus: BusArgs,

    /// The model's name in KV `models`.
    #[arg(long)]
    pub model: String,

    /// The digest the replica was started for (`sha256:<hex>`); a model
    /// record with another digest is refused.
    #[arg(long)]
    pub digest: String,

    /// The model cache folder to fill (the node's, mounted).
    #[arg(long)]
    pub cache_dir: PathBuf,

    /// Most bytes of models the cache keeps; least recently used go
    /// first. `500GiB`, `512MiB` or a byte count.
    #[arg(long, default_value = flotilla_executor::config::DEFAULT_NODE_CACHE_BUDGET)]
    pub cache_budget: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchModelError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bus(#[from] KitError),
    #[error("no model named {model:?} in KV {bucket}")]
    NoModel { model: String, bucket: String },
    #[error(
        "model {model}: this replica was started for digest {asked}, but the model store holds \
         {stored} now (the model was replaced); refusing to serve another model than the one \
         placed"
    )]
    DigestMismatch {
        model: String,
        asked: String,
        stored: String,
    },
    #[error("model {model} is {phase} in the model store, not ready")]
    NotReady { model: String, phase: String },
    #[error("object store {bucket}: {reason}")]
    ObjectStore { bucket: String, reason: String },
    #[error("locking the model cache ({path}): {source}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("cancelled while waiting for another fetch into {0}")]
    Cancelled(String),
}

impl FetchModelArgs {
    /// The flags checked before anything is contacted.
    fn check(&self) -> Result<u64, ConfigError> {
        flotilla_proto::check_name("model", &self.model)
            .map_err(|e| ConfigError::new("model", e.to_string()))?;
        if digest_hex(&self.digest).is_none() {
            return Err(ConfigError::new(
                "digest",
                format!("{:?} is not sha256:<64 hex digits>", self.digest),
            ));
        }
        flotilla_executor::parse_size(&self.cache_budget)
            .map_err(|e| ConfigError::new("cache-budget", e))
    }
}

/// The record `args` asks for, refused unless it is ready and of the
/// digest asked.
fn check_record(
    args: &FetchModelArgs,
    record: Option<ModelRecord>,
    bucket: &str,
) -> Result<ModelRecord, FetchModelError> {
    let record = record.ok_or_else(|| FetchModelError::NoModel {
        model: args.model.clone(),
        bucket: bucket.to_string(),
    })?;
    if record.digest != args.digest {
        return Err(FetchModelError::DigestMismatch {
            model: args.model.clone(),
            asked: args.digest.clone(),
            stored: record.digest,
        });
    }
    if record.phase() != ModelPhase::Ready {
        return Err(FetchModelError::NotReady {
            model: args.model.clone(),
            phase: record.phase().as_str_name().to_string(),
        });
    }
    Ok(record)
}

/// Takes the cache folder's lock, waiting for another process's fetch to
/// end; held while the returned file is open.
async fn lock_cache(
    dir: &Path,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> Result<std::fs::File, FetchModelError> {
    let path = dir.join(LOCK_FILE);
    let lock_error = |source| FetchModelError::Lock {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(lock_error)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_error)?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let _ = writeln!(
                out,
                "another fetch into {} is under way; waiting for it",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(lock_error(e)),
    }
    let waiting = tokio::task::spawn_blocking(move || file.lock().map(|()| file));
    tokio::select! {
        locked = waiting => match locked {
            Ok(Ok(file)) => Ok(file),
            Ok(Err(e)) => Err(lock_error(e)),
            Err(e) => Err(lock_error(std::io::Error::other(e))),
        },
        () = cancel.cancelled() => Err(FetchModelError::Cancelled(dir.display().to_string())),
    }
}

/// One progress line: bytes, percent and parts.
fn progress_line(model: &str, p: &FetchProgress) -> String {
    let percent = (p.bytes_done * 100)
        .checked_div(p.bytes_total)
        .unwrap_or(100);
    format!(
        "{model}: {}/{} bytes ({percent}%), {}/{} parts",
        p.bytes_done, p.bytes_total, p.parts_done, p.parts_total
    )
}

/// Fetches the model `args` names into `args.cache_dir`, writing progress
/// to `out`; returns what the cache did.
pub async fn run(
    args: &FetchModelArgs,
    cancel: &CancellationToken,
    out: &mut dyn Write,
) -> Result<FetchReport, FetchModelError> {
    let budget = args.check()?;
    let bus = Bus::connect(&args.bus.validate()?, "executor-fetch-model", cancel).await?;
    let bucket = bus.topology.models.name.clone();
    let models = RecordStore::<ModelRecord>::open(&bus, &bucket).await?;
    let record = check_record(
        args,
        models.get(&args.model).await?.map(|(r, _)| r),
        &bucket,
    )?;
    let artifacts = bus.topology.model_artifacts.name.clone();
    let store = bus
        .jetstream
        .get_object_store(&artifacts)
        .await
        .map_err(|e| FetchModelError::ObjectStore {
            bucket: artifacts.clone(),
            reason: e.to_string(),
        })?;
    let _ = writeln!(
        out,
        "fetching {} ({}): {} bytes in {} parts into {}",
        record.name,
        record.digest,
        record.parts.iter().map(|p| p.size_bytes).sum::<u64>(),
        record.parts.len(),
        args.cache_dir.display()
    );
    let _lock = lock_cache(&args.cache_dir, cancel, out).await?;
    // Opened under the lock: the index another process left is current.
    let cache = ModelCache::open(&args.cache_dir, budget)?;
    let mut last_percent = None;
    let report = cache
        .fetch(&store, &record, cancel, |p| {
            let percent = (p.bytes_done * 100).checked_div(p.bytes_total);
            // A line per percent: a large model has thousands of parts.
            if percent != last_percent || p.parts_done == p.parts_total {
                last_percent = percent;
                let _ = writeln!(out, "{}", progress_line(&record.name, &p));
            }
        })
        .await?;
    let _ = writeln!(
        out,
        "{} ready at {} ({})",
        record.name,
        report.path.display(),
        if report.cache_hit {
            "already in the cache".to_string()
        } else {
            format!(
                "{} bytes downloaded, {} parts reused",
                report.bytes_downloaded, report.parts_reused
            )
        }
    );
    for evicted in &report.evicted {
        let _ = writeln!(
            out,
            "evicted {} ({}, {} bytes) beyond the cache budget",
            evicted.name, evicted.digest, evicted.size_bytes
        );
    }
    let _ = out.flush();
    Ok(report)
}

#[cfg(test)]
mod tests;
