//! `flotilla-runner`: the inference server an executor starts for each
//! replica. It loads one model, builds its tokenizer and chat template from
//! the model's own files, and serves the OpenAI API on the same paths as
//! vLLM, so executors and the gateway treat both alike.
//!
//! What it loads today:
//!
//! - **Models**: the llama, mistral and qwen2 architectures, from a GGUF
//!   file or from a Hugging Face folder (`config.json`, `*.safetensors`,
//!   `tokenizer.json`, optionally `tokenizer_config.json`).
//! - **Weights**: GGUF Q4_0, Q4_1 and Q8_0 through the project's own
//!   kernels ([`flotilla_kernels`], x86-64 SIMD chosen at run time); every
//!   other type candle's `QMatMul` runs (the K-quants, f16, f32, ...)
//!   through candle. Safetensors in f32, f16 or bf16, computed in f32.
//! - **Tokenizers** ([`tokenizer`]): byte-level BPE (`tokenizer.ggml.model
//!   = gpt2`, or a `tokenizer.json` with ByteLevel) with GPT-2's, SmolLM2's,
//!   Llama 3's or Qwen2's pre-tokenizer, any other refused by name; and
//!   SentencePiece BPE (`llama`, or a `tokenizer.json` that writes spaces as
//!   `▁`) with byte fallback. Not Unigram or WordPiece.
//! - **Chat templates** ([`template`]): the model's own Jinja template
//!   (GGUF `tokenizer.chat_template`, or `chat_template` in
//!   `tokenizer_config.json`), rendered with minijinja; ChatML when it has
//!   none.
//! - **Devices**: the CPU; with the `cuda` feature, the linear layers on an
//!   NVIDIA GPU (`--device cuda:N`).
//! - **KV cache**: paged in blocks within a memory budget, with automatic
//!   prefix caching: a prompt that starts like an earlier one (a shared
//!   system prompt, a conversation's next turn, a continuation) reuses its
//!   keys and values ([`engine`]); answers report them as OpenAI's
//!   `cached_tokens`.
//!
//! The model runs on one engine thread ([`engine`]); HTTP handlers
//! ([`server`]) queue jobs on it and stream tokens back. It never talks to
//! NATS: the executor watches it over HTTP.
//!
//! Start reading at [`run`].

pub mod engine;
pub mod gguf_meta;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod sampling;
pub mod server;
pub mod template;
pub mod tokenizer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use flotilla_process::Shutdown as CancellationToken;

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flotilla-runner",
    version,
    about = "OpenAI-compatible inference for one llama, mistral or qwen2 model",
    long_about = "OpenAI-compatible inference (/v1/chat/completions, /v1/completions, \
/v1/models; /health, /metrics) for one model, on the CPU or, built with the cuda \
feature, an NVIDIA GPU.

Loads:
  models      llama, mistral and qwen2, from a GGUF file or a Hugging Face folder
              (config.json, *.safetensors, tokenizer.json, tokenizer_config.json)
  weights     GGUF Q4_0, Q4_1, Q8_0 (own x86-64 kernels), other GGUF types through
              candle (K-quants, f16, f32, ...); safetensors f32, f16, bf16
  tokenizers  byte-level BPE with the GPT-2, SmolLM2, Llama 3 or Qwen2
              pre-tokenizer (others are refused), SentencePiece BPE
  templates   the model's own chat template (GGUF tokenizer.chat_template or
              tokenizer_config.json), rendered with minijinja; ChatML if none"
)]
pub struct Args {
    /// A GGUF file, or a Hugging Face folder (safetensors, config.json,
    /// tokenizer.json) of a llama, mistral or qwen2 model.
    #[arg(long, env = "FLOTILLA_MODEL")]
    pub model: PathBuf,

    /// The name clients use in `model`; by default the file name.
    #[arg(long, env = "FLOTILLA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    #[arg(long, env = "FLOTILLA_RUNNER_ADDR", default_value = "127.0.0.1:8000")]
    pub addr: SocketAddr,

    /// Requests waiting beyond this get 429.
    #[arg(long, env = "FLOTILLA_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// `cpu`, or `cuda` / `cuda:N` (a build with the `cuda` feature): where
    /// the linear layers run.
    #[arg(long, env = "FLOTILLA_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Sequences decoded together in one step (continuous batching).
    #[arg(long, env = "FLOTILLA_MAX_BATCH", default_value_t = 16)]
    pub max_batch: usize,

    /// Positions per KV cache block, the unit in which prompts share
    /// cached keys and values and memory is handed out.
    #[arg(long, env = "FLOTILLA_KV_BLOCK_TOKENS", default_value_t = 16)]
    pub kv_block_tokens: usize,

    /// The KV cache memory kept, as positions (`20000`) or bytes (`512MiB`,
    /// `1.5GiB`, `2GB`). Blocks no running request uses stay cached for
    /// prefix hits and are evicted least recently used. A request waits in
    /// the queue while its prompt would take the cache past the budget
    /// (unless nothing else runs); running requests are never preempted,
    /// so their generated tokens may take it past the budget for a while.
    #[arg(
        long,
        env = "FLOTILLA_KV_CACHE_BUDGET",
        default_value = "1GiB",
        value_name = "TOKENS|BYTES"
    )]
    pub kv_cache_budget: engine::KvCacheBudget,

    /// Turns automatic prefix caching off: every prompt is computed in
    /// full (the KV cache stays paged), for comparisons.
    #[arg(long, env = "FLOTILLA_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,

    #[arg(long, env = "FLOTILLA_LOG_FORMAT", value_enum, default_value_t = flotilla_process::logging::LogFormat::Text)]
    pub log_format: flotilla_process::logging::LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0}")]
    Config(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}

/// Serves until `shutdown`; `bound` gets the listening address as soon as
/// it is known (the model loads after, `/health` says 503 until then).
pub async fn run(
    args: Args,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RunnerError> {
    if !args.model.is_file() && !args.model.is_dir() {
        return Err(RunnerError::Config(format!(
            "--model: {} is neither a GGUF file nor a model folder",
            args.model.display()
        )));
    }
    if args.max_queue == 0 {
        return Err(RunnerError::Config(
            "--max-queue: must be at least 1".into(),
        ));
    }
    if args.max_batch == 0 {
        return Err(RunnerError::Config(
            "--max-batch: must be at least 1".into(),
        ));
    }
    if args.kv_block_tokens == 0 {
        return Err(RunnerError::Config(
            "--kv-block-tokens: must be at least 1".into(),
        ));
    }
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let mut runner_metrics = metrics::RunnerMetrics::new(&name);
    if let Some(selection) = metrics::gpu_selection(
        &args.device,
        std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
    ) {
        match flotilla_gpu::NvmlReader::open() {
            Ok(reader) => runner_metrics = runner_metrics.with_gpus(Box::new(reader), selection),
            Err(e) => tracing::warn!(error = %e, "no GPU metrics"),
        }
    }
    let metrics = Arc::new(runner_metrics);
    let state = Arc::new(server::AppState {
        model_name: name.clone(),
        engine: OnceLock::new(),
        metrics: metrics.clone(),
    });
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|source| RunnerError::Bind {
            addr: args.addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| RunnerError::Bind {
        addr: args.addr,
        source,
    })?;
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    tracing::info!(%local, model = %args.model.display(), "listening; loading the model");
    let app = server::router(state.clone());
    let stop = shutdown.clone();
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });

    let device = parse_device(&args.device)?;
    let path = args.model.clone();
    let started = std::time::Instant::now();
    let loaded = tokio::task::spawn_blocking(move || engine::load(&path, &device))
        .await
        .map_err(|e| RunnerError::Config(format!("loader crashed: {e}")))??;
    tracing::info!(elapsed = ?started.elapsed(), context = loaded.context_length, vocab = loaded.tokenizer.vocab_size(), "model loaded; serving {name}");
    let limits = engine::EngineLimits {
        max_queue: args.max_queue,
        max_batch: args.max_batch,
        block_tokens: args.kv_block_tokens,
        kv_cache_budget: args.kv_cache_budget,
        prefix_cache: !args.no_prefix_cache,
        ..Default::default()
    };
    let engine = engine::Engine::start(loaded, limits, metrics);
    let kv = *engine.kv_cache().borrow();
    tracing::info!(
        block_tokens = kv.block_tokens,
        budget_tokens = kv.budget_blocks * kv.block_tokens,
        prefix_cache = limits.prefix_cache,
        "KV cache"
    );
    let _ = state.engine.set(engine);

    let _ = serving.await;
    Ok(())
}

fn parse_device(spec: &str) -> Result<candle_core::Device, RunnerError> {
    let bad = |e: String| RunnerError::Config(format!("--device {spec}: {e}"));
    match spec.split_once(':') {
        None if spec == "cpu" => Ok(candle_core::Device::Cpu),
        None if spec == "cuda" => candle_core::Device::new_cuda(0).map_err(|e| bad(e.to_string())),
        Some(("cuda", n)) => {
            let ordinal = n
                .parse()
                .map_err(|_| bad("the GPU ordinal is not a number".into()))?;
            candle_core::Device::new_cuda(ordinal).map_err(|e| bad(e.to_string()))
        }
        _ => Err(bad("expected cpu, cuda or cuda:N".into())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::Parser;

    use super::*;
    use crate::engine::KvCacheBudget;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let base = ["flotilla-runner", "--model", "m.gguf"];
        Args::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn the_kv_cache_budget_is_tokens_or_bytes() {
        let budget = |s: &str| parse(&["--kv-cache-budget", s]).unwrap().kv_cache_budget;
        assert_eq!(
            parse(&[]).unwrap().kv_cache_budget,
            KvCacheBudget::Bytes(1 << 30)
        );
        for (text, want) in [
            ("20000", KvCacheBudget::Tokens(20_000)),
            ("512MiB", KvCacheBudget::Bytes(512 << 20)),
            ("1.5GiB", KvCacheBudget::Bytes(3 << 29)),
            ("2GB", KvCacheBudget::Bytes(2_000_000_000)),
            ("800 kb", KvCacheBudget::Bytes(800_000)),
            ("1tib", KvCacheBudget::Bytes(1 << 40)),
            ("4096B", KvCacheBudget::Bytes(4096)),
        ] {
            assert_eq!(budget(text), want, "{text}");
        }
        for (bad, why) in [
            ("12XB", "unknown unit \"XB\""),
            ("1.5", "neither a number of tokens"),
            ("0", "more than 0 tokens"),
            ("0MiB", "from 1 byte up"),
            ("-3GiB", "neither a number of tokens"),
            ("GiB", "neither a number of tokens"),
            ("1.2.3GB", "neither a number of tokens"),
        ] {
            let flag = format!("--kv-cache-budget={bad}");
            let e = parse(&[&flag]).unwrap_err().to_string();
            assert!(
                e.contains("--kv-cache-budget") && e.contains(why),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_budget_is_counted_in_whole_blocks() {
        assert_eq!(KvCacheBudget::Tokens(20_000).blocks(16, 46_080), 1250);
        assert_eq!(KvCacheBudget::Tokens(20_001).blocks(16, 46_080), 1250);
        assert_eq!(KvCacheBudget::Bytes(1 << 30).blocks(16, 46_080), 1456);
        assert_eq!(
            KvCacheBudget::Tokens(3).blocks(16, 46_080),
            1,
            "at least one"
        );
    }

    #[test]
    fn prefix_caching_is_on_unless_switched_off() {
        assert!(!parse(&[]).unwrap().no_prefix_cache);
        let off = parse(&["--no-prefix-cache", "--kv-block-tokens", "32"]).unwrap();
        assert!(off.no_prefix_cache);
        assert_eq!(off.kv_block_tokens, 32);
    }
}
