//! `apply --wait`: a deployment is ready when its rollout of the applied
//! generation has completed and as many replicas as it wants are Ready. It
//! has failed when placement finds it unschedulable or its rollout halts.

use anyhow::Context;
use flotilla_kit::{Bus, RecordStore};
use flotilla_proto::json::name_of;
use flotilla_proto::v1::{
    DeploymentPhase, ModelDeployment, ReplicaPhase, ReplicaStatus, RolloutPhase, RolloutState,
};
use futures::StreamExt;

/// Where a deployment stands, as far as waiting goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready(String),
    Failed(String),
    /// Not yet: what it is doing, for the timeout's message.
    Waiting(String),
}

/// Judges one moment. `generation` is the one applied; a later one counts
/// too (someone applied again meanwhile).
pub fn judge(
    name: &str,
    generation: u64,
    deployment: Option<&ModelDeployment>,
    rollout: Option<&RolloutState>,
    replicas: &[ReplicaStatus],
) -> Readiness {
    let Some(d) = deployment else {
        return Readiness::Failed(format!("deployment {name} was deleted while waiting"));
    };
    let status = d.status.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    if status.phase() == DeploymentPhase::Unschedulable && status.generation >= generation {
        return Readiness::Failed(format!(
            "unschedulable: {} (`flotilla describe deployment {name}` shows why each cluster was left out)",
            status.message
        ));
    }
    let desired = if status.desired_replicas > 0 {
        status.desired_replicas
    } else {
        spec.replicas.max(0).unsigned_abs()
    };
    let ready = replicas
        .iter()
        .filter(|r| r.deployment == name && r.phase() == ReplicaPhase::Ready)
        .count() as u32;
    let current = rollout.filter(|r| r.deployment_generation >= status.generation.max(generation));
    let rollout_phase = current.map_or("not started", |r| flotilla_rollout::phase_name(r.phase()));
    if let Some(r) = current {
        match r.phase() {
            RolloutPhase::Halted => {
                return Readiness::Failed(format!(
                    "its rollout halted: {} (`flotilla rollout undo {name}` returns to the previous version)",
                    r.message
                ));
            }
            RolloutPhase::Complete if ready >= desired => {
                return Readiness::Ready(format!("{ready}/{desired} replicas Ready"));
            }
            _ => {}
        }
    }
    let phase = match name_of::<DeploymentPhase>(status.phase) {
        "" => "Pending",
        p => p,
    };
    Readiness::Waiting(format!(
        "{phase} ({}), rollout {rollout_phase}, {ready}/{desired} replicas Ready",
        status.message
    ))
}

/// Waits until `name` is ready (`Ok(Ok(summary))`), has failed or the
/// deadline passed (`Ok(Err(reason))`).
pub async fn wait_ready(
    bus: &Bus,
    name: &str,
    generation: u64,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Result<String, String>> {
    let t = &bus.topology;
    let deployments = RecordStore::<ModelDeployment>::open(bus, &t.deployments.name).await?;
    let rollouts = RecordStore::<RolloutState>::open(bus, &t.rollouts.name).await?;
    let replicas = RecordStore::<ReplicaStatus>::open(bus, &t.replicas.name).await?;
    // Subscribed before the first look, so no change slips between.
    let mut changes = Vec::new();
    for bucket in [&t.deployments.name, &t.rollouts.name, &t.replicas.name] {
        let kv = bus
            .jetstream
            .get_key_value(bucket)
            .await
            .with_context(|| format!("opening KV {bucket}"))?;
        changes.push(kv.watch_all().await?);
    }
    let mut changes = futures::stream::select_all(changes);
    loop {
        let d = deployments.get(name).await?.map(|(d, _)| d);
        let r = rollouts.get(name).await?.map(|(r, _)| r);
        let reps: Vec<ReplicaStatus> = replicas
            .list()
            .await?
            .into_iter()
            .filter(|x| x.deployment == name)
            .collect();
        let waiting = match judge(name, generation, d.as_ref(), r.as_ref(), &reps) {
            Readiness::Ready(s) => return Ok(Ok(s)),
            Readiness::Failed(s) => return Ok(Err(s)),
            Readiness::Waiting(s) => s,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(Err(format!("not ready before the timeout: {waiting}")));
            }
            change = changes.next() => match change {
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("watching {name}: {e}"),
                None => anyhow::bail!("lost the connection to NATS"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1;

    fn deployment(replicas: i32, generation: u64, phase: DeploymentPhase) -> ModelDeployment {
        ModelDeployment {
            spec: Some(v1::ModelDeploymentSpec {
                replicas,
                ..Default::default()
            }),
            status: Some(v1::ModelDeploymentStatus {
                generation,
                phase: phase.into(),
                message: "no cluster has 8 free H100".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn rollout(generation: u64, phase: RolloutPhase) -> RolloutState {
        RolloutState {
            deployment: "web".into(),
            deployment_generation: generation,
            phase: phase.into(),
            message: "2 replicas failed".into(),
            ..Default::default()
        }
    }

    fn ready(n: usize) -> Vec<ReplicaStatus> {
        (0..n)
            .map(|i| ReplicaStatus {
                replica_id: format!("r{i}"),
                deployment: "web".into(),
                phase: ReplicaPhase::Ready.into(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn ready_failed_or_waiting() {
        let placed = deployment(2, 3, DeploymentPhase::Placed);
        let complete = rollout(3, RolloutPhase::Complete);
        assert!(matches!(
            judge("web", 3, Some(&placed), Some(&complete), &ready(2)),
            Readiness::Ready(_)
        ));
        // A complete rollout of the previous generation is not this one's.
        assert!(matches!(
            judge(
                "web",
                3,
                Some(&placed),
                Some(&rollout(2, RolloutPhase::Complete)),
                &ready(2)
            ),
            Readiness::Waiting(_)
        ));
        // Complete but short of replicas (a partial placement): waiting.
        let Readiness::Waiting(w) = judge("web", 3, Some(&placed), Some(&complete), &ready(1))
        else {
            panic!("not waiting");
        };
        assert!(w.contains("1/2 replicas Ready"), "{w}");
        let Readiness::Failed(f) = judge(
            "web",
            3,
            Some(&deployment(2, 3, DeploymentPhase::Unschedulable)),
            None,
            &[],
        ) else {
            panic!("not failed");
        };
        assert!(
            f.contains("unschedulable: no cluster has 8 free H100"),
            "{f}"
        );
        let Readiness::Failed(f) = judge(
            "web",
            3,
            Some(&placed),
            Some(&rollout(3, RolloutPhase::Halted)),
            &ready(2),
        ) else {
            panic!("not failed");
        };
        assert!(f.contains("halted: 2 replicas failed"), "{f}");
        assert!(matches!(
            judge("web", 3, None, None, &[]),
            Readiness::Failed(_)
        ));
    }
}
