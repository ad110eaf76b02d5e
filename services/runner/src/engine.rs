//! The generation engine: one worker thread owns the model and runs
//! continuous batching. Every step feeds all active sequences through one
//! forward pass (a decode token each, or a chunk of a new prompt), each
//! sequence with its own KV cache; new requests join between steps, and
//! finished or abandoned ones (the client disconnected) leave and free
//! their slot and cache. Requests beyond the active slots wait in a bounded
//! queue.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use tokio::sync::mpsc;

use crate::gguf_meta::{get_str, get_u32};
use crate::model::{Feed, Llama, Scratch, SeqCache};

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
    /// Keep generating past the end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub queued_at: Instant,
}

/// What the loaded model is.
pub struct LoadedModel {
    pub weights: Llama,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub context_length: usize,
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
    let arch = get_str(&content, "general.architecture").unwrap_or_default();
    let context_length =
        get_u32(&content, &format!("{arch}.context_length")).unwrap_or(2048) as usize;
    let template_src = get_str(&content, "tokenizer.chat_template").map(str::to_string);
    let tokenizer = crate::tokenizer::from_gguf(&content).map_err(|e| fail(e.to_string()))?;
    let bos_text = tokenizer
        .bos
        .map(|b| tokenizer.decode(&[b], false))
        .unwrap_or_default();
    let eos_text = tokenizer.decode(&[tokenizer.eos], false);
    let template =
        ChatTemplate::new(template_src, bos_text, eos_text).map_err(|e| fail(e.to_string()))?;
    let weights = crate::loader::llama_from_gguf(&content, &mut file, device, context_length)
        .map_err(|e| fail(format!("loading weights: {e}")))?;
    Ok(LoadedModel {
        weights,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        context_length,
    })
}

/// Loads a GGUF file, or a Hugging Face model folder (safetensors,
/// `config.json`, `tokenizer.json`, optionally `tokenizer_config.json`).
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    if path.is_dir() {
        load_hf_folder(path, device)
    } else {
        load_gguf(path, device)
    }
}

/// The largest context a safetensors model is served with, whatever its
/// `max_position_embeddings` says (the KV caches and RoPE tables grow with it).
pub const HF_CONTEXT_CAP: usize = 32_768;

/// Loads a Hugging Face llama/mistral/qwen2 folder.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: dir.display().to_string(),
        reason,
    };
    let read_json = |name: &str| -> Result<Option<serde_json::Value>, EngineError> {
        let file = dir.join(name);
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).map_err(|e| fail(format!("{name}: {e}")))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| fail(format!("{name}: {e}")))
    };
    let config_json = read_json("config.json")?.ok_or_else(|| fail("no config.json".into()))?;
    let config: crate::loader::HfConfig =
        serde_json::from_value(config_json).map_err(|e| fail(format!("config.json: {e}")))?;
    let tokenizer_json =
        read_json("tokenizer.json")?.ok_or_else(|| fail("no tokenizer.json".into()))?;
    let tokenizer_config = read_json("tokenizer_config.json")?.unwrap_or_default();
    let (tokenizer, bos_text, eos_text) =
        crate::tokenizer::from_hf_json(&tokenizer_json, &tokenizer_config, &config)
            .map_err(|e| fail(e.to_string()))?;
    let template_src = match tokenizer_config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let template =
        ChatTemplate::new(template_src, bos_text, eos_text).map_err(|e| fail(e.to_string()))?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(fail("no .safetensors files".into()));
    }
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| fail(format!("{}: {e}", f.display())))?;
        tensors.extend(part);
    }
    let weights = crate::loader::llama_from_safetensors(&config, &tensors, HF_CONTEXT_CAP, device)
        .map_err(|e| fail(format!("loading weights: {e}")))?;
    if tokenizer.vocab_size() > weights.config.vocab {
        return Err(fail(format!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            weights.config.vocab
        )));
    }
    Ok(LoadedModel {
        context_length: weights.config.context,
        weights,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
    })
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

/// One request in the running batch.
struct Active {
    job: Job,
    cache: SeqCache,
    sampler: Sampler,
    /// How much of the prompt is in the cache.
    fed: usize,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    decoder: StreamDecoder,
    text: String,
    sent: usize,
    hold: usize,
    completion: usize,
    last_token_at: Instant,
    started: Instant,
}

enum Step {
    Continue,
    Finished(FinishReason),
    /// The client is gone.
    Abandoned,
}

impl Active {
    fn new(job: Job) -> Self {
        let hold = job.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        Self {
            sampler: Sampler::new(job.params.clone()),
            job,
            cache: SeqCache::default(),
            fed: 0,
            next: None,
            decoder: StreamDecoder::default(),
            text: String::new(),
            sent: 0,
            hold,
            completion: 0,
            last_token_at: Instant::now(),
            started: Instant::now(),
        }
    }

    /// Takes the sampled token: streams what text is safe to send.
    fn accept(&mut self, token: u32, tokenizer: &Tokenizer, metrics: &RunnerMetrics) -> Step {
        self.completion += 1;
        let now = Instant::now();
        if self.completion == 1 {
            metrics
                .time_to_first_token
                .observe((now - self.job.queued_at).as_secs_f64());
        } else {
            metrics
                .inter_token
                .observe((now - self.last_token_at).as_secs_f64());
        }
        self.last_token_at = now;
        metrics.completion_tokens.inc();
        if !self.job.ignore_eos && tokenizer.stop_ids.contains(&token) {
            return Step::Finished(FinishReason::Stop);
        }
        self.text
            .push_str(&self.decoder.push(&tokenizer.token_bytes(token)));
        if let Some(at) = self
            .job
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            return Step::Finished(FinishReason::Stop);
        }
        // Send what can no longer become part of a stop sequence.
        let safe = self.text.len().saturating_sub(self.hold.saturating_sub(1));
        let safe = (0..=safe)
            .rev()
            .find(|i| self.text.is_char_boundary(*i))
            .unwrap_or(0);
        if safe > self.sent {
            if self
                .job
                .events
                .send(GenEvent::Text(self.text[self.sent..safe].to_string()))
                .is_err()
            {
                return Step::Abandoned;
            }
            self.sent = safe;
        }
        if self.completion >= self.job.max_tokens {
            return Step::Finished(FinishReason::Length);
        }
        self.next = Some(token);
        Step::Continue
    }

    fn finish(mut self, reason: FinishReason) {
        self.text.push_str(&self.decoder.finish());
        if reason == FinishReason::Stop
            && let Some(at) = self
                .job
                .stop
                .iter()
                .filter_map(|s| self.text.find(s.as_str()))
                .min()
        {
            self.text.truncate(at);
        }
        if self.text.len() > self.sent {
            let _ = self
                .job
                .events
                .send(GenEvent::Text(self.text[self.sent..].to_string()));
        }
        let _ = self.job.events.send(GenEvent::Done {
            reason,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.completion,
        });
        tracing::debug!(
            prompt_tokens = self.job.prompt.len(),
            completion = self.completion,
            elapsed = ?self.started.elapsed(),
            "generated"
        );
    }
}

struct Worker {
    model: Llama,
    /// Caches of sequences that left, emptied, for the next ones: a new
    /// request reuses memory rather than faulting in fresh pages.
    spare: std::cell::RefCell<Vec<SeqCache>>,
    tokenizer: Arc<Tokenizer>,
    jobs: std::sync::mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    limits: EngineLimits,
    metrics: Arc<RunnerMetrics>,
}

impl Worker {
    fn run(self) {
        let mut active: Vec<Active> = Vec::new();
        let mut scratch = Scratch::default();
        let mut logits = Vec::new();
        let capacity = self.limits.max_batch * self.model.config.context;
        self.metrics.kv_cache_capacity.set(capacity as i64);
        loop {
            // Admit waiting requests into free slots; block only when idle.
            while active.len() < self.limits.max_batch {
                let job = if active.is_empty() {
                    match self.jobs.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    }
                } else {
                    match self.jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                let left = self
                    .waiting
                    .fetch_sub(1, Ordering::SeqCst)
                    .saturating_sub(1);
                self.metrics.queue_depth.set(left as i64);
                if job.events.is_closed() {
                    continue;
                }
                if job.prompt.is_empty() || job.max_tokens == 0 {
                    let _ = job.events.send(GenEvent::Failed(
                        "an empty prompt or max_tokens of 0".into(),
                    ));
                    continue;
                }
                self.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                let mut a = Active::new(job);
                a.cache = self
                    .spare
                    .borrow_mut()
                    .pop()
                    .unwrap_or_else(|| self.model.new_cache());
                active.push(a);
            }
            // Abandoned requests leave before costing a step.
            let mut i = 0;
            while i < active.len() {
                if active[i].job.events.is_closed() {
                    self.keep_cache(&mut active.remove(i));
                } else {
                    i += 1;
                }
            }
            if active.is_empty() {
                self.publish(&active);
                continue;
            }
            // A failed (or, by a bug, panicking) step fails the requests in
            // it, not the engine.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.step(&mut active, &mut scratch, &mut logits)
            }));
            let failure = match stepped {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the forward pass panicked".to_string()),
            };
            if let Some(e) = failure {
                tracing::error!(error = %e, "a forward step failed; failing its requests");
                for a in active.drain(..) {
                    let _ = a.job.events.send(GenEvent::Failed(e.clone()));
                }
                scratch = Scratch::default();
            }
            self.publish(&active);
        }
    }

    /// Empties a leaving sequence's cache and keeps it for the next one.
    fn keep_cache(&self, a: &mut Active) {
        let mut cache = std::mem::take(&mut a.cache);
        cache.clear();
        self.spare.borrow_mut().push(cache);
    }

    fn publish(&self, active: &[Active]) {
        let tokens: usize = active.iter().map(|a| a.cache.len()).sum();
        self.metrics.kv_cache_tokens.set(tokens as i64);
        let capacity = (self.limits.max_batch * self.model.config.context).max(1);
        self.metrics
            .kv_cache_usage
            .set(tokens as f64 / capacity as f64);
        self.metrics.running.set(active.len() as i64);
    }

    /// One forward pass over every active sequence, then sampling.
    fn step(
        &self,
        active: &mut Vec<Active>,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<(), crate::model::ModelError> {
        let mut budget = self.limits.prefill_chunk;
        // Which sequences take part, and how many prompt tokens each feeds.
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(active.len());
        for (i, a) in active.iter().enumerate() {
            if a.next.is_some() {
                plan.push((i, 1));
            } else if budget > 0 {
                let n = (a.job.prompt.len() - a.fed).min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        let mut singles: Vec<[u32; 1]> = vec![[0]; active.len()];
        for (i, a) in active.iter().enumerate() {
            if let Some(t) = a.next {
                singles[i] = [t];
            }
        }
        let mut wants: Vec<usize> = Vec::with_capacity(plan.len());
        {
            let mut feeds: Vec<Feed<'_>> = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, (a, single)) in active.iter_mut().zip(singles.iter()).enumerate() {
                let Some(&&(_, n)) = planned.peek().filter(|(j, _)| *j == i) else {
                    continue;
                };
                planned.next();
                let (tokens, done_prompt): (&[u32], bool) = if a.next.is_some() {
                    (single, true)
                } else {
                    (
                        &a.job.prompt[a.fed..a.fed + n],
                        a.fed + n == a.job.prompt.len(),
                    )
                };
                if done_prompt {
                    wants.push(i);
                }
                feeds.push(Feed {
                    cache: &mut a.cache,
                    tokens,
                    logits: done_prompt,
                });
            }
            self.model.forward(&mut feeds, scratch, logits)?;
        }
        for &(i, n) in &plan {
            if active[i].next.is_none() {
                active[i].fed += n;
            }
        }
        let vocab = self.model.config.vocab;
        let mut outcomes: Vec<(usize, Step)> = Vec::with_capacity(wants.len());
        for (slot, &i) in wants.iter().enumerate() {
            let a = &mut active[i];
            let row = &mut logits[slot * vocab..(slot + 1) * vocab];
            let token = a.sampler.sample(row);
            a.next = None;
            outcomes.push((i, a.accept(token, &self.tokenizer, &self.metrics)));
        }
        // Leave in reverse so earlier indices stay valid.
        for (i, step) in outcomes.into_iter().rev() {
            match step {
                Step::Continue => {}
                Step::Finished(reason) => {
                    let mut a = active.swap_remove(i);
                    self.keep_cache(&mut a);
                    a.finish(reason)
                }
                Step::Abandoned => self.keep_cache(&mut active.swap_remove(i)),
            }
        }
        Ok(())
    }
}
