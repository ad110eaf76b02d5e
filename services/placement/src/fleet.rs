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
        let inventory = record.inventory.clone().unwrap_or_default();
        let mut gpus: Vec<GpuGroup> = Vec::new();
        // (model, node) -> GPUs, in the order first seen.
        let mut nodes: Vec<(&str, &str, u32)> = Vec::new();
        for gpu in &inventory.gpus {
            match gpus.iter_mut().find(|g| g.model == gpu.model) {
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
            match nodes
                .iter_mut()
                .find(|(m, n, _)| *m == gpu.model && *n == gpu.node)
            {
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
        let availability = match record.health() {
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
        };
        Self {
            name: record.name.clone(),
            labels: inventory.labels.clone(),
            taints: inventory.taints.clone(),
            availability,
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
            let entry = self.held.entry(a.cluster.clone()).or_default();
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
