//! Times the forward pass alone (no HTTP): a prompt, then greedy decode
//! steps at batch 1 and with several sequences per step. For profiling:
//! `perf record -g target/debug/examples/decode MODEL.gguf`.

#![allow(clippy::expect_used)]

use std::time::Instant;

use flotilla_runner::engine;
use flotilla_runner::model::{Feed, Scratch};
use flotilla_runner::sampling::argmax;

/// CPU seconds this process has used (Linux; 0 elsewhere): on a shared
/// machine, a steadier measure of work than wall time.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / 100.0)
        })
        .unwrap_or(0.0)
}

fn main() {
    // Like the engine: the loop runs on one of the pool's threads.
    rayon::ThreadPoolBuilder::new()
        .build()
        .expect("a thread pool")
        .install(run);
}

fn run() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: decode MODEL.gguf [STEPS]");
    let steps: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let loaded = engine::load_gguf(path.as_ref(), &candle_core::Device::Cpu).expect("loading");
    let model = &loaded.weights;
    // `DECODE_PROMPT_REPEAT=N`: the prompt N times over, to time prefill.
    let repeat: usize = std::env::var("DECODE_PROMPT_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let prompt = loaded.tokenizer.encode(
        &"Write a short story about a lighthouse keeper who finds a message in a bottle. \
         Describe the sea, the weather and what the message says. "
            .repeat(repeat),
    );
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    // `DECODE_BATCHES=1,8` (the default): the batch sizes to time.
    let batches: Vec<usize> = std::env::var("DECODE_BATCHES")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .filter_map(|b| b.trim().parse().ok())
        .collect();
    for batch in batches {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        let started = Instant::now();
        let cpu = cpu_seconds();
        let mut next = Vec::new();
        for c in caches.iter_mut() {
            model
                .forward(
                    &mut [Feed {
                        cache: c,
                        tokens: &prompt,
                        logits: true,
                    }],
                    &mut scratch,
                    &mut logits,
                )
                .expect("prefill");
            next.push([argmax(&logits)]);
        }
        let prefill = started.elapsed();
        let prefill_cpu = cpu_seconds() - cpu;
        let started = Instant::now();
        let cpu = cpu_seconds();
        for _ in 0..steps {
            let mut feeds: Vec<Feed<'_>> = caches
                .iter_mut()
                .zip(next.iter())
                .map(|(c, t)| Feed {
                    cache: c,
                    tokens: t,
                    logits: true,
                })
                .collect();
            model
                .forward(&mut feeds, &mut scratch, &mut logits)
                .expect("decode");
            let vocab = model.config.vocab;
            for (i, t) in next.iter_mut().enumerate() {
                *t = [argmax(&logits[i * vocab..(i + 1) * vocab])];
            }
        }
        let decode = started.elapsed();
        let decode_cpu = cpu_seconds() - cpu;
        println!(
            "batch {batch}: prefill {} tokens x{batch} in {:.3}s ({:.3} CPU s); {steps} decode steps: {:.1} tokens/s per sequence, {:.1} in all; {:.2} CPU ms per token",
            prompt.len(),
            prefill.as_secs_f64(),
            prefill_cpu,
            steps as f64 / decode.as_secs_f64(),
            (steps * batch) as f64 / decode.as_secs_f64(),
            decode_cpu * 1000.0 / (steps * batch) as f64,
        );
    }
}
