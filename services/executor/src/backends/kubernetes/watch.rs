//! Objects the executor keeps an eye on, watched rather than polled: one
//! kube-runtime reflector per kind (a list, then a watch from its resource
//! version, re-listed by kube when the watch expires) feeding an in-memory
//! store, and a counter bumped on every change so that whoever waits on
//! the store wakes when it changes instead of reading the API on a timer.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One kind of object, watched: its store and the change counter.
pub struct Watched<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    changes: watch::Receiver<u64>,
    synced: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
{
    /// Starts watching `api` with `config` on a task of its own (so it
    /// must be called inside a Tokio runtime); the task ends when this is
    /// dropped. `what` names the objects in logs.
    pub fn spawn(api: Api<K>, config: watcher::Config, what: &'static str) -> Self {
        Self::spawn_typed(api, config, K::DynamicType::default(), what)
    }
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    /// As [`spawn`](Self::spawn), for a kind known only at run time (a
    /// custom resource read as `DynamicObject`, `dyntype` its resource).
    pub fn spawn_typed(
        api: Api<K>,
        config: watcher::Config,
        dyntype: K::DynamicType,
        what: &'static str,
    ) -> Self {
        let writer = reflector::store::Writer::new(dyntype);
        let store = writer.as_reader();
        let (bump, changes) = watch::channel(0u64);
        let synced = Arc::new(AtomicBool::new(false));
        let listed = synced.clone();
        let task = tokio::spawn(async move {
            let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
            futures::pin_mut!(stream);
            let mut failing = false;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        if matches!(event, watcher::Event::InitDone) {
                            listed.store(true, Ordering::Release);
                        }
                        if failing {
                            tracing::info!("watching {what} again");
                            failing = false;
                        }
                        bump.send_modify(|n| *n = n.wrapping_add(1));
                    }
                    // kube backs off and lists again; one line per outage.
                    Err(e) if !failing => {
                        tracing::warn!("watching {what}: {e}; retrying");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        });
        Self {
            store,
            changes,
            synced,
            task,
        }
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut rx = self.changes.clone();
        rx.mark_unchanged();
        rx
    }

    /// Whether the first listing has arrived (before it, the store is
    /// empty and says nothing about what exists).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

impl<K> Drop for Watched<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}
