//! Attention's float loops (AVX2 with FMA).

use super::*;

#[inline(always)]
fn load8(v: &[f32]) -> __m256 {
    assert!(v.len() >= 8);
    // SAFETY: the slice holds at least 8 floats (checked above).
    unsafe { _mm256_loadu_ps(v.as_ptr()) }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: callers checked the features at run time.
    unsafe { dot_impl(a, b) }
}

pub(crate) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    // SAFETY: callers checked the features at run time.
    unsafe { axpy_impl(y, alpha, x) }
}

#[target_feature(enable = "avx2,fma")]
fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        acc = _mm256_fmadd_ps(load8(&a[i..i + 8]), load8(&b[i..i + 8]), acc);
        i += 8;
    }
    let lo = _mm256_castps256_ps128(acc);
    let hi = _mm256_extractf128_ps::<1>(acc);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    let mut sum = _mm_cvtss_f32(s);
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

#[target_feature(enable = "avx2,fma")]
fn axpy_impl(y: &mut [f32], alpha: f32, x: &[f32]) {
    let n = x.len().min(y.len());
    let a = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(a, load8(&x[i..i + 8]), load8(&y[i..i + 8]));
        let dst = &mut y[i..i + 8];
        // SAFETY: `dst` holds exactly 8 floats.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) };
        i += 8;
    }
    while i < n {
        y[i] += alpha * x[i];
        i += 1;
    }
}
