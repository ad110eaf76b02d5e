//! The splice on fixed bytes: two replicas' streams of one answer become
//! the one stream the client sees.

use serde_json::{Value, json};

use super::*;

/// A chunk as the runner sends it, with `token_ids`.
fn chunk(id: &str, created: u64, text: &str, ids: &[u32], finish: Option<&str>) -> String {
    let choice = json!({"index": 0, "delta": {"content": text}, "finish_reason": finish, "logprobs": null, "token_ids": ids});
    format!(
        "data: {}\n\n",
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": "smollm2", "choices": [choice]})
    )
}

fn role_chunk(id: &str, created: u64) -> String {
    let choice = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null});
    format!(
        "data: {}\n\n",
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": "smollm2", "choices": [choice]})
    )
}

/// Runs `bytes` (cut at `cut_at`, to cross event boundaries) through the
/// splice; what the client gets, as parsed chunks, and the last relay.
fn relay(splice: &mut Splice, bytes: &str, cut_at: usize) -> (Vec<Value>, Option<Relay>) {
    let mut framer = SseFramer::default();
    let (a, b) = bytes.as_bytes().split_at(cut_at.min(bytes.len()));
    let mut out = Vec::new();
    let mut last = None;
    for part in [a, b] {
        for event in framer.push(part) {
            let r = splice.on_event(event);
            if let Relay::Send(s) | Relay::End(s) = &r
                && let Some(data) = s.strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<Value>(data.trim_end())
            {
                out.push(v);
            }
            last = Some(r);
        }
    }
    (out, last)
}

#[test]
fn a_second_replicas_stream_continues_the_first_as_one_answer() {
    let mut splice = Splice::new(false);
    let first = [
        role_chunk("chatcmpl-a", 100),
        chunk("chatcmpl-a", 100, "Hello", &[10, 11], None),
        ":\n\n".to_string(),
        chunk("chatcmpl-a", 100, ", wor", &[12], None),
    ]
    .concat();
    // The replica dies in the middle of its next chunk.
    let broken = format!("{first}data: {{\"id\":\"chatcmpl-a\",\"cho");
    let (seen, last) = relay(&mut splice, &broken, 17);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(matches!(last, Some(Relay::Send(_))));
    assert!(
        seen.iter()
            .all(|c| c["choices"][0].get("token_ids").is_none()),
        "the ids the gateway asked for are stripped: {seen:?}"
    );
    assert_eq!(splice.text, "Hello, wor");
    assert_eq!(splice.ids, Some(vec![10, 11, 12]));
    assert!(!splice.finished);

    let request = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "stream": true, "max_tokens": 10, "temperature": 0});
    let body = continuation(&request, true, &splice);
    assert_eq!(body["max_tokens"], 7, "three tokens already sent");
    assert_eq!(body["return_token_ids"], true);
    assert_eq!(body["continue_final_message"], true);
    assert_eq!(body["add_generation_prompt"], false);
    assert_eq!(body["continue_token_ids"], json!([10, 11, 12]));
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, wor"}])
    );
    assert_eq!(body["temperature"], 0);

    splice.next_leg();
    let usage = json!({"prompt_tokens": 23, "completion_tokens": 3, "total_tokens": 26});
    let mut done: Value = serde_json::from_str(
        chunk("chatcmpl-b", 200, "", &[2], Some("stop"))
            .trim_start_matches("data: ")
            .trim_end(),
    )
    .unwrap();
    done["usage"] = usage;
    done["system_fingerprint"] = json!("fp-b");
    let second = [
        role_chunk("chatcmpl-b", 200),
        chunk("chatcmpl-b", 200, "ld", &[13], None),
        chunk("chatcmpl-b", 200, "!", &[14], None),
        format!("data: {done}\n\n"),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    let (seen, last) = relay(&mut splice, &second, 5);
    assert_eq!(last, Some(Relay::End("data: [DONE]\n\n".into())));
    assert_eq!(seen.len(), 3, "the role chunk is dropped: {seen:?}");
    for c in &seen {
        assert_eq!(c["id"], "chatcmpl-a", "{c}");
        assert_eq!(c["created"], 100, "{c}");
        assert_eq!(c["model"], "smollm2", "{c}");
        assert!(c.get("system_fingerprint").is_none(), "{c}");
        assert!(c["choices"][0].get("token_ids").is_none(), "{c}");
    }
    assert_eq!(splice.text, "Hello, world!");
    assert!(splice.finished);
    assert_eq!(
        seen[2]["usage"],
        json!({"prompt_tokens": 20, "completion_tokens": 6, "total_tokens": 26}),
        "usage counts the whole completion"
    );
}

#[test]
fn ids_the_client_asked_for_are_kept() {
    let mut splice = Splice::new(true);
    let (seen, _) = relay(&mut splice, &chunk("c", 1, "Hi", &[5, 6], None), usize::MAX);
    assert_eq!(seen[0]["choices"][0]["token_ids"], json!([5, 6]));
}

#[test]
fn text_without_ids_allows_only_a_text_continuation() {
    let mut splice = Splice::new(false);
    let plain = "data: {\"id\":\"cmpl-1\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\"Once upon\",\"finish_reason\":null}]}\n\n";
    relay(&mut splice, plain, 30);
    assert_eq!(splice.ids, None);
    let request =
        json!({"model": "m", "prompt": "Tell a story.", "stream": true, "max_tokens": 50});
    let body = continuation(&request, false, &splice);
    assert_eq!(body["prompt"], "Tell a story.Once upon");
    assert!(body.get("continue_token_ids").is_none());
    assert_eq!(body["max_tokens"], 50, "no count of tokens to take off");
}

#[test]
fn a_completion_continues_from_its_ids_and_text() {
    let mut splice = Splice::new(false);
    let c = "data: {\"id\":\"cmpl-1\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\" upon\",\"finish_reason\":null,\"token_ids\":[7,8]}]}\n\n";
    relay(&mut splice, c, 3);
    let request =
        json!({"model": "m", "prompt": "Once", "stream": true, "max_completion_tokens": 2});
    let body = continuation(&request, false, &splice);
    assert_eq!(body["prompt"], "Once");
    assert_eq!(body["continue_token_ids"], json!([7, 8]));
    assert_eq!(body["continue_text"], " upon");
    assert_eq!(body["max_completion_tokens"], 1, "never below one");
}

#[test]
fn nothing_sent_resends_the_request_and_failures_inside_the_stream_are_seen() {
    let splice = Splice::new(false);
    let request = json!({"model": "m", "messages": [], "stream": true, "max_tokens": 5});
    assert_eq!(
        continuation(&request, true, &splice),
        with_token_ids(&request)
    );

    let mut splice = Splice::new(false);
    let (_, last) = relay(
        &mut splice,
        "data: {\"error\": {\"message\": \"boom\"}}\n\n",
        4,
    );
    assert!(matches!(last, Some(Relay::Failed(m)) if m.contains("boom")));
}

#[test]
fn only_single_choice_requests_that_are_not_continuations_migrate() {
    let cases = [
        (json!({"stream": true}), true),
        (json!({"n": 1}), true),
        (json!({"n": 2}), false),
        (json!({"continue_final_message": true}), false),
        (json!({"continue_token_ids": [1]}), false),
    ];
    for (request, expected) in cases {
        assert_eq!(migratable(&request), expected, "{request}");
    }
}

#[test]
fn events_split_at_blank_lines_whatever_the_line_ends() {
    let mut framer = SseFramer::default();
    assert_eq!(
        framer.push(b"data: a\r\n\r\ndata: b\n"),
        vec![SseEvent::Data("a".into())]
    );
    assert_eq!(
        framer.push(b"data: c\n\n: keep-alive\n\n"),
        vec![
            SseEvent::Data("b\nc".into()),
            SseEvent::Other(": keep-alive".into())
        ]
    );
}

#[test]
fn an_answer_cut_after_its_last_token_is_finished_here() {
    let mut splice = Splice::new(false);
    relay(
        &mut splice,
        &chunk("chatcmpl-a", 100, "Hi there", &[1, 2], None),
        9,
    );
    assert!(splice.length_reached(&json!({"max_tokens": 2})));
    assert!(!splice.length_reached(&json!({"max_tokens": 3})));
    assert!(!splice.length_reached(&json!({})));
    let end = splice.finish_length(true);
    let (seen, last) = relay(&mut Splice::new(false), &end, usize::MAX);
    assert_eq!(last, Some(Relay::End("data: [DONE]\n\n".into())));
    assert_eq!(seen[0]["id"], "chatcmpl-a");
    assert_eq!(seen[0]["created"], 100);
    assert_eq!(seen[0]["choices"][0]["finish_reason"], "length");
}
