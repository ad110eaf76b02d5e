//! What a tokenizer is built from, whichever file it was read from.

use super::Split;

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
    /// How byte-level text is cut into words before merging; `None` for
    /// SentencePiece, which cuts no words (spaces become `▁` instead).
    pub split: Option<Split>,
    /// A word that is itself a token is taken whole, without merging
    /// (Llama 3's `ignore_merges`).
    pub ignore_merges: bool,
}

/// GPT-2's reversible map from bytes to printable characters.
pub(super) fn byte_to_char() -> [char; 256] {
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
pub(super) const SPACE: char = '\u{2581}';
