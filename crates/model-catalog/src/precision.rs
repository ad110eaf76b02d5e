//! Weight precisions, artifact formats and runtimes.

use serde::{Deserialize, Serialize};

/// Numeric format of weights.
///
/// Variant names follow llama.cpp's quantization type names so that a GGUF
/// file name ("SmolLM2-135M-Instruct.Q4_1.gguf") maps onto one without a
/// table. Serialized as [`Precision::name`].
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Precision {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6_K,
    Q5_K_M,
    Q4_K_M,
    Q4_0,
    Q4_1,
    Fp8,
    Int4Awq,
}

impl Precision {
    /// Every precision, widest first.
    pub const ALL: [Precision; 11] = [
        Precision::F32,
        Precision::F16,
        Precision::BF16,
        Precision::Q8_0,
        Precision::Q6_K,
        Precision::Q5_K_M,
        Precision::Q4_K_M,
        Precision::Q4_1,
        Precision::Q4_0,
        Precision::Fp8,
        Precision::Int4Awq,
    ];

    /// Effective bits per weight, block scales included, so that
    /// `parameters × bits / 8` is the size of the weights in memory.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Precision::F32 => 32.0,
            Precision::F16 | Precision::BF16 => 16.0,
            // Blocks of 32 weights: 32 × 8 bits + one f16 scale = 34 bytes.
            Precision::Q8_0 => 8.5,
            // Super-blocks of 256: 6-bit quants, 16 8-bit sub-scales and an
            // f16 scale = 210 bytes.
            Precision::Q6_K => 6.5625,
            // The _M mixes keep some tensors (attention V, FFN down) one
            // K-type higher; these are llama.cpp's measured averages.
            Precision::Q5_K_M => 5.69,
            Precision::Q4_K_M => 4.85,
            // Blocks of 32: 16 bytes of nibbles + f16 scale (+ f16 min for Q4_1).
            Precision::Q4_0 => 4.5,
            Precision::Q4_1 => 5.0,
            // Per-tensor or per-channel scales are negligible next to the weights.
            Precision::Fp8 => 8.0,
            // 4-bit weights with an f16 scale and a 4-bit zero point per group
            // of 128, rounded up. AWQ checkpoints usually keep embeddings and
            // the output head in 16 bits, which this per-weight figure does
            // not see: it underestimates small models, where they weigh most.
            Precision::Int4Awq => 4.25,
        }
    }

    /// The conventional spelling: "Q4_1", "F16", "BF16", "Fp8", ...
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "F32",
            Precision::F16 => "F16",
            Precision::BF16 => "BF16",
            Precision::Q8_0 => "Q8_0",
            Precision::Q6_K => "Q6_K",
            Precision::Q5_K_M => "Q5_K_M",
            Precision::Q4_K_M => "Q4_K_M",
            Precision::Q4_0 => "Q4_0",
            Precision::Q4_1 => "Q4_1",
            Precision::Fp8 => "Fp8",
            Precision::Int4Awq => "Int4Awq",
        }
    }

    /// Parses a [`Precision::name`], ignoring ASCII case ("q4_k_m", "bf16", "FP8").
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|precision| precision.name().eq_ignore_ascii_case(s))
    }

    /// The artifact formats that can carry weights in this precision:
    /// llama.cpp quantizations exist only as GGUF, FP8 and AWQ only as
    /// safetensors, plain floats as either.
    pub fn formats(self) -> &'static [ArtifactFormat] {
        match self {
            Precision::F32 | Precision::F16 | Precision::BF16 => {
                &[ArtifactFormat::Gguf, ArtifactFormat::Safetensors]
            }
            Precision::Q8_0
            | Precision::Q6_K
            | Precision::Q5_K_M
            | Precision::Q4_K_M
            | Precision::Q4_0
            | Precision::Q4_1 => &[ArtifactFormat::Gguf],
            Precision::Fp8 | Precision::Int4Awq => &[ArtifactFormat::Safetensors],
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An inference engine an executor can start for a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// In-process candle; serves GGUF files.
    Candle,
    /// vLLM; serves safetensors checkpoints with tensor parallelism.
    Vllm,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Candle => "candle",
            Runtime::Vllm => "vllm",
        }
    }
}

/// How a model's weights are packaged on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactFormat {
    /// One llama.cpp GGUF file per precision.
    Gguf,
    /// A Hugging Face checkpoint directory of `.safetensors` shards.
    Safetensors,
}

impl ArtifactFormat {
    pub fn name(self) -> &'static str {
        match self {
            ArtifactFormat::Gguf => "gguf",
            ArtifactFormat::Safetensors => "safetensors",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_per_weight_match_the_block_layouts() {
        let cases = [
            (Precision::F32, 32.0),
            (Precision::F16, 16.0),
            (Precision::BF16, 16.0),
            (Precision::Q8_0, 8.5),
            (Precision::Q6_K, 6.5625),
            (Precision::Q5_K_M, 5.69),
            (Precision::Q4_K_M, 4.85),
            (Precision::Q4_0, 4.5),
            (Precision::Q4_1, 5.0),
            (Precision::Fp8, 8.0),
            (Precision::Int4Awq, 4.25),
        ];
        assert_eq!(cases.len(), Precision::ALL.len());
        for (precision, bits) in cases {
            assert_eq!(precision.bits_per_weight(), bits, "{precision}");
        }
    }

    #[test]
    fn parse_reads_every_name_in_any_case() {
        for precision in Precision::ALL {
            let name = precision.name();
            assert_eq!(Precision::parse(name), Some(precision));
            assert_eq!(Precision::parse(&name.to_lowercase()), Some(precision));
            assert_eq!(Precision::parse(&name.to_uppercase()), Some(precision));
        }
        for bad in ["", "Q4", "q4-1", "fp16", "int4", " F16"] {
            assert_eq!(Precision::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn json_spellings_are_the_names() {
        for precision in Precision::ALL {
            let json = serde_json::to_string(&precision).unwrap();
            assert_eq!(json, format!("\"{}\"", precision.name()));
            let back: Precision = serde_json::from_str(&json).unwrap();
            assert_eq!(back, precision);
        }
        for runtime in [Runtime::Candle, Runtime::Vllm] {
            let json = serde_json::to_string(&runtime).unwrap();
            assert_eq!(json, format!("\"{}\"", runtime.name()));
        }
        for format in [ArtifactFormat::Gguf, ArtifactFormat::Safetensors] {
            let json = serde_json::to_string(&format).unwrap();
            assert_eq!(json, format!("\"{}\"", format.name()));
        }
    }
}
