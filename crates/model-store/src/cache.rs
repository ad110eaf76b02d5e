//! An executor's model cache.
//!
//! Layout under the cache folder: `index.json` (what is cached, sizes,
//! last use), `models/<digest hex>/<files>` (complete, verified artifacts),
//! `partial/<digest hex>/` (a download in progress, with `.done`: the parts
//! already written and checked, so a restarted download skips them).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_nats::jetstream::object_store::ObjectStore;
use flotilla_proto::v1::{ArtifactPart, ModelRecord};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::{PARALLEL_PARTS, digest_hex, digest_string};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedModel {
    pub name: String,
    pub digest: String,
    pub size_bytes: u64,
    pub last_used_unix_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    models: Vec<CachedModel>,
}

impl Index {
    /// Now, or just after the latest use if the clock has not moved on: two
    /// uses in one millisecond still have an order.
    fn next_stamp(&self) -> i64 {
        let latest = self
            .models
            .iter()
            .map(|m| m.last_used_unix_ms)
            .max()
            .unwrap_or(0);
        now_ms().max(latest + 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The stored bytes are not what the record promises: refused.
    #[error("model {model}: part {part} is corrupt: {reason}")]
    Corrupt {
        model: String,
        part: String,
        reason: String,
    },
    #[error("model {model}: the record is unusable: {reason}")]
    BadRecord { model: String, reason: String },
    #[error("model {model}: reading {part} from the object store: {source}")]
    Store {
        model: String,
        part: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("model cache {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model {0}: download cancelled; it resumes from the parts already fetched")]
    Cancelled(String),
}

impl FetchError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Store { .. } | Self::Io { .. } | Self::Cancelled(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchProgress {
    pub parts_done: usize,
    pub parts_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FetchReport {
    pub path: PathBuf,
    pub cache_hit: bool,
    pub parts_downloaded: usize,
    pub parts_reused: usize,
    pub bytes_downloaded: u64,
    pub evicted: Vec<CachedModel>,
}

pub struct ModelCache {
    dir: PathBuf,
    budget_bytes: u64,
    index: Mutex<Index>,
    /// One download at a time: two replicas of one model share it.
    fetching: tokio::sync::Mutex<()>,
}

/// Locks `mutex` even when a panic poisoned it: the index and the list of
/// fetched parts stay whole after one (each update is one insert, push or
/// retain), and a fetch that skipped recording a part would fetch it again.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A relative path that stays inside the artifact's folder.
fn safe_relative(file: &str) -> Option<PathBuf> {
    let p = Path::new(file);
    (!file.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))))
        .then(|| p.to_path_buf())
}

impl ModelCache {
    /// Opens (or creates) the cache in `dir`, keeping at most `budget_bytes`
    /// of complete models.
    pub fn open(dir: &Path, budget_bytes: u64) -> Result<Self, FetchError> {
        std::fs::create_dir_all(dir.join("models")).map_err(io(dir))?;
        std::fs::create_dir_all(dir.join("partial")).map_err(io(dir))?;
        let index_path = dir.join("index.json");
        let mut index: Index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    "{}: unreadable ({e}); starting an empty index",
                    index_path.display()
                );
                Index::default()
            }),
            Err(_) => Index::default(),
        };
        // Entries whose files are gone are not cached any more.
        index.models.retain(|m| {
            digest_hex(&m.digest).is_some_and(|hex| dir.join("models").join(hex).is_dir())
        });
        Ok(Self {
            dir: dir.to_path_buf(),
            budget_bytes,
            index: Mutex::new(index),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every complete model, most recently used first.
    pub fn cached(&self) -> Vec<CachedModel> {
        let mut models = lock(&self.index).models.clone();
        models.sort_by_key(|m| std::cmp::Reverse(m.last_used_unix_ms));
        models
    }

    /// Where a cached model's files are.
    pub fn path_of(&self, digest: &str) -> Option<PathBuf> {
        let path = self.dir.join(crate::cache_relative_path(digest)?);
        path.is_dir().then_some(path)
    }

    fn save_index(&self) -> Result<(), FetchError> {
        let bytes = serde_json::to_vec_pretty(&*lock(&self.index)).unwrap_or_default();
        let tmp = self.dir.join("index.json.tmp");
        std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.dir.join("index.json")).map_err(io(&self.dir))
    }

    /// Makes `record`'s artifact available locally and returns where. Each
    /// part's digest is checked before it counts; a mismatch removes the
    /// whole download and refuses the model.
    pub async fn fetch(
        &self,
        store: &ObjectStore,
        record: &ModelRecord,
        cancel: &CancellationToken,
        mut progress: impl FnMut(FetchProgress),
    ) -> Result<FetchReport, FetchError> {
        let model = record.name.clone();
        let bad = |reason: &str| FetchError::BadRecord {
            model: model.clone(),
            reason: reason.to_string(),
        };
        let hex = digest_hex(&record.digest)
            .ok_or_else(|| bad("digest is not sha256:<64 hex>"))?
            .to_string();
        if record.parts.is_empty() {
            return Err(bad("it lists no parts"));
        }
        let _one_at_a_time = self.fetching.lock().await;

        let final_dir = self.dir.join("models").join(&hex);
        if final_dir.is_dir() {
            self.touch(&record.digest)?;
            return Ok(FetchReport {
                path: final_dir,
                cache_hit: true,
                parts_downloaded: 0,
                parts_reused: 0,
                bytes_downloaded: 0,
                evicted: Vec::new(),
            });
        }

        let staging = self.dir.join("partial").join(&hex);
        tokio::fs::create_dir_all(&staging)
            .await
            .map_err(io(&staging))?;
        let done_path = staging.join(".done");
        let done: BTreeSet<String> = tokio::fs::read(&done_path)
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();

        // Files at full length, so parts can land in any order.
        let mut sizes: Vec<(PathBuf, u64)> = Vec::new();
        for part in &record.parts {
            let rel = safe_relative(&part.file).ok_or_else(|| {
                bad(&format!(
                    "part file {:?} leaves the model folder",
                    part.file
                ))
            })?;
            let end = part.offset + part.size_bytes;
            match sizes.iter_mut().find(|(p, _)| *p == rel) {
                Some((_, size)) => *size = (*size).max(end),
                None => sizes.push((rel, end)),
            }
        }
        for (rel, size) in &sizes {
            let path = staging.join(rel);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(io(parent))?;
            }
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .await
                .map_err(io(&path))?;
            file.set_len(*size).await.map_err(io(&path))?;
        }

        let parts_total = record.parts.len();
        let bytes_total: u64 = record.parts.iter().map(|p| p.size_bytes).sum();
        let reused = record
            .parts
            .iter()
            .filter(|p| done.contains(&p.digest_key()))
            .count();
        let mut progress_state = FetchProgress {
            parts_done: reused,
            parts_total,
            bytes_done: record
                .parts
                .iter()
                .filter(|p| done.contains(&p.digest_key()))
                .map(|p| p.size_bytes)
                .sum(),
            bytes_total,
        };
        progress(progress_state);
        let done = std::sync::Arc::new(Mutex::new(done));
        let todo: Vec<ArtifactPart> = record
            .parts
            .iter()
            .filter(|p| !lock(&done).contains(&p.digest_key()))
            .cloned()
            .collect();
        let mut downloaded = 0usize;
        let mut bytes_downloaded = 0u64;

        // Owned values per part: the futures must be 'static-friendly to be
        // driven from any task.
        let result = futures::stream::iter(todo.into_iter().map(|part| {
            let (staging, model, done, done_path, store, cancel) = (
                staging.clone(),
                model.clone(),
                done.clone(),
                done_path.clone(),
                store.clone(),
                cancel.clone(),
            );
            async move {
                if cancel.is_cancelled() {
                    return Err(FetchError::Cancelled(model.clone()));
                }
                let read = async {
                    let mut object =
                        store
                            .get(&part.object)
                            .await
                            .map_err(|e| FetchError::Store {
                                model: model.clone(),
                                part: part.object.clone(),
                                source: e.into(),
                            })?;
                    let mut bytes =
                        Vec::with_capacity(usize::try_from(part.size_bytes).unwrap_or(0));
                    object.read_to_end(&mut bytes).await.map_err(|e| {
                        // The object store checks its own digest at the end
                        // of each object: a tampered chunk surfaces here.
                        if e.to_string().contains("digest") {
                            FetchError::Corrupt {
                                model: model.clone(),
                                part: part.object.clone(),
                                reason: e.to_string(),
                            }
                        } else {
                            FetchError::Store {
                                model: model.clone(),
                                part: part.object.clone(),
                                source: e.into(),
                            }
                        }
                    })?;
                    Ok::<_, FetchError>(bytes)
                };
                let bytes = tokio::select! {
                    _ = cancel.cancelled() => return Err(FetchError::Cancelled(model.clone())),
                    bytes = read => bytes?,
                };
                let corrupt = |reason: String| FetchError::Corrupt {
                    model: model.clone(),
                    part: part.object.clone(),
                    reason,
                };
                if bytes.len() as u64 != part.size_bytes {
                    return Err(corrupt(format!(
                        "{} bytes, the record lists {}",
                        bytes.len(),
                        part.size_bytes
                    )));
                }
                let actual = digest_string(&Sha256::digest(&bytes));
                if actual != part.digest {
                    return Err(corrupt(format!(
                        "digest {actual}, the record lists {}",
                        part.digest
                    )));
                }
                let path = staging.join(safe_relative(&part.file).unwrap_or_default());
                let mut file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .await
                    .map_err(io(&path))?;
                file.seek(std::io::SeekFrom::Start(part.offset))
                    .await
                    .map_err(io(&path))?;
                file.write_all(&bytes).await.map_err(io(&path))?;
                file.flush().await.map_err(io(&path))?;
                // Recorded only once its bytes are written and checked, and
                // atomically, with no await in between: a download dropped
                // mid-way leaves either the old list or the new one.
                {
                    let mut d = lock(&done);
                    d.insert(part.digest_key());
                    let tmp = done_path.with_extension("tmp");
                    std::fs::write(&tmp, serde_json::to_vec(&*d).unwrap_or_default())
                        .map_err(io(&tmp))?;
                    std::fs::rename(&tmp, &done_path).map_err(io(&done_path))?;
                }
                Ok(part.size_bytes)
            }
        }))
        .buffer_unordered(PARALLEL_PARTS)
        .try_for_each(|bytes| {
            downloaded += 1;
            bytes_downloaded += bytes;
            progress_state.parts_done += 1;
            progress_state.bytes_done += bytes;
            progress(progress_state);
            futures::future::ready(Ok(()))
        })
        .await;

        if let Err(e) = result {
            if matches!(e, FetchError::Corrupt { .. } | FetchError::BadRecord { .. }) {
                // Refused: nothing of it stays in the cache.
                let _ = tokio::fs::remove_dir_all(&staging).await;
                tracing::error!("{e}; download removed");
            }
            return Err(e);
        }
        let _ = tokio::fs::remove_file(&done_path).await;
        tokio::fs::rename(&staging, &final_dir)
            .await
            .map_err(io(&final_dir))?;

        let evicted = {
            let mut index = lock(&self.index);
            index.models.retain(|m| m.digest != record.digest);
            let stamp = index.next_stamp();
            index.models.push(CachedModel {
                name: record.name.clone(),
                digest: record.digest.clone(),
                size_bytes: bytes_total,
                last_used_unix_ms: stamp,
            });
            self.evict(&mut index, &record.digest)
        };
        for m in &evicted {
            if let Some(hex) = digest_hex(&m.digest) {
                let _ = tokio::fs::remove_dir_all(self.dir.join("models").join(hex)).await;
            }
            tracing::info!(model = %m.name, size = m.size_bytes, "evicted from the model cache (least recently used)");
        }
        self.save_index()?;
        Ok(FetchReport {
            path: final_dir,
            cache_hit: false,
            parts_downloaded: downloaded,
            parts_reused: reused,
            bytes_downloaded,
            evicted,
        })
    }

    /// Marks a cached model as used now.
    pub fn touch(&self, digest: &str) -> Result<(), FetchError> {
        {
            let mut index = lock(&self.index);
            let stamp = index.next_stamp();
            if let Some(m) = index.models.iter_mut().find(|m| m.digest == digest) {
                m.last_used_unix_ms = stamp;
            }
        }
        self.save_index()
    }

    /// Removes least-recently-used models until the rest fit the budget;
    /// never `keep`.
    fn evict(&self, index: &mut Index, keep: &str) -> Vec<CachedModel> {
        let mut evicted = Vec::new();
        loop {
            let total: u64 = index.models.iter().map(|m| m.size_bytes).sum();
            if total <= self.budget_bytes {
                break;
            }
            let oldest = index
                .models
                .iter()
                .enumerate()
                .filter(|(_, m)| m.digest != keep)
                .min_by_key(|(_, m)| m.last_used_unix_ms)
                .map(|(i, _)| i);
            let Some(i) = oldest else { break };
            evicted.push(index.models.remove(i));
        }
        evicted
    }
}

trait PartKey {
    fn digest_key(&self) -> String;
}

impl PartKey for ArtifactPart {
    /// A part is identified by where it goes and what it holds.
    fn digest_key(&self) -> String {
        format!("{}@{}:{}", self.file, self.offset, self.digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_paths_stay_inside_the_model() {
        assert!(safe_relative("model.gguf").is_some());
        assert!(safe_relative("sub/model.safetensors").is_some());
        for bad in ["", "../etc/passwd", "/abs", "a/../../b"] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn eviction_takes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::open(dir.path(), 25).unwrap();
        let m = |name: &str, used| CachedModel {
            name: name.into(),
            digest: format!("sha256:{name}"),
            size_bytes: 10,
            last_used_unix_ms: used,
        };
        let mut index = Index {
            models: vec![m("a", 3), m("b", 1), m("c", 2)],
        };
        let evicted = cache.evict(&mut index, "sha256:b");
        assert_eq!(
            evicted.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            vec!["c"]
        );
        assert_eq!(index.models.len(), 2);
    }
}
