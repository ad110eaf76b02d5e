#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::quantize::quantize_row_portable;
use crate::*;
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
        let a =
            QTensor::quantize(&Tensor::randn(0f32, 1.0, (20, 64), &dev).unwrap(), dtype).unwrap();
        let b =
            QTensor::quantize(&Tensor::randn(0f32, 1.0, (7, 64), &dev).unwrap(), dtype).unwrap();
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
        let c =
            QTensor::quantize(&Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap(), dtype).unwrap();
        let pc = PackedWeights::pack(&blocks(&c), 32, 64).unwrap();
        let whole = PackedWeights::stack(&[&pc, &pb]).unwrap();
        assert_eq!((whole.n(), whole.k()), (39, 64));
        let mut separate = run(&pc);
        separate.extend(run(&pb));
        assert_eq!(run(&whole), separate, "{dtype:?}");
    }
    assert!(PackedWeights::pack(&QBlocks::Q4_1(vec![BlockQ4_1::default(); 3]), 2, 64).is_none());
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

/// A small deterministic generator (xorshift), so failures reproduce.
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Softmax attention in f64, position by position.
fn plain_attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    offset: usize,
    positions: std::ops::Range<usize>,
) -> Vec<f32> {
    let hd = q.len();
    let scores: Vec<f64> = positions
        .clone()
        .map(|p| {
            let k = &keys[p * stride + offset..][..hd];
            q.iter().zip(k).map(|(a, b)| f64::from(a * b)).sum::<f64>() * 0.125
        })
        .collect();
    let max = scores.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
    let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    let mut out = vec![0f64; hd];
    for (p, s) in positions.zip(&scores) {
        let w = (s - max).exp() / total;
        for (o, v) in out.iter_mut().zip(&values[p * stride + offset..][..hd]) {
            *o += w * f64::from(*v);
        }
    }
    out.into_iter().map(|x| x as f32).collect()
}

#[test]
fn paged_attention_equals_contiguous_attention() {
    use crate::attention::{Paged, attend_paged_with};
    // Head dimensions on the AVX-512 path (64, 128) and off it (40).
    for (hd, kv_heads) in [(64, 3), (128, 2), (40, 2)] {
        let stride = hd * kv_heads;
        let len = 75;
        let keys = noise(hd as u64, len * stride);
        let values = noise(hd as u64 + 1, len * stride);
        let q = noise(hd as u64 + 2, hd);
        for block_tokens in [1, 4, 16, 32, 75, 128] {
            // The same rows, cut into blocks that each live elsewhere.
            let cut = |all: &[f32]| -> Vec<Vec<f32>> {
                all.chunks(block_tokens * stride)
                    .map(|c| {
                        let mut block = c.to_vec();
                        // A last block is as long as a whole one.
                        block.resize(block_tokens * stride, f32::NAN);
                        block
                    })
                    .collect()
            };
            let (kb, vb) = (cut(&keys), cut(&values));
            let kb: Vec<&[f32]> = kb.iter().map(Vec::as_slice).collect();
            let vb: Vec<&[f32]> = vb.iter().map(Vec::as_slice).collect();
            for positions in [0..len, 0..1, 5..6, 3..40, 16..32, 17..75, 31..33, 10..10] {
                for kvh in 0..kv_heads {
                    let offset = kvh * hd;
                    let mut contiguous = vec![f32::NAN; hd];
                    attend(
                        &q,
                        &keys,
                        &values,
                        stride,
                        offset,
                        positions.clone(),
                        0.125,
                        &mut Vec::new(),
                        &mut contiguous,
                    );
                    let plain =
                        plain_attention(&q, &keys, &values, stride, offset, positions.clone());
                    for isa in available_isas() {
                        let mut paged = vec![f32::NAN; hd];
                        let args = Paged {
                            q: &q,
                            key_blocks: &kb,
                            value_blocks: &vb,
                            block_tokens,
                            stride,
                            offset,
                            positions: positions.clone(),
                            scale: 0.125,
                        };
                        attend_paged_with(isa, args, &mut Vec::new(), &mut paged);
                        let what = format!(
                            "hd {hd} blocks of {block_tokens} {positions:?} head {kvh} {isa:?}"
                        );
                        if isa == best_isa() {
                            // Same loops, same order: the very same floats.
                            assert_eq!(
                                paged.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                contiguous.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                                "{what}"
                            );
                        }
                        for i in 0..hd {
                            assert!(
                                (paged[i] - plain[i]).abs() < 1e-5,
                                "{what} at {i}: {} vs {}",
                                paged[i],
                                plain[i]
                            );
                        }
                    }
                }
            }
        }
    }
}
