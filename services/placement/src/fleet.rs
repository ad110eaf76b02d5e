//! What placement knows of the fleet: one [`ClusterView`] per cluster, made
//! from KV `clusters`, and the GPUs other deployments already hold.

use std::collections::{BTreeMap, HashMap};

use flotilla_proto::v1::{self, ClusterHealth, ClusterRecord};

/// GPUs of one model in a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuGroup {
    pub model: String,
    pub memory_bytes: u64,
    /// Largest free memory of one GPU of this group, as last reported.
    pub largest_free_bytes: u64,
    pub count: u32,
    /// GPUs of this group the cluster reports in use: by Flotilla's own
    /// replicas and, on Kubernetes, by any other pod that requested them.
    pub allocated: u32,
    /// GPUs of this group on each node, most first; they add up to
    /// `count`. GPUs that name no node count as one node (an executor on
    /// one host reports none).
    pub per_node: Vec<u32>,
}

impl GpuGroup {
    /// The most GPUs of this group on one node: the widest tensor-parallel
    /// group a replica can have here.
    pub fn gpus_per_node(&self) -> u32 {
        self.per_node.first().copied().unwrap_or(self.count)
    }

    /// Nodes with at least `gpus` GPUs of this group.
    pub fn nodes_with(&self, gpus: u32) -> u32 {
        let n = self.per_node.iter().filter(|&&n| n >= gpus).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Groups of `gpus` GPUs that fit inside nodes, all nodes together.
    pub fn node_slots(&self, gpus: u32) -> u32 {
        self.per_node
            .iter()
            .map(|n| n.checked_div(gpus).unwrap_or(0))
            .sum()
    }
}

/// Whether new replicas may go to a cluster at all.
#[derive(Debug, Clone, PartialEq)]
pub enum Availability {
    Available,
    Degraded(String),
    Unhealthy(String),
    Left,
    /// Came back from unhealthy less than the probation ago.
    Probation {
        remaining_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<v1::Taint>,
    pub availability: Availability,
    pub cordoned: Option<String>,
    pub gpus: Vec<GpuGroup>,
    pub cost_per_gpu_hour: f64,
    pub cached_models: Vec<String>,
}

impl ClusterView {
    /// The view of a cluster record at `now_ms`; a cluster that recovered
    /// less than `probation_ms` ago is on probation (flap damping).
    pub fn from_record(record: &ClusterRecord, now_ms: i64, probation_ms: i64) -> Self {
        Self {
            availability: availability(record, now_ms, probation_ms),
            ..Self::of_record(record)
        }
    }

    /// What [`Self::from_record`] reads from the record alone (all of it
    /// but the availability, which moves with the clock).
    fn of_record(record: &ClusterRecord) -> Self {
        let empty = flotilla_proto::v1::ClusterInventory::default();
        let inventory = record.inventory.as_ref().unwrap_or(&empty);
        Self::grouped(record, inventory)
    }
}

/// Cluster views kept between fleets, each rebuilt only when its record
/// was written again: a record carries every GPU, and placement builds the
/// fleet on every burst of heartbeats and every apply.
#[derive(Debug, Default)]
pub struct ViewCache {
    views: HashMap<String, (RecordStamp, ClusterView)>,
}

/// What changes whenever inventory writes a cluster's record: a heartbeat
/// write sets `last_seen`, a transition bumps `generation`, a cordon sets
/// `cordoned`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordStamp {
    last_seen_unix_ms: i64,
    generation: u64,
    cordoned: bool,
    health: i32,
    recovered_at_unix_ms: i64,
}

impl RecordStamp {
    fn of(record: &ClusterRecord) -> Self {
        Self {
            last_seen_unix_ms: record.last_seen_unix_ms,
            generation: record.generation,
            cordoned: record.cordoned,
            health: record.health,
            recovered_at_unix_ms: record.recovered_at_unix_ms,
        }
    }
}

impl ViewCache {
    /// The fleet of `records` at `now_ms`, as [`ClusterView::from_record`]
    /// would make it; clusters no longer recorded are forgotten.
    pub fn fleet(
        &mut self,
        records: &mut dyn Iterator<Item = (&str, &ClusterRecord)>,
        now_ms: i64,
        probation_ms: i64,
    ) -> Fleet {
        let mut seen = std::collections::HashSet::new();
        let mut views = Vec::new();
        for (name, record) in records {
            let stamp = RecordStamp::of(record);
            let entry = self
                .views
                .entry(name.to_string())
                .and_modify(|(at, view)| {
                    if *at != stamp {
                        *at = stamp;
                        *view = ClusterView::of_record(record);
                    }
                })
                .or_insert_with(|| (stamp, ClusterView::of_record(record)));
            let mut view = entry.1.clone();
            view.availability = availability(record, now_ms, probation_ms);
            seen.insert(name);
            views.push(view);
        }
        self.views.retain(|name, _| seen.contains(name.as_str()));
        Fleet::new(views)
    }
}

/// Whether new replicas may go to the cluster at `now_ms`; one that
/// recovered less than `probation_ms` ago is on probation (flap damping).
fn availability(record: &ClusterRecord, now_ms: i64, probation_ms: i64) -> Availability {
    match record.health() {
        ClusterHealth::Healthy
            if now_ms - record.recovered_at_unix_ms < probation_ms
                && record.recovered_at_unix_ms > 0 =>
        {
            Availability::Probation {
                remaining_ms: probation_ms - (now_ms - record.recovered_at_unix_ms),
            }
        }
        ClusterHealth::Healthy => Availability::Available,
        ClusterHealth::Degraded => Availability::Degraded(record.health_reason.clone()),
        ClusterHealth::Unhealthy | ClusterHealth::Unspecified => {
            Availability::Unhealthy(record.health_reason.clone())
        }
        ClusterHealth::Left => Availability::Left,
    }
}

impl ClusterView {
    fn grouped(record: &ClusterRecord, inventory: &flotilla_proto::v1::ClusterInventory) -> Self {
        let mut gpus: Vec<GpuGroup> = Vec::new();
        // (model, node) -> GPUs, in the order first seen.
        let mut nodes: Vec<(&str, &str, u32)> = Vec::new();
        // A node's GPUs come together in a heartbeat: the last group and
        // node are tried first, so a cluster of N GPUs costs about N
        // comparisons, not N times its nodes.
        for gpu in &inventory.gpus {
            let group = match gpus.last_mut() {
                Some(last) if last.model == gpu.model => Some(last),
                _ => gpus.iter_mut().find(|g| g.model == gpu.model),
            };
            match group {
                Some(g) => {
                    g.count += 1;
                    g.allocated += u32::from(gpu.allocated);
                    g.largest_free_bytes = g.largest_free_bytes.max(gpu.memory_free_bytes);
                }
                None => gpus.push(GpuGroup {
                    model: gpu.model.clone(),
                    memory_bytes: gpu.memory_total_bytes,
                    largest_free_bytes: gpu.memory_free_bytes,
                    count: 1,
                    allocated: u32::from(gpu.allocated),
                    per_node: Vec::new(),
                }),
            }
            let same = |(m, n, _): &&mut (&str, &str, u32)| *m == gpu.model && *n == gpu.node;
            let node = match nodes.last_mut() {
                Some(last) if same(&last) => Some(last),
                _ => nodes.iter_mut().find(|e| same(e)),
            };
            match node {
                Some((_, _, count)) => *count += 1,
                None => nodes.push((&gpu.model, &gpu.node, 1)),
            }
        }
        for g in &mut gpus {
            g.per_node = nodes
                .iter()
                .filter(|(m, _, _)| *m == g.model)
                .map(|(_, _, count)| *count)
                .collect();
            g.per_node.sort_unstable_by(|a, b| b.cmp(a));
        }
        Self {
            availability: Availability::Available,
            name: record.name.clone(),
            labels: inventory.labels.clone(),
            taints: inventory.taints.clone(),
            cordoned: record.cordoned.then(|| record.cordon_reason.clone()),
            gpus,
            cost_per_gpu_hour: inventory.cost_per_gpu_hour,
            cached_models: inventory
                .cached_models
                .iter()
                .map(|m| m.name.clone())
                .collect(),
        }
    }
}

/// The fleet at one moment, clusters in name order.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub clusters: Vec<ClusterView>,
    index: HashMap<String, u32>,
}

impl Fleet {
    pub fn new(mut clusters: Vec<ClusterView>) -> Self {
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        let index = clusters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        Self { clusters, index }
    }

    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    pub fn get(&self, index: u32) -> &ClusterView {
        &self.clusters[index as usize]
    }

    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }
}

/// GPUs held by placements, per cluster and GPU model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Commitments {
    held: HashMap<String, Vec<(String, u32)>>,
}

impl Commitments {
    pub fn held(&self, cluster: &str, model: &str) -> u32 {
        self.held
            .get(cluster)
            .and_then(|v| v.iter().find(|(m, _)| m == model))
            .map_or(0, |(_, n)| *n)
    }

    fn adjust(&mut self, decision: &v1::PlacementDecision, add: bool) {
        for a in &decision.assignments {
            let gpus = a.replicas.saturating_mul(a.gpus_per_replica);
            // Looked up before inserting: the fleet's commitments are
            // summed from every assignment (100,000 at 1,000 PickN-100
            // deployments), and a key cloned for each was most of the cost.
            let entry = match self.held.get_mut(&a.cluster) {
                Some(entry) => entry,
                None if add => self.held.entry(a.cluster.clone()).or_default(),
                None => continue,
            };
            match entry.iter_mut().find(|(m, _)| *m == a.gpu_model) {
                Some((_, n)) if add => *n = n.saturating_add(gpus),
                Some((_, n)) => *n = n.saturating_sub(gpus),
                None if add => entry.push((a.gpu_model.clone(), gpus)),
                None => {}
            }
        }
    }

    pub fn add(&mut self, decision: &v1::PlacementDecision) {
        self.adjust(decision, true);
    }

    pub fn remove(&mut self, decision: &v1::PlacementDecision) {
        self.adjust(decision, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, allocated: usize, last_seen: i64) -> ClusterRecord {
        let gpus = (0..4)
            .map(|i| v1::GpuDevice {
                model: "H100-80GB".into(),
                allocated: i < allocated,
                ..Default::default()
            })
            .collect();
        ClusterRecord {
            name: name.into(),
            health: ClusterHealth::Healthy.into(),
            last_seen_unix_ms: last_seen,
            recovered_at_unix_ms: 1_000,
            inventory: Some(v1::ClusterInventory {
                gpus,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn uncached(records: &[ClusterRecord], now: i64) -> Vec<ClusterView> {
        records
            .iter()
            .map(|r| ClusterView::from_record(r, now, 5_000))
            .collect()
    }

    #[test]
    fn cached_views_follow_rewritten_records_and_the_clock() {
        let mut cache = ViewCache::default();
        let mut records = vec![record("a", 0, 10), record("b", 1, 10)];
        let build = |cache: &mut ViewCache, records: &[ClusterRecord], now| {
            let mut all = records.iter().map(|r| (r.name.as_str(), r));
            cache.fleet(&mut all, now, 5_000).clusters
        };
        // On probation at first (recovered at 1 s), available later.
        assert_eq!(
            build(&mut cache, &records, 2_000),
            uncached(&records, 2_000)
        );
        assert!(matches!(
            build(&mut cache, &records, 2_000)[0].availability,
            Availability::Probation { .. }
        ));
        assert_eq!(
            build(&mut cache, &records, 9_000),
            uncached(&records, 9_000)
        );

        // Rewritten by a heartbeat: its new GPUs show.
        records[0] = record("a", 3, 11);
        let fleet = build(&mut cache, &records, 9_000);
        assert_eq!(fleet, uncached(&records, 9_000));
        assert_eq!(fleet[0].gpus[0].allocated, 3);

        // Gone from the bucket: gone from the fleet and the cache.
        records.pop();
        assert_eq!(build(&mut cache, &records, 9_000).len(), 1);
        assert_eq!(cache.views.len(), 1);
    }
}
