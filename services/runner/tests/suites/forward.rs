//! The project's forward pass against candle's reference llama on the real
//! SmolLM2 GGUF, and batched against one-at-a-time.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use flotilla_runner::engine;
use flotilla_runner::model::{Feed, Scratch};
use flotilla_runner::sampling::argmax;

use crate::support::shipped_gguf;

fn candle_reference(prompt: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>) {
    let (mut logits, tokens) = candle_reference_of(&shipped_gguf(), prompt, steps);
    (logits.swap_remove(0), tokens)
}

fn candle_reference_of(
    path: &std::path::Path,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut file = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut weights = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let first: Vec<f32> = weights
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut tokens = vec![argmax(&first)];
    let mut all = vec![first];
    for i in 1..steps {
        let input = Tensor::new(&[tokens[i - 1]], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits: Vec<f32> = weights
            .forward(&input, prompt.len() + i - 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        tokens.push(argmax(&logits));
        all.push(logits);
    }
    (all, tokens)
}

#[test]
fn the_forward_pass_matches_candles_llama_and_batching_changes_nothing() {
    let loaded = engine::load_gguf(&shipped_gguf(), &Device::Cpu).unwrap();
    let model = &loaded.weights;
    let prompt = loaded.tokenizer.encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    );
    let steps = 12;
    let (reference_logits, reference_tokens) = candle_reference(&prompt, steps);

    // Prompt logits: close to candle's, same top token.
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let mut cache = model.new_cache();
    model
        .forward(
            &mut [Feed {
                cache: &mut cache,
                tokens: &prompt,
                logits: true,
            }],
            &mut scratch,
            &mut logits,
        )
        .unwrap();
    assert_eq!(logits.len(), reference_logits.len());
    let scale = reference_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
    let worst = logits
        .iter()
        .zip(&reference_logits)
        .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        worst < 0.05 * scale,
        "logits differ from candle's by {worst} (scale {scale})"
    );

    // Greedy decoding gives candle's tokens.
    let mut tokens = vec![argmax(&logits)];
    for _ in 1..steps {
        let last = [*tokens.last().unwrap()];
        model
            .forward(
                &mut [Feed {
                    cache: &mut cache,
                    tokens: &last,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        tokens.push(argmax(&logits));
    }
    assert_eq!(
        tokens,
        reference_tokens,
        "ours {:?} vs candle {:?}",
        loaded.tokenizer.decode(&tokens, false),
        loaded.tokenizer.decode(&reference_tokens, false)
    );

    // Three sequences at different positions in one step give exactly the
    // logits each gets alone.
    let prompts: Vec<Vec<u32>> = ["The sky is", "One, two, three,", "Paris is the capital of"]
        .iter()
        .map(|p| loaded.tokenizer.encode(p))
        .collect();
    let mut alone = Vec::new();
    let mut caches = Vec::new();
    for p in &prompts {
        let mut c = model.new_cache();
        model
            .forward(
                &mut [Feed {
                    cache: &mut c,
                    tokens: p,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        let next = [argmax(&logits)];
        model
            .forward(
                &mut [Feed {
                    cache: &mut c,
                    tokens: &next,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        alone.push(logits.clone());
        let mut fresh = model.new_cache();
        model
            .forward(
                &mut [Feed {
                    cache: &mut fresh,
                    tokens: p,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        caches.push((fresh, [argmax(&logits)]));
    }
    let mut feeds: Vec<Feed<'_>> = caches
        .iter_mut()
        .map(|(c, next)| Feed {
            cache: c,
            tokens: next.as_slice(),
            logits: true,
        })
        .collect();
    model
        .forward(&mut feeds, &mut scratch, &mut logits)
        .unwrap();
    let vocab = model.config.vocab;
    for (i, a) in alone.iter().enumerate() {
        assert_eq!(
            &logits[i * vocab..(i + 1) * vocab],
            a.as_slice(),
            "sequence {i}"
        );
    }
}

/// The shipped GGUF with its `ffn_down` matrices (1536 inputs, a multiple
/// of the K-quants' 256) re-quantized to Q4_K and Q6_K in turn: those go
/// through candle's `QMatMul`, the rest through the project's kernels, and
/// the result still follows candle's own llama on the same file.
#[test]
fn a_gguf_with_k_quants_matches_candles_llama() {
    use candle_core::quantized::{GgmlDType, QTensor};

    let mut file = std::fs::File::open(shipped_gguf()).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut requantized = 0;
    for name in names {
        let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let q = if name.ends_with("ffn_down.weight") {
            requantized += 1;
            let kind = if requantized % 2 == 0 {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            };
            QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), kind).unwrap()
        } else {
            q
        };
        tensors.push((name.clone(), q));
    }
    assert_eq!(requantized, 30);
    let dir = std::env::temp_dir().join(format!("flotilla-kquant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smollm2-kquant.gguf");
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let metadata: Vec<(&str, &gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    }
    let loaded = engine::load_gguf(&path, &Device::Cpu).unwrap();
    let prompt = loaded
        .tokenizer
        .encode("<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n");
    let steps = 8;
    let (reference_logits, reference_tokens) = candle_reference_of(&path, &prompt, steps);
    // Fed candle's own tokens, each step's logits stay close to candle's and
    // pick its token wherever its choice is not a near tie.
    let model = &loaded.weights;
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let mut cache = model.new_cache();
    let mut feed = prompt.clone();
    let mut checked = 0;
    for (step, (reference, token)) in reference_logits.iter().zip(&reference_tokens).enumerate() {
        model
            .forward(
                &mut [Feed {
                    cache: &mut cache,
                    tokens: &feed,
                    logits: true,
                }],
                &mut scratch,
                &mut logits,
            )
            .unwrap();
        let scale = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = logits
            .iter()
            .zip(reference)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        // The unmodified file differs from candle by up to about 1 too:
        // activations are quantized differently.
        assert!(
            worst < 1.5,
            "step {step}: logits differ by {worst} (largest {scale})"
        );
        let mut sorted = reference.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 0.1 {
            assert_eq!(argmax(&logits), *token, "step {step}");
            checked += 1;
        }
        feed = vec![*token];
    }
    assert!(checked >= steps / 2, "most steps have a clear choice");
    std::fs::remove_dir_all(&dir).ok();
}
