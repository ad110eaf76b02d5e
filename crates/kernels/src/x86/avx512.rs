//! Sixteen columns per register.

use super::*;

#[inline(always)]
fn load512(bytes: &[u8]) -> __m512i {
    assert!(bytes.len() >= 64);
    // SAFETY: at least 64 bytes (checked above).
    unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
}

#[inline(always)]
fn halves(h: &[u16; GROUP]) -> __m256i {
    // SAFETY: exactly the 32 bytes of the array.
    unsafe { _mm256_loadu_si256(h.as_ptr().cast()) }
}

#[inline(always)]
fn store(out: &mut [f32], v: __m512) {
    assert!(out.len() >= GROUP);
    // SAFETY: at least 16 floats (checked above).
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
}

pub(crate) fn q4_1(w: &[Q4Group], rows: &[ActBlock], out: &mut [f32]) {
    dispatch_rows!(q4_1_rows, w, rows, out)
}

pub(crate) fn q8_0(w: &[Q8Group], rows: &[ActBlock], out: &mut [f32]) {
    dispatch_rows!(q8_0_rows, w, rows, out)
}

pub(crate) fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    // SAFETY: the caller checked the CPU has AVX-512.
    unsafe { quantize(x, out) }
}

#[inline(always)]
fn load16(v: &[f32]) -> __m512 {
    assert!(v.len() >= 16);
    // SAFETY: at least 16 floats (checked above).
    unsafe { _mm512_loadu_ps(v.as_ptr()) }
}

/// The portable rounding exactly (half away from zero, then
/// truncation), sixteen values at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn quantize(x: &[f32], out: &mut [ActBlock]) {
    let sign = _mm512_set1_epi32(i32::MIN);
    let half = _mm512_set1_ps(0.5);
    for (chunk, block) in x.chunks_exact(crate::QK).zip(out.iter_mut()) {
        let (a, b) = (load16(chunk), load16(&chunk[16..]));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let d = amax / 127.0;
        let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let round = |v: __m512| {
            let scaled = _mm512_mul_ps(v, inv);
            let bits = _mm512_castps_si512(scaled);
            let bias = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_and_si512(bits, sign),
                _mm512_castps_si512(half),
            ));
            _mm512_cvttps_epi32(_mm512_add_ps(scaled, bias))
        };
        let (qa, qb) = (round(a), round(b));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
        let bytes = [_mm512_cvtepi32_epi8(qa), _mm512_cvtepi32_epi8(qb)];
        for (half, q) in bytes.iter().enumerate() {
            let dst = &mut block.qs[16 * half..16 * half + 16];
            // SAFETY: `dst` holds exactly 16 bytes.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), *q) };
        }
        block.d = d;
        block.s = d * sum as f32;
        block.sum = sum;
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q4_1_rows<const R: usize>(w: &[Q4Group], rows: [&[ActBlock]; R], out: &mut [f32]) {
    let low = _mm512_set1_epi8(0x0f);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in w.iter().enumerate() {
        let d = _mm512_cvtph_ps(halves(&x.d));
        let m = _mm512_cvtph_ps(halves(&x.m));
        let packed: [__m512i; 4] = std::array::from_fn(|j| load512(&x.qs[64 * j..]));
        let lo = packed.map(|v| _mm512_and_si512(v, low));
        let hi = packed.map(|v| _mm512_and_si512(_mm512_srli_epi16::<4>(v), low));
        for r in 0..R {
            let y = &rows[r][b];
            let bc = |j| _mm512_set1_epi32(word(y, j));
            let mut s0 = _mm512_dpbusd_epi32(zero, lo[0], bc(0));
            let mut s1 = _mm512_dpbusd_epi32(zero, lo[1], bc(1));
            s0 = _mm512_dpbusd_epi32(s0, lo[2], bc(2));
            s1 = _mm512_dpbusd_epi32(s1, lo[3], bc(3));
            s0 = _mm512_dpbusd_epi32(s0, hi[0], bc(4));
            s1 = _mm512_dpbusd_epi32(s1, hi[1], bc(5));
            s0 = _mm512_dpbusd_epi32(s0, hi[2], bc(6));
            s1 = _mm512_dpbusd_epi32(s1, hi[3], bc(7));
            let dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            let t = _mm512_mul_ps(dot, _mm512_set1_ps(y.d));
            acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(y.s), m, acc[r]);
        }
    }
    for r in 0..R {
        store(&mut out[r * GROUP..], acc[r]);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn q8_0_rows<const R: usize>(w: &[Q8Group], rows: [&[ActBlock]; R], out: &mut [f32]) {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, x) in w.iter().enumerate() {
        let d = _mm512_cvtph_ps(halves(&x.d));
        let q: [__m512i; 8] = std::array::from_fn(|j| load512(&x.qs[64 * j..]));
        for r in 0..R {
            let y = &rows[r][b];
            let bc = |j| _mm512_set1_epi32(word(y, j));
            let mut s0 = _mm512_dpbusd_epi32(zero, q[0], bc(0));
            let mut s1 = _mm512_dpbusd_epi32(zero, q[1], bc(1));
            for j in (2..8).step_by(2) {
                s0 = _mm512_dpbusd_epi32(s0, q[j], bc(j));
                s1 = _mm512_dpbusd_epi32(s1, q[j + 1], bc(j + 1));
            }
            // The weights carry +128: take 128 Σq back off.
            let sum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(y.sum << 7));
            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(y.d));
            acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
        }
    }
    for r in 0..R {
        store(&mut out[r * GROUP..], acc[r]);
    }
}
