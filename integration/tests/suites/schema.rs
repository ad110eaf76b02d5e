//! The published JSON Schema of the deployment document, checked by a
//! validator nobody here wrote (Python's `jsonschema`): every file in
//! `examples/` passes, and a misspelled field or an unknown enum value is
//! refused with its path.

use flotilla_integration::workspace_root;

use crate::support;

const VALIDATE: &str = r#"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
validator = jsonschema.Draft7Validator(schema)
out = []
for doc in json.load(open(sys.argv[2])):
    out.append([{"path": e.json_path, "message": e.message}
                for e in sorted(validator.iter_errors(doc), key=lambda e: e.json_path)])
print(json.dumps(out))
"#;

/// The errors `jsonschema` finds in each document, in order.
async fn validate(documents: &[serde_json::Value]) -> Vec<Vec<serde_json::Value>> {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("documents.json");
    std::fs::write(&docs, serde_json::to_vec(documents).unwrap()).unwrap();
    let schema = workspace_root().join("schemas/modeldeployment.schema.json");
    let out = support::output_of(
        &support::python(),
        &[
            "-c",
            VALIDATE,
            &schema.to_string_lossy(),
            &docs.to_string_lossy(),
        ],
    )
    .await;
    serde_json::from_str(&out).unwrap()
}

fn documents_of(text: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

#[tokio::test]
async fn the_schema_accepts_every_example_and_names_a_misspelled_field() {
    let mut names = Vec::new();
    let mut documents = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(workspace_root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        // Editors with the YAML language server validate as you type.
        assert!(
            text.starts_with(
                "# yaml-language-server: $schema=../schemas/modeldeployment.schema.json\n"
            ),
            "{}: no yaml-language-server line",
            file.display()
        );
        for doc in documents_of(&text) {
            names.push(file.display().to_string());
            documents.push(doc);
        }
    }
    let checked = validate(&documents).await;
    for (name, errors) in names.iter().zip(&checked) {
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }

    // The first example, misspelled, with a policy that does not exist and
    // a replica count that is not a number.
    let mut bad = documents[0].clone();
    let placement = bad["spec"]["placement"].as_object_mut().unwrap();
    let clusters = placement.remove("numberOfClusters").unwrap_or(1.into());
    placement.insert("numberOfClusterz".into(), clusters);
    placement.insert("policy".into(), "PickSome".into());
    bad["spec"]["replicas"] = "two".into();
    let errors = &validate(&[bad]).await[0];
    let at = |path: &str| {
        errors
            .iter()
            .find(|e| e["path"] == path)
            .unwrap_or_else(|| panic!("no error at {path} in {errors:?}"))["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        at("$.spec.placement").contains("'numberOfClusterz'"),
        "{errors:?}"
    );
    assert!(
        at("$.spec.placement.policy").contains("PickSome"),
        "{errors:?}"
    );
    assert!(at("$.spec.replicas").contains("'two'"), "{errors:?}");
    assert_eq!(errors.len(), 3, "{errors:?}");
}
