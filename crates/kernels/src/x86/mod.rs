//! x86-64 inner loops. The only unsafe operations are unaligned vector
//! loads from fixed-size arrays or from slices whose length is checked
//! first, stores into checked slices, and calls into functions compiled
//! for CPU features that `is_x86_feature_detected!` reported (the
//! callers only pass an [`crate::Isa`] from [`crate::available_isas`]).

use std::arch::x86_64::*;

use crate::GROUP;
use crate::matmul::ROW_TILE;
use crate::packing::{Q4Group, Q8Group};
use crate::quantize::ActBlock;

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

// After the macros: the kernels' modules see them.
pub(crate) mod attention;
pub(crate) mod avx2;
pub(crate) mod avx512;
pub(crate) mod f32x8;
