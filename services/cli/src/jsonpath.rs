//! kubectl's JSONPath templates for `-o jsonpath=…`: text with `{…}`
//! expressions (`{.items[*].metadata.name}`, `{.spec.replicas}`), string
//! literals (`{"\n"}`) and `{range …}…{end}`. A path that finds nothing
//! prints nothing, as kubectl does by default.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jsonpath template {template:?}: {reason}")]
pub struct TemplateError {
    pub template: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Index(i64),
    All,
    /// `..name`: every `name` at any depth.
    Descend(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Path(Vec<Step>),
    Range(Vec<Step>, Vec<Node>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    nodes: Vec<Node>,
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(template: &str) -> Result<Self, TemplateError> {
        let err = |reason: String| TemplateError {
            template: template.to_string(),
            reason,
        };
        // Frames of open `range`s: their path and the nodes so far.
        let mut frames: Vec<(Vec<Step>, Vec<Node>)> = vec![(Vec::new(), Vec::new())];
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '{' {
                text.push(c);
                continue;
            }
            let mut inner = String::new();
            let mut quoted = false;
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' if quoted => {
                        inner.push(c);
                        if let Some(n) = chars.next() {
                            inner.push(n);
                        }
                    }
                    '"' => {
                        quoted = !quoted;
                        inner.push(c);
                    }
                    '}' if !quoted => {
                        closed = true;
                        break;
                    }
                    _ => inner.push(c),
                }
            }
            if !closed {
                return Err(err("a `{` is not closed".into()));
            }
            let frame = frames.last_mut().ok_or_else(|| err("unbalanced".into()))?;
            if !text.is_empty() {
                frame.1.push(Node::Text(std::mem::take(&mut text)));
            }
            let inner = inner.trim();
            if let Some(path) = inner.strip_prefix("range ") {
                let path = parse_path(path.trim()).map_err(err)?;
                frames.push((path, Vec::new()));
            } else if inner == "end" {
                if frames.len() < 2 {
                    return Err(err("`{end}` without a `{range …}`".into()));
                }
                let Some((path, body)) = frames.pop() else {
                    return Err(err("unbalanced".into()));
                };
                if let Some(outer) = frames.last_mut() {
                    outer.1.push(Node::Range(path, body));
                }
            } else if inner.starts_with('"') {
                frame.1.push(Node::Text(parse_literal(inner).map_err(err)?));
            } else {
                frame.1.push(Node::Path(parse_path(inner).map_err(err)?));
            }
        }
        if frames.len() != 1 {
            return Err(err("a `{range …}` has no `{end}`".into()));
        }
        let mut nodes = frames.pop().map(|f| f.1).unwrap_or_default();
        if !text.is_empty() {
            nodes.push(Node::Text(text));
        }
        Ok(Self { nodes })
    }
}

fn parse_literal(s: &str) -> Result<String, String> {
    let body = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or_else(|| format!("{s} is not a closed string literal"))?;
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(c @ ('\\' | '"')) => out.push(c),
            other => return Err(format!("unknown escape \\{}", other.unwrap_or(' '))),
        }
    }
    Ok(out)
}

fn parse_path(s: &str) -> Result<Vec<Step>, String> {
    let s = s
        .strip_prefix('$')
        .or_else(|| s.strip_prefix('@'))
        .unwrap_or(s);
    let chars: Vec<char> = s.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    let name_at = |mut i: usize| {
        let start = i;
        while i < chars.len() && !matches!(chars[i], '.' | '[') {
            i += 1;
        }
        (chars[start..i].iter().collect::<String>(), i)
    };
    while i < chars.len() {
        match chars[i] {
            '.' if chars.get(i + 1) == Some(&'.') => {
                let (name, next) = name_at(i + 2);
                if name.is_empty() {
                    return Err(format!("`..` needs a field name in {s:?}"));
                }
                steps.push(Step::Descend(name));
                i = next;
            }
            '.' => {
                let (name, next) = name_at(i + 1);
                match name.as_str() {
                    "" if next == chars.len() => {}
                    "" => return Err(format!("an empty field name in {s:?}")),
                    "*" => steps.push(Step::All),
                    _ => steps.push(Step::Field(name)),
                }
                i = next;
            }
            '[' => {
                let close = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .map(|p| p + i)
                    .ok_or_else(|| format!("a `[` is not closed in {s:?}"))?;
                let inside: String = chars[i + 1..close].iter().collect();
                let inside = inside.trim();
                if inside == "*" {
                    steps.push(Step::All);
                } else if let Some(key) = inside
                    .strip_prefix('\'')
                    .and_then(|k| k.strip_suffix('\''))
                    .or_else(|| inside.strip_prefix('"').and_then(|k| k.strip_suffix('"')))
                {
                    steps.push(Step::Field(key.to_string()));
                } else {
                    let n = inside.parse::<i64>().map_err(|_| {
                        format!("[{inside}] is neither an index, `*` nor a quoted key")
                    })?;
                    steps.push(Step::Index(n));
                }
                i = close + 1;
            }
            _ => {
                let (name, next) = name_at(i);
                steps.push(Step::Field(name));
                i = next;
            }
        }
    }
    Ok(steps)
}

fn select<'a>(values: Vec<&'a Value>, steps: &[Step]) -> Vec<&'a Value> {
    let mut current = values;
    for step in steps {
        let mut next = Vec::new();
        for v in current {
            match step {
                Step::Field(name) => {
                    if let Some(x) = v.get(name.as_str()) {
                        next.push(x);
                    }
                }
                Step::Index(n) => {
                    if let Value::Array(items) = v {
                        let at = if *n < 0 { items.len() as i64 + n } else { *n };
                        if let Some(x) = usize::try_from(at).ok().and_then(|at| items.get(at)) {
                            next.push(x);
                        }
                    }
                }
                Step::All => match v {
                    Value::Array(items) => next.extend(items.iter()),
                    Value::Object(map) => next.extend(map.values()),
                    _ => {}
                },
                Step::Descend(name) => descend(v, name, &mut next),
            }
        }
        current = next;
    }
    current
}

fn descend<'a>(v: &'a Value, name: &str, found: &mut Vec<&'a Value>) {
    match v {
        Value::Object(map) => {
            if let Some(x) = map.get(name) {
                found.push(x);
            }
            for x in map.values() {
                descend(x, name, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|x| descend(x, name, found)),
        _ => {}
    }
}

fn print(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Template {
    pub fn render(&self, data: &Value) -> String {
        let mut out = String::new();
        render_nodes(&self.nodes, data, &mut out);
        out
    }
}

fn render_nodes(nodes: &[Node], data: &Value, out: &mut String) {
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Path(steps) => {
                let found: Vec<String> = select(vec![data], steps).into_iter().map(print).collect();
                out.push_str(&found.join(" "));
            }
            Node::Range(steps, body) => {
                for v in select(vec![data], steps) {
                    match v {
                        // `{range .items[*]}` gives the items; `{range .items}` too.
                        Value::Array(items) if !matches!(steps.last(), Some(Step::All)) => {
                            for item in items {
                                render_nodes(body, item, out);
                            }
                        }
                        _ => render_nodes(body, v, out),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(t: &str, v: &Value) -> String {
        t.parse::<Template>()
            .unwrap_or_else(|e| panic!("{e}"))
            .render(v)
    }

    #[test]
    fn paths_indexes_wildcards_and_literals() {
        let list = json!({"items": [
            {"metadata": {"name": "a", "labels": {"app.kubernetes.io/name": "x"}}, "spec": {"replicas": 2}},
            {"metadata": {"name": "b"}, "spec": {"replicas": 3}},
        ]});
        assert_eq!(render("{.items[*].metadata.name}", &list), "a b");
        assert_eq!(render("{.items[0].spec.replicas}", &list), "2");
        assert_eq!(render("{.items[-1].metadata.name}", &list), "b");
        assert_eq!(
            render(
                "{.items[0].metadata.labels['app.kubernetes.io/name']}",
                &list
            ),
            "x"
        );
        assert_eq!(
            render(
                "{range .items[*]}{.metadata.name}={.spec.replicas}{\"\\n\"}{end}",
                &list
            ),
            "a=2\nb=3\n"
        );
        assert_eq!(render("names: {..name}", &list), "names: a b");
        assert_eq!(render("{.items[0].spec}", &list), r#"{"replicas":2}"#);
        assert_eq!(render("{.nothing.here}", &list), "");
        assert_eq!(render("{$.items[1].metadata.name}", &list), "b");
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (t, says) in [
            ("{.a", "not closed"),
            ("{range .items[*]}{.a}", "no `{end}`"),
            ("{end}", "without"),
            ("{.a[x]}", "[x]"),
            ("{\"\\q\"}", "escape"),
        ] {
            let e = t.parse::<Template>().unwrap_err().to_string();
            assert!(e.contains(says), "{t}: {e}");
        }
    }
}
