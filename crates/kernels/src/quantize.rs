//! Activations quantized per row to 8 bits, in blocks of [`QK`].

use rayon::prelude::*;

use crate::QK;
#[cfg(target_arch = "x86_64")]
use crate::{isa::Isa, isa::best_isa, x86};

/// One block of a quantized activation row: `x ≈ d * q`, `sum = Σq`,
/// `s = d * sum`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct ActBlock {
    pub qs: [i8; 32],
    pub d: f32,
    pub s: f32,
    pub sum: i32,
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            qs: [0; 32],
            d: 0.0,
            s: 0.0,
            sum: 0,
        }
    }
}

/// Quantizes `x` (a multiple of [`QK`] long) into `out`.
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512Vnni {
        return x86::avx512::quantize_row(x, out);
    }
    quantize_row_portable(x, out)
}

/// Quantizes `m` rows of `k` (`x`: `m × k`) into `out`, rows split across
/// the pool when there are many.
pub fn quantize_rows(x: &[f32], m: usize, k: usize, out: &mut [ActBlock]) {
    let kb = k / QK;
    let rows = x[..m * k]
        .chunks_exact(k)
        .zip(out[..m * kb].chunks_exact_mut(kb));
    if m >= 16 {
        rows.par_bridge().for_each(|(x, out)| quantize_row(x, out));
    } else {
        rows.for_each(|(x, out)| quantize_row(x, out));
    }
}

pub(crate) fn quantize_row_portable(x: &[f32], out: &mut [ActBlock]) {
    for (chunk, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in block.qs.iter_mut().zip(chunk) {
            // Rounds half away from zero like `f32::round`, without the
            // library call that costs on every activation.
            let scaled = v * inv;
            let r = (scaled + 0.5f32.copysign(scaled)) as i32;
            *q = r as i8;
            sum += r;
        }
        block.d = d;
        block.s = d * sum as f32;
        block.sum = sum;
    }
}
