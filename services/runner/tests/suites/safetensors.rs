//! Hugging Face folders (safetensors + config.json + tokenizer.json): tiny
//! random-weight llama and qwen2 models written by the test, checked
//! against candle-transformers' reference implementations, then served.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use flotilla_runner::engine;
use flotilla_runner::model::{Feed, Scratch};
use serde_json::{Value, json};

use crate::support::Runner;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const LAYERS: usize = 2;
const FFN: usize = 96;

/// GPT-2's printable stand-ins for bytes, as tokenizer.json writes them.
fn byte_chars() -> Vec<char> {
    let mut n = 0u32;
    (0..=255u8)
        .map(|b| {
            if (b'!'..=b'~').contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
            {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// 256 byte tokens, two merges, three special tokens: 261 in all.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
    }
    vocab.insert("he".into(), json!(256));
    vocab.insert("hel".into(), json!(257));
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    json!({
        "version": "1.0",
        "added_tokens": specials.iter().enumerate().map(|(i, s)| json!({"id": 258 + i, "content": s, "special": true})).collect::<Vec<_>>(),
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": ["h e", "he l"]},
    })
}

const VOCAB: usize = 261;

fn config(model_type: &str) -> Value {
    json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": model_type == "qwen2",
        "sliding_window": 4096,
        "max_window_layers": LAYERS,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "bos_token_id": 258,
        "eos_token_id": 258,
    })
}

fn random(shape: &[usize], scale: f64) -> Tensor {
    (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale).unwrap()
}

fn write_model(dir: &Path, model_type: &str) -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    let (q, kv) = (HIDDEN, HIDDEN / HEADS * KV_HEADS);
    t.insert(
        "model.embed_tokens.weight".to_string(),
        random(&[VOCAB, HIDDEN], 0.5),
    );
    t.insert(
        "model.norm.weight".into(),
        (random(&[HIDDEN], 0.1) + 1.0).unwrap(),
    );
    if model_type != "qwen2" {
        t.insert("lm_head.weight".into(), random(&[VOCAB, HIDDEN], 0.2));
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", q, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, q),
            ("mlp.gate_proj", FFN, HIDDEN),
            ("mlp.up_proj", FFN, HIDDEN),
            ("mlp.down_proj", HIDDEN, FFN),
        ] {
            t.insert(format!("{p}.{name}.weight"), random(&[rows, cols], 0.15));
        }
        if model_type == "qwen2" {
            for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                t.insert(format!("{p}.self_attn.{name}.bias"), random(&[rows], 0.1));
            }
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(
                format!("{p}.{norm}.weight"),
                (random(&[HIDDEN], 0.1) + 1.0).unwrap(),
            );
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), config(model_type).to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        })
        .to_string(),
    )
    .unwrap();
    t
}

/// Logits after the prompt, then after one more token, from candle's
/// reference implementation of the same weights.
fn reference(
    model_type: &str,
    tensors: &HashMap<String, Tensor>,
    prompt: &[u32],
    next: u32,
) -> Vec<Vec<f32>> {
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
    let ids = |t: &[u32]| Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    match model_type {
        "qwen2" => {
            use candle_transformers::models::qwen2;
            let cfg: qwen2::Config = serde_json::from_value(config(model_type)).unwrap();
            let mut m = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();
            let a = flat(m.forward(&ids(prompt), 0).unwrap());
            let b = flat(m.forward(&ids(&[next]), prompt.len()).unwrap());
            vec![a, b]
        }
        _ => {
            use candle_transformers::models::llama;
            let cfg: llama::LlamaConfig = serde_json::from_value(config(model_type)).unwrap();
            let cfg = cfg.into_config(false);
            let m = llama::Llama::load(vb, &cfg).unwrap();
            let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            let a = flat(m.forward(&ids(prompt), 0, &mut cache).unwrap());
            let b = flat(m.forward(&ids(&[next]), prompt.len(), &mut cache).unwrap());
            vec![a, b]
        }
    }
}

fn check_against_reference(model_type: &str) {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-runner-st-{model_type}-{}",
        std::process::id()
    ));
    let tensors = write_model(&dir, model_type);
    let loaded = engine::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.tokenizer.encode("hello"),
        vec![257, b'l' as u32, b'o' as u32]
    );
    let prompt = loaded
        .tokenizer
        .encode("<|im_start|>user\nhello there<|im_end|>\n");
    assert_eq!(prompt[0], 259, "special tokens stay whole");
    let next = 42u32;
    let expected = reference(model_type, &tensors, &prompt, next);
    let model = &loaded.weights;
    let mut cache = model.new_cache();
    let (mut scratch, mut logits) = (Scratch::default(), Vec::new());
    for (step, tokens) in [prompt.as_slice(), &[next]].into_iter().enumerate() {
        model
            .forward(
                &mut [Feed {
                    cache: &mut cache,
                    tokens,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        assert_eq!(logits.len(), VOCAB);
        let worst = logits
            .iter()
            .zip(&expected[step])
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst < 1e-3, "{model_type} step {step}: off by {worst}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_llama_folder_matches_candles_llama() {
    check_against_reference("llama");
}

#[test]
fn a_qwen2_folder_with_biases_and_tied_embeddings_matches_candles_qwen2() {
    check_against_reference("qwen2");
}

#[tokio::test]
async fn a_folder_is_served_over_the_openai_api() {
    let dir = std::env::temp_dir().join(format!("flotilla-runner-st-serve-{}", std::process::id()));
    write_model(&dir, "mistral");
    let runner = Runner::start(&dir, "tiny", 4, 4).await;
    let (status, v) = runner
        .post(
            "/v1/chat/completions",
            json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 5, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    // <|im_start|>, u s e r, \n, hel l o, <|im_end|>, \n, <|im_start|>,
    // a s s i s t a n t, \n: the template rendered, specials whole.
    assert_eq!(v["usage"]["prompt_tokens"], 22, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    drop(runner);
    std::fs::remove_dir_all(&dir).ok();
}
