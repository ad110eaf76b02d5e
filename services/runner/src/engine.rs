//! The generation engine: one worker thread owns the model and its KV
//! cache and serves requests from a bounded queue, streaming tokens back.
//! A request whose receiver is gone (the client disconnected) is stopped
//! at the next token.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tokio::sync::mpsc;

use crate::metrics::RunnerMetrics;
use crate::sampling::{Sampler, SamplingParams};
use crate::template::ChatTemplate;
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    Text(String),
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub queued_at: Instant,
}

/// What the loaded model is.
pub struct LoadedModel {
    pub weights: ModelWeights,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub context_length: usize,
}

fn meta_str(content: &gguf_file::Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn meta_u32(content: &gguf_file::Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

/// Loads a GGUF model and builds its tokenizer and chat template from the
/// file's own metadata.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| fail(format!("not a readable GGUF file: {e}")))?;
    let arch = meta_str(&content, "general.architecture").unwrap_or_default();
    let context_length =
        meta_u32(&content, &format!("{arch}.context_length")).unwrap_or(2048) as usize;
    let model = meta_str(&content, "tokenizer.ggml.model")
        .ok_or_else(|| fail("no tokenizer.ggml.model".into()))?;
    let tokens: Vec<String> = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(gguf_file::Value::Array(values)) => values
            .iter()
            .filter_map(|v| v.to_string().ok().cloned())
            .collect(),
        _ => return Err(fail("no tokenizer.ggml.tokens".into())),
    };
    let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(gguf_file::Value::Array(values)) => {
            values.iter().map(|v| v.to_i32().unwrap_or(1)).collect()
        }
        _ => vec![1; tokens.len()],
    };
    let merges: Vec<String> = match content.metadata.get("tokenizer.ggml.merges") {
        Some(gguf_file::Value::Array(values)) => values
            .iter()
            .filter_map(|v| v.to_string().ok().cloned())
            .collect(),
        _ => Vec::new(),
    };
    let bos = meta_u32(&content, "tokenizer.ggml.bos_token_id");
    let eos = meta_u32(&content, "tokenizer.ggml.eos_token_id")
        .ok_or_else(|| fail("no tokenizer.ggml.eos_token_id".into()))?;
    let template_src = meta_str(&content, "tokenizer.chat_template");
    let tokenizer =
        Tokenizer::new(&model, tokens, types, merges, bos, eos).map_err(|e| fail(e.to_string()))?;
    let bos_text = bos
        .map(|b| tokenizer.decode(&[b], false))
        .unwrap_or_default();
    let eos_text = tokenizer.decode(&[eos], false);
    let template =
        ChatTemplate::new(template_src, bos_text, eos_text).map_err(|e| fail(e.to_string()))?;
    let weights = ModelWeights::from_gguf(content, &mut file, device)
        .map_err(|e| fail(format!("loading weights: {e}")))?;
    Ok(LoadedModel {
        weights,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        context_length,
    })
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
    pub fn start(
        model: LoadedModel,
        device: Device,
        max_queue: usize,
        metrics: Arc<RunnerMetrics>,
    ) -> Self {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(max_queue.max(1));
        let waiting = Arc::new(AtomicUsize::new(0));
        let tokenizer = model.tokenizer.clone();
        let template = model.template.clone();
        let context_length = model.context_length;
        let worker_waiting = waiting.clone();
        let worker_tokenizer = tokenizer.clone();
        std::thread::Builder::new()
            .name("flotilla-runner-engine".into())
            .spawn(move || {
                let mut weights = model.weights;
                while let Ok(job) = rx.recv() {
                    worker_waiting.fetch_sub(1, Ordering::SeqCst);
                    metrics
                        .queue_depth
                        .set(worker_waiting.load(Ordering::SeqCst) as i64);
                    if job.events.is_closed() {
                        continue;
                    }
                    let events = job.events.clone();
                    if let Err(e) =
                        generate(&mut weights, &worker_tokenizer, &device, job, &metrics)
                    {
                        let _ = events.send(GenEvent::Failed(e.to_string()));
                    }
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

fn logits_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1()
}

fn generate(
    weights: &mut ModelWeights,
    tokenizer: &Tokenizer,
    device: &Device,
    job: Job,
    metrics: &RunnerMetrics,
) -> candle_core::Result<()> {
    let started = Instant::now();
    let mut sampler = Sampler::new(job.params.clone());
    let prompt_tokens = job.prompt.len();
    metrics.prompt_tokens.inc_by(prompt_tokens as u64);
    let input = Tensor::new(job.prompt.as_slice(), device)?.unsqueeze(0)?;
    let logits = weights.forward(&input, 0)?;
    let mut logits = logits_vec(&logits)?;
    let mut decoder = StreamDecoder::default();
    let mut text = String::new();
    let mut sent = 0usize;
    let hold = job.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut completion = 0usize;
    let mut last_token_at = Instant::now();
    let mut reason = FinishReason::Length;
    let mut position = prompt_tokens;
    while completion < job.max_tokens {
        let next = sampler.sample(&mut logits);
        completion += 1;
        let now = Instant::now();
        if completion == 1 {
            metrics
                .time_to_first_token
                .observe((now - job.queued_at).as_secs_f64());
        } else {
            metrics
                .inter_token
                .observe((now - last_token_at).as_secs_f64());
        }
        last_token_at = now;
        metrics.completion_tokens.inc();
        if tokenizer.stop_ids.contains(&next) {
            reason = FinishReason::Stop;
            break;
        }
        text.push_str(&decoder.push(&tokenizer.token_bytes(next)));
        if let Some(at) = job.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            reason = FinishReason::Stop;
            break;
        }
        // Send what can no longer become part of a stop sequence.
        let safe = text.len().saturating_sub(hold.saturating_sub(1));
        let safe = (0..=safe)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        if safe > sent {
            if job
                .events
                .send(GenEvent::Text(text[sent..safe].to_string()))
                .is_err()
            {
                // The client is gone: free the slot.
                return Ok(());
            }
            sent = safe;
        }
        let input = Tensor::new(&[next], device)?.unsqueeze(0)?;
        let out = weights.forward(&input, position)?;
        position += 1;
        logits = logits_vec(&out)?;
    }
    text.push_str(&decoder.finish());
    if reason == FinishReason::Stop
        && let Some(at) = job.stop.iter().filter_map(|s| text.find(s.as_str())).min()
    {
        text.truncate(at);
    }
    if text.len() > sent {
        let _ = job.events.send(GenEvent::Text(text[sent..].to_string()));
    }
    let _ = job.events.send(GenEvent::Done {
        reason,
        prompt_tokens,
        completion_tokens: completion,
    });
    tracing::debug!(prompt_tokens, completion, elapsed = ?started.elapsed(), "generated");
    Ok(())
}
