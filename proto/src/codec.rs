//! Encoding and decoding of bus messages.
//!
//! Binary protobuf is the default. A message whose `Content-Type` is
//! `application/json` (or that has no `Content-Type` and starts with `{`, as
//! `nats pub SUBJECT '{...}'` sends it) is read as JSON, the same document a
//! person writes in YAML.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::v1;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const PROTOBUF: &str = "application/x-protobuf";
pub const JSON: &str = "application/json";

/// A message type that travels on the bus or sits in a KV bucket.
pub trait Contract:
    prost::Message + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The protobuf name, e.g. `flotilla.v1.ModelDeployment`.
    const TYPE_NAME: &'static str;
}

macro_rules! contracts {
    ($($ty:ident),+ $(,)?) => {
        $(impl Contract for v1::$ty {
            const TYPE_NAME: &'static str = concat!("flotilla.v1.", stringify!($ty));
        })+
    };
}

contracts!(
    ModelDeployment,
    DeleteDeployment,
    ApproveRollout,
    UndoRollout,
    CordonCluster,
    ClusterHeartbeat,
    ClusterRecord,
    PlacementDecision,
    RolloutState,
    ExecutorCommand,
    ReplicaStatus,
    ModelRecord,
    RegisterModel,
    Event,
    ReplicaLogsRequest,
    ReplicaLogs,
    GatewayTraffic,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Protobuf => PROTOBUF,
            Self::Json => JSON,
        }
    }

    /// Chooses by `Content-Type`; without one, a payload starting with `{`
    /// is JSON and anything else protobuf.
    pub fn detect(content_type: Option<&str>, payload: &[u8]) -> Result<Self, DecodeError> {
        let Some(ct) = content_type else {
            return Ok(if payload.first() == Some(&b'{') {
                Self::Json
            } else {
                Self::Protobuf
            });
        };
        let media = ct
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" => Ok(Self::Json),
            "application/x-protobuf"
            | "application/protobuf"
            | "application/vnd.google.protobuf" => Ok(Self::Protobuf),
            _ => Err(DecodeError {
                code: "unsupported_content_type",
                message_type: "",
                field: None,
                reason: format!(
                    "Content-Type {ct:?} is not supported; use {PROTOBUF} (default) or {JSON}"
                ),
            }),
        }
    }
}

/// A message that could not be read, said so that its sender can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct DecodeError {
    /// `invalid_protobuf`, `invalid_json`, `unsupported_content_type`.
    pub code: &'static str,
    pub message_type: &'static str,
    /// Path of the offending field, e.g. `spec.placement.policy`.
    pub field: Option<String>,
    pub reason: String,
}

impl DecodeError {
    fn describe(&self) -> String {
        let what = if self.message_type.is_empty() {
            "message".to_string()
        } else {
            self.message_type.to_string()
        };
        match &self.field {
            Some(f) => format!("{what}: field {f}: {}", self.reason),
            None => format!("{what}: {}", self.reason),
        }
    }
}

pub fn decode<M: Contract>(content_type: Option<&str>, payload: &[u8]) -> Result<M, DecodeError> {
    let encoding = Encoding::detect(content_type, payload).map_err(|mut e| {
        e.message_type = M::TYPE_NAME;
        e
    })?;
    match encoding {
        Encoding::Protobuf => decode_protobuf(payload),
        Encoding::Json => decode_json(payload),
    }
}

pub fn decode_protobuf<M: Contract>(payload: &[u8]) -> Result<M, DecodeError> {
    M::decode(payload).map_err(|e| {
        let (field, reason) = split_prost_error(&e.to_string());
        DecodeError {
            code: "invalid_protobuf",
            message_type: M::TYPE_NAME,
            field,
            reason,
        }
    })
}

pub fn decode_json<M: Contract>(payload: &[u8]) -> Result<M, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let invalid = |field, reason| DecodeError {
        code: "invalid_json",
        message_type: M::TYPE_NAME,
        field,
        reason,
    };
    let message: M = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path.is_empty() || path == "." {
            None
        } else {
            Some(path)
        };
        invalid(field, inner.to_string())
    })?;
    de.end().map_err(|e| invalid(None, e.to_string()))?;
    Ok(message)
}

pub fn encode<M: Contract>(message: &M, encoding: Encoding) -> Bytes {
    match encoding {
        Encoding::Protobuf => Bytes::from(message.encode_to_vec()),
        // Our types serialize to JSON infallibly: string keys, no
        // non-finite floats are produced by the services.
        Encoding::Json => Bytes::from(serde_json::to_vec(message).unwrap_or_default()),
    }
}

/// prost says `failed to decode Protobuf message: Spec.replicas: invalid
/// wire type: ...`; keep the field path and the reason apart.
fn split_prost_error(text: &str) -> (Option<String>, String) {
    let body = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(text);
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((head, tail)) = rest.split_once(": ") {
        match head.split_once('.') {
            Some((ty, field))
                if !ty.is_empty()
                    && ty.chars().all(|c| c.is_ascii_alphanumeric())
                    && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                fields.push(field.to_string());
                rest = tail;
            }
            _ => break,
        }
    }
    let field = (!fields.is_empty()).then(|| fields.join("."));
    (field, rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCHITECTURE_EXAMPLE: &str = r#"{
      "apiVersion": "flotilla.dev/v1alpha1",
      "kind": "ModelDeployment",
      "metadata": {"name": "chat-small", "labels": {"team": "search"}},
      "spec": {
        "model": {"preset": "smollm2-135m-instruct"},
        "runtime": "candle",
        "replicas": 4,
        "resources": {"gpu": {"count": 1, "minMemoryGiB": 8, "types": ["H100", "A100", "L4"]}},
        "placement": {
          "policy": "PickN",
          "numberOfClusters": 2,
          "clusterNames": [],
          "affinity": {
            "required": [{"labelSelector": {"matchLabels": {"env": "prod"}}}],
            "preferred": [
              {"weight": 60, "propertySorter": {"name": "gpu.freeMemoryGiB", "order": "Descending"}},
              {"weight": 40, "propertySorter": {"name": "cost.perGpuHour", "order": "Ascending"}}
            ]
          },
          "topologySpread": [{"topologyKey": "region", "maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}],
          "tolerations": [{"key": "spot", "operator": "Exists"}]
        },
        "rollout": {
          "strategy": "Staged",
          "maxUnavailable": "25%",
          "maxSurge": 1,
          "stages": [
            {"name": "canary", "clusterSelector": {"matchLabels": {"env": "canary"}}, "afterStage": {"wait": "60s"}},
            {"name": "prod", "clusterSelector": {"matchLabels": {"env": "prod"}}, "afterStage": {"approval": true}}
          ]
        }
      }
    }"#;

    #[test]
    fn the_architecture_document_decodes_as_json() {
        let d: v1::ModelDeployment = decode(Some(JSON), ARCHITECTURE_EXAMPLE.as_bytes()).unwrap();
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(d.metadata.as_ref().unwrap().name, "chat-small");
        assert_eq!(spec.runtime(), v1::Runtime::Candle);
        assert_eq!(spec.replicas, 4);
        let gpu = spec.resources.as_ref().unwrap().gpu.as_ref().unwrap();
        assert_eq!(gpu.min_memory_gib, 8);
        let placement = spec.placement.as_ref().unwrap();
        assert_eq!(placement.policy(), v1::PlacementPolicy::PickN);
        assert_eq!(
            placement.affinity.as_ref().unwrap().preferred[1]
                .property_sorter
                .as_ref()
                .unwrap()
                .order(),
            v1::SortOrder::Ascending
        );
        assert_eq!(
            placement.topology_spread[0].when_unsatisfiable(),
            v1::WhenUnsatisfiable::DoNotSchedule
        );
        assert_eq!(
            placement.tolerations[0].operator(),
            v1::TolerationOperator::Exists
        );
        let rollout = spec.rollout.as_ref().unwrap();
        assert_eq!(rollout.max_unavailable, "25%");
        assert_eq!(rollout.max_surge, "1");
        assert!(rollout.stages[1].after_stage.as_ref().unwrap().approval);
    }

    #[test]
    fn json_and_protobuf_round_trip_to_the_same_message() {
        let d: v1::ModelDeployment = decode_json(ARCHITECTURE_EXAMPLE.as_bytes()).unwrap();
        let via_proto: v1::ModelDeployment = decode(None, &encode(&d, Encoding::Protobuf)).unwrap();
        let via_json: v1::ModelDeployment = decode(None, &encode(&d, Encoding::Json)).unwrap();
        assert_eq!(via_proto, d);
        assert_eq!(via_json, d);
        let text = String::from_utf8(encode(&d, Encoding::Json).to_vec()).unwrap();
        assert!(text.contains("\"policy\":\"PickN\""), "{text}");
        assert!(text.contains("\"minMemoryGiB\":8"), "{text}");
    }

    /// What Python's `json_format.MessageToJson` and Go's protojson write:
    /// enum values by their proto names, 64-bit integers as strings; with
    /// `preserving_proto_field_name`, the proto field names.
    #[test]
    fn canonical_proto3_json_decodes_to_the_same_message() {
        let document: v1::ModelDeployment = decode_json(ARCHITECTURE_EXAMPLE.as_bytes()).unwrap();
        let canonical = r#"{
          "api_version": "flotilla.dev/v1alpha1",
          "kind": "ModelDeployment",
          "metadata": {"name": "chat-small", "labels": {"team": "search"}},
          "spec": {
            "model": {"preset": "smollm2-135m-instruct"},
            "runtime": "RUNTIME_CANDLE",
            "replicas": 4,
            "resources": {"gpu": {"count": 1, "min_memory_gib": 8, "types": ["H100", "A100", "L4"]}},
            "placement": {
              "policy": 2,
              "numberOfClusters": 2,
              "affinity": {
                "required": [{"labelSelector": {"matchLabels": {"env": "prod"}}}],
                "preferred": [
                  {"weight": 60, "propertySorter": {"name": "gpu.freeMemoryGiB", "order": "SORT_ORDER_DESCENDING"}},
                  {"weight": 40, "property_sorter": {"name": "cost.perGpuHour", "order": "SORT_ORDER_ASCENDING"}}
                ]
              },
              "topologySpread": [{"topologyKey": "region", "maxSkew": 1, "whenUnsatisfiable": "WHEN_UNSATISFIABLE_DO_NOT_SCHEDULE"}],
              "tolerations": [{"key": "spot", "operator": "TOLERATION_OPERATOR_EXISTS"}]
            },
            "rollout": {
              "strategy": "ROLLOUT_STRATEGY_STAGED",
              "maxUnavailable": "25%",
              "max_surge": "1",
              "stages": [
                {"name": "canary", "clusterSelector": {"matchLabels": {"env": "canary"}}, "afterStage": {"wait": "60s"}},
                {"name": "prod", "clusterSelector": {"matchLabels": {"env": "prod"}}, "afterStage": {"approval": true}}
              ]
            }
          },
          "status": {"generation": "7", "updatedAtUnixMs": "-1"}
        }"#;
        let mut read: v1::ModelDeployment = decode(Some(JSON), canonical.as_bytes()).unwrap();
        let status = read.status.take().unwrap();
        assert_eq!(status.generation, 7);
        assert_eq!(status.updated_at_unix_ms, -1);
        assert_eq!(read, document);

        let unknown =
            decode::<v1::ModelDeployment>(None, br#"{"spec": {"runtime": 9}}"#).unwrap_err();
        assert_eq!(unknown.field.as_deref(), Some("spec.runtime"));
        let not_a_number =
            decode::<v1::ModelDeployment>(None, br#"{"status": {"generation": "seven"}}"#)
                .unwrap_err();
        assert_eq!(not_a_number.field.as_deref(), Some("status.generation"));
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (
                r#"{"spec": {"replicas": "four"}}"#,
                "spec.replicas",
                "invalid type",
            ),
            (
                r#"{"spec": {"placement": {"policy": "PickSome"}}}"#,
                "spec.placement.policy",
                "expected one of \"PickAll\"",
            ),
            (
                r#"{"spec": {"replicaz": 3}}"#,
                "spec.replicaz",
                "unknown field `replicaz`",
            ),
            (
                r#"{"metadata": {"name": 7}}"#,
                "metadata.name",
                "invalid type",
            ),
        ];
        for (doc, field, reason) in cases {
            let e = decode::<v1::ModelDeployment>(Some(JSON), doc.as_bytes()).unwrap_err();
            assert_eq!(e.code, "invalid_json");
            assert_eq!(e.field.as_deref(), Some(field), "{doc}: {e}");
            assert!(e.reason.contains(reason), "{doc}: {e}");
        }
    }

    #[test]
    fn broken_json_says_where() {
        let e = decode::<v1::ModelDeployment>(None, b"{\"spec\": ").unwrap_err();
        assert_eq!(e.code, "invalid_json");
        assert!(e.reason.contains("line 1"), "{e}");
        let e = decode::<v1::ModelDeployment>(None, b"{} trailing").unwrap_err();
        assert!(e.reason.contains("trailing"), "{e}");
    }

    #[test]
    fn broken_protobuf_names_the_field() {
        // Field 3 (metadata) as a length-delimited value longer than the buffer.
        let e = decode::<v1::ModelDeployment>(Some(PROTOBUF), &[0x1a, 0x05, 0x0a]).unwrap_err();
        assert_eq!(e.code, "invalid_protobuf");
        assert!(e.field.is_some(), "{e:?}");
        let e = decode::<v1::ModelDeployment>(None, &[0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e.code, "invalid_protobuf");
    }

    #[test]
    fn unknown_content_type_is_refused() {
        let e = decode::<v1::ModelDeployment>(Some("text/yaml"), b"a: b").unwrap_err();
        assert_eq!(e.code, "unsupported_content_type");
        assert!(e.to_string().contains("text/yaml"));
        assert!(Encoding::detect(Some("application/json; charset=utf-8"), b"").is_ok());
    }

    #[test]
    fn split_prost_errors() {
        let (f, r) = split_prost_error(
            "failed to decode Protobuf message: ModelDeployment.metadata: ObjectMeta.name: invalid string value: data is not UTF-8 encoded",
        );
        assert_eq!(f.as_deref(), Some("metadata.name"));
        assert_eq!(r, "invalid string value: data is not UTF-8 encoded");
    }
}
