//! The llama-family transformer (llama, mistral, qwen2) the engine runs:
//! one forward pass over a batch of sequences, each with its own KV cache,
//! where every sequence feeds one or more new tokens (decode steps and
//! prompt chunks mixed freely). The linear layers of all sequences run as
//! one matrix product, so weights are read once per step, not once per
//! sequence; attention runs per sequence over its own cache, whose blocks
//! (`model/kv.rs`) it may share with other sequences.
//!
//! Q4_0/Q4_1/Q8_0 weights use the project's kernels ([`flotilla_kernels`]);
//! every other format (K-quants, f16/bf16/f32 from safetensors) goes through
//! candle's `QMatMul` (`model/linear.rs`). Activations are f32 buffers reused from
//! step to step.

mod kv;
mod linear;

use rayon::prelude::*;

pub use kv::{DEFAULT_BLOCK_TOKENS, KvBlock, SeqCache};
pub use linear::Linear;
use linear::MatmulScratch;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Rotates pairs (i, i + d/2) (HF layout, qwen2 GGUF) rather than
    /// (2i, 2i + 1) (llama GGUF, whose q/k rows are permuted for it).
    pub rope_neox: bool,
    pub context: usize,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
}

impl Config {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn check(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Shape(m));
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads cannot share {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.hidden == 0 || self.layers == 0 || self.vocab == 0 || self.context == 0 {
            return bad("the model has an empty dimension".into());
        }
        Ok(())
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// q, k and v, fused into one when possible.
    pub qkv: Vec<Linear>,
    pub o: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate and up, fused into one when possible.
    pub gate_up: Vec<Linear>,
    pub down: Linear,
}

impl Layer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        attn_norm: Vec<f32>,
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        ffn_norm: Vec<f32>,
        gate: Linear,
        up: Linear,
        down: Linear,
    ) -> Self {
        Self {
            attn_norm,
            qkv: Linear::fuse(vec![q, k, v]),
            o,
            ffn_norm,
            gate_up: Linear::fuse(vec![gate, up]),
            down,
        }
    }
}

pub struct Llama {
    pub config: Config,
    /// `vocab × hidden`.
    embeddings: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// `context × head_dim/2` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// Buffers reused from step to step.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    ffn: Vec<f32>,
    act: Vec<f32>,
    last: Vec<f32>,
    matmul: MatmulScratch,
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(w) {
            *o = v * scale * w;
        }
    }
}

/// One batch entry: a cache and the tokens to feed it.
pub struct Feed<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
    /// Whether the caller wants the logits after the last token.
    pub logits: bool,
}

impl Llama {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        embeddings: Vec<f32>,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        output: Linear,
    ) -> Result<Self, ModelError> {
        config.check()?;
        let c = &config;
        if embeddings.len() != c.vocab * c.hidden
            || layers.len() != c.layers
            || norm.len() != c.hidden
            || output.n_in != c.hidden
            || output.n_out < c.vocab
        {
            return Err(ModelError::Shape(
                "the weights do not match the configuration".into(),
            ));
        }
        for l in &layers {
            let qkv_out: usize = l.qkv.iter().map(|p| p.n_out).sum();
            let gu_out: usize = l.gate_up.iter().map(|p| p.n_out).sum();
            if qkv_out != c.q_dim() + 2 * c.kv_dim()
                || l.qkv.iter().any(|p| p.n_in != c.hidden)
                || l.o.n_in != c.q_dim()
                || l.o.n_out != c.hidden
                || gu_out != 2 * c.ffn
                || l.down.n_in != c.ffn
                || l.down.n_out != c.hidden
                || l.attn_norm.len() != c.hidden
                || l.ffn_norm.len() != c.hidden
            {
                return Err(ModelError::Shape(
                    "a layer's weights do not match the configuration".into(),
                ));
            }
        }
        let half = c.head_dim / 2;
        let mut cos = Vec::with_capacity(c.context * half);
        let mut sin = Vec::with_capacity(c.context * half);
        for pos in 0..c.context {
            for i in 0..half {
                let freq = 1.0 / c.rope_theta.powf(2.0 * i as f32 / c.head_dim as f32);
                let angle = pos as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            config,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
        })
    }

    /// An empty cache in blocks of [`DEFAULT_BLOCK_TOKENS`] positions,
    /// which grows by fresh blocks as it is fed.
    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(DEFAULT_BLOCK_TOKENS)
    }

    fn rope(&self, x: &mut [f32], pos: usize) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        for head in x.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if self.config.rope_neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }

    /// Runs the new tokens of every entry through the model, extending
    /// their caches, and writes into `logits` (`vocab` per entry that asked,
    /// in order) the logits after each such entry's last token.
    pub fn forward(
        &self,
        batch: &mut [Feed<'_>],
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (h, qd, kvd) = (c.hidden, c.q_dim(), c.kv_dim());
        let total: usize = batch.iter().map(|f| f.tokens.len()).sum();
        if total == 0 {
            logits.clear();
            return Ok(());
        }
        for f in batch.iter() {
            if f.tokens.is_empty() {
                return Err(ModelError::Shape("an entry with no tokens".into()));
            }
            if f.cache.len() + f.tokens.len() > c.context {
                return Err(ModelError::Shape(format!(
                    "{} tokens exceed the context of {}",
                    f.cache.len() + f.tokens.len(),
                    c.context
                )));
            }
            if let Some(&t) = f.tokens.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(ModelError::Shape(format!(
                    "token {t} is outside the vocabulary"
                )));
            }
            f.cache.check(c)?;
        }
        for f in batch.iter_mut() {
            f.cache.make_room(c, f.tokens.len());
        }
        let s = scratch;
        grow(&mut s.x, total * h);
        grow(&mut s.xn, total * h);
        grow(&mut s.qkv, total * (qd + 2 * kvd));
        grow(&mut s.attn, total * qd);
        // Also holds the unfused q/k/v and gate/up products.
        grow(&mut s.proj, total * h.max(qd + 2 * kvd).max(2 * c.ffn));
        grow(&mut s.ffn, total * 2 * c.ffn);
        grow(&mut s.act, total * c.ffn);
        let mut row = 0;
        for f in batch.iter() {
            for &t in f.tokens {
                let t = t as usize;
                s.x[row * h..(row + 1) * h].copy_from_slice(&self.embeddings[t * h..(t + 1) * h]);
                row += 1;
            }
        }
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(
                &s.x[..total * h],
                &layer.attn_norm,
                c.rms_eps,
                &mut s.xn[..total * h],
            );
            let width = qd + 2 * kvd;
            if layer.qkv.len() == 1 {
                layer.qkv[0].forward(&s.xn, total, &mut s.qkv, &mut s.matmul)?;
            } else {
                // Separate q, k, v products, interleaved into rows of q|k|v.
                let mut offset = 0;
                for part in &layer.qkv {
                    part.forward(&s.xn, total, &mut s.proj, &mut s.matmul)?;
                    for r in 0..total {
                        s.qkv[r * width + offset..r * width + offset + part.n_out]
                            .copy_from_slice(&s.proj[r * part.n_out..(r + 1) * part.n_out]);
                    }
                    offset += part.n_out;
                }
            }
            // RoPE, cache write, attention: per sequence.
            let mut row = 0;
            for f in batch.iter_mut() {
                let n = f.tokens.len();
                let start = f.cache.len();
                for i in 0..n {
                    let r = &mut s.qkv[(row + i) * width..(row + i + 1) * width];
                    let (q, kv) = r.split_at_mut(qd);
                    self.rope(q, start + i);
                    self.rope(&mut kv[..kvd], start + i);
                    let (key, value) = kv.split_at(kvd);
                    f.cache.write(li, c.head_dim, start + i, key, value)?;
                }
                let (keys, values) = f.cache.layer_blocks(li, kvd, start + n);
                self.attention(
                    &s.qkv[row * width..(row + n) * width],
                    &keys,
                    &values,
                    f.cache.block_tokens(),
                    start,
                    &mut s.attn[row * qd..(row + n) * qd],
                );
                row += n;
            }
            layer
                .o
                .forward(&s.attn, total, &mut s.proj, &mut s.matmul)?;
            for (x, p) in s.x[..total * h].iter_mut().zip(&s.proj) {
                *x += p;
            }
            rms_norm(
                &s.x[..total * h],
                &layer.ffn_norm,
                c.rms_eps,
                &mut s.xn[..total * h],
            );
            let f2 = 2 * c.ffn;
            if layer.gate_up.len() == 1 {
                layer.gate_up[0].forward(&s.xn, total, &mut s.ffn, &mut s.matmul)?;
            } else {
                let mut offset = 0;
                for part in &layer.gate_up {
                    part.forward(&s.xn, total, &mut s.proj, &mut s.matmul)?;
                    for r in 0..total {
                        s.ffn[r * f2 + offset..r * f2 + offset + part.n_out]
                            .copy_from_slice(&s.proj[r * part.n_out..(r + 1) * part.n_out]);
                    }
                    offset += part.n_out;
                }
            }
            for r in 0..total {
                let (gate, up) = s.ffn[r * f2..(r + 1) * f2].split_at(c.ffn);
                for ((a, g), u) in s.act[r * c.ffn..(r + 1) * c.ffn]
                    .iter_mut()
                    .zip(gate)
                    .zip(up)
                {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            }
            layer
                .down
                .forward(&s.act, total, &mut s.proj, &mut s.matmul)?;
            for (x, p) in s.x[..total * h].iter_mut().zip(&s.proj) {
                *x += p;
            }
        }
        // Logits only for the last token of the entries that want them.
        let wanted: Vec<usize> = {
            let mut row = 0;
            let mut rows = Vec::new();
            for f in batch.iter_mut() {
                f.cache.advance(f.tokens.len());
                row += f.tokens.len();
                if f.logits {
                    rows.push(row - 1);
                }
            }
            rows
        };
        let m = wanted.len();
        logits.clear();
        if m == 0 {
            return Ok(());
        }
        grow(&mut s.last, m * h);
        for (i, &r) in wanted.iter().enumerate() {
            rms_norm(
                &s.x[r * h..(r + 1) * h],
                &self.norm,
                c.rms_eps,
                &mut s.last[i * h..(i + 1) * h],
            );
        }
        let n = self.output.n_out;
        let mut out = std::mem::take(logits);
        out.resize(m * n, 0.0);
        self.output
            .forward(&s.last[..m * h], m, &mut out, &mut s.matmul)?;
        if n != c.vocab {
            // Some files pad the output matrix beyond the vocabulary.
            let mut packed = Vec::with_capacity(m * c.vocab);
            for r in 0..m {
                packed.extend_from_slice(&out[r * n..r * n + c.vocab]);
            }
            out = packed;
        }
        *logits = out;
        Ok(())
    }

    /// Causal attention of `n` new rows (q|k|v each) at positions
    /// `start..start + n` over the cache's blocks of this layer (which
    /// already hold them).
    fn attention(
        &self,
        qkv: &[f32],
        keys: &[&[f32]],
        values: &[&[f32]],
        block_tokens: usize,
        start: usize,
        out: &mut [f32],
    ) {
        let c = &self.config;
        let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
        let width = qd + 2 * kvd;
        let n = qkv.len() / width;
        let group = c.heads / c.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let one = |i: usize, head: usize, scores: &mut Vec<f32>, o: &mut [f32]| {
            let pos = start + i;
            let first = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let q = &qkv[i * width + head * hd..i * width + (head + 1) * hd];
            let kvh = head / group;
            // Blocks are `[kv_head][position][head_dim]` per layer.
            flotilla_kernels::attend_paged(
                q,
                keys,
                values,
                block_tokens,
                hd,
                kvh * block_tokens * hd,
                first..pos + 1,
                scale,
                scores,
                o,
            );
        };
        let work = n * c.heads * (start + n);
        if work < 1 << 11 {
            let mut scores = Vec::with_capacity(start + n);
            for (i, row) in out.chunks_exact_mut(qd).enumerate() {
                for (head, o) in row.chunks_exact_mut(hd).enumerate() {
                    one(i, head, &mut scores, o);
                }
            }
            return;
        }
        // Longer contexts: (row, head) pairs across the thread pool.
        out.par_chunks_mut(hd).enumerate().for_each_init(
            || Vec::with_capacity(start + n),
            |scores, (j, o)| one(j / c.heads, j % c.heads, scores, o),
        );
    }
}
