//! A value built from files, rebuilt when their contents change.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::TlsError;

type Build<T> = fn(&[(PathBuf, Vec<u8>)]) -> Result<T, TlsError>;

/// The current `T`, built from the contents of `files`. [`refresh`]
/// rereads them and rebuilds when any changed; [`watch`] does that
/// periodically. Contents, not modification times, decide: a Kubernetes
/// Secret volume swaps a symlink and a copy can keep its time.
///
/// [`refresh`]: Reloading::refresh
/// [`watch`]: Reloading::watch
pub struct Reloading<T> {
    files: Vec<PathBuf>,
    build: Build<T>,
    current: RwLock<(Vec<Vec<u8>>, Arc<T>)>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn read(files: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>, TlsError> {
    files
        .iter()
        .map(|path| {
            std::fs::read(path)
                .map(|bytes| (path.clone(), bytes))
                .map_err(|source| TlsError::Read {
                    path: path.clone(),
                    source,
                })
        })
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads and builds once; an error here is the caller's to report (a
    /// service does not start with certificates it cannot use).
    pub fn load(files: Vec<PathBuf>, build: Build<T>) -> Result<Arc<Self>, TlsError> {
        let contents = read(&files)?;
        let value = build(&contents)?;
        Ok(Arc::new(Self {
            files,
            build,
            current: RwLock::new((
                contents.into_iter().map(|(_, bytes)| bytes).collect(),
                Arc::new(value),
            )),
        }))
    }

    /// What to use for the next connection.
    pub fn current(&self) -> Arc<T> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard.1),
            Err(poisoned) => Arc::clone(&poisoned.into_inner().1),
        }
    }

    /// Rereads the files: `Ok(true)` when they changed and the new value is
    /// in use, `Ok(false)` when nothing changed, an error (the old value
    /// kept) when they cannot be read or built.
    pub fn refresh(&self) -> Result<bool, TlsError> {
        let contents = read(&self.files)?;
        let unchanged = {
            let guard = match self.current.read() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            guard.0.len() == contents.len()
                && guard
                    .0
                    .iter()
                    .zip(&contents)
                    .all(|(old, (_, new))| old == new)
        };
        if unchanged {
            return Ok(false);
        }
        let value = Arc::new((self.build)(&contents)?);
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = (
            contents.into_iter().map(|(_, bytes)| bytes).collect(),
            value,
        );
        Ok(true)
    }

    /// Refreshes every `every` until `shutdown`, logging each change and
    /// each failure once until the files change again.
    pub fn watch(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                match this.refresh() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(files = ?this.files, "TLS files changed; new connections use them");
                    }
                    Ok(false) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(
                            "TLS files changed but cannot be used, keeping the previous ones: {e}"
                        );
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
