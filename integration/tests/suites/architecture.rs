//! The workspace's layering, checked from `cargo metadata` so that a wrong
//! arrow fails the suite instead of waiting for a reviewer:
//!
//! - a service crate (`services/*`, the CLI aside) depends on no other
//!   service crate; logic two services share moves down into `crates/`;
//! - a library crate (`crates/*`, `proto/`) depends on no service crate,
//!   on the CLI or on the test crate;
//! - only the CLI (`flotilla`, the composition root) and the test crate may
//!   depend on service crates;
//! - the runner does not link `async-nats`: an inference replica carries no
//!   bus client, whatever its library crates pull in;
//! - every crate takes the workspace's lints (`unsafe_code = "forbid"`)
//!   except `flotilla-kernels`, the one crate allowed `unsafe`.
//!
//! docs/architecture.md states the same rules as each crate's Invariant.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// `crates/*` and `proto/`: no service logic.
    Library,
    /// `services/*` except the CLI: one running thing each.
    Service,
    /// `services/cli`: the one crate that assembles services.
    CompositionRoot,
    /// `integration/`: tests of everything together.
    Tests,
}

#[derive(Debug)]
struct Member {
    name: String,
    layer: Layer,
    manifest: PathBuf,
    /// Workspace members this one depends on, with the kind of each edge.
    internal: Vec<(String, &'static str)>,
    /// Names of the registry crates it depends on normally (not dev, not build).
    external_normal: BTreeSet<String>,
}

fn layer_of(root: &Path, manifest: &Path) -> Layer {
    let rel = manifest.strip_prefix(root).unwrap_or(manifest);
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    match first.as_deref() {
        Some("services") if rel.starts_with("services/cli") => Layer::CompositionRoot,
        Some("services") => Layer::Service,
        Some("integration") => Layer::Tests,
        _ => Layer::Library,
    }
}

fn workspace() -> (PathBuf, BTreeMap<String, Member>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let root = PathBuf::from(meta["workspace_root"].as_str().expect("workspace_root"));
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    let mut members = BTreeMap::new();
    for p in packages {
        let name = p["name"].as_str().expect("name").to_owned();
        let manifest = PathBuf::from(p["manifest_path"].as_str().expect("manifest_path"));
        let mut internal = Vec::new();
        let mut external_normal = BTreeSet::new();
        for d in p["dependencies"].as_array().expect("dependencies") {
            let dep = d["name"].as_str().expect("dependency name").to_owned();
            let kind = match d["kind"].as_str() {
                Some("dev") => "dev",
                Some("build") => "build",
                _ => "normal",
            };
            if names.contains(&dep) {
                internal.push((dep, kind));
            } else if kind == "normal" {
                external_normal.insert(dep);
            }
        }
        let dir = manifest
            .parent()
            .expect("manifest has a folder")
            .to_path_buf();
        members.insert(
            name.clone(),
            Member {
                name,
                layer: layer_of(&root, &dir),
                manifest,
                internal,
                external_normal,
            },
        );
    }
    (root, members)
}

/// Every edge that breaks a layering rule, in words.
fn layering_violations(members: &BTreeMap<String, Member>) -> Vec<String> {
    let mut out = Vec::new();
    for m in members.values() {
        for (dep, kind) in &m.internal {
            let Some(target) = members.get(dep) else {
                continue;
            };
            let wrong = match (m.layer, target.layer) {
                (Layer::Service, Layer::Service) => {
                    Some("a service crate depends on another service crate")
                }
                (Layer::Library, Layer::Service | Layer::CompositionRoot | Layer::Tests) => {
                    Some("a library crate depends on a crate above it")
                }
                (Layer::Service, Layer::CompositionRoot | Layer::Tests) => {
                    Some("a service crate depends on a crate above it")
                }
                _ => None,
            };
            if let Some(why) = wrong {
                out.push(format!("{} -> {} ({kind}): {why}", m.name, target.name));
            }
        }
    }
    out
}

/// The workspace members `from` links, itself included (normal edges only).
fn linked_members<'a>(members: &'a BTreeMap<String, Member>, from: &str) -> Vec<&'a Member> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from.to_owned()];
    let mut out = Vec::new();
    while let Some(name) = stack.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let Some(m) = members.get(&name) else {
            continue;
        };
        out.push(m);
        for (dep, kind) in &m.internal {
            if *kind == "normal" {
                stack.push(dep.clone());
            }
        }
    }
    out
}

#[test]
fn no_service_crate_depends_on_another_and_no_arrow_runs_up() {
    let (_, members) = workspace();
    assert!(
        members.values().any(|m| m.layer == Layer::Service),
        "no service crates found under services/: the layout changed, update this test"
    );
    let violations = layering_violations(&members);
    assert!(
        violations.is_empty(),
        "layering rules broken:\n  {}",
        violations.join("\n  ")
    );
}

#[test]
fn the_runner_does_not_link_the_bus_client() {
    let (_, members) = workspace();
    let linked = linked_members(&members, "flotilla-runner");
    assert!(
        !linked.is_empty(),
        "flotilla-runner is not a workspace member"
    );
    let with_nats: Vec<&str> = linked
        .iter()
        .filter(|m| m.external_normal.contains("async-nats"))
        .map(|m| m.name.as_str())
        .collect();
    assert!(
        with_nats.is_empty(),
        "flotilla-runner links async-nats through {with_nats:?}"
    );
}

#[test]
fn only_the_kernels_crate_may_use_unsafe() {
    let (root, members) = workspace();
    let workspace_manifest =
        std::fs::read_to_string(root.join("Cargo.toml")).expect("root Cargo.toml reads");
    assert!(
        workspace_manifest.contains("unsafe_code = \"forbid\""),
        "the workspace lints no longer forbid unsafe_code"
    );
    let mut without = Vec::new();
    for m in members.values() {
        if m.name == "flotilla-kernels" {
            continue;
        }
        let text = std::fs::read_to_string(&m.manifest).expect("member manifest reads");
        if !takes_workspace_lints(&text) {
            without.push(m.name.clone());
        }
    }
    assert!(
        without.is_empty(),
        "crates that do not take the workspace lints (and so may use unsafe): {without:?}"
    );
}

/// Whether a manifest has `[lints]` with `workspace = true`.
fn takes_workspace_lints(manifest: &str) -> bool {
    let mut in_lints = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_lints = line == "[lints]";
        } else if in_lints && line.replace(' ', "") == "workspace=true" {
            return true;
        }
    }
    false
}

#[test]
fn the_rules_catch_a_service_that_uses_another_service() {
    // The check itself must be able to fail: a made-up edge from rollout to
    // placement is reported.
    let (_, mut members) = workspace();
    let rollout = members
        .get_mut("flotilla-rollout")
        .expect("rollout is a member");
    rollout
        .internal
        .push(("flotilla-placement".into(), "normal"));
    let violations = layering_violations(&members);
    assert_eq!(
        violations,
        vec![
            "flotilla-rollout -> flotilla-placement (normal): a service crate depends on another service crate"
                .to_owned()
        ]
    );
    assert!(!takes_workspace_lints(
        "[lints.rust]\nunsafe_code = \"allow\"\n"
    ));
    assert!(takes_workspace_lints("[lints]\nworkspace = true\n"));
}
