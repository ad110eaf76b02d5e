//! The JSON Schema of the `ModelDeployment` document, derived from the
//! protobuf descriptors (`FILE_DESCRIPTOR_SET`) the serde code is generated
//! from, so the two cannot disagree: property names are the `json_name`s,
//! enums take the document names of `crate::json`, unknown properties are
//! refused, and each property carries its comment from the `.proto` file
//! for an editor's hover. `schemas/modeldeployment.schema.json` is this,
//! rendered; a test keeps them equal.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Value, json};

use crate::{API_VERSION, FILE_DESCRIPTOR_SET};

const PACKAGE: &str = "flotilla.v1";

/// Where the schema is published; documents name it in a
/// `# yaml-language-server: $schema=` line.
pub const SCHEMA_ID: &str = "https://flotilla.dev/schemas/v1alpha1/modeldeployment.schema.json";

/// Fields a document writes as an integer or a string (`1` or `"25%"`).
const INT_OR_STRING_FIELDS: &[&str] = &[
    "flotilla.v1.RolloutSpec.max_unavailable",
    "flotilla.v1.RolloutSpec.max_surge",
];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("the embedded descriptor set does not decode: {0}")]
    Descriptors(#[from] prost::DecodeError),
    #[error("{0} is not in the descriptor set")]
    UnknownType(String),
    #[error("{0}: the enum has no document names in crate::json")]
    UnnamedEnum(String),
    #[error("{0}: oneofs have no document form")]
    Oneof(String),
}

/// The schema of the `ModelDeployment` document (draft-07, which every
/// editor's YAML support reads).
pub fn deployment_schema() -> Result<Value, SchemaError> {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)?;
    let index = Index::new(&set);
    let mut definitions = BTreeMap::new();
    let mut pending = vec!["ModelDeployment".to_string()];
    let mut seen = BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let (schema, uses) = index.message_schema(&name)?;
        pending.extend(uses);
        definitions.insert(name, schema);
    }
    let mut root = Map::new();
    root.insert(
        "$schema".into(),
        json!("http://json-schema.org/draft-07/schema#"),
    );
    root.insert("$id".into(), json!(SCHEMA_ID));
    root.insert("title".into(), json!("Flotilla ModelDeployment"));
    // The document itself is the ModelDeployment definition, inline, so
    // an editor offers its fields at the top level.
    let Some(Value::Object(top)) = definitions.remove("ModelDeployment") else {
        return Err(SchemaError::UnknownType("ModelDeployment".into()));
    };
    root.extend(top);
    root.insert(
        "definitions".into(),
        Value::Object(definitions.into_iter().collect()),
    );
    Ok(Value::Object(root))
}

/// Messages and enums by short name, with their comments.
struct Index<'a> {
    messages: BTreeMap<String, (&'a DescriptorProto, Vec<i32>, usize)>,
    comments: Vec<BTreeMap<Vec<i32>, String>>,
}

impl<'a> Index<'a> {
    fn new(set: &'a FileDescriptorSet) -> Self {
        let mut messages = BTreeMap::new();
        let mut comments = Vec::new();
        for (file_index, file) in set.file.iter().enumerate() {
            if file.package() != PACKAGE {
                comments.push(BTreeMap::new());
                continue;
            }
            for (i, message) in file.message_type.iter().enumerate() {
                messages.insert(
                    message.name().to_string(),
                    (message, vec![4, i as i32], file_index),
                );
            }
            let by_path = file
                .source_code_info
                .iter()
                .flat_map(|info| &info.location)
                .filter_map(|l| {
                    let text = l.leading_comments().trim();
                    (!text.is_empty()).then(|| (l.path.clone(), tidy(text)))
                })
                .collect();
            comments.push(by_path);
        }
        Self { messages, comments }
    }

    fn comment(&self, file: usize, path: &[i32]) -> Option<&str> {
        self.comments.get(file)?.get(path).map(String::as_str)
    }

    /// The schema of message `name` and the messages its fields use.
    fn message_schema(&self, name: &str) -> Result<(Value, Vec<String>), SchemaError> {
        let (message, path, file) = self
            .messages
            .get(name)
            .ok_or_else(|| SchemaError::UnknownType(name.to_string()))?;
        if !message.oneof_decl.is_empty() {
            return Err(SchemaError::Oneof(name.to_string()));
        }
        let mut uses = Vec::new();
        let mut properties = Map::new();
        for (i, field) in message.field.iter().enumerate() {
            let full = format!("{PACKAGE}.{name}.{}", field.name());
            let mut schema = self.field_schema(message, field, &full, &mut uses)?;
            let mut field_path = path.clone();
            field_path.extend([2, i as i32]);
            if let (Some(text), Value::Object(map)) =
                (self.comment(*file, &field_path), &mut schema)
            {
                map.insert("description".into(), json!(text));
            }
            properties.insert(field.json_name().to_string(), schema);
        }
        if name == "ModelDeployment" {
            properties.insert("apiVersion".into(), json!({"const": API_VERSION}));
            properties.insert("kind".into(), json!({"const": "ModelDeployment"}));
        }
        let mut schema = Map::new();
        schema.insert("type".into(), json!("object"));
        if let Some(text) = self.comment(*file, path) {
            schema.insert("description".into(), json!(text));
        }
        schema.insert("properties".into(), Value::Object(properties));
        schema.insert("additionalProperties".into(), json!(false));
        Ok((Value::Object(schema), uses))
    }

    fn field_schema(
        &self,
        parent: &DescriptorProto,
        field: &FieldDescriptorProto,
        full: &str,
        uses: &mut Vec<String>,
    ) -> Result<Value, SchemaError> {
        let type_name = field
            .type_name()
            .trim_start_matches(&format!(".{PACKAGE}."))
            .to_string();
        let repeated = field.label() == Label::Repeated;
        if field.r#type() == Type::Message {
            // A map is a repeated nested `…Entry` message with key and value.
            let entry_name = type_name.rsplit('.').next().unwrap_or_default();
            if let Some(entry) = parent.nested_type.iter().find(|n| {
                n.name() == entry_name && n.options.as_ref().is_some_and(|o| o.map_entry())
            }) {
                let value = entry
                    .field
                    .iter()
                    .find(|f| f.name() == "value")
                    .ok_or_else(|| SchemaError::UnknownType(format!("{full} value")))?;
                let value_schema = self.field_schema(entry, value, full, uses)?;
                return Ok(json!({"type": "object", "additionalProperties": value_schema}));
            }
        }
        let one = if INT_OR_STRING_FIELDS.contains(&full) {
            json!({"type": ["integer", "string"], "pattern": "^[0-9]+%?$", "minimum": 0})
        } else {
            match field.r#type() {
                Type::Message => {
                    uses.push(type_name.clone());
                    json!({"$ref": format!("#/definitions/{type_name}")})
                }
                Type::Enum => {
                    let names = crate::json::document_names(&type_name)
                        .ok_or_else(|| SchemaError::UnnamedEnum(type_name.clone()))?;
                    json!({"enum": names})
                }
                Type::String => json!({"type": "string"}),
                Type::Bool => json!({"type": "boolean"}),
                Type::Bytes => json!({"type": "string", "contentEncoding": "base64"}),
                Type::Double | Type::Float => json!({"type": "number"}),
                Type::Int32 | Type::Sint32 | Type::Sfixed32 => {
                    json!({"type": "integer", "minimum": i32::MIN, "maximum": i32::MAX})
                }
                Type::Uint32 | Type::Fixed32 => {
                    json!({"type": "integer", "minimum": 0, "maximum": u32::MAX})
                }
                Type::Int64 | Type::Sint64 | Type::Sfixed64 => {
                    json!({"type": ["integer", "string"], "pattern": "^-?[0-9]+$"})
                }
                Type::Uint64 | Type::Fixed64 => {
                    json!({"type": ["integer", "string"], "pattern": "^[0-9]+$", "minimum": 0})
                }
                Type::Group => return Err(SchemaError::UnknownType(full.to_string())),
            }
        };
        Ok(if repeated {
            json!({"type": "array", "items": one})
        } else {
            one
        })
    }
}

/// A comment's lines, one leading space each removed.
fn tidy(text: &str) -> String {
    text.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `schemas/modeldeployment.schema.json` must be what the descriptors
    /// give. Run with `FLOTILLA_BLESS=1` to rewrite it.
    #[test]
    fn the_published_schema_matches_the_descriptors() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../schemas/modeldeployment.schema.json");
        let mut fresh = serde_json::to_string_pretty(&deployment_schema().unwrap()).unwrap();
        fresh.push('\n');
        if std::env::var_os("FLOTILLA_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &fresh).unwrap();
            return;
        }
        let published = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            published == fresh,
            "{} is out of date; run FLOTILLA_BLESS=1 cargo test -p flotilla-proto",
            path.display()
        );
    }

    #[test]
    fn the_schema_knows_the_document() {
        let schema = deployment_schema().unwrap();
        let spec = &schema["definitions"]["ModelDeploymentSpec"]["properties"];
        assert_eq!(
            schema["properties"]["spec"]["$ref"],
            "#/definitions/ModelDeploymentSpec"
        );
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(spec["runtime"]["enum"], json!(["candle", "vllm"]));
        let gpu = &schema["definitions"]["GpuRequirements"]["properties"];
        assert!(gpu["minMemoryGiB"].is_object(), "{gpu}");
        let labels = &schema["definitions"]["ObjectMeta"]["properties"]["labels"];
        assert_eq!(labels["additionalProperties"]["type"], "string");
        let rollout = &schema["definitions"]["RolloutSpec"]["properties"];
        assert_eq!(rollout["maxSurge"]["type"], json!(["integer", "string"]));
        assert!(
            spec["residency"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("never routes")),
            "{}",
            spec["residency"]
        );
    }
}
