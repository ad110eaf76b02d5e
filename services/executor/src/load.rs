//! Load summaries of this cluster's ready replicas, for the autoscaler.
//!
//! Every few seconds the executor reads each local replica's own
//! `/metrics` (the runner's or vLLM's) and turns it
//! into a [`v1::ReplicaUsage`]: requests in flight and queued, tokens per
//! second and the time-to-first-token p95 over the last period. The
//! heartbeat carries the latest summaries, so they reach the bus with no
//! central poller.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_kit::{RecordStore, now_unix_ms, sync};
use flotilla_proto::v1::{self, ReplicaPhase, ReplicaStatus};
use tokio_util::sync::CancellationToken;

/// What one scrape of a runner's `/metrics` says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub in_flight: f64,
    pub queued: f64,
    pub completion_tokens: f64,
    /// 0 to 1; several engines' shares are averaged.
    pub kv_cache_usage: f64,
    /// Cumulative `(le seconds, count)` of the time-to-first-token histogram.
    pub ttft_buckets: Vec<(f64, f64)>,
}

/// Reads a replica's Prometheus text: the runner's names or vLLM's
/// (`vllm:num_requests_running` + `_waiting` in flight, `_waiting` queued,
/// `vllm:generation_tokens_total`, `vllm:time_to_first_token_seconds`,
/// `vllm:kv_cache_usage_perc` or its older name `vllm:gpu_cache_usage_perc`).
/// Series of one name (vLLM labels them by model and engine) are summed,
/// KV usage averaged; unknown lines are skipped.
pub fn parse(text: &str) -> Scrape {
    let mut out = Scrape::default();
    let (mut kv_sum, mut kv_series) = (0.0, 0u32);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "flotilla_runner_requests_in_flight" | "vllm:num_requests_running" => {
                out.in_flight += value
            }
            "flotilla_runner_queue_depth" => out.queued += value,
            // vLLM's running requests do not count its waiting ones.
            "vllm:num_requests_waiting" => {
                out.queued += value;
                out.in_flight += value;
            }
            "flotilla_runner_completion_tokens_total" | "vllm:generation_tokens_total" => {
                out.completion_tokens += value
            }
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                kv_sum += value;
                kv_series += 1;
            }
            "flotilla_runner_time_to_first_token_seconds_bucket"
            | "vllm:time_to_first_token_seconds_bucket" => {
                let le = labels
                    .trim_end_matches('}')
                    .split(',')
                    .find_map(|l| l.trim().strip_prefix("le=\""))
                    .and_then(|l| l.trim_end_matches('"').parse::<f64>().ok());
                if let Some(le) = le {
                    match out.ttft_buckets.iter_mut().find(|(b, _)| *b == le) {
                        Some((_, count)) => *count += value,
                        None => out.ttft_buckets.push((le, value)),
                    }
                }
            }
            _ => {}
        }
    }
    out.ttft_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if kv_series > 0 {
        out.kv_cache_usage = (kv_sum / f64::from(kv_series)).clamp(0.0, 1.0);
    }
    out
}

/// The 95th percentile (upper bucket bound, ms) of the observations made
/// between two scrapes; 0 when there were none.
pub fn ttft_p95_ms(before: &[(f64, f64)], now: &[(f64, f64)]) -> f64 {
    let delta: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, count - earlier)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return 0.0;
    }
    let bound = delta
        .iter()
        .find(|(_, c)| *c >= 0.95 * total)
        .map_or(f64::INFINITY, |(le, _)| *le);
    if bound.is_finite() {
        bound * 1000.0
    } else {
        // Past the largest bucket: report the largest finite bound.
        delta
            .iter()
            .rev()
            .find(|(le, _)| le.is_finite())
            .map_or(0.0, |(le, _)| le * 1000.0)
    }
}

/// GPUs this executor's replicas hold, by replica: taken when a start
/// begins (the start command says how many), given back when the replica
/// stops or fails. Heartbeats report them in each replica's usage and mark
/// as many devices allocated, so a cluster's free count includes
/// Flotilla's own replicas.
#[derive(Debug, Default)]
pub struct GpuHolds {
    held: Mutex<BTreeMap<String, u32>>,
}

impl GpuHolds {
    pub fn hold(&self, replica_id: &str, gpus: u32) {
        sync::lock(&self.held).insert(replica_id.to_string(), gpus);
    }

    pub fn release(&self, replica_id: &str) {
        sync::lock(&self.held).remove(replica_id);
    }

    /// GPUs `replica_id` holds; 0 for one not held here.
    pub fn of(&self, replica_id: &str) -> u32 {
        sync::lock(&self.held).get(replica_id).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u32 {
        sync::lock(&self.held)
            .values()
            .fold(0u32, |sum, n| sum.saturating_add(*n))
    }
}

/// Marks the first `held` devices by index allocated (declared or NVML
/// inventory, where nothing else knows which device a replica uses).
pub fn mark_allocated(gpus: &mut [v1::GpuDevice], held: u32) {
    let mut order: Vec<usize> = (0..gpus.len()).collect();
    order.sort_by_key(|i| gpus[*i].index);
    for i in order.into_iter().take(held as usize) {
        gpus[i].allocated = true;
    }
}

struct Previous {
    at: Instant,
    scrape: Scrape,
}

pub struct LoadSampler {
    cluster: String,
    holds: Arc<GpuHolds>,
    client: reqwest::Client,
    previous: Mutex<HashMap<String, Previous>>,
    latest: Mutex<Vec<v1::ReplicaUsage>>,
}

impl LoadSampler {
    pub fn new(cluster: String, holds: Arc<GpuHolds>) -> Self {
        Self {
            cluster,
            holds,
            client: reqwest::Client::new(),
            previous: Mutex::new(HashMap::new()),
            latest: Mutex::new(Vec::new()),
        }
    }

    /// The latest summaries, for the next heartbeat.
    pub fn snapshot(&self) -> Vec<v1::ReplicaUsage> {
        sync::lock(&self.latest).clone()
    }

    async fn sample(&self, replicas: &RecordStore<ReplicaStatus>) {
        let mine: Vec<ReplicaStatus> = replicas
            .cached_all()
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| {
                r.cluster == self.cluster
                    && r.phase() == ReplicaPhase::Ready
                    && !r.endpoint.is_empty()
            })
            .collect();
        let mut usage = Vec::with_capacity(mine.len());
        for r in mine {
            let scraped = async {
                let response = self
                    .client
                    .get(format!("{}/metrics", r.endpoint.trim_end_matches('/')))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.text().await.ok()
            }
            .await;
            let Some(text) = scraped else {
                // Not answering: no summary, so the autoscaler does not
                // count it, and the health probe reports it.
                continue;
            };
            let scrape = parse(&text);
            let now = Instant::now();
            let before = sync::lock(&self.previous)
                .get(&r.replica_id)
                .map(|p| (p.at, p.scrape.clone()));
            let (tokens_per_second, ttft) = match before {
                Some((at, before)) => {
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    (
                        ((scrape.completion_tokens - before.completion_tokens) / secs).max(0.0),
                        ttft_p95_ms(&before.ttft_buckets, &scrape.ttft_buckets),
                    )
                }
                None => (0.0, 0.0),
            };
            usage.push(v1::ReplicaUsage {
                replica_id: r.replica_id.clone(),
                deployment: r.deployment.clone(),
                gpus: self.holds.of(&r.replica_id),
                ready: true,
                in_flight: scrape.in_flight,
                queued: scrape.queued,
                kv_cache_usage: scrape.kv_cache_usage,
                ttft_p95_ms: ttft,
                tokens_per_second,
                sampled_at_unix_ms: now_unix_ms(),
                ..Default::default()
            });
            sync::lock(&self.previous).insert(r.replica_id.clone(), Previous { at: now, scrape });
        }
        sync::lock(&self.previous).retain(|id, _| usage.iter().any(|u| &u.replica_id == id));
        *sync::lock(&self.latest) = usage;
    }

    /// Samples every `interval` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        replicas: RecordStore<ReplicaStatus>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sample(&replicas).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP flotilla_runner_requests_in_flight Requests accepted and not yet finished.
# TYPE flotilla_runner_requests_in_flight gauge
flotilla_runner_requests_in_flight 3
flotilla_runner_queue_depth 2
flotilla_runner_completion_tokens_total 120
flotilla_runner_time_to_first_token_seconds_bucket{le="0.1"} 1
flotilla_runner_time_to_first_token_seconds_bucket{le="0.2"} 5
flotilla_runner_time_to_first_token_seconds_bucket{le="0.4"} 10
flotilla_runner_time_to_first_token_seconds_bucket{le="+Inf"} 10
"#;

    #[test]
    fn reads_the_runner_metrics() {
        let s = parse(TEXT);
        assert_eq!(
            (s.in_flight, s.queued, s.completion_tokens),
            (3.0, 2.0, 120.0)
        );
        assert_eq!(s.ttft_buckets.len(), 4);
        assert!(s.ttft_buckets[3].0.is_infinite());
    }

    /// vLLM 0.10's exposition: labelled series, two engines.
    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 1.0
vllm:num_requests_waiting{engine="0",model_name="qwen"} 2.0
vllm:num_requests_waiting{engine="1",model_name="qwen"} 0.0
vllm:generation_tokens_total{engine="0",model_name="qwen"} 1000.0
vllm:generation_tokens_total{engine="1",model_name="qwen"} 500.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="qwen"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="qwen"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="0.1",model_name="qwen"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="1",le="+Inf",model_name="qwen"} 1.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="qwen"} 6.0
vllm:gpu_cache_usage_perc{engine="0",model_name="qwen"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="qwen"} 0.25
"#;

    #[test]
    fn reads_vllms_metrics_summed_over_its_series() {
        let s = parse(VLLM);
        assert_eq!(
            (s.in_flight, s.queued, s.completion_tokens),
            (6.0, 2.0, 1500.0)
        );
        assert_eq!(s.ttft_buckets, vec![(0.1, 5.0), (f64::INFINITY, 7.0)]);
        // 7 first tokens, 5 under 100 ms: the p95 is past the largest
        // bound, reported as that bound.
        assert_eq!(ttft_p95_ms(&[], &s.ttft_buckets), 100.0);
        assert_eq!(ttft_p95_ms(&[], &parse(TEXT).ttft_buckets), 400.0);
        // Either name, averaged over the engines that report it.
        assert_eq!(s.kv_cache_usage, 0.375);
        assert_eq!(parse(TEXT).kv_cache_usage, 0.0);
    }

    #[test]
    fn held_gpus_mark_the_first_devices_by_index() {
        let holds = GpuHolds::default();
        holds.hold("a", 1);
        holds.hold("b", 2);
        holds.hold("b", 1);
        assert_eq!((holds.of("a"), holds.of("b"), holds.total()), (1, 1, 2));
        let mut gpus: Vec<v1::GpuDevice> = [2, 0, 1]
            .into_iter()
            .map(|index| v1::GpuDevice {
                index,
                ..Default::default()
            })
            .collect();
        mark_allocated(&mut gpus, holds.total());
        let allocated: Vec<(u32, bool)> = gpus.iter().map(|g| (g.index, g.allocated)).collect();
        assert_eq!(allocated, [(2, false), (0, true), (1, true)]);
        holds.release("a");
        assert_eq!(holds.total(), 1);
        mark_allocated(&mut gpus, 9);
        assert!(gpus.iter().all(|g| g.allocated), "more held than there are");
    }

    #[test]
    fn the_p95_is_of_the_period_only() {
        let before = vec![(0.1, 1.0), (0.2, 1.0), (0.4, 1.0), (f64::INFINITY, 1.0)];
        let now = parse(TEXT).ttft_buckets;
        // 9 new: 4 under 0.2 s, 5 more under 0.4 s -> p95 bound 400 ms.
        assert_eq!(ttft_p95_ms(&before, &now), 400.0);
        assert_eq!(ttft_p95_ms(&now, &now), 0.0);
        let slow = vec![(0.1, 0.0), (0.2, 0.0), (0.4, 0.0), (f64::INFINITY, 4.0)];
        assert_eq!(ttft_p95_ms(&[], &slow), 400.0);
    }
}
