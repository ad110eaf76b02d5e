//! `flotilla watch`: the fleet's event stream, live or from a point in
//! time, as lines people read or as JSON lines.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use flotilla_kit::{Bus, events};
use flotilla_proto::EventKind;
use flotilla_proto::v1;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::Output;

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Start this long ago (`10m`, `1h`) or at a time (`2026-11-29T05:00:00Z`);
    /// by default only new events.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events about this kind of thing: cluster, deployment, rollout,
    /// replica, model, bus.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only events about this name (a cluster, deployment, replica or model).
    #[arg(long)]
    pub name: Option<String>,
    /// Print what is stored and exit instead of following.
    #[arg(long)]
    pub no_follow: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Where to start reading.
pub fn start_of(since: Option<&str>) -> anyhow::Result<DeliverPolicy> {
    let Some(since) = since else {
        return Ok(DeliverPolicy::New);
    };
    let at = if let Ok(ago) = humantime::parse_duration(since) {
        SystemTime::now()
            .checked_sub(ago)
            .context("--since reaches before 1970")?
    } else if let Ok(at) = humantime::parse_rfc3339_weak(since) {
        at
    } else {
        bail!(
            "--since {since:?} is neither a duration such as 10m nor a time such as 2026-11-29T05:00:00Z"
        );
    };
    let nanos = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("--since is before 1970")?
        .as_nanos();
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(nanos as i128)
        .context("--since is out of range")?;
    Ok(DeliverPolicy::ByStartTime { start_time })
}

fn filter_of(bus: &Bus, kind: Option<&str>, name: Option<&str>) -> anyhow::Result<String> {
    let kind = match kind {
        None => None,
        Some(k) => Some(
            EventKind::ALL
                .into_iter()
                .find(|x| x.as_str() == k)
                .with_context(|| {
                    format!(
                        "--kind {k:?} is not one of {}",
                        EventKind::ALL
                            .iter()
                            .map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
        ),
    };
    if let Some(n) = name {
        flotilla_proto::check_name("--name", n)?;
    }
    Ok(bus.subjects.events_matching(kind, name)?)
}

/// One event as a line: time, severity, type, name, message.
pub fn line(event: &v1::Event, output: Output) -> anyhow::Result<String> {
    if output == Output::Json {
        return Ok(serde_json::to_string(event)?);
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(event.time_unix_ms.max(0) as u64);
    let severity = match event.severity() {
        v1::Severity::Error => "ERROR",
        v1::Severity::Warning => "WARN ",
        _ => "INFO ",
    };
    Ok(format!(
        "{}  {severity}  {:<28} {:<24} {}",
        humantime::format_rfc3339_millis(at),
        event.r#type,
        event.name,
        event.message
    ))
}

/// Prints events until `stop` (or, with `--no-follow`, until the stored
/// ones are printed). Returns how many it printed.
pub async fn watch(
    bus: &Bus,
    args: &WatchArgs,
    out: &mut (impl Write + Send),
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let filter_subject = filter_of(bus, args.kind.as_deref(), args.name.as_deref())?;
    let deliver_policy = start_of(args.since.as_deref())?;
    const NO_STREAM: &str =
        "the fleet has no events stream yet (is it provisioned? try `flotilla up`)";
    let mut printed = 0;
    if args.no_follow {
        let stored = tokio::select! {
            _ = stop.cancelled() => return Ok(0),
            stored = events::stored(bus, vec![filter_subject], deliver_policy, None) => stored.context(NO_STREAM)?,
        };
        for m in stored {
            if let Ok(event) = m.event {
                writeln!(out, "{}", line(&event, args.output)?)?;
            }
            printed += 1;
        }
        return Ok(printed);
    }
    let mut messages = Box::pin(
        events::follow(bus, vec![filter_subject], deliver_policy)
            .await
            .context(NO_STREAM)?,
    );
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            next = messages.next() => next,
        };
        let Some(m) = next else { break };
        let m = m.map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
        match m.event {
            Ok(event) => writeln!(out, "{}", line(&event, args.output)?)?,
            Err(e) => writeln!(out, "(undecodable event on {}: {e})", m.subject)?,
        }
        out.flush()?;
        printed += 1;
    }
    Ok(printed)
}
