//! Times one decode step's attention (every layer, every head of several
//! sequences) over a contiguous cache per layer against a paged one (blocks
//! of positions holding every layer, as the runner keeps them), on random
//! data shaped like SmolLM2-135M's. `attention [CONTEXT] [SEQUENCES]
//! [BLOCK_TOKENS]`.

#![allow(clippy::expect_used)]

use std::time::Instant;

use flotilla_kernels::{attend, attend_paged};

const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HD: usize = 64;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (context, sequences, bt) = (arg(1, 1024), arg(2, 4), arg(3, 16));
    let kvd = KV_HEADS * HD;
    let fill = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + seed * 17) % 1000) as f32 / 1000.0 - 0.5)
            .collect()
    };
    // Contiguous: per sequence, per layer, `[position][kv_dim]`.
    let contiguous: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..sequences)
        .map(|s| {
            (0..LAYERS)
                .map(|l| (fill(context * kvd, s + l), fill(context * kvd, s + l + 1)))
                .collect()
        })
        .collect();
    // Paged: per sequence, blocks of `[layer][position][kv_dim]`.
    let blocks = context.div_ceil(bt);
    let paged: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..sequences)
        .map(|s| {
            (0..blocks)
                .map(|b| {
                    (
                        fill(LAYERS * bt * kvd, s + b),
                        fill(LAYERS * bt * kvd, s + b + 1),
                    )
                })
                .collect()
        })
        .collect();
    let q = fill(HEADS * HD, 7);
    let mut out = vec![0f32; HD];
    let mut scores = Vec::with_capacity(context);
    let scale = 1.0 / (HD as f32).sqrt();
    let step_contiguous = |out: &mut [f32], scores: &mut Vec<f32>| {
        for l in 0..LAYERS {
            for seq in &contiguous {
                let (k, v) = &seq[l];
                for h in 0..HEADS {
                    let kvh = h / (HEADS / KV_HEADS);
                    let q = &q[h * HD..(h + 1) * HD];
                    attend(q, k, v, kvd, kvh * HD, 0..context, scale, scores, out);
                }
            }
        }
    };
    // One step over the paged caches, with position `p` of kv head `h`
    // at `p * stride + offset(h)` within a block's layer.
    let step_blocks =
        |stride: usize, offset: &dyn Fn(usize) -> usize, out: &mut [f32], scores: &mut Vec<f32>| {
            let per_layer = bt * kvd;
            for l in 0..LAYERS {
                for seq in &paged {
                    let (kb, vb): (Vec<&[f32]>, Vec<&[f32]>) = seq
                        .iter()
                        .map(|(k, v)| {
                            (
                                &k[l * per_layer..(l + 1) * per_layer],
                                &v[l * per_layer..(l + 1) * per_layer],
                            )
                        })
                        .unzip();
                    for h in 0..HEADS {
                        let kvh = h / (HEADS / KV_HEADS);
                        let q = &q[h * HD..(h + 1) * HD];
                        attend_paged(
                            q,
                            &kb,
                            &vb,
                            bt,
                            stride,
                            offset(kvh),
                            0..context,
                            scale,
                            scores,
                            out,
                        );
                    }
                }
            }
        };
    // Paged, position-major: blocks of `[layer][position][kv_head][head_dim]`.
    let step_paged =
        |out: &mut [f32], scores: &mut Vec<f32>| step_blocks(kvd, &|kvh| kvh * HD, out, scores);
    // Paged, head-major: blocks of `[layer][kv_head][position][head_dim]`.
    let step_heads =
        |out: &mut [f32], scores: &mut Vec<f32>| step_blocks(HD, &|kvh| kvh * bt * HD, out, scores);
    let mut best_h = f64::MAX;
    let rounds = 5;
    let steps = 20;
    let (mut best_c, mut best_p) = (f64::MAX, f64::MAX);
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..steps {
            step_contiguous(&mut out, &mut scores);
        }
        best_c = best_c.min(t.elapsed().as_secs_f64() / steps as f64);
        let t = Instant::now();
        for _ in 0..steps {
            step_paged(&mut out, &mut scores);
        }
        best_p = best_p.min(t.elapsed().as_secs_f64() / steps as f64);
        let t = Instant::now();
        for _ in 0..steps {
            step_heads(&mut out, &mut scores);
        }
        best_h = best_h.min(t.elapsed().as_secs_f64() / steps as f64);
    }
    println!(
        "context {context}, {sequences} sequences, {LAYERS} layers x {HEADS} heads: \
         contiguous {:.2} ms per step, paged (blocks of {bt}) {:.2} ms ({:+.1}%), \
         head-major {:.2} ms ({:+.1}%), ISA {:?}",
        best_c * 1e3,
        best_p * 1e3,
        (best_p / best_c - 1.0) * 100.0,
        best_h * 1e3,
        (best_h / best_c - 1.0) * 100.0,
        flotilla_kernels::best_isa()
    );
}
