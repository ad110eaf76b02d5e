//! `flotilla.v1.ControlApi`: each RPC reads a bucket or the events stream,
//! or takes the bus path a `flotilla` command takes.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use flotilla_kit::answer::{self, Answer, CordonAnswer, ReplyError, error_reason};
use flotilla_kit::{Bus, KitError, RecordStore, events};
use flotilla_proto::v1::{
    self as contracts, ClusterRecord, ModelDeployment, ModelRecord, PlacementDecision,
    ReplicaStatus, RolloutState,
};
use flotilla_proto::{ControlSubject, EventKind, EventType, check_name};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::api::{self, control_api_server::ControlApi};

/// The most events `ListEvents` returns, and how many when not told.
const MOST_EVENTS: u32 = 1000;
const DEFAULT_EVENTS: u32 = 100;
/// The most log lines an executor serves, and how many when not told.
const MOST_LOG_LINES: u32 = 5000;
const DEFAULT_LOG_LINES: u32 = 100;

/// The service behind the generated server.
pub struct Control {
    pub(crate) bus: Bus,
    pub(crate) deployments: RecordStore<ModelDeployment>,
    pub(crate) placements: RecordStore<PlacementDecision>,
    pub(crate) rollouts: RecordStore<RolloutState>,
    pub(crate) clusters: RecordStore<ClusterRecord>,
    pub(crate) replicas: RecordStore<ReplicaStatus>,
    pub(crate) models: RecordStore<ModelRecord>,
    pub(crate) answer_timeout: Duration,
}

fn store_error(e: KitError) -> Status {
    Status::unavailable(e.to_string())
}

fn name_of(doc: &ModelDeployment) -> String {
    doc.metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// A name from a request: `field: why` when it is not a valid name.
fn checked(what: &'static str, field: &str, name: &str) -> Result<(), Status> {
    check_name(what, name).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn not_found(what: &str, name: &str) -> Status {
    Status::not_found(format!("no {what} named {name:?}"))
}

/// The first check a document gets, with placement's own words, so a bad
/// field is refused before anything is published.
fn validated(doc: Option<ModelDeployment>) -> Result<(ModelDeployment, String), Status> {
    let doc = doc.ok_or_else(|| Status::invalid_argument("deployment: is required"))?;
    if let Err(e) = flotilla_deployment_spec::validate(&doc) {
        return Err(Status::invalid_argument(format!(
            "{}: {}",
            e.field, e.reason
        )));
    }
    let name = name_of(&doc);
    checked("deployment", "metadata.name", &name)?;
    Ok((doc, name))
}

/// The events subject a `kind` and `name` filter selects.
fn event_filter(bus: &Bus, kind: &str, name: &str) -> Result<String, Status> {
    let kind = match kind {
        "" if !name.is_empty() => return Err(Status::invalid_argument("name: needs kind")),
        "" => None,
        kind => Some(
            EventKind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    Status::invalid_argument(format!(
                        "kind: {kind:?} is not one of {}",
                        known.join(", ")
                    ))
                })?,
        ),
    };
    bus.subjects
        .events_matching(kind, (!name.is_empty()).then_some(name))
        .map_err(|e| Status::invalid_argument(format!("name: {e}")))
}

fn since(since_unix_ms: i64) -> Result<DeliverPolicy, Status> {
    if since_unix_ms < 0 {
        return Err(Status::invalid_argument(format!(
            "since_unix_ms: {since_unix_ms} is before 1970"
        )));
    }
    let start_time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since_unix_ms) * 1_000_000)
            .map_err(|e| Status::invalid_argument(format!("since_unix_ms: {e}")))?;
    Ok(DeliverPolicy::ByStartTime { start_time })
}

fn watch_event(m: events::EventMessage) -> Option<api::WatchEvent> {
    match m.event {
        Ok(event) => Some(api::WatchEvent {
            sequence: m.sequence,
            event: Some(event),
        }),
        Err(e) => {
            // Not an event: nothing a client can use.
            tracing::warn!(sequence = m.sequence, "skipping an undecodable event: {e}");
            None
        }
    }
}

/// What answers a control request: the owning service's event for done,
/// those for refused (besides the bus's own rejection), and the status a
/// refusal becomes.
struct Expect {
    done: EventType,
    failed: &'static [EventType],
    refused: fn(String) -> Status,
    who: &'static str,
}

const APPLIED: Expect = Expect {
    done: EventType::DeploymentAccepted,
    failed: &[EventType::DeploymentRejected],
    refused: Status::invalid_argument,
    who: "placement",
};
const DELETED: Expect = Expect {
    done: EventType::DeploymentDeleted,
    failed: &[],
    refused: Status::invalid_argument,
    who: "placement",
};
const APPROVED: Expect = Expect {
    done: EventType::RolloutApproved,
    failed: &[],
    refused: Status::failed_precondition,
    who: "the rollout service",
};
const UNDONE: Expect = Expect {
    done: EventType::RolloutUndone,
    ..APPROVED
};

impl Control {
    /// Publishes `message` on `subject` and waits for the owning service's
    /// answer.
    async fn ask<M: flotilla_proto::codec::Contract>(
        &self,
        subject: ControlSubject,
        message: &M,
        request_id: &str,
        expect: Expect,
    ) -> Result<contracts::Event, Status> {
        let answer = answer::ask(
            &self.bus,
            subject,
            message,
            request_id,
            &[expect.done],
            expect.failed,
            self.answer_timeout,
        )
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
        match answer {
            Answer::Done(event) => Ok(event),
            Answer::Refused(event) => Err((expect.refused)(error_reason(&event))),
            Answer::Lost => Err(Status::unavailable("lost the connection to NATS")),
            Answer::TimedOut => Err(Status::unavailable(format!(
                "the request is on the bus but {} did not answer within {:?} (is it running?)",
                expect.who, self.answer_timeout
            ))),
        }
    }

    /// Applies `doc` the way `flotilla apply` does.
    async fn apply(
        &self,
        doc: ModelDeployment,
        name: String,
    ) -> Result<api::ApplyDeploymentResponse, Status> {
        // Placement answers nothing to an unchanged document.
        if let Some((stored, _)) = self.deployments.get(&name).await.map_err(store_error)?
            && stored.spec == doc.spec
            && stored.metadata == doc.metadata
        {
            return Ok(api::ApplyDeploymentResponse {
                name,
                generation: stored.status.as_ref().map_or(0, |s| s.generation),
                unchanged: true,
                message: "unchanged".into(),
            });
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let event = self
            .ask(ControlSubject::DeploymentApply, &doc, &request_id, APPLIED)
            .await?;
        Ok(api::ApplyDeploymentResponse {
            name,
            generation: event.generation,
            unchanged: false,
            message: event.message,
        })
    }

    async fn stored_deployment(&self, name: &str) -> Result<ModelDeployment, Status> {
        checked("deployment", "name", name)?;
        match self.deployments.get(name).await.map_err(store_error)? {
            Some((deployment, _)) => Ok(deployment),
            None => Err(not_found("deployment", name)),
        }
    }

    async fn rollout_action<M: flotilla_proto::codec::Contract>(
        &self,
        subject: ControlSubject,
        message: &M,
        request_id: &str,
        expect: Expect,
    ) -> Result<Response<api::RolloutActionResponse>, Status> {
        let event = self.ask(subject, message, request_id, expect).await?;
        Ok(Response::new(api::RolloutActionResponse {
            message: event.message.clone(),
            event: Some(event),
        }))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<api::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlApi for Control {
    async fn apply_deployment(
        &self,
        request: Request<api::ApplyDeploymentRequest>,
    ) -> Result<Response<api::ApplyDeploymentResponse>, Status> {
        let (doc, name) = validated(request.into_inner().deployment)?;
        Ok(Response::new(self.apply(doc, name).await?))
    }

    async fn get_deployment(
        &self,
        request: Request<api::GetDeploymentRequest>,
    ) -> Result<Response<api::GetDeploymentResponse>, Status> {
        let name = request.into_inner().name;
        let deployment = self.stored_deployment(&name).await?;
        let placement = self
            .placements
            .get(&name)
            .await
            .map_err(store_error)?
            .map(|(p, _)| p);
        Ok(Response::new(api::GetDeploymentResponse {
            deployment: Some(deployment),
            placement,
        }))
    }

    async fn list_deployments(
        &self,
        _request: Request<api::ListDeploymentsRequest>,
    ) -> Result<Response<api::ListDeploymentsResponse>, Status> {
        let mut deployments = self.deployments.list().await.map_err(store_error)?;
        deployments.sort_by_key(name_of);
        Ok(Response::new(api::ListDeploymentsResponse { deployments }))
    }

    async fn delete_deployment(
        &self,
        request: Request<api::DeleteDeploymentRequest>,
    ) -> Result<Response<api::DeleteDeploymentResponse>, Status> {
        let name = request.into_inner().name;
        self.stored_deployment(&name).await?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let message = contracts::DeleteDeployment {
            name: name.clone(),
            request_id: request_id.clone(),
        };
        let event = self
            .ask(
                ControlSubject::DeploymentDelete,
                &message,
                &request_id,
                DELETED,
            )
            .await?;
        Ok(Response::new(api::DeleteDeploymentResponse {
            name,
            message: event.message,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<api::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let watch = request.into_inner();
        let start = match (watch.since_unix_ms, watch.from_sequence) {
            (0, 0) => DeliverPolicy::New,
            (0, start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            (ms, 0) => since(ms)?,
            _ => {
                return Err(Status::invalid_argument(
                    "since_unix_ms, from_sequence: give at most one",
                ));
            }
        };
        let filter = event_filter(&self.bus, &watch.kind, &watch.name)?;
        let messages = events::follow(&self.bus, vec![filter], start)
            .await
            .map_err(|e| Status::unavailable(format!("following the events stream: {e}")))?;
        let events = messages.filter_map(|m| async move {
            match m {
                Ok(m) => watch_event(m).map(Ok),
                Err(e) => Some(Err(Status::unavailable(format!("the events stream: {e}")))),
            }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn preview_deployment(
        &self,
        request: Request<api::PreviewDeploymentRequest>,
    ) -> Result<Response<api::PreviewDeploymentResponse>, Status> {
        let (doc, _) = validated(request.into_inner().deployment)?;
        let event: contracts::Event = answer::request(
            &self.bus,
            self.bus.subjects.preview_deployments(),
            &doc,
            self.answer_timeout,
        )
        .await
        .map_err(|e| match e {
            ReplyError::NoResponders { .. } => {
                Status::unavailable("no placement service answers previews (is it running?)")
            }
            e => Status::unavailable(format!("placement: {e}")),
        })?;
        match event.payload {
            Some(contracts::event::Payload::Placement(placement)) => {
                Ok(Response::new(api::PreviewDeploymentResponse {
                    placement: Some(placement),
                    message: event.message,
                }))
            }
            _ => Err(Status::invalid_argument(error_reason(&event))),
        }
    }

    async fn scale_deployment(
        &self,
        request: Request<api::ScaleDeploymentRequest>,
    ) -> Result<Response<api::ApplyDeploymentResponse>, Status> {
        let scale = request.into_inner();
        let mut doc = self.stored_deployment(&scale.name).await?;
        let replicas = i32::try_from(scale.replicas).map_err(|_| {
            Status::invalid_argument(format!("replicas: {} is too large", scale.replicas))
        })?;
        doc.spec.get_or_insert_with(Default::default).replicas = replicas;
        // Applied as the document it is, without the status placement keeps.
        doc.status = None;
        let (doc, name) = validated(Some(doc))?;
        Ok(Response::new(self.apply(doc, name).await?))
    }

    async fn get_rollout(
        &self,
        request: Request<api::GetRolloutRequest>,
    ) -> Result<Response<api::GetRolloutResponse>, Status> {
        let name = request.into_inner().name;
        checked("deployment", "name", &name)?;
        match self.rollouts.get(&name).await.map_err(store_error)? {
            Some((rollout, _)) => Ok(Response::new(api::GetRolloutResponse {
                rollout: Some(rollout),
            })),
            None => Err(not_found("rollout of a deployment", &name)),
        }
    }

    async fn list_rollouts(
        &self,
        _request: Request<api::ListRolloutsRequest>,
    ) -> Result<Response<api::ListRolloutsResponse>, Status> {
        let mut rollouts = self.rollouts.list().await.map_err(store_error)?;
        rollouts.sort_by(|a, b| a.deployment.cmp(&b.deployment));
        Ok(Response::new(api::ListRolloutsResponse { rollouts }))
    }

    async fn approve_rollout(
        &self,
        request: Request<api::ApproveRolloutRequest>,
    ) -> Result<Response<api::RolloutActionResponse>, Status> {
        let approve = request.into_inner();
        checked("deployment", "name", &approve.name)?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let message = contracts::ApproveRollout {
            deployment: approve.name,
            stage: approve.stage,
            request_id: request_id.clone(),
            ..Default::default()
        };
        self.rollout_action(
            ControlSubject::RolloutApprove,
            &message,
            &request_id,
            APPROVED,
        )
        .await
    }

    async fn undo_rollout(
        &self,
        request: Request<api::UndoRolloutRequest>,
    ) -> Result<Response<api::RolloutActionResponse>, Status> {
        let name = request.into_inner().name;
        checked("deployment", "name", &name)?;
        let request_id = uuid::Uuid::new_v4().to_string();
        let message = contracts::UndoRollout {
            deployment: name,
            request_id: request_id.clone(),
        };
        self.rollout_action(ControlSubject::RolloutUndo, &message, &request_id, UNDONE)
            .await
    }

    async fn get_cluster(
        &self,
        request: Request<api::GetClusterRequest>,
    ) -> Result<Response<api::GetClusterResponse>, Status> {
        let name = request.into_inner().name;
        checked("cluster", "name", &name)?;
        match self.clusters.get(&name).await.map_err(store_error)? {
            Some((cluster, _)) => Ok(Response::new(api::GetClusterResponse {
                cluster: Some(cluster),
            })),
            None => Err(not_found("cluster", &name)),
        }
    }

    async fn list_clusters(
        &self,
        _request: Request<api::ListClustersRequest>,
    ) -> Result<Response<api::ListClustersResponse>, Status> {
        let mut clusters = self.clusters.list().await.map_err(store_error)?;
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(api::ListClustersResponse { clusters }))
    }

    async fn cordon_cluster(
        &self,
        request: Request<api::CordonClusterRequest>,
    ) -> Result<Response<api::CordonClusterResponse>, Status> {
        let cordon = request.into_inner();
        checked("cluster", "name", &cordon.name)?;
        if self
            .clusters
            .get(&cordon.name)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(not_found("cluster", &cordon.name));
        }
        let message = contracts::CordonCluster {
            cluster: cordon.name,
            cordon: cordon.cordon,
            reason: cordon.reason,
            request_id: uuid::Uuid::new_v4().to_string(),
        };
        match answer::cordon(&self.bus, &message, self.answer_timeout)
            .await
            .map_err(store_error)?
        {
            CordonAnswer::Applied(cluster) => Ok(Response::new(api::CordonClusterResponse {
                cluster: Some(*cluster),
            })),
            CordonAnswer::Refused(reason) => Err(Status::failed_precondition(reason)),
            CordonAnswer::Lost => Err(Status::unavailable("lost the connection to NATS")),
            CordonAnswer::TimedOut => Err(Status::unavailable(format!(
                "the request is on the bus but no inventory applied it within {:?} (is it running?)",
                self.answer_timeout
            ))),
        }
    }

    async fn get_replica(
        &self,
        request: Request<api::GetReplicaRequest>,
    ) -> Result<Response<api::GetReplicaResponse>, Status> {
        let id = request.into_inner().replica_id;
        checked("replica", "replica_id", &id)?;
        let replicas = self.replicas.list().await.map_err(store_error)?;
        match replicas.into_iter().find(|r| r.replica_id == id) {
            Some(replica) => Ok(Response::new(api::GetReplicaResponse {
                replica: Some(replica),
            })),
            None => Err(not_found("replica", &id)),
        }
    }

    async fn list_replicas(
        &self,
        request: Request<api::ListReplicasRequest>,
    ) -> Result<Response<api::ListReplicasResponse>, Status> {
        let filter = request.into_inner();
        if !filter.deployment.is_empty() {
            checked("deployment", "deployment", &filter.deployment)?;
        }
        if !filter.cluster.is_empty() {
            checked("cluster", "cluster", &filter.cluster)?;
        }
        let mut replicas: Vec<ReplicaStatus> = self
            .replicas
            .list()
            .await
            .map_err(store_error)?
            .into_iter()
            .filter(|r| filter.deployment.is_empty() || r.deployment == filter.deployment)
            .filter(|r| filter.cluster.is_empty() || r.cluster == filter.cluster)
            .collect();
        replicas
            .sort_by(|a, b| (&a.deployment, &a.replica_id).cmp(&(&b.deployment, &b.replica_id)));
        Ok(Response::new(api::ListReplicasResponse { replicas }))
    }

    async fn get_replica_logs(
        &self,
        request: Request<api::GetReplicaLogsRequest>,
    ) -> Result<Response<api::GetReplicaLogsResponse>, Status> {
        let ask = request.into_inner();
        checked("replica", "replica_id", &ask.replica_id)?;
        let tail_lines = match ask.tail_lines {
            0 => DEFAULT_LOG_LINES,
            n if n > MOST_LOG_LINES => {
                return Err(Status::invalid_argument(format!(
                    "tail_lines: {n} is more than {MOST_LOG_LINES}"
                )));
            }
            n => n,
        };
        let cluster = if ask.cluster.is_empty() {
            let replicas = self.replicas.list().await.map_err(store_error)?;
            match replicas
                .into_iter()
                .find(|r| r.replica_id == ask.replica_id)
            {
                Some(r) => r.cluster,
                None => return Err(not_found("replica", &ask.replica_id)),
            }
        } else {
            ask.cluster
        };
        let subject = self
            .bus
            .subjects
            .replica_logs(&cluster)
            .map_err(|e| Status::invalid_argument(format!("cluster: {e}")))?;
        let message = contracts::ReplicaLogsRequest {
            replica_id: ask.replica_id,
            tail_lines,
        };
        let logs: contracts::ReplicaLogs =
            answer::request(&self.bus, subject, &message, self.answer_timeout)
                .await
                .map_err(|e| match e {
                    ReplyError::NoResponders { .. } => Status::unavailable(format!(
                        "no executor of cluster {cluster} answers log requests (is it running?)"
                    )),
                    e => Status::unavailable(format!("the executor of {cluster}: {e}")),
                })?;
        if !logs.error.is_empty() {
            return Err(Status::not_found(format!("{cluster}: {}", logs.error)));
        }
        Ok(Response::new(api::GetReplicaLogsResponse {
            cluster,
            lines: logs.lines,
        }))
    }

    async fn get_model(
        &self,
        request: Request<api::GetModelRequest>,
    ) -> Result<Response<api::GetModelResponse>, Status> {
        let name = request.into_inner().name;
        checked("model", "name", &name)?;
        match self.models.get(&name).await.map_err(store_error)? {
            Some((model, _)) => Ok(Response::new(api::GetModelResponse { model: Some(model) })),
            None => Err(not_found("model", &name)),
        }
    }

    async fn list_models(
        &self,
        _request: Request<api::ListModelsRequest>,
    ) -> Result<Response<api::ListModelsResponse>, Status> {
        let mut models = self.models.list().await.map_err(store_error)?;
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(api::ListModelsResponse { models }))
    }

    async fn list_events(
        &self,
        request: Request<api::ListEventsRequest>,
    ) -> Result<Response<api::ListEventsResponse>, Status> {
        let list = request.into_inner();
        let limit = match list.limit {
            0 => DEFAULT_EVENTS,
            n if n > MOST_EVENTS => {
                return Err(Status::invalid_argument(format!(
                    "limit: {n} is more than {MOST_EVENTS}"
                )));
            }
            n => n,
        };
        let filter = event_filter(&self.bus, &list.kind, &list.name)?;
        let start = match list.since_unix_ms {
            0 => DeliverPolicy::All,
            ms => since(ms)?,
        };
        let stored = events::stored(&self.bus, vec![filter], start, Some(limit as usize))
            .await
            .map_err(|e| Status::unavailable(format!("reading the events stream: {e}")))?;
        Ok(Response::new(api::ListEventsResponse {
            events: stored.into_iter().filter_map(watch_event).collect(),
        }))
    }
}
