//! Byte-level BPE's pre-tokenizers: how text is cut into the words BPE
//! merges within, as a table ([`PRE_TOKENIZERS`]) of what the runner
//! implements, keyed by GGUF's `tokenizer.ggml.pre` and by the regexes of a
//! `tokenizer.json`. A vocabulary naming anything else is refused.

use super::TokenizerError;

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

/// GPT-2's regex, which a `tokenizer.json`'s ByteLevel pre-tokenizer
/// applies itself unless `use_regex` is false.
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// A `Digits` pre-tokenizer with `individual_digits`: every numeral alone.
const NUMERALS_REGEX: &str = r"\p{N}";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// One pre-tokenizer the runner implements, and how a vocabulary names it.
#[derive(Debug)]
pub struct PreTokenizer {
    pub split: Split,
    /// What it is called in messages.
    pub name: &'static str,
    /// Its `tokenizer.ggml.pre` values, as llama.cpp's converter writes them.
    pub gguf: &'static [&'static str],
    /// The regexes a `tokenizer.json` applies for it, in order (a
    /// ByteLevel pre-tokenizer with `use_regex` counts as GPT-2's regex, a
    /// `Digits` one with `individual_digits` as `\p{N}`).
    pub hf: &'static [&'static str],
    /// Cuts text into the words BPE merges within, appending them to the
    /// list, as a backtracking regex engine would take the regexes'
    /// alternatives.
    pub words: for<'a> fn(&'a str, &mut Vec<&'a str>),
}

/// Every pre-tokenizer a byte-level vocabulary may use. Anything else is
/// refused by name: words cut another way give ids the model was not
/// trained on, which is worse than no answer.
pub static PRE_TOKENIZERS: &[PreTokenizer] = &[
    PreTokenizer {
        split: Split::Gpt2,
        name: "GPT-2",
        gguf: &["gpt-2", "gpt2"],
        hf: &[GPT2_REGEX],
        words: gpt2_split,
    },
    PreTokenizer {
        split: Split::Gpt2Numerals,
        name: "SmolLM2",
        gguf: &["smollm"],
        hf: &[NUMERALS_REGEX, GPT2_REGEX],
        words: gpt2_numerals_split,
    },
    PreTokenizer {
        split: Split::Llama3,
        name: "Llama 3",
        gguf: &["llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3"],
        hf: &[LLAMA3_REGEX],
        words: llama3_words,
    },
    PreTokenizer {
        split: Split::Qwen2,
        name: "Qwen2",
        gguf: &["qwen2", "deepseek-r1-qwen"],
        hf: &[QWEN2_REGEX],
        words: qwen2_words,
    },
];

impl PreTokenizer {
    /// The table's entry for `split`.
    pub fn of(split: Split) -> Result<&'static PreTokenizer, TokenizerError> {
        PRE_TOKENIZERS
            .iter()
            .find(|p| p.split == split)
            .ok_or_else(|| TokenizerError::Invalid(format!("no pre-tokenizer {split:?}")))
    }

    /// From GGUF's `tokenizer.ggml.pre`. A missing key is refused too:
    /// llama.cpp then falls back to regexes of its own that none of these
    /// match, and so does its `default`.
    pub fn from_gguf(pre: Option<&str>) -> Result<&'static PreTokenizer, TokenizerError> {
        PRE_TOKENIZERS
            .iter()
            .find(|p| pre.is_some_and(|pre| p.gguf.contains(&pre)))
            .ok_or_else(|| TokenizerError::UnknownPreTokenizer {
                found: pre.map_or_else(
                    || "tokenizer.ggml.pre (missing)".to_string(),
                    |pre| format!("tokenizer.ggml.pre {pre:?}"),
                ),
                supported: PRE_TOKENIZERS
                    .iter()
                    .map(|p| format!("{} ({})", p.gguf.join(", "), p.name))
                    .collect::<Vec<_>>()
                    .join("; "),
            })
    }

    /// From a `tokenizer.json`'s `pre_tokenizer`, by the regexes it
    /// applies.
    pub fn from_hf_json(
        pre_tokenizer: Option<&serde_json::Value>,
    ) -> Result<&'static PreTokenizer, TokenizerError> {
        let mut steps = Vec::new();
        if let Some(p) = pre_tokenizer {
            hf_steps(p, &mut steps);
        }
        PRE_TOKENIZERS
            .iter()
            .find(|p| p.hf == steps.as_slice())
            .ok_or_else(|| TokenizerError::UnknownPreTokenizer {
                found: if steps.is_empty() {
                    "tokenizer.json: none (no Split regex, ByteLevel without use_regex)".to_string()
                } else {
                    format!("tokenizer.json: {}", steps.join(" then "))
                },
                supported: PRE_TOKENIZERS
                    .iter()
                    .map(|p| format!("{}: {}", p.name, p.hf.join(" then ")))
                    .collect::<Vec<_>>()
                    .join("; "),
            })
    }
}

/// The splitting steps of a `tokenizer.json` pre-tokenizer, in order: a
/// regex for each step the table knows how to read, the step's type in
/// angle brackets for any other (which then matches no entry).
fn hf_steps(v: &serde_json::Value, out: &mut Vec<String>) {
    let flag = |key: &str| v.get(key).and_then(|b| b.as_bool());
    match v.get("type").and_then(|t| t.as_str()) {
        Some("Sequence") => {
            for step in v
                .get("pretokenizers")
                .and_then(|s| s.as_array())
                .into_iter()
                .flatten()
            {
                hf_steps(step, out);
            }
        }
        Some("ByteLevel") if flag("use_regex").unwrap_or(true) => out.push(GPT2_REGEX.to_string()),
        // Without its regex, ByteLevel only maps bytes to characters.
        Some("ByteLevel") => {}
        Some("Digits") => out.push(if flag("individual_digits").unwrap_or(false) {
            NUMERALS_REGEX.to_string()
        } else {
            r"\p{N}+".to_string()
        }),
        Some("Split") => {
            let regex = v
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(|r| r.as_str());
            // Only an isolated match is a word of its own.
            let isolated = v.get("behavior").and_then(|b| b.as_str()) == Some("Isolated")
                && !flag("invert").unwrap_or(false);
            match regex {
                Some(regex) if isolated => out.push(regex.to_string()),
                _ => out.push(format!("<Split {}>", v.get("pattern").unwrap_or(v))),
            }
        }
        Some(other) => out.push(format!("<{other}>")),
        None => {}
    }
}

/// Cuts text into the words BPE merges within.
pub fn pre_tokenize(split: Split, text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    if let Ok(pre) = PreTokenizer::of(split) {
        (pre.words)(text, &mut out);
    }
    out
}

/// Every numeral alone, GPT-2's regex between them.
fn gpt2_numerals_split<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c.is_numeric() {
            if start < i {
                gpt2_split(&text[start..i], out);
            }
            start = i + c.len_utf8();
            out.push(&text[i..start]);
        }
    }
    if start < text.len() {
        gpt2_split(&text[start..], out);
    }
}

fn llama3_words<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    llama3_split(text, 3, out)
}

fn qwen2_words<'a>(text: &'a str, out: &mut Vec<&'a str>) {
    llama3_split(text, 1, out)
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
    #![allow(clippy::unwrap_used)]

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
    fn the_table_has_one_entry_per_split_and_no_name_twice() {
        for split in [
            Split::Gpt2,
            Split::Gpt2Numerals,
            Split::Llama3,
            Split::Qwen2,
        ] {
            let entries = PRE_TOKENIZERS.iter().filter(|p| p.split == split).count();
            assert_eq!(entries, 1, "{split:?}");
        }
        let mut names: Vec<&str> = PRE_TOKENIZERS
            .iter()
            .flat_map(|p| p.gguf.iter().copied())
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all);
        let mut regexes: Vec<_> = PRE_TOKENIZERS.iter().map(|p| p.hf).collect();
        regexes.sort();
        regexes.dedup();
        assert_eq!(regexes.len(), PRE_TOKENIZERS.len());
    }

    #[test]
    fn gguf_names_pick_their_entry_and_others_are_refused_by_name() {
        for (name, split) in [
            ("gpt-2", Split::Gpt2),
            ("smollm", Split::Gpt2Numerals),
            ("llama-bpe", Split::Llama3),
            ("qwen2", Split::Qwen2),
        ] {
            assert_eq!(PreTokenizer::from_gguf(Some(name)).unwrap().split, split);
        }
        for (pre, named) in [
            (Some("tekken"), "\"tekken\""),
            (Some("default"), "\"default\""),
            (None, "missing"),
        ] {
            let err = PreTokenizer::from_gguf(pre).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
            assert!(
                err.contains("llama-bpe") && err.contains("smollm"),
                "lists the supported ones: {err}"
            );
        }
    }

    #[test]
    fn tokenizer_json_pre_tokenizers_are_known_by_their_regexes() {
        let split = |regex: &str| {
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]})
        };
        let of = |v: serde_json::Value| PreTokenizer::from_hf_json(Some(&v)).map(|p| p.split);
        assert_eq!(of(split(LLAMA3_REGEX)).unwrap(), Split::Llama3);
        assert_eq!(of(split(QWEN2_REGEX)).unwrap(), Split::Qwen2);
        assert_eq!(of(split(GPT2_REGEX)).unwrap(), Split::Gpt2);
        assert_eq!(
            of(serde_json::json!({"type": "ByteLevel", "add_prefix_space": false})).unwrap(),
            Split::Gpt2
        );
        assert_eq!(
            of(serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}
            ]}))
            .unwrap(),
            Split::Gpt2Numerals
        );
        // A regex the table does not know, a split that drops its matches,
        // and no split at all are refused, naming what was found.
        let tekken =
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|\p{N}";
        let err = of(split(tekken)).unwrap_err().to_string();
        assert!(err.contains(tekken) && err.contains("Llama 3: "), "{err}");
        let mut removed = split(LLAMA3_REGEX);
        removed["pretokenizers"][0]["behavior"] = "Removed".into();
        assert!(of(removed).is_err());
        let err = of(serde_json::json!({"type": "ByteLevel", "use_regex": false}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
    }
}
