//! The linear layers: the project's kernels for Q4_0/Q4_1/Q8_0 GGUF
//! weights ([`flotilla_kernels`]), candle's `QMatMul` for every other
//! format, and the fusing of layers that read the same input.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use flotilla_kernels::{
    self as kernels, ActBlock, BlockQ4_1, BlockQ8_0, PackedWeights, QBlocks, QK,
};

use super::ModelError;

enum Weight {
    Own(PackedWeights),
    Candle(QMatMul),
}

/// `y = x Wᵀ (+ b)`, W being `n_out × n_in`.
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    pub(super) n_in: usize,
    pub(super) n_out: usize,
}

impl Linear {
    /// From a GGUF tensor: the project's kernels where it has them.
    pub fn from_qtensor(q: QTensor, bias: Option<Vec<f32>>) -> Result<Self, ModelError> {
        let (n_out, n_in) = q.shape().dims2()?;
        let own = if n_in.is_multiple_of(QK) && q.device().is_cpu() {
            match q.dtype() {
                GgmlDType::Q4_1 => BlockQ4_1::parse(&q.data()?).map(QBlocks::Q4_1),
                GgmlDType::Q4_0 => BlockQ4_1::parse_q4_0(&q.data()?).map(QBlocks::Q4_1),
                GgmlDType::Q8_0 => BlockQ8_0::parse(&q.data()?).map(QBlocks::Q8_0),
                _ => None,
            }
            .and_then(|blocks| PackedWeights::pack(&blocks, n_out, n_in))
        } else {
            None
        };
        let weight = match own {
            Some(w) => Weight::Own(w),
            None => Weight::Candle(QMatMul::from_qtensor(q)?),
        };
        Self::checked(weight, bias, n_in, n_out)
    }

    /// From a dense `n_out × n_in` tensor (safetensors).
    pub fn from_tensor(w: Tensor, bias: Option<Vec<f32>>) -> Result<Self, ModelError> {
        let (n_out, n_in) = w.dims2()?;
        let w = w.to_dtype(DType::F32)?;
        Self::checked(Weight::Candle(QMatMul::Tensor(w)), bias, n_in, n_out)
    }

    fn checked(
        weight: Weight,
        bias: Option<Vec<f32>>,
        n_in: usize,
        n_out: usize,
    ) -> Result<Self, ModelError> {
        if bias.as_ref().is_some_and(|b| b.len() != n_out) {
            return Err(ModelError::Shape(format!(
                "a bias of the wrong length for {n_out} outputs"
            )));
        }
        Ok(Self {
            weight,
            bias,
            n_in,
            n_out,
        })
    }

    /// Stacks the outputs of several layers reading the same input (q/k/v,
    /// gate/up) into one product, when all use the project's kernels.
    pub(super) fn fuse(parts: Vec<Linear>) -> Vec<Linear> {
        let owned: Vec<&PackedWeights> = parts
            .iter()
            .filter_map(|p| match &p.weight {
                Weight::Own(w) => Some(w),
                Weight::Candle(_) => None,
            })
            .collect();
        if owned.len() != parts.len() || parts.iter().any(|p| p.n_in != parts[0].n_in) {
            return parts;
        }
        let Some(weight) = PackedWeights::stack(&owned) else {
            return parts;
        };
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            Some(
                parts
                    .iter()
                    .flat_map(|p| p.bias.clone().unwrap_or_else(|| vec![0.0; p.n_out]))
                    .collect(),
            )
        } else {
            None
        };
        vec![Linear {
            weight: Weight::Own(weight),
            bias,
            n_in: parts[0].n_in,
            n_out: parts.iter().map(|p| p.n_out).sum(),
        }]
    }

    pub(super) fn forward(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        scratch: &mut MatmulScratch,
    ) -> Result<(), ModelError> {
        let (k, n) = (self.n_in, self.n_out);
        match &self.weight {
            Weight::Own(w) => {
                let kb = k / QK;
                if scratch.acts.len() < m * kb {
                    scratch.acts.resize(m * kb, ActBlock::default());
                }
                kernels::quantize_rows(x, m, k, &mut scratch.acts);
                kernels::matmul(
                    w,
                    &scratch.acts[..m * kb],
                    m,
                    &mut out[..m * n],
                    &mut scratch.staging,
                );
            }
            Weight::Candle(w) => {
                let device = match w {
                    QMatMul::QTensor(q) => q.device(),
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.device().clone(),
                };
                let xs =
                    Tensor::from_slice(&x[..m * k], (m, k), &Device::Cpu)?.to_device(&device)?;
                let ys = w
                    .forward(&xs)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                out[..m * n].copy_from_slice(&ys);
            }
        }
        if let Some(b) = &self.bias {
            for row in out[..m * n].chunks_exact_mut(n) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct MatmulScratch {
    acts: Vec<ActBlock>,
    staging: Vec<f32>,
}
