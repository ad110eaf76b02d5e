//! `flotilla get clusters` and `flotilla cluster cordon|uncordon`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_kit::Bus;
use flotilla_kit::answer::{self, CordonAnswer};
use flotilla_proto::v1;

const ANSWER_WAIT: Duration = Duration::from_secs(10);

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
    let request = v1::CordonCluster {
        cluster: name.clone(),
        cordon,
        reason,
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let verb = if cordon { "cordoned" } else { "uncordoned" };
    match answer::cordon(bus, &request, ANSWER_WAIT)
        .await
        .context("the fleet has no cluster inventory yet (is it provisioned? try `flotilla up`)")?
    {
        CordonAnswer::Applied(_) => {
            writeln!(out, "cluster/{name} {verb}")?;
            Ok(())
        }
        CordonAnswer::Refused(reason) => bail!("refused: {reason}"),
        CordonAnswer::Lost => bail!("lost the connection to NATS"),
        CordonAnswer::TimedOut => bail!(
            "the request is on the bus but no inventory applied it within {} (is the inventory service running?)",
            humantime::format_duration(ANSWER_WAIT)
        ),
    }
}
