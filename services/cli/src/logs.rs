//! `flotilla logs REPLICA`: the replica's last lines, from the executor of
//! its cluster (a local replica's log file, or its pod's log).

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_kit::answer::{self, ReplyError};
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::v1::{ReplicaLogs, ReplicaLogsRequest, ReplicaStatus};

const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// The cluster that runs `replica`, from the replicas bucket.
async fn cluster_of(bus: &Bus, replica: &str) -> anyhow::Result<String> {
    let replicas = RecordStore::<ReplicaStatus>::open(bus, &bus.topology.replicas.name)
        .await
        .context("the fleet has no replicas bucket yet (is it provisioned? try `flotilla up`)")?
        .list()
        .await?;
    match replicas.iter().find(|r| r.replica_id == replica) {
        Some(r) => Ok(r.cluster.clone()),
        None => bail!("no replica {replica:?} in the fleet; `flotilla get replicas` lists them"),
    }
}

pub async fn logs(
    bus: &Bus,
    replica: &str,
    tail: u32,
    cluster: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let cluster = match cluster {
        Some(c) => c.to_string(),
        None => cluster_of(bus, replica).await?,
    };
    let subject = bus
        .subjects
        .replica_logs(&cluster)
        .map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
    let request = ReplicaLogsRequest {
        replica_id: replica.to_string(),
        tail_lines: tail,
    };
    let answer: ReplicaLogs = match answer::request(bus, subject, &request, ANSWER_WAIT).await {
        Ok(answer) => answer,
        Err(ReplyError::TimedOut { .. }) => bail!(
            "the executor of {cluster} did not answer within {}; `flotilla get clusters` shows whether it is healthy",
            humantime::format_duration(ANSWER_WAIT)
        ),
        Err(ReplyError::NoResponders { .. }) => bail!(
            "no executor of cluster {cluster} answers log requests (is it running, and a version with `flotilla logs`?)"
        ),
        Err(e) => bail!("asking the executor of {cluster}: {e}"),
    };
    if !answer.error.is_empty() {
        bail!("{cluster}: {}", answer.error);
    }
    for line in &answer.lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}
