//! Autoscaling on a real nats-server with real executors, runners and the
//! gateway: load through the gateway adds replicas on the cheap cluster
//! until it is full, then on the dear one; when the load stops, the dear
//! replica goes first and the count never drops below `minReplicas`; a
//! flapping load does not make the count flap.
//!
//! Run with `--nocapture` to see the time from the load step to the new
//! replicas serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_integration::fleet;
use flotilla_kit::Bus;
use flotilla_proto::EventType;
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus, event::Payload};
use tokio_util::sync::CancellationToken;

use crate::support::{self, apply, next_event as next_matching, poll_until};

const DEADLINE: Duration = Duration::from_secs(120);
const MODEL: &str = "smollm2-135m-instruct";

const AUTOSCALED: &str = r#"
metadata: {name: chat}
spec:
  model: {preset: smollm2-135m-instruct}
  replicas: 1
  resources: {gpu: {count: 1}}
  placement:
    policy: PickAll
    affinity:
      preferred:
        - {weight: 100, propertySorter: {name: cost.perGpuHour, order: Ascending}}
  autoscaling:
    minReplicas: 1
    maxReplicas: 3
    targets: [{metric: InFlightPerReplica, value: 1}]
    behavior:
      scaleUp: {stabilizationWindow: 0s, maxStep: 2}
      scaleDown: {stabilizationWindow: 6s, maxStep: 1}
"#;

/// Closed-loop requests through the gateway while `on`; until `stop`.
fn load(
    gateway: String,
    workers: usize,
    on: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    for _ in 0..workers {
        let (gateway, on, done, stop) = (gateway.clone(), on.clone(), done.clone(), stop.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut idle = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                if !on.load(Ordering::SeqCst) {
                    idle.tick().await;
                    continue;
                }
                let sent = client
                    .post(format!("{gateway}/v1/chat/completions"))
                    .timeout(Duration::from_secs(60))
                    .json(&serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell me about ships."}], "max_tokens": 48, "temperature": 0}))
                    .send()
                    .await;
                if let Ok(r) = sent
                    && r.status().is_success()
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
}

async fn next_event(
    sub: &mut async_nats::Subscriber,
    ty: EventType,
    deadline: Duration,
) -> Option<v1::Event> {
    let want = ty.to_string();
    next_matching(sub, deadline, |e| e.r#type == want).await
}

async fn ready_replicas(bus: &Bus) -> Vec<ReplicaStatus> {
    support::replicas(bus)
        .await
        .into_iter()
        .filter(|r| r.phase() == ReplicaPhase::Ready)
        .collect()
}

/// Requests a runner has answered, from its own /metrics.
async fn served(endpoint: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("{endpoint}/metrics")).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("flotilla_runner_requests_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn clusters_of(replicas: &[ReplicaStatus]) -> Vec<String> {
    let mut c: Vec<String> = replicas.iter().map(|r| r.cluster.clone()).collect();
    c.sort();
    c
}

#[tokio::test]
async fn replicas_follow_the_load_where_placement_prefers() {
    let (server, bus, mut events) = support::bus_with_events().await;
    let config = support::config(&server);
    fleet::control_services(&server, Duration::from_secs(3));
    fleet::rollout(&config, 3);
    let gateway = format!(
        "http://{}",
        fleet::gateway(fleet::gateway_config(&config)).await
    );
    let caches = tempfile::tempdir().unwrap();
    fleet::executor(&server, "cheap", "2xH100-80GB", &[], 1.0, caches.path());
    fleet::executor(&server, "dear", "2xH100-80GB", &[], 3.0, caches.path());
    for _ in 0..2 {
        next_event(&mut events, EventType::ClusterJoined, DEADLINE)
            .await
            .expect("clusters join");
    }
    apply(&bus, AUTOSCALED).await;
    next_event(&mut events, EventType::RolloutCompleted, DEADLINE)
        .await
        .expect("the first replica");
    let first = ready_replicas(&bus).await;
    assert_eq!(clusters_of(&first), ["cheap"]);

    // The load step: four requests at a time against one replica whose
    // target is one in flight.
    let on = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let step_at = Instant::now();
    load(gateway.clone(), 4, on.clone(), done.clone(), stop.clone());
    let scaled = next_event(&mut events, EventType::DeploymentScaled, DEADLINE)
        .await
        .expect("a scale-up");
    let scaled_after = step_at.elapsed();
    assert!(scaled.message.contains("from 1 to 3"), "{}", scaled.message);
    assert!(
        scaled.message.contains("in-flight requests per replica"),
        "{}",
        scaled.message
    );
    let mut ready_after = Duration::ZERO;
    let mut load_ms = Vec::new();
    let mut starting: std::collections::BTreeMap<String, i64> = Default::default();
    while ready_replicas(&bus).await.len() < 3 {
        let e = next_matching(&mut events, DEADLINE, |e| {
            if e.r#type == EventType::ReplicaStarting.to_string() {
                starting.insert(e.name.clone(), e.time_unix_ms);
            }
            e.r#type == EventType::ReplicaReady.to_string()
        })
        .await
        .expect("new replicas ready");
        if let Some(at) = starting.get(&e.name) {
            load_ms.push(e.time_unix_ms - at);
        }
        ready_after = step_at.elapsed();
    }
    let three = ready_replicas(&bus).await;
    assert_eq!(
        clusters_of(&three),
        ["cheap", "cheap", "dear"],
        "cheap fills first, then the burst"
    );
    let added: Vec<&ReplicaStatus> = three
        .iter()
        .filter(|r| r.replica_id != first[0].replica_id)
        .collect();
    // Serving through the gateway: each new replica answers requests.
    for r in &added {
        let what = format!("request served by {}", r.replica_id);
        poll_until(DEADLINE, &what, || async {
            (served(&r.endpoint).await >= 1.0).then_some(())
        })
        .await;
    }
    let serving_after = step_at.elapsed();
    eprintln!(
        "load step -> deployment.scaled      {:>6} ms",
        scaled_after.as_millis()
    );
    eprintln!(
        "load step -> new replicas ready     {:>6} ms",
        ready_after.as_millis()
    );
    eprintln!("    of which model load (starting -> ready) {load_ms:?} ms");
    eprintln!(
        "load step -> new replicas serving   {:>6} ms (through the gateway)",
        serving_after.as_millis()
    );

    // The load stops: after the 6 s window the dear replica goes first,
    // one step per window, down to the minimum and no further.
    on.store(false, Ordering::SeqCst);
    let down = next_event(&mut events, EventType::DeploymentScaled, DEADLINE)
        .await
        .expect("a scale-down");
    assert!(down.message.contains("from 3 to 2"), "{}", down.message);
    let stopped = next_event(&mut events, EventType::ReplicaStopped, DEADLINE)
        .await
        .expect("a replica stopped");
    let Some(Payload::Replica(gone)) = stopped.payload else {
        panic!("no replica in {stopped:?}")
    };
    assert_eq!(
        gone.cluster, "dear",
        "the most expensive replica goes first"
    );
    let down = next_event(&mut events, EventType::DeploymentScaled, DEADLINE)
        .await
        .expect("a second scale-down");
    assert!(down.message.contains("from 2 to 1"), "{}", down.message);
    assert!(
        next_event(
            &mut events,
            EventType::DeploymentScaled,
            Duration::from_secs(10)
        )
        .await
        .is_none(),
        "never below minReplicas"
    );

    // A flapping load: one second on, one off, for twelve seconds. The
    // count goes up once and does not come down while the load keeps
    // returning.
    let mut changes = 0;
    let flapping_until = Instant::now() + Duration::from_secs(12);
    let mut flip = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < flapping_until {
        tokio::select! {
            _ = flip.tick() => { on.fetch_xor(true, Ordering::SeqCst); }
            e = next_event(&mut events, EventType::DeploymentScaled, Duration::from_secs(60)) => {
                if e.is_some() { changes += 1; }
            }
        }
    }
    stop.cancel();
    assert!(
        changes <= 2,
        "{changes} scaling changes under a flapping load"
    );
    eprintln!(
        "flapping load: {changes} scaling changes in 12 s; {} requests answered in all",
        done.load(Ordering::SeqCst)
    );
}
