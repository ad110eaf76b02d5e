//! The generation engine: one worker thread owns the model and runs
//! continuous batching. Every step feeds all active sequences through one
//! forward pass (a decode token each, or a chunk of a new prompt), each
//! sequence with its own KV cache; new requests join between steps, and
//! finished or abandoned ones (the client disconnected) leave and free
//! their slot and cache. Requests beyond the active slots wait in a bounded
//! queue.
//!
//! KV caches are paged: blocks of [`EngineLimits::block_tokens`] positions
//! from one pool of [`EngineLimits::kv_cache_budget`], with automatic prefix
//! caching (`engine/kv_pool.rs`): a prompt that starts like an earlier one
//! (a shared system prompt, a conversation's next turn, a continuation)
//! shares that one's blocks and is computed from where they end. A request
//! whose prompt would take the pool past its budget waits in the queue
//! while others run.
//!
//! Loading a model is [`load()`]'s (`engine/load.rs`), the batching loop the
//! worker's (`engine/worker.rs`); this module is the handle the server
//! holds.

mod kv_pool;
mod load;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

pub use kv_pool::PoolCounts;
pub use load::{HF_CONTEXT_CAP, LoadedModel, load, load_gguf, load_hf_folder};
use worker::Worker;

use crate::metrics::RunnerMetrics;
use crate::sampling::SamplingParams;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the engine stopped")]
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Text the client may have, and the tokens chosen since the last
    /// event (their text may still be held back for a stop sequence).
    Text {
        text: String,
        token_ids: Vec<u32>,
    },
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
        completion_tokens: usize,
        /// Tokens chosen after the last `Text` (the end-of-sequence
        /// token, or ones whose text a stop sequence cut).
        token_ids: Vec<u32>,
    },
    Failed(String),
}

/// A completion continued where another replica left it: the job's
/// prompt ends with the tokens already generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The tokens already generated, in order.
    pub generated: Vec<u32>,
    /// Bytes of their streamed text the client already has; the rest of
    /// it (held back for a stop sequence) is sent first.
    pub sent: usize,
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Set when this job continues a completion begun elsewhere.
    pub resume: Option<Resume>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub queued_at: Instant,
}

/// How the worker schedules.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Requests waiting beyond the active ones get 429 past this.
    pub max_queue: usize,
    /// Sequences decoded together in one step.
    pub max_batch: usize,
    /// Prompt tokens fed per step, so a long prompt does not stall the
    /// decoding sequences for its whole prefill.
    pub prefill_chunk: usize,
    /// Positions per KV block: the unit of sharing and of allocation.
    pub block_tokens: usize,
    /// The KV memory the engine keeps.
    pub kv_cache_budget: KvCacheBudget,
    /// Whether prompts share cached blocks of earlier ones.
    pub prefix_cache: bool,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 16,
            prefill_chunk: 256,
            block_tokens: crate::model::DEFAULT_BLOCK_TOKENS,
            kv_cache_budget: KvCacheBudget::Bytes(1 << 30),
            prefix_cache: true,
        }
    }
}

/// How much KV memory the engine keeps: positions, or bytes (a model's
/// position takes `2 × layers × kv_heads × head_dim × 4` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCacheBudget {
    Tokens(u64),
    Bytes(u64),
}

impl KvCacheBudget {
    /// The budget in whole blocks of `block_tokens` positions of a model
    /// whose positions take `bytes_per_token` (at least one block).
    pub fn blocks(self, block_tokens: usize, bytes_per_token: usize) -> usize {
        let tokens = match self {
            Self::Tokens(t) => t,
            Self::Bytes(b) => b / (bytes_per_token.max(1) as u64),
        };
        usize::try_from(tokens / block_tokens.max(1) as u64)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

impl std::str::FromStr for KvCacheBudget {
    type Err = String;

    /// `20000` (positions), or bytes with a unit: `512MiB`, `1.5GiB`,
    /// `2GB`, `800KB`, `4096B` (KiB/MiB/GiB/TiB powers of 1024, KB/MB/GB/TB
    /// of 1000; any case).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = (&s[..split], s[split..].trim());
        let explain = || {
            format!(
                "{s:?} is neither a number of tokens (20000) nor of bytes with a unit \
                 (512MiB, 1.5GiB, 2GB)"
            )
        };
        if unit.is_empty() {
            let tokens: u64 = number.parse().map_err(|_| explain())?;
            if tokens == 0 {
                return Err("the budget must be more than 0 tokens".into());
            }
            return Ok(Self::Tokens(tokens));
        }
        let scale: u64 = match unit.to_ascii_lowercase().as_str() {
            "b" => 1,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            "kib" => 1 << 10,
            "mib" => 1 << 20,
            "gib" => 1 << 30,
            "tib" => 1 << 40,
            _ => return Err(format!("{}: unknown unit {unit:?}", explain())),
        };
        let value: f64 = number.parse().map_err(|_| explain())?;
        let bytes = value * scale as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
            return Err(format!("{s:?} is not a size from 1 byte up"));
        }
        Ok(Self::Bytes(bytes as u64))
    }
}

/// The KV memory and prefix cache as the worker last saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCacheStats {
    /// Sequences in the running batch.
    pub running: usize,
    /// Positions the running sequences' caches hold, each counted.
    pub sequence_tokens: usize,
    /// Positions in the blocks the running sequences hold, a shared block
    /// once: `sequence_tokens` less what they share.
    pub tokens_in_use: usize,
    /// Distinct blocks the running sequences hold.
    pub blocks_in_use: usize,
    pub block_tokens: usize,
    pub budget_blocks: usize,
    pub pool: PoolCounts,
    /// Prompt tokens looked up in the prefix cache, and found.
    pub queries: u64,
    pub hits: u64,
}

/// A handle to the worker.
#[derive(Clone)]
pub struct Engine {
    jobs: std::sync::mpsc::SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    kv_cache: tokio::sync::watch::Receiver<KvCacheStats>,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub context_length: usize,
}

impl Engine {
    /// Starts the worker thread on a loaded model.
    pub fn start(model: LoadedModel, limits: EngineLimits, metrics: Arc<RunnerMetrics>) -> Self {
        let max_queue = limits.max_queue.max(1);
        // The channel also holds the requests that joined the batch but were
        // not yet received, so it never refuses what `waiting` admitted.
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(max_queue);
        let waiting = Arc::new(AtomicUsize::new(0));
        let tokenizer = model.tokenizer.clone();
        let template = model.template.clone();
        let context_length = model.context_length;
        let block_tokens = limits.block_tokens.max(1);
        let budget_blocks = limits.kv_cache_budget.blocks(
            block_tokens,
            crate::model::KvBlock::bytes_per_token(&model.weights.config),
        );
        let pool = kv_pool::KvPool::new(
            model.weights.config.clone(),
            block_tokens,
            budget_blocks,
            limits.prefix_cache,
            &model.fingerprint,
        );
        let (stats, kv_cache) = tokio::sync::watch::channel(KvCacheStats {
            block_tokens,
            budget_blocks,
            ..Default::default()
        });
        let worker = Worker {
            model: model.weights,
            pool: std::cell::RefCell::new(pool),
            tokenizer: tokenizer.clone(),
            jobs: rx,
            waiting: waiting.clone(),
            limits: EngineLimits {
                max_batch: limits.max_batch.max(1),
                prefill_chunk: limits.prefill_chunk.max(1),
                max_queue,
                block_tokens,
                ..limits
            },
            metrics,
            stats,
        };
        // The engine loop runs on one of the pool's threads, so the
        // forward pass's parallel parts use it and its siblings
        // (RAYON_NUM_THREADS of them; by default one per CPU).
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("flotilla-runner-{i}"))
            .build();
        std::thread::Builder::new()
            .name("flotilla-runner-engine".into())
            .spawn(move || match pool {
                Ok(pool) => pool.install(|| worker.run()),
                Err(e) => {
                    tracing::warn!(error = %e, "no thread pool of its own; using rayon's global one");
                    worker.run()
                }
            })
            .ok();
        Self {
            jobs,
            waiting,
            max_queue,
            kv_cache,
            tokenizer,
            template,
            context_length,
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The KV cache as of the worker's last step, updated after each.
    pub fn kv_cache(&self) -> tokio::sync::watch::Receiver<KvCacheStats> {
        self.kv_cache.clone()
    }

    /// Queues a job, or refuses it when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        let before = self.waiting.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull(before));
        }
        self.jobs.try_send(job).map_err(|e| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            match e {
                std::sync::mpsc::TrySendError::Full(_) => EngineError::QueueFull(before),
                std::sync::mpsc::TrySendError::Disconnected(_) => EngineError::Stopped,
            }
        })
    }
}
