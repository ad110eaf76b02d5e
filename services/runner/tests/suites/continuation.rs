//! Continuing a completion where another replica left it, on the real
//! SmolLM2 GGUF over HTTP: the prompt plus the tokens a stream had sent,
//! continued, gives the rest of the uninterrupted answer exactly, greedy
//! and seeded; bad continuations are refused naming the field.

use serde_json::{Value, json};

use crate::support::Runner;

async fn start() -> Runner {
    Runner::shipped(16, 8).await
}

impl Runner {
    /// A streamed answer's chunks: (text, token ids) of each, after the
    /// role chunk; and the finish chunk's usage.
    async fn stream(&self, path: &str, body: &Value) -> (Vec<(String, Vec<u64>)>, Value) {
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["return_token_ids"] = json!(true);
        let text = self
            .client
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut chunks = Vec::new();
        let mut usage = Value::Null;
        let mut done = false;
        for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            let choice = &chunk["choices"][0];
            if choice["delta"].get("role").is_some() {
                continue;
            }
            let piece = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .unwrap_or_default();
            let ids = choice["token_ids"]
                .as_array()
                .unwrap_or_else(|| panic!("no token_ids: {chunk}"))
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            chunks.push((piece.to_string(), ids));
            if !chunk["usage"].is_null() {
                usage = chunk["usage"].clone();
            }
        }
        assert!(done, "no [DONE]: {text}");
        (chunks, usage)
    }
}

fn joined(chunks: &[(String, Vec<u64>)]) -> (String, Vec<u64>) {
    chunks.iter().fold(
        (String::new(), Vec::new()),
        |(mut t, mut ids), (piece, more)| {
            t.push_str(piece);
            ids.extend(more);
            (t, ids)
        },
    )
}

/// For a request, cut its stream after several chunks and continue from
/// there: each continuation completes the uninterrupted text exactly.
async fn continues_exactly(r: &Runner, path: &str, request: Value) {
    let chat = path.ends_with("chat/completions");
    let (chunks, usage) = r.stream(path, &request).await;
    let (whole, all_ids) = joined(&chunks);
    assert!(chunks.len() > 8, "{chunks:?}");
    let (status, plain) = r
        .post(path, &{
            let mut b = request.clone();
            b["return_token_ids"] = json!(true);
            b
        })
        .await;
    assert_eq!(status, 200, "{plain}");
    let plain_choice = &plain["choices"][0];
    let plain_text = plain_choice["message"]["content"]
        .as_str()
        .or(plain_choice["text"].as_str())
        .unwrap();
    assert_eq!(plain_text, whole, "streamed and whole answers agree");
    assert_eq!(plain_choice["token_ids"], json!(all_ids));
    let max = request["max_tokens"].as_u64().unwrap();
    for cut in [1, 3, chunks.len() / 2, chunks.len() - 2] {
        let (sent, ids) = joined(&chunks[..cut]);
        if ids.len() as u64 >= max {
            // Nothing left to continue: the gateway ends such a stream
            // itself.
            continue;
        }
        let mut body = request.clone();
        body["max_tokens"] = json!(max - ids.len() as u64);
        body["continue_token_ids"] = json!(ids);
        if chat {
            body["messages"]
                .as_array_mut()
                .unwrap()
                .push(json!({"role": "assistant", "content": sent}));
            body["continue_final_message"] = json!(true);
            body["add_generation_prompt"] = json!(false);
        } else {
            body["continue_text"] = json!(sent);
        }
        let (rest, rest_usage) = r.stream(path, &body).await;
        let (rest, _) = joined(&rest);
        assert_eq!(
            format!("{sent}{rest}"),
            whole,
            "continued after {cut} chunks ({} tokens)",
            ids.len()
        );
        let k = ids.len() as u64;
        assert_eq!(
            rest_usage["prompt_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + k,
            "the continued tokens count as prompt"
        );
        assert_eq!(
            rest_usage["completion_tokens"].as_u64().unwrap() + k,
            usage["completion_tokens"].as_u64().unwrap()
        );
    }
}

#[tokio::test]
async fn a_continued_answer_is_the_uninterrupted_one_greedy_seeded_and_completions() {
    let r = start().await;
    let user = |text: &str| json!([{"role": "user", "content": text}]);
    continues_exactly(
        &r,
        "/v1/chat/completions",
        json!({"model": "smollm2", "messages": user("Tell me about the Moon in three sentences."), "temperature": 0, "max_tokens": 48}),
    )
    .await;
    continues_exactly(
        &r,
        "/v1/chat/completions",
        json!({"messages": user("Write a short poem about rain."), "temperature": 0.9, "seed": 7, "top_p": 0.95, "frequency_penalty": 0.5, "max_tokens": 40}),
    )
    .await;
    continues_exactly(
        &r,
        "/v1/completions",
        json!({"prompt": "The history of Rome begins", "temperature": 0.7, "seed": 3, "max_tokens": 40}),
    )
    .await;
    // With a stop sequence the text held back for it is sent by the
    // continuation.
    continues_exactly(
        &r,
        "/v1/chat/completions",
        json!({"messages": user("List five fruits, one per line."), "temperature": 0, "max_tokens": 40, "stop": ["zzz-never"]}),
    )
    .await;
}

#[tokio::test]
async fn a_text_only_continuation_goes_on_from_the_partial_answer() {
    let r = start().await;
    let (status, v) = r
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}],
                    "continue_final_message": true, "add_generation_prompt": false, "temperature": 0, "max_tokens": 6}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
}

#[tokio::test]
async fn bad_continuations_are_refused_naming_the_field() {
    let r = start().await;
    let ask = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}], "continue_final_message": true, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            "an id outside the vocabulary",
            ask(json!({"continue_token_ids": [1, 4_000_000]})),
            "continue_token_ids[1]",
        ),
        (
            "a negative id",
            ask(json!({"continue_token_ids": [-1]})),
            "continue_token_ids[0]",
        ),
        (
            "text that is not the ids' text",
            ask(json!({"continue_token_ids": [28]})),
            "messages[1].content",
        ),
        (
            "both prompts",
            ask(json!({"add_generation_prompt": true})),
            "add_generation_prompt",
        ),
        (
            "the final message is the user's",
            json!({"messages": [{"role": "user", "content": "Hi"}], "continue_final_message": true}),
            "messages[0].role",
        ),
        (
            "ids without continuing",
            json!({"messages": [{"role": "user", "content": "Hi"}], "continue_token_ids": [1]}),
            "continue_token_ids",
        ),
    ];
    for (what, body, param) in cases {
        let (status, v) = r.post("/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["param"], param, "{what}: {v}");
    }
    let (status, v) = r
        .post(
            "/v1/completions",
            &json!({"prompt": "Hi", "continue_text": "x"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "continue_text");
}
