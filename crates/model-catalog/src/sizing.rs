//! GPUs per replica, the tensor-parallel degree and, for a replica larger
//! than one node, its pipeline stages, on a kind of GPU.

use std::fmt::Write as _;

use serde::Serialize;

use crate::catalog::{ModelShape, Preset};
use crate::memory::{GIB, MemoryEstimate, ServingProfile, gib, replica_memory};

/// Share of a GPU's memory a replica may plan to use. The rest is slack for
/// what the formula does not see: the driver's own reservation (an "80GB"
/// H100 reports about 79.6 GiB), fragmentation, and estimate error.
pub const USABLE_GPU_MEMORY_FRACTION: f64 = 0.9;

/// Most pipeline stages (nodes) one replica may span. Each stage adds a
/// network hop per token; past this a fleet should rather get larger GPUs.
pub const MAX_PIPELINE_STAGES: u32 = 16;

/// A kind of GPU as the fleet reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuType {
    /// Short model name as executors report it, e.g. "H100-80GB".
    pub model: String,
    pub memory_bytes: u64,
    /// GPUs of this model on one node: a tensor-parallel group never
    /// spans nodes.
    pub gpus_per_node: u32,
}

impl GpuType {
    /// Parses the short model names executors report: the last '-'-separated
    /// token is the memory, "NNGB", read as NN GiB ("H100-80GB", "L4-24GB",
    /// "A100-SXM4-40GB"). `None` without such a token, for zero memory, or
    /// for zero GPUs per node.
    pub fn from_model_name(model: &str, gpus_per_node: u32) -> Option<GpuType> {
        let (name, memory) = model.rsplit_once('-')?;
        let digits = memory
            .len()
            .checked_sub(2)
            .filter(|&end| memory[end..].eq_ignore_ascii_case("GB"))
            .map(|end| &memory[..end])?;
        if name.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let memory_gib: u64 = digits.parse().ok()?;
        if memory_gib == 0 || gpus_per_node == 0 {
            return None;
        }
        Some(GpuType {
            model: model.to_owned(),
            memory_bytes: memory_gib.checked_mul(GIB)?,
            gpus_per_node,
        })
    }

    /// Bytes of one GPU a replica may plan to use.
    pub fn usable_bytes(&self) -> u64 {
        (self.memory_bytes as f64 * USABLE_GPU_MEMORY_FRACTION) as u64
    }
}

/// How one replica is laid out on a kind of GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaSizing {
    pub gpu_model: String,
    /// `tensor_parallel × pipeline_parallel`.
    pub gpus_per_replica: u32,
    pub tensor_parallel: u32,
    /// Pipeline stages, one node each; 1 when the replica fits on a node.
    pub pipeline_parallel: u32,
    /// What each of the replica's GPUs holds: its shard of weights and
    /// overhead, and its share of the KV cache.
    pub memory_bytes_per_gpu: u64,
    /// The whole replica, all GPUs together.
    pub estimate: MemoryEstimate,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SizingError {
    /// Worded for a person, with the numbers: what the replica needs, the
    /// largest tensor-parallel degree tried, what that leaves per GPU
    /// against what a GPU offers, and which degrees the heads ruled out.
    #[error("{0}")]
    DoesNotFit(String),
}

/// Decides GPUs per replica and the tensor-parallel degree on `gpu`: the
/// smallest power of two `tp` up to `gpu.gpus_per_node` that the heads allow
/// (see below) and at which each GPU's share fits in its usable memory
/// ([`USABLE_GPU_MEMORY_FRACTION`] of it). `gpus_per_replica == tp`: a
/// replica stays inside one node.
///
/// When no degree fits on one node, the replica spans nodes as pipeline
/// stages: each stage is the largest `tp` a node offers that the heads
/// allow, and `pipeline_parallel` is the fewest stages (2 up to
/// [`MAX_PIPELINE_STAGES`], and no more than the model's layers) at which
/// each GPU's share fits. The stages split the layers, so each GPU holds
/// `1 / pp` of what it would hold at `tp` alone. Whether a cluster has
/// that many nodes is the caller's to check.
///
/// Heads: `tp` must divide `attention_heads`, and either divide `kv_heads`
/// or be a multiple of it (vLLM then replicates KV heads across GPUs).
///
/// Each GPU holds `(weights + overhead) / (tp × pp)` plus `kv_cache /
/// (min(tp, kv_heads) × pp)`: once `tp` exceeds `kv_heads`, the KV cache
/// stops shrinking with `tp` because every GPU keeps a whole replicated KV
/// head.
///
/// [`size_preset`] does the same and names the preset in its error.
pub fn size_replica(
    shape: &ModelShape,
    profile: &ServingProfile,
    gpu: &GpuType,
) -> Result<ReplicaSizing, SizingError> {
    let billions = shape.parameters as f64 / 1e9;
    size(
        &format!("a {billions:.1}B-parameter model"),
        shape,
        profile,
        gpu,
    )
}

/// [`size_replica`] for a preset; its error message names the preset.
pub fn size_preset(
    preset: &Preset,
    profile: &ServingProfile,
    gpu: &GpuType,
) -> Result<ReplicaSizing, SizingError> {
    size(preset.name, &preset.shape, profile, gpu)
}

fn size(
    model: &str,
    shape: &ModelShape,
    profile: &ServingProfile,
    gpu: &GpuType,
) -> Result<ReplicaSizing, SizingError> {
    let estimate = replica_memory(shape, profile);
    let usable = gpu.usable_bytes();
    let mut largest_tried: Option<(u32, u64)> = None;
    let mut ruled_out = Vec::new();
    let sized = |tp: u32, pp: u32, per_gpu: u64, estimate: MemoryEstimate| ReplicaSizing {
        gpu_model: gpu.model.clone(),
        gpus_per_replica: tp.saturating_mul(pp),
        tensor_parallel: tp,
        pipeline_parallel: pp,
        memory_bytes_per_gpu: per_gpu,
        estimate,
    };
    for tp in (0..u32::BITS)
        .map(|power| 1u32 << power)
        .take_while(|&tp| tp <= gpu.gpus_per_node)
    {
        if !heads_allow(shape, tp) {
            ruled_out.push(tp);
            continue;
        }
        let per_gpu = bytes_per_gpu(&estimate, shape, tp, 1);
        if per_gpu <= usable {
            return Ok(sized(tp, 1, per_gpu, estimate));
        }
        largest_tried = Some((tp, per_gpu));
    }
    // One node is not enough: stages of the widest group a node holds.
    let mut deepest_tried: Option<(u32, u64)> = None;
    if let Some((tp, _)) = largest_tried {
        for pp in 2..=MAX_PIPELINE_STAGES.min(shape.layers) {
            let per_gpu = bytes_per_gpu(&estimate, shape, tp, pp);
            if per_gpu <= usable {
                return Ok(sized(tp, pp, per_gpu, estimate));
            }
            deepest_tried = Some((pp, per_gpu));
        }
    }
    let tried = Tried {
        largest: largest_tried,
        deepest: deepest_tried,
        ruled_out,
    };
    Err(SizingError::DoesNotFit(does_not_fit(
        model, shape, profile, gpu, &estimate, &tried,
    )))
}

/// What [`size`] tried before giving up, for the message.
struct Tried {
    /// The widest tensor-parallel degree on one node, and its bytes per GPU.
    largest: Option<(u32, u64)>,
    /// The most pipeline stages of that degree, and their bytes per GPU.
    deepest: Option<(u32, u64)>,
    /// Degrees the heads ruled out.
    ruled_out: Vec<u32>,
}

/// The tensor-parallel degree of each pipeline stage when a replica of
/// `gpus` GPUs (a count the deployment asked for) is spread over nodes of
/// `gpus_per_node`: the largest power of two up to `gpus_per_node` that
/// divides `gpus` and that the heads of `shape` allow (any, for a model
/// of unknown shape); at least 1. The replica is then `gpus / tp` stages.
pub fn stage_tensor_parallel(shape: Option<&ModelShape>, gpus_per_node: u32, gpus: u32) -> u32 {
    (0..u32::BITS)
        .map(|power| 1u32 << power)
        .take_while(|&tp| tp <= gpus_per_node)
        .filter(|&tp| gpus.is_multiple_of(tp) && shape.is_none_or(|s| heads_allow(s, tp)))
        .last()
        .unwrap_or(1)
}

fn heads_allow(shape: &ModelShape, tp: u32) -> bool {
    shape.kv_heads != 0
        && shape.attention_heads.is_multiple_of(tp)
        && (shape.kv_heads.is_multiple_of(tp) || tp.is_multiple_of(shape.kv_heads))
}

fn bytes_per_gpu(estimate: &MemoryEstimate, shape: &ModelShape, tp: u32, pp: u32) -> u64 {
    let (tp, pp) = (u64::from(tp.max(1)), u64::from(pp.max(1)));
    let kv_shards = tp.min(u64::from(shape.kv_heads)).max(1);
    let sharded = estimate
        .weights_bytes
        .saturating_add(estimate.overhead_bytes);
    sharded
        .div_ceil(tp * pp)
        .saturating_add(estimate.kv_cache_bytes.div_ceil(kv_shards * pp))
}

fn does_not_fit(
    model: &str,
    shape: &ModelShape,
    profile: &ServingProfile,
    gpu: &GpuType,
    estimate: &MemoryEstimate,
    tried: &Tried,
) -> String {
    let Tried {
        largest: largest_tried,
        deepest: deepest_tried,
        ruled_out,
    } = tried;
    let (largest_tried, deepest_tried) = (*largest_tried, *deepest_tried);
    let mut message = format!(
        "{model} at {precision} does not fit on {gpu_model}: it needs {total:.1} GiB per replica \
         (weights {weights:.1} GiB, KV cache {kv:.1} GiB for {batch} sequences of {context} tokens, \
         runtime overhead {overhead:.1} GiB)",
        precision = profile.precision,
        gpu_model = gpu.model,
        total = gib(estimate.total_bytes),
        weights = gib(estimate.weights_bytes),
        kv = gib(estimate.kv_cache_bytes),
        batch = profile.batch,
        context = profile.context_length,
        overhead = gib(estimate.overhead_bytes),
    );
    // `write!` to a String cannot fail.
    let _ = match largest_tried {
        Some((tp, per_gpu)) => write!(
            message,
            "; the largest tensor-parallel degree tried is {tp} (a node has {nodes} × {gpu_model}), \
             which needs {per_gpu:.1} GiB per GPU against {usable:.1} GiB usable \
             ({percent:.0} % of {memory:.1} GiB)",
            nodes = gpu.gpus_per_node,
            gpu_model = gpu.model,
            per_gpu = gib(per_gpu),
            usable = gib(gpu.usable_bytes()),
            percent = USABLE_GPU_MEMORY_FRACTION * 100.0,
            memory = gib(gpu.memory_bytes),
        ),
        None if gpu.gpus_per_node == 0 => write!(message, "; its nodes report no GPUs"),
        None => write!(
            message,
            "; no tensor-parallel degree up to {} suits the model's heads",
            gpu.gpus_per_node
        ),
    };
    if let (Some((tp, _)), Some((pp, per_gpu))) = (largest_tried, deepest_tried) {
        let _ = write!(
            message,
            "; across nodes, {pp} pipeline stages of {tp} GPUs (the most tried) still need \
             {per_gpu:.1} GiB per GPU",
            per_gpu = gib(per_gpu),
        );
    }
    if !ruled_out.is_empty() {
        let degrees: Vec<String> = ruled_out.iter().map(u32::to_string).collect();
        let _ = write!(
            message,
            "; tensor parallelism must divide the {heads} attention heads and divide or be a \
             multiple of the {kv_heads} KV heads, which rules out tp {degrees}",
            heads = shape.attention_heads,
            kv_heads = shape.kv_heads,
            degrees = degrees.join(", "),
        );
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::preset;
    use crate::precision::Precision;

    fn gpu(model: &str, gpus_per_node: u32) -> GpuType {
        GpuType::from_model_name(model, gpus_per_node).unwrap()
    }

    fn profile(precision: Precision, context_length: u32, batch: u32) -> ServingProfile {
        ServingProfile {
            precision,
            context_length,
            batch,
            kv_cache_bytes_per_value: 2.0,
        }
    }

    #[test]
    fn parses_short_gpu_model_names() {
        let cases = [
            ("H100-80GB", 8, Some(80)),
            ("L4-24GB", 4, Some(24)),
            ("A100-SXM4-40GB", 8, Some(40)),
            ("H200-141GB", 8, Some(141)),
            ("a10g-24gb", 1, Some(24)),
            ("H100", 8, None),
            ("80GB", 8, None),
            ("-80GB", 8, None),
            ("H100-GB", 8, None),
            ("H100-0GB", 8, None),
            ("H100-80", 8, None),
            ("H100-80GiB", 8, None),
            ("H100-+80GB", 8, None),
            ("H100-99999999999999GB", 8, None),
            ("H100-80GB", 0, None),
            ("", 8, None),
        ];
        for (model, gpus_per_node, memory_gib) in cases {
            let expected = memory_gib.map(|memory_gib: u64| GpuType {
                model: model.to_owned(),
                memory_bytes: memory_gib * GIB,
                gpus_per_node,
            });
            assert_eq!(
                GpuType::from_model_name(model, gpus_per_node),
                expected,
                "{model}"
            );
        }
    }

    #[test]
    fn heads_decide_which_degrees_are_allowed() {
        // (attention heads, kv heads, tp, allowed)
        let cases = [
            (64, 8, 8, true),
            (64, 8, 16, true), // KV heads replicated twice.
            (32, 32, 8, true),
            (28, 4, 4, true),
            (28, 4, 8, false), // 28 attention heads do not split in 8.
            (40, 10, 2, true),
            (40, 10, 4, false), // 10 KV heads neither split in 4 nor divide it.
            (16, 2, 8, true),
            (9, 3, 1, true),
            (9, 3, 3, true),
            (9, 3, 2, false),
            (8, 0, 1, false),
        ];
        for (attention_heads, kv_heads, tp, allowed) in cases {
            let shape = ModelShape {
                parameters: 1,
                layers: 1,
                hidden_size: 1,
                attention_heads,
                kv_heads,
                head_dim: 1,
                context_length: 1,
            };
            assert_eq!(
                heads_allow(&shape, tp),
                allowed,
                "{attention_heads}/{kv_heads} at tp {tp}"
            );
        }
    }

    #[test]
    fn sizes_replicas_on_gpus() {
        // (preset, profile, gpu, per node, tp, bytes per GPU), worked by hand.
        let cases = [
            // 16.06e9 weights + 8 GiB KV + 10 % = 27.1e9, under 72 GiB.
            (
                "llama-3.1-8b-instruct",
                profile(Precision::F16, 8192, 8),
                "H100-80GB",
                8,
                1,
                27_115_502_797,
            ),
            // 141.1e9 weights + 20 GiB KV + 16.26e9 overhead = 166.6 GiB:
            // 83.3 GiB at tp 2, 41.6 GiB at tp 4, under 72 GiB.
            (
                "llama-3.1-70b-instruct",
                profile(Precision::BF16, 8192, 8),
                "H100-80GB",
                8,
                4,
                44_710_118_605,
            ),
            // 183.6e9 in all: 22.95e9 per GPU at tp 8 fits 36 GiB; tp 4 does not.
            (
                "qwen2.5-72b-instruct",
                profile(Precision::BF16, 8192, 8),
                "A100-SXM4-40GB",
                8,
                8,
                22_946_996_020,
            ),
            // 2 KV heads: at tp 4 each GPU still holds half the 36 GiB KV
            // cache, so tp 2 (24.7e9) and tp 4 differ by the weights only.
            (
                "qwen2.5-3b-instruct",
                profile(Precision::BF16, 8192, 128),
                "L4-24GB",
                8,
                4,
                21_990_986_752,
            ),
            // 84 MB weights + 180 MiB KV + 512 MiB overhead = 0.75 GiB.
            (
                "smollm2-135m-instruct",
                profile(Precision::Q4_1, 8192, 1),
                "TEST-1GB",
                1,
                1,
                809_686_472,
            ),
        ];
        for (name, profile, model, gpus_per_node, tp, per_gpu) in cases {
            let preset = preset(name).unwrap();
            let gpu = gpu(model, gpus_per_node);
            let sizing = size_preset(preset, &profile, &gpu).unwrap();
            assert_eq!(sizing.tensor_parallel, tp, "{name} on {model}");
            assert_eq!(sizing.gpus_per_replica, tp, "{name} on {model}");
            assert_eq!(sizing.pipeline_parallel, 1, "{name} on {model}");
            assert_eq!(sizing.gpu_model, model);
            assert_eq!(sizing.memory_bytes_per_gpu, per_gpu, "{name} on {model}");
            assert!(sizing.memory_bytes_per_gpu <= gpu.usable_bytes());
            assert_eq!(sizing.estimate, replica_memory(&preset.shape, &profile));
            assert_eq!(size_replica(&preset.shape, &profile, &gpu), Ok(sizing));
        }
    }

    #[test]
    fn smollm2_q4_1_fits_on_any_gpu_from_1_gib() {
        let smollm = preset("smollm2-135m-instruct").unwrap();
        for model in ["TEST-1GB", "L4-24GB", "A100-SXM4-40GB", "H100-80GB"] {
            let sizing = size_preset(smollm, &profile(Precision::Q4_1, 8192, 1), &gpu(model, 1));
            assert_eq!(sizing.map(|s| s.tensor_parallel), Ok(1), "{model}");
        }
    }

    #[test]
    fn a_replica_larger_than_a_node_spans_nodes_in_pipeline_stages() {
        // (preset, profile, gpu, per node, tp, pp, bytes per GPU), worked by hand.
        let cases = [
            // 166.6 GiB: 41.6 GiB per GPU at tp 4 is over 21.6 GiB usable;
            // two nodes of 4 hold half of tp 4's 41.6 GiB per GPU: 20.8 GiB.
            (
                "llama-3.1-70b-instruct",
                profile(Precision::BF16, 8192, 8),
                "L4-24GB",
                4,
                4,
                2,
                22_355_059_303,
            ),
            // Nodes of 2: four stages of 2 (one node of 2 would need 83 GiB).
            (
                "llama-3.1-70b-instruct",
                profile(Precision::BF16, 8192, 8),
                "L4-24GB",
                2,
                2,
                4,
                22_355_059_303,
            ),
            // The heads rule out tp 4 and 8 for phi-3-medium: stages of 2
            // even on nodes of 8.
            (
                "phi-3-medium-4k-instruct",
                profile(Precision::BF16, 4096, 32),
                "L4-24GB",
                8,
                2,
                2,
                0,
            ),
        ];
        for (name, profile, model, gpus_per_node, tp, pp, per_gpu) in cases {
            let gpu = gpu(model, gpus_per_node);
            let sizing = size_preset(preset(name).unwrap(), &profile, &gpu).unwrap();
            let what = format!("{name} on nodes of {gpus_per_node} × {model}");
            assert_eq!(
                (sizing.tensor_parallel, sizing.pipeline_parallel),
                (tp, pp),
                "{what}"
            );
            assert_eq!(sizing.gpus_per_replica, tp * pp, "{what}");
            if per_gpu != 0 {
                assert_eq!(sizing.memory_bytes_per_gpu, per_gpu, "{what}");
            }
            assert!(sizing.memory_bytes_per_gpu <= gpu.usable_bytes(), "{what}");
            // One stage fewer would not fit.
            let shallower =
                bytes_per_gpu(&sizing.estimate, &preset(name).unwrap().shape, tp, pp - 1);
            assert!(shallower > gpu.usable_bytes(), "{what}");
        }
    }

    #[test]
    fn a_count_larger_than_a_node_splits_into_stages_the_heads_allow() {
        let llama_70b = &preset("llama-3.1-70b-instruct").unwrap().shape;
        let phi_medium = &preset("phi-3-medium-4k-instruct").unwrap().shape;
        // (shape, per node, GPUs, tp)
        let cases = [
            (Some(llama_70b), 4, 8, 4),
            (Some(llama_70b), 4, 12, 4),
            (Some(llama_70b), 8, 12, 4),
            (Some(llama_70b), 4, 6, 2),
            (Some(phi_medium), 8, 16, 2),
            (None, 8, 24, 8),
            (None, 4, 6, 2),
            (None, 4, 5, 1),
            (None, 0, 4, 1),
        ];
        for (shape, per_node, gpus, tp) in cases {
            assert_eq!(
                stage_tensor_parallel(shape, per_node, gpus),
                tp,
                "{gpus} GPUs on nodes of {per_node}"
            );
        }
    }

    #[test]
    fn explains_why_nothing_fits() {
        // (preset, profile, gpu, per node, phrases the message must hold)
        let cases = [
            (
                "llama-3.1-70b-instruct",
                profile(Precision::BF16, 8192, 8),
                "TEST-2GB",
                4,
                vec![
                    "llama-3.1-70b-instruct at BF16 does not fit on TEST-2GB",
                    "needs 166.6 GiB per replica",
                    "weights 131.4 GiB, KV cache 20.0 GiB for 8 sequences of 8192 tokens",
                    "the largest tensor-parallel degree tried is 4 (a node has 4 × TEST-2GB)",
                    "41.6 GiB per GPU against 1.8 GiB usable (90 % of 2.0 GiB)",
                    "across nodes, 16 pipeline stages of 4 GPUs (the most tried) still need 2.6 GiB per GPU",
                ],
            ),
            (
                "phi-3-medium-4k-instruct",
                profile(Precision::BF16, 4096, 32),
                "TEST-1GB",
                8,
                vec![
                    "phi-3-medium-4k-instruct at BF16 does not fit on TEST-1GB",
                    "the largest tensor-parallel degree tried is 2 (a node has 8 × TEST-1GB)",
                    "across nodes, 16 pipeline stages of 2 GPUs",
                    "must divide the 40 attention heads and divide or be a multiple of the \
                     10 KV heads, which rules out tp 4, 8",
                ],
            ),
        ];
        for (name, profile, model, gpus_per_node, phrases) in cases {
            let error = size_preset(preset(name).unwrap(), &profile, &gpu(model, gpus_per_node))
                .unwrap_err();
            let SizingError::DoesNotFit(message) = &error;
            assert_eq!(&error.to_string(), message);
            for phrase in phrases {
                assert!(message.contains(phrase), "{phrase:?} not in {message:?}");
            }
        }
    }

    #[test]
    fn anonymous_shapes_and_empty_nodes_still_explain() {
        let llama_70b = &preset("llama-3.1-70b-instruct").unwrap().shape;
        let bf16 = profile(Precision::BF16, 8192, 8);
        let no_gpus = GpuType {
            gpus_per_node: 0,
            ..gpu("H100-80GB", 8)
        };
        let SizingError::DoesNotFit(message) =
            size_replica(llama_70b, &bf16, &no_gpus).unwrap_err();
        assert!(
            message.starts_with("a 70.6B-parameter model at BF16 does not fit on H100-80GB"),
            "{message}"
        );
        assert!(message.ends_with("; its nodes report no GPUs"), "{message}");
    }
}
