//! One head's softmax attention over a KV cache, contiguous or paged
//! (fixed-size blocks of positions), and the float helpers it is made of.

#[cfg(target_arch = "x86_64")]
use crate::x86;
use crate::{isa::Isa, isa::best_isa};

/// `Σ a[i] b[i]` (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_with(best_isa(), a, b)
}

/// `y += alpha x` (attention's weighted sum of values).
pub fn axpy_f32(y: &mut [f32], alpha: f32, x: &[f32]) {
    axpy_with(best_isa(), y, alpha, x)
}

fn dot_with(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        return x86::f32x8::dot(a, b);
    }
    let _ = isa;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy_with(isa: Isa, y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        return x86::f32x8::axpy(y, alpha, x);
    }
    let _ = isa;
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// One query head's softmax attention over cached positions:
/// `out = Σ_p softmax_p(scale q·k_p) v_p` for `p` in `positions`, where
/// position `p`'s key (value) is `keys[p * stride + offset..][..q.len()]`.
/// `scores` is scratch. The contiguous cache is one block of
/// [`attend_paged`].
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let block_tokens = positions.end.max(1);
    attend_paged(
        q,
        &[keys],
        &[values],
        block_tokens,
        stride,
        offset,
        positions,
        scale,
        scores,
        out,
    );
}

/// [`attend`] over a paged cache: position `p` lives in block
/// `p / block_tokens`, at row `p % block_tokens`, and its key (value) is
/// `key_blocks[b][row * stride + offset..][..q.len()]`. Each block holds
/// `block_tokens` rows (the last one needed may hold fewer).
///
/// The sums run in the same order as [`attend`]'s over the same
/// positions, so a paged cache gives exactly the contiguous result.
#[allow(clippy::too_many_arguments)]
pub fn attend_paged(
    q: &[f32],
    key_blocks: &[&[f32]],
    value_blocks: &[&[f32]],
    block_tokens: usize,
    stride: usize,
    offset: usize,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let args = Paged {
        q,
        key_blocks,
        value_blocks,
        block_tokens,
        stride,
        offset,
        positions,
        scale,
    };
    attend_paged_with(best_isa(), args, scores, out);
}

/// The arguments of [`attend_paged`] but the scratch and the output.
pub(crate) struct Paged<'a> {
    pub q: &'a [f32],
    pub key_blocks: &'a [&'a [f32]],
    pub value_blocks: &'a [&'a [f32]],
    pub block_tokens: usize,
    pub stride: usize,
    pub offset: usize,
    pub positions: std::ops::Range<usize>,
    pub scale: f32,
}

/// [`attend_paged`] with the inner loops of `isa` (one of
/// [`crate::available_isas`]).
pub(crate) fn attend_paged_with(isa: Isa, args: Paged<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    assert!(args.block_tokens > 0, "blocks of no positions");
    let hd = args.q.len();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && hd.is_multiple_of(16) && hd <= 128 && out.len() >= hd {
        return x86::attention::attend(args, scores, out);
    }
    let Paged {
        q,
        key_blocks,
        value_blocks,
        block_tokens,
        stride,
        offset,
        positions,
        scale,
    } = args;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for (b, rows) in segments(positions.clone(), block_tokens) {
        let keys = key_blocks[b];
        for r in rows {
            let k = &keys[r * stride + offset..r * stride + offset + hd];
            let s = dot_with(isa, q, k) * scale;
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let out = &mut out[..hd];
    out.fill(0.0);
    let mut w = scores.iter();
    for (b, rows) in segments(positions, block_tokens) {
        let values = value_blocks[b];
        for (r, w) in rows.zip(w.by_ref()) {
            let v = &values[r * stride + offset..r * stride + offset + hd];
            axpy_with(isa, out, w / sum, v);
        }
    }
}

/// The blocks `positions` spans, in order, each with the rows of it that
/// `positions` covers.
pub(crate) fn segments(
    positions: std::ops::Range<usize>,
    block_tokens: usize,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    let first = positions.start / block_tokens;
    let end = positions.end.div_ceil(block_tokens);
    (first..end)
        .map(move |b| {
            let lo = positions.start.max(b * block_tokens) - b * block_tokens;
            let hi = positions.end.min((b + 1) * block_tokens) - b * block_tokens;
            (b, lo..hi)
        })
        .filter(|(_, rows)| !rows.is_empty())
}
