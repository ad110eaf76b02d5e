//! One head's attention with AVX-512: the output stays in registers
//! across all positions.

use super::*;

#[inline(always)]
fn load16(v: &[f32]) -> __m512 {
    assert!(v.len() >= 16);
    // SAFETY: the slice holds at least 16 floats (checked above).
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
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
    let args = (
        q, keys, values, stride, offset, positions, scale, scores, out,
    );
    // SAFETY: the caller checked that the CPU has AVX-512 (its
    // best ISA is AVX-512 VNNI).
    unsafe {
        match q.len() / 16 {
            1 => heads::<1>(args),
            2 => heads::<2>(args),
            3 => heads::<3>(args),
            4 => heads::<4>(args),
            5 => heads::<5>(args),
            6 => heads::<6>(args),
            7 => heads::<7>(args),
            8 => heads::<8>(args),
            _ => unreachable!("head dimensions of 16 to 128 only"),
        }
    }
}

type Args<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    usize,
    usize,
    std::ops::Range<usize>,
    f32,
    &'a mut Vec<f32>,
    &'a mut [f32],
);

#[target_feature(enable = "avx512f")]
fn heads<const N: usize>(
    (q, keys, values, stride, offset, positions, scale, scores, out): Args<'_>,
) {
    let qv: [__m512; N] = std::array::from_fn(|i| load16(&q[16 * i..]));
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for p in positions.clone() {
        let k = &keys[p * stride + offset..p * stride + offset + 16 * N];
        let mut acc = _mm512_mul_ps(qv[0], load16(k));
        for i in 1..N {
            acc = _mm512_fmadd_ps(qv[i], load16(&k[16 * i..]), acc);
        }
        let s = _mm512_reduce_add_ps(acc) * scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    let mut o = [_mm512_setzero_ps(); N];
    for (p, w) in positions.zip(scores.iter()) {
        let v = &values[p * stride + offset..p * stride + offset + 16 * N];
        let w = _mm512_set1_ps(w * inv);
        for i in 0..N {
            o[i] = _mm512_fmadd_ps(w, load16(&v[16 * i..]), o[i]);
        }
    }
    for i in 0..N {
        let dst = &mut out[16 * i..16 * i + 16];
        // SAFETY: `dst` holds exactly 16 floats.
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), o[i]) };
    }
}
