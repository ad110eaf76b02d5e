//! Subject builders. Every subject a service publishes or subscribes to is
//! made here, from a prefix (`flotilla` by default) and validated names.

use std::fmt;

/// A name that cannot be one token of a subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} is not a valid name: {why}")]
pub struct InvalidName {
    pub what: &'static str,
    pub name: String,
    pub why: &'static str,
}

/// Checks that `name` is a DNS label (RFC 1123): 1–63 characters of
/// lowercase letters, digits and `-`, starting and ending alphanumeric.
/// Cluster, deployment, replica and service names all follow it, so each is
/// exactly one subject token and one KV key segment.
pub fn check_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let bad = |why| {
        Err(InvalidName {
            what,
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 63 {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only lowercase letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it must start and end with a letter or digit");
    }
    Ok(())
}

/// Requests from users, on `<prefix>.control.<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlSubject {
    DeploymentApply,
    DeploymentDelete,
    RolloutApprove,
    RolloutUndo,
    ClusterCordon,
    ModelRegister,
}

impl ControlSubject {
    pub const ALL: [ControlSubject; 6] = [
        Self::DeploymentApply,
        Self::DeploymentDelete,
        Self::RolloutApprove,
        Self::RolloutUndo,
        Self::ClusterCordon,
        Self::ModelRegister,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::DeploymentApply => "deployments.apply",
            Self::DeploymentDelete => "deployments.delete",
            Self::RolloutApprove => "rollouts.approve",
            Self::RolloutUndo => "rollouts.undo",
            Self::ClusterCordon => "clusters.cordon",
            Self::ModelRegister => "models.register",
        }
    }
}

/// What a command asks an executor to do, the last token of
/// `<prefix>.cmd.<cluster>.<action>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandAction {
    Start,
    Stop,
    Prefetch,
}

impl CommandAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Prefetch => "prefetch",
        }
    }
}

/// The `<kind>` token of an event subject; each kind has one publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Cluster,
    Deployment,
    Rollout,
    Replica,
    Model,
    /// Events about the bus itself: refused messages, dead letters, drift.
    Bus,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        Self::Cluster,
        Self::Deployment,
        Self::Rollout,
        Self::Replica,
        Self::Model,
        Self::Bus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "cluster",
            Self::Deployment => "deployment",
            Self::Rollout => "rollout",
            Self::Replica => "replica",
            Self::Model => "model",
            Self::Bus => "bus",
        }
    }
}

macro_rules! event_types {
    ($($variant:ident => $kind:ident . $what:literal : $doc:literal),+ $(,)?) => {
        /// Every event Flotilla publishes, as `<kind>.<what>`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType { $(#[doc = $doc] $variant),+ }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(Self::$variant),+];

            pub fn kind(self) -> EventKind {
                match self { $(Self::$variant => EventKind::$kind),+ }
            }

            /// The last subject token, e.g. `joined`.
            pub fn what(self) -> &'static str {
                match self { $(Self::$variant => $what),+ }
            }

            /// One line saying when it is published.
            pub fn doc(self) -> &'static str {
                match self { $(Self::$variant => $doc),+ }
            }
        }
    };
}

event_types! {
    ClusterJoined => Cluster."joined": "first heartbeat of a cluster",
    ClusterHealthy => Cluster."healthy": "heartbeats resumed, or errors cleared",
    ClusterDegraded => Cluster."degraded": "NVML reports XID/ECC errors or a GPU disappeared",
    ClusterUnhealthy => Cluster."unhealthy": "no heartbeat within unhealthy-after",
    ClusterLeft => Cluster."left": "no heartbeat within left-after",
    ClusterRestarting => Cluster."restarting": "the executor exits for a planned restart; its replicas keep serving and its silence is not a failure within the announced grace",
    ClusterCordoned => Cluster."cordoned": "a user cordoned the cluster",
    ClusterUncordoned => Cluster."uncordoned": "a user uncordoned the cluster",
    ClusterHeartbeatRejected => Cluster."heartbeat_rejected": "a heartbeat failed validation; KV untouched",
    DeploymentAccepted => Deployment."accepted": "a valid deployment was applied",
    DeploymentRejected => Deployment."rejected": "an applied deployment is invalid: which field and why",
    DeploymentPlaced => Deployment."placed": "a new placement generation",
    DeploymentUnschedulable => Deployment."unschedulable": "no cluster fits; per-cluster reasons",
    DeploymentRebalanced => Deployment."rebalanced": "a placement changed because the fleet changed",
    DeploymentDeleted => Deployment."deleted": "a deployment was deleted",
    DeploymentScaled => Deployment."scaled": "the autoscaler changed a deployment's replica count, with the numbers that drove it",
    RolloutStarted => Rollout."started": "a new placement generation is being rolled out",
    RolloutStageStarted => Rollout."stage_started": "a stage began",
    RolloutStageCompleted => Rollout."stage_completed": "a stage's replicas are ready",
    RolloutAwaitingApproval => Rollout."awaiting_approval": "a stage gate needs `flotilla rollout approve`",
    RolloutApproved => Rollout."approved": "a stage gate was approved",
    RolloutHalted => Rollout."halted": "failures passed the threshold",
    RolloutCompleted => Rollout."completed": "every stage is done",
    RolloutUndone => Rollout."undone": "returned to the previous generation",
    ReplicaStarting => Replica."starting": "an executor is starting a replica",
    ReplicaReady => Replica."ready": "a replica passes its health probe",
    ReplicaFailed => Replica."failed": "a replica failed to start or stopped answering",
    ReplicaDraining => Replica."draining": "a replica leaving (scaled down, replaced, deleted) is out of routing and finishing the requests it serves before it stops",
    ReplicaStopped => Replica."stopped": "a replica was stopped",
    ReplicaProgress => Replica."progress": "a starting replica moved on or is held up (scheduled, pulling its image, unschedulable), in Kubernetes' own words",
    ReplicaDrifted => Replica."drifted": "a replica's objects in its cluster were changed or deleted by hand; restored or left per the deployment's drift policy",
    ModelProvisioning => Model."provisioning": "a model is being resolved and stored",
    ModelReady => Model."ready": "a model's artifacts are stored and digest-checked",
    ModelFailed => Model."failed": "a model could not be provisioned, with the reason",
    ModelFetched => Model."fetched": "an executor has the model in its cache, digest checked",
    ModelFetchFailed => Model."fetch_failed": "an executor refused a download (digest mismatch) or could not fetch it",
    BusMessageRejected => Bus."message_rejected": "a consumer refused an undecodable or invalid message; not redelivered",
    BusDeadLettered => Bus."dead_lettered": "a handler failed on a message too often; the message is carried whole",
    BusTopologyDrifted => Bus."topology_drifted": "a stream or bucket on the server differs from the contracts",
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.kind().as_str(), self.what())
    }
}

/// Builds every subject from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: crate::DEFAULT_PREFIX.to_string(),
        }
    }
}

impl Subjects {
    /// A prefix is one subject token following the same rule as names, so
    /// stream and bucket names derived from it are valid too.
    pub fn new(prefix: &str) -> Result<Self, InvalidName> {
        check_name("subject prefix", prefix)?;
        Ok(Self {
            prefix: prefix.to_string(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn control(&self, which: ControlSubject) -> String {
        format!("{}.control.{}", self.prefix, which.suffix())
    }

    /// `<prefix>.control.>`
    pub fn control_all(&self) -> String {
        format!("{}.control.>", self.prefix)
    }

    /// `<prefix>.preview.deployments`: a core NATS request (not a stream)
    /// carrying a `ModelDeployment`; placement answers with the event an
    /// apply would cause (`deployment.placed`, `deployment.unschedulable` or
    /// `deployment.rejected`, with the placement or the error) and stores
    /// nothing. `flotilla apply --dry-run=server` asks it.
    pub fn preview_deployments(&self) -> String {
        format!("{}.preview.deployments", self.prefix)
    }

    /// `<prefix>.logs.<cluster>`: a request for a replica's last log lines
    /// (`ReplicaLogsRequest`), answered by that cluster's executor with
    /// `ReplicaLogs`.
    pub fn replica_logs(&self, cluster: &str) -> Result<String, InvalidName> {
        check_name("cluster", cluster)?;
        Ok(format!("{}.logs.{}", self.prefix, cluster))
    }

    /// `<prefix>.events.<kind>.<name>.<what>`. Bus events name the consumer
    /// or the stream.
    pub fn event(&self, ty: EventType, name: &str) -> Result<String, InvalidName> {
        check_token("event name", name)?;
        Ok(format!(
            "{}.events.{}.{}.{}",
            self.prefix,
            ty.kind().as_str(),
            name,
            ty.what()
        ))
    }

    /// Every event of one type, whatever it is about.
    pub fn events_of_type(&self, ty: EventType) -> String {
        format!(
            "{}.events.{}.*.{}",
            self.prefix,
            ty.kind().as_str(),
            ty.what()
        )
    }

    /// Every event about one thing, e.g. one deployment.
    pub fn events_about(&self, kind: EventKind, name: &str) -> Result<String, InvalidName> {
        check_token("event name", name)?;
        Ok(format!(
            "{}.events.{}.{}.*",
            self.prefix,
            kind.as_str(),
            name
        ))
    }

    /// The events of one kind (any when `None`) about one name (any when
    /// `None`): what `flotilla watch --kind --name` and the gRPC API's
    /// event reads filter on.
    pub fn events_matching(
        &self,
        kind: Option<EventKind>,
        name: Option<&str>,
    ) -> Result<String, InvalidName> {
        if let Some(name) = name {
            check_token("event name", name)?;
        }
        Ok(format!(
            "{}.events.{}.{}.*",
            self.prefix,
            kind.map_or("*", EventKind::as_str),
            name.unwrap_or("*")
        ))
    }

    /// `<prefix>.events.>`
    pub fn events_all(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    /// `<prefix>.cmd.<cluster>.<action>`
    pub fn command(&self, cluster: &str, action: CommandAction) -> Result<String, InvalidName> {
        check_name("cluster", cluster)?;
        Ok(format!(
            "{}.cmd.{}.{}",
            self.prefix,
            cluster,
            action.as_str()
        ))
    }

    /// Every command for one cluster: what its executor consumes.
    pub fn commands_for(&self, cluster: &str) -> Result<String, InvalidName> {
        check_name("cluster", cluster)?;
        Ok(format!("{}.cmd.{}.>", self.prefix, cluster))
    }

    pub fn commands_all(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    /// `<prefix>.telemetry.<cluster>`
    pub fn telemetry(&self, cluster: &str) -> Result<String, InvalidName> {
        check_name("cluster", cluster)?;
        Ok(format!("{}.telemetry.{}", self.prefix, cluster))
    }

    /// Where gateway instance `gateway` publishes its traffic summaries.
    pub fn traffic(&self, gateway: &str) -> Result<String, InvalidName> {
        check_name("gateway id", gateway)?;
        Ok(format!("{}.traffic.{}", self.prefix, gateway))
    }

    pub fn traffic_all(&self) -> String {
        format!("{}.traffic.*", self.prefix)
    }

    pub fn telemetry_all(&self) -> String {
        format!("{}.telemetry.*", self.prefix)
    }

    /// The cluster a telemetry subject is about, if it is one.
    pub fn cluster_of_telemetry<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".telemetry.")
            .filter(|c| !c.is_empty() && !c.contains('.'))
    }
}

/// The subject token for a model name: model names may carry dots
/// (`qwen2.5-7b-instruct`), which would split a subject.
pub fn model_token(name: &str) -> String {
    name.replace('.', "_")
}

/// A subject token that is not necessarily a DNS label (consumer names may
/// carry `_`), but never splits or wildcards a subject.
fn check_token(what: &'static str, token: &str) -> Result<(), InvalidName> {
    let bad = |why| {
        Err(InvalidName {
            what,
            name: token.to_string(),
            why,
        })
    };
    if token.is_empty() {
        return bad("it is empty");
    }
    if token.len() > 128 {
        return bad("it is longer than 128 characters");
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return bad("only letters, digits, '-' and '_' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "eu-west-1", "h100x8", "a1-b2"] {
            assert!(check_name("cluster", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "A",
            "a.b",
            "a*",
            "a>",
            "-a",
            "a-",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(check_name("cluster", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subjects_use_the_prefix() {
        let s = Subjects::new("acme").unwrap();
        assert_eq!(
            s.control(ControlSubject::DeploymentApply),
            "acme.control.deployments.apply"
        );
        assert_eq!(
            s.event(EventType::ClusterJoined, "eu-1").unwrap(),
            "acme.events.cluster.eu-1.joined"
        );
        assert_eq!(
            s.command("eu-1", CommandAction::Start).unwrap(),
            "acme.cmd.eu-1.start"
        );
        assert_eq!(s.telemetry("eu-1").unwrap(), "acme.telemetry.eu-1");
        assert_eq!(s.cluster_of_telemetry("acme.telemetry.eu-1"), Some("eu-1"));
        assert_eq!(s.cluster_of_telemetry("acme.telemetry.eu-1.x"), None);
        assert_eq!(s.cluster_of_telemetry("other.telemetry.eu-1"), None);
    }

    #[test]
    fn names_cannot_break_subjects() {
        let s = Subjects::default();
        assert!(s.event(EventType::DeploymentPlaced, "a.b").is_err());
        assert!(s.event(EventType::DeploymentPlaced, "*").is_err());
        assert!(s.command(">", CommandAction::Stop).is_err());
        assert!(Subjects::new("flo.tilla").is_err());
    }

    #[test]
    fn event_types_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for ty in EventType::ALL {
            assert!(seen.insert(ty.to_string()), "{ty} twice");
        }
    }
}
