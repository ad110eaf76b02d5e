//! The quantized matrix products that decide decode speed, on the project's
//! own block layouts: Q4_1 weights (Q4_0 loads into it exactly, as
//! `m = -8 d`) and Q8_0 weights, against activations quantized per row to
//! 8 bits in blocks of 32 ([`ActBlock`]). Columns are split across the
//! rayon thread pool the caller runs in; each (row, column) dot product is computed the same way
//! whatever the number of rows, so a sequence's result does not depend on
//! what it is batched with.
//!
//! The inner loops use AVX2 when the CPU has it (checked at run time) and a
//! portable loop otherwise; both are tested against candle's own quantized
//! matmul.

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const QK: usize = 32;

/// A GGUF Q4_1 block: `x = d * q + m`, `q` in 0..16; `qs[j]` holds
/// element `j` in its low nibble and element `j + 16` in its high one.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct BlockQ4_1 {
    pub d: u16,
    pub m: u16,
    pub qs: [u8; 16],
}

/// A GGUF Q8_0 block: `x = d * q`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub d: u16,
    pub qs: [i8; 32],
}

/// One block of a quantized activation row: `x ≈ d * q`, `s = d * Σq`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlock {
    pub qs: [i8; 32],
    pub d: f32,
    pub s: f32,
}

impl Default for ActBlock {
    fn default() -> Self {
        Self {
            qs: [0; 32],
            d: 0.0,
            s: 0.0,
        }
    }
}

fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

impl BlockQ4_1 {
    /// Reads GGUF Q4_1 blocks (20 bytes each).
    pub fn parse(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(20) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(20)
                .map(|b| {
                    let mut qs = [0u8; 16];
                    qs.copy_from_slice(&b[4..20]);
                    Self {
                        d: u16::from_le_bytes([b[0], b[1]]),
                        m: u16::from_le_bytes([b[2], b[3]]),
                        qs,
                    }
                })
                .collect(),
        )
    }

    /// Reads GGUF Q4_0 blocks (18 bytes: `x = d * (q - 8)`) exactly as Q4_1.
    pub fn parse_q4_0(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(18) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(18)
                .map(|b| {
                    let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                    let mut qs = [0u8; 16];
                    qs.copy_from_slice(&b[2..18]);
                    Self {
                        d: d.to_bits(),
                        m: (d * f16::from_f32(-8.0)).to_bits(),
                        qs,
                    }
                })
                .collect(),
        )
    }
}

impl BlockQ8_0 {
    /// Reads GGUF Q8_0 blocks (34 bytes each).
    pub fn parse(bytes: &[u8]) -> Option<Vec<Self>> {
        if !bytes.len().is_multiple_of(34) {
            return None;
        }
        Some(
            bytes
                .chunks_exact(34)
                .map(|b| {
                    let mut qs = [0i8; 32];
                    for (q, byte) in qs.iter_mut().zip(&b[2..34]) {
                        *q = *byte as i8;
                    }
                    Self {
                        d: u16::from_le_bytes([b[0], b[1]]),
                        qs,
                    }
                })
                .collect(),
        )
    }
}

/// Quantizes `x` (a multiple of [`QK`] long) into `out`.
pub fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
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
    }
}

/// Quantized weights, one row of blocks per output column.
pub enum QWeights {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

impl QWeights {
    pub fn concat(parts: &[&QWeights]) -> Option<QWeights> {
        match parts.first()? {
            QWeights::Q4_1(_) => {
                let mut all = Vec::new();
                for p in parts {
                    let QWeights::Q4_1(v) = p else { return None };
                    all.extend_from_slice(v);
                }
                Some(QWeights::Q4_1(all))
            }
            QWeights::Q8_0(_) => {
                let mut all = Vec::new();
                for p in parts {
                    let QWeights::Q8_0(v) = p else { return None };
                    all.extend_from_slice(v);
                }
                Some(QWeights::Q8_0(all))
            }
        }
    }
}

/// Columns per work item handed to a thread.
const COLUMNS_PER_ITEM: usize = 16;
/// Rows whose activations share one pass over a weight block.
const ROW_TILE: usize = 8;

/// `out[r * n + c] = Σ_k x[r, k] * w[c, k]` for `m` rows already quantized
/// into `acts` (`m * k / QK` blocks), `w` holding `n` columns. `scratch` is
/// the column-major staging area, reused between calls.
pub fn matmul(
    w: &QWeights,
    acts: &[ActBlock],
    dims: (usize, usize, usize),
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    matmul_with(best_isa(), w, acts, dims, out, scratch)
}

/// [`matmul`] with the given inner loops (the CPU must have them).
pub fn matmul_with(
    isa: Isa,
    w: &QWeights,
    acts: &[ActBlock],
    (m, k, n): (usize, usize, usize),
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let kb = k / QK;
    // Column-major staging (`[c][r]`) so that each work item owns one
    // contiguous slice; for one row it is the output itself.
    let staging: &mut [f32] = if m == 1 {
        &mut out[..n]
    } else {
        if scratch.len() < m * n {
            scratch.resize(m * n, 0.0);
        }
        &mut scratch[..m * n]
    };
    let work = |(item, dst): (usize, &mut [f32])| {
        let first = item * COLUMNS_PER_ITEM;
        if m == 1 && isa != Isa::Portable {
            // Decode: four columns share each activation load.
            let mut c = first;
            for quad in dst.chunks_mut(4) {
                if quad.len() == 4 {
                    dot4(isa, w, c, kb, acts, quad);
                } else {
                    for (j, o) in quad.iter_mut().enumerate() {
                        let o = std::slice::from_mut(o);
                        match w {
                            QWeights::Q4_1(b) => {
                                dot_q4_1(&b[(c + j) * kb..(c + j + 1) * kb], acts, kb, o, isa)
                            }
                            QWeights::Q8_0(b) => {
                                dot_q8_0(&b[(c + j) * kb..(c + j + 1) * kb], acts, kb, o, isa)
                            }
                        }
                    }
                }
                c += 4;
            }
            return;
        }
        for (j, col_out) in dst.chunks_mut(m).enumerate() {
            let c = first + j;
            for (tile, tile_out) in col_out.chunks_mut(ROW_TILE).enumerate() {
                let r0 = tile * ROW_TILE;
                let rows = &acts[r0 * kb..(r0 + tile_out.len()) * kb];
                match w {
                    QWeights::Q4_1(blocks) => {
                        dot_q4_1(&blocks[c * kb..(c + 1) * kb], rows, kb, tile_out, isa)
                    }
                    QWeights::Q8_0(blocks) => {
                        dot_q8_0(&blocks[c * kb..(c + 1) * kb], rows, kb, tile_out, isa)
                    }
                }
            }
        }
    };
    let chunk = COLUMNS_PER_ITEM * m;
    if n * m * k < 1 << 16 {
        staging.chunks_mut(chunk).enumerate().for_each(work);
    } else {
        // Rayon's waiting threads steal work, then sleep: they do not spin
        // against other processes for the cores.
        staging
            .par_chunks_mut(chunk)
            .enumerate()
            .with_min_len(2)
            .for_each(work);
    }
    if m > 1 {
        for c in 0..n {
            for r in 0..m {
                out[r * n + c] = scratch[c * m + r];
            }
        }
    }
}

/// Which inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    AvxVnni,
}

/// The best inner loops for this CPU (`FLOTILLA_RUNNER_ISA=portable|avx2`
/// caps it, for comparisons).
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let cap = std::env::var("FLOTILLA_RUNNER_ISA").unwrap_or_default();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let vnni = avx2 && std::arch::is_x86_feature_detected!("avxvnni");
            match cap.as_str() {
                "portable" => Isa::Portable,
                "avx2" if avx2 => Isa::Avx2,
                _ if vnni => Isa::AvxVnni,
                _ if avx2 => Isa::Avx2,
                _ => Isa::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = cap;
            Isa::Portable
        }
    })
}

/// The inner loops this CPU can run, best last (for tests).
pub fn available_isas() -> Vec<Isa> {
    let best = best_isa();
    [Isa::Portable, Isa::Avx2, Isa::AvxVnni]
        .into_iter()
        .filter(|i| match i {
            Isa::Portable => true,
            Isa::Avx2 => best != Isa::Portable,
            Isa::AvxVnni => best == Isa::AvxVnni,
        })
        .collect()
}

/// `Σ a[i] b[i]` (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match best_isa() {
        Isa::AvxVnni => return simd::vnni::dot_f32(a, b),
        Isa::Avx2 => return simd::avx2::dot_f32(a, b),
        Isa::Portable => {}
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha x` (attention's weighted sum of values).
pub fn axpy_f32(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    match best_isa() {
        Isa::AvxVnni => return simd::vnni::axpy_f32(y, alpha, x),
        Isa::Avx2 => return simd::avx2::axpy_f32(y, alpha, x),
        Isa::Portable => {}
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Four weight columns from `c` against one activation row.
fn dot4(isa: Isa, w: &QWeights, c: usize, kb: usize, row: &[ActBlock], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let cols = |i: usize| (c + i) * kb..(c + i + 1) * kb;
        match (isa, w) {
            (Isa::AvxVnni, QWeights::Q4_1(b)) => {
                return simd::vnni::dot4_q4_1(std::array::from_fn(|i| &b[cols(i)]), row, out);
            }
            (Isa::AvxVnni, QWeights::Q8_0(b)) => {
                return simd::vnni::dot4_q8_0(std::array::from_fn(|i| &b[cols(i)]), row, out);
            }
            (Isa::Avx2, QWeights::Q4_1(b)) => {
                return simd::avx2::dot4_q4_1(std::array::from_fn(|i| &b[cols(i)]), row, out);
            }
            (Isa::Avx2, QWeights::Q8_0(b)) => {
                return simd::avx2::dot4_q8_0(std::array::from_fn(|i| &b[cols(i)]), row, out);
            }
            (Isa::Portable, _) => {}
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        let o = std::slice::from_mut(o);
        match w {
            QWeights::Q4_1(b) => dot_q4_1(&b[(c + j) * kb..(c + j + 1) * kb], row, kb, o, isa),
            QWeights::Q8_0(b) => dot_q8_0(&b[(c + j) * kb..(c + j + 1) * kb], row, kb, o, isa),
        }
    }
}

/// One weight column against up to [`ROW_TILE`] activation rows.
fn dot_q4_1(w: &[BlockQ4_1], rows: &[ActBlock], kb: usize, out: &mut [f32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::AvxVnni => return simd::vnni::dot_q4_1(w, rows, kb, out),
        Isa::Avx2 => return simd::avx2::dot_q4_1(w, rows, kb, out),
        Isa::Portable => {}
    }
    let _ = isa;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &rows[r * kb..(r + 1) * kb];
        let mut sum = 0f32;
        for (x, y) in w.iter().zip(row) {
            let mut dot = 0i32;
            for j in 0..16 {
                dot += (x.qs[j] & 0x0f) as i32 * y.qs[j] as i32
                    + (x.qs[j] >> 4) as i32 * y.qs[j + 16] as i32;
            }
            sum += f16_to_f32(x.d) * y.d * dot as f32 + f16_to_f32(x.m) * y.s;
        }
        *o = sum;
    }
}

fn dot_q8_0(w: &[BlockQ8_0], rows: &[ActBlock], kb: usize, out: &mut [f32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::AvxVnni => return simd::vnni::dot_q8_0(w, rows, kb, out),
        Isa::Avx2 => return simd::avx2::dot_q8_0(w, rows, kb, out),
        Isa::Portable => {}
    }
    let _ = isa;
    for (r, o) in out.iter_mut().enumerate() {
        let row = &rows[r * kb..(r + 1) * kb];
        let mut sum = 0f32;
        for (x, y) in w.iter().zip(row) {
            let dot: i32 =
                x.qs.iter()
                    .zip(&y.qs)
                    .map(|(a, b)| *a as i32 * *b as i32)
                    .sum();
            sum += f16_to_f32(x.d) * y.d * dot as f32;
        }
        *o = sum;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! x86-64 inner loops: AVX2 (with FMA and F16C, which every AVX2 CPU
    //! has), and the same with AVX-VNNI's fused byte dot product. The only
    //! unsafe operations are unaligned 16/32-byte loads from fixed-size
    //! arrays (always in bounds) and calls into functions compiled for those
    //! features, made only after `is_x86_feature_detected!` said the CPU has
    //! them.

    use std::arch::x86_64::*;

    use super::{ActBlock, BlockQ4_1, BlockQ8_0, ROW_TILE};

    #[inline(always)]
    fn load32(bytes: &[i8; 32]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of the array; only inlined
        // into functions compiled for AVX2.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    #[inline(always)]
    fn load16(bytes: &[u8; 16]) -> __m128i {
        // SAFETY: reads exactly the 16 bytes of the array.
        unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
    }

    #[inline(always)]
    fn load8(v: &[f32]) -> __m256 {
        assert!(v.len() >= 8);
        // SAFETY: the slice holds at least 8 floats (checked above).
        unsafe { _mm256_loadu_ps(v.as_ptr()) }
    }

    #[inline(always)]
    fn store8(v: &mut [f32], x: __m256) {
        assert!(v.len() >= 8);
        // SAFETY: the slice holds at least 8 floats (checked above).
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), x) }
    }

    macro_rules! kernels {
        ($name:ident, $features:literal, |$a:ident, $b:ident| $products:expr) => {
            pub(super) mod $name {
                use super::*;

                pub(in super::super) fn dot_q4_1(
                    w: &[BlockQ4_1],
                    rows: &[ActBlock],
                    kb: usize,
                    out: &mut [f32],
                ) {
                    // SAFETY: callers checked the features at run time.
                    unsafe { dispatch_q4_1(w, rows, kb, out) }
                }

                pub(in super::super) fn dot_q8_0(
                    w: &[BlockQ8_0],
                    rows: &[ActBlock],
                    kb: usize,
                    out: &mut [f32],
                ) {
                    // SAFETY: callers checked the features at run time.
                    unsafe { dispatch_q8_0(w, rows, kb, out) }
                }

                pub(in super::super) fn dot4_q4_1(
                    w: [&[BlockQ4_1]; 4],
                    row: &[ActBlock],
                    out: &mut [f32],
                ) {
                    // SAFETY: callers checked the features at run time.
                    unsafe { q4_1_x4(w, row, out) }
                }

                pub(in super::super) fn dot4_q8_0(
                    w: [&[BlockQ8_0]; 4],
                    row: &[ActBlock],
                    out: &mut [f32],
                ) {
                    // SAFETY: callers checked the features at run time.
                    unsafe { q8_0_x4(w, row, out) }
                }

                // Per column, the same operations in the same order as
                // `q4_1::<1>`, so results do not depend on the path.
                #[target_feature(enable = $features)]
                fn q4_1_x4(w: [&[BlockQ4_1]; 4], row: &[ActBlock], out: &mut [f32]) {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let mut mins = [0f32; 4];
                    let low = _mm256_set1_epi8(0x0f);
                    let kb = row.len().min(w.iter().map(|c| c.len()).min().unwrap_or(0));
                    for b in 0..kb {
                        let y = &row[b];
                        let qy = load32(&y.qs);
                        for c in 0..4 {
                            let x = &w[c][b];
                            let packed = load16(&x.qs);
                            let qx = _mm256_and_si256(
                                _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
                                low,
                            );
                            let (xd, xm) = f16x2(x.d, x.m);
                            let p = _mm256_cvtepi32_ps(products(qx, qy));
                            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(xd * y.d), p, acc[c]);
                            mins[c] += xm * y.s;
                        }
                    }
                    for c in 0..4 {
                        out[c] = hsum(acc[c]) + mins[c];
                    }
                }

                #[target_feature(enable = $features)]
                fn q8_0_x4(w: [&[BlockQ8_0]; 4], row: &[ActBlock], out: &mut [f32]) {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let kb = row.len().min(w.iter().map(|c| c.len()).min().unwrap_or(0));
                    for b in 0..kb {
                        let y = &row[b];
                        let qy = load32(&y.qs);
                        for c in 0..4 {
                            let x = &w[c][b];
                            let qx = load32(&x.qs);
                            let (xd, _) = f16x2(x.d, 0);
                            let p = _mm256_cvtepi32_ps(products(
                                _mm256_sign_epi8(qx, qx),
                                _mm256_sign_epi8(qy, qx),
                            ));
                            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(xd * y.d), p, acc[c]);
                        }
                    }
                    for c in 0..4 {
                        out[c] = hsum(acc[c]);
                    }
                }

                pub(in super::super) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
                    // SAFETY: callers checked the features at run time.
                    unsafe { dot_f32_impl(a, b) }
                }

                pub(in super::super) fn axpy_f32(y: &mut [f32], alpha: f32, x: &[f32]) {
                    // SAFETY: callers checked the features at run time.
                    unsafe { axpy_f32_impl(y, alpha, x) }
                }

                #[target_feature(enable = $features)]
                fn dot_f32_impl(a: &[f32], b: &[f32]) -> f32 {
                    let n = a.len().min(b.len());
                    let mut acc = _mm256_setzero_ps();
                    let mut i = 0;
                    while i + 8 <= n {
                        let (x, y) = (load8(&a[i..i + 8]), load8(&b[i..i + 8]));
                        acc = _mm256_fmadd_ps(x, y, acc);
                        i += 8;
                    }
                    let mut sum = hsum(acc);
                    while i < n {
                        sum += a[i] * b[i];
                        i += 1;
                    }
                    sum
                }

                #[target_feature(enable = $features)]
                fn axpy_f32_impl(y: &mut [f32], alpha: f32, x: &[f32]) {
                    let n = x.len().min(y.len());
                    let a = _mm256_set1_ps(alpha);
                    let mut i = 0;
                    while i + 8 <= n {
                        let v = _mm256_fmadd_ps(a, load8(&x[i..i + 8]), load8(&y[i..i + 8]));
                        store8(&mut y[i..i + 8], v);
                        i += 8;
                    }
                    while i < n {
                        y[i] += alpha * x[i];
                        i += 1;
                    }
                }

                /// Unsigned bytes times signed bytes, summed in fours.
                #[target_feature(enable = $features)]
                fn products($a: __m256i, $b: __m256i) -> __m256i {
                    $products
                }

                #[target_feature(enable = $features)]
                fn hsum(v: __m256) -> f32 {
                    let lo = _mm256_castps256_ps128(v);
                    let hi = _mm256_extractf128_ps::<1>(v);
                    let s = _mm_add_ps(lo, hi);
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                    _mm_cvtss_f32(s)
                }

                #[target_feature(enable = $features)]
                fn f16x2(a: u16, b: u16) -> (f32, f32) {
                    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((a as u32 | ((b as u32) << 16)) as i32));
                    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
                }

                // The row count is a constant so that the accumulators stay
                // in registers.
                #[target_feature(enable = $features)]
                fn dispatch_q4_1(w: &[BlockQ4_1], rows: &[ActBlock], kb: usize, out: &mut [f32]) {
                    match out.len() {
                        1 => q4_1::<1>(w, rows, kb, out),
                        2 => q4_1::<2>(w, rows, kb, out),
                        3 => q4_1::<3>(w, rows, kb, out),
                        4 => q4_1::<4>(w, rows, kb, out),
                        5 => q4_1::<5>(w, rows, kb, out),
                        6 => q4_1::<6>(w, rows, kb, out),
                        7 => q4_1::<7>(w, rows, kb, out),
                        _ => q4_1::<ROW_TILE>(w, rows, kb, out),
                    }
                }

                #[target_feature(enable = $features)]
                fn dispatch_q8_0(w: &[BlockQ8_0], rows: &[ActBlock], kb: usize, out: &mut [f32]) {
                    match out.len() {
                        1 => q8_0::<1>(w, rows, kb, out),
                        2 => q8_0::<2>(w, rows, kb, out),
                        3 => q8_0::<3>(w, rows, kb, out),
                        4 => q8_0::<4>(w, rows, kb, out),
                        5 => q8_0::<5>(w, rows, kb, out),
                        6 => q8_0::<6>(w, rows, kb, out),
                        7 => q8_0::<7>(w, rows, kb, out),
                        _ => q8_0::<ROW_TILE>(w, rows, kb, out),
                    }
                }

                #[target_feature(enable = $features)]
                fn q4_1<const R: usize>(
                    w: &[BlockQ4_1],
                    rows: &[ActBlock],
                    kb: usize,
                    out: &mut [f32],
                ) {
                    let mut acc = [_mm256_setzero_ps(); R];
                    let mut mins = [0f32; R];
                    let low = _mm256_set1_epi8(0x0f);
                    let rows: [&[ActBlock]; R] =
                        std::array::from_fn(|r| &rows[r * kb..(r + 1) * kb]);
                    for (b, x) in w.iter().enumerate() {
                        let packed = load16(&x.qs);
                        let qx = _mm256_and_si256(
                            _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed),
                            low,
                        );
                        let (xd, xm) = f16x2(x.d, x.m);
                        for r in 0..R {
                            let y = &rows[r][b];
                            let p = _mm256_cvtepi32_ps(products(qx, load32(&y.qs)));
                            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd * y.d), p, acc[r]);
                            mins[r] += xm * y.s;
                        }
                    }
                    for r in 0..R {
                        out[r] = hsum(acc[r]) + mins[r];
                    }
                }

                #[target_feature(enable = $features)]
                fn q8_0<const R: usize>(
                    w: &[BlockQ8_0],
                    rows: &[ActBlock],
                    kb: usize,
                    out: &mut [f32],
                ) {
                    let mut acc = [_mm256_setzero_ps(); R];
                    let rows: [&[ActBlock]; R] =
                        std::array::from_fn(|r| &rows[r * kb..(r + 1) * kb]);
                    for (b, x) in w.iter().enumerate() {
                        let qx = load32(&x.qs);
                        let ax = _mm256_sign_epi8(qx, qx);
                        let (xd, _) = f16x2(x.d, 0);
                        for r in 0..R {
                            let y = &rows[r][b];
                            let sy = _mm256_sign_epi8(load32(&y.qs), qx);
                            let p = _mm256_cvtepi32_ps(products(ax, sy));
                            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(xd * y.d), p, acc[r]);
                        }
                    }
                    for r in 0..R {
                        out[r] = hsum(acc[r]);
                    }
                }
            }
        };
    }

    kernels!(avx2, "avx2,fma,f16c", |a, b| _mm256_madd_epi16(
        _mm256_maddubs_epi16(a, b),
        _mm256_set1_epi16(1)
    ));
    kernels!(vnni, "avx2,fma,f16c,avxvnni", |a, b| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), a, b)
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn check(dtype: GgmlDType, m: usize, k: usize, n: usize) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap();
        let ours = match dtype {
            GgmlDType::Q4_1 => QWeights::Q4_1(BlockQ4_1::parse(&bytes).unwrap()),
            GgmlDType::Q4_0 => QWeights::Q4_1(BlockQ4_1::parse_q4_0(&bytes).unwrap()),
            GgmlDType::Q8_0 => QWeights::Q8_0(BlockQ8_0::parse(&bytes).unwrap()),
            _ => unreachable!(),
        };
        let reference = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut acts = vec![ActBlock::default(); m * k / QK];
        for r in 0..m {
            quantize_row(
                &xs[r * k..(r + 1) * k],
                &mut acts[r * k / QK..(r + 1) * k / QK],
            );
        }
        for isa in available_isas() {
            let mut out = vec![0f32; m * n];
            matmul_with(isa, &ours, &acts, (m, k, n), &mut out, &mut Vec::new());
            let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-3 * scale.max(1.0),
                    "{dtype:?} m={m} {isa:?} at {i}: ours {a}, candle {b}"
                );
            }
        }
    }

    #[test]
    fn quantized_matmuls_match_candles() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            for m in [1, 3, 11] {
                check(dtype, m, 256, 70);
            }
            check(dtype, 1, 576, 1536);
        }
    }

    #[test]
    fn f32_helpers_match_plain_loops() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).cos()).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_f32(&a, &b) - plain).abs() < 1e-4);
        let mut y = b.clone();
        axpy_f32(&mut y, 0.5, &a);
        for i in 0..67 {
            assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let dev = Device::Cpu;
        let (k, n) = (128, 40);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let w = QWeights::Q4_1(BlockQ4_1::parse(&q.data().unwrap()).unwrap());
        let xs = Tensor::randn(0f32, 1.0, (9, k), &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut acts = vec![ActBlock::default(); 9 * k / QK];
        for r in 0..9 {
            quantize_row(
                &xs[r * k..(r + 1) * k],
                &mut acts[r * k / QK..(r + 1) * k / QK],
            );
        }
        let mut all = vec![0f32; 9 * n];
        matmul(&w, &acts, (9, k, n), &mut all, &mut Vec::new());
        for r in 0..9 {
            let mut one = vec![0f32; n];
            let row = &acts[r * k / QK..(r + 1) * k / QK];
            matmul(&w, row, (1, k, n), &mut one, &mut Vec::new());
            assert_eq!(one, all[r * n..(r + 1) * n], "row {r}");
        }
    }
}
