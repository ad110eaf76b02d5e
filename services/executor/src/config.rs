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

/// How replica pods get their model (kubernetes backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDeliveryKind {
    /// A ReadWriteMany PersistentVolumeClaim holding the executor's model
    /// cache (`--kube-model-pvc`), mounted read-only in every replica pod.
    Pvc,
    /// An init container (`flotilla-executor fetch-model`) fetches the
    /// model from the hub into a hostPath folder on the node
    /// (`--kube-node-cache-dir`), shared by the replicas on that node.
    NodeCache,
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

    /// How long a ready replica that is asked to stop (scaled down,
    /// replaced by a rollout, deleted) may take to finish the requests it
    /// serves, once out of routing, before it is stopped by force; 0 stops
    /// at once.
    #[arg(long, env = "FLOTILLA_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

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

    /// How replica pods get their model (kubernetes backend).
    #[arg(long, env = "FLOTILLA_MODEL_DELIVERY", value_enum, default_value_t = ModelDeliveryKind::Pvc)]
    pub model_delivery: ModelDeliveryKind,

    /// PersistentVolumeClaim (ReadWriteMany) that holds the model cache,
    /// mounted read-only at /models in replica pods (required with
    /// `--model-delivery pvc`).
    #[arg(long, env = "FLOTILLA_KUBE_MODEL_PVC")]
    pub kube_model_pvc: Option<String>,

    /// The folder on each node that holds the node's model cache
    /// (`--model-delivery node-cache`).
    #[arg(long, env = "FLOTILLA_KUBE_NODE_CACHE_DIR", default_value = backends::kubernetes::DEFAULT_NODE_CACHE_DIR)]
    pub kube_node_cache_dir: String,

    /// Most bytes of models one node's cache keeps; least recently used go
    /// first (`--model-delivery node-cache`).
    #[arg(long, env = "FLOTILLA_KUBE_NODE_CACHE_BUDGET", default_value = DEFAULT_NODE_CACHE_BUDGET)]
    pub kube_node_cache_budget: String,

    /// Image of the init container that fetches a replica's model
    /// (`--model-delivery node-cache`): one holding `flotilla-executor`.
    #[arg(long, env = "FLOTILLA_FETCH_IMAGE", default_value = DEFAULT_EXECUTOR_IMAGE)]
    pub fetch_image: String,

    /// The Secret and key holding this executor's NATS password, as
    /// `SECRET/KEY`: the fetch-model init container reads the password
    /// from there (`--model-delivery node-cache` with `--nats-password`;
    /// the password itself is never written into a pod spec).
    #[arg(long, env = "FLOTILLA_KUBE_NATS_PASSWORD_SECRET")]
    pub kube_nats_password_secret: Option<String>,

    /// Owner of every replica object, `deployment/NAME` (or `statefulset/`,
    /// `daemonset/`, `pod/`) in `--kube-namespace`: the executor's own
    /// Deployment, so that deleting it deletes the replicas.
    #[arg(long, env = "FLOTILLA_KUBE_OWNER")]
    pub kube_owner: Option<String>,

    /// How long a Kubernetes replica may take to become ready (image pull
    /// and model load included).
    #[arg(long, env = "FLOTILLA_KUBE_READY_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub kube_ready_timeout: Duration,
}

pub const DEFAULT_RUNNER_IMAGE: &str = concat!(
    "ghcr.io/flotilla-dev/flotilla-runner:",
    env!("CARGO_PKG_VERSION")
);
pub const DEFAULT_EXECUTOR_IMAGE: &str = concat!(
    "ghcr.io/flotilla-dev/flotilla-executor:",
    env!("CARGO_PKG_VERSION")
);
pub const DEFAULT_NODE_CACHE_BUDGET: &str = "500GiB";
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
            drain_timeout: crate::replicas::DEFAULT_DRAIN_TIMEOUT,
            vllm_bin: None,
            kube_namespace: "flotilla".into(),
            runner_image: DEFAULT_RUNNER_IMAGE.into(),
            vllm_image: DEFAULT_VLLM_IMAGE.into(),
            model_delivery: ModelDeliveryKind::Pvc,
            kube_model_pvc: None,
            kube_node_cache_dir: backends::kubernetes::DEFAULT_NODE_CACHE_DIR.into(),
            kube_node_cache_budget: DEFAULT_NODE_CACHE_BUDGET.into(),
            fetch_image: DEFAULT_EXECUTOR_IMAGE.into(),
            kube_nats_password_secret: None,
            kube_owner: None,
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
    /// Zero: replicas stop at once.
    pub drain_timeout: Duration,
}

/// The chosen backend with its settings.
// One value per process: boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum BackendSettings {
    Local,
    Kubernetes(backends::kubernetes::KubernetesConfig),
}

impl ExecutorArgs {
    /// How replica pods get their model, from the Kubernetes flags.
    fn model_delivery(&self) -> Result<backends::kubernetes::ModelDelivery, ConfigError> {
        match self.model_delivery {
            ModelDeliveryKind::Pvc => {
                let claim = self
                    .kube_model_pvc
                    .clone()
                    .filter(|c| !c.trim().is_empty())
                    .ok_or_else(|| {
                        ConfigError::new(
                            "kube-model-pvc",
                            "is required with --backend kubernetes and --model-delivery pvc \
                             (the ReadWriteMany claim holding the model cache)",
                        )
                    })?;
                Ok(backends::kubernetes::ModelDelivery::Pvc { claim })
            }
            ModelDeliveryKind::NodeCache => {
                let host_path = self.kube_node_cache_dir.trim();
                if !host_path.starts_with('/') || host_path.split('/').any(|p| p == "..") {
                    return Err(ConfigError::new(
                        "kube-node-cache-dir",
                        format!("{host_path:?} is not an absolute folder on the node"),
                    ));
                }
                if self.fetch_image.trim().is_empty() {
                    return Err(ConfigError::new("fetch-image", "must name an image"));
                }
                Ok(backends::kubernetes::ModelDelivery::NodeCache {
                    host_path: host_path.to_string(),
                    fetch_image: self.fetch_image.clone(),
                    fetch_env: self.fetch_env()?,
                    budget_bytes: parse_size(&self.kube_node_cache_budget)
                        .map_err(|e| ConfigError::new("kube-node-cache-budget", e))?,
                })
            }
        }
    }

    /// How the fetch-model init container reaches the bus: this executor's
    /// own bus settings, the password by reference to its Secret.
    fn fetch_env(&self) -> Result<Vec<k8s_openapi::api::core::v1::EnvVar>, ConfigError> {
        use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
        let bus = &self.bus;
        let files = [
            ("nats-creds", &bus.nats_creds),
            ("nats-tls-ca", &bus.nats_tls_ca),
            ("nats-tls-cert", &bus.nats_tls_cert),
            ("nats-tls-key", &bus.nats_tls_key),
        ];
        if let Some((flag, _)) = files.iter().find(|(_, f)| f.is_some()) {
            return Err(ConfigError::new(
                "model-delivery",
                format!(
                    "node-cache cannot hand --{flag} (a file) to the fetch-model init container \
                     yet; reach NATS through a leaf node or with a user and password, or use \
                     --model-delivery pvc"
                ),
            ));
        }
        let value = |name: &str, value: String| EnvVar {
            name: name.into(),
            value: Some(value),
            value_from: None,
        };
        let mut env = vec![
            value("FLOTILLA_NATS_URL", bus.nats_url.clone()),
            value("FLOTILLA_SUBJECT_PREFIX", bus.subject_prefix.clone()),
        ];
        if let Some(prefix) = &bus.nats_inbox_prefix {
            env.push(value("FLOTILLA_NATS_INBOX_PREFIX", prefix.clone()));
        }
        if bus.nats_require_tls {
            env.push(value("FLOTILLA_NATS_REQUIRE_TLS", "true".into()));
        }
        if let Some(user) = &bus.nats_user {
            env.push(value("FLOTILLA_NATS_USER", user.clone()));
        }
        if bus.nats_password.is_some() {
            let reference = self.kube_nats_password_secret.as_deref().ok_or_else(|| {
                ConfigError::new(
                    "kube-nats-password-secret",
                    "is required with --model-delivery node-cache and a NATS password: the \
                     fetch-model init container reads the password from that Secret \
                     (SECRET/KEY)",
                )
            })?;
            let (secret, key) = reference
                .split_once('/')
                .filter(|(s, k)| !s.is_empty() && !k.is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "kube-nats-password-secret",
                        format!("{reference:?} is not SECRET/KEY"),
                    )
                })?;
            env.push(EnvVar {
                name: "FLOTILLA_NATS_PASSWORD".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.into(),
                        key: key.into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            });
        }
        Ok(env)
    }

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
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "drain-timeout",
                format!(
                    "{} is more than an hour",
                    humantime::format_duration(self.drain_timeout)
                ),
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
                for (flag, image) in [
                    ("runner-image", &self.runner_image),
                    ("vllm-image", &self.vllm_image),
                ] {
                    if image.trim().is_empty() {
                        return Err(ConfigError::new(flag, "must name an image"));
                    }
                }
                if let Some(owner) = &self.kube_owner {
                    backends::kubernetes::parse_owner(owner)
                        .map_err(|e| ConfigError::new("kube-owner", e))?;
                }
                BackendSettings::Kubernetes(backends::kubernetes::KubernetesConfig {
                    cluster: cluster.clone(),
                    namespace: self.kube_namespace.clone(),
                    runner_image: self.runner_image.clone(),
                    vllm_image: self.vllm_image.clone(),
                    model_delivery: self.model_delivery()?,
                    owner_name: self.kube_owner.clone(),
                    owner: None,
                    ready_timeout: self.kube_ready_timeout,
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
            drain_timeout: self.drain_timeout,
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

#[cfg(test)]
mod kubernetes_flag_tests {
    use clap::Parser;

    use super::*;
    use crate::backends::kubernetes::ModelDelivery;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ExecutorArgs,
    }

    fn kube(flags: &[&str]) -> Result<backends::kubernetes::KubernetesConfig, ConfigError> {
        let mut line = vec!["executor", "--cluster", "eu-1", "--backend", "kubernetes"];
        line.extend_from_slice(flags);
        match Cli::try_parse_from(line).unwrap().args.validate()?.backend {
            BackendSettings::Kubernetes(k) => Ok(k),
            BackendSettings::Local => panic!("not the kubernetes backend"),
        }
    }

    #[test]
    fn pvc_delivery_needs_the_claim() {
        let e = kube(&[]).unwrap_err();
        assert_eq!(e.flag, "kube-model-pvc");
        let k = kube(&["--kube-model-pvc", "models"]).unwrap();
        assert_eq!(
            k.model_delivery,
            ModelDelivery::Pvc {
                claim: "models".into()
            }
        );
        assert_eq!((k.owner_name, k.owner), (None, None));
    }

    #[test]
    fn node_cache_delivery_hands_the_bus_settings_to_the_init_container() {
        let k = kube(&[
            "--model-delivery",
            "node-cache",
            "--nats-url",
            "nats://hub:4222",
            "--kube-node-cache-budget",
            "1TiB",
            "--fetch-image",
            "flotilla-executor:test",
            "--kube-owner",
            "deployment/flotilla-executor",
        ])
        .unwrap();
        let ModelDelivery::NodeCache {
            host_path,
            fetch_image,
            fetch_env,
            budget_bytes,
        } = k.model_delivery
        else {
            panic!("not node-cache");
        };
        assert_eq!(host_path, "/var/lib/flotilla/models");
        assert_eq!(fetch_image, "flotilla-executor:test");
        assert_eq!(budget_bytes, 1 << 40);
        assert_eq!(
            serde_json::to_value(&fetch_env).unwrap(),
            serde_json::json!([
                {"name": "FLOTILLA_NATS_URL", "value": "nats://hub:4222"},
                {"name": "FLOTILLA_SUBJECT_PREFIX", "value": flotilla_proto::DEFAULT_PREFIX},
            ])
        );
        assert_eq!(
            k.owner_name.as_deref(),
            Some("deployment/flotilla-executor")
        );
    }

    #[test]
    fn a_nats_password_reaches_the_init_container_only_through_its_secret() {
        let base = [
            "--model-delivery",
            "node-cache",
            "--nats-user",
            "executor-eu-1",
            "--nats-password",
            "s3cret-value",
        ];
        assert_eq!(kube(&base).unwrap_err().flag, "kube-nats-password-secret");
        let mut flags = base.to_vec();
        flags.extend(["--kube-nats-password-secret", "nats-users"]);
        assert!(kube(&flags).unwrap_err().reason.contains("SECRET/KEY"));
        flags.pop();
        flags.push("nats-users/executor-eu-1");
        let ModelDelivery::NodeCache { fetch_env, .. } = kube(&flags).unwrap().model_delivery
        else {
            panic!("not node-cache");
        };
        let env = serde_json::to_string(&fetch_env).unwrap();
        assert!(!env.contains("s3cret-value"), "{env}");
        assert!(
            env.contains(
                r#"{"name":"FLOTILLA_NATS_PASSWORD","valueFrom":{"secretKeyRef":{"key":"executor-eu-1","name":"nats-users"}}}"#
            ),
            "{env}"
        );
        assert!(
            env.contains(r#"{"name":"FLOTILLA_NATS_USER","value":"executor-eu-1"}"#),
            "{env}"
        );
    }

    #[test]
    fn node_cache_flags_are_checked() {
        let e = kube(&[
            "--model-delivery",
            "node-cache",
            "--kube-node-cache-dir",
            "relative/dir",
        ])
        .unwrap_err();
        assert_eq!(e.flag, "kube-node-cache-dir");
        let e = kube(&["--model-delivery", "node-cache", "--nats-creds", "/x.creds"]).unwrap_err();
        assert!(e.reason.contains("--nats-creds"), "{e}");
        let e = kube(&["--kube-model-pvc", "m", "--kube-owner", "service/x"]).unwrap_err();
        assert_eq!(e.flag, "kube-owner");
    }
}
