//! The life of a cluster record, as pure functions of (record, input, now).
//!
//! Every function returns the new record when something must be written,
//! `None` when nothing changes. A change of health or cordon bumps
//! `generation` and names its event in `last_transition`; the shell
//! publishes that event once (see `announced_generation`).

use flotilla_proto::EventType;
use flotilla_proto::v1::{ClusterHealth, ClusterHeartbeat, ClusterRecord, InventorySource};

/// Timing rules of health detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    pub unhealthy_after_ms: i64,
    pub left_after_ms: i64,
    /// Largest accepted difference between a heartbeat's clock and ours.
    pub max_clock_skew_ms: i64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            unhealthy_after_ms: 3_000,
            left_after_ms: 600_000,
            max_clock_skew_ms: 30_000,
        }
    }
}

/// A heartbeat that cannot be believed: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidHeartbeat {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidHeartbeat {
    InvalidHeartbeat {
        field: field.into(),
        reason: reason.into(),
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Checks a heartbeat that arrived on the telemetry subject of
/// `subject_cluster`.
pub fn validate(
    hb: &ClusterHeartbeat,
    subject_cluster: &str,
    now_ms: i64,
    policy: &HealthPolicy,
) -> Result<(), InvalidHeartbeat> {
    if hb.cluster != subject_cluster {
        return Err(invalid(
            "cluster",
            format!(
                "{:?} does not match the subject's cluster {subject_cluster:?}",
                hb.cluster
            ),
        ));
    }
    flotilla_proto::check_name("cluster", &hb.cluster)
        .map_err(|e| invalid("cluster", e.to_string()))?;
    if hb.executor_instance.is_empty() {
        return Err(invalid("executor_instance", "is empty"));
    }
    let skew = (hb.sent_at_unix_ms - now_ms).abs();
    if skew > policy.max_clock_skew_ms {
        return Err(invalid(
            "sent_at_unix_ms",
            format!(
                "clock differs from the inventory's by {:.1} s, more than the {:.1} s allowed",
                skew as f64 / 1000.0,
                policy.max_clock_skew_ms as f64 / 1000.0
            ),
        ));
    }
    let Some(inv) = &hb.inventory else {
        return Err(invalid("inventory", "is missing"));
    };
    if inv.source() == InventorySource::Unspecified {
        return Err(invalid("inventory.source", "must be nvml or declared"));
    }
    if !inv.cost_per_gpu_hour.is_finite() || inv.cost_per_gpu_hour < 0.0 {
        return Err(invalid(
            "inventory.cost_per_gpu_hour",
            format!("{} is not a price", inv.cost_per_gpu_hour),
        ));
    }
    for (k, v) in &inv.labels {
        if k.is_empty() || k.len() > 63 || v.len() > 63 {
            return Err(invalid(
                format!("inventory.labels[{k}]"),
                "keys must be 1-63 characters and values at most 63",
            ));
        }
    }
    let mut uuids = std::collections::HashSet::new();
    for (i, gpu) in inv.gpus.iter().enumerate() {
        let field = |f: &str| format!("inventory.gpus[{i}].{f}");
        if gpu.memory_total_bytes == 0 {
            return Err(invalid(field("memory_total_bytes"), "is zero"));
        }
        if gpu.memory_free_bytes > gpu.memory_total_bytes {
            return Err(invalid(
                field("memory_free_bytes"),
                format!(
                    "{:.1} GiB free exceeds {:.1} GiB total",
                    gpu.memory_free_bytes as f64 / GIB,
                    gpu.memory_total_bytes as f64 / GIB
                ),
            ));
        }
        if gpu.utilization_percent > 100 {
            return Err(invalid(
                field("utilization_percent"),
                format!("{} is over 100", gpu.utilization_percent),
            ));
        }
        if gpu.temperature_celsius > 150 {
            return Err(invalid(
                field("temperature_celsius"),
                format!("{} °C is not a working GPU", gpu.temperature_celsius),
            ));
        }
        if !gpu.uuid.is_empty() && !uuids.insert(gpu.uuid.as_str()) {
            return Err(invalid(
                field("uuid"),
                format!("{} appears twice", gpu.uuid),
            ));
        }
    }
    let grace = i64::try_from(hb.restart_grace_ms).unwrap_or(i64::MAX);
    if grace > policy.left_after_ms {
        return Err(invalid(
            "restart_grace_ms",
            format!(
                "{:.0} s is longer than left-after ({:.0} s): a cluster away that long has left",
                hb.restart_grace_ms as f64 / 1000.0,
                policy.left_after_ms as f64 / 1000.0
            ),
        ));
    }
    let used: u64 = hb.replicas.iter().map(|r| u64::from(r.gpus)).sum();
    if used > inv.gpus.len() as u64 {
        return Err(invalid(
            "replicas",
            format!(
                "replicas hold {used} GPUs, the cluster has {}",
                inv.gpus.len()
            ),
        ));
    }
    Ok(())
}

/// Health as the heartbeat shows it, and why when it is not healthy.
fn assess(hb: &ClusterHeartbeat, expected_gpus: u32) -> (ClusterHealth, String) {
    let gpus = hb
        .inventory
        .as_ref()
        .map(|i| i.gpus.as_slice())
        .unwrap_or_default();
    let mut problems = Vec::new();
    for gpu in gpus {
        if gpu.xid_errors > 0 {
            problems.push(format!(
                "GPU {} reports {} XID errors",
                gpu.index, gpu.xid_errors
            ));
        }
        if gpu.ecc_errors > 0 {
            problems.push(format!(
                "GPU {} reports {} uncorrected ECC errors",
                gpu.index, gpu.ecc_errors
            ));
        }
    }
    let present = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
    if present < expected_gpus {
        problems.push(format!(
            "{} of {expected_gpus} GPUs disappeared",
            expected_gpus - present
        ));
    }
    if problems.is_empty() {
        (ClusterHealth::Healthy, String::new())
    } else {
        (ClusterHealth::Degraded, problems.join("; "))
    }
}

fn transition(record: &mut ClusterRecord, ty: EventType, message: String) {
    record.generation += 1;
    record.last_transition = ty.to_string();
    record.last_transition_message = message;
}

/// [`on_heartbeat`], written only when it says something new: a
/// heartbeat that changes nothing but when the cluster was last heard from
/// and its GPUs' gauges (free memory, utilization, temperature) is `None`
/// until the stored record is `refresh_ms` old. Liveness between writes
/// lives in each inventory instance's memory (every instance hears every
/// heartbeat), as a Kubernetes node's lease does beside its status.
pub fn on_heartbeat_coalesced(
    prev: Option<&ClusterRecord>,
    hb: &ClusterHeartbeat,
    now_ms: i64,
    refresh_ms: i64,
) -> Option<ClusterRecord> {
    let next = on_heartbeat(prev, hb, now_ms)?;
    match prev {
        Some(p)
            if now_ms - p.last_seen_unix_ms < refresh_ms
                && without_gauges(p) == without_gauges(&next) =>
        {
            None
        }
        _ => Some(next),
    }
}

/// A record without what every heartbeat changes.
fn without_gauges(record: &ClusterRecord) -> ClusterRecord {
    let mut r = record.clone();
    r.last_seen_unix_ms = 0;
    r.last_heartbeat_sequence = 0;
    if let Some(inventory) = r.inventory.as_mut() {
        for gpu in &mut inventory.gpus {
            gpu.memory_free_bytes = 0;
            gpu.utilization_percent = 0;
            gpu.temperature_celsius = 0;
        }
    }
    r
}

/// Applies a validated heartbeat. `None`: a stale heartbeat of the same
/// executor instance, ignored.
pub fn on_heartbeat(
    prev: Option<&ClusterRecord>,
    hb: &ClusterHeartbeat,
    now_ms: i64,
) -> Option<ClusterRecord> {
    let same_instance = prev.is_some_and(|p| p.executor_instance == hb.executor_instance);
    if let Some(p) = prev
        && same_instance
        && hb.sequence <= p.last_heartbeat_sequence
        && p.health() != ClusterHealth::Left
    {
        return None;
    }
    let joining = prev.is_none_or(|p| p.health() == ClusterHealth::Left);
    let gpus = hb.inventory.as_ref().map_or(0, |i| i.gpus.len());
    let gpus = u32::try_from(gpus).unwrap_or(u32::MAX);
    let expected = match prev {
        Some(p) if same_instance && !joining => p.expected_gpu_count.max(gpus),
        _ => gpus,
    };
    let (health, reason) = assess(hb, expected);

    let mut record = prev.cloned().unwrap_or_else(|| ClusterRecord {
        name: hb.cluster.clone(),
        first_seen_unix_ms: now_ms,
        ..Default::default()
    });
    let was = record.health();
    record.inventory.clone_from(&hb.inventory);
    record.replicas.clone_from(&hb.replicas);
    record.last_seen_unix_ms = now_ms;
    record.last_heartbeat_sequence = hb.sequence;
    record.executor_instance.clone_from(&hb.executor_instance);
    record.expected_gpu_count = expected;
    record.health = health.into();
    record.health_reason.clone_from(&reason);
    let grace_ms = i64::try_from(hb.restart_grace_ms).unwrap_or(i64::MAX);
    // Only the instance that is leaving can announce its restart; any
    // other heartbeat (the next instance's first one) ends it.
    record.restart_expected_by_unix_ms = if grace_ms > 0 {
        now_ms.saturating_add(grace_ms)
    } else {
        0
    };

    let name = &hb.cluster;
    if joining {
        if prev.is_some() {
            record.first_seen_unix_ms = now_ms;
        }
        let source = hb.inventory.as_ref().map_or("", |i| {
            flotilla_proto::json::name_of::<InventorySource>(i.source)
        });
        let message = match health {
            ClusterHealth::Degraded => {
                format!("cluster {name} joined with {gpus} GPUs ({source}), degraded: {reason}")
            }
            _ => format!("cluster {name} joined with {gpus} GPUs ({source})"),
        };
        transition(&mut record, EventType::ClusterJoined, message);
    } else if was != health {
        if was == ClusterHealth::Unhealthy {
            record.recovered_at_unix_ms = now_ms;
        }
        match health {
            ClusterHealth::Healthy => {
                transition(
                    &mut record,
                    EventType::ClusterHealthy,
                    format!("cluster {name} is healthy again"),
                );
            }
            _ => transition(
                &mut record,
                EventType::ClusterDegraded,
                format!("cluster {name} is degraded: {reason}"),
            ),
        }
    } else if grace_ms > 0 {
        // A change of health above says more; the grace holds either way.
        transition(
            &mut record,
            EventType::ClusterRestarting,
            format!(
                "cluster {name}'s executor is restarting as planned; back within {:.0} s, its replicas keep serving",
                grace_ms as f64 / 1000.0
            ),
        );
    }
    Some(record)
}

/// How long `record` has been silent as far as the hub can tell: since its
/// last heartbeat, or since the hub began watching (`watching_since_ms`:
/// its start, or the end of its last gap), whichever is later. A silence
/// the hub did not watch is not the cluster's.
pub fn silence_ms(record: &ClusterRecord, now_ms: i64, watching_since_ms: i64) -> i64 {
    now_ms - record.last_seen_unix_ms.max(watching_since_ms)
}

/// Health by the clock alone: `Some` when a silence the hub watched has
/// lasted too long. An announced restart excuses silence until it is due.
pub fn on_tick(
    record: &ClusterRecord,
    now_ms: i64,
    watching_since_ms: i64,
    policy: &HealthPolicy,
) -> Option<ClusterRecord> {
    let silent = silence_ms(record, now_ms, watching_since_ms);
    let restarting = now_ms <= record.restart_expected_by_unix_ms;
    let due = match record.health() {
        ClusterHealth::Healthy | ClusterHealth::Degraded => {
            silent > policy.unhealthy_after_ms && !restarting
        }
        ClusterHealth::Unhealthy => silent > policy.left_after_ms,
        _ => false,
    };
    if !due {
        return None;
    }
    let secs = silent as f64 / 1000.0;
    let mut next = record.clone();
    match record.health() {
        ClusterHealth::Healthy | ClusterHealth::Degraded => {
            let why = if record.restart_expected_by_unix_ms > 0 {
                format!(
                    "no heartbeat for {secs:.1} s; its announced restart did not finish in time"
                )
            } else {
                format!("no heartbeat for {secs:.1} s")
            };
            next.health = ClusterHealth::Unhealthy.into();
            next.restart_expected_by_unix_ms = 0;
            transition(
                &mut next,
                EventType::ClusterUnhealthy,
                format!("cluster {} is unhealthy: {why}", record.name),
            );
            next.health_reason = why;
            Some(next)
        }
        ClusterHealth::Unhealthy => {
            next.health = ClusterHealth::Left.into();
            next.health_reason = format!("no heartbeat for {secs:.0} s");
            transition(
                &mut next,
                EventType::ClusterLeft,
                format!(
                    "cluster {} left the fleet: no heartbeat for {secs:.0} s",
                    record.name
                ),
            );
            Some(next)
        }
        _ => None,
    }
}

/// Cordons or uncordons; `None` when it already is.
pub fn on_cordon(record: &ClusterRecord, cordon: bool, reason: &str) -> Option<ClusterRecord> {
    if record.cordoned == cordon {
        return None;
    }
    let mut next = record.clone();
    next.cordoned = cordon;
    next.cordon_reason = if cordon {
        reason.to_string()
    } else {
        String::new()
    };
    let name = &record.name;
    if cordon {
        let why = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        transition(
            &mut next,
            EventType::ClusterCordoned,
            format!("cluster {name} cordoned{why}"),
        );
    } else {
        transition(
            &mut next,
            EventType::ClusterUncordoned,
            format!("cluster {name} uncordoned"),
        );
    }
    Some(next)
}

/// The event a record still owes, if its last transition is unpublished.
pub fn pending_event(record: &ClusterRecord) -> Option<EventType> {
    if record.generation <= record.announced_generation {
        return None;
    }
    EventType::ALL
        .iter()
        .copied()
        .find(|t| t.to_string() == record.last_transition)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::{ClusterInventory, GpuDevice, ReplicaUsage};

    const GB: u64 = 1 << 30;

    fn gpu(index: u32) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            model: "H100-80GB".into(),
            memory_total_bytes: 80 * GB,
            memory_free_bytes: 80 * GB,
            ..Default::default()
        }
    }

    fn hb(seq: u64, gpus: Vec<GpuDevice>) -> ClusterHeartbeat {
        ClusterHeartbeat {
            cluster: "eu-1".into(),
            sequence: seq,
            sent_at_unix_ms: 1_000_000,
            executor_instance: "exec-a".into(),
            inventory: Some(ClusterInventory {
                gpus,
                source: InventorySource::Declared.into(),
                cost_per_gpu_hour: 2.5,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_field() {
        let p = HealthPolicy::default();
        let good = hb(1, vec![gpu(0), gpu(1)]);
        assert!(validate(&good, "eu-1", 1_000_000, &p).is_ok());

        let mut wrong_subject = good.clone();
        wrong_subject.cluster = "us-1".into();
        let mut skewed = good.clone();
        skewed.sent_at_unix_ms += 45_000;
        let mut too_free = good.clone();
        too_free.inventory.as_mut().unwrap().gpus[1].memory_free_bytes = 90 * GB;
        let mut hot = good.clone();
        hot.inventory.as_mut().unwrap().gpus[0].temperature_celsius = 400;
        let mut busy = good.clone();
        busy.inventory.as_mut().unwrap().gpus[0].utilization_percent = 101;
        let mut price = good.clone();
        price.inventory.as_mut().unwrap().cost_per_gpu_hour = -1.0;
        let mut no_source = good.clone();
        no_source.inventory.as_mut().unwrap().source = 0;
        let mut dup = good.clone();
        dup.inventory.as_mut().unwrap().gpus[1].uuid = "GPU-0".into();
        let mut overcommitted = good.clone();
        overcommitted.replicas = vec![ReplicaUsage {
            gpus: 3,
            ..Default::default()
        }];
        let mut no_inventory = good.clone();
        no_inventory.inventory = None;

        let cases = [
            (wrong_subject, "eu-1", "cluster", "does not match"),
            (skewed, "eu-1", "sent_at_unix_ms", "45.0 s"),
            (
                too_free,
                "eu-1",
                "inventory.gpus[1].memory_free_bytes",
                "90.0 GiB free exceeds 80.0 GiB",
            ),
            (hot, "eu-1", "inventory.gpus[0].temperature_celsius", "400"),
            (
                busy,
                "eu-1",
                "inventory.gpus[0].utilization_percent",
                "over 100",
            ),
            (price, "eu-1", "inventory.cost_per_gpu_hour", "not a price"),
            (no_source, "eu-1", "inventory.source", "nvml or declared"),
            (dup, "eu-1", "inventory.gpus[1].uuid", "twice"),
            (overcommitted, "eu-1", "replicas", "3 GPUs"),
            (no_inventory, "eu-1", "inventory", "missing"),
        ];
        for (h, subject, field, reason) in cases {
            let e = validate(&h, subject, 1_000_000, &p).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn a_heartbeat_that_changes_only_gauges_is_written_once_per_refresh() {
        let mut r = on_heartbeat(None, &hb(1, vec![gpu(0)]), 5).unwrap();
        r.announced_generation = r.generation;
        let busier = |seq, utilization| {
            let mut g = gpu(0);
            g.utilization_percent = utilization;
            g.memory_free_bytes = 1 << 30;
            hb(seq, vec![g])
        };
        assert!(on_heartbeat_coalesced(Some(&r), &busier(2, 40), 1_005, 5_000).is_none());
        assert!(on_heartbeat_coalesced(Some(&r), &busier(3, 90), 5_004, 5_000).is_none());
        let refreshed = on_heartbeat_coalesced(Some(&r), &busier(4, 90), 5_005, 5_000).unwrap();
        assert_eq!(refreshed.last_seen_unix_ms, 5_005);
        assert_eq!(refreshed.last_heartbeat_sequence, 4);
        // Anything else is written at once: one more GPU, a lost one.
        let more = on_heartbeat_coalesced(Some(&r), &hb(5, vec![gpu(0), gpu(1)]), 1_010, 5_000);
        assert_eq!(more.unwrap().inventory.unwrap().gpus.len(), 2);
        let r2 = on_heartbeat(Some(&r), &hb(6, vec![gpu(0), gpu(1)]), 1_020).unwrap();
        let lost = on_heartbeat_coalesced(Some(&r2), &hb(7, vec![gpu(0)]), 1_030, 5_000).unwrap();
        assert_eq!(lost.health(), ClusterHealth::Degraded);
        // A stale one is still ignored.
        assert!(on_heartbeat_coalesced(Some(&r2), &hb(6, vec![gpu(0)]), 9_000, 5_000).is_none());
    }

    #[test]
    fn first_heartbeat_joins_healthy() {
        let r = on_heartbeat(None, &hb(1, vec![gpu(0)]), 5).unwrap();
        assert_eq!(r.health(), ClusterHealth::Healthy);
        assert_eq!(r.generation, 1);
        assert_eq!(pending_event(&r), Some(EventType::ClusterJoined));
        assert_eq!(r.first_seen_unix_ms, 5);
    }

    #[test]
    fn steady_heartbeats_change_no_generation() {
        let mut r = on_heartbeat(None, &hb(1, vec![gpu(0)]), 5).unwrap();
        r.announced_generation = r.generation;
        let r2 = on_heartbeat(Some(&r), &hb(2, vec![gpu(0)]), 1005).unwrap();
        assert_eq!(r2.generation, r.generation);
        assert_eq!(r2.last_seen_unix_ms, 1005);
        assert_eq!(pending_event(&r2), None);
        // A repeated or older heartbeat of the same executor is ignored.
        assert!(on_heartbeat(Some(&r2), &hb(2, vec![gpu(0)]), 2000).is_none());
    }

    #[test]
    fn silence_makes_unhealthy_then_left_and_heartbeats_recover() {
        let p = HealthPolicy::default();
        let r = on_heartbeat(None, &hb(1, vec![gpu(0)]), 0).unwrap();
        assert!(
            on_tick(&r, 3_000, 0, &p).is_none(),
            "exactly at the limit is still healthy"
        );
        let u = on_tick(&r, 3_001, 0, &p).unwrap();
        assert_eq!(u.health(), ClusterHealth::Unhealthy);
        assert_eq!(pending_event(&u), Some(EventType::ClusterUnhealthy));
        assert!(
            on_tick(&u, 3_500, 0, &p).is_none(),
            "unhealthy is announced once"
        );
        let back = on_heartbeat(Some(&u), &hb(2, vec![gpu(0)]), 4_000).unwrap();
        assert_eq!(back.health(), ClusterHealth::Healthy);
        assert_eq!(back.recovered_at_unix_ms, 4_000);
        assert_eq!(pending_event(&back), Some(EventType::ClusterHealthy));
        let left = on_tick(&u, 600_001, 0, &p).unwrap();
        assert_eq!(left.health(), ClusterHealth::Left);
        let rejoin = on_heartbeat(Some(&left), &hb(1, vec![gpu(0)]), 700_000).unwrap();
        assert_eq!(pending_event(&rejoin), Some(EventType::ClusterJoined));
        assert_eq!(rejoin.first_seen_unix_ms, 700_000);
    }

    #[test]
    fn gpu_errors_and_lost_gpus_degrade() {
        let r = on_heartbeat(None, &hb(1, vec![gpu(0), gpu(1)]), 0).unwrap();
        let mut bad = gpu(1);
        bad.xid_errors = 2;
        let d = on_heartbeat(Some(&r), &hb(2, vec![gpu(0), bad]), 1).unwrap();
        assert_eq!(d.health(), ClusterHealth::Degraded);
        assert!(
            d.health_reason.contains("GPU 1 reports 2 XID errors"),
            "{}",
            d.health_reason
        );
        assert_eq!(pending_event(&d), Some(EventType::ClusterDegraded));

        let lost = on_heartbeat(Some(&r), &hb(2, vec![gpu(0)]), 1).unwrap();
        assert_eq!(lost.health(), ClusterHealth::Degraded);
        assert!(lost.health_reason.contains("1 of 2 GPUs disappeared"));
        // Still missing on the next heartbeat: still degraded, no new event.
        let still = on_heartbeat(Some(&lost), &hb(3, vec![gpu(0)]), 2).unwrap();
        assert_eq!(still.generation, lost.generation);
        assert_eq!(still.health(), ClusterHealth::Degraded);
        // Back: healthy.
        let fixed = on_heartbeat(Some(&still), &hb(4, vec![gpu(0), gpu(1)]), 3).unwrap();
        assert_eq!(pending_event(&fixed), Some(EventType::ClusterHealthy));
        // A restarted executor declares its hardware afresh.
        let mut restarted = hb(1, vec![gpu(0)]);
        restarted.executor_instance = "exec-b".into();
        let fresh = on_heartbeat(Some(&fixed), &restarted, 4).unwrap();
        assert_eq!(fresh.health(), ClusterHealth::Healthy);
        assert_eq!(fresh.expected_gpu_count, 1);
    }

    #[test]
    fn cordon_is_idempotent() {
        let r = on_heartbeat(None, &hb(1, vec![]), 0).unwrap();
        let c = on_cordon(&r, true, "maintenance").unwrap();
        assert!(c.cordoned);
        assert_eq!(pending_event(&c), Some(EventType::ClusterCordoned));
        assert!(c.last_transition_message.contains("maintenance"));
        assert!(on_cordon(&c, true, "again").is_none());
        let u = on_cordon(&c, false, "").unwrap();
        assert_eq!(pending_event(&u), Some(EventType::ClusterUncordoned));
    }
}
