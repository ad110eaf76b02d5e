//! Who may publish and subscribe what, derived from the contracts crate:
//! subjects from [`Subjects`], stream and bucket names from [`Topology`],
//! bucket writers from [`flotilla_proto::BucketDef::writer`] and event
//! publishers from [`catalog::event_publisher`]. A renamed subject, stream
//! or bucket changes the permissions with it.

use flotilla_proto::catalog::event_publisher;
use flotilla_proto::{CommandAction, EventKind, EventType, Subjects, Topology};

use crate::AuthError;

/// One identity on the NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Inventory,
    Placement,
    Rollout,
    ModelProvisioner,
    Gateway,
    /// The gRPC control API: applies and deletes deployments through
    /// placement, like the command line, and reads records and events.
    ControlApi,
    /// The executor of one cluster.
    Executor {
        cluster: String,
    },
    /// The operator: the `flotilla` command line, `flotilla model push`,
    /// `nats` tooling. Everything.
    Admin,
}

impl Role {
    /// The control services of a hub, in the order their users are written.
    pub const CONTROL: [Role; 6] = [
        Role::Inventory,
        Role::Placement,
        Role::Rollout,
        Role::ModelProvisioner,
        Role::Gateway,
        Role::ControlApi,
    ];

    /// The executor of `cluster`; the name must be a valid cluster name.
    pub fn executor(cluster: &str) -> Result<Self, AuthError> {
        flotilla_proto::check_name("cluster", cluster)
            .map_err(|e| AuthError::Cluster(cluster.to_string(), e))?;
        Ok(Role::Executor {
            cluster: cluster.to_string(),
        })
    }

    /// The service name as the contracts spell it (`model-provisioner`).
    pub fn service(&self) -> &'static str {
        match self {
            Role::Inventory => "inventory",
            Role::Placement => "placement",
            Role::Rollout => "rollout",
            Role::ModelProvisioner => "model-provisioner",
            Role::Gateway => "gateway",
            Role::ControlApi => "control-api",
            Role::Executor { .. } => "executor",
            Role::Admin => "admin",
        }
    }

    /// The NATS user name: the service, or `executor-<cluster>`.
    pub fn user(&self) -> String {
        match self {
            Role::Executor { cluster } => format!("executor-{cluster}"),
            other => other.service().to_string(),
        }
    }

    /// Reply inboxes of this user: `_INBOX.<user>`, what the kit uses by
    /// default with `--nats-user`. Nobody else may subscribe there, so no
    /// one reads another's JetStream replies or pulled messages.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX.{}", self.user())
    }
}

/// The durable consumers the executor of `cluster` opens on the command
/// stream (see `services/executor`: `replicas` and `models`). Its
/// permissions name them one by one, since a NATS wildcard is a whole token.
pub fn executor_consumers(cluster: &str) -> [String; 2] {
    [
        format!("executor-{cluster}-replicas"),
        format!("executor-{cluster}-prefetch"),
    ]
}

/// Allowed subjects; everything else is refused with a permissions
/// violation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer the core NATS requests it receives (nats-server's
    /// `allow_responses`), on whatever reply subject they name.
    pub allow_responses: bool,
}

impl Permissions {
    fn publish(&mut self, subject: impl Into<String>) {
        let s = subject.into();
        if !self.publish.contains(&s) {
            self.publish.push(s);
        }
    }
}

const API: &str = "$JS.API";

/// The permissions of `role` on a fleet with these subjects and topology.
pub fn permissions(role: &Role, subjects: &Subjects, topology: &Topology) -> Permissions {
    let mut p = Permissions::default();
    if *role == Role::Admin {
        p.publish.push(">".into());
        p.subscribe.push(">".into());
        return p;
    }
    p.subscribe.push(format!("{}.>", role.inbox_prefix()));
    p.publish(format!("{API}.INFO"));
    // Every service checks the topology at start (`kit::provision`).
    for stream in all_stream_names(topology) {
        p.publish(format!("{API}.STREAM.INFO.{stream}"));
    }
    match role {
        Role::Executor { cluster } => executor(&mut p, cluster, subjects, topology),
        _ => control_service(&mut p, role, subjects, topology),
    }
    p
}

fn all_stream_names(topology: &Topology) -> Vec<String> {
    let mut names: Vec<String> = topology.streams().iter().map(|s| s.name.clone()).collect();
    names.extend(topology.buckets().iter().map(|b| kv_stream(&b.name)));
    names.extend(
        topology
            .object_stores()
            .iter()
            .map(|o| object_stream(&o.name)),
    );
    names
}

fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

fn object_stream(store: &str) -> String {
    format!("OBJ_{store}")
}

/// Reading a whole stream: consumers of any filter (durable or ordered),
/// direct and message gets, acks and flow control.
fn read_stream(p: &mut Permissions, stream: &str) {
    // An ordered consumer (KV watch, object read) is first created without
    // a name, on the bare subject.
    p.publish(format!("{API}.CONSUMER.CREATE.{stream}"));
    for op in ["CREATE", "INFO", "DELETE", "MSG.NEXT"] {
        p.publish(format!("{API}.CONSUMER.{op}.{stream}.>"));
    }
    p.publish(format!("{API}.DIRECT.GET.{stream}"));
    p.publish(format!("{API}.DIRECT.GET.{stream}.>"));
    p.publish(format!("{API}.STREAM.MSG.GET.{stream}"));
    p.publish(format!("$JS.ACK.{stream}.>"));
    p.publish(format!("$JS.FC.{stream}.>"));
}

fn control_service(p: &mut Permissions, role: &Role, subjects: &Subjects, topology: &Topology) {
    let service = role.service();
    // Control services are trusted to create the topology when it is
    // missing; executors are not (they only check it).
    for stream in all_stream_names(topology) {
        p.publish(format!("{API}.STREAM.CREATE.{stream}"));
    }
    // Observers of everything but the executors' command queues.
    for stream in all_stream_names(topology) {
        if stream != topology.commands.name {
            read_stream(p, &stream);
        }
    }
    for ty in EventType::ALL {
        if event_publisher(*ty) == service || ty.kind() == EventKind::Bus {
            p.publish(subjects.events_of_type(*ty));
        }
    }
    for bucket in topology.buckets() {
        if bucket.writer == service {
            p.publish(format!("$KV.{}.>", bucket.name));
        }
    }
    // Every consumer records what it finished.
    p.publish(format!("$KV.{}.>", topology.handled.name));
    for store in topology.object_stores() {
        if store.writer == service {
            p.publish(format!("$O.{}.>", store.name));
            let stream = object_stream(&store.name);
            p.publish(format!("{API}.STREAM.PURGE.{stream}"));
            p.publish(format!("{API}.STREAM.MSG.DELETE.{stream}"));
        }
    }
    if *role == Role::Rollout {
        p.publish(subjects.commands_all());
        // `rollout undo` re-applies the previous spec through placement.
        p.publish(subjects.control(flotilla_proto::ControlSubject::DeploymentApply));
    }
    if *role == Role::Placement {
        p.subscribe.push(subjects.preview_deployments());
        p.allow_responses = true;
    }
    if *role == Role::Gateway {
        // Its traffic summaries, under any instance id.
        p.publish(subjects.traffic_all());
    }
    if *role == Role::ControlApi {
        // It waits for placement's answer on a plain subscription to the
        // events (readable through the stream anyway).
        p.subscribe.push(subjects.events_all());
        for c in [
            flotilla_proto::ControlSubject::DeploymentApply,
            flotilla_proto::ControlSubject::DeploymentDelete,
            flotilla_proto::ControlSubject::RolloutApprove,
            flotilla_proto::ControlSubject::RolloutUndo,
            flotilla_proto::ControlSubject::ClusterCordon,
        ] {
            p.publish(subjects.control(c));
        }
        p.publish(subjects.preview_deployments());
        // Log tails, from the executor of any cluster.
        p.publish(format!("{}.logs.*", subjects.prefix()));
    }
}

fn executor(p: &mut Permissions, cluster: &str, subjects: &Subjects, topology: &Topology) {
    // Names are checked by Role::executor, so these cannot fail; a name
    // that did would get no permission rather than a wrong one.
    let Ok(telemetry) = subjects.telemetry(cluster) else {
        return;
    };
    p.publish(telemetry);
    // It answers requests for its replicas' logs, and only its own.
    if let Ok(logs) = subjects.replica_logs(cluster) {
        p.subscribe.push(logs);
        p.allow_responses = true;
    }
    p.publish(format!("$KV.{}.{cluster}.>", topology.replicas.name));
    let commands = &topology.commands.name;
    let [replicas_consumer, prefetch_consumer] = executor_consumers(cluster);
    // Its own command consumers only. The prefetch consumer has one filter,
    // which nats-server checks against the create subject, so it can only
    // ever select this cluster's subject. The replicas consumer selects two
    // subjects (start, stop); NATS cannot restrict a multi-filter create
    // (nats-server#6180), so it is allowed by name only: see
    // docs/security.md for what that leaves open.
    if let Ok(prefetch) = subjects.command(cluster, CommandAction::Prefetch) {
        p.publish(format!(
            "{API}.CONSUMER.CREATE.{commands}.{prefetch_consumer}.{prefetch}"
        ));
    }
    p.publish(format!(
        "{API}.CONSUMER.CREATE.{commands}.{replicas_consumer}"
    ));
    for consumer in [&replicas_consumer, &prefetch_consumer] {
        p.publish(format!("{API}.CONSUMER.INFO.{commands}.{consumer}"));
        p.publish(format!("{API}.CONSUMER.MSG.NEXT.{commands}.{consumer}"));
        p.publish(format!("$JS.ACK.{commands}.{consumer}.>"));
        p.publish(format!(
            "$KV.{}.{commands}.{consumer}.*",
            topology.handled.name
        ));
        for ty in [EventType::BusMessageRejected, EventType::BusDeadLettered] {
            if let Ok(s) = subjects.event(ty, consumer) {
                p.publish(s);
            }
        }
    }
    p.publish(subjects.events_of_type(EventType::BusTopologyDrifted));
    for ty in EventType::ALL {
        if event_publisher(*ty) == "executor" {
            p.publish(subjects.events_of_type(*ty));
        }
    }
    // What it reads: model records, replica records (its own are its
    // state; the others are public), which messages it finished, and model
    // artifacts.
    for stream in [
        kv_stream(&topology.models.name),
        kv_stream(&topology.replicas.name),
        kv_stream(&topology.handled.name),
        object_stream(&topology.model_artifacts.name),
    ] {
        read_stream(p, &stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> (Subjects, Topology) {
        let s = Subjects::default();
        let t = Topology::new(&s, 1);
        (s, t)
    }

    /// A NATS subject match: `*` one token, `>` one or more at the end.
    fn matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    fn may_publish(p: &Permissions, subject: &str) -> bool {
        p.publish.iter().any(|a| matches(a, subject))
    }

    #[test]
    fn an_executor_publishes_only_its_own_cluster() {
        let (s, t) = fleet();
        let p = permissions(&Role::executor("a").unwrap(), &s, &t);
        assert!(may_publish(&p, "flotilla.telemetry.a"));
        assert!(!may_publish(&p, "flotilla.telemetry.b"));
        assert!(may_publish(&p, "$KV.replicas.a.r1"));
        assert!(!may_publish(&p, "$KV.replicas.b.r1"));
        assert!(!may_publish(&p, "$KV.clusters.a"));
        assert!(may_publish(&p, "flotilla.events.replica.r1.ready"));
        assert!(!may_publish(&p, "flotilla.events.cluster.a.healthy"));
        assert!(!may_publish(&p, "flotilla.cmd.a.start"));
        assert!(may_publish(
            &p,
            "$JS.API.CONSUMER.CREATE.FLOTILLA_CMD.executor-a-prefetch.flotilla.cmd.a.prefetch"
        ));
        assert!(!may_publish(
            &p,
            "$JS.API.CONSUMER.CREATE.FLOTILLA_CMD.executor-a-prefetch.flotilla.cmd.b.prefetch"
        ));
        assert!(!may_publish(
            &p,
            "$JS.API.CONSUMER.CREATE.FLOTILLA_CMD.x.flotilla.cmd.b.>"
        ));
        assert!(!may_publish(
            &p,
            "$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_CMD.executor-b-replicas"
        ));
        assert!(!may_publish(&p, "$JS.API.STREAM.MSG.GET.FLOTILLA_CMD"));
        assert!(!may_publish(&p, "$JS.API.DIRECT.GET.FLOTILLA_CMD"));
        assert!(!may_publish(&p, "$JS.API.STREAM.CREATE.FLOTILLA_CMD"));
        // Its inbox, and requests for its own replicas' logs.
        assert_eq!(
            p.subscribe,
            vec![
                "_INBOX.executor-a.>".to_string(),
                "flotilla.logs.a".to_string()
            ]
        );
    }

    #[test]
    fn control_services_write_only_what_they_own() {
        let (s, t) = fleet();
        let inv = permissions(&Role::Inventory, &s, &t);
        assert!(may_publish(&inv, "$KV.clusters.a"));
        assert!(!may_publish(&inv, "$KV.deployments.d"));
        assert!(may_publish(&inv, "flotilla.events.cluster.a.joined"));
        assert!(!may_publish(&inv, "flotilla.events.deployment.d.placed"));
        assert!(!may_publish(&inv, "flotilla.cmd.a.start"));
        let rollout = permissions(&Role::Rollout, &s, &t);
        assert!(may_publish(&rollout, "flotilla.cmd.a.start"));
        assert!(!may_publish(&rollout, "$KV.replicas.a.r"));
        let mp = permissions(&Role::ModelProvisioner, &s, &t);
        assert!(may_publish(&mp, "$O.models.M.x"));
        assert!(!may_publish(
            &permissions(&Role::Gateway, &s, &t),
            "$O.models.M.x"
        ));
        for role in Role::CONTROL {
            let p = permissions(&role, &s, &t);
            assert!(!may_publish(&p, "flotilla.telemetry.a"), "{role:?}");
            // Only rollout (`rollout undo`) and the control API apply a
            // spec; only the control API deletes one.
            assert_eq!(
                may_publish(&p, "flotilla.control.deployments.apply"),
                matches!(role, Role::Rollout | Role::ControlApi),
                "{role:?}"
            );
            assert_eq!(
                may_publish(&p, "flotilla.control.deployments.delete"),
                role == Role::ControlApi,
                "{role:?}"
            );
            assert!(!may_publish(&p, "$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_CMD.x"));
        }
        let api = permissions(&Role::ControlApi, &s, &t);
        assert!(!may_publish(&api, "flotilla.cmd.a.start"));
        assert!(!may_publish(&api, "$KV.deployments.d"));
        // Everything the command line does, but registering a model (an
        // upload the gRPC API does not carry).
        assert!(may_publish(&api, "flotilla.control.rollouts.approve"));
        assert!(may_publish(&api, "flotilla.control.clusters.cordon"));
        assert!(!may_publish(&api, "flotilla.control.models.register"));
        assert!(may_publish(&api, "flotilla.logs.eu-1"));
        let gateway = permissions(&Role::Gateway, &s, &t);
        assert!(may_publish(&gateway, "flotilla.traffic.gateway-1a2b"));
        assert!(!may_publish(&api, "flotilla.traffic.gateway-1a2b"));
        assert!(!may_publish(&api, "flotilla.events.deployment.d.placed"));
        assert!(api.subscribe.contains(&"flotilla.events.>".to_string()));
        assert_eq!(
            permissions(&Role::Gateway, &s, &t).subscribe,
            vec!["_INBOX.gateway.>".to_string()]
        );
        // It follows the events stream (Watch) and reads the records.
        assert!(may_publish(&api, "$JS.API.CONSUMER.CREATE.FLOTILLA_EVENTS"));
        assert!(may_publish(
            &api,
            "$JS.API.DIRECT.GET.KV_deployments.$KV.deployments.d"
        ));
    }

    #[test]
    fn permissions_follow_the_prefix() {
        let s = Subjects::new("acme").unwrap();
        let t = Topology::new(&s, 1);
        let p = permissions(&Role::executor("a").unwrap(), &s, &t);
        assert!(may_publish(&p, "acme.telemetry.a"));
        assert!(may_publish(&p, "$KV.acme_replicas.a.r"));
        assert!(!may_publish(&p, "flotilla.telemetry.a"));
    }

    #[test]
    fn cluster_names_are_checked() {
        assert!(Role::executor("a.b").is_err());
        assert!(Role::executor("*").is_err());
    }
}
