//! Loading a model: a GGUF file, or a Hugging Face folder, with the
//! tokenizer and chat template it describes.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::gguf_file;

use super::EngineError;
use crate::gguf_meta::{get_str, get_u32};
use crate::model::Llama;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// What the loaded model is.
pub struct LoadedModel {
    pub weights: Llama,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
    pub context_length: usize,
    /// Names the weights (files, sizes, modification times): the prefix
    /// cache's salt, so that keys and values of other weights never match.
    pub fingerprint: String,
}

/// `path`, its size and modification time, as text.
fn file_fingerprint(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let size = meta.as_ref().map_or(0, |m| m.len());
    let modified = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{} {size} {modified}", path.display())
}

/// Loads a GGUF model and builds its tokenizer and chat template from the
/// file's own metadata.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: path.display().to_string(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| fail(format!("not a readable GGUF file: {e}")))?;
    let arch = get_str(&content, "general.architecture").unwrap_or_default();
    let context_length =
        get_u32(&content, &format!("{arch}.context_length")).unwrap_or(2048) as usize;
    let template_src = get_str(&content, "tokenizer.chat_template").map(str::to_string);
    let tokenizer = crate::tokenizer::from_gguf(&content).map_err(|e| fail(e.to_string()))?;
    let bos_text = tokenizer
        .bos
        .map(|b| tokenizer.decode(&[b], false))
        .unwrap_or_default();
    let eos_text = tokenizer.decode(&[tokenizer.eos], false);
    let template =
        ChatTemplate::new(template_src, bos_text, eos_text).map_err(|e| fail(e.to_string()))?;
    let weights = crate::loader::llama_from_gguf(&content, &mut file, device, context_length)
        .map_err(|e| fail(format!("loading weights: {e}")))?;
    Ok(LoadedModel {
        weights,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        context_length,
        fingerprint: format!("{} on {device:?}", file_fingerprint(path)),
    })
}

/// Loads a GGUF file, or a Hugging Face model folder (safetensors,
/// `config.json`, `tokenizer.json`, optionally `tokenizer_config.json`).
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    if path.is_dir() {
        load_hf_folder(path, device)
    } else {
        load_gguf(path, device)
    }
}

/// The largest context a safetensors model is served with, whatever its
/// `max_position_embeddings` says (the KV caches and RoPE tables grow with it).
pub const HF_CONTEXT_CAP: usize = 32_768;

/// Loads a Hugging Face llama/mistral/qwen2 folder.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<LoadedModel, EngineError> {
    let fail = |reason: String| EngineError::Load {
        path: dir.display().to_string(),
        reason,
    };
    let read_json = |name: &str| -> Result<Option<serde_json::Value>, EngineError> {
        let file = dir.join(name);
        if !file.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).map_err(|e| fail(format!("{name}: {e}")))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| fail(format!("{name}: {e}")))
    };
    let config_json = read_json("config.json")?.ok_or_else(|| fail("no config.json".into()))?;
    let config: crate::loader::HfConfig =
        serde_json::from_value(config_json).map_err(|e| fail(format!("config.json: {e}")))?;
    let tokenizer_json =
        read_json("tokenizer.json")?.ok_or_else(|| fail("no tokenizer.json".into()))?;
    let tokenizer_config = read_json("tokenizer_config.json")?.unwrap_or_default();
    let (tokenizer, bos_text, eos_text) =
        crate::tokenizer::from_hf_json(&tokenizer_json, &tokenizer_config, &config)
            .map_err(|e| fail(e.to_string()))?;
    let template_src = match tokenizer_config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let template =
        ChatTemplate::new(template_src, bos_text, eos_text).map_err(|e| fail(e.to_string()))?;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(fail("no .safetensors files".into()));
    }
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu)
            .map_err(|e| fail(format!("{}: {e}", f.display())))?;
        tensors.extend(part);
    }
    let weights = crate::loader::llama_from_safetensors(&config, &tensors, HF_CONTEXT_CAP, device)
        .map_err(|e| fail(format!("loading weights: {e}")))?;
    if tokenizer.vocab_size() > weights.config.vocab {
        return Err(fail(format!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            weights.config.vocab
        )));
    }
    let fingerprint = files
        .iter()
        .map(|f| file_fingerprint(f))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(LoadedModel {
        context_length: weights.config.context,
        weights,
        tokenizer: Arc::new(tokenizer),
        template: Arc::new(template),
        fingerprint: format!("{fingerprint} on {device:?}"),
    })
}
