//! Building a [`Llama`] from a GGUF file (quantized or not) or from a
//! Hugging Face folder (safetensors + `config.json`).

use std::io::{Read, Seek};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use crate::gguf_meta::{get_f32 as meta_f32, get_str, get_u32 as meta_u32};
use crate::model::{Config, Layer, Linear, Llama, ModelError};

/// The GGUF architectures this forward pass serves.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

pub fn llama_from_gguf<R: Read + Seek>(
    ct: &gguf_file::Content,
    reader: &mut R,
    device: &Device,
    context_length: usize,
) -> Result<Llama, ModelError> {
    let arch = get_str(ct, "general.architecture")
        .unwrap_or_default()
        .to_string();
    if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(ModelError::Shape(format!(
            "architecture {arch:?} is not served (only {})",
            GGUF_ARCHITECTURES.join(", ")
        )));
    }
    let need = |key: &str| {
        meta_u32(ct, &format!("{arch}.{key}"))
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::Shape(format!("no {arch}.{key} in the metadata")))
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads =
        meta_u32(ct, &format!("{arch}.attention.head_count_kv")).map_or(heads, |v| v as usize);
    let layers = need("block_count")?;
    let ffn = need("feed_forward_length")?;
    let head_dim = meta_u32(ct, &format!("{arch}.attention.key_length"))
        .map_or(hidden / heads.max(1), |v| v as usize);
    let tensor = |reader: &mut R, name: &str| ct.tensor(reader, name, device);
    let vector = |reader: &mut R, name: &str| -> Result<Vec<f32>, ModelError> {
        let q = tensor(reader, name)?;
        Ok(q.dequantize(&q.device())?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let optional = |reader: &mut R, name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        if ct.tensor_infos.contains_key(name) {
            vector(reader, name).map(Some)
        } else {
            Ok(None)
        }
    };
    let embed_q = tensor(reader, "token_embd.weight")?;
    let (vocab, embed_width) = embed_q.shape().dims2()?;
    if embed_width != hidden {
        return Err(ModelError::Shape(format!(
            "token_embd.weight is {vocab}×{embed_width}, the model is {hidden} wide"
        )));
    }
    let embeddings = embed_q
        .dequantize(&embed_q.device())?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let output = if ct.tensor_infos.contains_key("output.weight") {
        Linear::from_qtensor(tensor(reader, "output.weight")?, None)?
    } else {
        Linear::from_qtensor(embed_q, None)?
    };
    let mut blocks = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("blk.{i}");
        let linear = |reader: &mut R, name: &str| -> Result<Linear, ModelError> {
            let bias = optional(reader, &format!("{p}.{name}.bias"))?;
            Linear::from_qtensor(tensor(reader, &format!("{p}.{name}.weight"))?, bias)
        };
        blocks.push(Layer::new(
            vector(reader, &format!("{p}.attn_norm.weight"))?,
            linear(reader, "attn_q")?,
            linear(reader, "attn_k")?,
            linear(reader, "attn_v")?,
            linear(reader, "attn_output")?,
            vector(reader, &format!("{p}.ffn_norm.weight"))?,
            linear(reader, "ffn_gate")?,
            linear(reader, "ffn_up")?,
            linear(reader, "ffn_down")?,
        ));
    }
    let config = Config {
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        rms_eps: meta_f32(ct, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f32(ct, &format!("{arch}.rope.freq_base")).unwrap_or(10_000.0),
        // llama.cpp's mapping: qwen2 rotates halves; llama and mistral
        // GGUFs carry q/k permuted for interleaved pairs.
        rope_neox: arch == "qwen2",
        context: context_length,
        sliding_window: None,
    };
    Llama::new(
        config,
        embeddings,
        blocks,
        vector(reader, "output_norm.weight")?,
        output,
    )
}

/// The parts of a Hugging Face `config.json` the forward pass needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

/// The model types whose safetensors layout this forward pass reads.
pub const HF_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// Builds the model from safetensors tensors named as Hugging Face names
/// them (`model.layers.N.self_attn.q_proj.weight`, ...).
pub fn llama_from_safetensors(
    cfg: &HfConfig,
    tensors: &std::collections::HashMap<String, Tensor>,
    context_cap: usize,
    device: &Device,
) -> Result<Llama, ModelError> {
    let model_type = cfg.model_type.clone().unwrap_or_else(|| "llama".into());
    if !HF_MODEL_TYPES.contains(&model_type.as_str()) {
        return Err(ModelError::Shape(format!(
            "model_type {model_type:?} is not served (only {})",
            HF_MODEL_TYPES.join(", ")
        )));
    }
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::Shape(format!("no tensor {name}")))
    };
    let vector = |name: &str| -> Result<Vec<f32>, ModelError> {
        Ok(get(name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let optional = |name: &str| -> Result<Option<Vec<f32>>, ModelError> {
        if tensors.contains_key(name) {
            vector(name).map(Some)
        } else {
            Ok(None)
        }
    };
    let linear = |prefix: &str| -> Result<Linear, ModelError> {
        Linear::from_tensor(
            get(&format!("{prefix}.weight"))?.to_device(device)?,
            optional(&format!("{prefix}.bias"))?,
        )
    };
    let embed = get("model.embed_tokens.weight")?;
    let output = if tensors.contains_key("lm_head.weight") {
        linear("lm_head")?
    } else {
        Linear::from_tensor(embed.to_device(device)?, None)?
    };
    let embeddings = embed
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        layers.push(Layer::new(
            vector(&format!("{p}.input_layernorm.weight"))?,
            linear(&format!("{p}.self_attn.q_proj"))?,
            linear(&format!("{p}.self_attn.k_proj"))?,
            linear(&format!("{p}.self_attn.v_proj"))?,
            linear(&format!("{p}.self_attn.o_proj"))?,
            vector(&format!("{p}.post_attention_layernorm.weight"))?,
            linear(&format!("{p}.mlp.gate_proj"))?,
            linear(&format!("{p}.mlp.up_proj"))?,
            linear(&format!("{p}.mlp.down_proj"))?,
        ));
    }
    let heads = cfg.num_attention_heads;
    let sliding_window = match model_type.as_str() {
        "mistral" => cfg.sliding_window,
        "qwen2" if cfg.use_sliding_window == Some(true) => cfg.sliding_window,
        _ => None,
    };
    let config = Config {
        hidden: cfg.hidden_size,
        layers: cfg.num_hidden_layers,
        heads,
        kv_heads: cfg.num_key_value_heads.unwrap_or(heads),
        head_dim: cfg.head_dim.unwrap_or(cfg.hidden_size / heads.max(1)),
        ffn: cfg.intermediate_size,
        vocab: cfg.vocab_size,
        rms_eps: cfg.rms_norm_eps as f32,
        rope_theta: cfg.rope_theta as f32,
        rope_neox: true,
        context: cfg
            .max_position_embeddings
            .unwrap_or(context_cap)
            .min(context_cap),
        sliding_window,
    };
    Llama::new(
        config,
        embeddings,
        layers,
        vector("model.norm.weight")?,
        output,
    )
}
