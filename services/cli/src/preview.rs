//! `apply --dry-run=server`: placement checks a document against the fleet
//! and says where it would go, storing nothing.

use std::time::Duration;

use anyhow::bail;
use flotilla_kit::Bus;
use flotilla_kit::answer::{self, ReplyError};
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, ModelDeployment, PlacementOutcome, event::Payload};

use crate::answer::error_reason;
use crate::table;

/// Placement's preview of `doc`: `Ok(Ok(text))` when it would be placed,
/// `Ok(Err(reason))` when it would be rejected or left unplaced.
pub async fn preview(
    bus: &Bus,
    doc: &ModelDeployment,
    wait: Duration,
) -> anyhow::Result<Result<String, String>> {
    let name = doc
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let event: v1::Event = match answer::request(bus, bus.subjects.preview_deployments(), doc, wait)
        .await
    {
        Ok(event) => event,
        Err(ReplyError::TimedOut { .. }) => bail!(
            "placement did not answer the preview within {} (is it running? --timeout waits longer)",
            humantime::format_duration(wait)
        ),
        Err(ReplyError::NoResponders { .. }) => bail!(
            "no placement service answers previews (is it running, and a version with --dry-run=server?)"
        ),
        Err(e) => bail!("asking placement for a preview: {e}"),
    };
    Ok(describe(&name, &event))
}

/// The preview as people read it.
pub fn describe(name: &str, event: &v1::Event) -> Result<String, String> {
    let placed = EventType::DeploymentPlaced.to_string();
    let unschedulable = EventType::DeploymentUnschedulable.to_string();
    let Some(Payload::Placement(p)) = &event.payload else {
        return Err(format!("would be rejected: {}", error_reason(event)));
    };
    if event.r#type != placed && event.r#type != unschedulable {
        return Err(format!("would be rejected: {}", event.message));
    }
    let mut text = format!(
        "deployment/{name} would be {} (dry run, nothing stored): {}\n",
        match p.outcome() {
            PlacementOutcome::Unschedulable => "unschedulable",
            o => {
                if o == PlacementOutcome::Partial {
                    "partly placed"
                } else {
                    "placed"
                }
            }
        },
        p.message
    );
    if !p.assignments.is_empty() {
        let rows: Vec<Vec<String>> = p
            .assignments
            .iter()
            .map(|a| {
                vec![
                    format!("  {}", a.cluster),
                    a.replicas.to_string(),
                    format!("{} x {}", a.gpus_per_replica, a.gpu_model),
                    format!("{:.1}", a.score),
                ]
            })
            .collect();
        text.push_str(&table::render(
            &["  CLUSTER", "REPLICAS", "GPUS/REPLICA", "SCORE"],
            &rows,
        ));
    }
    for e in &p.exclusions {
        let who = if e.count > 0 {
            format!("{} clusters", e.count)
        } else {
            e.cluster.clone()
        };
        text.push_str(&format!("  left out {who}: {} ({})\n", e.reason, e.plugin));
    }
    if p.outcome() == PlacementOutcome::Unschedulable {
        return Err(text
            .trim_start_matches(&format!("deployment/{name} "))
            .trim_end()
            .to_string());
    }
    Ok(text)
}
