//! The worker thread: admits jobs into the running batch (sharing the
//! cached blocks their prompts start with, or holding them back while the
//! KV budget is taken), runs one forward pass per step over every active
//! sequence, registers the blocks that filled up, samples, streams text
//! and lets finished or abandoned sequences go.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::kv_pool::{KvPool, Link};
use super::{EngineLimits, FinishReason, GenEvent, Job, KvCacheStats};
use crate::metrics::RunnerMetrics;
use crate::model::{Feed, Llama, Scratch, SeqCache};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// One request in the running batch.
struct Active {
    job: Job,
    cache: SeqCache,
    /// The prefix cache entries of the cache's leading full blocks.
    chain: Vec<Link>,
    /// The prompt, then each chosen token: what the cache holds, and the
    /// next token to feed.
    tokens: Vec<u32>,
    /// Prompt tokens found in the prefix cache.
    cached: usize,
    sampler: Sampler,
    /// How much of the prompt is in the cache.
    fed: usize,
    /// The token to feed next, once the prompt is in.
    next: Option<u32>,
    decoder: StreamDecoder,
    text: String,
    sent: usize,
    /// Tokens chosen since the last event, sent with the next one.
    unsent_ids: Vec<u32>,
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
    fn new(job: Job, tokenizer: &Tokenizer, cache: SeqCache) -> Self {
        let hold = job.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        // A continuation starts in the state the interrupted generation
        // had after its tokens: same text, same sampler.
        let (sampler, text, decoder, sent) = match &job.resume {
            Some(resume) => {
                let (text, decoder) = tokenizer.streamed(&resume.generated);
                let sent = (0..=resume.sent.min(text.len()))
                    .rev()
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(0);
                (
                    Sampler::resume(job.params.clone(), &resume.generated),
                    text,
                    decoder,
                    sent,
                )
            }
            None => (
                Sampler::new(job.params.clone()),
                String::new(),
                StreamDecoder::default(),
                0,
            ),
        };
        Self {
            sampler,
            tokens: job.prompt.clone(),
            job,
            cache,
            chain: Vec::new(),
            cached: 0,
            fed: 0,
            next: None,
            decoder,
            text,
            sent,
            unsent_ids: Vec::new(),
            hold,
            completion: 0,
            last_token_at: Instant::now(),
            started: Instant::now(),
        }
    }

    /// Takes the sampled token: streams what text is safe to send.
    fn accept(&mut self, token: u32, tokenizer: &Tokenizer, metrics: &RunnerMetrics) -> Step {
        self.completion += 1;
        self.unsent_ids.push(token);
        self.tokens.push(token);
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
                .send(GenEvent::Text {
                    text: self.text[self.sent..safe].to_string(),
                    token_ids: std::mem::take(&mut self.unsent_ids),
                })
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
            let _ = self.job.events.send(GenEvent::Text {
                text: self.text[self.sent..].to_string(),
                token_ids: std::mem::take(&mut self.unsent_ids),
            });
        }
        let _ = self.job.events.send(GenEvent::Done {
            reason,
            prompt_tokens: self.job.prompt.len(),
            cached_tokens: self.cached,
            completion_tokens: self.completion,
            token_ids: std::mem::take(&mut self.unsent_ids),
        });
        tracing::debug!(
            prompt_tokens = self.job.prompt.len(),
            cached_tokens = self.cached,
            completion = self.completion,
            elapsed = ?self.started.elapsed(),
            "generated"
        );
    }
}

pub(super) struct Worker {
    pub(super) model: Llama,
    /// Every sequence's KV blocks and the prefix cache.
    pub(super) pool: RefCell<KvPool>,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) jobs: std::sync::mpsc::Receiver<Job>,
    pub(super) waiting: Arc<AtomicUsize>,
    pub(super) limits: EngineLimits,
    pub(super) metrics: Arc<RunnerMetrics>,
    pub(super) stats: tokio::sync::watch::Sender<KvCacheStats>,
}

/// Blocks and positions the running sequences hold, shared ones once.
fn in_use(active: &[Active]) -> (usize, usize) {
    let mut seen = HashSet::new();
    let mut tokens = 0;
    for a in active {
        let bt = a.cache.block_tokens();
        for (i, block) in a.cache.blocks().iter().enumerate() {
            if seen.insert(Arc::as_ptr(block)) {
                tokens += a.cache.len().saturating_sub(i * bt).min(bt);
            }
        }
    }
    (seen.len(), tokens)
}

impl Worker {
    pub(super) fn run(self) {
        let mut active: Vec<Active> = Vec::new();
        let mut scratch = Scratch::default();
        let mut logits = Vec::new();
        // The queue's head, waiting for KV room; still counted as waiting.
        let mut held: Option<Job> = None;
        self.publish(&active);
        loop {
            // Admit waiting requests into free slots; block only when idle.
            let (mut blocks_in_use, _) = in_use(&active);
            while active.len() < self.limits.max_batch {
                let job = match held.take() {
                    Some(job) => job,
                    None if active.is_empty() => match self.jobs.recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    },
                    None => match self.jobs.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    },
                };
                if job.events.is_closed() {
                    self.dequeued();
                    continue;
                }
                if job.prompt.is_empty() || job.max_tokens == 0 {
                    self.dequeued();
                    let _ = job.events.send(GenEvent::Failed(
                        "an empty prompt or max_tokens of 0".into(),
                    ));
                    continue;
                }
                let mut pool = self.pool.borrow_mut();
                let found = pool.lookup(&job.prompt);
                let needed = pool.blocks_needed(&found, job.prompt.len());
                // With nothing running it goes in whatever it needs, or it
                // would never run.
                if !active.is_empty() && blocks_in_use + needed > pool.budget_blocks() {
                    held = Some(job);
                    break;
                }
                self.dequeued();
                blocks_in_use += needed;
                self.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                let prompt_len = job.prompt.len();
                let mut a = Active::new(job, &self.tokenizer, pool.new_cache());
                if pool.prefix_caching() {
                    let cached = pool.acquire(found, &mut a.cache, &mut a.chain);
                    a.cached = cached;
                    a.fed = cached;
                    self.metrics.prefix_cache_queries.inc_by(prompt_len as u64);
                    self.metrics.prefix_cache_hits.inc_by(cached as u64);
                }
                active.push(a);
            }
            // Abandoned requests leave before costing a step.
            let mut i = 0;
            while i < active.len() {
                if active[i].job.events.is_closed() {
                    self.release(&mut active.remove(i));
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
                for mut a in active.drain(..) {
                    let _ = a.job.events.send(GenEvent::Failed(e.clone()));
                    self.release(&mut a);
                }
                scratch = Scratch::default();
            }
            self.publish(&active);
        }
    }

    /// A job left the queue (admitted, refused or abandoned).
    fn dequeued(&self) {
        let left = self
            .waiting
            .fetch_sub(1, Ordering::SeqCst)
            .saturating_sub(1);
        self.metrics.queue_depth.set(left as i64);
    }

    /// Hands a leaving sequence's blocks back to the pool.
    fn release(&self, a: &mut Active) {
        self.pool.borrow_mut().release(&mut a.cache, &mut a.chain);
    }

    fn publish(&self, active: &[Active]) {
        let pool = self.pool.borrow();
        let (blocks, tokens) = in_use(active);
        let bt = pool.block_tokens();
        let budget = pool.budget_blocks();
        let counts = pool.counts();
        let m = &self.metrics;
        m.kv_cache_tokens.set(tokens as i64);
        m.kv_cache_capacity.set((budget * bt) as i64);
        m.kv_cache_usage.set(tokens as f64 / (budget * bt) as f64);
        m.kv_cache_usage_perc
            .set((blocks as f64 / budget as f64).min(1.0));
        m.prefix_cache_blocks.set(counts.cached_blocks as i64);
        m.running.set(active.len() as i64);
        self.stats.send_replace(KvCacheStats {
            running: active.len(),
            sequence_tokens: active.iter().map(|a| a.cache.len()).sum(),
            tokens_in_use: tokens,
            blocks_in_use: blocks,
            block_tokens: bt,
            budget_blocks: budget,
            pool: counts,
            queries: m.prefix_cache_queries.get(),
            hits: m.prefix_cache_hits.get(),
        });
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
        {
            let mut pool = self.pool.borrow_mut();
            for &(i, n) in &plan {
                pool.reserve(&mut active[i].cache, n);
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
        let mut pool = self.pool.borrow_mut();
        for &(i, n) in &plan {
            let a = &mut active[i];
            if a.next.is_none() {
                a.fed += n;
            }
            pool.register(&mut a.cache, &mut a.chain, &a.tokens);
        }
        drop(pool);
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
        let mut finished = Vec::new();
        for (i, step) in outcomes.into_iter().rev() {
            match step {
                Step::Continue => {}
                Step::Finished(reason) => {
                    let mut a = active.swap_remove(i);
                    self.release(&mut a);
                    finished.push((a, reason));
                }
                Step::Abandoned => self.release(&mut active.swap_remove(i)),
            }
        }
        // A client that has its answer sees metrics without it.
        if !finished.is_empty() {
            self.publish(active);
        }
        for (a, reason) in finished {
            a.finish(reason);
        }
        Ok(())
    }
}
