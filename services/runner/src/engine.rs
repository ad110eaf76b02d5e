//! The generation engine: one worker thread owns the model and runs
//! continuous batching. Every step feeds all active sequences through one
//! forward pass (a decode token each, or a chunk of a new prompt), each
//! sequence with its own KV cache; new requests join between steps, and
//! finished or abandoned ones (the client disconnected) leave and free
//! their slot and cache. Requests beyond the active slots wait in a bounded
//! queue.
//!
//! Loading a model is [`load()`]'s (`engine/load.rs`), the batching loop the
//! worker's (`engine/worker.rs`); this module is the handle the server
//! holds.

mod load;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

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
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self {
            max_queue: 64,
            max_batch: 16,
            prefill_chunk: 256,
        }
    }
}

/// A handle to the worker.
#[derive(Clone)]
pub struct Engine {
    jobs: std::sync::mpsc::SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
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
        let worker = Worker {
            model: model.weights,
            spare: Default::default(),
            tokenizer: tokenizer.clone(),
            jobs: rx,
            waiting: waiting.clone(),
            limits: EngineLimits {
                max_batch: limits.max_batch.max(1),
                prefill_chunk: limits.prefill_chunk.max(1),
                max_queue,
            },
            metrics,
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
            tokenizer,
            template,
            context_length,
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
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
