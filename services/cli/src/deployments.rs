//! `flotilla apply`, `delete deployment`, `get deployments`,
//! `describe deployment`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_kit::{Bus, RecordStore, now_unix_ms};
use flotilla_proto::v1::{self, ModelDeployment, PlacementDecision, PlacementOutcome};
use flotilla_proto::{ControlSubject, EventKind, EventType};
use futures::StreamExt;
use prost::Message;
use serde::Deserialize;

use crate::Output;
use crate::answer::{Answer, Pending, ask, error_reason};
use crate::table;

/// Reads every document of a YAML (or JSON) file; `-` is standard input.
pub fn read_documents(path: &Path) -> anyhow::Result<Vec<ModelDeployment>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
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
        let doc: ModelDeployment = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!(
                "document {}: {}: {}",
                i + 1,
                if path == "." { "document" } else { &path },
                e.into_inner()
            )
        })?;
        docs.push(doc);
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

/// Publishes each document and reports what placement made of it.
pub async fn apply(
    bus: &Bus,
    docs: Vec<ModelDeployment>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let store = RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name).await?;
    let mut failures = 0;
    for doc in docs {
        let name = doc
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        if let Ok(Some((stored, _))) = store.get(&name).await
            && stored.spec == doc.spec
            && stored.metadata == doc.metadata
        {
            writeln!(out, "deployment/{name} unchanged")?;
            continue;
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut pending =
            Pending::send(bus, ControlSubject::DeploymentApply, &doc, &request_id).await?;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            pending.next_event(|e| about(e, &request_id, &name)),
        )
        .await;
        let event = match answer {
            Ok(Some(e)) => e,
            Ok(None) => bail!("lost the connection to NATS"),
            Err(_) => bail!(
                "deployment/{name}: the request is on the bus but placement did not answer within 10 s (is it running?)"
            ),
        };
        if event.r#type == EventType::DeploymentRejected.to_string()
            || event.r#type == EventType::BusMessageRejected.to_string()
        {
            writeln!(out, "deployment/{name} rejected: {}", error_reason(&event))?;
            failures += 1;
            continue;
        }
        writeln!(
            out,
            "deployment/{name} accepted (generation {})",
            event.generation
        )?;
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
    if failures > 0 {
        bail!("{failures} document(s) rejected");
    }
    Ok(())
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

fn model_of(d: &ModelDeployment) -> String {
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

pub async fn get(bus: &Bus, output: Output, out: &mut impl Write) -> anyhow::Result<()> {
    let deployments = RecordStore::<ModelDeployment>::open(bus, &bus.topology.deployments.name)
        .await
        .context("the fleet has no deployments bucket yet (is it provisioned? try `flotilla up`)")?
        .list()
        .await?;
    let placements =
        RecordStore::<PlacementDecision>::open(bus, &bus.topology.placements.name).await?;
    if output == Output::Json {
        let mut all = Vec::new();
        for d in &deployments {
            let name = d
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let placement = placements.get(&name).await?.map(|(p, _)| p);
            all.push(serde_json::json!({ "deployment": d, "placement": placement }));
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        return Ok(());
    }
    let now = now_unix_ms();
    let replicas = RecordStore::<v1::ReplicaStatus>::open(bus, &bus.topology.replicas.name)
        .await?
        .list()
        .await?;
    let mut rows = Vec::new();
    for d in &deployments {
        let name = d
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let status = d.status.clone().unwrap_or_default();
        let placement = placements.get(&name).await?.map(|(p, _)| p);
        let (placed, clusters, outcome) = match &placement {
            Some(p) => (
                p.assignments.iter().map(|a| a.replicas).sum::<u32>(),
                p.assignments
                    .iter()
                    .map(|a| format!("{}:{}", a.cluster, a.replicas))
                    .collect::<Vec<_>>()
                    .join(","),
                flotilla_proto::json::name_of::<PlacementOutcome>(p.outcome).to_string(),
            ),
            None => (0, String::new(), "Pending".into()),
        };
        let ready = replicas
            .iter()
            .filter(|r| r.deployment == name && r.phase() == v1::ReplicaPhase::Ready)
            .count();
        let spec = d.spec.clone().unwrap_or_default();
        let (desired, autoscaling) = match &spec.autoscaling {
            Some(a) => {
                let desired = if status.desired_replicas > 0 {
                    status.desired_replicas
                } else {
                    spec.replicas.max(a.min_replicas).unsigned_abs()
                };
                let why = if status.scaling_reason.is_empty() {
                    "no load reported yet".to_string()
                } else {
                    format!(
                        "{} ({})",
                        status.scaling_reason,
                        table::ago(status.scaled_at_unix_ms, now)
                    )
                };
                (
                    desired,
                    format!("{}..{}: {why}", a.min_replicas, a.max_replicas),
                )
            }
            None => (spec.replicas.unsigned_abs(), "-".to_string()),
        };
        rows.push(vec![
            name.clone(),
            model_of(d),
            format!("{ready}/{placed}/{desired}"),
            outcome,
            if clusters.is_empty() {
                "-".into()
            } else {
                clusters
            },
            status.generation.to_string(),
            table::ago(status.updated_at_unix_ms, now),
            autoscaling,
        ]);
    }
    write!(
        out,
        "{}",
        table::render(
            &[
                "NAME",
                "MODEL",
                "READY/PLACED/DESIRED",
                "OUTCOME",
                "CLUSTERS",
                "GEN",
                "UPDATED",
                "AUTOSCALING",
            ],
            &rows
        )
    )?;
    if deployments.is_empty() {
        writeln!(
            out,
            "(no deployments; apply one with `flotilla apply -f FILE`)"
        )?;
    }
    Ok(())
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
    let stream = bus.jetstream.get_stream(&bus.topology.events.name).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: bus.subjects.events_about(EventKind::Deployment, name)?,
            deliver_policy: DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut events = Vec::new();
    if pending > 0 {
        let mut batch = consumer
            .fetch()
            .max_messages(pending)
            .expires(Duration::from_secs(2))
            .messages()
            .await?;
        while let Some(Ok(msg)) = batch.next().await {
            if let Ok(e) = v1::Event::decode(msg.payload.clone()) {
                events.push(e);
            }
            if events.len() >= pending {
                break;
            }
        }
    }
    let skip = events.len().saturating_sub(limit);
    Ok(events.into_iter().skip(skip).collect())
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
