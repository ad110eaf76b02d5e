//! Prometheus metrics of the runner: its own, prefixed `flotilla_runner_`,
//! and the prefix cache's and KV usage under vLLM's names (`vllm:`, with a
//! `model_name` label), so that dashboards and the executor read both
//! engines alike.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use flotilla_gpu::DeviceReader;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct RunnerMetrics {
    pub registry: Registry,
    /// vLLM's names, unprefixed; encoded into the same answer.
    pub vllm_registry: Registry,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub requests: Counter,
    pub rejected: Counter,
    pub queue_depth: Gauge,
    /// Requests accepted and not finished, queued ones included: what the
    /// autoscaler's in-flight target reads.
    pub in_flight: Gauge,
    pub running: Gauge,
    pub kv_cache_tokens: Gauge,
    pub kv_cache_capacity: Gauge,
    pub kv_cache_usage: Gauge<f64, AtomicU64>,
    /// `vllm:kv_cache_usage_perc`: blocks running sequences hold over the
    /// budget's, 0 to 1.
    pub kv_cache_usage_perc: Gauge<f64, AtomicU64>,
    /// `vllm:prefix_cache_queries_total`: prompt tokens looked up.
    pub prefix_cache_queries: Counter,
    /// `vllm:prefix_cache_hits_total`: prompt tokens found cached.
    pub prefix_cache_hits: Counter,
    pub prefix_cache_blocks: Gauge,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    gpus: Option<GpuGauges>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model_name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    gpu: String,
    uuid: String,
    model: String,
}

/// The GPUs this runner uses, read from the driver at each scrape.
struct GpuGauges {
    reader: Mutex<Box<dyn DeviceReader + Send>>,
    /// NVML indices, UUIDs or UUID prefixes (as `CUDA_VISIBLE_DEVICES`
    /// names them).
    selection: Vec<String>,
    memory_used: Family<GpuLabels, Gauge>,
    memory_total: Family<GpuLabels, Gauge>,
    utilization: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    read_failures: Counter,
}

impl GpuGauges {
    fn sample(&self) {
        let Ok(mut reader) = self.reader.lock() else {
            return;
        };
        // A GPU that left (or a failed read) must not keep its last values.
        self.memory_used.clear();
        self.memory_total.clear();
        self.utilization.clear();
        let readings = match reader.read_devices() {
            Ok(r) => r,
            Err(e) => {
                self.read_failures.inc();
                tracing::debug!(error = %e, "reading the GPUs failed");
                return;
            }
        };
        for d in readings {
            let index = d.index.to_string();
            if !self
                .selection
                .iter()
                .any(|s| *s == index || (s.starts_with("GPU-") && d.uuid.starts_with(s.as_str())))
            {
                continue;
            }
            let labels = GpuLabels {
                model: flotilla_gpu::model_name(&d.name, d.memory_total_bytes),
                gpu: index,
                uuid: d.uuid,
            };
            let total = d.memory_total_bytes;
            let used = total.saturating_sub(d.memory_free_bytes);
            self.memory_used
                .get_or_create(&labels)
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            self.memory_total
                .get_or_create(&labels)
                .set(i64::try_from(total).unwrap_or(i64::MAX));
            if let Some(u) = d.utilization_percent {
                self.utilization
                    .get_or_create(&labels)
                    .set(f64::from(u.min(100)) / 100.0);
            }
        }
    }
}

/// Which GPU a `--device` uses, as NVML knows it: `None` for the CPU. The
/// CUDA ordinal counts within `CUDA_VISIBLE_DEVICES` when that is set
/// (its entries are indices or UUIDs).
pub fn gpu_selection(device: &str, cuda_visible_devices: Option<&str>) -> Option<Vec<String>> {
    let ordinal: usize = match device.split_once(':') {
        None if device == "cuda" => 0,
        Some(("cuda", n)) => n.parse().ok()?,
        _ => return None,
    };
    let visible: Vec<&str> = cuda_visible_devices
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if visible.is_empty() {
        return Some(vec![ordinal.to_string()]);
    }
    visible.get(ordinal).map(|v| vec![v.to_string()])
}

impl RunnerMetrics {
    /// The metrics of a runner serving `model_name` (the name clients use).
    pub fn new(model_name: &str) -> Self {
        let mut registry = Registry::with_prefix("flotilla_runner");
        let mut vllm_registry = Registry::default();
        let labels = ModelLabels {
            model_name: model_name.to_string(),
        };
        let queries = Family::<ModelLabels, Counter>::default();
        let hits = Family::<ModelLabels, Counter>::default();
        let usage_perc = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        vllm_registry.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            queries.clone(),
        );
        vllm_registry.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens whose keys and values came from the prefix cache",
            hits.clone(),
        );
        vllm_registry.register(
            "vllm:kv_cache_usage_perc",
            "KV cache blocks held by running sequences over the budget's blocks, 0 to 1",
            usage_perc.clone(),
        );
        let prefix_cache_queries = queries.get_or_create(&labels).clone();
        let prefix_cache_hits = hits.get_or_create(&labels).clone();
        let kv_cache_usage_perc = usage_perc.get_or_create(&labels).clone();
        let prefix_cache_blocks = Gauge::default();
        registry.register(
            "prefix_cache_blocks",
            "KV blocks in the prefix cache, held by running sequences or idle",
            prefix_cache_blocks.clone(),
        );
        let prompt_tokens = Counter::default();
        let completion_tokens = Counter::default();
        let requests = Counter::default();
        let rejected = Counter::default();
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        let running = Gauge::default();
        let kv_cache_tokens = Gauge::default();
        let kv_cache_capacity = Gauge::default();
        let kv_cache_usage = Gauge::<f64, AtomicU64>::default();
        let time_to_first_token = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let inter_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "prompt_tokens",
            "Tokens read from prompts",
            prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Tokens generated",
            completion_tokens.clone(),
        );
        registry.register("requests", "Requests accepted", requests.clone());
        registry.register(
            "rejected",
            "Requests refused because the queue was full",
            rejected.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for the engine",
            queue_depth.clone(),
        );
        registry.register("running", "Sequences in the running batch", running.clone());
        registry.register(
            "kv_cache_tokens",
            "Tokens in the KV blocks running sequences hold (a shared block counted once)",
            kv_cache_tokens.clone(),
        );
        registry.register(
            "kv_cache_capacity_tokens",
            "Tokens the KV cache budget holds (--kv-cache-budget, in whole blocks)",
            kv_cache_capacity.clone(),
        );
        registry.register(
            "kv_cache_usage_ratio",
            "KV cache tokens held over capacity; past 1 when decoding outgrows the budget",
            kv_cache_usage.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests accepted and not yet finished",
            in_flight.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From arrival to the first token",
            time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_seconds",
            "Between consecutive tokens",
            inter_token.clone(),
        );
        Self {
            registry,
            vllm_registry,
            prompt_tokens,
            completion_tokens,
            requests,
            rejected,
            queue_depth,
            in_flight,
            running,
            kv_cache_tokens,
            kv_cache_capacity,
            kv_cache_usage,
            kv_cache_usage_perc,
            prefix_cache_queries,
            prefix_cache_hits,
            prefix_cache_blocks,
            time_to_first_token,
            inter_token,
            gpus: None,
        }
    }

    /// Adds memory and utilisation gauges for the `selection` GPUs (see
    /// [`gpu_selection`]), read from `reader` at each scrape.
    pub fn with_gpus(
        mut self,
        reader: Box<dyn DeviceReader + Send>,
        selection: Vec<String>,
    ) -> Self {
        let gauges = GpuGauges {
            reader: Mutex::new(reader),
            selection,
            memory_used: Family::default(),
            memory_total: Family::default(),
            utilization: Family::default(),
            read_failures: Counter::default(),
        };
        self.registry.register(
            "gpu_memory_used_bytes",
            "GPU memory in use (all processes), from NVML",
            gauges.memory_used.clone(),
        );
        self.registry.register(
            "gpu_memory_total_bytes",
            "GPU memory, from NVML",
            gauges.memory_total.clone(),
        );
        self.registry.register(
            "gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy, 0 to 1, from NVML",
            gauges.utilization.clone(),
        );
        self.registry.register(
            "gpu_read_failures",
            "NVML reads that failed",
            gauges.read_failures.clone(),
        );
        self.gpus = Some(gauges);
        self
    }

    pub fn render(&self) -> String {
        if let Some(gpus) = &self.gpus {
            gpus.sample();
        }
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.vllm_registry))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

/// Counts a request in flight until dropped, however the request ends
/// (answered, failed, or the client went away).
pub struct InFlight(Gauge);

impl InFlight {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use flotilla_gpu::RecordedDevices;

    const RECORDED: &str = include_str!("../../../crates/gpu/tests/fixtures/nvml-2xh100.json");

    #[test]
    fn the_device_names_which_gpu_nvml_reports() {
        assert_eq!(gpu_selection("cpu", Some("0,1")), None);
        assert_eq!(gpu_selection("cuda", None), Some(vec!["0".into()]));
        assert_eq!(gpu_selection("cuda:1", Some("")), Some(vec!["1".into()]));
        assert_eq!(
            gpu_selection("cuda:1", Some("3, 5")),
            Some(vec!["5".into()])
        );
        assert_eq!(
            gpu_selection("cuda:0", Some("GPU-5b3a6d8e")),
            Some(vec!["GPU-5b3a6d8e".into()])
        );
        assert_eq!(gpu_selection("cuda:2", Some("0,1")), None);
    }

    #[test]
    fn gpu_gauges_show_the_selected_gpu_and_drop_one_that_left() {
        let reader = RecordedDevices::from_json(RECORDED).unwrap();
        let first = reader.frames[0].devices[1].clone();
        let metrics = RunnerMetrics::new("m").with_gpus(Box::new(reader), vec!["1".into()]);
        let text = metrics.render();
        let labels = format!("gpu=\"1\",uuid=\"{}\",model=\"H100-80GB\"", first.uuid);
        let used = first.memory_total_bytes - first.memory_free_bytes;
        assert!(
            text.contains(&format!(
                "flotilla_runner_gpu_memory_used_bytes{{{labels}}} {used}"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "flotilla_runner_gpu_memory_total_bytes{{{labels}}} {}",
            first.memory_total_bytes
        )));
        assert!(text.contains(&format!(
            "flotilla_runner_gpu_utilization_ratio{{{labels}}} 0.87"
        )));
        assert!(!text.contains("gpu=\"0\""), "only the selected GPU");
        // Second frame still has GPU 1; in the third it is gone.
        metrics.render();
        let text = metrics.render();
        assert!(
            !text.contains("flotilla_runner_gpu_memory_used_bytes{"),
            "{text}"
        );
    }

    #[test]
    fn a_cpu_runner_has_no_gpu_metrics() {
        assert!(!RunnerMetrics::new("m").render().contains("gpu_"));
    }
}
