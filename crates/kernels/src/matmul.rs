//! The tiled product of packed weights and quantized activations: column
//! groups across the rayon pool, activation rows in tiles that share one
//! unpacking of a weight block, and the inner loops chosen by [`Isa`].

use rayon::prelude::*;

use crate::GROUP;
use crate::blocks::f16_to_f32;
use crate::isa::{Isa, best_isa, supported_isas};
use crate::packing::{Groups, PackedWeights, Q4Group, Q8Group};
use crate::quantize::ActBlock;
#[cfg(target_arch = "x86_64")]
use crate::x86;

/// Activation rows that share one unpacking of a weight block (AVX-512
/// has the registers for eight, AVX2 for four).
pub(crate) const ROW_TILE: usize = 8;

fn row_tile(isa: Isa) -> usize {
    if isa == Isa::Avx512Vnni { ROW_TILE } else { 4 }
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
                Isa::Avx512Vnni => return x86::avx512::q4_1(wg, rows, out),
                Isa::AvxVnni => return x86::avx2::vnni::q4_1(wg, rows, out),
                Isa::Avx2 => return x86::avx2::madd::q4_1(wg, rows, out),
                Isa::Portable => {}
            }
            portable_q4_1(wg, rows, out)
        }
        Groups::Q8_0(groups) => {
            let wg = &groups[g * kb..(g + 1) * kb];
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Avx512Vnni => return x86::avx512::q8_0(wg, rows, out),
                Isa::AvxVnni => return x86::avx2::vnni::q8_0(wg, rows, out),
                Isa::Avx2 => return x86::avx2::madd::q8_0(wg, rows, out),
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
