//! Eight columns per register, for CPUs without AVX-512: one macro, two
//! instantiations that differ in the byte dot product (`madd`: AVX2's
//! `vpmaddubsw` and `vpmaddwd`; `vnni`: AVX-VNNI's `vpdpbusd`).

use super::*;

/// Eight columns per register, each group in two halves; `$dot` adds
/// unsigned-by-signed byte products, four per lane, into its first
/// argument. Q8_0 uses the sign trick (`|w|` times `y` with `w`'s sign),
/// which never saturates `vpmaddubsw` for values within ±127.
macro_rules! avx2_kernels {
    ($name:ident, $features:literal, |$s:ident, $a:ident, $b:ident| $dot:expr) => {
        pub(crate) mod $name {
            use super::*;

            pub(crate) fn q4_1(w: &[Q4Group], rows: &[ActBlock], out: &mut [f32]) {
                dispatch_rows!(q4_1_rows, w, rows, out)
            }

            pub(crate) fn q8_0(w: &[Q8Group], rows: &[ActBlock], out: &mut [f32]) {
                dispatch_rows!(q8_0_rows, w, rows, out)
            }

            #[target_feature(enable = $features)]
            fn dot($s: __m256i, $a: __m256i, $b: __m256i) -> __m256i {
                $dot
            }

            #[target_feature(enable = $features)]
            fn q4_1_rows<const R: usize>(w: &[Q4Group], rows: [&[ActBlock]; R], out: &mut [f32]) {
                let low = _mm256_set1_epi8(0x0f);
                let zero = _mm256_setzero_si256();
                for h in 0..2 {
                    let mut acc_d = [_mm256_setzero_ps(); R];
                    let mut acc_m = [_mm256_setzero_ps(); R];
                    for (b, x) in w.iter().enumerate() {
                        let d = _mm256_cvtph_ps(halves8(&x.d[8 * h..]));
                        let m = _mm256_cvtph_ps(halves8(&x.m[8 * h..]));
                        let packed: [__m256i; 4] =
                            std::array::from_fn(|j| load256(&x.qs[64 * j + 32 * h..]));
                        let lo = packed.map(|v| _mm256_and_si256(v, low));
                        let hi = packed.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
                        for r in 0..R {
                            let y = &rows[r][b];
                            let bc = |j| _mm256_set1_epi32(word(y, j));
                            let mut s0 = dot(zero, lo[0], bc(0));
                            let mut s1 = dot(zero, lo[1], bc(1));
                            s0 = dot(s0, lo[2], bc(2));
                            s1 = dot(s1, lo[3], bc(3));
                            s0 = dot(s0, hi[0], bc(4));
                            s1 = dot(s1, hi[1], bc(5));
                            s0 = dot(s0, hi[2], bc(6));
                            s1 = dot(s1, hi[3], bc(7));
                            let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                            let t = _mm256_mul_ps(sum, _mm256_set1_ps(y.d));
                            acc_d[r] = _mm256_fmadd_ps(t, d, acc_d[r]);
                            acc_m[r] = _mm256_fmadd_ps(_mm256_set1_ps(y.s), m, acc_m[r]);
                        }
                    }
                    for r in 0..R {
                        store8(
                            &mut out[r * GROUP + 8 * h..],
                            _mm256_add_ps(acc_d[r], acc_m[r]),
                        );
                    }
                }
            }

            #[target_feature(enable = $features)]
            fn q8_0_rows<const R: usize>(w: &[Q8Group], rows: [&[ActBlock]; R], out: &mut [f32]) {
                let offset = _mm256_set1_epi8(-128);
                let zero = _mm256_setzero_si256();
                for h in 0..2 {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for (b, x) in w.iter().enumerate() {
                        let d = _mm256_cvtph_ps(halves8(&x.d[8 * h..]));
                        let q: [__m256i; 8] = std::array::from_fn(|j| {
                            _mm256_xor_si256(load256(&x.qs[64 * j + 32 * h..]), offset)
                        });
                        let abs = q.map(|v| _mm256_sign_epi8(v, v));
                        for r in 0..R {
                            let y = &rows[r][b];
                            let sy =
                                |j: usize| _mm256_sign_epi8(_mm256_set1_epi32(word(y, j)), q[j]);
                            let mut s0 = dot(zero, abs[0], sy(0));
                            let mut s1 = dot(zero, abs[1], sy(1));
                            for j in (2..8).step_by(2) {
                                s0 = dot(s0, abs[j], sy(j));
                                s1 = dot(s1, abs[j + 1], sy(j + 1));
                            }
                            let sum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                            let t = _mm256_mul_ps(sum, _mm256_set1_ps(y.d));
                            acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
                        }
                    }
                    for r in 0..R {
                        store8(&mut out[r * GROUP + 8 * h..], acc[r]);
                    }
                }
            }
        }
    };
}

avx2_kernels!(madd, "avx2,fma,f16c", |s, a, b| _mm256_add_epi32(
    s,
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
));
avx2_kernels!(vnni, "avx2,fma,f16c,avxvnni", |s, a, b| {
    _mm256_dpbusd_avx_epi32(s, a, b)
});
