//! The quantized matrix products that decide inference speed.
//!
//! GGUF stores a quantized matrix row by row (one output column's blocks
//! after another). At load time the runner repacks it into groups of
//! [`GROUP`] columns, block by block ([`Q4Group`], [`Q8Group`]), so that
//! one vector register holds the same four inputs of sixteen columns: a
//! broadcast of four activation bytes and one fused byte dot product
//! (`vpdpbusd`) advance sixteen columns at once, the sums land one column
//! per lane (no horizontal adds), and a group's weights are unpacked once
//! for every activation row of the batch. Activations are quantized per row
//! to 8 bits in blocks of 32 ([`ActBlock`]).
//!
//! Each block's integer dot product is exact, and each row goes through
//! the same float operations whatever else is in the batch, so a sequence's
//! result does not depend on what it is batched with. Column groups are
//! split across the rayon pool the caller runs in.
//!
//! Inner loops: AVX-512 VNNI, AVX-VNNI or AVX2 when the CPU has them
//! (checked at run time), a portable loop otherwise; all are tested against
//! candle's own quantized matmul.

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const QK: usize = 32;
/// Output columns packed together: sixteen f32 lanes of one AVX-512
/// register (two AVX2 registers).
pub const GROUP: usize = 16;
/// Activation rows that share one unpacking of a weight block (AVX-512
/// has the registers for eight, AVX2 for four).
const ROW_TILE: usize = 8;

fn row_tile(isa: Isa) -> usize {
    if isa == Isa::Avx512Vnni { ROW_TILE } else { 4 }
}

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
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512Vnni {
        return simd::avx512::quantize_row(x, out);
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

fn quantize_row_portable(x: &[f32], out: &mut [ActBlock]) {
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

/// Quantized weights as GGUF stores them: one row of blocks per output
/// column, columns one after another.
pub enum QBlocks {
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// Sixteen columns' Q4_1 blocks for the same 32 inputs. `qs[64 j + 4 c + i]`
/// is byte `4 j + i` of column `c`'s GGUF block: input `4 j + i` in its low
/// nibble, input `16 + 4 j + i` in its high one.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub struct Q4Group {
    d: [u16; GROUP],
    m: [u16; GROUP],
    qs: [u8; 256],
}

/// Sixteen columns' Q8_0 blocks for the same 32 inputs. `qs[64 j + 4 c + i]`
/// is input `4 j + i` of column `c` plus 128, as the unsigned bytes the
/// fused dot product takes (the sums subtract `128 Σq` again).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct Q8Group {
    d: [u16; GROUP],
    qs: [u8; 512],
}

#[derive(Clone)]
enum Groups {
    Q4_1(Vec<Q4Group>),
    Q8_0(Vec<Q8Group>),
}

/// An `n × k` quantized matrix repacked for [`matmul`]: group `g`'s block
/// `b` at `g * k / QK + b`. Columns past `n` in the last group are zero.
pub struct PackedWeights {
    n: usize,
    kb: usize,
    groups: Groups,
}

impl PackedWeights {
    /// Repacks `n` columns of `k` inputs (a multiple of [`QK`]); `None` when
    /// the block count does not match.
    pub fn pack(blocks: &QBlocks, n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || !k.is_multiple_of(QK) {
            return None;
        }
        let kb = k / QK;
        let count = n.div_ceil(GROUP) * kb;
        let groups = match blocks {
            QBlocks::Q4_1(rows) => {
                if rows.len() != n * kb {
                    return None;
                }
                let mut out = vec![
                    Q4Group {
                        d: [0; GROUP],
                        m: [0; GROUP],
                        qs: [0; 256],
                    };
                    count
                ];
                for (col, row) in rows.chunks_exact(kb).enumerate() {
                    let (g, c) = (col / GROUP, col % GROUP);
                    for (b, block) in row.iter().enumerate() {
                        let dst = &mut out[g * kb + b];
                        dst.d[c] = block.d;
                        dst.m[c] = block.m;
                        for j in 0..4 {
                            dst.qs[64 * j + 4 * c..64 * j + 4 * c + 4]
                                .copy_from_slice(&block.qs[4 * j..4 * j + 4]);
                        }
                    }
                }
                Groups::Q4_1(out)
            }
            QBlocks::Q8_0(rows) => {
                if rows.len() != n * kb {
                    return None;
                }
                // Zero columns are stored as 128 (zero plus the offset).
                let mut out = vec![
                    Q8Group {
                        d: [0; GROUP],
                        qs: [0x80; 512],
                    };
                    count
                ];
                for (col, row) in rows.chunks_exact(kb).enumerate() {
                    let (g, c) = (col / GROUP, col % GROUP);
                    for (b, block) in row.iter().enumerate() {
                        let dst = &mut out[g * kb + b];
                        dst.d[c] = block.d;
                        for j in 0..8 {
                            for i in 0..4 {
                                dst.qs[64 * j + 4 * c + i] = (block.qs[4 * j + i] as u8) ^ 0x80;
                            }
                        }
                    }
                }
                Groups::Q8_0(out)
            }
        };
        Some(Self { n, kb, groups })
    }

    /// The GGUF layout back (to stack matrices that read the same input).
    pub fn unpack(&self) -> QBlocks {
        let kb = self.kb;
        match &self.groups {
            Groups::Q4_1(groups) => QBlocks::Q4_1(
                (0..self.n * kb)
                    .map(|i| {
                        let (col, b) = (i / kb, i % kb);
                        let (g, c) = (col / GROUP, col % GROUP);
                        let src = &groups[g * kb + b];
                        let mut qs = [0u8; 16];
                        for j in 0..4 {
                            qs[4 * j..4 * j + 4]
                                .copy_from_slice(&src.qs[64 * j + 4 * c..64 * j + 4 * c + 4]);
                        }
                        BlockQ4_1 {
                            d: src.d[c],
                            m: src.m[c],
                            qs,
                        }
                    })
                    .collect(),
            ),
            Groups::Q8_0(groups) => QBlocks::Q8_0(
                (0..self.n * kb)
                    .map(|i| {
                        let (col, b) = (i / kb, i % kb);
                        let (g, c) = (col / GROUP, col % GROUP);
                        let src = &groups[g * kb + b];
                        let qs = std::array::from_fn(|e| {
                            let (j, i) = (e / 4, e % 4);
                            (src.qs[64 * j + 4 * c + i] ^ 0x80) as i8
                        });
                        BlockQ8_0 { d: src.d[c], qs }
                    })
                    .collect(),
            ),
        }
    }

    /// One matrix with the columns of all `parts` (same `k`, same format).
    pub fn stack(parts: &[&PackedWeights]) -> Option<PackedWeights> {
        let (first, rest) = parts.split_first()?;
        if rest.iter().any(|p| p.kb != first.kb) {
            return None;
        }
        let n = parts.iter().map(|p| p.n).sum();
        // Parts of whole groups line up as they are (the last may end in a
        // partly filled one); a partly filled group inside would shift the
        // columns after it, so then the columns are packed again.
        if parts[..parts.len() - 1]
            .iter()
            .all(|p| p.n.is_multiple_of(GROUP))
        {
            let mut groups = first.groups.clone();
            for p in rest {
                match (&mut groups, &p.groups) {
                    (Groups::Q4_1(all), Groups::Q4_1(more)) => all.extend_from_slice(more),
                    (Groups::Q8_0(all), Groups::Q8_0(more)) => all.extend_from_slice(more),
                    _ => return None,
                }
            }
            return Some(Self {
                n,
                kb: first.kb,
                groups,
            });
        }
        let mut blocks = first.unpack();
        for p in rest {
            match (&mut blocks, p.unpack()) {
                (QBlocks::Q4_1(all), QBlocks::Q4_1(more)) => all.extend(more),
                (QBlocks::Q8_0(all), QBlocks::Q8_0(more)) => all.extend(more),
                _ => return None,
            }
        }
        Self::pack(&blocks, n, first.kb * QK)
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.kb * QK
    }
}

/// `out[r * n + c] = Σ_k x[r, k] * w[c, k]` for the `m` rows quantized
/// into `acts` (`m * k / QK` blocks). `scratch` is a staging area reused
/// between calls.
pub fn matmul(
    w: &PackedWeights,
    acts: &[ActBlock],
    m: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    matmul_with(best_isa(), w, acts, m, out, scratch)
}

/// [`matmul`] with the given inner loops (ones this CPU lacks fall back to
/// the portable loop).
pub fn matmul_with(
    isa: Isa,
    w: &PackedWeights,
    acts: &[ActBlock],
    m: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let isa = if supported_isas().contains(&isa) {
        isa
    } else {
        Isa::Portable
    };
    let (n, kb) = (w.n, w.kb);
    let groups = n.div_ceil(GROUP);
    assert!(acts.len() >= m * kb && out.len() >= m * n, "matmul sizes");
    // Staged `[group][row][lane]`, so that each work item owns one
    // contiguous slice; for one row of whole groups that is the output.
    let direct = m == 1 && n.is_multiple_of(GROUP);
    let staging: &mut [f32] = if direct {
        &mut out[..n]
    } else {
        if scratch.len() < groups * m * GROUP {
            scratch.resize(groups * m * GROUP, 0.0);
        }
        &mut scratch[..groups * m * GROUP]
    };
    // Enough groups per item that a thread's share is worth handing over.
    let per_item = (8 / m).clamp(1, 4);
    let tile = row_tile(isa);
    let work = |(item, dst): (usize, &mut [f32])| {
        for (i, group_out) in dst.chunks_mut(m * GROUP).enumerate() {
            let g = item * per_item + i;
            for (t, tile_out) in group_out.chunks_mut(tile * GROUP).enumerate() {
                let r0 = t * tile;
                let rows = tile_out.len() / GROUP;
                group_tile(isa, w, g, &acts[r0 * kb..(r0 + rows) * kb], tile_out);
            }
        }
    };
    if groups * m * kb < 256 {
        staging
            .chunks_mut(per_item * m * GROUP)
            .enumerate()
            .for_each(work);
    } else {
        // Rayon's waiting threads steal work, then sleep: they do not spin
        // against other processes for the cores.
        staging
            .par_chunks_mut(per_item * m * GROUP)
            .enumerate()
            .for_each(work);
    }
    if !direct {
        for g in 0..groups {
            let cols = GROUP.min(n - g * GROUP);
            for r in 0..m {
                let src = &scratch[(g * m + r) * GROUP..(g * m + r) * GROUP + cols];
                out[r * n + g * GROUP..r * n + g * GROUP + cols].copy_from_slice(src);
            }
        }
    }
}

/// Group `g` against up to [`row_tile`] activation rows (`out`: `rows × 16`).
fn group_tile(isa: Isa, w: &PackedWeights, g: usize, rows: &[ActBlock], out: &mut [f32]) {
    let kb = w.kb;
    match &w.groups {
        Groups::Q4_1(groups) => {
            let wg = &groups[g * kb..(g + 1) * kb];
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Avx512Vnni => return simd::avx512::q4_1(wg, rows, out),
                Isa::AvxVnni => return simd::vnni::q4_1(wg, rows, out),
                Isa::Avx2 => return simd::avx2::q4_1(wg, rows, out),
                Isa::Portable => {}
            }
            portable_q4_1(wg, rows, out)
        }
        Groups::Q8_0(groups) => {
            let wg = &groups[g * kb..(g + 1) * kb];
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Avx512Vnni => return simd::avx512::q8_0(wg, rows, out),
                Isa::AvxVnni => return simd::vnni::q8_0(wg, rows, out),
                Isa::Avx2 => return simd::avx2::q8_0(wg, rows, out),
                Isa::Portable => {}
            }
            portable_q8_0(wg, rows, out)
        }
    }
}

fn portable_q4_1(w: &[Q4Group], rows: &[ActBlock], out: &mut [f32]) {
    let kb = w.len();
    for (row, o) in rows.chunks_exact(kb).zip(out.chunks_exact_mut(GROUP)) {
        for (c, o) in o.iter_mut().enumerate() {
            let (mut acc_d, mut acc_m) = (0f32, 0f32);
            for (x, y) in w.iter().zip(row) {
                let mut dot = 0i32;
                for j in 0..4 {
                    for i in 0..4 {
                        let q = x.qs[64 * j + 4 * c + i];
                        dot += (q & 0x0f) as i32 * y.qs[4 * j + i] as i32
                            + (q >> 4) as i32 * y.qs[16 + 4 * j + i] as i32;
                    }
                }
                acc_d += dot as f32 * y.d * f16_to_f32(x.d[c]);
                acc_m += y.s * f16_to_f32(x.m[c]);
            }
            *o = acc_d + acc_m;
        }
    }
}

fn portable_q8_0(w: &[Q8Group], rows: &[ActBlock], out: &mut [f32]) {
    let kb = w.len();
    for (row, o) in rows.chunks_exact(kb).zip(out.chunks_exact_mut(GROUP)) {
        for (c, o) in o.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (x, y) in w.iter().zip(row) {
                let mut dot = 0i32;
                for j in 0..8 {
                    for i in 0..4 {
                        let q = (x.qs[64 * j + 4 * c + i] ^ 0x80) as i8;
                        dot += q as i32 * y.qs[4 * j + i] as i32;
                    }
                }
                acc += dot as f32 * y.d * f16_to_f32(x.d[c]);
            }
            *o = acc;
        }
    }
}

/// Which inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

/// The best inner loops for this CPU (`FLOTILLA_RUNNER_ISA=portable|avx2|
/// avxvnni` caps it, for comparisons).
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        let cap = std::env::var("FLOTILLA_RUNNER_ISA").unwrap_or_default();
        let supported = supported_isas();
        let best = supported.last().copied().unwrap_or(Isa::Portable);
        let capped = match cap.as_str() {
            "portable" => Isa::Portable,
            "avx2" => Isa::Avx2,
            "avxvnni" => Isa::AvxVnni,
            _ => best,
        };
        if supported.contains(&capped) {
            capped
        } else {
            best
        }
    })
}

/// Every set of inner loops this CPU can run, best last.
fn supported_isas() -> &'static [Isa] {
    static ALL: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
    ALL.get_or_init(detect_isas)
}

fn detect_isas() -> Vec<Isa> {
    let mut isas = vec![Isa::Portable];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            isas.push(Isa::Avx2);
            if has!("avxvnni") {
                isas.push(Isa::AvxVnni);
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                isas.push(Isa::Avx512Vnni);
            }
        }
    }
    isas
}

/// The inner loops this CPU can run, up to the chosen best (for tests).
pub fn available_isas() -> Vec<Isa> {
    let all = supported_isas();
    let best = best_isa();
    let end = all.iter().position(|i| *i == best).map_or(1, |p| p + 1);
    all[..end].to_vec()
}

/// `Σ a[i] b[i]` (attention scores).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if best_isa() != Isa::Portable {
        return simd::f32x8::dot(a, b);
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha x` (attention's weighted sum of values).
pub fn axpy_f32(y: &mut [f32], alpha: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if best_isa() != Isa::Portable {
        return simd::f32x8::axpy(y, alpha, x);
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
        return simd::attention::attend(
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

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod simd {
    //! x86-64 inner loops. The only unsafe operations are unaligned vector
    //! loads from fixed-size arrays or from slices whose length is checked
    //! first, stores into checked slices, and calls into functions compiled
    //! for CPU features that `is_x86_feature_detected!` reported (the
    //! callers only pass an [`super::Isa`] from [`super::available_isas`]).

    use std::arch::x86_64::*;

    use super::{ActBlock, GROUP, Q4Group, Q8Group, ROW_TILE};

    /// The four activation bytes `4 j..4 j + 4` of a block, as one lane.
    #[inline(always)]
    fn word(y: &ActBlock, j: usize) -> i32 {
        let q = &y.qs;
        i32::from_le_bytes([
            q[4 * j] as u8,
            q[4 * j + 1] as u8,
            q[4 * j + 2] as u8,
            q[4 * j + 3] as u8,
        ])
    }

    /// Splits `rows` (`R` rows of `kb` blocks) into per-row slices.
    #[inline(always)]
    fn split<const R: usize>(rows: &[ActBlock], kb: usize) -> [&[ActBlock]; R] {
        std::array::from_fn(|r| &rows[r * kb..(r + 1) * kb])
    }

    macro_rules! dispatch_rows {
        ($kernel:ident, $w:expr, $rows:expr, $out:expr) => {{
            let (w, rows, out) = ($w, $rows, $out);
            let kb = w.len();
            assert!(kb > 0 && rows.len() == kb * (out.len() / GROUP) && out.len() % GROUP == 0);
            // SAFETY: the caller chose this module from `available_isas`,
            // so the CPU has the features the kernel is compiled for.
            unsafe {
                match out.len() / GROUP {
                    1 => $kernel::<1>(w, split::<1>(rows, kb), out),
                    2 => $kernel::<2>(w, split::<2>(rows, kb), out),
                    3 => $kernel::<3>(w, split::<3>(rows, kb), out),
                    4 => $kernel::<4>(w, split::<4>(rows, kb), out),
                    5 => $kernel::<5>(w, split::<5>(rows, kb), out),
                    6 => $kernel::<6>(w, split::<6>(rows, kb), out),
                    7 => $kernel::<7>(w, split::<7>(rows, kb), out),
                    ROW_TILE => $kernel::<ROW_TILE>(w, split::<ROW_TILE>(rows, kb), out),
                    _ => unreachable!("row tiles hold at most ROW_TILE rows"),
                }
            }
        }};
    }

    pub(super) mod avx512 {
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

        pub(in super::super) fn q4_1(w: &[Q4Group], rows: &[ActBlock], out: &mut [f32]) {
            dispatch_rows!(q4_1_rows, w, rows, out)
        }

        pub(in super::super) fn q8_0(w: &[Q8Group], rows: &[ActBlock], out: &mut [f32]) {
            dispatch_rows!(q8_0_rows, w, rows, out)
        }

        pub(in super::super) fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
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
            for (chunk, block) in x.chunks_exact(super::super::QK).zip(out.iter_mut()) {
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
                    let sum =
                        _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(y.sum << 7));
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(y.d));
                    acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
                }
            }
            for r in 0..R {
                store(&mut out[r * GROUP..], acc[r]);
            }
        }
    }

    #[inline(always)]
    fn load256(bytes: &[u8]) -> __m256i {
        assert!(bytes.len() >= 32);
        // SAFETY: at least 32 bytes (checked above).
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    #[inline(always)]
    fn halves8(h: &[u16]) -> __m128i {
        assert!(h.len() >= 8);
        // SAFETY: at least 8 halves (checked above).
        unsafe { _mm_loadu_si128(h.as_ptr().cast()) }
    }

    #[inline(always)]
    fn store8(out: &mut [f32], v: __m256) {
        assert!(out.len() >= 8);
        // SAFETY: at least 8 floats (checked above).
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
    }

    /// Eight columns per register, each group in two halves; `$dot` adds
    /// unsigned-by-signed byte products, four per lane, into its first
    /// argument. Q8_0 uses the sign trick (`|w|` times `y` with `w`'s sign),
    /// which never saturates `vpmaddubsw` for values within ±127.
    macro_rules! avx2_kernels {
        ($name:ident, $features:literal, |$s:ident, $a:ident, $b:ident| $dot:expr) => {
            pub(super) mod $name {
                use super::*;

                pub(in super::super) fn q4_1(w: &[Q4Group], rows: &[ActBlock], out: &mut [f32]) {
                    dispatch_rows!(q4_1_rows, w, rows, out)
                }

                pub(in super::super) fn q8_0(w: &[Q8Group], rows: &[ActBlock], out: &mut [f32]) {
                    dispatch_rows!(q8_0_rows, w, rows, out)
                }

                #[target_feature(enable = $features)]
                fn dot($s: __m256i, $a: __m256i, $b: __m256i) -> __m256i {
                    $dot
                }

                #[target_feature(enable = $features)]
                fn q4_1_rows<const R: usize>(
                    w: &[Q4Group],
                    rows: [&[ActBlock]; R],
                    out: &mut [f32],
                ) {
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
                            let hi =
                                packed.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
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
                fn q8_0_rows<const R: usize>(
                    w: &[Q8Group],
                    rows: [&[ActBlock]; R],
                    out: &mut [f32],
                ) {
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
                                let sy = |j: usize| {
                                    _mm256_sign_epi8(_mm256_set1_epi32(word(y, j)), q[j])
                                };
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

    avx2_kernels!(avx2, "avx2,fma,f16c", |s, a, b| _mm256_add_epi32(
        s,
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    ));
    avx2_kernels!(vnni, "avx2,fma,f16c,avxvnni", |s, a, b| {
        _mm256_dpbusd_avx_epi32(s, a, b)
    });

    pub(super) mod attention {
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
        pub(in super::super) fn attend(
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
    }

    pub(super) mod f32x8 {
        //! Attention's float loops (AVX2 with FMA).
        use super::*;

        #[inline(always)]
        fn load8(v: &[f32]) -> __m256 {
            assert!(v.len() >= 8);
            // SAFETY: the slice holds at least 8 floats (checked above).
            unsafe { _mm256_loadu_ps(v.as_ptr()) }
        }

        pub(in super::super) fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: callers checked the features at run time.
            unsafe { dot_impl(a, b) }
        }

        pub(in super::super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
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
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn blocks(q: &QTensor) -> QBlocks {
        let bytes = q.data().unwrap();
        match q.dtype() {
            GgmlDType::Q4_1 => QBlocks::Q4_1(BlockQ4_1::parse(&bytes).unwrap()),
            GgmlDType::Q4_0 => QBlocks::Q4_1(BlockQ4_1::parse_q4_0(&bytes).unwrap()),
            GgmlDType::Q8_0 => QBlocks::Q8_0(BlockQ8_0::parse(&bytes).unwrap()),
            _ => unreachable!(),
        }
    }

    fn quantize(xs: &[f32], m: usize, k: usize) -> Vec<ActBlock> {
        let mut acts = vec![ActBlock::default(); m * k / QK];
        for r in 0..m {
            quantize_row(
                &xs[r * k..(r + 1) * k],
                &mut acts[r * k / QK..(r + 1) * k / QK],
            );
        }
        acts
    }

    fn check(dtype: GgmlDType, m: usize, k: usize, n: usize) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = PackedWeights::pack(&blocks(&q), n, k).unwrap();
        let reference = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let acts = quantize(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m, k);
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        for isa in available_isas() {
            let mut out = vec![f32::NAN; m * n];
            matmul_with(isa, &ours, &acts, m, &mut out, &mut Vec::new());
            for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-3 * scale.max(1.0),
                    "{dtype:?} m={m} n={n} {isa:?} at {i}: ours {a}, candle {b}"
                );
            }
        }
    }

    #[test]
    fn quantized_matmuls_match_candles() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            for m in [1, 3, 4, 11] {
                // 70 columns: a last group of 6.
                check(dtype, m, 256, 70);
            }
            check(dtype, 1, 576, 1536);
            check(dtype, 9, 576, 192);
        }
    }

    #[test]
    fn packing_round_trips_and_stacks() {
        let dev = Device::Cpu;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let a = QTensor::quantize(&Tensor::randn(0f32, 1.0, (20, 64), &dev).unwrap(), dtype)
                .unwrap();
            let b = QTensor::quantize(&Tensor::randn(0f32, 1.0, (7, 64), &dev).unwrap(), dtype)
                .unwrap();
            let (pa, pb) = (
                PackedWeights::pack(&blocks(&a), 20, 64).unwrap(),
                PackedWeights::pack(&blocks(&b), 7, 64).unwrap(),
            );
            let stacked = PackedWeights::stack(&[&pa, &pb]).unwrap();
            assert_eq!((stacked.n(), stacked.k()), (27, 64));
            let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
            let acts = quantize(&x, 1, 64);
            let run = |w: &PackedWeights| {
                let mut out = vec![0f32; w.n()];
                matmul(w, &acts, 1, &mut out, &mut Vec::new());
                out
            };
            let mut separate = run(&pa);
            separate.extend(run(&pb));
            assert_eq!(run(&stacked), separate, "{dtype:?}");
            // Whole groups first: stacked without repacking.
            let c = QTensor::quantize(&Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap(), dtype)
                .unwrap();
            let pc = PackedWeights::pack(&blocks(&c), 32, 64).unwrap();
            let whole = PackedWeights::stack(&[&pc, &pb]).unwrap();
            assert_eq!((whole.n(), whole.k()), (39, 64));
            let mut separate = run(&pc);
            separate.extend(run(&pb));
            assert_eq!(run(&whole), separate, "{dtype:?}");
        }
        assert!(
            PackedWeights::pack(&QBlocks::Q4_1(vec![BlockQ4_1::default(); 3]), 2, 64).is_none()
        );
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
    fn quantizing_is_the_same_on_every_path() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i as f32 * 0.77).sin() * 3.0).powi(3) + if i % 37 == 0 { 0.5 } else { 0.0 })
            .chain(std::iter::repeat_n(0.0, 32))
            .collect();
        let mut portable = vec![ActBlock::default(); x.len() / QK];
        quantize_row_portable(&x, &mut portable);
        let mut best = vec![ActBlock::default(); x.len() / QK];
        quantize_row(&x, &mut best);
        for (a, b) in portable.iter().zip(&best) {
            assert_eq!(
                (a.qs, a.d.to_bits(), a.s.to_bits(), a.sum),
                (b.qs, b.d.to_bits(), b.s.to_bits(), b.sum)
            );
        }
        assert_eq!(portable.last().map(|b| b.sum), Some(0), "an all-zero block");
    }

    #[test]
    fn attention_matches_a_plain_softmax() {
        let (hd, stride, positions) = (64, 192, 37);
        let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.21).sin()).collect();
        let keys: Vec<f32> = (0..positions * stride)
            .map(|i| (i as f32 * 0.013).cos())
            .collect();
        let values: Vec<f32> = (0..positions * stride)
            .map(|i| (i as f32 * 0.007).sin())
            .collect();
        let offset = 64;
        let scale = 0.125;
        let mut expected = vec![0f32; hd];
        let s: Vec<f32> = (3..positions)
            .map(|p| {
                let k = &keys[p * stride + offset..p * stride + offset + hd];
                q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = s.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
        let total: f32 = s.iter().map(|x| (x - max).exp()).sum();
        for (j, p) in (3..positions).enumerate() {
            let w = (s[j] - max).exp() / total;
            for i in 0..hd {
                expected[i] += w * values[p * stride + offset + i];
            }
        }
        let mut out = vec![0f32; hd];
        attend(
            &q,
            &keys,
            &values,
            stride,
            offset,
            3..positions,
            scale,
            &mut Vec::new(),
            &mut out,
        );
        for i in 0..hd {
            assert!(
                (out[i] - expected[i]).abs() < 1e-5,
                "{i}: {} vs {}",
                out[i],
                expected[i]
            );
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let dev = Device::Cpu;
        let (k, n) = (128, 40);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let w = PackedWeights::pack(&blocks(&q), n, k).unwrap();
            let xs = Tensor::randn(0f32, 1.0, (9, k), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let acts = quantize(&xs, 9, k);
            for isa in available_isas() {
                let mut all = vec![0f32; 9 * n];
                matmul_with(isa, &w, &acts, 9, &mut all, &mut Vec::new());
                for r in 0..9 {
                    let mut one = vec![0f32; n];
                    let row = &acts[r * k / QK..(r + 1) * k / QK];
                    matmul_with(isa, &w, row, 1, &mut one, &mut Vec::new());
                    assert_eq!(one, all[r * n..(r + 1) * n], "{dtype:?} {isa:?} row {r}");
                }
            }
        }
    }
}
