//! The `tokenizer.json` reader: a tokenizer from a Hugging Face folder.

use super::{PreTokenizer, Tokenizer, TokenizerError, TokenizerModel, Vocabulary};

fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn first_id(v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_json::Value::Array(a) => first_id(a.first()),
        _ => None,
    }
}

/// Every object in `v` (at any depth) whose `"type"` is `kind`.
fn components<'a>(
    v: Option<&'a serde_json::Value>,
    kind: &str,
    out: &mut Vec<&'a serde_json::Value>,
) {
    match v {
        Some(serde_json::Value::Object(o)) => {
            if o.get("type").and_then(|t| t.as_str()) == Some(kind) {
                out.push(v.unwrap_or(&serde_json::Value::Null));
            }
            for child in o.values() {
                components(Some(child), kind, out);
            }
        }
        Some(serde_json::Value::Array(a)) => {
            for child in a {
                components(Some(child), kind, out);
            }
        }
        _ => {}
    }
}

/// Builds the tokenizer of a Hugging Face folder from its `tokenizer.json`
/// (byte-level BPE, or SentencePiece-style BPE with `▁` and byte
/// fallback), with bos/eos from `tokenizer_config.json` or `config.json`;
/// returns it with the bos and eos texts.
pub fn from_hf_json(
    tokenizer: &serde_json::Value,
    tokenizer_config: &serde_json::Value,
    config: &crate::loader::HfConfig,
) -> Result<(Tokenizer, String, String), TokenizerError> {
    let bad = |m: &str| TokenizerError::HfJson(m.to_string());
    let model = tokenizer.get("model").ok_or_else(|| bad("no model"))?;
    let kind = model.get("type").and_then(|t| t.as_str()).unwrap_or("BPE");
    let find = |part: &str, kind: &str| {
        let mut found = Vec::new();
        components(tokenizer.get(part), kind, &mut found);
        found
    };
    let byte_level =
        !find("pre_tokenizer", "ByteLevel").is_empty() || !find("decoder", "ByteLevel").is_empty();
    let metaspace = find("pre_tokenizer", "Metaspace");
    let spaces_replaced = find("normalizer", "Replace")
        .iter()
        .any(|r| r.get("content").and_then(|c| c.as_str()) == Some("\u{2581}"));
    let tokenizer_model = if byte_level {
        TokenizerModel::ByteLevel
    } else if !metaspace.is_empty() || spaces_replaced {
        TokenizerModel::SentencePiece
    } else {
        return Err(TokenizerError::Unsupported(format!(
            "{kind} without byte-level or SentencePiece (▁) pre-tokenization"
        )));
    };
    if kind != "BPE" {
        return Err(TokenizerError::Unsupported(kind.to_string()));
    }
    let add_space_prefix = tokenizer_model == TokenizerModel::SentencePiece
        && (find("normalizer", "Prepend")
            .iter()
            .any(|p| p.get("prepend").and_then(|c| c.as_str()) == Some("\u{2581}"))
            || metaspace.iter().any(|m| {
                let scheme = m.get("prepend_scheme").and_then(|s| s.as_str());
                let add = m.get("add_prefix_space").and_then(|s| s.as_bool());
                scheme.map_or(add != Some(false), |s| s != "never")
            }));
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("no model.vocab"))?;
    let mut entries: Vec<(u32, String, i32)> = Vec::with_capacity(vocab.len());
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| bad("a vocabulary id is not a number"))?;
        let byte = text.len() == 6 && text.starts_with("<0x") && text.ends_with('>');
        entries.push((id, text.clone(), if byte { 6 } else { 1 }));
    }
    for added in tokenizer
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(text)) = (
            added
                .get("id")
                .and_then(|i| i.as_u64())
                .and_then(|i| u32::try_from(i).ok()),
            added.get("content").and_then(|c| c.as_str()),
        ) else {
            continue;
        };
        let special = added
            .get("special")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        entries.retain(|(i, _, _)| *i != id);
        entries.push((id, text.to_string(), if special { 3 } else { 4 }));
    }
    let size = entries
        .iter()
        .map(|(i, _, _)| *i as usize + 1)
        .max()
        .unwrap_or(0);
    if size > 4 * entries.len().max(1) {
        return Err(bad("token ids are too sparse"));
    }
    let mut tokens = vec![String::new(); size];
    let mut types = vec![1; size];
    for (id, text, kind) in entries {
        tokens[id as usize] = text;
        types[id as usize] = kind;
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(pair) => Some(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            )),
            _ => None,
        })
        .collect();
    if merges.is_empty() {
        return Err(bad("model.merges is empty"));
    }
    let find_id = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let bos = token_text(tokenizer_config.get("bos_token"))
        .and_then(|t| find_id(&t))
        .or_else(|| first_id(config.bos_token_id.as_ref()));
    let eos = token_text(tokenizer_config.get("eos_token"))
        .and_then(|t| find_id(&t))
        .or_else(|| first_id(config.eos_token_id.as_ref()))
        .ok_or_else(|| bad("no eos token in tokenizer_config.json or config.json"))?;
    // Only byte-level text is cut into words before merging.
    let split = match tokenizer_model {
        TokenizerModel::ByteLevel => {
            Some(PreTokenizer::from_hf_json(tokenizer.get("pre_tokenizer"))?.split)
        }
        TokenizerModel::SentencePiece => None,
    };
    let add_bos = tokenizer_config
        .get("add_bos_token")
        .and_then(|b| b.as_bool())
        .unwrap_or(tokenizer_model == TokenizerModel::SentencePiece);
    let bos_text = bos
        .and_then(|b| tokens.get(b as usize).cloned())
        .unwrap_or_default();
    let eos_text = tokens.get(eos as usize).cloned().unwrap_or_default();
    let tokenizer = Tokenizer::new(Vocabulary {
        model: tokenizer_model,
        tokens,
        types,
        merges,
        scores: Vec::new(),
        add_space_prefix,
        add_bos,
        bos,
        eos,
        split,
        ignore_merges: model
            .get("ignore_merges")
            .and_then(|b| b.as_bool())
            .unwrap_or(false),
    })?;
    Ok((tokenizer, bos_text, eos_text))
}
