//! One head's softmax attention over a KV cache, and the float helpers it
//! is made of.

#[cfg(target_arch = "x86_64")]
use crate::{isa::Isa, isa::best_isa, x86};

/// `Σ a[i] b[i]` (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if best_isa() != Isa::Portable {
        return x86::f32x8::dot(a, b);
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha x` (attention's weighted sum of values).
pub fn axpy_f32(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if best_isa() != Isa::Portable {
        return x86::f32x8::axpy(y, alpha, x);
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// One query head's softmax attention over cached positions:
/// `out = Σ_p softmax_p(scale q·k_p) v_p` for `p` in `positions`, where
/// position `p`'s key (value) is `keys[p * stride + offset..][..q.len()]`.
/// `scores` is scratch.
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
    let hd = q.len();
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512Vnni
        && hd.is_multiple_of(16)
        && hd <= 128
        && out.len() >= hd
        && positions.end.saturating_sub(1) * stride + offset + hd <= keys.len().min(values.len())
    {
        return x86::attention::attend(
            q, keys, values, stride, offset, positions, scale, scores, out,
        );
    }
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for p in positions.clone() {
        let k = &keys[p * stride + offset..p * stride + offset + hd];
        let s = dot_f32(q, k) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let out = &mut out[..hd];
    out.fill(0.0);
    for (p, w) in positions.zip(scores.iter()) {
        let v = &values[p * stride + offset..p * stride + offset + hd];
        axpy_f32(out, w / sum, v);
    }
}
