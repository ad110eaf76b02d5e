//! The `control-api`: deployments over gRPC (`flotilla.v1.ControlApi`) for
//! clients that do not speak NATS.
//!
//! Apply and Delete take the bus path a `flotilla apply` takes: the
//! document is checked with placement's own validation (a refused field is
//! `INVALID_ARGUMENT` naming it), published on the same control subject
//! with a request id, and answered by the event placement correlates with
//! it. Get and List read KV `deployments` (and `placements`); Watch follows
//! the events stream with an ordered consumer, from now, a time or a
//! sequence, optionally for one kind and name. It decides nothing itself.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use flotilla_kit::answer::{self, Answer, error_reason};
use flotilla_kit::{Bus, BusArgs, BusConfig, ConfigError, Health, KitError, RecordStore};
use flotilla_proto::v1::{self as contracts, ModelDeployment, PlacementDecision};
use flotilla_proto::{ControlSubject, EventKind, EventType, check_name};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The generated API: its own messages and the service; the messages it
/// carries (`ModelDeployment`, `Event`, ...) are `flotilla_proto`'s.
pub mod api {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
    tonic::include_proto!("flotilla.v1");

    /// The `FileDescriptorSet` of the API and the files it imports, as
    /// gRPC reflection serves it (`grpcurl list`, `grpcurl describe`).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/control_api_descriptors.binpb"));
}

use api::control_api_server::{ControlApi, ControlApiServer};

pub const SERVICE: &str = "control-api";

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-control-api",
    version,
    about = "Flotilla control API: deployments over gRPC"
)]
pub struct Args {
    #[command(flatten)]
    pub bus: BusArgs,

    /// Address of the gRPC API.
    #[arg(
        long,
        env = "FLOTILLA_CONTROL_API_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:9105")]
    pub http_addr: SocketAddr,

    /// How long Apply and Delete wait for placement's answer.
    #[arg(long, env = "FLOTILLA_ANSWER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub answer_timeout: Duration,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_kit::logging::LogFormat::Text)]
    pub log_format: flotilla_kit::logging::LogFormat,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub listen: SocketAddr,
    pub http_addr: SocketAddr,
    pub answer_timeout: Duration,
}

impl Args {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.answer_timeout.is_zero() {
            return Err(ConfigError::new("answer-timeout", "must be more than 0"));
        }
        Ok(Config {
            bus: self.bus.validate()?,
            listen: self.listen,
            http_addr: self.http_addr,
            answer_timeout: self.answer_timeout,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlApiError {
    #[error(transparent)]
    Kit(#[from] KitError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
}

/// The service behind the generated server.
pub struct Control {
    bus: Bus,
    deployments: RecordStore<ModelDeployment>,
    placements: RecordStore<PlacementDecision>,
    answer_timeout: Duration,
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

impl Control {
    /// Publishes `message` on `subject` and waits for placement's answer.
    async fn ask<M: flotilla_proto::codec::Contract>(
        &self,
        subject: ControlSubject,
        message: &M,
        request_id: &str,
        done: EventType,
        failed: &[EventType],
    ) -> Result<contracts::Event, Status> {
        let answer = answer::ask(
            &self.bus,
            subject,
            message,
            request_id,
            &[done],
            failed,
            self.answer_timeout,
        )
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
        match answer {
            Answer::Done(event) => Ok(event),
            Answer::Refused(event) => Err(Status::invalid_argument(error_reason(&event))),
            Answer::Lost => Err(Status::unavailable("lost the connection to NATS")),
            Answer::TimedOut => Err(Status::unavailable(format!(
                "the request is on the bus but placement did not answer within {:?} (is it running?)",
                self.answer_timeout
            ))),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<api::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ControlApi for Control {
    async fn apply_deployment(
        &self,
        request: Request<api::ApplyDeploymentRequest>,
    ) -> Result<Response<api::ApplyDeploymentResponse>, Status> {
        let doc = request
            .into_inner()
            .deployment
            .ok_or_else(|| Status::invalid_argument("deployment: is required"))?;
        // The checks placement makes first, so a bad field is refused here
        // with the same words, before anything is published.
        if let Err(e) = flotilla_deployment_spec::validate(&doc) {
            return Err(Status::invalid_argument(format!(
                "{}: {}",
                e.field, e.reason
            )));
        }
        let name = name_of(&doc);
        check_name("deployment", &name)
            .map_err(|e| Status::invalid_argument(format!("metadata.name: {e}")))?;
        // Placement answers nothing to an unchanged document.
        if let Some((stored, _)) = self.deployments.get(&name).await.map_err(store_error)?
            && stored.spec == doc.spec
            && stored.metadata == doc.metadata
        {
            return Ok(Response::new(api::ApplyDeploymentResponse {
                name,
                generation: stored.status.as_ref().map_or(0, |s| s.generation),
                unchanged: true,
                message: "unchanged".into(),
            }));
        }
        let request_id = uuid::Uuid::new_v4().to_string();
        let event = self
            .ask(
                ControlSubject::DeploymentApply,
                &doc,
                &request_id,
                EventType::DeploymentAccepted,
                &[EventType::DeploymentRejected],
            )
            .await?;
        Ok(Response::new(api::ApplyDeploymentResponse {
            name,
            generation: event.generation,
            unchanged: false,
            message: event.message,
        }))
    }

    async fn get_deployment(
        &self,
        request: Request<api::GetDeploymentRequest>,
    ) -> Result<Response<api::GetDeploymentResponse>, Status> {
        let name = request.into_inner().name;
        check_name("deployment", &name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let Some((deployment, _)) = self.deployments.get(&name).await.map_err(store_error)? else {
            return Err(Status::not_found(format!("no deployment named {name:?}")));
        };
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
        check_name("deployment", &name)
            .map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        if self
            .deployments
            .get(&name)
            .await
            .map_err(store_error)?
            .is_none()
        {
            return Err(Status::not_found(format!("no deployment named {name:?}")));
        }
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
                EventType::DeploymentDeleted,
                &[],
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
        let deliver_policy = match (watch.since_unix_ms, watch.from_sequence) {
            (0, 0) => DeliverPolicy::New,
            (0, start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            (since, 0) if since > 0 => {
                let start_time =
                    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since) * 1_000_000)
                        .map_err(|e| Status::invalid_argument(format!("since_unix_ms: {e}")))?;
                DeliverPolicy::ByStartTime { start_time }
            }
            (since, 0) => {
                return Err(Status::invalid_argument(format!(
                    "since_unix_ms: {since} is before 1970"
                )));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "since_unix_ms, from_sequence: give at most one",
                ));
            }
        };
        let filter_subject = match (watch.kind.as_str(), watch.name.as_str()) {
            ("", "") => self.bus.subjects.events_all(),
            ("", _) => return Err(Status::invalid_argument("name: needs kind")),
            (kind, name) => {
                let Some(kind) = EventKind::ALL.into_iter().find(|k| k.as_str() == kind) else {
                    let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err(Status::invalid_argument(format!(
                        "kind: {kind:?} is not one of {}",
                        known.join(", ")
                    )));
                };
                if name.is_empty() {
                    format!("{}.events.{}.>", self.bus.subjects.prefix(), kind.as_str())
                } else {
                    self.bus
                        .subjects
                        .events_about(kind, name)
                        .map_err(|e| Status::invalid_argument(format!("name: {e}")))?
                }
            }
        };
        let stream = self
            .bus
            .jetstream
            .get_stream(&self.bus.topology.events.name)
            .await
            .map_err(|e| Status::unavailable(format!("the events stream: {e}")))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| Status::unavailable(format!("following the events stream: {e}")))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| Status::unavailable(format!("following the events stream: {e}")))?;
        let events = messages.filter_map(|message| async move {
            let message = match message {
                Ok(m) => m,
                Err(e) => return Some(Err(Status::unavailable(format!("the events stream: {e}")))),
            };
            let sequence = message.info().map_or(0, |i| i.stream_sequence);
            match flotilla_proto::codec::decode_protobuf::<contracts::Event>(&message.payload) {
                Ok(event) => Some(Ok(api::WatchEvent {
                    sequence,
                    event: Some(event),
                })),
                Err(e) => {
                    // Not an event: nothing a watcher can use.
                    tracing::warn!(sequence, "skipping an undecodable event: {e}");
                    None
                }
            }
        });
        Ok(Response::new(Box::pin(events)))
    }
}

/// Serves until `shutdown`; `bound` gets the gRPC address.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), ControlApiError> {
    let bus = Bus::connect(&config.bus, SERVICE, &shutdown).await?;
    flotilla_kit::provision(&bus).await?;
    let health = Health::for_bus(&bus);
    health.serve(config.http_addr, shutdown.clone()).await?;
    let deployments = RecordStore::open(&bus, &bus.topology.deployments.name).await?;
    let placements = RecordStore::open(&bus, &bus.topology.placements.name).await?;
    let client = bus.client.clone();
    let control = Control {
        bus,
        deployments,
        placements,
        answer_timeout: config.answer_timeout,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ControlApiError::Bind {
            addr: config.listen,
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|source| ControlApiError::Bind {
            addr: config.listen,
            source,
        })?;
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    tracing::info!(%local, "control API serving gRPC");
    health.set_ready(true);
    // Standard gRPC health (`grpc.health.v1`, what Kubernetes' grpc probe
    // and grpc_health_probe ask) and reflection, so grpcurl needs no
    // .proto files.
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ControlApiServer<Control>>()
        .await;
    let described = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = described()
        .build_v1()
        .map_err(|e| ControlApiError::Reflection(e.to_string()))?;
    // Older grpcurl and Postman builds ask the v1alpha service.
    let reflection_v1alpha = described()
        .build_v1alpha()
        .map_err(|e| ControlApiError::Reflection(e.to_string()))?;
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ControlApiServer::new(control))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await;
    health.set_ready(false);
    if let Err(e) = client.drain().await {
        tracing::warn!("draining the NATS connection: {e}");
    }
    served.map_err(Into::into)
}
