//! The cluster's GPUs as its nodes report them, for the heartbeat.
//!
//! Per node: allocatable `nvidia.com/gpu` (and, with MIG, each
//! `nvidia.com/mig-<profile>`), named from NVIDIA GPU feature discovery's
//! labels (`nvidia.com/gpu.product`, `nvidia.com/gpu.memory` in MiB,
//! `nvidia.com/mig.strategy`, `nvidia.com/mig-<profile>.memory`) in the
//! fleet's form (`H100-80GB`, `L4-24GB`; a MIG slice is a model of its
//! own, `A100-1g.10gb`). As many of them as the pods bound to the node
//! request are `allocated`. Cordoned and not-Ready nodes contribute
//! nothing: nothing new can be scheduled there.
//!
//! GPUs held are counted from every running or pending pod bound to the
//! node, in every namespace (one pod watch over the cluster): a GPU held
//! by another workload is as unavailable as one of Flotilla's. The cost is
//! a store of every such pod in the executor's memory (a few KiB each).
//! [`NodeInventory`] keeps both watches; [`cluster_gpus`] is the pure part.

use std::collections::BTreeMap;

use flotilla_proto::v1::GpuDevice;
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::Api;
use kube::runtime::watcher;

use super::watch::Watched;

pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
const MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";
const LABEL_PRODUCT: &str = "nvidia.com/gpu.product";
const LABEL_MEMORY: &str = "nvidia.com/gpu.memory";
const LABEL_MIG_STRATEGY: &str = "nvidia.com/mig.strategy";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Memory sizes GPUs are sold by, in GiB: the usable memory a driver
/// reports is a little less (an L4's 23034 MiB is a 24 GB card).
const MARKETED_GIB: &[u64] = &[
    4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 180, 192, 288,
];

/// A size in GiB as GPUs are sold: the smallest marketed size at or above
/// it within 12%, else the size rounded.
fn marketed_gib(bytes: u64) -> u64 {
    let gib = bytes as f64 / GIB as f64;
    MARKETED_GIB
        .iter()
        .copied()
        .find(|m| (*m as f64) >= gib.floor() && (*m as f64) <= gib * 1.12)
        .unwrap_or_else(|| gib.round() as u64)
}

/// The product label without vendor words and memory types, and the size
/// it names if any: `NVIDIA-H100-80GB-HBM3` is (`H100`, Some(80)),
/// `NVIDIA-A100-SXM4-40GB-MIG-1g.5gb` is (`A100`, Some(40)).
fn family_of(product: &str) -> (String, Option<u64>) {
    let words: Vec<&str> = product
        .split(['-', ' ', '_'])
        .filter(|w| {
            !w.is_empty()
                && !matches!(
                    w.to_ascii_uppercase().as_str(),
                    "NVIDIA" | "TESLA" | "GEFORCE" | "QUADRO"
                )
        })
        .collect();
    let size = words.iter().find_map(|w| {
        let upper = w.to_ascii_uppercase();
        upper
            .strip_suffix("GB")
            .filter(|n| !n.is_empty())
            .and_then(|n| n.parse::<u64>().ok())
    });
    (words.first().unwrap_or(&"GPU").to_string(), size)
}

/// The fleet's name of a whole GPU: family and marketed size.
pub fn gpu_model(product: &str, memory_bytes: u64) -> String {
    let (family, named) = family_of(product);
    let size = named.unwrap_or_else(|| marketed_gib(memory_bytes));
    format!("{family}-{size}GB")
}

/// Whole units of a quantity (`8`, `8000m`); extended resources are whole.
fn units(q: &Quantity) -> u32 {
    let text = q.0.trim();
    if let Some(milli) = text.strip_suffix('m') {
        return milli
            .parse::<u64>()
            .map_or(0, |m| u32::try_from(m / 1000).unwrap_or(u32::MAX));
    }
    text.parse::<u32>().unwrap_or(0)
}

fn requested(container: &Container, resource: &str) -> u32 {
    let resources = container.resources.as_ref();
    // Extended resources have requests equal to limits; either may be set.
    resources
        .and_then(|r| r.requests.as_ref())
        .and_then(|m| m.get(resource))
        .or_else(|| {
            resources
                .and_then(|r| r.limits.as_ref())
                .and_then(|m| m.get(resource))
        })
        .map_or(0, units)
}

/// What a pod holds of `resource` while bound: its containers together,
/// or its largest init container if that is more (they run first, one at
/// a time).
pub fn pod_request(pod: &Pod, resource: &str) -> u32 {
    let Some(spec) = pod.spec.as_ref() else {
        return 0;
    };
    let main = spec
        .containers
        .iter()
        .map(|c| requested(c, resource))
        .fold(0u32, u32::saturating_add);
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| requested(c, resource))
        .max()
        .unwrap_or(0);
    main.max(init)
}

fn holds_resources(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Whether new pods can land on the node: not cordoned, and Ready.
pub fn schedulable(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    !cordoned && ready
}

/// One kind of GPU a node offers: the resource name, the fleet's model
/// name and the memory of one.
struct Offer {
    resource: String,
    model: String,
    memory_bytes: u64,
    count: u32,
}

fn offers(node: &Node) -> Vec<Offer> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let allocatable = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.clone())
        .unwrap_or_default();
    let product = labels.get(LABEL_PRODUCT).cloned().unwrap_or_default();
    let (family, named) = family_of(&product);
    let label_memory = labels
        .get(LABEL_MEMORY)
        .and_then(|m| m.trim().parse::<u64>().ok())
        .map(|mib| mib * MIB);
    let mut out = Vec::new();
    for (resource, quantity) in &allocatable {
        let count = units(quantity);
        if count == 0 {
            continue;
        }
        if resource == GPU_RESOURCE {
            let single_mig = labels
                .get(LABEL_MIG_STRATEGY)
                .is_some_and(|s| s == "single")
                && product.to_ascii_uppercase().contains("-MIG-");
            let (model, memory_bytes) = if single_mig {
                // MIG "single": every nvidia.com/gpu is one slice, named by
                // the product (`...-MIG-1g.5gb`); the memory label is the
                // slice's.
                let profile = product
                    .rsplit_once("-MIG-")
                    .or_else(|| product.rsplit_once("-mig-"))
                    .map(|(_, p)| p.to_string())
                    .unwrap_or_default();
                let memory = label_memory.unwrap_or_else(|| profile_memory(&profile));
                (format!("{family}-{profile}"), memory)
            } else {
                let memory = label_memory
                    .or_else(|| named.map(|gb| gb * GIB))
                    .unwrap_or(0);
                (gpu_model(&product, memory), memory)
            };
            out.push(Offer {
                resource: resource.clone(),
                model,
                memory_bytes,
                count,
            });
        } else if let Some(profile) = resource.strip_prefix(MIG_RESOURCE_PREFIX) {
            // MIG "mixed": each profile is its own resource.
            let memory = labels
                .get(&format!("{MIG_RESOURCE_PREFIX}{profile}.memory"))
                .and_then(|m| m.trim().parse::<u64>().ok())
                .map_or_else(|| profile_memory(profile), |mib| mib * MIB);
            out.push(Offer {
                resource: resource.clone(),
                model: format!("{family}-{profile}"),
                memory_bytes: memory,
                count,
            });
        }
    }
    out
}

/// The product labels of `nodes` that offer whole GPUs (`nvidia.com/gpu`)
/// of the fleet's model `model`, sorted and once each.
pub fn products_of<'a>(nodes: impl IntoIterator<Item = &'a Node>, model: &str) -> Vec<String> {
    let mut products: Vec<String> = nodes
        .into_iter()
        .filter(|node| {
            offers(node)
                .iter()
                .any(|o| o.resource == GPU_RESOURCE && o.model == model)
        })
        .filter_map(|node| node.metadata.labels.as_ref()?.get(LABEL_PRODUCT).cloned())
        .filter(|product| !product.is_empty())
        .collect();
    products.sort();
    products.dedup();
    products
}

/// The memory a MIG profile names (`1g.10gb` is 10 GiB).
fn profile_memory(profile: &str) -> u64 {
    profile
        .rsplit_once('.')
        .and_then(|(_, m)| {
            m.to_ascii_lowercase()
                .strip_suffix("gb")
                .map(str::to_string)
        })
        .and_then(|gb| gb.parse::<u64>().ok())
        .map_or(0, |gb| gb * GIB)
}

/// The cluster's GPUs, node by node in name order: one device per
/// allocatable GPU (or MIG slice) of every schedulable node, the first as
/// many as the node's bound pods request `allocated`. Devices are indexed
/// across the cluster and named `<node>/<resource>/<n>`.
pub fn cluster_gpus<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<GpuDevice> {
    let mut held: BTreeMap<(String, String), u32> = BTreeMap::new();
    let pods: Vec<&Pod> = pods.into_iter().filter(|p| holds_resources(p)).collect();
    let mut nodes: Vec<&Node> = nodes.into_iter().filter(|n| schedulable(n)).collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut out = Vec::new();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        for offer in offers(node) {
            let taken = *held
                .entry((name.clone(), offer.resource.clone()))
                .or_insert_with(|| {
                    pods.iter()
                        .filter(|p| {
                            p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                                == Some(name.as_str())
                        })
                        .map(|p| pod_request(p, &offer.resource))
                        .fold(0u32, u32::saturating_add)
                });
            for n in 0..offer.count {
                let index = u32::try_from(out.len()).unwrap_or(u32::MAX);
                out.push(GpuDevice {
                    index,
                    uuid: format!("{name}/{}/{n}", offer.resource),
                    model: offer.model.clone(),
                    memory_total_bytes: offer.memory_bytes,
                    memory_free_bytes: offer.memory_bytes,
                    allocated: n < taken,
                    node: name.clone(),
                    ..Default::default()
                });
            }
        }
    }
    out
}

/// Nodes and the pods bound to them, watched; [`devices`](Self::devices)
/// reads the stores.
pub struct NodeInventory {
    nodes: Watched<Node>,
    pods: Watched<Pod>,
}

impl NodeInventory {
    /// Starts both watches (inside a Tokio runtime).
    pub fn spawn(client: kube::Client) -> Self {
        Self {
            nodes: Watched::spawn(
                Api::all(client.clone()),
                watcher::Config::default(),
                "nodes",
            ),
            pods: Watched::spawn(
                Api::all(client),
                // Pods that hold nothing any more are not worth a copy.
                watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed"),
                "pods of every namespace",
            ),
        }
    }

    /// The cluster's GPUs now; `None` until both watches have listed once
    /// (an empty store is not an empty cluster).
    pub fn devices(&self) -> Option<Vec<GpuDevice>> {
        if !self.nodes.synced() || !self.pods.synced() {
            return None;
        }
        let nodes = self.nodes.store.state();
        let pods = self.pods.store.state();
        Some(cluster_gpus(
            nodes.iter().map(AsRef::as_ref),
            pods.iter().map(AsRef::as_ref),
        ))
    }

    /// The `nvidia.com/gpu.product` values of the nodes whose whole GPUs
    /// are of the fleet's model `model` (`H100-80GB`), sorted; empty when
    /// none says so (no feature discovery labels).
    pub fn products_of(&self, model: &str) -> Vec<String> {
        let nodes = self.nodes.store.state();
        products_of(nodes.iter().map(AsRef::as_ref), model)
    }

    /// Receivers that see every change of nodes and of pods from now on.
    pub fn changes(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<u64>,
        tokio::sync::watch::Receiver<u64>,
    ) {
        (self.nodes.subscribe(), self.pods.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    pub(crate) fn node(name: &str, labels: Value, allocatable: Value) -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {},
            "status": {"allocatable": allocatable,
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    }

    fn gpu_pod(node: &str, gpus: u32, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p-{node}-{gpus}"), "namespace": "other"},
            "spec": {"nodeName": node, "containers": [{"name": "c",
                "resources": {"limits": {GPU_RESOURCE: gpus.to_string()}}}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn h100_node(name: &str, gpus: u32) -> Node {
        node(
            name,
            json!({LABEL_PRODUCT: "NVIDIA-H100-80GB-HBM3", LABEL_MEMORY: "81559",
                   "nvidia.com/gpu.count": gpus.to_string()}),
            json!({"cpu": "96", GPU_RESOURCE: gpus.to_string()}),
        )
    }

    #[test]
    fn products_are_named_as_the_fleet_names_them() {
        for (product, mib, expected) in [
            ("NVIDIA-H100-80GB-HBM3", 81559, "H100-80GB"),
            ("NVIDIA-L4", 23034, "L4-24GB"),
            ("Tesla-T4", 15360, "T4-16GB"),
            ("NVIDIA-A100-SXM4-40GB", 40960, "A100-40GB"),
            ("NVIDIA-A10G", 23028, "A10G-24GB"),
            ("NVIDIA-H200", 143771, "H200-141GB"),
        ] {
            assert_eq!(gpu_model(product, mib * MIB), expected, "{product}");
        }
    }

    #[test]
    fn the_products_of_a_gpu_model_are_those_its_nodes_are_labelled_with() {
        let l4 = node(
            "l4-a",
            json!({LABEL_PRODUCT: "NVIDIA-L4", LABEL_MEMORY: "23034"}),
            json!({GPU_RESOURCE: "4"}),
        );
        let unlabelled = node("plain", json!({}), json!({GPU_RESOURCE: "8"}));
        let nodes = [
            h100_node("h100-b", 8),
            l4,
            h100_node("h100-a", 8),
            unlabelled,
        ];
        assert_eq!(products_of(&nodes, "H100-80GB"), ["NVIDIA-H100-80GB-HBM3"]);
        assert_eq!(products_of(&nodes, "L4-24GB"), ["NVIDIA-L4"]);
        assert!(products_of(&nodes, "A100-80GB").is_empty());
    }

    #[test]
    fn a_nodes_gpus_less_those_its_pods_hold() {
        let nodes = [h100_node("gpu-b", 8), h100_node("gpu-a", 2)];
        let pods = [
            gpu_pod("gpu-b", 3, "Running"),
            gpu_pod("gpu-b", 1, "Pending"),
            gpu_pod("gpu-b", 4, "Succeeded"),
            gpu_pod("elsewhere", 1, "Running"),
        ];
        let gpus = cluster_gpus(&nodes, &pods);
        assert_eq!(gpus.len(), 10);
        assert!(gpus.iter().all(|g| g.model == "H100-80GB"));
        assert_eq!(gpus[0].node, "gpu-a", "nodes in name order");
        assert_eq!(gpus[0].memory_total_bytes, 81559 * MIB);
        let held: Vec<(&str, usize)> = ["gpu-a", "gpu-b"]
            .into_iter()
            .map(|n| {
                (
                    n,
                    gpus.iter().filter(|g| g.node == n && g.allocated).count(),
                )
            })
            .collect();
        assert_eq!(held, [("gpu-a", 0), ("gpu-b", 4)]);
        let uuids: std::collections::HashSet<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids.len(), gpus.len(), "unique device ids");
        assert_eq!(gpus[9].index, 9);
    }

    #[test]
    fn cordoned_and_not_ready_nodes_offer_nothing() {
        let mut cordoned = h100_node("cordoned", 8);
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        let mut down = h100_node("down", 8);
        down.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        let cpu_only = node("cpu", json!({}), json!({"cpu": "8"}));
        let nodes = [cordoned, down, cpu_only, h100_node("up", 1)];
        let gpus = cluster_gpus(&nodes, []);
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].node, "up");
    }

    #[test]
    fn mig_slices_are_models_of_their_own() {
        let mixed = node(
            "mig-mixed",
            json!({LABEL_PRODUCT: "NVIDIA-A100-SXM4-80GB", LABEL_MEMORY: "81920",
                   LABEL_MIG_STRATEGY: "mixed",
                   "nvidia.com/mig-1g.10gb.count": "7", "nvidia.com/mig-1g.10gb.memory": "9728"}),
            json!({"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "1"}),
        );
        let single = node(
            "mig-single",
            json!({LABEL_PRODUCT: "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", LABEL_MEMORY: "4864",
                   LABEL_MIG_STRATEGY: "single"}),
            json!({GPU_RESOURCE: "7"}),
        );
        let mut pod = gpu_pod("mig-mixed", 0, "Running");
        pod.spec.as_mut().unwrap().containers[0].resources = Some(
            serde_json::from_value(json!({"limits": {"nvidia.com/mig-1g.10gb": "2"}})).unwrap(),
        );
        let gpus = cluster_gpus(&[mixed, single], &[pod]);
        let count = |model: &str| gpus.iter().filter(|g| g.model == model).count();
        assert_eq!(count("A100-1g.10gb"), 7);
        assert_eq!(count("A100-3g.40gb"), 1);
        assert_eq!(count("A100-1g.5gb"), 7);
        let slice = gpus.iter().find(|g| g.model == "A100-1g.10gb").unwrap();
        assert_eq!(slice.memory_total_bytes, 9728 * MIB);
        let big = gpus.iter().find(|g| g.model == "A100-3g.40gb").unwrap();
        assert_eq!(
            big.memory_total_bytes,
            40 * GIB,
            "memory from the profile's name"
        );
        assert_eq!(
            gpus.iter()
                .filter(|g| g.model == "A100-1g.10gb" && g.allocated)
                .count(),
            2
        );
    }
}
