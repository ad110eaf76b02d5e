//! The preset table: models Flotilla knows how to serve, as data.
//!
//! Over 600 lines on purpose: most of it is the table itself, one entry of
//! published architecture figures per model, which reads best in one place.

use serde::Serialize;

use crate::precision::{
    ArtifactFormat::{self, Gguf, Safetensors},
    Precision::{self, BF16, F16, Fp8, Int4Awq, Q4_1, Q4_K_M, Q5_K_M, Q6_K, Q8_0},
    Runtime::{self, Candle, Vllm},
};

/// Architecture figures that decide memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelShape {
    /// Total parameter count, embeddings included (tied embeddings once).
    pub parameters: u64,
    pub layers: u32,
    pub hidden_size: u32,
    pub attention_heads: u32,
    /// Key/value heads; fewer than `attention_heads` under grouped-query attention.
    pub kv_heads: u32,
    /// Kept separately rather than derived as `hidden_size / attention_heads`:
    /// that holds for every preset here but not for newer models (Qwen3,
    /// Mistral Nemo, Gemma).
    pub head_dim: u32,
    /// Longest sequence the checkpoint's config allows without rope scaling
    /// (`max_position_embeddings`).
    pub context_length: u32,
}

/// One servable model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preset {
    /// What deployments write as `spec.model.preset`: lowercase letters,
    /// digits, '-' and '.', at most 63 characters. The dots carry version
    /// numbers ("llama-3.1-8b-instruct"), so this is an RFC 1123 subdomain
    /// (a valid Kubernetes object name), not a single DNS label, and not a
    /// NATS subject token; map '.' to '-' where a label is needed (the
    /// results are unique too).
    pub name: &'static str,
    /// Model family as inference tools report it ("llama", "qwen2", "mistral", "phi3").
    pub family: &'static str,
    /// The Hugging Face config's architecture, lowercased without
    /// "ForCausalLM": what a runtime's loader dispatches on.
    pub architecture: &'static str,
    pub shape: ModelShape,
    pub formats: &'static [ArtifactFormat],
    /// Quantizations published for this model, in the listed formats.
    pub precisions: &'static [Precision],
    pub default_precision: Precision,
    pub runtimes: &'static [Runtime],
    /// SPDX identifier where one exists, otherwise the license's own short name.
    pub license: &'static str,
}

/// Every preset, grouped by family, smallest first.
pub fn presets() -> &'static [Preset] {
    PRESETS
}

/// The preset named `name` (exact match).
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|preset| preset.name == name)
}

// Candle serves only GGUF, and only models small enough for one GPU without
// tensor parallelism (8B class and below); vLLM serves every safetensors
// checkpoint.
const GGUF_ONLY: &[ArtifactFormat] = &[Gguf];
const GGUF_AND_SAFETENSORS: &[ArtifactFormat] = &[Gguf, Safetensors];
const SAFETENSORS_ONLY: &[ArtifactFormat] = &[Safetensors];
const CANDLE_AND_VLLM: &[Runtime] = &[Candle, Vllm];
const VLLM_ONLY: &[Runtime] = &[Vllm];

/// Small models: the checkpoint's own bf16, and the GGUF quantizations
/// community repositories (bartowski, the model vendors) publish.
const SMALL_PRECISIONS: &[Precision] = &[BF16, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M];
/// 7–8B models: also FP8 and AWQ checkpoints for vLLM.
const MEDIUM_PRECISIONS: &[Precision] = &[BF16, F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Fp8, Int4Awq];
/// 14B and up: served only by vLLM, from safetensors.
const LARGE_PRECISIONS: &[Precision] = &[BF16, Fp8, Int4Awq];

// Shapes are copied from each model's config.json on Hugging Face
// (HuggingFaceTB/SmolLM2-*-Instruct, meta-llama/Llama-3.*-Instruct,
// Qwen/Qwen2.5-*-Instruct, mistralai/Mistral-7B-Instruct-v0.3,
// microsoft/Phi-3-*-4k-instruct, microsoft/phi-4): num_hidden_layers,
// hidden_size, num_attention_heads, num_key_value_heads, head_dim (or
// hidden_size / num_attention_heads where the config omits it) and
// max_position_embeddings. Parameter counts are the exact totals of the
// safetensors checkpoints; the tests recompute each one from the same
// configs (vocab_size, intermediate_size, tie_word_embeddings).
static PRESETS: &[Preset] = &[
    Preset {
        name: "smollm2-135m-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 134_515_008,
            layers: 30,
            hidden_size: 576,
            attention_heads: 9,
            kv_heads: 3,
            head_dim: 64,
            context_length: 8192,
        },
        // The project ships SmolLM2-135M-Instruct.Q4_1.gguf; vLLM loads GGUF too.
        formats: GGUF_ONLY,
        precisions: &[Q4_1, Q8_0, F16],
        default_precision: Q4_1,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "smollm2-360m-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 361_821_120,
            layers: 32,
            hidden_size: 960,
            attention_heads: 15,
            kv_heads: 5,
            head_dim: 64,
            context_length: 8192,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "smollm2-1.7b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 1_711_376_384,
            layers: 24,
            hidden_size: 2048,
            attention_heads: 32,
            kv_heads: 32,
            head_dim: 64,
            context_length: 8192,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "llama-3.2-1b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 1_235_814_400,
            layers: 16,
            hidden_size: 2048,
            attention_heads: 32,
            kv_heads: 8,
            head_dim: 64,
            context_length: 131_072,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Llama-3.2-Community",
    },
    Preset {
        name: "llama-3.2-3b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 3_212_749_824,
            layers: 28,
            hidden_size: 3072,
            attention_heads: 24,
            kv_heads: 8,
            head_dim: 128,
            context_length: 131_072,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Llama-3.2-Community",
    },
    Preset {
        name: "llama-3.1-8b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 8_030_261_248,
            layers: 32,
            hidden_size: 4096,
            attention_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            context_length: 131_072,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: MEDIUM_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Llama-3.1-Community",
    },
    Preset {
        name: "llama-3.1-70b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 70_553_706_496,
            layers: 80,
            hidden_size: 8192,
            attention_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            context_length: 131_072,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "Llama-3.1-Community",
    },
    Preset {
        name: "llama-3.3-70b-instruct",
        family: "llama",
        architecture: "llama",
        shape: ModelShape {
            parameters: 70_553_706_496,
            layers: 80,
            hidden_size: 8192,
            attention_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            context_length: 131_072,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "Llama-3.3-Community",
    },
    Preset {
        name: "qwen2.5-0.5b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 494_032_768,
            layers: 24,
            hidden_size: 896,
            attention_heads: 14,
            kv_heads: 2,
            head_dim: 64,
            context_length: 32_768,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "qwen2.5-1.5b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 1_543_714_304,
            layers: 28,
            hidden_size: 1536,
            attention_heads: 12,
            kv_heads: 2,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "qwen2.5-3b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 3_085_938_688,
            layers: 36,
            hidden_size: 2048,
            attention_heads: 16,
            kv_heads: 2,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Qwen-Research",
    },
    Preset {
        name: "qwen2.5-7b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 7_615_616_512,
            layers: 28,
            hidden_size: 3584,
            attention_heads: 28,
            kv_heads: 4,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: MEDIUM_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "qwen2.5-14b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 14_770_033_664,
            layers: 48,
            hidden_size: 5120,
            attention_heads: 40,
            kv_heads: 8,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "Apache-2.0",
    },
    Preset {
        name: "qwen2.5-32b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 32_763_876_352,
            layers: 64,
            hidden_size: 5120,
            attention_heads: 40,
            kv_heads: 8,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "Apache-2.0",
    },
    Preset {
        name: "qwen2.5-72b-instruct",
        family: "qwen2",
        architecture: "qwen2",
        shape: ModelShape {
            parameters: 72_706_203_648,
            layers: 80,
            hidden_size: 8192,
            attention_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "Qwen",
    },
    Preset {
        name: "mistral-7b-instruct-v0.3",
        family: "mistral",
        architecture: "mistral",
        shape: ModelShape {
            parameters: 7_248_023_552,
            layers: 32,
            hidden_size: 4096,
            attention_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            context_length: 32_768,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: MEDIUM_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "Apache-2.0",
    },
    Preset {
        name: "phi-3-mini-4k-instruct",
        family: "phi3",
        architecture: "phi3",
        shape: ModelShape {
            parameters: 3_821_079_552,
            layers: 32,
            hidden_size: 3072,
            attention_heads: 32,
            kv_heads: 32,
            head_dim: 96,
            context_length: 4096,
        },
        formats: GGUF_AND_SAFETENSORS,
        precisions: SMALL_PRECISIONS,
        default_precision: BF16,
        runtimes: CANDLE_AND_VLLM,
        license: "MIT",
    },
    Preset {
        name: "phi-3-medium-4k-instruct",
        family: "phi3",
        architecture: "phi3",
        shape: ModelShape {
            parameters: 13_960_238_080,
            layers: 40,
            hidden_size: 5120,
            attention_heads: 40,
            kv_heads: 10,
            head_dim: 128,
            context_length: 4096,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "MIT",
    },
    Preset {
        name: "phi-4",
        family: "phi3",
        architecture: "phi3",
        shape: ModelShape {
            parameters: 14_659_507_200,
            layers: 40,
            hidden_size: 5120,
            attention_heads: 40,
            kv_heads: 10,
            head_dim: 128,
            context_length: 16_384,
        },
        formats: SAFETENSORS_ONLY,
        precisions: LARGE_PRECISIONS,
        default_precision: BF16,
        runtimes: VLLM_ONLY,
        license: "MIT",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_dns_label(label: &str) -> bool {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    }

    #[test]
    fn names_are_unique_dns_names_and_look_up() {
        let mut seen = HashSet::new();
        for preset in presets() {
            let name = preset.name;
            assert!(name.len() <= 63, "{name}");
            assert!(name.split('.').all(is_dns_label), "{name}");
            let label = name.replace('.', "-");
            assert!(is_dns_label(&label), "{name}");
            assert!(seen.insert(label), "{name} collides once '.' becomes '-'");
            assert_eq!(super::preset(name), Some(preset));
        }
        assert_eq!(super::preset("gpt-5"), None);
        assert_eq!(super::preset("Llama-3.1-8B-Instruct"), None);
    }

    #[test]
    fn ships_the_expected_models() {
        let names: Vec<_> = presets().iter().map(|p| p.name).collect();
        let expected = [
            "smollm2-135m-instruct",
            "smollm2-360m-instruct",
            "smollm2-1.7b-instruct",
            "llama-3.2-1b-instruct",
            "llama-3.2-3b-instruct",
            "llama-3.1-8b-instruct",
            "llama-3.1-70b-instruct",
            "llama-3.3-70b-instruct",
            "qwen2.5-0.5b-instruct",
            "qwen2.5-1.5b-instruct",
            "qwen2.5-3b-instruct",
            "qwen2.5-7b-instruct",
            "qwen2.5-14b-instruct",
            "qwen2.5-32b-instruct",
            "qwen2.5-72b-instruct",
            "mistral-7b-instruct-v0.3",
            "phi-3-mini-4k-instruct",
            "phi-3-medium-4k-instruct",
            "phi-4",
        ];
        assert_eq!(names, expected);
    }

    #[test]
    fn shapes_are_self_consistent() {
        for preset in presets() {
            let shape = &preset.shape;
            let name = preset.name;
            assert!(shape.layers > 0 && shape.context_length > 0, "{name}");
            // True of every preset here, not of every model: see `head_dim`.
            assert_eq!(
                shape.head_dim * shape.attention_heads,
                shape.hidden_size,
                "{name}"
            );
            assert!(shape.kv_heads > 0, "{name}");
            assert!(
                shape.attention_heads.is_multiple_of(shape.kv_heads),
                "{name}"
            );
        }
    }

    /// The config.json figures the shape table leaves out, enough to
    /// recompute each checkpoint's exact parameter count.
    struct Config {
        name: &'static str,
        vocab_size: u64,
        intermediate_size: u64,
        tie_word_embeddings: bool,
        /// Qwen2 adds biases to the q, k and v projections.
        qkv_bias: bool,
    }

    const fn config(
        name: &'static str,
        vocab_size: u64,
        intermediate_size: u64,
        tie_word_embeddings: bool,
        qkv_bias: bool,
    ) -> Config {
        Config {
            name,
            vocab_size,
            intermediate_size,
            tie_word_embeddings,
            qkv_bias,
        }
    }

    #[test]
    fn parameter_counts_follow_from_the_configs() {
        let configs = [
            config("smollm2-135m-instruct", 49_152, 1536, true, false),
            config("smollm2-360m-instruct", 49_152, 2560, true, false),
            config("smollm2-1.7b-instruct", 49_152, 8192, true, false),
            config("llama-3.2-1b-instruct", 128_256, 8192, true, false),
            config("llama-3.2-3b-instruct", 128_256, 8192, true, false),
            config("llama-3.1-8b-instruct", 128_256, 14_336, false, false),
            config("llama-3.1-70b-instruct", 128_256, 28_672, false, false),
            config("llama-3.3-70b-instruct", 128_256, 28_672, false, false),
            config("qwen2.5-0.5b-instruct", 151_936, 4864, true, true),
            config("qwen2.5-1.5b-instruct", 151_936, 8960, true, true),
            config("qwen2.5-3b-instruct", 151_936, 11_008, true, true),
            config("qwen2.5-7b-instruct", 152_064, 18_944, false, true),
            config("qwen2.5-14b-instruct", 152_064, 13_824, false, true),
            config("qwen2.5-32b-instruct", 152_064, 27_648, false, true),
            config("qwen2.5-72b-instruct", 152_064, 29_568, false, true),
            config("mistral-7b-instruct-v0.3", 32_768, 14_336, false, false),
            config("phi-3-mini-4k-instruct", 32_064, 8192, false, false),
            config("phi-3-medium-4k-instruct", 32_064, 17_920, false, false),
            config("phi-4", 100_352, 17_920, false, false),
        ];
        assert_eq!(configs.len(), presets().len());
        for config in configs {
            let shape = &super::preset(config.name).unwrap().shape;
            let hidden = u64::from(shape.hidden_size);
            let q_width = u64::from(shape.attention_heads * shape.head_dim);
            let kv_width = u64::from(shape.kv_heads * shape.head_dim);
            let attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden;
            let attention_bias = if config.qkv_bias {
                q_width + 2 * kv_width
            } else {
                0
            };
            // Gate, up and down projections (phi3 fuses gate and up; same count).
            let mlp = 3 * hidden * config.intermediate_size;
            let norms = 2 * hidden;
            let per_layer = attention + attention_bias + mlp + norms;
            let embeddings = config.vocab_size * hidden;
            let output_head = if config.tie_word_embeddings {
                0
            } else {
                embeddings
            };
            let total = embeddings + u64::from(shape.layers) * per_layer + hidden + output_head;
            assert_eq!(shape.parameters, total, "{}", config.name);
        }
    }

    #[test]
    fn formats_precisions_and_runtimes_agree() {
        for preset in presets() {
            let name = preset.name;
            assert!(
                preset.precisions.contains(&preset.default_precision),
                "{name}"
            );
            for precision in preset.precisions {
                assert!(
                    precision
                        .formats()
                        .iter()
                        .any(|format| preset.formats.contains(format)),
                    "{name}: {precision} has no listed format"
                );
            }
            if preset.runtimes.contains(&Runtime::Candle) {
                assert!(preset.formats.contains(&ArtifactFormat::Gguf), "{name}");
                // The 8B class: Llama 3.1 8B has 8.03 B parameters.
                assert!(preset.shape.parameters < 9_000_000_000, "{name}");
            }
            if preset.formats.contains(&ArtifactFormat::Safetensors) {
                assert!(preset.runtimes.contains(&Runtime::Vllm), "{name}");
            }
            assert!(!preset.runtimes.is_empty(), "{name}");
        }
    }
}
