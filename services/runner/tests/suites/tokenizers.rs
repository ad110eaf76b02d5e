//! SentencePiece tokenizers against llama.cpp's reference results: its
//! vocabulary-only GGUF files for Llama 2 and Phi-3 with the test texts
//! and token ids it ships (fetched by `scripts/install-tools`), read once
//! from the GGUF metadata and once as a `tokenizer.json` written here from
//! the same vocabulary.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use flotilla_runner::loader::HfConfig;
use flotilla_runner::tokenizer::{self, Tokenizer, TokenizerModel};

fn fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools/tokenizers")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-tools",
        p.display()
    );
    p
}

fn content(vocab: &str) -> gguf_file::Content {
    let mut file = std::fs::File::open(fixture(&format!("ggml-vocab-{vocab}.gguf"))).unwrap();
    gguf_file::Content::read(&mut file).unwrap()
}

/// The test texts and the ids llama.cpp gives each (no bos).
fn cases(vocab: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(fixture(&format!("ggml-vocab-{vocab}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(fixture(&format!("ggml-vocab-{vocab}.gguf.out"))).unwrap();
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .unwrap_or(&inp)
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{vocab}: inputs and outputs pair up"
    );
    assert!(texts.len() > 30);
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

fn check(vocab: &str, how: &str, tok: &Tokenizer) {
    let mut wrong = Vec::new();
    let all = cases(vocab);
    for (text, expected) in &all {
        let got = tok.encode(text);
        if &got != expected {
            wrong.push(format!("{text:?}: ours {got:?}, llama.cpp {expected:?}"));
        }
        // Decoding gives the text back, after the `▁` put in front.
        let back = tok.decode(&got, false);
        let want = if text.is_empty() {
            String::new()
        } else {
            format!(" {text}")
        };
        assert_eq!(back, want, "{vocab} ({how}): {text:?} does not decode back");
    }
    assert!(
        wrong.is_empty(),
        "{vocab} ({how}): {} of {} texts differ:\n{}",
        wrong.len(),
        all.len(),
        wrong.join("\n")
    );
}

#[test]
fn sentencepiece_vocabularies_from_gguf_match_llama_cpp() {
    for vocab in ["llama-spm", "phi-3"] {
        let tok = tokenizer::from_gguf(&content(vocab)).unwrap();
        assert_eq!(tok.model(), TokenizerModel::SentencePiece);
        assert!(tok.add_bos, "{vocab} asks for a bos token");
        check(vocab, "GGUF scores", &tok);
        // Special tokens written in the text stay whole, and the text
        // after them gets its `▁`.
        let ids = tok.encode("<s>Hello</s>");
        assert_eq!(ids.first(), tok.bos.as_ref());
        assert_eq!(tok.decode(&ids, false), "<s> Hello</s>");
        assert_eq!(tok.decode(&ids, true), " Hello");
    }
}

/// A Llama-2-style `tokenizer.json` (normalizer Prepend + Replace, BPE with
/// byte fallback) for the same vocabulary: merges derived the way the
/// Hugging Face converter does, pairs whose join is a token, ordered by
/// the joined token's score.
fn tokenizer_json(c: &gguf_file::Content) -> serde_json::Value {
    let strings = |key: &str| match c.metadata.get(key) {
        Some(gguf_file::Value::Array(v)) => v
            .iter()
            .map(|x| x.to_string().unwrap().clone())
            .collect::<Vec<_>>(),
        _ => panic!("{key}"),
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let (scores, types): (Vec<f32>, Vec<i32>) = match (
        c.metadata.get("tokenizer.ggml.scores"),
        c.metadata.get("tokenizer.ggml.token_type"),
    ) {
        (Some(gguf_file::Value::Array(s)), Some(gguf_file::Value::Array(t))) => (
            s.iter().map(|x| x.to_f32().unwrap()).collect(),
            t.iter().map(|x| x.to_i32().unwrap()).collect(),
        ),
        _ => panic!("scores and types"),
    };
    let index: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 1)
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, String)> = Vec::new();
    for (merged, &id) in &index {
        for (at, _) in merged.char_indices().skip(1) {
            let (a, b) = merged.split_at(at);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((-scores[id], ia, ib, format!("{a} {b}")));
            }
        }
    }
    merges.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] != 3)
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types[*i] == 3)
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]},
        "pre_tokenizer": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "byte_fallback": true, "fuse_unk": true,
                  "vocab": vocab,
                  "merges": merges.into_iter().map(|m| m.3).collect::<Vec<_>>()}
    })
}

#[test]
fn a_sentencepiece_tokenizer_json_matches_llama_cpp() {
    let c = content("llama-spm");
    let json = tokenizer_json(&c);
    let config: HfConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 32000,
        "bos_token_id": 1, "eos_token_id": 2
    }))
    .unwrap();
    let tokenizer_config = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
    let (tok, bos, eos) = tokenizer::from_hf_json(&json, &tokenizer_config, &config).unwrap();
    assert_eq!((bos.as_str(), eos.as_str()), ("<s>", "</s>"));
    assert_eq!(tok.model(), TokenizerModel::SentencePiece);
    check("llama-spm", "tokenizer.json merges", &tok);
}

#[test]
fn an_unknown_tokenizer_model_is_refused_by_name() {
    let json = serde_json::json!({
        "model": {"type": "WordPiece", "vocab": {"a": 0}},
        "pre_tokenizer": {"type": "BertPreTokenizer"}
    });
    let config: HfConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 1, "eos_token_id": 0
    }))
    .unwrap();
    let err = tokenizer::from_hf_json(&json, &serde_json::json!({}), &config)
        .unwrap_err()
        .to_string();
    assert!(err.contains("WordPiece"), "{err}");
}

/// The shipped model's byte-level BPE against ids llama.cpp gave for the
/// same texts (recorded in `tests/data/smollm2-tokens.json` with
/// llama-cpp-python 0.3.36, which CI does not install).
#[test]
fn the_shipped_models_byte_level_bpe_matches_llama_cpp() {
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../.tools/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut file = std::fs::File::open(&gguf).expect("run scripts/install-tools");
    let tok = tokenizer::from_gguf(&gguf_file::Content::read(&mut file).unwrap()).unwrap();
    assert_eq!(tok.model(), TokenizerModel::ByteLevel);
    assert!(!tok.add_bos);
    let recorded: serde_json::Value =
        serde_json::from_str(include_str!("../data/smollm2-tokens.json")).unwrap();
    let cases = recorded["cases"].as_array().unwrap();
    assert!(cases.len() > 40);
    let mut wrong = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text);
        if got != expected {
            wrong.push(format!("{text:?}: ours {got:?}, llama.cpp {expected:?}"));
        }
        assert_eq!(tok.decode(&got, false), text);
    }
    assert!(
        wrong.is_empty(),
        "{} texts differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Byte-level BPE vocabularies with the three pre-tokenizers besides
/// SmolLM2's: Llama 3's, Qwen2's and GPT-2's regexes.
#[test]
fn byte_level_vocabularies_from_gguf_match_llama_cpp() {
    for (vocab, split) in [
        ("llama-bpe", tokenizer::Split::Llama3),
        ("qwen2", tokenizer::Split::Qwen2),
        ("gpt-2", tokenizer::Split::Gpt2),
    ] {
        let tok = tokenizer::from_gguf(&content(vocab)).unwrap();
        assert_eq!(tok.model(), TokenizerModel::ByteLevel, "{vocab}");
        assert_eq!(tok.split(), Some(split), "{vocab}");
        let all = cases(vocab);
        let mut wrong = Vec::new();
        for (text, expected) in &all {
            let mut got = tok.encode(text);
            // llama.cpp's outputs start with the bos token where the vocabulary
            // asks for one.
            if tok.add_bos && tok.bos.is_some() && expected.first() == tok.bos.as_ref() {
                got.insert(0, expected[0]);
            }
            if &got != expected {
                wrong.push(format!("{text:?}: ours {got:?}, llama.cpp {expected:?}"));
            }
            assert_eq!(tok.decode(&tok.encode(text), false), *text, "{vocab}");
        }
        assert!(
            wrong.is_empty(),
            "{vocab}: {} of {} texts differ:\n{}",
            wrong.len(),
            all.len(),
            wrong.join("\n")
        );
    }
}

/// A byte-level vocabulary whose pre-tokenizer is unknown or missing is
/// refused, naming it and the supported ones, rather than split another
/// way; a SentencePiece one does not read the key at all.
#[test]
fn an_unknown_or_missing_pre_tokenizer_is_refused_by_name() {
    let mut c = content("gpt-2");
    c.metadata.insert(
        "tokenizer.ggml.pre".into(),
        gguf_file::Value::String("tekken".into()),
    );
    let err = tokenizer::from_gguf(&c).unwrap_err().to_string();
    assert!(err.contains("\"tekken\""), "{err}");
    assert!(err.contains("llama-bpe") && err.contains("qwen2"), "{err}");
    c.metadata.remove("tokenizer.ggml.pre");
    let err = tokenizer::from_gguf(&c).unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");

    let mut spm = content("llama-spm");
    spm.metadata.remove("tokenizer.ggml.pre");
    let tok = tokenizer::from_gguf(&spm).unwrap();
    assert_eq!(tok.split(), None);
    check("llama-spm", "GGUF without tokenizer.ggml.pre", &tok);
}

/// The same for a `tokenizer.json`: a Split regex the runner does not
/// implement is refused, one it does picks its pre-tokenizer.
#[test]
fn a_tokenizer_json_pre_tokenizer_is_known_by_its_regex() {
    let config: HfConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 3, "eos_token_id": 2
    }))
    .unwrap();
    let json = |regex: &str| {
        serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "decoder": {"type": "ByteLevel"}
        })
    };
    let llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let (tok, _, _) =
        tokenizer::from_hf_json(&json(llama3), &serde_json::json!({}), &config).unwrap();
    assert_eq!(tok.split(), Some(tokenizer::Split::Llama3));
    assert_eq!(tok.encode("ab"), vec![2]);
    let unknown = r"\p{L}+|\p{N}{1,3}|\s+";
    let err = tokenizer::from_hf_json(&json(unknown), &serde_json::json!({}), &config)
        .unwrap_err()
        .to_string();
    assert!(err.contains(unknown) && err.contains("Qwen2"), "{err}");
}
