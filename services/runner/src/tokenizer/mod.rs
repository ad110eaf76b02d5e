//! The tokenizer of a model, built from its GGUF metadata or its
//! `tokenizer.json`. Two families:
//!
//! - byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`: SmolLM2,
//!   Qwen2, Llama 3, GPT-2): bytes mapped to printable characters, text cut
//!   into words by the vocabulary's pre-tokenizer, merges by rank;
//! - SentencePiece (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
//!   TinyLlama, Phi-3): spaces become `▁`, a `▁` is put before the text
//!   (and after each special token), pieces merge by the merged token's
//!   score (GGUF) or by merge rank (`tokenizer.json`), and characters the
//!   vocabulary lacks fall back to `<0xXX>` byte tokens.
//!
//! Special tokens written in the text are matched before anything else.
//!
//! The pre-tokenizers are a table ([`PRE_TOKENIZERS`]: GPT-2's, SmolLM2's,
//! Llama 3's, Qwen2's), found by GGUF's `tokenizer.ggml.pre` or by the
//! regexes of a `tokenizer.json`. A byte-level vocabulary whose
//! pre-tokenizer is not in it, or that names none (a GGUF file without
//! `tokenizer.ggml.pre`, or with llama.cpp's `default`), is refused with an
//! error naming it and the supported ones. SentencePiece cuts no words:
//! its `tokenizer.ggml.pre` is not read.
//!
//! By job: [`vocab`] (what a tokenizer is built from), [`gguf`] and
//! [`hf_json`] (the two readers), [`pre`] (the pre-tokenizers), `merge`
//! (the merge engine both families share) and [`stream`] (token bytes to
//! text while streaming); this module holds the tokenizer itself.

pub mod gguf;
pub mod hf_json;
mod merge;
pub mod pre;
pub mod stream;
pub mod vocab;

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

pub use gguf::from_gguf;
pub use hf_json::from_hf_json;
use merge::Ranking;
pub use pre::{PRE_TOKENIZERS, PreTokenizer, Split, pre_tokenize};
pub use stream::StreamDecoder;
use vocab::{SPACE, byte_to_char};
pub use vocab::{TokenizerModel, Vocabulary};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata {0} is missing or of the wrong type")]
    Missing(&'static str),
    #[error("tokenizer model {0:?} is not supported (byte-level BPE and SentencePiece BPE are)")]
    Unsupported(String),
    /// Words cut another way than the model was trained with give wrong
    /// ids, which is worse than no answer.
    #[error("pre-tokenizer {found} is not supported; supported: {supported}")]
    UnknownPreTokenizer { found: String, supported: String },
    #[error("tokenizer.json: {0}")]
    HfJson(String),
    #[error("{0}")]
    Invalid(String),
}

pub struct Tokenizer {
    model: TokenizerModel,
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
    ranking: Ranking,
    /// Special tokens, longest first, matched verbatim in text.
    specials: Vec<(String, u32)>,
    special_ids: HashSet<u32>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    /// SentencePiece's `<0xXX>` tokens.
    byte_tokens: [Option<u32>; 256],
    unknown: Option<u32>,
    add_space_prefix: bool,
    /// Byte-level BPE: how text is cut into words.
    pre: Option<&'static PreTokenizer>,
    ignore_merges: bool,
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Other tokens that end a turn (e.g. `<|im_end|>`).
    pub stop_ids: Vec<u32>,
    cache: std::sync::Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({:?}, {} tokens)",
            self.model,
            self.tokens.len()
        )
    }
}

impl Tokenizer {
    pub fn new(v: Vocabulary) -> Result<Self, TokenizerError> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid("the vocabulary is empty".into()));
        }
        for (what, id) in [("eos", Some(v.eos)), ("bos", v.bos)] {
            if let Some(id) = id.filter(|id| *id as usize >= n) {
                return Err(TokenizerError::Invalid(format!(
                    "the {what} token {id} is outside the vocabulary of {n}"
                )));
            }
        }
        let pre = match (v.model, v.split) {
            (TokenizerModel::ByteLevel, Some(split)) => Some(PreTokenizer::of(split)?),
            (TokenizerModel::ByteLevel, None) => {
                return Err(TokenizerError::Invalid(
                    "a byte-level vocabulary needs a pre-tokenizer".into(),
                ));
            }
            (TokenizerModel::SentencePiece, _) => None,
        };
        let mut types = v.types;
        types.resize(n, 1);
        let ids: HashMap<String, u32> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let ranking = if v.merges.is_empty() {
            let mut scores = v.scores;
            scores.resize(n, f32::NEG_INFINITY);
            Ranking::Scores(scores)
        } else {
            Ranking::Merges(
                v.merges
                    .iter()
                    .enumerate()
                    .filter_map(|(rank, m)| {
                        let (a, b) = m.split_once(' ')?;
                        Some(((*ids.get(a)?, *ids.get(b)?), rank as u32))
                    })
                    .collect(),
            )
        };
        let mut specials: Vec<(String, u32)> = v
            .tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| matches!(types[*i], 3 | 4) && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|(t, _)| Reverse(t.len()));
        let special_ids = specials.iter().map(|(_, id)| *id).collect();
        let byte_char = byte_to_char();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let byte_tokens = std::array::from_fn(|b| ids.get(&format!("<0x{b:02X}>")).copied());
        let unknown = types.iter().position(|t| *t == 2).map(|i| i as u32);
        let stop_ids = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .filter_map(|t| ids.get(*t).copied())
            .chain(std::iter::once(v.eos))
            .collect();
        Ok(Self {
            model: v.model,
            tokens: v.tokens,
            types,
            ids,
            ranking,
            specials,
            special_ids,
            byte_char,
            char_byte,
            byte_tokens,
            unknown,
            add_space_prefix: v.add_space_prefix,
            pre,
            ignore_merges: v.ignore_merges,
            add_bos: v.add_bos,
            bos: v.bos,
            eos: v.eos,
            stop_ids,
            cache: std::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn model(&self) -> TokenizerModel {
        self.model
    }

    /// How byte-level text is cut into words (`None` for SentencePiece).
    pub fn split(&self) -> Option<Split> {
        self.pre.map(|p| p.split)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Text to token ids; special tokens written in the text are kept whole.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next_special = self
                .specials
                .iter()
                .filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id)))
                .min_by_key(|(at, len, _)| (*at, Reverse(*len)));
            let (plain, special) = match next_special {
                Some((at, len, id)) => (&rest[..at], Some((id, at + len))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                match self.model {
                    TokenizerModel::ByteLevel => {
                        let mut words = Vec::new();
                        if let Some(pre) = self.pre {
                            (pre.words)(plain, &mut words);
                        }
                        for word in words {
                            self.encode_byte_level(word, &mut out);
                        }
                    }
                    TokenizerModel::SentencePiece => {
                        let mut text = String::with_capacity(plain.len() + 3);
                        // Each plain stretch starts the text or follows a
                        // special token.
                        if self.add_space_prefix {
                            text.push(SPACE);
                        }
                        text.extend(plain.chars().map(|c| if c == ' ' { SPACE } else { c }));
                        self.encode_sentencepiece(&text, &mut out);
                    }
                }
            }
            match special {
                Some((id, end)) => {
                    out.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        out
    }

    /// The text streaming `ids` one by one gives, and the decoder as it
    /// is left (holding the bytes of a character not complete yet): what a
    /// continued generation starts from.
    pub fn streamed(&self, ids: &[u32]) -> (String, StreamDecoder) {
        let mut decoder = StreamDecoder::default();
        let text = ids
            .iter()
            .map(|&id| decoder.push(&self.token_bytes(id)))
            .collect();
        (text, decoder)
    }

    /// The bytes a token stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        if self.is_special(id) {
            return token.as_bytes().to_vec();
        }
        match self.model {
            TokenizerModel::ByteLevel => token
                .chars()
                .flat_map(|c| match self.char_byte.get(&c) {
                    Some(b) => vec![*b],
                    None => c.to_string().into_bytes(),
                })
                .collect(),
            TokenizerModel::SentencePiece => {
                if self.types[id as usize] == 6
                    && let Some(b) = token
                        .strip_prefix("<0x")
                        .and_then(|t| t.strip_suffix('>'))
                        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    return vec![b];
                }
                token.replace(SPACE, " ").into_bytes()
            }
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|id| !(skip_special && self.is_special(**id)))
            .flat_map(|id| self.token_bytes(*id))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
