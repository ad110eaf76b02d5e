//! The tokenizer of a model, built from its GGUF metadata or its
//! `tokenizer.json`. Two families:
//!
//! - byte-level BPE (GPT-2 style, `tokenizer.ggml.model = gpt2`: SmolLM2,
//!   Qwen2, Llama 3): bytes mapped to printable characters, the GPT-2 split
//!   with digits one by one, merges by rank;
//! - SentencePiece (`tokenizer.ggml.model = llama`: Llama 2, Mistral,
//!   TinyLlama, Phi-3): spaces become `▁`, a `▁` is put before the text
//!   (and after each special token), pieces merge by the merged token's
//!   score (GGUF) or by merge rank (`tokenizer.json`), and characters the
//!   vocabulary lacks fall back to `<0xXX>` byte tokens.
//!
//! Special tokens written in the text are matched before anything else.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use candle_core::quantized::gguf_file;

use crate::gguf_meta::{get_array, get_bool, get_str, get_strings, get_u32};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata {0} is missing or of the wrong type")]
    Missing(&'static str),
    #[error("tokenizer model {0:?} is not supported (byte-level BPE and SentencePiece BPE are)")]
    Unsupported(String),
    #[error("tokenizer.json: {0}")]
    HfJson(String),
    #[error("{0}")]
    Invalid(String),
}

/// How text becomes pieces before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerModel {
    ByteLevel,
    SentencePiece,
}

/// Everything a tokenizer is built from, as a GGUF file or a
/// `tokenizer.json` states it.
#[derive(Debug, Clone)]
pub struct Vocabulary {
    pub model: TokenizerModel,
    pub tokens: Vec<String>,
    /// Per token (GGUF numbering): 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte.
    pub types: Vec<i32>,
    /// `"a b"`, best first. When empty, pieces merge by `scores`.
    pub merges: Vec<String>,
    pub scores: Vec<f32>,
    /// SentencePiece: a `▁` before the text and after each special token.
    pub add_space_prefix: bool,
    /// A completion prompt starts with the bos token.
    pub add_bos: bool,
    pub bos: Option<u32>,
    pub eos: u32,
    /// How byte-level text is cut into words before merging.
    pub split: Split,
    /// A word that is itself a token is taken whole, without merging
    /// (Llama 3's `ignore_merges`).
    pub ignore_merges: bool,
}

/// The pre-tokenizer of a byte-level BPE vocabulary (GGUF
/// `tokenizer.ggml.pre`, or the `Split` regex of a `tokenizer.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// GPT-2's regex.
    Gpt2,
    /// Every numeral alone, then GPT-2's regex (SmolLM2).
    Gpt2Numerals,
    /// Llama 3's regex: letters with one leading non-letter, numbers in
    /// threes, newlines kept with the whitespace before them.
    Llama3,
    /// Qwen2's: Llama 3's with numerals one by one.
    Qwen2,
}

impl Split {
    /// From GGUF's `tokenizer.ggml.pre`, as llama.cpp names them.
    pub fn from_gguf_pre(pre: Option<&str>) -> Split {
        match pre {
            Some("smollm") => Split::Gpt2Numerals,
            Some("llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3") => Split::Llama3,
            Some("qwen2" | "deepseek-r1-qwen") => Split::Qwen2,
            None | Some("gpt-2" | "gpt2" | "default") => Split::Gpt2,
            Some(other) => {
                tracing::warn!(
                    pre = other,
                    "an unknown pre-tokenizer; splitting words as GPT-2 does"
                );
                Split::Gpt2
            }
        }
    }
}

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
    let regexes: Vec<String> = find("pre_tokenizer", "Split")
        .iter()
        .filter_map(|s| s.get("pattern")?.get("Regex")?.as_str().map(str::to_string))
        .collect();
    let split = if regexes.iter().any(|r| r.contains("\\p{N}{1,3}")) {
        Split::Llama3
    } else if regexes
        .iter()
        .any(|r| r.contains("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"))
    {
        Split::Qwen2
    } else if !find("pre_tokenizer", "Digits").is_empty() {
        Split::Gpt2Numerals
    } else {
        Split::Gpt2
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
    let split = Split::from_gguf_pre(get_str(content, "tokenizer.ggml.pre"));
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
        ignore_merges: split == Split::Llama3,
    })
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    map
}

/// SentencePiece's visible space.
const SPACE: char = '\u{2581}';

/// Which adjacent pair merges first.
enum Ranking {
    /// `(left id, right id) → rank`, lower first.
    Merges(HashMap<(u32, u32), u32>),
    /// The merged token's score, higher first.
    Scores(Vec<f32>),
}

/// A merge candidate in the queue: best priority, then leftmost.
#[derive(PartialEq)]
struct Candidate {
    priority: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged piece when queued; a stale entry no
    /// longer matches.
    len: usize,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A piece of the text being merged: a byte range, linked to its
/// neighbours.
#[derive(Clone, Copy)]
struct Piece {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    id: Option<u32>,
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
    split: Split,
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
            split: v.split,
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

    pub fn split(&self) -> Split {
        self.split
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
                        for piece in pre_tokenize(self.split, plain) {
                            self.encode_byte_level(piece, &mut out);
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

    /// Merges the characters of `text` pair by pair, best pair first.
    fn merge(&self, text: &str) -> Vec<Piece> {
        let mut pieces: Vec<Piece> = text
            .char_indices()
            .map(|(i, c)| Piece {
                start: i,
                end: i + c.len_utf8(),
                prev: None,
                next: None,
                id: None,
            })
            .collect();
        let count = pieces.len();
        for (i, p) in pieces.iter_mut().enumerate() {
            p.prev = i.checked_sub(1);
            p.next = (i + 1 < count).then_some(i + 1);
            p.id = self.ids.get(&text[p.start..p.end]).copied();
        }
        let candidate = |pieces: &[Piece], left: usize, right: usize| -> Option<Candidate> {
            let (l, r) = (&pieces[left], &pieces[right]);
            let merged = self.ids.get(&text[l.start..r.end]).copied()?;
            let priority = match &self.ranking {
                Ranking::Merges(ranks) => -(*ranks.get(&(l.id?, r.id?))? as f32),
                Ranking::Scores(scores) => scores[merged as usize],
            };
            Some(Candidate {
                priority,
                left,
                right,
                len: r.end - l.start,
            })
        };
        let mut queue: BinaryHeap<Candidate> = BinaryHeap::new();
        for i in 1..count {
            queue.extend(candidate(&pieces, i - 1, i));
        }
        while let Some(c) = queue.pop() {
            let (l, r) = (pieces[c.left], pieces[c.right]);
            if l.end == l.start
                || r.end == r.start
                || l.next != Some(c.right)
                || r.end - l.start != c.len
            {
                continue;
            }
            pieces[c.left].end = r.end;
            pieces[c.left].next = r.next;
            pieces[c.left].id = self.ids.get(&text[l.start..r.end]).copied();
            pieces[c.right].end = pieces[c.right].start;
            if let Some(n) = r.next {
                pieces[n].prev = Some(c.left);
                queue.extend(candidate(&pieces, c.left, n));
            }
            if let Some(p) = l.prev {
                queue.extend(candidate(&pieces, p, c.left));
            }
        }
        let mut out = Vec::new();
        let mut at = (count > 0).then_some(0);
        while let Some(i) = at {
            out.push(pieces[i]);
            at = pieces[i].next;
        }
        out
    }

    fn encode_sentencepiece(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.merge(text) {
            match piece.id {
                Some(id) => out.push(id),
                None => {
                    for b in text[piece.start..piece.end].bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unknown) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    fn encode_byte_level(&self, piece: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock()
            && let Some(ids) = cache.get(piece)
        {
            out.extend_from_slice(ids);
            return;
        }
        let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
        if self.ignore_merges
            && let Some(id) = self.ids.get(&mapped)
        {
            out.push(*id);
            return;
        }
        let mut ids = Vec::new();
        for p in self.merge(&mapped) {
            match p.id {
                Some(id) => ids.push(id),
                // Unknown symbol: fall back to its single-byte tokens.
                None => ids.extend(
                    mapped[p.start..p.end]
                        .chars()
                        .filter_map(|c| self.ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied()),
                ),
            }
        }
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock()
            && cache.len() < 100_000
        {
            cache.insert(piece.to_string(), ids);
        }
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

/// Turns tokens into text as they come, holding back bytes of a character
/// that is not complete yet.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An invalid (not merely incomplete) sequence is replaced.
                if e.error_len().is_some() {
                    let out = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return out;
                }
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
        }
    }

    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Cuts text into the words BPE merges within.
pub fn pre_tokenize(split: Split, text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    match split {
        Split::Gpt2 => gpt2_split(text, &mut out),
        Split::Gpt2Numerals => {
            let mut start = 0;
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    if start < i {
                        gpt2_split(&text[start..i], &mut out);
                    }
                    start = i + c.len_utf8();
                    out.push(&text[i..start]);
                }
            }
            if start < text.len() {
                gpt2_split(&text[start..], &mut out);
            }
        }
        Split::Llama3 => llama3_split(text, 3, &mut out),
        Split::Qwen2 => llama3_split(text, 1, &mut out),
    }
    out
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,N}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`, alternative by
/// alternative as a backtracking regex engine takes them.
fn llama3_split<'a>(text: &'a str, max_digits: usize, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let end_of = |k: usize| chars.get(k).map_or(text.len(), |(i, _)| *i);
    let letter = |c: char| c.is_alphabetic();
    let number = |c: char| c.is_numeric();
    let newline = |c: char| c == '\r' || c == '\n';
    let other = |c: char| !c.is_whitespace() && !letter(c) && !number(c);
    let mut k = 0;
    while k < n {
        let (start, c) = chars[k];
        let mut take = |j: usize, k: &mut usize| {
            out.push(&text[start..end_of(j)]);
            *k = j;
        };
        if c == '\'' {
            let contraction = ["s", "t", "re", "ve", "m", "ll", "d"].iter().find(|s| {
                s.chars().enumerate().all(|(o, sc)| {
                    chars
                        .get(k + 1 + o)
                        .is_some_and(|(_, tc)| tc.to_lowercase().eq(sc.to_lowercase()))
                })
            });
            if let Some(s) = contraction {
                take(k + 1 + s.len(), &mut k);
                continue;
            }
        }
        let lead = !letter(c) && !number(c) && !newline(c) && k + 1 < n && letter(chars[k + 1].1);
        if letter(c) || lead {
            let mut j = k + usize::from(lead);
            while j < n && letter(chars[j].1) {
                j += 1;
            }
            take(j, &mut k);
            continue;
        }
        if number(c) {
            let mut j = k;
            while j < n && j - k < max_digits && number(chars[j].1) {
                j += 1;
            }
            take(j, &mut k);
            continue;
        }
        let spaced = c == ' ' && k + 1 < n && other(chars[k + 1].1);
        if other(c) || spaced {
            let mut j = k + usize::from(spaced);
            while j < n && other(chars[j].1) {
                j += 1;
            }
            while j < n && newline(chars[j].1) {
                j += 1;
            }
            take(j, &mut k);
            continue;
        }
        let mut run = k;
        while run < n && chars[run].1.is_whitespace() {
            run += 1;
        }
        if let Some(last) = (k..run).rev().find(|&j| newline(chars[j].1)) {
            // `\s*[\r\n]+`: up to the run's last newline.
            take(last + 1, &mut k);
        } else if run < n && run - k >= 2 {
            // `\s+(?!\S)`: the run but its last, which goes with the word.
            take(run - 1, &mut k);
        } else {
            take(run, &mut k);
        }
    }
}

fn gpt2_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let end_of = |k: usize| chars.get(k).map_or(text.len(), |(i, _)| *i);
    let kind = |c: char| {
        if c.is_alphabetic() {
            1
        } else if c.is_numeric() {
            2
        } else if c.is_whitespace() {
            0
        } else {
            3
        }
    };
    let mut k = 0;
    while k < chars.len() {
        let (start, c) = chars[k];
        // Contractions.
        if c == '\'' {
            let rest = &text[start + 1..];
            if let Some(len) = ["s", "t", "re", "ve", "m", "ll", "d"]
                .iter()
                .find(|s| rest.starts_with(**s))
                .map(|s| s.len())
            {
                out.push(&text[start..start + 1 + len]);
                k += 1 + len;
                continue;
            }
        }
        // ` ?X+` for letters, numbers and other symbols.
        let (lead, first) = if c == ' ' && k + 1 < chars.len() && kind(chars[k + 1].1) != 0 {
            (1, chars[k + 1].1)
        } else {
            (0, c)
        };
        let class = kind(first);
        if class != 0 {
            let mut j = k + lead;
            while j < chars.len() && kind(chars[j].1) == class {
                j += 1;
            }
            out.push(&text[start..end_of(j)]);
            k = j;
            continue;
        }
        // Whitespace: leave the last one to prefix a following word.
        let mut j = k;
        while j < chars.len() && chars[j].1.is_whitespace() {
            j += 1;
        }
        if j < chars.len() && j - k > 1 {
            j -= 1;
        }
        out.push(&text[start..end_of(j)]);
        k = j;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_gpt2_with_single_digits() {
        let pre_tokenize = |t| pre_tokenize(Split::Gpt2Numerals, t);
        assert_eq!(pre_tokenize("Hello world"), vec!["Hello", " world"]);
        assert_eq!(
            pre_tokenize("it's 42!"),
            vec!["it", "'s", " ", "4", "2", "!"]
        );
        assert_eq!(pre_tokenize("a  b"), vec!["a", " ", " b"]);
        assert_eq!(pre_tokenize("line\nnext"), vec!["line", "\n", "next"]);
        assert_eq!(pre_tokenize("end   "), vec!["end", "   "]);
        assert_eq!(pre_tokenize(" ?!x"), vec![" ?!", "x"]);
    }

    #[test]
    fn stream_decoder_waits_for_whole_characters() {
        let mut d = StreamDecoder::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push(&euro[..1]), "");
        assert_eq!(d.push(&euro[1..]), "€");
        assert_eq!(d.push(b"ok"), "ok");
    }
}
