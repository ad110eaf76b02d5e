//! What pods say about replicas, as pure functions: [`pod_state`] reads
//! one pod, [`observe_pods`] turns one listing of the cluster's replica
//! pods into the [`Observation`] of the replicas this executor runs. The
//! backend lists the pods, calls it and applies the result.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Pod;

use super::objects::multinode::{LABEL_ROLE, ROLE_WORKER};
use super::objects::{PORT, replica_of};
use crate::backends::{Moved, Observation, ReplicaFailure};

/// Container waiting reasons that mean the replica will not start by
/// itself.
const FATAL_WAITING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Whether the pod's `Ready` condition holds.
fn is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A worker of a multi-node replica: it joins the leader and serves
/// nothing itself, so its being ready says nothing of the replica.
fn is_worker(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_ROLE))
        .is_some_and(|role| role == ROLE_WORKER)
}

/// What one pod says about its replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Ready; its base URL.
    Ready(String),
    /// Scheduling, pulling, loading.
    Pending,
    /// It will not become ready by itself; why.
    Failed(String),
}

pub fn pod_state(pod: &Pod) -> PodState {
    let Some(status) = pod.status.as_ref() else {
        return PodState::Pending;
    };
    if status.phase.as_deref() == Some("Failed") {
        return PodState::Failed(format!(
            "pod failed: {}",
            status
                .message
                .clone()
                .or_else(|| status.reason.clone())
                .unwrap_or_default()
        ));
    }
    // An init container (the model fetch) that keeps failing holds the
    // pod in Pending for good, as a crash-looping engine would.
    let init = status.init_container_statuses.iter().flatten();
    let main = status.container_statuses.iter().flatten();
    for (kind, container) in init
        .map(|c| ("init container", c))
        .chain(main.map(|c| ("container", c)))
    {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            if FATAL_WAITING_REASONS.contains(&reason.as_str()) {
                let last_exit = container
                    .last_state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .map(|t| {
                        format!(
                            " (last exit code {}{})",
                            t.exit_code,
                            t.message
                                .as_deref()
                                .map(|m| format!(": {}", m.trim()))
                                .unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
                return PodState::Failed(format!(
                    "{kind} {}: {reason}: {}{last_exit}",
                    container.name,
                    waiting.message.clone().unwrap_or_default()
                ));
            }
        }
    }
    match (is_ready(pod), status.pod_ip.as_deref()) {
        (true, Some(ip)) if !ip.is_empty() && !is_worker(pod) => {
            PodState::Ready(format!("http://{ip}:{PORT}"))
        }
        _ => PodState::Pending,
    }
}

/// How a pod that is not ready yet is getting on, as Kubernetes says it:
/// (reason, message). Not scheduled (`Unschedulable`, with the
/// scheduler's "0/3 nodes are available: 3 Insufficient nvidia.com/gpu";
/// the cluster autoscaler may still add a node), a container waiting for
/// a non-fatal reason (`ContainerCreating` while the image is pulled,
/// `PodInitializing`), running but not ready yet (the model is loading),
/// or `Scheduled` on its node. `None` for a ready or failed pod and one
/// not yet seen by the scheduler.
pub fn pod_progress(pod: &Pod) -> Option<(String, String)> {
    if !matches!(pod_state(pod), PodState::Pending) || is_ready(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let scheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled");
    if let Some(c) = scheduled.filter(|c| c.status == "False") {
        return Some((
            c.reason.clone().unwrap_or_else(|| "Unschedulable".into()),
            c.message.clone().unwrap_or_default(),
        ));
    }
    for container in status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
    {
        if let Some(waiting) = container.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            if !reason.is_empty() {
                return Some((reason, waiting.message.clone().unwrap_or_default()));
            }
        }
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    if status
        .container_statuses
        .iter()
        .flatten()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
    {
        return Some((
            "Started".into(),
            format!("running on {node}, not ready yet (loading the model)"),
        ));
    }
    scheduled
        .filter(|c| c.status == "True")
        .map(|_| ("Scheduled".into(), format!("assigned to node {node}")))
}

/// What `pods` (the cluster's replica pods, listed at once) say about the
/// replicas in `running` (replica id to the base URL it serves at), in
/// replica-id order. A replica with a ready pod serves: where it did,
/// unless no ready pod is there any more, then it moved to the first ready
/// one (its pod was re-created on another node). A replica without a
/// ready pod but with a failed one failed. Anything else (pending, no pod
/// yet) is left alone.
pub fn observe_pods(running: &HashMap<String, String>, pods: &[Pod]) -> Observation {
    let mut ids: Vec<&String> = running.keys().collect();
    ids.sort();
    let mut seen = Observation::default();
    for id in ids {
        let states: Vec<PodState> = pods
            .iter()
            .filter(|p| replica_of(&p.metadata) == Some(id))
            .map(pod_state)
            .collect();
        let ready: Vec<&String> = states
            .iter()
            .filter_map(|s| match s {
                PodState::Ready(url) => Some(url),
                _ => None,
            })
            .collect();
        if let Some(first) = ready.first() {
            if running.get(id).is_some_and(|now| !ready.contains(&now)) {
                seen.moved.push(Moved {
                    replica_id: id.clone(),
                    endpoint: (*first).clone(),
                });
            }
            continue;
        }
        if let Some(reason) = states.into_iter().find_map(|s| match s {
            PodState::Failed(why) => Some(why),
            _ => None,
        }) {
            seen.failed.push(ReplicaFailure {
                replica_id: id.clone(),
                reason,
            });
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::backends::kubernetes::{LABEL_CLUSTER, LABEL_REPLICA};

    fn pod(replica: &str, status: Value) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("flotilla-{replica}-abc"),
                         "labels": {LABEL_REPLICA: replica, LABEL_CLUSTER: "eu-1"}},
            "status": status,
        }))
        .unwrap()
    }

    fn ready(ip: &str) -> Value {
        json!({"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]})
    }

    fn waiting(reason: &str) -> Value {
        json!({"phase": "Running", "containerStatuses": [{
            "name": "replica", "image": "flotilla-runner:test", "imageID": "",
            "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": reason, "message": "back-off 1m0s"}}}]})
    }

    #[test]
    fn a_pending_pod_says_how_it_gets_on() {
        let unschedulable = json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]});
        let creating = json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "replica", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]});
        let loading = json!({"phase": "Running", "podIP": "10.0.0.1",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "replica", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"running": {}}}]});
        let scheduled = json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}]});
        let said = |status: Value| {
            let mut p = pod("r", status);
            p.spec = Some(
                serde_json::from_value(json!({"nodeName": "gpu-1", "containers": []})).unwrap(),
            );
            pod_progress(&p)
        };
        let pair = |r: &str, m: &str| Some((r.to_string(), m.to_string()));
        assert_eq!(
            said(unschedulable),
            pair(
                "Unschedulable",
                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
            )
        );
        assert_eq!(said(creating), pair("ContainerCreating", ""));
        assert_eq!(
            said(loading),
            pair(
                "Started",
                "running on gpu-1, not ready yet (loading the model)"
            )
        );
        assert_eq!(said(scheduled), pair("Scheduled", "assigned to node gpu-1"));
        assert_eq!(
            said(json!({"phase": "Pending"})),
            None,
            "not seen by the scheduler yet"
        );
        assert_eq!(said(ready("10.0.0.1")), None);
        assert_eq!(
            said(waiting("CrashLoopBackOff")),
            None,
            "failed, not progress"
        );
    }

    #[test]
    fn a_pod_is_ready_pending_or_failed() {
        let cases = [
            ("no status yet", Value::Null, PodState::Pending),
            (
                "ready with an address",
                ready("10.1.2.3"),
                PodState::Ready("http://10.1.2.3:8000".into()),
            ),
            (
                "ready without an address",
                json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
                PodState::Pending,
            ),
            (
                "running, not ready",
                json!({"phase": "Running", "podIP": "10.1.2.3", "conditions": [{"type": "Ready", "status": "False"}]}),
                PodState::Pending,
            ),
            (
                "failed, with a message",
                json!({"phase": "Failed", "message": "The node was low on resource: memory.", "reason": "Evicted"}),
                PodState::Failed("pod failed: The node was low on resource: memory.".into()),
            ),
            (
                "failed, with a reason only",
                json!({"phase": "Failed", "reason": "Evicted"}),
                PodState::Failed("pod failed: Evicted".into()),
            ),
            (
                "crash loop",
                waiting("CrashLoopBackOff"),
                PodState::Failed("container replica: CrashLoopBackOff: back-off 1m0s".into()),
            ),
            (
                "image pull",
                waiting("ImagePullBackOff"),
                PodState::Failed("container replica: ImagePullBackOff: back-off 1m0s".into()),
            ),
            (
                "still creating its container",
                waiting("ContainerCreating"),
                PodState::Pending,
            ),
            (
                "its model fetch keeps failing",
                json!({"phase": "Pending",
                       "initContainerStatuses": [{
                           "name": "fetch-model", "image": "flotilla-executor:test", "imageID": "",
                           "ready": false, "restartCount": 3,
                           "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                           "lastState": {"terminated": {"exitCode": 1,
                               "message": "model smollm2 is sha256:aa, not sha256:bb\n"}}}],
                       "containerStatuses": [{
                           "name": "replica", "image": "flotilla-runner:test", "imageID": "",
                           "ready": false, "restartCount": 0,
                           "state": {"waiting": {"reason": "PodInitializing"}}}]}),
                PodState::Failed(
                    "init container fetch-model: CrashLoopBackOff: back-off 40s \
                     (last exit code 1: model smollm2 is sha256:aa, not sha256:bb)"
                        .into(),
                ),
            ),
            (
                "its model fetch still running",
                json!({"phase": "Pending",
                       "initContainerStatuses": [{
                           "name": "fetch-model", "image": "flotilla-executor:test", "imageID": "",
                           "ready": false, "restartCount": 0,
                           "state": {"running": {}}}]}),
                PodState::Pending,
            ),
        ];
        for (what, status, expected) in cases {
            assert_eq!(pod_state(&pod("r", status)), expected, "{what}");
        }
    }

    /// (what, running (replica, IP), pods (replica, status), expected).
    type Case = (
        &'static str,
        Vec<(&'static str, &'static str)>,
        Vec<(&'static str, Value)>,
        Observation,
    );

    #[test]
    fn one_listing_says_which_replicas_failed_and_which_moved() {
        let at = |ip: &str| format!("http://{ip}:8000");
        let failure = |id: &str, reason: &str| ReplicaFailure {
            replica_id: id.into(),
            reason: reason.into(),
        };
        let moved = |id: &str, ip: &str| Moved {
            replica_id: id.into(),
            endpoint: at(ip),
        };
        let evicted = json!({"phase": "Failed", "message": "evicted"});
        let cases: Vec<Case> = vec![
            (
                "ready where it started",
                vec![("a", "10.0.0.1")],
                vec![("a", ready("10.0.0.1"))],
                Observation::default(),
            ),
            (
                "re-created on another node",
                vec![("a", "10.0.0.1")],
                vec![("a", ready("10.0.0.9"))],
                Observation {
                    moved: vec![moved("a", "10.0.0.9")],
                    ..Default::default()
                },
            ),
            (
                "the old address still ready beside a new pod",
                vec![("a", "10.0.0.1")],
                vec![("a", ready("10.0.0.9")), ("a", ready("10.0.0.1"))],
                Observation::default(),
            ),
            (
                "failed",
                vec![("a", "10.0.0.1")],
                vec![("a", evicted.clone())],
                Observation {
                    failed: vec![failure("a", "pod failed: evicted")],
                    ..Default::default()
                },
            ),
            (
                "a failed pod beside a ready one: still serving",
                vec![("a", "10.0.0.1")],
                vec![("a", evicted.clone()), ("a", ready("10.0.0.1"))],
                Observation::default(),
            ),
            (
                "a failed old pod and a ready new one: moved",
                vec![("a", "10.0.0.1")],
                vec![("a", evicted.clone()), ("a", ready("10.0.0.9"))],
                Observation {
                    moved: vec![moved("a", "10.0.0.9")],
                    ..Default::default()
                },
            ),
            (
                "pending again (its node went): left alone",
                vec![("a", "10.0.0.1")],
                vec![("a", json!({"phase": "Pending"}))],
                Observation::default(),
            ),
            (
                "no pod at all: left alone",
                vec![("a", "10.0.0.1")],
                vec![],
                Observation::default(),
            ),
            (
                "pods of replicas this executor does not run are ignored",
                vec![("a", "10.0.0.1")],
                vec![("a", ready("10.0.0.1")), ("stray", evicted.clone())],
                Observation::default(),
            ),
            (
                "several replicas, in id order",
                vec![("c", "10.0.0.3"), ("a", "10.0.0.1"), ("b", "10.0.0.2")],
                vec![
                    ("c", waiting("CrashLoopBackOff")),
                    ("b", ready("10.0.0.7")),
                    ("a", evicted.clone()),
                ],
                Observation {
                    failed: vec![
                        failure("a", "pod failed: evicted"),
                        failure("c", "container replica: CrashLoopBackOff: back-off 1m0s"),
                    ],
                    moved: vec![moved("b", "10.0.0.7")],
                    ..Default::default()
                },
            ),
        ];
        for (what, running, pods, expected) in cases {
            let running: HashMap<String, String> = running
                .into_iter()
                .map(|(id, ip)| (id.to_string(), at(ip)))
                .collect();
            let pods: Vec<Pod> = pods.into_iter().map(|(r, s)| pod(r, s)).collect();
            assert_eq!(observe_pods(&running, &pods), expected, "{what}");
        }
    }
}
