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
