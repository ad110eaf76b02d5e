//! Typed records in a KV bucket, written with compare-and-set.
//!
//! Several instances of one service may write the same bucket: every write
//! is conditional on the revision it was computed from, and a conflict
//! re-reads and recomputes. A watch keeps a local copy of the whole bucket
//! so periodic work (timeouts, scans) needs no reads.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use flotilla_proto::codec::Contract;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Backoff, BoxError, Bus, KitError, sync};

/// How many times a conflicting write is recomputed before giving up.
const MAX_CONFLICTS: usize = 16;

/// Waits before watching again after a watch broke or could not start.
const WATCH_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));

/// The local copy of a bucket. A key's deletion is remembered with its
/// revision, so an older write the watch delivers late does not bring the
/// record back, and a late tombstone does not remove a newer record.
struct Local<M> {
    live: HashMap<String, (M, u64)>,
    /// Deleted keys and the revision of their deletion.
    gone: HashMap<String, u64>,
}

impl<M> Default for Local<M> {
    fn default() -> Self {
        Self {
            live: HashMap::new(),
            gone: HashMap::new(),
        }
    }
}

impl<M> Local<M> {
    fn revision(&self, key: &str) -> u64 {
        self.live
            .get(key)
            .map(|(_, rev)| *rev)
            .or_else(|| self.gone.get(key).copied())
            .unwrap_or(0)
    }

    /// Keeps `record` at `revision` unless something newer is known;
    /// returns whether the copy changed.
    fn put(&mut self, key: &str, record: M, revision: u64) -> bool {
        if revision <= self.revision(key) {
            return false;
        }
        self.gone.remove(key);
        self.live.insert(key.to_string(), (record, revision));
        true
    }

    /// Forgets `key` as deleted at `revision` unless it was written since;
    /// returns whether a record went.
    fn remove(&mut self, key: &str, revision: u64) -> bool {
        if revision < self.revision(key) {
            return false;
        }
        self.gone.insert(key.to_string(), revision);
        self.live.remove(key).is_some()
    }
}

pub struct RecordStore<M> {
    kv: kv::Store,
    bucket: String,
    cache: Arc<RwLock<Local<M>>>,
    changes: tokio::sync::broadcast::Sender<String>,
    /// The watch has loaded the bucket once: a key missing from the local
    /// copy is almost surely absent, and a write need not read it first
    /// (one that exists after all fails the create and is read then).
    watched: Arc<AtomicBool>,
    _type: PhantomData<M>,
}

impl<M> Clone for RecordStore<M> {
    fn clone(&self) -> Self {
        Self {
            kv: self.kv.clone(),
            bucket: self.bucket.clone(),
            cache: Arc::clone(&self.cache),
            changes: self.changes.clone(),
            watched: Arc::clone(&self.watched),
            _type: PhantomData,
        }
    }
}

impl<M: Contract + Clone> RecordStore<M> {
    pub async fn open(bus: &Bus, bucket: &str) -> Result<Self, KitError> {
        let kv = bus
            .jetstream
            .get_key_value(bucket)
            .await
            .map_err(|e| store_error(bucket, "", e))?;
        Ok(Self {
            kv,
            bucket: bucket.to_string(),
            cache: Arc::default(),
            changes: tokio::sync::broadcast::channel(4096).0,
            watched: Arc::default(),
            _type: PhantomData,
        })
    }

    /// Keeps the local copy equal to the bucket until `shutdown`, across
    /// server restarts. Returns once the current contents are loaded.
    pub async fn start_watch(&self, shutdown: CancellationToken) -> Result<(), KitError> {
        let empty = self
            .kv
            .status()
            .await
            .map_err(|e| store_error(&self.bucket, "", e))?
            .values()
            == 0;
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let store = self.clone();
        tokio::spawn(async move {
            let mut loaded = Some(loaded_tx);
            let mut failures = 0u32;
            while !shutdown.is_cancelled() {
                match store.kv.watch_with_history(">").await {
                    Ok(mut watch) => loop {
                        let next = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            next = watch.next() => next,
                        };
                        match next {
                            Some(Ok(entry)) => {
                                failures = 0;
                                // delta: how many more the watch has queued.
                                let caught_up = entry.delta == 0;
                                store.absorb(entry);
                                if caught_up && let Some(tx) = loaded.take() {
                                    store.watched.store(true, Ordering::Release);
                                    let _ = tx.send(());
                                }
                            }
                            Some(Err(e)) => {
                                tracing::warn!(bucket = %store.bucket, "watch interrupted: {e}; restarting");
                                break;
                            }
                            None => break,
                        }
                    },
                    Err(e) => tracing::warn!(bucket = %store.bucket, "cannot watch: {e}"),
                }
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(WATCH_BACKOFF.delay(failures)) => {}
                }
            }
        });
        // An empty bucket sends nothing to wait for.
        if empty {
            self.watched.store(true, Ordering::Release);
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(30), loaded_rx).await;
        }
        Ok(())
    }

    /// Keys whose record changed in the local copy, from any writer. A
    /// receiver that lags gets `Lagged` and should rescan everything.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn absorb(&self, entry: kv::Entry) {
        let key = entry.key.clone();
        if self.absorb_entry(entry) {
            let _ = self.changes.send(key);
        }
    }

    /// Returns whether the local copy changed.
    fn absorb_entry(&self, entry: kv::Entry) -> bool {
        match entry.operation {
            Operation::Put => {
                // Our own writes come back through the watch: already known.
                if entry.revision <= sync::read(&self.cache).revision(&entry.key) {
                    return false;
                }
                match M::decode(entry.value.clone()) {
                    Ok(record) => sync::write(&self.cache).put(&entry.key, record, entry.revision),
                    Err(e) => {
                        tracing::warn!(bucket = %self.bucket, key = %entry.key, "undecodable record ignored: {e}");
                        false
                    }
                }
            }
            Operation::Delete | Operation::Purge => {
                sync::write(&self.cache).remove(&entry.key, entry.revision)
            }
        }
    }

    /// The local copy of one record.
    pub fn cached(&self, key: &str) -> Option<M> {
        sync::read(&self.cache)
            .live
            .get(key)
            .map(|(m, _)| m.clone())
    }

    /// What `look` reads of the local copy of one record, without cloning
    /// the record: for a hot path that needs one field of it.
    pub fn peek<R>(&self, key: &str, look: impl FnOnce(&M) -> R) -> Option<R> {
        sync::read(&self.cache).live.get(key).map(|(m, _)| look(m))
    }

    /// The local copies of the records `wanted` picks, by key. Only those
    /// are cloned: scans over large buckets stay cheap.
    pub fn select(&self, mut wanted: impl FnMut(&str, &M) -> bool) -> Vec<(String, M)> {
        sync::read(&self.cache)
            .live
            .iter()
            .filter(|(k, (m, _))| wanted(k, m))
            .map(|(k, (m, _))| (k.clone(), m.clone()))
            .collect()
    }

    /// Runs `look` over the local copies without cloning them: for a
    /// decision that needs the whole bucket (counts, ratios) on every tick.
    pub fn scan<R>(&self, look: impl FnOnce(&mut dyn Iterator<Item = (&str, &M)>) -> R) -> R {
        let cache = sync::read(&self.cache);
        let mut all = cache.live.iter().map(|(k, (m, _))| (k.as_str(), m));
        look(&mut all)
    }

    /// The local copy of every record, by key.
    pub fn cached_all(&self) -> Vec<(String, M)> {
        sync::read(&self.cache)
            .live
            .iter()
            .map(|(k, (m, _))| (k.clone(), m.clone()))
            .collect()
    }

    /// Reads one record from the server.
    pub async fn get(&self, key: &str) -> Result<Option<(M, u64)>, KitError> {
        let entry = self
            .kv
            .entry(key)
            .await
            .map_err(|e| store_error(&self.bucket, key, e))?;
        match entry {
            Some(e) if e.operation == Operation::Put => {
                let record =
                    M::decode(e.value).map_err(|err| store_error(&self.bucket, key, err))?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Reads every record from the server (for clients that do not watch).
    pub async fn list(&self) -> Result<Vec<M>, KitError> {
        self.list_matching(">").await
    }

    /// Reads the records whose keys start with `first_token.` from the
    /// server: one cluster's replicas out of the whole fleet's, selected
    /// by the server rather than read and thrown away here.
    pub async fn list_under(&self, first_token: &str) -> Result<Vec<M>, KitError> {
        self.list_matching(&format!("{first_token}.>")).await
    }

    async fn list_matching(&self, keys: &str) -> Result<Vec<M>, KitError> {
        // The subjects the stream holds, in one answer from the server: a
        // KV key listing (an ordered consumer) can miss a key or name it
        // twice while the key is being rewritten. Deleted keys still hold
        // a marker; `get` leaves them out.
        let prefix = self.kv.prefix.clone();
        let mut subjects = self
            .kv
            .stream
            .info_with_subjects(format!("{prefix}{keys}"))
            .await
            .map_err(|e| store_error(&self.bucket, "", e))?;
        let mut names = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|e| store_error(&self.bucket, "", e))?;
            if let Some(key) = subject.strip_prefix(&prefix) {
                names.push(key.to_string());
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some((record, _)) = self.get(&name).await? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Computes and writes a record with compare-and-set. `change` gets the
    /// current record (or `None`) and returns the new one, or `None` to
    /// write nothing. On a conflict it runs again on the fresh record.
    /// Returns what was written. On a watched store the current record is
    /// the local copy's; a key it lacks is taken as absent until a create
    /// finds it there.
    pub async fn update<F>(&self, key: &str, change: F) -> Result<Option<M>, KitError>
    where
        F: FnMut(Option<&M>) -> Option<M>,
    {
        self.update_from(key, true, change).await
    }

    /// [`Self::update`] for a key its writer usually creates: with no
    /// local copy, `change` is first asked with no record and the result
    /// created without reading the key first. A key that exists after all
    /// costs the read then, and `change` is asked again with what it holds.
    pub async fn update_likely_new<F>(&self, key: &str, change: F) -> Result<Option<M>, KitError>
    where
        F: FnMut(Option<&M>) -> Option<M>,
    {
        self.update_from(key, false, change).await
    }

    async fn update_from<F>(
        &self,
        key: &str,
        read_first: bool,
        mut change: F,
    ) -> Result<Option<M>, KitError>
    where
        F: FnMut(Option<&M>) -> Option<M>,
    {
        let mut current = sync::read(&self.cache)
            .live
            .get(key)
            .map(|(m, rev)| (m.clone(), *rev));
        if current.is_none() && read_first && !self.watched.load(Ordering::Acquire) {
            current = self.get(key).await?;
        }
        for _ in 0..MAX_CONFLICTS {
            let Some(next) = change(current.as_ref().map(|(m, _)| m)) else {
                return Ok(None);
            };
            let value = bytes::Bytes::from(next.encode_to_vec());
            let written = match &current {
                Some((_, rev)) => {
                    self.kv
                        .update(key, value, *rev)
                        .await
                        .map_err(|e| match e.kind() {
                            kv::UpdateErrorKind::WrongLastRevision => None,
                            _ if wrong_last_revision(&e) => None,
                            _ => Some(store_error(&self.bucket, key, e)),
                        })
                }
                None => self
                    .kv
                    .create(key, value)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => None,
                        _ if wrong_last_revision(&e) => None,
                        _ => Some(store_error(&self.bucket, key, e)),
                    }),
            };
            match written {
                Ok(revision) => {
                    let changed = sync::write(&self.cache).put(key, next.clone(), revision);
                    if changed {
                        let _ = self.changes.send(key.to_string());
                    }
                    return Ok(Some(next));
                }
                Err(Some(e)) => return Err(e),
                // Someone wrote first: start again from what they wrote.
                Err(None) => current = self.get(key).await?,
            }
        }
        Err(KitError::StoreConflict {
            bucket: self.bucket.clone(),
            key: key.to_string(),
            tries: MAX_CONFLICTS,
        })
    }
}

impl<M: Contract + Clone> RecordStore<M> {
    /// Deletes a record (a tombstone; watchers see the delete).
    pub async fn delete(&self, key: &str) -> Result<(), KitError> {
        self.kv
            .delete(key)
            .await
            .map_err(|e| store_error(&self.bucket, key, e))?;
        self.forget(key).await;
        Ok(())
    }

    /// Deletes the record if it is still the one the local copy holds and
    /// `still` accepts it: nobody wrote it since. Returns whether it went.
    pub async fn delete_if(&self, key: &str, still: impl Fn(&M) -> bool) -> Result<bool, KitError> {
        let revision = match sync::read(&self.cache).live.get(key) {
            Some((record, revision)) if still(record) => *revision,
            _ => return Ok(false),
        };
        match self.kv.delete_expect_revision(key, Some(revision)).await {
            Ok(()) => {
                self.forget(key).await;
                Ok(true)
            }
            // Written since: the watch brings the newer record.
            Err(e)
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision
                    || wrong_last_revision(&e) =>
            {
                Ok(false)
            }
            Err(e) => Err(store_error(&self.bucket, key, e)),
        }
    }

    async fn forget(&self, key: &str) {
        // The tombstone's revision orders it against what the watch has
        // not delivered yet; if it cannot be read, the last known one does.
        let removed = match self.kv.entry(key).await {
            Ok(Some(entry)) => self.absorb_entry(entry),
            _ => {
                let mut cache = sync::write(&self.cache);
                let known = cache.revision(key);
                cache.remove(key, known)
            }
        };
        if removed {
            let _ = self.changes.send(key.to_string());
        }
    }
}

/// Whether the server refused a write because the key's last revision
/// was not the one expected: a conflict to recompute, however the client
/// library classified it. A clustered nats-server answers some of these
/// with code 10164, which async-nats reports as an unknown error.
fn wrong_last_revision(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::ErrorCode;
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(answer) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return matches!(
                answer.error_code(),
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            );
        }
        next = err.source();
    }
    false
}

fn store_error(bucket: &str, key: &str, e: impl Into<BoxError>) -> KitError {
    KitError::Store {
        bucket: bucket.to_string(),
        key: key.to_string(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::Local;

    #[test]
    fn a_put_older_than_the_deletion_does_not_bring_a_record_back() {
        let mut local = Local::default();
        assert!(local.put("a", "v1", 3));
        assert!(local.remove("a", 5));
        assert!(!local.put("a", "v1", 3));
        assert!(!local.put("a", "v0", 4));
        assert!(local.live.is_empty());
        assert!(local.put("a", "v2", 6));
        assert_eq!(local.live.get("a"), Some(&("v2", 6)));
    }

    #[test]
    fn a_late_tombstone_does_not_remove_a_newer_record() {
        let mut local = Local::default();
        // Written again here before the watch delivered the deletion.
        assert!(local.put("a", "v2", 8));
        assert!(!local.remove("a", 5));
        assert_eq!(local.live.get("a"), Some(&("v2", 8)));
        // An old write arriving after that is older still.
        assert!(!local.put("a", "v1", 3));
        assert_eq!(local.live.get("a"), Some(&("v2", 8)));
    }

    #[test]
    fn writes_are_kept_in_revision_order() {
        let mut local = Local::default();
        assert!(local.put("a", "v2", 7));
        assert!(!local.put("a", "v1", 7));
        assert!(!local.put("a", "v1", 6));
        assert!(local.put("a", "v3", 9));
        assert_eq!(local.live.get("a"), Some(&("v3", 9)));
    }
}

#[cfg(test)]
mod conflict_tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    use async_nats::jetstream::kv::{UpdateError, UpdateErrorKind};

    use super::wrong_last_revision;

    fn answer(code: u32) -> async_nats::jetstream::Error {
        serde_json::from_str(&format!(
            r#"{{"code": 400, "err_code": {code}, "description": "wrong last sequence"}}"#
        ))
        .unwrap()
    }

    #[test]
    fn both_wrong_last_sequence_answers_are_conflicts_and_others_are_not() {
        for (code, conflict) in [(10071, true), (10164, true), (10158, false)] {
            let publish = PublishError::with_source(PublishErrorKind::Other, answer(code));
            let update = UpdateError::with_source(UpdateErrorKind::Other, publish);
            assert_eq!(wrong_last_revision(&update), conflict, "{code}");
        }
        let timeout = UpdateError::new(UpdateErrorKind::TimedOut);
        assert!(!wrong_last_revision(&timeout));
    }
}
