//! The per-replica GPU memory formula.

use serde::Serialize;

use crate::catalog::{ModelShape, Preset};
use crate::precision::Precision;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Floor of the runtime overhead: a CUDA context, cuBLAS workspaces and the
/// first activation buffers cost about this much even for a tiny model.
pub const MIN_RUNTIME_OVERHEAD_BYTES: u64 = 512 * MIB;
/// Runtime overhead as a share of weights + KV cache, for models whose
/// activations and allocator slack outgrow the floor.
pub const RUNTIME_OVERHEAD_PERCENT: u64 = 10;

/// `bytes` in GiB (2^30), for messages and display.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

/// How a replica will run, for the memory formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServingProfile {
    pub precision: Precision,
    /// Tokens per sequence the KV cache must hold.
    pub context_length: u32,
    /// Concurrent sequences.
    pub batch: u32,
    /// 2.0 for an f16/bf16 KV cache, 1.0 for fp8.
    pub kv_cache_bytes_per_value: f64,
}

impl ServingProfile {
    /// Longest context a default profile reserves KV cache for: enough for
    /// chat, and it keeps 128k-context models from reserving tens of GiB
    /// per sequence nobody asked for.
    pub const DEFAULT_CONTEXT_CAP: u32 = 8192;
    pub const DEFAULT_BATCH: u32 = 8;
    pub const F16_KV_BYTES_PER_VALUE: f64 = 2.0;

    /// The preset's default precision, its context capped at
    /// [`Self::DEFAULT_CONTEXT_CAP`], batch 8, f16 KV cache.
    pub fn default_for(preset: &Preset) -> Self {
        ServingProfile {
            precision: preset.default_precision,
            context_length: preset.shape.context_length.min(Self::DEFAULT_CONTEXT_CAP),
            batch: Self::DEFAULT_BATCH,
            kv_cache_bytes_per_value: Self::F16_KV_BYTES_PER_VALUE,
        }
    }
}

/// Memory one replica needs, in bytes, summed over all its GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
}

/// The one memory formula:
///
/// ```text
/// weights  = parameters × bits_per_weight / 8
/// kv_cache = 2 (K and V) × layers × kv_heads × head_dim × context × batch × kv bytes per value
/// overhead = max(512 MiB, 10 % of (weights + kv_cache))   (CUDA context, activations, allocator slack)
/// total    = weights + kv_cache + overhead
/// ```
///
/// Fractional bytes round up. A negative or NaN `kv_cache_bytes_per_value`
/// counts as 0.
pub fn replica_memory(shape: &ModelShape, profile: &ServingProfile) -> MemoryEstimate {
    let weights_bytes =
        (shape.parameters as f64 * profile.precision.bits_per_weight() / 8.0).ceil() as u64;
    // u128: six u32 factors can overflow u64 in principle.
    let kv_values = 2
        * u128::from(shape.layers)
        * u128::from(shape.kv_heads)
        * u128::from(shape.head_dim)
        * u128::from(profile.context_length)
        * u128::from(profile.batch);
    // `as u64` saturates, and maps NaN and negatives to 0.
    let kv_cache_bytes = (kv_values as f64 * profile.kv_cache_bytes_per_value).ceil() as u64;
    let model_bytes = weights_bytes.saturating_add(kv_cache_bytes);
    let share = (u128::from(model_bytes) * u128::from(RUNTIME_OVERHEAD_PERCENT)).div_ceil(100);
    let overhead_bytes = MIN_RUNTIME_OVERHEAD_BYTES.max(u64::try_from(share).unwrap_or(u64::MAX));
    MemoryEstimate {
        weights_bytes,
        kv_cache_bytes,
        overhead_bytes,
        total_bytes: model_bytes.saturating_add(overhead_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::preset;

    fn profile(precision: Precision, context_length: u32, batch: u32) -> ServingProfile {
        ServingProfile {
            precision,
            context_length,
            batch,
            kv_cache_bytes_per_value: 2.0,
        }
    }

    #[test]
    fn weights_match_published_checkpoint_sizes() {
        // (preset, precision, published size in bytes, tolerance).
        let cases = [
            // bf16 safetensors totals on Hugging Face, decimal GB.
            ("llama-3.1-8b-instruct", Precision::BF16, 16.06e9, 0.03),
            ("qwen2.5-7b-instruct", Precision::BF16, 15.23e9, 0.03),
            ("mistral-7b-instruct-v0.3", Precision::BF16, 14.5e9, 0.03),
            ("llama-3.1-70b-instruct", Precision::BF16, 141e9, 0.03),
            ("llama-3.1-8b-instruct", Precision::F16, 16.06e9, 0.03),
            // The shipped SmolLM2-135M-Instruct.Q4_1.gguf. GGUF keeps some
            // tensors above Q4_1 (norms in F32, the tied embedding at higher
            // precision) and carries the tokenizer in its metadata, so the
            // file is larger than parameters × 5 bits: hence 25 %.
            ("smollm2-135m-instruct", Precision::Q4_1, 98_362_432.0, 0.25),
        ];
        for (name, precision, published, tolerance) in cases {
            let shape = &preset(name).unwrap().shape;
            let weights = replica_memory(shape, &profile(precision, 1, 1)).weights_bytes as f64;
            let error = (weights - published).abs() / published;
            assert!(
                error <= tolerance,
                "{name} {precision}: {weights} vs {published} ({:.1} %)",
                error * 100.0
            );
        }
    }

    #[test]
    fn kv_cache_follows_the_formula() {
        let llama_8b = &preset("llama-3.1-8b-instruct").unwrap().shape;
        let qwen_7b = &preset("qwen2.5-7b-instruct").unwrap().shape;
        let cases = [
            // 2 × 32 layers × 8 kv heads × 128 × 8192 tokens × 2 bytes = 1 GiB.
            (llama_8b, 8192, 1, 2.0, GIB),
            (llama_8b, 8192, 8, 2.0, 8 * GIB),
            (llama_8b, 8192, 1, 1.0, GIB / 2),
            (llama_8b, 0, 8, 2.0, 0),
            // 2 × 28 × 4 × 128 × 32768 × 2 = 1.75 GiB.
            (qwen_7b, 32_768, 1, 2.0, 7 * GIB / 4),
        ];
        for (shape, context_length, batch, bytes_per_value, expected) in cases {
            let profile = ServingProfile {
                kv_cache_bytes_per_value: bytes_per_value,
                ..profile(Precision::BF16, context_length, batch)
            };
            assert_eq!(replica_memory(shape, &profile).kv_cache_bytes, expected);
        }
    }

    #[test]
    fn overhead_has_a_floor_and_a_share() {
        let smollm = &preset("smollm2-135m-instruct").unwrap().shape;
        let small = replica_memory(smollm, &profile(Precision::Q4_1, 2048, 1));
        assert_eq!(small.overhead_bytes, MIN_RUNTIME_OVERHEAD_BYTES);

        let llama_70b = &preset("llama-3.1-70b-instruct").unwrap().shape;
        let large = replica_memory(llama_70b, &profile(Precision::BF16, 8192, 8));
        assert_eq!(large.weights_bytes, 141_107_412_992);
        assert_eq!(large.kv_cache_bytes, 20 * GIB);
        let model_bytes = large.weights_bytes + large.kv_cache_bytes;
        assert!(large.overhead_bytes >= model_bytes / 10);
        assert!(large.overhead_bytes <= model_bytes / 10 + 1);

        for estimate in [small, large] {
            assert_eq!(
                estimate.total_bytes,
                estimate.weights_bytes + estimate.kv_cache_bytes + estimate.overhead_bytes
            );
        }
    }

    #[test]
    fn nonsense_kv_bytes_count_as_zero() {
        let shape = &preset("llama-3.1-8b-instruct").unwrap().shape;
        for bytes_per_value in [f64::NAN, -2.0] {
            let profile = ServingProfile {
                kv_cache_bytes_per_value: bytes_per_value,
                ..profile(Precision::BF16, 8192, 1)
            };
            assert_eq!(replica_memory(shape, &profile).kv_cache_bytes, 0);
        }
    }

    #[test]
    fn default_profile_caps_the_context() {
        let cases = [
            ("llama-3.1-8b-instruct", Precision::BF16, 8192),
            ("phi-3-mini-4k-instruct", Precision::BF16, 4096),
            ("smollm2-135m-instruct", Precision::Q4_1, 8192),
        ];
        for (name, precision, context_length) in cases {
            let profile = ServingProfile::default_for(preset(name).unwrap());
            assert_eq!(
                profile,
                self::profile(precision, context_length, 8),
                "{name}"
            );
        }
    }

    #[test]
    fn gib_divides_by_two_to_the_thirty() {
        assert_eq!(gib(GIB), 1.0);
        assert_eq!(gib(3 * GIB / 2), 1.5);
        assert_eq!(gib(0), 0.0);
    }
}
