//! `flotilla get replicas`.

use std::io::Write;

use anyhow::Context;
use flotilla_kit::{Bus, RecordStore, now_unix_ms};
use flotilla_proto::v1::{ReplicaPhase, ReplicaStatus};

use crate::Output;
use crate::table;

pub async fn get(
    bus: &Bus,
    deployment: Option<&str>,
    output: Output,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut replicas: Vec<ReplicaStatus> =
        RecordStore::<ReplicaStatus>::open(bus, &bus.topology.replicas.name)
            .await
            .context("the fleet has no replicas bucket yet (is it provisioned? try `flotilla up`)")?
            .list()
            .await?
            .into_iter()
            .filter(|r| deployment.is_none_or(|d| r.deployment == d))
            .collect();
    replicas.sort_by(|a, b| {
        (&a.deployment, &a.cluster, &a.replica_id).cmp(&(&b.deployment, &b.cluster, &b.replica_id))
    });
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&replicas)?)?;
        return Ok(());
    }
    let now = now_unix_ms();
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                r.replica_id.clone(),
                r.deployment.clone(),
                r.cluster.clone(),
                flotilla_proto::json::name_of::<ReplicaPhase>(r.phase).to_string(),
                r.generation.to_string(),
                if r.endpoint.is_empty() {
                    "-".into()
                } else {
                    r.endpoint.clone()
                },
                table::ago(r.updated_at_unix_ms, now),
                r.message.clone(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table::render(
            &[
                "REPLICA",
                "DEPLOYMENT",
                "CLUSTER",
                "PHASE",
                "GEN",
                "ENDPOINT",
                "UPDATED",
                "MESSAGE"
            ],
            &rows
        )
    )?;
    if replicas.is_empty() {
        writeln!(out, "(no replicas)")?;
    }
    Ok(())
}
