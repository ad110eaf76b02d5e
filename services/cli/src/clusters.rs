//! `flotilla get clusters` and `flotilla cluster cordon|uncordon`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_kit::Bus;
use flotilla_proto::v1::{self, ClusterRecord, event::Payload};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;
use prost::Message;

use crate::answer::Pending;

#[derive(Debug, clap::Subcommand)]
pub enum ClusterAction {
    /// Keep new replicas off a cluster; running ones stay.
    Cordon {
        name: String,
        /// Why, shown with the cluster and in the event.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let placement use a cordoned cluster again.
    Uncordon { name: String },
}

/// Publishes the request and waits until inventory has applied it, or
/// says why not.
pub async fn cordon(bus: &Bus, action: ClusterAction, out: &mut impl Write) -> anyhow::Result<()> {
    let (name, cordon, reason) = match action {
        ClusterAction::Cordon { name, reason } => (name, true, reason),
        ClusterAction::Uncordon { name } => (name, false, String::new()),
    };
    flotilla_proto::check_name("cluster", &name)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let kv = bus
        .jetstream
        .get_key_value(&bus.topology.clusters.name)
        .await
        .context("the fleet has no cluster inventory yet")?;
    let mut watch = kv.watch_with_history(&name).await?;

    let request = v1::CordonCluster {
        cluster: name.clone(),
        cordon,
        reason,
        request_id: request_id.clone(),
    };
    // Inventory answers by writing the record; only a refusal is an event.
    let mut pending =
        Pending::send(bus, ControlSubject::ClusterCordon, &request, &request_id).await?;
    let refused = EventType::BusMessageRejected.to_string();

    let verb = if cordon { "cordoned" } else { "uncordoned" };
    let wait = async {
        loop {
            tokio::select! {
                Some(Ok(entry)) = watch.next() => {
                    if let Ok(record) = ClusterRecord::decode(entry.value)
                        && record.cordoned == cordon
                    {
                        return Ok(());
                    }
                }
                Some(event) = pending.next_event(|e| e.r#type == refused && e.correlation_id == request_id) => {
                    let reason = match event.payload {
                        Some(Payload::Error(e)) => e.reason,
                        _ => event.message,
                    };
                    bail!("refused: {reason}");
                }
                else => bail!("lost the connection to NATS"),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), wait).await {
        Ok(Ok(())) => {
            writeln!(out, "cluster/{name} {verb}")?;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => bail!(
            "the request is on the bus but no inventory applied it within 10 s (is the inventory service running?)"
        ),
    }
}
