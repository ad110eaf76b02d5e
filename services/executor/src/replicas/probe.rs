//! Health probes of the ready replicas this executor runs.

use flotilla_kit::sync;
use flotilla_proto::v1::ReplicaPhase;

use super::Replicas;
use crate::backends::ReplicaBackend;

/// Consecutive failed `/health` probes after which a ready replica is
/// reported failed and stopped.
const PROBE_FAILURES_ALLOWED: u32 = 3;

impl<B: ReplicaBackend> Replicas<B> {
    /// Probes `/health` of every ready replica this executor runs; one
    /// that fails [`PROBE_FAILURES_ALLOWED`] probes in a row is stopped and
    /// reported failed, so the rollout replaces it.
    pub async fn probe_ready(&self) {
        if !self.backend.serves_http() {
            return;
        }
        let Ok(records) = self.own_records().await else {
            return;
        };
        for status in records {
            if status.phase() != ReplicaPhase::Ready || !self.backend.runs(&status.replica_id) {
                continue;
            }
            let id = status.replica_id.clone();
            let probe = self.client.health(&status.endpoint).await;
            let failures = {
                let mut counts = sync::lock(&self.probe_failures);
                match probe {
                    Ok(()) => {
                        counts.remove(&id);
                        0
                    }
                    Err(e) => {
                        tracing::debug!(replica = %id, "health probe: {e}");
                        let count = counts.entry(id.clone()).or_insert(0);
                        *count += 1;
                        *count
                    }
                }
            };
            if failures >= PROBE_FAILURES_ALLOWED {
                let _ = self.backend.stop(&id).await;
                sync::lock(&self.probe_failures).remove(&id);
                self.report_failed(
                    &id,
                    &format!("{failures} health probes in a row failed; stopped"),
                )
                .await;
            }
        }
    }
}
