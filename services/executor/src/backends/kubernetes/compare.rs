//! Whether a live object is still what the executor sent: every field the
//! executor set must hold the value it set; fields the API server or a
//! controller added (defaults, status, annotations of `kubectl rollout`)
//! are not differences.

use serde_json::Value;

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 80 {
        format!("{}...", text.chars().take(77).collect::<String>())
    } else {
        text
    }
}

fn walk(path: &str, sent: &Value, live: Option<&Value>, out: &mut Vec<String>) {
    let live_or_null = live.unwrap_or(&Value::Null);
    match (sent, live) {
        // The server drops empty lists, maps and strings.
        (s, None) if is_empty(s) => {}
        (s, Some(l)) if is_empty(s) && is_empty(l) => {}
        (Value::Object(s), Some(Value::Object(l))) => {
            for (key, value) in s {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(&path, value, l.get(key), out);
            }
        }
        (Value::Array(s), Some(Value::Array(l))) if s.len() == l.len() => {
            for (i, (s, l)) in s.iter().zip(l).enumerate() {
                walk(&format!("{path}[{i}]"), s, Some(l), out);
            }
        }
        (s, Some(l)) if s == l => {}
        (s, _) => out.push(format!(
            "{path}: sent {}, found {}",
            short(s),
            if live.is_none() {
                "nothing".to_string()
            } else {
                short(live_or_null)
            }
        )),
    }
}

/// Where `live` no longer holds what `sent` set, one line per field
/// (`spec.template.spec.containers[0].image: sent "a", found "b"`), in
/// document order. Only `metadata.labels`, `metadata.annotations` and
/// `spec` are compared: the rest is the server's.
pub fn differences(sent: &Value, live: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for (section, key) in [
        ("metadata", "labels"),
        ("metadata", "annotations"),
        ("spec", ""),
    ] {
        let pick = |v: &Value| {
            let v = v.get(section)?;
            if key.is_empty() {
                Some(v.clone())
            } else {
                v.get(key).cloned()
            }
        };
        let path = if key.is_empty() {
            section.to_string()
        } else {
            format!("{section}.{key}")
        };
        if let Some(s) = pick(sent) {
            walk(&path, &s, pick(live).as_ref(), &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_what_was_sent_is_compared() {
        let sent = json!({
            "metadata": {"name": "d", "labels": {"a": "1"}, "annotations": {"m": "x"}},
            "spec": {"replicas": 1, "template": {"spec": {
                "containers": [{"name": "c", "image": "one", "env": [], "args": ["--x"]}]}}}
        });
        let mut live = json!({
            "metadata": {"name": "d", "uid": "u", "resourceVersion": "9",
                         "labels": {"a": "1", "added": "by-someone"},
                         "annotations": {"m": "x", "deployment.kubernetes.io/revision": "2"}},
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "template": {"spec": {
                "containers": [{"name": "c", "image": "one", "args": ["--x"],
                                "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"replicas": 1}
        });
        assert_eq!(differences(&sent, &live), Vec::<String>::new());
        live["spec"]["template"]["spec"]["containers"][0]["image"] = json!("two");
        live["spec"]["replicas"] = json!(0);
        live["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("a");
        assert_eq!(
            differences(&sent, &live),
            [
                "metadata.labels.a: sent \"1\", found nothing",
                "spec.replicas: sent 1, found 0",
                "spec.template.spec.containers[0].image: sent \"one\", found \"two\"",
            ]
        );
        live["spec"]["template"]["spec"]["containers"][0]["args"] = json!(["--x", "--y"]);
        assert!(
            differences(&sent, &live)
                .iter()
                .any(|d| d.starts_with("spec.template.spec.containers[0].args: sent [\"--x\"]")),
            "{:?}",
            differences(&sent, &live)
        );
    }
}
