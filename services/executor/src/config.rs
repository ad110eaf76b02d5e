//! The executor's settings: flags ([`ExecutorArgs`]) and what they
//! validate into ([`Config`]).

use std::net::SocketAddr;
use std::time::Duration;

use flotilla_kit::{BusArgs, BusConfig, ConfigError};
use flotilla_proto::v1;

use crate::backends;
use crate::declared::{DeclaredGpus, parse_labels, parse_taints};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuSource {
    /// NVML when a driver and a GPU are present, else the declared GPUs.
    Auto,
    /// NVML only; fail at start without a driver.
    Nvml,
    /// The declared GPUs only (simulated or CPU-only clusters).
    Declared,
}

/// Where replicas run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Local processes on free ports (the embedded default).
    Local,
    /// One Deployment per replica through the Kubernetes API (in-cluster
    /// config or KUBECONFIG).
    Kubernetes,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExecutorArgs {
    #[command(flatten)]
    pub bus: BusArgs,

    /// This cluster's name (a DNS label, unique in the fleet).
    #[arg(long, env = "FLOTILLA_CLUSTER")]
    pub cluster: Option<String>,

    /// Cluster labels, `key=value`, comma-separated or repeated
    /// (region, zone, env, provider, ...).
    #[arg(long = "label", env = "FLOTILLA_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Taints, `key=value:Effect` or `key:Effect` (NoSchedule,
    /// PreferNoSchedule, NoExecute).
    #[arg(long = "taint", env = "FLOTILLA_TAINTS", value_delimiter = ',')]
    pub taints: Vec<String>,

    /// Declared GPUs, `COUNTxMODEL-SIZEGB`, e.g. `2xH100-80GB,1xL4-24GB`.
    #[arg(long, env = "FLOTILLA_GPUS", default_value = "")]
    pub gpus: String,

    /// Where GPU figures come from.
    #[arg(long, env = "FLOTILLA_GPU_SOURCE", value_enum, default_value_t = GpuSource::Auto)]
    pub gpu_source: GpuSource,

    /// Price of one GPU for an hour, in the fleet's currency.
    #[arg(long, env = "FLOTILLA_COST_PER_GPU_HOUR", default_value_t = 0.0)]
    pub cost_per_gpu_hour: f64,

    #[arg(long, env = "FLOTILLA_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// On a graceful exit (SIGTERM, Ctrl-C), leave the replicas serving and
    /// tell the fleet a next instance will be back within this long: an
    /// upgrade or a drain is then not a dead cluster (nothing is
    /// re-placed). `0`: the exit stops the replicas (local backend) and the
    /// cluster's silence is judged as any other.
    #[arg(long, env = "FLOTILLA_RESTART_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub restart_grace: Duration,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOTILLA_HTTP_ADDR", default_value = "127.0.0.1:0")]
    pub http_addr: SocketAddr,

    /// The cluster edge's base URL as the hub reaches it
    /// (`https://edge.eu-1.example:8443`), reported in heartbeats: the
    /// global gateway then reaches this cluster's replicas only through
    /// it. Unset: replicas are reached at their own addresses.
    #[arg(long, env = "FLOTILLA_EDGE_URL")]
    pub edge_url: Option<String>,

    /// The address local replicas listen on and are reached at (local
    /// backend): the cluster's own network, such as a pod network the hub
    /// has no route to.
    #[arg(long, env = "FLOTILLA_REPLICA_HOST", default_value = "127.0.0.1")]
    pub replica_host: std::net::IpAddr,

    /// The model cache; by default `.flotilla/cache/<cluster>`.
    #[arg(long, env = "FLOTILLA_MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<std::path::PathBuf>,

    /// Most bytes of models kept; least recently used go first. `50GiB`,
    /// `512MiB` or a byte count.
    #[arg(long, env = "FLOTILLA_MODEL_CACHE_BUDGET", default_value = "50GiB")]
    pub model_cache_budget: String,

    /// The flotilla-runner binary for local replicas; by default next to
    /// this binary, then PATH.
    #[arg(long, env = "FLOTILLA_RUNNER_BIN")]
    pub runner_bin: Option<std::path::PathBuf>,

    /// Where replicas run.
    #[arg(long, env = "FLOTILLA_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,

    /// Start and stop commands handled at once (1 to 256): a replica slow
    /// to come up (a pod waiting for a node) holds one and not the rest.
    #[arg(long, env = "FLOTILLA_MAX_CONCURRENT_STARTS", default_value_t = crate::replicas::DEFAULT_MAX_CONCURRENT_STARTS)]
    pub max_concurrent_starts: usize,

    /// The `vllm` executable for local `runtime: vllm` replicas; by
    /// default `vllm` on PATH.
    #[arg(long, env = "FLOTILLA_VLLM_BIN")]
    pub vllm_bin: Option<std::path::PathBuf>,

    /// Namespace of replica Deployments (kubernetes backend).
    #[arg(long, env = "FLOTILLA_KUBE_NAMESPACE", default_value = "flotilla")]
    pub kube_namespace: String,

    /// Image of candle replicas (kubernetes backend); runs
    /// `flotilla-runner`.
    #[arg(long, env = "FLOTILLA_RUNNER_IMAGE", default_value = DEFAULT_RUNNER_IMAGE)]
    pub runner_image: String,

    /// Image of vLLM replicas (kubernetes backend); runs `vllm serve`.
    #[arg(long, env = "FLOTILLA_VLLM_IMAGE", default_value = DEFAULT_VLLM_IMAGE)]
    pub vllm_image: String,

    /// PersistentVolumeClaim that holds the model cache, mounted read-only
    /// at /models in replica pods (kubernetes backend; required there).
    #[arg(long, env = "FLOTILLA_KUBE_MODEL_PVC")]
    pub kube_model_pvc: Option<String>,

    /// How long a Kubernetes replica may take to become ready (image pull
    /// and model load included).
    #[arg(long, env = "FLOTILLA_KUBE_READY_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub kube_ready_timeout: Duration,
}

pub const DEFAULT_RUNNER_IMAGE: &str = concat!(
    "ghcr.io/flotilla-dev/flotilla-runner:",
    env!("CARGO_PKG_VERSION")
);
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_VLLM_IMAGE: &str = "vllm/vllm-openai:v0.11.0";

impl Default for ExecutorArgs {
    fn default() -> Self {
        Self {
            bus: BusArgs::default(),
            cluster: None,
            labels: Vec::new(),
            taints: Vec::new(),
            gpus: String::new(),
            gpu_source: GpuSource::Auto,
            cost_per_gpu_hour: 0.0,
            heartbeat_interval: Duration::from_secs(1),
            restart_grace: DEFAULT_RESTART_GRACE,
            http_addr: ([127, 0, 0, 1], 0).into(),
            edge_url: None,
            replica_host: std::net::IpAddr::from([127, 0, 0, 1]),
            model_cache_dir: None,
            model_cache_budget: "50GiB".into(),
            runner_bin: None,
            backend: BackendKind::Local,
            max_concurrent_starts: crate::replicas::DEFAULT_MAX_CONCURRENT_STARTS,
            vllm_bin: None,
            kube_namespace: "flotilla".into(),
            runner_image: DEFAULT_RUNNER_IMAGE.into(),
            vllm_image: DEFAULT_VLLM_IMAGE.into(),
            kube_model_pvc: None,
            kube_ready_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// An edge URL as the gateway will use it: `http` or `https`, a host, no
/// path beyond `/` (the gateway appends `/v1/...`); the trailing `/` is
/// dropped.
pub fn check_edge_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| format!("{text:?} is not a URL such as https://edge.example:8443 ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: the scheme must be https (or http)"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} names no host"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(format!(
            "{text:?}: give the edge's base URL without a path; the gateway adds /v1/..."
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// `50GiB`, `512MiB`, `2GB`, or bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 50GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub bus: BusConfig,
    pub cluster: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub taints: Vec<v1::Taint>,
    pub declared: DeclaredGpus,
    pub gpu_source: GpuSource,
    pub cost_per_gpu_hour: f64,
    pub heartbeat_interval: Duration,
    /// Zero: an exit stops the replicas instead of handing them over.
    pub restart_grace: Duration,
    pub http_addr: SocketAddr,
    /// Empty: no edge.
    pub edge_url: String,
    pub replica_host: std::net::IpAddr,
    pub model_cache_dir: std::path::PathBuf,
    pub model_cache_budget_bytes: u64,
    pub runner_bin: std::path::PathBuf,
    pub vllm_bin: Option<std::path::PathBuf>,
    pub backend: BackendSettings,
    pub max_concurrent_starts: usize,
}

/// The chosen backend with its settings.
#[derive(Debug, Clone)]
pub enum BackendSettings {
    Local,
    Kubernetes(backends::kubernetes::KubernetesConfig),
}

impl ExecutorArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let cluster = self
            .cluster
            .clone()
            .ok_or_else(|| ConfigError::new("cluster", "is required"))?;
        flotilla_proto::check_name("cluster", &cluster)
            .map_err(|e| ConfigError::new("cluster", e.to_string()))?;
        if !self.cost_per_gpu_hour.is_finite() || self.cost_per_gpu_hour < 0.0 {
            return Err(ConfigError::new(
                "cost-per-gpu-hour",
                "must be a price of 0 or more",
            ));
        }
        if self.heartbeat_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "heartbeat-interval",
                "must be at least 10ms",
            ));
        }
        if !(1..=256).contains(&self.max_concurrent_starts) {
            return Err(ConfigError::new(
                "max-concurrent-starts",
                format!("{} is not 1 to 256", self.max_concurrent_starts),
            ));
        }
        let edge_url = match &self.edge_url {
            None => String::new(),
            Some(url) => check_edge_url(url).map_err(|e| ConfigError::new("edge-url", e))?,
        };
        let backend = match self.backend {
            BackendKind::Local => BackendSettings::Local,
            BackendKind::Kubernetes => {
                flotilla_proto::check_name("kube-namespace", &self.kube_namespace)
                    .map_err(|e| ConfigError::new("kube-namespace", e.to_string()))?;
                let model_pvc = self.kube_model_pvc.clone().ok_or_else(|| {
                    ConfigError::new(
                        "kube-model-pvc",
                        "is required with --backend kubernetes (the claim holding the model cache)",
                    )
                })?;
                for (flag, image) in [
                    ("runner-image", &self.runner_image),
                    ("vllm-image", &self.vllm_image),
                ] {
                    if image.trim().is_empty() {
                        return Err(ConfigError::new(flag, "must name an image"));
                    }
                }
                BackendSettings::Kubernetes(backends::kubernetes::KubernetesConfig {
                    cluster: cluster.clone(),
                    namespace: self.kube_namespace.clone(),
                    runner_image: self.runner_image.clone(),
                    vllm_image: self.vllm_image.clone(),
                    model_pvc,
                    ready_timeout: self.kube_ready_timeout,
                    poll_interval: Duration::from_secs(2),
                })
            }
        };
        Ok(Config {
            bus: self.bus.validate()?,
            cluster: cluster.clone(),
            labels: parse_labels(&self.labels).map_err(|e| ConfigError::new("label", e))?,
            taints: parse_taints(&self.taints).map_err(|e| ConfigError::new("taint", e))?,
            declared: DeclaredGpus::parse(&self.gpus).map_err(|e| ConfigError::new("gpus", e))?,
            gpu_source: self.gpu_source,
            cost_per_gpu_hour: self.cost_per_gpu_hour,
            heartbeat_interval: self.heartbeat_interval,
            restart_grace: self.restart_grace,
            http_addr: self.http_addr,
            edge_url,
            replica_host: self.replica_host,
            model_cache_dir: self
                .model_cache_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(".flotilla/cache").join(&cluster)),
            model_cache_budget_bytes: parse_size(&self.model_cache_budget)
                .map_err(|e| ConfigError::new("model-cache-budget", e))?,
            runner_bin: backends::local::find_runner(self.runner_bin.clone()),
            vllm_bin: backends::local::find_vllm(self.vllm_bin.clone()),
            backend,
            max_concurrent_starts: self.max_concurrent_starts,
        })
    }
}

#[cfg(test)]
mod edge_url_tests {
    use super::check_edge_url;

    #[test]
    fn an_edge_url_is_a_base_url_with_a_host() {
        assert_eq!(
            check_edge_url("https://edge.eu-1.example:8443/").unwrap(),
            "https://edge.eu-1.example:8443"
        );
        assert_eq!(
            check_edge_url("http://10.0.0.2:8443").unwrap(),
            "http://10.0.0.2:8443"
        );
        for (bad, says) in [
            ("edge:8443", "scheme"),
            ("ftp://edge", "scheme"),
            ("https://edge/v1", "without a path"),
            ("not a url", "not a URL"),
        ] {
            let e = check_edge_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
