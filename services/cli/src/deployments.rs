//! `flotilla apply`, `delete deployment`, `get deployments`,
//! `describe deployment`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use flotilla_kit::{Bus, RecordStore, events, now_unix_ms};
use flotilla_proto::v1::{self, ModelDeployment, PlacementDecision, PlacementOutcome};
use flotilla_proto::{ControlSubject, EventKind, EventType};
use serde::Deserialize;

use crate::answer::{Answer, Pending, ask, error_reason};
use crate::table;

/// Reads every document of a YAML (or JSON) file, of every `.yaml`,
/// `.yml` and `.json` file of a directory (in name order), or of standard
/// input (`-`).
pub fn read_documents(path: &Path) -> anyhow::Result<Vec<ModelDeployment>> {
    if path == Path::new("-") {
        let text = std::io::read_to_string(std::io::stdin()).context("reading standard input")?;
        return parse_documents(&text).context("standard input");
    }
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{} holds no .yaml, .yml or .json file", path.display());
        }
        let mut docs = Vec::new();
        for f in files {
            docs.extend(read_file(&f)?);
        }
        return Ok(docs);
    }
    read_file(path)
}

fn read_file(path: &Path) -> anyhow::Result<Vec<ModelDeployment>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_documents(&text).with_context(|| format!("{}", path.display()))
}

pub fn parse_documents(text: &str) -> anyhow::Result<Vec<ModelDeployment>> {
    let mut docs = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .with_context(|| format!("document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        // `flotilla get deployments -o yaml` writes a List of them.
        let list = value.get("kind").and_then(|k| k.as_str()) == Some("List");
        let items = match value.get("items") {
            Some(serde_yaml::Value::Sequence(items)) if list => items
                .iter()
                .enumerate()
                .map(|(j, v)| (format!("items[{j}]."), v.clone()))
                .collect(),
            _ if list => bail!("document {}: a List without items", i + 1),
            _ => vec![(String::new(), value)],
        };
        for (at, value) in items {
            let doc: ModelDeployment = serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let path = if path == "." {
                    "document".to_string()
                } else {
                    format!("{at}{path}")
                };
                anyhow::anyhow!("document {}: {path}: {}", i + 1, e.into_inner())
            })?;
            docs.push(doc);
        }
    }
    if docs.is_empty() {
        bail!("no documents");
    }
    Ok(docs)
}

/// An event about `name`'s deployment, or the answer to `request_id`.
fn about(event: &v1::Event, request_id: &str, name: &str) -> bool {
    event.correlation_id == request_id
        || (event.name == name && event.r#type.starts_with("deployment."))
}

/// How `apply` checks, sends and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DryRun {
    /// Send the documents.
    #[default]
    None,
    /// Check the documents here; send nothing.
    Client,
    /// Placement checks them against the fleet and says where they would
    /// go; nothing is stored.
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyOptions {
    pub dry_run: DryRun,
    /// Wait until every replica is Ready (or fail when a deployment cannot
    /// be placed or its rollout halts).
    pub wait: bool,
    /// For placement's answer, and with `wait` for readiness.
    pub timeout: Option<Duration>,
}

/// Placement's answer within this, unless `--timeout` says otherwise.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Readiness within this with `--wait`, unless `--timeout` says otherwise.
pub const READY_WAIT: Duration = Duration::from_secs(300);

fn name_of_doc(doc: &ModelDeployment) -> String {
    doc.metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// `--dry-run=client`: each document's own rules, checked here.
fn check_one(doc: &ModelDeployment, out: &mut impl Write) -> anyhow::Result<Result<(), String>> {
    let name = name_of_doc(doc);
    Ok(match flotilla_deployment_spec::validate(doc) {
        Ok(_) => {
            writeln!(
                out,
                "deployment/{name} valid (dry run: checked here, nothing sent)"
            )?;
            Ok(())
        }
        Err(e) => {
            writeln!(out, "deployment/{name} rejected: {e}")?;
            Err(format!("deployment/{name}: {e}"))
        }
    })
}

/// `apply --dry-run=client`, which needs no fleet.
pub fn check_here(docs: Vec<ModelDeployment>, out: &mut impl Write) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for doc in docs {
        if let Err(e) = check_one(&doc, out)? {
            failures.push(e);
        }
    }
    match failures.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!(
            "{} documents rejected:\n  {}",
            many.len(),
            many.join("\n  ")
        ),
    }
}

/// The document as `diff` compares it: what apply would store, less
/// what placement writes.
fn comparable(doc: &ModelDeployment) -> anyhow::Result<String> {
    let mut doc = crate::get::deployment_document(doc);
    doc.status = None;
    Ok(serde_yaml::to_string(&doc)?)
}

/// Prints a unified diff per deployment that `apply` would change;
/// `true` when any would change.
pub async fn diff(
    bus: &Bus,
    docs: Vec<ModelDeployment>,
    out: &mut impl Write,
) -> anyhow::Result<bool> {
    let store = RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name)
        .await
        .context(
            "the fleet has no deployments bucket yet (is it provisioned? try `flotilla up`)",
        )?;
    let mut changed = false;
    for doc in docs {
        let name = name_of_doc(&doc);
        let live = match store.get(&name).await? {
            Some((d, _)) => comparable(&d)?,
            None => String::new(),
        };
        let wanted = comparable(&doc)?;
        if live == wanted {
            continue;
        }
        changed = true;
        let text = similar::TextDiff::from_lines(&live, &wanted);
        write!(
            out,
            "{}",
            text.unified_diff().context_radius(3).header(
                &format!(
                    "deployment/{name} (live{})",
                    if live.is_empty() { ", none" } else { "" }
                ),
                &format!("deployment/{name} (file)")
            )
        )?;
    }
    Ok(changed)
}

/// Sets `spec.replicas` and applies the stored document again.
pub async fn scale(
    bus: &Bus,
    name: &str,
    replicas: u32,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    flotilla_proto::check_name("deployment", name)?;
    let store = RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name).await?;
    let Some((mut doc, _)) = store.get(name).await? else {
        bail!("deployment {name:?} not found (`flotilla get deployments` lists them)");
    };
    let spec = doc.spec.get_or_insert_with(Default::default);
    let from = spec.replicas;
    spec.replicas = i32::try_from(replicas).context("--replicas is too large")?;
    if from == spec.replicas {
        writeln!(out, "deployment/{name} already has {replicas} replicas")?;
        return Ok(());
    }
    let options = ApplyOptions {
        dry_run: DryRun::None,
        wait: false,
        timeout: None,
    };
    apply(bus, vec![doc], options, out).await?;
    writeln!(
        out,
        "deployment/{name} scaled from {from} to {replicas} replicas"
    )?;
    Ok(())
}

/// Publishes each document and reports what placement made of it; with
/// `wait`, then waits for each to be ready.
pub async fn apply(
    bus: &Bus,
    docs: Vec<ModelDeployment>,
    options: ApplyOptions,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let store = RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name).await?;
    let answer_wait = options.timeout.unwrap_or(ANSWER_WAIT);
    let mut failures = Vec::new();
    let mut to_wait = Vec::new();
    for mut doc in docs {
        // What `get -o yaml` printed with it; placement writes its own.
        doc.status = None;
        let name = name_of_doc(&doc);
        match options.dry_run {
            DryRun::Client => {
                if let Err(e) = check_one(&doc, out)? {
                    failures.push(e);
                }
                continue;
            }
            DryRun::Server => {
                match crate::preview::preview(bus, &doc, answer_wait).await? {
                    Ok(text) => write!(out, "{text}")?,
                    Err(reason) => {
                        writeln!(out, "deployment/{name} {reason}")?;
                        failures.push(format!("deployment/{name} {reason}"));
                    }
                }
                continue;
            }
            DryRun::None => {}
        }
        if let Ok(Some((stored, _))) = store.get(&name).await
            && stored.spec == doc.spec
            && stored.metadata == doc.metadata
        {
            writeln!(out, "deployment/{name} unchanged")?;
            to_wait.push((name, stored.status.map_or(0, |s| s.generation)));
            continue;
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut pending =
            Pending::send(bus, ControlSubject::DeploymentApply, &doc, &request_id).await?;
        let answer = tokio::time::timeout(
            answer_wait,
            pending.next_event(|e| about(e, &request_id, &name)),
        )
        .await;
        let event = match answer {
            Ok(Some(e)) => e,
            Ok(None) => bail!("lost the connection to NATS"),
            Err(_) => bail!(
                "deployment/{name}: the request is on the bus but placement did not answer within {} (is it running? `flotilla watch` shows what happens; --timeout waits longer)",
                humantime::format_duration(answer_wait)
            ),
        };
        if event.r#type == EventType::DeploymentRejected.to_string()
            || event.r#type == EventType::BusMessageRejected.to_string()
        {
            let reason = error_reason(&event);
            writeln!(out, "deployment/{name} rejected: {reason}")?;
            failures.push(format!("deployment/{name}: {reason}"));
            continue;
        }
        writeln!(
            out,
            "deployment/{name} accepted (generation {})",
            event.generation
        )?;
        to_wait.push((name.clone(), event.generation));
        // Then the placement, if it comes promptly.
        let placed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match pending.next_event(|e| about(e, &request_id, &name)).await {
                    Some(e) if e.r#type != EventType::DeploymentAccepted.to_string() => {
                        return Some(e);
                    }
                    Some(_) => continue,
                    None => return None,
                }
            }
        })
        .await;
        if let Ok(Some(e)) = placed {
            writeln!(
                out,
                "  {}: {}",
                e.r#type.trim_start_matches("deployment."),
                e.message
            )?;
        }
    }
    if options.wait {
        let deadline = tokio::time::Instant::now() + options.timeout.unwrap_or(READY_WAIT);
        for (name, generation) in to_wait {
            out.flush()?;
            match crate::ready::wait_ready(bus, &name, generation, deadline).await? {
                Ok(summary) => writeln!(out, "deployment/{name} ready: {summary}")?,
                Err(reason) => failures.push(format!("deployment/{name}: {reason}")),
            }
        }
    }
    match failures.as_slice() {
        [] => Ok(()),
        [one] => bail!("{one}"),
        many => bail!(
            "{} deployments failed:\n  {}",
            many.len(),
            many.join("\n  ")
        ),
    }
}

pub async fn delete(bus: &Bus, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    flotilla_proto::check_name("deployment", name)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = v1::DeleteDeployment {
        name: name.to_string(),
        request_id: request_id.clone(),
    };
    let answer = ask(
        bus,
        ControlSubject::DeploymentDelete,
        &request,
        &request_id,
        &[EventType::DeploymentDeleted],
        &[],
        Duration::from_secs(10),
    )
    .await?;
    match answer {
        Answer::Done(_) => writeln!(out, "deployment/{name} deleted").map_err(Into::into),
        Answer::Refused(event) => bail!("refused: {}", error_reason(&event)),
        Answer::Lost => bail!("lost the connection to NATS"),
        Answer::TimedOut => bail!(
            "the request is on the bus but placement did not answer within 10 s (is it running?)"
        ),
    }
}

/// The model a deployment serves: its artifact's name, else its preset.
pub(crate) fn model_of(d: &ModelDeployment) -> String {
    let model = d
        .spec
        .as_ref()
        .and_then(|s| s.model.clone())
        .unwrap_or_default();
    match model.artifact {
        Some(a) => a.name,
        None => model.preset,
    }
}

pub async fn describe(bus: &Bus, name: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let deployments =
        RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name).await?;
    let Some((d, _)) = deployments.get(name).await? else {
        bail!("no deployment named {name:?}");
    };
    let placements =
        RecordStore::<PlacementDecision>::open(bus, &bus.topology.placements.name).await?;
    let placement = placements.get(name).await?.map(|(p, _)| p);
    let spec = d.spec.clone().unwrap_or_default();
    let status = d.status.clone().unwrap_or_default();
    writeln!(out, "Name:        {name}")?;
    writeln!(
        out,
        "Model:       {} ({})",
        model_of(&d),
        flotilla_proto::json::name_of::<v1::Runtime>(spec.runtime.max(1))
    )?;
    writeln!(out, "Replicas:    {}", spec.replicas)?;
    let policy = spec.placement.as_ref().map_or(0, |p| p.policy);
    writeln!(
        out,
        "Policy:      {}",
        match flotilla_proto::json::name_of::<v1::PlacementPolicy>(policy) {
            "" => "PickAll",
            p => p,
        }
    )?;
    writeln!(
        out,
        "Generation:  {} (status {}: {})",
        status.generation,
        flotilla_proto::json::name_of::<v1::DeploymentPhase>(status.phase),
        status.message
    )?;
    match &placement {
        None => writeln!(out, "Placement:   none yet")?,
        Some(p) => {
            writeln!(
                out,
                "Placement:   generation {}, {} ({})",
                p.generation,
                flotilla_proto::json::name_of::<PlacementOutcome>(p.outcome),
                p.message
            )?;
            writeln!(out)?;
            let rows: Vec<_> = p
                .assignments
                .iter()
                .map(|a| {
                    vec![
                        a.cluster.clone(),
                        a.replicas.to_string(),
                        format!("{} x {}", a.gpus_per_replica, a.gpu_model),
                        format!("{:.1}", a.score),
                    ]
                })
                .collect();
            write!(
                out,
                "{}",
                table::render(&["CLUSTER", "REPLICAS", "GPUS/REPLICA", "SCORE"], &rows)
            )?;
            if !p.exclusions.is_empty() {
                writeln!(out, "\nLeft out:")?;
                let rows: Vec<_> = p
                    .exclusions
                    .iter()
                    .map(|e| {
                        let cluster = if e.count > 0 {
                            format!("({} clusters)", e.count)
                        } else {
                            e.cluster.clone()
                        };
                        vec![cluster, e.plugin.clone(), e.reason.clone()]
                    })
                    .collect();
                write!(
                    out,
                    "{}",
                    table::render(&["CLUSTER", "PLUGIN", "REASON"], &rows)
                )?;
            }
        }
    }
    writeln!(out, "\nEvents:")?;
    for e in recent_events(bus, name, 10).await? {
        writeln!(
            out,
            "  {}  {:<26} {}",
            table::ago(e.time_unix_ms, now_unix_ms()),
            e.r#type,
            e.message
        )?;
    }
    Ok(())
}

/// The last `limit` events about a deployment, oldest first.
async fn recent_events(bus: &Bus, name: &str, limit: usize) -> anyhow::Result<Vec<v1::Event>> {
    let about = bus.subjects.events_about(EventKind::Deployment, name)?;
    let stored = events::stored(bus, vec![about], DeliverPolicy::All, Some(limit)).await?;
    Ok(stored.into_iter().filter_map(|m| m.event.ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_architecture_document_as_yaml() {
        let text = r#"
apiVersion: flotilla.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: chat-small            # DNS-label, unique in the fleet
  labels: {team: search}
spec:
  model:
    preset: smollm2-135m-instruct
  runtime: candle
  replicas: 4
  resources:
    gpu: {count: 1, minMemoryGiB: 8, types: [H100, A100, L4]}
  placement:
    policy: PickN
    numberOfClusters: 2
    clusterNames: []
    affinity:
      required:
        - labelSelector: {matchLabels: {env: prod}}
      preferred:
        - weight: 60
          propertySorter: {name: gpu.freeMemoryGiB, order: Descending}
    topologySpread:
      - {topologyKey: region, maxSkew: 1, whenUnsatisfiable: DoNotSchedule}
    tolerations:
      - {key: spot, operator: Exists}
  rollout:
    strategy: Staged
    maxUnavailable: 25%
    maxSurge: 1
    stages:
      - name: canary
        clusterSelector: {matchLabels: {env: canary}}
        afterStage: {wait: 60s}
---
metadata: {name: second}
spec: {model: {preset: smollm2-135m-instruct}, replicas: 1}
"#;
        let docs = parse_documents(text).unwrap();
        assert_eq!(docs.len(), 2);
        let spec = docs[0].spec.as_ref().unwrap();
        assert_eq!(
            spec.placement.as_ref().unwrap().policy(),
            v1::PlacementPolicy::PickN
        );
        assert_eq!(spec.rollout.as_ref().unwrap().max_surge, "1");
        assert_eq!(docs[1].metadata.as_ref().unwrap().name, "second");
    }

    #[test]
    fn yaml_errors_name_the_document_and_field() {
        let e = parse_documents("metadata: {name: a}\n---\nspec: {replicas: many}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("document 2") && e.contains("spec.replicas"),
            "{e}"
        );
        let e = parse_documents("spec: {replicaz: 1}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("spec.replicaz") || e.contains("replicaz"), "{e}");
    }
}
