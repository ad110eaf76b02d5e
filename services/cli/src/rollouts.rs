//! `flotilla rollout status|approve|undo`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_kit::{Bus, RecordStore, now_unix_ms};
use flotilla_proto::traffic;
use flotilla_proto::v1::{self, GatewayTraffic, RolloutPhase, RolloutState};
use flotilla_proto::{ControlSubject, EventType};
use futures::StreamExt;

use crate::answer::{Answer, ask, error_reason};
use crate::{Output, table};

const ANSWER_DEADLINE: Duration = Duration::from_secs(15);

async fn state_of(bus: &Bus, name: &str) -> anyhow::Result<RolloutState> {
    let store = RecordStore::<RolloutState>::open(bus, &bus.topology.rollouts.name)
        .await
        .context("the fleet has no rollouts bucket yet (is it provisioned? try `flotilla up`)")?;
    match store.get(name).await? {
        Some((state, _)) => Ok(state),
        None => bail!("{name} has no rollout (is it applied? `flotilla get deployments`)"),
    }
}

/// The gateways' traffic summaries published within `window`.
async fn listen_to_traffic(bus: &Bus, window: Duration) -> anyhow::Result<Vec<GatewayTraffic>> {
    let mut summaries = bus
        .client
        .subscribe(bus.subjects.traffic_all())
        .await
        .context("listening to the gateways' traffic summaries")?;
    let mut heard = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, summaries.next()).await {
        match flotilla_proto::codec::decode_protobuf::<GatewayTraffic>(&msg.payload) {
            Ok(summary) => heard.push(summary),
            Err(e) => eprintln!(
                "skipping an unreadable traffic summary on {}: {e}",
                msg.subject
            ),
        }
    }
    Ok(heard)
}

fn seconds(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.is_infinite() => "> 35m".into(),
        Some(s) if s < 1.0 => format!("{:.0}ms", s * 1000.0),
        Some(s) => format!("{s:.1}s"),
    }
}

/// New version against old in `summaries`, a row each.
pub fn traffic_table(summaries: &[GatewayTraffic], name: &str, new_template: &str) -> String {
    let rows: Vec<Vec<String>> = traffic::by_version(summaries, name)
        .iter()
        .map(|v| {
            vec![
                if v.template == new_template {
                    "new"
                } else {
                    "old"
                }
                .to_string(),
                v.template.clone(),
                v.requests.to_string(),
                v.error_rate()
                    .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
                v.client_errors.to_string(),
                seconds(v.time_to_first_byte.quantile(0.5)),
                seconds(v.time_to_first_byte.quantile(0.95)),
                seconds(v.duration.quantile(0.95)),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "(no requests for it through any gateway)\n".into();
    }
    table::render(
        &[
            "VERSION",
            "TEMPLATE",
            "REQUESTS",
            "ERRORS",
            "4XX",
            "TTFB P50",
            "TTFB P95",
            "DURATION P95",
        ],
        &rows,
    )
}

/// The rollout's phase, stages and replicas; with `traffic`, the new
/// version's traffic against the old one's over that window.
pub async fn status(
    bus: &Bus,
    name: &str,
    output: Output,
    traffic: Option<Duration>,
    out: &mut (impl Write + Send),
) -> anyhow::Result<()> {
    let state = state_of(bus, name).await?;
    if let Some(window) = traffic {
        let heard = listen_to_traffic(bus, window).await?;
        if output == Output::Json {
            let versions: Vec<serde_json::Value> = traffic::by_version(&heard, name)
                .iter()
                .map(|v| {
                    serde_json::json!({
                        "version": if v.template == state.template { "new" } else { "old" },
                        "template": v.template,
                        "requests": v.requests,
                        "succeeded": v.succeeded,
                        "clientErrors": v.client_errors,
                        "serverErrors": v.server_errors,
                        "broken": v.broken,
                        "errorRate": v.error_rate(),
                        "timeToFirstByteP50Seconds": v.time_to_first_byte.quantile(0.5),
                        "timeToFirstByteP95Seconds": v.time_to_first_byte.quantile(0.95),
                        "durationP95Seconds": v.duration.quantile(0.95),
                    })
                })
                .collect();
            let doc = serde_json::json!({"rollout": state, "traffic": versions});
            writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
            return Ok(());
        }
        writeln!(
            out,
            "Traffic over the last {} ({} gateway summaries; errors: 5xx and broken streams):",
            humantime::format_duration(window),
            heard.len()
        )?;
        write!(out, "{}", traffic_table(&heard, name, &state.template))?;
        writeln!(out)?;
    }
    if output == Output::Json {
        writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?;
        return Ok(());
    }
    let now = now_unix_ms();
    writeln!(out, "Deployment:  {name}")?;
    writeln!(
        out,
        "Phase:       {}",
        flotilla_rollout::phase_name(state.phase())
    )?;
    writeln!(
        out,
        "Spec:        generation {} (template {}), placement generation {}",
        state.deployment_generation, state.template, state.target_generation
    )?;
    if state.previous_spec.is_some() {
        writeln!(out, "Undo to:     generation {}", state.previous_generation)?;
    }
    writeln!(out, "Message:     {}", state.message)?;
    writeln!(
        out,
        "Failures:    {}{}",
        state.failed_replicas,
        if state.skip_gates {
            "  (no gates: first rollout or undo)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "Updated:     {}",
        table::ago(state.updated_at_unix_ms, now)
    )?;
    writeln!(out)?;
    let rows: Vec<Vec<String>> = state
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            vec![
                if i as u32 == state.current_stage {
                    format!("> {}", s.name)
                } else {
                    format!("  {}", s.name)
                },
                flotilla_proto::json::name_of::<v1::StagePhase>(s.phase).to_string(),
                if s.clusters.is_empty() {
                    "-".into()
                } else {
                    s.clusters.join(",")
                },
                if s.approved { "yes" } else { "-" }.to_string(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table::render(&["STAGE", "PHASE", "CLUSTERS", "APPROVED"], &rows)
    )?;
    writeln!(out)?;
    let args = crate::get::GetArgs {
        deployment: Some(name.to_string()),
        ..crate::get::GetArgs::of(crate::get::Kind::Replicas)
    };
    crate::get::get(bus, &args, out, tokio_util::sync::CancellationToken::new()).await
}

/// Follows a rollout, one line per change of its phase, stage or ready
/// count, until it completes or halts (or `stop`).
pub async fn follow(
    bus: &Bus,
    name: &str,
    out: &mut impl Write,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<RolloutPhase> {
    let store = RecordStore::<RolloutState>::open(bus, &bus.topology.rollouts.name)
        .await
        .context("the fleet has no rollouts bucket yet (is it provisioned? try `flotilla up`)")?;
    store.start_watch(stop.clone()).await?;
    let mut changes = store.changes();
    let mut last = String::new();
    loop {
        let Some(state) = store.cached(name) else {
            bail!("{name} has no rollout (is it applied? `flotilla get deployments`)");
        };
        let stage = state
            .stages
            .get(state.current_stage as usize)
            .map(|s| s.name.as_str())
            .unwrap_or("-");
        let line = format!(
            "{:<16} stage {:<10} {}",
            flotilla_rollout::phase_name(state.phase()),
            stage,
            state.message
        );
        if line != last {
            writeln!(out, "{line}")?;
            out.flush()?;
            last = line;
        }
        if matches!(state.phase(), RolloutPhase::Complete | RolloutPhase::Halted) {
            return Ok(state.phase());
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(state.phase()),
            changed = changes.recv() => if changed.is_err() {
                bail!("lost the watch on KV rollouts");
            },
        }
    }
}

/// Publishes a request to the rollout service and waits for its `done`
/// event (returned) or its refusal (an error starting with `refused`).
async fn ask_rollout<M: flotilla_proto::Contract>(
    bus: &Bus,
    which: ControlSubject,
    request: &M,
    request_id: &str,
    done: EventType,
    refused: &str,
) -> anyhow::Result<v1::Event> {
    match ask(
        bus,
        which,
        request,
        request_id,
        &[done],
        &[],
        ANSWER_DEADLINE,
    )
    .await?
    {
        Answer::Done(event) => Ok(event),
        Answer::Refused(event) => bail!("{refused}: {}", error_reason(&event)),
        Answer::Lost => bail!("the event subscription ended before an answer"),
        Answer::TimedOut => bail!(
            "no answer within {ANSWER_DEADLINE:?}: is the rollout service running? (`flotilla watch` shows what happens)"
        ),
    }
}

/// Approves the gate after the current stage (or a named one ahead of
/// time) and waits for the rollout service to confirm it.
pub async fn approve(
    bus: &Bus,
    name: &str,
    stage: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = v1::ApproveRollout {
        deployment: name.to_string(),
        stage: stage.unwrap_or_default().to_string(),
        request_id: request_id.clone(),
        approved_by: std::env::var("USER").unwrap_or_default(),
        ..Default::default()
    };
    let event = ask_rollout(
        bus,
        ControlSubject::RolloutApprove,
        &request,
        &request_id,
        EventType::RolloutApproved,
        "not approved",
    )
    .await?;
    writeln!(out, "{}", event.message)?;
    Ok(())
}

/// Re-applies the spec the current rollout replaced.
pub async fn undo(bus: &Bus, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = v1::UndoRollout {
        deployment: name.to_string(),
        request_id: request_id.clone(),
    };
    let event = ask_rollout(
        bus,
        ControlSubject::RolloutUndo,
        &request,
        &request_id,
        EventType::RolloutUndone,
        "not undone",
    )
    .await?;
    writeln!(out, "{}", event.message)?;
    writeln!(out, "follow it with `flotilla rollout status {name}`")?;
    Ok(())
}
