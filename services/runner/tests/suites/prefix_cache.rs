//! Automatic prefix caching on the real SmolLM2 GGUF: at the engine
//! (cached against uncached generations, alone and batched; eviction under
//! a small budget; shared blocks; admission held back by the budget) and
//! over HTTP (OpenAI's `cached_tokens`, vLLM's metrics).

use std::sync::Arc;

use flotilla_runner::engine::{self, Engine, EngineLimits, GenEvent, Job, KvCacheBudget};
use flotilla_runner::metrics::RunnerMetrics;
use flotilla_runner::sampling::SamplingParams;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::support::{Runner, shipped_gguf};

fn start(limits: EngineLimits) -> (Engine, Arc<RunnerMetrics>) {
    let loaded = engine::load_gguf(&shipped_gguf(), &candle_core::Device::Cpu).unwrap();
    let metrics = Arc::new(RunnerMetrics::new("smollm2"));
    (Engine::start(loaded, limits, metrics.clone()), metrics)
}

fn cached() -> EngineLimits {
    EngineLimits::default()
}

fn uncached() -> EngineLimits {
    EngineLimits {
        prefix_cache: false,
        ..Default::default()
    }
}

/// A greedy job that runs `max_tokens` whatever it generates.
fn submit(engine: &Engine, prompt: &[u32], max_tokens: usize) -> mpsc::UnboundedReceiver<GenEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    engine
        .submit(Job {
            prompt: prompt.to_vec(),
            max_tokens,
            params: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            stop: Vec::new(),
            ignore_eos: true,
            resume: None,
            events: tx,
            queued_at: std::time::Instant::now(),
        })
        .unwrap();
    rx
}

/// A generation's tokens and its prompt tokens served from the cache.
#[derive(Debug, PartialEq)]
struct Answer {
    tokens: Vec<u32>,
    cached: usize,
}

/// Waits for `what`, failing the test past a minute.
async fn within<T>(what: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(60), what)
        .await
        .expect("the engine took over a minute")
}

async fn answer(mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Answer {
    let mut tokens = Vec::new();
    while let Some(e) = within(rx.recv()).await {
        match e {
            GenEvent::Text { token_ids, .. } => tokens.extend(token_ids),
            GenEvent::Done {
                token_ids,
                cached_tokens,
                ..
            } => {
                tokens.extend(token_ids);
                return Answer {
                    tokens,
                    cached: cached_tokens,
                };
            }
            GenEvent::Failed(e) => panic!("{e}"),
        }
    }
    panic!("the engine stopped")
}

async fn generate(engine: &Engine, prompt: &[u32], max_tokens: usize) -> Answer {
    answer(submit(engine, prompt, max_tokens)).await
}

/// A long shared instruction (about 130 tokens) and two questions after
/// it, and an unrelated prompt.
fn prompts(engine: &Engine) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let system = "<|im_start|>system\nYou are a careful assistant for a harbour office. \
        You answer questions about tides, ships, berths and the weather in short, \
        plain sentences. You never invent schedules; when you do not know, you say so \
        and name the office that would know. Prices are in euros, times in the local \
        time of the harbour, and distances in nautical miles. Greet nobody, thank \
        nobody, and do not repeat the question. Keep every answer under sixty words \
        unless the question asks for a list. Ships under fifty metres use the inner \
         basin and larger ones the outer quay; pilots board at the fairway buoy.<|im_end|>\n";
    let ask = |q: &str| {
        engine.tokenizer.encode(&format!(
            "{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        ))
    };
    (
        ask("When is high tide tomorrow?"),
        ask("Which berth takes a ship of 200 metres?"),
        engine.tokenizer.encode("One, two, three, four, five,"),
    )
}

/// Tokens two prompts share from the start, in whole blocks of 16, short
/// of `b`'s last token: what `b` finds cached after `a`.
fn shared_blocks(a: &[u32], b: &[u32]) -> usize {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    common.min(b.len() - 1) / 16 * 16
}

#[tokio::test]
async fn cached_and_uncached_generations_are_token_identical_alone_and_batched() {
    let (reference, _) = start(uncached());
    let (engine, metrics) = start(cached());
    let (a, b, c) = prompts(&engine);
    assert!(
        shared_blocks(&a, &b) >= 128,
        "a long shared prefix: {} {} {}",
        a.len(),
        b.len(),
        shared_blocks(&a, &b)
    );
    let steps = 24;
    let mut expected = Vec::new();
    for p in [&a, &b, &c] {
        let r = generate(&reference, p, steps).await;
        assert_eq!(r.cached, 0, "nothing is cached with prefix caching off");
        expected.push(r.tokens);
    }
    // Batched without the cache: the same tokens as alone (so any
    // difference below is the cache's).
    let rxs: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|p| submit(&reference, p, steps))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(
            answer(rx).await.tokens,
            expected[i],
            "uncached, batched, prompt {i}"
        );
    }

    // Alone: a miss, the same prompt again, then one sharing its prefix.
    let first = generate(&engine, &a, steps).await;
    assert_eq!(
        first,
        Answer {
            tokens: expected[0].clone(),
            cached: 0
        }
    );
    let again = generate(&engine, &a, steps).await;
    assert_eq!(again.tokens, expected[0], "the same prompt again");
    assert_eq!(again.cached, (a.len() - 1) / 16 * 16);
    let second = generate(&engine, &b, steps).await;
    assert_eq!(second.tokens, expected[1], "a prompt sharing the prefix");
    assert_eq!(second.cached, shared_blocks(&a, &b));

    // A continuation: the prompt and the tokens generated so far find the
    // blocks the generated tokens filled too.
    let mut continued = a.clone();
    continued.extend(&expected[0][..20]);
    let reference_rest = generate(&reference, &continued, 8).await;
    let rest = generate(&engine, &continued, 8).await;
    assert_eq!(rest.tokens, reference_rest.tokens, "a continuation");
    assert_eq!(rest.cached, (continued.len() - 1) / 16 * 16);
    assert!(
        rest.cached > (a.len() - 1) / 16 * 16,
        "generated blocks count"
    );

    // Batched: each with the others, hits and misses mixed.
    let rxs: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|p| submit(&engine, p, steps))
        .collect();
    let mut hits = 0;
    for (i, rx) in rxs.into_iter().enumerate() {
        let got = answer(rx).await;
        assert_eq!(got.tokens, expected[i], "cached, batched, prompt {i}");
        hits += got.cached;
    }
    assert!(hits >= 2 * 128, "the batch found its prefixes: {hits}");
    let stats = *engine.kv_cache().borrow();
    assert_eq!(stats.hits, metrics.prefix_cache_hits.get());
    assert!(stats.hits > 0 && stats.queries > stats.hits);
}

#[tokio::test]
async fn a_small_budget_evicts_and_answers_stay_right() {
    let (reference, _) = start(uncached());
    // Twelve blocks: a prompt of about 140 tokens and its answer take ten,
    // too many for a second one to fit beside them.
    let small = EngineLimits {
        kv_cache_budget: KvCacheBudget::Tokens(16 * 12),
        ..Default::default()
    };
    let (engine, _) = start(small);
    let (a, b, _) = prompts(&engine);
    // Not sharing their first block: b's own instruction.
    let mut b = b;
    b[1] = engine.tokenizer.encode("user")[0];
    assert_eq!(shared_blocks(&a, &b), 0);
    let steps = 8;
    let want_a = generate(&reference, &a, steps).await.tokens;
    let want_b = generate(&reference, &b, steps).await.tokens;

    let full = (a.len() - 1) / 16 * 16;
    assert_eq!(generate(&engine, &a, steps).await.tokens, want_a);
    let hit = generate(&engine, &a, steps).await;
    assert_eq!(
        (hit.tokens.as_slice(), hit.cached),
        (want_a.as_slice(), full)
    );
    let evictions = engine.kv_cache().borrow().pool.evictions;
    assert_eq!(evictions, 0);
    // b needs most of the budget: a's deepest blocks go.
    let other = generate(&engine, &b, steps).await;
    assert_eq!((other.tokens, other.cached), (want_b, 0));
    let stats = *engine.kv_cache().borrow();
    assert!(stats.pool.evictions > 0, "{stats:?}");
    assert!(
        stats.pool.allocated_blocks <= stats.budget_blocks,
        "{stats:?}"
    );
    let after = generate(&engine, &a, steps).await;
    assert_eq!(after.tokens, want_a, "a after eviction");
    assert!(
        after.cached < full,
        "a lost blocks: {} of {full}",
        after.cached
    );
    assert_eq!(after.cached % 16, 0);
}

#[tokio::test]
async fn concurrent_requests_sharing_a_prefix_hold_its_blocks_once() {
    let (engine, metrics) = start(cached());
    let (a, b, _) = prompts(&engine);
    let mut kv = engine.kv_cache();
    let mut first = submit(&engine, &a, 400);
    // Its prompt is in (and its blocks registered) once it has a token.
    assert!(matches!(
        within(first.recv()).await,
        Some(GenEvent::Text { .. })
    ));
    let second = submit(&engine, &b, 400);
    let both = *within(kv.wait_for(|s| s.running == 2)).await.unwrap();
    let shared = shared_blocks(&a, &b);
    assert!(shared >= 128);
    assert_eq!(
        both.sequence_tokens - both.tokens_in_use,
        shared,
        "only the unique part takes new memory: {both:?}"
    );
    let usage = metrics.kv_cache_usage_perc.get();
    assert!(usage > 0.0 && usage <= 1.0, "{usage}");
    drop((first, second));
    let idle = *within(kv.wait_for(|s| s.running == 0)).await.unwrap();
    assert_eq!(idle.tokens_in_use, 0);
    assert!(idle.pool.cached_blocks >= (a.len() + b.len() - shared) / 16);
}

#[tokio::test]
async fn a_prompt_waits_while_the_budget_is_taken() {
    let (reference, _) = start(uncached());
    let (engine, _) = start(EngineLimits {
        kv_cache_budget: KvCacheBudget::Tokens(16 * 14),
        ..Default::default()
    });
    let (a, b, _) = prompts(&engine);
    let mut b = b;
    b[1] = engine.tokenizer.encode("user")[0];
    let want_b = generate(&reference, &b, 4).await.tokens;
    let mut first = submit(&engine, &a, 40);
    assert!(matches!(
        within(first.recv()).await,
        Some(GenEvent::Text { .. })
    ));
    // a holds about 10 of the 14 blocks, b's prompt needs 9: b waits.
    let mut second = submit(&engine, &b, 4);
    let e = within(second.recv()).await.unwrap();
    let mut a_done = false;
    while let Ok(event) = first.try_recv() {
        a_done |= matches!(event, GenEvent::Done { .. });
    }
    assert!(a_done, "b started before a finished: {e:?}");
    let mut rest = answer(second).await;
    if let GenEvent::Text { token_ids, .. } = e {
        rest.tokens.splice(0..0, token_ids);
    }
    assert_eq!(rest.tokens, want_b);
}

/// The usage of a non-streamed and of a streamed completion of `body`.
async fn usages(r: &Runner, body: Value) -> (Value, Value) {
    let (status, whole) = r.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = r
        .client
        .post(format!("{}/v1/completions", r.base))
        .json(&streamed)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| !c["usage"].is_null())
        .unwrap_or_else(|| panic!("no usage chunk: {text}"))["usage"]
        .clone();
    (whole["usage"].clone(), usage)
}

async fn metric(r: &Runner, series: &str) -> f64 {
    let text = r.metrics().await;
    assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    assert!(text.ends_with("# EOF\n"));
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test]
async fn answers_report_cached_tokens_and_metrics_use_vllms_names() {
    let r = Runner::shipped(16, 4).await;
    let label = "{model_name=\"smollm2\"}";
    assert_eq!(
        metric(&r, &format!("vllm:prefix_cache_queries_total{label}")).await,
        0.0
    );
    let prompt = "The harbour office keeps the tide tables, the berth list and the \
        weather reports for every ship that calls. Today the first ship to arrive is";
    let body = json!({"model": "smollm2", "prompt": prompt, "max_tokens": 4, "temperature": 0});
    let (whole, streamed) = usages(&r, body).await;
    assert_eq!(
        whole["prompt_tokens_details"]["cached_tokens"], 0,
        "{whole}"
    );
    let prompt_tokens = whole["prompt_tokens"].as_u64().unwrap();
    let cached = streamed["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, (prompt_tokens - 1) / 16 * 16, "{streamed}");
    assert!(cached >= 16);
    assert_eq!(
        metric(&r, &format!("vllm:prefix_cache_queries_total{label}")).await,
        2.0 * prompt_tokens as f64
    );
    assert_eq!(
        metric(&r, &format!("vllm:prefix_cache_hits_total{label}")).await,
        cached as f64
    );
    assert_eq!(
        metric(&r, &format!("vllm:kv_cache_usage_perc{label}")).await,
        0.0
    );
    assert!(metric(&r, "flotilla_runner_prefix_cache_blocks").await >= 1.0);
    // The default budget, 1 GiB, in 16-token blocks of 46,080-byte tokens.
    assert_eq!(
        metric(&r, "flotilla_runner_kv_cache_capacity_tokens").await,
        ((1u64 << 30) / 46_080 / 16 * 16) as f64
    );
}
