//! One head's attention with AVX-512, over a paged cache: the output stays
//! in registers across all positions of all blocks.

use super::*;
use crate::attention::{Paged, segments};

#[inline(always)]
fn load16(v: &[f32]) -> __m512 {
    assert!(v.len() >= 16);
    // SAFETY: the slice holds at least 16 floats (checked above).
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

/// The caller checked that `q.len()` is a multiple of 16 up to 128 and
/// that `out` holds that many floats.
pub(crate) fn attend(args: Paged<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    // SAFETY: the caller checked that the CPU has AVX-512 (its
    // best ISA is AVX-512 VNNI).
    unsafe {
        match args.q.len() / 16 {
            1 => heads::<1>(args, scores, out),
            2 => heads::<2>(args, scores, out),
            3 => heads::<3>(args, scores, out),
            4 => heads::<4>(args, scores, out),
            5 => heads::<5>(args, scores, out),
            6 => heads::<6>(args, scores, out),
            7 => heads::<7>(args, scores, out),
            8 => heads::<8>(args, scores, out),
            _ => unreachable!("head dimensions of 16 to 128 only"),
        }
    }
}

#[target_feature(enable = "avx512f")]
fn heads<const N: usize>(a: Paged<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let (stride, offset, width) = (a.stride, a.offset, 16 * N);
    let qv: [__m512; N] = std::array::from_fn(|i| load16(&a.q[16 * i..]));
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for (b, rows) in segments(a.positions.clone(), a.block_tokens) {
        let keys = a.key_blocks[b];
        for r in rows {
            let k = &keys[r * stride + offset..r * stride + offset + width];
            let mut acc = _mm512_mul_ps(qv[0], load16(k));
            for i in 1..N {
                acc = _mm512_fmadd_ps(qv[i], load16(&k[16 * i..]), acc);
            }
            let s = _mm512_reduce_add_ps(acc) * a.scale;
            max = max.max(s);
            scores.push(s);
        }
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    let mut o = [_mm512_setzero_ps(); N];
    let mut w = scores.iter();
    for (b, rows) in segments(a.positions, a.block_tokens) {
        let values = a.value_blocks[b];
        for (r, w) in rows.zip(w.by_ref()) {
            let v = &values[r * stride + offset..r * stride + offset + width];
            let w = _mm512_set1_ps(w * inv);
            for i in 0..N {
                o[i] = _mm512_fmadd_ps(w, load16(&v[16 * i..]), o[i]);
            }
        }
    }
    for i in 0..N {
        let dst = &mut out[16 * i..16 * i + 16];
        // SAFETY: `dst` holds exactly 16 floats.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), o[i]) };
    }
}
