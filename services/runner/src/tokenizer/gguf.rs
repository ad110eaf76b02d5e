//! The GGUF reader: a tokenizer from a file's `tokenizer.ggml.*` metadata.

use candle_core::quantized::gguf_file;

use super::{PreTokenizer, Split, Tokenizer, TokenizerError, TokenizerModel, Vocabulary};
use crate::gguf_meta::{get_array, get_bool, get_str, get_strings, get_u32};

/// Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*`
/// metadata.
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer, TokenizerError> {
    let model = get_str(content, "tokenizer.ggml.model")
        .ok_or(TokenizerError::Missing("tokenizer.ggml.model"))?;
    let tokenizer_model = match model {
        "gpt2" => TokenizerModel::ByteLevel,
        "llama" => TokenizerModel::SentencePiece,
        other => return Err(TokenizerError::Unsupported(other.to_string())),
    };
    let tokens = get_strings(content, "tokenizer.ggml.tokens")
        .ok_or(TokenizerError::Missing("tokenizer.ggml.tokens"))?;
    let types: Vec<i32> = get_array(content, "tokenizer.ggml.token_type").map_or_else(
        || vec![1; tokens.len()],
        |values| values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
    );
    let scores: Vec<f32> = get_array(content, "tokenizer.ggml.scores")
        .map(|values| values.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect())
        .unwrap_or_default();
    let merges = get_strings(content, "tokenizer.ggml.merges").unwrap_or_default();
    if tokenizer_model == TokenizerModel::ByteLevel && merges.is_empty() {
        return Err(TokenizerError::Missing("tokenizer.ggml.merges"));
    }
    if tokenizer_model == TokenizerModel::SentencePiece
        && merges.is_empty()
        && scores.len() != tokens.len()
    {
        return Err(TokenizerError::Missing("tokenizer.ggml.scores"));
    }
    let id = |key| get_u32(content, key);
    let spm = tokenizer_model == TokenizerModel::SentencePiece;
    let split = match tokenizer_model {
        TokenizerModel::ByteLevel => {
            Some(PreTokenizer::from_gguf(get_str(content, "tokenizer.ggml.pre"))?.split)
        }
        // SentencePiece cuts no words, so its `tokenizer.ggml.pre` (llama.cpp
        // writes `default`) is not read, as llama.cpp does not read it.
        TokenizerModel::SentencePiece => None,
    };
    Tokenizer::new(Vocabulary {
        model: tokenizer_model,
        tokens,
        types,
        merges,
        scores,
        add_space_prefix: get_bool(content, "tokenizer.ggml.add_space_prefix").unwrap_or(spm),
        add_bos: get_bool(content, "tokenizer.ggml.add_bos_token").unwrap_or(spm),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id")
            .ok_or(TokenizerError::Missing("tokenizer.ggml.eos_token_id"))?,
        split,
        // llama.cpp takes Llama 3's whole-word tokens without merging, as
        // its tokenizer.json says (`ignore_merges`).
        ignore_merges: split == Some(Split::Llama3),
    })
}
