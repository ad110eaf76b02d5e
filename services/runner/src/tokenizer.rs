//! The tokenizer of a GGUF model, built from its metadata: byte-level BPE
//! (GPT-2 style: `tokenizer.ggml.model = gpt2`) with its merges, special
//! tokens matched before anything else, and digits split one by one as
//! SmolLM2 and Qwen2 tokenizers do.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("GGUF metadata {0} is missing or of the wrong type")]
    Missing(&'static str),
    #[error("tokenizer model {0:?} is not supported (only gpt2-style BPE)")]
    Unsupported(String),
    #[error("tokenizer.json: {0}")]
    HfJson(String),
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

/// Builds the tokenizer of a Hugging Face folder from its `tokenizer.json`
/// (byte-level BPE), with bos/eos from `tokenizer_config.json` or
/// `config.json`; returns it with the bos and eos texts.
pub fn from_hf_json(
    tokenizer: &serde_json::Value,
    tokenizer_config: &serde_json::Value,
    config: &crate::loader::HfConfig,
) -> Result<(Tokenizer, String, String), TokenizerError> {
    let bad = |m: &str| TokenizerError::HfJson(m.to_string());
    let model = tokenizer.get("model").ok_or_else(|| bad("no model"))?;
    let kind = model.get("type").and_then(|t| t.as_str()).unwrap_or("BPE");
    let byte_level = ["pre_tokenizer", "decoder"].iter().any(|k| {
        let v = tokenizer.get(*k).map(|v| v.to_string()).unwrap_or_default();
        v.contains("ByteLevel")
    });
    if kind != "BPE" || !byte_level {
        return Err(TokenizerError::Unsupported(format!(
            "{kind}{}",
            if byte_level {
                ""
            } else {
                " without byte-level pre-tokenization"
            }
        )));
    }
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
        entries.push((id, text.clone(), 1));
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
    let find = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let bos = token_text(tokenizer_config.get("bos_token"))
        .and_then(|t| find(&t))
        .or_else(|| first_id(config.bos_token_id.as_ref()));
    let eos = token_text(tokenizer_config.get("eos_token"))
        .and_then(|t| find(&t))
        .or_else(|| first_id(config.eos_token_id.as_ref()))
        .ok_or_else(|| bad("no eos token in tokenizer_config.json or config.json"))?;
    let bos_text = bos
        .and_then(|b| tokens.get(b as usize).cloned())
        .unwrap_or_default();
    let eos_text = tokens.get(eos as usize).cloned().unwrap_or_default();
    let tokenizer = Tokenizer::new("gpt2", tokens, types, merges, bos, eos)?;
    Ok((tokenizer, bos_text, eos_text))
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

pub struct Tokenizer {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    merges: HashMap<(String, String), u32>,
    /// Special tokens, longest first, matched verbatim in text.
    specials: Vec<(String, u32)>,
    special_ids: std::collections::HashSet<u32>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
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
            "Tokenizer({} tokens, {} merges)",
            self.tokens.len(),
            self.merges.len()
        )
    }
}

impl Tokenizer {
    /// `token_types`: 1 normal, 3 control, 4 user-defined (GGUF).
    pub fn new(
        model: &str,
        tokens: Vec<String>,
        token_types: Vec<i32>,
        merges: Vec<String>,
        bos: Option<u32>,
        eos: u32,
    ) -> Result<Self, TokenizerError> {
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(model.to_string()));
        }
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .enumerate()
            .filter_map(|(rank, m)| {
                let (a, b) = m.split_once(' ')?;
                Some(((a.to_string(), b.to_string()), rank as u32))
            })
            .collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| matches!(token_types.get(*i), Some(3 | 4)) && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let special_ids = specials.iter().map(|(_, id)| *id).collect();
        let byte_char = byte_to_char();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let stop_ids = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .filter_map(|t| tokens.iter().position(|x| x == t).map(|i| i as u32))
            .chain(std::iter::once(eos))
            .collect();
        Ok(Self {
            tokens,
            ids,
            merges,
            specials,
            special_ids,
            byte_char,
            char_byte,
            bos,
            eos,
            stop_ids,
            cache: std::sync::Mutex::new(HashMap::new()),
        })
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
                .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)));
            let (plain, special) = match next_special {
                Some((at, len, id)) => (&rest[..at], Some((id, at + len))),
                None => (rest, None),
            };
            for piece in pre_tokenize(plain) {
                self.encode_piece(piece, &mut out);
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

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock()
            && let Some(ids) = cache.get(piece)
        {
            out.extend_from_slice(ids);
            return;
        }
        let mut symbols: Vec<String> = piece
            .bytes()
            .map(|b| self.byte_char[b as usize].to_string())
            .collect();
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.merges
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", symbols[i], symbols[i + 1]);
            symbols[i] = merged;
            symbols.remove(i + 1);
        }
        let ids: Vec<u32> = symbols
            .iter()
            .flat_map(|s| match self.ids.get(s) {
                Some(id) => vec![*id],
                // Unknown symbol: fall back to its single-byte tokens.
                None => s
                    .chars()
                    .filter_map(|c| self.ids.get(&c.to_string()).copied())
                    .collect(),
            })
            .collect();
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
        token
            .chars()
            .flat_map(|c| match self.char_byte.get(&c) {
                Some(b) => vec![*b],
                None => c.to_string().into_bytes(),
            })
            .collect()
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

/// Splits text as the GPT-2 regex does (`'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|
/// ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`), after isolating every digit.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c.is_ascii_digit() {
            if start < i {
                gpt2_split(&text[start..i], &mut out);
            }
            out.push(&text[i..i + 1]);
            start = i + 1;
        }
    }
    if start < text.len() {
        gpt2_split(&text[start..], &mut out);
    }
    out
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
