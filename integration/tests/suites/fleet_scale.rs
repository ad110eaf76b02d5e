//! The fleet-scale scenario of `bench-fleet`, small enough for the suite:
//! simulated member clusters, the real hub services as processes, and
//! kills at a point drawn at random; what must hold is the end state
//! (every deployment placed and rolled out, exactly its replicas ready,
//! no replica started or stopped twice), which
//! [`flotilla_integration::fleet_scale::verify`] checks inside `run`.

use std::time::Duration;

use flotilla_integration::fleet_scale::{Report, Scenario};

/// A kill point between 0.3 and 1.5 s into a rollout round (which takes
/// about 2 s here), drawn from the clock; in the failure message, so a
/// failing run can be repeated with it (`bench-fleet --kill-after`).
fn random_kill_point() -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Duration::from_millis(300 + u64::from(nanos % 1200))
}

fn small(kill_after: Duration) -> Scenario {
    Scenario {
        clusters: 40,
        deployments: 20,
        clusters_per_deployment: 8,
        rollouts: 10,
        apply_rate: 10.0,
        singles: 1,
        ready_after: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(500),
        gpus: "16xH100-80GB".into(),
        kill_after,
        phase_deadline: Duration::from_secs(120),
        ..Scenario::default()
    }
}

async fn run(scenario: Scenario) -> Report {
    let kill_after = scenario.kill_after;
    match scenario
        .run(&mut |line| eprintln!("[fleet_scale] {line}"))
        .await
    {
        Ok(report) => report,
        Err(e) => panic!("with kills {kill_after:?} into a rollout round: {e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_hub_service_killed_mid_rollout_leaves_each_deployment_rolled_out_once() {
    let scenario = Scenario {
        hub_restart: true,
        ..small(random_kill_point())
    };
    let want = (scenario.deployments + 1 + 10 + 1) * scenario.clusters_per_deployment;
    let report = run(scenario).await;
    // 20 deployments, 1 applied alone, 10 during the rollouts and 1 at the
    // restart.
    assert_eq!(report.replicas_ready, want);
    assert!(report.halted.is_empty(), "halted: {:?}", report.halted);
    assert!(report.restart_consistent.is_some());
    assert!(report.restart_progressing.is_some());
    // No cluster fails: no replica has a reason to move.
    assert_eq!(
        report.rebalanced, 0,
        "placements moved without a cluster lost"
    );
    assert_eq!(report.single_placed.count, 1);
    assert_eq!(report.single_rollout.count, 1);
    assert!(report.restart_new_placed.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_three_nats_servers_and_one_instance_of_each_service_killed_mid_rollout() {
    let scenario = Scenario {
        hub_restart: false,
        instances: 2,
        nats_servers: 3,
        ..small(random_kill_point())
    };
    let want = (scenario.deployments + 1 + 10) * scenario.clusters_per_deployment;
    let report = run(scenario).await;
    // 20 deployments, 1 applied alone and 10 during the first rollout round.
    assert_eq!(report.replicas_ready, want);
    assert!(report.halted.is_empty(), "halted: {:?}", report.halted);
    assert!(report.instance_loss_pause.is_some());
    assert!(report.nats_loss_pause.is_some());
}
