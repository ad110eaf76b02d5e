//! Whether a live object is still what the executor sent.
//!
//! Only what the executor sets is compared: the labels and annotations it
//! wrote (others' are left alone), its owner reference and the whole
//! `spec` it sent, field by field. A field the executor did not send (the
//! API server's defaults such as `imagePullPolicy` or
//! `revisionHistoryLimit`, `status`, a controller's annotations) is not a
//! difference; neither is an empty value the server dropped, nor a
//! quantity the server rewrote (`1000m` read back as `1`). Lists of named
//! entries (containers, environment, volumes) are matched by name, so an
//! entry added by hand shows as such.
//!
//! The spec hash annotation ([`ANNOTATION_SPEC_HASH`](super::ANNOTATION_SPEC_HASH))
//! is compared like any annotation: a difference there means the object
//! was made from another desired spec than today's (an older executor's),
//! while hand edits leave it and show only as the fields they changed.

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::Value;

/// What differs between the Deployment the executor would send now and
/// the one the API server holds, one line per field, in the object's
/// order (`spec.template.spec.containers[replica].image: set
/// "vllm/vllm-openai:v0.11.0", found "vllm/vllm-openai:latest"`); empty
/// when nothing the executor set was changed.
pub fn drift(desired: &Deployment, live: &Deployment) -> Vec<String> {
    drift_json(
        &serde_json::to_value(desired).unwrap_or_default(),
        &serde_json::to_value(live).unwrap_or_default(),
    )
}

/// What an adopted object holds that is the executor's to keep: its
/// identity, labels, its own annotations, owners and spec (server-set
/// metadata and status aside, and controllers' annotations such as the
/// Deployment revision, which change by themselves).
pub fn adopted_baseline(live: &Value) -> Value {
    let mut metadata = serde_json::Map::new();
    for key in ["name", "namespace", "labels", "ownerReferences"] {
        if let Some(value) = live["metadata"].get(key) {
            metadata.insert(key.to_string(), value.clone());
        }
    }
    if let Some(annotations) = live["metadata"]["annotations"].as_object() {
        let own: serde_json::Map<String, Value> = annotations
            .iter()
            .filter(|(key, _)| key.starts_with("flotilla.dev/"))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        metadata.insert("annotations".into(), own.into());
    }
    serde_json::json!({
        "apiVersion": live["apiVersion"],
        "kind": live["kind"],
        "metadata": metadata,
        "spec": live["spec"],
    })
}

/// [`drift`] of any object as JSON (a LeaderWorkerSet, say).
pub fn drift_json(desired: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let meta = |v: &Value, key: &str| v.get("metadata").and_then(|m| m.get(key)).cloned();
    for key in ["labels", "annotations", "ownerReferences"] {
        if let Some(set) = meta(desired, key) {
            compare(
                &format!("metadata.{key}"),
                &set,
                meta(live, key).as_ref(),
                &mut out,
            );
        }
    }
    if let Some(set) = desired.get("spec") {
        compare("spec", set, live.get("spec"), &mut out);
    }
    out
}

/// The server omits empty lists, maps and strings.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn show(v: Option<&Value>) -> String {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return "nothing".into();
    };
    let text = v.to_string();
    if text.chars().count() > 120 {
        format!("{}...", text.chars().take(117).collect::<String>())
    } else {
        text
    }
}

/// Whether `path` holds a Kubernetes quantity the executor sends.
fn is_quantity(path: &str) -> bool {
    path.contains(".resources.limits.")
        || path.contains(".resources.requests.")
        || path.ends_with(".sizeLimit")
}

/// The name of every entry when `list` is a list of named objects.
fn names(list: &[Value]) -> Option<Vec<&str>> {
    list.iter()
        .map(|v| v.get("name").and_then(Value::as_str))
        .collect()
}

fn compare(path: &str, set: &Value, found: Option<&Value>, out: &mut Vec<String>) {
    let empty_found = found.is_none_or(is_empty);
    match (set, found) {
        (s, _) if is_empty(s) && empty_found => {}
        (Value::Object(s), Some(Value::Object(f))) => {
            for (key, value) in s {
                compare(&format!("{path}.{key}"), value, f.get(key), out);
            }
        }
        (Value::Array(s), Some(Value::Array(f))) => match (names(s), names(f)) {
            (Some(set_names), Some(found_names)) if !s.is_empty() => {
                for (name, value) in set_names.iter().zip(s) {
                    let other = found_names.iter().position(|n| n == name).map(|i| &f[i]);
                    compare(&format!("{path}[{name}]"), value, other, out);
                }
                for (name, value) in found_names.iter().zip(f) {
                    if !set_names.contains(name) {
                        out.push(format!(
                            "{path}[{name}]: set nothing, found {}",
                            show(Some(value))
                        ));
                    }
                }
            }
            _ if s.len() == f.len() => {
                for (i, (s, f)) in s.iter().zip(f).enumerate() {
                    compare(&format!("{path}[{i}]"), s, Some(f), out);
                }
            }
            _ if s.iter().chain(f).all(Value::is_object) => {
                // Entries without names (tolerations): matched by content.
                let like = |a: &Value, b: &Value| {
                    let mut d = Vec::new();
                    compare(path, a, Some(b), &mut d);
                    d.is_empty()
                };
                for value in s {
                    if !f.iter().any(|other| like(value, other)) {
                        out.push(format!(
                            "{path}: set {}, found nothing like it",
                            show(Some(value))
                        ));
                    }
                }
                for value in f {
                    if !s.iter().any(|other| like(other, value)) {
                        out.push(format!(
                            "{path}: set nothing like {}, found it",
                            show(Some(value))
                        ));
                    }
                }
            }
            // Words (arguments, commands): whole, since the difference may
            // be anywhere.
            _ => out.push(format!(
                "{path}: set {set}, found {}",
                found.map_or_else(|| "nothing".to_string(), Value::to_string)
            )),
        },
        (Value::String(s), Some(Value::String(f))) if is_quantity(path) => {
            if s != f && quantity_value(s).is_none_or(|a| Some(a) != quantity_value(f)) {
                out.push(format!(
                    "{path}: set {}, found {}",
                    show(Some(set)),
                    show(found)
                ));
            }
        }
        (s, Some(f)) if s == f => {}
        _ => out.push(format!(
            "{path}: set {}, found {}",
            show(Some(set)),
            show(found)
        )),
    }
}

/// A Kubernetes quantity (`500m`, `1.5`, `64Gi`, `1e3`, `2M`) in
/// thousandths of its unit, for comparing what was sent with what the
/// server wrote back in its own canonical form. `None` when it is not a
/// quantity or is too large.
pub fn quantity_value(text: &str) -> Option<i128> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let (negative, number) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number.strip_prefix('+').unwrap_or(number)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Digits as an integer scaled by 10^-decimals, then the suffix.
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let mut decimals = i32::try_from(fraction.len()).ok()?;
    let mut factor: i128 = 1;
    match suffix {
        "" => {}
        "n" => decimals += 9,
        "u" => decimals += 6,
        "m" => decimals += 3,
        "k" => factor = 1_000,
        "M" => factor = 1_000_000,
        "G" => factor = 1_000_000_000,
        "T" => factor = 1_000_000_000_000,
        "P" => factor = 1_000_000_000_000_000,
        "E" => factor = 1_000_000_000_000_000_000,
        "Ki" => factor = 1 << 10,
        "Mi" => factor = 1 << 20,
        "Gi" => factor = 1 << 30,
        "Ti" => factor = 1 << 40,
        "Pi" => factor = 1 << 50,
        "Ei" => factor = 1 << 60,
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().ok()?;
            decimals -= e;
        }
        _ => return None,
    }
    // Thousandths: 3 more decimals; the value stays exact down to them
    // (the server rounds finer values up to `1m` anyway).
    let mut value = digits.checked_mul(factor)?.checked_mul(1000)?;
    if decimals >= 0 {
        let divisor = 10i128.checked_pow(u32::try_from(decimals).ok()?)?;
        value = (value + divisor - 1) / divisor;
    } else {
        value = value.checked_mul(10i128.checked_pow(u32::try_from(-decimals).ok()?)?)?;
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{config, engine_spec};
    use super::super::{KubernetesConfig, deployment_object};
    use super::*;

    /// What the API server answers for `sent`: its defaults, status and
    /// bookkeeping added, empty values dropped, quantities in canonical
    /// form.
    fn as_stored(sent: &Deployment) -> Deployment {
        let mut v = serde_json::to_value(sent).unwrap();
        let meta = v["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!("6b1f8a3e-1111-4000-8000-000000000002"));
        meta.insert("resourceVersion".into(), json!("48213"));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!("2026-11-30T10:00:00Z"));
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "flotilla-executor", "operation": "Update"}]),
        );
        v["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = json!("1");
        let spec = &mut v["spec"];
        spec["revisionHistoryLimit"] = json!(10);
        spec["progressDeadlineSeconds"] = json!(600);
        let pod = &mut spec["template"]["spec"];
        pod["restartPolicy"] = json!("Always");
        pod["dnsPolicy"] = json!("ClusterFirst");
        pod["schedulerName"] = json!("default-scheduler");
        pod["securityContext"] = json!({});
        pod["terminationGracePeriodSeconds"] = json!(30);
        let container = &mut pod["containers"][0];
        container["imagePullPolicy"] = json!("IfNotPresent");
        container["terminationMessagePath"] = json!("/dev/termination-log");
        container["terminationMessagePolicy"] = json!("File");
        container["readinessProbe"]["successThreshold"] = json!(1);
        container["readinessProbe"]["httpGet"]["scheme"] = json!("HTTP");
        container["resources"]["requests"]["cpu"] = json!("8000m");
        container["resources"]["limits"]["memory"] = json!("98304Mi");
        v["status"] = json!({"replicas": 1, "readyReplicas": 1, "observedGeneration": 1});
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn what_the_server_adds_is_no_drift() {
        let desired = deployment_object(&config(), &engine_spec());
        assert_eq!(drift(&desired, &as_stored(&desired)), Vec::<String>::new());
        // Labels and annotations of others neither.
        let mut live = as_stored(&desired);
        live.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("team".into(), "ml".into());
        assert_eq!(drift(&desired, &live), Vec::<String>::new());
    }

    #[test]
    fn an_image_edited_by_hand_is_named() {
        let desired = deployment_object(&config(), &engine_spec());
        let mut live = as_stored(&desired);
        live.spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0]
            .image = Some("vllm/vllm-openai:latest".into());
        assert_eq!(
            drift(&desired, &live),
            [
                "spec.template.spec.containers[replica].image: set \"vllm/vllm-openai:v0.12.0\", \
                 found \"vllm/vllm-openai:latest\""
            ]
        );
    }

    #[test]
    fn scaling_environment_resources_selection_and_labels_edited_by_hand_are_named() {
        let desired = deployment_object(&config(), &engine_spec());
        let mut v = serde_json::to_value(as_stored(&desired)).unwrap();
        v["spec"]["replicas"] = json!(0);
        v["metadata"]["labels"]["flotilla.dev/generation"] = json!("4");
        let pod = &mut v["spec"]["template"]["spec"];
        pod["nodeSelector"]["pool"] = json!("batch");
        pod["tolerations"].as_array_mut().unwrap().pop();
        let container = &mut pod["containers"][0];
        container["env"][0]["value"] = json!("WARN");
        container["env"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "EXTRA", "value": "1"}));
        container["resources"]["limits"]["nvidia.com/gpu"] = json!("1");
        container["args"]
            .as_array_mut()
            .unwrap()
            .push(json!("--enforce-eager"));
        let live: Deployment = serde_json::from_value(v).unwrap();
        assert_eq!(
            drift(&desired, &live),
            [
                "metadata.labels.flotilla.dev/generation: set \"3\", found \"4\"",
                "spec.replicas: set 1, found 0",
                "spec.template.spec.containers[replica].args: set [\"/models/sha256-ab/model.gguf\",\"--served-model-name\",\"smollm2\",\"--host\",\"0.0.0.0\",\"--port\",\"8000\",\"--tensor-parallel-size\",\"2\",\"--max-model-len\",\"8192\",\"--gpu-memory-utilization\",\"0.9\",\"--quantization\",\"fp8\",\"--enable-prefix-caching\"], found [\"/models/sha256-ab/model.gguf\",\"--served-model-name\",\"smollm2\",\"--host\",\"0.0.0.0\",\"--port\",\"8000\",\"--tensor-parallel-size\",\"2\",\"--max-model-len\",\"8192\",\"--gpu-memory-utilization\",\"0.9\",\"--quantization\",\"fp8\",\"--enable-prefix-caching\",\"--enforce-eager\"]",
                "spec.template.spec.containers[replica].env[NCCL_DEBUG].value: set \"INFO\", found \"WARN\"",
                "spec.template.spec.containers[replica].env[EXTRA]: set nothing, found {\"name\":\"EXTRA\",\"value\":\"1\"}",
                "spec.template.spec.containers[replica].resources.limits.nvidia.com/gpu: set \"2\", found \"1\"",
                "spec.template.spec.nodeSelector.pool: set \"inference\", found \"batch\"",
                "spec.template.spec.tolerations: set {\"effect\":\"NoExecute\",\"key\":\"spot\",\"operator\":\"Exists\"}, found nothing like it",
            ]
        );
    }

    #[test]
    fn an_object_made_from_another_spec_shows_in_its_hash() {
        let old = deployment_object(&config(), &engine_spec());
        let mut newer = engine_spec();
        newer.engine.max_model_len = 4096;
        let desired = deployment_object(&config(), &newer);
        let found = drift(&desired, &as_stored(&old));
        assert!(
            found[0].starts_with("metadata.annotations.flotilla.dev/spec-hash: set "),
            "{found:?}"
        );
        assert!(found.iter().any(|d| d.contains("\"4096\"")), "{found:?}");
    }

    #[test]
    fn a_removed_owner_reference_is_drift() {
        let owned = KubernetesConfig {
            owner: Some(Default::default()),
            ..config()
        };
        let desired = deployment_object(&owned, &engine_spec());
        let mut live = as_stored(&desired);
        live.metadata.owner_references = None;
        assert_eq!(drift(&desired, &live).len(), 1);
        assert!(drift(&desired, &live)[0].starts_with("metadata.ownerReferences: set "));
    }

    #[test]
    fn quantities_compare_by_value() {
        for (a, b) in [
            ("1", "1000m"),
            ("0.5", "500m"),
            ("1Gi", "1024Mi"),
            ("96Gi", "98304Mi"),
            ("1k", "1000"),
            ("1e3", "1k"),
            ("2M", "2000k"),
            ("1.5Gi", "1536Mi"),
        ] {
            assert_eq!(quantity_value(a), quantity_value(b), "{a} {b}");
            assert!(quantity_value(a).is_some(), "{a}");
        }
        assert_ne!(quantity_value("1G"), quantity_value("1Gi"));
        assert_eq!(quantity_value("250m"), Some(250));
        for bad in ["", "Gi", "1.2.3", "1X", "abc"] {
            assert_eq!(quantity_value(bad), None, "{bad}");
        }
    }
}
