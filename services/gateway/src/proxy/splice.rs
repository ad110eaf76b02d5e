//! Splicing a streamed answer from several replicas into one stream: the
//! pure part of request migration.
//!
//! [`SseFramer`] cuts a replica's bytes into server-sent events. A
//! [`Splice`] follows the answer across replicas ("legs"): it keeps the
//! text and token ids the client has been sent, rewrites each later leg's
//! chunks to the first leg's `id`, `created`, `model` and
//! `system_fingerprint`, drops a later leg's role-only first chunk, counts
//! `usage` over the whole completion and strips the `token_ids` the
//! gateway asked for on the client's behalf. [`continuation`] builds the
//! request that continues the answer on another replica.

use serde_json::{Value, json};

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseEvent {
    /// The event's data (its `data:` lines joined).
    Data(String),
    /// An event without data (a keep-alive comment), as received.
    Other(String),
}

/// Cuts a byte stream into events at blank lines.
#[derive(Debug, Default)]
pub struct SseFramer {
    buffer: Vec<u8>,
}

impl SseFramer {
    /// The events `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, gap)) = blank_line(&self.buffer) {
            let block: Vec<u8> = self.buffer.drain(..end + gap).take(end).collect();
            let block = String::from_utf8_lossy(&block);
            let mut data: Option<String> = None;
            for line in block.lines() {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if let Some(rest) = line.strip_prefix("data:") {
                    let rest = rest.strip_prefix(' ').unwrap_or(rest);
                    match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(rest);
                        }
                        None => data = Some(rest.to_string()),
                    }
                }
            }
            events.push(match data {
                Some(d) => SseEvent::Data(d),
                None => SseEvent::Other(block.into_owned()),
            });
        }
        events
    }
}

/// Where the first blank line ends an event: the event's length and the
/// separator's.
fn blank_line(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// What to do with one upstream event.
#[derive(Debug, Clone, PartialEq)]
pub enum Relay {
    /// Send these bytes to the client.
    Send(String),
    /// Nothing for the client (a later leg's role chunk).
    Skip,
    /// The answer is complete: send these bytes and end.
    End(String),
    /// The replica reported a failure inside the stream.
    Failed(String),
}

/// The fields every chunk of one answer repeats.
const ENVELOPE: [&str; 4] = ["id", "created", "model", "system_fingerprint"];

/// One streamed answer, followed across the replicas that served it.
#[derive(Debug)]
pub struct Splice {
    client_wants_ids: bool,
    /// The first leg's envelope fields, as they came.
    envelope: Option<Vec<(&'static str, Option<Value>)>>,
    /// The text the client has been sent.
    pub text: String,
    /// The ids of the tokens the client has been sent; `None` once a
    /// replica sent text without them (then only a text continuation is
    /// possible).
    pub ids: Option<Vec<u32>>,
    /// A chunk with a `finish_reason` has been sent.
    pub finished: bool,
    /// Which replica serves the answer now (0: the first).
    pub leg: usize,
    /// Whether this leg has sent a chunk yet.
    leg_started: bool,
    /// Ids the current leg's replica was given as already generated.
    offset: usize,
}

impl Splice {
    pub fn new(client_wants_ids: bool) -> Self {
        Self {
            client_wants_ids,
            envelope: None,
            text: String::new(),
            ids: Some(Vec::new()),
            finished: false,
            leg: 0,
            leg_started: false,
            offset: 0,
        }
    }

    /// The answer's id as the client sees it, once known.
    pub fn answer_id(&self) -> Option<String> {
        let envelope = self.envelope.as_ref()?;
        envelope
            .iter()
            .find(|(k, _)| *k == "id")
            .and_then(|(_, v)| v.as_ref()?.as_str().map(str::to_string))
    }

    /// Tokens the client has been sent (the ids when known).
    pub fn tokens_sent(&self) -> usize {
        self.ids.as_ref().map_or(0, Vec::len)
    }

    /// Another replica takes over, given what was sent so far.
    pub fn next_leg(&mut self) {
        self.leg += 1;
        self.leg_started = false;
        self.offset = self.tokens_sent();
    }

    /// Follows one event of the current leg.
    pub fn on_event(&mut self, event: SseEvent) -> Relay {
        let data = match event {
            SseEvent::Other(raw) => return Relay::Send(format!("{raw}\n\n")),
            SseEvent::Data(d) => d,
        };
        if data.trim() == "[DONE]" {
            return Relay::End("data: [DONE]\n\n".into());
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(&data) else {
            return Relay::Send(format!("data: {data}\n\n"));
        };
        if let Some(e) = chunk.get("error") {
            return Relay::Failed(e.to_string());
        }
        let first_of_leg = !self.leg_started;
        self.leg_started = true;
        match &self.envelope {
            None => {
                self.envelope = Some(
                    ENVELOPE
                        .iter()
                        .map(|k| (*k, chunk.get(*k).cloned()))
                        .collect(),
                );
            }
            Some(envelope) => {
                if let Some(fields) = chunk.as_object_mut() {
                    for (k, v) in envelope {
                        match v {
                            Some(v) => {
                                fields.insert((*k).to_string(), v.clone());
                            }
                            None => {
                                fields.remove(*k);
                            }
                        }
                    }
                }
            }
        }
        if self.leg > 0 && first_of_leg && role_only(&chunk) {
            return Relay::Skip;
        }
        if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
            for choice in choices {
                self.follow(choice);
            }
        }
        if self.offset > 0
            && let Some(usage) = chunk.get_mut("usage").filter(|u| u.is_object())
        {
            // The replica counted the continued tokens as prompt; the
            // client asked for one completion.
            let moved = self.offset as u64;
            let prompt = usage["prompt_tokens"].as_u64().unwrap_or(0);
            let completion = usage["completion_tokens"].as_u64().unwrap_or(0);
            usage["prompt_tokens"] = json!(prompt.saturating_sub(moved));
            usage["completion_tokens"] = json!(completion + moved);
        }
        Relay::Send(format!("data: {chunk}\n\n"))
    }

    /// Takes one choice's text, ids and finish; strips the ids the client
    /// did not ask for.
    fn follow(&mut self, choice: &mut Value) {
        let text = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let ids: Option<Vec<u32>> = choice.get("token_ids").and_then(|ids| {
            ids.as_array()?
                .iter()
                .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
                .collect()
        });
        match (ids, &mut self.ids) {
            (Some(new), Some(sent)) => sent.extend(new),
            (None, sent) if !text.is_empty() => *sent = None,
            _ => {}
        }
        self.text.push_str(&text);
        if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
            self.finished = true;
        }
        if !self.client_wants_ids
            && let Some(fields) = choice.as_object_mut()
        {
            fields.remove("token_ids");
        }
    }
}

impl Splice {
    /// Whether every token `request` allows has been sent: the answer is
    /// over but for its finish chunk.
    pub fn length_reached(&self, request: &Value) -> bool {
        let max = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|f| request.get(*f).and_then(Value::as_u64));
        self.ids.is_some() && max.is_some_and(|max| self.tokens_sent() as u64 >= max)
    }

    /// The finish chunk (`length`) and `[DONE]` of an answer that reached
    /// its length when its replica failed, in the answer's envelope.
    pub fn finish_length(&self, chat: bool) -> String {
        let choice = if chat {
            json!({"index": 0, "delta": {}, "finish_reason": "length", "logprobs": null})
        } else {
            json!({"index": 0, "text": "", "finish_reason": "length", "logprobs": null})
        };
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut chunk = json!({"object": object, "choices": [choice]});
        for (k, v) in self.envelope.iter().flatten() {
            if let Some(v) = v {
                chunk[*k] = v.clone();
            }
        }
        format!("data: {chunk}\n\ndata: [DONE]\n\n")
    }
}

/// A chunk that only opens the assistant's turn.
fn role_only(chunk: &Value) -> bool {
    let Some([choice]) = chunk
        .get("choices")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    else {
        return false;
    };
    let Some(delta) = choice.get("delta").and_then(Value::as_object) else {
        return false;
    };
    let empty_content = delta
        .get("content")
        .is_none_or(|c| c.is_null() || c.as_str() == Some(""));
    let no_ids = choice
        .get("token_ids")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    delta.contains_key("role")
        && empty_content
        && no_ids
        && choice.get("finish_reason").is_none_or(Value::is_null)
}

/// Whether a streaming request can be continued elsewhere: one choice,
/// and not itself a continuation (its own final message would be lost).
pub fn migratable(request: &Value) -> bool {
    request
        .get("n")
        .is_none_or(|n| n.is_null() || n.as_u64() == Some(1))
        && request
            .get("continue_final_message")
            .is_none_or(|c| c.as_bool() != Some(true))
        && request.get("continue_token_ids").is_none()
        && request.get("continue_text").is_none()
}

/// The request sent to a replica for `request`, asking for token ids.
pub fn with_token_ids(request: &Value) -> Value {
    let mut body = request.clone();
    body["return_token_ids"] = json!(true);
    body
}

/// The request that continues `request` (a chat when `chat`) after the
/// client has been sent `splice.text`: the exact continuation when the
/// token ids are known, text only otherwise (what a replica without
/// `continue_token_ids` understands). `max_tokens` is what is left of it.
pub fn continuation(request: &Value, chat: bool, splice: &Splice) -> Value {
    let mut body = with_token_ids(request);
    if splice.text.is_empty() && splice.tokens_sent() == 0 {
        // Nothing sent: the same request, anew.
        return body;
    }
    let sent = splice.tokens_sent() as u64;
    for field in ["max_tokens", "max_completion_tokens"] {
        if let Some(max) = body.get(field).and_then(Value::as_u64) {
            body[field] = json!(max.saturating_sub(sent).max(1));
        }
    }
    if chat {
        if let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) {
            messages.push(json!({"role": "assistant", "content": splice.text}));
        }
        body["continue_final_message"] = json!(true);
        body["add_generation_prompt"] = json!(false);
        if let Some(ids) = &splice.ids {
            body["continue_token_ids"] = json!(ids);
        }
    } else {
        match &splice.ids {
            Some(ids) => {
                body["continue_token_ids"] = json!(ids);
                body["continue_text"] = json!(splice.text);
            }
            None => {
                if let Some(prompt) = body.get("prompt").and_then(Value::as_str) {
                    body["prompt"] = json!(format!("{prompt}{}", splice.text));
                }
            }
        }
    }
    body
}

#[cfg(test)]
mod tests;
