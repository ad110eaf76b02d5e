//! The generated Rust for `proto/flotilla/v1/*.proto` is checked in, so a
//! plain build needs no protoc. This test regenerates it with the vendored
//! protoc and fails on any difference; run it with `FLOTILLA_BLESS=1` to
//! write the new code after changing a `.proto` file.
//!
//! The JSON form of every message is derived here from the protobuf
//! descriptors: field names are the proto `json_name`s, enums are written by
//! name (`crate::json`), unknown fields are refused. The canonical proto3
//! JSON that protojson and json_format write is read as well: proto field
//! names, enum value names and numbers, 64-bit integers as strings.
//!
//! The descriptors are checked in too (`flotilla.v1.binpb`): gRPC reflection
//! serves them, and clients without protoc build messages from them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::{Path, PathBuf};

use prost_types::field_descriptor_proto::{Label, Type};

const PACKAGE: &str = "flotilla.v1";

/// Fields written as an integer or a string (`1` or `"25%"`) in documents.
const INT_OR_STRING_FIELDS: &[&str] = &[
    ".flotilla.v1.RolloutSpec.max_unavailable",
    ".flotilla.v1.RolloutSpec.max_surge",
];

fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn generate(out_dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let root = proto_dir();
    let mut protos: Vec<PathBuf> = std::fs::read_dir(root.join("flotilla/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    let includes = [root.clone(), protoc_bin_vendored::include_path().unwrap()];

    let mut cfg = prost_build::Config::new();
    cfg.protoc_executable(protoc_bin_vendored::protoc_bin_path().unwrap());
    let fds = cfg.load_fds(&protos, &includes).unwrap();

    cfg.out_dir(out_dir);
    cfg.btree_map(["."]);
    cfg.message_attribute(
        ".",
        "#[derive(::serde::Serialize, ::serde::Deserialize)]\n#[serde(default, deny_unknown_fields)]",
    );

    for file in &fds.file {
        assert_eq!(
            file.package(),
            PACKAGE,
            "{} is outside {PACKAGE}",
            file.name()
        );
        for msg in &file.message_type {
            let msg_path = format!(".{PACKAGE}.{}", msg.name());
            assert!(
                msg.enum_type.is_empty(),
                "{msg_path}: declare enums at the top level so their JSON names live in crate::json"
            );
            for (i, oneof) in msg.oneof_decl.iter().enumerate() {
                let oneof_path = format!("{msg_path}.{}", oneof.name());
                // Written as `"payload": {"deadLetter": {...}}`. prost matches
                // attribute paths by prefix, so an attribute on the oneof
                // field would land on its variants too: the field has none.
                cfg.enum_attribute(
                    &oneof_path,
                    "#[derive(::serde::Serialize, ::serde::Deserialize)]\n#[serde(rename_all = \"camelCase\")]",
                );
                for field in msg.field.iter().filter(|f| f.oneof_index == Some(i as i32)) {
                    assert!(
                        matches!(field.r#type(), Type::Message),
                        "{msg_path}.{}: oneof members must be messages",
                        field.name()
                    );
                }
            }
            for field in &msg.field {
                let path = format!("{msg_path}.{}", field.name());
                let repeated = field.label() == Label::Repeated;
                let in_oneof = field.oneof_index.is_some();
                if in_oneof {
                    continue;
                }
                let mut attrs = vec![format!("rename = \"{}\"", field.json_name())];
                // Canonical proto3 JSON parsers accept the proto field name
                // as well (protojson, json_format with
                // preserving_proto_field_name).
                if field.json_name() != field.name() {
                    attrs.push(format!("alias = \"{}\"", field.name()));
                }
                match field.r#type() {
                    Type::Enum => {
                        assert!(!repeated, "{path}: repeated enums have no JSON codec yet");
                        let rust = field
                            .type_name()
                            .trim_start_matches(&format!(".{PACKAGE}."))
                            .to_string();
                        attrs.push(format!(
                            "serialize_with = \"crate::json::enum_name::<crate::v1::{rust}, _>\""
                        ));
                        attrs.push(format!(
                            "deserialize_with = \"crate::json::enum_from_name::<crate::v1::{rust}, _>\""
                        ));
                        attrs.push("skip_serializing_if = \"crate::json::is_unset\"".into());
                    }
                    Type::Message if !repeated => {
                        attrs.push("skip_serializing_if = \"Option::is_none\"".into());
                    }
                    Type::Bytes => {
                        attrs.push("with = \"crate::json::base64_bytes\"".into());
                    }
                    // Canonical JSON writes 64-bit integers as strings, since
                    // JavaScript numbers cannot hold them.
                    Type::Int64 | Type::Sint64 | Type::Sfixed64 if !repeated => {
                        attrs.push(
                            "deserialize_with = \"crate::json::i64_number_or_string\"".into(),
                        );
                    }
                    Type::Uint64 | Type::Fixed64 if !repeated => {
                        attrs.push(
                            "deserialize_with = \"crate::json::u64_number_or_string\"".into(),
                        );
                    }
                    _ => {}
                }
                if INT_OR_STRING_FIELDS.contains(&path.as_str()) {
                    attrs.push("deserialize_with = \"crate::json::int_or_string\"".into());
                }
                cfg.field_attribute(&path, format!("#[serde({})]", attrs.join(", ")));
            }
        }
    }
    let descriptors = prost::Message::encode_to_vec(&fds);
    cfg.compile_fds(fds).unwrap();
    let code = std::fs::read(out_dir.join(format!("{PACKAGE}.rs"))).unwrap();
    (code, descriptors)
}

#[test]
fn generated_code_matches_the_proto_files() {
    let tmp = tempdir();
    let (code, descriptors) = generate(&tmp);
    let gen_dir = proto_dir().join("src/gen");
    for (name, fresh) in [
        (format!("{PACKAGE}.rs"), code),
        (format!("{PACKAGE}.binpb"), descriptors),
    ] {
        let checked_in_path = gen_dir.join(name);
        if std::env::var_os("FLOTILLA_BLESS").is_some() {
            std::fs::write(&checked_in_path, &fresh).unwrap();
            continue;
        }
        let checked_in = std::fs::read(&checked_in_path).unwrap_or_default();
        assert!(
            checked_in == fresh,
            "{} is out of date with proto/flotilla/v1; run FLOTILLA_BLESS=1 cargo test -p flotilla-proto-codegen",
            checked_in_path.display()
        );
    }
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-codegen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
