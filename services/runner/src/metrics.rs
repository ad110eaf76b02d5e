//! Prometheus metrics of the runner.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct RunnerMetrics {
    pub registry: Registry,
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
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
}

impl RunnerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flotilla_runner");
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
            "Tokens held in the KV caches of running sequences",
            kv_cache_tokens.clone(),
        );
        registry.register(
            "kv_cache_capacity_tokens",
            "Tokens the KV caches may hold: batch slots times the context",
            kv_cache_capacity.clone(),
        );
        registry.register(
            "kv_cache_usage_ratio",
            "KV cache tokens held over capacity, 0 to 1",
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
            time_to_first_token,
            inter_token,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for RunnerMetrics {
    fn default() -> Self {
        Self::new()
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
