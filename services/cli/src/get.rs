//! `flotilla get KIND [NAME…]`: one command for every kind, with kubectl's
//! names, output formats, label selectors and `--watch`.

use std::collections::BTreeMap;
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::DeliverPolicy;
use flotilla_kit::{Bus, RecordStore, events, now_unix_ms};
use flotilla_proto::json::name_of;
use flotilla_proto::v1::{
    self, ClusterHealth, ClusterRecord, ModelDeployment, ModelPhase, ModelRecord,
    PlacementDecision, PlacementOutcome, ReplicaPhase, ReplicaStatus, RolloutState,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::jsonpath::Template;
use crate::table;

/// What `get` lists. Each answers to its plural, singular and short names,
/// as kubectl's kinds do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    #[value(
        name = "deployments",
        aliases = ["deployment", "deploy", "md", "modeldeployment", "modeldeployments"]
    )]
    Deployments,
    #[value(name = "clusters", aliases = ["cluster", "cl"])]
    Clusters,
    #[value(name = "replicas", aliases = ["replica", "rep"])]
    Replicas,
    #[value(name = "models", aliases = ["model", "mo"])]
    Models,
    #[value(name = "rollouts", aliases = ["rollout", "ro"])]
    Rollouts,
    #[value(name = "events", aliases = ["event", "ev"])]
    Events,
}

impl Kind {
    /// The singular, as `-o name` writes it: `deployment/chat-small`.
    pub fn singular(self) -> &'static str {
        match self {
            Self::Deployments => "deployment",
            Self::Clusters => "cluster",
            Self::Replicas => "replica",
            Self::Models => "model",
            Self::Rollouts => "rollout",
            Self::Events => "event",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Deployments => "deployments",
            Self::Clusters => "clusters",
            Self::Replicas => "replicas",
            Self::Models => "models",
            Self::Rollouts => "rollouts",
            Self::Events => "events",
        }
    }

    /// The kind named by any of its names (`deploy`, `cluster`, …).
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        <Self as clap::ValueEnum>::from_str(name, true).map_err(|_| {
            anyhow::anyhow!(
                "{name:?} is not a kind; use one of deployments (deploy, md), clusters (cl), replicas (rep), models (mo), rollouts (ro), events (ev)"
            )
        })
    }
}

/// `-o`: how to print.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
    /// `kind/name`, one per line, for scripts.
    Name,
    JsonPath(Box<Template>),
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "table" => Self::Table,
            "wide" => Self::Wide,
            "json" => Self::Json,
            "yaml" => Self::Yaml,
            "name" => Self::Name,
            _ => {
                let Some(t) = s.strip_prefix("jsonpath=") else {
                    return Err(format!(
                        "{s:?} is not an output format; use table, wide, json, yaml, name or jsonpath=TEMPLATE (e.g. jsonpath='{{.items[*].metadata.name}}')"
                    ));
                };
                // A shell may leave the quotes on: `-o jsonpath="'{.a}'"`.
                let t = t
                    .strip_prefix('\'')
                    .and_then(|t| t.strip_suffix('\''))
                    .unwrap_or(t);
                Self::JsonPath(Box::new(t.parse().map_err(|e| format!("{e}"))?))
            }
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flotilla get deployments
  flotilla get deploy chat-small -o yaml > chat-small.yaml   # edit, then apply -f
  flotilla get clusters -l region=eu-west -o wide
  flotilla get replicas --deployment chat-small -w
  flotilla get md -o jsonpath='{range .items[*]}{.metadata.name} {.spec.replicas}{\"\\n\"}{end}'
  flotilla get events --for deployment/chat-small")]
pub struct GetArgs {
    /// deployments (deployment, deploy, md), clusters (cluster, cl),
    /// replicas (replica, rep), models (model, mo), rollouts (rollout, ro),
    /// events (event, ev).
    #[arg(value_enum, ignore_case = true)]
    pub kind: Kind,
    /// Only these; one name prints one object with `-o json|yaml`.
    pub names: Vec<String>,
    /// table, wide, json, yaml, name, or jsonpath=TEMPLATE.
    #[arg(short = 'o', long, default_value = "table", value_parser = Format::from_str)]
    pub output: Format,
    /// After the list, print each change as it happens, until Ctrl-C.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Label selector, e.g. `team=search,env!=dev,gpu,!spot` (deployments:
    /// metadata.labels; clusters: their inventory labels).
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Replicas only: those of this deployment.
    #[arg(long)]
    pub deployment: Option<String>,
    /// Events only: those about KIND/NAME (e.g. deployment/chat-small; a
    /// deployment's include its rollout's).
    #[arg(long = "for", value_name = "KIND/NAME")]
    pub about: Option<String>,
    /// Events only: from this long ago (`10m`) or this time; by default
    /// every stored event.
    #[arg(long)]
    pub since: Option<String>,
}

impl GetArgs {
    /// A plain `flotilla get KIND`: every one, as a table.
    pub fn of(kind: Kind) -> Self {
        Self {
            kind,
            names: Vec::new(),
            output: Format::Table,
            watch: false,
            selector: None,
            deployment: None,
            about: None,
            since: None,
        }
    }
}

/// One thing as every format shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Its JSON form, as `-o json` prints it and `apply -f` reads it back.
    pub doc: Value,
    pub row: Vec<String>,
    pub wide: Vec<String>,
}

fn headers(kind: Kind) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        Kind::Deployments => (
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
            &["PHASE", "RUNTIME", "LABELS"],
        ),
        Kind::Clusters => (
            &[
                "NAME",
                "REGION",
                "HEALTH",
                "GPUS FREE/TOTAL",
                "GPU TYPE",
                "COST/GPU-H",
                "CACHED MODELS",
                "LAST SEEN",
            ],
            &["REASON", "LABELS"],
        ),
        Kind::Replicas => (
            &[
                "REPLICA",
                "DEPLOYMENT",
                "CLUSTER",
                "PHASE",
                "GEN",
                "ENDPOINT",
                "UPDATED",
                "MESSAGE",
            ],
            &["MODEL", "RESTARTS", "GPUS"],
        ),
        Kind::Models => (
            &[
                "NAME",
                "PHASE",
                "FORMAT",
                "SIZE",
                "DIGEST",
                "CACHED ON",
                "SOURCE / REASON",
            ],
            &["ARCHITECTURE", "QUANTIZATION", "CONTEXT"],
        ),
        Kind::Rollouts => (
            &[
                "NAME", "PHASE", "STAGE", "GEN", "FAILURES", "UPDATED", "MESSAGE",
            ],
            &["TEMPLATE", "STAGES"],
        ),
        Kind::Events => (
            &["TIME", "SEVERITY", "TYPE", "NAME", "MESSAGE"],
            &["SOURCE", "CORRELATION"],
        ),
    }
}

fn dash(s: impl Into<String>) -> String {
    let s = s.into();
    if s.is_empty() { "-".into() } else { s }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    dash(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// A label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`,
/// `k notin (a,b)`, joined by commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    Absent(String),
}

impl FromStr for Selector {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        // Split on commas outside parentheses.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        let key = |k: &str| -> anyhow::Result<String> {
            let k = k.trim();
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                bail!("-l {s:?}: {k:?} is not a label key");
            }
            Ok(k.to_string())
        };
        let set = |v: &str| -> anyhow::Result<Vec<String>> {
            let v = v.trim();
            let inner = v
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .with_context(|| format!("-l {s:?}: {v:?} should be a set such as (a,b)"))?;
            Ok(inner.split(',').map(|x| x.trim().to_string()).collect())
        };
        let mut reqs = Vec::new();
        for part in parts {
            let p = part.trim();
            if p.is_empty() {
                bail!("-l {s:?}: an empty requirement (two commas?)");
            }
            let r = if let Some((k, v)) = p.split_once("!=") {
                Requirement::Ne(key(k)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Requirement::Eq(key(k)?, v.trim().to_string())
            } else if let Some((k, v)) = p.split_once(" notin ") {
                Requirement::NotIn(key(k)?, set(v)?)
            } else if let Some((k, v)) = p.split_once(" in ") {
                Requirement::In(key(k)?, set(v)?)
            } else if let Some(k) = p.strip_prefix('!') {
                Requirement::Absent(key(k)?)
            } else {
                Requirement::Exists(key(p)?)
            };
            reqs.push(r);
        }
        Ok(Self(reqs))
    }
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => labels.get(k) == Some(v),
            Requirement::Ne(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|x| !vs.contains(x)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

fn json_of<T: serde::Serialize>(x: &T) -> anyhow::Result<Value> {
    serde_json::to_value(x).context("writing JSON")
}

/// The deployment as a document `apply -f` takes back.
pub fn deployment_document(d: &ModelDeployment) -> ModelDeployment {
    let mut d = d.clone();
    if d.api_version.is_empty() {
        d.api_version = flotilla_proto::API_VERSION.into();
    }
    if d.kind.is_empty() {
        d.kind = "ModelDeployment".into();
    }
    d
}

fn deployment_items(
    deployments: &[ModelDeployment],
    placements: &[PlacementDecision],
    replicas: &[ReplicaStatus],
    now: i64,
) -> anyhow::Result<Vec<Item>> {
    let placement_of: BTreeMap<&str, &PlacementDecision> = placements
        .iter()
        .map(|p| (p.deployment.as_str(), p))
        .collect();
    let mut items = Vec::new();
    for d in deployments {
        let meta = d.metadata.clone().unwrap_or_default();
        let name = meta.name.clone();
        let status = d.status.clone().unwrap_or_default();
        let placement = placement_of.get(name.as_str());
        let (placed, clusters, outcome) = match placement {
            Some(p) => (
                p.assignments.iter().map(|a| a.replicas).sum::<u32>(),
                p.assignments
                    .iter()
                    .map(|a| format!("{}:{}", a.cluster, a.replicas))
                    .collect::<Vec<_>>()
                    .join(","),
                name_of::<PlacementOutcome>(p.outcome).to_string(),
            ),
            None => (0, String::new(), "Pending".into()),
        };
        let ready = replicas
            .iter()
            .filter(|r| r.deployment == name && r.phase() == ReplicaPhase::Ready)
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
        items.push(Item {
            row: vec![
                name.clone(),
                crate::deployments::model_of(d),
                format!("{ready}/{placed}/{desired}"),
                outcome,
                dash(clusters),
                status.generation.to_string(),
                table::ago(status.updated_at_unix_ms, now),
                autoscaling,
            ],
            wide: vec![
                dash(name_of::<v1::DeploymentPhase>(status.phase)),
                name_of::<v1::Runtime>(spec.runtime.max(1)).to_string(),
                labels_text(&meta.labels),
            ],
            doc: json_of(&deployment_document(d))?,
            labels: meta.labels,
            name,
        });
    }
    Ok(items)
}

fn cluster_items(clusters: &[ClusterRecord], now: i64) -> anyhow::Result<Vec<Item>> {
    clusters
        .iter()
        .map(|c| {
            let inv = c.inventory.clone().unwrap_or_default();
            let mut health = name_of::<ClusterHealth>(c.health).to_string();
            if c.cordoned {
                health.push_str(",Cordoned");
            }
            let total = inv.gpus.len();
            let free = inv.gpus.iter().filter(|g| !g.allocated).count();
            let mut types: Vec<String> = inv.gpus.iter().map(|g| g.model.clone()).collect();
            types.sort();
            types.dedup();
            let source = if inv.source() == v1::InventorySource::Declared {
                " (declared)"
            } else {
                ""
            };
            let models: Vec<_> = inv.cached_models.iter().map(|m| m.name.clone()).collect();
            let reason = match (&c.health_reason, &c.cordon_reason) {
                (h, r) if !r.is_empty() && !h.is_empty() => format!("{h}; cordoned: {r}"),
                (h, r) if !r.is_empty() => format!("{h}cordoned: {r}"),
                (h, _) => h.clone(),
            };
            Ok(Item {
                name: c.name.clone(),
                row: vec![
                    c.name.clone(),
                    dash(inv.labels.get("region").cloned().unwrap_or_default()),
                    health,
                    format!("{free}/{total}"),
                    if types.is_empty() {
                        "-".into()
                    } else {
                        format!("{}{source}", types.join(","))
                    },
                    format!("{:.2}", inv.cost_per_gpu_hour),
                    dash(models.join(",")),
                    table::ago(c.last_seen_unix_ms, now),
                ],
                wide: vec![dash(reason), labels_text(&inv.labels)],
                doc: json_of(c)?,
                labels: inv.labels,
            })
        })
        .collect()
}

fn replica_items(replicas: &[ReplicaStatus], now: i64) -> anyhow::Result<Vec<Item>> {
    let mut sorted: Vec<&ReplicaStatus> = replicas.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.deployment, &a.cluster, &a.replica_id).cmp(&(&b.deployment, &b.cluster, &b.replica_id))
    });
    sorted
        .into_iter()
        .map(|r| {
            Ok(Item {
                name: r.replica_id.clone(),
                labels: BTreeMap::new(),
                row: vec![
                    r.replica_id.clone(),
                    r.deployment.clone(),
                    r.cluster.clone(),
                    name_of::<ReplicaPhase>(r.phase).to_string(),
                    r.generation.to_string(),
                    dash(r.endpoint.clone()),
                    table::ago(r.updated_at_unix_ms, now),
                    r.message.clone(),
                ],
                wide: vec![
                    dash(r.model.clone()),
                    r.restarts.to_string(),
                    r.gpus.to_string(),
                ],
                doc: json_of(r)?,
            })
        })
        .collect()
}

fn model_items(models: &[ModelRecord], clusters: &[ClusterRecord]) -> anyhow::Result<Vec<Item>> {
    models
        .iter()
        .map(|m| {
            let on: Vec<String> = clusters
                .iter()
                .filter(|c| {
                    c.inventory.as_ref().is_some_and(|i| {
                        i.cached_models
                            .iter()
                            .any(|x| x.name == m.name && x.digest == m.digest)
                    })
                })
                .map(|c| c.name.clone())
                .collect();
            Ok(Item {
                name: m.name.clone(),
                labels: BTreeMap::new(),
                row: vec![
                    m.name.clone(),
                    name_of::<ModelPhase>(m.phase).to_string(),
                    dash(m.format.clone()),
                    if m.size_bytes == 0 {
                        "-".into()
                    } else {
                        format!("{:.1} MB", m.size_bytes as f64 / 1e6)
                    },
                    if m.digest.is_empty() {
                        "-".into()
                    } else {
                        m.digest.chars().take(19).collect::<String>() + "…"
                    },
                    dash(on.join(",")),
                    if m.phase() == ModelPhase::Failed {
                        m.message.clone()
                    } else {
                        m.source.clone()
                    },
                ],
                wide: vec![
                    dash(m.architecture.clone()),
                    dash(m.quantization.clone()),
                    m.context_length.to_string(),
                ],
                doc: json_of(m)?,
            })
        })
        .collect()
}

fn rollout_items(states: &[RolloutState], now: i64) -> anyhow::Result<Vec<Item>> {
    states
        .iter()
        .map(|s| {
            let stage = s
                .stages
                .get(s.current_stage as usize)
                .map_or("-".to_string(), |st| st.name.clone());
            Ok(Item {
                name: s.deployment.clone(),
                labels: BTreeMap::new(),
                row: vec![
                    s.deployment.clone(),
                    flotilla_rollout::phase_name(s.phase()).to_string(),
                    stage,
                    s.deployment_generation.to_string(),
                    s.failed_replicas.to_string(),
                    table::ago(s.updated_at_unix_ms, now),
                    s.message.clone(),
                ],
                wide: vec![
                    dash(s.template.clone()),
                    dash(
                        s.stages
                            .iter()
                            .map(|st| {
                                format!("{}:{}", st.name, name_of::<v1::StagePhase>(st.phase))
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                ],
                doc: json_of(s)?,
            })
        })
        .collect()
}

fn event_item(e: &v1::Event) -> anyhow::Result<Item> {
    let at =
        std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(e.time_unix_ms.max(0) as u64);
    Ok(Item {
        name: e.id.clone(),
        labels: BTreeMap::new(),
        row: vec![
            humantime::format_rfc3339_millis(at).to_string(),
            name_of::<v1::Severity>(e.severity).to_string(),
            e.r#type.clone(),
            e.name.clone(),
            e.message.clone(),
        ],
        wide: vec![dash(e.source.clone()), dash(e.correlation_id.clone())],
        doc: json_of(e)?,
    })
}

fn open_failed(what: &str) -> String {
    format!("the fleet has no {what} yet (is it provisioned? try `flotilla up`)")
}

/// Everything of a kind (but events) the fleet holds now.
async fn fetch(bus: &Bus, kind: Kind, args: &GetArgs) -> anyhow::Result<Vec<Item>> {
    let now = now_unix_ms();
    let t = &bus.topology;
    let items = match kind {
        Kind::Deployments => {
            let deployments = RecordStore::<ModelDeployment>::open(bus, &t.deployments.name)
                .await
                .context(open_failed("deployments bucket"))?
                .list()
                .await?;
            let placements = RecordStore::<PlacementDecision>::open(bus, &t.placements.name)
                .await?
                .list()
                .await?;
            let replicas = RecordStore::<ReplicaStatus>::open(bus, &t.replicas.name)
                .await?
                .list()
                .await?;
            deployment_items(&deployments, &placements, &replicas, now)?
        }
        Kind::Clusters => {
            let clusters = RecordStore::<ClusterRecord>::open(bus, &t.clusters.name)
                .await
                .context(open_failed("cluster inventory"))?
                .list()
                .await?;
            cluster_items(&clusters, now)?
        }
        Kind::Replicas => {
            let replicas: Vec<ReplicaStatus> =
                RecordStore::<ReplicaStatus>::open(bus, &t.replicas.name)
                    .await
                    .context(open_failed("replicas bucket"))?
                    .list()
                    .await?
                    .into_iter()
                    .filter(|r| args.deployment.as_ref().is_none_or(|d| &r.deployment == d))
                    .collect();
            replica_items(&replicas, now)?
        }
        Kind::Models => {
            let models = RecordStore::<ModelRecord>::open(bus, &t.models.name)
                .await
                .context(open_failed("models bucket"))?
                .list()
                .await?;
            let clusters = RecordStore::<ClusterRecord>::open(bus, &t.clusters.name)
                .await?
                .list()
                .await?;
            model_items(&models, &clusters)?
        }
        Kind::Rollouts => {
            let states = RecordStore::<RolloutState>::open(bus, &t.rollouts.name)
                .await
                .context(open_failed("rollouts bucket"))?
                .list()
                .await?;
            rollout_items(&states, now)?
        }
        Kind::Events => events(bus, args, None).await?,
    };
    Ok(items)
}

/// The subjects of the events `--for KIND/NAME` asks for.
fn event_filters(bus: &Bus, about: Option<&str>) -> anyhow::Result<Vec<String>> {
    use flotilla_proto::EventKind as E;
    let Some(about) = about else {
        return Ok(vec![bus.subjects.events_all()]);
    };
    let (kind, name) = about.split_once('/').with_context(|| {
        format!("--for {about:?} should be KIND/NAME, e.g. deployment/chat-small")
    })?;
    flotilla_proto::check_name("--for", name)?;
    let kinds: &[E] = match Kind::parse(kind) {
        Ok(Kind::Deployments) => &[E::Deployment, E::Rollout],
        Ok(Kind::Clusters) => &[E::Cluster],
        Ok(Kind::Replicas) => &[E::Replica],
        Ok(Kind::Models) => &[E::Model],
        Ok(Kind::Rollouts) => &[E::Rollout],
        Ok(Kind::Events) | Err(_) => bail!(
            "--for {about:?}: {kind:?} is not a kind events are about; use deployment, cluster, replica, model or rollout"
        ),
    };
    Ok(kinds
        .iter()
        .map(|k| bus.subjects.events_about(*k, name))
        .collect::<Result<_, _>>()?)
}

/// Where `get events -w` hands each new event, until the token stops it.
type Follow<'a> = (
    &'a mut dyn FnMut(Item) -> anyhow::Result<()>,
    CancellationToken,
);

/// Stored events (or, with `follow`, new ones as they come, each handed to
/// `follow` until it says stop).
async fn events(
    bus: &Bus,
    args: &GetArgs,
    follow: Option<Follow<'_>>,
) -> anyhow::Result<Vec<Item>> {
    let filter_subjects = event_filters(bus, args.about.as_deref())?;
    let no_stream = || open_failed("events stream");
    if let Some((print, stop)) = follow {
        let mut messages = Box::pin(
            events::follow(bus, filter_subjects, DeliverPolicy::New)
                .await
                .with_context(no_stream)?,
        );
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                next = messages.next() => next,
            };
            let Some(m) = next else { break };
            let m = m.map_err(|e| anyhow::anyhow!("reading events: {e}"))?;
            match m.event {
                Ok(event) => print(event_item(&event)?)?,
                Err(e) => eprintln!("skipping an unreadable event on {}: {e}", m.subject),
            }
        }
        return Ok(Vec::new());
    }
    let deliver_policy = match args.since.as_deref() {
        None => DeliverPolicy::All,
        since => crate::watch::start_of(since)?,
    };
    let stored = events::stored(bus, filter_subjects, deliver_policy, None)
        .await
        .with_context(no_stream)?;
    stored
        .into_iter()
        .filter_map(|m| m.event.ok())
        .map(|event| event_item(&event))
        .collect()
}

/// Keeps what the names and the selector ask for; a name asked for and not
/// found is an error, as in kubectl.
fn choose(
    kind: Kind,
    items: Vec<Item>,
    names: &[String],
    selector: Option<&Selector>,
) -> anyhow::Result<Vec<Item>> {
    let mut chosen: Vec<Item> = items
        .into_iter()
        .filter(|i| selector.is_none_or(|s| s.matches(&i.labels)))
        .collect();
    if !names.is_empty() {
        let mut by_name = Vec::new();
        for n in names {
            match chosen.iter().find(|i| &i.name == n) {
                Some(i) => by_name.push(i.clone()),
                None => bail!(
                    "{} {n:?} not found (`flotilla get {}` lists them)",
                    kind.singular(),
                    kind.plural()
                ),
            }
        }
        chosen = by_name;
    }
    Ok(chosen)
}

/// The JSON `-o json|yaml|jsonpath` print: one object for one name asked
/// for, a `List` otherwise.
fn document(items: &[Item], single: bool) -> Value {
    match items {
        [one] if single => one.doc.clone(),
        _ => json!({
            "apiVersion": flotilla_proto::API_VERSION,
            "kind": "List",
            "items": items.iter().map(|i| i.doc.clone()).collect::<Vec<_>>(),
        }),
    }
}

pub fn render(kind: Kind, items: &[Item], format: &Format, single: bool) -> anyhow::Result<String> {
    let (head, wide_head) = headers(kind);
    Ok(match format {
        Format::Table | Format::Wide => {
            let wide = *format == Format::Wide;
            let mut cols: Vec<&str> = head.to_vec();
            if wide {
                cols.extend(wide_head);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|i| {
                    let mut r = i.row.clone();
                    if wide {
                        r.extend(i.wide.iter().cloned());
                    }
                    r
                })
                .collect();
            table::render(&cols, &rows)
        }
        Format::Json => serde_json::to_string_pretty(&document(items, single))? + "\n",
        Format::Yaml => serde_yaml::to_string(&document(items, single))?,
        Format::Name => items
            .iter()
            .map(|i| format!("{}/{}\n", kind.singular(), i.name))
            .collect(),
        Format::JsonPath(t) => t.render(&document(items, single)),
    })
}

/// One change while watching, in the chosen format: a row without the
/// header, a whole object, or a name.
fn render_change(kind: Kind, item: &Item, format: &Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Table | Format::Wide => {
            let full = render(kind, std::slice::from_ref(item), format, true)?;
            full.lines().skip(1).map(|l| format!("{l}\n")).collect()
        }
        Format::Json => serde_json::to_string(&item.doc)? + "\n",
        Format::Yaml => format!("---\n{}", serde_yaml::to_string(&item.doc)?),
        other => render(kind, std::slice::from_ref(item), other, true)?,
    })
}

/// The buckets whose changes can change a kind's rows.
fn watched_buckets(bus: &Bus, kind: Kind) -> Vec<String> {
    let t = &bus.topology;
    match kind {
        Kind::Deployments => vec![
            t.deployments.name.clone(),
            t.placements.name.clone(),
            t.replicas.name.clone(),
        ],
        Kind::Clusters => vec![t.clusters.name.clone()],
        Kind::Replicas => vec![t.replicas.name.clone()],
        Kind::Models => vec![t.models.name.clone(), t.clusters.name.clone()],
        Kind::Rollouts => vec![t.rollouts.name.clone()],
        Kind::Events => Vec::new(),
    }
}

pub async fn get(
    bus: &Bus,
    args: &GetArgs,
    out: &mut (impl Write + Send),
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let selector = args
        .selector
        .as_deref()
        .map(Selector::from_str)
        .transpose()?;
    if selector.is_some() && !matches!(args.kind, Kind::Deployments | Kind::Clusters) {
        bail!(
            "{} have no labels; -l works on deployments and clusters{}",
            args.kind.plural(),
            if args.kind == Kind::Replicas {
                " (for a deployment's replicas use --deployment NAME)"
            } else {
                ""
            }
        );
    }
    if args.deployment.is_some() && args.kind != Kind::Replicas {
        bail!("--deployment is for `get replicas`");
    }
    if (args.about.is_some() || args.since.is_some()) && args.kind != Kind::Events {
        bail!("--for and --since are for `get events`");
    }
    let single = args.names.len() == 1;
    let items = choose(
        args.kind,
        fetch(bus, args.kind, args).await?,
        &args.names,
        selector.as_ref(),
    )?;
    let text = render(args.kind, &items, &args.output, single)?;
    write!(out, "{text}")?;
    if items.is_empty() && matches!(args.output, Format::Table | Format::Wide) && !args.watch {
        writeln!(out, "(no {})", args.kind.plural())?;
    }
    out.flush()?;
    if !args.watch {
        return Ok(());
    }
    if args.kind == Kind::Events {
        let mut print = |item: Item| -> anyhow::Result<()> {
            if selector.is_none() {
                write!(out, "{}", render_change(args.kind, &item, &args.output)?)?;
                out.flush()?;
            }
            Ok(())
        };
        events(bus, args, Some((&mut print, stop))).await?;
        return Ok(());
    }
    // Watch the buckets behind the rows; after each change, list again and
    // print what differs from what was printed last.
    let mut changes = Vec::new();
    for bucket in watched_buckets(bus, args.kind) {
        let kv = bus
            .jetstream
            .get_key_value(&bucket)
            .await
            .with_context(|| open_failed(&format!("bucket {bucket}")))?;
        changes.push(kv.watch_all().await?);
    }
    let mut changes = futures::stream::select_all(changes);
    let mut shown: BTreeMap<String, Item> =
        items.into_iter().map(|i| (i.name.clone(), i)).collect();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            change = changes.next() => match change {
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("watching the fleet: {e}"),
                None => bail!("lost the connection to NATS"),
            },
        }
        let now: Vec<Item> = fetch(bus, args.kind, args)
            .await?
            .into_iter()
            .filter(|i| selector.as_ref().is_none_or(|s| s.matches(&i.labels)))
            .filter(|i| args.names.is_empty() || args.names.contains(&i.name))
            .collect();
        for item in &now {
            // Times ("3s ago") change on every listing; a row is news when
            // the object is.
            if shown.get(&item.name).is_none_or(|old| old.doc != item.doc) {
                write!(out, "{}", render_change(args.kind, item, &args.output)?)?;
                shown.insert(item.name.clone(), item.clone());
            }
        }
        let gone: Vec<String> = shown
            .keys()
            .filter(|n| !now.iter().any(|i| &i.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if matches!(args.output, Format::Table | Format::Wide | Format::Name) {
                writeln!(out, "{}/{name} deleted", args.kind.singular())?;
            }
            shown.remove(&name);
        }
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_as_kubectls_do() {
        let eu = labels(&[("region", "eu-west"), ("env", "prod"), ("gpu", "h100")]);
        let us = labels(&[("region", "us-east"), ("env", "dev")]);
        for (sel, on_eu, on_us) in [
            ("region=eu-west", true, false),
            ("region==eu-west", true, false),
            ("env!=dev", true, false),
            ("gpu", true, false),
            ("!gpu", false, true),
            ("region in (eu-west, us-east),env", true, true),
            ("region notin (us-east)", true, false),
            ("env=prod,region=us-east", false, false),
        ] {
            let s: Selector = sel.parse().unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&eu), on_eu, "{sel} on eu");
            assert_eq!(s.matches(&us), on_us, "{sel} on us");
        }
        for bad in ["", "a,,b", "region in eu", "a b=c"] {
            assert!(
                bad.parse::<Selector>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn kinds_answer_to_singular_plural_and_short_names() {
        for (name, kind) in [
            ("deploy", Kind::Deployments),
            ("md", Kind::Deployments),
            ("Deployment", Kind::Deployments),
            ("cl", Kind::Clusters),
            ("replica", Kind::Replicas),
            ("mo", Kind::Models),
            ("ro", Kind::Rollouts),
            ("ev", Kind::Events),
        ] {
            assert_eq!(Kind::parse(name).unwrap(), kind, "{name}");
        }
        let e = Kind::parse("pods").unwrap_err().to_string();
        assert!(e.contains("deployments (deploy, md)"), "{e}");
    }

    #[test]
    fn output_formats_parse_and_a_bad_one_lists_the_good_ones() {
        assert_eq!("yaml".parse::<Format>().unwrap(), Format::Yaml);
        assert!(matches!(
            "jsonpath='{.items[0]}'".parse::<Format>().unwrap(),
            Format::JsonPath(_)
        ));
        let e = "xml".parse::<Format>().unwrap_err();
        assert!(
            e.contains("table, wide, json, yaml, name or jsonpath"),
            "{e}"
        );
        assert!("jsonpath={.a".parse::<Format>().is_err());
    }

    fn deployment(name: &str, replicas: i32, team: &str) -> ModelDeployment {
        ModelDeployment {
            metadata: Some(v1::ObjectMeta {
                name: name.into(),
                labels: labels(&[("team", team)]),
                ..Default::default()
            }),
            spec: Some(v1::ModelDeploymentSpec {
                model: Some(v1::ModelSource {
                    preset: "smollm2-135m-instruct".into(),
                    ..Default::default()
                }),
                replicas,
                ..Default::default()
            }),
            status: Some(v1::ModelDeploymentStatus {
                generation: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn every_format_of_deployments() {
        let items = deployment_items(
            &[deployment("a", 2, "search"), deployment("b", 1, "ads")],
            &[],
            &[],
            0,
        )
        .unwrap();
        let chosen = choose(
            Kind::Deployments,
            items.clone(),
            &[],
            Some(&"team=ads".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(chosen.len(), 1);
        assert_eq!(
            render(Kind::Deployments, &chosen, &Format::Name, false).unwrap(),
            "deployment/b\n"
        );
        let table = render(Kind::Deployments, &items, &Format::Table, false).unwrap();
        assert!(table.starts_with("NAME"), "{table}");
        assert!(table.contains("0/0/2"), "{table}");
        let wide = render(Kind::Deployments, &items, &Format::Wide, false).unwrap();
        assert!(
            wide.contains("team=search") && wide.contains("LABELS"),
            "{wide}"
        );
        let jp = Format::from_str("jsonpath={.items[*].spec.replicas}").unwrap();
        assert_eq!(
            render(Kind::Deployments, &items, &jp, false).unwrap(),
            "2 1"
        );

        // One name: the object itself, and it reads back as the same document.
        let one = choose(Kind::Deployments, items.clone(), &["a".into()], None).unwrap();
        let yaml = render(Kind::Deployments, &one, &Format::Yaml, true).unwrap();
        assert!(yaml.contains("kind: ModelDeployment"), "{yaml}");
        let back = crate::deployments::parse_documents(&yaml).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].spec, deployment("a", 2, "search").spec);
        assert_eq!(back[0].metadata, deployment("a", 2, "search").metadata);
        // Several: a List, which apply takes back too.
        let list = render(Kind::Deployments, &items, &Format::Yaml, false).unwrap();
        assert!(list.contains("kind: List"), "{list}");
        assert_eq!(crate::deployments::parse_documents(&list).unwrap().len(), 2);
        let json = render(Kind::Deployments, &items, &Format::Json, false).unwrap();
        assert_eq!(crate::deployments::parse_documents(&json).unwrap().len(), 2);

        let e = choose(Kind::Deployments, items, &["zzz".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("deployment \"zzz\" not found"), "{e}");
    }
}
